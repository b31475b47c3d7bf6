//! Which concept judge a config names.

use std::path::PathBuf;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::ToyJudge;
use crate::error::{DuoError, Result};
use crate::world::Shape;

/// A run's concept judge: a toy concept-judge folder (`config.json` + `model.safetensors`), or
/// `"none"`, which accepts every image (the violence setting has no filter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum JudgeChoice {
    None,
    Folder(PathBuf),
}

impl From<String> for JudgeChoice {
    fn from(value: String) -> Self {
        match value.as_str() {
            "none" => Self::None,
            _ => Self::Folder(PathBuf::from(value)),
        }
    }
}

impl JudgeChoice {
    /// The toy judge this names, looking for `shape` at `threshold`; `None` for "none".
    pub fn load<B: Backend>(
        &self,
        shape: &str,
        threshold: f32,
        device: &B::Device,
    ) -> Result<Option<ToyJudge<B>>> {
        match self {
            Self::None => Ok(None),
            Self::Folder(dir) => {
                let shape = Shape::parse(shape).map_err(|e| DuoError::Invalid(format!("judge shape {e}")))?;
                ToyJudge::load(dir, shape, threshold, device).map(Some)
            }
        }
    }
}

impl From<JudgeChoice> for String {
    fn from(choice: JudgeChoice) -> String {
        match choice {
            JudgeChoice::None => "none".to_string(),
            JudgeChoice::Folder(dir) => dir.display().to_string(),
        }
    }
}
