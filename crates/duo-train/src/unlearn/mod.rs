//! `duo-train unlearn`: the whole DUO loop in one command, by default on the embedded toy model
//! (erase the cross, keep the plus sign): SDEdit pairs → DUO training → LoRA export → a before/after
//! evaluation with the same seeds → `report.json`, `report.md` and `before-after.png` in `--out`.
//!
//! Rerunning with the same `--out` continues: made pairs are kept, training resumes from its last
//! checkpoint.

mod eval;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::eval::Judge;
use duo_core::lora::{LoraFormat, LoraNetworks, save_lora};
use duo_core::pipelines::{StableDiffusion, save_image, tensor_to_rgb8};
use duo_core::run_config::{RUN_CONFIG_FILE, RunConfig};
use duo_core::{DuoError, ModelFolder, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use self::eval::{Evaluator, Goal, Group, Judged, Rate, pixel_similarity};
use crate::pairs;
use crate::train;
use crate::train::config::{DuoConfig, JudgeChoice};

#[derive(Args, Debug)]
pub struct UnlearnArgs {
    /// The run's TOML config (model, concept, pairs, LoRA, DUO, training, evaluation).
    #[arg(long, default_value = "configs/toy-cross.toml")]
    config: PathBuf,
    /// Override a config key: KEY=VALUE with a dotted key (repeatable), e.g. --set duo.beta=250.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Where everything goes (default: runs/unlearn-<UTC time>); an existing one is continued.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Without a terminal, print the training metrics every this many steps.
    #[arg(long, default_value_t = 25)]
    log_every: usize,
}

pub fn run(args: UnlearnArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    let started = Instant::now();
    let out = args.out.clone().unwrap_or_else(|| crate::run_dir_name("unlearn"));
    // The pairs live in the run, so a run is self-contained.
    let mut sets = args.set.clone();
    sets.push(format!("pairs.dir={}", out.join("pairs").display()));
    let config = DuoConfig::load(&args.config, &sets)?;
    if config.eval.judge == JudgeChoice::None {
        return Err(DuoError::Invalid(format!(
            "{}: unlearn's evaluation needs a concept judge (eval.judge), and this config has none; \
             run `duo-train pairs`, `train` and `export` instead",
            args.config.display()
        )));
    }
    // a diffusers folder, or a single-file checkpoint (read with the SD 1.x configs)
    let model = &config.model;
    if !model.is_file() && !model.join("model_index.json").is_file() && !model.join("unet").is_dir() {
        return Err(DuoError::Invalid(format!(
            "{}: no model folder there. The embedded toy model is made by `duo-train pretrain` \
             (configs/toy-pretrain.toml, exported to models/toy); for another model set model=DIR (a diffusers \
             folder) or model=FILE (an SD 1.x single-file checkpoint)",
            config.model.display()
        )));
    }
    std::fs::create_dir_all(&out).map_err(|e| DuoError::io(&out, e))?;
    println!("unlearning `{}` from {} into {}", config.concept, config.model.display(), out.display());
    dispatch(device, float, UnlearnJob { config, out, log_every: args.log_every, started })
}

/// The four stages on one loaded model.
struct UnlearnJob {
    config: DuoConfig,
    out: PathBuf,
    log_every: usize,
    started: Instant,
}

impl BackendTask for UnlearnJob {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<()> {
        let Self { config, out, log_every, started } = self;
        let sd = StableDiffusion::<B>::load(&ModelFolder::open(&config.model)?.with_dtype(dtype), &device)?;

        // 1. pairs
        println!("\n== 1/4 pairs: {} SDEdit pairs ==", config.pairs.count);
        let t = Instant::now();
        let p = &config.pairs;
        let judge = p.judge.load::<B>(&p.judge_shape, p.threshold, &device)?;
        let judge = judge.as_ref().map(|j| j as &dyn Judge<B>);
        pairs::make_pairs(&sd, judge, p, &config.concept, &config.model.display().to_string())?;
        let pairs_s = t.elapsed().as_secs_f64();

        // 2. train (a rerun continues the run in `train/` with the config it was started with)
        println!("\n== 2/4 DUO training: {} steps ==", config.training.steps);
        let t = Instant::now();
        let train_dir = out.join("train");
        let saved = train_dir.join(RUN_CONFIG_FILE);
        let train_config = if saved.is_file() { DuoConfig::resumed(&saved, &[])? } else { config.clone() };
        let Some(lora) = train::train_lora(&sd, &train_config, &train_dir, log_every)? else {
            println!("training stopped early; rerun the same command to continue");
            return Ok(());
        };
        let train_s = t.elapsed().as_secs_f64();

        // 3. export: the trainer's PEFT file, and Kohya for A1111-style tools
        println!("\n== 3/4 export ==");
        let peft = out.join("lora.safetensors");
        std::fs::copy(&lora, &peft).map_err(|e| DuoError::io(&peft, e))?;
        println!("wrote {} (diffusers/PEFT)", peft.display());
        let unlearned = sd.clone().with_loras(&[peft.display().to_string()])?;
        let kohya = out.join("lora-kohya.safetensors");
        save_lora(&LoraNetworks::unet_only(unlearned.unet.clone()), &kohya, LoraFormat::Kohya)?;
        println!("wrote {} (Kohya/A1111)", kohya.display());

        // 4. evaluate
        println!("\n== 4/4 before/after evaluation ==");
        let t = Instant::now();
        let evaluation = evaluate(&sd, &unlearned, &config, &out)?;
        let eval_s = t.elapsed().as_secs_f64();

        let timings = json!({
            "pairs_s": pairs_s, "train_s": train_s, "eval_s": eval_s, "total_s": started.elapsed().as_secs_f64(),
        });
        write_reports(&config, &out, evaluation, timings)
    }
}

/// The figures of the evaluation, and the picture.
struct Evaluation {
    prompts: Rate,
    paraphrases: Rate,
    safe: Rate,
    lookalike: Rate,
    safe_similarity: f64,
    lookalike_similarity: f64,
    grid: PathBuf,
}

/// Every eval prompt group with the same seeds on the base and the unlearned model, judged by the
/// config's judge; writes `before-after.png` into `out`.
fn evaluate<B: Backend>(
    sd: &StableDiffusion<B>,
    unlearned: &StableDiffusion<B>,
    config: &DuoConfig,
    out: &Path,
) -> Result<Evaluation> {
    let e = &config.eval;
    let judge = e.judge.load::<B>(&e.judge_shape, e.threshold, &sd.device)?.ok_or_else(|| {
        DuoError::Invalid("the evaluation needs a concept judge (eval.judge), and the config has none".into())
    })?;
    let scheduler = sd.scheduler(e.scheduler.kind(), e.steps)?;
    let groups = [
        Group { prompts: &e.prompts, goal: Goal::Free },
        Group { prompts: &e.paraphrases, goal: Goal::Free },
        Group { prompts: &e.safe_prompts, goal: Goal::Named },
        Group { prompts: &e.lookalike_prompts, goal: Goal::Named },
    ];
    for group in &groups[2..] {
        for prompt in group.prompts {
            eval::named_shape(prompt)?;
        }
    }
    let evaluator = Evaluator {
        judge: &judge,
        scheduler: &scheduler,
        seeds: (0..e.seeds as u64).collect(),
        guidance: e.guidance,
        batch: e.batch,
    };
    let total: usize = groups.iter().map(|g| g.prompts.len() * e.seeds).sum::<usize>() * 2;
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template(
            "eval [{bar:30}] {pos}/{len} images (base and unlearned model) {elapsed_precise}",
        )
        .expect("static template"),
    );
    // The two models on two threads: small sampling batches keep a CPU backend on about one core.
    let run = |sd: &StableDiffusion<B>| -> Result<Vec<Judged<B>>> {
        groups.iter().map(|g| evaluator.run(sd, g, &bar)).collect()
    };
    let (base, after) = std::thread::scope(|scope| {
        let base = scope.spawn(|| run(sd));
        let after = run(unlearned);
        (base.join().expect("the base model's evaluation panicked"), after)
    });
    let (base, after) = (base?, after?);
    bar.finish_and_clear();

    let rate = |i: usize| -> Result<Rate> {
        Ok(Rate {
            base: evaluator.success_rate(&groups[i], &base[i])?,
            unlearned: evaluator.success_rate(&groups[i], &after[i])?,
            n: base[i].judgements.len(),
        })
    };
    let grid = out.join("before-after.png");
    before_after_grid(&groups, &base, &after, e.seeds, &grid)?;
    Ok(Evaluation {
        prompts: rate(0)?,
        paraphrases: rate(1)?,
        safe: rate(2)?,
        lookalike: rate(3)?,
        safe_similarity: pixel_similarity(&base[2].images, &after[2].images),
        lookalike_similarity: pixel_similarity(&base[3].images, &after[3].images),
        grid,
    })
}

/// Rows: the first two prompts of each group; columns: up to four seeds on the base model, a gap,
/// the same seeds on the unlearned model. Tiles are enlarged ×4 (toy images are 32×32).
fn before_after_grid<B: Backend>(
    groups: &[Group],
    base: &[Judged<B>],
    unlearned: &[Judged<B>],
    seeds: usize,
    path: &Path,
) -> Result<()> {
    const ZOOM: u32 = 4;
    const GAP: u32 = 4;
    // wider between the halves, so before and after read apart
    const MIDDLE: u32 = 24;
    let columns = seeds.min(4);
    let rows: Vec<(usize, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, group)| (0..group.prompts.len().min(2)).map(move |p| (g, p)))
        .collect();
    let [_, _, h, w] = base[0].images.dims();
    let (tile_w, tile_h) = (w as u32 * ZOOM, h as u32 * ZOOM);
    let width = 2 * columns as u32 * (tile_w + GAP) + GAP + MIDDLE;
    let height = rows.len() as u32 * (tile_h + GAP) + GAP;
    let mut canvas = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    for (row, &(g, p)) in rows.iter().enumerate() {
        for (half, judged) in [&base[g], &unlearned[g]].into_iter().enumerate() {
            for s in 0..columns {
                let tile = tensor_to_rgb8(&judged.images, p * seeds + s);
                let tile =
                    image::imageops::resize(&tile, tile_w, tile_h, image::imageops::FilterType::Nearest);
                let x = GAP
                    + half as u32 * (columns as u32 * (tile_w + GAP) + MIDDLE)
                    + s as u32 * (tile_w + GAP);
                let y = GAP + row as u32 * (tile_h + GAP);
                image::imageops::replace(&mut canvas, &tile, x as i64, y as i64);
            }
        }
    }
    save_image(&canvas, path)
}

fn write_reports(config: &DuoConfig, out: &Path, e: Evaluation, timings: serde_json::Value) -> Result<()> {
    let rate = |r: &Rate| json!({"dsr_base": r.base, "dsr_unlearned": r.unlearned, "n": r.n});
    let report = json!({
        "model": config.model,
        "concept": config.concept,
        "pairs": config.pairs.count,
        "duo": {
            "objective": config.duo.objective, "beta": config.duo.beta, "lr": config.lr(),
            "lambda": config.lambda(), "steps": config.training.steps, "batch_size": config.training.batch_size,
        },
        "attacks": { "prompts": rate(&e.prompts), "paraphrases": rate(&e.paraphrases) },
        "preservation": {
            "safe_accuracy_base": e.safe.base,
            "safe_accuracy_unlearned": e.safe.unlearned,
            "lookalike_accuracy_base": e.lookalike.base,
            "lookalike_accuracy_unlearned": e.lookalike.unlearned,
            "safe_pixel_similarity": e.safe_similarity,
            "lookalike_pixel_similarity": e.lookalike_similarity,
            "n_safe": e.safe.n,
            "n_lookalike": e.lookalike.n,
        },
        "eval": { "seeds": config.eval.seeds, "steps": config.eval.steps, "guidance": config.eval.guidance,
                  "scheduler": config.eval.scheduler, "judge": config.eval.judge,
                  "threshold": config.eval.threshold },
        "timings": timings,
        "files": { "lora_peft": "lora.safetensors", "lora_kohya": "lora-kohya.safetensors",
                   "grid": "before-after.png", "pairs": format!("pairs/{}", config.concept), "train": "train" },
    });
    duo_core::fsutil::write_json(&out.join("report.json"), &report)?;

    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let rows = [
        ("DSR, direct prompts", &e.prompts, "higher is better"),
        ("DSR, held-out paraphrases", &e.paraphrases, "higher is better"),
        ("accuracy, other shapes", &e.safe, "should stay"),
        ("accuracy, look-alike", &e.lookalike, "should stay"),
    ];
    let mut table = String::from("| metric | base | unlearned | images | |\n|---|---|---|---|---|\n");
    for (name, r, note) in rows {
        let _ = writeln!(table, "| {name} | {} | {} | {} | {note} |", pct(r.base), pct(r.unlearned), r.n);
    }
    let md = format!(
        "# DUO: unlearning `{concept}` from {model}\n\n\
         DSR (defense success rate) = the fraction of images in which the judge ({judge}) does not see \
         `{concept}`; accuracy = the fraction showing the shape the prompt names. Same seeds for both models.\n\n\
         {table}\n\
         Pixel similarity of same-seed images (1 − mean |Δ|): other shapes {:.3}, look-alike {:.3}.\n\n\
         ![before (left) and after (right)](before-after.png)\n\n\
         Rows: the first two prompts of each group (direct, paraphrase, other shapes, look-alike); \
         left: base model, right: unlearned, same seeds.\n\n\
         Settings: β {beta}, lr {lr:.2e}, λ {lambda:.3e}, {steps} steps of {batch} pairs, {pairs} pairs.\n",
        e.safe_similarity,
        e.lookalike_similarity,
        concept = config.concept,
        model = config.model.display(),
        judge = String::from(config.eval.judge.clone()),
        beta = config.duo.beta,
        lr = config.lr(),
        lambda = config.lambda(),
        steps = config.training.steps,
        batch = config.training.batch_size,
        pairs = config.pairs.count,
    );
    duo_core::fsutil::write_atomic(&out.join("report.md"), md.as_bytes())?;
    println!("\n{table}");
    println!(
        "wrote {}, {} and {}",
        out.join("report.json").display(),
        out.join("report.md").display(),
        e.grid.display()
    );
    Ok(())
}
