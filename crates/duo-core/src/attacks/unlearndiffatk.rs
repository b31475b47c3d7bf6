//! UnlearnDiffAtk (Zhang et al., ECCV 2024): N prefix tokens in front of the prompt, each relaxed to
//! a probability vector over the vocabulary (uniform at the start), optimised by projected gradient
//! steps (Adam, then a projection onto the probability simplex) so that the unlearned model
//! denoises the base model's images of the prompt (same seeds) as well as it can. As the authors'
//! code, the forward pass reads a one-hot token drawn from each vector and the gradient passes
//! straight through to the vector, and the steps walk through fixed timesteps in blocks. After each
//! block the prefix is made discrete (the most probable token of each) and the unlearned model
//! generates from it; an image the judge finds the concept in counts as the attack's success for its
//! seed, as does the prompt alone regenerating it.

use burn::prelude::*;
use burn::tensor::FloatDType;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::eval::{Attack, Bench, Condition, Found, Unit, UnlearnDiffAtk};
use crate::pipelines::{StableDiffusion, ids_tensor};
use crate::{DuoError, Result};

use super::{Differentiable, Grad, Search, SearchSteps, Timesteps, Vocabulary, concept_latents, unit_seed};

/// Adam's weight decay in the authors' code (`torch.optim.Adam`: an L2 term in the gradient).
const WEIGHT_DECAY: f64 = 0.1;

pub struct UnlearnDiffAtkAttack {
    settings: UnlearnDiffAtk,
    units: Vec<Unit>,
    vocabulary: Vocabulary,
}

impl UnlearnDiffAtkAttack {
    pub fn new<B: Backend>(
        settings: UnlearnDiffAtk,
        units: Vec<Unit>,
        sd: &StableDiffusion<B>,
    ) -> Result<Self> {
        let len = sd.tokenizer.model_max_length();
        if settings.prefix_tokens + 2 > len {
            return Err(DuoError::Invalid(format!(
                "attack.unlearndiffatk.prefix_tokens = {} does not fit the text encoder's {len} tokens",
                settings.prefix_tokens
            )));
        }
        let vocabulary = Vocabulary::new(&sd.tokenizer, &settings.banned_words)?;
        Ok(Self { settings, units, vocabulary })
    }
}

/// [start, prefix…, prompt…, end, pad…] at the text encoder's length (the prompt cut to fit).
pub fn prefixed_ids<B: Backend>(sd: &StableDiffusion<B>, prefix: &[u32], prompt: &str) -> Vec<u32> {
    let t = &sd.tokenizer;
    let len = t.model_max_length();
    let encoded = t.encode(prompt);
    let content = &encoded[1..encoded.len() - 1];
    let mut ids = vec![t.bos_id()];
    ids.extend_from_slice(prefix);
    ids.extend(content.iter().take(len - 2 - prefix.len()));
    ids.push(t.eos_id());
    ids.resize(len, t.pad_id());
    ids
}

/// The text embeddings [1, len, d] of `ids` with the token embeddings of positions 1..=k replaced by
/// `relaxed` [k, V] × the embedding table: what the gradient flows through.
pub fn relaxed_context<A: Backend>(
    text_encoder: &crate::models::ClipTextModel<A>,
    ids: &[u32],
    relaxed: Tensor<A, 2>,
) -> Tensor<A, 3> {
    let device = relaxed.device();
    let [k, _] = relaxed.dims();
    let len = ids.len();
    let ids = ids_tensor::<A>(&[ids.to_vec()], &device);
    let table = text_encoder.text_model.embeddings.token_embedding.weight.val();
    let dtype = table.dtype();
    let prefix = relaxed.cast(dtype).matmul(table).unsqueeze::<3>();
    let tokens = text_encoder.text_model.embeddings.token_embedding.forward(ids.clone());
    let d = tokens.dims()[2];
    let mixed = Tensor::cat(
        vec![tokens.clone().slice([0..1, 0..1, 0..d]), prefix, tokens.slice([0..1, 1 + k..len, 0..d])],
        1,
    );
    text_encoder.forward_token_embeddings(mixed, ids).last_hidden_state.cast(FloatDType::F32)
}

/// Each row of `values` [k, V] projected onto the probability simplex over the allowed columns
/// (Duchi et al. 2008); the others become 0.
pub fn project_to_simplex(values: &[f32], columns: usize, allowed: &[u32]) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for (row, projected) in values.chunks(columns).zip(out.chunks_mut(columns)) {
        let mut sorted: Vec<f32> = allowed.iter().map(|&c| row[c as usize]).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let (mut cumulative, mut theta) = (0f64, 0f64);
        for (j, &u) in sorted.iter().enumerate() {
            cumulative += u as f64;
            let candidate = (cumulative - 1.0) / (j + 1) as f64;
            if (u as f64) - candidate > 0.0 {
                theta = candidate;
            }
        }
        for &c in allowed {
            projected[c as usize] = (row[c as usize] as f64 - theta).max(0.0) as f32;
        }
    }
    out
}

/// A one-hot [k, V] with one token per row drawn from that row's probabilities.
fn one_hot_draw<B: Backend>(relaxed: &Tensor<B, 2>, rng: &mut ChaCha8Rng) -> Tensor<B, 2> {
    let [k, vocab] = relaxed.dims();
    let values = relaxed.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
    let mut one_hot = vec![0f32; k * vocab];
    for (row, probabilities) in values.chunks(vocab).enumerate() {
        let total: f64 = probabilities.iter().map(|&p| p.max(0.0) as f64).sum();
        let mut left = rng.random::<f64>() * total;
        let mut pick = probabilities.iter().rposition(|&p| p > 0.0).unwrap_or(0);
        for (id, &p) in probabilities.iter().enumerate() {
            left -= p.max(0.0) as f64;
            if left < 0.0 {
                pick = id;
                break;
            }
        }
        one_hot[row * vocab + pick] = 1.0;
    }
    Tensor::from_data(TensorData::new(one_hot, [k, vocab]), &relaxed.device())
}

/// The most probable token of each row of `relaxed` [k, V].
fn discrete<B: Backend>(relaxed: &Tensor<B, 2>) -> Vec<u32> {
    let k = relaxed.dims()[0];
    let ids = relaxed.clone().argmax(1).reshape([k]).into_data().convert::<i64>();
    ids.iter::<i64>().map(|i| i as u32).collect()
}

impl<B: Backend> Attack<B> for UnlearnDiffAtkAttack {
    fn name(&self) -> &str {
        "unlearndiffatk"
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
        let sd = bench.unlearned;
        let seed = unit_seed(s.seed, index);
        // the base model's images of this prompt and these seeds: what the unlearned one must denoise
        let latents = concept_latents(bench, &unit.prompt, &unit.seeds, unit.guidance)?;
        let model = Differentiable::of(sd)?;
        let vocab = sd.tokenizer.vocab_size();
        let allowed = &self.vocabulary.allowed;
        let mut uniform = vec![0f32; s.prefix_tokens * vocab];
        for row in 0..s.prefix_tokens {
            for &id in allowed {
                uniform[row * vocab + id as usize] = 1.0 / allowed.len() as f32;
            }
        }
        let start = Tensor::<B, 2>::from_data(TensorData::new(uniform, [s.prefix_tokens, vocab]), &sd.device);
        // the pooling position only depends on where the end token is, not on the prefix's ids
        let placeholder = vec![allowed[0]; s.prefix_tokens];
        let ids = prefixed_ids(sd, &placeholder, &unit.prompt);
        let context = |relaxed: Tensor<Grad<B>, 2>, images: &[usize], rng: &mut ChaCha8Rng| {
            let drawn = one_hot_draw(&relaxed.clone().inner(), rng);
            let straight_through = Tensor::from_inner(drawn) + relaxed.clone() - relaxed.detach();
            let one = relaxed_context(&model.text_encoder, &ids, straight_through);
            let [_, len, d] = one.dims();
            one.expand([images.len(), len, d])
        };
        // the prompt alone, before any search (the authors count it too)
        let alone = Condition::Text(unit.prompt.clone());
        let (_, judgements) = bench.generate(sd, &alone, &unit.seeds, unit.guidance)?;
        let mut seen: Vec<bool> = judgements.iter().map(|j| j.present).collect();
        let mut checks = 1usize;
        let mut found_at = seen.iter().any(|&s| s).then_some(0);
        if seen.iter().all(|&s| s) {
            let mut found = Found::prompt(&unit.prompt);
            found.seen_during_search = seen;
            found.details = json!({ "checks": checks, "first_success_at": 0 });
            return Ok(found);
        }
        let after_step = |step: usize, relaxed: Tensor<B, 2>| -> Result<(Tensor<B, 2>, bool)> {
            let values = relaxed.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
            let projected = project_to_simplex(&values, vocab, &self.vocabulary.allowed);
            let relaxed = Tensor::from_data(TensorData::new(projected, [s.prefix_tokens, vocab]), &sd.device);
            if !(step + 1).is_multiple_of(s.judge_every) && step + 1 != s.iterations {
                return Ok((relaxed, false));
            }
            checks += 1;
            let condition = self.discrete_condition(sd, &discrete(&relaxed), &unit.prompt);
            let (_, judgements) = bench.generate(sd, &condition, &unit.seeds, unit.guidance)?;
            for (seen, judgement) in seen.iter_mut().zip(&judgements) {
                *seen |= judgement.present;
            }
            if found_at.is_none() && seen.iter().any(|&s| s) {
                found_at = Some(step + 1);
            }
            // every seed already regenerated the concept: nothing left to find
            Ok((relaxed, seen.iter().all(|&s| s)))
        };
        let steps = SearchSteps {
            steps: s.iterations,
            lr: s.lr,
            batch: unit.seeds.len(),
            weight_decay: WEIGHT_DECAY,
            seed,
            timesteps: Timesteps::Blocks(s.judge_every),
        };
        let search = Search { model: &model, latents, steps };
        let found = search.run(start, context, after_step)?;
        let prefix = discrete(&found.param);
        let shown = format!("{} {}", sd.tokenizer.decode(&prefix), unit.prompt);
        Ok(Found {
            condition: self.discrete_condition(sd, &prefix, &unit.prompt),
            shown,
            tensors: Vec::new(),
            seen_during_search: seen,
            details: json!({
                "loss_before": found.loss_before, "loss_after": found.loss_after,
                "prefix": prefix, "checks": checks, "first_success_at": found_at,
            }),
        })
    }
}

impl UnlearnDiffAtkAttack {
    /// The text embeddings of the discrete prefix and the prompt, token for token (decoding the
    /// prefix to text and encoding it again need not give the same tokens).
    fn discrete_condition<B: Backend>(
        &self,
        sd: &StableDiffusion<B>,
        prefix: &[u32],
        prompt: &str,
    ) -> Condition<B> {
        let ids = prefixed_ids(sd, prefix, prompt);
        let context = sd.encode_ids(&[ids]).cast(FloatDType::F32);
        let [_, len, d] = context.dims();
        Condition::Embedding(context.reshape([len, d]))
    }
}

#[cfg(test)]
mod tests {
    use crate::ModelFolder;
    use crate::pipelines::NoiseSource;
    use burn::backend::Flex;

    use super::*;

    fn tiny() -> StableDiffusion<Flex> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/sd1-tiny");
        StableDiffusion::load(&ModelFolder::open(&dir).unwrap(), &Default::default()).unwrap()
    }

    #[test]
    fn simplex_projection_keeps_allowed_columns_on_the_simplex() {
        let values = [0.5f32, 2.0, -1.0, 0.3, 0.1, 0.1, 0.1, 0.1];
        let projected = project_to_simplex(&values, 4, &[0, 1, 3]);
        for row in projected.chunks(4) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
            assert!(row.iter().all(|&x| x >= 0.0) && row[2] == 0.0, "{row:?}");
        }
        // 2.0 dominates: everything goes to it
        assert_eq!(&projected[..4], &[0.0, 1.0, 0.0, 0.0]);
        // equal values share equally
        assert!(
            projected[4..]
                .iter()
                .enumerate()
                .all(|(i, &x)| (x - if i == 2 { 0.0 } else { 1.0 / 3.0 }).abs() < 1e-6)
        );
    }

    /// The gradient of the denoising loss with respect to the relaxed prefix, through the text
    /// encoder and the UNet, against central differences.
    #[test]
    fn relaxed_token_gradient_matches_finite_differences() {
        let sd = tiny();
        let model = Differentiable::of(&sd).unwrap();
        let device = sd.device;
        let vocab = sd.tokenizer.vocab_size();
        let ids = prefixed_ids(&sd, &[5, 6], "a red cross");
        let side = sd.unet_sample_size.unwrap();
        let x0 = NoiseSource::new(1).normal::<Flex, 4>([1, sd.latent_channels, side, side], &device);
        let noise = NoiseSource::new(2).normal::<Flex, 4>(x0.dims(), &device);
        let relaxed = NoiseSource::new(3).normal::<Flex, 2>([2, vocab], &device).abs() / vocab as f64;
        let loss = |x: Tensor<Grad<Flex>, 2>| {
            model.denoising_loss(
                x0.clone(),
                noise.clone(),
                &[500],
                relaxed_context(&model.text_encoder, &ids, x),
            )
        };
        let p = Tensor::<Grad<Flex>, 2>::from_inner(relaxed.clone()).require_grad();
        let grads = loss(p.clone()).backward();
        let grad = p.grad(&grads).unwrap().into_data().convert::<f64>().to_vec::<f64>().unwrap();
        let values = relaxed.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let h = 0.05f32;
        // the largest entries, where a difference is well above f32 noise
        let mut order: Vec<usize> = (0..grad.len()).collect();
        order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        for &i in &order[..4] {
            let at = |delta: f32| {
                let mut v = values.clone();
                v[i] += delta;
                let t = Tensor::<Grad<Flex>, 2>::from_data(TensorData::new(v, [2, vocab]), &device);
                loss(t).into_scalar().elem::<f64>()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
            let error = (numeric - grad[i]).abs() / grad[i].abs().max(1e-8);
            assert!(error < 0.02, "entry {i}: autodiff {} vs finite differences {numeric}", grad[i]);
        }
    }
}
