//! `duo-train`: the command line over the `duo_train` library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use duo_core::Result;
use duo_core::device::{DeviceChoice, FloatType};
use duo_train::{erase, export, pairs, pretrain, sample, train, unlearn};

#[derive(Parser, Debug)]
#[command(
    name = "duo-train",
    version,
    about = "Direct Unlearning Optimization for text-to-image diffusion models"
)]
struct Cli {
    /// Device to run on: cpu, ndarray, wgpu[:N], vulkan[:N], cuda[:N], torch-cpu, torch-cuda[:N] (default:
    /// the best compiled in).
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
    /// The published erasure methods beside DUO, on the same config: ESD-x, ESD-u (fine-tuning), UCE
    /// and RECE (closed-form edits); writes a LoRA or a model folder that `duo-bench eval` takes.
    Erase(erase::EraseArgs),
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
        Command::Erase(args) => erase::run(args, device, float),
    }
}

fn main() -> ExitCode {
    duo_core::device::keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
