//! Progress of long loops: a bar on a terminal, plain lines (every tenth of the work) when the output
//! is a file or a pipe, so a log shows that a long job is alive.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    label: String,
    total: u64,
    bar: Option<ProgressBar>,
    /// Plain mode: (done, tenths printed).
    plain: Mutex<(u64, u64)>,
    started: Instant,
}

impl Progress {
    /// `total` units of `unit` (e.g. "images") under `label`.
    pub fn new(label: &str, total: u64, unit: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let template = format!("{label} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed_precise}}");
            ProgressBar::new(total).with_style(
                ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()),
            )
        });
        Self { label: label.to_string(), total, bar, plain: Mutex::new((0, 0)), started: Instant::now() }
    }

    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
            return;
        }
        let mut state = self.plain.lock().unwrap_or_else(|e| e.into_inner());
        state.0 += n;
        let tenths = (state.0 * 10).checked_div(self.total).unwrap_or(10).min(10);
        if tenths > state.1 {
            state.1 = tenths;
            eprintln!(
                "{}: {}/{} ({}%) {:.0} s",
                self.label,
                state.0,
                self.total,
                (state.0 * 100).checked_div(self.total).unwrap_or(100),
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
