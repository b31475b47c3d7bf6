//! `duo-train`: sampling, pretraining the toy model, pair generation, the DUO learner and LoRA export.

// serde_json's `json!` recurses once per key: diffusers' UNet config has 50.
#![recursion_limit = "256"]

mod export;
mod learning;
mod pairs;
mod pretrain;
mod sample;
mod train;
mod unlearn;

use std::path::PathBuf;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use duo_core::Result;
use duo_core::device::{DeviceChoice, FloatType};

#[derive(Parser, Debug)]
#[command(
    name = "duo-train",
    version,
    about = "Direct Unlearning Optimization for text-to-image diffusion models"
)]
struct Cli {
    /// Device to run on: cpu, ndarray, wgpu[:N], vulkan[:N], cuda[:N] (default: the best compiled in).
    #[arg(long, global = true)]
    device: Option<String>,
    /// Float type of weights and activations: f32, f16, bf16 (where the device supports it).
    #[arg(long, global = true, default_value = "f32")]
    dtype: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The whole DUO loop on the embedded toy model (or --config): pairs → train → export →
    /// before/after evaluation, with a report.
    Unlearn(unlearn::UnlearnArgs),
    /// Generate images: text-to-image, or image-to-image (SDEdit) with --init-image.
    Sample(sample::SampleArgs),
    /// Make SDEdit preference pairs (unsafe image, safe twin) for DUO, filtered by a concept judge.
    Pairs(pairs::PairsArgs),
    /// Train the embedded toy model from scratch on the toy world and export it as a diffusers folder.
    Pretrain(pretrain::PretrainArgs),
    /// Train a DUO LoRA on a pair folder (the learner: DPO on the pairs + output preservation).
    Train(train::TrainArgs),
    /// Convert a trained LoRA (or several, summed) to a diffusers/PEFT or Kohya LoRA file, or merge it
    /// into the base UNet.
    Export(export::ExportArgs),
}

fn run(cli: Cli) -> Result<()> {
    let device = match &cli.device {
        Some(d) => d.parse()?,
        None => DeviceChoice::best_available(),
    };
    let float: FloatType = cli.dtype.parse()?;
    match cli.command {
        Command::Unlearn(args) => unlearn::run(args, device, float),
        Command::Sample(args) => sample::run(args, device, float),
        Command::Pairs(args) => pairs::run(args, device, float),
        Command::Pretrain(args) => pretrain::run(args, device, float),
        Command::Train(args) => train::run(args, device, float).map(|_| ()),
        Command::Export(args) => export::run(args, device, float),
    }
}

/// `runs/<kind>-YYYYMMDD-HHMMSS` (UTC).
pub fn run_dir_name(kind: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    PathBuf::from("runs").join(format!(
        "{kind}-{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    ))
}

/// `run_dir`, or `runs/<kind>-<UTC time>`, refused when it already holds a run (one with a
/// config.toml): that is for `--resume`.
pub fn new_run_dir(run_dir: Option<PathBuf>, kind: &str) -> Result<PathBuf> {
    let dir = run_dir.unwrap_or_else(|| run_dir_name(kind));
    if dir.join("config.toml").exists() {
        return Err(duo_core::DuoError::Invalid(format!(
            "{} already holds a run: continue it with --resume {0}, or pick another --run-dir",
            dir.display()
        )));
    }
    Ok(dir)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
