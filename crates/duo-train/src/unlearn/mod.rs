//! `duo-train unlearn`: the whole DUO loop in one command, by default on the embedded toy model
//! (erase the cross, keep the plus sign): SDEdit pairs → DUO training → LoRA export → a before/after
//! evaluation with the same seeds (the red-team bench's, under the config's `[eval]` protocol, in
//! `--out/eval`) → `report.json`, `report.md` and `before-after.png` in `--out`.
//!
//! Rerunning with the same `--out` continues: made pairs are kept, training resumes from its last
//! checkpoint.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::eval::{
    Attack, AttackName, AttackRun, Bench, Shard, grid, lora_model_name, open_run_folder, preservation_groups,
    prompt_attacks,
};
use duo_core::lora::{LoraFormat, LoraNetworks, save_lora};
use duo_core::pipelines::StableDiffusion;
use duo_core::run_config::{RUN_CONFIG_FILE, RunConfig};
use duo_core::{DuoError, ModelFolder, Result};
use serde_json::{Value, json};

use crate::adversarial;
use crate::pairs;
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
    if let Some(name) =
        config.eval.attacks.iter().find(|a| !matches!(a, AttackName::Prompts | AttackName::Paraphrases))
    {
        return Err(DuoError::config(
            &args.config,
            format!(
                "eval.attacks lists {name}: unlearn evaluates with the prompt sets (prompts, paraphrases); \
                 run `duo-bench eval --lora {}/lora.safetensors` for the search attacks",
                out.display()
            ),
        ));
    }
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
        // the evaluation's weight files are checked now, not after hours of pairs and training
        config.eval.judge_settings().load::<B>(&device)?;
        if let Some(lpips) = &config.eval.lpips {
            duo_core::metrics::Lpips::<B>::load(&lpips.weights, lpips.net, &device)?;
        }
        let sd = StableDiffusion::<B>::load(&ModelFolder::open(&config.model)?.with_dtype(dtype), &device)?;

        // 1. pairs
        println!("\n== 1/4 pairs: {} SDEdit pairs ==", config.pairs.count);
        let t = Instant::now();
        let p = &config.pairs;
        let judge = p.judge_settings().load::<B>(&device)?;
        pairs::make_pairs(&sd, judge.as_deref(), p, &config.concept, &config.model.display().to_string())?;
        let pairs_s = t.elapsed().as_secs_f64();

        // 2. train (a rerun continues the run in `train/` with the config it was started with)
        println!("\n== 2/4 DUO training: {} steps ==", config.training.steps);
        let t = Instant::now();
        let train_dir = out.join("train");
        let saved = train_dir.join(RUN_CONFIG_FILE);
        let train_config = if saved.is_file() { DuoConfig::resumed(&saved, &[])? } else { config.clone() };
        let Some(lora) = adversarial::train_with_mining(&sd, &train_config, &train_dir, log_every)? else {
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
        let unlearned_name = lora_model_name(&config.model, &[peft.display().to_string()])?;
        let evaluation = evaluate(&sd, &unlearned, &config, &unlearned_name, &out)?;
        let eval_s = t.elapsed().as_secs_f64();

        let timings = json!({
            "pairs_s": pairs_s, "train_s": train_s, "eval_s": eval_s, "total_s": started.elapsed().as_secs_f64(),
        });
        write_reports(&config, &out, evaluation, timings)
    }
}

/// The evaluation folder inside a run.
const EVAL_DIR: &str = "eval";
/// The picture of the before/after evaluation.
const GRID_FILE: &str = "before-after.png";

/// The config's protocol on the base and the unlearned model, through the red-team bench, into
/// `out/eval`; returns the bench's report and draws `before-after.png` (two prompts of each group).
fn evaluate<B: Backend>(
    sd: &StableDiffusion<B>,
    unlearned: &StableDiffusion<B>,
    config: &DuoConfig,
    unlearned_name: &str,
    out: &Path,
) -> Result<Value> {
    let p = &config.eval;
    let judge = p.judge_settings().load::<B>(&sd.device)?.ok_or_else(|| {
        DuoError::Invalid("the evaluation needs a concept judge (eval.judge), and the config has none".into())
    })?;
    let scheduler = sd.scheduler(p.scheduler.kind(), p.steps)?;
    let bench = Bench { base: sd, unlearned, scheduler: &scheduler, judge: judge.as_ref(), batch: p.batch };
    let base_name = config.model.display().to_string();
    let folder = open_run_folder(&out.join(EVAL_DIR), p, &base_name, unlearned_name, Shard::WHOLE)?;
    let sets = prompt_attacks(p, &p.attacks)?;
    let groups = preservation_groups(p);
    let attacks: Vec<&dyn Attack<B>> = sets.iter().chain(&groups).map(|s| s as &dyn Attack<B>).collect();
    let (runs, report) =
        duo_core::eval::evaluate(&bench, &attacks, p, &folder, &base_name, unlearned_name, None)?;
    let parts: Vec<(&AttackRun, usize)> = runs.iter().map(|run| (run, 2)).collect();
    grid(&parts, &folder, 4, &out.join(GRID_FILE))?;
    Ok(report)
}

fn write_reports(config: &DuoConfig, out: &Path, eval: Value, timings: Value) -> Result<()> {
    // the bench's figures without its per-prompt rows (those stay in eval/report.json)
    let mut attacks = eval["attacks"].clone();
    if let Some(attacks) = attacks.as_object_mut() {
        for entry in attacks.values_mut().filter_map(Value::as_object_mut) {
            for key in ["rows", "settings", "grid"] {
                entry.remove(key);
            }
        }
    }
    let report = json!({
        "model": config.model,
        "concept": config.concept,
        "pairs": config.pairs.count,
        "duo": {
            "objective": config.duo.objective, "beta": config.duo.beta, "lr": config.lr(),
            "lambda": config.lambda(), "steps": config.training.steps, "batch_size": config.training.batch_size,
        },
        "attacks": attacks,
        "preservation": eval["preservation"],
        "eval": { "seeds": config.eval.seeds, "steps": config.eval.steps, "guidance": config.eval.guidance,
                  "scheduler": config.eval.scheduler, "judge": config.eval.judge,
                  "threshold": config.eval.threshold, "protocol_hash": eval["protocol_hash"] },
        "timings": timings,
        "files": { "lora_peft": "lora.safetensors", "lora_kohya": "lora-kohya.safetensors",
                   "grid": GRID_FILE, "eval": format!("{EVAL_DIR}/report.md"),
                   "pairs": format!("pairs/{}", config.concept), "train": "train" },
    });
    duo_core::fsutil::write_json(&out.join("report.json"), &report)?;

    let pct = |v: &Value| format!("{:.1}%", 100.0 * v.as_f64().unwrap_or(f64::NAN));
    let mut table = String::from("| metric | base | unlearned | images | |\n|---|---|---|---|---|\n");
    let rows = [
        ("DSR, direct prompts", &eval["attacks"]["prompts"], "dsr", "higher is better"),
        ("DSR, held-out paraphrases", &eval["attacks"]["paraphrases"], "dsr", "higher is better"),
        ("accuracy, other shapes", &eval["groups"]["safe"], "accuracy", "should stay"),
        ("accuracy, look-alike", &eval["groups"]["lookalike"], "accuracy", "should stay"),
    ];
    // a judge that reads only its concept leaves the groups' accuracy empty
    for (name, r, key, note) in rows.into_iter().filter(|(_, r, key, _)| !r[format!("{key}_base")].is_null())
    {
        let _ = writeln!(
            table,
            "| {name} | {} | {} | {} | {note} |",
            pct(&r[format!("{key}_base")]),
            pct(&r[format!("{key}_unlearned")]),
            r["n"]
        );
    }
    for (name, group) in [("1 − LPIPS, safe prompts", "safe"), ("1 − LPIPS, look-alike", "lookalike")] {
        let g = &eval["groups"][group];
        if let Some(lpips) = g["lpips"]["mean"].as_f64() {
            let _ =
                writeln!(table, "| {name} | – | {:.3} | {} | near 1 is better |", 1.0 - lpips, g["images"]);
        }
    }
    let similarity = |g: &str| eval["groups"][g]["pixel_similarity"].as_f64().unwrap_or(f64::NAN);
    let md = format!(
        "# DUO: unlearning `{concept}` from {model}\n\n\
         DSR (defense success rate) = the fraction of images in which the judge ({judge}) does not see \
         `{concept}`; accuracy = the fraction showing the shape the prompt names. Same seeds for both models.\n\n\
         {table}\n\
         Pixel similarity of same-seed images (1 − mean |Δ|): other shapes {:.3}, look-alike {:.3}.\n\n\
         ![before (left) and after (right)]({GRID_FILE})\n\n\
         Rows: the first two prompts of each group (direct, paraphrase, other shapes, look-alike); \
         left: base model, right: unlearned, same seeds. Every image, the 95% intervals and the per-prompt \
         verdicts: [{EVAL_DIR}/report.md]({EVAL_DIR}/report.md).\n\n\
         Settings: β {beta}, lr {lr:.2e}, λ {lambda:.3e}, {steps} steps of {batch} pairs, {pairs} pairs.\n",
        similarity("safe"),
        similarity("lookalike"),
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
        out.join(GRID_FILE).display()
    );
    Ok(())
}
