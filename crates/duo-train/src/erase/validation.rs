//! RECE's choice of round: after each round its authors generate one image per validation prompt,
//! count the images the judge flags, and save the model only when that count improves, so the
//! final model is the best round by validation, not necessarily the last.

use std::path::Path;

use burn::prelude::*;
use duo_core::Result;
use duo_core::eval::{Condition, SeededSampler};
use duo_core::pipelines::StableDiffusion;
use serde::Serialize;

use crate::train::config::DuoConfig;

/// Seeds of the validation images: apart from the evaluation's (0, 1, …) and the other searches'.
const VALIDATION_SEEDS_FROM: u64 = 3_000_000;

/// The round kept and every round's share of flagged validation images.
#[derive(Debug, Clone, Serialize)]
pub struct Validation {
    pub best: usize,
    /// Per round (1, 2, …): the fraction of validation images the judge flagged; empty without a
    /// judge, when the last round is kept.
    pub flagged: Vec<f64>,
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
}

/// Validates every `round-K.safetensors` in `out` on `rece.validation_prompts` (or the pairs'
/// unsafe prompts) with the pairs' judge and sampling settings; the first round is kept unless a
/// later one is flagged less often.
pub fn best_round<B: Backend>(sd: &StableDiffusion<B>, config: &DuoConfig, out: &Path) -> Result<Validation> {
    let (r, p) = (&config.rece, &config.pairs);
    let mut prompts: Vec<String> = Vec::new();
    let listed = if r.validation_prompts.is_empty() { &p.unsafe_prompts } else { &r.validation_prompts };
    for prompt in listed {
        if !prompts.contains(prompt) {
            prompts.push(prompt.clone());
        }
    }
    let seeds: Vec<u64> =
        (VALIDATION_SEEDS_FROM..VALIDATION_SEEDS_FROM + r.validation_seeds as u64).collect();
    let Some(judge) = p.judge_settings().load::<B>(&sd.device)? else {
        println!("rece: no pairs.judge to validate the rounds with; keeping the last");
        return Ok(Validation { best: r.rounds, flagged: Vec::new(), prompts, seeds });
    };
    let scheduler = sd.scheduler(p.scheduler.kind(), p.steps)?;
    let conditions: Vec<Condition<B>> = prompts.iter().map(|p| Condition::Text(p.clone())).collect();
    let mut flagged = Vec::with_capacity(r.rounds);
    for round in 1..=r.rounds {
        let lora = out.join(format!("round-{round}.safetensors"));
        let model = sd.clone().with_loras(&[lora.display().to_string()])?;
        let sampler = SeededSampler::new(&model, &scheduler, p.guidance, config.eval.batch)?;
        let (_, judgements) = sampler.sample(&conditions, &seeds, Some(judge.as_ref()), |_| {})?;
        let share = judgements.iter().filter(|j| j.present).count() as f64 / judgements.len().max(1) as f64;
        println!(
            "rece: round {round} validation: {:.1}% of {} images flagged",
            100.0 * share,
            judgements.len()
        );
        flagged.push(share);
    }
    // the authors save on improvement only: the earliest of equally good rounds stays
    let best = (1..=r.rounds)
        .fold(1, |best, round| if flagged[round - 1] < flagged[best - 1] { round } else { best });
    Ok(Validation { best, flagged, prompts, seeds })
}
