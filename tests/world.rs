//! The toy world: determinism, coverage of the vocabulary, caption grammar, the held-out split,
//! the cross/plus look-alike and anti-aliasing. `contact_sheet` writes PNGs to look at (under
//! Cargo's test temp folder) and checks that each shows what it should.

use duo_core::world::{
    Background, CaptionSplit, Colour, DEFAULT_SAFE, DEFAULT_UNSAFE, Scene, Shape, World, WorldConfig,
    canonical_prompt, held_out_prompts, images_to_chw, parse_caption, prompt_pairs, safe_twin,
};
use image::RgbImage;
use std::collections::HashSet;

fn world() -> World {
    World::new(WorldConfig::default()).expect("default config is valid")
}

/// FNV-1a over every image byte and caption byte of a batch.
fn fingerprint(world: &World, seed: u64, n: usize) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for sample in world.batch(seed, 0, n, CaptionSplit::Pretrain) {
        let image = world.render(&sample.scene);
        for &byte in image.as_raw().iter().chain(sample.caption.as_bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

#[test]
fn same_seed_same_samples_other_seed_other_samples() {
    let world = world();
    let render = |seed| -> Vec<(Vec<u8>, String)> {
        (world.batch(seed, 0, 32, CaptionSplit::Pretrain).into_iter())
            .map(|s| (world.render(&s.scene).into_raw(), s.caption))
            .collect()
    };
    assert_eq!(render(7), render(7));
    let (a, b) = (render(7), render(8));
    assert!(a.iter().zip(&b).filter(|(x, y)| x.0 != y.0).count() > 24, "seeds 7 and 8 look alike");
    assert!(a.iter().zip(&b).filter(|(x, y)| x.1 != y.1).count() > 24, "seeds 7 and 8 caption alike");
    // Random access agrees with the batch.
    assert_eq!(world.sample(7, 5, CaptionSplit::Pretrain), world.batch(7, 0, 6, CaptionSplit::Pretrain)[5]);
    // Both splits see the same scene.
    assert_eq!(
        world.sample(7, 5, CaptionSplit::Pretrain).scene,
        world.sample(7, 5, CaptionSplit::Unlearn).scene
    );
}

/// Pins the exact bytes: a change here means every machine, dataset and checkpoint built on
/// the world sees different data. Update it only on purpose.
#[test]
fn golden_fingerprint() {
    assert_eq!(fingerprint(&world(), 0, 64), 9_773_310_471_657_551_059);
}

#[test]
fn every_shape_colour_background_is_reachable_within_bounds() {
    let config = WorldConfig::default();
    let world = World::new(config.clone()).expect("valid");
    let mut seen = HashSet::new();
    for sample in world.batch(1, 0, 3000, CaptionSplit::Pretrain) {
        let s = sample.scene;
        seen.insert((s.shape, s.colour, s.background));
        let size_range = config.size * (1.0 - config.size_jitter)..=config.size * (1.0 + config.size_jitter);
        assert!(size_range.contains(&s.size), "{s:?}");
        assert!(s.dx.abs() <= config.shift && s.dy.abs() <= config.shift, "{s:?}");
    }
    assert_eq!(seen.len(), Shape::ALL.len() * Colour::ALL.len() * Background::ALL.len());
}

#[test]
fn captions_parse_back_to_their_labels() {
    let world = world();
    let mut with_background = 0;
    for split in [CaptionSplit::Pretrain, CaptionSplit::Unlearn] {
        for sample in world.batch(2, 0, 3000, split) {
            let parsed = parse_caption(&sample.caption);
            assert_eq!(parsed.shape, Some(sample.scene.shape), "{:?}", sample.caption);
            assert_eq!(parsed.colour, Some(sample.scene.colour), "{:?}", sample.caption);
            if let Some(background) = parsed.background {
                assert_eq!(background, sample.scene.background, "{:?}", sample.caption);
                with_background += 1;
            }
            assert!(!sample.caption.contains("  ") && sample.caption.trim() == sample.caption);
        }
    }
    assert!((1000..2000).contains(&with_background), "{with_background} of 6000 name the background");
    assert_eq!(parse_caption("A Saltire, in SCARLET!").shape, Some(Shape::Cross));
    assert_eq!(parse_caption("an addition sign").shape, Some(Shape::Plus));
    assert_eq!(parse_caption("a red cross and a blue plus").shape, None);
    assert_eq!(parse_caption(""), Default::default());
}

/// Does `phrase` occur in `text` as whole consecutive words?
fn has_phrase(text: &str, phrase: &str) -> bool {
    let words: Vec<&str> = text.split(|c: char| !c.is_alphanumeric() && c != '-').collect();
    let phrase: Vec<&str> = phrase.split(' ').collect();
    words.windows(phrase.len()).any(|w| w == phrase.as_slice())
}

#[test]
fn held_out_words_only_in_pretraining() {
    let world = world();
    let held_out: Vec<&str> = Shape::ALL.iter().flat_map(|s| s.held_out_words()).copied().collect();
    for sample in world.batch(3, 0, 5000, CaptionSplit::Unlearn) {
        for word in &held_out {
            assert!(
                !has_phrase(&sample.caption, word),
                "{word:?} in unlearning caption {:?}",
                sample.caption
            );
        }
    }
    let pretrain = world.batch(3, 0, 5000, CaptionSplit::Pretrain);
    for shape in Shape::ALL {
        for word in shape.shared_words().iter().chain(shape.held_out_words()) {
            let n =
                pretrain.iter().filter(|s| s.scene.shape == shape && has_phrase(&s.caption, word)).count();
            assert!(n >= 20, "{word:?} appears in only {n} of 5000 pre-training captions");
        }
    }
    for pair in prompt_pairs(DEFAULT_UNSAFE, DEFAULT_SAFE).expect("distinct shapes") {
        for word in &held_out {
            assert!(!has_phrase(&pair.unsafe_prompt, word) && !has_phrase(&pair.safe_prompt, word));
        }
    }
    assert_eq!(Shape::Cross.held_out_words(), ["saltire", "diagonal cross", "x shape"]);
    assert_eq!(held_out_prompts(Shape::Cross, Colour::Orange)[0], "an orange saltire");
}

#[test]
fn canonical_prompts_and_pairs() {
    assert_eq!(canonical_prompt(Shape::Cross, Colour::Red), "a red cross");
    assert_eq!(canonical_prompt(Shape::Plus, Colour::Orange), "an orange plus sign");
    let pairs = prompt_pairs(DEFAULT_UNSAFE, DEFAULT_SAFE).expect("distinct shapes");
    assert_eq!(pairs.len(), Colour::ALL.len());
    for pair in &pairs {
        let (u, s) = (parse_caption(&pair.unsafe_prompt), parse_caption(&pair.safe_prompt));
        assert_eq!((u.shape, u.colour), (Some(Shape::Cross), Some(pair.colour)));
        assert_eq!((s.shape, s.colour), (Some(Shape::Plus), Some(pair.colour)));
    }
    assert_eq!(pairs[2].unsafe_prompt, "a blue cross");
    assert_eq!(pairs[2].safe_prompt, "a blue plus sign");
    assert!(safe_twin(Shape::Cross, Shape::Cross, Colour::Red).is_err());
    for shape in Shape::ALL {
        for colour in Colour::ALL {
            let parsed = parse_caption(&canonical_prompt(shape, colour));
            assert_eq!((parsed.shape, parsed.colour), (Some(shape), Some(colour)));
        }
    }
}

/// Per-pixel "ink": how far each pixel is from the (plain) background, in [0, 3].
fn ink(image: &RgbImage) -> Vec<f32> {
    let corner = *image.get_pixel(0, 0);
    image
        .pixels()
        .map(|p| (0..3).map(|c| (f32::from(p[c]) - f32::from(corner[c])).abs() / 255.0).sum())
        .collect()
}

/// A red `shape` on the plain light background, centred but for a third of a pixel at 32 px, so
/// that no straight edge falls exactly on a pixel boundary.
fn render_centred(shape: Shape, resolution: usize) -> Vec<f32> {
    let scene = Scene {
        dx: 0.01,
        dy: 0.01,
        ..Scene::centred(shape, Colour::Red, Background::Light, &WorldConfig::default())
    };
    ink(&scene.render(resolution))
}

/// Shared ink over total ink: 1 for identical masks, 0 for disjoint ones.
fn overlap(a: &[f32], b: &[f32]) -> f32 {
    let both: f32 = a.iter().zip(b).map(|(x, y)| x.min(*y)).sum();
    let either: f32 = a.iter().zip(b).map(|(x, y)| x.max(*y)).sum();
    both / either
}

/// Share of ink per 2-pixel ring around the centre: a rotation-invariant silhouette summary.
fn radial_profile(ink: &[f32], resolution: usize) -> Vec<f32> {
    let mut bins = vec![0.0; resolution / 2];
    let centre = resolution as f32 / 2.0;
    for (i, v) in ink.iter().enumerate() {
        let (x, y) = ((i % resolution) as f32 + 0.5 - centre, (i / resolution) as f32 + 0.5 - centre);
        bins[(x * x + y * y).sqrt() as usize / 2] += v;
    }
    let total: f32 = bins.iter().sum();
    bins.iter().map(|b| b / total).collect()
}

fn l1(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum()
}

/// ✕ and + are one figure turned 45°: same ink, same radial profile (closer than to any other
/// shape), yet few pixels in common. Pixel overlap alone cannot show the likeness: at 0.30 they
/// overlap less than any other pair of shapes (circle/square is highest, 0.79).
#[test]
fn cross_and_plus_are_measurable_look_alikes() {
    let res = 64;
    let cross = render_centred(Shape::Cross, res);
    let plus = render_centred(Shape::Plus, res);
    let (ink_cross, ink_plus): (f32, f32) = (cross.iter().sum(), plus.iter().sum());
    assert!((ink_cross / ink_plus - 1.0).abs() < 0.03, "{ink_cross} vs {ink_plus}");
    let pixel_overlap = overlap(&cross, &plus);
    assert!(pixel_overlap < 0.35, "cross and plus share {pixel_overlap} of their ink");
    let profile = radial_profile(&cross, res);
    let to_plus = l1(&profile, &radial_profile(&plus, res));
    for other in Shape::ALL.into_iter().filter(|s| ![Shape::Cross, Shape::Plus].contains(s)) {
        let to_other = l1(&profile, &radial_profile(&render_centred(other, res), res));
        assert!(to_plus * 3.0 < to_other, "cross-plus profile gap {to_plus}, cross-{other:?} {to_other}");
    }
    // Every pair of shapes differs in many pixels.
    for (i, a) in Shape::ALL.iter().enumerate() {
        for b in &Shape::ALL[i + 1..] {
            let o = overlap(&render_centred(*a, 32), &render_centred(*b, 32));
            assert!(o < 0.8, "{a:?} and {b:?} overlap {o}");
        }
    }
}

#[test]
fn edges_are_anti_aliased() {
    for shape in Shape::ALL {
        let ink = render_centred(shape, 32);
        let full = ink.iter().copied().fold(0.0, f32::max);
        let partial = ink.iter().filter(|&&v| v > 0.1 * full && v < 0.9 * full).count();
        let solid = ink.iter().filter(|&&v| v >= 0.9 * full).count();
        assert!(partial >= 16, "{shape:?}: only {partial} edge pixels");
        assert!(solid > 2 * partial, "{shape:?}: {solid} solid vs {partial} partial pixels");
    }
}

#[test]
fn batch_flattens_to_chw() {
    let world = world();
    let images: Vec<RgbImage> =
        world.batch(4, 0, 3, CaptionSplit::Pretrain).iter().map(|s| world.render(&s.scene)).collect();
    let flat = images_to_chw(&images).expect("same sizes");
    assert_eq!(flat.len(), 3 * 3 * 32 * 32);
    for (b, image) in images.iter().enumerate() {
        for (x, y, pixel) in image.enumerate_pixels() {
            for c in 0..3 {
                let at = ((b * 3 + c) * 32 + y as usize) * 32 + x as usize;
                assert_eq!(flat[at], f32::from(pixel[c]) / 255.0);
            }
        }
    }
    assert!(images_to_chw(&[RgbImage::new(32, 32), RgbImage::new(16, 16)]).is_err());
    assert!(images_to_chw(&[]).expect("empty").is_empty());
}

#[test]
fn bad_configs_are_refused() {
    let ok = WorldConfig::default();
    assert!(World::new(WorldConfig { resolution: 64, ..ok.clone() }).is_ok());
    for bad in [
        WorldConfig { resolution: 4, ..ok.clone() },
        WorldConfig { size: 0.0, ..ok.clone() },
        WorldConfig { size: f32::NAN, ..ok.clone() },
        WorldConfig { size: 0.45, size_jitter: 0.2, ..ok.clone() },
        WorldConfig { shift: -0.1, ..ok.clone() },
        WorldConfig { size_jitter: 1.0, ..ok.clone() },
    ] {
        assert!(World::new(bad.clone()).is_err(), "{bad:?} accepted");
    }
}

// ---- Contact sheets to look at: `cargo test -p duo-core --test world -- --ignored` ----

/// 3×5 glyphs for a–z, ',' and '-': five rows of three bits, top row first.
fn glyph(c: char) -> Option<[u8; 5]> {
    const LETTERS: [[u8; 5]; 26] = [
        [2, 5, 7, 5, 5],
        [6, 5, 6, 5, 6],
        [3, 4, 4, 4, 3],
        [6, 5, 5, 5, 6],
        [7, 4, 6, 4, 7],
        [7, 4, 6, 4, 4],
        [3, 4, 5, 5, 3],
        [5, 5, 7, 5, 5],
        [7, 2, 2, 2, 7],
        [1, 1, 1, 5, 2],
        [5, 5, 6, 5, 5],
        [4, 4, 4, 4, 7],
        [5, 7, 7, 5, 5],
        [6, 5, 5, 5, 5],
        [2, 5, 5, 5, 2],
        [6, 5, 6, 4, 4],
        [2, 5, 5, 6, 3],
        [6, 5, 6, 5, 5],
        [3, 4, 2, 1, 6],
        [7, 2, 2, 2, 2],
        [5, 5, 5, 5, 7],
        [5, 5, 5, 5, 2],
        [5, 5, 7, 7, 5],
        [5, 5, 2, 5, 5],
        [5, 5, 2, 2, 2],
        [7, 1, 2, 4, 7],
    ];
    match c {
        'a'..='z' => Some(LETTERS[c as usize - 'a' as usize]),
        ',' => Some([0, 0, 0, 2, 4]),
        '-' => Some([0, 0, 7, 0, 0]),
        _ => None,
    }
}

/// Draws `text` in black at (x, y), glyphs scaled by 2, wrapping at word boundaries.
fn draw_text(sheet: &mut RgbImage, text: &str, x: u32, y: u32, width_chars: usize) {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let line = lines.last_mut().expect("one line");
        if !line.is_empty() && line.len() + 1 + word.len() > width_chars {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    for (row, line) in lines.iter().enumerate() {
        for (col, c) in line.chars().enumerate() {
            let Some(bits) = glyph(c) else { continue };
            for (gy, bits) in bits.iter().enumerate() {
                for gx in 0..3 {
                    if bits & (4 >> gx) != 0 {
                        for (sx, sy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            let px = x + col as u32 * 8 + gx * 2 + sx;
                            let py = y + row as u32 * 12 + gy as u32 * 2 + sy;
                            if px < sheet.width() && py < sheet.height() {
                                sheet.put_pixel(px, py, image::Rgb([0, 0, 0]));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Copies `image` into `sheet` at (x, y), each pixel as a `zoom`×`zoom` block.
fn blit(sheet: &mut RgbImage, image: &RgbImage, x: u32, y: u32, zoom: u32) {
    for (ix, iy, pixel) in image.enumerate_pixels() {
        for (dx, dy) in (0..zoom).flat_map(|dx| (0..zoom).map(move |dy| (dx, dy))) {
            sheet.put_pixel(x + ix * zoom + dx, y + iy * zoom + dy, *pixel);
        }
    }
}

/// Writes `contact_sheet.png` (64 random samples with their captions), `contact_sheet.txt` and
/// `gallery.png` (every shape in every colour) for a person to look at, and checks that every tile
/// landed: each sample tile equals its render, each gallery cell holds its colour.
#[test]
fn contact_sheet() {
    let world = world();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("duo-world");
    std::fs::create_dir_all(&dir).expect("create the contact sheet folder");

    // 64 random samples with their captions, 8×8, images zoomed 4×.
    let (tile_w, tile_h, zoom) = (136, 186, 4);
    let mut sheet = RgbImage::from_pixel(8 * tile_w, 8 * tile_h, image::Rgb([255, 255, 255]));
    let samples = world.batch(0, 0, 64, CaptionSplit::Pretrain);
    let renders: Vec<RgbImage> = samples.iter().map(|s| world.render(&s.scene)).collect();
    for (i, (sample, render)) in samples.iter().zip(&renders).enumerate() {
        let (x, y) = ((i % 8) as u32 * tile_w, (i / 8) as u32 * tile_h);
        blit(&mut sheet, render, x + 4, y + 4, zoom);
        draw_text(&mut sheet, &sample.caption, x + 4, y + 136, 16);
    }
    let sheet_path = dir.join("contact_sheet.png");
    sheet.save(&sheet_path).expect("write contact sheet");
    let captions: Vec<String> = samples.iter().map(|s| format!("{:?}\t{}", s.scene, s.caption)).collect();
    std::fs::write(dir.join("contact_sheet.txt"), captions.join("\n")).expect("write captions");

    // What was written reads back as each sample's render, zoomed, with its caption below it.
    let read = image::open(&sheet_path).expect("read the contact sheet back").to_rgb8();
    for (i, render) in renders.iter().enumerate() {
        let (x, y) = ((i % 8) as u32 * tile_w + 4, (i / 8) as u32 * tile_h + 4);
        for (ix, iy, pixel) in render.enumerate_pixels() {
            assert_eq!(read.get_pixel(x + ix * zoom, y + iy * zoom), pixel, "sample {i} at ({ix}, {iy})");
        }
        let caption_rows = (y + 132..y + 150).flat_map(|cy| (x..x + 128).map(move |cx| (cx, cy)));
        let ink = caption_rows.filter(|&(cx, cy)| read.get_pixel(cx, cy).0 == [0, 0, 0]).count();
        assert!(ink > 0, "sample {i}: no caption drawn under the image");
    }

    // Every shape (rows) in every colour (columns), centred, backgrounds cycling.
    let config = world.config();
    let mut gallery = RgbImage::new(6 * 132, 6 * 132);
    for (row, shape) in Shape::ALL.into_iter().enumerate() {
        for (col, colour) in Colour::ALL.into_iter().enumerate() {
            let background = Background::ALL[(row + col) % Background::ALL.len()];
            let image = Scene::centred(shape, colour, background, config).render(config.resolution);
            blit(&mut gallery, &image, col as u32 * 132 + 2, row as u32 * 132 + 2, zoom);
            // some pixel of the cell is the shape's fill colour (anti-aliasing only touches edges)
            let want = colour.rgb().map(|c| (c * 255.0).round() as i32);
            let close = |p: &image::Rgb<u8>| p.0.iter().zip(want).all(|(&a, b)| (a as i32 - b).abs() <= 2);
            assert!(image.pixels().any(close), "gallery {shape:?} in {colour:?}: no pixel of its colour");
        }
    }
    gallery.save(dir.join("gallery.png")).expect("write gallery");
}
