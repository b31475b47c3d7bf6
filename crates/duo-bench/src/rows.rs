//! A model's row of figures from a bench report (each attack's DSR, the preservation accuracies and
//! similarity), as the β sweep and the method comparison tabulate and plot them.

use serde_json::{Value, json};

use crate::chart::TradeoffPoint;

/// The x axis: the mean pixel similarity of same-seed safe and look-alike images, the toy world's
/// stand-in for the paper's 1 − LPIPS.
pub const PRESERVATION: &str = "preservation (1 − mean |Δ| of same-seed safe and look-alike images)";

/// A model's figures from a bench report: each attack's DSR, the preservation accuracies and the
/// mean pixel similarity (1 for the base model, which is its own reference).
pub fn point(report: &Value, label: &str, unlearned: bool) -> Value {
    let key = if unlearned { "dsr_unlearned" } else { "dsr_base" };
    let dsr: serde_json::Map<String, Value> = report["attacks"]
        .as_object()
        .map(|a| a.iter().map(|(name, entry)| (name.clone(), entry[key].clone())).collect())
        .unwrap_or_default();
    let p = &report["preservation"];
    let similarity = match unlearned {
        true => {
            let values: Vec<f64> = ["safe_pixel_similarity", "lookalike_pixel_similarity"]
                .iter()
                .filter_map(|k| p[*k].as_f64())
                .collect();
            values.iter().sum::<f64>() / values.len().max(1) as f64
        }
        false => 1.0,
    };
    let suffix = if unlearned { "unlearned" } else { "base" };
    json!({
        "label": label, "dsr": dsr, "preservation": similarity,
        "safe_accuracy": p[format!("safe_accuracy_{suffix}")], "lookalike_accuracy": p[format!("lookalike_accuracy_{suffix}")],
    })
}

pub fn to_point(row: &Value) -> TradeoffPoint {
    TradeoffPoint {
        label: row["label"].as_str().unwrap_or("").to_string(),
        preservation: row["preservation"].as_f64().unwrap_or(f64::NAN),
        dsr: row["dsr"]
            .as_object()
            .map(|d| d.iter().map(|(a, v)| (a.clone(), v.as_f64().unwrap_or(f64::NAN))).collect())
            .unwrap_or_default(),
    }
}

pub fn print_table(base: &Value, rows: &[Value]) {
    let attacks: Vec<String> =
        base["dsr"].as_object().map(|d| d.keys().cloned().collect()).unwrap_or_default();
    println!("\n| model | {} | preservation |", attacks.join(" | "));
    println!("|---|{}---|", "---|".repeat(attacks.len()));
    for row in std::iter::once(base).chain(rows) {
        let cells: Vec<String> = attacks
            .iter()
            .map(|a| format!("{:.1}%", 100.0 * row["dsr"][a].as_f64().unwrap_or(f64::NAN)))
            .collect();
        println!(
            "| {} | {} | {:.3} |",
            row["label"].as_str().unwrap_or(""),
            cells.join(" | "),
            row["preservation"].as_f64().unwrap_or(f64::NAN)
        );
    }
}
