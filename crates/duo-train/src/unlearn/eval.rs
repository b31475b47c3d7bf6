//! The before/after evaluation: every prompt of a group with the same seeds on the base and the
//! unlearned model, judged by the toy concept judge.

use burn::prelude::*;
use duo_core::judge::{ConceptJudge, Verdict};
use duo_core::pipelines::{Generation, NoiseSource, StableDiffusion};
use duo_core::schedulers::Scheduler;
use duo_core::world::{Shape, parse_caption};
use duo_core::{DuoError, Result};
use indicatif::ProgressBar;
use serde::Serialize;

/// A prompt group and what counts as success for it.
pub struct Group<'a> {
    pub prompts: &'a [String],
    pub goal: Goal,
}

#[derive(Clone, Copy)]
pub enum Goal {
    /// Success = the judge does not see `Shape` (defense success).
    Free(Shape),
    /// Success = the judge sees the shape the prompt names (preservation).
    Named,
}

/// One group's images and verdicts on one model.
pub struct Judged<B: Backend> {
    /// [n, 3, H, W] in [0, 1], prompt-major (all seeds of prompt 0, then prompt 1, …).
    pub images: Tensor<B, 4>,
    pub verdicts: Vec<Verdict>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub base: f64,
    pub unlearned: f64,
    pub n: usize,
}

pub struct Evaluator<'a, B: Backend> {
    pub judge: &'a ConceptJudge<B>,
    pub scheduler: &'a Scheduler,
    pub seeds: usize,
    pub guidance: f64,
    pub batch: usize,
    pub threshold: f32,
}

impl<B: Backend> Evaluator<'_, B> {
    /// Generates `seeds` images per prompt (seed s for the s-th image of every prompt) and judges them.
    pub fn run(&self, sd: &StableDiffusion<B>, group: &Group, bar: &ProgressBar) -> Result<Judged<B>> {
        let side = sd.unet_sample_size.ok_or_else(|| {
            DuoError::Invalid("unet/config.json has no sample_size; cannot pick the image size".into())
        })?;
        let jobs: Vec<(&String, u64)> =
            group.prompts.iter().flat_map(|p| (0..self.seeds as u64).map(move |s| (p, s))).collect();
        let mut images = Vec::new();
        for chunk in jobs.chunks(self.batch) {
            let latents: Vec<Tensor<B, 4>> = chunk
                .iter()
                .map(|(_, seed)| {
                    NoiseSource::new(*seed).normal::<B, 4>([1, sd.latent_channels, side, side], &sd.device)
                })
                .collect();
            let generation = Generation {
                prompts: chunk.iter().map(|(p, _)| p.to_string()).collect(),
                negative_prompts: vec![],
                guidance_scale: self.guidance,
            };
            let mut noise = NoiseSource::new(0);
            images.push(sd.txt2img(
                &generation,
                self.scheduler,
                Tensor::cat(latents, 0),
                &mut noise,
                |_, _| {},
            )?);
            bar.inc(chunk.len() as u64);
        }
        let images = Tensor::cat(images, 0);
        let verdicts = self.judge.judge(images.clone())?;
        Ok(Judged { images, verdicts })
    }

    /// The fraction of the group's images that succeed.
    pub fn success_rate(&self, group: &Group, judged: &Judged<B>) -> Result<f64> {
        let mut hits = 0;
        for (i, verdict) in judged.verdicts.iter().enumerate() {
            let prompt = &group.prompts[i / self.seeds];
            hits += usize::from(match group.goal {
                Goal::Free(shape) => verdict.shape_probs[shape.index()] < self.threshold,
                Goal::Named => verdict.shape == named_shape(prompt)?,
            });
        }
        Ok(hits as f64 / judged.verdicts.len().max(1) as f64)
    }
}

/// The one shape a prompt names (for the preservation groups).
pub fn named_shape(prompt: &str) -> Result<Shape> {
    parse_caption(prompt).shape.ok_or_else(|| {
        DuoError::Invalid(format!(
            "eval prompt {prompt:?} names no single toy-world shape, so its image cannot be judged"
        ))
    })
}

/// 1 − mean |base − unlearned| / 1 over pixels in [0, 1]: how little the same-seed images moved.
pub fn pixel_similarity<B: Backend>(base: &Tensor<B, 4>, unlearned: &Tensor<B, 4>) -> f64 {
    let diff: f64 = (base.clone() - unlearned.clone()).abs().mean().into_scalar().elem();
    1.0 - diff
}
