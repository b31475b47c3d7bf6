//! The σ schedule Euler and DPM-Solver share: σ_t = √((1 − ᾱ_t)/ᾱ_t) of the training schedule,
//! linearly interpolated at the inference timesteps (numpy's `np.interp`), then the final σ.

use super::{NoiseSchedule, SchedulerConfig, SchedulerKind, numerics};
use crate::error::Result;

/// The last sigma of Euler and DPM-Solver (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// `final_sigmas_type` (default "zero").
pub(crate) fn final_sigmas_type(config: &SchedulerConfig, kind: SchedulerKind) -> Result<FinalSigmas> {
    config.choice(
        "final_sigmas_type",
        config.final_sigmas_type.as_deref(),
        "zero",
        &[("zero", FinalSigmas::Zero), ("sigma_min", FinalSigmas::SigmaMin)],
        kind,
    )
}

/// σ at each of `timesteps` (float32, as diffusers holds them), then the final σ: 0, or the smallest
/// training σ.
pub(crate) fn sigmas_at(schedule: &NoiseSchedule, timesteps: &[f64], last: FinalSigmas) -> Vec<f32> {
    let train: Vec<f32> = (0..schedule.num_train_timesteps())
        .map(|t| {
            let a = schedule.alpha_cumprod_f32(t);
            ((1.0 - a) / a).sqrt()
        })
        .collect();
    let train_f64: Vec<f64> = train.iter().map(|&s| s as f64).collect();
    let mut sigmas: Vec<f32> =
        timesteps.iter().map(|&t| numerics::np_interp_unit_grid(t, &train_f64) as f32).collect();
    sigmas.push(match last {
        FinalSigmas::Zero => 0.0,
        FinalSigmas::SigmaMin => train[0],
    });
    sigmas
}
