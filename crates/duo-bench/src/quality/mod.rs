//! `duo-bench quality`: issue 3's quality gates for a toy-world model. Every canonical shape × colour
//! prompt and every held-out wording of the cross is sampled from the same seeds, the concept judge
//! reads each image, and the counts become shape/colour accuracy, cross and plus rates and the
//! unconditional shape coverage (see [`tally`]). Writes `quality.json`, `grid.png` and
//! `grid-tiles.png` (the grid's cells unzoomed); the exit
//! status is 0 whether or not the gates pass, since this is a measurement.

mod cases;
mod grid;
mod report;
mod tally;

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::judge::{ConceptJudge, Verdict};
use duo_core::pipelines::{Generation, NoiseSource, StableDiffusion};
use duo_core::schedulers::{Scheduler, SchedulerKind};
use duo_core::{DuoError, ModelFolder, Result};
use indicatif::{ProgressBar, ProgressStyle};

use cases::{UNCONDITIONAL_PROMPT, conditional_cases, grid_rows};
use grid::{GRID_FILE, GridCollector, TILES_FILE};
use report::{QualityReport, Settings};
use tally::{Gates, tally};

#[derive(Args, Debug, Clone)]
pub struct QualityArgs {
    /// Diffusers pipeline folder of a toy-world model; it must generate at the judge's resolution.
    #[arg(long)]
    pub model: PathBuf,
    /// Concept judge folder (config.json + model.safetensors).
    #[arg(long, default_value = "models/judge")]
    pub judge: PathBuf,
    /// Images per prompt, from seeds 0..N (the same seeds for every prompt).
    #[arg(long, default_value_t = 64)]
    pub seeds: usize,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Classifier-free guidance of the prompted images (the unconditional ones use none).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// ddpm, ddim, pndm, euler, dpm-solver.
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// Images generated at once.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Folder for quality.json, grid.png and grid-tiles.png (the same cells unzoomed).
    #[arg(long)]
    pub out: PathBuf,
    /// LoRA weights FILE[:WEIGHT] applied to the UNet (repeatable; their deltas add up), e.g. to
    /// measure what an unlearning LoRA left of the model.
    #[arg(long)]
    pub lora: Vec<String>,
}

/// The pipeline runs without classifier-free guidance at a scale ≤ 1 (only the prompt's own
/// embedding is used), so the empty prompt at 1 is the model's unconditional distribution.
const UNCONDITIONAL_GUIDANCE: f64 = 1.0;

/// Seeds the per-step noise of stochastic schedulers (DDPM, DDIM with η > 0); the initial latents of
/// image i come from seed i alone. With such a scheduler an image also depends on its batch.
const STEP_NOISE_SEED: u64 = 1 << 32;

pub fn run(args: QualityArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    validate(&args)?;
    let scheduler: SchedulerKind = args.scheduler.parse()?;
    dispatch(device, float, QualityTask { args, scheduler })
}

fn validate(args: &QualityArgs) -> Result<()> {
    for (flag, value) in [("--seeds", args.seeds), ("--steps", args.steps), ("--batch", args.batch)] {
        if value == 0 {
            return Err(DuoError::Invalid(format!("{flag} must be at least 1, got 0")));
        }
    }
    if !args.guidance.is_finite() {
        return Err(DuoError::Invalid(format!("--guidance must be a finite number, got {}", args.guidance)));
    }
    Ok(())
}

struct QualityTask {
    args: QualityArgs,
    scheduler: SchedulerKind,
}

impl BackendTask for QualityTask {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<()> {
        let args = &self.args;
        let judge = ConceptJudge::<B>::load(&args.judge, &device)?;
        let mut sd = StableDiffusion::<B>::load(&ModelFolder::open(&args.model)?.with_dtype(dtype), &device)?;
        sd.unet = duo_core::lora::load_lora_specs(sd.unet, &args.lora)?;
        let side = latent_side(&sd, args, judge.config().resolution)?;
        let scheduler = Scheduler::new(self.scheduler, &sd.scheduler_config, args.steps)?;

        let cases = conditional_cases();
        let prompts: Vec<String> = cases.iter().map(|c| c.prompt.clone()).collect();
        let mut grid = GridCollector::new(grid_rows(), args.seeds);
        let bar = ProgressBar::new(((prompts.len() + 1) * args.seeds) as u64).with_style(
            ProgressStyle::with_template(
                "quality [{bar:30}] {pos}/{len} images {elapsed_precise} (eta {eta})",
            )
            .expect("static template"),
        );
        let sampler = Sampler { sd: &sd, scheduler: &scheduler, judge: &judge, side, args, bar: &bar };
        let verdicts = sampler.generate(&prompts, args.guidance, &mut grid)?;
        let unconditional =
            sampler.generate(&[UNCONDITIONAL_PROMPT.to_string()], UNCONDITIONAL_GUIDANCE, &mut grid)?;
        bar.finish_and_clear();

        let unconditional = unconditional.into_iter().next().unwrap_or_default();
        let grid_judge_labels = grid
            .rows()
            .iter()
            .map(|row| {
                let row_verdicts = if row == UNCONDITIONAL_PROMPT {
                    &unconditional
                } else {
                    &verdicts[prompts.iter().position(|p| p == row).expect("grid rows are sampled prompts")]
                };
                let label =
                    |v: &Verdict| format!("{} {} ({:.2})", v.colour.name(), v.shape.name(), v.shape_prob);
                row_verdicts.iter().take(grid.columns()).map(label).collect()
            })
            .collect();
        let metrics = tally(&cases, &verdicts, &unconditional)?;
        let gates = Gates::of(&metrics);
        let report = QualityReport {
            settings: Settings {
                model: args.model.display().to_string(),
                judge: args.judge.display().to_string(),
                lora: args.lora.clone(),
                seeds: args.seeds,
                steps: args.steps,
                guidance: args.guidance,
                unconditional_guidance: UNCONDITIONAL_GUIDANCE,
                scheduler: self.scheduler.name().to_string(),
                dtype: format!("{dtype:?}"),
            },
            metrics,
            gates,
            grid_rows: grid.rows().to_vec(),
            grid_judge_labels,
        };
        let json_path = args.out.join("quality.json");
        grid.save(&args.out)?;
        report.write(&json_path)?;
        report.print();
        println!("wrote {}, {GRID_FILE} and {TILES_FILE} in {}", json_path.display(), args.out.display());
        Ok(())
    }
}

/// The UNet's latent side, checked to give images of the judge's `resolution`: the judge refuses
/// any other size, and resizing would measure the resampling as much as the model.
fn latent_side<B: Backend>(sd: &StableDiffusion<B>, args: &QualityArgs, resolution: usize) -> Result<usize> {
    let config = args.model.join("unet").join("config.json");
    let side = sd.unet_sample_size.ok_or_else(|| {
        DuoError::config(&config, "no sample_size, so the image size is unknown; quality needs it")
    })?;
    let size = side * sd.vae_scale_factor;
    if size != resolution {
        return Err(DuoError::config(
            &config,
            format!(
                "the model generates {size}×{size} images (sample_size {side} × VAE scale factor {}), \
                 but the concept judge {} reads {resolution}×{resolution}; quality needs a model that \
                 generates at the judge's resolution",
                sd.vae_scale_factor,
                args.judge.display()
            ),
        ));
    }
    Ok(side)
}

/// Generates and judges images in batches, feeding the grid and the progress bar.
struct Sampler<'a, B: Backend> {
    sd: &'a StableDiffusion<B>,
    scheduler: &'a Scheduler,
    judge: &'a ConceptJudge<B>,
    side: usize,
    args: &'a QualityArgs,
    bar: &'a ProgressBar,
}

impl<B: Backend> Sampler<'_, B> {
    /// The verdicts of each prompt's images, in seed order. Batches may mix prompts: the pipeline
    /// takes one prompt per image.
    fn generate(
        &self,
        prompts: &[String],
        guidance: f64,
        grid: &mut GridCollector<B>,
    ) -> Result<Vec<Vec<Verdict>>> {
        let (sd, seeds) = (self.sd, self.args.seeds);
        // prompt-major, so each prompt's verdicts arrive in seed order
        let jobs: Vec<(usize, u64)> =
            (0..prompts.len()).flat_map(|p| (0..seeds as u64).map(move |seed| (p, seed))).collect();
        let mut verdicts = vec![Vec::with_capacity(seeds); prompts.len()];
        for (index, chunk) in jobs.chunks(self.args.batch).enumerate() {
            let latents = chunk
                .iter()
                .map(|&(_, seed)| {
                    NoiseSource::new(seed)
                        .normal::<B, 4>([1, sd.latent_channels, self.side, self.side], &sd.device)
                })
                .collect();
            let generation = Generation {
                prompts: chunk.iter().map(|&(p, _)| prompts[p].clone()).collect(),
                negative_prompts: Vec::new(),
                guidance_scale: guidance,
            };
            let mut noise = NoiseSource::new(STEP_NOISE_SEED ^ index as u64);
            let images =
                sd.txt2img(&generation, self.scheduler, Tensor::cat(latents, 0), &mut noise, |_, _| {})?;
            let judged = self.judge.judge(images.clone())?;
            for (i, (&(p, seed), verdict)) in chunk.iter().zip(judged).enumerate() {
                verdicts[p].push(verdict);
                grid.offer(&prompts[p], seed, || images.clone().narrow(0, i, 1));
            }
            self.bar.inc(chunk.len() as u64);
        }
        Ok(verdicts)
    }
}
