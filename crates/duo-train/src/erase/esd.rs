//! ESD (Gandikota et al., ICCV 2023), as the authors' paper-era script trains it: per iteration a
//! random DDIM step count `t_enc`, a latent `x` made by the *model being trained* sampling the
//! concept's prompt from noise (guidance `start_guidance`) down to that step, a DDPM timestep `t`
//! drawn from `t_enc`'s slice of the 1,000, and the loss
//!
//! ```text
//! ‖ εθ(x, c, t) − [ ε*(x, t) − η·(ε*(x, c, t) − ε*(x, t)) ] ‖²      ε*: the frozen model
//! ```
//!
//! ESD-x trains the cross-attention (`attn2`), ESD-u everything else but the time embedding and the
//! output layers; either the weights themselves (published) or LoRA adapters on those layers.
//!
//! A model that predicts v or x₀ (SD 2.x) has its outputs turned into ε first, so the equation, the
//! sampling and the loss stay the published ones.
//!
//! The sampling keeps the script's two quirks: the first DDIM step is skipped (its noise counts as
//! the second step's), and the latent stops one step below the slice `t` is drawn from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType, TensorData};
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use duo_core::lora::{LoraConfig, LoraFormat, LoraNetworks, LoraTargets, attach_lora, save_lora};
use duo_core::models::UNet2DConditionModel;
use duo_core::pipelines::StableDiffusion;
use duo_core::schedulers::NoiseSchedule;
use duo_core::weights::{UNET_SAVE_REMAPS, safetensors_bytes};
use duo_core::{DuoError, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::Method;
use super::config::EsdSection;
use crate::learning::{EpochLoader, Schedule, StepOutput, StopControl, latest_checkpoint};
use crate::train::config::DuoConfig;

/// What ESD trains: the weights of the method's layers, or adapters on its linear ones.
pub enum Trained {
    Weights,
    Lora(LoraConfig),
}

/// The method's parameters, by our field path (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q.weight`):
/// ESD-x every `attn2` parameter; ESD-u every other one except the time embedding and the final
/// norm and convolution (the authors' `xattn` and `noxattn`).
fn trains(method: Method, path: &str) -> bool {
    let cross = path.contains(".attn2.");
    match method {
        Method::EsdX => cross,
        _ => {
            !(cross
                || path.starts_with("time_embedding.")
                || path.starts_with("conv_norm_out.")
                || path.starts_with("conv_out."))
        }
    }
}

/// The method's linear layers as LoRA targets (diffusers paths). ESD-u's convolutions and norms
/// take no adapter, so its LoRA variant trains a subset of what the published one does.
fn lora_targets(method: Method) -> LoraTargets {
    match method {
        Method::EsdX => LoraTargets::Regex(r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)".into()),
        _ => LoraTargets::Regex(
            r".*\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|time_emb_proj|proj_in|proj_out)"
                .into(),
        ),
    }
}

/// Sets which parameters train, by path; counts the trainable values.
struct SelectTrainable<F> {
    keep: F,
    path: Vec<String>,
    count: usize,
}

impl<B: Backend, F: Fn(&str) -> bool> ModuleMapper<B> for SelectTrainable<F> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let keep = (self.keep)(&self.path.join("."));
        if keep {
            self.count += param.lazy_shape().num_elements();
        }
        param.set_require_grad(keep)
    }
}

fn select<B: Backend>(
    unet: UNet2DConditionModel<B>,
    keep: impl Fn(&str) -> bool,
) -> (UNet2DConditionModel<B>, usize) {
    let mut mapper = SelectTrainable { keep, path: Vec::new(), count: 0 };
    let unet = unet.map(&mut mapper);
    (unet, mapper.count)
}

/// The DDIM sampler of the authors' latent-diffusion code: timesteps `0, c, 2c, … (+1)` with
/// `c = T / steps`, and each step's ᾱ and the next one's.
#[derive(Debug, Clone)]
pub struct DdimSteps {
    pub timesteps: Vec<usize>,
    alphas: Vec<f64>,
    alphas_prev: Vec<f64>,
    train_timesteps: usize,
}

impl DdimSteps {
    pub fn new(schedule: &NoiseSchedule, steps: usize) -> Result<Self> {
        let total = schedule.num_train_timesteps();
        let stride = total / steps;
        if stride == 0 {
            return Err(DuoError::Invalid(format!(
                "esd.ddim_steps = {steps}: more than the model's {total} timesteps"
            )));
        }
        let timesteps: Vec<usize> = (0..total).step_by(stride).map(|t| t + 1).collect();
        let ac = schedule.alphas_cumprod();
        let alphas: Vec<f64> = timesteps.iter().map(|&t| ac[t.min(total - 1)]).collect();
        let alphas_prev = std::iter::once(ac[0]).chain(alphas[..alphas.len() - 1].iter().copied()).collect();
        Ok(Self { timesteps, alphas, alphas_prev, train_timesteps: total })
    }

    /// The indices the script's sampling visits on its way to step `t_enc`: from the second-last
    /// down to `t_enc − 1` (down to 0 when `t_enc` is 0).
    pub fn indices_till(&self, t_enc: usize) -> Vec<usize> {
        let last = self.timesteps.len() - 2;
        let stop = t_enc.saturating_sub(1);
        (stop..=last).rev().collect()
    }

    /// The DDPM timestep range `t` is drawn from for step `t_enc`: [round(t_enc/S·T), round((t_enc+1)/S·T)).
    pub fn ddpm_range(&self, t_enc: usize) -> std::ops::Range<usize> {
        let s = self.timesteps.len() as f64;
        let at = |k: usize| (k as f64 / s * self.train_timesteps as f64).round_ties_even() as usize;
        at(t_enc)..at(t_enc + 1).max(at(t_enc) + 1)
    }
}

/// The text conditioning and sampling settings every step shares (host data: no backend).
#[derive(Debug)]
pub struct EsdSetup {
    /// The concept's prompts, then "": [prompts + 1, 77, d].
    embeddings: TensorData,
    ddim: DdimSteps,
    /// Turns a v- or x₀-predicting model's output into ε, which ESD's equation is written in.
    schedule: NoiseSchedule,
    start_guidance: f64,
    negative_guidance: f64,
    latent_shape: [usize; 4],
    dtype: FloatDType,
}

/// One iteration's draw: the prompt, the DDIM step, the DDPM timestep, the starting noise.
#[derive(Debug, Clone)]
pub struct EsdDraw {
    pub prompt: usize,
    pub t_enc: usize,
    pub t_ddpm: usize,
    pub noise: TensorData,
}

impl EsdSetup {
    /// The setting of `s` for `prompts` on `sd`: their text embeddings, the DDIM schedule, the
    /// latent shape (the UNet's sample size; 64, SD's 512 px, when its config has none).
    pub fn new<B: Backend>(sd: &StableDiffusion<B>, prompts: &[String], s: &EsdSection) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(&sd.scheduler_config)?;
        let mut texts = prompts.to_vec();
        texts.push(String::new());
        let side = sd.unet_sample_size.unwrap_or(64);
        Ok(Self {
            embeddings: sd.encode_prompts(&texts).cast(FloatDType::F32).into_data(),
            ddim: DdimSteps::new(&schedule, s.ddim_steps)?,
            schedule,
            start_guidance: s.start_guidance,
            negative_guidance: s.negative_guidance,
            latent_shape: [1, sd.latent_channels, side, side],
            dtype: sd.dtype,
        })
    }

    fn prompts(&self) -> usize {
        self.embeddings.shape[0] - 1
    }

    /// Iteration `g`'s draw, from the seed alone (the same on every backend and on resume).
    pub fn draw(&self, seed: u64, g: usize) -> EsdDraw {
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(g as u64));
        let prompt = rng.random_range(0..self.prompts());
        let t_enc = rng.random_range(0..self.ddim.timesteps.len());
        let t_ddpm = rng.random_range(self.ddim.ddpm_range(t_enc));
        let n: usize = self.latent_shape.iter().product();
        let noise: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        EsdDraw { prompt, t_enc, t_ddpm, noise: TensorData::new(noise, self.latent_shape) }
    }

    /// The embeddings of prompt `prompt` and of "", [1, 77, d] each.
    fn embeddings<B: Backend>(&self, prompt: usize, device: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let all = Tensor::<B, 3>::from_data(self.embeddings.clone(), (device, DType::F32)).cast(self.dtype);
        let empty = self.prompts();
        (all.clone().narrow(0, prompt, 1), all.narrow(0, empty, 1))
    }

    fn unet_eps<B: Backend>(
        &self,
        unet: &UNet2DConditionModel<B>,
        x: Tensor<B, 4>,
        t: usize,
        context: Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let device = x.device();
        let b = x.dims()[0];
        let timesteps = Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32; b], [b]), &device);
        let output = unet.forward(x.clone().cast(self.dtype), timesteps, context).cast(FloatDType::F32);
        // the DDIM timesteps reach T (the script's `+1`); ᾱ there is the last one's, as in `DdimSteps`
        let t = t.min(self.schedule.num_train_timesteps() - 1);
        self.schedule.epsilon(output, x, &vec![t; b])
    }

    /// The latent the script trains on: `unet` samples the concept's prompt from `draw.noise` with
    /// guidance, DDIM (η 0), over [`DdimSteps::indices_till`].
    pub fn latent<B: Backend>(
        &self,
        unet: &UNet2DConditionModel<B>,
        draw: &EsdDraw,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let (concept, empty) = self.embeddings::<B>(draw.prompt, device);
        let context = Tensor::cat(vec![empty, concept], 0);
        let mut x = Tensor::<B, 4>::from_data(draw.noise.clone(), (device, DType::F32));
        for index in self.ddim.indices_till(draw.t_enc) {
            let eps = self.unet_eps(
                unet,
                Tensor::cat(vec![x.clone(), x.clone()], 0),
                self.ddim.timesteps[index],
                context.clone(),
            );
            let [uncond, cond] = [eps.clone().narrow(0, 0, 1), eps.narrow(0, 1, 1)];
            let eps = uncond.clone() + (cond - uncond) * self.start_guidance;
            let (a, a_prev) = (self.ddim.alphas[index], self.ddim.alphas_prev[index]);
            let x0 = (x - eps.clone() * (1.0 - a).sqrt()) / a.sqrt();
            x = x0 * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt();
        }
        x
    }

    /// ESD's target at `x`: ε*(x, t) − η·(ε*(x, c, t) − ε*(x, t)), from the frozen UNet.
    pub fn target<B: Backend>(
        &self,
        frozen: &UNet2DConditionModel<B>,
        x: Tensor<B, 4>,
        draw: &EsdDraw,
    ) -> Tensor<B, 4> {
        let t = draw.t_ddpm;
        let (concept, empty) = self.embeddings::<B>(draw.prompt, &x.device());
        let eps = self.unet_eps(
            frozen,
            Tensor::cat(vec![x.clone(), x], 0),
            t,
            Tensor::cat(vec![empty, concept], 0),
        );
        let [e0, ep] = [eps.clone().narrow(0, 0, 1), eps.narrow(0, 1, 1)];
        e0.clone() - (ep - e0) * self.negative_guidance
    }

    /// The loss of `trained` at `x` against `target` (mean over every element, f32).
    fn loss<B: Backend>(
        &self,
        trained: &UNet2DConditionModel<B>,
        x: Tensor<B, 4>,
        draw: &EsdDraw,
        target: Tensor<B, 4>,
    ) -> Tensor<B, 1> {
        let (concept, _) = self.embeddings::<B>(draw.prompt, &x.device());
        let eps = self.unet_eps(trained, x, draw.t_ddpm, concept);
        (eps - target).square().mean().reshape([1])
    }
}

/// The module burn-train trains: the UNet (its trainable parameters, or its adapters), and the
/// frozen original, kept out of the record.
#[derive(Module, Debug)]
pub struct EsdModel<B: Backend> {
    pub unet: UNet2DConditionModel<B>,
    #[module(skip)]
    pub frozen: UNet2DConditionModel<B>,
    pub setup: Arc<EsdSetup>,
}

const SCALARS: &[&str] = &["loss"];

fn output<B: Backend>(loss: Tensor<B, 1>) -> StepOutput<B> {
    StepOutput { batch_size: 1, scalars: vec![("loss", loss)] }
}

impl<B: AutodiffBackend> TrainStep for EsdModel<B> {
    type Input = EsdDraw;
    type Output = StepOutput<B>;

    fn step(&self, draw: EsdDraw) -> TrainOutput<StepOutput<B>> {
        let device = self.unet.devices().into_iter().next().unwrap_or_default();
        // the latent and the target carry no gradient: both are computed without the graph
        let x = self.setup.latent(&self.unet.valid(), &draw, &device);
        let target = self.setup.target(&self.frozen.valid(), x.clone(), &draw);
        let loss = self.setup.loss(&self.unet, Tensor::from_inner(x), &draw, Tensor::from_inner(target));
        TrainOutput::new(self, loss.backward(), output(loss.detach()))
    }
}

impl<B: Backend> InferenceStep for EsdModel<B> {
    type Input = EsdDraw;
    type Output = StepOutput<B>;

    fn step(&self, draw: EsdDraw) -> StepOutput<B> {
        let device = self.unet.devices().into_iter().next().unwrap_or_default();
        let x = self.setup.latent(&self.unet, &draw, &device);
        let target = self.setup.target(&self.frozen, x.clone(), &draw);
        output(self.setup.loss(&self.unet, x, &draw, target))
    }
}

/// Where a finished ESD run leaves its model.
pub enum EsdResult {
    /// `lora.safetensors` in the run folder.
    Lora(PathBuf),
    /// The UNet's weights, to be placed in a model folder by the caller.
    Weights(PathBuf),
}

/// Trains ESD-x or ESD-u on `sd` in `dir` (continued from its latest checkpoint); `None` when stopped
/// early.
pub fn train_esd<B: Backend>(
    sd: &StableDiffusion<B>,
    config: &DuoConfig,
    method: Method,
    dir: &Path,
    log_every: usize,
) -> Result<Option<EsdResult>> {
    learn::<Autodiff<B>>(sd, config, method, dir, log_every)
}

fn learn<A: AutodiffBackend>(
    sd: &StableDiffusion<A::InnerBackend>,
    config: &DuoConfig,
    method: Method,
    dir: &Path,
    log_every: usize,
) -> Result<Option<EsdResult>> {
    let s: &EsdSection = &config.esd;
    let device = sd.device.clone();
    let prompts = match s.prompts.is_empty() {
        true => vec![config.concept.clone()],
        false => s.prompts.clone(),
    };
    let setup = Arc::new(
        EsdSetup::new(sd, &prompts, s)
            .map_err(|e| DuoError::Invalid(format!("{}: {e}", config.model.display())))?,
    );
    let trained = match s.lora {
        true => Trained::Lora(LoraConfig { targets: lora_targets(method), ..config.lora_config()? }),
        false => Trained::Weights,
    };
    let (frozen, _) = select(sd.unet.clone().train::<A>(), |_| false);
    let (unet, count) = match &trained {
        Trained::Weights => select(sd.unet.clone().train::<A>(), |path| trains(method, path)),
        Trained::Lora(lora) => {
            let unet = attach_lora(sd.unet.clone().train::<A>(), lora, &device)?;
            let count = duo_core::lora::lora_parameter_count(&unet);
            (unet, count)
        }
    };
    let what = match &trained {
        Trained::Weights => "weights".to_string(),
        Trained::Lora(lora) => format!("LoRA rank {} adapters", lora.rank),
    };
    println!(
        "{method} on {prompts:?}: {:.2} M trainable values ({what}); {} iterations, lr {:.1e}, η {}, start guidance {}, {} DDIM steps",
        count as f64 / 1e6,
        s.iterations,
        s.lr,
        s.negative_guidance,
        s.start_guidance,
        s.ddim_steps
    );
    let model = EsdModel { unet, frozen, setup: setup.clone() };

    let plan = Schedule {
        steps: s.iterations,
        batch_size: 1,
        lr: s.lr,
        lr_changes: Vec::new(),
        // Adam: AdamW without decay (ε 1e-8, as torch's)
        weight_decay: 0.0,
        warmup: 0,
        checkpoint_every: s.checkpoint_every,
        valid_batches: 1,
        grad_accumulation: 1,
    };
    let resume = latest_checkpoint::<A>(dir).unwrap_or(0);
    let seed = s.seed;
    let train_setup = setup.clone();
    let train = Arc::new(EpochLoader::<A, _>::new(
        move |g, _| train_setup.draw(seed, g),
        1,
        s.checkpoint_every,
        resume,
        device.clone(),
    ));
    // one fixed draw, every checkpoint
    let valid = Arc::new(EpochLoader::<A::InnerBackend, _>::new(
        move |_, _| setup.draw(seed ^ 0x5EED, usize::MAX),
        1,
        1,
        0,
        device.clone(),
    ));
    let control = StopControl::install()?;
    let stage = crate::learning::Stage {
        name: method.name(),
        dir: dir.to_path_buf(),
        schedule: plan,
        log_every,
        control: &control,
        train_scalars: SCALARS,
        valid_scalars: SCALARS,
    };
    let result = stage.run(model, train, valid)?;
    if !result.complete {
        println!("stopped at the last checkpoint; rerun the same command to continue");
        return Ok(None);
    }
    let unet = result.model.unet;
    Ok(Some(match trained {
        Trained::Lora(_) => {
            let file = dir.join("lora.safetensors");
            save_lora(&LoraNetworks::unet_only(unet), &file, LoraFormat::Peft)?;
            EsdResult::Lora(file)
        }
        Trained::Weights => {
            let file = dir.join("diffusion_pytorch_model.safetensors");
            let bytes = safetensors_bytes(&unet, UNET_SAVE_REMAPS, DType::F32)?;
            duo_core::fsutil::write_atomic(&file, &bytes)?;
            EsdResult::Weights(file)
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_method_trains_the_authors_parameters() {
        let x = |p: &str| trains(Method::EsdX, p);
        let u = |p: &str| trains(Method::EsdU, p);
        let cross = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
        let own = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight";
        assert!(x(cross) && !u(cross));
        assert!(!x(own) && u(own));
        for frozen_in_both in ["time_embedding.linear_1.weight", "conv_out.weight", "conv_norm_out.gamma"] {
            assert!(!x(frozen_in_both) && !u(frozen_in_both), "{frozen_in_both}");
        }
        assert!(u("conv_in.weight") && u("down_blocks.1.resnets.0.time_emb_proj.weight"));
    }

    #[test]
    fn the_sampler_follows_the_scripts_schedule() {
        let config = duo_core::schedulers::SchedulerConfig::from_value(
            serde_json::json!({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}),
            Path::new("test"),
        )
        .unwrap();
        let ddim = DdimSteps::new(&NoiseSchedule::from_config(&config).unwrap(), 50).unwrap();
        assert_eq!(ddim.timesteps.len(), 50);
        assert_eq!((ddim.timesteps[0], ddim.timesteps[49]), (1, 981));
        // the first step (981) is skipped; t_enc = 10 stops after index 9, 40 steps in
        let visited = ddim.indices_till(10);
        assert_eq!((visited[0], *visited.last().unwrap(), visited.len()), (48, 9, 40));
        assert_eq!(ddim.indices_till(0).len(), 49);
        assert_eq!(ddim.indices_till(1), ddim.indices_till(0));
        assert_eq!(ddim.ddpm_range(10), 200..220);
        assert_eq!(ddim.ddpm_range(49), 980..1000);
    }
}
