//! Augmentation that makes clean renders look like a small diffusion model's samples: slight
//! colour drift, a colour cast fading in across the picture (the two-tone objects of an
//! under-trained model), off-centre objects, blur and pixel noise (alone or blurred into blotches).
//! Done on the host with a seeded RNG, so a training run is reproducible on any backend.

use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Largest shift per axis, in whole pixels (edges replicated), on top of the world's own.
    pub max_shift: usize,
    /// Contrast `1 ± j`, brightness `± j`, per-channel offset `± j/2`: at most `2j` per channel.
    /// The closest colours (red/orange, yellow/orange) differ by 0.36 in one channel, so
    /// `j` ≤ 0.08 keeps every colour nearer its own class than its neighbour's.
    pub colour_jitter: f32,
    /// Probability of a Gaussian blur, and its largest sigma in pixels.
    pub blur_prob: f32,
    pub max_blur_sigma: f32,
    /// Probability of Gaussian pixel noise, and its largest standard deviation.
    pub noise_prob: f32,
    pub max_noise_std: f32,
    /// Probability of a colour cast, and its largest strength: the picture is blended towards a
    /// random colour, by 0 on one side rising linearly to the strength on the other (random
    /// direction). At 0.3 the object's centre moves at most 0.15 towards the cast, less than half
    /// the 0.36 between the closest colours. Absent in a config = 0, the recipe before casts.
    #[serde(default)]
    pub tint_prob: f32,
    #[serde(default)]
    pub max_tint: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            max_shift: 2,
            colour_jitter: 0.05,
            blur_prob: 0.5,
            max_blur_sigma: 1.2,
            noise_prob: 0.8,
            max_noise_std: 0.15,
            tint_prob: 0.5,
            max_tint: 0.3,
        }
    }
}

impl AugmentConfig {
    /// Augments one image in place: `image` is [3, side, side], channel-major, in [0, 1].
    pub fn apply(&self, image: &mut [f32], side: usize, rng: &mut impl Rng) {
        let plane = side * side;
        debug_assert_eq!(image.len(), 3 * plane);
        // 1. Colour drift.
        let j = self.colour_jitter;
        let contrast = 1.0 + j * symmetric(rng);
        let brightness = j * symmetric(rng);
        for channel in image.chunks_exact_mut(plane) {
            let offset = brightness + 0.5 * j * symmetric(rng);
            channel.iter_mut().for_each(|v| *v = (*v - 0.5) * contrast + 0.5 + offset);
        }
        // Nothing is drawn when casts are off, so older recipes keep their random streams.
        if self.tint_prob > 0.0 && rng.random::<f32>() < self.tint_prob {
            let strength = self.max_tint * rng.random::<f32>();
            let tint: [f32; 3] = std::array::from_fn(|_| rng.random());
            cast(image, side, strength, tint, [symmetric(rng), symmetric(rng)]);
        }
        // 2. Shift.
        let max = self.max_shift as i64;
        let (dx, dy) = (rng.random_range(-max..=max), rng.random_range(-max..=max));
        shift(image, side, dx, dy);
        // 3. Blur and noise, in either order: noise blurred afterwards gives the soft blotches of
        //    an under-trained sampler, noise added last the grain of a cut-short one.
        let sigma = (rng.random::<f32>() < self.blur_prob).then(|| self.max_blur_sigma * rng.random::<f32>());
        let noise_std =
            (rng.random::<f32>() < self.noise_prob).then(|| self.max_noise_std * rng.random::<f32>());
        let noise_first = rng.random::<bool>();
        if let (true, Some(std)) = (noise_first, noise_std) {
            add_noise(image, std, rng);
        }
        if let Some(sigma) = sigma {
            blur(image, side, sigma);
        }
        if let (false, Some(std)) = (noise_first, noise_std) {
            add_noise(image, std, rng);
        }
        image.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    }
}

/// Uniform in [-1, 1).
fn symmetric(rng: &mut impl Rng) -> f32 {
    2.0 * rng.random::<f32>() - 1.0
}

/// Blends the picture towards `tint` by `strength × ramp`, the ramp rising from 0 to 1 across
/// the picture along `direction` (any non-zero vector; a zero one gives a uniform half-strength cast).
fn cast(image: &mut [f32], side: usize, strength: f32, tint: [f32; 3], direction: [f32; 2]) {
    let norm = (direction[0] * direction[0] + direction[1] * direction[1]).sqrt();
    let [a, b] = if norm > 1e-6 { direction.map(|d| d / norm) } else { [0.0, 0.0] };
    let plane = side * side;
    for (channel, &target) in image.chunks_exact_mut(plane).zip(&tint) {
        for (i, v) in channel.iter_mut().enumerate() {
            // Pixel centre relative to the picture's centre, in picture widths.
            let (x, y) = ((i % side) as f32 + 0.5, (i / side) as f32 + 0.5);
            let (x, y) = (x / side as f32 - 0.5, y / side as f32 - 0.5);
            let weight = strength * (0.5 + a * x + b * y).clamp(0.0, 1.0);
            *v += (target - *v) * weight;
        }
    }
}

/// Moves the picture by (dx, dy) pixels, repeating the edge rows and columns into the gap.
fn shift(image: &mut [f32], side: usize, dx: i64, dy: i64) {
    if dx == 0 && dy == 0 {
        return;
    }
    let last = side as i64 - 1;
    for channel in image.chunks_exact_mut(side * side) {
        let source = channel.to_vec();
        for y in 0..side {
            let sy = (y as i64 - dy).clamp(0, last) as usize;
            for x in 0..side {
                let sx = (x as i64 - dx).clamp(0, last) as usize;
                channel[y * side + x] = source[sy * side + sx];
            }
        }
    }
}

fn add_noise(image: &mut [f32], std: f32, rng: &mut impl Rng) {
    image.iter_mut().for_each(|v| *v += std * rng.sample::<f32, _>(StandardNormal));
}

/// Separable Gaussian blur (radius ⌈2σ⌉, edges clamped). Sigmas below 0.2 px do nothing visible.
fn blur(image: &mut [f32], side: usize, sigma: f32) {
    if sigma < 0.2 {
        return;
    }
    let radius = (2.0 * sigma).ceil() as i64;
    let weights: Vec<f32> =
        (-radius..=radius).map(|d| (-((d * d) as f32) / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = weights.iter().sum();
    let weights: Vec<f32> = weights.iter().map(|w| w / total).collect();
    let last = side as i64 - 1;
    let tap = |i: usize, d: usize| (i as i64 + d as i64 - radius).clamp(0, last) as usize;
    for channel in image.chunks_exact_mut(side * side) {
        let source = channel.to_vec();
        let mut rows = vec![0.0; side * side];
        for y in 0..side {
            for x in 0..side {
                rows[y * side + x] =
                    weights.iter().enumerate().map(|(d, w)| w * source[y * side + tap(x, d)]).sum();
            }
        }
        for y in 0..side {
            for x in 0..side {
                channel[y * side + x] =
                    weights.iter().enumerate().map(|(d, w)| w * rows[tap(y, d) * side + x]).sum();
            }
        }
    }
}
