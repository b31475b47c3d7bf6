//! Bad input, as a new user hands it over: every row builds one broken input from the tiny fixtures
//! (weights truncated, NaN, of integer dtype; LoRA files likewise; non-finite and absurd numbers on the
//! flags and config keys; unknown image formats and devices; mistyped `--set`s; pair folders whose
//! names differ; corrupt checkpoints), runs the command, and expects a failure whose message names the
//! problem: never a panic, never a NaN image written with exit 0. Bad configs of the learner are in
//! `tests/duo_train.rs` beside its other checks.

mod common;
#[path = "common/training.rs"]
mod training;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::TensorData;
use common::{copy_dir, fixtures};
use duo_core::tensor_file::{TensorFile, write_tensor_file, write_tensor_file_with_metadata};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("duo-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// `duo-train --device cpu sample --prompt x --steps 2` on `model` with `extra` flags.
fn sample(model: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args([
            "--device",
            "cpu",
            "sample",
            "--prompt",
            "x",
            "--steps",
            "2",
            "--scheduler",
            "ddim",
            "--model",
        ])
        .arg(model)
        .args(extra)
        .output()
        .unwrap()
}

/// A copy of sd1-tiny whose UNet file has `key` replaced by `value`.
fn model_with_unet_tensor(name: &str, key: &str, value: impl Fn(&TensorData) -> TensorData) -> PathBuf {
    let model = tmp(name);
    copy_dir(&fixtures().join("models/sd1-tiny"), &model);
    let file = model.join("unet/diffusion_pytorch_model.safetensors");
    let stored = TensorFile::read(&file).unwrap();
    let tensors: Vec<(String, TensorData)> = stored
        .names()
        .map(|k| {
            let data = stored.get(k).unwrap();
            (k.to_string(), if k == key { value(data) } else { data.clone() })
        })
        .collect();
    let named: Vec<(&str, TensorData)> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write_tensor_file(&file, &named).unwrap();
    model
}

/// The fixture's PEFT LoRA with `key`'s tensor replaced.
fn lora_with(name: &str, key_part: &str, value: impl Fn(&TensorData) -> TensorData) -> PathBuf {
    let source = TensorFile::read(&fixtures().join("lora/sd1-tiny/peft-nometa.safetensors")).unwrap();
    let mut done = false;
    let tensors: Vec<(String, TensorData)> = source
        .names()
        .map(|k| {
            let data = source.get(k).unwrap();
            let replace = !done && k.contains(key_part);
            done |= replace;
            (k.to_string(), if replace { value(data) } else { data.clone() })
        })
        .collect();
    assert!(done, "no key with {key_part}");
    let file = tmp(name);
    let named: Vec<(&str, TensorData)> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write_tensor_file_with_metadata(&file, &named, Default::default()).unwrap();
    file
}

fn filled(data: &TensorData, value: f32) -> TensorData {
    TensorData::new(vec![value; data.num_elements()], data.shape.clone())
}

#[test]
fn every_bad_input_is_a_named_error() {
    let model = fixtures().join("models/sd1-tiny");
    let out = tmp("never.png");
    let out_arg = out.to_str().unwrap().to_string();
    let nan_weights = model_with_unet_tensor("nan-model", "conv_in.bias", |d| filled(d, f32::NAN));
    // integers beyond f32's exact range (2^24): no lossless conversion
    let int_weights = model_with_unet_tensor("int-model", "conv_in.bias", |d| {
        TensorData::new(vec![1i64 << 40; d.num_elements()], d.shape.clone())
    });
    let nan_lora = lora_with("nan-lora.safetensors", "lora_A", |d| filled(d, f32::NAN));
    let int_lora = lora_with("int-lora.safetensors", "lora_B", |d| {
        TensorData::new(vec![1i32 << 30; d.num_elements()], d.shape.clone())
    });
    // finite, but far too large: the latents overflow while sampling
    let huge_lora = lora_with("huge-lora.safetensors", "lora_B", |d| filled(d, 3e38));
    let lora = |file: &Path| format!("{}:1", file.display());
    // a weight file cut short, as a failed download leaves it
    let truncated = tmp("truncated-model");
    copy_dir(&model, &truncated);
    let unet_file = truncated.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet_file).unwrap();
    std::fs::write(&unet_file, &bytes[..bytes.len() / 2]).unwrap();
    let init_image = tmp("init.png");
    image::RgbImage::new(16, 16).save(&init_image).unwrap();
    let init = init_image.display().to_string();

    let rows: Vec<(&str, PathBuf, Vec<String>, Vec<&str>)> = vec![
        (
            "guidance NaN",
            model.clone(),
            vec!["--guidance".into(), "nan".into()],
            vec!["guidance scale NaN", "not a finite"],
        ),
        (
            "guidance ∞",
            model.clone(),
            vec!["--guidance".into(), "inf".into()],
            vec!["guidance scale inf", "not a finite"],
        ),
        (
            "absurd size",
            model.clone(),
            vec!["--width".into(), "4000000".into(), "--height".into(), "4000000".into()],
            vec!["4000000×4000000", "is over"],
        ),
        (
            "unknown image format",
            model.clone(),
            vec!["--out".into(), tmp("x.gif").display().to_string()],
            vec!["x.gif", ".png or .jpg"],
        ),
        ("NaN weights", nan_weights, vec![], vec!["conv_in.bias", "NaN or infinite"]),
        ("integer weights", int_weights, vec![], vec!["conv_in.bias", "stored as I64", "no exact f32"]),
        (
            "NaN LoRA",
            model.clone(),
            vec!["--lora".into(), lora(&nan_lora)],
            vec!["lora_A.weight", "NaN or infinite"],
        ),
        (
            "integer LoRA",
            model.clone(),
            vec!["--lora".into(), lora(&int_lora)],
            vec!["lora_B.weight", "stored as I32", "no exact f32"],
        ),
        (
            "overflowing LoRA",
            model.clone(),
            vec!["--lora".into(), lora(&huge_lora)],
            vec!["non-finite", "at step 1 of 2"],
        ),
        ("truncated weights", truncated, vec![], vec!["diffusion_pytorch_model.safetensors"]),
        ("eta NaN", model.clone(), vec!["--eta".into(), "nan".into()], vec!["eta=NaN", "finite"]),
        (
            "strength NaN",
            model.clone(),
            vec!["--init-image".into(), init.clone(), "--strength".into(), "nan".into()],
            vec!["strength NaN", "outside [0, 1]"],
        ),
        (
            "strength 2",
            model.clone(),
            vec!["--init-image".into(), init, "--strength".into(), "2".into()],
            vec!["strength 2"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, model, flags, words) in rows {
        let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        if !flags.contains(&"--out") {
            flags.extend(["--out", out_arg.as_str()]);
        }
        let output = sample(&model, &flags);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let panicked = stderr.contains("panicked") || output.status.code().is_none();
        if output.status.success() || panicked || !words.iter().all(|w| stderr.contains(w)) {
            failures
                .push(format!("{what}: exit {:?}, expected {words:?} in:\n{stderr}", output.status.code()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(!out.exists(), "a failed run writes no image");
}

/// Integer weights whose values f32 holds exactly are converted, as a float64 file is read: the
/// image equals the one from the same values stored as floats.
#[test]
fn small_integer_weights_load_as_floats() {
    let as_ints = model_with_unet_tensor("small-int-model", "conv_in.bias", |d| {
        TensorData::new(
            (0..d.num_elements() as i64).map(|i| i % 3 - 1).collect::<Vec<i64>>(),
            d.shape.clone(),
        )
    });
    let as_floats = model_with_unet_tensor("small-float-model", "conv_in.bias", |d| {
        TensorData::new(
            (0..d.num_elements() as i64).map(|i| (i % 3 - 1) as f32).collect::<Vec<f32>>(),
            d.shape.clone(),
        )
    });
    let image = |model: &Path, name: &str| {
        let (png, tensor) = (tmp(&format!("{name}.png")), tmp(&format!("{name}.safetensors")));
        let output =
            sample(model, &["--out", png.to_str().unwrap(), "--save-tensor", tensor.to_str().unwrap()]);
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        TensorFile::read(&tensor).unwrap().get("image").unwrap().clone()
    };
    assert_eq!(image(&as_ints, "ints"), image(&as_floats, "floats"));
}

/// `--out` decides the format: a .jpg is a JPEG.
#[test]
fn the_output_format_follows_the_extension() {
    let out = tmp("image.jpg");
    let output = sample(&fixtures().join("models/sd1-tiny"), &["--out", out.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(&std::fs::read(&out).unwrap()[..3], &[0xFF, 0xD8, 0xFF], "JPEG magic bytes");
}

/// A prompt past the text encoder's 77 tokens is cut, as diffusers cuts it, with a warning that says
/// how many tokens were dropped.
#[test]
fn a_long_prompt_is_cut_with_a_warning() {
    let prompt = vec!["cat"; 100].join(" ");
    let out = tmp("long.png");
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["--device", "cpu", "sample", "--steps", "1", "--prompt", &prompt, "--out"])
        .arg(&out)
        .arg("--model")
        .arg(fixtures().join("models/sd1-tiny"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let tokenizer =
        duo_core::tokenizer::ClipTokenizer::from_folder(&fixtures().join("models/sd1-tiny/tokenizer"))
            .unwrap();
    let tokens = tokenizer.encode(&prompt).len();
    assert!(tokens > 77, "{tokens}");
    let words = [format!("{tokens} tokens long"), format!("the last {} are dropped", tokens - 77)];
    assert!(words.iter().all(|w| stderr.contains(w.as_str())), "{stderr}");
}

/// Non-finite and out-of-range numbers in the other commands' flags and config keys.
#[test]
fn every_command_refuses_non_finite_numbers() {
    let model = fixtures().join("models/sd1-tiny");
    let judge = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/judge");
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/toy-cross.toml");
    let (model, judge, config) =
        (model.display().to_string(), judge.display().to_string(), config.display().to_string());
    let out = tmp("numbers-out").display().to_string();
    let pairs = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["pairs", "--model", &model, "--pairs", "1", "--steps", "2", "--out", &out];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect()
    };
    let rows: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "pairs --guidance nan",
            pairs(&["--judge", "none", "--guidance", "nan"]),
            vec!["guidance", "not a finite"],
        ),
        ("pairs --strength nan", pairs(&["--judge", "none", "--strength", "nan"]), vec!["strength NaN"]),
        ("pairs --threshold nan", pairs(&["--judge", &judge, "--threshold", "nan"]), vec!["threshold = NaN"]),
        (
            "train --set duo.beta=nan",
            ["train", "--config", &config, "--set", "duo.beta=nan"].map(String::from).to_vec(),
            vec!["duo.beta = NaN", "must be positive"],
        ),
        (
            "unlearn --set pairs.strength=inf",
            ["unlearn", "--config", &config, "--set", "pairs.strength=inf", "--out", &out]
                .map(String::from)
                .to_vec(),
            vec!["pairs.strength = inf"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, args, words) in rows {
        let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
            .args(["--device", "cpu"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let panicked = stderr.contains("panicked") || output.status.code().is_none();
        if output.status.success() || panicked || !words.iter().all(|w| stderr.contains(w)) {
            failures
                .push(format!("{what}: exit {:?}, expected {words:?} in:\n{stderr}", output.status.code()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn command_line_mistakes_are_named() {
    // a device index the CPU backend does not have
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["--device", "cpu:1", "sample", "--prompt", "x", "--out", "x.png"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("takes no index"), "{stderr}");

    // a mistyped --set names the flag, not the file
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/toy-cross.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["train", "--set", "duo.betaa=3", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("--set duo.betaa=3: unknown key `duo.betaa`"),
        "{stderr}"
    );
    assert!(!stderr.contains("toy-cross.toml: unknown"), "{stderr}");
}

/// A latest checkpoint that cannot be read (truncated model record, optimizer state overwritten with
/// random bytes) is named and passed over: the run resumes from the one before and still ends where an
/// uninterrupted run ends.
#[test]
fn a_corrupt_latest_checkpoint_falls_back_to_the_previous_one() {
    let dir = training::tmp("corrupt-checkpoint");
    training::write_pairs(&dir.join("pairs"), 3);
    let sets =
        ["training.checkpoint_every=2", "duo.base_lr=0.01", "training.batch_size=2", "training.steps=6"];
    let whole = dir.join("whole");
    training::assert_success(&training::train(&whole, &dir.join("pairs"), &sets));
    type Damage = fn(Vec<u8>) -> Vec<u8>;
    let truncated: Damage = |bytes| bytes[..bytes.len() / 2].to_vec();
    let random: Damage = |bytes| (0..bytes.len()).map(|i| (i * 7919 % 251) as u8).collect();
    for (name, damage) in [("truncated", truncated), ("random", random)] {
        let run = dir.join(name);
        training::assert_success(&training::train(&run, &dir.join("pairs"), &sets));
        let kind = if name == "truncated" { "model" } else { "optim" };
        let file = run.join(format!("checkpoint/{kind}-3.mpk"));
        std::fs::write(&file, damage(std::fs::read(&file).unwrap())).unwrap();
        std::fs::remove_file(run.join("lora.safetensors")).unwrap();
        let output = training::resume(&run, &[]);
        training::assert_success(&output);
        let log = training::text(&output);
        assert!(
            log.contains("checkpoint 3 cannot be read") && log.contains("resuming from checkpoint 2"),
            "{log}"
        );
        let read =
            |dir: &Path| duo_core::tensor_file::TensorFile::read(&dir.join("lora.safetensors")).unwrap();
        let (a, b) = (read(&whole), read(&run));
        for key in a.names() {
            assert_eq!(a.get(key).unwrap(), b.get(key).unwrap(), "{name}: {key}");
        }
    }
}

/// Pairs are matched by file name: a safe twin saved under another name is named, not trained
/// against the wrong unsafe image.
#[test]
fn pair_folders_whose_names_differ_are_named() {
    let dir = training::tmp("mismatched-pairs");
    let pairs = dir.join("pairs");
    training::write_pairs(&pairs, 3);
    std::fs::rename(pairs.join("safe/02.png"), pairs.join("safe/07.png")).unwrap();
    let output = training::train(&dir.join("run"), &pairs, &[]);
    let log = training::text(&output);
    assert!(!output.status.success() && log.contains("unsafe/02, safe/07"), "{log}");
}
