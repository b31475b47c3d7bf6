//! A diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`): each
//! component is built from its own config and loaded from its own weights, only when asked for. A
//! single-file checkpoint (`single_file.rs`) loads the same way: its weights from the file, its
//! configs, tokenizer and scheduler from a folder of configs.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;

use crate::error::{DuoError, Result};
use crate::models::{
    AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, UNet2DConditionConfig,
};
use crate::models::{UNet2DConditionModel, UNetLayout};
use crate::weights::{self, load_snapshots, load_weights};

#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
    /// e.g. "fp16" reads `diffusion_pytorch_model.fp16.safetensors`.
    variant: Option<String>,
    /// The float dtype weights are loaded as.
    dtype: DType,
    /// The weights of every network, when they come from one LDM single-file checkpoint.
    single_file: Option<PathBuf>,
}

/// The configs a single-file SD 1.x checkpoint is read with when none are named.
pub const SD1_CONFIGS: &str = "models/sd-v1-4-configs";

impl ModelFolder {
    /// A diffusers folder, or a single-file checkpoint (`.safetensors`, `.ckpt`): an SD 1.x one is
    /// read with the configs of [`SD1_CONFIGS`]; others need [`ModelFolder::open_single_file`].
    pub fn open(model: impl AsRef<Path>) -> Result<Self> {
        let model = model.as_ref();
        if model.is_file() { Self::open_single_file(model, None) } else { Self::open_folder(model) }
    }

    /// A single-file checkpoint with the configs, tokenizer and scheduler of the diffusers folder
    /// `configs` (default for SD 1.x: [`SD1_CONFIGS`]; SD 2.x has no default).
    pub fn open_single_file(file: &Path, configs: Option<&Path>) -> Result<Self> {
        if file.is_dir() {
            return Err(DuoError::Invalid(format!(
                "{} is a model folder: configs given apart (--config) go with a single-file checkpoint only",
                file.display()
            )));
        }
        let family = crate::single_file::SingleFile::open(file)?.family();
        let configs = match (configs, family) {
            (Some(dir), _) => dir.to_path_buf(),
            (None, crate::single_file::Family::Sd1) => PathBuf::from(SD1_CONFIGS),
            (None, crate::single_file::Family::Sd2) => {
                return Err(DuoError::weights(
                    file,
                    "an SD 2.x checkpoint (OpenCLIP text encoder): name the diffusers folder whose configs go with it \
                     (--config DIR, e.g. a stabilityai/stable-diffusion-2-1 folder; only its JSON/tokenizer files are read)",
                ));
            }
        };
        let mut folder = Self::open_folder(&configs)?;
        folder.single_file = Some(file.to_path_buf());
        Ok(folder)
    }

    fn open_folder(root: &Path) -> Result<Self> {
        let root = root.to_path_buf();
        if !root.is_dir() {
            return Err(DuoError::io(
                &root,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "model folder not found (expected a diffusers pipeline folder)",
                ),
            ));
        }
        Ok(Self { root, variant: None, dtype: DType::F32, single_file: None })
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

    /// The weights file of a component: `<stem>[.<variant>].safetensors`, else the PyTorch pickle
    /// `<bin_stem>[.<variant>].bin` that older diffusers/transformers saves hold.
    fn weights_file(&self, component: &str, stem: &str, bin_stem: &str) -> Result<PathBuf> {
        let name = |stem: &str, ext: &str| match &self.variant {
            Some(v) => format!("{stem}.{v}.{ext}"),
            None => format!("{stem}.{ext}"),
        };
        let safetensors = self.root.join(component).join(name(stem, "safetensors"));
        let pickle = self.root.join(component).join(name(bin_stem, "bin"));
        [&safetensors, &pickle].into_iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
            DuoError::weights(&safetensors, format!("weight file not found (nor {})", pickle.display()))
        })
    }

    pub fn unet_layout(&self) -> Result<UNetLayout> {
        let path = self.file("unet", "config.json")?;
        UNet2DConditionConfig::from_file(&path)?.layout(&path)
    }

    pub fn unet<B: Backend>(&self, device: &B::Device) -> Result<UNet2DConditionModel<B>> {
        let layout = self.unet_layout()?;
        let mut remaps = weights::UNET_REMAPS.to_vec();
        if layout.config.use_linear_projection {
            remaps.extend_from_slice(weights::UNET_LINEAR_PROJECTION_REMAPS);
        }
        if let Some(file) = &self.single_file {
            let tensors = crate::single_file::SingleFile::open(file)?.unet(&layout)?;
            return self.configs_hint(load_snapshots(
                layout.init(device),
                tensors,
                file,
                &remaps,
                self.dtype,
                &[],
            ));
        }
        let file = self.weights_file("unet", "diffusion_pytorch_model", "diffusion_pytorch_model")?;
        load_weights(layout.init(device), &file, &remaps, self.dtype, &[])
    }

    /// A single-file checkpoint that does not fit the configs: say where they came from.
    fn configs_hint<T>(&self, result: Result<T>) -> Result<T> {
        result.map_err(|e| {
            DuoError::Invalid(format!(
                "{e}. The networks were built from the configs in {}; a checkpoint of another size needs its own configs \
                 (`sample --config DIR`: a diffusers folder of that model, only its JSON and tokenizer files are read)",
                self.root.display()
            ))
        })
    }

    /// The single-file checkpoint the weights come from, if any.
    pub fn single_file(&self) -> Option<&Path> {
        self.single_file.as_deref()
    }

    pub fn vae_config(&self) -> Result<AutoencoderKLConfig> {
        AutoencoderKLConfig::from_file(&self.file("vae", "config.json")?)
    }

    pub fn vae<B: Backend>(&self, device: &B::Device) -> Result<AutoencoderKL<B>> {
        let config = self.vae_config()?;
        if let Some(file) = &self.single_file {
            let tensors = crate::single_file::SingleFile::open(file)?.vae(&config)?;
            return self.configs_hint(load_snapshots(
                config.init(device),
                tensors,
                file,
                weights::VAE_REMAPS,
                self.dtype,
                &[],
            ));
        }
        let file = self.weights_file("vae", "diffusion_pytorch_model", "diffusion_pytorch_model")?;
        load_weights(config.init(device), &file, weights::VAE_REMAPS, self.dtype, &[])
    }

    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        ClipTextConfig::from_file(&self.file("text_encoder", "config.json")?)
    }

    pub fn text_encoder<B: Backend>(&self, device: &B::Device) -> Result<ClipTextModel<B>> {
        let config = self.text_encoder_config()?;
        if let Some(file) = &self.single_file {
            let tensors = crate::single_file::SingleFile::open(file)?.text_encoder(&config)?;
            return self.configs_hint(load_snapshots(
                config.init(device),
                tensors,
                file,
                weights::CLIP_REMAPS,
                self.dtype,
                &[],
            ));
        }
        let file = self.weights_file("text_encoder", "model", "pytorch_model")?;
        load_weights(config.init(device), &file, weights::CLIP_REMAPS, self.dtype, weights::CLIP_IGNORED)
    }
}
