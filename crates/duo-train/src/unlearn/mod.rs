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
use duo_core::judge::ConceptJudge;
use duo_core::lora::{LoraFormat, load_lora_specs};
use duo_core::pipelines::{StableDiffusion, save_png, tensor_to_rgb8};
use duo_core::{DuoError, ModelFolder, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use self::eval::{Evaluator, Goal, Group, Judged, Rate, pixel_similarity};
use crate::export::{self, ExportArgs, ExportFormat};
use crate::pairs::{self, PairsArgs};
use crate::train::config::DuoConfig;
use crate::train::{self, TrainArgs};

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
    if config.eval.judge == "none" {
        return Err(DuoError::Invalid(format!(
            "{}: unlearn's evaluation needs a concept judge (eval.judge), and this config has none; \
             run `duo-train pairs`, `train` and `export` instead",
            args.config.display()
        )));
    }
    if !config.model.join("model_index.json").is_file() && !config.model.join("unet").is_dir() {
        return Err(DuoError::Invalid(format!(
            "{}: no model folder there. The embedded toy model is made by `duo-train pretrain` \
             (configs/toy-pretrain.toml, exported to models/toy); for another model set model=DIR",
            config.model.display()
        )));
    }
    std::fs::create_dir_all(&out).map_err(|e| DuoError::io(&out, e))?;
    println!("unlearning `{}` from {} into {}", config.concept, config.model.display(), out.display());

    // 1. pairs
    println!("\n== 1/4 pairs: {} SDEdit pairs ==", config.pairs.count);
    let t = Instant::now();
    pairs::run(pairs_args(&config), device, float)?;
    let pairs_s = t.elapsed().as_secs_f64();

    // 2. train
    println!("\n== 2/4 DUO training: {} steps ==", config.training.steps);
    let t = Instant::now();
    let train_dir = out.join("train");
    let resume = train_dir.join("config.toml").is_file();
    let trained = train::run(
        TrainArgs {
            config: args.config.clone(),
            set: if resume { Vec::new() } else { sets.clone() },
            pairs: None,
            run_dir: (!resume).then(|| train_dir.clone()),
            resume: resume.then(|| train_dir.clone()),
            log_every: args.log_every,
        },
        device,
        float,
    )?;
    let train_s = t.elapsed().as_secs_f64();
    let Some(lora) = trained else {
        println!("training stopped early; rerun the same command to continue");
        return Ok(());
    };

    // 3. export (the PEFT file is the trainer's; Kohya for A1111-style tools)
    println!("\n== 3/4 export ==");
    let peft = out.join("lora.safetensors");
    std::fs::copy(&lora, &peft).map_err(|e| DuoError::io(&peft, e))?;
    let kohya = out.join("lora-kohya.safetensors");
    println!("wrote {} (diffusers/PEFT)", peft.display());
    // through `duo-train export`, which reads the UNet's config only, not its weights
    export::run(
        ExportArgs {
            lora: vec![peft.display().to_string()],
            run: Vec::new(),
            format: ExportFormat::Lora(LoraFormat::Kohya),
            model: config.model.clone(),
            variant: None,
            save_dtype: None,
            out: kohya,
        },
        device,
        float,
    )?;

    // 4. evaluate
    println!("\n== 4/4 before/after evaluation ==");
    let t = Instant::now();
    let evaluation =
        dispatch(device, float, Evaluate { config: config.clone(), lora: peft, out: out.clone() })?;
    let eval_s = t.elapsed().as_secs_f64();

    let timings = json!({
        "pairs_s": pairs_s, "train_s": train_s, "eval_s": eval_s, "total_s": started.elapsed().as_secs_f64(),
    });
    write_reports(&config, &out, evaluation, timings)
}

fn pairs_args(config: &DuoConfig) -> PairsArgs {
    let p = &config.pairs;
    PairsArgs {
        model: config.model.clone(),
        concept: config.concept.clone(),
        unsafe_prompt: p.unsafe_prompts.clone(),
        safe_prompt: p.safe_prompts.clone(),
        pairs: p.count,
        strength: p.strength,
        steps: p.steps,
        guidance: p.guidance,
        scheduler: (p.scheduler != "default").then(|| p.scheduler.clone()),
        judge: p.judge.clone(),
        judge_shape: p.judge_shape.clone(),
        threshold: p.threshold,
        max_tries: p.max_tries,
        seed: p.seed,
        out: p.dir.clone(),
        lora: Vec::new(),
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

struct Evaluate {
    config: DuoConfig,
    lora: PathBuf,
    out: PathBuf,
}

impl BackendTask for Evaluate {
    type Output = Evaluation;

    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<Evaluation> {
        let Self { config, lora, out } = self;
        let e = &config.eval;
        let concept = crate::pairs::parse_shape(&e.judge_shape)?;
        let judge = ConceptJudge::<B>::load(Path::new(&e.judge), &device)?;
        let folder = ModelFolder::open(&config.model)?.with_dtype(dtype);
        let sd = StableDiffusion::<B>::load(&folder, &device)?;
        let scheduler = sd.scheduler((e.scheduler != "default").then_some(e.scheduler.as_str()), e.steps)?;
        let groups = [
            Group { prompts: &e.prompts, goal: Goal::Free(concept) },
            Group { prompts: &e.paraphrases, goal: Goal::Free(concept) },
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
            seeds: e.seeds,
            guidance: e.guidance,
            batch: e.batch,
            threshold: e.threshold,
        };
        let total: usize = groups.iter().map(|g| g.prompts.len() * e.seeds).sum::<usize>() * 2;
        let bar = ProgressBar::new(total as u64).with_style(
            ProgressStyle::with_template(
                "eval [{bar:30}] {pos}/{len} images (base and unlearned model) {elapsed_precise}",
            )
            .expect("static template"),
        );
        let mut unlearned_sd = sd.clone();
        unlearned_sd.unet = load_lora_specs(sd.unet.clone(), &[lora.display().to_string()])?;
        // The two models on two threads: small sampling batches keep a CPU backend on about one core.
        let run = |sd: &StableDiffusion<B>| -> Result<Vec<Judged<B>>> {
            groups.iter().map(|g| evaluator.run(sd, g, &bar)).collect()
        };
        let (base, unlearned) = std::thread::scope(|scope| {
            let base = scope.spawn(|| run(&sd));
            let unlearned = run(&unlearned_sd);
            (base.join().expect("the base model's evaluation panicked"), unlearned)
        });
        let (base, unlearned) = (base?, unlearned?);
        bar.finish_and_clear();

        let rate = |i: usize| -> Result<Rate> {
            Ok(Rate {
                base: evaluator.success_rate(&groups[i], &base[i])?,
                unlearned: evaluator.success_rate(&groups[i], &unlearned[i])?,
                n: base[i].verdicts.len(),
            })
        };
        let grid = out.join("before-after.png");
        before_after_grid(&groups, &base, &unlearned, e.seeds, &grid)?;
        Ok(Evaluation {
            prompts: rate(0)?,
            paraphrases: rate(1)?,
            safe: rate(2)?,
            lookalike: rate(3)?,
            safe_similarity: pixel_similarity(&base[2].images, &unlearned[2].images),
            lookalike_similarity: pixel_similarity(&base[3].images, &unlearned[3].images),
            grid,
        })
    }
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
    save_png(&canvas, path)
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
        judge = config.eval.judge,
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
