//! NudeNet's input image, made as the `nudenet` package makes it with OpenCV: pad the bottom and
//! right to a square with black, resize to the network's side with OpenCV's 8-bit bilinear
//! resize, scale by 1/255. The detector reads the channels in B, G, R order (the package converts
//! OpenCV's BGR to RGB, then asks the blob for a red-blue swap).
//!
//! OpenCV's 8-bit bilinear resize works in fixed point (11-bit weights, rounded separately, and a
//! rounding vertical pass), which a float resize does not reproduce; this is the same integer
//! arithmetic (OpenCV's `resizeGeneric_` with `HResizeLinear` and `VResizeLinear`), and its output
//! matches OpenCV's byte for byte on the test photographs.

use image::RgbImage;

/// OpenCV's `INTER_RESIZE_COEF_BITS`: the weights are integers out of 2¹¹.
const COEF_SCALE: f32 = 2048.0;

/// OpenCV scales 8-bit values to float by multiplying by the f32 nearest 1/255.
const INVERSE_255: f32 = (1.0f64 / 255.0) as f32;

/// One output coordinate along one axis: the first of its two source indices (possibly −1 or past
/// the end: reads clamp into the image) and their 11-bit weights.
struct Tap {
    first: i64,
    weights: [i32; 2],
}

/// OpenCV's coordinate map for one axis: source = (dst + ½)·scale − ½, in f32 as OpenCV computes
/// it; the weights rounded half to even each on its own (they need not sum to 2048). Columns past
/// a border take the border pixel whole; rows keep their fraction and clamp the index instead.
fn taps(source: usize, target: usize, columns: bool) -> Vec<Tap> {
    let scale = 1.0 / (target as f64 / source as f64);
    (0..target)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut first = f.floor() as i64;
            let mut frac = f - first as f32;
            if columns && (first < 0 || first >= source as i64 - 1) {
                (first, frac) = (first.clamp(0, source as i64 - 1), 0.0);
            }
            let round = |w: f32| (w * COEF_SCALE).round_ties_even() as i32;
            Tap { first, weights: [round(1.0 - frac), round(frac)] }
        })
        .collect()
}

/// The detector's input: [3, side, side] in [0, 1], channels B, G, R.
pub fn detector_input(image: &RgbImage, side: usize) -> Vec<f32> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let square = width.max(height);
    let clamp = |i: i64| i.clamp(0, square as i64 - 1) as usize;
    // the padded square: black below and right of the image
    let pixel = |x: usize, y: usize, c: usize| -> i32 {
        if x < width && y < height { i32::from(image.get_pixel(x as u32, y as u32).0[c]) } else { 0 }
    };
    let columns = taps(square, side, true);
    // the horizontal pass of every source row, values × 2048: [row][channel][dx]
    let horizontal: Vec<[Vec<i32>; 3]> = (0..square)
        .map(|y| {
            std::array::from_fn(|c| {
                let value = |t: &Tap| {
                    let [a0, a1] = t.weights;
                    pixel(clamp(t.first), y, c) * a0 + pixel(clamp(t.first + 1), y, c) * a1
                };
                columns.iter().map(value).collect()
            })
        })
        .collect();
    let mut out = vec![0.0f32; 3 * side * side];
    for (dy, row) in taps(square, side, false).iter().enumerate() {
        let (r0, r1) = (clamp(row.first), clamp(row.first + 1));
        let [b0, b1] = row.weights;
        // channels B, G, R of the RGB image
        for (c, channel) in [2usize, 1, 0].into_iter().enumerate() {
            for dx in 0..side {
                let (s0, s1) = (horizontal[r0][channel][dx], horizontal[r1][channel][dx]);
                let value = (((b0 * (s0 >> 4)) >> 16) + ((b1 * (s1 >> 4)) >> 16) + 2) >> 2;
                out[(c * side + dy) * side + dx] = value.clamp(0, 255) as f32 * INVERSE_255;
            }
        }
    }
    out
}
