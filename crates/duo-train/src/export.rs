//! `duo-train export`: a trained LoRA as the files other SD tools take — a diffusers/PEFT LoRA
//! (`load_lora_weights`), a Kohya/A1111 LoRA (AUTOMATIC1111, ComfyUI), a full diffusers UNet with
//! the LoRA merged in (a drop-in `unet/diffusion_pytorch_model.safetensors`), or the whole model with
//! the LoRA merged in as one LDM single-file checkpoint (what A1111 and ComfyUI load as a model, and
//! diffusers' `from_single_file`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::lora::{
    LoraFormat, LoraNetworks, load_lora, lora_adapters, merge_lora, merge_text_encoder_lora, parse_lora_spec,
    save_lora,
};
use duo_core::models::UNet2DConditionModel;
use duo_core::single_file::save_single_file;
use duo_core::weights::{UNET_SAVE_REMAPS, safetensors_bytes};
use duo_core::{DuoError, ModelFolder, Result};

/// What `duo-train train` leaves in a finished run directory.
const RUN_LORA: &str = "lora.safetensors";

#[derive(Args, Debug)]
#[command(after_help = "\
Several LoRAs (e.g. the four violence LoRAs, which are used summed) are added up, each scaled by its \
WEIGHT. Exported as peft or kohya they become ONE adapter per layer whose rank is the sum of theirs \
(their down/up matrices side by side, alpha = rank): its delta is exactly the weighted sum of theirs, \
and any tool loads it as a single LoRA at weight 1. Exported as merged, the sum is folded into the \
base weights.")]
pub struct ExportArgs {
    /// A LoRA file, diffusers/PEFT or Kohya (told apart by its keys), with the weight of its delta
    /// (1 when absent); repeatable.
    #[arg(long, value_name = "FILE[:WEIGHT]", required_unless_present = "run")]
    pub(crate) lora: Vec<String>,
    /// A `duo-train train` run directory, for its DIR/lora.safetensors; repeatable, and combines with
    /// --lora.
    #[arg(long, value_name = "DIR[:WEIGHT]")]
    pub(crate) run: Vec<String>,
    /// peft: diffusers' `pytorch_lora_weights.safetensors` layout; kohya: Kohya/A1111
    /// (`lora_unet_…`); merged: the base UNet with the LoRA(s) folded in, diffusers keys;
    /// single-file: UNet, VAE and text encoder, LoRA(s) folded in, as one LDM checkpoint.
    #[arg(long, value_name = "peft|kohya|merged|single-file")]
    pub(crate) format: ExportFormat,
    /// The diffusers pipeline folder the LoRA belongs to. Its UNet config gives the layer names and
    /// shapes the LoRA is checked against; merged also reads its UNet weights (the base).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// merged, single-file: the base weight file variant, e.g. fp16 (reads `diffusion_pytorch_model.fp16.safetensors`).
    #[arg(long)]
    pub(crate) variant: Option<String>,
    /// merged, single-file: the float type of the file, f32 (default), f16 or bf16; the merge itself runs in --dtype.
    /// (LoRA files are always f32.)
    #[arg(long)]
    pub(crate) save_dtype: Option<String>,
    /// The file to write (atomically: an existing one is replaced only once the new one is complete).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExportFormat {
    Lora(LoraFormat),
    Merged,
    SingleFile,
}

impl FromStr for ExportFormat {
    type Err = DuoError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "merged" => Ok(Self::Merged),
            "single-file" => Ok(Self::SingleFile),
            other => other.parse().map(Self::Lora).map_err(|_| {
                DuoError::Invalid(format!(
                    "unknown export format `{other}` (expected peft/diffusers, kohya/a1111, merged or single-file)"
                ))
            }),
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lora(format) => write!(f, "{format} LoRA"),
            Self::Merged => f.write_str("merged UNet"),
            Self::SingleFile => f.write_str("single-file checkpoint"),
        }
    }
}

pub fn run(args: ExportArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    // Everything that can be checked without a model is checked before one is read (SD 1.4's UNet
    // is 3.4 GB).
    let sources = sources(&args.lora, &args.run)?;
    if matches!(args.format, ExportFormat::Lora(_)) {
        // silently ignoring them would leave the user believing they took effect
        for (flag, given) in
            [("--save-dtype", args.save_dtype.is_some()), ("--variant", args.variant.is_some())]
        {
            if given {
                return Err(DuoError::Invalid(format!(
                    "{flag} applies to --format merged and single-file only (a {} file holds the adapters alone, in f32)",
                    args.format
                )));
            }
        }
    }
    let save_dtype = args
        .save_dtype
        .as_deref()
        .unwrap_or("f32")
        .parse::<FloatType>()
        .map_err(|e| DuoError::Invalid(format!("--save-dtype: {e}")))?
        .dtype();
    dispatch(device, float, ExportTask { args, sources, save_dtype })
}

/// The LoRA files to combine, each with its weight; every file exists.
fn sources(loras: &[String], runs: &[String]) -> Result<Vec<(PathBuf, f64)>> {
    let mut sources = Vec::new();
    for spec in loras {
        let (file, weight) = parse_lora_spec(spec)?;
        if !file.is_file() {
            return Err(not_found(&file, "LoRA file not found"));
        }
        sources.push((file, weight));
    }
    for spec in runs {
        let (dir, weight) = parse_lora_spec(spec)?;
        if !dir.is_dir() {
            return Err(not_found(&dir, "run directory not found"));
        }
        if !dir.join("config.toml").is_file() {
            return Err(not_found(&dir, "not a `duo-train train` run directory (it has no config.toml)"));
        }
        let file = dir.join(RUN_LORA);
        if !file.is_file() {
            let message = format!(
                "not found: the run has not finished (continue it with `duo-train train --resume {}`)",
                dir.display()
            );
            return Err(not_found(&file, &message));
        }
        sources.push((file, weight));
    }
    Ok(sources)
}

fn not_found(path: &Path, message: &str) -> DuoError {
    DuoError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, message.to_string()))
}

struct ExportTask {
    args: ExportArgs,
    sources: Vec<(PathBuf, f64)>,
    save_dtype: DType,
}

impl BackendTask for ExportTask {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<()> {
        let ExportTask { args, sources, save_dtype } = self;
        let folder = ModelFolder::open(&args.model)?.with_variant(args.variant.clone()).with_dtype(dtype);
        let mut nets = match args.format {
            // A LoRA file needs the layers' names and shapes only: the base stays unloaded (lazy
            // parameters allocate nothing), so no weights are read. The text encoder is there for
            // files with text-encoder entries, when the folder has one.
            ExportFormat::Lora(_) => LoraNetworks::<B> {
                unet: folder.unet_layout()?.init(&device),
                text_encoder: match folder.file("text_encoder", "config.json") {
                    Ok(_) => Some(folder.text_encoder_config()?.init(&device)),
                    Err(_) => None,
                },
            },
            ExportFormat::Merged => LoraNetworks::unet_only(folder.unet(&device)?),
            ExportFormat::SingleFile => LoraNetworks {
                unet: folder.unet(&device)?,
                text_encoder: Some(folder.text_encoder(&device)?),
            },
        };
        for (file, weight) in &sources {
            nets = load_lora(nets, file, *weight)?;
        }
        let adapters = describe_adapters(&nets.unet);
        match args.format {
            ExportFormat::Lora(format) => save_lora(&nets, &args.out, format)?,
            ExportFormat::SingleFile => {
                // weight 1: each file's weight was applied when it was loaded
                let unet = merge_lora(nets.unet, 1.0);
                let text_encoder = match nets.text_encoder {
                    Some(te) => merge_text_encoder_lora(te, 1.0),
                    None => folder.text_encoder(&device)?,
                };
                let vae = folder.vae(&device)?;
                let (layout, vae_config) = (folder.unet_layout()?, folder.vae_config()?);
                let text_config = folder.text_encoder_config()?;
                save_single_file(
                    &args.out,
                    &unet,
                    &vae,
                    &text_encoder,
                    &layout,
                    &vae_config,
                    &text_config,
                    save_dtype,
                )?;
            }
            ExportFormat::Merged => {
                // weight 1: each file's weight was applied when it was loaded
                let merged = merge_lora(nets.unet, 1.0);
                let bytes = safetensors_bytes(&merged, UNET_SAVE_REMAPS, save_dtype)?;
                duo_core::fsutil::write_atomic(&args.out, &bytes)?;
            }
        }
        let size = std::fs::metadata(&args.out).map_err(|e| DuoError::io(&args.out, e))?.len();
        let files: Vec<String> =
            sources.iter().map(|(file, weight)| format!("{}:{weight}", file.display())).collect();
        println!(
            "wrote {} ({}, {adapters}, {}) from {}",
            args.out.display(),
            args.format,
            human_size(size),
            files.join(" + ")
        );
        Ok(())
    }
}

/// "44 adapters of rank 4", or "… of ranks 4–12" when files of different ranks were combined.
fn describe_adapters<B: Backend>(unet: &UNet2DConditionModel<B>) -> String {
    let adapters = lora_adapters(unet);
    let ranks = adapters.iter().map(|(_, lora)| lora.rank());
    let (low, high) = (ranks.clone().min().unwrap_or(0), ranks.max().unwrap_or(0));
    let count = adapters.len();
    if low == high {
        format!("{count} adapters of rank {low}")
    } else {
        format!("{count} adapters of ranks {low}–{high}")
    }
}

/// A file size for people: kB below a megabyte (a small LoRA), MB above.
fn human_size(bytes: u64) -> String {
    if bytes < 1_000_000 {
        format!("{:.1} kB", bytes as f64 / 1e3)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}
