//! A diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`): each
//! component is built from its own config and loaded from its own weights, only when asked for.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;

use crate::error::{DuoError, Result};
use crate::models::{
    AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, UNet2DConditionConfig,
};
use crate::models::{UNet2DConditionModel, UNetLayout};
use crate::weights::{self, load_safetensors};

#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
    /// e.g. "fp16" reads `diffusion_pytorch_model.fp16.safetensors`.
    variant: Option<String>,
    /// The float dtype weights are loaded as.
    dtype: DType,
}

impl ModelFolder {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(DuoError::io(
                &root,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "model folder not found (expected a diffusers pipeline folder)",
                ),
            ));
        }
        Ok(Self { root, variant: None, dtype: DType::F32 })
    }

    pub fn with_variant(mut self, variant: Option<String>) -> Self {
        self.variant = variant;
        self
    }

    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<component>/<file>`, or an error naming it and saying what the component is for.
    pub fn file(&self, component: &str, file: &str) -> Result<PathBuf> {
        let path = self.root.join(component).join(file);
        if path.is_file() {
            Ok(path)
        } else {
            Err(DuoError::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("missing: this command needs the `{component}` component of the model folder"),
                ),
            ))
        }
    }

    /// The weights file of a component: `<stem>[.<variant>].safetensors`. `bin_stem` names the PyTorch
    /// pickle diffusers/transformers would save instead, to say so when only that one exists.
    fn weights_file(&self, component: &str, stem: &str, bin_stem: &str) -> Result<PathBuf> {
        let name = match &self.variant {
            Some(v) => format!("{stem}.{v}.safetensors"),
            None => format!("{stem}.safetensors"),
        };
        let path = self.root.join(component).join(&name);
        if path.is_file() {
            return Ok(path);
        }
        let bin = self.root.join(component).join(format!("{bin_stem}.bin"));
        let hint = if bin.is_file() {
            format!(
                "; found {} but PyTorch .bin weights are not supported, convert them to safetensors",
                bin.display()
            )
        } else {
            String::new()
        };
        Err(DuoError::weights(&path, format!("weight file not found{hint}")))
    }

    pub fn unet_layout(&self) -> Result<UNetLayout> {
        let path = self.file("unet", "config.json")?;
        UNet2DConditionConfig::from_file(&path)?.layout(&path)
    }

    pub fn unet<B: Backend>(&self, device: &B::Device) -> Result<UNet2DConditionModel<B>> {
        let layout = self.unet_layout()?;
        let file = self.weights_file("unet", "diffusion_pytorch_model", "diffusion_pytorch_model")?;
        let mut remaps = weights::UNET_REMAPS.to_vec();
        if layout.config.use_linear_projection {
            remaps.extend_from_slice(weights::UNET_LINEAR_PROJECTION_REMAPS);
        }
        load_safetensors(layout.init(device), &file, &remaps, self.dtype, &[])
    }

    pub fn vae_config(&self) -> Result<AutoencoderKLConfig> {
        AutoencoderKLConfig::from_file(&self.file("vae", "config.json")?)
    }

    pub fn vae<B: Backend>(&self, device: &B::Device) -> Result<AutoencoderKL<B>> {
        let config = self.vae_config()?;
        let file = self.weights_file("vae", "diffusion_pytorch_model", "diffusion_pytorch_model")?;
        load_safetensors(config.init(device), &file, weights::VAE_REMAPS, self.dtype, &[])
    }

    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        ClipTextConfig::from_file(&self.file("text_encoder", "config.json")?)
    }

    pub fn text_encoder<B: Backend>(&self, device: &B::Device) -> Result<ClipTextModel<B>> {
        let config = self.text_encoder_config()?;
        let file = self.weights_file("text_encoder", "model", "pytorch_model")?;
        load_safetensors(config.init(device), &file, weights::CLIP_REMAPS, self.dtype, weights::CLIP_IGNORED)
    }
}
