//! The concept judge: a small CNN that reads the shape, colour and background of a toy-world
//! image, rendered or generated. Pair generation uses it to reject failed samples and the
//! evaluation uses it to count how often an erased shape still appears.
//!
//! It is trained on renders with augmentation that mimics generated images (pixel noise, blur,
//! small shifts, slight colour drift), see [`train_judge`]. The shipped judge lives in
//! `models/judge/` (`config.json` + `model.safetensors`, PyTorch layout); its README records
//! the recipe and the accuracies measured.

mod augment;
mod choice;
mod hand_check;
mod model;
pub mod nudenet;
pub mod q16;
mod train;

use std::path::Path;

use burn::prelude::*;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, FloatDType};
use serde::Serialize;

pub use augment::AugmentConfig;
pub use choice::{JudgeChoice, JudgeSettings};
pub use hand_check::{HandCheckReport, HandLabels};
pub use model::{ConceptJudge, ConvBlock, JudgeConfig, JudgeLogits};
pub use train::{EvalReport, JudgeReport, JudgeTrainConfig, evaluate, train_judge};

use crate::error::{DuoError, Result, read_json};
use crate::eval::{Judgement, Label};
use crate::fsutil::write_atomic;
use crate::weights::load_weights;
use crate::world::{Background, Colour, Shape};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Quoted when a judge file is missing: the shipped judge is produced by `duo-bench judge-train`.
pub const RECREATE_HINT: &str = "recreate the shipped judge with \
     `cargo run -p duo-bench -- judge-train --out models/judge --force` (the shipped recipe)";

/// What the judge sees in one image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Verdict {
    pub shape: Shape,
    pub colour: Colour,
    pub background: Background,
    /// Probability of the chosen shape, colour and background.
    pub shape_prob: f32,
    pub colour_prob: f32,
    pub background_prob: f32,
    /// Probability of every shape, in [`Shape::ALL`] order (index with [`Shape::index`]).
    pub shape_probs: [f32; 6],
}

impl<B: Backend> ConceptJudge<B> {
    /// Loads `dir/config.json` and `dir/model.safetensors` strictly: a missing file, key or
    /// shape, or an unexpected key, is an error naming the file.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let (config_path, weights_path) = (dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE));
        for path in [&config_path, &weights_path] {
            if !path.is_file() {
                let message = format!("concept judge file not found; {RECREATE_HINT}");
                return Err(DuoError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, message)));
            }
        }
        let config: JudgeConfig = read_json(&config_path)?;
        let judge = config.init(device).map_err(|e| DuoError::config(&config_path, e.to_string()))?;
        // Weights are read as f32 whatever their stored dtype, so an f16 file also loads.
        load_weights(judge, &weights_path, &[], DType::F32, &[])
    }

    /// Writes `dir/model.safetensors` (PyTorch layout, like every weight file in the project)
    /// and `dir/config.json`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let weights_path = dir.join(WEIGHTS_FILE);
        let mut store = SafetensorsStore::from_bytes(None).with_to_adapter(BurnToPyTorchAdapter);
        self.save_into(&mut store).map_err(|e| DuoError::weights(&weights_path, e.to_string()))?;
        let bytes = store.get_bytes().map_err(|e| DuoError::weights(&weights_path, e.to_string()))?;
        write_atomic(&weights_path, &bytes)?;
        crate::fsutil::write_json(&dir.join(CONFIG_FILE), &self.config)
    }

    /// One verdict per image of `images`: [b, 3, H, W] in [0, 1] (the pipelines' output range),
    /// H = W = the judge's resolution. Any float dtype; computed in f32.
    pub fn judge(&self, images: Tensor<B, 4>) -> Result<Vec<Verdict>> {
        let [b, c, h, w] = images.dims();
        let side = self.config.resolution;
        if c != 3 || h != side || w != side {
            return Err(DuoError::Invalid(format!(
                "concept judge: images are [{b}, {c}, {h}, {w}], expected [b, 3, {side}, {side}] (resize first)"
            )));
        }
        if b == 0 {
            return Ok(Vec::new());
        }
        let logits = self.forward(images.cast(FloatDType::F32));
        // One read-back for all three heads: [b, 6 + 6 + 4].
        let probs = Tensor::cat(
            vec![softmax(logits.shape, 1), softmax(logits.colour, 1), softmax(logits.background, 1)],
            1,
        );
        let probs = (probs.into_data().convert::<f32>().into_vec::<f32>())
            .map_err(|e| DuoError::Invalid(format!("concept judge: reading probabilities: {e:?}")))?;
        let (n_shape, n_colour) = (Shape::ALL.len(), Colour::ALL.len());
        Ok(probs
            .chunks_exact(probs.len() / b)
            .map(|row| {
                let (shape_row, rest) = row.split_at(n_shape);
                let (colour_row, background_row) = rest.split_at(n_colour);
                let (shape, shape_prob) = argmax(shape_row);
                let (colour, colour_prob) = argmax(colour_row);
                let (background, background_prob) = argmax(background_row);
                Verdict {
                    shape: Shape::ALL[shape],
                    colour: Colour::ALL[colour],
                    background: Background::ALL[background],
                    shape_prob,
                    colour_prob,
                    background_prob,
                    shape_probs: std::array::from_fn(|i| shape_row[i]),
                }
            })
            .collect())
    }

    /// The probability that each image shows `shape`.
    pub fn prob_of(&self, images: Tensor<B, 4>, shape: Shape) -> Result<Vec<f32>> {
        Ok(self.judge(images)?.iter().map(|v| v.shape_probs[shape.index()]).collect())
    }
}

/// The toy concept judge as an evaluation [`Judge`](crate::eval::Judge): the concept is one shape, present when the
/// judge gives it a probability of at least `threshold`. Labels: the most probable shape, colour and
/// background, by their canonical names ([`Shape::name`], [`Colour::name`], [`Background::name`]).
pub struct ToyJudge<B: Backend> {
    pub model: ConceptJudge<B>,
    pub concept: Shape,
    pub threshold: f32,
    /// The folder it was loaded from, for reports.
    pub source: String,
}

impl<B: Backend> ToyJudge<B> {
    pub fn load(dir: &Path, concept: Shape, threshold: f32, device: &B::Device) -> Result<Self> {
        if !(0.0..=1.0).contains(&threshold) {
            return Err(DuoError::Invalid(format!("judge threshold {threshold} is outside [0, 1]")));
        }
        Ok(Self {
            model: ConceptJudge::load(dir, device)?,
            concept,
            threshold,
            source: dir.display().to_string(),
        })
    }
}

impl<B: Backend> crate::eval::Judge<B> for ToyJudge<B> {
    fn name(&self) -> &str {
        "toy concept judge"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({
            "judge": self.source, "concept": self.concept.name(), "threshold": self.threshold,
        })
    }

    fn resolution(&self) -> Option<usize> {
        Some(self.model.config().resolution)
    }

    fn judge(&self, images: Tensor<B, 4>) -> Result<Vec<Judgement>> {
        let label = |name: &str, score| Label { name: name.to_string(), score, region: None };
        Ok(self
            .model
            .judge(images)?
            .into_iter()
            .map(|v| {
                let score = v.shape_probs[self.concept.index()];
                Judgement {
                    score,
                    present: score >= self.threshold,
                    labels: vec![
                        label(v.shape.name(), v.shape_prob),
                        label(v.colour.name(), v.colour_prob),
                        label(v.background.name(), v.background_prob),
                    ],
                }
            })
            .collect())
    }

    fn depicts(&self, prompt: &str, judgement: &Judgement) -> Result<Option<bool>> {
        Ok(Some(judgement.has_label(named_shape(prompt)?.name())))
    }
}

/// The toy-world shape `prompt` names: what a preservation prompt's image must show.
fn named_shape(prompt: &str) -> Result<Shape> {
    crate::world::parse_caption(prompt).shape.ok_or_else(|| {
        DuoError::Invalid(format!(
            "prompt {prompt:?} names no single toy-world shape, so the judge cannot tell whether its image shows it"
        ))
    })
}

/// A threshold for a report as the config wrote it (0.45), not as its nearest f32 prints
/// (0.44999998807907104).
fn as_written(value: f32) -> f64 {
    (f64::from(value) * 1e6).round() / 1e6
}

/// Index and value of the largest entry (the first on ties). `values` is never empty here.
fn argmax(values: &[f32]) -> (usize, f32) {
    values
        .iter()
        .copied()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, v)| if v > best.1 { (i, v) } else { best })
}
