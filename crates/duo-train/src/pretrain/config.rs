//! The pretraining config (`configs/toy-pretrain.toml`), read, overridden and resumed as every run
//! config is (`duo_core::run_config`).

use std::path::PathBuf;

use duo_core::run_config::RunConfig;
use duo_core::world::WorldConfig;
use serde::{Deserialize, Serialize};

use crate::learning::{LrChange, Schedule};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    /// The exported model folder (diffusers layout).
    pub out: PathBuf,
    /// The CLIP tokenizer folder copied into the model: the real SD vocabulary (49,408 tokens).
    pub tokenizer: PathBuf,
    pub world: WorldSection,
    pub vae: VaeSizes,
    pub text_encoder: TextEncoderSizes,
    pub unet: UNetSizes,
    pub vae_training: VaeTraining,
    pub diffusion_training: DiffusionTraining,
    pub samples: SampleGrid,
}

/// `duo_core::world::WorldConfig`, key for key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldSection {
    pub resolution: usize,
    pub size: f32,
    pub size_jitter: f32,
    pub shift: f32,
}

impl WorldSection {
    pub fn world_config(&self) -> WorldConfig {
        WorldConfig {
            resolution: self.resolution,
            size: self.size,
            size_jitter: self.size_jitter,
            shift: self.shift,
            max_dilation: 0.0,
        }
    }
}

/// The sizes of `vae/config.json` (an `AutoencoderKL` of `DownEncoderBlock2D`/`UpDecoderBlock2D`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeSizes {
    /// One entry per block; the image shrinks by 2^(blocks − 1).
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub latent_channels: usize,
}

/// The sizes of `text_encoder/config.json` (a `CLIPTextModel`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextEncoderSizes {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
}

/// The sizes of `unet/config.json` (a `UNet2DConditionModel` with cross-attention at every level).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetSizes {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// The head count, as diffusers' legacy key means it.
    pub attention_head_dim: usize,
    pub norm_num_groups: usize,
}

/// Stage 1: the VAE alone, on pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeTraining {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Steps of linear learning-rate warm-up.
    pub warmup: usize,
    /// Steps between checkpoints (one burn-train epoch); `steps` must be a multiple.
    pub checkpoint_every: usize,
    /// Batches of the fixed validation set, run at every checkpoint.
    pub valid_batches: usize,
    pub seed: u64,
    /// Weight of the KL term against the per-pixel MSE.
    pub kl_weight: f64,
    /// Images whose latents set `scaling_factor` = 1/std.
    pub scaling_images: usize,
}

/// Stage 2: the text encoder and the UNet together, on the frozen VAE's latents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionTraining {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Later learning rates, each from the step after `after_step` on, in step order
    /// (`lr_changes = [{ after_step = 1000, lr = 2e-3 }]`); none by default.
    #[serde(default)]
    pub lr_changes: Vec<LrChange>,
    pub weight_decay: f64,
    pub warmup: usize,
    pub checkpoint_every: usize,
    pub valid_batches: usize,
    pub seed: u64,
    /// Decay of the weights' exponential moving average, which is what ships (0 ships the raw weights).
    pub ema_decay: f64,
    /// Fraction of captions replaced by "" so classifier-free guidance has an unconditional model.
    pub caption_dropout: f64,
    /// γ of the Min-SNR-γ loss weighting (5 in its paper); 0 is the plain MSE.
    pub min_snr_gamma: f64,
}

/// The PNG grid written after export: one row per shape, one column per seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleGrid {
    pub seeds: usize,
    /// DDIM steps.
    pub steps: usize,
    pub guidance: f64,
}

impl VaeTraining {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.lr,
            lr_changes: Vec::new(),
            weight_decay: self.weight_decay,
            warmup: self.warmup,
            checkpoint_every: self.checkpoint_every,
            valid_batches: self.valid_batches,
            grad_accumulation: 1,
        }
    }
}

impl DiffusionTraining {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.lr,
            lr_changes: self.lr_changes.clone(),
            weight_decay: self.weight_decay,
            warmup: self.warmup,
            checkpoint_every: self.checkpoint_every,
            valid_batches: self.valid_batches,
            grad_accumulation: 1,
        }
    }
}

impl RunConfig for PretrainConfig {
    /// Sections that fix the model and its data, as the checkpoints do (their shapes) and the step
    /// count (the checkpoint interval).
    const FROZEN_ON_RESUME: &'static [&'static str] = &[
        "tokenizer",
        "world",
        "vae",
        "text_encoder",
        "unet",
        "vae_training.checkpoint_every",
        "diffusion_training.checkpoint_every",
    ];

    /// Value checks beyond the types; the model sizes are checked when their diffusers configs are
    /// built (`export::model_configs`).
    fn validate(&self) -> std::result::Result<(), String> {
        let err = |m: String| Err(m);
        self.world.world_config().validate().map_err(|e| e.to_string())?;
        for (name, s) in [
            ("vae_training", self.vae_training.schedule()),
            ("diffusion_training", self.diffusion_training.schedule()),
        ] {
            if s.steps == 0 || s.batch_size == 0 || s.checkpoint_every == 0 || s.valid_batches == 0 {
                return err(format!(
                    "{name}: steps, batch_size, checkpoint_every and valid_batches must be positive"
                ));
            }
            if !s.steps.is_multiple_of(s.checkpoint_every) {
                return err(format!(
                    "{name}.steps={} is not a multiple of {name}.checkpoint_every={} (checkpoints are burn-train epochs)",
                    s.steps, s.checkpoint_every
                ));
            }
            // burn's AdamW and our warm-up take the rate in (0, 1].
            if !(s.lr > 0.0 && s.lr <= 1.0) {
                return err(format!("{name}.lr={} is not in (0, 1]", s.lr));
            }
            for (i, change) in s.lr_changes.iter().enumerate() {
                if !(change.lr > 0.0 && change.lr <= 1.0) {
                    return err(format!("{name}.lr_changes[{i}].lr={} is not in (0, 1]", change.lr));
                }
                if i > 0 && change.after_step <= s.lr_changes[i - 1].after_step {
                    return err(format!(
                        "{name}.lr_changes[{i}].after_step={} does not follow the previous change's {}",
                        change.after_step,
                        s.lr_changes[i - 1].after_step
                    ));
                }
            }
            if s.weight_decay.is_nan() || s.weight_decay < 0.0 {
                return err(format!("{name}.weight_decay={} is negative", s.weight_decay));
            }
        }
        let d = &self.diffusion_training;
        if !(0.0..1.0).contains(&d.ema_decay) {
            return err(format!("diffusion_training.ema_decay={} is not in [0, 1)", d.ema_decay));
        }
        if !(0.0..=1.0).contains(&d.caption_dropout) {
            return err(format!("diffusion_training.caption_dropout={} is not in [0, 1]", d.caption_dropout));
        }
        if !(d.min_snr_gamma.is_finite() && d.min_snr_gamma >= 0.0) {
            return err(format!(
                "diffusion_training.min_snr_gamma={} is not a finite γ ≥ 0",
                d.min_snr_gamma
            ));
        }
        let v = &self.vae_training;
        if v.kl_weight.is_nan() || v.kl_weight < 0.0 {
            return err(format!("vae_training.kl_weight={} is negative", v.kl_weight));
        }
        if v.scaling_images == 0 {
            return err("vae_training.scaling_images must be positive".into());
        }
        if self.samples.seeds == 0 || self.samples.steps == 0 {
            return err("samples.seeds and samples.steps must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/toy-pretrain.toml")
    }

    #[test]
    fn the_shipped_config_loads_and_round_trips() {
        let config = PretrainConfig::load(&shipped(), &[]).unwrap();
        let again: PretrainConfig = toml::from_str(&config.to_toml().unwrap()).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn set_overrides_keys_and_keeps_types() {
        let sets = [
            "diffusion_training.lr=3e-4".to_string(),
            "unet.block_out_channels=[8, 16]".to_string(),
            "vae_training.kl_weight=0".to_string(),
            "out=/tmp/x".to_string(),
        ];
        let config = PretrainConfig::load(&shipped(), &sets).unwrap();
        assert_eq!(config.diffusion_training.lr, 3e-4);
        assert_eq!(config.unet.block_out_channels, vec![8, 16]);
        assert_eq!(config.vae_training.kl_weight, 0.0);
        assert_eq!(config.out, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn set_errors_name_the_key() {
        let err = |set: &str| PretrainConfig::load(&shipped(), &[set.to_string()]).unwrap_err().to_string();
        assert!(err("unet.nope=1").contains("unknown key `unet.nope`"), "{}", err("unet.nope=1"));
        assert!(err("nope.steps=1").contains("no section `nope`"));
        assert!(err("unet.layers_per_block=abc").contains("`abc` is not a TOML value"));
        assert!(err("unet.layers_per_block=1.5").contains("type integer, but `1.5` is of type float"));
        assert!(err("diffusion_training.steps=7").contains("not a multiple"));
        let changes = |list: &str| err(&format!("diffusion_training.lr_changes={list}"));
        let unordered = changes("[{ after_step = 5, lr = 1e-3 }, { after_step = 5, lr = 1e-4 }]");
        assert!(unordered.contains("lr_changes[1].after_step=5 does not follow"), "{unordered}");
        assert!(changes("[{ after_step = 5, lr = 0.0 }]").contains("lr_changes[0].lr=0 is not in (0, 1]"));
    }

    #[test]
    fn the_shipped_recipe_raises_the_rate_after_step_1000() {
        let config = PretrainConfig::load(&shipped(), &[]).unwrap();
        let schedule = config.diffusion_training.schedule();
        assert_eq!((schedule.lr, schedule.lr_changes), (1e-3, vec![LrChange { after_step: 1000, lr: 2e-3 }]));
        assert!(config.vae_training.schedule().lr_changes.is_empty());
    }
}
