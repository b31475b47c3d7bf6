//! `duo-train erase`: the published erasure methods DUO is compared with, on the same model and
//! config: ESD-x and ESD-u (fine-tuning), UCE and RECE (closed-form edits of the cross-attention).
//! Each writes into its run folder either `lora.safetensors` (UCE, RECE, ESD with `esd.lora`) or a
//! model folder `model/` (ESD's fine-tuned weights), which `duo-bench eval` takes as `--lora` or
//! `--unlearned-model`, and `erase.json`, which records what was made and how long it took. A rerun
//! with the same `--out` reuses a finished run and continues an unfinished ESD training.

pub mod closed_form;
pub mod config;
mod edits;
mod esd;
mod validation;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::DType;
use clap::{Args, ValueEnum};
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::pipelines::StableDiffusion;
use duo_core::run_config::{RUN_CONFIG_FILE, RunConfig};
use duo_core::{DuoError, ModelFolder, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use edits::{Projections, rece, token_outputs, uce};
pub use esd::{EsdDraw, EsdSetup};

use crate::train::config::DuoConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// ESD on the cross-attention (Gandikota et al. 2023).
    EsdX,
    /// ESD on everything but the cross-attention.
    EsdU,
    /// Unified Concept Editing: a closed-form edit of the cross-attention keys and values.
    Uce,
    /// UCE, then rounds that erase the embeddings that still bring the concept back.
    Rece,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Self::EsdX => "esd-x",
            Self::EsdU => "esd-u",
            Self::Uce => "uce",
            Self::Rece => "rece",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Args, Debug, Clone)]
pub struct EraseArgs {
    /// The method: esd-x, esd-u, uce or rece.
    #[arg(long)]
    pub method: Method,
    /// The run config: the model and concept, and the method's section ([esd], [uce], [rece];
    /// absent sections take the authors' published settings).
    #[arg(long, default_value = "configs/toy-cross.toml")]
    pub config: PathBuf,
    /// Override a config key (repeatable), e.g. --set esd.iterations=200.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The run folder (default: runs/<method>-<UTC time>); an existing one is continued.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Without a terminal, print the training loss every this many steps (ESD).
    #[arg(long, default_value_t = 50)]
    pub log_every: usize,
}

/// What a finished run made, as `erase.json` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "path")]
pub enum Erased {
    /// The base model with this LoRA file.
    Lora(PathBuf),
    /// This model folder.
    Model(PathBuf),
}

/// The record of a finished run, `erase.json` in its folder.
pub const RECORD_FILE: &str = "erase.json";

/// What `erase.json` holds: the method, what it made and how long that took.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub method: String,
    pub model: PathBuf,
    pub concept: String,
    pub output: Erased,
    pub seconds: f64,
    /// The method's settings and what it changed.
    pub details: serde_json::Value,
}

impl Record {
    /// A finished run's record, if `out` holds one.
    pub fn read(out: &Path) -> Result<Option<Record>> {
        let file = out.join(RECORD_FILE);
        if !file.is_file() {
            return Ok(None);
        }
        let text = duo_core::error::read_to_string(&file)?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| DuoError::Invalid(format!("{}: {e}", file.display())))
    }

    pub fn write(&self, out: &Path) -> Result<()> {
        let value =
            serde_json::to_value(self).map_err(|e| DuoError::Invalid(format!("{RECORD_FILE}: {e}")))?;
        duo_core::fsutil::write_json(&out.join(RECORD_FILE), &value)
    }
}

pub fn run(args: EraseArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    let out = args.out.clone().unwrap_or_else(|| crate::run_dir_name(args.method.name()));
    let saved = out.join(RUN_CONFIG_FILE);
    let config = match saved.is_file() {
        true => DuoConfig::resumed(&saved, &args.set)?,
        false => DuoConfig::load(&args.config, &args.set)?,
    };
    dispatch(device, float, EraseTask { method: args.method, config, out, log_every: args.log_every })
}

struct EraseTask {
    method: Method,
    config: DuoConfig,
    out: PathBuf,
    log_every: usize,
}

impl BackendTask for EraseTask {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<()> {
        let folder = ModelFolder::open(&self.config.model)?.with_dtype(dtype);
        let sd = StableDiffusion::<B>::load(&folder, &device)?;
        match erase(&sd, &self.config, self.method, &self.out, self.log_every)? {
            Some(Erased::Lora(file)) => println!(
                "evaluate it with: duo-bench eval --model {} --lora {}",
                self.config.model.display(),
                file.display()
            ),
            Some(Erased::Model(dir)) => println!(
                "evaluate it with: duo-bench eval --model {} --unlearned-model {}",
                self.config.model.display(),
                dir.display()
            ),
            None => {}
        }
        Ok(())
    }
}

/// Runs `method` on `sd` (loaded from `config.model`) into `out`; `None` when a training was
/// stopped early (rerun to continue). A finished run in `out` is returned as it is.
pub fn erase<B: Backend>(
    sd: &StableDiffusion<B>,
    config: &DuoConfig,
    method: Method,
    out: &Path,
    log_every: usize,
) -> Result<Option<Erased>> {
    if let Some(done) = Record::read(out)? {
        refuse_other_config(&out.join(RUN_CONFIG_FILE), config)?;
        println!("{method}: finished run in {}, reused", out.display());
        return Ok(Some(done.output));
    }
    std::fs::create_dir_all(out).map_err(|e| DuoError::io(out, e))?;
    config.save_to_run(out)?;
    let started = Instant::now();
    let (output, details) = match method {
        Method::Uce => {
            let edit = uce(sd, &config.uce, &config.concept)?;
            let file = out.join("lora.safetensors");
            edit.save(sd, &file)?;
            (
                Erased::Lora(file),
                json!({ "settings": config.uce, "ranks": edit.ranks(), "layers": edit.paths }),
            )
        }
        Method::Rece => {
            let mut ranks = Vec::new();
            let save_round = |round: usize, edit: &Projections| {
                let file = out.join(format!("round-{round}.safetensors"));
                println!("rece: round {round} of {}, wrote {}", config.rece.rounds, file.display());
                ranks.push(edit.ranks());
                edit.save(sd, &file)
            };
            let edit = rece(sd, &config.uce, &config.rece, &config.concept, save_round)?;
            let validation = validation::best_round(sd, config, out)?;
            let file = out.join("lora.safetensors");
            let best = out.join(format!("round-{}.safetensors", validation.best));
            std::fs::copy(&best, &file).map_err(|e| DuoError::io(&file, e))?;
            println!("rece: kept round {} ({})", validation.best, best.display());
            let details = json!({
                "uce": config.uce, "settings": config.rece, "ranks": ranks[validation.best - 1], "layers": edit.paths,
                "validation": validation,
            });
            (Erased::Lora(file), details)
        }
        Method::EsdX | Method::EsdU => {
            if !config.esd.lora && config.model.is_file() {
                return Err(DuoError::Invalid(format!(
                    "{}: ESD's fine-tuned weights are written as a model folder beside the base's other components, \
                     which needs a diffusers folder as the base; convert the checkpoint, or set esd.lora = true",
                    config.model.display()
                )));
            }
            let Some(result) = esd::train_esd(sd, config, method, &out.join("train"), log_every)? else {
                return Ok(None);
            };
            let output = match result {
                esd::EsdResult::Lora(file) => {
                    let kept = out.join("lora.safetensors");
                    std::fs::copy(&file, &kept).map_err(|e| DuoError::io(&kept, e))?;
                    Erased::Lora(kept)
                }
                esd::EsdResult::Weights(file) => {
                    Erased::Model(model_folder(&config.model, &file, &out.join("model"))?)
                }
            };
            (output, json!({ "settings": config.esd }))
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let record = Record {
        method: method.to_string(),
        model: config.model.clone(),
        concept: config.concept.clone(),
        output: output.clone(),
        seconds,
        details,
    };
    record.write(out)?;
    println!("{method}: done in {seconds:.1} s, wrote {}", out.join(RECORD_FILE).display());
    Ok(Some(output))
}

/// A finished run is reused only under the config it was made with.
pub fn refuse_other_config(saved: &Path, config: &DuoConfig) -> Result<()> {
    if saved.is_file() && DuoConfig::load(saved, &[])? != *config {
        let folder = saved.parent().unwrap_or(saved);
        return Err(DuoError::Invalid(format!(
            "{} holds a finished run made with another config ({}); remove the folder or pick another --out",
            folder.display(),
            saved.display()
        )));
    }
    Ok(())
}

/// A model folder at `dest`: the base folder's files, linked (or copied where links fail), with
/// `unet_weights` as the UNet's weights (its other weight files left out).
fn model_folder(base: &Path, unet_weights: &Path, dest: &Path) -> Result<PathBuf> {
    let partial = dest.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| DuoError::io(&partial, e))?;
    }
    link_tree(base, &partial, &|relative: &Path| {
        relative.starts_with("unet") && relative.extension().is_some_and(|e| e == "safetensors" || e == "bin")
    })?;
    let target = partial.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::copy(unet_weights, &target).map_err(|e| DuoError::io(&target, e))?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| DuoError::io(dest, e))?;
    }
    std::fs::rename(&partial, dest).map_err(|e| DuoError::io(dest, e))?;
    Ok(dest.to_path_buf())
}

fn link_tree(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    fn walk(root: &Path, dir: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
        std::fs::create_dir_all(to.join(dir)).map_err(|e| DuoError::io(to.join(dir), e))?;
        let entries = std::fs::read_dir(root.join(dir)).map_err(|e| DuoError::io(root.join(dir), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| DuoError::io(root.join(dir), e))?;
            let relative = dir.join(entry.file_name());
            let source = root.join(&relative);
            if source.is_dir() {
                walk(root, &relative, to, skip)?;
            } else if !skip(&relative) {
                duo_core::fsutil::link_or_copy(&source, &to.join(&relative))?;
            }
        }
        Ok(())
    }
    walk(from, Path::new(""), to, skip)
}
