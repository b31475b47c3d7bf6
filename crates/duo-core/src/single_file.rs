//! Single-file Stable Diffusion checkpoints in the original LDM (CompVis) key layout, the files
//! most users hold (`v1-5-pruned-emaonly.safetensors`, `sd-v1-4.ckpt`,
//! `v2-1_512-ema-pruned.safetensors`), read and written with the key conversion diffusers'
//! `from_single_file` performs (`loaders/single_file_utils.py`). The networks' sizes come from a
//! diffusers folder's configs; the correspondence of module paths is built from them, so any
//! UNet/VAE depth converts, and the one table serves both directions:
//!
//! | network | LDM prefix | diffusers |
//! |---|---|---|
//! | UNet | `model.diffusion_model.` `input_blocks.{i}.{0,1}`, `middle_block.{0,1,2}`, `output_blocks.{i}.{0,1,2}`, `time_embed`, `out` | `down_blocks`, `mid_block`, `up_blocks`, `time_embedding`, `conv_norm_out`/`conv_out` |
//! | VAE | `first_stage_model.` `encoder.down.{i}.block.{j}`, `decoder.up.{n−1−i}`, `mid.block_1/attn_1/block_2` | `down_blocks`, `up_blocks` (reversed), `mid_block`; attention 1×1 convs ↔ linear weights |
//! | SD 1.x text encoder | `cond_stage_model.transformer.text_model.` | `text_model.` |
//! | SD 2.x text encoder (OpenCLIP) | `cond_stage_model.model.` `transformer.resblocks.{i}.attn.in_proj_*` | `q_proj`/`k_proj`/`v_proj` (split), the config's layer count |
//!
//! SD 1.x and 2.x are told apart by the text encoder's prefix, as diffusers does. Like diffusers,
//! reading takes the `model.diffusion_model.` UNet (not `model_ema.`) and ignores what no network
//! uses (the schedule buffers, OpenCLIP's `text_projection` and `logit_scale`, its blocks past the
//! config's layer count); a `.ckpt` is read through the PyTorch reader, which never runs pickled code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use burn::store::TensorSnapshot;
use burn::tensor::TensorData;

use crate::error::{DuoError, Result};
use crate::models::{AutoencoderKLConfig, ClipTextConfig, UNetLayout};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
/// SD 1.x: the transformers CLIP text model.
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// SD 2.x: the OpenCLIP text tower.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// Which text encoder layout a checkpoint has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: transformers' CLIP names.
    Sd1,
    /// SD 2.x: OpenCLIP names, q/k/v fused.
    Sd2,
}

/// A single-file checkpoint: every tensor under its LDM key (read lazily).
pub struct SingleFile {
    path: PathBuf,
    tensors: HashMap<String, TensorSnapshot>,
    family: Family,
}

impl SingleFile {
    /// Reads the keys of a `.safetensors` or `.ckpt` (PyTorch pickle, with or without the
    /// `state_dict` wrapper) and tells SD 1.x from 2.x.
    pub fn open(path: &Path) -> Result<Self> {
        let snapshots = crate::weights::read_checkpoint(path)?;
        let tensors: HashMap<String, TensorSnapshot> =
            snapshots.into_iter().map(|s| (s.full_path(), s)).collect();
        let has = |prefix: &str| tensors.keys().any(|k| k.starts_with(prefix));
        let family = if has(OPEN_CLIP_PREFIX) {
            Family::Sd2
        } else if has(CLIP_PREFIX) {
            Family::Sd1
        } else {
            return Err(DuoError::weights(
                path,
                format!(
                    "not a Stable Diffusion single-file checkpoint: no text encoder keys (`{CLIP_PREFIX}…` for SD 1.x, \
                     `{OPEN_CLIP_PREFIX}…` for SD 2.x); a diffusers folder is loaded by its folder path"
                ),
            ));
        };
        for (prefix, what) in [(UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE")] {
            if !has(prefix) {
                return Err(DuoError::weights(
                    path,
                    format!("no {what} weights (`{prefix}…` keys) in this checkpoint"),
                ));
            }
        }
        Ok(Self { path: path.to_path_buf(), tensors, family })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// The UNet's tensors under diffusers keys. Every `model.diffusion_model.` key must have a place.
    pub fn unet(&self, layout: &UNetLayout) -> Result<Vec<TensorSnapshot>> {
        let table = unet_table(layout);
        self.convert(UNET_PREFIX, |key| table.to_diffusers(key).map(|k| vec![k]))
    }

    /// The VAE's tensors under diffusers keys, the mid-block attention's 1×1 conv weights as linear ones.
    pub fn vae(&self, config: &AutoencoderKLConfig) -> Result<Vec<TensorSnapshot>> {
        let table = vae_table(config);
        let snapshots = self.convert(VAE_PREFIX, |key| table.to_diffusers(key).map(|k| vec![k]))?;
        Ok(snapshots
            .into_iter()
            .map(|s| match s.shape[..] {
                [rows, columns, 1, 1] if is_vae_attention_weight(&s.full_path()) => {
                    reshaped(s, vec![rows, columns])
                }
                _ => s,
            })
            .collect())
    }

    /// The text encoder's tensors under our CLIP keys (`text_model.…`).
    pub fn text_encoder(&self, config: &ClipTextConfig) -> Result<Vec<TensorSnapshot>> {
        match self.family {
            Family::Sd1 => self.convert(CLIP_PREFIX, |key| {
                let key = key.strip_prefix("text_model.").unwrap_or(key);
                Some(vec![format!("text_model.{key}")])
            }),
            Family::Sd2 => {
                let layers = config.num_hidden_layers;
                let mut out = Vec::new();
                for (key, snapshot) in self.under(OPEN_CLIP_PREFIX) {
                    match open_clip_key(key, layers) {
                        OpenClip::Ignored => {}
                        OpenClip::Key(name) => out.push(renamed(snapshot, &name)),
                        OpenClip::Fused(names) => out.extend(split_rows(snapshot, &names, &self.path, key)?),
                        OpenClip::Unknown => return Err(self.unplaced(OPEN_CLIP_PREFIX, key)),
                    }
                }
                Ok(out)
            }
        }
    }

    /// The tensors under `prefix`, with the prefix stripped.
    fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a TensorSnapshot)> {
        let mut keys: Vec<(&str, &TensorSnapshot)> =
            self.tensors.iter().filter_map(|(k, s)| Some((k.strip_prefix(prefix)?, s))).collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        keys.into_iter()
    }

    fn convert(
        &self,
        prefix: &str,
        place: impl Fn(&str) -> Option<Vec<String>>,
    ) -> Result<Vec<TensorSnapshot>> {
        let mut out = Vec::new();
        for (key, snapshot) in self.under(prefix) {
            // buffers and training-only weights some checkpoints keep beside the networks: CLIP's
            // position ids, the autoencoder's training loss (LPIPS and discriminator)
            if (prefix == CLIP_PREFIX && key.ends_with("position_ids"))
                || (prefix == VAE_PREFIX && key.starts_with("loss."))
            {
                continue;
            }
            let names = place(key).ok_or_else(|| self.unplaced(prefix, key))?;
            out.extend(names.iter().map(|name| renamed(snapshot, name)));
        }
        Ok(out)
    }

    fn unplaced(&self, prefix: &str, key: &str) -> DuoError {
        DuoError::weights(
            &self.path,
            format!(
                "`{prefix}{key}` has no place in a network of the given configs — do the configs match this checkpoint?"
            ),
        )
    }
}

/// The correspondence of module paths between the LDM layout (component prefix stripped) and
/// diffusers'; a key converts by its longest listed module prefix, the rest kept as it is.
pub struct PrefixTable {
    to_diffusers: HashMap<String, String>,
    to_ldm: HashMap<String, String>,
}

impl PrefixTable {
    fn new(pairs: Vec<(String, String)>) -> Self {
        let to_ldm = pairs.iter().map(|(l, d)| (d.clone(), l.clone())).collect();
        Self { to_diffusers: pairs.into_iter().collect(), to_ldm }
    }

    pub fn to_diffusers(&self, key: &str) -> Option<String> {
        longest_prefix(&self.to_diffusers, key)
    }

    pub fn to_ldm(&self, key: &str) -> Option<String> {
        longest_prefix(&self.to_ldm, key)
    }
}

fn longest_prefix(map: &HashMap<String, String>, key: &str) -> Option<String> {
    let mut end = key.len();
    loop {
        if let Some(target) = map.get(&key[..end]) {
            return Some(format!("{target}{}", &key[end..]));
        }
        end = key[..end].rfind('.')?;
    }
}

/// The resnet's inner modules: LDM `ResBlock` → diffusers `ResnetBlock2D`.
const UNET_RESNET: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// The UNet's table for `layout`: down block b's layer l is `input_blocks.{1 + b(L+1) + l}` (resnet
/// `.0`, attention `.1`), its downsampler `input_blocks.{(b+1)(L+1)}.0.op`; up block u's layer l is
/// `output_blocks.{u(L+1) + l}` with L+1 layers, its upsampler the last module of the last layer.
pub fn unet_table(layout: &UNetLayout) -> PrefixTable {
    let c = &layout.config;
    let (blocks, l) = (c.block_out_channels.len(), c.layers_per_block);
    let mut pairs: Vec<(String, String)> = vec![
        ("time_embed.0".into(), "time_embedding.linear_1".into()),
        ("time_embed.2".into(), "time_embedding.linear_2".into()),
        ("input_blocks.0.0".into(), "conv_in".into()),
        ("out.0".into(), "conv_norm_out".into()),
        ("out.2".into(), "conv_out".into()),
    ];
    let resnet = |pairs: &mut Vec<(String, String)>, ldm: String, diffusers: String| {
        for (inner_ldm, inner_diffusers) in UNET_RESNET {
            pairs.push((format!("{ldm}.{inner_ldm}"), format!("{diffusers}.{inner_diffusers}")));
        }
    };
    for b in 0..blocks {
        for j in 0..l {
            let i = 1 + b * (l + 1) + j;
            resnet(&mut pairs, format!("input_blocks.{i}.0"), format!("down_blocks.{b}.resnets.{j}"));
            if layout.cross_attn_down[b] {
                pairs.push((format!("input_blocks.{i}.1"), format!("down_blocks.{b}.attentions.{j}")));
            }
        }
        if b + 1 < blocks {
            let i = (b + 1) * (l + 1);
            pairs.push((format!("input_blocks.{i}.0.op"), format!("down_blocks.{b}.downsamplers.0.conv")));
        }
    }
    resnet(&mut pairs, "middle_block.0".into(), "mid_block.resnets.0".into());
    pairs.push(("middle_block.1".into(), "mid_block.attentions.0".into()));
    resnet(&mut pairs, "middle_block.2".into(), "mid_block.resnets.1".into());
    for u in 0..blocks {
        let attention = layout.cross_attn_up[u];
        for j in 0..=l {
            let i = u * (l + 1) + j;
            resnet(&mut pairs, format!("output_blocks.{i}.0"), format!("up_blocks.{u}.resnets.{j}"));
            if attention {
                pairs.push((format!("output_blocks.{i}.1"), format!("up_blocks.{u}.attentions.{j}")));
            }
            if j == l && u + 1 < blocks {
                let slot = 1 + usize::from(attention);
                pairs.push((
                    format!("output_blocks.{i}.{slot}.conv"),
                    format!("up_blocks.{u}.upsamplers.0.conv"),
                ));
            }
        }
    }
    PrefixTable::new(pairs)
}

/// The VAE's table: encoder level i is `encoder.down.{i}`, decoder level i is `decoder.up.{n−1−i}`
/// (the LDM decoder counts from the bottom).
pub fn vae_table(config: &AutoencoderKLConfig) -> PrefixTable {
    let (levels, l) = (config.block_out_channels.len(), config.layers_per_block);
    let mut pairs: Vec<(String, String)> = Vec::new();
    let resnet = |pairs: &mut Vec<(String, String)>, ldm: String, diffusers: String| {
        for (a, b) in [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")] {
            pairs.push((format!("{ldm}.{a}"), format!("{diffusers}.{b}")));
        }
        pairs.push((format!("{ldm}.nin_shortcut"), format!("{diffusers}.conv_shortcut")));
    };
    for side in ["encoder", "decoder"] {
        for (a, b) in [("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")] {
            pairs.push((format!("{side}.{a}"), format!("{side}.{b}")));
        }
        resnet(&mut pairs, format!("{side}.mid.block_1"), format!("{side}.mid_block.resnets.0"));
        resnet(&mut pairs, format!("{side}.mid.block_2"), format!("{side}.mid_block.resnets.1"));
        for (a, b) in
            [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]
        {
            pairs.push((format!("{side}.mid.attn_1.{a}"), format!("{side}.mid_block.attentions.0.{b}")));
        }
    }
    for i in 0..levels {
        for j in 0..l {
            resnet(
                &mut pairs,
                format!("encoder.down.{i}.block.{j}"),
                format!("encoder.down_blocks.{i}.resnets.{j}"),
            );
        }
        let up = levels - 1 - i;
        for j in 0..=l {
            resnet(
                &mut pairs,
                format!("decoder.up.{up}.block.{j}"),
                format!("decoder.up_blocks.{i}.resnets.{j}"),
            );
        }
        if i + 1 < levels {
            pairs.push((
                format!("encoder.down.{i}.downsample.conv"),
                format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
            ));
            pairs.push((
                format!("decoder.up.{up}.upsample.conv"),
                format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
            ));
        }
    }
    for conv in ["quant_conv", "post_quant_conv"] {
        pairs.push((conv.into(), conv.into()));
    }
    PrefixTable::new(pairs)
}

/// The VAE attention's q/k/v/out weights: 1×1 convs in the LDM file, linear layers in diffusers.
pub fn is_vae_attention_weight(diffusers_key: &str) -> bool {
    diffusers_key.contains("mid_block.attentions.")
        && ["to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"]
            .iter()
            .any(|w| diffusers_key.ends_with(w))
}

/// Where an OpenCLIP key goes.
enum OpenClip {
    Key(String),
    /// `in_proj_*`: rows split into q, k, v.
    Fused([String; 3]),
    Ignored,
    Unknown,
}

/// OpenCLIP name → our CLIP key; `layers` is the config's layer count (SD 2.x keeps 23 of 24).
fn open_clip_key(key: &str, layers: usize) -> OpenClip {
    let simple = |name: &str| OpenClip::Key(format!("text_model.{name}"));
    match key {
        "token_embedding.weight" => return simple("embeddings.token_embedding.weight"),
        "positional_embedding" => return simple("embeddings.position_embedding.weight"),
        "ln_final.weight" => return simple("final_layer_norm.weight"),
        "ln_final.bias" => return simple("final_layer_norm.bias"),
        "text_projection" | "logit_scale" | "attn_mask" => return OpenClip::Ignored,
        _ => {}
    }
    let Some(rest) = key.strip_prefix("transformer.resblocks.") else { return OpenClip::Unknown };
    let Some((index, inner)) = rest.split_once('.') else { return OpenClip::Unknown };
    let Ok(index) = index.parse::<usize>() else { return OpenClip::Unknown };
    if index >= layers {
        return OpenClip::Ignored;
    }
    let layer = format!("text_model.encoder.layers.{index}");
    let (module, param) = match inner.rsplit_once('.') {
        Some(split) => split,
        None => return OpenClip::Unknown,
    };
    let target = match module {
        "ln_1" => "layer_norm1",
        "ln_2" => "layer_norm2",
        "attn.out_proj" => "self_attn.out_proj",
        "mlp.c_fc" => "mlp.fc1",
        "mlp.c_proj" => "mlp.fc2",
        "attn" => {
            let param = match param {
                "in_proj_weight" => "weight",
                "in_proj_bias" => "bias",
                _ => return OpenClip::Unknown,
            };
            return OpenClip::Fused(
                ["q_proj", "k_proj", "v_proj"].map(|p| format!("{layer}.self_attn.{p}.{param}")),
            );
        }
        _ => return OpenClip::Unknown,
    };
    OpenClip::Key(format!("{layer}.{target}.{param}"))
}

/// The OpenCLIP key of one of our CLIP keys, and which third of a fused `in_proj` it is.
pub fn open_clip_name(key: &str) -> Option<(String, Option<usize>)> {
    let key = key.strip_prefix("text_model.")?;
    let plain = |name: &str| Some((name.to_string(), None));
    match key {
        "embeddings.token_embedding.weight" => return plain("token_embedding.weight"),
        "embeddings.position_embedding.weight" => return plain("positional_embedding"),
        "final_layer_norm.weight" => return plain("ln_final.weight"),
        "final_layer_norm.bias" => return plain("ln_final.bias"),
        _ => {}
    }
    let rest = key.strip_prefix("encoder.layers.")?;
    let (index, inner) = rest.split_once('.')?;
    let (module, param) = inner.rsplit_once('.')?;
    let block = format!("transformer.resblocks.{index}");
    let (name, third) = match module {
        "layer_norm1" => (format!("{block}.ln_1.{param}"), None),
        "layer_norm2" => (format!("{block}.ln_2.{param}"), None),
        "self_attn.out_proj" => (format!("{block}.attn.out_proj.{param}"), None),
        "mlp.fc1" => (format!("{block}.mlp.c_fc.{param}"), None),
        "mlp.fc2" => (format!("{block}.mlp.c_proj.{param}"), None),
        "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" => {
            let third = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
                .iter()
                .position(|m| *m == module);
            (format!("{block}.attn.in_proj_{param}"), third)
        }
        _ => return None,
    };
    Some((name, third))
}

fn renamed(snapshot: &TensorSnapshot, path: &str) -> TensorSnapshot {
    let mut snapshot = snapshot.clone();
    snapshot.path_stack = Some(path.split('.').map(str::to_string).collect());
    snapshot
}

/// `snapshot` with its data reshaped to `shape` (same element count).
fn reshaped(snapshot: TensorSnapshot, shape: Vec<usize>) -> TensorSnapshot {
    let data = snapshot.clone_data_fn();
    let target = shape.clone();
    let data_fn = Rc::new(move || {
        let mut d: TensorData = data()?;
        d.shape = target.clone().into();
        Ok(d)
    });
    TensorSnapshot::from_closure(
        data_fn,
        snapshot.dtype,
        shape.into(),
        snapshot.path_stack.clone().unwrap_or_default(),
        snapshot.container_stack.clone().unwrap_or_default(),
        snapshot.tensor_id.unwrap_or_default(),
    )
}

/// A fused `in_proj` tensor's rows in three equal parts, named `names` (q, k, v).
fn split_rows(
    snapshot: &TensorSnapshot,
    names: &[String; 3],
    file: &Path,
    key: &str,
) -> Result<Vec<TensorSnapshot>> {
    let shape = snapshot.shape.to_vec();
    if shape.is_empty() || !shape[0].is_multiple_of(3) {
        return Err(DuoError::weights(
            file,
            format!("`{key}` has shape {shape:?}: a fused q/k/v needs rows divisible by 3"),
        ));
    }
    let rows = shape[0] / 3;
    let row_len: usize = shape[1..].iter().product();
    let mut part_shape = shape.clone();
    part_shape[0] = rows;
    Ok((0..3)
        .map(|third| {
            let data = snapshot.clone_data_fn();
            let part = part_shape.clone();
            let data_fn = Rc::new(move || {
                let all: TensorData = data()?;
                let dtype = all.dtype;
                let values = all
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .map_err(|e| burn::store::TensorSnapshotError::DataError(format!("{e:?}")))?;
                let slice = values[third * rows * row_len..(third + 1) * rows * row_len].to_vec();
                Ok(TensorData::new(slice, part.clone()).convert_dtype(dtype))
            });
            let mut snapshot = TensorSnapshot::from_closure(
                data_fn,
                snapshot.dtype,
                part_shape.clone().into(),
                Vec::new(),
                snapshot.container_stack.clone().unwrap_or_default(),
                snapshot.tensor_id.unwrap_or_default(),
            );
            snapshot.path_stack = Some(names[third].split('.').map(str::to_string).collect());
            snapshot
        })
        .collect())
}

/// Which layout to write: OpenCLIP's for a text encoder with the GELU activation (SD 2.x), the
/// transformers CLIP names otherwise (SD 1.x).
pub fn family_of(text_encoder: &ClipTextConfig) -> Family {
    if text_encoder.hidden_act == "gelu" { Family::Sd2 } else { Family::Sd1 }
}

/// The tensors of a single file, from the three networks' diffusers-keyed tensors: renamed, the VAE
/// attention weights made 1×1 convs, OpenCLIP's q/k/v fused. Returns (LDM key, data) sorted by key.
pub fn to_single_file(
    unet: Vec<(String, TensorData)>,
    vae: Vec<(String, TensorData)>,
    text_encoder: Vec<(String, TensorData)>,
    layout: &UNetLayout,
    vae_config: &AutoencoderKLConfig,
    text_config: &ClipTextConfig,
) -> Result<Vec<(String, TensorData)>> {
    let unplaced = |key: &str| DuoError::Invalid(format!("single-file export: no LDM key for `{key}`"));
    let mut out = Vec::new();
    let table = unet_table(layout);
    for (key, data) in unet {
        out.push((format!("{UNET_PREFIX}{}", table.to_ldm(&key).ok_or_else(|| unplaced(&key))?), data));
    }
    let table = vae_table(vae_config);
    for (key, mut data) in vae {
        if is_vae_attention_weight(&key) && data.shape.len() == 2 {
            let (rows, columns) = (data.shape[0], data.shape[1]);
            data.shape = [rows, columns, 1, 1].into();
        }
        out.push((format!("{VAE_PREFIX}{}", table.to_ldm(&key).ok_or_else(|| unplaced(&key))?), data));
    }
    match family_of(text_config) {
        Family::Sd1 => {
            for (key, data) in text_encoder {
                let key = key.strip_prefix("text_model.").unwrap_or(&key);
                out.push((format!("{CLIP_PREFIX}text_model.{key}"), data));
            }
        }
        Family::Sd2 => {
            let mut fused: HashMap<String, [Option<TensorData>; 3]> = HashMap::new();
            for (key, data) in text_encoder {
                match open_clip_name(&key).ok_or_else(|| unplaced(&key))? {
                    (name, None) => out.push((format!("{OPEN_CLIP_PREFIX}{name}"), data)),
                    (name, Some(third)) => fused.entry(name).or_default()[third] = Some(data),
                }
            }
            for (name, parts) in fused {
                let [Some(q), Some(k), Some(v)] = parts else {
                    return Err(DuoError::Invalid(format!(
                        "single-file export: `{name}` lacks one of q, k, v"
                    )));
                };
                out.push((format!("{OPEN_CLIP_PREFIX}{name}"), concat_rows([q, k, v])?));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Writes the three networks as one LDM single-file checkpoint (safetensors, atomically), floats as
/// `dtype`, in the layout diffusers' `from_single_file` reads.
#[allow(clippy::too_many_arguments)]
pub fn save_single_file<B: burn::prelude::Backend>(
    file: &Path,
    unet: &crate::models::UNet2DConditionModel<B>,
    vae: &crate::models::AutoencoderKL<B>,
    text_encoder: &crate::models::ClipTextModel<B>,
    layout: &UNetLayout,
    vae_config: &AutoencoderKLConfig,
    text_config: &ClipTextConfig,
    dtype: burn::tensor::DType,
) -> Result<()> {
    use crate::weights::{UNET_SAVE_REMAPS, safetensors_bytes};
    // each network as diffusers saves it, then renamed
    let tensors = |bytes: Vec<u8>| -> Result<Vec<(String, TensorData)>> {
        Ok(crate::tensor_file::TensorFile::from_bytes(&bytes, file)?.into_tensors())
    };
    let tensors = to_single_file(
        tensors(safetensors_bytes(unet, UNET_SAVE_REMAPS, dtype)?)?,
        tensors(safetensors_bytes(vae, &[], dtype)?)?,
        tensors(safetensors_bytes(text_encoder, &[], dtype)?)?,
        layout,
        vae_config,
        text_config,
    )?;
    let named: Vec<(&str, TensorData)> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::tensor_file::write_tensor_file_with_metadata(file, &named, metadata)
}

fn concat_rows(parts: [TensorData; 3]) -> Result<TensorData> {
    let dtype = parts[0].dtype;
    let mut shape = parts[0].shape.to_vec();
    let mut values = Vec::new();
    for part in parts {
        let part = part.convert::<f32>();
        values.extend(
            part.into_vec::<f32>().map_err(|e| DuoError::Invalid(format!("single-file export: {e:?}")))?,
        );
    }
    shape[0] *= 3;
    Ok(TensorData::new(values, shape).convert_dtype(dtype))
}
