//! CLIP score (Hessel et al., 2021) as torchmetrics' `CLIPScore` computes it: 100 × the cosine between
//! CLIP's embedding of an image and of its prompt; a set's score is the mean, floored at 0.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use image::RgbImage;

use crate::error::{DuoError, Result};
use crate::models::{ClipModel, unit_rows};
use crate::pipelines::tensor_to_rgb8;
use crate::tokenizer::ClipTokenizer;

pub struct ClipScorer<B: Backend> {
    pub model: ClipModel<B>,
    pub tokenizer: ClipTokenizer,
    pub source: PathBuf,
}

impl<B: Backend> ClipScorer<B> {
    /// A CLIP folder in transformers' layout (config.json, model.safetensors and the tokenizer
    /// files), e.g. openai/clip-vit-large-patch14.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let model = ClipModel::load(dir, device)?;
        let tokenizer = ClipTokenizer::from_folder(dir)?;
        Ok(Self { model, tokenizer, source: dir.to_path_buf() })
    }

    /// 100 × cos(image i, prompt i) for each pair; `images` [n, 3, H, W] in [0, 1] (the pipelines'
    /// output, read as the 8-bit images they are saved as).
    pub fn scores(&self, images: Tensor<B, 4>, prompts: &[String]) -> Result<Vec<f64>> {
        let n = images.dims()[0];
        if n != prompts.len() {
            return Err(DuoError::Invalid(format!("CLIP score: {n} images but {} prompts", prompts.len())));
        }
        let device = images.device();
        let rgb: Vec<RgbImage> = (0..n).map(|i| tensor_to_rgb8(&images, i)).collect();
        let image = self.model.image_features(self.model.pixel_values(&rgb, &device));
        let len = self.tokenizer.model_max_length();
        let ids: Vec<i64> =
            prompts.iter().flat_map(|p| self.tokenizer.encode_padded(p, len)).map(i64::from).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, len]), &device);
        let text = self.model.text_features(ids);
        let cosine = (unit_rows(image) * unit_rows(text)).sum_dim(1).reshape([n]) * 100.0;
        let values = cosine.into_data().convert::<f64>().into_vec::<f64>();
        values.map_err(|e| DuoError::Invalid(format!("CLIP score: reading the scores: {e:?}")))
    }
}

/// A set's CLIP score: the mean of the pairs' scores, floored at 0 (torchmetrics).
pub fn clip_score(scores: &[f64]) -> f64 {
    (scores.iter().sum::<f64>() / scores.len().max(1) as f64).max(0.0)
}
