//! diffusers `AutoencoderKL` (the SD VAE), built from the folder's `vae/config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;
use serde::Deserialize;
use serde_json::{Value, json};

use super::config::check_other_keys;
use super::layers::{GroupNorm32, conv2d, torch_conv_init};
use super::unet_2d_blocks::{BlockConfig, DownBlock2D, MidBlock2D, UpBlock2D};
use crate::error::{DuoError, Result};

/// diffusers' VAE blocks use this epsilon everywhere.
const VAE_EPS: f64 = 1e-6;

#[derive(Deserialize, Debug, Clone)]
pub struct AutoencoderKLConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "encoder_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "decoder_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn groups() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn scaling() -> f64 {
    0.18215
}
fn channels() -> Vec<usize> {
    vec![64]
}
fn encoder_blocks() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn decoder_blocks() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}

impl AutoencoderKLConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = crate::error::read_json(path)?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<()> {
        check_other_keys(
            path,
            &self.other,
            &["sample_size", "force_upcast"],
            &[
                ("act_fn", json!("silu")),
                ("shift_factor", Value::Null),
                ("latents_mean", Value::Null),
                ("latents_std", Value::Null),
            ],
        )?;
        let err = |m: String| DuoError::config(path, m);
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(err("block_out_channels is empty".into()));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(err(format!(
                "down_block_types ({}) and up_block_types ({}) need one entry per block_out_channels ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return Err(err(format!("down_block_types: block type {t} is not implemented")));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(err(format!("up_block_types: block type {t} is not implemented")));
        }
        for (i, &ch) in self.block_out_channels.iter().enumerate() {
            if self.norm_num_groups == 0 || ch % self.norm_num_groups != 0 {
                return Err(err(format!(
                    "norm_num_groups={} does not divide block_out_channels[{i}]={ch}",
                    self.norm_num_groups
                )));
            }
        }
        Ok(())
    }

    /// Pixels per latent cell along each side: 2^(blocks − 1) (8 for SD).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> AutoencoderKL<B> {
        let ch = &self.block_out_channels;
        let n = ch.len();
        let g = self.norm_num_groups;
        let block = |in_channels, out_channels, num_layers, resample| BlockConfig {
            in_channels,
            out_channels,
            temb_channels: None,
            num_layers,
            groups: g,
            eps: VAE_EPS,
            transformer: None,
            resample,
            downsample_padding: 0,
        };
        let conv1x1 = |a: usize, b: usize| {
            Conv2dConfig::new([a, b], [1, 1]).with_initializer(torch_conv_init(a)).init(device)
        };
        let latent = self.latent_channels;
        let encoder = Encoder {
            conv_in: conv2d(self.in_channels, ch[0], 3, device),
            down_blocks: (0..n)
                .map(|i| {
                    let input = if i == 0 { ch[0] } else { ch[i - 1] };
                    DownBlock2D::new(&block(input, ch[i], self.layers_per_block, i + 1 < n), device)
                })
                .collect(),
            mid_block: MidBlock2D::new(ch[n - 1], g, VAE_EPS, self.mid_block_add_attention, device),
            conv_norm_out: GroupNorm32::new(g, ch[n - 1], VAE_EPS, device),
            conv_out: conv2d(ch[n - 1], 2 * latent, 3, device),
        };
        let decoder = Decoder {
            conv_in: conv2d(latent, ch[n - 1], 3, device),
            mid_block: MidBlock2D::new(ch[n - 1], g, VAE_EPS, self.mid_block_add_attention, device),
            up_blocks: (0..n)
                .map(|i| {
                    let input = if i == 0 { ch[n - 1] } else { ch[n - i] };
                    UpBlock2D::new_decoder(
                        &block(input, ch[n - 1 - i], self.layers_per_block + 1, i + 1 < n),
                        device,
                    )
                })
                .collect(),
            conv_norm_out: GroupNorm32::new(g, ch[0], VAE_EPS, device),
            conv_out: conv2d(ch[0], self.out_channels, 3, device),
        };
        AutoencoderKL {
            encoder,
            decoder,
            quant_conv: self.use_quant_conv.then(|| conv1x1(2 * latent, 2 * latent)),
            post_quant_conv: self.use_post_quant_conv.then(|| conv1x1(latent, latent)),
            scaling_factor: self.scaling_factor,
        }
    }
}

#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub down_blocks: Vec<DownBlock2D<B>>,
    pub mid_block: MidBlock2D<B>,
    pub conv_norm_out: GroupNorm32<B>,
    pub conv_out: Conv2d<B>,
}

#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub mid_block: MidBlock2D<B>,
    pub up_blocks: Vec<UpBlock2D<B>>,
    pub conv_norm_out: GroupNorm32<B>,
    pub conv_out: Conv2d<B>,
}

/// diffusers `AutoencoderKL`.
#[derive(Module, Debug)]
pub struct AutoencoderKL<B: Backend> {
    pub encoder: Encoder<B>,
    pub decoder: Decoder<B>,
    pub quant_conv: Option<Conv2d<B>>,
    pub post_quant_conv: Option<Conv2d<B>>,
    pub scaling_factor: f64,
}

/// The encoder's diagonal Gaussian over latents (diffusers `DiagonalGaussianDistribution`).
pub struct LatentDistribution<B: Backend> {
    pub mean: Tensor<B, 4>,
    /// Clamped to [−30, 20] as diffusers does.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> LatentDistribution<B> {
    /// mean + std·noise, with `noise` ~ N(0, I) of the mean's shape (diffusers `sample(generator)`).
    pub fn sample(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        self.mean.clone() + (self.logvar.clone() * 0.5).exp() * noise
    }
}

impl<B: Backend> AutoencoderKL<B> {
    /// `image` [b, 3, H, W] in [−1, 1] → the latent distribution [b, latent_channels, H/f, W/f].
    pub fn encode(&self, image: Tensor<B, 4>) -> LatentDistribution<B> {
        let e = &self.encoder;
        let mut x = e.conv_in.forward(image);
        for block in &e.down_blocks {
            x = block.forward(x, None, None).0;
        }
        x = e.mid_block.forward(x);
        let mut moments = e.conv_out.forward(silu(e.conv_norm_out.forward(x)));
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(moments);
        }
        let mut halves = moments.chunk(2, 1);
        let logvar = halves.pop().expect("chunk(2) yields two halves").clamp(-30.0, 20.0);
        let mean = halves.pop().expect("chunk(2) yields two halves");
        LatentDistribution { mean, logvar }
    }

    /// `latents` [b, latent_channels, h, w] (unscaled) → image [b, 3, h·f, w·f] in about [−1, 1].
    pub fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let d = &self.decoder;
        let mut x = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents,
        };
        x = d.conv_in.forward(x);
        x = d.mid_block.forward(x);
        for block in &d.up_blocks {
            x = block.forward(x);
        }
        d.conv_out.forward(silu(d.conv_norm_out.forward(x)))
    }
}
