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
//! Where diffusers computes a coefficient on a float32 torch scalar, we compute it in `f32` with the
//! same operations in the same order, and apply it to the `f32` tensors as diffusers does. Schedules
//! built with numpy (timesteps, Euler's interpolated sigmas) are built in `f64` with numpy's own
//! formulas (`numerics.rs`), because timesteps are compared exactly.

mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod numerics;
mod pndm;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Deserializer};

pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpm_solver::DpmSolverScheduler;
pub use euler::EulerScheduler;
pub use pndm::PndmScheduler;

use crate::error::{DuoError, Result};

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// diffusers' `scheduler_config.json`, with the key names of the file.
///
/// Every key is optional: a missing key takes the default of the scheduler being built, whatever
/// the file's `_class_name`, as in diffusers (`X.from_config(raw_dict)` and also
/// `X.from_config(pipe.scheduler.config)`, whose `_use_default_values` drops the keys the file did
/// not have). This matters for old files such as SD 1.4's, which lack `timestep_spacing`: "leading"
/// for DDPM/DDIM/PNDM, "linspace" for Euler/DPM-Solver; and `set_alpha_to_one`: true for DDIM,
/// false for PNDM.
///
/// Keys of other schedulers are accepted and ignored, as diffusers does. A key the scheduler being
/// built reads, set to a value we do not implement, is an error naming the key and the value.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub diffusers_class: Option<String>,
    pub num_train_timesteps: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub beta_start: Option<f64>,
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub thresholding: Option<bool>,
    // DDPM / DDIM
    pub variance_type: Option<String>,
    pub clip_sample: Option<bool>,
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub clip_sample_range: Option<f64>,
    // DDIM / PNDM
    pub set_alpha_to_one: Option<bool>,
    // PNDM
    pub skip_prk_steps: Option<bool>,
    // Euler / DPM-Solver
    pub interpolation_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub sigma_min: Option<f64>,
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub sigma_max: Option<f64>,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    // DPM-Solver
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub lambda_min_clipped: Option<f64>,
    /// The file the config came from, named in every error.
    #[serde(skip)]
    source: PathBuf,
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`. Python's JSON extensions `-Infinity`, `Infinity` and `NaN`
    /// (diffusers saves `"lambda_min_clipped": -Infinity`) are accepted.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::error::read_to_string(path)?;
        let value = parse_python_json(&text, path)?;
        Self::from_value(value, path)
    }

    /// A config from an already parsed JSON object; `source` is the file named in errors.
    pub fn from_value(value: serde_json::Value, source: &Path) -> Result<Self> {
        let mut config: Self =
            serde_json::from_value(value).map_err(|e| DuoError::parse(source, e.to_string()))?;
        config.source = source.to_path_buf();
        Ok(config)
    }

    /// diffusers' `_class_name`, e.g. "PNDMScheduler".
    pub fn class_name(&self) -> Option<&str> {
        self.diffusers_class.as_deref()
    }

    /// The file this config was read from (empty when built in code).
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub(crate) fn error(&self, message: impl Into<String>) -> DuoError {
        DuoError::config(&self.source, message)
    }

    pub(crate) fn num_train_timesteps(&self) -> Result<usize> {
        match self.num_train_timesteps.unwrap_or(1000) {
            n if n >= 2 => Ok(n),
            n => Err(self.error(format!("num_train_timesteps={n} is too small (need at least 2)"))),
        }
    }

    pub(crate) fn steps_offset(&self) -> usize {
        self.steps_offset.unwrap_or(0)
    }

    /// `timestep_spacing` (default "leading" for DDPM/DDIM/PNDM, "linspace" for Euler/DPM-Solver).
    pub(crate) fn timestep_spacing(&self, kind: SchedulerKind) -> Result<TimestepSpacing> {
        let default = match kind {
            SchedulerKind::Ddpm | SchedulerKind::Ddim | SchedulerKind::Pndm => "leading",
            SchedulerKind::Euler | SchedulerKind::DpmSolver => "linspace",
        };
        self.choice(
            "timestep_spacing",
            self.timestep_spacing.as_deref(),
            default,
            &[
                ("linspace", TimestepSpacing::Linspace),
                ("leading", TimestepSpacing::Leading),
                ("trailing", TimestepSpacing::Trailing),
            ],
            kind,
        )
    }

    /// `set_alpha_to_one` (DDIM default true, PNDM default false).
    pub(crate) fn set_alpha_to_one(&self, kind: SchedulerKind) -> bool {
        self.set_alpha_to_one.unwrap_or(kind == SchedulerKind::Ddim)
    }

    /// `prediction_type` (default "epsilon"), restricted to the values `kind` accepts.
    pub(crate) fn prediction_type(
        &self,
        kind: SchedulerKind,
        allowed: &[(&str, PredictionType)],
    ) -> Result<PredictionType> {
        self.choice("prediction_type", self.prediction_type.as_deref(), "epsilon", allowed, kind)
    }

    /// One string-valued key: its value (or `default`) must be one of `options`.
    pub(crate) fn choice<T: Copy>(
        &self,
        key: &str,
        value: Option<&str>,
        default: &str,
        options: &[(&str, T)],
        kind: SchedulerKind,
    ) -> Result<T> {
        let value = value.unwrap_or(default);
        options.iter().find(|(name, _)| *name == value).map(|(_, v)| *v).ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
            self.error(format!(
                "{key}={value:?} is not supported by {} (supported: {})",
                kind.class_name(),
                names.join(", ")
            ))
        })
    }

    /// A boolean key whose `true` we do not implement.
    pub(crate) fn require_not_true(&self, key: &str, value: Option<bool>, kind: SchedulerKind) -> Result<()> {
        if value == Some(true) {
            return Err(self.error(format!(
                "{key}=true is not supported by {} (only {key}=false is implemented)",
                kind.class_name()
            )));
        }
        Ok(())
    }
}

/// Parses JSON as Python's `json` module writes it: the bare tokens `NaN`, `Infinity` and
/// `-Infinity` (outside strings) become the strings "NaN", "Infinity" and "-Infinity", which the
/// float fields of [`SchedulerConfig`] accept.
pub fn parse_python_json(text: &str, path: &Path) -> Result<serde_json::Value> {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out).map_err(|e| DuoError::parse(path, e.to_string()))
}

/// An optional float that may also be one of Python's "NaN", "Infinity", "-Infinity".
fn de_opt_f64<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Float {
        Number(f64),
        Text(String),
    }
    match Option::<Float>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Float::Number(x)) => Ok(Some(x)),
        Some(Float::Text(s)) => match s.as_str() {
            "NaN" => Ok(Some(f64::NAN)),
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            other => Err(serde::de::Error::custom(format!("expected a number, found the string {other:?}"))),
        },
    }
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// "epsilon": the noise ε.
    Epsilon,
    /// "sample" (Euler also accepts "original_sample"): the clean sample x₀.
    Sample,
    /// "v_prediction": v = √ᾱ·ε − √(1−ᾱ)·x₀.
    VPrediction,
}

/// How inference timesteps are spread over the training timesteps (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// The last sigma of Euler and DPM-Solver (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinalSigmas {
    Zero,
    SigmaMin,
}

// ---------------------------------------------------------------------------------------------
// Kind
// ---------------------------------------------------------------------------------------------

/// The five schedulers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddpm,
    Ddim,
    Pndm,
    Euler,
    DpmSolver,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [Self::Ddpm, Self::Ddim, Self::Pndm, Self::Euler, Self::DpmSolver];

    /// The name on our command lines: "ddpm", "ddim", "pndm", "euler", "dpm-solver".
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::Euler => "euler",
            Self::DpmSolver => "dpm-solver",
        }
    }

    /// diffusers' class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddpm => "DDPMScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::Pndm => "PNDMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::DpmSolver => "DPMSolverMultistepScheduler",
        }
    }

    /// The kind for a diffusers `_class_name`; `None` for other classes.
    pub fn from_class_name(class_name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == class_name)
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = DuoError;

    /// Our short names; diffusers' class names are accepted too.
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s || k.class_name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            DuoError::Invalid(format!("unknown scheduler {s:?} (expected one of: {})", names.join(", ")))
        })
    }
}

/// The scheduler a run config names: one of the five by [`SchedulerKind::name`], or `"default"` for
/// the model folder's own (`scheduler/scheduler_config.json`). Any other word is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SchedulerChoice {
    FolderDefault,
    Kind(SchedulerKind),
}

impl SchedulerChoice {
    /// The scheduler named, `None` for the folder's own.
    pub fn kind(self) -> Option<SchedulerKind> {
        match self {
            Self::FolderDefault => None,
            Self::Kind(kind) => Some(kind),
        }
    }
}

impl TryFrom<String> for SchedulerChoice {
    type Error = DuoError;

    fn try_from(name: String) -> Result<Self> {
        match name.as_str() {
            "default" => Ok(Self::FolderDefault),
            name => Ok(Self::Kind(name.parse().map_err(|_| {
                let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
                DuoError::Invalid(format!(
                    "unknown scheduler {name:?} (expected \"default\" or one of: {})",
                    names.join(", ")
                ))
            })?)),
        }
    }
}

impl From<SchedulerChoice> for String {
    fn from(choice: SchedulerChoice) -> String {
        match choice {
            SchedulerChoice::FolderDefault => "default".to_string(),
            SchedulerChoice::Kind(kind) => kind.name().to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Training-time noise schedule
// ---------------------------------------------------------------------------------------------

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
fn batch_column<B: Backend>(values: Vec<f32>, device: &B::Device) -> Tensor<B, 4> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n, 1, 1, 1]), device)
}

fn check_same_shape<B: Backend>(what: &str, a: &Tensor<B, 4>, sample: &Tensor<B, 4>) -> Result<()> {
    if a.dims() != sample.dims() {
        return Err(DuoError::Invalid(format!(
            "{what} has shape {:?} but the sample has shape {:?}",
            a.dims(),
            sample.dims()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scheduler
// ---------------------------------------------------------------------------------------------

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
        match self {
            Self::Ddpm(s) => s.timesteps(),
            Self::Ddim(s) => s.timesteps(),
            Self::Pndm(s) => s.timesteps(),
            Self::Euler(s) => s.timesteps(),
            Self::DpmSolver(s) => s.timesteps(),
        }
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
        let mut state = state;
        let prev = match self {
            Self::Ddpm(s) => s.step(model_output, step_index, sample, noise)?,
            Self::Ddim(s) => s.step(model_output, step_index, sample, noise)?,
            Self::Pndm(s) => {
                let (prev, next) = s.step(model_output, step_index, sample, state)?;
                state = next;
                prev
            }
            Self::Euler(s) => s.step(model_output, step_index, sample),
            Self::DpmSolver(s) => {
                let (prev, next) = s.step(model_output, step_index, sample, state)?;
                state = next;
                prev
            }
        };
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
            let (a, s) = match self {
                Self::Ddpm(s) => s.noise_coefficients(i),
                Self::Ddim(s) => s.noise_coefficients(i),
                Self::Pndm(s) => s.noise_coefficients(i),
                Self::Euler(s) => s.noise_coefficients(i),
                Self::DpmSolver(s) => s.noise_coefficients(i),
            };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> SchedulerConfig {
        let value = parse_python_json(json, Path::new("test.json")).unwrap();
        SchedulerConfig::from_value(value, Path::new("test.json")).unwrap()
    }

    #[test]
    fn python_json_specials_are_parsed() {
        let c = config(
            r#"{"lambda_min_clipped": -Infinity, "sigma_min": null, "_class_name": "x-Infinity NaN"}"#,
        );
        assert_eq!(c.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(c.sigma_min, None);
        assert_eq!(c.class_name(), Some("x-Infinity NaN"));
        let c = config(r#"{"sigma_max": Infinity, "beta_start": 0.00085}"#);
        assert_eq!(c.sigma_max, Some(f64::INFINITY));
        assert_eq!(c.beta_start, Some(0.00085));
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
            assert_eq!(kind.class_name().parse::<SchedulerKind>().unwrap(), kind);
            assert_eq!(SchedulerKind::from_class_name(kind.class_name()), Some(kind));
        }
        let err = "lms".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(err.contains("\"lms\"") && err.contains("dpm-solver"), "{err}");
    }

    #[test]
    fn missing_keys_take_the_defaults_of_the_scheduler_built() {
        // SD 1.4's file: a PNDMScheduler without timestep_spacing / set_alpha_to_one.
        let pndm = config(r#"{"_class_name": "PNDMScheduler"}"#);
        assert_eq!(pndm.timestep_spacing(SchedulerKind::Euler).unwrap(), TimestepSpacing::Linspace);
        assert_eq!(pndm.timestep_spacing(SchedulerKind::DpmSolver).unwrap(), TimestepSpacing::Linspace);
        assert_eq!(pndm.timestep_spacing(SchedulerKind::Ddim).unwrap(), TimestepSpacing::Leading);
        assert_eq!(pndm.timestep_spacing(SchedulerKind::Pndm).unwrap(), TimestepSpacing::Leading);
        assert!(pndm.set_alpha_to_one(SchedulerKind::Ddim));
        assert!(!pndm.set_alpha_to_one(SchedulerKind::Pndm));
        let explicit = config(r#"{"timestep_spacing": "leading", "set_alpha_to_one": false}"#);
        assert_eq!(explicit.timestep_spacing(SchedulerKind::Euler).unwrap(), TimestepSpacing::Leading);
        assert!(!explicit.set_alpha_to_one(SchedulerKind::Ddim));
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
