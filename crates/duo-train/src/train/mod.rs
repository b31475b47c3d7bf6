//! `duo-train train`: the DUO learner (docs/duo-algorithm.md §2) on burn-train.
//!
//! A run directory holds the effective config, the pairs' latent cache, burn-train's checkpoints
//! (LoRA adapters and AdamW state only) and metric logs, `experiment.log`, and at the end
//! `lora.safetensors` (diffusers/PEFT format).

pub mod config;
mod data;
mod model;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType};
use burn::train::{ApplicationLoggerInstaller, FileApplicationLoggerInstaller};
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::lora::{LoraFormat, LoraNetworks, attach_lora, lora_parameter_count, save_lora};
use duo_core::models::cast_floats;
use duo_core::objective::DuoStep;
use duo_core::pipelines::{StableDiffusion, prompt_ids};
use duo_core::run_config::{RUN_CONFIG_FILE, RunConfig};
use duo_core::schedulers::NoiseSchedule;
use duo_core::{DuoError, ModelFolder, Result};

use self::config::DuoConfig;
use self::data::{BatchSource, Conditioning, PairFiles, PairLatents, Sampling};
use self::model::{DuoModel, NonFiniteGuard, TRAIN_SCALARS};
use crate::learning::{EpochLoader, Stage, StopControl, latest_checkpoint};

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// The run's TOML config.
    #[arg(long, default_value = "configs/toy-cross.toml", conflicts_with = "resume")]
    pub config: PathBuf,
    /// Override a config key: KEY=VALUE with a dotted key (repeatable), e.g. --set duo.beta=250.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The pair folder (<dir>/unsafe, <dir>/safe); short for --set pairs.dir=<parent> --set
    /// concept=<folder name>. Default: the config's <pairs.dir>/<concept>.
    #[arg(long, conflicts_with = "resume")]
    pub pairs: Option<PathBuf>,
    /// The run directory (default: runs/train-<UTC time>).
    #[arg(long, conflicts_with = "resume")]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in this directory from its latest checkpoint, with its saved config (plus
    /// --set, except for the keys the checkpoints depend on).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Without a terminal, print the metrics every this many steps.
    #[arg(long, default_value_t = 25)]
    pub log_every: usize,
}

pub fn run(args: TrainArgs, device: DeviceChoice, float: FloatType) -> Result<Option<PathBuf>> {
    let mut sets = args.set.clone();
    if let Some(pairs) = &args.pairs {
        let (Some(parent), Some(name)) = (pairs.parent(), pairs.file_name()) else {
            return Err(DuoError::Invalid(format!("--pairs {}: expected a folder path", pairs.display())));
        };
        sets.push(format!("pairs.dir={}", parent.display()));
        sets.push(format!("concept={}", name.to_string_lossy()));
    }
    let (config, dir) = match &args.resume {
        Some(dir) => (DuoConfig::resumed(&dir.join(RUN_CONFIG_FILE), &sets)?, dir.clone()),
        None => (DuoConfig::load(&args.config, &sets)?, crate::new_run_dir(args.run_dir.clone(), "train")?),
    };
    // the pairs are checked before the model is read
    PairFiles::list(&config.pair_dir())?;
    dispatch(device, float, TrainTask { config, dir, log_every: args.log_every })
}

struct TrainTask {
    config: DuoConfig,
    dir: PathBuf,
    log_every: usize,
}

impl BackendTask for TrainTask {
    type Output = Option<PathBuf>;

    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<Option<PathBuf>> {
        let folder = ModelFolder::open(&self.config.model)?.with_dtype(dtype);
        let sd = StableDiffusion::<B>::load(&folder, &device)?;
        crate::adversarial::train_with_mining(&sd, &self.config, &self.dir, self.log_every)
    }
}

/// The DUO learner on a loaded model: trains a LoRA on `config`'s pairs into the run directory
/// `dir` (its effective config, latent cache, checkpoints, logs and finally `lora.safetensors`,
/// whose path it returns; `None` when the run was stopped early). A directory that holds
/// checkpoints is continued from the latest. The UNet trains in the model's dtype; the pairs are
/// encoded by its VAE in f32, as the authors keep their VAE.
pub fn train_lora<B: Backend>(
    sd: &StableDiffusion<B>,
    config: &DuoConfig,
    dir: &Path,
    log_every: usize,
) -> Result<Option<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| DuoError::io(dir, e))?;
    config.save_to_run(dir)?;
    // burn-train would install one per launch; a process launches one run anyway.
    let _ = FileApplicationLoggerInstaller::new(dir.join("experiment.log")).install();
    println!("run directory: {}", dir.display());
    if config.training.gradient_checkpointing {
        learn::<Autodiff<B, BalancedCheckpointing>>(sd, config, dir, log_every)
    } else {
        learn::<Autodiff<B>>(sd, config, dir, log_every)
    }
}

fn learn<A: AutodiffBackend>(
    sd: &StableDiffusion<A::InnerBackend>,
    config: &DuoConfig,
    dir: &Path,
    log_every: usize,
) -> Result<Option<PathBuf>> {
    let files = PairFiles::list(&config.pair_dir())?;
    let device = sd.device.clone();
    let schedule = config.schedule();
    let d = &config.duo;
    let noise_schedule = NoiseSchedule::from_config(&sd.scheduler_config)?;
    let timesteps = noise_schedule.num_train_timesteps();
    if d.t_max > timesteps || d.prior_timestep >= timesteps {
        return Err(DuoError::config(
            dir.join(RUN_CONFIG_FILE),
            format!(
                "duo.t_max = {} and duo.prior_timestep = {} must lie within the model's {timesteps} training timesteps",
                d.t_max, d.prior_timestep
            ),
        ));
    }

    // What the UNet does not need is computed once, on the inner backend.
    let conditioning = {
        let prompt = prompt_ids(&sd.tokenizer, &d.prompt);
        let pair_tokens = match d.pair_prompts {
            true => files.unsafe_tokens(&config.pair_dir(), &sd.tokenizer)?,
            false => vec![prompt.clone()],
        };
        let embed = |ids: &[Vec<u32>]| sd.encode_ids(ids).cast(FloatDType::F32).into_data();
        Conditioning { pairs: embed(&pair_tokens), prior: embed(&[prompt]) }
    };
    let latents = {
        let vae = cast_floats(sd.vae.clone(), FloatDType::F32);
        PairLatents::load_or_encode(
            &files,
            &vae,
            sd.vae_scale_factor,
            config.training.seed,
            &dir.join("latents.safetensors"),
            &device,
        )?
    };
    println!(
        "{} pairs of {:?} latents from {}",
        latents.len(),
        &latents.unsafe_latents.shape[1..],
        files.unsafe_images[0].parent().and_then(Path::parent).unwrap_or(Path::new(".")).display()
    );
    let dtype = sd.dtype;

    let unet = attach_lora(sd.unet.clone().train::<A>(), &config.lora_config()?, &device)?;
    let trainable = lora_parameter_count(&unet);
    let control = StopControl::install()?;
    let guard = NonFiniteGuard::new(control.interrupter());
    let resume = latest_checkpoint::<A>(dir).unwrap_or(0);
    let settings = DuoStep {
        beta: d.beta,
        lambda: config.lambda(),
        objective: d.objective,
        max_grad_norm: config.training.max_grad_norm,
        grad_accumulation: schedule.grad_accumulation,
    };
    let model = DuoModel::new(unet, settings, resume * schedule.checkpoint_every, guard.clone());
    println!(
        "LoRA rank {} on `{}`: {:.2} M trainable parameters; β {} → lr {:.2e}, λ {:.3e} ({})",
        config.lora.rank,
        config.lora.targets,
        trainable as f64 / 1e6,
        d.beta,
        config.lr(),
        config.lambda(),
        d.objective
    );

    let source = Arc::new(BatchSource {
        latents,
        conditioning,
        schedule: noise_schedule,
        unet_dtype: dtype,
        sampling: Sampling {
            batch_size: schedule.batch_size,
            objective: d.objective,
            t_min: d.t_min,
            t_max: d.t_max,
            prior_timestep: d.prior_timestep,
            seed: config.training.seed,
        },
    });
    let batches = schedule.checkpoint_every * schedule.grad_accumulation;
    let train_source = source.clone();
    let train = Arc::new(EpochLoader::<A, _>::new(
        move |g, device| train_source.batch::<A>(g, device),
        schedule.batch_size,
        batches,
        resume,
        device.clone(),
    ));
    // one fixed batch, every checkpoint
    let valid_pairs = config.training.valid_pairs.min(source.latents.len());
    let valid = Arc::new(EpochLoader::<A::InnerBackend, _>::new(
        move |_, device| source.valid_batch::<A::InnerBackend>(valid_pairs, device),
        valid_pairs,
        1,
        0,
        device.clone(),
    ));
    let stage = Stage {
        name: "duo",
        dir: dir.to_path_buf(),
        schedule: schedule.clone(),
        log_every,
        control: &control,
        train_scalars: TRAIN_SCALARS,
        valid_scalars: &TRAIN_SCALARS[..5],
    };
    let result = stage.run(model, train, valid)?;
    if let Some((step, norm)) = guard.tripped() {
        let kept = match result.epoch {
            0 => "no checkpoint was written yet".to_string(),
            k => format!("the last good checkpoint (step {}) is kept", k * schedule.checkpoint_every),
        };
        return Err(DuoError::Invalid(format!(
            "the loss or its gradient became non-finite at step {step} (gradient norm {norm}); {kept} in {}; \
             try a smaller duo.base_lr or duo.beta",
            dir.join("checkpoint").display()
        )));
    }
    if !result.complete {
        // A stop between checkpoints (the TUI's stop, a second Ctrl-C) loses those steps for
        // --resume, but not the adapters: they are usable as they are.
        let at_stop = dir.join("lora-at-stop.safetensors");
        save_lora(&LoraNetworks::unet_only(result.model.policy()), &at_stop, LoraFormat::Peft)?;
        println!(
            "stopped at the last checkpoint; continue with: duo-train train --resume {} (the adapters at the stop: {})",
            dir.display(),
            at_stop.display()
        );
        return Ok(None);
    }
    let lora = dir.join("lora.safetensors");
    save_lora(&LoraNetworks::unet_only(result.model.policy()), &lora, LoraFormat::Peft)?;
    println!("wrote {} ({} adapters, PEFT format)", lora.display(), result.model.adapters.len());
    Ok(Some(lora))
}

#[cfg(test)]
mod tests {
    use burn::module::Module;

    use super::*;

    #[test]
    fn the_module_record_holds_only_the_adapters() {
        type B = Autodiff<burn::backend::Flex>;
        let folder = ModelFolder::open(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/sd1-tiny"),
        )
        .unwrap();
        let device = Default::default();
        let unet = attach_lora(folder.unet::<B>(&device).unwrap(), &Default::default(), &device).unwrap();
        let trainable = lora_parameter_count(&unet);
        let base = unet.num_params();
        let settings = DuoStep::published();
        let model = DuoModel::new(unet, settings, 0, NonFiniteGuard::new(burn::train::Interrupter::new()));
        assert!(trainable > 0 && trainable < base);
        assert_eq!(model.num_params(), trainable, "the base UNet is not part of the trained module");
        // the policy is the UNet with every adapter back in place
        assert_eq!(lora_parameter_count(&model.policy()), trainable);
        assert_eq!(model.policy().num_params(), base);
    }
}
