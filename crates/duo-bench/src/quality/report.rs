//! quality.json and the table printed at the end of a run.

use std::path::Path;

use duo_core::Result;
use serde::Serialize;

use super::tally::{Gates, Metrics};

/// What was measured, so that a quality.json can be reproduced.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub model: String,
    pub judge: String,
    /// LoRA files applied to the UNet, FILE[:WEIGHT].
    pub lora: Vec<String>,
    pub seeds: usize,
    pub steps: usize,
    pub guidance: f64,
    pub unconditional_guidance: f64,
    pub scheduler: String,
    pub dtype: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct QualityReport {
    pub settings: Settings,
    /// The figures sit at the top level (`shape_accuracy`, `cross_rate`, ...), under the names the quality gates use.
    #[serde(flatten)]
    pub metrics: Metrics,
    pub gates: Gates,
    /// The prompt of each grid.png row, top to bottom ("" is the unconditional row).
    pub grid_rows: Vec<String>,
    /// The judge's reading of each grid.png cell ("colour shape (shape probability)"; rows as
    /// `grid_rows`, columns by seed), to check the judge against the picture by eye.
    pub grid_judge_labels: Vec<Vec<String>>,
}

impl QualityReport {
    pub fn write(&self, path: &Path) -> Result<()> {
        duo_core::fsutil::write_json(path, self)
    }

    pub fn print(&self) {
        let (m, s) = (&self.metrics, &self.settings);
        println!(
            "quality of {} ({} seeds, {} {} steps, guidance {}), judged by {}",
            s.model, s.seeds, s.steps, s.scheduler, s.guidance, s.judge
        );
        println!("  per shape   (shape / colour accuracy):");
        for (name, a) in &m.per_shape {
            println!("    {name:<12} {:>6.3} / {:.3}", a.shape_accuracy, a.colour_accuracy);
        }
        println!("  per colour  (shape / colour accuracy):");
        for (name, a) in &m.per_colour {
            println!("    {name:<12} {:>6.3} / {:.3}", a.shape_accuracy, a.colour_accuracy);
        }
        println!("  cross rate per wording:");
        for (word, rate) in &m.cross_rates {
            println!("    {word:<16} {rate:.3}");
        }
        let histogram: Vec<String> =
            m.unconditional.shape_histogram.iter().map(|(shape, n)| format!("{shape} {n}")).collect();
        println!("  unconditional shapes ({} images): {}", m.unconditional.images, histogram.join(", "));
        println!();
        println!("  {:<34} {:>7}  {:>9}  result", "gate", "value", "threshold");
        for (name, gate) in self.gates.named() {
            let result = if gate.passed { "pass" } else { "FAIL" };
            println!("  {name:<34} {:>7.3}  {:>9}  {result}", gate.value, format!("≥ {:.2}", gate.threshold));
        }
        let failed: Vec<&str> =
            self.gates.named().into_iter().filter(|(_, g)| !g.passed).map(|(name, _)| name).collect();
        if failed.is_empty() {
            println!("all quality gates pass");
        } else {
            println!("FAILED quality gates: {}", failed.join(", "));
            if !m.unconditional.missing_shapes.is_empty() {
                println!("  never drawn unconditionally: {}", m.unconditional.missing_shapes.join(", "));
            }
            if !self.gates.cross_rate.passed {
                println!("  lowest cross rate: {:?} at {:.3}", m.cross_rate_worst, m.cross_rate);
            }
        }
    }
}
