//! The red-team attacks beyond prompt sets. The white-box ones differentiate through our own UNet
//! and CLIP text encoder (on any backend, under Burn's autodiff) with the standard denoising loss on
//! the base model's images of the concept; Ring-A-Bell needs the text encoder alone. Their settings
//! and the published defaults are in `docs/attacks.md`.

mod inversion;
mod ring_a_bell;
mod unlearndiffatk;
mod vocabulary;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::FloatDType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::eval::{Attack, AttackName, Bench, Condition, Protocol, Unit, protocol_seeds, read_prompt_file};
use crate::models::{ClipTextModel, UNet2DConditionModel};
use crate::pipelines::{NoiseSource, StableDiffusion};
use crate::schedulers::NoiseSchedule;
use crate::{DuoError, Result};

pub use inversion::{ConceptInversionAttack, EmbeddingInversionAttack};
pub use ring_a_bell::RingABellAttack;
pub use unlearndiffatk::{UnlearnDiffAtkAttack, prefixed_ids};

/// The differentiable backend of the white-box attacks.
pub type Grad<B> = Autodiff<B>;

/// The protocol's search attacks among `names`, each starting from the concept prompts with the
/// protocol's seeds and guidance, or from the prompts of its prompt file (`[attack.prompts]`).
pub fn white_box<B: Backend>(
    protocol: &Protocol,
    names: &[AttackName],
    base: &StableDiffusion<B>,
) -> Result<Vec<Box<dyn Attack<B>>>> {
    let seeds = protocol_seeds(protocol);
    // the prompt file's prompts, with their seeds, where the protocol has one
    let units: Vec<Unit> = match &protocol.attack.prompts {
        Some(file) => read_prompt_file(file, &seeds, protocol.guidance)?,
        None => (protocol.prompts.concept.iter())
            .map(|prompt| Unit { prompt: prompt.clone(), seeds: seeds.clone(), guidance: protocol.guidance })
            .collect(),
    };
    let a = &protocol.attack;
    let missing = |name: AttackName| DuoError::Invalid(format!("the protocol has no [attack.{name}] table"));
    let mut attacks: Vec<Box<dyn Attack<B>>> = Vec::new();
    for &name in names {
        match name {
            AttackName::Prompts | AttackName::Paraphrases => {}
            AttackName::RingABell => {
                let settings = a.ring_a_bell.clone().ok_or_else(|| missing(name))?;
                attacks.push(Box::new(RingABellAttack::new(settings, units.clone(), base)?));
            }
            AttackName::Unlearndiffatk => {
                let settings = a.unlearndiffatk.clone().ok_or_else(|| missing(name))?;
                attacks.push(Box::new(UnlearnDiffAtkAttack::new(settings, units.clone(), base)?));
            }
            AttackName::ConceptInversion => {
                let settings = a.concept_inversion.clone().ok_or_else(|| missing(name))?;
                attacks.push(Box::new(ConceptInversionAttack::new(settings, units.clone(), base)?));
            }
            AttackName::EmbeddingInversion => {
                let settings = a.embedding_inversion.clone().ok_or_else(|| missing(name))?;
                attacks.push(Box::new(EmbeddingInversionAttack::new(settings, units.clone())));
            }
        }
    }
    Ok(attacks)
}

/// Seeds of the images an attack learns from: apart from the evaluation's seeds (0, 1, …), so an
/// attack is never scored on the very images it was fitted to.
pub const TRAINING_SEEDS_FROM: u64 = 1_000_000;

/// The base model's images of `prompt` with `seeds`, encoded back to latents (the VAE's mean ×
/// its scaling factor): the concept images white-box attacks fit the unlearned model to.
pub fn concept_latents<B: Backend>(
    bench: &Bench<B>,
    prompt: &str,
    seeds: &[u64],
    guidance: f64,
) -> Result<Tensor<B, 4>> {
    let sd = bench.base;
    let (images, _) = bench.generate(sd, &Condition::Text(prompt.to_string()), seeds, guidance)?;
    let latents = sd.vae.encode((images * 2.0 - 1.0).cast(sd.dtype)).mean.cast(FloatDType::F32);
    Ok(latents * sd.vae.scaling_factor)
}

/// The attacked model's networks under autodiff, their weights frozen: gradients reach only the
/// attack's inputs.
pub struct Differentiable<B: Backend> {
    pub unet: UNet2DConditionModel<Grad<B>>,
    pub text_encoder: ClipTextModel<Grad<B>>,
    pub schedule: NoiseSchedule,
    pub dtype: FloatDType,
}

impl<B: Backend> Differentiable<B> {
    pub fn of(sd: &StableDiffusion<B>) -> Result<Self> {
        Ok(Self {
            unet: sd.unet.clone().train::<Grad<B>>().no_grad(),
            text_encoder: sd.text_encoder.clone().train::<Grad<B>>().no_grad(),
            schedule: NoiseSchedule::from_config(&sd.scheduler_config)?,
            dtype: sd.dtype,
        })
    }

    /// The denoising loss (the config's target: ε, v or x₀) of latents `x0` [n, c, h, w] noised to
    /// `timesteps` with `noise`, under `context` [n, len, d]: mean over everything.
    pub fn denoising_loss(
        &self,
        x0: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        timesteps: &[usize],
        context: Tensor<Grad<B>, 3>,
    ) -> Tensor<Grad<B>, 1> {
        let device = x0.device();
        let noised = self.schedule.add_noise(x0.clone(), noise.clone(), timesteps);
        let target = self.schedule.training_target(x0, noise, timesteps);
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::<Grad<B>, 1>::from_data(TensorData::new(t, [timesteps.len()]), &device);
        let input = Tensor::<Grad<B>, 4>::from_inner(noised.cast(self.dtype));
        let prediction = self.unet.forward(input, t, context.cast(self.dtype)).cast(FloatDType::F32);
        (prediction - Tensor::from_inner(target)).square().mean()
    }
}

/// How a white-box search draws its training batches and steps.
#[derive(Debug, Clone, Copy)]
pub struct SearchSteps {
    pub steps: usize,
    pub lr: f64,
    pub batch: usize,
    pub weight_decay: f64,
    pub seed: u64,
    pub timesteps: Timesteps,
}

/// Which timesteps a search trains at.
#[derive(Debug, Clone, Copy)]
pub enum Timesteps {
    /// Each image of each step at its own t, uniform over the schedule (textual inversion).
    Uniform,
    /// Blocks of this many steps, block b of n at t = (2b + 1)·T / 2n, ascending (UnlearnDiffAtk:
    /// 50 blocks of 40 give t = 10, 30, …, 990).
    Blocks(usize),
}

/// A parameter [r, c] optimised with Adam against the denoising loss of the concept latents.
pub struct Search<'a, B: Backend> {
    pub model: &'a Differentiable<B>,
    pub latents: Tensor<B, 4>,
    pub steps: SearchSteps,
}

/// Where a search ended, and the loss on a fixed probe set before and after.
pub struct Searched<B: Backend> {
    pub param: Tensor<B, 2>,
    pub loss_before: f64,
    pub loss_after: f64,
}

/// Timesteps of the fixed probe on which a search's loss is compared before and after: spread over
/// the whole schedule.
const PROBE_TIMESTEPS: usize = 4;

impl<B: Backend> Search<'_, B> {
    /// Optimises `start` for `steps` steps: `context(param, images, rng)` builds the text embeddings
    /// [images.len(), len, d] of the training images `images` (drawing from `rng` if it samples);
    /// `after_step(step, param)` may replace the parameter (a projection) and stop the search
    /// (returning `true`).
    pub fn run(
        &self,
        start: Tensor<B, 2>,
        context: impl Fn(Tensor<Grad<B>, 2>, &[usize], &mut ChaCha8Rng) -> Tensor<Grad<B>, 3>,
        mut after_step: impl FnMut(usize, Tensor<B, 2>) -> Result<(Tensor<B, 2>, bool)>,
    ) -> Result<Searched<B>> {
        let s = self.steps;
        let n = self.latents.dims()[0];
        let timesteps = self.model.schedule.num_train_timesteps();
        let device = self.latents.device();
        let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
        let loss_before = self.probe_loss(start.clone(), &context)?;
        let mut adam = Adam::new(&start, s.lr, s.weight_decay);
        let mut param = start;
        for step in 0..s.steps {
            let images: Vec<usize> = (0..s.batch).map(|_| rng.random_range(0..n)).collect();
            let t: Vec<usize> = match s.timesteps {
                Timesteps::Uniform => images.iter().map(|_| rng.random_range(0..timesteps)).collect(),
                Timesteps::Blocks(size) => {
                    let blocks = s.steps.div_ceil(size);
                    vec![(2 * (step / size) + 1) * timesteps / (2 * blocks); images.len()]
                }
            };
            let x0 = self.select(&images);
            let noise = NoiseSource::new(rng.random()).normal::<B, 4>(x0.dims(), &device);
            let p = Tensor::<Grad<B>, 2>::from_inner(param.clone()).require_grad();
            let loss = self.model.denoising_loss(x0, noise, &t, context(p.clone(), &images, &mut rng));
            let value: f64 = loss.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(DuoError::Invalid(format!(
                    "the attack's loss became non-finite at step {} (lr {} may be too large)",
                    step + 1,
                    s.lr
                )));
            }
            let grads = loss.backward();
            let grad = p.grad(&grads).ok_or_else(|| {
                DuoError::Invalid("the attack's loss does not depend on its parameter".into())
            })?;
            param = adam.update(param, grad);
            let (next, stop) = after_step(step, param)?;
            param = next;
            if stop {
                break;
            }
        }
        let loss_after = self.probe_loss(param.clone(), &context)?;
        Ok(Searched { param, loss_before, loss_after })
    }

    fn select(&self, images: &[usize]) -> Tensor<B, 4> {
        let index: Vec<i64> = images.iter().map(|&i| i as i64).collect();
        let index =
            Tensor::<B, 1, Int>::from_data(TensorData::new(index, [images.len()]), &self.latents.device());
        self.latents.clone().select(0, index)
    }

    /// The loss over every training image at [`PROBE_TIMESTEPS`] timesteps with fixed noise.
    fn probe_loss(
        &self,
        param: Tensor<B, 2>,
        context: &impl Fn(Tensor<Grad<B>, 2>, &[usize], &mut ChaCha8Rng) -> Tensor<Grad<B>, 3>,
    ) -> Result<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.steps.seed ^ 0x5eed);
        let n = self.latents.dims()[0];
        let total = self.model.schedule.num_train_timesteps();
        let mut noise = NoiseSource::new(self.steps.seed ^ 0x5eed);
        let mut sum = 0.0;
        for k in 0..PROBE_TIMESTEPS {
            let t = (2 * k + 1) * total / (2 * PROBE_TIMESTEPS);
            let images: Vec<usize> = (0..n).collect();
            let x0 = self.latents.clone();
            let eps = noise.normal::<B, 4>(x0.dims(), &x0.device());
            let p = Tensor::<Grad<B>, 2>::from_inner(param.clone());
            let loss = self.model.denoising_loss(x0, eps, &vec![t; n], context(p, &images, &mut rng));
            sum += loss.into_scalar().elem::<f64>();
        }
        Ok(sum / PROBE_TIMESTEPS as f64)
    }
}

/// PyTorch's `torch.optim.Adam` (β = (0.9, 0.999), ε = 1e-8) on one tensor. Its weight decay is
/// the L2 kind, added to the gradient (UnlearnDiffAtk's optimiser), not AdamW's decoupled decay.
struct Adam<B: Backend> {
    m: Tensor<B, 2>,
    v: Tensor<B, 2>,
    step: i32,
    lr: f64,
    weight_decay: f64,
}

impl<B: Backend> Adam<B> {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(param: &Tensor<B, 2>, lr: f64, weight_decay: f64) -> Self {
        Self { m: param.zeros_like(), v: param.zeros_like(), step: 0, lr, weight_decay }
    }

    fn update(&mut self, param: Tensor<B, 2>, grad: Tensor<B, 2>) -> Tensor<B, 2> {
        self.step += 1;
        let grad = grad + param.clone() * self.weight_decay;
        self.m = self.m.clone() * Self::BETA1 + grad.clone() * (1.0 - Self::BETA1);
        self.v = self.v.clone() * Self::BETA2 + grad.square() * (1.0 - Self::BETA2);
        let m_hat = self.m.clone() / (1.0 - Self::BETA1.powi(self.step));
        let v_hat = self.v.clone() / (1.0 - Self::BETA2.powi(self.step));
        param - m_hat / (v_hat.sqrt() + Self::EPS) * self.lr
    }
}

/// The per-unit seed of an attack: its setting, moved by the unit's index.
pub fn unit_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

pub(crate) use vocabulary::Vocabulary;

#[cfg(test)]
mod adam_tests {
    use super::*;

    type B = burn::backend::Flex;

    /// PyTorch's Adam with weight decay: the decay enters the gradient, so the first step moves
    /// each value by lr · sign(g + wd·p) (AdamW would move it by lr · sign(g) + lr·wd·p).
    #[test]
    fn weight_decay_is_an_l2_term_in_the_gradient() {
        let device = Default::default();
        let param = Tensor::<B, 2>::from_floats([[2.0, -1.0]], &device);
        let grad = Tensor::<B, 2>::from_floats([[-0.1, 0.05]], &device);
        let mut adam = Adam::new(&param, 0.01, 0.1);
        let stepped = adam.update(param, grad).into_data().into_vec::<f32>().unwrap();
        // g + wd·p = [0.1, −0.05]: both signs flip against the raw gradient
        let expected = [2.0 - 0.01, -1.0 + 0.01];
        for (s, e) in stepped.iter().zip(expected) {
            assert!((s - e).abs() < 1e-6, "{stepped:?} vs {expected:?}");
        }
    }
}
