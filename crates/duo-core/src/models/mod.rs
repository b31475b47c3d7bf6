//! The Stable Diffusion networks, one file per diffusers module family. Field paths equal diffusers'
//! weight keys (see `weights.rs` for the few exceptions).

pub mod attention;
pub mod autoencoder_kl;
pub mod clip_text;
pub mod config;
pub mod embeddings;
pub mod layers;
pub mod resnet;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
pub use clip_text::{ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel, UNetLayout};
