//! transformers' `CLIPModel` (the openai/clip-vit-* folders): the text tower of
//! [`ClipTextModel`], a ViT vision tower, and the projections of both into the shared embedding
//! space, built from the folder's `config.json` (`text_config`, `vision_config`, `projection_dim`).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig};
use burn::prelude::*;
use burn::tensor::DType;
use image::RgbImage;
use serde::Deserialize;
use serde_json::Value;

use super::clip_text::{Activation, ClipTextConfig, ClipTextModel, Encoder, EncoderShape};
use super::config::check_other_keys;
use super::layers::{LayerNorm, Linear};
use crate::error::{DuoError, Result, read_json};
use crate::weights::load_weights;

/// CLIP's image normalisation (OpenAI's ImageNet-like statistics).
const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f32; 3] = [0.268_629_55, 0.261_302_6, 0.275_777_1];

#[derive(Deserialize, Debug, Clone)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "three")]
    pub num_channels: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn three() -> usize {
    3
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}

#[derive(Module, Debug)]
pub struct VisionEmbeddings<B: Backend> {
    pub class_embedding: Param<Tensor<B, 1>>,
    pub patch_embedding: Conv2d<B>,
    pub position_embedding: Embedding<B>,
}

/// `CLIPVisionTransformer`: patches and a class token, a pre-norm, the encoder, and the class
/// token's final state after the post-norm.
#[derive(Module, Debug)]
pub struct ClipVisionTransformer<B: Backend> {
    pub embeddings: VisionEmbeddings<B>,
    /// (sic: transformers' key)
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: Encoder<B>,
    pub post_layernorm: LayerNorm<B>,
}

/// `CLIPModel`, field names = transformers' keys.
#[derive(Module, Debug)]
pub struct ClipModel<B: Backend> {
    pub text: ClipTextModel<B>,
    pub vision_model: ClipVisionTransformer<B>,
    pub visual_projection: Linear<B>,
    pub text_projection: Linear<B>,
    /// The side the vision tower reads.
    pub image_size: usize,
}

impl<B: Backend> ClipModel<B> {
    /// `dir/config.json` and `dir/model.safetensors` (or `pytorch_model.bin`), strictly.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            let message = "not a CLIP folder (transformers' CLIPModel layout: config.json, model.safetensors, \
                           tokenizer files), e.g. openai/clip-vit-large-patch14";
            return Err(DuoError::io(
                &config_path,
                std::io::Error::new(std::io::ErrorKind::NotFound, message),
            ));
        }
        let mut config: Value = read_json(&config_path)?;
        let bad = |m: String| DuoError::config(&config_path, m);
        let text = ClipTextConfig::from_value(&config_path, config["text_config"].take())?;
        let vision: ClipVisionConfig = serde_json::from_value(config["vision_config"].take())
            .map_err(|e| bad(format!("vision_config: {e}")))?;
        check_other_keys(
            &config_path,
            &vision.other,
            &[
                "model_type",
                "projection_dim",
                "initializer_range",
                "initializer_factor",
                "attention_dropout",
                "dropout",
                "torch_dtype",
                "dtype",
            ],
            &[],
        )?;
        let projection = config["projection_dim"]
            .as_u64()
            .ok_or_else(|| bad("projection_dim is missing".into()))? as usize;
        if vision.hidden_act != "quick_gelu" && vision.hidden_act != "gelu" {
            return Err(bad(format!("vision_config.hidden_act={:?} is not implemented", vision.hidden_act)));
        }
        if vision.num_attention_heads == 0 || !vision.hidden_size.is_multiple_of(vision.num_attention_heads) {
            return Err(bad("vision_config: num_attention_heads does not divide hidden_size".into()));
        }
        let model = Self::init(&text, &vision, projection, device)?;
        let weights = ["model.safetensors", "pytorch_model.bin"].map(|f| dir.join(f));
        let file = weights.iter().find(|f| f.is_file()).unwrap_or(&weights[0]);
        let remaps = [(r"^text_model\.", "text.text_model.")];
        load_weights(
            model,
            file,
            &remaps,
            DType::F32,
            &["logit_scale", "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"],
        )
    }

    fn init(
        text: &ClipTextConfig,
        vision: &ClipVisionConfig,
        projection: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let d = vision.hidden_size;
        let patches = (vision.image_size / vision.patch_size).pow(2);
        let activation = if vision.hidden_act == "gelu" { Activation::Gelu } else { Activation::QuickGelu };
        let shape = EncoderShape {
            hidden: d,
            intermediate: vision.intermediate_size,
            layers: vision.num_hidden_layers,
            heads: vision.num_attention_heads,
            eps: vision.layer_norm_eps,
            activation,
        };
        let p = vision.patch_size;
        Ok(Self {
            text: text.init(device),
            vision_model: ClipVisionTransformer {
                embeddings: VisionEmbeddings {
                    class_embedding: Param::from_tensor(Tensor::zeros([d], device)),
                    patch_embedding: Conv2dConfig::new([vision.num_channels, d], [p, p])
                        .with_stride([p, p])
                        .with_bias(false)
                        .init(device),
                    position_embedding: EmbeddingConfig::new(patches + 1, d).init(device),
                },
                pre_layrnorm: LayerNorm::new(d, vision.layer_norm_eps, device),
                encoder: shape.init(false, device),
                post_layernorm: LayerNorm::new(d, vision.layer_norm_eps, device),
            },
            visual_projection: Linear::new(d, projection, false, device),
            text_projection: Linear::new(text.hidden_size, projection, false, device),
            image_size: vision.image_size,
        })
    }

    /// The vision tower's input for 8-bit images, as `CLIPImageProcessor` prepares it: the shorter
    /// side resized to the input side (bicubic), a centre crop, CLIP's per-channel normalisation.
    /// [n, 3, S, S].
    pub fn pixel_values(&self, images: &[RgbImage], device: &B::Device) -> Tensor<B, 4> {
        let side = self.image_size;
        let mut values = Vec::with_capacity(images.len() * 3 * side * side);
        for image in images {
            let image = resize_and_crop(image, side);
            for c in 0..3 {
                values.extend(image.pixels().map(|p| (f32::from(p.0[c]) / 255.0 - MEAN[c]) / STD[c]));
            }
        }
        Tensor::from_data(TensorData::new(values, [images.len(), 3, side, side]), device)
    }

    /// `get_image_features`: `pixel_values` [b, 3, S, S] (normalised, S = `image_size`) → [b, projection].
    pub fn image_features(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 2> {
        let v = &self.vision_model;
        let patches = v.embeddings.patch_embedding.forward(pixel_values); // [b, d, g, g]
        let [b, d, g, _] = patches.dims();
        let patches = patches.reshape([b, d, g * g]).swap_dims(1, 2);
        let class = v.embeddings.class_embedding.val().reshape([1, 1, d]).expand([b, 1, d]);
        let device = patches.device();
        let positions = Tensor::<B, 1, Int>::arange(0..(g * g + 1) as i64, &device).unsqueeze::<2>();
        let mut x = Tensor::cat(vec![class, patches], 1) + v.embeddings.position_embedding.forward(positions);
        x = v.pre_layrnorm.forward(x);
        for layer in &v.encoder.layers {
            x = layer.forward(x);
        }
        let pooled = v.post_layernorm.forward(x.narrow(1, 0, 1)).reshape([b, d]);
        self.visual_projection.forward(pooled)
    }

    /// `get_text_features`: token ids [b, len] → [b, projection].
    pub fn text_features(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.text_projection.forward(self.text.forward(input_ids).pooler_output)
    }
}

/// Each row scaled to unit length: CLIP embeddings are compared by their cosines.
pub fn unit_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    x.clone() / x.powi_scalar(2).sum_dim(1).sqrt()
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
