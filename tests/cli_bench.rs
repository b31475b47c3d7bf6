//! `duo-bench` end to end: the forward and tokenize entry points that outside scripts call.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_duo-bench"))
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("duo-cli-bench-{}-{name}", std::process::id()))
}

/// Relative max error between two f32 tensors of a safetensors file each.
fn max_rel_error(a: &PathBuf, key_a: &str, b: &PathBuf, key_b: &str) -> f64 {
    let read = |p: &PathBuf, k: &str| {
        let file = duo_core::tensor_file::TensorFile::read(p).unwrap();
        file.get(k).unwrap().clone().convert::<f64>().into_vec::<f64>().unwrap()
    };
    let (x, y) = (read(a, key_a), read(b, key_b));
    let diff = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
    diff / y.iter().map(|v| v.abs()).fold(1e-6, f64::max)
}

#[test]
fn forward_unet_writes_diffusers_outputs() {
    let fixtures = root().join("tests/fixtures");
    let input = fixtures.join("forward/sd1-tiny-unet-nonsquare.in.safetensors");
    let out = tmp("unet.safetensors");
    let status = bench()
        .args(["--device", "cpu", "forward", "--component", "unet"])
        .arg("--model")
        .arg(fixtures.join("models/sd1-tiny"))
        .arg("--inputs")
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let expected = fixtures.join("forward/sd1-tiny-unet-nonsquare.out.safetensors");
    let err = max_rel_error(&out, "out", &expected, "out");
    assert!(err < 1e-4, "relative max error {err}");
}

#[test]
fn forward_rejects_unknown_component_and_bad_inputs() {
    let fixtures = root().join("tests/fixtures");
    let output = bench()
        .args(["forward", "--component", "clip", "--inputs", "x", "--out", "y"])
        .arg("--model")
        .arg(fixtures.join("models/sd1-tiny"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown component"));
    // text-encoder inputs given to the unet: the missing tensor is named
    let output = bench()
        .args(["forward", "--component", "unet"])
        .arg("--model")
        .arg(fixtures.join("models/sd1-tiny"))
        .arg("--inputs")
        .arg(fixtures.join("forward/sd1-tiny-text_encoder.in.safetensors"))
        .args(["--out", "/tmp/never-written.safetensors"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no tensor `sample`"), "{stderr}");
}

#[test]
fn tokenize_matches_transformers_ids() {
    let fixtures = root().join("tests/fixtures");
    let out = tmp("ids.json");
    let status = bench()
        .arg("tokenize")
        .arg("--model")
        .arg(root().join("models/sd-v1-4-configs"))
        .arg("--prompts")
        .arg(fixtures.join("tokenizer/prompts.json"))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let ours: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("tokenizer/ids.json")).unwrap()).unwrap();
    assert_eq!(ours["input_ids"], expected["input_ids"]);
}

#[test]
fn unknown_device_is_refused_with_the_compiled_list() {
    let output = bench()
        .args(["--device", "tpu", "tokenize", "--model", "x", "--prompts", "y", "--out", "z"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown device") && stderr.contains("cpu"), "{stderr}");
}
