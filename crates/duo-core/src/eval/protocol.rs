//! A red-team protocol: the prompts, seeds, sampler, judge and attack settings of an evaluation, in
//! one TOML file (`configs/eval-*.toml`), read strictly like every run config. Published robustness
//! figures for the same method differ several-fold between papers because these differ, so the
//! report carries the effective protocol and its hash.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::judge::nudenet::NudityPreset;
use crate::judge::{JudgeChoice, JudgeSettings};
use crate::metrics::LpipsNet;
use crate::run_config::RunConfig;
use crate::schedulers::SchedulerChoice;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    /// The erased concept, as reports name it.
    pub concept: String,
    /// The attacks run unless the command names others.
    pub attacks: Vec<AttackName>,
    /// Images per prompt: seeds 0, 1, …, n − 1, the same for both models (a CSV prompt file brings
    /// its own seed per prompt).
    pub seeds: usize,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerChoice,
    /// Images per generation batch.
    pub batch: usize,
    /// The concept judge: "nudenet" or a toy concept-judge folder ([`JudgeSettings`] has the
    /// keys of each).
    pub judge: JudgeChoice,
    /// The toy-world shape that is the concept (toy judge).
    #[serde(default)]
    pub judge_shape: String,
    /// The toy judge's probability at or above which it sees the concept; NudeNet's score above
    /// which a detection counts (replacing its preset's).
    #[serde(default)]
    pub threshold: Option<f32>,
    /// NudeNet's classes and threshold, by the name of the papers' setting.
    #[serde(default)]
    pub judge_preset: Option<NudityPreset>,
    /// NudeNet classes that count as the concept, replacing the preset's.
    #[serde(default)]
    pub judge_classes: Option<Vec<String>>,
    /// NudeNet's ONNX file (default models/nudenet/320n.onnx).
    #[serde(default)]
    pub judge_weights: Option<PathBuf>,
    pub prompts: PromptGroups,
    /// LPIPS between the two models' same-seed images of the preservation groups (the DUO paper's
    /// prior preservation is 1 − LPIPS); without it, only the pixel similarity.
    #[serde(default)]
    pub lpips: Option<LpipsSettings>,
    /// CLIP score of every image against its prompt, base and unlearned (the papers' text–image
    /// alignment on COCO captions).
    #[serde(default)]
    pub clip: Option<ClipSettings>,
    /// FID between the two models' images of each attack, and of each against real images.
    #[serde(default)]
    pub fid: Option<FidSettings>,
    /// Each attack's settings; an attack in `attacks` needs its table (`prompts` and `paraphrases`
    /// need none).
    #[serde(default)]
    pub attack: AttackSettings,
}

/// Where the LPIPS weights are ([`crate::metrics::Lpips::load`] says what the folder holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LpipsSettings {
    pub weights: PathBuf,
    pub net: LpipsNet,
}

/// The CLIP model of the CLIP score: a folder in transformers' CLIPModel layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipSettings {
    pub model: PathBuf,
}

/// FID's Inception weights (pytorch-fid's file) and, optionally, a folder of real images (COCO's)
/// to compare each model's images with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FidSettings {
    pub weights: PathBuf,
    #[serde(default)]
    pub reference: Option<PathBuf>,
}

/// The prompt groups every evaluation uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptGroups {
    /// Prompts that ask for the concept: the direct attack, and where the other attacks start.
    pub concept: Vec<String>,
    /// Other words for the concept that the training pairs never used.
    pub paraphrases: Vec<String>,
    /// Other concepts, which must keep working.
    pub safe: Vec<String>,
    /// The concept's look-alike (the plus sign for the cross, ketchup for blood).
    pub lookalike: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackName {
    Prompts,
    Paraphrases,
    RingABell,
    Unlearndiffatk,
    ConceptInversion,
    EmbeddingInversion,
}

impl AttackName {
    pub const ALL: [AttackName; 6] = [
        Self::Prompts,
        Self::Paraphrases,
        Self::RingABell,
        Self::Unlearndiffatk,
        Self::ConceptInversion,
        Self::EmbeddingInversion,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prompts => "prompts",
            Self::Paraphrases => "paraphrases",
            Self::RingABell => "ring-a-bell",
            Self::Unlearndiffatk => "unlearndiffatk",
            Self::ConceptInversion => "concept-inversion",
            Self::EmbeddingInversion => "embedding-inversion",
        }
    }
}

impl std::fmt::Display for AttackName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AttackName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|a| a.as_str()).collect();
            format!("unknown attack {s:?}; the attacks are {}", names.join(", "))
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AttackSettings {
    pub prompts: Option<PromptFile>,
    pub ring_a_bell: Option<RingABell>,
    pub unlearndiffatk: Option<UnlearnDiffAtk>,
    pub concept_inversion: Option<ConceptInversion>,
    pub embedding_inversion: Option<EmbeddingInversion>,
}

/// The `prompts` attack from a file instead of `prompts.concept`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptFile {
    /// A CSV with a `prompt` column and optional `evaluation_seed` and `evaluation_guidance` columns
    /// (the I2P and UnlearnDiffAtk layouts; I2P's own `sd_seed` and `sd_guidance_scale` too), or a
    /// TOML file with `prompts = [...]`. The search attacks start from its prompts as well.
    pub file: PathBuf,
    /// Only the CSV rows whose `categories` column names this category (I2P's "sexual": 931 rows).
    #[serde(default)]
    pub category: Option<String>,
    /// Only the CSV rows whose `nudity_percentage` is above this (Ring-A-Bell's I2P subset: 50).
    #[serde(default)]
    pub min_nudity_percentage: Option<f64>,
}

/// Ring-A-Bell (Tsai et al., ICLR 2024): a concept direction in the text encoder's output space,
/// and a genetic search for discrete prompts whose embedding lies along it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingABell {
    /// Prompts with the concept, pairwise with `without`: the concept vector is the mean of the
    /// differences of their text embeddings.
    pub with: Vec<String>,
    pub without: Vec<String>,
    /// How far along the concept vector the target lies: target = emb(prompt) + η · concept.
    pub eta: f64,
    /// Tokens of the found prompt (K).
    pub tokens: usize,
    pub population: usize,
    pub generations: usize,
    pub mutation_rate: f64,
    pub crossover_rate: f64,
    /// Words the found prompts may not contain (the concept's own words, so the attack cannot just
    /// ask for it).
    pub banned_words: Vec<String>,
    pub seed: u64,
}

/// UnlearnDiffAtk (Zhang et al., ECCV 2024): prefix tokens optimised as relaxed one-hot vectors so
/// that the unlearned model denoises the base model's images of the prompt as the base model would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnlearnDiffAtk {
    /// Prefix tokens optimised in front of the prompt.
    pub prefix_tokens: usize,
    pub iterations: usize,
    pub lr: f64,
    /// Generate and judge the current prompt every this many iterations (and after the last).
    pub judge_every: usize,
    pub banned_words: Vec<String>,
    pub seed: u64,
}

/// Concept Inversion (Pham et al., ICLR 2024): textual inversion of one new token on the base
/// model's images of the concept, against the unlearned model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConceptInversion {
    /// The concept's word in the prompts, replaced by the learnt token when generating.
    pub word: String,
    /// The token whose embedding the new one starts from.
    pub initializer: String,
    /// Concept images per prompt (the base model's, seeds 1000, 1001, …), the training set.
    pub images: usize,
    pub steps: usize,
    pub lr: f64,
    pub batch: usize,
    pub seed: u64,
}

/// Embedding inversion: the whole conditioning (len × d text embeddings) optimised against the
/// unlearned model on the base model's images of the prompt: the upper bound of text-side attacks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingInversion {
    pub images: usize,
    pub steps: usize,
    pub lr: f64,
    pub batch: usize,
    pub seed: u64,
}

impl RunConfig for Protocol {
    /// An evaluation is continued only under the same protocol (its hash), not resumed with changes.
    const FROZEN_ON_RESUME: &'static [&'static str] = &[];

    fn validate(&self) -> std::result::Result<(), String> {
        let positive = [("seeds", self.seeds), ("steps", self.steps), ("batch", self.batch)];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        if !self.guidance.is_finite() {
            return Err(format!("guidance = {} is not a finite number", self.guidance));
        }
        self.judge_settings().validate()?;
        if self.prompts.concept.is_empty() {
            return Err("prompts.concept is empty: an evaluation needs prompts for the concept".into());
        }
        let a = &self.attack;
        for name in &self.attacks {
            let configured = match name {
                AttackName::Prompts | AttackName::Paraphrases => true,
                AttackName::RingABell => a.ring_a_bell.is_some(),
                AttackName::Unlearndiffatk => a.unlearndiffatk.is_some(),
                AttackName::ConceptInversion => a.concept_inversion.is_some(),
                AttackName::EmbeddingInversion => a.embedding_inversion.is_some(),
            };
            if !configured {
                return Err(format!("attacks lists {name}, but the protocol has no [attack.{name}] table"));
            }
        }
        if let Some(r) = &a.ring_a_bell {
            if r.with.is_empty() || r.with.len() != r.without.len() {
                return Err(format!(
                    "attack.ring-a-bell: `with` and `without` must be non-empty and pairwise ({} and {} prompts)",
                    r.with.len(),
                    r.without.len()
                ));
            }
            if r.tokens == 0 || r.population < 2 || r.generations == 0 {
                return Err("attack.ring-a-bell: tokens, generations ≥ 1 and population ≥ 2".into());
            }
            for (key, p) in [("mutation_rate", r.mutation_rate), ("crossover_rate", r.crossover_rate)] {
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!("attack.ring-a-bell.{key} = {p} is outside [0, 1]"));
                }
            }
            if !r.eta.is_finite() {
                return Err(format!("attack.ring-a-bell.eta = {} is not a finite number", r.eta));
            }
        }
        if let Some(u) = &a.unlearndiffatk {
            if u.prefix_tokens == 0 || u.iterations == 0 || u.judge_every == 0 {
                return Err(
                    "attack.unlearndiffatk: prefix_tokens, iterations and judge_every must be ≥ 1".into()
                );
            }
            check_lr("attack.unlearndiffatk", u.lr)?;
        }
        if let Some(c) = &a.concept_inversion {
            if c.images == 0 || c.steps == 0 || c.batch == 0 {
                return Err("attack.concept-inversion: images, steps and batch must be ≥ 1".into());
            }
            check_lr("attack.concept-inversion", c.lr)?;
        }
        if let Some(e) = &a.embedding_inversion {
            if e.images == 0 || e.steps == 0 || e.batch == 0 {
                return Err("attack.embedding-inversion: images, steps and batch must be ≥ 1".into());
            }
            check_lr("attack.embedding-inversion", e.lr)?;
        }
        Ok(())
    }
}

fn check_lr(table: &str, lr: f64) -> std::result::Result<(), String> {
    if lr.is_finite() && lr > 0.0 {
        Ok(())
    } else {
        Err(format!("{table}.lr = {lr} must be a positive number"))
    }
}

impl Protocol {
    /// The judge keys.
    pub fn judge_settings(&self) -> JudgeSettings<'_> {
        JudgeSettings {
            judge: &self.judge,
            shape: &self.judge_shape,
            threshold: self.threshold,
            preset: self.judge_preset,
            classes: self.judge_classes.as_deref(),
            weights: self.judge_weights.as_deref(),
        }
    }

    /// The effective protocol's hash: SHA-256 of its TOML, hex.
    pub fn hash(&self) -> crate::error::Result<String> {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.to_toml()?.as_bytes());
        Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped protocol reads and validates; the SD ones name their judge's rule.
    #[test]
    fn shipped_protocols_load() {
        let configs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut loaded = 0;
        for entry in std::fs::read_dir(&configs).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("eval-") {
                continue;
            }
            let protocol = Protocol::load(&path, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            if name.starts_with("eval-sd14-nudity") {
                assert_eq!(protocol.judge, JudgeChoice::Nudenet, "{name}");
                assert!(protocol.judge_preset.is_some(), "{name}");
            }
            if name.starts_with("eval-sd14-violence") {
                assert_eq!(protocol.judge, JudgeChoice::Q16, "{name}");
            }
            loaded += 1;
        }
        assert!(loaded >= 7, "{loaded} protocols");
        let i2p = Protocol::load(&configs.join("eval-sd14-nudity-i2p.toml"), &[]).unwrap();
        let file = i2p.attack.prompts.unwrap();
        assert_eq!((file.category.as_deref(), i2p.judge_preset), (Some("sexual"), Some(NudityPreset::Rece)));
    }
}
