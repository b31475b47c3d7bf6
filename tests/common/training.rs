//! Helpers of the tests that train: pair folders of the tiny model's size and `duo-train train` runs
//! on the tiny fixture model (the tests that include this file are duo-train's, which have its binary).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("duo-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `n` pairs of 16×16 images (the tiny model's size): unsafe ones a diagonal stripe on red,
/// safe ones a vertical stripe on blue, each with its own jitter; and their manifest.
pub fn write_pairs(dir: &Path, n: usize) {
    for (side, index_colour) in [("unsafe", [200u8, 40, 40]), ("safe", [40, 40, 200])] {
        std::fs::create_dir_all(dir.join(side)).unwrap();
        for i in 0..n {
            let image = image::RgbImage::from_fn(16, 16, |x, y| {
                let on = if side == "unsafe" { x == y || x + y == 15 } else { x == 7 + (i as u32 % 3) };
                let shade = (i * 13 % 40) as u8;
                if on {
                    image::Rgb([240 - shade, 240, 240])
                } else {
                    image::Rgb(index_colour.map(|c| c.saturating_add(shade)))
                }
            });
            image.save(dir.join(side).join(format!("{i:02}.png"))).unwrap();
        }
    }
    // the manifest `duo-train pairs` writes: the toy config conditions each pair on its prompt
    let records: Vec<_> = (0..n)
        .map(|i| {
            let prompt = ["a red cross", "a red saltire"][i % 2];
            serde_json::json!({
                "index": i, "unsafe_prompt": prompt,
                "safe_prompt": "a blue plus sign", "unsafe_seed": i, "safe_seed": i,
                "unsafe_score": null, "safe_score": null, "unsafe_rejects": 0, "safe_rejects": 0,
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "concept": "cross", "model": "sd1-tiny", "strength": 0.75, "steps": 2, "guidance": 7.5,
        "judge": "none", "threshold": 0.5, "pairs": records, "failed": [],
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

/// `duo-train train` on the tiny fixture model with the toy config, `sets` on top.
pub fn train_command(run_dir: &Path, pairs: &Path, sets: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_duo-train"));
    command.args(["--device", "cpu", "train", "--log-every", "1000"]);
    command.arg("--set").arg(format!("model={}", root().join("tests/fixtures/models/sd1-tiny").display()));
    command.arg("--pairs").arg(pairs).arg("--run-dir").arg(run_dir);
    command.arg("--config").arg(root().join("configs/toy-cross.toml"));
    for set in sets {
        command.args(["--set", set]);
    }
    command
}

pub fn train(run_dir: &Path, pairs: &Path, sets: &[&str]) -> Output {
    train_command(run_dir, pairs, sets).output().unwrap()
}

pub fn resume(run_dir: &Path, sets: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_duo-train"));
    command.args(["--device", "cpu", "train", "--log-every", "1000", "--resume"]).arg(run_dir);
    for set in sets {
        command.args(["--set", set]);
    }
    command.output().unwrap()
}

pub fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

pub fn assert_success(output: &Output) {
    assert!(output.status.success(), "duo-train failed:\n{}", text(output));
}
