//! `duo-train export` end to end on the tiny fixture model: the peft and kohya files load back to the
//! UNet output of the LoRA they came from, the merged file is a drop-in diffusers UNet giving the
//! LoRA-applied output, several LoRAs (files and run directories, with weights) add up in every
//! format, a trained run exports, and bad inputs are errors naming the culprit.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use common::{B, fixtures, load_unet_lora, relative_max_error, save_unet_lora};
use duo_core::ModelFolder;
use duo_core::lora::{LoraConfig, LoraFormat, LoraTargets, attach_lora};
use duo_core::models::UNet2DConditionModel;
use duo_core::tensor_file::{TensorFile, write_tensor_file_with_metadata};

const PEFT_METADATA: &str = "lora_adapter_metadata";

fn model() -> PathBuf {
    fixtures().join("models/sd1-tiny")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("duo-export-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn tiny_unet() -> UNet2DConditionModel<B> {
    ModelFolder::open(model()).unwrap().unet::<B>(&Default::default()).unwrap()
}

/// Deterministic inputs for the tiny UNet (4 latent channels, cross_attention_dim 32).
fn forward(unet: &UNet2DConditionModel<B>) -> TensorData {
    let device = Default::default();
    let values =
        |n: usize, phase: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * 0.37 + phase).sin()).collect() };
    let sample =
        Tensor::<B, 4>::from_data(TensorData::new(values(2 * 4 * 8 * 8, 0.1), [2, 4, 8, 8]), &device);
    let context = Tensor::<B, 3>::from_data(TensorData::new(values(2 * 7 * 32, 1.3), [2, 7, 32]), &device);
    let timesteps = Tensor::<B, 1>::from_floats([10.0, 700.0], &device);
    unet.forward(sample, timesteps, context).into_data().convert::<f32>()
}

/// A LoRA file on the tiny UNet whose up weights (zero at init) are filled with seeded non-zero
/// values, so that it changes the output.
fn make_lora(file: &Path, cfg: &LoraConfig, format: LoraFormat) {
    let unet = attach_lora(tiny_unet(), cfg, &Default::default()).unwrap();
    save_unet_lora(&unet, file, format).unwrap();
    let stored = TensorFile::read(file).unwrap();
    let tensors: Vec<(String, TensorData)> = stored
        .names()
        .enumerate()
        .map(|(k, name)| {
            let data = stored.get(name).unwrap().clone();
            let data = if name.contains("lora_B") || name.contains("lora_up") {
                let phase = (cfg.seed * 100 + k as u64) as f32;
                let values =
                    (0..data.num_elements()).map(|i| 0.05 * (i as f32 * 0.71 + phase).cos()).collect();
                TensorData::new(values, data.shape.clone())
            } else {
                data
            };
            (name.to_string(), data)
        })
        .collect();
    let named: Vec<(&str, TensorData)> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let metadata =
        stored.metadata(PEFT_METADATA).map(|v| [(PEFT_METADATA.to_string(), v.to_string())].into());
    write_tensor_file_with_metadata(file, &named, metadata.unwrap_or_default()).unwrap();
}

fn config(rank: usize, alpha: f64, targets: LoraTargets, seed: u64) -> LoraConfig {
    LoraConfig { rank, alpha, targets, seed }
}

fn export(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["--device", "cpu", "export", "--model"])
        .arg(model())
        .args(args)
        .output()
        .unwrap()
}

/// Runs an export that must succeed, and checks that it says what it wrote.
fn export_ok(args: &[&str], out: &Path) {
    let output = export(args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "export {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("wrote {}", out.display())), "{stdout}");
    println!("{}", stdout.trim());
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn assert_within(what: &str, actual: &TensorData, expected: &TensorData, tolerance: f64) {
    let err = relative_max_error(actual, expected);
    println!("{what}: relative max error {err:.3e}");
    assert!(err <= tolerance, "{what}: relative max error {err:.3e} > {tolerance:.0e}");
}

/// A drop-in check of a merged file: a copy of the model folder's UNet config beside it as
/// `unet/diffusion_pytorch_model.safetensors` loads through the ordinary, strict loader.
fn load_merged(merged: &Path, name: &str) -> UNet2DConditionModel<B> {
    let folder = tmp(name);
    std::fs::create_dir_all(folder.join("unet")).unwrap();
    std::fs::copy(model().join("unet/config.json"), folder.join("unet/config.json")).unwrap();
    std::fs::copy(merged, folder.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    ModelFolder::open(&folder).unwrap().unet::<B>(&Default::default()).unwrap()
}

#[test]
fn peft_and_kohya_exports_reproduce_the_lora() {
    let source = tmp("single.safetensors");
    make_lora(&source, &config(2, 4.0, LoraTargets::SelfAttn, 1), LoraFormat::Peft);
    let with_lora = load_unet_lora(tiny_unet(), &source, 1.0).unwrap();
    let expected = forward(&with_lora);
    let base = forward(&tiny_unet());
    assert!(relative_max_error(&expected, &base) > 1e-3, "the test LoRA should change the output");

    let peft = tmp("single-peft.safetensors");
    export_ok(&["--format", "peft", "--lora", s(&source), "--out", s(&peft)], &peft);
    let file = TensorFile::read(&peft).unwrap();
    let names: Vec<&str> = file.names().collect();
    assert_eq!(names.len(), 2 * 11 * 4, "A and B of 4 self-attention layers in 11 transformer blocks");
    assert!(
        names
            .iter()
            .all(|k| k.starts_with("unet.")
                && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))),
        "{names:?}"
    );
    let key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight";
    assert_eq!(file.get(key).unwrap().shape.as_slice(), [2, 32], "PyTorch layout [rank, d_in]");
    let meta: serde_json::Value = serde_json::from_str(file.metadata(PEFT_METADATA).unwrap()).unwrap();
    assert_eq!((meta["unet.r"].as_u64(), meta["unet.lora_alpha"].as_f64()), (Some(2), Some(4.0)));

    let kohya = tmp("single-kohya.safetensors");
    export_ok(&["--format", "kohya", "--lora", s(&source), "--out", s(&kohya)], &kohya);
    let file = TensorFile::read(&kohya).unwrap();
    assert_eq!(file.names().count(), 3 * 11 * 4, "down, up and alpha per layer");
    assert!(file.names().all(|k| k.starts_with("lora_unet_")));
    let alpha = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha";
    assert_eq!(file.get_f64_vec(alpha).unwrap(), [4.0]);

    // and back: Kohya → PEFT
    let back = tmp("single-kohya-peft.safetensors");
    export_ok(&["--format", "diffusers", "--lora", s(&kohya), "--out", s(&back)], &back);

    for (what, file) in [("peft", &peft), ("kohya", &kohya), ("kohya → peft", &back)] {
        let loaded = load_unet_lora(tiny_unet(), file, 1.0).unwrap();
        assert_within(what, &forward(&loaded), &expected, 1e-6);
    }
}

#[test]
fn merged_export_is_a_drop_in_unet_with_the_lora_folded_in() {
    let source = tmp("merge-source.safetensors");
    make_lora(&source, &config(4, 8.0, LoraTargets::SelfAttn, 2), LoraFormat::Peft);
    let expected = forward(&load_unet_lora(tiny_unet(), &source, 1.0).unwrap());

    let merged = tmp("merged.safetensors");
    export_ok(&["--format", "merged", "--lora", s(&source), "--out", s(&merged)], &merged);
    // the base file's keys, shapes and dtype; only the LoRA's layers changed
    let base = TensorFile::read(&model().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let file = TensorFile::read(&merged).unwrap();
    assert_eq!(file.names().collect::<Vec<_>>(), base.names().collect::<Vec<_>>(), "diffusers keys");
    assert_eq!(file.metadata("format"), Some("pt"), "transformers-style header");
    let mut changed = Vec::new();
    for name in base.names() {
        let (ours, theirs) = (file.get(name).unwrap(), base.get(name).unwrap());
        assert_eq!((ours.dtype, &ours.shape), (DType::F32, &theirs.shape), "{name}");
        if ours.as_bytes() != theirs.as_bytes() {
            changed.push(name);
        }
    }
    assert_eq!(changed.len(), 11 * 4, "{changed:?}");
    assert!(changed.iter().all(|k| k.contains(".attn1.to_") && k.ends_with(".weight")), "{changed:?}");

    let unet = load_merged(&merged, "merged-model");
    assert_within("merged vs LoRA", &forward(&unet), &expected, 1e-5);

    // --save-dtype f16: the same keys, half the bytes
    let half = tmp("merged-f16.safetensors");
    export_ok(&["--format", "merged", "--save-dtype", "f16", "--lora", s(&source), "--out", s(&half)], &half);
    let file = TensorFile::read(&half).unwrap();
    assert!(file.names().all(|k| file.get(k).unwrap().dtype == DType::F16));
    let unet = load_merged(&half, "merged-f16-model");
    assert_within("f16 merged vs LoRA", &forward(&unet), &expected, 1e-2);
}

/// Violence: four LoRAs, used summed. A file and a run directory, with weights, of different ranks,
/// formats and targets, export to one LoRA (or one UNet) equal to loading both.
#[test]
fn several_loras_sum_in_every_format() {
    let first = tmp("sum-first.safetensors");
    make_lora(&first, &config(2, 4.0, LoraTargets::SelfAttn, 3), LoraFormat::Peft);
    let run = tmp("sum-run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("config.toml"), "# a finished run\n").unwrap();
    make_lora(&run.join("lora.safetensors"), &config(3, 1.5, LoraTargets::AllAttn, 4), LoraFormat::Kohya);
    let both =
        load_unet_lora(load_unet_lora(tiny_unet(), &first, 0.7).unwrap(), &run.join("lora.safetensors"), 1.5);
    let expected = forward(&both.unwrap());

    let sources = [format!("{}:0.7", first.display()), format!("{}:1.5", run.display())];
    let args = |format: &str, out: &Path| {
        vec!["--format".to_string(), format.into(), "--lora".into(), sources[0].clone()]
            .into_iter()
            .chain(["--run".into(), sources[1].clone(), "--out".into(), s(out).into()])
            .collect::<Vec<String>>()
    };
    for format in ["peft", "kohya", "merged"] {
        let out = tmp(&format!("sum-{format}.safetensors"));
        let args = args(format, &out);
        export_ok(&args.iter().map(String::as_str).collect::<Vec<_>>(), &out);
        let unet = match format {
            "merged" => load_merged(&out, "sum-merged-model"),
            _ => load_unet_lora(tiny_unet(), &out, 1.0).unwrap(),
        };
        assert_within(&format!("{format} of the sum"), &forward(&unet), &expected, 1e-5);
        if format == "peft" {
            // self-attention layers hold both (rank 2 + 3), cross-attention the second only
            let file = TensorFile::read(&out).unwrap();
            let meta: serde_json::Value =
                serde_json::from_str(file.metadata(PEFT_METADATA).unwrap()).unwrap();
            let ranks = meta["unet.rank_pattern"].as_object().unwrap();
            assert!(!ranks.is_empty() && ranks.values().all(|r| r == 3 || r == 5), "{meta}");
        }
    }
}

/// The whole path: pairs, a short `duo-train train`, then `export --run`.
#[test]
fn a_trained_run_exports() {
    let pairs = tmp("trained-pairs");
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args([
            "--device",
            "cpu",
            "pairs",
            "--judge",
            "none",
            "--pairs",
            "3",
            "--steps",
            "2",
            "--concept",
            "cross",
        ])
        .arg("--model")
        .arg(model())
        .arg("--out")
        .arg(&pairs)
        .output()
        .unwrap();
    assert!(output.status.success(), "pairs: {}", String::from_utf8_lossy(&output.stderr));
    let run = tmp("trained-run");
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["--device", "cpu", "train", "--config"])
        .arg(fixtures().join("../../configs/toy-cross.toml"))
        .arg("--set")
        .arg(format!("model={}", model().display()))
        .arg("--set")
        .arg(format!("pairs.dir={}", pairs.display()))
        .args(["--set", "lora.rank=2", "--set", "training.steps=2", "--set", "training.checkpoint_every=2"])
        .args(["--set", "training.batch_size=2", "--set", "training.valid_pairs=2"])
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    assert!(output.status.success(), "train: {}", String::from_utf8_lossy(&output.stderr));
    let lora = run.join("lora.safetensors");
    let expected = forward(&load_unet_lora(tiny_unet(), &lora, 1.0).unwrap());
    assert!(relative_max_error(&expected, &forward(&tiny_unet())) > 0.0, "training changed the LoRA");

    let kohya = tmp("trained-kohya.safetensors");
    export_ok(&["--format", "kohya", "--run", s(&run), "--out", s(&kohya)], &kohya);
    assert_within(
        "trained run → kohya",
        &forward(&load_unet_lora(tiny_unet(), &kohya, 1.0).unwrap()),
        &expected,
        1e-6,
    );
}

#[test]
fn export_errors_name_the_problem() {
    let stderr = |output: Output| {
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let out = tmp("never-written.safetensors");
    let good = tmp("errors-good.safetensors");
    make_lora(&good, &config(2, 2.0, LoraTargets::SelfAttn, 5), LoraFormat::Peft);

    let err = stderr(export(&["--format", "lycoris", "--lora", s(&good), "--out", s(&out)]));
    assert!(err.contains("lycoris") && err.contains("merged"), "{err}");
    let err =
        stderr(export(&["--format", "kohya", "--save-dtype", "f16", "--lora", s(&good), "--out", s(&out)]));
    assert!(err.contains("--save-dtype applies to --format merged and single-file only"), "{err}");
    let err =
        stderr(export(&["--format", "merged", "--save-dtype", "f8", "--lora", s(&good), "--out", s(&out)]));
    assert!(err.contains("f8"), "{err}");

    let missing = tmp("missing.safetensors");
    let err = stderr(export(&["--format", "peft", "--lora", s(&missing), "--out", s(&out)]));
    assert!(err.contains(s(&missing)) && err.contains("not found"), "{err}");

    let err =
        stderr(export(&["--format", "peft", "--lora", &format!("{}:nan", good.display()), "--out", s(&out)]));
    assert!(err.contains("not a finite number"), "{err}");

    // a directory that is not a run, and a run that has not finished
    let not_run = tmp("not-a-run");
    std::fs::create_dir_all(&not_run).unwrap();
    let err = stderr(export(&["--format", "merged", "--run", s(&not_run), "--out", s(&out)]));
    assert!(err.contains(s(&not_run)) && err.contains("config.toml"), "{err}");
    std::fs::write(not_run.join("config.toml"), "").unwrap();
    let err = stderr(export(&["--format", "merged", "--run", s(&not_run), "--out", s(&out)]));
    assert!(err.contains("lora.safetensors") && err.contains("--resume"), "{err}");

    // a LoRA made for another UNet: a layer the tiny UNet does not have
    let stored = TensorFile::read(&good).unwrap();
    let renamed: Vec<(String, TensorData)> = stored
        .names()
        .map(|k| (k.replace("up_blocks.1.", "up_blocks.7."), stored.get(k).unwrap().clone()))
        .collect();
    let misfit = tmp("errors-misfit.safetensors");
    let named: Vec<(&str, TensorData)> = renamed.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write_tensor_file_with_metadata(&misfit, &named, Default::default()).unwrap();
    for format in ["peft", "merged"] {
        let err = stderr(export(&["--format", format, "--lora", s(&misfit), "--out", s(&out)]));
        assert!(
            err.contains(s(&misfit))
                && err.contains("up_blocks.7.")
                && err.contains("no linear or convolution layer"),
            "{err}"
        );
    }
    assert!(!out.exists(), "a failed export writes nothing");
}

/// `export --format single-file` folds a LoRA with UNet and text-encoder entries into the whole
/// model, written in the LDM layout; `sample --model FILE --config DIR` reads it back and draws what
/// diffusers draws with that LoRA loaded at 0.8 (`tests/fixtures/lora`, within 1e-4 of its float64
/// image).
#[test]
fn single_file_export_carries_the_lora_into_the_checkpoint() {
    let fixtures = fixtures();
    let lora = fixtures.join("lora/sd1-tiny/peft-meta.safetensors");
    let out = tmp("single-file.safetensors");
    export_ok(
        &["--format", "single-file", "--lora", &format!("{}:0.8", lora.display()), "--out", s(&out)],
        &out,
    );

    let case = TensorFile::read(&fixtures.join("lora/sd1-tiny-peft-meta.safetensors")).unwrap();
    let latents = tmp("single-file-latents.safetensors");
    duo_core::tensor_file::write_tensor_file(&latents, &[("latents", case.get("latents").unwrap().clone())])
        .unwrap();
    let (png, image) = (tmp("single-file.png"), tmp("single-file-image.safetensors"));
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["--device", "cpu", "sample", "--scheduler", "ddim", "--steps", "5", "--guidance", "7.5"])
        .args(["--prompt", "a photo of a cat", "--prompt", "an astronaut riding a horse on the moon"])
        .args(["--negative-prompt", "blurry, low quality", "--negative-prompt", "ugly"])
        .arg("--model")
        .arg(&out)
        .arg("--config")
        .arg(model())
        .arg("--latents")
        .arg(&latents)
        .arg("--out")
        .arg(&png)
        .arg("--save-tensor")
        .arg(&image)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let ours = TensorFile::read(&image).unwrap().get("image").unwrap().clone();
    let err = relative_max_error(&ours, case.get("image_f64").unwrap());
    println!("single file with the LoRA merged: {err:.2e} from diffusers' image with the LoRA loaded");
    assert!(err <= 1e-4, "relative max error {err:.3e}");
}
