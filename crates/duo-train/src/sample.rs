//! `duo-train sample`: text-to-image and SDEdit image-to-image from a model folder.

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::pipelines::{
    Generation, NoiseSource, StableDiffusion, image_format, load_image, save_image_grid,
};
use duo_core::schedulers::SchedulerKind;
use duo_core::tensor_file::{TensorFile, write_tensor_file};
use duo_core::{DuoError, ModelFolder, Result};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Diffusers pipeline folder, or a single-file checkpoint (.safetensors/.ckpt in the original
    /// LDM layout, e.g. v1-5-pruned-emaonly.safetensors).
    #[arg(long, default_value = "models/toy")]
    model: PathBuf,
    /// For a single-file --model: the diffusers folder whose configs, tokenizer and scheduler go
    /// with it (default for SD 1.x: models/sd-v1-4-configs; SD 2.x needs one).
    #[arg(long, value_name = "DIR")]
    config: Option<PathBuf>,
    /// Prompt; repeat for a batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Negative prompt (one for all prompts, or one per prompt).
    #[arg(long)]
    negative_prompt: Vec<String>,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 disables guidance).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// pndm, ddim, euler, dpm-solver or ddpm (default: the folder's scheduler_config.json).
    #[arg(long)]
    scheduler: Option<SchedulerKind>,
    /// DDIM's eta (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Image height in pixels (default: the UNet's sample_size × the VAE factor).
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    /// Seed of the initial noise (and of every other random draw).
    #[arg(long, default_value_t = 0, conflicts_with = "latents")]
    seed: u64,
    /// Initial latents: safetensors with key "latents" [B,4,H/8,W/8] ~ N(0, I), used as diffusers'
    /// `latents=` (multiplied by init_noise_sigma).
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Start from this image (SDEdit / img2img).
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// How much of the schedule img2img runs: 1.0 ignores the image, 0.0 keeps it.
    #[arg(long, default_value_t = 0.75, requires = "init_image")]
    strength: f64,
    /// LoRA weights FILE[:WEIGHT]; repeatable.
    #[arg(long)]
    lora: Vec<String>,
    /// Weight file variant, e.g. fp16.
    #[arg(long)]
    variant: Option<String>,
    /// Output image, PNG or JPEG by its extension (a grid when the batch has several images).
    #[arg(long)]
    out: PathBuf,
    /// Also save the images as safetensors key "image" [B,3,H,W] f32 in 0..1, before 8-bit quantisation.
    #[arg(long)]
    save_tensor: Option<PathBuf>,
}

pub fn run(args: SampleArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    dispatch(device, float, SampleTask(args))
}

struct SampleTask(SampleArgs);

impl BackendTask for SampleTask {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<()> {
        let args = self.0;
        image_format(&args.out)?;
        let folder = match &args.config {
            Some(config) => ModelFolder::open_single_file(&args.model, Some(config))?,
            None => ModelFolder::open(&args.model)?,
        };
        let folder = folder.with_variant(args.variant.clone()).with_dtype(dtype);
        let sd = StableDiffusion::<B>::load(&folder, &device)?.with_loras(&args.lora)?;
        let scheduler = sd.scheduler(args.scheduler, args.steps)?.with_eta(args.eta)?;
        let generation = Generation {
            prompts: args.prompt.clone(),
            negative_prompts: args.negative_prompt.clone(),
            guidance_scale: args.guidance,
        };
        let mut noise = NoiseSource::new(args.seed);
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed_precise}")
                .expect("static template"),
        );
        bar.set_message("denoising");
        let on_step = |done: usize, total: usize| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        };
        let images = match &args.init_image {
            Some(path) => {
                let image = load_image::<B>(path, sd.vae_scale_factor, &device)?;
                let image = image.repeat_dim(0, generation.prompts.len());
                sd.img2img(&generation, &scheduler, image, args.strength, None, &mut noise, on_step)?
            }
            None => {
                let latents = match &args.latents {
                    Some(path) => {
                        let file = TensorFile::read(path)?;
                        Tensor::<B, 4>::from_data(file.get_f32("latents", 4)?, &device)
                    }
                    None => {
                        let (h, w) = image_size(&sd, args.height, args.width)?;
                        let f = sd.vae_scale_factor;
                        noise.normal::<B, 4>(
                            [generation.prompts.len(), sd.latent_channels, h / f, w / f],
                            &device,
                        )
                    }
                };
                sd.txt2img(&generation, &scheduler, latents, &mut noise, on_step)?
            }
        };
        bar.finish_and_clear();
        save_image_grid(&images, images.dims()[0].min(8), &args.out)?;
        println!("wrote {}", args.out.display());
        if let Some(path) = &args.save_tensor {
            write_tensor_file(path, &[("image", images.into_data().convert::<f32>())])?;
            println!("wrote {}", path.display());
        }
        Ok(())
    }
}

/// The requested size, or diffusers' default (`sample_size × vae_scale_factor`), checked against the
/// VAE factor.
/// The largest image `sample` draws: 8192×8192 pixels.
const MAX_PIXELS: usize = 8192 * 8192;

fn image_size<B: Backend>(
    sd: &StableDiffusion<B>,
    height: Option<usize>,
    width: Option<usize>,
) -> Result<(usize, usize)> {
    let f = sd.vae_scale_factor;
    let default = sd.unet_sample_size.map(|s| s * f);
    let pick = |v: Option<usize>, name: &str| {
        v.or(default).ok_or_else(|| {
            DuoError::Invalid(format!("--{name} is needed: unet/config.json has no sample_size"))
        })
    };
    let (h, w) = (pick(height, "height")?, pick(width, "width")?);
    if h % f != 0 || w % f != 0 || h == 0 || w == 0 {
        return Err(DuoError::Invalid(format!("image size {h}×{w} must be a non-zero multiple of {f}")));
    }
    // checked before anything is allocated: a typo must not become a terabyte allocation
    if h.saturating_mul(w) > MAX_PIXELS {
        return Err(DuoError::Invalid(format!(
            "image size {h}×{w} is over {MAX_PIXELS} pixels (8192×8192); SD's VAE alone would need hundreds of GB there"
        )));
    }
    Ok((h, w))
}
