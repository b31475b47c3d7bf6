//! What the DUO step eats: the pairs' latents (encoded once and cached), the conditioning embedding,
//! and batches drawn from them with their noise and timesteps.
//!
//! Every random draw of batch `g` (the g-th batch of the run) comes from a generator seeded by
//! (`seed`, `g`), and the pair order is a fresh permutation per pass over the pairs. Served by a
//! `learning::EpochLoader`, a resumed run sees exactly the batches the uninterrupted run would have.

use burn::prelude::*;
use burn::tensor::FloatDType;
use duo_core::models::AutoencoderKL;
use duo_core::objective::{DuoBatch, Objective};
use duo_core::pipelines::{NoiseSource, load_image, prompt_ids};
use duo_core::schedulers::NoiseSchedule;
use duo_core::tensor_file::{TensorFile, write_tensor_file_with_metadata};
use duo_core::tokenizer::ClipTokenizer;
use duo_core::world::rng_for;
use duo_core::{DuoError, Result};
use rand::Rng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, StandardNormal};
use std::path::{Path, PathBuf};

use crate::pairs::{Manifest, PairRecord};

/// The image files of a pair folder: pair i = (`unsafe/`'s i-th file, `safe/`'s i-th file) in name order.
#[derive(Debug, Clone)]
pub struct PairFiles {
    pub unsafe_images: Vec<PathBuf>,
    pub safe_images: Vec<PathBuf>,
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

impl PairFiles {
    /// Lists `<dir>/unsafe` and `<dir>/safe` (PNG or JPEG) and pairs them by file stem (`03.png` with
    /// `03.jpg`): an image without its twin is an error listing it.
    pub fn list(dir: &Path) -> Result<Self> {
        let list = |side: &str| -> Result<Vec<PathBuf>> {
            let sub = dir.join(side);
            let entries = std::fs::read_dir(&sub).map_err(|e| DuoError::io(&sub, e))?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| Some(e.ok()?.path()))
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                })
                .collect();
            files.sort();
            Ok(files)
        };
        let (unsafe_images, safe_images) = (list("unsafe")?, list("safe")?);
        if unsafe_images.is_empty() {
            return Err(DuoError::Invalid(format!(
                "{}: no images (expected <dir>/unsafe/NN.png and <dir>/safe/NN.png; make them with `duo-train pairs`)",
                dir.join("unsafe").display()
            )));
        }
        let stem = |p: &PathBuf| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let stems = |files: &[PathBuf]| files.iter().map(stem).collect::<std::collections::BTreeSet<_>>();
        let (unsafe_stems, safe_stems) = (stems(&unsafe_images), stems(&safe_images));
        let lonely: Vec<String> = unsafe_stems
            .symmetric_difference(&safe_stems)
            .map(|s| match unsafe_stems.contains(s) {
                true => format!("unsafe/{s}"),
                false => format!("safe/{s}"),
            })
            .collect();
        if !lonely.is_empty() || unsafe_stems.len() != unsafe_images.len() {
            return Err(DuoError::Invalid(format!(
                "{}: pairs are matched by file name, and these images have no twin of the same name on the \
                 other side: {} ({} unsafe, {} safe images)",
                dir.display(),
                if lonely.is_empty() {
                    "a name used twice with two extensions".to_string()
                } else {
                    lonely.join(", ")
                },
                unsafe_images.len(),
                safe_images.len()
            )));
        }
        // every stem has its twin (checked above)
        let safe_images: Vec<PathBuf> = unsafe_images
            .iter()
            .map(|u| safe_images.iter().find(|s| stem(s) == stem(u)).cloned().unwrap_or_default())
            .collect();
        Ok(Self { unsafe_images, safe_images })
    }

    /// The token ids each pair's unsafe image was generated from, in pair order, from
    /// `<dir>/manifest.json` (`duo-train pairs` writes it; an image `NN.png` is the manifest's pair
    /// `NN`): its recorded tokens (an adversarial prefix), or its unsafe prompt's.
    pub fn unsafe_tokens(&self, dir: &Path, tokenizer: &ClipTokenizer) -> Result<Vec<Vec<u32>>> {
        let path = dir.join("manifest.json");
        if !path.is_file() {
            return Err(DuoError::Invalid(format!(
                "{}: not found; duo.pair_prompts needs the prompt of every pair, which `duo-train pairs` \
                 records there (for pairs made elsewhere, set duo.pair_prompts=false and a duo.prompt)",
                path.display()
            )));
        }
        let manifest = duo_core::error::read_json::<Manifest>(&path)?;
        self.unsafe_images
            .iter()
            .map(|image| {
                let index = image.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<usize>().ok());
                let record = index.and_then(|i| manifest.pairs.iter().find(|p| p.index == i));
                let tokens = |r: &PairRecord| {
                    r.unsafe_tokens.clone().unwrap_or_else(|| prompt_ids(tokenizer, &r.unsafe_prompt))
                };
                record.map(tokens).ok_or_else(|| {
                    DuoError::parse(
                        &path,
                        format!("no pair record for {} (its index is the file name)", image.display()),
                    )
                })
            })
            .collect()
    }

    /// A fingerprint of the files (names, sizes, modification times): a cache made from other
    /// files is stale.
    fn fingerprint(&self) -> String {
        let mut parts = Vec::new();
        for path in self.unsafe_images.iter().chain(&self.safe_images) {
            let meta = std::fs::metadata(path).ok();
            let size = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            parts.push(format!("{}:{size}:{modified}", path.display()));
        }
        parts.join("|")
    }
}

/// The pairs in latent space, on the host: [n, c, h, w] each.
#[derive(Debug, Clone)]
pub struct PairLatents {
    pub unsafe_latents: TensorData,
    pub safe_latents: TensorData,
}

impl PairLatents {
    pub fn len(&self) -> usize {
        self.unsafe_latents.shape[0]
    }

    /// [c, h, w]
    fn item_shape(&self) -> [usize; 3] {
        let s = &self.unsafe_latents.shape;
        [s[1], s[2], s[3]]
    }

    /// Encodes the pairs through the VAE (`latent_dist.sample() × scaling_factor`, as the authors'
    /// script), or reads them from `cache` when it was made from the same files. Writes the cache.
    pub fn load_or_encode<B: Backend>(
        files: &PairFiles,
        vae: &AutoencoderKL<B>,
        downscale: usize,
        seed: u64,
        cache: &Path,
        device: &B::Device,
    ) -> Result<Self> {
        let fingerprint = files.fingerprint();
        if cache.is_file() {
            let file = TensorFile::read(cache)?;
            if file.metadata("pairs") == Some(fingerprint.as_str()) {
                return Ok(Self {
                    unsafe_latents: file.get_f32("unsafe", 4)?,
                    safe_latents: file.get_f32("safe", 4)?,
                });
            }
        }
        let mut noise = NoiseSource::new(seed);
        let mut encode = |paths: &[PathBuf], size: &mut Option<[usize; 2]>| -> Result<TensorData> {
            let mut latents = Vec::with_capacity(paths.len());
            for path in paths {
                let image = load_image::<B>(path, downscale, device)?;
                let [_, _, h, w] = image.dims();
                match size {
                    None => *size = Some([h, w]),
                    Some(first) if *first != [h, w] => {
                        return Err(DuoError::parse(
                            path,
                            format!(
                                "image is {w}×{h} but the first pair image is {}×{}; all pair images must have one size",
                                first[1], first[0]
                            ),
                        ));
                    }
                    Some(_) => {}
                }
                let dist = vae.encode(image);
                let sample = dist.sample(noise.normal::<B, 4>(dist.mean.dims(), device));
                latents.push(sample * vae.scaling_factor);
            }
            Ok(Tensor::cat(latents, 0).into_data().convert::<f32>())
        };
        let mut size = None;
        let unsafe_latents = encode(&files.unsafe_images, &mut size)?;
        let safe_latents = encode(&files.safe_images, &mut size)?;
        let metadata = [("pairs".to_string(), fingerprint)].into_iter().collect();
        write_tensor_file_with_metadata(
            cache,
            &[("unsafe", unsafe_latents.clone()), ("safe", safe_latents.clone())],
            metadata,
        )?;
        Ok(Self { unsafe_latents, safe_latents })
    }
}

/// How batches are drawn.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub batch_size: usize,
    pub objective: Objective,
    /// Timesteps of the pair branches: [t_min, t_max).
    pub t_min: usize,
    pub t_max: usize,
    pub prior_timestep: usize,
    pub seed: u64,
}

/// The text embeddings the branches are conditioned on, on the host.
pub struct Conditioning {
    /// The pair branches': [1, seq, d] shared by every pair, or [pairs, seq, d], one per pair.
    pub pairs: TensorData,
    /// The prior branch's: [1, seq, d].
    pub prior: TensorData,
}

/// Everything a batch is made from; shared by the training and validation loaders.
pub struct BatchSource {
    pub latents: PairLatents,
    pub conditioning: Conditioning,
    pub schedule: NoiseSchedule,
    /// The UNet's float type: its inputs are cast to it (the targets and losses stay f32).
    pub unet_dtype: FloatDType,
    pub sampling: Sampling,
}

impl BatchSource {
    /// Batch `g` of the run: the pairs at positions g·b … g·b + b − 1 of the run's pair stream
    /// (a new permutation per pass), with their noise and timesteps.
    pub fn batch<B: Backend>(&self, g: usize, device: &B::Device) -> DuoBatch<B> {
        self.make_batch(&self.batch_pairs(g), &mut rng_for(self.sampling.seed, g as u64 + 1), device)
    }

    /// The pairs of batch `g`.
    fn batch_pairs(&self, g: usize) -> Vec<usize> {
        let (b, n) = (self.sampling.batch_size, self.latents.len());
        (g * b..(g + 1) * b).map(|k| self.pass_order(k / n)[k % n]).collect()
    }

    /// The fixed validation batch: the first `count` pairs, with draws of their own.
    pub fn valid_batch<B: Backend>(&self, count: usize, device: &B::Device) -> DuoBatch<B> {
        let pairs: Vec<usize> = (0..count.min(self.latents.len())).collect();
        self.make_batch(&pairs, &mut rng_for(self.sampling.seed ^ 0x76_616c_6964, 0), device)
    }

    fn pass_order(&self, pass: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.latents.len()).collect();
        order.shuffle(&mut rng_for(self.sampling.seed, u64::MAX - pass as u64));
        order
    }

    fn make_batch<B: Backend>(&self, pairs: &[usize], rng: &mut impl Rng, device: &B::Device) -> DuoBatch<B> {
        let s = &self.sampling;
        let b = pairs.len();
        let [c, h, w] = self.latents.item_shape();
        let item = c * h * w;
        let gather =
            |data: &TensorData| -> Tensor<B, 4> { Tensor::from_data(gather_rows(data, pairs), device) };
        let (loser, winner) = (gather(&self.latents.unsafe_latents), gather(&self.latents.safe_latents));
        // one noise per pair, shared by both images and the prior branch
        let noise: Vec<f32> = (0..b * item).map(|_| StandardNormal.sample(rng)).collect();
        let noise = Tensor::<B, 4>::from_data(TensorData::new(noise, [b, c, h, w]), device);
        let t_loser: Vec<usize> = (0..b).map(|_| rng.random_range(s.t_min..s.t_max)).collect();
        let t_winner: Vec<usize> = match s.objective {
            Objective::Duo | Objective::Sft => (0..b).map(|_| rng.random_range(s.t_min..s.t_max)).collect(),
            Objective::DiffusionDpo => t_loser.clone(),
        };
        let noisy_loser = self.schedule.add_noise(loser.clone(), noise.clone(), &t_loser);
        let noisy_winner = self.schedule.add_noise(winner.clone(), noise.clone(), &t_winner);
        let loser_target = self.schedule.training_target(loser, noise.clone(), &t_loser);
        let winner_target = self.schedule.training_target(winner, noise.clone(), &t_winner);
        let timesteps: Vec<f32> = t_loser
            .iter()
            .chain(&t_winner)
            .map(|&t| t as f32)
            .chain(std::iter::repeat_n(s.prior_timestep as f32, b))
            .collect();
        let float = self.unet_dtype;
        let context_rows = match self.conditioning.pairs.shape[0] {
            1 => vec![0; b],
            _ => pairs.to_vec(),
        };
        let pair_context =
            Tensor::<B, 3>::from_data(gather_rows(&self.conditioning.pairs, &context_rows), device);
        let prior_context =
            Tensor::<B, 3>::from_data(self.conditioning.prior.clone(), device).repeat_dim(0, b);
        let context = Tensor::cat(vec![pair_context.clone(), pair_context, prior_context], 0).cast(float);
        DuoBatch {
            input: Tensor::cat(vec![noisy_loser, noisy_winner, noise], 0).cast(float),
            timesteps: Tensor::from_data(TensorData::new(timesteps, [3 * b]), device),
            context,
            loser_target,
            winner_target,
        }
    }
}

/// The given rows (along the first dimension) of an f32 tensor, on the host: only what a batch uses
/// goes to the device.
fn gather_rows(data: &TensorData, rows: &[usize]) -> TensorData {
    let values = data.as_slice::<f32>().expect("latents and embeddings are f32");
    let item: usize = data.shape[1..].iter().product();
    let mut out = Vec::with_capacity(rows.len() * item);
    for &r in rows {
        out.extend_from_slice(&values[r * item..(r + 1) * item]);
    }
    let mut shape = data.shape.to_vec();
    shape[0] = rows.len();
    TensorData::new(out, shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use duo_core::schedulers::SchedulerConfig;

    type B = burn::backend::Flex;

    /// Three pairs of 1×2×2 latents; pair branches conditioned per pair (row p filled with p + 1)
    /// or all alike, the prior branch on a row of −1.
    fn source(per_pair: bool) -> BatchSource {
        let latents = TensorData::new((0..12).map(|v| v as f32).collect::<Vec<_>>(), [3, 1, 2, 2]);
        let rows = if per_pair { 3 } else { 1 };
        let pairs = (0..rows).flat_map(|p| [p as f32 + 1.0; 4]).collect::<Vec<_>>();
        BatchSource {
            latents: PairLatents { unsafe_latents: latents.clone(), safe_latents: latents },
            conditioning: Conditioning {
                pairs: TensorData::new(pairs, [rows, 2, 2]),
                prior: TensorData::new(vec![-1.0f32; 4], [1, 2, 2]),
            },
            schedule: NoiseSchedule::from_config(&SchedulerConfig::default()).unwrap(),
            unet_dtype: FloatDType::F32,
            sampling: Sampling {
                batch_size: 2,
                objective: Objective::Duo,
                t_min: 0,
                t_max: 750,
                prior_timestep: 999,
                seed: 7,
            },
        }
    }

    /// The first context value of each of the batch's 3·b rows.
    fn context_rows(batch: &DuoBatch<B>) -> Vec<f32> {
        let [n, _, _] = batch.context.dims();
        let values = batch.context.clone().into_data().convert::<f32>().into_vec::<f32>().unwrap();
        (0..n).map(|i| values[i * 4]).collect()
    }

    #[test]
    fn each_pair_is_conditioned_on_its_own_prompt_and_the_prior_on_the_shared_one() {
        let device = Default::default();
        let per_pair = source(true);
        for g in 0..3 {
            let rows = context_rows(&per_pair.batch::<B>(g, &device));
            let expected: Vec<f32> = per_pair.batch_pairs(g).iter().map(|&p| p as f32 + 1.0).collect();
            assert_eq!(rows[..2], expected[..], "loser rows of batch {g}");
            assert_eq!(rows[2..4], expected[..], "winner rows of batch {g}");
            assert_eq!(rows[4..], [-1.0, -1.0], "prior rows of batch {g}");
        }
        let shared = context_rows(&source(false).batch::<B>(0, &device));
        assert_eq!(shared, [1.0, 1.0, 1.0, 1.0, -1.0, -1.0]);
    }

    /// A pair made from an attack's tokens is conditioned on them; the others on their prompt's.
    #[test]
    fn recorded_tokens_condition_their_pair_and_prompts_the_rest() {
        let dir = std::env::temp_dir().join(format!("duo-pair-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tokenizer = ClipTokenizer::from_folder(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/toy/tokenizer"),
        )
        .unwrap();
        let adversarial: Vec<u32> = (0..tokenizer.model_max_length() as u32).collect();
        let mut manifest = Manifest::default();
        for (index, tokens) in [(0, None), (7, Some(adversarial.clone()))] {
            for side in ["unsafe", "safe"] {
                let path = dir.join(side).join(format!("{index:02}.png"));
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                image::RgbImage::new(8, 8).save(&path).unwrap();
            }
            manifest.pairs.push(PairRecord {
                index,
                unsafe_prompt: "a red cross".into(),
                safe_prompt: "a red plus sign".into(),
                unsafe_tokens: tokens,
                unsafe_seed: 0,
                safe_seed: 0,
                unsafe_score: None,
                safe_score: None,
                unsafe_rejects: 0,
                safe_rejects: 0,
            });
        }
        duo_core::fsutil::write_json(&dir.join("manifest.json"), &manifest).unwrap();
        let tokens = PairFiles::list(&dir).unwrap().unsafe_tokens(&dir, &tokenizer).unwrap();
        assert_eq!(tokens, [prompt_ids(&tokenizer, "a red cross"), adversarial]);
    }
}
