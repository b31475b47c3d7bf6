//! The DUO objective and its optimizer step (Park et al. 2024; the authors' `train/unlearn-sd.py`;
//! `docs/duo-algorithm.md` §2).
//!
//! ```text
//! θ    the policy: the UNet with LoRA on       ref  the same UNet with LoRA off (a constant, no grad)
//! w    the winner: the safe image x⁺           l    the loser: the unsafe image x⁻
//! L·ʷ  ε-MSE of the winner, mean over C,H,W   L·ˡ  the same for the loser (one value per pair)
//! Δʷ = Lθʷ − Lrefʷ,   Δˡ = Lθˡ − Lrefˡ        how much worse than the reference the policy denoises
//! m  = −β·(Δʷ − Δˡ)                           the implicit reward margin (Diffusion-DPO: −½β·(Δʷ − Δˡ))
//!
//! L_dpo   = mean_b −log σ(m)
//! L_prior = mean over all elements of (εθ(ε, 999, "") − εref(ε, 999, ""))²
//! L       = L_dpo + λ·L_prior
//! ```
//!
//! The policy improving on the safe image relative to the reference (Δʷ < 0) or getting worse on
//! the unsafe one (Δˡ > 0) raises m and lowers L_dpo.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, FloatDType};

use crate::lora::set_lora_enabled;
use crate::models::UNet2DConditionModel;

/// Which loss: DUO's, Diffusion-DPO's for ablations (which also shares t between winner and
/// loser; that is the caller's sampling), or the supervised baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// −log σ(−β·(Δʷ − Δˡ)): no ½ (the DUO authors' code).
    Duo,
    /// −log σ(−½β·(Δʷ − Δˡ)) (Wallace et al. 2023).
    DiffusionDpo,
    /// The naive baseline: mean Lθʷ, supervised fine-tuning on the safe twins alone under the
    /// pair's condition; no preference, no reference and no prior term.
    Sft,
}

impl std::fmt::Display for Objective {
    /// The name a run config spells it with.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Duo => "duo",
            Self::DiffusionDpo => "diffusion-dpo",
            Self::Sft => "sft",
        })
    }
}

impl Objective {
    fn beta_factor(self) -> f64 {
        match self {
            Self::Duo | Self::Sft => 1.0,
            Self::DiffusionDpo => 0.5,
        }
    }
}

/// One batch of pairs through the policy and the reference.
pub struct DuoInputs<B: Backend> {
    /// Lθʷ, Lrefʷ, Lθˡ, Lrefˡ: per-pair ε-MSE ([`per_sample_mse`]), each [batch].
    pub policy_winner: Tensor<B, 1>,
    pub reference_winner: Tensor<B, 1>,
    pub policy_loser: Tensor<B, 1>,
    pub reference_loser: Tensor<B, 1>,
    /// εθ and εref on the prior branch (pure noise at t = 999, empty prompt): [batch, c, h, w].
    pub prior_policy: Tensor<B, 4>,
    pub prior_reference: Tensor<B, 4>,
}

/// The loss to differentiate and what to log; everything but `loss` is detached, scalars [1].
pub struct DuoLoss<B: Backend> {
    /// L = L_dpo + λ·L_prior
    pub loss: Tensor<B, 1>,
    pub dpo: Tensor<B, 1>,
    pub prior: Tensor<B, 1>,
    /// The fraction of pairs with m > 0.
    pub implicit_accuracy: Tensor<B, 1>,
    /// mean m
    pub reward_margin: Tensor<B, 1>,
    /// mean Δʷ = Lθʷ − Lrefʷ
    pub winner_gap: Tensor<B, 1>,
    /// mean Δˡ = Lθˡ − Lrefˡ
    pub loser_gap: Tensor<B, 1>,
}

pub fn duo_loss<B: Backend>(x: DuoInputs<B>, beta: f64, lambda: f64, objective: Objective) -> DuoLoss<B> {
    // The reference is a target, not a path for gradients, whichever backend computed it.
    let winner_gap = x.policy_winner - x.reference_winner.detach();
    let loser_gap = x.policy_loser - x.reference_loser.detach();
    let margin = (winner_gap.clone() - loser_gap.clone()) * (-objective.beta_factor() * beta);
    let dpo = -log_sigmoid(margin.clone()).mean();
    let prior = (x.prior_policy - x.prior_reference.detach()).square().mean();
    let loss = dpo.clone() + prior.clone() * lambda;
    let margin = margin.detach();
    DuoLoss {
        loss,
        dpo: dpo.detach(),
        prior: prior.detach(),
        implicit_accuracy: margin.clone().greater_elem(0.0).float().mean(),
        reward_margin: margin.mean(),
        winner_gap: winner_gap.detach().mean(),
        loser_gap: loser_gap.detach().mean(),
    }
}

/// One batch of b pairs for a DUO step. The UNet input stacks the three branches
/// `[x⁻_t⁻ ; x⁺_t⁺ ; ε]` at timesteps `[t⁻ ; t⁺ ; t_prior]`.
#[derive(Debug, Clone)]
pub struct DuoBatch<B: Backend> {
    /// [3b, c, h, w]
    pub input: Tensor<B, 4>,
    /// [3b]
    pub timesteps: Tensor<B, 1>,
    /// The conditioning embedding, repeated: [3b, seq, d].
    pub context: Tensor<B, 3>,
    /// The denoising targets of the loser (unsafe) and winner (safe) branches: [b, c, h, w] each.
    pub loser_target: Tensor<B, 4>,
    pub winner_target: Tensor<B, 4>,
}

impl<B: Backend> DuoBatch<B> {
    pub fn pairs(&self) -> usize {
        self.loser_target.dims()[0]
    }
}

/// The DUO loss of one batch through `policy` (the UNet with its adapters on) and the reference:
/// the same UNet with the adapters switched off, through the same kernels (so the two agree exactly
/// where the adapters are zero, even in f16) and detached (frozen params and untracked inputs record
/// no graph). No second copy of the weights. The prior branch compares the two predictions on ε.
pub fn duo_unet_loss<B: Backend>(
    policy: &UNet2DConditionModel<B>,
    batch: &DuoBatch<B>,
    beta: f64,
    lambda: f64,
    objective: Objective,
) -> DuoLoss<B> {
    if objective == Objective::Sft {
        return sft_loss(policy, batch);
    }
    let forward = |unet: &UNet2DConditionModel<B>| {
        unet.forward(batch.input.clone(), batch.timesteps.clone(), batch.context.clone())
    };
    // The reference pass (a copy with its own adapters off) on a thread of its own beside the
    // policy's: neither depends on the other, and on a CPU the toy UNet's kernels are too small to
    // keep both cores busy. The same kernels run on the same inputs, so the values are the same.
    // A copy of a lazily initialised weight would draw weights of its own (a random-weight UNet's
    // are drawn on first use): drawn first, they are shared.
    policy.visit(&mut DrawWeights);
    let reference_unet = policy.clone();
    set_lora_enabled(&reference_unet, false);
    let (reference, policy) = std::thread::scope(|scope| {
        let reference = scope.spawn(|| forward(&reference_unet).detach());
        let policy = forward(policy);
        (reference.join().expect("the reference pass panicked"), policy)
    });
    let b = batch.pairs();
    let branch = |x: &Tensor<B, 4>, i: usize| x.clone().narrow(0, i * b, b);
    let (loser, winner) = (&batch.loser_target, &batch.winner_target);
    let inputs = DuoInputs {
        policy_loser: per_sample_mse(branch(&policy, 0), loser.clone()),
        reference_loser: per_sample_mse(branch(&reference, 0), loser.clone()),
        policy_winner: per_sample_mse(branch(&policy, 1), winner.clone()),
        reference_winner: per_sample_mse(branch(&reference, 1), winner.clone()),
        // in f32, as every loss term (the authors compute their losses in fp32)
        prior_policy: branch(&policy, 2).cast(FloatDType::F32),
        prior_reference: branch(&reference, 2).cast(FloatDType::F32),
    };
    duo_loss(inputs, beta, lambda, objective)
}

/// One DUO optimizer step, exactly as the learner (`duo-train train`) takes it and `duo-bench perf
/// --duo-step` times it: the loss of a batch and its gradients ([`DuoStep::gradients`]), then global
/// gradient-norm clipping and the optimizer ([`DuoStep::update`]).
/// The supervised baseline on the winner branch alone: only `loss` (and `winner_gap`, the policy's
/// winner ε-MSE itself) are not zero.
fn sft_loss<B: Backend>(policy: &UNet2DConditionModel<B>, batch: &DuoBatch<B>) -> DuoLoss<B> {
    let b = batch.pairs();
    let winner = |x: &Tensor<B, 4>| x.clone().narrow(0, b, b);
    let prediction = policy.forward(
        winner(&batch.input),
        batch.timesteps.clone().narrow(0, b, b),
        batch.context.clone().narrow(0, b, b),
    );
    let loss = per_sample_mse(prediction, batch.winner_target.clone()).mean();
    let zero = || loss.zeros_like().detach();
    DuoLoss {
        loss: loss.clone(),
        dpo: zero(),
        prior: zero(),
        implicit_accuracy: zero(),
        reward_margin: zero(),
        winner_gap: loss.clone().detach(),
        loser_gap: zero(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DuoStep {
    pub beta: f64,
    pub lambda: f64,
    pub objective: Objective,
    pub max_grad_norm: f64,
    /// Batches per optimizer step: each batch's loss is divided by it, so the summed gradients are
    /// the mean (accelerate's convention).
    pub grad_accumulation: usize,
}

/// The published nudity run's settings (`configs/sd14-nudity.toml`; `docs/duo-algorithm.md` §3).
pub mod published {
    pub const BETA: f64 = 500.0;
    pub const BASE_LR: f64 = 3e-4;
    pub const BASE_LAMBDA: f64 = 1e6;
    pub const MAX_GRAD_NORM: f64 = 1.0;
    pub const WEIGHT_DECAY: f64 = 1e-2;
}

impl DuoStep {
    /// The published nudity run: β 500, λ = 1e6·β/100, clipping at 1, no accumulation.
    pub fn published() -> Self {
        Self {
            beta: published::BETA,
            lambda: effective_lambda(published::BASE_LAMBDA, published::BETA),
            objective: Objective::Duo,
            max_grad_norm: published::MAX_GRAD_NORM,
            grad_accumulation: 1,
        }
    }

    /// The loss of `batch` under `policy` (the UNet with its adapters, which carry the gradients)
    /// and the gradients of the loss divided by the accumulation count.
    pub fn gradients<B: AutodiffBackend>(
        &self,
        policy: &UNet2DConditionModel<B>,
        batch: &DuoBatch<B>,
    ) -> (DuoLoss<B>, B::Gradients) {
        let loss = duo_unet_loss(policy, batch, self.beta, self.lambda, self.objective);
        let grads = (loss.loss.clone() / self.grad_accumulation as f64).backward();
        (loss, grads)
    }

    /// Global gradient-norm clipping (PyTorch's `clip_grad_norm_`), then the optimizer step at `lr`.
    /// A non-finite norm skips the update: `Err` gives back the module unchanged with the norm.
    pub fn update<B, M, O>(
        &self,
        module: M,
        optim: &mut O,
        lr: f64,
        grads: GradientsParams,
    ) -> std::result::Result<M, (M, f64)>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        let (grads, norm) = clip_global_grad_norm::<B, M>(&module, grads, self.max_grad_norm);
        if !norm.is_finite() {
            return Err((module, norm));
        }
        Ok(optim.step(lr, module, grads))
    }
}

/// The learner's optimizer: AdamW with β (0.9, 0.999), ε 1e-8 (PyTorch's defaults, as the authors
/// use it) and `weight_decay`.
pub fn adamw(weight_decay: f64) -> AdamWConfig {
    AdamWConfig::new().with_weight_decay(weight_decay as f32).with_epsilon(1e-8)
}

/// ‖pred − target‖² averaged over C, H, W: one loss per sample [batch], in f32 whatever the
/// activations' dtype (the authors compute their losses in fp32).
pub fn per_sample_mse<B: Backend>(pred: Tensor<B, 4>, target: Tensor<B, 4>) -> Tensor<B, 1> {
    let batch = pred.dims()[0];
    let diff = pred.cast(FloatDType::F32) - target.cast(FloatDType::F32);
    diff.square().flatten::<2>(1, 3).mean_dim(1).reshape([batch])
}

/// The authors' β coupling of the learning rate: `base_lr·100/β` (β = 500 → 3e-4 becomes 6e-5), or
/// `base_lr` as given when not coupled.
pub fn effective_lr(base_lr: f64, beta: f64, coupled: bool) -> f64 {
    if coupled { base_lr * 100.0 / beta } else { base_lr }
}

/// The authors' β coupling of the prior weight: `base_λ·β/100` (β = 500 → 1e6 becomes 5e6).
pub fn effective_lambda(base_lambda: f64, beta: f64) -> f64 {
    base_lambda * beta / 100.0
}

/// PyTorch's `clip_grad_norm_(params, max_norm)`: one L2 norm over the gradients of all of
/// `module`'s parameters together, and every gradient scaled by `max_norm / (norm + 1e-6)` when
/// that is below 1. (Burn's own `GradientClippingConfig::Norm` clips each tensor by its own norm.)
/// Returns the gradients and the norm before clipping.
pub fn clip_global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    mut grads: GradientsParams,
    max_norm: f64,
) -> (GradientsParams, f64) {
    let mut squares = SumOfSquares::<B> { grads: &grads, sum: None };
    module.visit(&mut squares);
    let norm = squares.sum.map_or(0.0, |sum| sum.into_scalar().elem::<f64>().sqrt());
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        module.visit(&mut ScaleGrads::<B> { grads: &mut grads, coef, backend: std::marker::PhantomData });
    }
    (grads, norm)
}

/// Initialises every lazily initialised weight of a module (a no-op for loaded weights).
struct DrawWeights;

impl<B: Backend> ModuleVisitor<B> for DrawWeights {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

/// Σ‖g‖² over the parameters that have a gradient, accumulated on the device (one read at the end).
struct SumOfSquares<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SumOfSquares<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let squares = grad.cast(FloatDType::F32).square().sum();
            self.sum = Some(match self.sum.take() {
                Some(sum) => sum + squares,
                None => squares,
            });
        }
    }
}

struct ScaleGrads<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    coef: f64,
    backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ScaleGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, grad * self.coef);
        }
    }
}
