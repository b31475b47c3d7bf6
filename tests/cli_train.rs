//! `duo-train sample` end to end on the tiny fixture model.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("duo-cli-train-{}-{name}", std::process::id()))
}

/// The pipeline fixture's latents through the CLI give diffusers' image (the same check as the
/// library test, through argument parsing, latents loading and tensor saving).
#[test]
fn sample_with_given_latents_matches_diffusers() {
    let fixtures = root().join("tests/fixtures");
    let case = fixtures.join("pipelines/txt2img-ddim.safetensors");
    let latents = tmp("latents.safetensors");
    let file = duo_core::tensor_file::TensorFile::read(&case).unwrap();
    duo_core::tensor_file::write_tensor_file(&latents, &[("latents", file.get("latents").unwrap().clone())])
        .unwrap();
    let (png, tensor) = (tmp("out.png"), tmp("image.safetensors"));
    let status = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["--device", "cpu", "sample", "--scheduler", "ddim", "--steps", "5", "--guidance", "7.5"])
        .args(["--prompt", "a photo of a cat", "--prompt", "an astronaut riding a horse on the moon"])
        .args(["--negative-prompt", "blurry, low quality", "--negative-prompt", "ugly"])
        .arg("--model")
        .arg(fixtures.join("models/sd1-tiny"))
        .arg("--latents")
        .arg(&latents)
        .arg("--out")
        .arg(&png)
        .arg("--save-tensor")
        .arg(&tensor)
        .status()
        .unwrap();
    assert!(status.success());
    let ours = duo_core::tensor_file::TensorFile::read(&tensor).unwrap().get_f64_vec("image").unwrap();
    let expected = file.get_f64_vec("image").unwrap();
    let err = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(err < 2e-3, "max abs error {err}");
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (16 * 2 + 2, 16), "a two-image grid");
}

#[test]
fn sample_is_reproducible_from_a_seed_and_img2img_runs() {
    let model = root().join("tests/fixtures/models/sd1-tiny");
    let run = |out: &PathBuf, extra: &[&str]| {
        let status = Command::new(env!("CARGO_BIN_EXE_duo-train"))
            .args([
                "sample",
                "--steps",
                "3",
                "--prompt",
                "a red cross",
                "--seed",
                "7",
                "--height",
                "16",
                "--width",
                "16",
            ])
            .args(extra)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(out)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read(out).unwrap()
    };
    let (a, b) = (tmp("a.png"), tmp("b.png"));
    assert_eq!(run(&a, &[]), run(&b, &[]), "same seed, same image");
    let c = tmp("c.png");
    let edited = run(&c, &["--init-image", a.to_str().unwrap(), "--strength", "0.5"]);
    assert!(!edited.is_empty());
}

#[test]
fn sample_errors_name_the_problem() {
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["sample", "--prompt", "x", "--model", "/nonexistent/model", "--out", "/tmp/x.png"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/model"));
    let model = root().join("tests/fixtures/models/sd1-tiny");
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["sample", "--prompt", "x", "--scheduler", "heun", "--out", "/tmp/x.png"])
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("heun"));
}
