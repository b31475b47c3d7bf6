//! transformers `CLIPTextModel`, built from the folder's `text_encoder/config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, sigmoid};
use serde::Deserialize;
use serde_json::{Value, json};

use super::attention::multi_head_attention;
use super::config::check_other_keys;
use super::layers::{LayerNorm, Linear};
use crate::error::{DuoError, Result};

#[derive(Deserialize, Debug, Clone)]
pub struct ClipTextConfig {
    #[serde(default = "vocab")]
    pub vocab_size: usize,
    #[serde(default = "hidden")]
    pub hidden_size: usize,
    #[serde(default = "intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "heads")]
    pub num_attention_heads: usize,
    #[serde(default = "positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// transformers' legacy rule: configs with `eos_token_id == 2` pool at the highest token id.
    #[serde(default = "legacy_eos")]
    pub eos_token_id: u32,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn vocab() -> usize {
    49408
}
fn hidden() -> usize {
    512
}
fn intermediate() -> usize {
    2048
}
fn layers() -> usize {
    12
}
fn heads() -> usize {
    8
}
fn positions() -> usize {
    77
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}
fn legacy_eos() -> u32 {
    2
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(path, crate::error::read_json(path)?)
    }

    /// The config in `value` (a `text_config` table of a CLIP folder's config.json); errors name `path`.
    pub fn from_value(path: &Path, value: Value) -> Result<Self> {
        let config: Self =
            serde_json::from_value(value).map_err(|e| DuoError::config(path, e.to_string()))?;
        config.activation(path)?;
        check_other_keys(
            path,
            &config.other,
            &[
                "architectures",
                "model_type",
                "torch_dtype",
                "dtype",
                "transformers_version",
                "projection_dim",
                "initializer_range",
                "initializer_factor",
                "pad_token_id",
                "bos_token_id",
                "attention_dropout",
                "dropout",
                "id2label",
                "label2id",
            ],
            &[("position_embedding_type", json!("absolute"))],
        )?;
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(DuoError::config(
                path,
                format!(
                    "num_attention_heads={} does not divide hidden_size={}",
                    config.num_attention_heads, config.hidden_size
                ),
            ));
        }
        Ok(config)
    }

    pub(crate) fn activation(&self, path: &Path) -> Result<Activation> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(DuoError::config(
                path,
                format!("hidden_act={other:?} is not implemented (quick_gelu, gelu)"),
            )),
        }
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipTextModel<B> {
        let act = if self.hidden_act == "gelu" { Activation::Gelu } else { Activation::QuickGelu };
        let d = self.hidden_size;
        let shape = EncoderShape {
            hidden: d,
            intermediate: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            eps: self.layer_norm_eps,
            activation: act,
        };
        ClipTextModel {
            text_model: ClipTextTransformer {
                embeddings: Embeddings {
                    token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
                    position_embedding: EmbeddingConfig::new(self.max_position_embeddings, d).init(device),
                },
                encoder: shape.init(true, device),
                final_layer_norm: LayerNorm::new(d, self.layer_norm_eps, device),
            },
            eos_token_id: self.eos_token_id,
        }
    }
}

/// The shape of a CLIP transformer encoder (the text and the vision tower share its layers).
pub(crate) struct EncoderShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub eps: f64,
    pub activation: Activation,
}

impl EncoderShape {
    /// `causal`: the text tower's mask; the vision tower attends everywhere.
    pub fn init<B: Backend>(&self, causal: bool, device: &B::Device) -> Encoder<B> {
        let d = self.hidden;
        let norm = || LayerNorm::new(d, self.eps, device);
        let layers = (0..self.layers)
            .map(|_| EncoderLayer {
                self_attn: SelfAttention {
                    q_proj: Linear::new(d, d, true, device),
                    k_proj: Linear::new(d, d, true, device),
                    v_proj: Linear::new(d, d, true, device),
                    out_proj: Linear::new(d, d, true, device),
                    heads: self.heads,
                    causal,
                },
                layer_norm1: norm(),
                mlp: Mlp {
                    fc1: Linear::new(d, self.intermediate, true, device),
                    fc2: Linear::new(self.intermediate, d, true, device),
                    quick_gelu: self.activation == Activation::QuickGelu,
                },
                layer_norm2: norm(),
            })
            .collect();
        Encoder { layers }
    }
}

#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub heads: usize,
    pub causal: bool,
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub quick_gelu: bool,
}

#[derive(Module, Debug)]
pub struct EncoderLayer<B: Backend> {
    pub self_attn: SelfAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub layers: Vec<EncoderLayer<B>>,
}

#[derive(Module, Debug)]
pub struct Embeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

#[derive(Module, Debug)]
pub struct ClipTextTransformer<B: Backend> {
    pub embeddings: Embeddings<B>,
    pub encoder: Encoder<B>,
    pub final_layer_norm: LayerNorm<B>,
}

/// `CLIPTextModel`; the field `text_model` keeps transformers' key prefix.
#[derive(Module, Debug)]
pub struct ClipTextModel<B: Backend> {
    pub text_model: ClipTextTransformer<B>,
    pub eos_token_id: u32,
}

/// What SD pipelines use of the text encoder.
pub struct ClipTextOutput<B: Backend> {
    /// [b, len, hidden], after the final layer norm.
    pub last_hidden_state: Tensor<B, 3>,
    /// [b, hidden]: the last hidden state at the EOS position.
    pub pooler_output: Tensor<B, 2>,
    /// [b, len, hidden]: the input of the last layer (transformers' `hidden_states[-2]`, for clip-skip).
    pub penultimate_hidden_state: Tensor<B, 3>,
}

impl<B: Backend> SelfAttention<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        self.out_proj.forward(multi_head_attention(q, k, v, self.heads, self.causal))
    }
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.fc1.forward(x);
        let h = if self.quick_gelu { h.clone() * sigmoid(h * 1.702) } else { gelu(h) };
        self.fc2.forward(h)
    }
}

impl<B: Backend> EncoderLayer<B> {
    pub(crate) fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.self_attn.forward(self.layer_norm1.forward(x.clone())) + x;
        self.mlp.forward(self.layer_norm2.forward(x.clone())) + x
    }
}

impl<B: Backend> ClipTextModel<B> {
    /// `input_ids` [b, len] (len ≤ max_position_embeddings).
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> ClipTextOutput<B> {
        let tokens = self.text_model.embeddings.token_embedding.forward(input_ids.clone());
        self.forward_token_embeddings(tokens, input_ids)
    }

    /// [`Self::forward`] from the token embeddings [b, len, hidden] instead of their ids, which
    /// still pick the pooling position: what attacks that optimise embeddings differentiate through.
    pub fn forward_token_embeddings(
        &self,
        tokens: Tensor<B, 3>,
        input_ids: Tensor<B, 2, Int>,
    ) -> ClipTextOutput<B> {
        let t = &self.text_model;
        let [batch, len] = input_ids.dims();
        let device = input_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..len as i64, &device).unsqueeze::<2>();
        let mut x = tokens + t.embeddings.position_embedding.forward(positions);
        let mut penultimate = x.clone();
        for layer in &t.encoder.layers {
            penultimate = x.clone();
            x = layer.forward(x);
        }
        let last_hidden_state = t.final_layer_norm.forward(x);
        let eos_index = self.eos_positions(input_ids); // [b]
        let hidden = last_hidden_state.dims()[2];
        let index = eos_index.reshape([batch, 1, 1]).expand([batch, 1, hidden]);
        let pooler_output = last_hidden_state.clone().gather(1, index).reshape([batch, hidden]);
        ClipTextOutput { last_hidden_state, pooler_output, penultimate_hidden_state: penultimate }
    }

    /// The pooling position per row: transformers uses argmax(ids) when `eos_token_id == 2` (old configs,
    /// where EOS is the highest id) and the first occurrence of `eos_token_id` otherwise.
    fn eos_positions(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 1, Int> {
        let batch = input_ids.dims()[0];
        if self.eos_token_id == 2 {
            return input_ids.argmax(1).reshape([batch]);
        }
        // first index where ids == eos: argmax over the 0/1 mask returns the first maximum
        input_ids.equal_elem(self.eos_token_id as i64).int().argmax(1).reshape([batch])
    }
}
