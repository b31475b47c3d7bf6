//! `duo-train`: sampling, pretraining the toy model, pair generation, the DUO learner and LoRA export.

// serde_json's `json!` recurses once per key: diffusers' UNet config has 50.
#![recursion_limit = "256"]

mod pairs;
mod pretrain;
mod sample;

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
    /// Generate images: text-to-image, or image-to-image (SDEdit) with --init-image.
    Sample(sample::SampleArgs),
    /// Make SDEdit preference pairs (unsafe image, safe twin) for DUO, filtered by a concept judge.
    Pairs(pairs::PairsArgs),
    /// Train the embedded toy model from scratch on the toy world and export it as a diffusers folder.
    Pretrain(pretrain::PretrainArgs),
}

fn run(cli: Cli) -> Result<()> {
    let device = match &cli.device {
        Some(d) => d.parse()?,
        None => DeviceChoice::best_available(),
    };
    let float: FloatType = cli.dtype.parse()?;
    match cli.command {
        Command::Sample(args) => sample::run(args, device, float),
        Command::Pairs(args) => pairs::run(args, device, float),
        Command::Pretrain(args) => pretrain::run(args, device, float),
    }
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
