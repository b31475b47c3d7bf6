//! The Stable Diffusion networks, one file per diffusers module family. Field paths equal diffusers'
//! weight keys (see `weights.rs` for the few exceptions).

pub mod attention;
pub mod attention_backward;
pub mod autoencoder_kl;
pub mod clip;
pub mod clip_text;
pub mod config;
pub mod embeddings;
pub mod layers;
pub mod resnet;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
pub use clip::{ClipModel, unit_rows};
pub use clip_text::{ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel, UNetLayout};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::FloatDType;

/// `module` with every float parameter cast to `dtype` (e.g. an f16 VAE as f32 for encoding).
pub fn cast_floats<B: Backend, M: Module<B>>(module: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl<B: Backend> ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            Param::from_mapped_value(id, tensor.cast(self.0), mapper)
        }
    }
    module.map(&mut Cast(dtype))
}

/// Number of float parameters, read from their (possibly lazy) shapes: unlike `Module::num_params`
/// it does not initialise lazy parameters, so counting the full SD 1.4 UNet costs nothing.
pub fn parameter_count<B: Backend, M: Module<B>>(module: &M) -> usize {
    struct Counter(usize);
    impl<B: Backend> ModuleVisitor<B> for Counter {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 += param.lazy_shape().num_elements();
        }
    }
    let mut counter = Counter(0);
    module.visit(&mut counter);
    counter.0
}
