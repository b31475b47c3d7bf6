//! `duo-bench quality`: the quality gates for a toy-world model. Every canonical shape × colour
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
use duo_core::eval::{Condition, SeededSampler};
use duo_core::judge::ToyJudge;
use duo_core::pipelines::StableDiffusion;
use duo_core::progress::Progress;
use duo_core::schedulers::{Scheduler, SchedulerKind};
use duo_core::{DuoError, ModelFolder, Result};

use cases::{ERASED, UNCONDITIONAL_PROMPT, conditional_cases, grid_rows};
use grid::{GRID_FILE, GridCollector, TILES_FILE};
use report::{QualityReport, Settings};
use tally::{Gates, Verdict, tally};

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
        // The concept the gates count against is the erased shape; the threshold is not used
        // (the gates read the judge's most probable shape and colour).
        let judge = ToyJudge::<B>::load(&args.judge, ERASED, 0.5, &device)?;
        let sd = StableDiffusion::<B>::load(&ModelFolder::open(&args.model)?.with_dtype(dtype), &device)?
            .with_loras(&args.lora)?;
        let scheduler = Scheduler::new(self.scheduler, &sd.scheduler_config, args.steps)?;
        let seeds: Vec<u64> = (0..args.seeds as u64).collect();

        let cases = conditional_cases();
        let prompts: Vec<String> = cases.iter().map(|c| c.prompt.clone()).collect();
        let mut grid = GridCollector::new(grid_rows(), args.seeds);
        let bar = Progress::new("quality", ((prompts.len() + 1) * args.seeds) as u64, "images");
        let prompted = SeededSampler::new(&sd, &scheduler, args.guidance, args.batch)?;
        let verdicts = judge_all(&prompted, &prompts, &seeds, &judge, &mut grid, &bar)?;
        let unconditional = SeededSampler { guidance: UNCONDITIONAL_GUIDANCE, ..prompted };
        let unconditional =
            judge_all(&unconditional, &[UNCONDITIONAL_PROMPT.to_string()], &seeds, &judge, &mut grid, &bar)?;
        bar.finish();

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
                let label = |(v, prob): &(Verdict, f32)| {
                    format!("{} {} ({prob:.2})", v.colour.name(), v.shape.name())
                };
                row_verdicts.iter().take(grid.columns()).map(label).collect()
            })
            .collect();
        let verdicts_only = |rows: &[(Verdict, f32)]| rows.iter().map(|(v, _)| *v).collect::<Vec<_>>();
        let metrics = tally(
            &cases,
            &verdicts.iter().map(|row| verdicts_only(row)).collect::<Vec<_>>(),
            &verdicts_only(&unconditional),
        )?;
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

/// The verdict (with the probability of the chosen shape) of each prompt's images, in seed order,
/// feeding the grid and the progress bar. Batches may mix prompts: the pipeline takes one prompt per
/// image.
fn judge_all<B: Backend>(
    sampler: &SeededSampler<'_, B>,
    prompts: &[String],
    seeds: &[u64],
    judge: &ToyJudge<B>,
    grid: &mut GridCollector<B>,
    bar: &Progress,
) -> Result<Vec<Vec<(Verdict, f32)>>> {
    let mut verdicts = vec![Vec::with_capacity(seeds.len()); prompts.len()];
    let conditions = Condition::texts(prompts);
    for batch in sampler.batches(&conditions, seeds, Some(judge))? {
        let batch = batch?;
        for (i, (job, judgement)) in batch.jobs.iter().zip(&batch.judgements).enumerate() {
            verdicts[job.prompt].push((Verdict::of(judgement)?, judgement.labels[0].score));
            grid.offer(&prompts[job.prompt], job.seed, || batch.images.clone().narrow(0, i, 1));
        }
        bar.inc(batch.jobs.len() as u64);
    }
    Ok(verdicts)
}
