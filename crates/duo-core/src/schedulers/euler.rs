//! diffusers' `EulerDiscreteScheduler` (schedulers/scheduling_euler_discrete.py): Euler's method on
//! the probability-flow ODE in the σ parametrisation (Karras et al. 2022, Algorithm 2 with
//! s_churn = 0, which is what the pipelines use).
//!
//! σ_t = √((1 − ᾱ_t)/ᾱ_t), linearly interpolated at the (possibly fractional) timesteps, with a
//! trailing final σ (0, or σ_min with `final_sigmas_type="sigma_min"`). The latents live at scale
//! √(σ²+1), so `scale_model_input` divides by it and `init_noise_sigma` is σ_max (or √(σ_max²+1)
//! with "leading" spacing).

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::sigmas::{final_sigmas_type, sigmas_at};
use super::{
    NoiseSchedule, PredictionType, SchedulerConfig, SchedulerKind, SchedulerState, Steps, TimestepSpacing,
    numerics,
};
use crate::error::Result;

const KIND: SchedulerKind = SchedulerKind::Euler;

#[derive(Debug, Clone)]
pub struct EulerScheduler {
    /// float32 timesteps, widened.
    timesteps: Vec<f64>,
    /// σ for each timestep plus the final σ, as the float32 diffusers holds, and widened.
    sigmas_f32: Vec<f32>,
    sigmas: Vec<f64>,
    prediction_type: PredictionType,
    init_noise_sigma: f32,
}

impl EulerScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        // 1. Refuse what we do not implement.
        for (key, value) in [
            ("use_karras_sigmas", config.use_karras_sigmas),
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
        ] {
            config.require_not_true(key, value, KIND)?;
        }
        config.choice(
            "interpolation_type",
            config.interpolation_type.as_deref(),
            "linear",
            &[("linear", ())],
            KIND,
        )?;
        let prediction_type = config.prediction_type(
            KIND,
            &[
                ("epsilon", PredictionType::Epsilon),
                ("v_prediction", PredictionType::VPrediction),
                ("sample", PredictionType::Sample),
                ("original_sample", PredictionType::Sample),
            ],
        )?;
        // "continuous" changes the timesteps only together with v_prediction.
        let continuous = config.choice(
            "timestep_type",
            config.timestep_type.as_deref(),
            "discrete",
            &[("discrete", false), ("continuous", true)],
            KIND,
        )?;
        if continuous && prediction_type == PredictionType::VPrediction {
            return Err(config.error(
                "timestep_type=\"continuous\" with prediction_type=\"v_prediction\" is not supported by \
                 EulerDiscreteScheduler (its timesteps are 0.25·ln σ)",
            ));
        }
        let final_sigmas = final_sigmas_type(config, KIND)?;
        let schedule = NoiseSchedule::for_kind(config, KIND)?;
        let num_train = schedule.num_train_timesteps();

        // 2. Timesteps (float32).
        let spacing = config.timestep_spacing(KIND)?;
        let n = num_inference_steps;
        let timesteps: Vec<f32> = match spacing {
            TimestepSpacing::Linspace => numerics::np_linspace(0.0, (num_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = num_train / n;
                let offset = config.steps_offset() as f32;
                (0..n).rev().map(|i| (i * ratio) as f32 + offset).collect()
            }
            TimestepSpacing::Trailing => {
                numerics::np_arange(num_train as f64, 0.0, -(num_train as f64 / n as f64))
                    .into_iter()
                    .map(|t| numerics::np_round(t) as f32 - 1.0)
                    .collect()
            }
        };

        // 3. σ at each timestep, then the final σ.
        let timesteps: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        let sigmas_f32 = sigmas_at(&schedule, &timesteps, final_sigmas);

        // 4. init_noise_sigma (float32 arithmetic, as diffusers' tensor property).
        let max_sigma = sigmas_f32.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };

        Ok(Self {
            timesteps,
            sigmas: sigmas_f32.iter().map(|&s| s as f64).collect(),
            sigmas_f32,
            prediction_type,
            init_noise_sigma,
        })
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    /// √(σ²+1), the divisor of `scale_model_input`.
    pub(crate) fn input_scale(&self, step_index: usize) -> f32 {
        let sigma = self.sigmas_f32[step_index];
        (sigma * sigma + 1.0).sqrt()
    }

    fn prev_sample<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        // s_churn = 0 ⇒ γ = 0 and σ̂ = σ.
        let sigma = self.sigmas_f32[step_index];
        let sigma_hat = sigma;

        // 1. x̂₀ from the model output.
        let pred_original_sample = match self.prediction_type {
            PredictionType::Epsilon => sample.clone() - model_output.mul_scalar(sigma_hat),
            PredictionType::VPrediction => {
                let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
                model_output.mul_scalar(c_out) + sample.clone().div_scalar(sigma * sigma + 1.0)
            }
            PredictionType::Sample => model_output,
        };

        // 2. The ODE derivative d = (x − x̂₀)/σ̂ and one Euler step to the next σ.
        let derivative = (sample.clone() - pred_original_sample).div_scalar(sigma_hat);
        let dt = self.sigmas_f32[step_index + 1] - sigma_hat;
        sample + derivative.mul_scalar(dt)
    }
}

impl Steps for EulerScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn noise_coefficients(&self, step_index: usize) -> (f32, f32) {
        (1.0, self.sigmas_f32[step_index])
    }

    fn step<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        state: SchedulerState<B>,
        _noise: Option<Tensor<B, 4>>,
    ) -> Result<(Tensor<B, 4>, SchedulerState<B>)> {
        Ok((self.prev_sample(model_output, step_index, sample), state))
    }
}
