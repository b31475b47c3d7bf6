//! Stage 1: the VAE, trained alone on the world's images (MSE reconstruction + a small KL), then
//! `scaling_factor` = 1/std of its latents, as SD's VAE was calibrated.

use std::sync::Arc;

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use duo_core::models::AutoencoderKL;
use duo_core::{DuoError, Result};
use serde::{Deserialize, Serialize};

use super::Run;
use super::data::{VaeBatch, VaeBatcher, WorldDataset};
use crate::learning::{EpochLoader, Stage, StepOutput, latest_checkpoint};

/// The VAE with its loss, as burn-train's model.
#[derive(Module, Debug)]
pub struct VaeTrainer<B: Backend> {
    pub vae: AutoencoderKL<B>,
    pub kl_weight: f64,
}

impl<B: Backend> VaeTrainer<B> {
    /// (loss, reconstruction MSE, KL), each [1].
    fn losses(&self, batch: VaeBatch<B>) -> [Tensor<B, 1>; 3] {
        let posterior = self.vae.encode(batch.images.clone());
        // KL(q(z|x) ‖ N(0, I)), summed over the latent and averaged over the batch, as diffusers'
        // `DiagonalGaussianDistribution.kl` and SD's VAE loss use it.
        let kl = (posterior.mean.clone().square() + posterior.logvar.clone().exp()
            - posterior.logvar.clone()
            - 1.0)
            .sum_dims(&[1, 2, 3])
            .mean()
            * 0.5;
        let reconstruction = self.vae.decode(posterior.sample(batch.noise));
        let mse = (reconstruction - batch.images).square().mean();
        let loss = mse.clone() + kl.clone() * self.kl_weight;
        [loss, mse, kl]
    }
}

fn output<B: Backend>(batch_size: usize, [loss, mse, kl]: [Tensor<B, 1>; 3]) -> StepOutput<B> {
    StepOutput {
        batch_size,
        scalars: vec![("loss", loss.detach()), ("mse", mse.detach()), ("kl", kl.detach())],
    }
}

impl<B: AutodiffBackend> TrainStep for VaeTrainer<B> {
    type Input = VaeBatch<B>;
    type Output = StepOutput<B>;

    fn step(&self, batch: VaeBatch<B>) -> TrainOutput<StepOutput<B>> {
        let batch_size = batch.images.dims()[0];
        let losses = self.losses(batch);
        let grads = losses[0].backward();
        TrainOutput::new(self, grads, output(batch_size, losses))
    }
}

impl<B: Backend> InferenceStep for VaeTrainer<B> {
    type Input = VaeBatch<B>;
    type Output = StepOutput<B>;

    fn step(&self, batch: VaeBatch<B>) -> StepOutput<B> {
        let batch_size = batch.images.dims()[0];
        output(batch_size, self.losses(batch))
    }
}

/// `scaling_factor.json`: the factor measured on the checkpoint of `epoch`.
#[derive(Serialize, Deserialize)]
struct Scaling {
    epoch: usize,
    scaling_factor: f64,
}

/// Whether the VAE stage has its last checkpoint (so `train` loads it rather than training).
pub fn is_complete<B: AutodiffBackend>(run: &Run<B::InnerBackend>) -> bool {
    let schedule = run.config.vae_training.schedule();
    latest_checkpoint::<B>(&run.dir.join("vae")).is_some_and(|k| k >= schedule.epochs())
}

/// Trains (or resumes, or loads) the VAE. None when the run stopped before the last step.
pub fn train<B: AutodiffBackend>(
    run: &Run<B::InnerBackend>,
) -> Result<Option<AutoencoderKL<B::InnerBackend>>> {
    let c = &run.config.vae_training;
    let schedule = c.schedule();
    let dir = run.dir.join("vae");
    let [channels, side] = [run.configs.vae.latent_channels, run.configs.latent_size(&run.config)];
    let batcher =
        VaeBatcher { world: run.world.clone(), noise_seed: c.seed, latent_shape: [channels, side, side] };

    B::seed(&run.device, c.seed);
    let model = VaeTrainer { vae: run.configs.vae.init::<B>(&run.device), kl_weight: c.kl_weight };
    let resume = latest_checkpoint::<B>(&dir).unwrap_or(0);
    let train = Arc::new(EpochLoader::<B, _>::from_dataset(
        WorldDataset::train(run.world.clone(), c.seed),
        batcher.clone(),
        schedule.batch_size,
        schedule.checkpoint_every,
        resume,
        run.device.clone(),
    ));
    let valid = DataLoaderBuilder::<B::InnerBackend, _, _>::new(batcher.clone())
        .batch_size(schedule.batch_size)
        .set_device(run.device.clone())
        .build(WorldDataset::valid(run.world.clone(), c.seed, schedule.valid_batches * schedule.batch_size));

    let stage = Stage {
        name: "vae",
        dir: dir.clone(),
        schedule,
        log_every: run.log_every,
        control: &run.control,
        train_scalars: &["loss", "mse", "kl"],
        valid_scalars: &["loss", "mse", "kl"],
    };
    let result = stage.run(model, train, valid)?;
    if !result.complete {
        return Ok(None);
    }
    let mut vae = result.model.vae;
    vae.scaling_factor = scaling_factor(run, &vae, &batcher, &dir, result.epoch)?;
    Ok(Some(vae))
}

/// 1/std of sampled latents over `scaling_images` world images, cached per checkpoint.
fn scaling_factor<V: Backend>(
    run: &Run<V>,
    vae: &AutoencoderKL<V>,
    batcher: &VaeBatcher,
    dir: &std::path::Path,
    epoch: usize,
) -> Result<f64> {
    let path = dir.join("scaling_factor.json");
    if path.is_file() {
        let cached: Scaling = duo_core::error::read_json(&path)?;
        if cached.epoch == epoch {
            return Ok(cached.scaling_factor);
        }
    }
    let c = &run.config.vae_training;
    let images = WorldDataset::scaling(run.world.clone(), c.seed, c.scaling_images);
    let (mut sum, mut sum_sq, mut count) = (0.0f64, 0.0f64, 0usize);
    for start in (0..images.len()).step_by(c.batch_size) {
        let items: Vec<_> =
            (start..(start + c.batch_size).min(images.len())).filter_map(|i| images.get(i)).collect();
        let batch: VaeBatch<V> = batcher.batch(items, &run.device);
        let latents = vae.encode(batch.images).sample(batch.noise).into_data().convert::<f64>();
        for &z in latents.as_slice::<f64>().map_err(|e| DuoError::Invalid(format!("{e:?}")))? {
            sum += z;
            sum_sq += z * z;
            count += 1;
        }
    }
    let mean = sum / count as f64;
    let std = (sum_sq / count as f64 - mean * mean).max(0.0).sqrt();
    if !(std > 0.0 && std.is_finite()) {
        return Err(DuoError::Invalid(format!(
            "the VAE's latents have std {std}: cannot set scaling_factor"
        )));
    }
    let scaling_factor = 1.0 / std;
    println!(
        "[vae] latents over {count} values: mean {mean:.4}, std {std:.4} → scaling_factor {scaling_factor:.5}"
    );
    duo_core::fsutil::write_json(&path, &Scaling { epoch, scaling_factor })?;
    Ok(scaling_factor)
}
