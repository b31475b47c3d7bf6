//! The UNet's and the VAE's down, mid and up blocks (diffusers `unet_2d_blocks.py`).
//!
//! A plain and a cross-attention block are one struct with an empty `attentions` list, so the field
//! paths stay equal to diffusers' keys (`down_blocks.1.attentions.0...`) with no wrapper.

use burn::module::Module;
use burn::prelude::*;

use super::attention::{Attention, Transformer2DModel, TransformerConfig};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};

/// `CrossAttnDownBlock2D` / `DownBlock2D` (UNet) and `DownEncoderBlock2D` (VAE).
#[derive(Module, Debug)]
pub struct DownBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
    pub downsamplers: Vec<Downsample2D<B>>,
}

/// How to build one down or up block.
pub struct BlockConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub num_layers: usize,
    pub groups: usize,
    pub eps: f64,
    /// `Some` for cross-attention blocks.
    pub transformer: Option<TransformerConfig>,
    /// Add a resampler at the end (every block but the last).
    pub resample: bool,
    /// Downsampler padding: 1 in the UNet, 0 in the VAE.
    pub downsample_padding: usize,
}

impl BlockConfig {
    fn resnet(&self, in_channels: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels: self.out_channels,
            temb_channels: self.temb_channels,
            groups: self.groups,
            eps: self.eps,
        }
    }

    fn transformers<B: Backend>(&self, device: &B::Device) -> Vec<Transformer2DModel<B>> {
        match &self.transformer {
            Some(t) => (0..self.num_layers).map(|_| Transformer2DModel::new(t, device)).collect(),
            None => Vec::new(),
        }
    }
}

impl<B: Backend> DownBlock2D<B> {
    pub fn new(c: &BlockConfig, device: &B::Device) -> Self {
        let resnets = (0..c.num_layers)
            .map(|i| {
                ResnetBlock2D::new(&c.resnet(if i == 0 { c.in_channels } else { c.out_channels }), device)
            })
            .collect();
        let downsamplers = if c.resample {
            vec![Downsample2D::new(c.out_channels, c.downsample_padding, device)]
        } else {
            vec![]
        };
        Self { resnets, attentions: c.transformers(device), downsamplers }
    }

    /// Returns the block output and the skip states it adds (one per layer, plus the downsampled one).
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: Option<&Tensor<B, 2>>,
        context: Option<&Tensor<B, 3>>,
    ) -> (Tensor<B, 4>, Vec<Tensor<B, 4>>) {
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, temb);
            if let (Some(attn), Some(context)) = (self.attentions.get(i), context) {
                x = attn.forward(x, context.clone());
            }
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        (x, skips)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) per layer.
#[derive(Module, Debug)]
pub struct MidBlock2DCrossAttn<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
}

impl<B: Backend> MidBlock2DCrossAttn<B> {
    pub fn new(c: &BlockConfig, device: &B::Device) -> Self {
        let resnet = c.resnet(c.in_channels);
        Self {
            resnets: (0..=c.num_layers).map(|_| ResnetBlock2D::new(&resnet, device)).collect(),
            attentions: c.transformers(device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>, temb: &Tensor<B, 2>, context: &Tensor<B, 3>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, Some(temb));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(attn.forward(x, context.clone()), Some(temb));
        }
        x
    }
}

/// The VAE's `UNetMidBlock2D`: resnet, spatial self-attention, resnet.
#[derive(Module, Debug)]
pub struct MidBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Attention<B>>,
}

impl<B: Backend> MidBlock2D<B> {
    pub fn new(channels: usize, groups: usize, eps: f64, with_attention: bool, device: &B::Device) -> Self {
        let resnet =
            ResnetConfig { in_channels: channels, out_channels: channels, temb_channels: None, groups, eps };
        let attentions = if with_attention {
            // One head spanning all channels (diffusers: attention_head_dim = channels), with biases.
            let mut attn = Attention::new(channels, channels, 1, channels, true, device);
            attn.group_norm = Some(super::layers::GroupNorm32::new(groups, channels, eps, device));
            vec![attn]
        } else {
            vec![]
        };
        Self { resnets: (0..2).map(|_| ResnetBlock2D::new(&resnet, device)).collect(), attentions }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, None);
        if let Some(attn) = self.attentions.first() {
            x = attn.forward_spatial(x);
        }
        self.resnets[1].forward(x, None)
    }
}

/// `CrossAttnUpBlock2D` / `UpBlock2D` (UNet, with skip connections) and `UpDecoderBlock2D` (VAE).
#[derive(Module, Debug)]
pub struct UpBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
    pub upsamplers: Vec<Upsample2D<B>>,
}

impl<B: Backend> UpBlock2D<B> {
    /// A UNet up block. `prev_channels`: the previous up block's output; `skip_channels(i)`: the width
    /// of the skip state consumed by resnet `i` (diffusers' `res_skip_channels`).
    pub fn new_unet(c: &BlockConfig, prev_channels: usize, device: &B::Device) -> Self {
        let resnets = (0..c.num_layers)
            .map(|i| {
                let skip = if i == c.num_layers - 1 { c.in_channels } else { c.out_channels };
                let input = if i == 0 { prev_channels } else { c.out_channels };
                ResnetBlock2D::new(&c.resnet(input + skip), device)
            })
            .collect();
        Self { resnets, attentions: c.transformers(device), upsamplers: Self::upsamplers(c, device) }
    }

    /// A VAE decoder block (no skip connections).
    pub fn new_decoder(c: &BlockConfig, device: &B::Device) -> Self {
        let resnets = (0..c.num_layers)
            .map(|i| {
                ResnetBlock2D::new(&c.resnet(if i == 0 { c.in_channels } else { c.out_channels }), device)
            })
            .collect();
        Self { resnets, attentions: Vec::new(), upsamplers: Self::upsamplers(c, device) }
    }

    fn upsamplers(c: &BlockConfig, device: &B::Device) -> Vec<Upsample2D<B>> {
        if c.resample { vec![Upsample2D::new(c.out_channels, device)] } else { vec![] }
    }

    /// UNet up block: each resnet consumes the last remaining skip state (concatenated on channels).
    /// `upsample_size`: the spatial size of the next block's skips, so odd sizes round-trip.
    pub fn forward_with_skips(
        &self,
        mut x: Tensor<B, 4>,
        skips: &mut Vec<Tensor<B, 4>>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<B, 4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("the UNet pushes one skip state per up-block resnet");
            x = resnet.forward(Tensor::cat(vec![x, skip], 1), Some(temb));
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x, context.clone());
            }
        }
        for up in &self.upsamplers {
            x = up.forward(x, upsample_size);
        }
        x
    }

    /// VAE decoder block.
    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for resnet in &self.resnets {
            x = resnet.forward(x, None);
        }
        for up in &self.upsamplers {
            x = up.forward(x, None);
        }
        x
    }
}
