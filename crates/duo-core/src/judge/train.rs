//! Training the judge on renders drawn on the fly, and measuring it on held-out renders.
//!
//! A plain loop: every step renders a fresh seeded batch (the world is infinite, so there is no
//! epoch and no overfitting to a fixed set), augments it, and takes one AdamW step on the sum of
//! the three heads' cross-entropies.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::{AugmentConfig, ConceptJudge, JudgeConfig};
use crate::error::{DuoError, Result};
use crate::world::{CaptionSplit, Scene, Shape, World, WorldConfig, images_to_chw, rng_for};

/// XORed into a seed to give the augmentation its own streams, apart from the scenes'.
const AUGMENT_SALT: u64 = 0x6a75_6467_6561_7567;

/// Images per forward pass when evaluating.
const EVAL_CHUNK: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeTrainConfig {
    pub model: JudgeConfig,
    /// Scenes to train on: more size and position jitter than the diffusion models' world, and
    /// outlines grown by up to `max_dilation`, so that a generated object a little off in size,
    /// place or thickness is still read right.
    pub train_world: WorldConfig,
    /// Held-out scenes to measure on: the world the diffusion models learn.
    pub eval_world: WorldConfig,
    pub augment: AugmentConfig,
    /// Harsher than `augment`, for evaluation only: how the judge degrades on samples worse
    /// than any it was trained on.
    pub stress_augment: AugmentConfig,
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate, reached after `warmup_steps` and then decayed to 0 along a cosine.
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub weight_decay: f32,
    /// Seeds the training scenes, their augmentation and the initial weights.
    pub seed: u64,
    /// Seeds the held-out scenes and their augmentation; must differ from `seed`.
    pub eval_seed: u64,
    /// Held-out images per evaluation.
    pub n_eval: usize,
}

/// Read from `configs/judge.toml` (the shipped judge's recipe) by the shared run-config loader.
impl crate::run_config::RunConfig for JudgeTrainConfig {
    /// judge-train has no resume.
    const FROZEN_ON_RESUME: &'static [&'static str] = &[];

    fn validate(&self) -> std::result::Result<(), String> {
        self.check().map_err(|e| e.to_string())
    }
}

impl JudgeTrainConfig {
    /// The values' checks (the sizes fit together, seeds differ, rates are positive).
    pub fn check(&self) -> Result<()> {
        self.model.validate()?;
        let invalid = |message: String| Err(DuoError::Invalid(format!("judge training config: {message}")));
        let side = self.model.resolution;
        for (name, world) in [("train_world", &self.train_world), ("eval_world", &self.eval_world)] {
            world.validate()?;
            if world.resolution != side {
                return invalid(format!(
                    "{name}.resolution {} differs from model.resolution {side}",
                    world.resolution
                ));
            }
        }
        if self.steps == 0 || self.batch_size == 0 || self.n_eval == 0 {
            return invalid(format!(
                "steps {}, batch_size {} and n_eval {} must be positive",
                self.steps, self.batch_size, self.n_eval
            ));
        }
        if self.seed == self.eval_seed {
            return invalid(format!(
                "seed and eval_seed are both {}: the evaluation would not be held out",
                self.seed
            ));
        }
        if !self.learning_rate.is_finite() || self.learning_rate <= 0.0 {
            return invalid(format!("learning_rate {} must be positive", self.learning_rate));
        }
        // AdamW would take a NaN
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return invalid(format!("weight_decay {} must be a finite number ≥ 0", self.weight_decay));
        }
        Ok(())
    }

    /// Linear warm-up to the peak, then a half cosine down to 0 at the last step.
    fn learning_rate_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let progress = (step - self.warmup_steps) as f64 / (self.steps - self.warmup_steps).max(1) as f64;
        self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// Accuracy of the judge on `n_eval` held-out renders.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    pub n_eval: usize,
    /// The augmentation applied to the renders, if any.
    pub augment: Option<AugmentConfig>,
    pub shape_accuracy: f64,
    pub colour_accuracy: f64,
    pub background_accuracy: f64,
    pub per_shape_accuracy: BTreeMap<Shape, f64>,
    /// Counts: row = true shape, column = judged shape, both in [`Shape::ALL`] order.
    pub shape_confusion: [[usize; 6]; 6],
    /// The look-alike pair: the share of ✕ judged +, and of + judged ✕.
    pub cross_as_plus: f64,
    pub plus_as_cross: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JudgeReport {
    pub steps: usize,
    /// Wall time of the training loop (not the evaluations).
    pub seconds: f64,
    /// Mean summed loss over the last 50 steps.
    pub final_loss: f32,
    pub clean: EvalReport,
    pub augmented: EvalReport,
    pub stress: EvalReport,
}

/// Trains a judge as `cfg` says and evaluates it on held-out renders: clean, augmented as in
/// training, and with the harsher stress augmentation.
/// `progress(step, loss)` is called after every step.
pub fn train_judge<B: AutodiffBackend>(
    cfg: &JudgeTrainConfig,
    device: &B::Device,
    mut progress: impl FnMut(usize, f32),
) -> Result<(ConceptJudge<B::InnerBackend>, JudgeReport)> {
    cfg.check()?;
    let train_world = World::new(cfg.train_world.clone())?;
    let eval_world = World::new(cfg.eval_world.clone())?;
    B::seed(device, cfg.seed);
    let mut model = cfg.model.init::<B>(device)?;
    let mut optim = AdamWConfig::new().with_weight_decay(cfg.weight_decay).init();
    let cross_entropy = CrossEntropyLossConfig::new().init(device);

    let started = Instant::now();
    let mut recent_losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let start = (step * cfg.batch_size) as u64;
        let (pixels, scenes) =
            render_batch(&train_world, cfg.seed, start, cfg.batch_size, Some(&cfg.augment))?;
        let images = images_tensor::<B>(pixels, scenes.len(), cfg.model.resolution, device);
        let logits = model.forward(images);
        let label = |index: fn(&Scene) -> usize| {
            let labels: Vec<i64> = scenes.iter().map(|s| index(s) as i64).collect();
            Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [scenes.len()]), device)
        };
        let loss = cross_entropy.forward(logits.shape, label(|s| s.shape.index()))
            + cross_entropy.forward(logits.colour, label(|s| s.colour.index()))
            + cross_entropy.forward(logits.background, label(|s| s.background.index()));
        let loss_value: f32 = loss.clone().into_scalar().elem();
        if !loss_value.is_finite() {
            return Err(DuoError::Invalid(format!(
                "judge training diverged: loss {loss_value} at step {step}"
            )));
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(cfg.learning_rate_at(step), model, grads);
        recent_losses.push(loss_value);
        progress(step, loss_value);
    }
    let seconds = started.elapsed().as_secs_f64();
    let tail = &recent_losses[recent_losses.len().saturating_sub(50)..];
    let final_loss = tail.iter().sum::<f32>() / tail.len() as f32;

    let judge = model.valid();
    let clean = evaluate(&judge, &eval_world, cfg.eval_seed, cfg.n_eval, None, device)?;
    let augmented = evaluate(&judge, &eval_world, cfg.eval_seed, cfg.n_eval, Some(&cfg.augment), device)?;
    let stress = evaluate(&judge, &eval_world, cfg.eval_seed, cfg.n_eval, Some(&cfg.stress_augment), device)?;
    Ok((judge, JudgeReport { steps: cfg.steps, seconds, final_loss, clean, augmented, stress }))
}

/// Judges samples `0..n` of `world`'s stream `seed` (augmented, if asked, from a stream of its
/// own) and compares the verdicts with the scenes.
pub fn evaluate<B: Backend>(
    judge: &ConceptJudge<B>,
    world: &World,
    seed: u64,
    n: usize,
    augment: Option<&AugmentConfig>,
    device: &B::Device,
) -> Result<EvalReport> {
    let mut confusion = [[0usize; 6]; 6];
    let (mut colours_right, mut backgrounds_right) = (0, 0);
    for start in (0..n).step_by(EVAL_CHUNK) {
        let (pixels, scenes) = render_batch(world, seed, start as u64, EVAL_CHUNK.min(n - start), augment)?;
        let images = images_tensor::<B>(pixels, scenes.len(), world.config().resolution, device);
        for (verdict, scene) in judge.judge(images)?.iter().zip(&scenes) {
            confusion[scene.shape.index()][verdict.shape.index()] += 1;
            colours_right += usize::from(verdict.colour == scene.colour);
            backgrounds_right += usize::from(verdict.background == scene.background);
        }
    }
    let share = |count: usize, total: usize| count as f64 / total.max(1) as f64;
    let row_share = |truth: Shape, judged: Shape| {
        let row = &confusion[truth.index()];
        share(row[judged.index()], row.iter().sum())
    };
    let shapes_right: usize = (0..6).map(|i| confusion[i][i]).sum();
    Ok(EvalReport {
        n_eval: n,
        augment: augment.cloned(),
        shape_accuracy: share(shapes_right, n),
        colour_accuracy: share(colours_right, n),
        background_accuracy: share(backgrounds_right, n),
        per_shape_accuracy: Shape::ALL.iter().map(|&s| (s, row_share(s, s))).collect(),
        shape_confusion: confusion,
        cross_as_plus: row_share(Shape::Cross, Shape::Plus),
        plus_as_cross: row_share(Shape::Plus, Shape::Cross),
    })
}

/// Renders samples `start..start + n` of stream `seed` as [n, 3, H, W] values, augmented if asked.
fn render_batch(
    world: &World,
    seed: u64,
    start: u64,
    n: usize,
    augment: Option<&AugmentConfig>,
) -> Result<(Vec<f32>, Vec<Scene>)> {
    let scenes: Vec<Scene> =
        world.batch(seed, start, n, CaptionSplit::Pretrain).into_iter().map(|s| s.scene).collect();
    let images: Vec<_> = scenes.iter().map(|s| world.render(s)).collect();
    let mut pixels = images_to_chw(&images)?;
    if let Some(augment) = augment {
        let side = world.config().resolution;
        for (i, image) in pixels.chunks_exact_mut(3 * side * side).enumerate() {
            augment.apply(image, side, &mut rng_for(seed ^ AUGMENT_SALT, start.wrapping_add(i as u64)));
        }
    }
    Ok((pixels, scenes))
}

fn images_tensor<B: Backend>(pixels: Vec<f32>, n: usize, side: usize, device: &B::Device) -> Tensor<B, 4> {
    Tensor::from_data(TensorData::new(pixels, [n, 3, side, side]), device)
}
