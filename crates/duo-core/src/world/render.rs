//! Rasterises a [`Scene`]: exact signed-distance functions, a one-pixel smoothstep for
//! anti-aliasing, and a background fill.
//!
//! Determinism: only f32 `+ - * /`, `sqrt`, `min`/`max`/`abs` and integer maths are used, all
//! correctly rounded by IEEE 754 and never fused by rustc, so the same scene gives the same bytes
//! on every machine. No trigonometry: rotations are by 45° (a constant) or absent.

use std::f32::consts::FRAC_1_SQRT_2;

use image::{Rgb, RgbImage};

use super::Scene;
use super::vocab::{Background, Shape};

/// Half-width of the bars of the plus and the cross, in shape units (the shape spans about
/// [-1, 1]). 0.28 gives bars about 5 px wide at the default size: thick enough to survive a
/// tiny model's blur, thin enough that ✕ and + are not both read as blobs.
const BAR: f32 = 0.28;

/// The plus: two bars of half-length 1, as one 12-gon so its SDF is exact everywhere.
const PLUS: [[f32; 2]; 12] = [
    [BAR, -1.0],
    [BAR, -BAR],
    [1.0, -BAR],
    [1.0, BAR],
    [BAR, BAR],
    [BAR, 1.0],
    [-BAR, 1.0],
    [-BAR, BAR],
    [-1.0, BAR],
    [-1.0, -BAR],
    [-BAR, -BAR],
    [-BAR, -1.0],
];

/// Square and circle span the same box, so the square's corners stick out: a circle and a square
/// of equal area would share over 80% of their pixels (the prototype's model could not tell
/// them apart, toy-world-notes.md), these share 78%.
const SQUARE: [[f32; 2]; 4] = [[-0.9, -0.9], [0.9, -0.9], [0.9, 0.9], [-0.9, 0.9]];
const CIRCLE_R: f32 = 0.9;

/// Upright triangle (y grows downwards), centred on its bounding box.
const TRIANGLE: [[f32; 2]; 3] = [[0.0, -0.9], [1.0, 0.82], [-1.0, 0.82]];

/// The heart is a diamond (a square turned 45°) with a disc on each upper edge.
/// Diamond half-diagonal and vertical centre, chosen so the heart fills [-1, 1]².
const HEART_D: f32 = 0.82;
const HEART_C: f32 = 0.085;
const HEART_DIAMOND: [[f32; 2]; 4] =
    [[0.0, HEART_C - HEART_D], [HEART_D, HEART_C], [0.0, HEART_C + HEART_D], [-HEART_D, HEART_C]];

/// Renders `scene` at `resolution`×`resolution` pixels.
pub fn render(scene: &Scene, resolution: usize) -> RgbImage {
    let side = resolution as f32;
    // Pixels per shape unit, and the shape's centre in pixels.
    let scale = scene.size * side;
    let centre = [side * (0.5 + scene.dx), side * (0.5 + scene.dy)];
    let fill = scene.colour.rgb();
    let mut image = RgbImage::new(resolution as u32, resolution as u32);
    for (x, y, pixel) in image.enumerate_pixels_mut() {
        let (x, y) = (x as usize, y as usize);
        let back = background(scene.background, x, y, resolution);
        // Sample at the pixel centre; the SDF scales linearly, so distance in pixels is
        // distance in shape units times `scale`.
        let p = [(x as f32 + 0.5 - centre[0]) / scale, (y as f32 + 0.5 - centre[1]) / scale];
        // Subtracting from an exact SDF grows the outline by that much and rounds its corners.
        let alpha = coverage((shape_sdf(scene.shape, p) - scene.dilation) * scale);
        *pixel = Rgb(std::array::from_fn(|c| to_u8(back + (fill[c] - back) * alpha)));
    }
    image
}

/// Fraction of a pixel covered by a shape whose edge lies `distance` pixels away (negative
/// inside): a smoothstep over one pixel, so edges get intermediate values.
fn coverage(distance: f32) -> f32 {
    let t = (0.5 - distance).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

/// Background grey at pixel (x, y). Textures are laid out in fractions of the image so they
/// look the same at any resolution.
fn background(background: Background, x: usize, y: usize, resolution: usize) -> f32 {
    match background {
        Background::Light => 0.86,
        Background::Dark => 0.13,
        // 0.92 at the top to 0.50 at the bottom: a visible ramp that stays light enough for
        // dark fills (blue, purple) and dark enough for yellow.
        Background::Gradient => 0.92 - 0.42 * (y as f32 + 0.5) / resolution as f32,
        // Cells of a quarter of the image, differing by 0.10: texture without edges as strong
        // as the object's.
        Background::Checker => {
            let (cx, cy) = (x * 4 / resolution, y * 4 / resolution);
            if (cx + cy) % 2 == 0 { 0.80 } else { 0.70 }
        }
    }
}

/// Signed distance from `p` to the shape's outline, in shape units, negative inside.
fn shape_sdf(shape: Shape, p: [f32; 2]) -> f32 {
    match shape {
        Shape::Circle => length(p) - CIRCLE_R,
        Shape::Square => polygon_sdf(&SQUARE, p),
        Shape::Triangle => polygon_sdf(&TRIANGLE, p),
        Shape::Plus => polygon_sdf(&PLUS, p),
        // The plus turned 45°: rotation preserves distance, so this SDF is exact too.
        Shape::Cross => polygon_sdf(&PLUS, [(p[0] + p[1]) * FRAC_1_SQRT_2, (p[1] - p[0]) * FRAC_1_SQRT_2]),
        Shape::Heart => {
            let radius = HEART_D * FRAC_1_SQRT_2;
            let lobe_y = HEART_C - HEART_D / 2.0;
            let left = length([p[0] + HEART_D / 2.0, p[1] - lobe_y]) - radius;
            let right = length([p[0] - HEART_D / 2.0, p[1] - lobe_y]) - radius;
            polygon_sdf(&HEART_DIAMOND, p).min(left).min(right)
        }
    }
}

fn length(v: [f32; 2]) -> f32 {
    (v[0] * v[0] + v[1] * v[1]).sqrt()
}

/// Exact signed distance to a simple polygon (any winding): the nearest edge gives the
/// distance, and the crossing parity of a ray gives the sign (Inigo Quilez's `sdPolygon`).
fn polygon_sdf(vertices: &[[f32; 2]], p: [f32; 2]) -> f32 {
    let dot = |a: [f32; 2], b: [f32; 2]| a[0] * b[0] + a[1] * b[1];
    let first = [p[0] - vertices[0][0], p[1] - vertices[0][1]];
    let mut nearest = dot(first, first);
    let mut sign = 1.0;
    let mut j = vertices.len() - 1;
    for (i, vi) in vertices.iter().enumerate() {
        let vj = vertices[j];
        let e = [vj[0] - vi[0], vj[1] - vi[1]];
        let w = [p[0] - vi[0], p[1] - vi[1]];
        let t = (dot(w, e) / dot(e, e)).clamp(0.0, 1.0);
        let b = [w[0] - e[0] * t, w[1] - e[1] * t];
        nearest = nearest.min(dot(b, b));
        // Does the horizontal ray from p cross edge (vi, vj)?
        let c = [p[1] >= vi[1], p[1] < vj[1], e[0] * w[1] > e[1] * w[0]];
        if c.iter().all(|&b| b) || c.iter().all(|&b| !b) {
            sign = -sign;
        }
        j = i;
    }
    sign * nearest.sqrt()
}
