//! diffusers' `DPMSolverMultistepScheduler` (schedulers/scheduling_dpmsolver_multistep.py):
//! DPM-Solver++ (Lu et al. 2022b) and DPM-Solver (2022a), multistep, orders 1–3. The default,
//! `algorithm_type="dpmsolver++"`, `solver_order=2`, is "DPM++ 2M".
//!
//! Notation, as in diffusers: for a noise level σ, α_t = 1/√(σ²+1), σ_t = σ·α_t, λ = ln α_t − ln σ_t;
//! s0, s1, s2 are the current and past steps, t the next one, h = λ_t − λ_s0, r_k = h_k/h.
//! The model outputs kept in the history are the converted ones (x̂₀ for ++, ε̂ otherwise).
//!
//! Not implemented (errors naming the key): the SDE variants, Karras/exponential/beta/Lu/flow sigmas,
//! learned variances, thresholding.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::sigmas::{final_sigmas_type, sigmas_at};
use super::{
    FinalSigmas, NoiseSchedule, PredictionType, SchedulerConfig, SchedulerKind, SchedulerState, Steps,
    TimestepSpacing, numerics,
};
use crate::error::{DuoError, Result};

const KIND: SchedulerKind = SchedulerKind::DpmSolver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    /// "dpmsolver++": the model output is converted to x̂₀.
    DpmSolverPlusPlus,
    /// "dpmsolver": the model output is converted to ε̂.
    DpmSolver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

#[derive(Debug, Clone)]
pub struct DpmSolverScheduler {
    timesteps: Vec<f64>,
    /// σ per timestep plus the final σ (float32, and widened).
    sigmas_f32: Vec<f32>,
    sigmas: Vec<f64>,
    prediction_type: PredictionType,
    algorithm: Algorithm,
    solver_type: SolverType,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas: FinalSigmas,
}

impl DpmSolverScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        // 1. Options, and refusals of what we do not implement.
        config.require_not_true("thresholding", config.thresholding, KIND)?;
        for (key, value) in [
            ("use_karras_sigmas", config.use_karras_sigmas),
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
            ("use_lu_lambdas", config.use_lu_lambdas),
            ("use_flow_sigmas", config.use_flow_sigmas),
        ] {
            config.require_not_true(key, value, KIND)?;
        }
        if let Some(v) = config.variance_type.as_deref() {
            return Err(config.error(format!(
                "variance_type={v:?} is not supported by DPMSolverMultistepScheduler (learned variances; only null)"
            )));
        }
        // diffusers maps the legacy "deis" to "dpmsolver++" and "logrho"/"bh1"/"bh2" to "midpoint".
        let algorithm = config.choice(
            "algorithm_type",
            config.algorithm_type.as_deref(),
            "dpmsolver++",
            &[
                ("dpmsolver++", Algorithm::DpmSolverPlusPlus),
                ("dpmsolver", Algorithm::DpmSolver),
                ("deis", Algorithm::DpmSolverPlusPlus),
            ],
            KIND,
        )?;
        let solver_type = config.choice(
            "solver_type",
            config.solver_type.as_deref(),
            "midpoint",
            &[
                ("midpoint", SolverType::Midpoint),
                ("heun", SolverType::Heun),
                ("logrho", SolverType::Midpoint),
                ("bh1", SolverType::Midpoint),
                ("bh2", SolverType::Midpoint),
            ],
            KIND,
        )?;
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(config.error(format!(
                "solver_order={solver_order} is not supported by DPMSolverMultistepScheduler (1, 2 or 3)"
            )));
        }
        let prediction_type = config.prediction_type(
            KIND,
            &[
                ("epsilon", PredictionType::Epsilon),
                ("sample", PredictionType::Sample),
                ("v_prediction", PredictionType::VPrediction),
            ],
        )?;
        let final_sigmas = final_sigmas_type(config, KIND)?;
        if algorithm == Algorithm::DpmSolver && final_sigmas == FinalSigmas::Zero {
            return Err(config.error(
                "final_sigmas_type=\"zero\" is not supported with algorithm_type=\"dpmsolver\" \
                 (diffusers requires final_sigmas_type=\"sigma_min\" there)",
            ));
        }
        let schedule = NoiseSchedule::for_kind(config, KIND)?;
        let num_train = schedule.num_train_timesteps();

        // 2. Timesteps: N of N+1 points, skipping the last (t = 0 for "linspace"/"leading").
        //    `lambda_min_clipped` cuts off the noisiest timesteps (λ below it).
        let lambda_min_clipped = config.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
        let clipped = (0..num_train)
            .filter(|&t| {
                let a = schedule.alpha_cumprod_f32(t);
                let lambda = a.sqrt().ln() - (1.0 - a).sqrt().ln();
                (lambda as f64) < lambda_min_clipped
            })
            .count();
        let last_timestep = num_train - clipped;
        let n = num_inference_steps;
        let steps: Vec<i64> = match config.timestep_spacing(KIND)? {
            TimestepSpacing::Linspace => {
                let mut points: Vec<i64> = numerics::np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(|t| numerics::np_round(t) as i64)
                    .collect();
                points.reverse();
                points.pop();
                points
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n).rev().map(|i| (i * ratio + config.steps_offset()) as i64).collect()
            }
            TimestepSpacing::Trailing => {
                numerics::np_arange(last_timestep as f64, 0.0, -(num_train as f64 / n as f64))
                    .into_iter()
                    .map(|t| numerics::np_round(t) as i64 - 1)
                    .collect()
            }
        };
        if steps.is_empty() {
            return Err(DuoError::Invalid(format!(
                "DPMSolverMultistepScheduler: {n} steps over {last_timestep} timesteps give no timestep"
            )));
        }

        // 3. σ at each timestep (integers: the training σ), then the final σ.
        let timesteps: Vec<f64> = steps.iter().map(|&t| t as f64).collect();
        let sigmas_f32 = sigmas_at(&schedule, &timesteps, final_sigmas);

        Ok(Self {
            timesteps,
            sigmas: sigmas_f32.iter().map(|&s| s as f64).collect(),
            sigmas_f32,
            prediction_type,
            algorithm,
            solver_type,
            solver_order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigmas,
        })
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn prev_sample<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        state: SchedulerState<B>,
    ) -> Result<(Tensor<B, 4>, SchedulerState<B>)> {
        let SchedulerState { model_outputs: mut history, cur_sample, counter, lower_order_nums } = state;
        let num_steps = self.timesteps.len();

        // 1. Lower the order at the end (few steps, or a final σ of 0 where λ = ∞).
        let lower_order_final = step_index == num_steps - 1
            && (self.euler_at_final
                || (self.lower_order_final && num_steps < 15)
                || self.final_sigmas == FinalSigmas::Zero);
        let lower_order_second = step_index + 2 == num_steps && self.lower_order_final && num_steps < 15;

        // 2. Convert the output and push it into the history.
        let converted = self.convert_model_output(model_output, step_index, sample.clone());
        history.push(converted);
        if history.len() > self.solver_order {
            history.drain(..history.len() - self.solver_order);
        }

        // 3. The update of the order the history allows.
        let prev_sample = if self.solver_order == 1 || lower_order_nums < 1 || lower_order_final {
            self.first_order_update(&history, step_index, sample)
        } else if self.solver_order == 2 || lower_order_nums < 2 || lower_order_second {
            self.second_order_update(&history, step_index, sample)?
        } else {
            self.third_order_update(&history, step_index, sample)?
        };

        let state = SchedulerState {
            model_outputs: history,
            cur_sample,
            counter,
            lower_order_nums: (lower_order_nums + 1).min(self.solver_order),
        };
        Ok((prev_sample, state))
    }

    /// diffusers' `convert_model_output`: x̂₀ for ++, ε̂ otherwise.
    fn convert_model_output<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas_f32[step_index]);
        match (self.algorithm, self.prediction_type) {
            (Algorithm::DpmSolverPlusPlus, PredictionType::Epsilon) => {
                (sample - model_output.mul_scalar(sigma_t)).div_scalar(alpha_t)
            }
            (Algorithm::DpmSolverPlusPlus, PredictionType::Sample) => model_output,
            (Algorithm::DpmSolverPlusPlus, PredictionType::VPrediction) => {
                sample.mul_scalar(alpha_t) - model_output.mul_scalar(sigma_t)
            }
            (Algorithm::DpmSolver, PredictionType::Epsilon) => model_output,
            (Algorithm::DpmSolver, PredictionType::Sample) => {
                (sample - model_output.mul_scalar(alpha_t)).div_scalar(sigma_t)
            }
            (Algorithm::DpmSolver, PredictionType::VPrediction) => {
                model_output.mul_scalar(alpha_t) + sample.mul_scalar(sigma_t)
            }
        }
    }

    /// (α, σ, λ) at loop index `i` (float32, as diffusers' tensor arithmetic).
    fn level(&self, i: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = alpha_sigma(self.sigmas_f32[i]);
        (alpha, sigma, alpha.ln() - sigma.ln())
    }

    /// The levels of the `k` previous steps, or an error when the loop has not had them.
    fn past_level(&self, step_index: usize, k: usize) -> Result<(f32, f32, f32)> {
        step_index.checked_sub(k).map(|i| self.level(i)).ok_or_else(|| {
            DuoError::Invalid(format!(
                "DPMSolverMultistepScheduler: a multistep update at step index {step_index} needs {k} earlier steps \
                 (the state does not match the loop)"
            ))
        })
    }

    /// diffusers' `dpm_solver_first_order_update` (DDIM in the λ parametrisation).
    fn first_order_update<B: Backend>(
        &self,
        history: &[Tensor<B, 4>],
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let m0 = history[history.len() - 1].clone();
        let (alpha_t, sigma_t, lambda_t) = self.level(step_index + 1);
        let (alpha_s, sigma_s, lambda_s) = self.level(step_index);
        let h = lambda_t - lambda_s;
        match self.algorithm {
            Algorithm::DpmSolverPlusPlus => {
                sample.mul_scalar(sigma_t / sigma_s) - m0.mul_scalar(alpha_t * ((-h).exp() - 1.0))
            }
            Algorithm::DpmSolver => {
                sample.mul_scalar(alpha_t / alpha_s) - m0.mul_scalar(sigma_t * (h.exp() - 1.0))
            }
        }
    }

    /// diffusers' `multistep_dpm_solver_second_order_update`.
    fn second_order_update<B: Backend>(
        &self,
        history: &[Tensor<B, 4>],
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let (alpha_t, sigma_t, lambda_t) = self.level(step_index + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.level(step_index);
        let (_, _, lambda_s1) = self.past_level(step_index, 1)?;
        let [m1, m0] = last_outputs::<B, 2>(history, step_index)?;

        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d1 = (m0.clone() - m1).mul_scalar(1.0 / r0);
        let d0 = m0;
        Ok(match (self.algorithm, self.solver_type) {
            (Algorithm::DpmSolverPlusPlus, solver) => {
                let phi = alpha_t * ((-h).exp() - 1.0);
                let base = sample.mul_scalar(sigma_t / sigma_s0) - d0.mul_scalar(phi);
                match solver {
                    SolverType::Midpoint => base - d1.mul_scalar(0.5 * phi),
                    SolverType::Heun => base + d1.mul_scalar(alpha_t * (((-h).exp() - 1.0) / h + 1.0)),
                }
            }
            (Algorithm::DpmSolver, solver) => {
                let phi = sigma_t * (h.exp() - 1.0);
                let base = sample.mul_scalar(alpha_t / alpha_s0) - d0.mul_scalar(phi);
                match solver {
                    SolverType::Midpoint => base - d1.mul_scalar(0.5 * phi),
                    SolverType::Heun => base - d1.mul_scalar(sigma_t * ((h.exp() - 1.0) / h - 1.0)),
                }
            }
        })
    }

    /// diffusers' `multistep_dpm_solver_third_order_update`.
    fn third_order_update<B: Backend>(
        &self,
        history: &[Tensor<B, 4>],
        step_index: usize,
        sample: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let (alpha_t, sigma_t, lambda_t) = self.level(step_index + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.level(step_index);
        let (_, _, lambda_s1) = self.past_level(step_index, 1)?;
        let (_, _, lambda_s2) = self.past_level(step_index, 2)?;
        let [m2, m1, m0] = last_outputs::<B, 3>(history, step_index)?;

        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let h_1 = lambda_s1 - lambda_s2;
        let r0 = h_0 / h;
        let r1 = h_1 / h;
        let d1_0 = (m0.clone() - m1.clone()).mul_scalar(1.0 / r0);
        let d1_1 = (m1 - m2).mul_scalar(1.0 / r1);
        let d1 = d1_0.clone() + (d1_0.clone() - d1_1.clone()).mul_scalar(r0 / (r0 + r1));
        let d2 = (d1_0 - d1_1).mul_scalar(1.0 / (r0 + r1));
        let d0 = m0;
        Ok(match self.algorithm {
            Algorithm::DpmSolverPlusPlus => {
                let e = (-h).exp();
                sample.mul_scalar(sigma_t / sigma_s0) - d0.mul_scalar(alpha_t * (e - 1.0))
                    + d1.mul_scalar(alpha_t * ((e - 1.0) / h + 1.0))
                    - d2.mul_scalar(alpha_t * ((e - 1.0 + h) / (h * h) - 0.5))
            }
            Algorithm::DpmSolver => {
                let e = h.exp();
                sample.mul_scalar(alpha_t / alpha_s0)
                    - d0.mul_scalar(sigma_t * (e - 1.0))
                    - d1.mul_scalar(sigma_t * ((e - 1.0) / h - 1.0))
                    - d2.mul_scalar(sigma_t * ((e - 1.0 - h) / (h * h) - 0.5))
            }
        })
    }
}

impl Steps for DpmSolverScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn noise_coefficients(&self, step_index: usize) -> (f32, f32) {
        alpha_sigma(self.sigmas_f32[step_index])
    }

    fn step<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        state: SchedulerState<B>,
        _noise: Option<Tensor<B, 4>>,
    ) -> Result<(Tensor<B, 4>, SchedulerState<B>)> {
        self.prev_sample(model_output, step_index, sample, state)
    }
}

/// α_t = 1/√(σ²+1), σ_t = σ·α_t (diffusers' `_sigma_to_alpha_sigma_t`), in float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// The last `N` converted outputs, oldest first.
fn last_outputs<B: Backend, const N: usize>(
    history: &[Tensor<B, 4>],
    step_index: usize,
) -> Result<[Tensor<B, 4>; N]> {
    let start = history.len().checked_sub(N).ok_or_else(|| {
        DuoError::Invalid(format!(
            "DPMSolverMultistepScheduler: an order-{N} update at step index {step_index} needs {N} past outputs, \
             the state has {}",
            history.len()
        ))
    })?;
    Ok(std::array::from_fn(|k| history[start + k].clone()))
}
