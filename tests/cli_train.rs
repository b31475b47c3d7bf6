//! `duo-train sample` end to end on the tiny fixture model.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("duo-cli-train-{}-{name}", std::process::id()))
}

/// `duo-train sample` on the DDIM pipeline fixture's prompts and latents, in `dtype`, writing
/// `<name>.png`. Returns the max abs difference of the image from diffusers' (f32) and the PNG.
fn sample_the_diffusers_case(name: &str, dtype: &str) -> (f64, PathBuf) {
    let fixtures = root().join("tests/fixtures");
    let file = duo_core::tensor_file::TensorFile::read(&fixtures.join("pipelines/txt2img-ddim.safetensors"))
        .unwrap();
    let latents = tmp(&format!("{name}-latents.safetensors"));
    duo_core::tensor_file::write_tensor_file(&latents, &[("latents", file.get("latents").unwrap().clone())])
        .unwrap();
    let (png, tensor) = (tmp(&format!("{name}.png")), tmp(&format!("{name}.safetensors")));
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["--device", "cpu", "sample", "--scheduler", "ddim", "--steps", "5", "--guidance", "7.5"])
        .args(["--prompt", "a photo of a cat", "--prompt", "an astronaut riding a horse on the moon"])
        .args(["--negative-prompt", "blurry, low quality", "--negative-prompt", "ugly", "--dtype", dtype])
        .arg("--model")
        .arg(fixtures.join("models/sd1-tiny"))
        .arg("--latents")
        .arg(&latents)
        .arg("--out")
        .arg(&png)
        .arg("--save-tensor")
        .arg(&tensor)
        .output()
        .unwrap();
    assert!(output.status.success(), "{dtype}: {}", String::from_utf8_lossy(&output.stderr));
    let ours = duo_core::tensor_file::TensorFile::read(&tensor).unwrap().get_f64_vec("image").unwrap();
    let expected = file.get_f64_vec("image").unwrap();
    (ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max), png)
}

/// The pipeline fixture's latents through the CLI give diffusers' image (the same check as the
/// library test, through argument parsing, latents loading and tensor saving).
#[test]
fn sample_with_given_latents_matches_diffusers() {
    let (err, png) = sample_the_diffusers_case("f32", "f32");
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

/// `duo-train pairs` writes the reference layout and a manifest, and a rerun only fills what is
/// missing; the judge's rejections are recorded.
#[test]
fn pairs_are_written_in_the_reference_layout_and_resume() {
    let model = root().join("tests/fixtures/models/sd1-tiny");
    let out = tmp("pairs");
    let run = |judge: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_duo-train"))
            .args(["pairs", "--pairs", "3", "--steps", "3", "--max-tries", "2", "--concept", "cross"])
            .args(["--judge", judge])
            .args(extra)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let output = run("none", &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let dir = out.join("cross");
    for i in 0..3 {
        assert!(dir.join(format!("unsafe/{i:02}.png")).is_file());
        assert!(dir.join(format!("safe/{i:02}.png")).is_file());
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let pairs = manifest["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 3);
    assert_eq!(pairs[0]["unsafe_prompt"], "a red cross");
    assert_eq!(pairs[0]["safe_prompt"], "a red plus sign");

    // a deleted pair is regenerated, identically (same seeds), the others are kept
    let before = std::fs::read(dir.join("safe/01.png")).unwrap();
    std::fs::remove_file(dir.join("safe/01.png")).unwrap();
    let kept = std::fs::metadata(dir.join("safe/00.png")).unwrap().modified().unwrap();
    let rerun = run("none", &[]);
    assert!(rerun.status.success(), "rerun: {}", String::from_utf8_lossy(&rerun.stderr));
    assert_eq!(std::fs::read(dir.join("safe/01.png")).unwrap(), before);
    assert_eq!(std::fs::metadata(dir.join("safe/00.png")).unwrap().modified().unwrap(), kept);

    // the toy judge reads 32×32 images; the tiny fixture model makes 16×16 ones: a clear error, not a
    // misjudgement
    let judge = root().join("models/judge");
    let out2 = tmp("pairs-judged");
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["pairs", "--pairs", "1", "--steps", "2", "--max-tries", "1", "--threshold", "0.99"])
        .arg("--judge")
        .arg(&judge)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out2)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("16×16") && stderr.contains("reads 32×32"),
        "{stderr}"
    );
}

/// `--lora FILE:WEIGHT` changes the image; weight 0 gives back the base model's image exactly.
#[test]
fn sample_applies_lora_files_with_weights() {
    use duo_core::lora::{LoraConfig, LoraFormat, LoraNetworks, attach_lora, save_lora};
    use duo_core::tensor_file::{TensorFile, write_tensor_file_with_metadata};
    type B = burn::backend::Flex;
    let model = root().join("tests/fixtures/models/sd1-tiny");
    let device = Default::default();
    // a LoRA with non-zero B, saved in the diffusers/PEFT format
    let unet = duo_core::ModelFolder::open(&model).unwrap().unet::<B>(&device).unwrap();
    let cfg = LoraConfig { rank: 2, alpha: 2.0, ..LoraConfig::default() };
    let unet = attach_lora(unet, &cfg, &device).unwrap();
    let lora = tmp("lora.safetensors");
    save_lora(&LoraNetworks::unet_only(unet), &lora, LoraFormat::Peft).unwrap();
    // B is zero at init: fill the saved lora_B weights so the adapters do something
    let file = TensorFile::read(&lora).unwrap();
    let tensors: Vec<(String, burn::tensor::TensorData)> = file
        .names()
        .map(|k| {
            let d = file.get(k).unwrap().clone();
            let d = if k.contains("lora_B") {
                burn::tensor::TensorData::new(vec![0.5f32; d.num_elements()], d.shape.clone())
            } else {
                d
            };
            (k.to_string(), d)
        })
        .collect();
    let named: Vec<(&str, burn::tensor::TensorData)> =
        tensors.iter().map(|(k, d)| (k.as_str(), d.clone())).collect();
    let key = "lora_adapter_metadata";
    let metadata = file.metadata(key).map(|v| [(key.to_string(), v.to_string())].into()).unwrap_or_default();
    write_tensor_file_with_metadata(&lora, &named, metadata).unwrap();
    let run = |out: &PathBuf, extra: &[String]| {
        let status = Command::new(env!("CARGO_BIN_EXE_duo-train"))
            .args([
                "sample",
                "--steps",
                "2",
                "--prompt",
                "a red cross",
                "--seed",
                "3",
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
    let base = run(&tmp("base.png"), &[]);
    let lora_arg = |w: &str| vec!["--lora".to_string(), format!("{}:{w}", lora.display())];
    assert_ne!(run(&tmp("lora.png"), &lora_arg("1.0")), base);
    assert_eq!(run(&tmp("lora0.png"), &lora_arg("0")), base);
}

/// `--dtype f16|bf16` runs the networks in that type (latents and scheduler in f32) and stays close
/// to diffusers' f32 image; image-to-image (the VAE encoder) runs in it too.
#[test]
fn sample_runs_in_f16_and_bf16() {
    let fixtures = root().join("tests/fixtures");
    // f16 keeps 11 significant bits, bf16 8: their images differ from f32 by rounding, not more.
    for (dtype, tolerance) in [("f16", 1e-2), ("bf16", 5e-2)] {
        let (err, png) = sample_the_diffusers_case(dtype, dtype);
        assert!(err > 0.0 && err < tolerance, "{dtype}: max abs error {err}");
        let edited = Command::new(env!("CARGO_BIN_EXE_duo-train"))
            .args(["--device", "cpu", "sample", "--steps", "3", "--prompt", "a red cross", "--dtype", dtype])
            .args(["--strength", "0.5", "--init-image"])
            .arg(&png)
            .arg("--model")
            .arg(fixtures.join("models/sd1-tiny"))
            .arg("--out")
            .arg(tmp(&format!("{dtype}-edited.png")))
            .output()
            .unwrap();
        assert!(edited.status.success(), "{dtype} img2img: {}", String::from_utf8_lossy(&edited.stderr));
    }
}

/// Every LoRA layout diffusers' `load_lora_weights` reads (PEFT with and without metadata,
/// diffusers-converted, attention processors, Kohya with and without alphas, LoCon; UNet and text
/// encoder entries), and two files summed: `sample --lora FILE:0.8` gives diffusers' image
/// (`load_lora_weights` + `set_adapters(weight 0.8)`, run in float64) within 1e-4 relative. The
/// fixtures and the script that made them: tests/fixtures/lora, tests/fixtures/generate_lora.py.
#[test]
fn sample_reads_every_lora_layout_as_diffusers_does() {
    let dir = root().join("tests/fixtures/lora");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 16, "{} cases", cases.len());
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    };
    let mut failures = Vec::new();
    for case in cases {
        let name = case["case"].as_str().unwrap();
        let tensors =
            duo_core::tensor_file::TensorFile::read(&dir.join(format!("{name}.safetensors"))).unwrap();
        let latents = tmp(&format!("lora-{name}-latents.safetensors"));
        duo_core::tensor_file::write_tensor_file(
            &latents,
            &[("latents", tensors.get("latents").unwrap().clone())],
        )
        .unwrap();
        let (png, tensor) = (tmp(&format!("lora-{name}.png")), tmp(&format!("lora-{name}.safetensors")));
        let mut command = Command::new(env!("CARGO_BIN_EXE_duo-train"));
        command.args(["--device", "cpu", "sample", "--scheduler", case["scheduler"].as_str().unwrap()]);
        command.args(["--steps", &case["steps"].to_string(), "--guidance", &case["guidance"].to_string()]);
        command.args(["--height", &case["height"].to_string(), "--width", &case["width"].to_string()]);
        for prompt in strings(&case["prompts"]) {
            command.args(["--prompt", &prompt]);
        }
        for prompt in strings(&case["negative_prompts"]) {
            command.args(["--negative-prompt", &prompt]);
        }
        for lora in case["lora"].as_array().unwrap() {
            let file = dir.join(lora["file"].as_str().unwrap());
            command.arg("--lora").arg(format!("{}:{}", file.display(), lora["weight"]));
        }
        let model = root().join("tests/fixtures/models").join(case["model"].as_str().unwrap());
        command.arg("--model").arg(model).arg("--latents").arg(&latents);
        let output = command.arg("--out").arg(&png).arg("--save-tensor").arg(&tensor).output().unwrap();
        if !output.status.success() {
            failures.push(format!("{name}: {}", String::from_utf8_lossy(&output.stderr)));
            continue;
        }
        let ours = duo_core::tensor_file::TensorFile::read(&tensor).unwrap().get("image").unwrap().clone();
        let expected = tensors.get("image_f64").unwrap();
        let err = common::relative_max_error(&ours, expected);
        println!("{name}: relative max error {err:.2e} against diffusers' float64 image");
        if err.is_nan() || err > 1e-4 {
            failures.push(format!("{name}: relative max error {err:.3e} > 1e-4"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
