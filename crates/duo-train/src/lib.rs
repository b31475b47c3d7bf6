//! `duo-train`: sampling, pretraining the toy model, pair generation, the DUO learner, LoRA export
//! and the main job, as library functions (the `duo-train` command and `duo-bench sweep` call
//! them).

// serde_json's `json!` recurses once per key: diffusers' UNet config has 50.
#![recursion_limit = "256"]

pub mod adversarial;
pub mod erase;
pub mod export;
mod learning;
pub mod pairs;
pub mod pretrain;
pub mod sample;
pub mod train;
pub mod unlearn;

use std::path::PathBuf;

use duo_core::Result;

/// `runs/<kind>-YYYYMMDD-HHMMSS` (UTC).
pub fn run_dir_name(kind: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    PathBuf::from("runs").join(format!(
        "{kind}-{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    ))
}

/// `run_dir`, or `runs/<kind>-<UTC time>`, refused when it already holds a run (one with a
/// config.toml): that is for `--resume`.
pub fn new_run_dir(run_dir: Option<PathBuf>, kind: &str) -> Result<PathBuf> {
    let dir = run_dir.unwrap_or_else(|| run_dir_name(kind));
    if dir.join("config.toml").exists() {
        return Err(duo_core::DuoError::Invalid(format!(
            "{} already holds a run: continue it with --resume {0}, or pick another --run-dir",
            dir.display()
        )));
    }
    Ok(dir)
}
