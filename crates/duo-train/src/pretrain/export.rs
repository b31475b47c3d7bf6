//! The model as a diffusers pipeline folder, and a PNG grid sampled from it.
//!
//! The configs carry every key diffusers 0.42.1 / transformers 5 save for these classes (compare
//! `tests/fixtures/models/sd1-tiny`), so `StableDiffusionPipeline.from_pretrained` reads the folder as
//! it reads SD 1.x; the weights carry diffusers' keys and PyTorch layouts (`weights::safetensors_bytes`).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use duo_core::eval::{Condition, SeededSampler};
use duo_core::models::{AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel};
use duo_core::models::{UNet2DConditionConfig, UNet2DConditionModel, UNetLayout};
use duo_core::pipelines::{StableDiffusion, save_image_grid};
use duo_core::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use duo_core::weights::{UNET_SAVE_REMAPS, safetensors_bytes};
use duo_core::world::{Colour, Shape, canonical_prompt};
use duo_core::{DuoError, ModelFolder, Result};
use serde_json::{Value, json};

use super::config::PretrainConfig;

/// The version whose key set the configs reproduce.
const DIFFUSERS_VERSION: &str = "0.42.1";
/// Shipped weights are f16 to keep the folder small; our loader and diffusers cast them to the run's
/// dtype.
const SHIPPED_DTYPE: DType = DType::F16;
/// The files of a CLIP tokenizer folder that diffusers reads.
const TOKENIZER_FILES: [&str; 4] =
    ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"];
/// Sample tiles are upscaled (nearest neighbour) so the grid can be looked at.
const GRID_ZOOM: usize = 4;

/// The networks' diffusers configs, written as files and read back through duo-core's parsers, which
/// check every size (and name the file in errors).
pub struct ModelConfigs {
    /// The folder holding `{vae,unet,text_encoder,scheduler}/…config.json`.
    pub dir: PathBuf,
    pub vae: AutoencoderKLConfig,
    pub unet: UNetLayout,
    pub text_encoder: ClipTextConfig,
    pub scheduler: SchedulerConfig,
}

impl ModelConfigs {
    /// Writes the configs of `config`'s sizes into `dir` and parses them back. The VAE's
    /// `scaling_factor` is 1 here: stage 1 measures it, and the export writes the measured one.
    pub fn write(config: &PretrainConfig, dir: &Path) -> Result<Self> {
        let files = [
            ("vae/config.json", vae_json(config, 1.0)),
            ("unet/config.json", unet_json(config)),
            ("text_encoder/config.json", text_encoder_json(config)),
            ("scheduler/scheduler_config.json", scheduler_json()),
        ];
        for (name, value) in &files {
            duo_core::fsutil::write_json(&dir.join(name), value)?;
        }
        let unet_path = dir.join("unet/config.json");
        let unet = UNet2DConditionConfig::from_file(&unet_path)?.layout(&unet_path)?;
        let configs = Self {
            dir: dir.to_path_buf(),
            vae: AutoencoderKLConfig::from_file(&dir.join("vae/config.json"))?,
            unet,
            text_encoder: ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))?,
            scheduler: SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?,
        };
        configs.check_fit(config)?;
        Ok(configs)
    }

    /// What the three configs must agree on, which no single one can check.
    fn check_fit(&self, config: &PretrainConfig) -> Result<()> {
        let factor = self.vae.downscale_factor();
        if !config.world.resolution.is_multiple_of(factor) {
            return Err(DuoError::config(
                self.dir.join("vae/config.json"),
                format!(
                    "world.resolution={} is not a multiple of the VAE's downscale factor {factor}",
                    config.world.resolution
                ),
            ));
        }
        let latent = config.world.resolution / factor;
        let unet_factor = 1 << (config.unet.block_out_channels.len() - 1);
        if !latent.is_multiple_of(unet_factor) {
            return Err(DuoError::config(
                self.dir.join("unet/config.json"),
                format!(
                    "latents of {latent}×{latent} do not halve {} times",
                    config.unet.block_out_channels.len() - 1
                ),
            ));
        }
        Ok(())
    }

    /// Latent side: the world's resolution over the VAE's factor.
    pub fn latent_size(&self, config: &PretrainConfig) -> usize {
        config.world.resolution / self.vae.downscale_factor()
    }
}

fn vae_json(config: &PretrainConfig, scaling_factor: f64) -> Value {
    let v = &config.vae;
    let n = v.block_out_channels.len();
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": v.block_out_channels,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "force_upcast": true,
        "in_channels": 3,
        "latent_channels": v.latent_channels,
        "latents_mean": null,
        "latents_std": null,
        "layers_per_block": v.layers_per_block,
        "mid_block_add_attention": true,
        "norm_num_groups": v.norm_num_groups,
        "out_channels": 3,
        "sample_size": config.world.resolution,
        "scaling_factor": scaling_factor,
        "shift_factor": null,
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "use_post_quant_conv": true,
        "use_quant_conv": true,
    })
}

fn unet_json(config: &PretrainConfig) -> Value {
    let u = &config.unet;
    let n = u.block_out_channels.len();
    let latent = config.vae.latent_channels;
    let factor = 1usize << (config.vae.block_out_channels.len().max(1) - 1);
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "addition_embed_type": null,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": null,
        "attention_head_dim": u.attention_head_dim,
        "attention_type": "default",
        "block_out_channels": u.block_out_channels,
        "center_input_sample": false,
        "class_embed_type": null,
        "class_embeddings_concat": false,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": config.text_encoder.hidden_size,
        "cross_attention_norm": null,
        "down_block_types": vec!["CrossAttnDownBlock2D"; n],
        "downsample_padding": 1,
        "dropout": 0.0,
        "dual_cross_attention": false,
        "encoder_hid_dim": null,
        "encoder_hid_dim_type": null,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": latent,
        "layers_per_block": u.layers_per_block,
        "mid_block_only_cross_attention": null,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": u.norm_num_groups,
        "num_attention_heads": null,
        "num_class_embeds": null,
        "only_cross_attention": false,
        "out_channels": latent,
        "projection_class_embeddings_input_dim": null,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": false,
        "resnet_time_scale_shift": "default",
        "reverse_transformer_layers_per_block": null,
        "sample_size": config.world.resolution / factor,
        "time_cond_proj_dim": null,
        "time_embedding_act_fn": null,
        "time_embedding_dim": null,
        "time_embedding_type": "positional",
        "timestep_post_act": null,
        "transformer_layers_per_block": 1,
        "up_block_types": vec!["CrossAttnUpBlock2D"; n],
        "upcast_attention": false,
        "use_linear_projection": false,
    })
}

fn text_encoder_json(config: &PretrainConfig) -> Value {
    let t = &config.text_encoder;
    json!({
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dtype": "float16",
        // SD 1.x's legacy value: pool at the highest id (EOS, 49407), as CLIP ViT-L/14's config says.
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": t.hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "layer_norm_eps": 1e-05,
        // The tokenizer pads every prompt to 77 tokens.
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "pad_token_id": 1,
        "projection_dim": t.hidden_size,
        "transformers_version": "5.24.0",
        "vocab_size": 49408,
    })
}

/// SD's training schedule (scaled_linear 0.00085–0.012 over 1000 steps, ε-prediction), with DDIM as
/// the folder's sampler: what the quality gates use.
fn scheduler_json() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.995,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": false,
        "sample_max_value": 1.0,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "thresholding": false,
        "timestep_spacing": "leading",
        "trained_betas": null,
    })
}

fn model_index_json() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// The trained networks, ready to be written.
pub struct Trained<'a, B: Backend> {
    pub vae: &'a AutoencoderKL<B>,
    pub text_encoder: &'a ClipTextModel<B>,
    pub unet: &'a UNet2DConditionModel<B>,
}

/// Writes the pipeline folder `config.out`: first into a temporary folder beside it, then renamed
/// into place, so a crash never leaves a half-written model where a loader would find it.
pub fn export<B: Backend>(config: &PretrainConfig, trained: Trained<'_, B>) -> Result<()> {
    let out = &config.out;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| DuoError::io(parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| DuoError::io(&tmp, e))?;
    }

    duo_core::fsutil::write_json(&tmp.join("model_index.json"), &model_index_json())?;
    duo_core::fsutil::write_json(
        &tmp.join("vae/config.json"),
        &vae_json(config, trained.vae.scaling_factor),
    )?;
    duo_core::fsutil::write_json(&tmp.join("unet/config.json"), &unet_json(config))?;
    duo_core::fsutil::write_json(&tmp.join("text_encoder/config.json"), &text_encoder_json(config))?;
    duo_core::fsutil::write_json(&tmp.join("scheduler/scheduler_config.json"), &scheduler_json())?;
    let weights: [(&str, Vec<u8>); 3] = [
        ("vae/diffusion_pytorch_model.safetensors", safetensors_bytes(trained.vae, &[], SHIPPED_DTYPE)?),
        (
            "unet/diffusion_pytorch_model.safetensors",
            safetensors_bytes(trained.unet, UNET_SAVE_REMAPS, SHIPPED_DTYPE)?,
        ),
        ("text_encoder/model.safetensors", safetensors_bytes(trained.text_encoder, &[], SHIPPED_DTYPE)?),
    ];
    for (file, bytes) in weights {
        duo_core::fsutil::write_atomic(&tmp.join(file), &bytes)?;
    }
    for file in TOKENIZER_FILES {
        let (from, to) = (config.tokenizer.join(file), tmp.join("tokenizer").join(file));
        let bytes = std::fs::read(&from).map_err(|e| DuoError::io(&from, e))?;
        duo_core::fsutil::write_atomic(&to, &bytes)?;
    }

    // A directory cannot be renamed over a non-empty one: move the old model aside first.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if out.exists() {
        std::fs::rename(out, &old).map_err(|e| DuoError::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| DuoError::io(out, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| DuoError::io(&old, e))?;
    }
    Ok(())
}

/// Total size of the files under `dir`, in bytes.
pub fn folder_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| DuoError::io(dir, e))? {
        let entry = entry.map_err(|e| DuoError::io(dir, e))?;
        let meta = entry.metadata().map_err(|e| DuoError::io(entry.path(), e))?;
        total += if meta.is_dir() { folder_size(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

/// Samples the exported folder with our own pipeline: one row per shape (its canonical prompt, in the
/// colour of the same index), one column per seed (the same initial noise down a column), DDIM.
pub fn sample_grid<B: Backend>(config: &PretrainConfig, device: &B::Device, png: &Path) -> Result<()> {
    let folder = ModelFolder::open(&config.out)?;
    let sd = StableDiffusion::<B>::load(&folder, device)?;
    let grid = &config.samples;
    let scheduler = Scheduler::new(SchedulerKind::Ddim, &sd.scheduler_config, grid.steps)?;
    let prompts: Vec<String> = (Shape::ALL.into_iter().enumerate())
        .map(|(row, shape)| canonical_prompt(shape, Colour::ALL[row % Colour::ALL.len()]))
        .collect();
    let seeds: Vec<u64> = (0..grid.seeds as u64).collect();
    // the whole grid in one batch
    let sampler = SeededSampler::new(&sd, &scheduler, grid.guidance, prompts.len() * seeds.len())?;
    let (images, _) = sampler.sample(&Condition::texts(&prompts), &seeds, None, |_| {})?;
    let [_, _, h, w] = images.dims();
    let zoomed = interpolate(
        images,
        [h * GRID_ZOOM, w * GRID_ZOOM],
        InterpolateOptions::new(InterpolateMode::Nearest),
    );
    save_image_grid(&zoomed, grid.seeds, png)
}
