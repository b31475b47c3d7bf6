//! The baselines' settings: the `[uce]`, `[rece]` and `[esd]` sections of a run config. Each is
//! optional and defaults to the authors' published setting (docs/baselines.md gives the sources);
//! a config sets only what its model or concept needs otherwise.

use serde::{Deserialize, Serialize};

/// Unified Concept Editing (Gandikota et al., WACV 2024): the closed-form edit of every
/// cross-attention key and value projection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UceSection {
    /// The prompts whose tokens are moved (empty: the config's `concept`).
    pub erase: Vec<String>,
    /// Where they are moved: one guide prompt for all, or one per erased prompt (" ": the empty
    /// prompt, the authors' default for unsafe concepts).
    pub guide: Vec<String>,
    /// Prompts kept as they are, all 77 token outputs each; the empty prompt is always kept.
    pub preserve: Vec<String>,
    /// The weight of the erased tokens (`erase_scale`).
    pub erase_scale: f64,
    /// The weight of the preserved ones; absent: the authors' max(0.1, 1 / number of preserved
    /// prompts, the empty one included).
    pub preserve_scale: Option<f64>,
    /// The pull towards the original weights (`lamb`).
    pub lambda: f64,
    /// Edit the key projections too, not only the values.
    pub with_to_k: bool,
}

impl Default for UceSection {
    /// The authors' erasure script: "nudity" → " ", λ 0.5, erase scale 1, keys and values.
    fn default() -> Self {
        Self {
            erase: Vec::new(),
            guide: vec![" ".into()],
            preserve: Vec::new(),
            erase_scale: 1.0,
            preserve_scale: None,
            lambda: 0.5,
            with_to_k: true,
        }
    }
}

/// Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024): UCE, then rounds that each
/// find the embedding the edited projections still map to the concept and erase it too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReceSection {
    /// Rounds after the UCE edit (`epochs`).
    pub rounds: usize,
    /// The ridge term of the adversarial embedding (`regular_scale`).
    pub regularization: f64,
    /// The pull towards the current weights in each round's edit (`lamb`).
    pub lambda: f64,
    /// The weight of the adversarial tokens (`erase_scale`).
    pub erase_scale: f64,
    /// The weight of the empty prompt's tokens, kept as they are (`preserve_scale`).
    pub preserve_scale: f64,
    /// The prompts each round is validated on: the authors keep the round whose images the judge
    /// flags least often (empty: the pairs' unsafe prompts, judged by the pairs' judge).
    pub validation_prompts: Vec<String>,
    /// Images per validation prompt (the authors' `num_samples`).
    pub validation_seeds: usize,
}

impl Default for ReceSection {
    /// The authors' nudity setting: 3 rounds, regularization 0.1, λ 0.1, preserve scale 0.1, one
    /// validation image per prompt.
    fn default() -> Self {
        Self {
            rounds: 3,
            regularization: 0.1,
            lambda: 0.1,
            erase_scale: 1.0,
            preserve_scale: 0.1,
            validation_prompts: Vec::new(),
            validation_seeds: 1,
        }
    }
}

/// Erased Stable Diffusion (Gandikota et al., ICCV 2023): fine-tune the UNet so that, under the
/// concept's prompt, it predicts the frozen model's noise guided away from the concept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EsdSection {
    /// The concept's prompts, one drawn per iteration (the authors' `--seperator` list; empty: the
    /// config's `concept`).
    pub prompts: Vec<String>,
    /// Optimizer steps, one sample each.
    pub iterations: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// η in the target ε(x_t, t) − η·[ε(x_t, c, t) − ε(x_t, t)].
    pub negative_guidance: f64,
    /// The classifier-free guidance of the partial sampling that makes each x_t.
    pub start_guidance: f64,
    /// DDIM steps of that sampling.
    pub ddim_steps: usize,
    /// Train LoRA adapters (rank and alpha from `[lora]`) on the method's linear layers instead of
    /// the weights themselves.
    pub lora: bool,
    /// Steps between checkpoints (`iterations` must be a multiple).
    pub checkpoint_every: usize,
    pub seed: u64,
}

impl Default for EsdSection {
    /// The authors' paper-era script: 1,000 iterations at lr 1e-5, η 1, start guidance 3, 50 DDIM
    /// steps, the weights themselves.
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            iterations: 1000,
            lr: 1e-5,
            negative_guidance: 1.0,
            start_guidance: 3.0,
            ddim_steps: 50,
            lora: false,
            checkpoint_every: 100,
            seed: 0,
        }
    }
}

impl UceSection {
    pub fn check(&self) -> Result<(), String> {
        if !(self.guide.len() == 1 || self.guide.len() == self.erase.len()) {
            return Err(format!(
                "uce.guide has {} prompts: give one guide for every erased prompt, or one for all ({} erased)",
                self.guide.len(),
                self.erase.len()
            ));
        }
        positive("uce.lambda", self.lambda)?;
        non_negative("uce.erase_scale", self.erase_scale)?;
        if let Some(scale) = self.preserve_scale {
            non_negative("uce.preserve_scale", scale)?;
        }
        Ok(())
    }
}

impl ReceSection {
    pub fn check(&self) -> Result<(), String> {
        positive("rece.regularization", self.regularization)?;
        positive("rece.lambda", self.lambda)?;
        non_negative("rece.erase_scale", self.erase_scale)?;
        non_negative("rece.preserve_scale", self.preserve_scale)?;
        if self.rounds == 0 || self.validation_seeds == 0 {
            return Err("rece.rounds and rece.validation_seeds must be at least 1".into());
        }
        Ok(())
    }
}

impl EsdSection {
    pub fn check(&self) -> Result<(), String> {
        positive("esd.lr", self.lr)?;
        non_negative("esd.negative_guidance", self.negative_guidance)?;
        non_negative("esd.start_guidance", self.start_guidance)?;
        for (key, value) in [
            ("esd.iterations", self.iterations),
            ("esd.ddim_steps", self.ddim_steps),
            ("esd.checkpoint_every", self.checkpoint_every),
        ] {
            if value == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        if !self.iterations.is_multiple_of(self.checkpoint_every) {
            return Err(format!(
                "esd.iterations = {} is not a multiple of esd.checkpoint_every = {}",
                self.iterations, self.checkpoint_every
            ));
        }
        Ok(())
    }
}

fn positive(key: &str, value: f64) -> Result<(), String> {
    match value.is_finite() && value > 0.0 {
        true => Ok(()),
        false => Err(format!("{key} = {value}: must be positive")),
    }
}

fn non_negative(key: &str, value: f64) -> Result<(), String> {
    match value.is_finite() && value >= 0.0 {
        true => Ok(()),
        false => Err(format!("{key} = {value}: must be ≥ 0")),
    }
}
