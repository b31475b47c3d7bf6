//! Text-to-image and image-to-image (SDEdit) sampling, as diffusers' `StableDiffusionPipeline` and
//! `StableDiffusionImg2ImgPipeline` run them. Both share one denoising loop.

mod image_io;
mod noise;

pub use image_io::{image_format, load_image, rgb8_to_tensor, save_image, save_image_grid, tensor_to_rgb8};
pub use noise::NoiseSource;

use burn::prelude::*;
use burn::tensor::FloatDType;

use crate::device::float_dtype;
use crate::error::{DuoError, Result};
use crate::folder::ModelFolder;
use crate::models::{AutoencoderKL, ClipTextModel, UNet2DConditionModel};
use crate::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;

/// The loaded components of a Stable Diffusion folder. A clone shares the weights.
#[derive(Clone)]
pub struct StableDiffusion<B: Backend> {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
    pub vae: AutoencoderKL<B>,
    pub scheduler_config: SchedulerConfig,
    /// Pixels per latent cell (8 for SD).
    pub vae_scale_factor: usize,
    pub latent_channels: usize,
    /// The latent side the UNet was trained at (`sample_size` in unet/config.json), if given.
    pub unet_sample_size: Option<usize>,
    /// The networks' float type (`--dtype`). Latents and the scheduler's arithmetic stay f32, as
    /// the networks' inputs are cast to it and their outputs back.
    pub dtype: FloatDType,
    pub device: B::Device,
}

/// The text conditioning of one denoising loop.
struct Conditioning<B: Backend> {
    /// `[negative; positive]` embeddings with guidance, the positive ones alone without.
    context: Tensor<B, 3>,
    guidance_scale: f64,
}

/// What to generate; `negative_prompts` empty means "" for each prompt.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompts: Vec<String>,
    pub negative_prompts: Vec<String>,
    pub guidance_scale: f64,
}

/// CLIP last hidden states of `prompts`, padded to the tokenizer's max length: [b, 77, d]. Also for
/// callers that need the text encoder without the rest of the pipeline.
pub fn encode_prompts<B: Backend>(
    tokenizer: &ClipTokenizer,
    text_encoder: &ClipTextModel<B>,
    prompts: &[String],
    device: &B::Device,
) -> Tensor<B, 3> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| prompt_ids(tokenizer, p)).collect();
    encode_ids(text_encoder, &ids, device)
}

/// `prompt`'s token ids at the tokenizer's max length (start, content, end, padding).
pub fn prompt_ids(tokenizer: &ClipTokenizer, prompt: &str) -> Vec<u32> {
    let len = tokenizer.model_max_length();
    // as diffusers warns: the text encoder sees only the first tokens
    let tokens = tokenizer.encode(prompt).len();
    if tokens > len {
        let start: String = prompt.chars().take(40).collect();
        eprintln!(
            "warning: the prompt \"{start}…\" is {tokens} tokens long with its start and end tokens; the \
             text encoder reads {len}, so the last {} are dropped",
            tokens - len
        );
    }
    tokenizer.encode_padded(prompt, len)
}

/// CLIP last hidden states of token id sequences of one length (the tokenizer's max length): [b, len, d].
pub fn encode_ids<B: Backend>(
    text_encoder: &ClipTextModel<B>,
    ids: &[Vec<u32>],
    device: &B::Device,
) -> Tensor<B, 3> {
    text_encoder.forward(ids_tensor(ids, device)).last_hidden_state
}

/// Token id sequences of one length as the text encoder's input [rows, len].
pub fn ids_tensor<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let len = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().map(|&id| i64::from(id)).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), len]), device)
}

impl<B: Backend> StableDiffusion<B> {
    pub fn load(folder: &ModelFolder, device: &B::Device) -> Result<Self> {
        let vae_config = folder.vae_config()?;
        let unet_sample_size = folder.unet_layout()?.config.sample_size;
        Ok(Self {
            tokenizer: ClipTokenizer::from_folder(&folder.root().join("tokenizer"))?,
            text_encoder: folder.text_encoder(device)?,
            unet: folder.unet(device)?,
            vae: folder.vae(device)?,
            scheduler_config: SchedulerConfig::from_file(
                &folder.file("scheduler", "scheduler_config.json")?,
            )?,
            vae_scale_factor: vae_config.downscale_factor(),
            latent_channels: vae_config.latent_channels,
            unet_sample_size,
            dtype: float_dtype(folder.dtype()),
            device: device.clone(),
        })
    }

    /// The model with the LoRA files `specs` (`FILE[:WEIGHT]`, their deltas summed) applied to its
    /// UNet and, where a file has entries for it, its text encoder.
    pub fn with_loras(mut self, specs: &[String]) -> Result<Self> {
        if specs.is_empty() {
            return Ok(self);
        }
        // clones share the weights: nothing is copied
        let nets =
            crate::lora::LoraNetworks { unet: self.unet, text_encoder: Some(self.text_encoder.clone()) };
        let nets = crate::lora::load_lora_specs(nets, specs)?;
        self.unet = nets.unet;
        if let Some(text_encoder) = nets.text_encoder {
            self.text_encoder = text_encoder;
        }
        Ok(self)
    }

    /// The scheduler `kind`, or else the folder's own (its `_class_name`; PNDM when it names none, as
    /// SD 1.x ships), for `steps` steps. A class this project does not implement is an error naming
    /// it, not a silent substitute.
    pub fn scheduler(&self, kind: Option<SchedulerKind>, steps: usize) -> Result<Scheduler> {
        let kind = match kind {
            Some(kind) => kind,
            None => {
                let class = self.scheduler_config.class_name().unwrap_or("PNDMScheduler");
                SchedulerKind::from_class_name(class).ok_or_else(|| {
                    DuoError::config(
                        self.scheduler_config.source(),
                        format!(
                            "_class_name {class} is not an implemented scheduler; pick one with --scheduler"
                        ),
                    )
                })?
            }
        };
        Scheduler::new(kind, &self.scheduler_config, steps)
    }

    /// CLIP last hidden states of `prompts`, padded to the tokenizer's max length: [b, 77, d].
    pub fn encode_prompts(&self, prompts: &[String]) -> Tensor<B, 3> {
        encode_prompts(&self.tokenizer, &self.text_encoder, prompts, &self.device)
    }

    /// [`encode_ids`] with this pipeline's text encoder.
    pub fn encode_ids(&self, ids: &[Vec<u32>]) -> Tensor<B, 3> {
        encode_ids(&self.text_encoder, ids, &self.device)
    }

    /// The conditioning for a loop: `[negative; positive]` embeddings when guidance applies (scale > 1),
    /// else the positive ones alone.
    fn conditioning(&self, generation: &Generation) -> Result<Conditioning<B>> {
        if generation.prompts.is_empty() {
            return Err(DuoError::Invalid("no prompt given".into()));
        }
        let positive = self.encode_prompts(&generation.prompts);
        self.guided(positive, &generation.negative_prompts, generation.guidance_scale)
    }

    /// `positive` [b, len, d] with the negative prompts' embeddings in front when guidance applies
    /// (none given: "" for each).
    fn guided(
        &self,
        positive: Tensor<B, 3>,
        negative_prompts: &[String],
        guidance_scale: f64,
    ) -> Result<Conditioning<B>> {
        if !guidance_scale.is_finite() {
            return Err(DuoError::Invalid(format!("guidance scale {guidance_scale} is not a finite number")));
        }
        if guidance_scale <= 1.0 {
            return Ok(Conditioning { context: positive, guidance_scale });
        }
        let batch = positive.dims()[0];
        let negative = match negative_prompts.len() {
            0 => vec![String::new(); batch],
            1 => vec![negative_prompts[0].clone(); batch],
            n if n == batch => negative_prompts.to_vec(),
            n => return Err(DuoError::Invalid(format!("{n} negative prompts for {batch} prompts"))),
        };
        let negative = self.encode_prompts(&negative).cast(positive.dtype());
        Ok(Conditioning { context: Tensor::cat(vec![negative, positive], 0), guidance_scale })
    }

    /// The shared loop: runs `scheduler` from loop index `start` on `latents`; a stochastic scheduler
    /// (DDPM, DDIM with η > 0) takes step i's noise from `step_noise(i, shape)`.
    fn denoise(
        &self,
        mut latents: Tensor<B, 4>,
        scheduler: &Scheduler,
        start: usize,
        conditioning: Conditioning<B>,
        mut step_noise: impl FnMut(usize, [usize; 4]) -> Result<Tensor<B, 4>>,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor<B, 4>> {
        let Conditioning { context, guidance_scale } = conditioning;
        let guided = guidance_scale > 1.0;
        let batch = latents.dims()[0];
        let context = context.cast(self.dtype);
        let mut state = scheduler.initial_state();
        let timesteps = scheduler.timesteps();
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
            // scale, unet, guidance, step
            let input =
                if guided { Tensor::cat(vec![latents.clone(), latents.clone()], 0) } else { latents.clone() };
            let input = scheduler.scale_model_input(input, i).cast(self.dtype);
            let t = Tensor::<B, 1>::full([input.dims()[0]], t as f32, &self.device);
            let prediction = self.unet.forward(input, t, context.clone()).cast(FloatDType::F32);
            let prediction = if guided {
                let uncond = prediction.clone().narrow(0, 0, batch);
                let text = prediction.narrow(0, batch, batch);
                uncond.clone() + (text - uncond) * guidance_scale
            } else {
                prediction
            };
            let noise = if scheduler.needs_noise() { Some(step_noise(i, latents.dims())?) } else { None };
            let (next, next_state) = scheduler.step(prediction, i, latents, state, noise)?;
            // one read per step: a NaN or ∞ is named where it appears, not found in the image
            let finite = next.clone().is_finite().all().into_data().iter::<bool>().all(|b| b);
            if !finite {
                return Err(DuoError::Invalid(format!(
                    "the latents became non-finite (NaN or ∞) at step {} of {} (t = {}); the weights, the \
                     inputs or the precision (--dtype) do not hold up",
                    i + 1 - start,
                    timesteps.len() - start,
                    timesteps[i]
                )));
            }
            latents = next;
            state = next_state;
            on_step(i + 1 - start, timesteps.len() - start);
        }
        Ok(latents)
    }

    /// Latents → image [b, 3, H, W] in [0, 1] (before 8-bit quantisation).
    pub fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let latents = (latents / self.vae.scaling_factor).cast(self.dtype);
        let image = self.vae.decode(latents).cast(FloatDType::F32);
        (image / 2.0 + 0.5).clamp(0.0, 1.0)
    }

    /// Text-to-image from initial `latents` [b, c, h, w] ~ N(0, I) (scaled by `init_noise_sigma` here,
    /// exactly as diffusers treats `latents=`).
    pub fn txt2img(
        &self,
        generation: &Generation,
        scheduler: &Scheduler,
        latents: Tensor<B, 4>,
        noise: &mut NoiseSource,
        on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor<B, 4>> {
        let step_noise = |_, shape| Ok(noise.normal::<B, 4>(shape, &self.device));
        self.txt2img_with_step_noise(generation, scheduler, latents, step_noise, on_step)
    }

    /// [`Self::txt2img`] with a stochastic scheduler's noise of loop index i given by
    /// `step_noise(i, shape)`, e.g. the draws another implementation made, to compare with it.
    pub fn txt2img_with_step_noise(
        &self,
        generation: &Generation,
        scheduler: &Scheduler,
        latents: Tensor<B, 4>,
        step_noise: impl FnMut(usize, [usize; 4]) -> Result<Tensor<B, 4>>,
        on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor<B, 4>> {
        self.check_batch(generation, &latents)?;
        let context = self.conditioning(generation)?;
        self.denoise_from_noise(latents, scheduler, context, step_noise, on_step)
    }

    /// The text-to-image loop from initial latents (scaled by `init_noise_sigma`) to the image.
    fn denoise_from_noise(
        &self,
        latents: Tensor<B, 4>,
        scheduler: &Scheduler,
        context: Conditioning<B>,
        step_noise: impl FnMut(usize, [usize; 4]) -> Result<Tensor<B, 4>>,
        on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor<B, 4>> {
        let latents = latents * scheduler.init_noise_sigma();
        let latents = self.denoise(latents, scheduler, 0, context, step_noise, on_step)?;
        Ok(self.decode(latents))
    }

    /// Text-to-image from text embeddings `positive` [b, len, d] instead of prompts (what an attack
    /// that optimises embeddings found), with the empty prompt as the negative one.
    pub fn txt2img_from_embeddings(
        &self,
        positive: Tensor<B, 3>,
        guidance_scale: f64,
        scheduler: &Scheduler,
        latents: Tensor<B, 4>,
        step_noise: impl FnMut(usize, [usize; 4]) -> Result<Tensor<B, 4>>,
    ) -> Result<Tensor<B, 4>> {
        let [b, c, _, _] = latents.dims();
        if b != positive.dims()[0] || c != self.latent_channels {
            return Err(DuoError::Invalid(format!(
                "latents of shape {:?} do not fit embeddings of shape {:?} and {} latent channels",
                latents.dims(),
                positive.dims(),
                self.latent_channels
            )));
        }
        let context = self.guided(positive, &[], guidance_scale)?;
        self.denoise_from_noise(latents, scheduler, context, step_noise, |_, _| {})
    }

    /// The starting point of image-to-image (SDEdit): encodes `image` [b, 3, H, W] in [−1, 1], samples
    /// the latent, and noises it to the timestep `strength` selects. Returns the noised latents and the
    /// loop index to denoise from. `draws` are the two N(0, I) tensors diffusers draws (latent sampling,
    /// then `add_noise`); None draws them from `noise`.
    pub fn img2img_latents(
        &self,
        scheduler: &Scheduler,
        image: Tensor<B, 4>,
        strength: f64,
        draws: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
        noise: &mut NoiseSource,
    ) -> Result<(Tensor<B, 4>, usize)> {
        let start = img2img_start_index(scheduler, strength)?;
        let dist = self.vae.encode(image.cast(self.dtype));
        let (vae_noise, start_noise) = match draws {
            Some(d) => d,
            None => {
                let shape = dist.mean.dims();
                (noise.normal::<B, 4>(shape, &self.device), noise.normal::<B, 4>(shape, &self.device))
            }
        };
        let latents = dist.sample(vae_noise.cast(self.dtype)).cast(FloatDType::F32) * self.vae.scaling_factor;
        Ok((scheduler.add_noise(latents, start_noise, start)?, start))
    }

    /// Image-to-image (SDEdit): [`Self::img2img_latents`], then denoising from there.
    #[allow(clippy::too_many_arguments)]
    pub fn img2img(
        &self,
        generation: &Generation,
        scheduler: &Scheduler,
        image: Tensor<B, 4>,
        strength: f64,
        draws: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
        noise: &mut NoiseSource,
        on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor<B, 4>> {
        let context = self.conditioning(generation)?;
        let (latents, start) = self.img2img_latents(scheduler, image, strength, draws, noise)?;
        self.check_batch(generation, &latents)?;
        let step_noise = |_, shape| Ok(noise.normal::<B, 4>(shape, &self.device));
        let latents = self.denoise(latents, scheduler, start, context, step_noise, on_step)?;
        Ok(self.decode(latents))
    }

    fn check_batch(&self, generation: &Generation, latents: &Tensor<B, 4>) -> Result<()> {
        let [b, c, _, _] = latents.dims();
        if b != generation.prompts.len() || c != self.latent_channels {
            return Err(DuoError::Invalid(format!(
                "latents of shape {:?} do not fit {} prompt(s) and {} latent channels",
                latents.dims(),
                generation.prompts.len(),
                self.latent_channels
            )));
        }
        Ok(())
    }
}

/// The loop index img2img starts at, as diffusers' `get_timesteps`:
/// `init = min(int(N·strength), N)`, `t_start = N − init`, index `t_start · order`.
pub fn img2img_start_index(scheduler: &Scheduler, strength: f64) -> Result<usize> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(DuoError::Invalid(format!("strength {strength} is outside [0, 1]")));
    }
    let n = scheduler.num_inference_steps();
    let init = ((n as f64 * strength) as usize).min(n);
    if init == 0 {
        return Err(DuoError::Invalid(format!(
            "strength {strength} with {n} steps leaves no denoising step (diffusers refuses this too)"
        )));
    }
    Ok((n - init) * scheduler.order())
}
