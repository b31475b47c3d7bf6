//! The training-time noise schedule: betas → `alphas_cumprod`, as diffusers' schedulers build it.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::{PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing, numerics};
use crate::error::{DuoError, Result};

/// The training-time noise schedule: betas → `alphas_cumprod`, as diffusers' schedulers build it
/// (float32 betas, float32 `1 - β`, a cumulative product kept in f64 and rounded to f32).
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod_f32: Vec<f32>,
    alphas_cumprod: Vec<f64>,
    prediction_type: PredictionType,
}

impl NoiseSchedule {
    /// The schedule of `config` (`num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`,
    /// `trained_betas`, `prediction_type`), as diffusers' `DDPMScheduler` reads it.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Self::for_kind(config, SchedulerKind::Ddpm)
    }

    /// The same, with errors naming the scheduler `kind` reads the config for.
    pub(crate) fn for_kind(config: &SchedulerConfig, kind: SchedulerKind) -> Result<Self> {
        config.require_not_true("rescale_betas_zero_snr", config.rescale_betas_zero_snr, kind)?;
        let betas = betas_f32(config, kind)?;
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod_f32 = numerics::torch_cumprod_f32(&alphas);
        let alphas_cumprod = alphas_cumprod_f32.iter().map(|&a| a as f64).collect();
        let prediction_type = config.prediction_type(
            kind,
            &[
                ("epsilon", PredictionType::Epsilon),
                ("sample", PredictionType::Sample),
                ("v_prediction", PredictionType::VPrediction),
            ],
        )?;
        Ok(Self { alphas_cumprod_f32, alphas_cumprod, prediction_type })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// ᾱ_t for t = 0 .. num_train_timesteps (float32 values, widened).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The config's `prediction_type`, which decides [`NoiseSchedule::training_target`].
    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// ᾱ_t as the float32 diffusers holds.
    pub(crate) fn alpha_cumprod_f32(&self, t: usize) -> f32 {
        self.alphas_cumprod_f32[t]
    }

    /// ᾱ at a signed timestep, or an error naming it (diffusers indexes with the raw value).
    pub(crate) fn alpha_cumprod_at(&self, t: i64) -> Result<f32> {
        usize::try_from(t).ok().and_then(|i| self.alphas_cumprod_f32.get(i).copied()).ok_or_else(|| {
            DuoError::Invalid(format!(
                "timestep {t} is outside the training schedule 0..{}",
                self.num_train_timesteps()
            ))
        })
    }

    /// (√ᾱ_t, √(1−ᾱ_t)) in float32, as `add_noise` and `get_velocity` compute them.
    fn signal_noise(&self, t: usize) -> (f32, f32) {
        let a = self.alpha_cumprod_f32(t);
        (a.sqrt(), (1.0 - a).sqrt())
    }

    /// The caller's contract: one timestep per batch element, each inside the schedule.
    fn check_timesteps(&self, timesteps: &[usize], batch: usize) {
        let n = self.num_train_timesteps();
        assert_eq!(
            timesteps.len(),
            batch,
            "NoiseSchedule: {} timesteps for a batch of {batch}",
            timesteps.len()
        );
        if let Some(t) = timesteps.iter().find(|&&t| t >= n) {
            panic!("NoiseSchedule: timestep {t} is outside 0..{n}");
        }
    }

    /// √ᾱ_t and √(1−ᾱ_t) as `[B, 1, 1, 1]` columns.
    fn columns<B: Backend>(&self, timesteps: &[usize], original: &Tensor<B, 4>) -> [Tensor<B, 4>; 2] {
        self.check_timesteps(timesteps, original.dims()[0]);
        let (signal, noise): (Vec<f32>, Vec<f32>) = timesteps.iter().map(|&t| self.signal_noise(t)).unzip();
        let device = original.device();
        [batch_column(signal, &device), batch_column(noise, &device)]
    }

    /// x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, one t per batch element (diffusers' `DDPMScheduler.add_noise`).
    ///
    /// # Panics
    /// If `timesteps.len()` is not the batch size or a timestep is ≥ `num_train_timesteps`
    /// (a programming error: the caller draws the timesteps).
    pub fn add_noise<B: Backend>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        timesteps: &[usize],
    ) -> Tensor<B, 4> {
        let [signal, sigma] = self.columns(timesteps, &original);
        signal * original + sigma * noise
    }

    /// v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (diffusers' `get_velocity`). Panics as [`NoiseSchedule::add_noise`].
    pub fn velocity<B: Backend>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        timesteps: &[usize],
    ) -> Tensor<B, 4> {
        let [signal, sigma] = self.columns(timesteps, &original);
        signal * noise - sigma * original
    }

    /// The noise ε that a model's `output` at `sample` (x_t) stands for under the config's
    /// `prediction_type`: the output itself for "epsilon", √ᾱ_t·v + √(1−ᾱ_t)·x_t for
    /// "v_prediction", (x_t − √ᾱ_t·x₀) / √(1−ᾱ_t) for "sample". Panics as [`NoiseSchedule::add_noise`].
    pub fn epsilon<B: Backend>(
        &self,
        output: Tensor<B, 4>,
        sample: Tensor<B, 4>,
        timesteps: &[usize],
    ) -> Tensor<B, 4> {
        match self.prediction_type {
            PredictionType::Epsilon => {
                self.check_timesteps(timesteps, sample.dims()[0]);
                output
            }
            PredictionType::VPrediction => {
                let [signal, sigma] = self.columns(timesteps, &sample);
                signal * output + sigma * sample
            }
            PredictionType::Sample => {
                let [signal, sigma] = self.columns(timesteps, &sample);
                (sample - signal * output) / sigma
            }
        }
    }

    /// The regression target for the config's `prediction_type`: ε for "epsilon", v for
    /// "v_prediction", x₀ for "sample". Panics as [`NoiseSchedule::add_noise`].
    pub fn training_target<B: Backend>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        timesteps: &[usize],
    ) -> Tensor<B, 4> {
        match self.prediction_type {
            PredictionType::Epsilon => {
                self.check_timesteps(timesteps, original.dims()[0]);
                noise
            }
            PredictionType::VPrediction => self.velocity(original, noise, timesteps),
            PredictionType::Sample => {
                self.check_timesteps(timesteps, original.dims()[0]);
                original
            }
        }
    }

    /// The Min-SNR-γ loss weight of timestep `t` (Hang et al. 2023, as diffusers' training scripts
    /// apply `--snr_gamma`): min(SNR_t, γ) divided by what the config's target already weighs in
    /// x₀ terms (SNR for ε, SNR + 1 for v, 1 for x₀). In x₀ terms the ε-loss weighs each timestep
    /// by its SNR, so the low-noise ones, which only refine detail, dominate the gradient; capping
    /// that at γ leaves more of it to the noisy ones, where the prompt decides the image.
    /// Panics if `t` is outside the schedule.
    pub fn min_snr_weight(&self, t: usize, gamma: f64) -> f64 {
        let a = self.alphas_cumprod[t];
        let snr = a / (1.0 - a);
        let clipped = snr.min(gamma);
        match self.prediction_type {
            PredictionType::Epsilon => clipped / snr,
            PredictionType::VPrediction => clipped / (snr + 1.0),
            PredictionType::Sample => clipped,
        }
    }
}

/// The float32 betas of `beta_schedule` (or `trained_betas`).
fn betas_f32(config: &SchedulerConfig, kind: SchedulerKind) -> Result<Vec<f32>> {
    let n = config.num_train_timesteps()?;
    if let Some(betas) = &config.trained_betas {
        if betas.len() != n {
            return Err(
                config.error(format!("trained_betas has {} values but num_train_timesteps={n}", betas.len()))
            );
        }
        return Ok(betas.iter().map(|&b| b as f32).collect());
    }
    #[derive(Clone, Copy)]
    enum Schedule {
        Linear,
        ScaledLinear,
        SquaredCos,
    }
    let schedule = config.choice(
        "beta_schedule",
        config.beta_schedule.as_deref(),
        "linear",
        &[
            ("linear", Schedule::Linear),
            ("scaled_linear", Schedule::ScaledLinear),
            ("squaredcos_cap_v2", Schedule::SquaredCos),
        ],
        kind,
    )?;
    let start = config.beta_start.unwrap_or(0.0001);
    let end = config.beta_end.unwrap_or(0.02);
    Ok(match schedule {
        Schedule::Linear => numerics::torch_linspace_f32(start, end, n),
        Schedule::ScaledLinear => {
            numerics::torch_linspace_f32(start.sqrt(), end.sqrt(), n).into_iter().map(|b| b * b).collect()
        }
        Schedule::SquaredCos => {
            // betas_for_alpha_bar(n, max_beta=0.999, "cosine"), in Python floats.
            let alpha_bar = |t: f64| {
                let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
                c * c
            };
            (0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect()
        }
    })
}

/// DDPM/DDIM's `set_timesteps` for `timestep_spacing` (descending). PNDM uses the same values
/// ascending, Euler the same values as float32 (except for "linspace", which it does not round).
pub(crate) fn discrete_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Vec<i64> {
    let (t, n) = (num_train_timesteps, num_inference_steps);
    match spacing {
        TimestepSpacing::Linspace => numerics::np_linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|x| numerics::np_round(x) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n).rev().map(|i| (i * ratio + steps_offset) as i64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = t as f64 / n as f64;
            numerics::np_arange(t as f64, 0.0, -ratio)
                .into_iter()
                .map(|x| numerics::np_round(x) as i64 - 1)
                .collect()
        }
    }
}

/// `values` as a `[B, 1, 1, 1]` tensor, to scale each batch element.
pub(super) fn batch_column<B: Backend>(values: Vec<f32>, device: &B::Device) -> Tensor<B, 4> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n, 1, 1, 1]), device)
}

pub(super) fn check_same_shape<B: Backend>(
    what: &str,
    a: &Tensor<B, 4>,
    sample: &Tensor<B, 4>,
) -> Result<()> {
    if a.dims() != sample.dims() {
        return Err(DuoError::Invalid(format!(
            "{what} has shape {:?} but the sample has shape {:?}",
            a.dims(),
            sample.dims()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> SchedulerConfig {
        let value = super::super::parse_python_json(json, std::path::Path::new("test.json")).unwrap();
        SchedulerConfig::from_value(value, std::path::Path::new("test.json")).unwrap()
    }

    #[test]
    fn discrete_timesteps_match_diffusers_lists() {
        // diffusers' tests: DDIM leading, 5 steps, offset 1 -> [801, 601, 401, 201, 1].
        assert_eq!(discrete_timesteps(TimestepSpacing::Leading, 1000, 5, 1), vec![801, 601, 401, 201, 1]);
        assert_eq!(discrete_timesteps(TimestepSpacing::Trailing, 1000, 5, 0), vec![999, 799, 599, 399, 199]);
        assert_eq!(discrete_timesteps(TimestepSpacing::Linspace, 1000, 4, 0), vec![999, 666, 333, 0]);
    }

    #[test]
    fn sd_alphas_cumprod_are_float32() {
        let c = config(r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#);
        let s = NoiseSchedule::from_config(&c).unwrap();
        assert_eq!(s.num_train_timesteps(), 1000);
        let a = s.alphas_cumprod();
        // Values printed by torch 2.15 (CPU) for diffusers' SD schedule.
        assert_eq!(a[0], 0.9991499781608582);
        assert_eq!(a[500], 0.27633246779441833);
        assert_eq!(a[999], 0.00466009508818388);
        assert!(a.iter().all(|&x| x as f32 as f64 == x));
    }

    #[test]
    fn min_snr_weights_match_diffusers_training_scripts() {
        // diffusers.training_utils.compute_snr + the scripts' --snr_gamma 5 weights (torch 2.15),
        // for t = 0, 100, 500, 999.
        let expected = [
            ("epsilon", [0.0042537241, 0.5914453864, 1.0, 1.0]),
            ("v_prediction", [0.0042501087, 0.5288841724, 0.2763324976, 0.0046600942]),
        ];
        for (prediction, weights) in expected {
            let c = config(&format!(
                r#"{{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                    "prediction_type": "{prediction}"}}"#
            ));
            let s = NoiseSchedule::from_config(&c).unwrap();
            for (t, want) in [0, 100, 500, 999].into_iter().zip(weights) {
                let got = s.min_snr_weight(t, 5.0);
                assert!(
                    (got - want).abs() < 1e-6 * want.max(1e-3) * 10.0,
                    "{prediction} t={t}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn bad_beta_schedule_is_named() {
        let c = config(r#"{"beta_schedule": "sigmoid"}"#);
        let err = NoiseSchedule::from_config(&c).unwrap_err().to_string();
        assert!(err.contains("beta_schedule=\"sigmoid\""), "{err}");
    }
}
