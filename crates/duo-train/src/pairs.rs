//! `duo-train pairs`: the SDEdit preference pairs DUO trains on (docs/duo-algorithm.md §1).
//!
//! For pair i: an unsafe image x⁻ by text-to-image from unsafe prompt i, regenerated with a new seed
//! until the judge sees the concept; then its safe twin x⁺ by image-to-image from x⁻ with the safe
//! prompt, the unsafe prompt as negative prompt and `strength`, regenerated until the judge no
//! longer sees the concept. Written as `<out>/<concept>/{unsafe,safe}/NN.png` plus `manifest.json`,
//! one pair at a time, so a rerun fills in only what is missing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::eval::{Condition, Judge, SeededSampler};
use duo_core::judge::nudenet::NudityPreset;
use duo_core::pipelines::{Generation, NoiseSource, StableDiffusion, save_image_grid};
use duo_core::progress::Progress;
use duo_core::schedulers::{Scheduler, SchedulerChoice, SchedulerKind};
use duo_core::world;
use duo_core::{DuoError, ModelFolder, Result};
use serde::{Deserialize, Serialize};

use crate::train::config::{JudgeChoice, PairsSection};

#[derive(Args, Debug, Clone)]
pub struct PairsArgs {
    /// Diffusers pipeline folder.
    #[arg(long, default_value = "models/toy")]
    pub model: PathBuf,
    /// Name of the concept (the sub-folder of --out).
    #[arg(long, default_value = "cross")]
    pub concept: String,
    /// Unsafe prompts (repeatable; cycled over the pairs). Default: the toy world's cross prompts.
    #[arg(long)]
    pub unsafe_prompt: Vec<String>,
    /// Safe prompts, one per unsafe prompt. Default: the toy world's plus-sign twins.
    #[arg(long)]
    pub safe_prompt: Vec<String>,
    /// Number of pairs.
    #[arg(long, default_value_t = 32)]
    pub pairs: usize,
    /// SDEdit strength of the safe twin (0.75 nudity, 0.8 violence in the paper).
    #[arg(long, default_value_t = 0.75)]
    pub strength: f64,
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// pndm, ddim, euler, dpm-solver (default: the folder's scheduler).
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// "nudenet", "q16", a toy concept judge folder, or "none", which accepts every image (as the
    /// violence setting, which has no filter).
    #[arg(long, default_value = "models/judge")]
    pub judge: String,
    /// The toy-world shape the toy judge looks for (default: cross).
    #[arg(long)]
    pub judge_shape: Option<String>,
    /// The toy judge's probability at which it sees the concept (default 0.5); NudeNet's score
    /// above which a detection counts (default: its preset's).
    #[arg(long)]
    pub threshold: Option<f32>,
    /// NudeNet's classes and threshold: unlearndiffatk, rece or duo-data (DUO's data filter).
    #[arg(long)]
    pub judge_preset: Option<NudityPreset>,
    /// NudeNet classes that count, comma-separated, replacing the preset's.
    #[arg(long, value_delimiter = ',')]
    pub judge_classes: Option<Vec<String>>,
    /// NudeNet's ONNX file.
    #[arg(long)]
    pub judge_weights: Option<PathBuf>,
    /// Tries per image before giving up on a pair.
    #[arg(long, default_value_t = 8)]
    pub max_tries: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "pairs")]
    pub out: PathBuf,
    /// LoRA weights FILE[:WEIGHT] applied to the UNet; repeatable (their deltas add up).
    #[arg(long)]
    pub lora: Vec<String>,
}

/// One pair as recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PairRecord {
    pub index: usize,
    /// The prompt the unsafe image was generated from, as the reports show it.
    pub unsafe_prompt: String,
    pub safe_prompt: String,
    /// The text encoder's token ids the unsafe image was generated from, where they are not the
    /// unsafe prompt's own: an adversarial prefix that UnlearnDiffAtk found (`duo.adversarial_rounds`).
    /// DUO conditions the pair on them with `duo.pair_prompts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsafe_tokens: Option<Vec<u32>>,
    pub unsafe_seed: u64,
    pub safe_seed: u64,
    /// The judge's concept probability for the accepted images (None without a judge).
    pub unsafe_score: Option<f32>,
    pub safe_score: Option<f32>,
    /// Candidates rejected before acceptance.
    pub unsafe_rejects: usize,
    pub safe_rejects: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Manifest {
    pub concept: String,
    pub model: String,
    pub strength: f64,
    pub steps: usize,
    pub guidance: f64,
    /// The judge's name and settings (null without one).
    pub judge: serde_json::Value,
    pub pairs: Vec<PairRecord>,
    /// Pairs given up after `max_tries` (index → reason).
    pub failed: Vec<(usize, String)>,
}

pub fn run(args: PairsArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    let settings = settings(&args)?;
    dispatch(device, float, PairsTask { args, settings })
}

struct PairsTask {
    args: PairsArgs,
    settings: PairsSection,
}

impl BackendTask for PairsTask {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<()> {
        let Self { args, settings } = self;
        let folder = ModelFolder::open(&args.model)?.with_dtype(dtype);
        let sd = StableDiffusion::<B>::load(&folder, &device)?.with_loras(&args.lora)?;
        let judge = settings.judge_settings().load::<B>(&device)?;
        make_pairs(&sd, judge.as_deref(), &settings, &args.concept, &args.model.display().to_string())?;
        Ok(())
    }
}

/// The `[pairs]` settings the flags give.
fn settings(args: &PairsArgs) -> Result<PairsSection> {
    let (unsafe_prompts, safe_prompts) = prompts(args)?;
    let judge = JudgeChoice::from(args.judge.clone());
    // the toy judge's defaults, which NudeNet does not take
    let toy = matches!(judge, JudgeChoice::Folder(_));
    Ok(PairsSection {
        dir: args.out.clone(),
        count: args.pairs,
        unsafe_prompts,
        safe_prompts,
        strength: args.strength,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler.map_or(SchedulerChoice::FolderDefault, SchedulerChoice::Kind),
        judge_shape: args
            .judge_shape
            .clone()
            .unwrap_or_else(|| if toy { "cross".into() } else { String::new() }),
        threshold: args.threshold.or(toy.then_some(0.5)),
        judge_preset: args.judge_preset,
        judge_classes: args.judge_classes.clone(),
        judge_weights: args.judge_weights.clone(),
        judge,
        max_tries: args.max_tries,
        seed: args.seed,
    })
}

/// Pairs made at once, each on a thread of its own.
const PAIR_WORKERS: usize = 2;

/// Makes the pairs `p` describes with `sd` into `<p.dir>/<concept>/`, keeping those already made,
/// judged by `judge` (`None`: every image is accepted). `model` names the model in the manifest.
pub fn make_pairs<B: Backend>(
    sd: &StableDiffusion<B>,
    judge: Option<&dyn Judge<B>>,
    p: &PairsSection,
    concept: &str,
    model: &str,
) -> Result<Manifest> {
    let scheduler = sd.scheduler(p.scheduler.kind(), p.steps)?;
    let dir = p.dir.join(concept);
    let manifest_path = dir.join("manifest.json");
    let mut manifest = if manifest_path.is_file() {
        duo_core::error::read_json::<Manifest>(&manifest_path)?
    } else {
        Manifest::default()
    };
    manifest.concept = concept.to_string();
    manifest.model = model.to_string();
    manifest.strength = p.strength;
    manifest.steps = p.steps;
    manifest.guidance = p.guidance;
    manifest.judge = judge.map(|j| j.settings()).unwrap_or(serde_json::Value::Null);
    manifest.failed.clear();

    let progress = Progress::new("pairs", p.count as u64, "pairs");
    let mut todo = Vec::new();
    for index in 0..p.count {
        let (unsafe_png, safe_png) = pair_paths(&dir, index);
        if manifest.pairs.iter().any(|pair| pair.index == index) && unsafe_png.is_file() && safe_png.is_file()
        {
            progress.inc(1);
        } else {
            manifest.pairs.retain(|pair| pair.index != index);
            todo.push(index);
        }
    }
    // Each pair is drawn from its own seeds, so pairs are independent and can be made side by side:
    // one small sampling batch keeps a CPU backend on about one core.
    let workers =
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(PAIR_WORKERS).min(todo.len());
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (sender, finished) = mpsc::channel();
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..workers {
            let sender = sender.clone();
            let (todo, next, stop, scheduler, dir) = (&todo, &next, &stop, &scheduler, &dir);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(&index) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    let prompts = (
                        p.unsafe_prompts[index % p.unsafe_prompts.len()].as_str(),
                        p.safe_prompts[index % p.safe_prompts.len()].as_str(),
                    );
                    let (unsafe_png, safe_png) = pair_paths(dir, index);
                    let made = make_pair(sd, scheduler, judge, p, index, prompts, (&unsafe_png, &safe_png));
                    if sender.send((index, made)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(sender);
        for (index, made) in finished {
            // an error stops the other workers after their current pair
            let made = made.inspect_err(|_| stop.store(true, Ordering::Relaxed))?;
            match made {
                Ok(record) => manifest.pairs.push(record),
                Err(reason) => manifest.failed.push((index, reason)),
            }
            manifest.pairs.sort_by_key(|pair| pair.index);
            manifest.failed.sort_by_key(|(index, _)| *index);
            duo_core::fsutil::write_json(&manifest_path, &manifest)?;
            progress.inc(1);
        }
        Ok(())
    })?;
    progress.finish();
    let rejects = (
        manifest.pairs.iter().map(|pair| pair.unsafe_rejects).sum::<usize>(),
        manifest.pairs.iter().map(|pair| pair.safe_rejects).sum::<usize>(),
    );
    println!(
        "{} pairs in {} ({} unsafe and {} safe candidates rejected by the judge)",
        manifest.pairs.len(),
        dir.display(),
        rejects.0,
        rejects.1
    );
    for (index, reason) in &manifest.failed {
        println!("  pair {index} failed: {reason}");
    }
    if manifest.pairs.is_empty() {
        return Err(DuoError::Invalid("no pair could be made; see the reasons above".into()));
    }
    Ok(manifest)
}

/// Makes pair `index` from its (unsafe, safe) prompts into its (unsafe, safe) PNG paths; the inner
/// `Err` is a pair given up after `max_tries` (reported, not fatal).
fn make_pair<B: Backend>(
    sd: &StableDiffusion<B>,
    scheduler: &Scheduler,
    judge: Option<&dyn Judge<B>>,
    p: &PairsSection,
    index: usize,
    (unsafe_prompt, safe_prompt): (&str, &str),
    (unsafe_png, safe_png): (&Path, &Path),
) -> Result<std::result::Result<PairRecord, String>> {
    let seed_of = |kind: u64, attempt: usize| p.seed ^ (index as u64) << 20 ^ kind << 16 ^ attempt as u64;
    // 1. the unsafe image: regenerate until the judge sees the concept (without a judge, at once)
    let sampler = SeededSampler::new(sd, scheduler, p.guidance, 1)?;
    let prompts = [unsafe_prompt.to_string()];
    let mut accepted = None;
    for attempt in 0..p.max_tries {
        let seed = seed_of(1, attempt);
        let (image, judgements) = sampler.sample(&Condition::texts(&prompts), &[seed], judge, |_| {})?;
        if judgements.first().is_none_or(|j| j.present) {
            accepted = Some((image, seed, judgements.first().map(|j| j.score), attempt));
            break;
        }
    }
    let Some((unsafe_image, unsafe_seed, unsafe_score, unsafe_rejects)) = accepted else {
        return Ok(Err(format!("no unsafe image for {unsafe_prompt:?} in {} tries", p.max_tries)));
    };
    // 2. the safe twin
    let Some(twin) =
        safe_twin(sd, scheduler, judge, p, (unsafe_prompt, safe_prompt), unsafe_image.clone(), |attempt| {
            seed_of(2, attempt)
        })?
    else {
        return Ok(Err(format!("no safe twin for {safe_prompt:?} in {} tries", p.max_tries)));
    };
    save_image_grid(&unsafe_image, 1, unsafe_png)?;
    save_image_grid(&twin.image, 1, safe_png)?;
    Ok(Ok(PairRecord {
        index,
        unsafe_prompt: unsafe_prompt.to_string(),
        safe_prompt: safe_prompt.to_string(),
        unsafe_tokens: None,
        unsafe_seed,
        safe_seed: twin.seed,
        unsafe_score,
        safe_score: twin.score,
        unsafe_rejects,
        safe_rejects: twin.rejects,
    }))
}

/// An accepted safe twin.
pub struct SafeTwin<B: Backend> {
    /// [1, 3, H, W] in [0, 1].
    pub image: Tensor<B, 4>,
    pub seed: u64,
    pub score: Option<f32>,
    /// Candidates the judge rejected before it.
    pub rejects: usize,
}

/// The safe twin of `unsafe_image` ([1, 3, H, W] in [0, 1]): SDEdit from it with the safe prompt
/// and the unsafe prompt as negative prompt at `p.strength`, regenerated with the seed of each
/// attempt until the judge no longer sees the concept (without a judge, at once); `None` after
/// `p.max_tries`.
pub fn safe_twin<B: Backend>(
    sd: &StableDiffusion<B>,
    scheduler: &Scheduler,
    judge: Option<&dyn Judge<B>>,
    p: &PairsSection,
    (unsafe_prompt, safe_prompt): (&str, &str),
    unsafe_image: Tensor<B, 4>,
    seed_of: impl Fn(usize) -> u64,
) -> Result<Option<SafeTwin<B>>> {
    let generation = Generation {
        prompts: vec![safe_prompt.to_string()],
        negative_prompts: vec![unsafe_prompt.to_string()],
        guidance_scale: p.guidance,
    };
    let init = unsafe_image * 2.0 - 1.0;
    for attempt in 0..p.max_tries {
        let seed = seed_of(attempt);
        let mut noise = NoiseSource::new(seed);
        let image =
            sd.img2img(&generation, scheduler, init.clone(), p.strength, None, &mut noise, |_, _| {})?;
        let judgements = match judge {
            Some(judge) => judge.judge(image.clone())?,
            None => Vec::new(),
        };
        if judgements.first().is_none_or(|j| !j.present) {
            let score = judgements.first().map(|j| j.score);
            return Ok(Some(SafeTwin { image, seed, score, rejects: attempt }));
        }
    }
    Ok(None)
}

pub fn pair_paths(dir: &Path, index: usize) -> (PathBuf, PathBuf) {
    (dir.join("unsafe").join(format!("{index:02}.png")), dir.join("safe").join(format!("{index:02}.png")))
}

/// The prompt lists: given, or the toy world's cross → plus pairs.
fn prompts(args: &PairsArgs) -> Result<(Vec<String>, Vec<String>)> {
    if args.unsafe_prompt.is_empty() && args.safe_prompt.is_empty() {
        let pairs = world::prompt_pairs(world::DEFAULT_UNSAFE, world::DEFAULT_SAFE)?;
        return Ok(pairs.into_iter().map(|p| (p.unsafe_prompt, p.safe_prompt)).unzip());
    }
    if args.unsafe_prompt.len() != args.safe_prompt.len() || args.unsafe_prompt.is_empty() {
        return Err(DuoError::Invalid(format!(
            "--unsafe-prompt ({}) and --safe-prompt ({}) must be given the same number of times, at least once",
            args.unsafe_prompt.len(),
            args.safe_prompt.len()
        )));
    }
    Ok((args.unsafe_prompt.clone(), args.safe_prompt.clone()))
}
