//! LoRA (Hu et al. 2021) on the UNet's linear layers, as PEFT does it for diffusers:
//!
//! ```text
//! y = x·W + b + scale·(x·A)·B      scale = alpha / rank
//! A [d_in, rank] ~ N(0, (1/rank)²)  (PEFT's init_lora_weights="gaussian"),  B [rank, d_out] = 0
//! ```
//!
//! so a fresh adapter leaves the UNet's output unchanged. The adapters live inside our [`Linear`]
//! (`lora: Option<LoraAdapter>`) and can be switched off at run time, which makes the same UNet
//! DUO's reference model (PEFT's `disable_adapters`): no second copy of the weights.
//!
//! The text encoder's linear layers take adapters the same way (from LoRA files that carry them).
//!
//! Files: `lora/files.rs` (every layout diffusers reads); module paths: `lora/paths.rs`.

mod files;
mod paths;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use regex::Regex;

pub use files::{LoraFormat, load_lora, load_lora_specs, parse_lora_spec, save_lora};
pub use paths::{Network, lora_adapters, text_encoder_adapters};

use paths::{linears, linears_mut};

use crate::error::{DuoError, Result};
use crate::models::layers::{Linear, cast_back};
use crate::models::{ClipTextModel, UNet2DConditionModel};

/// The networks a LoRA file adapts: the UNet, and the CLIP text encoder when the caller has it
/// (a file with text-encoder entries needs it).
#[derive(Debug, Clone)]
pub struct LoraNetworks<B: Backend> {
    pub unet: UNet2DConditionModel<B>,
    pub text_encoder: Option<ClipTextModel<B>>,
}

impl<B: Backend> LoraNetworks<B> {
    pub fn unet_only(unet: UNet2DConditionModel<B>) -> Self {
        Self { unet, text_encoder: None }
    }
}

/// Which linear layers get an adapter: a regex matched against the whole diffusers module path
/// (e.g. `down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q`), as PEFT matches a string
/// `target_modules`.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraTargets {
    /// `attn1.{to_q,to_k,to_v,to_out.0}` of every transformer block: the DUO authors' setting.
    SelfAttn,
    /// Self- and cross-attention (`attn1`, `attn2`) q/k/v/out: DUO without its self-attention flag.
    AllAttn,
    /// Any other set of layers.
    Regex(String),
}

impl LoraTargets {
    pub fn pattern(&self) -> &str {
        match self {
            Self::SelfAttn => r".*\.attn1\.(to_q|to_k|to_v|to_out\.0)",
            Self::AllAttn => r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
            Self::Regex(pattern) => pattern,
        }
    }

    fn regex(&self) -> Result<Regex> {
        Regex::new(&format!("^(?:{})$", self.pattern()))
            .map_err(|e| DuoError::Invalid(format!("LoRA targets: bad regex `{}`: {e}", self.pattern())))
    }
}

impl FromStr for LoraTargets {
    type Err = DuoError;

    /// `self-attn`, `all-attn`, or a regex over module paths.
    fn from_str(s: &str) -> Result<Self> {
        let targets = match s {
            "self-attn" => Self::SelfAttn,
            "all-attn" => Self::AllAttn,
            pattern => Self::Regex(pattern.to_string()),
        };
        targets.regex()?;
        Ok(targets)
    }
}

impl fmt::Display for LoraTargets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SelfAttn => f.write_str("self-attn"),
            Self::AllAttn => f.write_str("all-attn"),
            Self::Regex(pattern) => f.write_str(pattern),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: LoraTargets,
    /// Seeds the host-side RNG that draws every `A`, so the init does not depend on the backend.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// The DUO authors' setting: rank 32, alpha 32 (scale 1), self-attention only, seed 42.
    fn default() -> Self {
        Self { rank: 32, alpha: 32.0, targets: LoraTargets::SelfAttn, seed: 42 }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The on/off state of one adapter. It is interior-mutable so a `&UNet` (e.g. inside a train
/// step) can be switched, and cloning copies the *state*: `clone()`, `valid()` and `fork()` give
/// UNets with their own switches, so switching one never changes another behind its back (a
/// shared flag would race between the per-device copies of a multi-device run).
#[derive(Debug)]
pub struct LoraSwitch(AtomicBool);

impl LoraSwitch {
    fn on() -> Self {
        Self(AtomicBool::new(true))
    }
}

impl Clone for LoraSwitch {
    fn clone(&self) -> Self {
        Self(AtomicBool::new(self.0.load(Ordering::Relaxed)))
    }
}

/// The low-rank update of one linear layer. `A`, `B` are stored transposed with respect to PEFT's
/// `lora_A.weight` [rank, d_in] / `lora_B.weight` [d_out, rank], like our `Linear` weight.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// [d_in, rank]
    pub lora_a: Param<Tensor<B, 2>>,
    /// [rank, d_out]
    pub lora_b: Param<Tensor<B, 2>>,
    /// alpha / rank, times the weight it was loaded with.
    pub scale: f64,
    pub enabled: LoraSwitch,
}

impl<B: Backend> LoraAdapter<B> {
    /// An adapter from `A` [d_in, rank] and `B` [rank, d_out] (f32: DUO trains LoRA in f32 even on an
    /// f16 base), switched on.
    pub fn new(a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64) -> Self {
        Self {
            // detach: a new adapter is a leaf of the graph, whatever `a`, `b` were computed from
            lora_a: Param::from_tensor(a.cast(FloatDType::F32).detach()),
            lora_b: Param::from_tensor(b.cast(FloatDType::F32).detach()),
            scale,
            enabled: LoraSwitch::on(),
        }
    }

    pub fn rank(&self) -> usize {
        self.lora_a.lazy_shape().dims::<2>()[1]
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.0.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.0.store(enabled, Ordering::Relaxed)
    }

    /// `scale·(x·A)·B`, computed in the adapter's f32 and returned in `x`'s dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let down = burn::tensor::module::linear(x.cast(FloatDType::F32), self.lora_a.val(), None);
        let up = burn::tensor::module::linear(down, self.lora_b.val(), None) * self.scale;
        cast_back(up, dtype)
    }

    /// The full-rank update `scale·A·B` [d_in, d_out], f32.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.scale
    }
}

/// The UNet's linear layers whose diffusers module path matches `targets`, with their paths, in a
/// fixed order (what the closed-form editors read and replace with adapters).
pub fn matching_linears<'a, B: Backend>(
    unet: &'a UNet2DConditionModel<B>,
    targets: &LoraTargets,
) -> Result<Vec<(String, &'a Linear<B>)>> {
    let regex = targets.regex()?;
    let found: Vec<_> = linears(unet).into_iter().filter(|(path, _)| regex.is_match(path)).collect();
    match found.is_empty() {
        true => Err(DuoError::Invalid(format!("no linear layer of the UNet matches `{targets}`"))),
        false => Ok(found),
    }
}

/// Freezes every parameter of the UNet and adds a fresh adapter (Gaussian `A`, zero `B`) to each
/// linear layer whose module path matches `cfg.targets`. Afterwards only the adapters require
/// gradients, so only they get gradients and optimizer state.
///
/// Freezing goes through `Param::set_require_grad`, which leaves lazy parameters lazy (unlike
/// `Module::no_grad`, which would initialise them): attaching to a UNet built but not loaded
/// allocates nothing for the base, so SD 1.4's adapters can be counted without its weights.
pub fn attach_lora<B: Backend>(
    unet: UNet2DConditionModel<B>,
    cfg: &LoraConfig,
    device: &B::Device,
) -> Result<UNet2DConditionModel<B>> {
    if cfg.rank == 0 {
        return Err(DuoError::Invalid("LoRA rank must be at least 1".into()));
    }
    if !(cfg.alpha.is_finite() && cfg.alpha > 0.0) {
        return Err(DuoError::Invalid(format!("LoRA alpha must be positive, got {}", cfg.alpha)));
    }
    let targets = cfg.targets.regex()?;
    let mut unet = freeze(unet);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let normal = Normal::new(0.0f32, 1.0 / cfg.rank as f32)
        .map_err(|e| DuoError::Invalid(format!("LoRA rank {}: {e}", cfg.rank)))?;
    let mut attached = 0;
    for (path, linear) in linears_mut(&mut unet) {
        if !targets.is_match(&path) {
            continue;
        }
        if linear.lora.is_some() {
            return Err(DuoError::Invalid(format!("`{path}` already has a LoRA adapter")));
        }
        let [d_in, d_out] = linear.weight.lazy_shape().dims();
        let a: Vec<f32> = (0..d_in * cfg.rank).map(|_| normal.sample(&mut rng)).collect();
        let a = Tensor::from_data(TensorData::new(a, [d_in, cfg.rank]), (device, DType::F32));
        let b = Tensor::zeros([cfg.rank, d_out], (device, DType::F32));
        linear.lora = Some(LoraAdapter::new(a, b, cfg.scale()));
        attached += 1;
    }
    if attached == 0 {
        let examples: Vec<String> = linears(&unet).into_iter().take(3).map(|(path, _)| path).collect();
        return Err(DuoError::Invalid(format!(
            "LoRA targets `{}` match no linear layer of the UNet (paths look like `{}`)",
            cfg.targets,
            examples.join("`, `")
        )));
    }
    Ok(unet)
}

/// Marks every parameter as not requiring gradients, without initialising lazy ones.
///
/// Caveat of Burn 0.21: for a still-lazy parameter this updates the deferred init but not the
/// `Param`'s own `require_grad` field, which `valid()` → `from_inner()` restores; a lazy base that
/// were then randomly initialised and round-tripped would come back trainable. Loaded weights are
/// initialised parameters, for which the flag is set properly.
fn freeze<B: Backend, M: Module<B>>(module: M) -> M {
    struct Freeze;
    impl<B: Backend> ModuleMapper<B> for Freeze {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.set_require_grad(false)
        }
    }
    module.map(&mut Freeze)
}

/// The number of LoRA parameters (`rank·(d_in + d_out)` per adapter), without initialising any.
pub fn lora_parameter_count<B: Backend>(unet: &UNet2DConditionModel<B>) -> usize {
    lora_adapters(unet)
        .iter()
        .map(|(_, lora)| lora.lora_a.lazy_shape().num_elements() + lora.lora_b.lazy_shape().num_elements())
        .sum()
}

/// Switches every adapter of this UNet on or off (PEFT's `enable_adapters`/`disable_adapters`).
pub fn set_lora_enabled<B: Backend>(unet: &UNet2DConditionModel<B>, enabled: bool) {
    for (_, lora) in lora_adapters(unet) {
        lora.set_enabled(enabled);
    }
}

/// Switches the adapters off until the guard drops, then back on (PEFT's `with disable_adapter():`).
#[must_use = "the adapters are switched back on when the guard is dropped"]
pub struct LoraDisabled<'a, B: Backend> {
    unet: &'a UNet2DConditionModel<B>,
}

pub fn disable_lora<B: Backend>(unet: &UNet2DConditionModel<B>) -> LoraDisabled<'_, B> {
    set_lora_enabled(unet, false);
    LoraDisabled { unet }
}

impl<B: Backend> Drop for LoraDisabled<'_, B> {
    fn drop(&mut self) {
        set_lora_enabled(self.unet, true);
    }
}

/// Folds every adapter into its base weight, `W' = W + weight·scale·A·B`, and removes it: the
/// merged UNet runs at base speed and saves as a plain diffusers UNet. The adapters' on/off
/// state is ignored.
pub fn merge_lora<B: Backend>(mut unet: UNet2DConditionModel<B>, weight: f64) -> UNet2DConditionModel<B> {
    for (_, linear) in linears_mut(&mut unet) {
        merge_adapter(linear, weight);
    }
    unet
}

/// [`merge_lora`] for the text encoder's adapters.
pub fn merge_text_encoder_lora<B: Backend>(
    mut text_encoder: ClipTextModel<B>,
    weight: f64,
) -> ClipTextModel<B> {
    for (_, linear) in paths::text_encoder_linears_mut(&mut text_encoder) {
        merge_adapter(linear, weight);
    }
    text_encoder
}

fn merge_adapter<B: Backend>(linear: &mut Linear<B>, weight: f64) {
    if let Some(lora) = linear.lora.take() {
        let delta = lora.delta() * weight;
        linear.weight = linear.weight.clone().map(|w| {
            let dtype = w.dtype();
            // detach: the merged weight is a frozen base weight, not a function of the adapter
            cast_back(w.cast(FloatDType::F32) + delta, dtype).detach()
        });
    }
}

/// Sets `linear`'s adapter to `(a, b, scale)`, or, when it already has one, appends the new one
/// along the rank dimension: `[A₁ A₂]·[s₁B₁; s₂B₂] = s₁A₁B₁ + s₂A₂B₂`, so the deltas add up
/// exactly (the combined adapter has scale 1).
fn add_adapter<B: Backend>(linear: &mut Linear<B>, a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64) {
    linear.lora = Some(match linear.lora.take() {
        None => LoraAdapter::new(a, b, scale),
        Some(old) => {
            let a = Tensor::cat(vec![old.lora_a.val(), a.cast(FloatDType::F32)], 1);
            let b = Tensor::cat(vec![old.lora_b.val() * old.scale, b.cast(FloatDType::F32) * scale], 0);
            LoraAdapter::new(a, b, 1.0)
        }
    });
}

/// Takes every adapter out of the UNet, with its path. The DUO learner keeps them apart from the
/// frozen base so that its module record, hence its checkpoints, holds the adapters alone.
pub fn take_lora_adapters<B: Backend>(
    mut unet: UNet2DConditionModel<B>,
) -> (UNet2DConditionModel<B>, Vec<(String, LoraAdapter<B>)>) {
    let adapters = linears_mut(&mut unet)
        .into_iter()
        .filter_map(|(path, linear)| Some((path, linear.lora.take()?)))
        .collect();
    (unet, adapters)
}

/// Puts adapters (clones: their params share tensors and ids with the originals) into the linear
/// layers at their paths, replacing any there. The inverse of [`take_lora_adapters`].
pub fn put_lora_adapters<'a, B: Backend>(
    mut unet: UNet2DConditionModel<B>,
    adapters: impl IntoIterator<Item = (&'a str, &'a LoraAdapter<B>)>,
) -> Result<UNet2DConditionModel<B>> {
    let mut by_path: std::collections::HashMap<&str, &LoraAdapter<B>> = adapters.into_iter().collect();
    for (path, linear) in linears_mut(&mut unet) {
        if let Some(adapter) = by_path.remove(path.as_str()) {
            linear.lora = Some(adapter.clone());
        }
    }
    match by_path.keys().next() {
        Some(path) => {
            Err(DuoError::Invalid(format!("the UNet has no linear layer `{path}` for a LoRA adapter")))
        }
        None => Ok(unet),
    }
}
