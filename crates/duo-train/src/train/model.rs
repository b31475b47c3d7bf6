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
use duo_core::objective::{DuoBatch, DuoLoss, DuoStep, duo_unet_loss};

use crate::learning::StepOutput;

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
    pub settings: DuoStep,
    /// Optimizer steps taken (from the checkpoint on resume).
    pub step: usize,
    pub guard: NonFiniteGuard,
}

/// The scalars every step reports, in this order (the first is the loss).
pub const TRAIN_SCALARS: &[&str] =
    &["loss", "dpo loss", "prior loss", "implicit accuracy", "reward margin", "winner gap", "loser gap"];

impl<B: Backend> DuoModel<B> {
    /// `unet` with its adapters attached (`attach_lora`); they are taken out into the module.
    pub fn new(unet: UNet2DConditionModel<B>, settings: DuoStep, step: usize, guard: NonFiniteGuard) -> Self {
        let (unet, adapters) = take_lora_adapters(unet);
        let (paths, adapters) = adapters.into_iter().unzip();
        Self { unet, adapters, paths, settings, step, guard }
    }

    /// The UNet with the adapters in place.
    pub fn policy(&self) -> UNet2DConditionModel<B> {
        put_lora_adapters(self.unet.clone(), self.paths.iter().map(String::as_str).zip(&self.adapters))
            .expect("the adapter paths were taken from this UNet")
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
        let (l, grads) = self.settings.gradients(&self.policy(), &batch);
        let loss = l.loss.clone().detach();
        TrainOutput::new(self, grads, output(batch.pairs(), loss, l))
    }

    /// [`DuoStep::update`]: global gradient-norm clipping, then AdamW. A non-finite norm skips the
    /// update and stops the run: the last checkpoint stays the last good state.
    fn optimize<AB, O>(self, optim: &mut O, lr: f64, grads: GradientsParams) -> Self
    where
        AB: AutodiffBackend,
        O: Optimizer<Self, AB>,
        Self: AutodiffModule<AB>,
    {
        let step = self.step + 1;
        let settings = self.settings;
        match settings.update::<AB, Self, O>(self, optim, lr, grads) {
            Ok(mut model) => {
                model.step = step;
                model
            }
            Err((model, norm)) => {
                model.guard.trip(step, norm);
                model
            }
        }
    }
}

impl<B: Backend> InferenceStep for DuoModel<B> {
    type Input = DuoBatch<B>;
    type Output = StepOutput<B>;

    fn step(&self, batch: DuoBatch<B>) -> StepOutput<B> {
        let s = &self.settings;
        let l = duo_unet_loss(&self.policy(), &batch, s.beta, s.lambda, s.objective);
        output(batch.pairs(), l.loss.clone(), l)
    }
}
