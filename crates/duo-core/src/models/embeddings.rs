//! Timestep embeddings (diffusers `embeddings.py`: `Timesteps`, `TimestepEmbedding`).

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::activation::silu;

use super::layers::Linear;

/// Sinusoidal features of the timestep, as diffusers' `get_timestep_embedding`.
///
/// The frequencies are computed host-side in f32 with the same operation order as PyTorch, so the
/// rounding matches: at t≈1000 the argument of sin/cos is large and f64 frequencies would differ by
/// ~1e-4 after the product.
pub fn timestep_features<B: Backend>(
    timesteps: Tensor<B, 1>,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor<B, 2> {
    const MAX_PERIOD: f64 = 10000.0;
    let half = dim / 2;
    let scale = -(MAX_PERIOD.ln() as f32);
    let denominator = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((i as f32) * scale / denominator).exp()).collect();
    let device = timesteps.device();
    let freqs = Tensor::<B, 1>::from_data(TensorData::new(freqs, [half]), &device).unsqueeze::<2>();
    let args = timesteps.unsqueeze_dim::<2>(1) * freqs; // [batch, half]
    let (first, second) =
        if flip_sin_to_cos { (args.clone().cos(), args.sin()) } else { (args.clone().sin(), args.cos()) };
    let emb = Tensor::cat(vec![first, second], 1);
    if dim % 2 == 1 {
        // zero pad, as diffusers does for odd dims
        let batch = emb.dims()[0];
        return Tensor::cat(vec![emb, Tensor::zeros([batch, 1], &device)], 1);
    }
    emb
}

/// `linear_1 → SiLU → linear_2` (diffusers `TimestepEmbedding` with act_fn "silu").
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    pub fn new(in_channels: usize, time_embed_dim: usize, device: &B::Device) -> Self {
        Self {
            linear_1: Linear::new(in_channels, time_embed_dim, true, device),
            linear_2: Linear::new(time_embed_dim, time_embed_dim, true, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}
