//! diffusers' `PNDMScheduler` (schedulers/scheduling_pndm.py) with `skip_prk_steps=true`: the
//! pseudo linear multistep (PLMS) method of Liu et al. 2022, as Stable Diffusion ships it.
//!
//! Only `skip_prk_steps=true` is implemented; the Runge-Kutta warm-up (`false`, diffusers' default)
//! is an error. The PLMS list repeats its second timestep: for 10 steps with `steps_offset=1` it is
//! `[901, 801, 801, 701, …, 101, 1]` (11 model calls). The first call at 801 predicts x_801 from x_901
//! (first order); the second call at 801 redoes the step 901 → 801 from x_901 with the mean of the
//! two outputs (a second-order correction); from then on the step uses up to four past outputs
//! (formula (12) of the paper). The step rule depends on `counter` (steps taken since the start),
//! not on the loop index, so img2img starting mid-list works like diffusers.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::ddpm::check_in_schedule;
use super::{
    NoiseSchedule, PredictionType, SchedulerConfig, SchedulerKind, SchedulerState, Steps,
    alpha_noise_coefficients, discrete_timesteps,
};
use crate::error::{DuoError, Result};

const KIND: SchedulerKind = SchedulerKind::Pndm;

#[derive(Debug, Clone)]
pub struct PndmScheduler {
    schedule: NoiseSchedule,
    /// The PLMS timesteps in loop order (diffusers' `plms_timesteps`).
    steps: Vec<i64>,
    timesteps: Vec<f64>,
    /// num_train_timesteps / N (integer division).
    step_ratio: i64,
    prediction_type: PredictionType,
    /// ᾱ after the last step: 1 with `set_alpha_to_one`, else ᾱ_0 (the PNDM default).
    final_alpha_cumprod: f32,
}

impl PndmScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if !config.skip_prk_steps.unwrap_or(false) {
            return Err(config.error(format!(
                "skip_prk_steps={} is not supported by PNDMScheduler: only the PLMS steps are implemented \
                 (skip_prk_steps=true, as in Stable Diffusion's scheduler_config.json)",
                config.skip_prk_steps.map_or("false (the default)".to_string(), |v| v.to_string())
            )));
        }
        let schedule = NoiseSchedule::for_kind(config, KIND)?;
        // diffusers' PNDM accepts only these two.
        let prediction_type = config.prediction_type(
            KIND,
            &[("epsilon", PredictionType::Epsilon), ("v_prediction", PredictionType::VPrediction)],
        )?;
        let num_train = schedule.num_train_timesteps();
        let spacing = config.timestep_spacing(KIND)?;
        // diffusers' `_timesteps` are the DDIM timesteps in ascending order.
        let mut ascending =
            discrete_timesteps(spacing, num_train, num_inference_steps, config.steps_offset());
        ascending.reverse();
        check_in_schedule(config, KIND, &ascending, num_train)?;
        // plms = _timesteps[:-1] ++ _timesteps[-2:-1] ++ _timesteps[-1:], reversed.
        let n = ascending.len();
        let mut steps = ascending[..n - 1].to_vec();
        if n >= 2 {
            steps.push(ascending[n - 2]);
        }
        steps.push(ascending[n - 1]);
        steps.reverse();
        let final_alpha_cumprod =
            if config.set_alpha_to_one(KIND) { 1.0 } else { schedule.alpha_cumprod_f32(0) };
        Ok(Self {
            timesteps: steps.iter().map(|&t| t as f64).collect(),
            steps,
            step_ratio: (num_train / num_inference_steps) as i64,
            prediction_type,
            final_alpha_cumprod,
            schedule,
        })
    }

    /// The training schedule (ᾱ).
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// diffusers' `step_plms`.
    fn plms_step<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        state: SchedulerState<B>,
    ) -> Result<(Tensor<B, 4>, SchedulerState<B>)> {
        let SchedulerState { model_outputs: mut ets, cur_sample, counter, lower_order_nums } = state;
        let mut timestep = self.steps[step_index];
        let mut prev_timestep = timestep - self.step_ratio;

        // 1. Record the output; the correction step (counter 1) redoes the previous step instead.
        if counter != 1 {
            if ets.len() > 3 {
                ets.drain(..ets.len() - 3);
            }
            ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            timestep += self.step_ratio;
        }

        // 2. The linear multistep combination of the past outputs, formula (12).
        let bad_state = || {
            DuoError::Invalid(format!(
                "PNDMScheduler: inconsistent state at step index {step_index}: counter {counter} with {} past outputs",
                ets.len()
            ))
        };
        let (model_output, sample, cur_sample) = match (ets.len(), counter) {
            (1, 0) => (model_output, sample.clone(), Some(sample)),
            (1, 1) => {
                let first = cur_sample.ok_or_else(bad_state)?;
                ((model_output + ets[0].clone()).div_scalar(2.0), first, None)
            }
            (2, _) => {
                let [e2, e1] = [&ets[0], &ets[1]].map(Clone::clone);
                ((e1.mul_scalar(3.0) - e2).div_scalar(2.0), sample, cur_sample)
            }
            (3, _) => {
                let [e3, e2, e1] = [&ets[0], &ets[1], &ets[2]].map(Clone::clone);
                (
                    (e1.mul_scalar(23.0) - e2.mul_scalar(16.0) + e3.mul_scalar(5.0)).div_scalar(12.0),
                    sample,
                    cur_sample,
                )
            }
            (4, _) => {
                let [e4, e3, e2, e1] = [&ets[0], &ets[1], &ets[2], &ets[3]].map(Clone::clone);
                let combined =
                    e1.mul_scalar(55.0) - e2.mul_scalar(59.0) + e3.mul_scalar(37.0) - e4.mul_scalar(9.0);
                (combined.mul_scalar(1.0 / 24.0), sample, cur_sample)
            }
            _ => return Err(bad_state()),
        };

        let prev_sample = self.prev_sample(sample, timestep, prev_timestep, model_output)?;
        let state = SchedulerState { model_outputs: ets, cur_sample, counter: counter + 1, lower_order_nums };
        Ok((prev_sample, state))
    }

    /// diffusers' `_get_prev_sample`: formula (9) of the PNDM paper.
    fn prev_sample<B: Backend>(
        &self,
        sample: Tensor<B, 4>,
        timestep: i64,
        prev_timestep: i64,
        model_output: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let alpha_prod_t = self.schedule.alpha_cumprod_at(timestep)?;
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            self.schedule.alpha_cumprod_at(prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;

        let model_output = match self.prediction_type {
            PredictionType::VPrediction => {
                model_output.mul_scalar(alpha_prod_t.sqrt()) + sample.clone().mul_scalar(beta_prod_t.sqrt())
            }
            _ => model_output,
        };

        // x_t' = √(ᾱ_t'/ᾱ_t)·x_t − (ᾱ_t' − ᾱ_t)·ε / (ᾱ_t·√β̄_t' + √(ᾱ_t·β̄_t·ᾱ_t'))
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let model_output_denom_coeff =
            alpha_prod_t * beta_prod_t_prev.sqrt() + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        Ok(sample.mul_scalar(sample_coeff)
            - model_output.mul_scalar(alpha_prod_t_prev - alpha_prod_t).div_scalar(model_output_denom_coeff))
    }
}

impl Steps for PndmScheduler {
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
        _noise: Option<Tensor<B, 4>>,
    ) -> Result<(Tensor<B, 4>, SchedulerState<B>)> {
        self.plms_step(model_output, step_index, sample, state)
    }
}
