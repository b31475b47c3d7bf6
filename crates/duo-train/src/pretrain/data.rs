//! The toy world as burn datasets, and the batchers that turn its samples into training batches.
//!
//! Every random draw is made on the host from a seeded stream keyed by the sample's index (the
//! world's own `rng_for`), so a batch depends only on the seeds and the indices drawn, never on the
//! backend, the device RNG or thread timing (burn-0.21-notes.md §5.2 "Random").

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use duo_core::models::AutoencoderKL;
use duo_core::schedulers::NoiseSchedule;
use duo_core::tokenizer::ClipTokenizer;
use duo_core::world::{CaptionSplit, Sample, World, images_to_chw, rng_for};
use rand::RngCore;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Training items: the run takes them in order (`EpochLoader`), far more than any run sees.
pub const TRAIN_WORLD_SIZE: usize = u32::MAX as usize;

// Salts separating the streams one stage seed feeds, so that no two uses share draws.
/// The world stream of the validation set.
const VALID_SALT: u64 = 0x7661_6c69_6400_0001;
/// The noise, timestep and caption-dropout draws of each sample.
const NOISE_SALT: u64 = 0x6e6f_6973_6500_0002;
/// The images that measure the VAE's latent scale.
const SCALING_SALT: u64 = 0x7363_616c_6500_0003;

/// One world sample and its index in its stream (which keys its noise).
#[derive(Debug, Clone)]
pub struct WorldItem {
    pub index: u64,
    pub sample: Sample,
}

/// Samples `0..len` of the world stream `seed`, rendered on demand.
pub struct WorldDataset {
    world: World,
    seed: u64,
    len: usize,
}

impl WorldDataset {
    /// The training stream of a stage seeded `seed`.
    pub fn train(world: World, seed: u64) -> Self {
        Self { world, seed, len: TRAIN_WORLD_SIZE }
    }

    /// The fixed validation set of a stage seeded `seed`: `len` samples of another stream.
    pub fn valid(world: World, seed: u64, len: usize) -> Self {
        Self { world, seed: seed ^ VALID_SALT, len }
    }

    /// The images that set the VAE's `scaling_factor`: `len` samples of a third stream.
    pub fn scaling(world: World, seed: u64, len: usize) -> Self {
        Self { world, seed: seed ^ SCALING_SALT, len }
    }
}

impl Dataset<WorldItem> for WorldDataset {
    fn get(&self, index: usize) -> Option<WorldItem> {
        (index < self.len).then(|| WorldItem {
            index: index as u64,
            sample: self.world.sample(self.seed, index as u64, CaptionSplit::Pretrain),
        })
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// The random stream of sample `index`'s noise (independent of its scene and caption).
fn noise_rng(seed: u64, index: u64) -> ChaCha8Rng {
    rng_for(seed ^ NOISE_SALT, index)
}

fn normals(rng: &mut ChaCha8Rng, n: usize, out: &mut Vec<f32>) {
    out.extend((0..n).map(|_| -> f32 { StandardNormal.sample(rng) }));
}

/// The items' images as `[b, 3, H, W]` in [−1, 1] (diffusers' preprocessing).
fn images<B: Backend>(world: &World, items: &[WorldItem], device: &B::Device) -> Tensor<B, 4> {
    let rendered: Vec<_> = items.iter().map(|item| world.render(&item.sample.scene)).collect();
    let side = world.config().resolution;
    // All renders share the world's resolution, so flattening cannot fail.
    let values = images_to_chw(&rendered).expect("renders of one world share a size");
    let pixels = Tensor::<B, 4>::from_data(TensorData::new(values, [items.len(), 3, side, side]), device);
    pixels * 2.0 - 1.0
}

/// A VAE batch: images and the posterior-sampling noise.
#[derive(Debug, Clone)]
pub struct VaeBatch<B: Backend> {
    /// [b, 3, H, W] in [−1, 1].
    pub images: Tensor<B, 4>,
    /// [b, latent_channels, h, w] ~ N(0, I).
    pub noise: Tensor<B, 4>,
}

#[derive(Clone)]
pub struct VaeBatcher {
    pub world: World,
    pub noise_seed: u64,
    /// [latent_channels, h, w].
    pub latent_shape: [usize; 3],
}

impl<B: Backend> Batcher<B, WorldItem, VaeBatch<B>> for VaeBatcher {
    fn batch(&self, items: Vec<WorldItem>, device: &B::Device) -> VaeBatch<B> {
        let [c, h, w] = self.latent_shape;
        let mut noise = Vec::with_capacity(items.len() * c * h * w);
        for item in &items {
            normals(&mut noise_rng(self.noise_seed, item.index), c * h * w, &mut noise);
        }
        VaeBatch {
            images: images(&self.world, &items, device),
            noise: Tensor::from_data(TensorData::new(noise, [items.len(), c, h, w]), device),
        }
    }
}

/// A diffusion batch: ε-prediction inputs and target.
#[derive(Debug, Clone)]
pub struct DiffusionBatch<B: Backend> {
    /// x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε, with z = the VAE latent × scaling_factor: [b, c, h, w].
    pub noisy_latents: Tensor<B, 4>,
    /// t per sample, [b].
    pub timesteps: Tensor<B, 1>,
    /// Token ids of the captions ("" for the dropped ones), padded to 77: [b, 77].
    pub input_ids: Tensor<B, 2, Int>,
    /// ε: [b, c, h, w].
    pub target: Tensor<B, 4>,
    /// Each sample's weight in the loss (Min-SNR-γ, or 1): [b].
    pub loss_weights: Tensor<B, 1>,
}

/// Builds diffusion batches; the frozen VAE runs on backend `V` (the training backend's inner one,
/// so encoding records no graph).
#[derive(Clone)]
pub struct DiffusionBatcher<V: Backend> {
    pub world: World,
    pub vae: AutoencoderKL<V>,
    pub vae_device: V::Device,
    pub tokenizer: Arc<ClipTokenizer>,
    pub schedule: NoiseSchedule,
    pub noise_seed: u64,
    pub caption_dropout: f64,
    /// γ of the Min-SNR-γ loss weights; 0 weighs every sample 1.
    pub min_snr_gamma: f64,
    /// [latent_channels, h, w].
    pub latent_shape: [usize; 3],
}

impl<V: Backend> DiffusionBatcher<V> {
    /// The batch, with the noisy latents lifted from `V` to the output backend by `lift`.
    fn make<O: Backend>(
        &self,
        items: &[WorldItem],
        device: &O::Device,
        lift: impl Fn(Tensor<V, 4>) -> Tensor<O, 4>,
    ) -> DiffusionBatch<O> {
        let b = items.len();
        let [c, h, w] = self.latent_shape;
        let max_len = self.tokenizer.model_max_length();
        let steps = self.schedule.num_train_timesteps();
        let (mut posterior, mut eps) = (Vec::with_capacity(b * c * h * w), Vec::with_capacity(b * c * h * w));
        let (mut timesteps, mut ids) = (Vec::with_capacity(b), Vec::with_capacity(b * max_len));
        for item in items {
            let mut rng = noise_rng(self.noise_seed, item.index);
            // Uniform t in 0..steps by multiply-shift on 32 random bits (bias below steps / 2³²).
            timesteps.push(((u64::from(rng.next_u32()) * steps as u64) >> 32) as usize);
            let dropped = f64::from(rng.next_u32()) / f64::from(u32::MAX) < self.caption_dropout;
            let caption = if dropped { "" } else { item.sample.caption.as_str() };
            ids.extend(self.tokenizer.encode_padded(caption, max_len).into_iter().map(i64::from));
            normals(&mut rng, c * h * w, &mut posterior);
            normals(&mut rng, c * h * w, &mut eps);
        }
        let on_vae = |values: Vec<f32>| {
            Tensor::<V, 4>::from_data(TensorData::new(values, [b, c, h, w]), &self.vae_device)
        };
        let latents =
            self.vae.encode(images::<V>(&self.world, items, &self.vae_device)).sample(on_vae(posterior))
                * self.vae.scaling_factor;
        let eps = on_vae(eps);
        let target = lift(self.schedule.training_target(latents.clone(), eps.clone(), &timesteps));
        let noisy = self.schedule.add_noise(latents, eps, &timesteps);
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let weights: Vec<f32> = match self.min_snr_gamma {
            0.0 => vec![1.0; b],
            gamma => timesteps.iter().map(|&t| self.schedule.min_snr_weight(t, gamma) as f32).collect(),
        };
        DiffusionBatch {
            noisy_latents: lift(noisy),
            timesteps: Tensor::from_data(TensorData::new(t, [b]), device),
            input_ids: Tensor::from_data(TensorData::new(ids, [b, max_len]), device),
            target,
            loss_weights: Tensor::from_data(TensorData::new(weights, [b]), device),
        }
    }
}

/// Validation batches: everything on `V`.
impl<V: Backend> Batcher<V, WorldItem, DiffusionBatch<V>> for DiffusionBatcher<V> {
    fn batch(&self, items: Vec<WorldItem>, device: &V::Device) -> DiffusionBatch<V> {
        self.make::<V>(&items, device, |t| t)
    }
}

/// Training batches: the same, lifted onto the autodiff backend `B` (whose inner backend runs the VAE).
pub struct TrainBatcher<B: AutodiffBackend>(pub DiffusionBatcher<B::InnerBackend>);

impl<B: AutodiffBackend> Batcher<B, WorldItem, DiffusionBatch<B>> for TrainBatcher<B> {
    fn batch(&self, items: Vec<WorldItem>, device: &B::Device) -> DiffusionBatch<B> {
        self.0.make::<B>(&items, device, Tensor::from_inner)
    }
}
