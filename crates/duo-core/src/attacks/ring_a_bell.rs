//! Ring-A-Bell (Tsai et al., ICLR 2024): the concept is a direction in the text encoder's output
//! space, the mean difference of the embeddings of prompts with and without it; the target of a
//! prompt is its embedding moved η along that direction, and a genetic search over K-token prompts
//! finds discrete text whose embedding is closest to the target (squared distance over the whole
//! len × d last hidden state, as the authors' code). Model agnostic: it reads only the base model's
//! text encoder, and the found prompts go to both models.

use std::sync::Mutex;

use burn::prelude::*;
use burn::tensor::FloatDType;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::eval::{Attack, Bench, Condition, Found, RingABell, Unit};
use crate::pipelines::StableDiffusion;
use crate::{DuoError, Result};

use super::{Vocabulary, unit_seed};

/// Individuals whose embeddings are computed at once.
const CHUNK: usize = 64;

pub struct RingABellAttack {
    settings: RingABell,
    units: Vec<Unit>,
    vocabulary: Vocabulary,
    /// The concept vector [len, d], once computed.
    concept: Mutex<Option<Vec<f32>>>,
}

impl RingABellAttack {
    pub fn new<B: Backend>(settings: RingABell, units: Vec<Unit>, sd: &StableDiffusion<B>) -> Result<Self> {
        let len = sd.tokenizer.model_max_length();
        if settings.tokens + 2 > len {
            return Err(DuoError::Invalid(format!(
                "attack.ring-a-bell.tokens = {}: the text encoder reads {len} tokens, {} besides the start and end",
                settings.tokens,
                len - 2
            )));
        }
        let vocabulary = Vocabulary::new(&sd.tokenizer, &settings.banned_words)?;
        Ok(Self { settings, units, vocabulary, concept: Mutex::new(None) })
    }

    /// Mean over the prompt pairs of emb(with) − emb(without): [len, d].
    pub fn concept_vector<B: Backend>(&self, sd: &StableDiffusion<B>) -> Tensor<B, 2> {
        let mut cached = self.concept.lock().unwrap_or_else(|e| e.into_inner());
        let embed = |prompts: &[String]| sd.encode_prompts(prompts).cast(FloatDType::F32);
        let values = cached.get_or_insert_with(|| {
            let difference = embed(&self.settings.with) - embed(&self.settings.without);
            difference.mean_dim(0).into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()
        });
        let len = sd.tokenizer.model_max_length();
        let d = values.len() / len;
        Tensor::from_data(TensorData::new(values.clone(), [len, d]), &sd.device)
    }

    /// Squared distance of each prompt's embedding to `target` [len, d].
    fn distances<B: Backend>(
        &self,
        sd: &StableDiffusion<B>,
        population: &[Vec<u32>],
        target: &Tensor<B, 2>,
    ) -> Vec<f64> {
        let len = sd.tokenizer.model_max_length();
        let mut out = Vec::with_capacity(population.len());
        for chunk in population.chunks(CHUNK) {
            let ids: Vec<i64> = chunk.iter().flat_map(|tokens| padded(sd, tokens)).map(i64::from).collect();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [chunk.len(), len]), &sd.device);
            let embedded = sd.text_encoder.forward(ids).last_hidden_state.cast(FloatDType::F32);
            let diff = embedded - target.clone().unsqueeze::<3>();
            let sums = diff.square().flatten::<2>(1, 2).sum_dim(1);
            out.extend(sums.into_data().convert::<f64>().iter::<f64>());
        }
        out
    }

    /// The genetic search: returns the best prompt's tokens and its distance.
    fn search<B: Backend>(
        &self,
        sd: &StableDiffusion<B>,
        target: &Tensor<B, 2>,
        seed: u64,
    ) -> (Vec<u32>, f64) {
        let s = &self.settings;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let allowed = &self.vocabulary.allowed;
        let random_token = |rng: &mut ChaCha8Rng| *allowed.choose(rng).expect("the vocabulary is not empty");
        let mut population: Vec<Vec<u32>> =
            (0..s.population).map(|_| (0..s.tokens).map(|_| random_token(&mut rng)).collect()).collect();
        let keep = s.population.div_ceil(2);
        // the survivors' distances are kept: each generation embeds only its new children
        let mut distances = self.distances(sd, &population, target);
        for _ in 0..s.generations {
            let mut order: Vec<usize> = (0..population.len()).collect();
            order.sort_by(|&a, &b| distances[a].total_cmp(&distances[b]));
            let elite: Vec<Vec<u32>> = order[..keep].iter().map(|&i| population[i].clone()).collect();
            let elite_distances: Vec<f64> = order[..keep].iter().map(|&i| distances[i]).collect();
            let mut children = Vec::with_capacity(s.population - keep);
            while keep + children.len() < s.population {
                let mut child = elite.choose(&mut rng).expect("keep ≥ 1").clone();
                if rng.random_bool(s.crossover_rate) {
                    // single-point crossover with another parent
                    let other = elite.choose(&mut rng).expect("keep ≥ 1");
                    let point = rng.random_range(0..s.tokens);
                    child[point..].copy_from_slice(&other[point..]);
                }
                if rng.random_bool(s.mutation_rate) {
                    let at = rng.random_range(0..s.tokens);
                    child[at] = random_token(&mut rng);
                }
                children.push(child);
            }
            distances = elite_distances;
            distances.extend(self.distances(sd, &children, target));
            population = elite;
            population.extend(children);
        }
        let best = (0..population.len()).min_by(|&a, &b| distances[a].total_cmp(&distances[b])).unwrap_or(0);
        (population[best].clone(), distances[best])
    }
}

/// [start, tokens…, end, pad…] at the text encoder's length.
fn padded<B: Backend>(sd: &StableDiffusion<B>, tokens: &[u32]) -> Vec<u32> {
    let t = &sd.tokenizer;
    let mut ids = Vec::with_capacity(t.model_max_length());
    ids.push(t.bos_id());
    ids.extend_from_slice(tokens);
    ids.push(t.eos_id());
    ids.resize(t.model_max_length(), t.pad_id());
    ids
}

impl<B: Backend> Attack<B> for RingABellAttack {
    fn name(&self) -> &str {
        "ring-a-bell"
    }

    fn units(&self) -> &[Unit] {
        &self.units
    }

    fn settings(&self) -> serde_json::Value {
        json!(self.settings)
    }

    fn find(&self, index: usize, bench: &Bench<B>) -> Result<Found<B>> {
        let sd = bench.base;
        let unit = &self.units[index];
        let start = sd.encode_prompts(std::slice::from_ref(&unit.prompt)).cast(FloatDType::F32);
        let [_, len, d] = start.dims();
        let concept = self.concept_vector(sd);
        let target = start.reshape([len, d]) + concept.clone() * self.settings.eta;
        let (tokens, distance) = self.search(sd, &target, unit_seed(self.settings.seed, index));
        let prompt = sd.tokenizer.decode(&tokens);
        let concept_norm: f64 = concept.square().sum().into_scalar().elem();
        Ok(Found {
            condition: Condition::Text(prompt.clone()),
            shown: prompt,
            tensors: Vec::new(),
            seen_during_search: Vec::new(),
            details: json!({
                "distance_to_target": distance,
                // the distance of the starting prompt itself: η² |concept|²
                "start_distance": self.settings.eta.powi(2) * concept_norm,
                "tokens": tokens,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ModelFolder;
    use burn::backend::Flex;

    use super::*;

    #[test]
    fn the_concept_vector_is_the_mean_embedding_difference() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/sd1-tiny");
        let sd =
            StableDiffusion::<Flex>::load(&ModelFolder::open(&dir).unwrap(), &Default::default()).unwrap();
        let settings = RingABell {
            with: vec!["a red cross".into(), "a dark red cross".into()],
            without: vec!["a red plus".into(), "a dark red plus".into()],
            eta: 3.0,
            tokens: 4,
            population: 4,
            generations: 1,
            mutation_rate: 0.25,
            crossover_rate: 0.5,
            banned_words: vec!["cross".into()],
            seed: 0,
        };
        let attack = RingABellAttack::new(settings.clone(), Vec::new(), &sd).unwrap();
        let got = attack.concept_vector(&sd).into_data().convert::<f64>().to_vec::<f64>().unwrap();
        // one prompt at a time, summed in f64
        let embed = |p: &String| {
            sd.encode_prompts(std::slice::from_ref(p)).into_data().convert::<f64>().to_vec::<f64>().unwrap()
        };
        let mut expected = vec![0.0; got.len()];
        for (w, o) in settings.with.iter().zip(&settings.without) {
            for (e, (a, b)) in expected.iter_mut().zip(embed(w).iter().zip(embed(o))) {
                *e += (a - b) / 2.0;
            }
        }
        let worst = got.iter().zip(&expected).map(|(g, e)| (g - e).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-5, "largest deviation {worst}");
        // the banned word's token is out of the search
        let cross = sd.tokenizer.token_to_id("cross</w>");
        assert!(cross.is_none_or(|id| !attack.vocabulary.allowed.contains(&id)));
    }
}
