//! The toy world: a procedural, seeded source of small captioned images (one coloured shape on
//! a background) for training a miniature text-to-image model from scratch, its judge, and the
//! unlearning loop that erases one shape (by default the ✕ cross, keeping its look-alike +).
//!
//! Everything is deterministic: sample `index` of seed `seed` is drawn from its own ChaCha8
//! stream, so samples can be read in any order (a dataset's `get(index)`) and are identical on
//! every machine. Images are `image::RgbImage`; [`images_to_chw`] turns a batch into the flat
//! `[b, 3, H, W]` f32 layout a tensor wants.
//!
//! The vocabulary (see [`vocab`]) is closed and documented word by word: canonical prompts
//! ([`canonical_prompt`]), held-out paraphrases ([`Shape::held_out_words`], [`held_out_prompts`])
//! and the unsafe/safe prompt pairs of the unlearning ([`prompt_pairs`]).

mod captions;
mod render;
pub mod vocab;

use image::RgbImage;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use captions::{
    CaptionSplit, DEFAULT_SAFE, DEFAULT_UNSAFE, ParsedCaption, PromptPair, canonical_prompt, caption,
    held_out_prompts, parse_caption, prompt_pairs, safe_twin,
};
pub use vocab::{Background, Colour, Shape};

use crate::error::{DuoError, Result};

/// How scenes are drawn. Lengths are fractions of the image side, so one config renders alike
/// at any resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldConfig {
    /// Image side in pixels.
    pub resolution: usize,
    /// Mean half-extent of the object.
    pub size: f32,
    /// Relative size jitter: the half-extent is `size * (1 ± size_jitter)`.
    pub size_jitter: f32,
    /// Largest offset of the object's centre from the image centre, per axis.
    pub shift: f32,
    /// Largest outward growth of the outline, in shape units (the shape spans about [-1, 1]);
    /// each scene draws its own in [0, max_dilation]. Grown shapes are fatter, with rounded
    /// corners, as a small diffusion model draws them: the judge trains on them so that it reads
    /// a fat cross as a cross. The diffusion world keeps 0 (and then draws nothing for it, so its
    /// sample streams are those of worlds made before this setting existed).
    #[serde(default)]
    pub max_dilation: f32,
}

impl Default for WorldConfig {
    /// 32×32 images, objects about 19 px across, ±10% size and ±1.6 px shift: little jitter,
    /// because a tiny model learns shape words slowly and jitter makes that harder
    /// (toy-world-notes.md).
    fn default() -> Self {
        Self { resolution: 32, size: 0.30, size_jitter: 0.10, shift: 0.05, max_dilation: 0.0 }
    }
}

impl WorldConfig {
    /// Refuses configs whose object could leave the image or vanish.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(DuoError::Invalid(format!("world config: {message}")));
        if self.resolution < 8 {
            return invalid(format!("resolution {} is below 8 pixels", self.resolution));
        }
        if !(self.size > 0.0 && self.size <= 0.45) {
            return invalid(format!("size {} is not in (0, 0.45]", self.size));
        }
        if !(0.0..1.0).contains(&self.size_jitter) {
            return invalid(format!("size_jitter {} is not in [0, 1)", self.size_jitter));
        }
        if !(0.0..=0.2).contains(&self.shift) {
            return invalid(format!("shift {} is not in [0, 0.2]", self.shift));
        }
        if !(0.0..=0.5).contains(&self.max_dilation) {
            return invalid(format!("max_dilation {} is not in [0, 0.5]", self.max_dilation));
        }
        let reach = self.size * (1.0 + self.size_jitter) * (1.0 + self.max_dilation) + self.shift;
        if reach > 0.5 {
            return invalid(format!(
                "size {} × (1 + size_jitter {}) × (1 + max_dilation {}) + shift {} = {reach} > 0.5: \
                 the object could leave the image",
                self.size, self.size_jitter, self.max_dilation, self.shift
            ));
        }
        Ok(())
    }
}

/// Everything needed to render one image; also the labels a judge is trained on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub shape: Shape,
    pub colour: Colour,
    pub background: Background,
    /// Half-extent of the object, as a fraction of the image side.
    pub size: f32,
    /// Offset of the object's centre from the image centre, as fractions of the side
    /// (x to the right, y downwards).
    pub dx: f32,
    pub dy: f32,
    /// Outward growth of the outline, in shape units ([`WorldConfig::max_dilation`]).
    #[serde(default)]
    pub dilation: f32,
}

impl Scene {
    /// The object at the config's mean size, centred: a jitter-free reference.
    pub fn centred(shape: Shape, colour: Colour, background: Background, config: &WorldConfig) -> Self {
        Self { shape, colour, background, size: config.size, dx: 0.0, dy: 0.0, dilation: 0.0 }
    }

    /// Uniform shape, colour and background; size and position jittered as `config` says.
    pub fn random(rng: &mut impl RngCore, config: &WorldConfig) -> Self {
        let shape = Shape::ALL[pick(rng, Shape::ALL.len())];
        let colour = Colour::ALL[pick(rng, Colour::ALL.len())];
        let background = Background::ALL[pick(rng, Background::ALL.len())];
        let size = config.size * (1.0 + config.size_jitter * symmetric(rng));
        let dx = config.shift * symmetric(rng);
        let dy = config.shift * symmetric(rng);
        let dilation = if config.max_dilation > 0.0 { config.max_dilation * unit(rng) } else { 0.0 };
        Self { shape, colour, background, size, dx, dy, dilation }
    }

    /// The image, `resolution`×`resolution`, with anti-aliased edges.
    pub fn render(&self, resolution: usize) -> RgbImage {
        render::render(self, resolution)
    }
}

/// One training example: the scene (its labels) and a caption of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub scene: Scene,
    pub caption: String,
}

/// A validated [`WorldConfig`]: the seeded sampler.
#[derive(Debug, Clone)]
pub struct World {
    config: WorldConfig,
}

impl World {
    pub fn new(config: WorldConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }

    pub fn config(&self) -> &WorldConfig {
        &self.config
    }

    /// Sample `index` of the stream `seed`: the same pair gives the same sample everywhere.
    /// The scene is drawn before the caption, so both splits see the same scene.
    pub fn sample(&self, seed: u64, index: u64, split: CaptionSplit) -> Sample {
        let mut rng = rng_for(seed, index);
        let scene = Scene::random(&mut rng, &self.config);
        let caption = caption(&scene, &mut rng, split);
        Sample { scene, caption }
    }

    /// Samples `start..start + n` of the stream `seed` (indices wrap around at `u64::MAX`).
    pub fn batch(&self, seed: u64, start: u64, n: usize, split: CaptionSplit) -> Vec<Sample> {
        (0..n as u64).map(|i| self.sample(seed, start.wrapping_add(i), split)).collect()
    }

    /// Renders a scene at the configured resolution.
    pub fn render(&self, scene: &Scene) -> RgbImage {
        scene.render(self.config.resolution)
    }
}

/// The random stream of sample `index` of seed `seed`: ChaCha8 keyed by the seed, one ChaCha
/// stream per index, so samples are independent and cost nothing to seek to. [`World::sample`]
/// consumes it; other randomness (caption dropout, noise) should come from another seed.
pub fn rng_for(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Flattens same-sized images into `[b, 3, H, W]` (channel-major) f32 values in [0, 1].
pub fn images_to_chw(images: &[RgbImage]) -> Result<Vec<f32>> {
    let Some(first) = images.first() else { return Ok(Vec::new()) };
    let (width, height) = first.dimensions();
    let plane = (width * height) as usize;
    let mut out = vec![0.0; images.len() * 3 * plane];
    for (b, image) in images.iter().enumerate() {
        if image.dimensions() != (width, height) {
            return Err(DuoError::Invalid(format!(
                "images_to_chw: image {b} is {:?}, image 0 is {:?}",
                image.dimensions(),
                (width, height)
            )));
        }
        for (i, pixel) in image.pixels().enumerate() {
            for c in 0..3 {
                out[(b * 3 + c) * plane + i] = f32::from(pixel[c]) / 255.0;
            }
        }
    }
    Ok(out)
}

// The world draws from the raw 32-bit stream itself instead of rand's distributions, whose
// algorithms may change between rand releases; ChaCha8's stream does not.

/// Uniform index in `0..n` (multiply-shift; the bias, below n / 2³², is irrelevant here).
fn pick(rng: &mut impl RngCore, n: usize) -> usize {
    ((u64::from(rng.next_u32()) * n as u64) >> 32) as usize
}

/// Uniform f32 in [0, 1) with 24 random bits.
fn unit(rng: &mut impl RngCore) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

/// Uniform f32 in [-1, 1).
fn symmetric(rng: &mut impl RngCore) -> f32 {
    2.0 * unit(rng) - 1.0
}
