//! Small layers shared by the UNet, the VAE and the text encoder.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

use crate::lora::LoraAdapter;

/// A linear layer, `y = x·W + b` with `W` stored `[d_in, d_out]`, plus an optional LoRA adapter
/// (`lora.rs`) adding `scale·(x·A)·B` while it is switched on.
///
/// The struct must keep the name `Linear`: burn-store's PyTorch adapter transposes the 2-D `weight`
/// of modules by that name, so diffusers' `[d_out, d_in]` weights load unchanged. It is our own type
/// (not `burn::nn::Linear`) so that the LoRA adapters can live inside it. With `lora: None` the
/// layer has exactly the parameters (and weight keys) of diffusers' `nn.Linear`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Linear<B> {
    pub fn new(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        // PyTorch's nn.Linear default: U(-1/√d_in, 1/√d_in) for weight and bias.
        let bound = 1.0 / (d_in as f64).sqrt();
        let init = Initializer::Uniform { min: -bound, max: bound };
        Self {
            weight: init.init_with([d_in, d_out], Some(d_in), Some(d_out), device),
            bias: bias.then(|| init.init_with([d_out], Some(d_in), Some(d_out), device)),
            lora: None,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // Weight before bias: lazy params draw their random init at first read, and this order is
        // what the shipped judge was trained with (`duo-bench judge-train` reproduces it).
        let weight = self.weight.val();
        let bias = self.bias.as_ref().map(Param::val);
        match self.lora.as_ref().filter(|lora| lora.is_enabled()) {
            Some(lora) => burn::tensor::module::linear(x.clone(), weight, bias) + lora.forward(x),
            None => burn::tensor::module::linear(x, weight, bias),
        }
    }
}

/// GroupNorm that accumulates its statistics in f32 whatever the activations' dtype: Burn 0.21's
/// `nn::GroupNorm` sums in the input dtype, which overflows in f16 for SD-sized groups (burn #5382).
/// Fields are named `weight`/`bias` as in PyTorch, so diffusers keys load without a rename.
#[derive(Module, Debug)]
pub struct GroupNorm32<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub num_groups: usize,
    pub epsilon: f64,
}

impl<B: Backend> GroupNorm32<B> {
    pub fn new(num_groups: usize, channels: usize, epsilon: f64, device: &B::Device) -> Self {
        Self {
            weight: Initializer::Ones.init([channels], device),
            bias: Initializer::Zeros.init([channels], device),
            num_groups,
            epsilon,
        }
    }

    /// `x`: [batch, channels, height, width].
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, channels, height, width] = x.dims();
        let dtype = x.dtype();
        let grouped = x.reshape([batch, self.num_groups, (channels / self.num_groups) * height * width]);
        let grouped = grouped.cast(FloatDType::F32);
        let (var, mean) = grouped.clone().var_mean_bias(2);
        let normed = (grouped - mean).div((var + self.epsilon).sqrt());
        let normed = cast_back(normed, dtype).reshape([batch, channels, height, width]);
        // One value per (image, channel), laid out as such: Flex applies that to each row of
        // height·width values in one vectorised pass, where a [1, C, 1, 1] broadcast over the batch
        // walks the tensor an element at a time. The products and sums are the same.
        let per_row =
            |p: Tensor<B, 1>| p.reshape([1, channels]).repeat_dim(0, batch).reshape([batch, channels, 1, 1]);
        normed * per_row(self.weight.val()) + per_row(self.bias.val())
    }
}

/// Casts an f32 intermediate back to the activations' dtype.
pub fn cast_back<const D: usize, B: Backend>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    match dtype {
        DType::F16 => x.cast(FloatDType::F16),
        DType::BF16 => x.cast(FloatDType::BF16),
        DType::F64 => x.cast(FloatDType::F64),
        _ => x,
    }
}

/// A k×k convolution with "same" padding (k odd) and optional stride, as diffusers' Conv2d(k, padding=k//2).
pub fn conv2d<B: Backend>(c_in: usize, c_out: usize, kernel: usize, device: &B::Device) -> Conv2d<B> {
    let pad = kernel / 2;
    Conv2dConfig::new([c_in, c_out], [kernel, kernel])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_initializer(torch_conv_init(c_in * kernel * kernel))
        .init(device)
}

/// PyTorch's Conv2d default init bound (kaiming_uniform with a=√5 ⇒ U(±1/√fan_in)); only matters for
/// randomly initialised models (perf runs, tests); trained weights overwrite it.
pub fn torch_conv_init(fan_in: usize) -> Initializer {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Initializer::Uniform { min: -bound, max: bound }
}

/// LayerNorm over the last dimension, statistics in f32. Fields are named `weight`/`bias` as in
/// PyTorch so diffusers/transformers keys load as they are.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub epsilon: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(dim: usize, epsilon: f64, device: &B::Device) -> Self {
        Self {
            weight: Initializer::Ones.init([dim], device),
            bias: Initializer::Zeros.init([dim], device),
            epsilon,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let normed = cast_back((x - mean).div((var + self.epsilon).sqrt()), dtype);
        normed * self.weight.val().unsqueeze() + self.bias.val().unsqueeze()
    }
}
