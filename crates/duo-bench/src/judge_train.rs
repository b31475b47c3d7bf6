//! `duo-bench judge-train`: retrains the toy-world concept judge with the recipe that produced the
//! shipped `models/judge` (`JudgeTrainConfig::default()`, the single source of its settings), measures
//! it on held-out renders (clean, with the training augmentation, and with the harsher stress one) and
//! writes `config.json`, `model.safetensors` and `metrics.json` into `--out`.
//!
//! This is the only way the judge is retrained; the integration tests only read what it wrote.

use std::fmt::Display;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::fsutil::write_atomic;
use duo_core::judge::{
    CONFIG_FILE, ConceptJudge, EvalReport, JudgeReport, JudgeTrainConfig, WEIGHTS_FILE, train_judge,
};
use duo_core::{DuoError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// The accuracies and the full settings of the run, beside the weights.
pub const METRICS_FILE: &str = "metrics.json";

/// Files this command writes; any of them in `--out` means a judge is already there.
const JUDGE_FILES: [&str; 3] = [CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE];

/// `help` text of a setting that states the shipped value, read from `JudgeTrainConfig::default()`
/// so the help cannot drift from the recipe.
fn shipped(text: &str, value: impl Display) -> String {
    format!("{text} [shipped judge: {value}]")
}

fn recipe() -> JudgeTrainConfig {
    JudgeTrainConfig::default()
}

#[derive(Args, Debug, Clone)]
pub struct JudgeTrainArgs {
    /// Folder for config.json, model.safetensors and metrics.json (created if missing).
    #[arg(long, default_value = "models/judge")]
    pub out: PathBuf,
    /// Replace the judge already in --out. Only the three files above are replaced; anything else
    /// there (the shipped judge's README) is kept.
    #[arg(long)]
    pub force: bool,
    /// A JSON `JudgeTrainConfig` (every field) to start from instead of the shipped recipe; the
    /// "config" object of a metrics.json is accepted, so `--config DIR/metrics.json` repeats that run.
    /// The setting flags below override it. The training/evaluation worlds and the augmentations are
    /// set here only.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(
        long,
        help = shipped(
            "Seeds the training scenes, their augmentation and the initial weights",
            recipe().seed
        )
    )]
    pub seed: Option<u64>,
    #[arg(
        long,
        help = shipped("Seeds the held-out evaluation renders; must differ from --seed", recipe().eval_seed)
    )]
    pub eval_seed: Option<u64>,
    #[arg(long, help = shipped("Training steps (a fresh batch of renders each)", recipe().steps))]
    pub steps: Option<usize>,
    #[arg(long, help = shipped("Renders per training step", recipe().batch_size))]
    pub batch_size: Option<usize>,
    // Negative numbers parse, so that the range check below names the value rather than clap
    // calling it an unknown flag.
    #[arg(
        long,
        allow_negative_numbers = true,
        help = shipped("Peak AdamW learning rate (linear warm-up, then cosine to 0)", recipe().learning_rate)
    )]
    pub learning_rate: Option<f64>,
    #[arg(long, help = shipped("Steps of linear learning-rate warm-up", recipe().warmup_steps))]
    pub warmup_steps: Option<usize>,
    #[arg(long, allow_negative_numbers = true, help = shipped("AdamW weight decay", recipe().weight_decay))]
    pub weight_decay: Option<f32>,
    #[arg(long, help = shipped("Held-out renders per evaluation (three evaluations)", recipe().n_eval))]
    pub n_eval: Option<usize>,
    #[arg(
        long,
        value_delimiter = ',',
        help = shipped("Conv channels per block, comma-separated", format!("{:?}", recipe().model.channels))
    )]
    pub channels: Option<Vec<usize>>,
    #[arg(
        long,
        help = shipped(
            "GroupNorm groups per block; must divide every channel count",
            recipe().model.norm_groups
        )
    )]
    pub norm_groups: Option<usize>,
    /// Without a terminal (no progress bar), print the loss every N steps (and at the last).
    #[arg(long, default_value_t = 50)]
    pub log_every: usize,
}

/// `metrics.json`: the clean held-out accuracies at the top (the figures to quote), then everything
/// needed to judge and repeat the run.
#[derive(Debug, Serialize)]
struct JudgeMetrics<'a> {
    shape_accuracy: f64,
    colour_accuracy: f64,
    background_accuracy: f64,
    parameters: usize,
    /// Backend and device the run used: the weights are reproducible on the same one.
    device: String,
    config: &'a JudgeTrainConfig,
    /// Training time, final loss and all three evaluations (per-shape accuracy, confusion matrix).
    report: &'a JudgeReport,
}

pub fn run(args: JudgeTrainArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    // The judge is trained and stored in f32; another dtype would silently not be what was asked.
    if float != FloatType::F32 {
        return Err(DuoError::Invalid(format!(
            "judge-train trains in f32 only; got --dtype {float:?} (drop --dtype or use f32)"
        )));
    }
    if args.log_every == 0 {
        return Err(DuoError::Invalid("--log-every must be at least 1, got 0".into()));
    }
    let cfg = settings(&args)?;
    // Refused before training, not after minutes of it; checked again before writing.
    check_out(&args.out, args.force)?;
    dispatch(device, float, JudgeTrainTask { args, cfg, device })
}

/// The recipe (shipped, or `--config`) with the flags applied, validated.
fn settings(args: &JudgeTrainArgs) -> Result<JudgeTrainConfig> {
    let mut cfg = match &args.config {
        Some(path) => read_config(path)?,
        None => JudgeTrainConfig::default(),
    };
    // Each flag given replaces that one setting; the rest stay as the recipe has them.
    macro_rules! apply {
        ($($flag:ident => $($field:ident).+),* $(,)?) => {
            $(if let Some(value) = args.$flag.clone() { cfg.$($field).+ = value; })*
        };
    }
    apply!(
        seed => seed,
        eval_seed => eval_seed,
        steps => steps,
        batch_size => batch_size,
        learning_rate => learning_rate,
        warmup_steps => warmup_steps,
        weight_decay => weight_decay,
        n_eval => n_eval,
        channels => model.channels,
        norm_groups => model.norm_groups,
    );
    // `JudgeTrainConfig::validate` leaves the weight decay to AdamW, which would take a NaN.
    if !cfg.weight_decay.is_finite() || cfg.weight_decay < 0.0 {
        return Err(DuoError::Invalid(format!(
            "weight decay {} must be a finite number ≥ 0",
            cfg.weight_decay
        )));
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Reads a `JudgeTrainConfig`, bare or as the "config" object of a metrics.json.
fn read_config(path: &Path) -> Result<JudgeTrainConfig> {
    let mut value: serde_json::Value = duo_core::error::read_json(path)?;
    if let Some(inner) = value.get_mut("config") {
        value = inner.take();
    }
    serde_json::from_value(value).map_err(|e| {
        DuoError::parse(path, format!("not a judge training config (every field of JudgeTrainConfig): {e}"))
    })
}

/// Refuses an `out` that is not a folder, or that holds a judge unless `force`.
fn check_out(out: &Path, force: bool) -> Result<()> {
    staging_dir(out)?;
    if out.exists() && !out.is_dir() {
        return Err(DuoError::Invalid(format!("--out {} exists and is not a folder", out.display())));
    }
    let present: Vec<&str> = JUDGE_FILES.into_iter().filter(|f| out.join(f).exists()).collect();
    if !present.is_empty() && !force {
        return Err(DuoError::Invalid(format!(
            "--out {} already holds a judge ({}); pass --force to replace it, or choose another --out",
            out.display(),
            present.join(", ")
        )));
    }
    Ok(())
}

struct JudgeTrainTask {
    args: JudgeTrainArgs,
    cfg: JudgeTrainConfig,
    device: DeviceChoice,
}

impl BackendTask for JudgeTrainTask {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device, _dtype: DType) -> Result<()> {
        let (args, cfg) = (&self.args, &self.cfg);
        let steps = cfg.steps;
        // The bar when a person watches; plain lines in logs and tests, where indicatif draws nothing.
        let lines = !std::io::stderr().is_terminal();
        let bar = ProgressBar::new(steps as u64).with_style(
            ProgressStyle::with_template(
                "judge-train [{bar:30}] {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
            )
            .expect("static template"),
        );
        let evaluating = format!("evaluating on 3 × {} held-out renders", cfg.n_eval);
        let (judge, report) = train_judge::<Autodiff<B>>(cfg, &device, |step, loss| {
            bar.inc(1);
            bar.set_message(format!("loss {loss:.4}"));
            let last = step + 1 == steps;
            if lines && (step % args.log_every == 0 || last) {
                println!("step {:>5}/{steps}  loss {loss:.4}", step + 1);
            }
            if last {
                bar.set_message(evaluating.clone());
                if lines {
                    println!("{evaluating}");
                }
            }
        })?;
        bar.finish_and_clear();

        let metrics = JudgeMetrics {
            shape_accuracy: report.clean.shape_accuracy,
            colour_accuracy: report.clean.colour_accuracy,
            background_accuracy: report.clean.background_accuracy,
            parameters: judge.num_params(),
            device: self.device.to_string(),
            config: cfg,
            report: &report,
        };
        let json = serde_json::to_string_pretty(&metrics)
            .map_err(|e| DuoError::Invalid(format!("serialising {METRICS_FILE}: {e}")))?;
        print_report(&report, metrics.parameters);
        // Someone may have written a judge there while this one trained.
        check_out(&args.out, args.force)?;
        save(&judge, &format!("{json}\n"), &args.out)?;
        println!("wrote {} ({}, {}, {METRICS_FILE})", args.out.display(), CONFIG_FILE, WEIGHTS_FILE);
        Ok(())
    }
}

fn print_report(report: &JudgeReport, parameters: usize) {
    // `train_judge` reports the mean loss of the last 50 steps (fewer in a shorter run).
    println!(
        "{parameters} parameters, {} steps in {:.1} s, final loss {:.4} (mean of the last {} steps)",
        report.steps,
        report.seconds,
        report.final_loss,
        report.steps.min(50)
    );
    println!(
        "held-out set (n = {:>5})   shape    colour   background   ✕ as +   + as ✕",
        report.clean.n_eval
    );
    let row = |name: &str, e: &EvalReport| {
        let pct = |x: f64| format!("{:>7.2}%", 100.0 * x);
        println!(
            "{name:<24} {} {} {}    {} {}",
            pct(e.shape_accuracy),
            pct(e.colour_accuracy),
            pct(e.background_accuracy),
            pct(e.cross_as_plus),
            pct(e.plus_as_cross)
        );
    };
    row("clean", &report.clean);
    row("training augmentation", &report.augmented);
    row("stress augmentation", &report.stress);
}

/// Writes the judge and its metrics into a staging folder beside `out`, then moves them in: a new
/// `out` is one folder rename; into an existing one each file is a rename, so a crash or a failed
/// write never leaves a half-written file, and the slow writes all happen before `out` changes.
/// The weights go first and the metrics last, so metrics.json never describes weights not there.
fn save<B: Backend>(judge: &ConceptJudge<B>, metrics: &str, out: &Path) -> Result<()> {
    let staging = staging_dir(out)?;
    if let Some(parent) = staging.parent() {
        std::fs::create_dir_all(parent).map_err(|e| DuoError::io(parent, e))?;
    }
    let result = stage_and_move(judge, metrics, out, &staging);
    // Left over only on failure (or after the per-file moves, empty); never worth an error of its own.
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// The staging folder beside `out`: in the same parent, so that moving out of it is a rename.
fn staging_dir(out: &Path) -> Result<PathBuf> {
    // `.`, `..` and `/` have no name of their own to stage beside.
    let name = out.file_name().ok_or_else(|| {
        DuoError::Invalid(format!(
            "--out {} does not end in a folder name; give one, e.g. ../judge instead of ..",
            out.display()
        ))
    })?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.judge-train-{}", name.to_string_lossy(), std::process::id())))
}

fn stage_and_move<B: Backend>(
    judge: &ConceptJudge<B>,
    metrics: &str,
    out: &Path,
    staging: &Path,
) -> Result<()> {
    if staging.exists() {
        std::fs::remove_dir_all(staging).map_err(|e| DuoError::io(staging, e))?;
    }
    std::fs::create_dir(staging).map_err(|e| DuoError::io(staging, e))?;
    judge.save(staging)?;
    write_atomic(&staging.join(METRICS_FILE), metrics.as_bytes())?;
    if !out.exists() {
        return std::fs::rename(staging, out).map_err(|e| DuoError::io(out, e));
    }
    for file in [WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE] {
        let target = out.join(file);
        std::fs::rename(staging.join(file), &target).map_err(|e| DuoError::io(&target, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: JudgeTrainArgs,
    }

    fn parse(flags: &[&str]) -> JudgeTrainArgs {
        let argv = std::iter::once("judge-train").chain(flags.iter().copied());
        Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{flags:?}: {e}")).args
    }

    #[test]
    fn no_flags_give_the_shipped_recipe_and_flags_override_it() {
        assert_eq!(settings(&parse(&[])).unwrap(), JudgeTrainConfig::default());
        let cfg = settings(&parse(&["--steps", "7", "--channels", "8,16", "--seed", "5"])).unwrap();
        assert_eq!((cfg.steps, cfg.seed, cfg.model.channels.clone()), (7, 5, vec![8, 16]));
        assert_eq!(cfg.eval_seed, JudgeTrainConfig::default().eval_seed);
    }

    #[test]
    fn bad_settings_are_named() {
        let err = settings(&parse(&["--seed", "202"])).unwrap_err().to_string();
        assert!(err.contains("held out"), "{err}");
        let err = settings(&parse(&["--weight-decay", "-1"])).unwrap_err().to_string();
        assert!(err.contains("weight decay -1"), "{err}");
        let err = settings(&parse(&["--learning-rate", "-0.1"])).unwrap_err().to_string();
        assert!(err.contains("learning_rate -0.1"), "{err}");
        let err = settings(&parse(&["--channels", "12", "--norm-groups", "8"])).unwrap_err().to_string();
        assert!(err.contains("does not divide"), "{err}");
        for out in [".", "..", "/"] {
            let err = check_out(Path::new(out), true).unwrap_err().to_string();
            assert!(err.contains("does not end in a folder name"), "{out}: {err}");
        }
    }

    #[test]
    fn a_config_file_is_read_bare_or_from_metrics() {
        let dir = std::env::temp_dir().join(format!("duo-judge-train-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = JudgeTrainConfig { steps: 9, ..Default::default() };
        let bare = dir.join("bare.json");
        std::fs::write(&bare, serde_json::to_string(&cfg).unwrap()).unwrap();
        let wrapped = dir.join("metrics.json");
        std::fs::write(&wrapped, serde_json::json!({ "shape_accuracy": 1.0, "config": cfg }).to_string())
            .unwrap();
        for path in [&bare, &wrapped] {
            let args = parse(&["--config", path.to_str().unwrap(), "--n-eval", "10"]);
            let read = settings(&args).unwrap();
            assert_eq!((read.steps, read.n_eval), (9, 10));
        }
        std::fs::write(&bare, r#"{"steps": 3}"#).unwrap();
        let err = read_config(&bare).unwrap_err().to_string();
        assert!(err.contains("bare.json") && err.contains("JudgeTrainConfig"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
