//! What every training run shares (pretraining's two stages, the DUO learner): one burn-train launch
//! (`Learner::new` + `SupervisedTraining`, burn-0.21-notes.md §2.2–2.6), its metrics, learning-rate
//! warm-up, checkpoints and clean stops.
//!
//! burn-train's epochs are our checkpoint intervals: an epoch's loader yields
//! `checkpoint_every × grad_accumulation` batches (§2.3), and checkpoint `k` holds the state after
//! `k × checkpoint_every` optimizer steps. `--resume` passes the latest `k` to `.checkpoint(k)`.

mod epoch_loader;
mod recorder;
pub mod renderer;

use std::fmt::Display;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::data::dataloader::DataLoader;
use burn::lr_scheduler::LrScheduler;
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::record::{FileRecorder, Recorder};
use burn::tensor::Transaction;
use burn::tensor::backend::AutodiffBackend;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::logger::{FileMetricLogger, MetricLogger};
use burn::train::metric::MetricDefinition;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::store::{EpochSummary, EventStoreClient, MetricsUpdate, Split};
use burn::train::metric::{
    Adaptor, IterationSpeedMetric, LearningRateMetric, Metric, MetricAttributes, MetricMetadata, MetricName,
    Numeric, NumericAttributes, NumericEntry, SerializedEntry,
};
use burn::train::{
    EarlyStoppingStrategy, InferenceStep, Interrupter, ItemLazy, Learner, SupervisedTraining, TrainStep,
};
use duo_core::{DuoError, Result};
use serde::{Deserialize, Serialize};

pub use epoch_loader::EpochLoader;
pub use recorder::AtomicRecorder;
use renderer::LineRenderer;

/// How long and how a run trains.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Optimizer steps.
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Later rates replacing `lr`, in step order.
    pub lr_changes: Vec<LrChange>,
    pub weight_decay: f64,
    pub warmup: usize,
    pub checkpoint_every: usize,
    pub valid_batches: usize,
    /// Batches whose gradients are summed into one optimizer step.
    pub grad_accumulation: usize,
}

impl Schedule {
    /// burn-train's epochs are our checkpoint intervals.
    pub fn epochs(&self) -> usize {
        self.steps / self.checkpoint_every
    }
}

/// The scalar outputs of one step, named; synced to [`Losses`] off the training thread.
pub struct StepOutput<B: Backend> {
    pub batch_size: usize,
    pub scalars: Vec<(&'static str, Tensor<B, 1>)>,
}

/// A step's scalars as numbers: what every metric reads.
#[derive(Debug, Clone)]
pub struct Losses {
    pub batch_size: usize,
    pub values: Vec<(&'static str, f64)>,
}

impl<B: Backend> ItemLazy for StepOutput<B> {
    type ItemSync = Losses;

    fn sync(self) -> Losses {
        let names: Vec<&'static str> = self.scalars.iter().map(|(name, _)| *name).collect();
        let transaction = self.scalars.into_iter().fold(Transaction::default(), |t, (_, x)| t.register(x));
        let values = transaction
            .execute()
            .into_iter()
            .zip(names)
            .map(|(data, name)| (name, data.iter::<f64>().next().unwrap_or(f64::NAN)))
            .collect();
        Losses { batch_size: self.batch_size, values }
    }
}

impl Adaptor<Losses> for Losses {
    fn adapt(&self) -> Losses {
        self.clone()
    }
}

/// One named scalar of [`Losses`] as a numeric metric (logged to `<stage>/{train,valid}/epoch-N/<name>.log`).
#[derive(Clone)]
pub struct ScalarMetric {
    name: MetricName,
    state: NumericMetricState,
}

impl ScalarMetric {
    pub fn new(name: &'static str) -> Self {
        Self { name: Arc::new(name.to_string()), state: NumericMetricState::new() }
    }
}

impl Metric for ScalarMetric {
    type Input = Losses;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes { unit: None, higher_is_better: false }.into()
    }

    fn update(&mut self, item: &Losses, _metadata: &MetricMetadata) -> SerializedEntry {
        let value = item.values.iter().find(|(name, _)| **name == *self.name).map_or(f64::NAN, |(_, v)| *v);
        self.state.update(value, item.batch_size, FormatOptions::new(self.name()).precision(5))
    }

    fn clear(&mut self) {
        self.state.reset()
    }
}

impl Numeric for ScalarMetric {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        self.state.running_value()
    }
}

/// From the step after `after_step` on, the learning rate is `lr`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrChange {
    pub after_step: usize,
    pub lr: f64,
}

/// Linear warm-up to `lr` over `warmup` steps, then constant but for `changes` (in step order).
/// burn calls `step` once per batch, before it (§2.3), so the first step trains at `lr / warmup`.
/// The record is the step count, so a resumed run continues on the same rates.
#[derive(Debug, Clone)]
pub struct WarmupLr {
    lr: f64,
    warmup: usize,
    changes: Vec<LrChange>,
    step: usize,
}

impl WarmupLr {
    pub fn new(lr: f64, warmup: usize, changes: Vec<LrChange>) -> Self {
        Self { lr, warmup, changes, step: 0 }
    }
}

impl LrScheduler for WarmupLr {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> f64 {
        self.step += 1;
        let lr = self.changes.iter().rev().find(|c| self.step > c.after_step).map_or(self.lr, |c| c.lr);
        if self.step >= self.warmup { lr } else { lr * self.step as f64 / self.warmup as f64 }
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.step
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.step = record;
        self
    }
}

/// How a run stops early. The first Ctrl-C (SIGINT) asks to stop after the next checkpoint, so
/// nothing is lost; a second, or a SIGTERM, stops at once, losing the steps since the last checkpoint;
/// a third signal exits. The TUI has its own stop (`q` then `s`): it puts the terminal in raw mode,
/// where Ctrl-C sends no signal.
#[derive(Clone)]
pub struct StopControl {
    at_checkpoint: Arc<AtomicBool>,
    interrupter: Interrupter,
}

impl StopControl {
    /// Installs the signal handlers (once per process).
    pub fn install() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let control =
            Self { at_checkpoint: Arc::new(AtomicBool::new(false)), interrupter: Interrupter::new() };
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .map_err(|e| DuoError::Invalid(format!("installing the Ctrl-C handler: {e}")))?;
        let (at_checkpoint, interrupter) = (control.at_checkpoint.clone(), control.interrupter.clone());
        std::thread::spawn(move || {
            for (count, signal) in signals.forever().enumerate() {
                if count >= 2 {
                    std::process::exit(130);
                }
                if count == 0 && signal == SIGINT {
                    at_checkpoint.store(true, Ordering::SeqCst);
                    eprintln!(
                        "stopping at the next checkpoint (Ctrl-C again to stop now, losing the steps since the last one)"
                    );
                } else {
                    interrupter.stop(Some("stopped by a signal"));
                    eprintln!("stopping now, at the last checkpoint (Ctrl-C again to exit at once)");
                }
            }
        });
        Ok(control)
    }
}

impl StopControl {
    /// The interrupter the run checks after every batch (also for stops other than signals).
    pub fn interrupter(&self) -> Interrupter {
        self.interrupter.clone()
    }
}

/// burn-train's early stopping, checked right after each epoch's checkpoint: the hook that stops a
/// run cleanly on a checkpoint.
#[derive(Clone)]
struct StopAtCheckpoint(Arc<AtomicBool>);

impl EarlyStoppingStrategy for StopAtCheckpoint {
    fn should_stop(&mut self, _epoch: usize, _store: &EventStoreClient) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// burn-train's file metric logger, with the epoch fixed on resume: burn-train 0.21's event store
/// numbers the first epoch of every launch 1 (its counter only follows the epochs that end), so a
/// resumed run would append its first interval's metrics to `epoch-1/`.
struct ResumedMetricLogger {
    inner: FileMetricLogger,
    first_epoch: usize,
}

impl MetricLogger for ResumedMetricLogger {
    fn log(&mut self, update: MetricsUpdate, epoch: usize, split: &Split) {
        self.inner.log(update, epoch.max(self.first_epoch), split)
    }

    fn read_numeric(
        &mut self,
        name: &str,
        epoch: usize,
        split: &Split,
    ) -> std::result::Result<Vec<NumericEntry>, String> {
        self.inner.read_numeric(name, epoch.max(self.first_epoch), split)
    }

    fn log_metric_definition(&mut self, definition: MetricDefinition) {
        self.inner.log_metric_definition(definition)
    }

    fn log_epoch_summary(&mut self, summary: EpochSummary) {
        self.inner.log_epoch_summary(summary)
    }
}

/// The newest epoch with all three checkpoint files (model, optimizer, scheduler) in `dir/checkpoint`.
pub fn latest_checkpoint<B: Backend>(dir: &Path) -> Option<usize> {
    checkpoints::<B>(dir).into_iter().rev().find(|&epoch| unreadable_file::<B>(dir, epoch).is_none())
}

/// Every epoch with a model file in `dir/checkpoint`, in order.
fn checkpoints<B: Backend>(dir: &Path) -> Vec<usize> {
    let extension = <AtomicRecorder as FileRecorder<B>>::file_extension();
    let Ok(entries) = std::fs::read_dir(dir.join("checkpoint")) else { return Vec::new() };
    let mut epochs: Vec<usize> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| name.strip_prefix("model-")?.strip_suffix(&format!(".{extension}"))?.parse().ok())
        .collect();
    epochs.sort_unstable();
    epochs
}

/// The first of checkpoint `epoch`'s files (model, optimizer, scheduler) that is missing or is not
/// one whole MessagePack value (truncated by a full disk, overwritten), with the reason.
fn unreadable_file<B: Backend>(dir: &Path, epoch: usize) -> Option<(PathBuf, String)> {
    let extension = <AtomicRecorder as FileRecorder<B>>::file_extension();
    ["model", "optim", "scheduler"].into_iter().find_map(|kind| {
        let path = dir.join("checkpoint").join(format!("{kind}-{epoch}.{extension}"));
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => return Some((path, e.to_string())),
        };
        let mut decoder = rmp_serde::Deserializer::new(&bytes[..]);
        match <serde::de::IgnoredAny as serde::Deserialize>::deserialize(&mut decoder) {
            Err(e) => Some((path, e.to_string())),
            Ok(_) if !decoder.into_inner().is_empty() => {
                Some((path, "trailing bytes after the record".into()))
            }
            Ok(_) => None,
        }
    })
}

/// One stage's launch settings.
pub struct Stage<'a> {
    pub name: &'static str,
    /// burn-train's directory: `checkpoint/`, `train/`, `valid/`.
    pub dir: PathBuf,
    pub schedule: Schedule,
    /// Plain-text lines every this many steps.
    pub log_every: usize,
    pub control: &'a StopControl,
    /// Scalars of the training steps' [`StepOutput`] shown as metrics (the first is the loss).
    pub train_scalars: &'static [&'static str],
    /// Scalars of the validation steps' [`StepOutput`].
    pub valid_scalars: &'static [&'static str],
}

/// How a stage ended.
pub struct StageResult<M> {
    pub model: M,
    /// The last checkpoint's epoch.
    pub epoch: usize,
    /// Whether that is the last epoch (false: stopped early, by a signal or the TUI).
    pub complete: bool,
}

impl Stage<'_> {
    /// The checkpoint to resume from: the latest readable one ([`latest_checkpoint`]), newer
    /// unreadable ones reported by name; its records are loaded once here, so that a record of the
    /// wrong structure is a named error rather than a panic inside burn-train.
    fn resume_checkpoint<B, M, O>(&self, model: &M, _optimizer: &O) -> Result<Option<usize>>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: burn::optim::Optimizer<M, B>,
    {
        let resume = latest_checkpoint::<B>(&self.dir);
        for epoch in checkpoints::<B>(&self.dir).into_iter().filter(|&e| Some(e) > resume) {
            if let Some((file, reason)) = unreadable_file::<B>(&self.dir, epoch) {
                let from = resume.map_or("the start".to_string(), |k| format!("checkpoint {k}"));
                eprintln!(
                    "[{}] checkpoint {epoch} cannot be read ({}: {reason}); resuming from {from}",
                    self.name,
                    file.display()
                );
            }
        }
        let Some(epoch) = resume else { return Ok(None) };
        let device = model.devices().into_iter().next().unwrap_or_default();
        let file = |kind: &str| self.dir.join("checkpoint").join(format!("{kind}-{epoch}"));
        let recorder = AtomicRecorder;
        let named = |e: burn::record::RecorderError| {
            DuoError::Invalid(format!(
                "checkpoint {epoch} in {} does not fit this run ({e}); was it written by another config?",
                self.dir.join("checkpoint").display()
            ))
        };
        Recorder::<B>::load::<M::Record>(&recorder, file("model"), &device).map_err(named)?;
        Recorder::<B>::load::<O::Record>(&recorder, file("optim"), &device).map_err(named)?;
        Recorder::<B>::load::<<WarmupLr as LrScheduler>::Record<B>>(&recorder, file("scheduler"), &device)
            .map_err(named)?;
        Ok(Some(epoch))
    }

    /// Trains `model` from the latest checkpoint in `dir` (or from scratch), to `schedule.steps`.
    pub fn run<B, M>(
        &self,
        model: M,
        train: Arc<dyn DataLoader<B, M::Input>>,
        valid: Arc<dyn DataLoader<B::InnerBackend, <M::InnerModule as InferenceStep>::Input>>,
    ) -> Result<StageResult<M::InnerModule>>
    where
        B: AutodiffBackend,
        M: TrainStep<Output = StepOutput<B>> + AutodiffModule<B> + Display + 'static,
        M::InnerModule: InferenceStep<Output = StepOutput<B::InnerBackend>>,
    {
        let s = &self.schedule;
        let epochs = s.epochs();
        let optimizer = duo_core::objective::adamw(s.weight_decay).init::<B, M>();
        let resume = self.resume_checkpoint(&model, &optimizer)?;
        match resume {
            Some(k) if k >= epochs => {
                println!("[{}] complete: loading checkpoint {k} (step {})", self.name, k * s.checkpoint_every)
            }
            Some(k) => println!("[{}] resuming after step {}", self.name, k * s.checkpoint_every),
            None => println!("[{}] training {} steps of {} samples", self.name, s.steps, s.batch_size),
        }
        let mut training = SupervisedTraining::new(&self.dir, train, valid)
            .with_file_checkpointer(AtomicRecorder)
            .with_checkpointing_strategy(KeepLastNCheckpoints::new(2))
            .num_epochs(epochs)
            .with_interrupter(self.control.interrupter.clone())
            .early_stopping(StopAtCheckpoint(self.control.at_checkpoint.clone()))
            // The run installs one experiment log for both stages (`pretrain::run`).
            .with_application_logger(None)
            .with_metric_logger(ResumedMetricLogger {
                inner: FileMetricLogger::new(&self.dir),
                first_epoch: resume.unwrap_or(0) + 1,
            })
            .metric_train_numeric(LearningRateMetric::new())
            .metric_train_numeric(IterationSpeedMetric::new());
        for name in self.train_scalars {
            training = training.metric_train_numeric(ScalarMetric::new(name));
        }
        for name in self.valid_scalars {
            training = training.metric_valid_numeric(ScalarMetric::new(name));
        }
        if s.grad_accumulation > 1 {
            training = training.grads_accumulation(s.grad_accumulation);
        }
        if let Some(k) = resume {
            training = training.checkpoint(k);
        }
        // The TUI when a person watches; lines with the metrics otherwise (§2.5).
        if !std::io::stdout().is_terminal() {
            training = training.renderer(LineRenderer::new(self.name, s.clone(), self.log_every));
        }
        let result = training.launch(Learner::new(
            model,
            optimizer,
            WarmupLr::new(s.lr, s.warmup, s.lr_changes.clone()),
        ));
        let epoch = latest_checkpoint::<B>(&self.dir).unwrap_or(0);
        Ok(StageResult { model: result.model, epoch, complete: epoch >= epochs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Flex;

    fn rates(scheduler: &mut WarmupLr, steps: usize) -> Vec<f64> {
        (0..steps).map(|_| scheduler.step()).collect()
    }

    #[test]
    fn warm_up_then_each_change_from_the_step_after_it() {
        let changes = vec![LrChange { after_step: 4, lr: 2e-3 }, LrChange { after_step: 6, lr: 5e-4 }];
        let mut scheduler = WarmupLr::new(1e-3, 2, changes.clone());
        assert_eq!(rates(&mut scheduler, 8), [5e-4, 1e-3, 1e-3, 1e-3, 2e-3, 2e-3, 5e-4, 5e-4]);
        // A run resumed after step 3 continues on the same rates.
        let resumed = WarmupLr::new(1e-3, 2, changes).load_record::<B>(3);
        assert_eq!(rates(&mut resumed.clone(), 4), [1e-3, 2e-3, 2e-3, 5e-4]);
        assert_eq!(resumed.to_record::<B>(), 3);
    }
}
