//! LoRA weight files. We write the two formats SD tools exchange, and read every layout diffusers'
//! `load_lora_weights` reads for SD 1.x/2.x. All store PyTorch's layout (the transpose of ours):
//! down `A` [rank, d_in] (a conv's [rank, c_in, kh, kw]), up `B` [d_out, rank] ([c_out, rank, 1, 1]).
//!
//! | layout | keys (UNet; the text encoder's start `text_encoder.`, `lora_te_`) | alpha |
//! |---|---|---|
//! | PEFT ([`LoraFormat::Peft`], written) | `unet.<path>.lora_A.weight`, `.lora_B.weight` | header metadata `lora_adapter_metadata` (`unet.lora_alpha`, `unet.alpha_pattern`), or `<path>.alpha` keys |
//! | diffusers-converted (diffusers' training scripts, the DUO authors') | `unet.<path>.lora.down.weight`, `.lora.up.weight`; text encoder `….lora_linear_layer.down.weight` | none (scale 1) |
//! | attention processors (diffusers ≤ 0.17) | `unet.<attn>.processor.to_q_lora.down.weight` (`to_out_lora` → `to_out.0`; text encoder `q_proj` … `out_proj`) | none |
//! | Kohya / A1111 ([`LoraFormat::Kohya`], written) | `lora_unet_<path, . → _>.lora_down.weight`, `.lora_up.weight` | scalar `lora_unet_<…>.alpha` |
//!
//! Without an alpha every tool uses alpha = rank (scale 1), and so do we; PEFT metadata that lacks
//! `lora_alpha` means PEFT's default of 8, as diffusers builds a `LoraConfig` from it. Entries on the
//! UNet's convolutions (SD 1.x's 1×1 `proj_in`/`proj_out`, LoCon's 3×3 convs) are merged into the
//! conv weights as they load, which is exact for sampling. An entry that matches no layer, a DoRA or
//! LoHa entry, or a key of no known layout is an error naming it: nothing is skipped silently.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use regex::Regex;
use serde_json::{Value, json};

use super::paths::{
    Network, convs_mut, kohya_name, linears, linears_mut, text_encoder_adapters, text_encoder_linears,
    text_encoder_linears_mut,
};
use super::{LoraAdapter, LoraNetworks, add_adapter, freeze, lora_adapters};
use crate::error::{DuoError, Result};
use crate::models::layers::cast_back;
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

/// Writes the adapters of the UNet (and of the text encoder, when it has any) to `file`
/// (atomically), with their alphas (`scale·rank`).
pub fn save_lora<B: Backend>(nets: &LoraNetworks<B>, file: &Path, format: LoraFormat) -> Result<()> {
    let mut adapters: Vec<(Network, String, &LoraAdapter<B>)> =
        lora_adapters(&nets.unet).into_iter().map(|(path, lora)| (Network::Unet, path, lora)).collect();
    if let Some(te) = &nets.text_encoder {
        adapters.extend(
            text_encoder_adapters(te).into_iter().map(|(path, lora)| (Network::TextEncoder, path, lora)),
        );
    }
    if adapters.is_empty() {
        return Err(DuoError::Invalid(format!(
            "cannot save {}: the model has no LoRA adapters",
            file.display()
        )));
    }
    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    for (network, path, lora) in &adapters {
        let down = lora.lora_a.val().transpose().into_data().convert::<f32>(); // [rank, d_in]
        let up = lora.lora_b.val().transpose().into_data().convert::<f32>(); // [d_out, rank]
        let alpha = lora.scale * lora.rank() as f64;
        match format {
            LoraFormat::Peft => {
                let prefix = network.prefix();
                tensors.push((format!("{prefix}.{path}.lora_A.weight"), down));
                tensors.push((format!("{prefix}.{path}.lora_B.weight"), up));
            }
            LoraFormat::Kohya => {
                let name = kohya_name(*network, path);
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

/// diffusers' metadata: per network, a PEFT `LoraConfig` whose keys carry the network's prefix
/// (`unet.r`, `text_encoder.lora_alpha`); the first adapter's rank and alpha are the defaults, the
/// others are listed in the patterns. The text encoder's module names leave out `text_model.`, which
/// PEFT matches as a suffix of the live module name with and without it (transformers 5 dropped it).
fn peft_metadata<B: Backend>(adapters: &[(Network, String, &LoraAdapter<B>)]) -> HashMap<String, String> {
    let rank_alpha = |lora: &LoraAdapter<B>| (lora.rank(), lora.scale * lora.rank() as f64);
    let mut config = serde_json::Map::new();
    for network in [Network::Unet, Network::TextEncoder] {
        let ours: Vec<(&str, &LoraAdapter<B>)> = adapters
            .iter()
            .filter(|(n, _, _)| *n == network)
            .map(|(_, path, lora)| (path.strip_prefix("text_model.").unwrap_or(path), *lora))
            .collect();
        let Some(&(_, first)) = ours.first() else { continue };
        let (rank, alpha) = rank_alpha(first);
        let mut rank_pattern = serde_json::Map::new();
        let mut alpha_pattern = serde_json::Map::new();
        for (path, lora) in &ours {
            let (r, a) = rank_alpha(lora);
            if r != rank {
                rank_pattern.insert(path.to_string(), json!(r));
            }
            if a != alpha {
                alpha_pattern.insert(path.to_string(), json!(a));
            }
        }
        let prefix = network.prefix();
        config.insert(format!("{prefix}.r"), json!(rank));
        config.insert(format!("{prefix}.lora_alpha"), json!(alpha));
        config.insert(
            format!("{prefix}.target_modules"),
            json!(ours.iter().map(|(p, _)| *p).collect::<Vec<_>>()),
        );
        config.insert(format!("{prefix}.rank_pattern"), Value::Object(rank_pattern));
        config.insert(format!("{prefix}.alpha_pattern"), Value::Object(alpha_pattern));
    }
    HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (PEFT_METADATA_KEY.to_string(), Value::Object(config).to_string()),
    ])
}

/// One adapter as stored in a file, in PyTorch layout.
struct StoredAdapter {
    network: Network,
    /// The module path (the text encoder's with `text_model.`).
    path: String,
    down_key: String,
    up_key: String,
    /// From an `.alpha` key or the metadata; None: alpha = rank.
    alpha: Option<f64>,
}

/// Adds the adapters of `file` (any layout, told apart by its keys) to the networks, each delta
/// scaled by `weight`. A layer that already has an adapter (attached, or from an earlier file) gets
/// the new one appended, so loading several files sums their deltas; convolutions take their delta
/// merged in. The networks' base weights are frozen as by `attach_lora`.
pub fn load_lora<B: Backend>(nets: LoraNetworks<B>, file: &Path, weight: f64) -> Result<LoraNetworks<B>> {
    let tensors = TensorFile::read(file)?;
    let kohya = tensors.names().any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te"));
    let stored = if kohya { kohya_adapters(&tensors, &nets)? } else { prefixed_adapters(&tensors)? };
    if stored.is_empty() {
        return Err(DuoError::weights(file, "no LoRA weights in this file"));
    }

    let LoraNetworks { unet, text_encoder } = nets;
    let mut unet = freeze(unet);
    let mut text_encoder = text_encoder.map(freeze);
    // linear layers take adapters; what is left must be a UNet convolution, merged in after
    let mut conv_entries = Vec::new();
    {
        let mut unet_linears: HashMap<String, _> = linears_mut(&mut unet).into_iter().collect();
        let mut te_linears: HashMap<String, _> =
            text_encoder.iter_mut().flat_map(|te| text_encoder_linears_mut(te)).collect();
        for adapter in stored {
            let linear = match adapter.network {
                Network::Unet => unet_linears.get_mut(&adapter.path),
                Network::TextEncoder => te_linears.get_mut(&adapter.path),
            };
            let Some(linear) = linear else {
                conv_entries.push(adapter);
                continue;
            };
            let [d_in, d_out] = linear.weight.lazy_shape().dims();
            let (down, up) = read_pair(&tensors, &adapter, [d_in, 1, 1], d_out)?;
            let rank = down.shape[0];
            let device = linear.weight.lazy_device();
            let a = Tensor::<B, 4>::from_data(down, (&device, DType::F32)).reshape([rank, d_in]).transpose();
            let b = Tensor::<B, 4>::from_data(up, (&device, DType::F32)).reshape([d_out, rank]).transpose();
            add_adapter(linear, a, b, weight * adapter.alpha.unwrap_or(rank as f64) / rank as f64);
        }
    }
    let mut convs: HashMap<String, _> = convs_mut(&mut unet).into_iter().collect();
    for adapter in conv_entries {
        match convs.get_mut(&adapter.path).filter(|_| adapter.network == Network::Unet) {
            Some(conv) => merge_conv_delta(conv, &tensors, &adapter, weight)?,
            None => return Err(no_such_layer(&tensors, &adapter, text_encoder.is_some())),
        }
    }
    drop(convs);
    Ok(LoraNetworks { unet, text_encoder })
}

fn no_such_layer(tensors: &TensorFile, adapter: &StoredAdapter, have_text_encoder: bool) -> DuoError {
    let (key, path) = (&adapter.down_key, &adapter.path);
    let message = match adapter.network {
        Network::TextEncoder if !have_text_encoder => format!(
            "`{key}` adapts the text encoder, which this command does not load; a UNet-only LoRA file \
             has no `text_encoder.`/`lora_te_` entries"
        ),
        Network::TextEncoder => format!("`{key}`: the text encoder has no linear layer `{path}`"),
        Network::Unet => format!("`{key}`: the UNet has no linear or convolution layer `{path}`"),
    };
    DuoError::weights(tensors.path(), message)
}

/// `W += weight·(alpha/rank)·B·A` for a convolution: its LoRA (down [rank, c_in, kh, kw] with the
/// conv's own kernel, stride and padding, then up [c_out, rank, 1, 1]) is the convolution with that
/// weight, so merging is exact. A 1×1 conv also takes 2-D factors.
fn merge_conv_delta<B: Backend>(
    conv: &mut burn::nn::conv::Conv2d<B>,
    tensors: &TensorFile,
    adapter: &StoredAdapter,
    weight: f64,
) -> Result<()> {
    let [c_out, c_in, kh, kw] = conv.weight.lazy_shape().dims();
    if !conv.weight.is_initialized() {
        return Err(DuoError::weights(
            tensors.path(),
            format!(
                "`{}` adapts the convolution `{}`, whose LoRA is merged into the base weights as it loads; \
                 exporting it as a LoRA file is not supported (export with --format merged)",
                adapter.down_key, adapter.path
            ),
        ));
    }
    let (down, up) = read_pair(tensors, adapter, [c_in, kh, kw], c_out)?;
    let rank = down.shape[0];
    let device = conv.weight.device();
    let down = Tensor::<B, 4>::from_data(down, (&device, DType::F32)).reshape([rank, c_in * kh * kw]);
    let up = Tensor::<B, 4>::from_data(up, (&device, DType::F32)).reshape([c_out, rank]);
    let scale = weight * adapter.alpha.unwrap_or(rank as f64) / rank as f64;
    let delta = (up.matmul(down) * scale).reshape([c_out, c_in, kh, kw]);
    conv.weight = conv.weight.clone().map(|w| {
        let dtype = w.dtype();
        cast_back(w.cast(burn::tensor::FloatDType::F32) + delta, dtype).detach()
    });
    Ok(())
}

/// The adapter's down [rank, d_in, kh, kw] and up [d_out, rank, 1, 1] weights (f32), checked against
/// the layer (`input` = [d_in, kh, kw]; a linear layer's is [d_in, 1, 1]). 2-D factors are taken for
/// a 1×1 kernel.
fn read_pair(
    tensors: &TensorFile,
    adapter: &StoredAdapter,
    input: [usize; 3],
    d_out: usize,
) -> Result<(TensorData, TensorData)> {
    // (the factor as 4-D, and its shape as stored, for messages)
    let read = |key: &str| -> Result<(TensorData, Vec<usize>)> {
        let stored = tensors.get(key)?.clone();
        let mut data = match crate::weights::is_float(stored.dtype) {
            true => stored.convert::<f32>(),
            false => crate::weights::exact_f32(stored)
                .map_err(|why| DuoError::weights(tensors.path(), format!("`{key}` {why}")))?,
        };
        if data.iter::<f32>().any(|v| !v.is_finite()) {
            return Err(DuoError::weights(tensors.path(), format!("`{key}` holds NaN or infinite values")));
        }
        let stored = data.shape.to_vec();
        match data.shape[..] {
            [rows, columns] => {
                data.shape = [rows, columns, 1, 1].into();
                Ok((data, stored))
            }
            [_, _, _, _] => Ok((data, stored)),
            ref shape => Err(DuoError::weights(
                tensors.path(),
                format!("`{key}` has shape {shape:?}: a LoRA factor is 2-D (linear) or 4-D (convolution)"),
            )),
        }
    };
    let ((down, down_stored), (up, up_stored)) = (read(&adapter.down_key)?, read(&adapter.up_key)?);
    let misfit = |key: &str, found: &[usize], expected: String| {
        let path = &adapter.path;
        DuoError::weights(
            tensors.path(),
            format!("`{key}` has shape {found:?} but `{path}` needs {expected}"),
        )
    };
    let [d_in, kh, kw] = input;
    let kernel = if kh * kw == 1 { String::new() } else { format!(", {kh}, {kw}") };
    let rank = down.shape[0];
    if rank == 0 || down.shape[1..] != [d_in, kh, kw] {
        return Err(misfit(&adapter.down_key, &down_stored, format!("[rank ≥ 1, {d_in}{kernel}]")));
    }
    if up.shape[..] != [d_out, rank, 1, 1] {
        return Err(misfit(&adapter.up_key, &up_stored, format!("[{d_out}, {rank}]")));
    }
    Ok((down, up))
}

/// Which part of an adapter a key holds.
#[derive(Clone, Copy)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// The keys of diffusers' own layouts (PEFT, diffusers-converted, attention processors): each starts
/// with `unet.` or `text_encoder.`. Alphas come from `.alpha` keys, else from the PEFT metadata.
fn prefixed_adapters(tensors: &TensorFile) -> Result<Vec<StoredAdapter>> {
    let file = tensors.path();
    let mut parts: BTreeMap<(Network, String), [Option<String>; 3]> = BTreeMap::new();
    for name in tensors.names() {
        let (network, path, part) = parse_prefixed_key(name).ok_or_else(|| {
            DuoError::weights(
                file,
                format!(
                    "unexpected key `{name}`: not a LoRA layout diffusers reads (PEFT `unet.<module>.lora_A.weight`, \
                     diffusers `….lora.down.weight`, attention processors `….processor.to_q_lora.down.weight`, \
                     Kohya `lora_unet_….lora_down.weight`; DoRA and LoHa entries are not supported)"
                ),
            )
        })?;
        parts.entry((network, path)).or_default()[part as usize] = Some(name.to_string());
    }
    let alphas = PeftAlphas::read(tensors)?;
    parts
        .into_iter()
        .map(|((network, path), [down, up, alpha_key])| {
            let missing = |which: &str| {
                let present =
                    down.as_ref().or(up.as_ref()).or(alpha_key.as_ref()).cloned().unwrap_or_default();
                DuoError::weights(
                    file,
                    format!("the {which} weight of `{present}`'s module `{path}` is missing"),
                )
            };
            let alpha = match &alpha_key {
                Some(key) => Some(scalar(tensors, key)?),
                None => alphas.alpha(network, &path),
            };
            Ok(StoredAdapter {
                down_key: down.clone().ok_or_else(|| missing("down (lora_A)"))?,
                up_key: up.clone().ok_or_else(|| missing("up (lora_B)"))?,
                network,
                path,
                alpha,
            })
        })
        .collect()
}

/// (network, module path, part) of a key of diffusers' own layouts; `None` for any other key.
fn parse_prefixed_key(name: &str) -> Option<(Network, String, Part)> {
    let (network, rest) = if let Some(rest) = name.strip_prefix("unet.") {
        (Network::Unet, rest)
    } else {
        (Network::TextEncoder, name.strip_prefix("text_encoder.")?)
    };
    // the text encoder's paths start `text_model.` in our naming; files may leave it out
    let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
    let module = |m: &str| match network {
        Network::Unet => m.to_string(),
        Network::TextEncoder => format!("text_model.{m}"),
    };
    let suffixes: [(&str, Part); 7] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    for (suffix, part) in suffixes {
        if let Some(m) = rest.strip_suffix(suffix) {
            return Some((network, module(m), part));
        }
    }
    // attention processors: `<attention>.[processor.]to_{q,k,v,out}_lora.{down,up}.weight`
    let (stem, part) = match rest.strip_suffix(".down.weight") {
        Some(stem) => (stem, Part::Down),
        None => (rest.strip_suffix(".up.weight")?, Part::Up),
    };
    let (attention, projection) = stem.rsplit_once('.')?;
    let attention = attention.strip_suffix(".processor").unwrap_or(attention);
    let target = match (network, projection) {
        (Network::Unet, "to_q_lora") => "to_q",
        (Network::Unet, "to_k_lora") => "to_k",
        (Network::Unet, "to_v_lora") => "to_v",
        (Network::Unet, "to_out_lora") => "to_out.0",
        (Network::TextEncoder, "to_q_lora") => "q_proj",
        (Network::TextEncoder, "to_k_lora") => "k_proj",
        (Network::TextEncoder, "to_v_lora") => "v_proj",
        (Network::TextEncoder, "to_out_lora") => "out_proj",
        _ => return None,
    };
    Some((network, module(&format!("{attention}.{target}")), part))
}

/// A scalar tensor's value (Kohya's and PEFT's `.alpha`).
fn scalar(tensors: &TensorFile, key: &str) -> Result<f64> {
    match tensors.get_f64_vec(key)?[..] {
        [value] => Ok(value),
        ref values => Err(DuoError::weights(
            tensors.path(),
            format!("`{key}` should hold one value, it holds {}", values.len()),
        )),
    }
}

/// The alphas of diffusers' `lora_adapter_metadata`, per network: `<net>.lora_alpha` for every module
/// but those `<net>.alpha_pattern` names. PEFT builds a `LoraConfig` from the block, so a block
/// without `lora_alpha` means PEFT's default, 8.
struct PeftAlphas {
    networks: Vec<NetworkAlphas>,
}

/// One network's block of the metadata.
struct NetworkAlphas {
    network: Network,
    default: f64,
    /// `alpha_pattern`: (module regex, alpha), first match wins.
    patterns: Vec<(Regex, f64)>,
}

/// PEFT's `LoraConfig.lora_alpha` default.
const PEFT_DEFAULT_ALPHA: f64 = 8.0;

impl PeftAlphas {
    fn read(tensors: &TensorFile) -> Result<Self> {
        let file = tensors.path();
        let Some(raw) = tensors.metadata(PEFT_METADATA_KEY) else {
            return Ok(Self { networks: Vec::new() });
        };
        let bad = |what: String| DuoError::parse(file, format!("metadata `{PEFT_METADATA_KEY}`: {what}"));
        let config: serde_json::Map<String, Value> =
            serde_json::from_str(raw).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        let number = |key: &str, value: &Value| {
            value.as_f64().ok_or_else(|| bad(format!("`{key}` should be a number, got {value}")))
        };
        let mut networks = Vec::new();
        for network in [Network::Unet, Network::TextEncoder] {
            let prefix = format!("{}.", network.prefix());
            if !config.keys().any(|k| k.starts_with(&prefix)) {
                continue;
            }
            let key = format!("{prefix}lora_alpha");
            let default =
                config.get(&key).map(|v| number(&key, v)).transpose()?.unwrap_or(PEFT_DEFAULT_ALPHA);
            let mut patterns = Vec::new();
            let key = format!("{prefix}alpha_pattern");
            if let Some(map) = config.get(&key) {
                let map =
                    map.as_object().ok_or_else(|| bad(format!("`{key}` should be an object, got {map}")))?;
                for (pattern, value) in map {
                    // PEFT's `get_pattern_key`: re.match(rf"(.*\.)?({key})$", module_name)
                    let regex = Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$"))
                        .map_err(|e| bad(format!("`{key}` entry `{pattern}` is not a regex: {e}")))?;
                    patterns.push((regex, number(&format!("{key}.{pattern}"), value)?));
                }
            }
            networks.push(NetworkAlphas { network, default, patterns });
        }
        Ok(Self { networks })
    }

    /// The alpha of the module at `path`; `None` without metadata for its network.
    fn alpha(&self, network: Network, path: &str) -> Option<f64> {
        let alphas = self.networks.iter().find(|n| n.network == network)?;
        // the text encoder's live module name has `text_model.` or not, depending on transformers
        let names = [path, path.strip_prefix("text_model.").unwrap_or(path)];
        let matched = alphas.patterns.iter().find(|(regex, _)| names.iter().any(|name| regex.is_match(name)));
        Some(matched.map_or(alphas.default, |(_, alpha)| *alpha))
    }
}

/// `lora_unet_<name>` / `lora_te_<name>` (`lora_te1_` too) `.lora_down.weight` / `.lora_up.weight` /
/// `.alpha`; names are matched against the networks' own paths, since `_` → `.` cannot be undone by
/// itself (`to_out_0`, `transformer_blocks`).
fn kohya_adapters<B: Backend>(tensors: &TensorFile, nets: &LoraNetworks<B>) -> Result<Vec<StoredAdapter>> {
    let file = tensors.path();
    let mut paths: HashMap<String, (Network, String)> = HashMap::new();
    let mut add = |network, path: String| {
        paths.insert(kohya_name(network, &path), (network, path));
    };
    for (path, _) in linears(&nets.unet) {
        add(Network::Unet, path);
    }
    // the convolutions' names, from a throwaway clone (params are shared, nothing is copied)
    for (path, _) in convs_mut(&mut nets.unet.clone()) {
        add(Network::Unet, path);
    }
    let te_layers = nets.text_encoder.as_ref().map(|te| te.text_model.encoder.layers.len());
    if let Some(te) = &nets.text_encoder {
        for (path, _) in text_encoder_linears(te) {
            add(Network::TextEncoder, path);
        }
    }
    let key = Regex::new(r"^(lora_unet_|lora_te1?_)([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
        .map_err(|e| DuoError::Invalid(e.to_string()))?;
    let mut modules: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
    for name in tensors.names() {
        let caps = key.captures(name).ok_or_else(|| {
            DuoError::weights(
                file,
                format!(
                    "unexpected key `{name}`: a Kohya LoRA file holds `lora_unet_<module>` / `lora_te_<module>` \
                     `.lora_down.weight`, `.lora_up.weight` and `.alpha` (LoHa, LoKr, DoRA and `diff` entries \
                     are not supported; `lora_te2_` belongs to SDXL's second text encoder)"
                ),
            )
        })?;
        let prefix = if caps[1].starts_with("lora_te") { "lora_te_" } else { "lora_unet_" };
        let slot = match &caps[3] {
            "lora_down.weight" => 0,
            "lora_up.weight" => 1,
            _ => 2,
        };
        let module = format!("{prefix}{}", &caps[2]);
        modules.entry(module).or_default()[slot] = Some(name.to_string());
    }
    modules
        .into_iter()
        .map(|(module, [down, up, alpha])| {
            let (network, path) = paths.get(&module).cloned().ok_or_else(|| {
                let what = match (module.starts_with("lora_te_"), te_layers) {
                    (true, None) => "adapts the text encoder, which this command does not load".to_string(),
                    (true, Some(n)) => format!("matches no linear layer of the text encoder ({n} layers)"),
                    (false, _) => "matches no linear or convolution layer of the UNet".to_string(),
                };
                DuoError::weights(file, format!("`{module}` {what}"))
            })?;
            let missing = |which: &str| {
                DuoError::weights(file, format!("`{module}.{which}.weight` is missing (its pair is present)"))
            };
            Ok(StoredAdapter {
                network,
                path,
                down_key: down.ok_or_else(|| missing("lora_down"))?,
                up_key: up.ok_or_else(|| missing("lora_up"))?,
                alpha: alpha.map(|key| scalar(tensors, &key)).transpose()?,
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
pub fn load_lora_specs<B: Backend>(mut nets: LoraNetworks<B>, specs: &[String]) -> Result<LoraNetworks<B>> {
    for spec in specs {
        let (file, weight) = parse_lora_spec(spec)?;
        nets = load_lora(nets, &file, weight)?;
    }
    Ok(nets)
}
