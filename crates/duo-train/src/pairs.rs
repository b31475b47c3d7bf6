//! `duo-train pairs`: the SDEdit preference pairs DUO trains on (duo-reference.md §1).
//!
//! For pair i: an unsafe image x⁻ by text-to-image from unsafe prompt i, regenerated with a new seed
//! until the judge sees the concept; then its safe twin x⁺ by image-to-image from x⁻ with the safe
//! prompt, the unsafe prompt as negative prompt and `strength`, regenerated until the judge no
//! longer sees the concept. Written as `<out>/<concept>/{unsafe,safe}/NN.png` plus `manifest.json`,
//! one pair at a time, so a rerun fills in only what is missing.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::judge::ConceptJudge;
use duo_core::pipelines::{Generation, NoiseSource, StableDiffusion, save_image_grid};
use duo_core::schedulers::Scheduler;
use duo_core::world::{self, Shape};
use duo_core::{DuoError, ModelFolder, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

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
    pub scheduler: Option<String>,
    /// Toy concept judge folder; "none" accepts every image (as the violence setting, which has no
    /// filter).
    #[arg(long, default_value = "models/judge")]
    pub judge: String,
    /// The toy-world shape the judge looks for.
    #[arg(long, default_value = "cross")]
    pub judge_shape: String,
    /// Probability above which the judge "sees" the concept.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f32,
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
    pub unsafe_prompt: String,
    pub safe_prompt: String,
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
    pub judge: String,
    pub threshold: f32,
    pub pairs: Vec<PairRecord>,
    /// Pairs given up after `max_tries` (index → reason).
    pub failed: Vec<(usize, String)>,
}

pub fn run(args: PairsArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    dispatch(device, float, PairsTask(args))
}

struct PairsTask(PairsArgs);

/// Scores images for the concept; `None` when there is no judge.
enum Judge<B: Backend> {
    Toy { judge: Box<ConceptJudge<B>>, shape: Shape },
    Accept,
}

impl<B: Backend> Judge<B> {
    fn score(&self, images: &Tensor<B, 4>) -> Result<Option<f32>> {
        match self {
            Self::Toy { judge, shape } => Ok(judge.prob_of(images.clone(), *shape)?.first().copied()),
            Self::Accept => Ok(None),
        }
    }
}

impl BackendTask for PairsTask {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<()> {
        let args = self.0;
        let (unsafe_prompts, safe_prompts) = prompts(&args)?;
        let folder = ModelFolder::open(&args.model)?.with_dtype(dtype);
        let mut sd = StableDiffusion::<B>::load(&folder, &device)?;
        sd.unet = duo_core::lora::load_lora_specs(sd.unet, &args.lora)?;
        let scheduler = sd.scheduler(args.scheduler.as_deref(), args.steps)?;
        let judge = if args.judge == "none" {
            Judge::Accept
        } else {
            let shape = parse_shape(&args.judge_shape)?;
            Judge::Toy { judge: Box::new(ConceptJudge::load(Path::new(&args.judge), &device)?), shape }
        };

        let dir = args.out.join(&args.concept);
        let manifest_path = dir.join("manifest.json");
        let mut manifest = if manifest_path.is_file() {
            duo_core::error::read_json::<Manifest>(&manifest_path)?
        } else {
            Manifest::default()
        };
        manifest.concept = args.concept.clone();
        manifest.model = args.model.display().to_string();
        manifest.strength = args.strength;
        manifest.steps = args.steps;
        manifest.guidance = args.guidance;
        manifest.judge = args.judge.clone();
        manifest.threshold = args.threshold;
        manifest.failed.clear();

        let bar = ProgressBar::new(args.pairs as u64).with_style(
            ProgressStyle::with_template("pairs [{bar:30}] {pos}/{len} {msg} {elapsed_precise}")
                .expect("static template"),
        );
        for index in 0..args.pairs {
            let (unsafe_png, safe_png) = pair_paths(&dir, index);
            let done = manifest.pairs.iter().any(|p| p.index == index);
            if done && unsafe_png.is_file() && safe_png.is_file() {
                bar.inc(1);
                continue;
            }
            manifest.pairs.retain(|p| p.index != index);
            let unsafe_prompt = &unsafe_prompts[index % unsafe_prompts.len()];
            let safe_prompt = &safe_prompts[index % safe_prompts.len()];
            match make_pair(
                &sd,
                &scheduler,
                &judge,
                &args,
                index,
                unsafe_prompt,
                safe_prompt,
                &unsafe_png,
                &safe_png,
            )? {
                Ok(record) => manifest.pairs.push(record),
                Err(reason) => manifest.failed.push((index, reason)),
            }
            manifest.pairs.sort_by_key(|p| p.index);
            duo_core::fsutil::write_json(&manifest_path, &manifest)?;
            let rejects: usize = manifest.pairs.iter().map(|p| p.unsafe_rejects + p.safe_rejects).sum();
            bar.set_message(format!("{rejects} rejected candidates, {} failed pairs", manifest.failed.len()));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let rejects = (
            manifest.pairs.iter().map(|p| p.unsafe_rejects).sum::<usize>(),
            manifest.pairs.iter().map(|p| p.safe_rejects).sum::<usize>(),
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
        Ok(())
    }
}

/// Makes pair `index`; the inner `Err` is a pair given up after `max_tries` (reported, not fatal).
#[allow(clippy::too_many_arguments)]
fn make_pair<B: Backend>(
    sd: &StableDiffusion<B>,
    scheduler: &Scheduler,
    judge: &Judge<B>,
    args: &PairsArgs,
    index: usize,
    unsafe_prompt: &str,
    safe_prompt: &str,
    unsafe_png: &Path,
    safe_png: &Path,
) -> Result<std::result::Result<PairRecord, String>> {
    let seed_of = |kind: u64, attempt: usize| args.seed ^ (index as u64) << 20 ^ kind << 16 ^ attempt as u64;
    let fires = |score: Option<f32>| score.is_none_or(|s| s >= args.threshold);
    let unsafe_generation = Generation {
        prompts: vec![unsafe_prompt.to_string()],
        negative_prompts: vec![],
        guidance_scale: args.guidance,
    };
    // 1. the unsafe image: regenerate until the judge sees the concept
    let mut accepted = None;
    for attempt in 0..args.max_tries {
        let seed = seed_of(1, attempt);
        let mut noise = NoiseSource::new(seed);
        let side = sd.unet_sample_size.ok_or_else(|| {
            DuoError::Invalid("unet/config.json has no sample_size; cannot pick the image size".into())
        })?;
        let latents = noise.normal::<B, 4>([1, sd.latent_channels, side, side], &sd.device);
        let image = sd.txt2img(&unsafe_generation, scheduler, latents, &mut noise, |_, _| {})?;
        let score = judge.score(&image)?;
        if fires(score) {
            accepted = Some((image, seed, score, attempt));
            break;
        }
    }
    let Some((unsafe_image, unsafe_seed, unsafe_score, unsafe_rejects)) = accepted else {
        return Ok(Err(format!("no unsafe image for {unsafe_prompt:?} in {} tries", args.max_tries)));
    };
    // 2. the safe twin: SDEdit from the unsafe image, the unsafe prompt as negative prompt
    let safe_generation = Generation {
        prompts: vec![safe_prompt.to_string()],
        negative_prompts: vec![unsafe_prompt.to_string()],
        guidance_scale: args.guidance,
    };
    let init = unsafe_image.clone() * 2.0 - 1.0;
    for attempt in 0..args.max_tries {
        let seed = seed_of(2, attempt);
        let mut noise = NoiseSource::new(seed);
        let image = sd.img2img(
            &safe_generation,
            scheduler,
            init.clone(),
            args.strength,
            None,
            &mut noise,
            |_, _| {},
        )?;
        let score = judge.score(&image)?;
        if matches!(judge, Judge::Accept) || !fires(score) {
            save_image_grid(&unsafe_image, 1, unsafe_png)?;
            save_image_grid(&image, 1, safe_png)?;
            return Ok(Ok(PairRecord {
                index,
                unsafe_prompt: unsafe_prompt.to_string(),
                safe_prompt: safe_prompt.to_string(),
                unsafe_seed,
                safe_seed: seed,
                unsafe_score,
                safe_score: score,
                unsafe_rejects,
                safe_rejects: attempt,
            }));
        }
    }
    Ok(Err(format!("no safe twin for {safe_prompt:?} in {} tries", args.max_tries)))
}

fn pair_paths(dir: &Path, index: usize) -> (PathBuf, PathBuf) {
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

pub(crate) fn parse_shape(name: &str) -> Result<Shape> {
    Shape::ALL.into_iter().find(|s| s.name() == name).ok_or_else(|| {
        let names: Vec<&str> = Shape::ALL.iter().map(|s| s.name()).collect();
        DuoError::Invalid(format!("unknown shape {name:?} for --judge-shape (one of {})", names.join(", ")))
    })
}
