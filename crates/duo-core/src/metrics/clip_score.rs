//! CLIP score (Hessel et al., 2021) as torchmetrics' `CLIPScore` computes it: 100 × the cosine between
//! CLIP's embedding of an image and of its prompt; a set's score is the mean, floored at 0. Images
//! are prepared as `CLIPImageProcessor` prepares them: the shorter side resized to the model's input
//! side (bicubic), a centre crop, CLIP's per-channel normalisation.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use image::RgbImage;

use crate::error::{DuoError, Result};
use crate::models::ClipModel;
use crate::pipelines::tensor_to_rgb8;
use crate::tokenizer::ClipTokenizer;

/// CLIP's image normalisation (OpenAI's ImageNet-like statistics).
const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f32; 3] = [0.268_629_55, 0.261_302_6, 0.275_777_1];

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

    /// The vision tower's input for 8-bit images: [n, 3, S, S], normalised.
    pub fn pixel_values(&self, images: &[RgbImage], device: &B::Device) -> Tensor<B, 4> {
        let side = self.model.image_size;
        let mut values = Vec::with_capacity(images.len() * 3 * side * side);
        for image in images {
            let image = resize_and_crop(image, side);
            for c in 0..3 {
                values.extend(image.pixels().map(|p| (f32::from(p.0[c]) / 255.0 - MEAN[c]) / STD[c]));
            }
        }
        Tensor::from_data(TensorData::new(values, [images.len(), 3, side, side]), device)
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
        let image = self.model.image_features(self.pixel_values(&rgb, &device));
        let len = self.tokenizer.model_max_length();
        let ids: Vec<i64> =
            prompts.iter().flat_map(|p| self.tokenizer.encode_padded(p, len)).map(i64::from).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, len]), &device);
        let text = self.model.text_features(ids);
        let unit = |x: Tensor<B, 2>| x.clone() / x.powi_scalar(2).sum_dim(1).sqrt();
        let cosine = (unit(image) * unit(text)).sum_dim(1).reshape([n]) * 100.0;
        let values = cosine.into_data().convert::<f64>().into_vec::<f64>();
        values.map_err(|e| DuoError::Invalid(format!("CLIP score: reading the scores: {e:?}")))
    }
}

/// The shorter side to `side` (bicubic, the longer in proportion), then the centre `side` × `side`.
fn resize_and_crop(image: &RgbImage, side: usize) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let (short, long) = (w.min(h), w.max(h));
    let long = (side * long) / short.max(1);
    let (rw, rh) = if w <= h { (side, long) } else { (long, side) };
    let resized = match (rw, rh) == (w, h) {
        true => image.clone(),
        false => {
            image::imageops::resize(image, rw as u32, rh as u32, image::imageops::FilterType::CatmullRom)
        }
    };
    let (left, top) = ((rw - side) / 2, (rh - side) / 2);
    image::imageops::crop_imm(&resized, left as u32, top as u32, side as u32, side as u32).to_image()
}

/// A set's CLIP score: the mean of the pairs' scores, floored at 0 (torchmetrics).
pub fn clip_score(scores: &[f64]) -> f64 {
    (scores.iter().sum::<f64>() / scores.len().max(1) as f64).max(0.0)
}
