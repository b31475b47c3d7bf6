//! LoRA weight files in the two formats SD tools exchange. Both store PyTorch's layout (the
//! transpose of ours):
//!
//! | | diffusers / PEFT ([`LoraFormat::Peft`]) | Kohya / A1111 ([`LoraFormat::Kohya`]) |
//! |---|---|---|
//! | down `A` [rank, d_in] | `unet.<path>.lora_A.weight` | `lora_unet_<path, . → _>.lora_down.weight` |
//! | up `B` [d_out, rank] | `unet.<path>.lora_B.weight` | `lora_unet_<…>.lora_up.weight` |
//! | alpha | header metadata `lora_adapter_metadata`: JSON with `unet.lora_alpha` and `unet.alpha_pattern` (diffusers' `save_lora_weights` writes it, `load_lora_weights` reads it into PEFT's `LoraConfig`) | scalar tensor `lora_unet_<…>.alpha` |
//!
//! Without an alpha both tools use alpha = rank (scale 1), and so do we.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use regex::Regex;
use serde_json::{Value, json};

use super::paths::{kohya_name, linears, linears_mut};
use super::{add_adapter, freeze, lora_adapters};
use crate::error::{DuoError, Result};
use crate::models::UNet2DConditionModel;
use crate::tensor_file::{TensorFile, write_tensor_file_with_metadata};

/// diffusers' `LORA_ADAPTER_METADATA_KEY` (src/diffusers/loaders/lora_base.py).
const PEFT_METADATA_KEY: &str = "lora_adapter_metadata";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// diffusers' `pytorch_lora_weights.safetensors` (PEFT keys).
    Peft,
    /// Kohya's sd-scripts, as AUTOMATIC1111 and ComfyUI load it.
    Kohya,
}

impl FromStr for LoraFormat {
    type Err = DuoError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "peft" | "diffusers" => Ok(Self::Peft),
            "kohya" | "a1111" => Ok(Self::Kohya),
            other => Err(DuoError::Invalid(format!(
                "unknown LoRA format `{other}` (expected `peft`/`diffusers` or `kohya`/`a1111`)"
            ))),
        }
    }
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Peft => "peft",
            Self::Kohya => "kohya",
        })
    }
}

/// Writes the UNet's adapters to `file` (atomically), with their alphas (`scale·rank`).
pub fn save_lora<B: Backend>(unet: &UNet2DConditionModel<B>, file: &Path, format: LoraFormat) -> Result<()> {
    let adapters = lora_adapters(unet);
    if adapters.is_empty() {
        return Err(DuoError::Invalid(format!(
            "cannot save {}: the UNet has no LoRA adapters",
            file.display()
        )));
    }
    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    for (path, lora) in &adapters {
        let down = lora.lora_a.val().transpose().into_data().convert::<f32>(); // [rank, d_in]
        let up = lora.lora_b.val().transpose().into_data().convert::<f32>(); // [d_out, rank]
        let alpha = lora.scale * lora.rank() as f64;
        match format {
            LoraFormat::Peft => {
                tensors.push((format!("unet.{path}.lora_A.weight"), down));
                tensors.push((format!("unet.{path}.lora_B.weight"), up));
            }
            LoraFormat::Kohya => {
                let name = kohya_name(path);
                tensors.push((format!("{name}.lora_down.weight"), down));
                tensors.push((format!("{name}.lora_up.weight"), up));
                tensors.push((format!("{name}.alpha"), TensorData::new(vec![alpha as f32], [0usize; 0])));
            }
        }
    }
    let metadata = match format {
        LoraFormat::Peft => peft_metadata(&adapters),
        LoraFormat::Kohya => HashMap::new(),
    };
    let named: Vec<(&str, TensorData)> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write_tensor_file_with_metadata(file, &named, metadata)
}

/// diffusers' metadata: a PEFT `LoraConfig` whose keys carry the component prefix `unet.`; the
/// first adapter's rank and alpha are the defaults, the others are listed in the patterns.
fn peft_metadata<B: Backend>(adapters: &[(String, &super::LoraAdapter<B>)]) -> HashMap<String, String> {
    let rank_alpha = |lora: &super::LoraAdapter<B>| (lora.rank(), lora.scale * lora.rank() as f64);
    let (rank, alpha) = rank_alpha(adapters[0].1);
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    for (path, lora) in adapters {
        let (r, a) = rank_alpha(lora);
        if r != rank {
            rank_pattern.insert(path.clone(), json!(r));
        }
        if a != alpha {
            alpha_pattern.insert(path.clone(), json!(a));
        }
    }
    let config = json!({
        "unet.r": rank,
        "unet.lora_alpha": alpha,
        "unet.target_modules": adapters.iter().map(|(path, _)| path.as_str()).collect::<Vec<_>>(),
        "unet.rank_pattern": rank_pattern,
        "unet.alpha_pattern": alpha_pattern,
    });
    HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (PEFT_METADATA_KEY.to_string(), config.to_string()),
    ])
}

/// One adapter as stored in a file, in PyTorch layout.
struct StoredAdapter {
    /// diffusers module path
    path: String,
    down_key: String,
    up_key: String,
    /// None: alpha = rank
    alpha: Option<f64>,
}

/// Adds the adapters of `file` (either format, told apart by their keys) to the UNet, each
/// delta scaled by `weight`. A layer that already has an adapter (attached, or from an earlier
/// file) gets the new one appended, so loading several files sums their deltas. The base is
/// frozen as by `attach_lora`.
pub fn load_lora<B: Backend>(
    unet: UNet2DConditionModel<B>,
    file: &Path,
    weight: f64,
) -> Result<UNet2DConditionModel<B>> {
    let tensors = TensorFile::read(file)?;
    let kohya = tensors.names().any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te"));
    let stored = if kohya { kohya_adapters(&tensors, &unet)? } else { peft_adapters(&tensors)? };
    if stored.is_empty() {
        return Err(DuoError::weights(file, "no LoRA weights in this file"));
    }

    let mut unet = freeze(unet);
    let mut by_path: HashMap<String, _> = linears_mut(&mut unet).into_iter().collect();
    for adapter in stored {
        let linear = by_path.get_mut(&adapter.path).ok_or_else(|| {
            DuoError::weights(
                file,
                format!(
                    "`{}`: the UNet has no linear layer `{}` (LoRAs on convs or the text encoder are not supported)",
                    adapter.down_key, adapter.path
                ),
            )
        })?;
        let [d_in, d_out] = linear.weight.lazy_shape().dims();
        let (down, up) = read_pair(&tensors, &adapter, d_in, d_out)?;
        let rank = down.shape[0];
        let device = linear.weight.lazy_device();
        let a = Tensor::<B, 2>::from_data(down, (&device, DType::F32)).transpose();
        let b = Tensor::<B, 2>::from_data(up, (&device, DType::F32)).transpose();
        let alpha = adapter.alpha.unwrap_or(rank as f64);
        add_adapter(linear, a, b, weight * alpha / rank as f64);
    }
    Ok(unet)
}

/// The adapter's down [rank, d_in] and up [d_out, rank] weights (f32), checked against the layer.
fn read_pair(
    tensors: &TensorFile,
    adapter: &StoredAdapter,
    d_in: usize,
    d_out: usize,
) -> Result<(TensorData, TensorData)> {
    let down = tensors.get_f32(&adapter.down_key, 2)?;
    let up = tensors.get_f32(&adapter.up_key, 2)?;
    let misfit = |key: &str, found: &[usize], expected: String| {
        let path = &adapter.path;
        DuoError::weights(
            tensors.path(),
            format!("`{key}` has shape {found:?} but the UNet's `{path}` needs {expected}"),
        )
    };
    let rank = down.shape[0];
    if rank == 0 || down.shape[1] != d_in {
        return Err(misfit(&adapter.down_key, &down.shape, format!("[rank ≥ 1, {d_in}]")));
    }
    if up.shape[..] != [d_out, rank] {
        return Err(misfit(&adapter.up_key, &up.shape, format!("[{d_out}, {rank}]")));
    }
    Ok((down, up))
}

/// `unet.<path>.lora_A.weight` / `lora_B.weight`, alphas from diffusers' metadata.
fn peft_adapters(tensors: &TensorFile) -> Result<Vec<StoredAdapter>> {
    let file = tensors.path();
    let key =
        Regex::new(r"^unet\.(.+)\.lora_([AB])\.weight$").map_err(|e| DuoError::Invalid(e.to_string()))?;
    let mut pairs: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    for name in tensors.names() {
        let caps = key.captures(name).ok_or_else(|| {
            DuoError::weights(
                file,
                format!(
                    "unexpected key `{name}`: a diffusers LoRA file holds `unet.<module>.lora_A.weight` and \
                     `.lora_B.weight` (text-encoder LoRAs are not supported)"
                ),
            )
        })?;
        let slot = if &caps[2] == "A" { 0 } else { 1 };
        pairs.entry(caps[1].to_string()).or_default()[slot] = Some(name.to_string());
    }
    let alphas = PeftAlphas::read(tensors)?;
    pairs
        .into_iter()
        .map(|(path, [down, up])| {
            let missing = |which: &str| {
                DuoError::weights(
                    file,
                    format!("`unet.{path}.{which}.weight` is missing (its pair is present)"),
                )
            };
            Ok(StoredAdapter {
                alpha: alphas.alpha(&path),
                down_key: down.ok_or_else(|| missing("lora_A"))?,
                up_key: up.ok_or_else(|| missing("lora_B"))?,
                path,
            })
        })
        .collect()
}

/// The alphas of diffusers' `lora_adapter_metadata`: `unet.lora_alpha` for every module but those
/// named in `unet.alpha_pattern`.
struct PeftAlphas {
    default: Option<f64>,
    pattern: Vec<(String, f64)>,
}

impl PeftAlphas {
    fn read(tensors: &TensorFile) -> Result<Self> {
        let file = tensors.path();
        let Some(raw) = tensors.metadata(PEFT_METADATA_KEY) else {
            return Ok(Self { default: None, pattern: Vec::new() });
        };
        let bad = |what: String| DuoError::parse(file, format!("metadata `{PEFT_METADATA_KEY}`: {what}"));
        let config: serde_json::Map<String, Value> =
            serde_json::from_str(raw).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        let number = |key: &str, value: &Value| {
            value.as_f64().ok_or_else(|| bad(format!("`{key}` should be a number, got {value}")))
        };
        let default = config.get("unet.lora_alpha").map(|v| number("unet.lora_alpha", v)).transpose()?;
        let mut pattern = Vec::new();
        if let Some(map) = config.get("unet.alpha_pattern") {
            let map = map
                .as_object()
                .ok_or_else(|| bad(format!("`unet.alpha_pattern` should be an object, got {map}")))?;
            for (module, value) in map {
                pattern.push((module.clone(), number(&format!("unet.alpha_pattern.{module}"), value)?));
            }
        }
        Ok(Self { default, pattern })
    }

    /// A pattern key names a module by its path or a dotted suffix of it, as PEFT matches it.
    fn alpha(&self, path: &str) -> Option<f64> {
        let named = |key: &str| path == key || path.ends_with(&format!(".{key}"));
        self.pattern.iter().find(|(key, _)| named(key)).map(|(_, alpha)| *alpha).or(self.default)
    }
}

/// `lora_unet_<name>.lora_down.weight` / `.lora_up.weight` / `.alpha`; names are matched against
/// the UNet's own paths, since `_` → `.` cannot be undone by itself (`to_out_0`, `transformer_blocks`).
fn kohya_adapters<B: Backend>(
    tensors: &TensorFile,
    unet: &UNet2DConditionModel<B>,
) -> Result<Vec<StoredAdapter>> {
    let file = tensors.path();
    let paths: HashMap<String, String> =
        linears(unet).into_iter().map(|(path, _)| (kohya_name(&path), path)).collect();
    let key = Regex::new(r"^(lora_unet_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
        .map_err(|e| DuoError::Invalid(e.to_string()))?;
    let mut modules: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
    for name in tensors.names() {
        let caps = key.captures(name).ok_or_else(|| {
            DuoError::weights(
                file,
                format!(
                    "unexpected key `{name}`: a Kohya LoRA file holds `lora_unet_<module>.lora_down.weight`, \
                     `.lora_up.weight` and `.alpha` (text-encoder and non-LoRA networks are not supported)"
                ),
            )
        })?;
        let slot = match &caps[2] {
            "lora_down.weight" => 0,
            "lora_up.weight" => 1,
            _ => 2,
        };
        modules.entry(caps[1].to_string()).or_default()[slot] = Some(name.to_string());
    }
    modules
        .into_iter()
        .map(|(module, [down, up, alpha])| {
            let path = paths.get(&module).ok_or_else(|| {
                DuoError::weights(
                    file,
                    format!(
                        "`{module}`: the UNet has no linear layer of that name (LoRAs on convs or the text encoder \
                         are not supported)"
                    ),
                )
            })?;
            let missing = |which: &str| {
                DuoError::weights(file, format!("`{module}.{which}.weight` is missing (its pair is present)"))
            };
            let alpha = match alpha {
                Some(key) => match tensors.get_f64_vec(&key)?[..] {
                    [alpha] => Some(alpha),
                    ref values => {
                        return Err(DuoError::weights(
                            file,
                            format!("`{key}` should hold one value, it holds {}", values.len()),
                        ));
                    }
                },
                None => None,
            };
            Ok(StoredAdapter {
                path: path.clone(),
                down_key: down.ok_or_else(|| missing("lora_down"))?,
                up_key: up.ok_or_else(|| missing("lora_up"))?,
                alpha,
            })
        })
        .collect()
}

/// A LoRA named on a command line as `FILE[:WEIGHT]`: the file, and the weight its delta is scaled
/// by (1 when absent). A suffix that is not a number belongs to the file name (`a:b.safetensors`).
pub fn parse_lora_spec(spec: &str) -> Result<(PathBuf, f64)> {
    let (file, weight) = match spec.rsplit_once(':') {
        Some((file, w)) if !file.is_empty() => match w.parse::<f64>() {
            Ok(weight) => (file, weight),
            Err(_) => (spec, 1.0),
        },
        _ => (spec, 1.0),
    };
    // `f64::from_str` takes "nan" and "inf": a weight that would poison every merged weight
    if !weight.is_finite() {
        return Err(DuoError::Invalid(format!("LoRA `{spec}`: the weight {weight} is not a finite number")));
    }
    Ok((PathBuf::from(file), weight))
}

/// Loads LoRA files given on a command line as `FILE[:WEIGHT]` (weight 1 when absent), summing
/// their deltas, as `--lora` does everywhere.
pub fn load_lora_specs<B: Backend>(
    mut unet: UNet2DConditionModel<B>,
    specs: &[String],
) -> Result<UNet2DConditionModel<B>> {
    for spec in specs {
        let (file, weight) = parse_lora_spec(spec)?;
        unet = load_lora(unet, &file, weight)?;
    }
    Ok(unet)
}
