//! Residual blocks and resamplers (diffusers `resnet.py`, `downsampling.py`, `upsampling.py`).

use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use super::layers::{GroupNorm32, Linear, conv2d, torch_conv_init};
use crate::device::float_dtype;

/// diffusers `ResnetBlock2D` with `time_embedding_norm="default"`, SiLU, output_scale_factor 1.
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    pub norm1: GroupNorm32<B>,
    pub conv1: Conv2d<B>,
    /// Absent in the VAE, whose blocks take no time embedding.
    pub time_emb_proj: Option<Linear<B>>,
    pub norm2: GroupNorm32<B>,
    pub conv2: Conv2d<B>,
    /// 1×1 projection of the input when the channel count changes.
    pub conv_shortcut: Option<Conv2d<B>>,
}

pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
}

impl<B: Backend> ResnetBlock2D<B> {
    pub fn new(c: &ResnetConfig, device: &B::Device) -> Self {
        let conv_shortcut = (c.in_channels != c.out_channels).then(|| {
            Conv2dConfig::new([c.in_channels, c.out_channels], [1, 1])
                .with_initializer(torch_conv_init(c.in_channels))
                .init(device)
        });
        Self {
            norm1: GroupNorm32::new(c.groups, c.in_channels, c.eps, device),
            conv1: conv2d(c.in_channels, c.out_channels, 3, device),
            time_emb_proj: c.temb_channels.map(|t| Linear::new(t, c.out_channels, true, device)),
            norm2: GroupNorm32::new(c.groups, c.out_channels, c.eps, device),
            conv2: conv2d(c.out_channels, c.out_channels, 3, device),
            conv_shortcut,
        }
    }

    /// `x` [b, c_in, h, w], `temb` [b, temb_channels] (None in the VAE) → [b, c_out, h, w].
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<&Tensor<B, 2>>) -> Tensor<B, 4> {
        let mut h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(silu(temb.clone())); // [b, c_out]
            h = h + t.unsqueeze_dim::<3>(2).unsqueeze_dim::<4>(3);
        }
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        shortcut + h
    }
}

/// Strided 3×3 convolution halving the resolution (diffusers `Downsample2D` with `use_conv=True`).
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    pub conv: Conv2d<B>,
    /// The VAE's one-sided padding (right and bottom), applied before the unpadded convolution.
    pad_right_bottom: bool,
}

impl<B: Backend> Downsample2D<B> {
    /// `padding` 1 in the UNet (symmetric); 0 in the VAE, where diffusers pads (0,1,0,1) by hand first,
    /// i.e. only right and bottom.
    pub fn new(channels: usize, padding: usize, device: &B::Device) -> Self {
        let conv = Conv2dConfig::new([channels, channels], [3, 3])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
            .with_initializer(torch_conv_init(channels * 9))
            .init(device);
        Self { conv, pad_right_bottom: padding == 0 }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if !self.pad_right_bottom {
            return self.conv.forward(x);
        }
        // By concatenation: Burn 0.21's asymmetric conv padding builds its zeros in f32 and panics
        // on f16/bf16 activations.
        let [b, c, h, w] = x.dims();
        let (device, dtype) = (x.device(), float_dtype(x.dtype()));
        let zeros = |shape: [usize; 4]| Tensor::<B, 4>::zeros(shape, &device).cast(dtype);
        let x = Tensor::cat(vec![x, zeros([b, c, h, 1])], 3);
        let x = Tensor::cat(vec![x, zeros([b, c, 1, w + 1])], 2);
        self.conv.forward(x)
    }
}

/// Nearest-neighbour ×2 (or to a given size) then a 3×3 convolution (diffusers `Upsample2D`).
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    pub conv: Conv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self { conv: conv2d(channels, channels, 3, device) }
    }

    /// `size`: the output [h, w]; `None` doubles. The UNet passes the skip connection's size so that
    /// odd latent sizes round-trip, as diffusers' `upsample_size`.
    pub fn forward(&self, x: Tensor<B, 4>, size: Option<[usize; 2]>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let size = size.unwrap_or([h * 2, w * 2]);
        let x = interpolate(x, size, InterpolateOptions::new(InterpolateMode::Nearest));
        self.conv.forward(x)
    }
}
