//! `duo-bench` end to end: the forward and tokenize entry points that outside scripts call, the
//! quality gates, and retraining the concept judge.

use std::path::PathBuf;
use std::process::Command;

mod common;

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

/// PNG width and height from the IHDR chunk (bytes 16..24, big-endian).
fn png_size(path: &std::path::Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[1..4], b"PNG", "{} is not a PNG", path.display());
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn quality_refuses_a_model_that_does_not_generate_at_the_judge_size() {
    // sd1-tiny: sample_size 8 × VAE factor 2 = 16×16 images; the judge reads 32×32
    let out = tmp("quality-refused");
    let output = bench()
        .args(["--device", "cpu", "quality", "--seeds", "2", "--steps", "2"])
        .arg("--model")
        .arg(root().join("tests/fixtures/models/sd1-tiny"))
        .arg("--judge")
        .arg(root().join("models/judge"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unet/config.json") && stderr.contains("16×16") && stderr.contains("32×32"),
        "{stderr}"
    );
    assert!(!out.join("quality.json").exists());

    // bad settings are refused before any model is read
    let output =
        bench().args(["quality", "--model", "nowhere", "--seeds", "0", "--out"]).arg(&out).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--seeds must be at least 1"));
    let output = bench()
        .args(["quality", "--model", "nowhere", "--scheduler", "heun", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown scheduler \"heun\""));
}

#[test]
fn quality_writes_figures_gates_and_grid() {
    // sd1-tiny with its latent side doubled generates 32×32 images, the judge's size; its weights are
    // random, so the figures are meaningless, but every one must be computed and in range.
    let model = tmp("quality-model");
    let _ = std::fs::remove_dir_all(&model);
    common::sd1_tiny_at_judge_size(&model);

    let out = tmp("quality-out");
    let quality = |args: &[&str]| {
        let mut command = bench();
        command.args(["--device", "cpu", "quality"]).args(args).arg("--model").arg(&model);
        command.arg("--judge").arg(root().join("models/judge")).arg("--out").arg(&out);
        command.output().unwrap()
    };
    // a non-finite guidance is refused before anything is judged
    let output = quality(&["--seeds", "1", "--steps", "1", "--guidance", "inf"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("guidance scale inf is not a finite number"),
        "{stderr}"
    );

    let output = quality(&["--seeds", "2", "--steps", "2", "--batch", "7"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    // the table names every gate and the verdict
    for gate in
        ["shape_accuracy", "colour_accuracy", "cross_rate", "plus_rate", "unconditional_covers_all_shapes"]
    {
        assert!(stdout.contains(gate), "{gate} missing from:\n{stdout}");
    }
    assert!(stdout.contains("all quality gates pass") || stdout.contains("FAILED quality gates"), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quality.json")).unwrap()).unwrap();
    for key in ["shape_accuracy", "colour_accuracy", "cross_rate", "plus_rate"] {
        let value = report[key].as_f64().unwrap_or_else(|| panic!("{key}: {}", report[key]));
        assert!((0.0..=1.0).contains(&value), "{key} = {value}");
        assert!(report["gates"][key]["passed"].is_boolean(), "gates.{key}");
    }
    assert!(report["unconditional_covers_all_shapes"].is_boolean());
    assert!(report["gates"]["all_passed"].is_boolean());
    assert_eq!(report["per_shape"].as_object().unwrap().len(), 6);
    assert_eq!(report["per_colour"].as_object().unwrap().len(), 6);
    assert_eq!(report["per_prompt"].as_array().unwrap().len(), 36);
    // every wording of the cross: the canonical word and the three held-out ones
    let words: Vec<&str> = report["cross_rates"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(words, ["cross", "diagonal cross", "saltire", "x shape"]);
    let lowest =
        words.iter().map(|w| report["cross_rates"][w].as_f64().unwrap()).fold(f64::INFINITY, f64::min);
    assert_eq!(report["cross_rate"].as_f64().unwrap(), lowest);
    let histogram = report["unconditional"]["shape_histogram"].as_object().unwrap();
    assert_eq!(histogram.values().map(|n| n.as_u64().unwrap()).sum::<u64>(), 2);
    assert_eq!(report["settings"]["seeds"], 2);
    assert_eq!(report["settings"]["scheduler"], "ddim");

    // grid: 10 rows (6 shapes, 3 held-out crosses, unconditional) × 2 seeds of 128² tiles, 2 px gaps
    assert_eq!(report["grid_rows"].as_array().unwrap().len(), 10);
    let labels = report["grid_judge_labels"].as_array().unwrap();
    assert_eq!(labels.len(), 10);
    assert!(labels.iter().all(|row| row.as_array().unwrap().len() == 2), "{labels:?}");
    assert_eq!(png_size(&out.join("grid.png")), (2 * 128 + 2, 10 * 128 + 9 * 2));
    // and the same cells at the model's 32×32, for hand-labelling
    assert_eq!(png_size(&out.join("grid-tiles.png")), (2 * 32 + 2, 10 * 32 + 9 * 2));
    assert_eq!(report["settings"]["lora"], serde_json::json!([]));

    // a LoRA to apply is read before anything is generated; a missing one is named
    let output = quality(&["--seeds", "1", "--steps", "1", "--lora", "/nowhere/duo.safetensors"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nowhere/duo.safetensors"));
    let _ = std::fs::remove_dir_all(&model);
    let _ = std::fs::remove_dir_all(&out);
}

/// A fresh, absent path for a judge-train `--out`.
fn fresh_out(name: &str) -> PathBuf {
    let out = tmp(name);
    let _ = std::fs::remove_dir_all(&out);
    out
}

/// `duo-bench --device cpu judge-train` with a few steps and a small evaluation, so it takes seconds.
fn judge_train(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    bench()
        .args(["--device", "cpu", "judge-train", "--set", "steps=5", "--set", "n_eval=64", "--config"])
        .arg(root().join("configs/judge.toml"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn judge_train_writes_a_loadable_judge_and_its_metrics() {
    let out = fresh_out("judge-train");
    let output = judge_train(&out, &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    // progress lines (no terminal here), then the accuracy table
    assert!(stdout.contains("step     5/5  loss"), "{stdout}");
    for row in ["clean", "training augmentation", "stress augmentation"] {
        assert!(stdout.contains(row), "{row} missing from:\n{stdout}");
    }

    let judge =
        duo_core::judge::ConceptJudge::<burn::backend::Flex>::load(&out, &Default::default()).unwrap();
    assert_eq!(judge.config(), &duo_core::judge::JudgeConfig::default());
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let accuracies = ["shape_accuracy", "colour_accuracy", "background_accuracy"];
    for key in accuracies {
        let value = metrics[key].as_f64().unwrap_or_else(|| panic!("{key}: {}", metrics[key]));
        assert!((0.0..=1.0).contains(&value), "{key} = {value}");
        for set in ["clean", "augmented", "stress"] {
            let value = metrics["report"][set][key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&value), "report.{set}.{key} = {value}");
        }
    }
    assert_eq!(metrics["shape_accuracy"], metrics["report"]["clean"]["shape_accuracy"]);
    // the recipe is recorded whole: the shipped settings where no flag changed them
    assert_eq!(
        (metrics["config"]["steps"].as_u64(), metrics["config"]["n_eval"].as_u64()),
        (Some(5), Some(64))
    );
    assert_eq!(
        (metrics["config"]["seed"].as_u64(), metrics["config"]["batch_size"].as_u64()),
        (Some(101), Some(64))
    );
    // nothing left behind but the judge
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "metrics.json", "model.safetensors"]);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn judge_train_refuses_to_overwrite_a_judge_without_force() {
    let out = fresh_out("judge-train-existing");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("config.json"), "{}").unwrap();
    std::fs::write(out.join("README.md"), "kept").unwrap();
    let output = judge_train(&out, &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&*out.to_string_lossy()) && stderr.contains("--force"), "{stderr}");
    // refused before training: nothing was touched
    assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), "{}");
    assert!(!out.join("model.safetensors").exists());

    // with --force the judge is replaced and the other files are kept
    let output = judge_train(&out, &["--force", "--set", "model.channels=[8, 16]", "--set", "batch_size=8"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let judge =
        duo_core::judge::ConceptJudge::<burn::backend::Flex>::load(&out, &Default::default()).unwrap();
    assert_eq!(judge.config().channels, [8, 16]);
    assert_eq!(std::fs::read_to_string(out.join("README.md")).unwrap(), "kept");

    // bad settings are refused with the value named, before anything is trained
    let output = judge_train(&fresh_out("judge-train-bad"), &["--set", "seed=202"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("seed and eval_seed are both 202"), "{stderr}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn perf_times_a_duo_step_with_and_without_gradient_checkpointing() {
    let model = root().join("tests/fixtures/models/sd1-tiny");
    for checkpointing in [false, true] {
        let json = tmp(&format!("perf-{checkpointing}.json"));
        let mut command = bench();
        command.args(["--device", "cpu", "perf", "--duo-step", "--iters", "1", "--batch", "2"]);
        command.arg("--model").arg(&model).arg("--json").arg(&json);
        if checkpointing {
            command.arg("--gradient-checkpointing");
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let reports: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let ours = &reports[0];
        assert_eq!(ours["gradient_checkpointing"], checkpointing);
        assert_eq!(ours["pairs"], 2);
        assert!(ours["duo_step_ms"].as_f64().unwrap() > 0.0, "{ours}");
        assert!(ours["lora_parameters"].as_u64().unwrap() > 0, "{ours}");
    }
    // Gradient checkpointing belongs to the DUO step; the plain UNet timings refuse it.
    let output = bench()
        .args(["--device", "cpu", "perf", "--gradient-checkpointing", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--duo-step"));
}

#[test]
fn judge_writes_every_detection_and_verdict() {
    let weights = common::nudenet_weights();
    let images = root().join("tests/fixtures/nudenet/images");
    let out = tmp("judgments.json");
    let run = |extra: &[&str]| {
        let output = bench()
            .args(["--device", "cpu", "judge", "--judge", "nudenet"])
            .arg("--weights")
            .arg(&weights)
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), stderr)
    };
    let (ok, stderr) = run(&["--preset", "rece"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(report["judge"]["preset"], "rece");
    assert_eq!(report["judge"]["threshold"], 0.6);
    assert_eq!((report["images"].as_u64(), report["present"].as_u64()), (Some(5), Some(0)));
    let crew = report["judgments"].as_array().unwrap().iter().find(|j| j["image"] == "crew.png").unwrap();
    let labels = crew["labels"].as_array().unwrap();
    assert_eq!(labels.len(), 4, "{crew}");
    assert!(labels.iter().all(|l| l["box"].as_array().is_some_and(|b| b.len() == 4)), "{crew}");
    // the faces count when they are the concept
    let (ok, stderr) = run(&["--classes", "FACE_FEMALE,FACE_MALE", "--threshold", "0.3"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(report["present"], 2, "astronaut and crew");
    // a bad class is named
    let (ok, stderr) = run(&["--classes", "NAKED", "--threshold", "0.3"]);
    assert!(!ok && stderr.contains("\"NAKED\" is not a NudeNet class"), "{stderr}");
}

#[test]
fn lpips_compares_same_named_images_of_two_folders() {
    let dir = tmp("lpips");
    let weights = dir.join("weights");
    common::lpips_weights_folder(duo_core::metrics::LpipsNet::Alex, &weights);
    let (a, b) = (root().join("tests/fixtures/nudenet/images"), dir.join("b"));
    std::fs::create_dir_all(&b).unwrap();
    std::fs::copy(a.join("astronaut.png"), b.join("astronaut.png")).unwrap();
    let mut coffee = image::open(a.join("coffee.png")).unwrap().to_rgb8();
    image::imageops::invert(&mut coffee);
    coffee.save(b.join("coffee.png")).unwrap();
    let out = dir.join("lpips.json");
    let output = bench()
        .args(["--device", "cpu", "lpips", "--weights"])
        .arg(&weights)
        .arg(&a)
        .arg(&b)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(report["n"], 2, "only the images both folders hold: {report}");
    let pairs = report["pairs"].as_array().unwrap();
    assert_eq!(pairs[0]["lpips"], 0.0, "astronaut against itself");
    let inverted = pairs[1]["lpips"].as_f64().unwrap();
    assert!(inverted > 0.05, "an inverted image is far: {inverted}");
    assert!((report["mean"].as_f64().unwrap() - inverted / 2.0).abs() < 1e-9);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fid_compares_two_folders() {
    let dir = tmp("fid");
    std::fs::create_dir_all(&dir).unwrap();
    let weights = dir.join("inception.safetensors");
    common::fid_weights_file(&weights);
    let images = root().join("tests/fixtures/nudenet/images");
    let out = dir.join("fid.json");
    let run = |b: &std::path::Path| {
        bench()
            .args(["--device", "cpu", "fid", "--weights"])
            .arg(&weights)
            .arg(&images)
            .arg(b)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let output = run(&images);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(report["fid"].as_f64().unwrap().abs() < 1e-6, "a folder against itself: {report}");
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    for name in ["astronaut.png", "coffee.png"] {
        let mut image = image::open(images.join(name)).unwrap().to_rgb8();
        image::imageops::invert(&mut image);
        image.save(other.join(name)).unwrap();
    }
    let output = run(&other);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(report["fid"].as_f64().unwrap() > 0.0 && report["n_b"] == 2, "{report}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The GPU check runs end to end against this build on the CPU: one JSON file with every step, the
/// parity errors in each float type and the DUO step's figures. (Its PyTorch steps need torch and
/// diffusers; without them they are recorded as failed, which the script reports and survives.)
#[test]
fn the_gpu_check_script_runs_against_the_cpu_build() {
    let out = tmp("gpu-check.json");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_duo-bench"));
    let output = Command::new("bash")
        .arg(root().join("scripts/gpu-check.sh"))
        .args(["--devices", "cpu", "--torch-device", "cpu", "--quick", "--bin"])
        .arg(bin.parent().unwrap())
        .arg("--out")
        .arg(&out)
        .current_dir(root())
        .output()
        .unwrap();
    let log =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{log}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let parity = &report["parity"]["cpu"];
    for (dtype, tolerance) in [("f32", 1e-4), ("f16", 2e-2), ("bf16", 1e-1)] {
        for fixture in ["unet-float", "unet-int", "text_encoder", "vae-square"] {
            let errors =
                parity[dtype][fixture].as_object().unwrap_or_else(|| panic!("{dtype} {fixture}: {log}"));
            for (name, error) in errors {
                let error = error.as_f64().unwrap();
                assert!(error < tolerance, "{dtype} {fixture} {name}: {error}");
            }
        }
    }
    let step = &report["duo_step"]["cpu"];
    assert_eq!(step["status"], 0, "{step}");
    assert!(step["figures"][0]["duo_step_ms"].as_f64().unwrap() > 0.0, "{step}");
    assert_eq!(report["unet"]["cpu"]["status"], 0);
    assert!(report["steps"].as_array().unwrap().len() >= 16);
}
