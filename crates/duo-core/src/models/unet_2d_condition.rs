//! diffusers `UNet2DConditionModel` for SD 1.x / 2.x, built from the folder's `unet/config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::silu;
use serde::Deserialize;
use serde_json::{Value, json};

use super::attention::TransformerConfig;
use super::config::{PerBlock, check_other_keys};
use super::embeddings::{TimestepEmbedding, timestep_features};
use super::layers::{GroupNorm32, cast_back, conv2d};
use super::unet_2d_blocks::{BlockConfig, DownBlock2D, MidBlock2DCrossAttn, UpBlock2D};
use crate::error::{DuoError, Result};

/// The keys of diffusers' UNet config that this model reads; defaults are diffusers'.
#[derive(Deserialize, Debug, Clone)]
pub struct UNet2DConditionConfig {
    #[serde(default = "d4")]
    pub in_channels: usize,
    #[serde(default = "d4")]
    pub out_channels: usize,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "sd_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "sd_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "sd_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "sd_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d2")]
    pub layers_per_block: usize,
    #[serde(default = "d1")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    #[serde(default = "eps5")]
    pub norm_eps: f64,
    #[serde(default = "d1280")]
    pub cross_attention_dim: usize,
    #[serde(default = "heads8")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "layers1")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Scores in f32 for f16 runs; our attention accumulates in f32 anyway.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn d1() -> usize {
    1
}
fn d2() -> usize {
    2
}
fn d4() -> usize {
    4
}
fn d32() -> usize {
    32
}
fn d1280() -> usize {
    1280
}
fn yes() -> bool {
    true
}
fn one_f() -> f64 {
    1.0
}
fn eps5() -> f64 {
    1e-5
}
fn heads8() -> PerBlock {
    PerBlock::One(8)
}
fn layers1() -> PerBlock {
    PerBlock::One(1)
}
fn sd_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn sd_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn sd_down_blocks() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        .map(String::from)
        .to_vec()
}
fn sd_up_blocks() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}

/// The config resolved into per-block sizes, checked once.
#[derive(Debug, Clone)]
pub struct UNetLayout {
    pub config: UNet2DConditionConfig,
    /// Heads per down block (diffusers' legacy `attention_head_dim` means the head count).
    pub heads: Vec<usize>,
    pub transformer_layers: Vec<usize>,
    pub cross_attn_down: Vec<bool>,
    pub cross_attn_up: Vec<bool>,
}

impl UNet2DConditionConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::error::read_json(path)
    }

    /// Resolves legacy meanings and checks every size; `path` names the file in errors.
    pub fn layout(&self, path: &Path) -> Result<UNetLayout> {
        let err = |msg: String| DuoError::config(path, msg);
        check_other_keys(
            path,
            &self.other,
            &["act_fn_doc"],
            &[
                ("act_fn", json!("silu")),
                ("dropout", json!(0.0)),
                ("resnet_time_scale_shift", json!("default")),
                ("time_embedding_type", json!("positional")),
                ("conv_in_kernel", json!(3)),
                ("conv_out_kernel", json!(3)),
                ("attention_type", json!("default")),
                ("resnet_out_scale_factor", json!(1.0)),
                ("addition_embed_type_num_heads", json!(64)),
            ],
        )?;
        let blocks = self.block_out_channels.len();
        if blocks == 0 {
            return Err(err("block_out_channels is empty".into()));
        }
        if self.down_block_types.len() != blocks || self.up_block_types.len() != blocks {
            return Err(err(format!(
                "down_block_types ({}) and up_block_types ({}) must both have one entry per block_out_channels ({blocks})",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`; it refuses
        // `num_attention_heads` for this class, and so do we, with the same reason.
        if self.num_attention_heads.is_some() {
            return Err(err(
                "num_attention_heads is not supported by UNet2DConditionModel (diffusers refuses it too); \
                 give the head count as attention_head_dim"
                    .into(),
            ));
        }
        let heads = self.attention_head_dim.resolve(blocks, "attention_head_dim", path)?;
        let transformer_layers =
            self.transformer_layers_per_block.resolve(blocks, "transformer_layers_per_block", path)?;
        let cross_attn_down = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(err(format!("down_block_types: block type {other} is not implemented"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let cross_attn_up = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                other => Err(err(format!("up_block_types: block type {other} is not implemented"))),
            })
            .collect::<Result<Vec<_>>>()?;
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return Err(err(format!("mid_block_type {other:?} is not implemented"))),
        }
        let groups = self.norm_num_groups;
        for (i, (&ch, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if groups == 0 || ch % groups != 0 {
                return Err(err(format!(
                    "norm_num_groups={groups} does not divide block_out_channels[{i}]={ch}"
                )));
            }
            if h == 0 || ch % h != 0 {
                return Err(err(format!(
                    "attention_head_dim[{i}]={h} heads do not divide block_out_channels[{i}]={ch}"
                )));
            }
        }
        Ok(UNetLayout { config: self.clone(), heads, transformer_layers, cross_attn_down, cross_attn_up })
    }
}

/// diffusers `UNet2DConditionModel`.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub time_embedding: TimestepEmbedding<B>,
    pub down_blocks: Vec<DownBlock2D<B>>,
    pub mid_block: MidBlock2DCrossAttn<B>,
    pub up_blocks: Vec<UpBlock2D<B>>,
    pub conv_norm_out: GroupNorm32<B>,
    pub conv_out: Conv2d<B>,
    pub time_proj_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub center_input_sample: bool,
}

impl UNetLayout {
    /// Builds the UNet with lazily-initialised random weights (weights.rs loads real ones over them).
    pub fn init<B: Backend>(&self, device: &B::Device) -> UNet2DConditionModel<B> {
        let c = &self.config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let transformer = |cross: bool, i: usize, channels: usize| {
            cross.then(|| TransformerConfig {
                channels,
                heads: self.heads[i],
                head_dim: channels / self.heads[i],
                layers: self.transformer_layers[i],
                cross_attention_dim: c.cross_attention_dim,
                groups: c.norm_num_groups,
                use_linear_projection: c.use_linear_projection,
            })
        };
        let block = |in_channels, out_channels, num_layers, transformer, resample| BlockConfig {
            in_channels,
            out_channels,
            temb_channels: Some(temb),
            num_layers,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            transformer,
            resample,
            downsample_padding: c.downsample_padding,
        };

        // 1. down: block i maps ch[i-1] (ch[0] for the first) to ch[i]
        let down_blocks = (0..n)
            .map(|i| {
                let input = if i == 0 { ch[0] } else { ch[i - 1] };
                let cfg = block(
                    input,
                    ch[i],
                    c.layers_per_block,
                    transformer(self.cross_attn_down[i], i, ch[i]),
                    i + 1 < n,
                );
                DownBlock2D::new(&cfg, device)
            })
            .collect();

        // 2. mid, at the deepest width with the last block's heads
        let mid = block(ch[n - 1], ch[n - 1], 1, transformer(true, n - 1, ch[n - 1]), false);

        // 3. up: mirrored; up block i outputs ch[n-1-i] and its last resnet takes the skip of width
        //    ch[n-2-i] (diffusers' `input_channel = reversed[min(i + 1, n - 1)]`)
        let mut prev = ch[n - 1];
        let up_blocks = (0..n)
            .map(|i| {
                let out = ch[n - 1 - i];
                let input = ch[n - 1 - (i + 1).min(n - 1)];
                let heads_index = n - 1 - i;
                let cfg = block(
                    input,
                    out,
                    c.layers_per_block + 1,
                    transformer(self.cross_attn_up[i], heads_index, out),
                    i + 1 < n,
                );
                let up = UpBlock2D::new_unet(&cfg, prev, device);
                prev = out;
                up
            })
            .collect();

        UNet2DConditionModel {
            conv_in: conv2d(c.in_channels, ch[0], 3, device),
            time_embedding: TimestepEmbedding::new(ch[0], temb, device),
            down_blocks,
            mid_block: MidBlock2DCrossAttn::new(&mid, device),
            up_blocks,
            conv_norm_out: GroupNorm32::new(c.norm_num_groups, ch[0], c.norm_eps, device),
            conv_out: conv2d(ch[0], c.out_channels, 3, device),
            time_proj_channels: ch[0],
            flip_sin_to_cos: c.flip_sin_to_cos,
            freq_shift: c.freq_shift,
            center_input_sample: c.center_input_sample,
        }
    }
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Predicts the noise (or v) for `sample` [b, c, h, w] at `timesteps` [b] (integer or float values)
    /// given `encoder_hidden_states` [b, seq, cross_attention_dim].
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        // 0. center the input if asked
        let sample = if self.center_input_sample { sample * 2.0 - 1.0 } else { sample };

        // 1. time
        let t_features =
            timestep_features(timesteps, self.time_proj_channels, self.flip_sin_to_cos, self.freq_shift);
        let temb = self.time_embedding.forward(cast_back(t_features, sample.dtype()));

        // 2. pre-process
        let mut x = self.conv_in.forward(sample);

        // 3. down
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(x, Some(&temb), Some(&encoder_hidden_states));
            x = out;
            skips.extend(states);
        }

        // 4. mid
        x = self.mid_block.forward(x, &temb, &encoder_hidden_states);

        // 5. up: each block consumes as many skips as it has resnets; its upsampler targets the size of
        //    the skips the next block will consume
        for block in &self.up_blocks {
            let remaining = skips.len() - block.resnets.len();
            let upsample_size = (remaining > 0).then(|| {
                let [_, _, h, w] = skips[remaining - 1].dims();
                [h, w]
            });
            x = block.forward_with_skips(x, &mut skips, &temb, &encoder_hidden_states, upsample_size);
        }

        // 6. post-process
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}
