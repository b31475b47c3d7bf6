//! A plain-text renderer for runs whose stdout is not a terminal (logs, CI, `nohup`): burn-train's
//! CLI renderer prints only progress (burn-0.21-notes.md §2.5), so this one prints the metrics, as
//! means over the last `every` steps, and the validation means at each checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use burn::train::metric::MetricDefinition;

use super::Schedule;
use burn::train::metric::MetricId;
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};

/// Running sums of each metric since the last line.
#[derive(Default)]
struct Window(BTreeMap<String, (f64, usize)>);

impl Window {
    fn add(&mut self, name: &str, value: f64) {
        let entry = self.0.entry(name.to_string()).or_default();
        entry.0 += value;
        entry.1 += 1;
    }

    /// `name mean` pairs, then empties the window.
    fn drain(&mut self) -> String {
        let parts: Vec<String> =
            self.0.iter().map(|(name, (sum, n))| format_metric(name, sum / *n as f64)).collect();
        self.0.clear();
        parts.join("  ")
    }
}

fn format_metric(name: &str, value: f64) -> String {
    match name {
        "Learning Rate" => format!("lr {value:.2e}"),
        "Iteration Speed" => format!("{value:.2} it/s"),
        // DUO's prior loss and gaps live around 1e-6 at first: fixed decimals would show zeros
        _ if value != 0.0 && value.abs() < 1e-3 => format!("{name} {value:.3e}"),
        _ => format!("{name} {value:.5}"),
    }
}

pub struct LineRenderer {
    stage: &'static str,
    schedule: Schedule,
    every: usize,
    names: HashMap<MetricId, String>,
    train: Window,
    valid: Window,
    /// The global step of the last training line.
    step: usize,
}

impl LineRenderer {
    pub fn new(stage: &'static str, schedule: Schedule, every: usize) -> Self {
        Self {
            stage,
            schedule,
            every: every.max(1),
            names: HashMap::new(),
            train: Window::default(),
            valid: Window::default(),
            step: 0,
        }
    }
}

fn record(names: &HashMap<MetricId, String>, window: &mut Window, state: MetricState) {
    if let MetricState::Numeric(entry, value) = state
        && let Some(name) = names.get(&entry.metric_id)
    {
        window.add(name, value.current());
    }
}

/// Lines go out whole even when stdout is a pipe (`nohup … > log`).
fn print_line(line: String) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop training: the metric logs on disk still get every value.
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

impl MetricsRendererTraining for LineRenderer {
    fn update_train(&mut self, state: MetricState) {
        record(&self.names, &mut self.train, state);
    }

    fn update_valid(&mut self, state: MetricState) {
        record(&self.names, &mut self.valid, state);
    }

    fn render_train(&mut self, item: TrainingProgress, _indicators: Vec<ProgressType>) {
        // burn-train counts batches; a step is `grad_accumulation` of them.
        let s = &self.schedule;
        let batch = item.iteration.unwrap_or(0);
        if !batch.is_multiple_of(s.grad_accumulation) {
            return;
        }
        let epoch = item.global_progress.items_processed;
        let step = epoch.saturating_sub(1) * s.checkpoint_every + batch / s.grad_accumulation;
        self.step = step;
        if step.is_multiple_of(self.every) || step == s.steps {
            print_line(format!("[{}] step {step}/{}  {}", self.stage, s.steps, self.train.drain()));
        }
    }

    fn render_valid(&mut self, item: TrainingProgress, _indicators: Vec<ProgressType>) {
        let done = item.progress.as_ref().is_some_and(|p| p.items_processed >= p.items_total);
        if done {
            print_line(format!("[{}] valid @ step {}  {}", self.stage, self.step, self.valid.drain()));
        }
    }

    fn on_train_end(
        &mut self,
        _summary: Option<burn::train::LearnerSummary>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        Ok(())
    }
}

impl MetricsRendererEvaluation for LineRenderer {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}

    fn render_test(&mut self, _item: EvaluationProgress, _indicators: Vec<ProgressType>) {}
}

impl MetricsRenderer for LineRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names.insert(definition.metric_id, definition.name);
    }
}
