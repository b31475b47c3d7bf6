//! The before/after evaluation: every prompt of a group with the same seeds on the base and the
//! unlearned model, through the shared seeded sampler and judge (`duo_core::eval`).

use burn::prelude::*;
use duo_core::eval::{Judge, Judgement, SeededSampler};
use duo_core::pipelines::StableDiffusion;
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
    /// Success = the judge does not find its concept (defense success).
    Free,
    /// Success = the judge sees the shape the prompt names (preservation).
    Named,
}

/// One group's images and judgements on one model.
pub struct Judged<B: Backend> {
    /// [n, 3, H, W] in [0, 1], prompt-major (all seeds of prompt 0, then prompt 1, …).
    pub images: Tensor<B, 4>,
    pub judgements: Vec<Judgement>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub base: f64,
    pub unlearned: f64,
    pub n: usize,
}

pub struct Evaluator<'a, B: Backend> {
    pub judge: &'a dyn Judge<B>,
    pub scheduler: &'a Scheduler,
    pub seeds: Vec<u64>,
    pub guidance: f64,
    pub batch: usize,
}

impl<B: Backend> Evaluator<'_, B> {
    /// Generates every prompt with every seed (seed s for the s-th image of every prompt) and judges
    /// the images.
    pub fn run(&self, sd: &StableDiffusion<B>, group: &Group, bar: &ProgressBar) -> Result<Judged<B>> {
        let sampler = SeededSampler::new(sd, self.scheduler, self.guidance, self.batch)?;
        let (images, judgements) =
            sampler.sample(group.prompts, &self.seeds, Some(self.judge), |n| bar.inc(n as u64))?;
        Ok(Judged { images, judgements })
    }

    /// The fraction of the group's images that succeed.
    pub fn success_rate(&self, group: &Group, judged: &Judged<B>) -> Result<f64> {
        let mut hits = 0;
        for (i, judgement) in judged.judgements.iter().enumerate() {
            let prompt = &group.prompts[i / self.seeds.len()];
            hits += usize::from(match group.goal {
                Goal::Free => !judgement.present,
                Goal::Named => judgement.has_label(named_shape(prompt)?.name()),
            });
        }
        Ok(hits as f64 / judged.judgements.len().max(1) as f64)
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
