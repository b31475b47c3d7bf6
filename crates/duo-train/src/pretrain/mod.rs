//! `duo-train pretrain`: trains the embedded toy text-to-image model from scratch on the toy world and
//! exports it as a diffusers folder (`models/toy`).
//!
//! 1. The VAE (32×32×3 → 8×8×4) alone, then its `scaling_factor` (`vae.rs`).
//! 2. The CLIP text encoder and the UNet together on the frozen VAE's latents, with an EMA (`diffusion.rs`).
//! 3. Export of the EMA weights (f16) and the configs, then a sample grid from the exported folder
//!    through our own pipeline (`export.rs`).
//!
//! A run lives in a directory (`runs/pretrain-<UTC time>` by default) holding the effective config,
//! each stage's burn-train directory (checkpoints, metric logs) and `experiment.log`. `--resume DIR`
//! continues it from the latest checkpoints; a finished stage is loaded, not retrained.

pub(crate) mod config;
mod data;
mod diffusion;
mod export;
mod vae;

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::module::Module;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{ApplicationLoggerInstaller, FileApplicationLoggerInstaller};
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::run_config::{RUN_CONFIG_FILE, RunConfig};
use duo_core::world::World;
use duo_core::{DuoError, Result};

use crate::learning::StopControl;
use config::PretrainConfig;
use export::{ModelConfigs, Trained};

#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// The run's TOML config.
    #[arg(long, default_value = "configs/toy-pretrain.toml", conflicts_with = "resume")]
    config: PathBuf,
    /// Override a config key: section.key=value (repeatable), e.g. diffusion_training.steps=500.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// The exported model folder (the config's `out`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The run directory (default: runs/pretrain-<UTC time>).
    #[arg(long, conflicts_with = "resume")]
    run_dir: Option<PathBuf>,
    /// Continue the run in this directory from its latest checkpoints, with its saved config
    /// (plus --set, except for the keys that fix the model).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Without a terminal, print the metrics every this many steps.
    #[arg(long, default_value_t = 50)]
    log_every: usize,
    /// With --resume: export the EMA weights of the latest diffusion checkpoint to --out and draw
    /// the sample grid, without training (to look at a run that goes on elsewhere).
    #[arg(long, requires = "resume")]
    snapshot: bool,
}

/// What both stages read.
pub struct Run<V: Backend> {
    pub config: PretrainConfig,
    pub configs: ModelConfigs,
    pub world: World,
    pub dir: PathBuf,
    pub device: V::Device,
    pub control: StopControl,
    pub log_every: usize,
}

pub fn run(args: PretrainArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    if float != FloatType::F32 {
        return Err(DuoError::Invalid(
            "pretrain trains in f32 (Burn 0.21 has no mixed precision); drop --dtype".into(),
        ));
    }
    let mut sets = args.set.clone();
    if let Some(out) = &args.out {
        sets.push(format!("out={}", out.display()));
    }
    let (config, dir) = match &args.resume {
        Some(dir) => (PretrainConfig::resumed(&dir.join(RUN_CONFIG_FILE), &sets)?, dir.clone()),
        None => (
            PretrainConfig::load(&args.config, &sets)?,
            crate::new_run_dir(args.run_dir.clone(), "pretrain")?,
        ),
    };
    // The model sizes are checked by building their diffusers configs; a new run directory is only
    // kept when they pass.
    let fresh = !dir.exists();
    let configs = ModelConfigs::write(&config, &dir.join("model-configs")).inspect_err(|_| {
        if fresh {
            let _ = std::fs::remove_dir_all(&dir);
        }
    })?;
    config.save_to_run(&dir)?;
    // One log for both stages: burn-train would install one per launch and refuse the second.
    FileApplicationLoggerInstaller::new(dir.join("experiment.log"))
        .install()
        .map_err(|e| DuoError::Invalid(format!("{}: {e}", dir.join("experiment.log").display())))?;
    println!("run directory: {}", dir.display());
    let task = PretrainTask { config, configs, dir, log_every: args.log_every, snapshot: args.snapshot };
    dispatch(device, float, task)
}

struct PretrainTask {
    config: PretrainConfig,
    configs: ModelConfigs,
    dir: PathBuf,
    log_every: usize,
    snapshot: bool,
}

impl BackendTask for PretrainTask {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device, _dtype: DType) -> Result<()> {
        train::<Autodiff<B>>(self, device)
    }
}

fn train<B: AutodiffBackend>(task: PretrainTask, device: B::Device) -> Result<()> {
    let PretrainTask { config, configs, dir, log_every, snapshot } = task;
    let run = Run::<B::InnerBackend> {
        world: World::new(config.world.world_config())?,
        configs,
        config,
        dir,
        device,
        control: StopControl::install()?,
        log_every,
    };
    describe_sizes(&run);

    if snapshot && !vae::is_complete::<B>(&run) {
        return Err(DuoError::Invalid(format!(
            "{}: the VAE stage has not finished, so there is no diffusion checkpoint to export yet",
            run.dir.display()
        )));
    }
    // 1. VAE
    let Some(vae) = vae::train::<B>(&run)? else { return stopped(&run.dir) };
    // 2. text encoder + UNet
    let ema = if snapshot {
        diffusion::latest_ema::<B>(&run)?
    } else {
        let Some(ema) = diffusion::train::<B>(&run, vae.clone())? else { return stopped(&run.dir) };
        ema
    };
    // 3. export, then look at it
    export::export(&run.config, Trained { vae: &vae, text_encoder: &ema.text_encoder, unet: &ema.unet })?;
    let size = export::folder_size(&run.config.out)?;
    println!("exported {} ({:.1} MB)", run.config.out.display(), size as f64 / 1e6);
    let png = run.dir.join(if snapshot { "samples-snapshot.png" } else { "samples.png" });
    export::sample_grid::<B::InnerBackend>(&run.config, &run.device, &png)?;
    println!("wrote {} (rows: shapes, columns: seeds)", png.display());
    Ok(())
}

fn stopped(dir: &Path) -> Result<()> {
    println!("stopped at the last checkpoint; continue with: duo-train pretrain --resume {}", dir.display());
    Ok(())
}

/// Parameter counts of the three networks, as built from the configs.
fn describe_sizes<V: Backend>(run: &Run<V>) {
    let c = &run.configs;
    let counts = [
        ("vae", c.vae.init::<V>(&run.device).num_params()),
        ("text_encoder", c.text_encoder.init::<V>(&run.device).num_params()),
        ("unet", c.unet.init::<V>(&run.device).num_params()),
    ];
    let parts: Vec<String> =
        counts.iter().map(|(name, n)| format!("{name} {:.2} M", *n as f64 / 1e6)).collect();
    println!("parameters: {}", parts.join(", "));
}
