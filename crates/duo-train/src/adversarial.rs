//! Adversarially mined pairs (`duo.adversarial_rounds`, the `duo-adv` of `duo-bench compare`).
//!
//! DUO trains in segments. After each segment but the last, UnlearnDiffAtk attacks the LoRA trained
//! so far from every unsafe prompt of the pairs; every image in which it still regenerates the
//! concept becomes a new pair: that image, and its SDEdit safe twin made by the base model as the
//! first pairs' twins are, conditioned (with `duo.pair_prompts`) on the tokens the attack found.
//! Training then continues on the first pairs and every mined one. This is AdvUnlearn's idea, that
//! erasing what an attack finds during training is what holds under attack, with DUO's preference
//! pairs where AdvUnlearn uses ESD's target.
//!
//! A run directory holds `config.toml` (the run's config), `learner/` (the DUO learner's run:
//! checkpoints, logs, latent cache), `pairs/<concept>/` (what it trains on: the first pairs and the
//! mined ones, linked), `round-R/` (the LoRA attacked, the attack's prompts and images in
//! `attack/`, the mined pairs in `pairs/<concept>/`, `round.json`), `adversarial.json` (every
//! round's figures) and `lora.safetensors`. A rerun continues where it stopped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use duo_core::attacks::{UnlearnDiffAtkAttack, prefixed_ids};
use duo_core::eval::{Bench, Judge, RunFolder, Shard, Unit};
use duo_core::pipelines::{StableDiffusion, load_image, save_image_grid};
use duo_core::run_config::RunConfig;
use duo_core::{DuoError, Result};
use serde::{Deserialize, Serialize};

use crate::pairs::{Manifest, PairRecord, pair_paths, safe_twin};
use crate::train::config::DuoConfig;
use crate::train::train_lora;

/// Seeds of the images the rounds attack: apart from the evaluation's (0, 1, …) and the attacks'
/// own training images, so no evaluated image is ever trained on.
const MINING_SEEDS_FROM: u64 = 2_000_000;

/// What one round found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    pub round: usize,
    /// The training step whose LoRA was attacked.
    pub after_step: usize,
    /// Images the attack generated with the LoRA, and those in which the judge saw the concept.
    pub attacked_images: usize,
    pub regenerated: usize,
    /// Of those, the ones that became pairs, and the ones without a safe twin in `pairs.max_tries`.
    pub new_pairs: usize,
    pub without_twin: usize,
    pub seconds: f64,
}

/// DUO on `config`'s pairs in the run directory `dir`, with `duo.adversarial_rounds` rounds of
/// mined pairs (none: the learner alone, [`train_lora`]). Returns the final LoRA's path; `None`
/// when the training was stopped early.
pub fn train_with_mining<B: Backend>(
    sd: &StableDiffusion<B>,
    config: &DuoConfig,
    dir: &Path,
    log_every: usize,
) -> Result<Option<PathBuf>> {
    let after = config.adversarial_steps();
    if after.is_empty() {
        return train_lora(sd, config, dir, log_every);
    }
    std::fs::create_dir_all(dir).map_err(|e| DuoError::io(dir, e))?;
    config.save_to_run(dir)?;
    let judge = config.pairs.judge_settings().load::<B>(&sd.device)?.ok_or_else(|| {
        DuoError::Invalid(
            "duo.adversarial_rounds needs pairs.judge: it tells which mined images show the concept".into(),
        )
    })?;
    // the learner sees one pair folder, which grows by each round's pairs
    let mut learner = config.clone();
    learner.pairs.dir = dir.join("pairs");
    learner.duo.adversarial_rounds = 0;
    let mut mined: Vec<PathBuf> = Vec::new();
    let mut rounds = Vec::new();
    for (index, &step) in after.iter().enumerate() {
        let round_dir = dir.join(format!("round-{}", index + 1));
        let pairs_dir = round_dir.join("pairs").join(&config.concept);
        let round = match finished_round(&round_dir, &pairs_dir)? {
            // its segment was trained before it was mined
            Some(round) => {
                println!("round {}: mined pairs in {}, reused", index + 1, pairs_dir.display());
                round
            }
            None => {
                let Some(lora) = segment(sd, &mut learner, step, config, &mined, dir, log_every)? else {
                    return Ok(None);
                };
                mine(sd, judge.as_ref(), config, (index + 1, step), &lora, &round_dir, &pairs_dir)?
            }
        };
        rounds.push(round);
        mined.push(pairs_dir);
    }
    let Some(lora) = segment(sd, &mut learner, config.training.steps, config, &mined, dir, log_every)? else {
        return Ok(None);
    };
    duo_core::fsutil::write_json(&dir.join("adversarial.json"), &rounds)?;
    let out = dir.join("lora.safetensors");
    std::fs::copy(&lora, &out).map_err(|e| DuoError::io(&out, e))?;
    Ok(Some(out))
}

/// Every round's figures of a finished run in `dir` (empty for a run without rounds).
pub fn rounds(dir: &Path) -> Result<Vec<Round>> {
    let path = dir.join("adversarial.json");
    match path.is_file() {
        true => duo_core::error::read_json(&path),
        false => Ok(Vec::new()),
    }
}

/// Trains the learner up to `steps` on the first pairs and the `mined` ones (continuing from its
/// last checkpoint).
fn segment<B: Backend>(
    sd: &StableDiffusion<B>,
    learner: &mut DuoConfig,
    steps: usize,
    config: &DuoConfig,
    mined: &[PathBuf],
    dir: &Path,
    log_every: usize,
) -> Result<Option<PathBuf>> {
    link_pairs(&config.pair_dir(), mined, &learner.pair_dir())?;
    learner.training.steps = steps;
    println!("\n== DUO up to step {steps} of {} ==", config.training.steps);
    train_lora(sd, learner, &dir.join("learner"), log_every)
}

/// Makes `to` the pair folder of the first pairs (`first`, their indices kept) followed by each
/// mined folder's pairs (numbered on): the images linked, one manifest.
fn link_pairs(first: &Path, mined: &[PathBuf], to: &Path) -> Result<()> {
    let read = |dir: &Path| -> Result<Manifest> {
        let path = dir.join("manifest.json");
        if !path.is_file() {
            return Err(DuoError::Invalid(format!(
                "{}: not found; adversarial rounds add to the pairs that `duo-train pairs` made and recorded there",
                path.display()
            )));
        }
        duo_core::error::read_json(&path)
    };
    let link = |from: &Path, record: &PairRecord, index: usize| -> Result<()> {
        let (sources, dests) = (pair_paths(from, record.index), pair_paths(to, index));
        for (source, dest) in [(sources.0, dests.0), (sources.1, dests.1)] {
            if !dest.is_file() {
                duo_core::fsutil::link_or_copy(&source, &dest)?;
            }
        }
        Ok(())
    };
    let mut merged = read(first)?;
    merged.failed.clear();
    for record in &merged.pairs {
        link(first, record, record.index)?;
    }
    let mut next = merged.pairs.iter().map(|r| r.index + 1).max().unwrap_or(0);
    for dir in mined {
        for record in read(dir)?.pairs {
            link(dir, &record, next)?;
            merged.pairs.push(PairRecord { index: next, ..record });
            next += 1;
        }
    }
    // a folder left by a later point of an earlier run holds more: only these pairs are trained on
    let wanted: Vec<PathBuf> =
        merged.pairs.iter().flat_map(|r| <[PathBuf; 2]>::from(pair_paths(to, r.index))).collect();
    for side in ["unsafe", "safe"] {
        let folder = to.join(side);
        for entry in std::fs::read_dir(&folder).map_err(|e| DuoError::io(&folder, e))? {
            let path = entry.map_err(|e| DuoError::io(&folder, e))?.path();
            if !wanted.contains(&path) {
                std::fs::remove_file(&path).map_err(|e| DuoError::io(&path, e))?;
            }
        }
    }
    duo_core::fsutil::write_json(&to.join("manifest.json"), &merged)
}

/// The figures of the round in `dir` when it is done (its pairs in `pairs_dir` are recorded).
fn finished_round(dir: &Path, pairs_dir: &Path) -> Result<Option<Round>> {
    let summary = dir.join(ROUND_FILE);
    match summary.is_file() && pairs_dir.join("manifest.json").is_file() {
        true => Ok(Some(duo_core::error::read_json(&summary)?)),
        false => Ok(None),
    }
}

const ROUND_FILE: &str = "round.json";

/// Round `round` (after training step `step`): UnlearnDiffAtk against `lora` from every unsafe
/// prompt, and a pair for each image that still shows the concept, into `pairs_dir`; the rest of
/// the round in `dir`.
fn mine<B: Backend>(
    sd: &StableDiffusion<B>,
    judge: &dyn Judge<B>,
    config: &DuoConfig,
    (round, step): (usize, usize),
    lora: &Path,
    dir: &Path,
    pairs_dir: &Path,
) -> Result<Round> {
    println!("\n== adversarial round {round}: UnlearnDiffAtk against the LoRA of step {step} ==");
    let started = Instant::now();
    // the learner's file is overwritten by the next segment; the round keeps what it attacked
    let attacked = dir.join("lora.safetensors");
    if !attacked.is_file() {
        std::fs::create_dir_all(dir).map_err(|e| DuoError::io(dir, e))?;
        std::fs::copy(lora, &attacked).map_err(|e| DuoError::io(&attacked, e))?;
    }
    let current = sd.clone().with_loras(&[attacked.display().to_string()])?;
    let p = &config.pairs;
    let scheduler = sd.scheduler(p.scheduler.kind(), p.steps)?;
    // each unsafe prompt once, with the safe prompt it is paired with
    let mut prompts: Vec<(&str, &str)> = Vec::new();
    for (unsafe_prompt, safe_prompt) in p.unsafe_prompts.iter().zip(&p.safe_prompts) {
        if !prompts.iter().any(|(u, _)| u == unsafe_prompt) {
            prompts.push((unsafe_prompt, safe_prompt));
        }
    }
    let first_seed = MINING_SEEDS_FROM + 1000 * round as u64;
    let seeds: Vec<u64> = (first_seed..first_seed + config.duo.adversarial_seeds as u64).collect();
    let units = prompts
        .iter()
        .map(|(prompt, _)| Unit { prompt: prompt.to_string(), seeds: seeds.clone(), guidance: p.guidance })
        .collect();
    let settings = config.eval.attack.unlearndiffatk.clone().ok_or_else(|| {
        DuoError::Invalid("duo.adversarial_rounds needs an [eval.attack.unlearndiffatk] table".into())
    })?;
    let attack = UnlearnDiffAtkAttack::new(settings, units, sd)?;
    let bench =
        Bench { base: sd, unlearned: &current, scheduler: &scheduler, judge, batch: config.eval.batch };
    let folder = RunFolder { root: dir.join("attack"), shard: Shard::WHOLE };
    let run = bench.run(&attack, &folder)?;

    let mut manifest = Manifest {
        concept: config.concept.clone(),
        model: config.model.display().to_string(),
        strength: p.strength,
        steps: p.steps,
        guidance: p.guidance,
        judge: judge.settings(),
        ..Manifest::default()
    };
    let mut regenerated = 0;
    for (unit, record) in run.units() {
        let (unsafe_prompt, safe_prompt) = prompts[unit];
        let prefix: Option<Vec<u32>> = serde_json::from_value(record.details["prefix"].clone()).ok();
        for verdict in record.unlearned.iter().filter(|v| v.present) {
            let path = folder.image(&run.name, unit, verdict.seed, true);
            let image = (load_image::<B>(&path, 1, &sd.device)? + 1.0) / 2.0;
            // the search counts a seed it saw the concept with on the way, though the final
            // prompt's image may have lost it: only images that show it become pairs
            let Some(seen) = judge.judge(image.clone())?.into_iter().next().filter(|j| j.present) else {
                continue;
            };
            regenerated += 1;
            let index = manifest.pairs.len() + manifest.failed.len();
            let seed_of = |attempt: usize| {
                p.seed ^ (round as u64) << 40 ^ (index as u64) << 20 ^ 3 << 16 ^ attempt as u64
            };
            let twin = safe_twin(
                sd,
                &scheduler,
                Some(judge),
                p,
                (unsafe_prompt, safe_prompt),
                image.clone(),
                seed_of,
            )?;
            let Some(twin) = twin else {
                manifest
                    .failed
                    .push((index, format!("no safe twin for {} in {} tries", path.display(), p.max_tries)));
                continue;
            };
            let (unsafe_png, safe_png) = pair_paths(pairs_dir, index);
            save_image_grid(&image, 1, &unsafe_png)?;
            save_image_grid(&twin.image, 1, &safe_png)?;
            manifest.pairs.push(PairRecord {
                index,
                unsafe_prompt: record.input.clone(),
                safe_prompt: safe_prompt.to_string(),
                unsafe_tokens: prefix.as_ref().map(|prefix| prefixed_ids(sd, prefix, unsafe_prompt)),
                unsafe_seed: verdict.seed,
                safe_seed: twin.seed,
                unsafe_score: Some(seen.score),
                safe_score: twin.score,
                unsafe_rejects: 0,
                safe_rejects: twin.rejects,
            });
        }
    }
    let found = Round {
        round,
        after_step: step,
        attacked_images: run.records.iter().map(|r| r.unlearned.len()).sum(),
        regenerated,
        new_pairs: manifest.pairs.len(),
        without_twin: manifest.failed.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    // the manifest last: it marks the round done
    std::fs::create_dir_all(pairs_dir).map_err(|e| DuoError::io(pairs_dir, e))?;
    duo_core::fsutil::write_json(&dir.join(ROUND_FILE), &found)?;
    duo_core::fsutil::write_json(&pairs_dir.join("manifest.json"), &manifest)?;
    println!(
        "round {round}: the attack regenerated `{}` in {regenerated} of {} images; {} new pairs ({} without a safe twin)",
        config.concept, found.attacked_images, found.new_pairs, found.without_twin
    );
    Ok(found)
}
