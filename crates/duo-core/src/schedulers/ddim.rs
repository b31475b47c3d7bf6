//! diffusers' `DDIMScheduler` (schedulers/scheduling_ddim.py): DDIM (Song et al. 2020), formula (12).
//!
//! Notation, as in diffusers' comments:
//! - ᾱ_t = `alpha_prod_t`, β̄_t = 1 − ᾱ_t; t' = t − num_train_timesteps / N (diffusers subtracts this
//!   fixed ratio whatever the `timestep_spacing`), where ᾱ_t' = `final_alpha_cumprod` when t' < 0
//! - x̂₀ = `pred_original_sample`, ε̂ = `pred_epsilon`, σ_t = η·√variance = `std_dev_t`

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::ddpm::{checked_timesteps, clip_range};
use super::{
    NoiseSchedule, PredictionType, SchedulerConfig, SchedulerKind, SchedulerState, Steps,
    alpha_noise_coefficients,
};
use crate::error::{DuoError, Result};

const KIND: SchedulerKind = SchedulerKind::Ddim;

#[derive(Debug, Clone)]
pub struct DdimScheduler {
    schedule: NoiseSchedule,
    steps: Vec<i64>,
    timesteps: Vec<f64>,
    /// num_train_timesteps / N (integer division), the distance to the previous timestep.
    step_ratio: i64,
    prediction_type: PredictionType,
    clip_range: Option<f32>,
    /// ᾱ after the last step: 1 with `set_alpha_to_one`, else ᾱ_0.
    final_alpha_cumprod: f32,
    eta: f64,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.require_not_true("thresholding", config.thresholding, KIND)?;
        let schedule = NoiseSchedule::for_kind(config, KIND)?;
        let steps = checked_timesteps(config, KIND, &schedule, num_inference_steps)?;
        let final_alpha_cumprod =
            if config.set_alpha_to_one(KIND) { 1.0 } else { schedule.alpha_cumprod_f32(0) };
        Ok(Self {
            step_ratio: (schedule.num_train_timesteps() / num_inference_steps) as i64,
            prediction_type: schedule.prediction_type(),
            timesteps: steps.iter().map(|&t| t as f64).collect(),
            steps,
            schedule,
            clip_range: clip_range(config),
            final_alpha_cumprod,
            eta: 0.0,
        })
    }

    /// The same scheduler with η (the pipeline's `eta`).
    pub fn with_eta(self, eta: f64) -> Self {
        Self { eta, ..self }
    }

    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// The training schedule (ᾱ).
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    fn prev_sample<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> Result<Tensor<B, 4>> {
        // 1. The previous timestep t'.
        let t = self.steps[step_index];
        let prev_t = t - self.step_ratio;

        // 2. ᾱ and β̄ (float32).
        let alpha_prod_t = self.schedule.alpha_cumprod_at(t)?;
        let alpha_prod_t_prev =
            if prev_t >= 0 { self.schedule.alpha_cumprod_at(prev_t)? } else { self.final_alpha_cumprod };
        let beta_prod_t = 1.0 - alpha_prod_t;

        // 3. x̂₀ and ε̂ from the model output.
        let (pred_original_sample, pred_epsilon) = match self.prediction_type {
            PredictionType::Epsilon => (
                (sample.clone() - model_output.clone().mul_scalar(beta_prod_t.sqrt()))
                    .div_scalar(alpha_prod_t.sqrt()),
                model_output,
            ),
            PredictionType::Sample => (
                model_output.clone(),
                (sample - model_output.mul_scalar(alpha_prod_t.sqrt())).div_scalar(beta_prod_t.sqrt()),
            ),
            PredictionType::VPrediction => (
                sample.clone().mul_scalar(alpha_prod_t.sqrt())
                    - model_output.clone().mul_scalar(beta_prod_t.sqrt()),
                model_output.mul_scalar(alpha_prod_t.sqrt()) + sample.mul_scalar(beta_prod_t.sqrt()),
            ),
        };

        // 4. Clip x̂₀ (ε̂ is not recomputed: pipelines leave `use_clipped_model_output` off).
        let pred_original_sample = match self.clip_range {
            Some(r) => pred_original_sample.clamp(-r, r),
            None => pred_original_sample,
        };

        // 5. σ_t = η·√((β̄_t'/β̄_t)·(1 − ᾱ_t/ᾱ_t')), formula (16).
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta as f32 * variance.sqrt();

        // 6. "direction pointing to x_t" and x_t' = √ᾱ_t'·x̂₀ + direction, formula (12).
        let direction_coeff = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let prev_sample = pred_original_sample.mul_scalar(alpha_prod_t_prev.sqrt())
            + pred_epsilon.mul_scalar(direction_coeff);

        // 7. + σ_t·z when η > 0.
        if self.eta <= 0.0 {
            return Ok(prev_sample);
        }
        let noise = noise.ok_or_else(|| {
            DuoError::Invalid(format!(
                "DDIMScheduler: eta={} draws variance noise at every step; pass `noise` (step index {step_index})",
                self.eta
            ))
        })?;
        Ok(prev_sample + noise.mul_scalar(std_dev_t))
    }
}

impl Steps for DdimScheduler {
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
