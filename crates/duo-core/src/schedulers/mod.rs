//! Noise schedulers: diffusers' DDPM, DDIM, PNDM (PLMS only), Euler and DPM-Solver(++) multistep,
//! replicated step for step, float32 rounding included.
//!
//! The shape of the API (style-anchors.md, "Schedulers are plain structs"):
//! - [`SchedulerConfig`] is the serde form of diffusers' `scheduler_config.json`, key for key.
//! - [`NoiseSchedule`] is the training-time schedule (betas → `alphas_cumprod`), used by DDPM-style
//!   training and the DUO objective.
//! - [`Scheduler`] is one of the five schedulers after diffusers' `set_timesteps(n)`. It is immutable:
//!   `step` is a pure function of its inputs, and the multistep history (PNDM's `ets`, DPM-Solver's
//!   past outputs) is a [`SchedulerState`] value passed in and returned.
//!
//! Files: `config.rs` (the config, the kinds), `noise_schedule.rs` (betas → ᾱ), `sigmas.rs` (the σ
//! schedule Euler and DPM-Solver share), one file per scheduler, each implementing [`Steps`], the one
//! interface [`Scheduler`] dispatches to, and `numerics.rs` (numpy's and torch's formulas).
//!
//! Where diffusers computes a coefficient on a float32 torch scalar, we compute it in `f32` with the
//! same operations in the same order, and apply it to the `f32` tensors as diffusers does. Schedules
//! built with numpy (timesteps, Euler's interpolated sigmas) are built in `f64` with numpy's own
//! formulas (`numerics.rs`), because timesteps are compared exactly.

mod config;
mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod noise_schedule;
mod numerics;
mod pndm;
mod sigmas;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

pub use config::{
    PredictionType, SchedulerChoice, SchedulerConfig, SchedulerKind, TimestepSpacing, parse_python_json,
};
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpm_solver::DpmSolverScheduler;
pub use euler::EulerScheduler;
pub use noise_schedule::NoiseSchedule;
pub use pndm::PndmScheduler;
pub(crate) use sigmas::FinalSigmas;

use crate::error::{DuoError, Result};
pub(crate) use noise_schedule::discrete_timesteps;
use noise_schedule::{batch_column, check_same_shape};

/// The multistep history a scheduler carries from one step to the next: plain data, returned by
/// each [`Scheduler::step`] and given to the next one.
#[derive(Debug, Clone)]
pub struct SchedulerState<B: Backend> {
    /// Past model outputs, oldest first. PNDM: diffusers' `ets` (raw outputs, at most 4).
    /// DPM-Solver: diffusers' `model_outputs` (converted outputs, at most `solver_order`).
    pub model_outputs: Vec<Tensor<B, 4>>,
    /// PNDM: the sample of the first PLMS step, which the second step starts from again.
    pub cur_sample: Option<Tensor<B, 4>>,
    /// Steps taken since the start (PNDM's `counter`; counted by every scheduler).
    pub counter: usize,
    /// DPM-Solver: `lower_order_nums`, the warm-up steps taken so far, capped at `solver_order`.
    pub lower_order_nums: usize,
}

impl<B: Backend> Default for SchedulerState<B> {
    fn default() -> Self {
        Self { model_outputs: Vec::new(), cur_sample: None, counter: 0, lower_order_nums: 0 }
    }
}

/// What each of the five schedulers provides once set up: the one interface [`Scheduler`]
/// dispatches to.
pub(crate) trait Steps {
    /// The t fed to the UNet at each loop index, in loop order.
    fn timesteps(&self) -> &[f64];

    /// `add_noise` at loop index i: x_t = a·x₀ + s·ε, as (a, s).
    fn noise_coefficients(&self, step_index: usize) -> (f32, f32);

    /// One denoising step: the sample at the next timestep and the new history. `noise` is the
    /// variance noise of stochastic steps.
    fn step<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        state: SchedulerState<B>,
        noise: Option<Tensor<B, 4>>,
    ) -> Result<(Tensor<B, 4>, SchedulerState<B>)>;
}

/// `$body` with `$s` bound to the scheduler inside, whichever of the five it is.
macro_rules! each_scheduler {
    ($scheduler:expr, $s:ident => $body:expr) => {
        match $scheduler {
            Scheduler::Ddpm($s) => $body,
            Scheduler::Ddim($s) => $body,
            Scheduler::Pndm($s) => $body,
            Scheduler::Euler($s) => $body,
            Scheduler::DpmSolver($s) => $body,
        }
    };
}

/// A scheduler set up for N inference steps (diffusers' `set_timesteps`), immutable afterwards.
#[derive(Debug, Clone)]
pub enum Scheduler {
    Ddpm(DdpmScheduler),
    Ddim(DdimScheduler),
    Pndm(PndmScheduler),
    Euler(EulerScheduler),
    DpmSolver(DpmSolverScheduler),
}

impl Scheduler {
    /// `kind` built from `config` (any `_class_name`, as diffusers' `from_config`) and set up for
    /// `num_inference_steps` steps.
    pub fn new(kind: SchedulerKind, config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if num_inference_steps == 0 {
            return Err(DuoError::Invalid(format!(
                "{}: num_inference_steps must be at least 1",
                kind.class_name()
            )));
        }
        Ok(match kind {
            SchedulerKind::Ddpm => Self::Ddpm(DdpmScheduler::new(config, num_inference_steps)?),
            SchedulerKind::Ddim => Self::Ddim(DdimScheduler::new(config, num_inference_steps)?),
            SchedulerKind::Pndm => Self::Pndm(PndmScheduler::new(config, num_inference_steps)?),
            SchedulerKind::Euler => Self::Euler(EulerScheduler::new(config, num_inference_steps)?),
            SchedulerKind::DpmSolver => {
                Self::DpmSolver(DpmSolverScheduler::new(config, num_inference_steps)?)
            }
        })
    }

    /// DDIM's η (0 = deterministic DDIM, 1 = DDPM-like variance). diffusers' pipelines pass `eta`
    /// only to schedulers whose `step` takes it, so it is ignored by the other four.
    /// An error if η is negative or not finite.
    pub fn with_eta(self, eta: f64) -> Result<Self> {
        if !eta.is_finite() || eta < 0.0 {
            return Err(DuoError::Invalid(format!("eta={eta} must be a finite number >= 0")));
        }
        Ok(match self {
            Self::Ddim(s) => Self::Ddim(s.with_eta(eta)),
            other => other,
        })
    }

    pub fn kind(&self) -> SchedulerKind {
        match self {
            Self::Ddpm(_) => SchedulerKind::Ddpm,
            Self::Ddim(_) => SchedulerKind::Ddim,
            Self::Pndm(_) => SchedulerKind::Pndm,
            Self::Euler(_) => SchedulerKind::Euler,
            Self::DpmSolver(_) => SchedulerKind::DpmSolver,
        }
    }

    /// The t fed to the UNet at each loop index, in loop order (PNDM's PLMS list, with its repeated
    /// second timestep, included).
    pub fn timesteps(&self) -> &[f64] {
        each_scheduler!(self, s => s.timesteps())
    }

    /// The noise levels σ of Euler and DPM-Solver (one more than the timesteps: the last is the
    /// final σ); `None` for the others.
    pub fn sigmas(&self) -> Option<&[f64]> {
        match self {
            Self::Euler(s) => Some(s.sigmas()),
            Self::DpmSolver(s) => Some(s.sigmas()),
            _ => None,
        }
    }

    /// The std of the initial latent noise.
    pub fn init_noise_sigma(&self) -> f64 {
        match self {
            Self::Euler(s) => s.init_noise_sigma(),
            _ => 1.0,
        }
    }

    /// N, the number of inference steps the scheduler was set up for (PNDM's PLMS list holds N + 1
    /// timesteps: its second timestep is repeated).
    pub fn num_inference_steps(&self) -> usize {
        let len = self.timesteps().len();
        match self {
            Self::Pndm(_) if len > 1 => len - 1,
            _ => len,
        }
    }

    /// diffusers' `order` attribute (1 for all five; img2img skips `t_start * order` steps).
    pub fn order(&self) -> usize {
        1
    }

    /// Whether `step` needs variance noise: DDPM, and DDIM with η > 0.
    pub fn needs_noise(&self) -> bool {
        match self {
            Self::Ddpm(_) => true,
            Self::Ddim(s) => s.eta() > 0.0,
            _ => false,
        }
    }

    /// Whether the step at `step_index` draws variance noise (DDPM draws none at t = 0).
    pub fn needs_noise_at(&self, step_index: usize) -> bool {
        match self {
            Self::Ddpm(s) => s.needs_noise_at(step_index),
            _ => self.needs_noise(),
        }
    }

    /// The loop index whose timestep is `t`, as diffusers' `index_for_timestep` picks it (the second
    /// of two equal timesteps, as in PNDM's list); `None` if `t` is not a timestep.
    pub fn index_for_timestep(&self, t: f64) -> Option<usize> {
        let hits: Vec<usize> =
            self.timesteps().iter().enumerate().filter(|&(_, &x)| x == t).map(|(i, _)| i).collect();
        hits.get(1).or(hits.first()).copied()
    }

    /// The UNet input at `step_index`: Euler divides by √(σ²+1); the others return `sample`.
    ///
    /// # Panics
    /// If `step_index >= timesteps().len()`.
    pub fn scale_model_input<B: Backend>(&self, sample: Tensor<B, 4>, step_index: usize) -> Tensor<B, 4> {
        let steps = self.timesteps().len();
        assert!(step_index < steps, "scale_model_input: step index {step_index} of {steps} steps");
        match self {
            Self::Euler(s) => sample.div_scalar(s.input_scale(step_index)),
            _ => sample,
        }
    }

    /// An empty multistep history.
    pub fn initial_state<B: Backend>(&self) -> SchedulerState<B> {
        SchedulerState::default()
    }

    /// One denoising step at loop index `step_index`: the sample at `timesteps()[step_index + 1]`
    /// (diffusers' `prev_sample`) and the new history. `noise` is the variance noise of stochastic
    /// steps (DDPM, DDIM with η > 0): required there, ignored elsewhere.
    pub fn step<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        state: SchedulerState<B>,
        noise: Option<Tensor<B, 4>>,
    ) -> Result<(Tensor<B, 4>, SchedulerState<B>)> {
        let steps = self.timesteps().len();
        if step_index >= steps {
            return Err(DuoError::Invalid(format!(
                "{}: step index {step_index} is past the last of {steps} steps",
                self.kind().class_name()
            )));
        }
        check_same_shape("model_output", &model_output, &sample)?;
        if let Some(noise) = &noise {
            check_same_shape("noise", noise, &sample)?;
        }
        let (prev, mut state) =
            each_scheduler!(self, s => s.step(model_output, step_index, sample, state, noise))?;
        // PNDM counts its own steps (its warm-up depends on the count)
        if !matches!(self, Self::Pndm(_)) {
            state.counter += 1;
        }
        Ok((prev, state))
    }

    /// img2img: `original` noised to the level of `timesteps()[step_index]` (Euler/DPM-Solver use
    /// their sigmas, DDPM/DDIM/PNDM `alphas_cumprod`), as diffusers' `add_noise` does for img2img.
    /// A `step_index` past the last step is an error.
    pub fn add_noise<B: Backend>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Result<Tensor<B, 4>> {
        let batch = original.dims()[0];
        self.add_noise_at(original, noise, &vec![step_index; batch])
    }

    /// diffusers' `add_noise(original, noise, timesteps)` called with timesteps rather than loop
    /// indices (one per batch element): DDPM/DDIM/PNDM use ᾱ_t of any training timestep; Euler and
    /// DPM-Solver look the timestep up in `timesteps()` (the second of two equal ones), and
    /// DPM-Solver falls back to the last step for a timestep it does not have, as diffusers does.
    pub fn add_noise_at_timesteps<B: Backend>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        timesteps: &[f64],
    ) -> Result<Tensor<B, 4>> {
        let schedule = match self {
            Self::Ddpm(s) => Some(s.schedule()),
            Self::Ddim(s) => Some(s.schedule()),
            Self::Pndm(s) => Some(s.schedule()),
            Self::Euler(_) | Self::DpmSolver(_) => None,
        };
        if let Some(schedule) = schedule {
            check_same_shape("noise", &noise, &original)?;
            let n = schedule.num_train_timesteps();
            let ts: Vec<usize> = timesteps
                .iter()
                .map(|&t| {
                    (t >= 0.0 && t.fract() == 0.0 && (t as usize) < n).then_some(t as usize).ok_or_else(
                        || {
                            DuoError::Invalid(format!(
                                "add_noise: timestep {t} is not a training timestep 0..{n}"
                            ))
                        },
                    )
                })
                .collect::<Result<_>>()?;
            if ts.len() != original.dims()[0] {
                return Err(DuoError::Invalid(format!(
                    "add_noise: {} timesteps for a batch of {}",
                    ts.len(),
                    original.dims()[0]
                )));
            }
            return Ok(schedule.add_noise(original, noise, &ts));
        }
        let indices: Vec<usize> = timesteps
            .iter()
            .map(|&t| match (self.index_for_timestep(t), self) {
                (Some(i), _) => Ok(i),
                (None, Self::DpmSolver(_)) => Ok(self.timesteps().len() - 1),
                (None, _) => Err(DuoError::Invalid(format!(
                    "add_noise: timestep {t} is not one of the {} timesteps",
                    self.kind().class_name()
                ))),
            })
            .collect::<Result<_>>()?;
        self.add_noise_at(original, noise, &indices)
    }

    /// [`Scheduler::add_noise`] with one loop index per batch element.
    pub fn add_noise_at<B: Backend>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_indices: &[usize],
    ) -> Result<Tensor<B, 4>> {
        check_same_shape("noise", &noise, &original)?;
        let batch = original.dims()[0];
        if step_indices.len() != batch {
            return Err(DuoError::Invalid(format!(
                "add_noise: {} step indices for a batch of {batch}",
                step_indices.len()
            )));
        }
        let steps = self.timesteps().len();
        let mut signal = Vec::with_capacity(batch);
        let mut sigma = Vec::with_capacity(batch);
        for &i in step_indices {
            if i >= steps {
                return Err(DuoError::Invalid(format!(
                    "add_noise: step index {i} is past the last of {steps} steps"
                )));
            }
            let (a, s) = each_scheduler!(self, s => s.noise_coefficients(i));
            signal.push(a);
            sigma.push(s);
        }
        let device = original.device();
        Ok(batch_column(signal, &device) * original + batch_column(sigma, &device) * noise)
    }
}

/// (√ᾱ_t, √(1−ᾱ_t)) of a discrete timestep, for the alphas_cumprod-based `add_noise`.
fn alpha_noise_coefficients(schedule: &NoiseSchedule, t: i64) -> (f32, f32) {
    // The timesteps were validated against the schedule when they were built.
    let a = schedule.alpha_cumprod_at(t).unwrap_or(f32::NAN);
    (a.sqrt(), (1.0 - a).sqrt())
}
