//! `scheduler_config.json` as diffusers writes it ([`SchedulerConfig`], key for key), the five
//! scheduler kinds, and the scheduler a run config names.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::error::{DuoError, Result};

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
}
