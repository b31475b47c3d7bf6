//! The module burn-train trains: the frozen UNet, kept out of the record, and its LoRA adapters,
//! the only params (so the optimizer and the checkpoints hold them alone).
//!
//! Each step puts the adapters into a shallow copy of the UNet (params are shared, not copied): that
//! is the policy, and with its adapters switched off the reference (`objective::duo_unet_loss`).

use std::sync::{Arc, Mutex};

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{InferenceStep, Interrupter, TrainOutput, TrainStep};
use duo_core::lora::{LoraAdapter, put_lora_adapters, take_lora_adapters};
use duo_core::models::UNet2DConditionModel;
use duo_core::objective::{DuoBatch, DuoLoss, Objective, clip_global_grad_norm, duo_unet_loss};

use crate::learning::StepOutput;

/// The loss settings of a run.
#[derive(Debug, Clone, Copy)]
pub struct DuoSettings {
    pub beta: f64,
    pub lambda: f64,
    pub objective: Objective,
    pub max_grad_norm: f64,
    /// Batches per optimizer step: each batch's loss is divided by it, so the summed gradients
    /// are the mean (accelerate's convention).
    pub grad_accumulation: usize,
}

/// Stops the run when a step's gradients are not finite, and remembers at which step.
#[derive(Clone)]
pub struct NonFiniteGuard {
    pub interrupter: Interrupter,
    pub tripped_at: Arc<Mutex<Option<(usize, f64)>>>,
}

impl std::fmt::Debug for NonFiniteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonFiniteGuard").field("tripped_at", &self.tripped_at).finish()
    }
}

impl NonFiniteGuard {
    pub fn new(interrupter: Interrupter) -> Self {
        Self { interrupter, tripped_at: Arc::new(Mutex::new(None)) }
    }

    fn trip(&self, step: usize, norm: f64) {
        let mut tripped = self.tripped_at.lock().unwrap_or_else(|e| e.into_inner());
        tripped.get_or_insert((step, norm));
        self.interrupter.stop(Some(&format!("non-finite gradient norm ({norm}) at step {step}")));
    }

    pub fn tripped(&self) -> Option<(usize, f64)> {
        *self.tripped_at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Module, Debug)]
pub struct DuoModel<B: Backend> {
    /// The frozen base, without adapters: not visited, not recorded, but moved and `valid()`'d.
    #[module(skip)]
    pub unet: UNet2DConditionModel<B>,
    pub adapters: Vec<LoraAdapter<B>>,
    /// The adapters' diffusers module paths, in the same order.
    pub paths: Vec<String>,
    pub settings: DuoSettings,
    /// Optimizer steps taken (from the checkpoint on resume).
    pub step: usize,
    pub guard: NonFiniteGuard,
}

/// The scalars every step reports, in this order (the first is the loss).
pub const TRAIN_SCALARS: &[&str] =
    &["loss", "dpo loss", "prior loss", "implicit accuracy", "reward margin", "winner gap", "loser gap"];

impl<B: Backend> DuoModel<B> {
    /// `unet` with its adapters attached (`attach_lora`); they are taken out into the module.
    pub fn new(
        unet: UNet2DConditionModel<B>,
        settings: DuoSettings,
        step: usize,
        guard: NonFiniteGuard,
    ) -> Self {
        let (unet, adapters) = take_lora_adapters(unet);
        let (paths, adapters) = adapters.into_iter().unzip();
        Self { unet, adapters, paths, settings, step, guard }
    }

    /// The UNet with the adapters in place.
    pub fn policy(&self) -> UNet2DConditionModel<B> {
        put_lora_adapters(self.unet.clone(), self.paths.iter().map(String::as_str).zip(&self.adapters))
            .expect("the adapter paths were taken from this UNet")
    }

    fn loss(&self, batch: &DuoBatch<B>) -> DuoLoss<B> {
        let s = &self.settings;
        duo_unet_loss(&self.policy(), batch, s.beta, s.lambda, s.objective)
    }
}

fn output<B: Backend>(pairs: usize, loss: Tensor<B, 1>, l: DuoLoss<B>) -> StepOutput<B> {
    let values = [loss, l.dpo, l.prior, l.implicit_accuracy, l.reward_margin, l.winner_gap, l.loser_gap];
    StepOutput { batch_size: pairs, scalars: TRAIN_SCALARS.iter().copied().zip(values).collect() }
}

impl<B: AutodiffBackend> TrainStep for DuoModel<B> {
    type Input = DuoBatch<B>;
    type Output = StepOutput<B>;

    fn step(&self, batch: DuoBatch<B>) -> TrainOutput<StepOutput<B>> {
        let l = self.loss(&batch);
        let grads = (l.loss.clone() / self.settings.grad_accumulation as f64).backward();
        let loss = l.loss.clone().detach();
        TrainOutput::new(self, grads, output(batch.pairs(), loss, l))
    }

    /// Global gradient-norm clipping (PyTorch's `clip_grad_norm_`, not Burn's per-tensor clipping),
    /// then AdamW. A non-finite norm skips the update and stops the run: the last checkpoint stays
    /// the last good state.
    fn optimize<AB, O>(self, optim: &mut O, lr: f64, grads: GradientsParams) -> Self
    where
        AB: AutodiffBackend,
        O: Optimizer<Self, AB>,
        Self: AutodiffModule<AB>,
    {
        let step = self.step + 1;
        let (grads, norm) = clip_global_grad_norm::<AB, Self>(&self, grads, self.settings.max_grad_norm);
        if !norm.is_finite() {
            self.guard.trip(step, norm);
            return self;
        }
        let mut model = optim.step(lr, self, grads);
        model.step = step;
        model
    }
}

impl<B: Backend> InferenceStep for DuoModel<B> {
    type Input = DuoBatch<B>;
    type Output = StepOutput<B>;

    fn step(&self, batch: DuoBatch<B>) -> StepOutput<B> {
        let l = self.loss(&batch);
        output(batch.pairs(), l.loss.clone(), l)
    }
}
