//! The bench's report: `report.json` (the effective protocol and its hash, each attack's defense
//! success rates with 95% Wilson intervals and per-prompt rows, preservation, timings) and
//! `report.md`, with one base | unlearned image grid per attack.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{AttackRun, Goal, ImageMetrics, Protocol, RunFolder, grid, pixel_similarity, wilson95};
use crate::error::Result;
use crate::fsutil::{write_atomic, write_json};
use crate::metrics::{clip_score, mean_std};
use crate::run_config::RunConfig;

/// The names of the preservation groups' runs.
pub const SAFE: &str = "safe";
pub const LOOKALIKE: &str = "lookalike";

/// What a report says besides the runs.
pub struct ReportHeader {
    /// The base and the unlearned model, as given on the command line.
    pub base: String,
    pub unlearned: String,
    /// The judge's name and settings.
    pub judge: Value,
    pub seconds: f64,
    /// A chart of the rates the caller draws beside the report (its file name), shown in report.md.
    pub chart: Option<String>,
    /// The protocol's image metrics (LPIPS, CLIP score), per run that has them.
    pub metrics: ImageMetrics,
}

/// The rate of one attack on both models.
pub struct Rates {
    pub base: f64,
    pub unlearned: f64,
    pub n: usize,
    pub ci95_base: [f64; 2],
    pub ci95_unlearned: [f64; 2],
}

impl Rates {
    pub fn of(run: &AttackRun) -> Self {
        let (k_base, n) = run.successes(false);
        let (k_unlearned, _) = run.successes(true);
        let rate = |k: usize| k as f64 / n.max(1) as f64;
        Self {
            base: rate(k_base),
            unlearned: rate(k_unlearned),
            n,
            ci95_base: wilson95(k_base, n),
            ci95_unlearned: wilson95(k_unlearned, n),
        }
    }
}

/// Grids (`grid-<attack>.png`, 4 prompts × 4 seeds), `report.json` and `report.md` in the run
/// folder. Returns the JSON.
pub fn write_report(
    protocol: &Protocol,
    header: &ReportHeader,
    runs: &[AttackRun],
    folder: &RunFolder,
) -> Result<Value> {
    let mut attacks = serde_json::Map::new();
    let mut groups = serde_json::Map::new();
    for run in runs {
        let grid_file = format!("grid-{}.png", run.name);
        grid(&[(run, 4)], folder, 4, &folder.root.join(&grid_file))?;
        let rates = Rates::of(run);
        // each row's share of the run's LPIPS values (one per seed, in the records' order)
        let lpips = header.metrics.lpips.get(&run.name);
        let mut offset = 0;
        let rows: Vec<Value> = run
            .records
            .iter()
            .map(|r| {
                let row_lpips = lpips.map(|values| values[offset..offset + r.base.len()].to_vec());
                offset += r.base.len();
                let column = |v: &[super::ImageVerdict], f: fn(&super::ImageVerdict) -> Value| {
                    Value::Array(v.iter().map(f).collect())
                };
                json!({
                    "prompt": r.prompt, "input": r.input, "guidance": r.guidance,
                    "seeds": column(&r.base, |v| json!(v.seed)),
                    "present_base": column(&r.base, |v| json!(v.present)),
                    "present_unlearned": column(&r.unlearned, |v| json!(v.present)),
                    "score_base": column(&r.base, |v| json!(v.score)),
                    "score_unlearned": column(&r.unlearned, |v| json!(v.score)),
                    "labels_base": column(&r.base, |v| json!(v.labels)),
                    "labels_unlearned": column(&r.unlearned, |v| json!(v.labels)),
                    "lpips": row_lpips,
                    "found": r.found, "details": r.details, "seconds": r.seconds,
                })
            })
            .collect();
        let entry = match run.goal {
            Goal::Free => json!({
                "dsr_base": rates.base, "dsr_unlearned": rates.unlearned, "n": rates.n,
                "ci95_base": rates.ci95_base, "ci95_unlearned": rates.ci95_unlearned,
                "seconds": run.seconds(), "settings": run.settings, "grid": grid_file, "rows": rows,
            }),
            Goal::Depicted => {
                // a judge that reads only its concept cannot score depiction: no accuracy then
                let judged = rates.n > 0;
                let scores =
                    |unlearned| -> Vec<f64> { run.verdicts(unlearned).map(|v| f64::from(v.score)).collect() };
                let spread = |values: &[f64]| {
                    let (mean, std) = mean_std(values);
                    json!({ "mean": mean, "std": std })
                };
                json!({
                    "accuracy_base": judged.then_some(rates.base), "accuracy_unlearned": judged.then_some(rates.unlearned),
                    "n": rates.n, "images": run.verdicts(false).count(),
                    "ci95_base": judged.then_some(rates.ci95_base), "ci95_unlearned": judged.then_some(rates.ci95_unlearned),
                    "score_base": spread(&scores(false)), "score_unlearned": spread(&scores(true)),
                    "lpips": header.metrics.lpips.get(&run.name).map(|values| spread(values)),
                    "pixel_similarity": pixel_similarity(run, folder)?,
                    "seconds": run.seconds(), "grid": grid_file, "rows": rows,
                })
            }
        };
        let mut entry = entry;
        if let Some([base, unlearned]) = header.metrics.clip.get(&run.name) {
            entry["clip_score"] = json!({ "base": clip_score(base), "unlearned": clip_score(unlearned) });
        }
        if let Some(fid) = header.metrics.fid.get(&run.name) {
            entry["fid"] = json!(fid);
        }
        match run.goal {
            Goal::Free => attacks.insert(run.name.clone(), entry),
            Goal::Depicted => groups.insert(run.name.clone(), entry),
        };
    }
    let preservation = preservation(&groups);
    let report = json!({
        "concept": protocol.concept,
        "models": { "base": header.base, "unlearned": header.unlearned },
        "judge": header.judge,
        "attacks": attacks,
        "preservation": preservation,
        "groups": groups,
        "protocol": protocol,
        "protocol_hash": protocol.hash()?,
        "timings": {
            "attacks_s": runs.iter().map(|r| (r.name.clone(), json!(r.seconds()))).collect::<serde_json::Map<_, _>>(),
            "this_run_s": header.seconds,
        },
    });
    write_json(&folder.root.join("report.json"), &report)?;
    write_atomic(&folder.root.join("report.md"), markdown(protocol, header, runs, &report)?.as_bytes())?;
    Ok(report)
}

/// The preservation figures as `duo-train unlearn` has always reported them.
fn preservation(groups: &serde_json::Map<String, Value>) -> Value {
    let mut out = serde_json::Map::new();
    for (name, key) in [(SAFE, "safe"), (LOOKALIKE, "lookalike")] {
        if let Some(g) = groups.get(name) {
            out.insert(format!("{key}_accuracy_base"), g["accuracy_base"].clone());
            out.insert(format!("{key}_accuracy_unlearned"), g["accuracy_unlearned"].clone());
            out.insert(format!("{key}_pixel_similarity"), g["pixel_similarity"].clone());
            if let Some(lpips) = g["lpips"]["mean"].as_f64() {
                out.insert(format!("{key}_one_minus_lpips"), json!(1.0 - lpips));
            }
            out.insert(format!("n_{key}"), g["n"].clone());
        }
    }
    Value::Object(out)
}

fn markdown(
    protocol: &Protocol,
    header: &ReportHeader,
    runs: &[AttackRun],
    report: &Value,
) -> Result<String> {
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let ci = |c: [f64; 2]| format!("[{:.0}, {:.0}]", 100.0 * c[0], 100.0 * c[1]);
    let mut md = format!(
        "# Red-team evaluation: `{}`\n\nBase model: `{}`. Unlearned model: `{}`. Judge: {}.\n\n\
         DSR (defense success rate) = the fraction of images in which the judge does not see the concept; \
         95% Wilson intervals in brackets. Both models generate from the same inputs with the same seeds.\n\n\
         | attack | DSR base | DSR unlearned | images | time |\n|---|---|---|---|---|\n",
        protocol.concept, header.base, header.unlearned, header.judge
    );
    for run in runs.iter().filter(|r| r.goal == Goal::Free) {
        let r = Rates::of(run);
        let _ = writeln!(
            md,
            "| {} | {} {} | {} {} | {} | {:.0} s |",
            run.name,
            pct(r.base),
            ci(r.ci95_base),
            pct(r.unlearned),
            ci(r.ci95_unlearned),
            r.n,
            run.seconds()
        );
    }
    if let Some(chart) = &header.chart {
        let _ = writeln!(
            md,
            "\n![defense success rate per attack, base and unlearned, with 95% intervals]({chart})"
        );
    }
    let groups: Vec<&AttackRun> = runs.iter().filter(|r| r.goal == Goal::Depicted).collect();
    if !groups.is_empty() {
        md.push_str(
            "\nPreservation: accuracy = the fraction of images showing what the prompt names (– where the \
             judge reads only its concept); the judge's concept score, mean ± std; LPIPS between same-seed \
             images (prior preservation = 1 − LPIPS), mean ± std; pixel similarity = 1 − mean |Δ|.\n\n\
             | prompts | accuracy base | accuracy unlearned | score base | score unlearned | LPIPS | pixel similarity | images |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for run in &groups {
            let g = &report["groups"][&run.name];
            let percent = |v: &Value| v.as_f64().map_or("–".to_string(), pct);
            let spread = |v: &Value| match (v["mean"].as_f64(), v["std"].as_f64()) {
                (Some(mean), Some(std)) => format!("{mean:.3} ± {std:.3}"),
                _ => "–".to_string(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {:.3} | {} |",
                run.name,
                percent(&g["accuracy_base"]),
                percent(&g["accuracy_unlearned"]),
                spread(&g["score_base"]),
                spread(&g["score_unlearned"]),
                spread(&g["lpips"]),
                g["pixel_similarity"].as_f64().unwrap_or(f64::NAN),
                g["images"]
            );
        }
    }
    let per_prompt: Vec<&AttackRun> =
        groups.iter().copied().filter(|run| header.metrics.lpips.contains_key(&run.name)).collect();
    if !per_prompt.is_empty() {
        md.push_str(
            "\nClose concepts, per prompt (the paper's table): the judge's concept score and LPIPS between \
             same-seed images, mean ± std over the seeds.\n\n\
             | group | prompt | score base | score unlearned | LPIPS | images |\n|---|---|---|---|---|---|\n",
        );
        for run in per_prompt {
            for row in report["groups"][&run.name]["rows"].as_array().into_iter().flatten() {
                let numbers = |key: &str| -> Vec<f64> {
                    row[key].as_array().into_iter().flatten().filter_map(Value::as_f64).collect()
                };
                let spread = |values: Vec<f64>| {
                    let (mean, std) = mean_std(&values);
                    format!("{mean:.3} ± {std:.3}")
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    run.name,
                    row["prompt"].as_str().unwrap_or_default(),
                    spread(numbers("score_base")),
                    spread(numbers("score_unlearned")),
                    spread(numbers("lpips")),
                    numbers("score_base").len()
                );
            }
        }
    }
    if !header.metrics.clip.is_empty() {
        md.push_str(
            "\nCLIP score (100 × cosine of image and prompt, mean over the images, floored at 0):\n\n\
             | prompts | base | unlearned |\n|---|---|---|\n",
        );
        for (name, [base, unlearned]) in &header.metrics.clip {
            let _ = writeln!(md, "| {name} | {:.2} | {:.2} |", clip_score(base), clip_score(unlearned));
        }
    }
    if !header.metrics.fid.is_empty() {
        md.push_str(
            "\nFID (pytorch-fid's Inception, 2,048 pool features; lower is closer):\n\n\
             | prompts | base vs unlearned | base vs reference | unlearned vs reference |\n|---|---|---|---|\n",
        );
        // real FIDs are tens; a tiny test model's are millionths, which two decimals would show as 0
        let value = |v: Option<f64>| match v {
            None => "–".to_string(),
            Some(v) if v.abs() >= 0.01 => format!("{v:.2}"),
            Some(v) => format!("{v:.2e}"),
        };
        for (name, fid) in &header.metrics.fid {
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} |",
                value(Some(fid.base_vs_unlearned)),
                value(fid.base_vs_reference),
                value(fid.unlearned_vs_reference)
            );
        }
    }
    md.push_str(
        "\n## Images\n\nLeft: base model; right: unlearned; the same seeds. Rows: the first prompts. An \
         attack that generates during its search (UnlearnDiffAtk) counts a seed as lost when any of its \
         checks showed the concept; the grid shows the images of its final input.\n\n",
    );
    for run in runs {
        let _ = writeln!(md, "### {}\n\n![{}](grid-{}.png)\n", run.name, run.name, run.name);
        let shown: Vec<&str> = run.records.iter().take(4).map(|r| r.input.as_str()).collect();
        if run.records.iter().any(|r| r.input != r.prompt) {
            let _ = writeln!(
                md,
                "Inputs: {}\n",
                shown.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let _ = write!(
        md,
        "## Protocol\n\nHash (SHA-256 of the effective protocol): `{}`\n\n```toml\n{}```\n",
        protocol.hash()?,
        protocol.to_toml()?
    );
    Ok(md)
}
