//! Which concept judge a config names, and the keys that set it up.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::ToyJudge;
use super::nudenet::{DEFAULT_WEIGHTS, NudityJudge, NudityPreset};
use super::q16::Q16Judge;
use crate::error::{DuoError, Result};
use crate::eval::Judge;
use crate::world::Shape;

/// A run's concept judge: `"nudenet"` (NudeNet's detector, nudity), `"q16"` (CLIP with Q16's
/// prompts, violence), a toy concept-judge folder (`config.json` + `model.safetensors`), or
/// `"none"`, which accepts every image (the violence pairs have no filter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum JudgeChoice {
    None,
    Nudenet,
    Q16,
    Folder(PathBuf),
}

impl From<String> for JudgeChoice {
    fn from(value: String) -> Self {
        match value.as_str() {
            "none" => Self::None,
            "nudenet" => Self::Nudenet,
            "q16" => Self::Q16,
            _ => Self::Folder(PathBuf::from(value)),
        }
    }
}

impl From<JudgeChoice> for String {
    fn from(choice: JudgeChoice) -> String {
        match choice {
            JudgeChoice::None => "none".to_string(),
            JudgeChoice::Nudenet => "nudenet".to_string(),
            JudgeChoice::Q16 => "q16".to_string(),
            JudgeChoice::Folder(dir) => dir.display().to_string(),
        }
    }
}

/// The judge keys of a config table (`[pairs]`, a protocol): `judge` and the keys of its kind.
/// The toy judge takes `judge_shape` and `threshold`; NudeNet takes `judge_preset`, and
/// `judge_classes` and `threshold` to replace the preset's, and `judge_weights` (its ONNX file,
/// models/nudenet/320n.onnx unless given); Q16 takes `judge_weights` (its folder, models/q16 unless
/// given) and `threshold` (0.5, its argmax, unless given).
pub struct JudgeSettings<'a> {
    pub judge: &'a JudgeChoice,
    pub shape: &'a str,
    pub threshold: Option<f32>,
    pub preset: Option<NudityPreset>,
    pub classes: Option<&'a [String]>,
    pub weights: Option<&'a Path>,
}

impl JudgeSettings<'_> {
    /// Checks that the keys fit the judge's kind; the message names the key at fault.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(t) = self.threshold.filter(|t| !(0.0..=1.0).contains(t)) {
            return Err(format!("threshold = {t}: must be in [0, 1]"));
        }
        let nudenet_keys = [
            ("judge_preset", self.preset.is_some()),
            ("judge_classes", self.classes.is_some()),
            ("judge_weights", self.weights.is_some()),
        ];
        match self.judge {
            JudgeChoice::None => Ok(()),
            JudgeChoice::Q16 => {
                let toy_or_nudenet =
                    [("judge_shape", !self.shape.is_empty()), nudenet_keys[0], nudenet_keys[1]];
                match toy_or_nudenet.iter().find(|(_, set)| *set) {
                    Some((key, _)) => {
                        Err(format!("{key} does not apply to Q16, which takes judge_weights and threshold"))
                    }
                    None => Ok(()),
                }
            }
            JudgeChoice::Folder(_) => {
                Shape::parse(self.shape).map_err(|e| format!("judge_shape = {e}"))?;
                if self.threshold.is_none() {
                    return Err("threshold is missing: the toy judge needs the probability at which it sees the concept".into());
                }
                match nudenet_keys.iter().find(|(_, set)| *set) {
                    Some((key, _)) => {
                        Err(format!("{key} is a NudeNet setting; this judge is a toy judge folder"))
                    }
                    None => Ok(()),
                }
            }
            JudgeChoice::Nudenet => {
                if !self.shape.is_empty() {
                    return Err(format!(
                        "judge_shape = {:?} is a toy-judge setting; NudeNet takes judge_preset",
                        self.shape
                    ));
                }
                if self.preset.is_none() && (self.classes.is_none() || self.threshold.is_none()) {
                    let presets: Vec<&str> = NudityPreset::ALL.iter().map(|p| p.name()).collect();
                    return Err(format!(
                        "judge_preset is missing: NudeNet needs a preset ({}) or both judge_classes and threshold",
                        presets.join(", ")
                    ));
                }
                let known = super::nudenet::CLASSES;
                match self.classes.unwrap_or_default().iter().find(|c| !known.contains(&c.as_str())) {
                    Some(bad) => Err(format!(
                        "judge_classes: {bad:?} is not a NudeNet class; they are {}",
                        known.join(", ")
                    )),
                    None => Ok(()),
                }
            }
        }
    }

    /// The judge these keys name; `None` for "none".
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Option<Box<dyn Judge<B>>>> {
        self.validate().map_err(DuoError::Invalid)?;
        Ok(match self.judge {
            JudgeChoice::None => None,
            JudgeChoice::Folder(dir) => {
                let shape =
                    Shape::parse(self.shape).map_err(|e| DuoError::Invalid(format!("judge shape {e}")))?;
                let threshold = self.threshold.unwrap_or_default();
                Some(Box::new(ToyJudge::load(dir, shape, threshold, device)?))
            }
            JudgeChoice::Q16 => {
                let folder = self.weights.unwrap_or(Path::new(super::q16::DEFAULT_FOLDER));
                Some(Box::new(Q16Judge::load(folder, self.threshold.unwrap_or(0.5), device)?))
            }
            JudgeChoice::Nudenet => {
                let weights = self.weights.unwrap_or(Path::new(DEFAULT_WEIGHTS));
                let classes = self.classes.map(<[String]>::to_vec);
                Some(Box::new(NudityJudge::load(weights, self.preset, classes, self.threshold)?))
            }
        })
    }
}
