//! The one seeded sampler: every prompt with every seed, in batches, each image's initial latents
//! drawn from its seed alone, so image (p, s) does not depend on the batch it lands in, the batch
//! size or which other prompts are sampled (with a deterministic scheduler: DDIM at η = 0, PNDM,
//! Euler, DPM-Solver).

use burn::prelude::*;
use burn::tensor::FloatDType;

use super::{Judge, Judgement};
use crate::error::{DuoError, Result};
use crate::pipelines::{NoiseSource, StableDiffusion};
use crate::schedulers::Scheduler;

/// Offsets the seed of a batch's per-step noise (DDPM, DDIM with η > 0) from the initial latents'
/// seeds: the step noise of a batch comes from its first image's seed ^ this. With such a scheduler
/// an image also depends on its batch.
const STEP_NOISE_SEED: u64 = 1 << 32;

/// What an image is generated from: a prompt, or text-encoder output found by an attack.
#[derive(Debug, Clone)]
pub enum Condition<B: Backend> {
    Text(String),
    /// Text embeddings [len, d], as the text encoder's last hidden state.
    Embedding(Tensor<B, 2>),
}

impl<B: Backend> Condition<B> {
    pub fn texts(prompts: &[String]) -> Vec<Self> {
        prompts.iter().cloned().map(Self::Text).collect()
    }
}

/// Image `seed` of prompt `prompt` (an index into the prompts given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleJob {
    pub prompt: usize,
    pub seed: u64,
}

/// One batch: its jobs, their images [n, 3, H, W] in [0, 1], and the judge's reading of each
/// (empty without a judge).
pub struct SampledBatch<B: Backend> {
    pub jobs: Vec<SampleJob>,
    pub images: Tensor<B, 4>,
    pub judgements: Vec<Judgement>,
}

/// Text-to-image with classifier-free guidance, prompt × seed, at the UNet's `sample_size`.
#[derive(Clone, Copy)]
pub struct SeededSampler<'a, B: Backend> {
    pub sd: &'a StableDiffusion<B>,
    pub scheduler: &'a Scheduler,
    /// Classifier-free guidance; at ≤ 1 the prompt's own prediction alone.
    pub guidance: f64,
    /// Images generated at once.
    pub batch: usize,
}

impl<'a, B: Backend> SeededSampler<'a, B> {
    pub fn new(
        sd: &'a StableDiffusion<B>,
        scheduler: &'a Scheduler,
        guidance: f64,
        batch: usize,
    ) -> Result<Self> {
        if batch == 0 {
            return Err(DuoError::Invalid("the sampling batch must be at least 1 image".into()));
        }
        Ok(Self { sd, scheduler, guidance, batch })
    }

    /// The side of the latents: the UNet's `sample_size`.
    pub fn latent_side(&self) -> Result<usize> {
        self.sd.unet_sample_size.ok_or_else(|| {
            DuoError::Invalid("unet/config.json has no sample_size; cannot pick the image size".into())
        })
    }

    /// The side of the generated images.
    pub fn image_side(&self) -> Result<usize> {
        Ok(self.latent_side()? * self.sd.vae_scale_factor)
    }

    /// Every prompt with every seed, prompt-major (all seeds of prompt 0, then of prompt 1, …), in
    /// batches of `self.batch`; each batch is judged by `judge` when one is given. A judge that reads
    /// another image size than the model draws is refused before anything is generated.
    pub fn batches<'s>(
        &'s self,
        prompts: &'s [Condition<B>],
        seeds: &'s [u64],
        judge: Option<&'s dyn Judge<B>>,
    ) -> Result<impl Iterator<Item = Result<SampledBatch<B>>> + 's> {
        let side = self.latent_side()?;
        if let Some(judge) = judge {
            self.check_resolution(judge)?;
        }
        let jobs: Vec<SampleJob> = (0..prompts.len())
            .flat_map(|prompt| seeds.iter().map(move |&seed| SampleJob { prompt, seed }))
            .collect();
        let chunks: Vec<Vec<SampleJob>> = jobs.chunks(self.batch).map(<[SampleJob]>::to_vec).collect();
        Ok(chunks.into_iter().map(move |jobs| {
            let images = self.generate(prompts, &jobs, side)?;
            let judgements = match judge {
                Some(judge) => judge.judge(images.clone())?,
                None => Vec::new(),
            };
            Ok(SampledBatch { jobs, images, judgements })
        }))
    }

    /// All batches of [`Self::batches`] joined: the images [n, 3, H, W] prompt-major and their
    /// judgements; `on_batch` hears how many images each batch added (for progress).
    pub fn sample(
        &self,
        prompts: &[Condition<B>],
        seeds: &[u64],
        judge: Option<&dyn Judge<B>>,
        mut on_batch: impl FnMut(usize),
    ) -> Result<(Tensor<B, 4>, Vec<Judgement>)> {
        let mut images = Vec::new();
        let mut judgements = Vec::new();
        for batch in self.batches(prompts, seeds, judge)? {
            let batch = batch?;
            on_batch(batch.jobs.len());
            images.push(batch.images);
            judgements.extend(batch.judgements);
        }
        if images.is_empty() {
            return Err(DuoError::Invalid("nothing to sample: no prompt or no seed".into()));
        }
        Ok((Tensor::cat(images, 0), judgements))
    }

    fn check_resolution(&self, judge: &dyn Judge<B>) -> Result<()> {
        let size = self.image_side()?;
        match judge.resolution() {
            Some(resolution) if resolution != size => Err(DuoError::Invalid(format!(
                "the model generates {size}×{size} images (unet/config.json sample_size {} × VAE scale factor {}), \
                 but the judge ({}) reads {resolution}×{resolution}; use a model that generates at the \
                 judge's resolution",
                self.latent_side()?,
                self.sd.vae_scale_factor,
                judge.name()
            ))),
            _ => Ok(()),
        }
    }

    fn generate(&self, prompts: &[Condition<B>], jobs: &[SampleJob], side: usize) -> Result<Tensor<B, 4>> {
        let sd = self.sd;
        let latents = jobs
            .iter()
            .map(|job| {
                NoiseSource::new(job.seed).normal::<B, 4>([1, sd.latent_channels, side, side], &sd.device)
            })
            .collect();
        let texts: Option<Vec<String>> = jobs
            .iter()
            .map(|job| match &prompts[job.prompt] {
                Condition::Text(text) => Some(text.clone()),
                Condition::Embedding(_) => None,
            })
            .collect();
        // prompts alone are encoded as one batch, as the text-to-image pipeline does
        let context = match texts {
            Some(texts) => sd.encode_prompts(&texts),
            None => Tensor::cat(
                jobs.iter()
                    .map(|job| match &prompts[job.prompt] {
                        Condition::Text(text) => {
                            sd.encode_prompts(std::slice::from_ref(text)).cast(FloatDType::F32)
                        }
                        Condition::Embedding(embedding) => embedding.clone().unsqueeze::<3>(),
                    })
                    .collect(),
                0,
            ),
        };
        let mut step_noise = NoiseSource::new(STEP_NOISE_SEED ^ jobs[0].seed);
        let step_noise = |_, shape| Ok(step_noise.normal::<B, 4>(shape, &sd.device));
        sd.txt2img_from_embeddings(
            context,
            self.guidance,
            self.scheduler,
            Tensor::cat(latents, 0),
            step_noise,
        )
    }
}
