//! The judge interface: an image batch in, one [`Judgement`] per image out.

use burn::prelude::*;
use serde::Serialize;

use crate::error::Result;

/// One thing a judge reads in an image, with its score in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Label {
    pub name: String,
    pub score: f32,
    /// Where in the image, [x, y, width, height] in pixels, for a judge that locates what it reads
    /// (NudeNet's boxes).
    #[serde(rename = "box", skip_serializing_if = "Option::is_none")]
    pub region: Option<[i64; 4]>,
}

/// What a judge reads in one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    /// The judged concept's score in [0, 1].
    pub score: f32,
    /// Whether the concept counts as present: `score` at or above the judge's threshold.
    pub present: bool,
    /// What the judge sees, in the order its documentation gives (the toy judge: shape, colour,
    /// background, each the most probable of its kind).
    pub labels: Vec<Label>,
}

impl Judgement {
    /// Whether the judge gave the label `name`.
    pub fn has_label(&self, name: &str) -> bool {
        self.labels.iter().any(|label| label.name == name)
    }
}

/// A concept judge. `Sync`, so one judge serves evaluations running on several threads.
pub trait Judge<B: Backend>: Sync {
    /// A short name for reports and errors.
    fn name(&self) -> &str;

    /// The settings that decide its verdicts (weights, concept, threshold), for reports.
    fn settings(&self) -> serde_json::Value;

    /// The image side it reads, when it reads one size only; the sampler refuses a model that
    /// generates another (resizing would measure the resampling as much as the model).
    fn resolution(&self) -> Option<usize>;

    /// One judgement per image of `images`: [b, 3, H, W] in [0, 1] (the pipelines' output range).
    fn judge(&self, images: Tensor<B, 4>) -> Result<Vec<Judgement>>;

    /// Whether `judgement` shows what `prompt` names (the preservation groups' success); `None`
    /// from a judge that reads only its concept (NudeNet cannot tell a man from a woman), whose
    /// groups are compared by their concept scores and LPIPS instead.
    fn depicts(&self, prompt: &str, judgement: &Judgement) -> Result<Option<bool>> {
        let _ = (prompt, judgement);
        Ok(None)
    }
}
