//! `duo-bench judge-train`: retrains the toy-world concept judge with the recipe that produced the
//! shipped `models/judge` (`configs/judge.toml`, the single source of its settings, read by the shared
//! run-config loader with `--set` overrides), measures it on held-out renders (clean, with the
//! training augmentation, and with the harsher stress one) and writes `config.json`,
//! `model.safetensors` and `metrics.json` (with the effective config) into `--out`.
//!
//! This is the only way the judge is retrained; the integration tests only read what it wrote.

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
use duo_core::run_config::RunConfig;
use duo_core::{DuoError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// The accuracies and the full settings of the run, beside the weights.
pub const METRICS_FILE: &str = "metrics.json";

/// Files this command writes; any of them in `--out` means a judge is already there.
const JUDGE_FILES: [&str; 3] = [CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE];

#[derive(Args, Debug, Clone)]
pub struct JudgeTrainArgs {
    /// Folder for config.json, model.safetensors and metrics.json (created if missing).
    #[arg(long, default_value = "models/judge")]
    pub out: PathBuf,
    /// Replace the judge already in --out. Only the three files above are replaced; anything else
    /// there (the shipped judge's README) is kept.
    #[arg(long)]
    pub force: bool,
    /// The recipe (TOML): model sizes, training and evaluation worlds, augmentations, steps, rates, seeds.
    #[arg(long, default_value = "configs/judge.toml")]
    pub config: PathBuf,
    /// Override a recipe key: KEY=VALUE with a dotted key (repeatable), e.g. --set steps=5
    /// --set model.channels=[8,16].
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
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
    let cfg = JudgeTrainConfig::load(&args.config, &args.set)?;
    // Refused before training, not after minutes of it; checked again before writing.
    check_out(&args.out, args.force)?;
    dispatch(device, float, JudgeTrainTask { args, cfg, device })
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

    fn settings(flags: &[&str]) -> Result<JudgeTrainConfig> {
        let argv = std::iter::once("judge-train").chain(flags.iter().copied());
        let args = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{flags:?}: {e}")).args;
        let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(&args.config);
        JudgeTrainConfig::load(&config, &args.set)
    }

    #[test]
    fn the_recipe_loads_and_sets_override_it() {
        let recipe = settings(&[]).unwrap();
        assert_eq!((recipe.steps, recipe.seed, recipe.eval_seed, recipe.n_eval), (600, 101, 202, 3000));
        assert_eq!(recipe.model.channels, vec![16, 32, 64, 96]);
        let cfg =
            settings(&["--set", "steps=7", "--set", "model.channels=[8, 16]", "--set", "seed=5"]).unwrap();
        assert_eq!((cfg.steps, cfg.seed, cfg.model.channels.clone()), (7, 5, vec![8, 16]));
        assert_eq!(cfg.eval_seed, recipe.eval_seed);
    }

    #[test]
    fn bad_settings_are_named() {
        let err = |flags: &[&str]| settings(flags).unwrap_err().to_string();
        assert!(err(&["--set", "seed=202"]).contains("held out"));
        assert!(err(&["--set", "weight_decay=-1"]).contains("weight_decay -1"));
        assert!(err(&["--set", "learning_rate=-0.1"]).contains("learning_rate -0.1"));
        let groups = err(&["--set", "model.channels=[12]", "--set", "model.norm_groups=8"]);
        assert!(groups.contains("does not divide"), "{groups}");
        assert!(err(&["--set", "model.chanels=[12]"]).contains("unknown key `model.chanels`"));
        for out in [".", "..", "/"] {
            let err = check_out(Path::new(out), true).unwrap_err().to_string();
            assert!(err.contains("does not end in a folder name"), "{out}: {err}");
        }
    }
}
