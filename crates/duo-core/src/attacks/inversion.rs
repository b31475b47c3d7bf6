//! Inversion attacks: fit the text side to the base model's images of the concept under the
//! unlearned model's denoising loss, then generate from what was fitted.
//! - `concept-inversion` (Pham et al., ICLR 2024): one new token's embedding, shared by every
//!   concept prompt (textual inversion); generation puts it in place of the concept's word.
//! - `embedding-inversion`: the whole text conditioning [len, d] of one prompt. No prompt can give
//!   the UNet more than this, so it bounds every attack through the text encoder.

use std::sync::Mutex;

use burn::prelude::*;
use burn::tensor::FloatDType;
use serde_json::json;

use crate::eval::{Attack, Bench, ConceptInversion, EmbeddingInversion, Found, Unit};
use crate::pipelines::{StableDiffusion, ids_tensor};
use crate::{DuoError, Result};

use super::{
    Differentiable, Grad, Search, SearchSteps, TRAINING_SEEDS_FROM, Timesteps, concept_latents, unit_seed,
};

pub struct EmbeddingInversionAttack {
    settings: EmbeddingInversion,
    units: Vec<Unit>,
}

impl EmbeddingInversionAttack {
    pub fn new(settings: EmbeddingInversion, units: Vec<Unit>) -> Self {
        Self { settings, units }
    }
}

impl<B: Backend> Attack<B> for EmbeddingInversionAttack {
    fn name(&self) -> &str {
        "embedding-inversion"
    }

    fn units(&self) -> &[Unit] {
        &self.units
    }

    fn settings(&self) -> serde_json::Value {
        json!(self.settings)
    }

    fn find(&self, index: usize, bench: &Bench<B>) -> Result<Found<B>> {
        let s = &self.settings;
        let unit = &self.units[index];
        let seeds: Vec<u64> = (0..s.images as u64).map(|i| TRAINING_SEEDS_FROM + i).collect();
        let latents = concept_latents(bench, &unit.prompt, &seeds, unit.guidance)?;
        let model = Differentiable::of(bench.unlearned)?;
        let start = bench.unlearned.encode_prompts(std::slice::from_ref(&unit.prompt)).cast(FloatDType::F32);
        let [_, len, d] = start.dims();
        let steps = SearchSteps {
            steps: s.steps,
            lr: s.lr,
            batch: s.batch,
            weight_decay: 0.0,
            seed: unit_seed(s.seed, index),
            timesteps: Timesteps::Uniform,
        };
        let search = Search { model: &model, latents, steps };
        let context = |p: Tensor<Grad<B>, 2>, images: &[usize], _: &mut _| {
            p.unsqueeze::<3>().expand([images.len(), len, d])
        };
        let found = search.run(start.reshape([len, d]), context, |_, p| Ok((p, false)))?;
        Ok(Found {
            condition: crate::eval::Condition::Embedding(found.param.clone()),
            shown: format!("[embedding inverted from \"{}\"]", unit.prompt),
            tensors: vec![("embedding".into(), found.param)],
            seen_during_search: Vec::new(),
            details: json!({ "loss_before": found.loss_before, "loss_after": found.loss_after }),
        })
    }
}

pub struct ConceptInversionAttack {
    settings: ConceptInversion,
    units: Vec<Unit>,
    /// The initializer's id, and the token embedding once learnt (shared by every unit).
    initializer: u32,
    learnt: Mutex<Option<Learnt>>,
}

#[derive(Clone)]
struct Learnt {
    token: Vec<f32>,
    loss_before: f64,
    loss_after: f64,
}

impl ConceptInversionAttack {
    pub fn new<B: Backend>(
        settings: ConceptInversion,
        units: Vec<Unit>,
        sd: &StableDiffusion<B>,
    ) -> Result<Self> {
        let ids = sd.tokenizer.encode(&settings.initializer);
        // with the start and end tokens
        let [_, id, _] = ids[..] else {
            return Err(DuoError::Invalid(format!(
                "attack.concept-inversion.initializer = {:?} is {} tokens; it must be one",
                settings.initializer,
                ids.len().saturating_sub(2)
            )));
        };
        for unit in &units {
            if !contains_word(&unit.prompt, &settings.word) {
                return Err(DuoError::Invalid(format!(
                    "attack.concept-inversion.word = {:?} is not in the concept prompt {:?}; the learnt token takes its place",
                    settings.word, unit.prompt
                )));
            }
        }
        Ok(Self { settings, units, initializer: id, learnt: Mutex::new(None) })
    }

    /// `prompt` with the concept's word replaced by the initializer, tokenized and padded, and the
    /// positions the learnt token takes.
    fn ids_and_slots<B: Backend>(&self, sd: &StableDiffusion<B>, prompt: &str) -> (Vec<u32>, Vec<usize>) {
        let text = replace_word(prompt, &self.settings.word, &self.settings.initializer);
        let ids = sd.tokenizer.encode_padded(&text, sd.tokenizer.model_max_length());
        // the first position is the start token, never the initializer
        let slots = ids
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, id)| **id == self.initializer)
            .map(|(i, _)| i)
            .collect();
        (ids, slots)
    }

    /// The text embeddings of `prompt` with the learnt `token` [1, d] in the concept word's place.
    fn context<A: Backend>(
        &self,
        sd: &StableDiffusion<A>,
        prompt: &str,
        token: Tensor<A, 2>,
    ) -> Tensor<A, 3> {
        let (ids, slots) = self.ids_and_slots(sd, prompt);
        token_context(&sd.text_encoder, &ids, &slots, token)
    }

    fn learn<B: Backend>(&self, bench: &Bench<B>) -> Result<Learnt> {
        let s = &self.settings;
        println!(
            "concept-inversion: learning one token on {} base-model images ({} steps), shared by every prompt",
            s.images * self.units.len(),
            s.steps
        );
        let seeds: Vec<u64> = (0..s.images as u64).map(|i| TRAINING_SEEDS_FROM + i).collect();
        let mut latents = Vec::new();
        let mut prompts = Vec::new();
        for unit in &self.units {
            latents.push(concept_latents(bench, &unit.prompt, &seeds, unit.guidance)?);
            prompts.extend(std::iter::repeat_n(unit.prompt.clone(), seeds.len()));
        }
        let sd = bench.unlearned;
        let model = Differentiable::of(sd)?;
        let embedding = sd.text_encoder.text_model.embeddings.token_embedding.weight.val();
        let d = embedding.dims()[1];
        let start = embedding
            .select(0, Tensor::<B, 1, Int>::from_data([self.initializer as i64], &sd.device))
            .cast(FloatDType::F32)
            .reshape([1, d]);
        let steps = SearchSteps {
            steps: s.steps,
            lr: s.lr,
            batch: s.batch,
            weight_decay: 0.0,
            seed: s.seed,
            timesteps: Timesteps::Uniform,
        };
        let search = Search { model: &model, latents: Tensor::cat(latents, 0), steps };
        let encoded: Vec<(Vec<u32>, Vec<usize>)> =
            prompts.iter().map(|p| self.ids_and_slots(sd, p)).collect();
        let context = |token: Tensor<Grad<B>, 2>, images: &[usize], _: &mut _| {
            let contexts = images
                .iter()
                .map(|&i| token_context(&model.text_encoder, &encoded[i].0, &encoded[i].1, token.clone()))
                .collect();
            Tensor::cat(contexts, 0)
        };
        let found = search.run(start, context, |_, p| Ok((p, false)))?;
        let token = found.param.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        Ok(Learnt { token, loss_before: found.loss_before, loss_after: found.loss_after })
    }
}

/// The text encoder's last hidden state [1, len, d] of `ids` with the token embedding at `slots`
/// replaced by `token` [1, d].
fn token_context<A: Backend>(
    text_encoder: &crate::models::ClipTextModel<A>,
    ids: &[u32],
    slots: &[usize],
    token: Tensor<A, 2>,
) -> Tensor<A, 3> {
    let device = token.device();
    let len = ids.len();
    let ids = ids_tensor::<A>(&[ids.to_vec()], &device);
    let embeddings = text_encoder.text_model.embeddings.token_embedding.forward(ids.clone());
    let dtype = embeddings.dtype();
    let d = embeddings.dims()[2];
    let mut mask = vec![0f32; len];
    for &slot in slots {
        mask[slot] = 1.0;
    }
    let mask = Tensor::<A, 1>::from_data(TensorData::new(mask, [len]), &device).reshape([1, len, 1]);
    let token = token.cast(dtype).reshape([1, 1, d]).expand([1, len, d]);
    let mixed = embeddings * (mask.clone().neg() + 1.0).cast(dtype) + token * mask.cast(dtype);
    text_encoder.forward_token_embeddings(mixed, ids).last_hidden_state.cast(FloatDType::F32)
}

impl<B: Backend> Attack<B> for ConceptInversionAttack {
    fn name(&self) -> &str {
        "concept-inversion"
    }

    fn units(&self) -> &[Unit] {
        &self.units
    }

    fn settings(&self) -> serde_json::Value {
        json!(self.settings)
    }

    fn find(&self, index: usize, bench: &Bench<B>) -> Result<Found<B>> {
        let learnt = {
            let mut cached = self.learnt.lock().unwrap_or_else(|e| e.into_inner());
            if cached.is_none() {
                *cached = Some(self.learn(bench)?);
            }
            cached.clone().expect("learnt above")
        };
        let sd = bench.unlearned;
        let d = learnt.token.len();
        let token = Tensor::<B, 2>::from_data(TensorData::new(learnt.token.clone(), [1, d]), &sd.device);
        let prompt = &self.units[index].prompt;
        let context = self.context(sd, prompt, token.clone());
        let [_, len, d] = context.dims();
        let placeholder = format!("<{}*>", self.settings.word);
        Ok(Found {
            condition: crate::eval::Condition::Embedding(context.reshape([len, d])),
            shown: replace_word(prompt, &self.settings.word, &placeholder),
            tensors: vec![("token".into(), token)],
            seen_during_search: Vec::new(),
            details: json!({ "loss_before": learnt.loss_before, "loss_after": learnt.loss_after }),
        })
    }
}

fn contains_word(prompt: &str, word: &str) -> bool {
    prompt.split_whitespace().any(|w| w.eq_ignore_ascii_case(word))
}

fn replace_word(prompt: &str, word: &str, by: &str) -> String {
    prompt
        .split_whitespace()
        .map(|w| if w.eq_ignore_ascii_case(word) { by } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}
