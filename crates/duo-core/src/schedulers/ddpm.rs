//! diffusers' `DDPMScheduler` (schedulers/scheduling_ddpm.py): ancestral sampling (Ho et al. 2020).
//!
//! Notation, as in diffusers: ᾱ_t = `alpha_prod_t`, β̄_t = 1 − ᾱ_t = `beta_prod_t`, t' = the next
//! timestep of the list (−1 after the last, where ᾱ = 1), α_t = ᾱ_t/ᾱ_t', β_t = 1 − α_t.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::{
    NoiseSchedule, PredictionType, SchedulerConfig, SchedulerKind, SchedulerState, Steps,
    alpha_noise_coefficients, discrete_timesteps,
};
use crate::error::{DuoError, Result};

const KIND: SchedulerKind = SchedulerKind::Ddpm;

/// The fixed `variance_type`s; the learned ones need a model with twice the output channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FixedVariance {
    /// "fixed_small": β̃_t = β̄_t'/β̄_t·β_t (the posterior variance).
    Small,
    /// "fixed_small_log": the same, through exp(½·ln β̃_t).
    SmallLog,
    /// "fixed_large": β_t.
    Large,
}

#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    schedule: NoiseSchedule,
    /// The timesteps, as integers and as returned by `timesteps()`.
    steps: Vec<i64>,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    /// `clip_sample_range` when `clip_sample` is set.
    clip_range: Option<f32>,
    variance_type: FixedVariance,
}

impl DdpmScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.require_not_true("thresholding", config.thresholding, KIND)?;
        let schedule = NoiseSchedule::for_kind(config, KIND)?;
        let num_train = schedule.num_train_timesteps();
        let steps = checked_timesteps(config, KIND, &schedule, num_inference_steps)?;
        let variance_type = config.choice(
            "variance_type",
            config.variance_type.as_deref(),
            "fixed_small",
            &[
                ("fixed_small", FixedVariance::Small),
                ("fixed_small_log", FixedVariance::SmallLog),
                ("fixed_large", FixedVariance::Large),
            ],
            KIND,
        )?;
        debug_assert!(steps.iter().all(|&t| (t as usize) < num_train));
        Ok(Self {
            prediction_type: schedule.prediction_type(),
            timesteps: steps.iter().map(|&t| t as f64).collect(),
            steps,
            schedule,
            clip_range: clip_range(config),
            variance_type,
        })
    }

    /// The training schedule (ᾱ).
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// diffusers draws variance noise for every step but t = 0.
    pub fn needs_noise_at(&self, step_index: usize) -> bool {
        self.steps.get(step_index).is_some_and(|&t| t > 0)
    }

    fn prev_sample<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> Result<Tensor<B, 4>> {
        let t = self.steps[step_index];
        let prev_t = self.steps.get(step_index + 1).copied().unwrap_or(-1);

        // 1. ᾱ and β̄ at t and t' (float32, as diffusers).
        let alpha_prod_t = self.schedule.alpha_cumprod_at(t)?;
        let alpha_prod_t_prev = if prev_t >= 0 { self.schedule.alpha_cumprod_at(prev_t)? } else { 1.0 };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        // 2. x̂₀ from the model output (formula (15) of the DDPM paper for ε).
        let pred_original_sample = match self.prediction_type {
            PredictionType::Epsilon => {
                (sample.clone() - model_output.mul_scalar(beta_prod_t.sqrt())).div_scalar(alpha_prod_t.sqrt())
            }
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => {
                sample.clone().mul_scalar(alpha_prod_t.sqrt()) - model_output.mul_scalar(beta_prod_t.sqrt())
            }
        };
        let pred_original_sample = match self.clip_range {
            Some(r) => pred_original_sample.clamp(-r, r),
            None => pred_original_sample,
        };

        // 3. μ̃_t(x_t, x̂₀), formula (7).
        let pred_original_sample_coeff = (alpha_prod_t_prev.sqrt() * current_beta_t) / beta_prod_t;
        let current_sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let pred_prev_sample = pred_original_sample.mul_scalar(pred_original_sample_coeff)
            + sample.mul_scalar(current_sample_coeff);

        // 4. Add σ_t·z, except at t = 0.
        if t <= 0 {
            return Ok(pred_prev_sample);
        }
        let noise = noise.ok_or_else(|| {
            DuoError::Invalid(format!(
                "DDPMScheduler: the step at index {step_index} (t={t}) draws variance noise; pass `noise`"
            ))
        })?;
        let variance = ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t).max(1e-20);
        let std = match self.variance_type {
            FixedVariance::Small => variance.sqrt(),
            FixedVariance::SmallLog => (0.5 * variance.ln()).exp(),
            FixedVariance::Large => current_beta_t.sqrt(),
        };
        Ok(pred_prev_sample + noise.mul_scalar(std))
    }
}

impl Steps for DdpmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn noise_coefficients(&self, step_index: usize) -> (f32, f32) {
        alpha_noise_coefficients(&self.schedule, self.steps[step_index])
    }

    fn step<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        state: SchedulerState<B>,
        noise: Option<Tensor<B, 4>>,
    ) -> Result<(Tensor<B, 4>, SchedulerState<B>)> {
        Ok((self.prev_sample(model_output, step_index, sample, noise)?, state))
    }
}

/// `clip_sample` (default true) with `clip_sample_range` (default 1), for DDPM and DDIM.
pub(crate) fn clip_range(config: &SchedulerConfig) -> Option<f32> {
    config.clip_sample.unwrap_or(true).then(|| config.clip_sample_range.unwrap_or(1.0) as f32)
}

/// DDPM/DDIM timesteps for `num_inference_steps`, refusing more steps than training timesteps (as
/// diffusers does) and timesteps past the schedule (a large `steps_offset`).
pub(crate) fn checked_timesteps(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    schedule: &NoiseSchedule,
    num_inference_steps: usize,
) -> Result<Vec<i64>> {
    let num_train = schedule.num_train_timesteps();
    if num_inference_steps > num_train {
        return Err(DuoError::Invalid(format!(
            "{}: num_inference_steps={num_inference_steps} exceeds num_train_timesteps={num_train}",
            kind.class_name()
        )));
    }
    let spacing = config.timestep_spacing(kind)?;
    let steps = discrete_timesteps(spacing, num_train, num_inference_steps, config.steps_offset());
    check_in_schedule(config, kind, &steps, num_train)?;
    Ok(steps)
}

/// Every timestep must index `alphas_cumprod`.
pub(crate) fn check_in_schedule(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    steps: &[i64],
    num_train: usize,
) -> Result<()> {
    if let Some(&t) = steps.iter().find(|&&t| t < 0 || t as usize >= num_train) {
        return Err(config.error(format!(
            "{}: steps_offset={} gives timestep {t}, outside the training schedule 0..{num_train}",
            kind.class_name(),
            config.steps_offset()
        )));
    }
    Ok(())
}
