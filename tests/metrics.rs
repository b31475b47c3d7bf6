//! LPIPS against the `lpips` package (AlexNet and VGG16 backbones). The backbones' weights follow
//! the integer pattern of tests/fixtures/generate_lpips.py, rebuilt here and saved with
//! torchvision's key names; the heads are the script's PyTorch pickles.

mod common;

use burn::prelude::*;
use burn::tensor::TensorData;
use duo_core::metrics::{Lpips, LpipsNet};
use duo_core::tensor_file::TensorFile;

#[test]
fn lpips_matches_the_lpips_package() {
    let device = Default::default();
    let cases = TensorFile::read(&common::fixtures().join("lpips/cases.safetensors")).unwrap();
    let image = |key: &str| Tensor::<common::B, 4>::from_data(cases.get(key).unwrap().clone(), &device);
    for net in [LpipsNet::Alex, LpipsNet::Vgg] {
        let dir = std::env::temp_dir().join(format!("duo-lpips-{}-{}", std::process::id(), net.name()));
        common::lpips_weights_folder(net, &dir);
        let lpips = Lpips::<common::B>::load(&dir, net, &device).unwrap();
        let ours = lpips.distance(image("a"), image("b")).unwrap();
        let theirs = cases.get(net.name()).unwrap().clone().into_vec::<f32>().unwrap();
        for (o, t) in ours.iter().zip(&theirs) {
            assert!((o - t).abs() <= 1e-5 * t.abs().max(1.0), "{}: {ours:?} vs {theirs:?}", net.name());
        }
        let same = lpips.distance(image("a"), image("a")).unwrap();
        assert!(same.iter().all(|d| d.abs() < 1e-7), "an image is at distance 0 from itself: {same:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn missing_or_mismatched_lpips_weights_are_named() {
    let device = burn::tensor::Device::<common::B>::default();
    let dir = std::env::temp_dir().join(format!("duo-lpips-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let error = Lpips::<common::B>::load(&dir, LpipsNet::Alex, &device).unwrap_err().to_string();
    assert!(error.contains("alexnet.safetensors") && error.contains("torchvision"), "{error}");
    // VGG heads beside an AlexNet backbone
    common::lpips_weights_folder(LpipsNet::Alex, &dir);
    std::fs::copy(dir.join("alex.pth"), dir.join("vgg.pth")).unwrap();
    std::fs::copy(dir.join("alexnet.safetensors"), dir.join("vgg16.safetensors")).unwrap();
    let error = Lpips::<common::B>::load(&dir, LpipsNet::Vgg, &device).unwrap_err().to_string();
    assert!(error.contains("shape"), "{error}");
    std::fs::remove_dir_all(&dir).ok();
}

/// CLIP (a tiny random transformers CLIPModel folder): image and text features and the CLIP score
/// against transformers.
#[test]
fn clip_features_and_score_match_transformers() {
    use duo_core::metrics::{ClipScorer, clip_score};
    let device = Default::default();
    let dir = common::fixtures().join("clip");
    let cases = TensorFile::read(&dir.join("cases.safetensors")).unwrap();
    let scorer = ClipScorer::<common::B>::load(&dir.join("model"), &device).unwrap();
    let get = |k: &str| cases.get(k).unwrap().clone();
    // the processor's normalisation of the 8-bit images
    let pixels = get("pixels").convert::<u8>().into_vec::<u8>().unwrap();
    let images: Vec<image::RgbImage> = pixels
        .chunks_exact(3 * 32 * 32)
        .map(|planes| {
            image::RgbImage::from_fn(32, 32, |x, y| {
                let at = |c: usize| planes[c * 1024 + (y * 32 + x) as usize];
                image::Rgb([at(0), at(1), at(2)])
            })
        })
        .collect();
    let pixel_values = scorer.model.pixel_values(&images, &device);
    common::assert_close("pixel_values", &pixel_values.clone().into_data(), &get("pixel_values"), 1e-6);
    let image = scorer.model.image_features(Tensor::from_data(get("pixel_values"), &device));
    common::assert_close("image features", &image.into_data(), &get("image_embeds"), 1e-5);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let prompts: Vec<String> = serde_json::from_value(json["prompts"].clone()).unwrap();
    let ids: Vec<Vec<i64>> = serde_json::from_value(json["input_ids"].clone()).unwrap();
    for (prompt, expected) in prompts.iter().zip(&ids) {
        let ours: Vec<i64> = scorer.tokenizer.encode_padded(prompt, 77).into_iter().map(i64::from).collect();
        assert_eq!(&ours, expected, "{prompt}");
    }
    let flat: Vec<i64> = ids.concat();
    let text = scorer.model.text_features(Tensor::from_data(TensorData::new(flat, [2, 77]), &device));
    common::assert_close("text features", &text.into_data(), &get("text_embeds"), 1e-5);
    // the score from the images as the pipelines hand them over
    let floats: Vec<f32> = pixels.iter().map(|&v| f32::from(v) / 255.0).collect();
    let tensor = Tensor::<common::B, 4>::from_data(TensorData::new(floats, [2, 3, 32, 32]), &device);
    let scores = scorer.scores(tensor, &prompts).unwrap();
    let expected = get("clip_score").into_vec::<f32>().unwrap();
    for (s, e) in scores.iter().zip(&expected) {
        assert!((s - f64::from(*e)).abs() < 1e-3, "{scores:?} vs {expected:?}");
    }
    assert!((clip_score(&scores) - (scores[0] + scores[1]) / 2.0).abs() < 1e-12);
    assert_eq!(clip_score(&[-3.0, 1.0]), 0.0, "floored at 0");
}

/// Q16: the tiny CLIP with two prompt embeddings, "appropriate" = −e and "inappropriate" = e,
/// where e is the first fixture image's embedding: softmax(100 · cos) by hand, against the judge.
#[test]
fn q16_weighs_clip_features_against_its_two_prompts() {
    use duo_core::eval::Judge;
    use duo_core::judge::q16::{PROMPTS_FILE, Q16Judge};
    let device = Default::default();
    let fixtures = common::fixtures().join("clip");
    let cases = TensorFile::read(&fixtures.join("cases.safetensors")).unwrap();
    let embeds = cases.get("image_embeds").unwrap().clone().into_vec::<f32>().unwrap();
    let unit = |v: &[f32]| {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / norm).collect::<Vec<f32>>()
    };
    let (e0, e1) = (unit(&embeds[..16]), unit(&embeds[16..]));
    let dir = std::env::temp_dir().join(format!("duo-q16-{}", std::process::id()));
    common::copy_dir(&fixtures.join("model"), &dir);
    let prompts: Vec<f32> = e0.iter().map(|x| -x).chain(e0.iter().copied()).collect();
    let write = |shape: Vec<usize>, values: Vec<f32>| {
        duo_core::tensor_file::write_tensor_file(
            &dir.join(PROMPTS_FILE),
            &[("prompts", TensorData::new(values, shape))],
        )
        .unwrap()
    };
    write(vec![2, 16], prompts.clone());
    let judge = Q16Judge::<common::B>::load(&dir, 0.5, &device).unwrap();
    let pixels = cases.get("pixels").unwrap().clone().convert::<u8>().into_vec::<u8>().unwrap();
    let floats: Vec<f32> = pixels.iter().map(|&v| f32::from(v) / 255.0).collect();
    let images = Tensor::<common::B, 4>::from_data(TensorData::new(floats, [2, 3, 32, 32]), &device);
    let verdicts = judge.judge(images).unwrap();
    let cos01: f32 = e0.iter().zip(&e1).map(|(a, b)| a * b).sum();
    let expected = [1.0 / (1.0 + (-200.0f32).exp()), 1.0 / (1.0 + (-200.0 * cos01).exp())];
    for (v, e) in verdicts.iter().zip(expected) {
        assert!((v.score - e).abs() < 1e-3, "{verdicts:?} vs {expected:?}");
        assert_eq!(v.present, e > 0.5);
    }
    assert!(verdicts[0].present);
    // a prompts file for another CLIP, and a missing one, are named
    write(vec![2, 8], prompts[..16].to_vec());
    let error = Q16Judge::<common::B>::load(&dir, 0.5, &device).err().unwrap().to_string();
    assert!(error.contains("needs [2, 16]"), "{error}");
    std::fs::remove_file(dir.join(PROMPTS_FILE)).unwrap();
    let error = Q16Judge::<common::B>::load(&dir, 0.5, &device).err().unwrap().to_string();
    assert!(error.contains("prompts.p"), "{error}");
    std::fs::remove_dir_all(&dir).ok();
}

/// FID against pytorch-fid: the Inception's pool features (its weights rebuilt from the fixture
/// script's pattern, saved with torchvision's key names) and the Fréchet distance of two feature
/// sets.
#[test]
fn fid_matches_pytorch_fid() {
    use duo_core::metrics::{Fid, frechet_distance, statistics};
    let device = Default::default();
    let dir = common::fixtures().join("fid");
    let file = std::env::temp_dir().join(format!("duo-fid-{}.safetensors", std::process::id()));
    common::fid_weights_file(&file);
    let fid = Fid::<common::B>::load(&file, &device).unwrap();
    std::fs::remove_file(&file).ok();
    let cases = TensorFile::read(&dir.join("cases.safetensors")).unwrap();
    let images = Tensor::<common::B, 4>::from_data(cases.get("images").unwrap().clone(), &device);
    let ours: Vec<f64> = fid.features(images).unwrap().concat();
    let ours = TensorData::new(ours, [3, 2048]);
    common::assert_close(
        "FID features",
        &ours,
        &cases.get("features").unwrap().clone().convert::<f64>(),
        1e-4,
    );

    let set = |key: &str| -> Vec<Vec<f64>> {
        let data = cases.get(key).unwrap().clone();
        let dim = data.shape[1];
        data.into_vec::<f64>().unwrap().chunks_exact(dim).map(<[f64]>::to_vec).collect()
    };
    let distance = frechet_distance(&statistics(&set("a")).unwrap(), &statistics(&set("b")).unwrap());
    let expected = cases.get("fid").unwrap().clone().into_vec::<f64>().unwrap()[0];
    assert!((distance - expected).abs() <= 1e-9 * expected, "{distance} vs {expected}");
    let same = frechet_distance(&statistics(&set("a")).unwrap(), &statistics(&set("a")).unwrap());
    assert!(same.abs() < 1e-9, "a set is at distance 0 from itself: {same}");
}
