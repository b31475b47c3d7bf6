//! Attention and the SD transformer blocks (diffusers `attention_processor.py`, `attention.py`,
//! `transformers/transformer_2d.py`).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::prelude::*;
use burn::tensor::activation::gelu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::attention_backward::try_memory_efficient;
use super::layers::{GroupNorm32, LayerNorm, Linear, torch_conv_init};

/// Attention maps of at least this many values (16 MiB in f32) are recomputed in the backward pass
/// rather than stored; below it, storing is cheaper than recomputing (the toy UNet's training
/// step is 10–20% faster with its 64-token maps stored).
const RECOMPUTE_MAPS_FROM: usize = 1 << 22;

/// Multi-head scaled dot-product attention on `[batch, len, heads·head_dim]` projections.
///
/// The single place where the kernel is chosen: Burn's fused `module::attention` (flash kernels on
/// CubeCL backends, a tiled path on Flex). When training, the non-causal attentions (the UNet's and
/// the VAE's) with large maps record a backward pass that recomputes the attention map
/// ([`try_memory_efficient`]); the others, such as the text encoder's causal one, take Burn's
/// decomposed form. The scale is left to its 1/√head_dim default so CubeCL may pick a
/// fused kernel.
pub fn multi_head_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Tensor<B, 3> {
    let [batch, len_q, inner] = q.dims();
    let len_kv = k.dims()[1];
    let head_dim = inner / heads;
    let split = |x: Tensor<B, 3>, len: usize| x.reshape([batch, len, heads, head_dim]).swap_dims(1, 2);
    let qkv = (split(q, len_q), split(k, len_kv), split(v, len_kv));
    let map_size = batch * heads * len_q * len_kv;
    let recomputing =
        if causal || map_size < RECOMPUTE_MAPS_FROM { Err(qkv) } else { try_memory_efficient(qkv) };
    let out = recomputing.unwrap_or_else(|(q, k, v)| {
        let options = AttentionModuleOptions { is_causal: causal, ..Default::default() };
        attention(q, k, v, None, None, options)
    });
    out.swap_dims(1, 2).reshape([batch, len_q, inner])
}

/// diffusers `Attention` (self- or cross-attention). `to_out` is a one-element list so its weights keep
/// diffusers' key `to_out.0`.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Only in the VAE's mid-block attention, which normalises its own input.
    pub group_norm: Option<GroupNorm32<B>>,
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    pub to_out: Vec<Linear<B>>,
    pub heads: usize,
}

impl<B: Backend> Attention<B> {
    /// `context_dim`: the key/value input width (the query width for self-attention).
    pub fn new(
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        device: &B::Device,
    ) -> Self {
        let inner = heads * head_dim;
        Self {
            group_norm: None,
            to_q: Linear::new(query_dim, inner, qkv_bias, device),
            to_k: Linear::new(context_dim, inner, qkv_bias, device),
            to_v: Linear::new(context_dim, inner, qkv_bias, device),
            to_out: vec![Linear::new(inner, query_dim, true, device)],
            heads,
        }
    }

    /// `x` [b, n, query_dim]; `context` [b, m, context_dim] for cross-attention, None for self-attention.
    pub fn forward(&self, x: Tensor<B, 3>, context: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let context = context.unwrap_or_else(|| x.clone());
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(context.clone());
        let v = self.to_v.forward(context);
        let out = multi_head_attention(q, k, v, self.heads, false);
        self.to_out[0].forward(out)
    }

    /// The VAE's spatial self-attention on [b, c, h, w] with its residual connection.
    pub fn forward_spatial(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let normed = match &self.group_norm {
            Some(norm) => norm.forward(x.clone()),
            None => x.clone(),
        };
        let seq = normed.reshape([b, c, h * w]).swap_dims(1, 2); // [b, hw, c]
        let out = self.forward(seq, None);
        out.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

/// GEGLU feed-forward: `proj_in` (diffusers `ff.net.0.proj`) → value·GELU(gate) → `proj_out` (`ff.net.2`).
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub proj_in: Linear<B>,
    pub proj_out: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    pub fn new(dim: usize, device: &B::Device) -> Self {
        let inner = dim * 4;
        Self {
            proj_in: Linear::new(dim, inner * 2, true, device),
            proj_out: Linear::new(inner, dim, true, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let mut halves = self.proj_in.forward(x).chunk(2, 2);
        // Each half is a strided view of the projection. Laid out on its own first (one tiled copy
        // each), GELU and the product walk memory in order: on Flex, vectorised instead of an
        // element at a time. The values are the same.
        let laid_out = |half: Tensor<B, 3>| {
            let dims = half.dims();
            half.reshape([dims.iter().product::<usize>()]).reshape(dims)
        };
        let gate = laid_out(halves.pop().expect("chunk(2) yields two halves"));
        let value = laid_out(halves.pop().expect("chunk(2) yields two halves"));
        self.proj_out.forward(value * gelu(gate))
    }
}

/// diffusers `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each
/// pre-normalised with LayerNorm and residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn1: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub attn2: Attention<B>,
    pub norm3: LayerNorm<B>,
    pub ff: FeedForward<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
        device: &B::Device,
    ) -> Self {
        let norm = || LayerNorm::new(dim, 1e-5, device);
        Self {
            norm1: norm(),
            attn1: Attention::new(dim, dim, heads, head_dim, false, device),
            norm2: norm(),
            attn2: Attention::new(dim, cross_attention_dim, heads, head_dim, false, device),
            norm3: norm(),
            ff: FeedForward::new(dim, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>, context: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self.attn2.forward(self.norm2.forward(x.clone()), Some(context)) + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// diffusers `Transformer2DModel` (continuous input, one or more `BasicTransformerBlock`s).
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: Backend> {
    // The projections are 1×1 convs in SD 1.x and linear layers with `use_linear_projection` (SD 2.x);
    // diffusers names both `proj_in`/`proj_out`, so weights.rs maps the linear ones' keys.
    pub norm: GroupNorm32<B>,
    pub proj_in: Option<Conv2d<B>>,
    pub proj_in_linear: Option<Linear<B>>,
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    pub proj_out: Option<Conv2d<B>>,
    pub proj_out_linear: Option<Linear<B>>,
}

pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

impl<B: Backend> Transformer2DModel<B> {
    pub fn new(c: &TransformerConfig, device: &B::Device) -> Self {
        let inner = c.heads * c.head_dim;
        let conv = |a: usize, b: usize| {
            Conv2dConfig::new([a, b], [1, 1]).with_initializer(torch_conv_init(a)).init(device)
        };
        let (proj_in, proj_in_linear, proj_out, proj_out_linear) = if c.use_linear_projection {
            (
                None,
                Some(Linear::new(c.channels, inner, true, device)),
                None,
                Some(Linear::new(inner, c.channels, true, device)),
            )
        } else {
            (Some(conv(c.channels, inner)), None, Some(conv(inner, c.channels)), None)
        };
        Self {
            norm: GroupNorm32::new(c.groups, c.channels, 1e-6, device),
            proj_in,
            proj_in_linear,
            transformer_blocks: (0..c.layers)
                .map(|_| {
                    BasicTransformerBlock::new(inner, c.heads, c.head_dim, c.cross_attention_dim, device)
                })
                .collect(),
            proj_out,
            proj_out_linear,
        }
    }

    /// `x` [b, c, h, w], `context` [b, seq, cross_attention_dim].
    pub fn forward(&self, x: Tensor<B, 4>, context: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = self.norm.forward(x);
        let to_seq = |x: Tensor<B, 4>| {
            let inner = x.dims()[1];
            x.reshape([b, inner, h * w]).swap_dims(1, 2)
        };
        let mut seq = match (&self.proj_in, &self.proj_in_linear) {
            (Some(conv), _) => to_seq(conv.forward(x)),
            (None, Some(linear)) => linear.forward(to_seq(x)),
            (None, None) => unreachable!("Transformer2DModel::new always sets one projection"),
        };
        for block in &self.transformer_blocks {
            seq = block.forward(seq, context.clone());
        }
        let inner = seq.dims()[2];
        let from_seq = |s: Tensor<B, 3>, ch: usize| s.swap_dims(1, 2).reshape([b, ch, h, w]);
        let out = match (&self.proj_out, &self.proj_out_linear) {
            (Some(conv), _) => conv.forward(from_seq(seq, inner)),
            (None, Some(linear)) => from_seq(linear.forward(seq), c),
            (None, None) => unreachable!("Transformer2DModel::new always sets one projection"),
        };
        out + residual
    }
}
