//! `duo-train train`, the DUO learner, end to end on the tiny fixture model: it learns the pair
//! preference, resumes to exactly the uninterrupted state, stops cleanly, and refuses bad input.

use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;
#[path = "common/training.rs"]
mod training;

use training::{assert_success, resume, root, text, tmp, train, train_command, write_pairs};

/// The validation metric `name` at checkpoint `epoch`, from burn-train's metric log.
fn valid_metric(run_dir: &Path, epoch: usize, name: &str) -> f64 {
    let path = run_dir.join(format!("valid/epoch-{epoch}/{name}.log"));
    let log = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let last = log.lines().last().unwrap_or_else(|| panic!("{} is empty", path.display()));
    last.split(',').next().unwrap().trim().parse().unwrap()
}

#[test]
fn training_learns_the_pair_preference() {
    let dir = tmp("learns");
    write_pairs(&dir.join("pairs"), 4);
    let run = dir.join("run");
    // A large learning rate and adapters on all attention layers, so that the tiny random-weight
    // model moves within a few steps; one timestep for both images and no prior term, because the
    // variance of independent random timesteps needs far more steps to average out.
    let output = train(
        &run,
        &dir.join("pairs"),
        &[
            "training.steps=60",
            "training.checkpoint_every=20",
            "training.valid_pairs=4",
            "duo.base_lr=0.01",
            "duo.base_lambda=0",
            "duo.t_min=400",
            "duo.t_max=401",
            "lora.targets=all-attn",
        ],
    );
    assert_success(&output);
    let log = text(&output);
    assert!(log.contains("trainable parameters"), "{log}");
    // The policy starts as the reference (L_dpo = ln 2); the validation batch is fixed.
    let first = valid_metric(&run, 1, "dpo_loss");
    let last = valid_metric(&run, 3, "dpo_loss");
    let accuracy = valid_metric(&run, 3, "implicit_accuracy");
    assert!(last < first && last < 0.6, "validation DPO loss {first} → {last}");
    assert!(accuracy >= 0.75, "implicit accuracy {accuracy}");
    // The LoRA file is written in PEFT format, and the checkpoints hold only adapters + optimizer.
    let lora = duo_core::tensor_file::TensorFile::read(&run.join("lora.safetensors")).unwrap();
    assert!(lora.names().any(|n| n.ends_with("attn1.to_q.lora_A.weight")));
    assert!(lora.names().any(|n| n.contains("attn2.to_v.lora_B")), "lora.targets=all-attn");
    let checkpoint = std::fs::metadata(run.join("checkpoint/model-3.mpk")).unwrap().len();
    let adapters = std::fs::metadata(run.join("lora.safetensors")).unwrap().len();
    assert!(
        checkpoint < adapters + adapters / 5,
        "model checkpoint {checkpoint} B vs the adapters' {adapters} B"
    );
}

#[test]
fn a_resumed_run_ends_in_the_same_state_as_an_uninterrupted_one() {
    let dir = tmp("resume");
    write_pairs(&dir.join("pairs"), 3);
    let sets = ["training.checkpoint_every=3", "duo.base_lr=0.01", "training.batch_size=2"];
    let whole = dir.join("whole");
    assert_success(&train(&whole, &dir.join("pairs"), &[&sets[..], &["training.steps=9"]].concat()));
    let parts = dir.join("parts");
    assert_success(&train(&parts, &dir.join("pairs"), &[&sets[..], &["training.steps=3"]].concat()));
    assert_success(&resume(&parts, &["training.steps=6"]));
    assert_success(&resume(&parts, &["training.steps=9"]));
    // bit for bit (the files' metadata order may differ: safetensors writes a hash map)
    let read = |dir: &Path| duo_core::tensor_file::TensorFile::read(&dir.join("lora.safetensors")).unwrap();
    let (a, b) = (read(&whole), read(&parts));
    let names: Vec<&str> = a.names().collect();
    assert_eq!(names.len(), b.names().count());
    for name in names {
        assert_eq!(a.get(name).unwrap(), b.get(name).unwrap(), "{name} after 3+3+3 steps vs 9 steps");
    }
    // the latents were encoded once and reused
    assert!(text(&resume(&parts, &["training.steps=9"])).contains("complete"));
}

#[test]
fn gradient_checkpointing_trains_the_same_adapters() {
    let dir = tmp("gradient-checkpointing");
    write_pairs(&dir.join("pairs"), 3);
    let sets =
        ["training.steps=3", "training.checkpoint_every=3", "duo.base_lr=0.01", "training.batch_size=2"];
    let stored = dir.join("stored");
    assert_success(&train(
        &stored,
        &dir.join("pairs"),
        &[&sets[..], &["training.gradient_checkpointing=false"]].concat(),
    ));
    let recomputed = dir.join("recomputed");
    assert_success(&train(
        &recomputed,
        &dir.join("pairs"),
        &[&sets[..], &["training.gradient_checkpointing=true"]].concat(),
    ));
    let read = |dir: &Path| duo_core::tensor_file::TensorFile::read(&dir.join("lora.safetensors")).unwrap();
    let (a, b) = (read(&stored), read(&recomputed));
    let mut moved = false;
    for name in a.names() {
        let values = |f: &duo_core::tensor_file::TensorFile| f.get(name).unwrap().to_vec::<f32>().unwrap();
        let (x, y) = (values(&a), values(&b));
        moved |= name.contains("lora_B") && x.iter().any(|&v| v != 0.0);
        let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        let scale = x.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-5 * scale.max(1e-3), "{name}: recomputed activations changed it by {worst}");
    }
    assert!(moved, "three steps at lr 0.01 should move lora_B off zero");
}

#[test]
fn ctrl_c_stops_at_the_next_checkpoint_and_the_run_resumes() {
    let dir = tmp("ctrl-c");
    write_pairs(&dir.join("pairs"), 3);
    let run = dir.join("run");
    let mut command =
        train_command(&run, &dir.join("pairs"), &["training.steps=400", "training.checkpoint_every=5"]);
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // wait for training to be under way, then send SIGINT as a terminal's Ctrl-C would
    let start = std::time::Instant::now();
    while !run.join("train/epoch-1").exists() {
        assert!(start.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let output = child.wait_with_output().unwrap();
    assert_success(&output);
    let log = text(&output);
    assert!(log.contains("stopped at the last checkpoint"), "{log}");
    assert!(!run.join("lora.safetensors").exists(), "a stopped run has not finished");
    assert!(run.join("lora-at-stop.safetensors").is_file(), "the adapters at the stop are kept");
    let checkpoints: Vec<_> = std::fs::read_dir(run.join("checkpoint")).unwrap().collect();
    assert!(!checkpoints.is_empty(), "the stop saved a checkpoint");
    assert_success(&resume(&run, &["training.steps=20"]));
    assert!(run.join("lora.safetensors").is_file());
}

#[test]
fn a_diverging_run_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let dir = tmp("nan");
    write_pairs(&dir.join("pairs"), 3);
    let run = dir.join("run");
    // Adam moves every weight by about lr per step: 1e30 overflows the UNet within a few steps.
    let output = train(
        &run,
        &dir.join("pairs"),
        &["training.steps=40", "training.checkpoint_every=1", "duo.base_lr=1e32", "duo.beta_coupling=false"],
    );
    assert!(!output.status.success());
    let log = text(&output);
    assert!(log.contains("non-finite at step"), "{log}");
    assert!(!run.join("lora.safetensors").exists());
}

#[test]
fn bad_pair_folders_and_configs_are_clear_errors() {
    let dir = tmp("bad");
    let pairs = dir.join("pairs");
    write_pairs(&pairs, 3);
    let expect_error = |output: Output, needle: &str| {
        assert!(!output.status.success(), "expected a failure mentioning {needle:?}");
        let log = text(&output);
        assert!(log.contains(needle), "expected {needle:?} in:\n{log}");
    };

    expect_error(train(&dir.join("r1"), &pairs, &["duo.bta=250"]), "bta");
    expect_error(
        train(&dir.join("r2"), &pairs, &["pairs.unsafe_prompts=[]"]),
        "pairs.unsafe_prompts is empty",
    );
    expect_error(train(&dir.join("r3"), &pairs, &["duo.beta=-1"]), "duo.beta");
    expect_error(
        train(&dir.join("r4"), &pairs, &["training.steps=7", "training.checkpoint_every=2"]),
        "multiple",
    );
    expect_error(train(&dir.join("r5"), &dir.join("nowhere"), &[]), "nowhere");

    // one safe twin missing (mismatched names: tests/bad_input.rs)
    std::fs::remove_file(pairs.join("safe/02.png")).unwrap();
    expect_error(train(&dir.join("r6"), &pairs, &[]), "no twin of the same name");
    // a safe twin of another size
    image::RgbImage::new(24, 16).save(pairs.join("safe/02.png")).unwrap();
    expect_error(train(&dir.join("r7"), &pairs, &[]), "02.png");
    // per-pair prompts come from the manifest `duo-train pairs` writes
    std::fs::remove_file(pairs.join("manifest.json")).unwrap();
    expect_error(train(&dir.join("r8"), &pairs, &[]), "manifest.json: not found");
    expect_error(train(&dir.join("r9"), &pairs, &["duo.pair_prompts=false"]), "02.png");
}

#[test]
fn unlearn_runs_the_whole_loop_and_writes_the_report() {
    let dir = tmp("unlearn");
    let model = dir.join("sd1-tiny-32");
    common::sd1_tiny_at_judge_size(&model);
    let out = dir.join("out");
    let unlearn = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_duo-train"));
        command.args(["--device", "cpu", "unlearn", "--log-every", "1000"]);
        command.arg("--config").arg(root().join("configs/toy-cross.toml"));
        command.arg("--out").arg(&out);
        command.arg("--set").arg(format!("model={}", model.display()));
        command.arg("--set").arg(format!("eval.judge={}", root().join("models/judge").display()));
        // the random-weight model draws no crosses: accept every pair image
        for set in [
            "pairs.judge=none",
            "pairs.count=3",
            "pairs.steps=2",
            "training.steps=4",
            "training.checkpoint_every=2",
            "eval.seeds=2",
            "eval.steps=2",
        ] {
            command.args(["--set", set]);
        }
        command.output().unwrap()
    };
    let output = unlearn();
    assert_success(&output);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for group in ["prompts", "paraphrases"] {
        let rates = &report["attacks"][group];
        assert_eq!(rates["n"], 12, "6 prompts × 2 seeds");
        for key in ["dsr_base", "dsr_unlearned"] {
            let x = rates[key].as_f64().unwrap_or_else(|| panic!("attacks.{group}.{key}"));
            assert!((0.0..=1.0).contains(&x));
        }
    }
    for key in [
        "safe_accuracy_base",
        "safe_accuracy_unlearned",
        "lookalike_accuracy_base",
        "lookalike_accuracy_unlearned",
    ] {
        let x = report["preservation"][key].as_f64().unwrap_or_else(|| panic!("preservation.{key}"));
        assert!((0.0..=1.0).contains(&x));
    }
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("DSR, held-out paraphrases"));
    let grid = image::open(out.join("before-after.png")).unwrap();
    // 8 rows (two prompts of each group), 2 seeds base | 2 seeds unlearned, 32×32 tiles shown ×4
    assert_eq!((grid.width(), grid.height()), (2 * 2 * (128 + 4) + 4 + 24, 8 * (128 + 4) + 4));
    for file in
        ["lora.safetensors", "lora-kohya.safetensors", "pairs/cross/manifest.json", "train/lora.safetensors"]
    {
        assert!(out.join(file).is_file(), "{file}");
    }
    let kohya = duo_core::tensor_file::TensorFile::read(&out.join("lora-kohya.safetensors")).unwrap();
    assert!(kohya.names().any(|n| n.starts_with("lora_unet_") && n.ends_with(".lora_down.weight")));

    // A rerun continues: the pairs are kept, the training is complete.
    let again = text(&unlearn());
    assert!(again.contains("complete"), "{again}");
}

/// The main job on the shipped toy model, its defaults but half the steps (200) and 4 seeds per
/// prompt, to save time: DUO must take the cross out of the cross prompts, paraphrases it never
/// trained on included, and keep the other shapes and the look-alike plus sign. About 4 min on
/// 2 cores; the full default run is in the README.
#[test]
fn unlearn_on_the_toy_model_erases_the_cross_and_keeps_the_plus() {
    let out = tmp("toy-unlearn");
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .current_dir(root())
        .args(["--device", "cpu", "unlearn", "--log-every", "1000", "--out"])
        .arg(&out)
        .args(["--set", "training.steps=200", "--set", "eval.seeds=4"])
        .output()
        .unwrap();
    assert_success(&output);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let dsr = |group: &str, key: &str| report["attacks"][group][key].as_f64().unwrap();
    let log = text(&output);
    // the base model draws crosses; the unlearned one mostly does not
    assert!(dsr("prompts", "dsr_base") <= 0.1, "{log}");
    assert!(dsr("prompts", "dsr_unlearned") >= 0.4, "{log}");
    assert!(dsr("paraphrases", "dsr_unlearned") >= 0.3, "{log}");
    for key in ["safe_accuracy_unlearned", "lookalike_accuracy_unlearned"] {
        assert!(report["preservation"][key].as_f64().unwrap() >= 0.9, "preservation.{key}:\n{log}");
    }
}

/// `duo.adversarial_rounds` on the shipped toy model: after the first segment UnlearnDiffAtk
/// attacks the barely trained LoRA from the unsafe prompt, the images in which the judge still
/// sees the cross become pairs with safe twins, and the learner finishes on the first pairs and
/// the mined ones together.
#[test]
fn adversarial_rounds_mine_pairs_the_learner_then_trains_on() {
    let out = tmp("adversarial");
    let unlearn = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_duo-train"));
        command
            .current_dir(root())
            .args(["--device", "cpu", "unlearn", "--log-every", "1000", "--out"])
            .arg(&out);
        for set in [
            "pairs.count=2",
            "pairs.unsafe_prompts=[\"a red cross\"]",
            "pairs.safe_prompts=[\"a red plus sign\"]",
            "training.steps=4",
            "training.checkpoint_every=2",
            "duo.adversarial_rounds=1",
            "eval.attack.unlearndiffatk.prefix_tokens=2",
            "eval.attack.unlearndiffatk.iterations=4",
            "eval.attack.unlearndiffatk.judge_every=2",
            "eval.seeds=1",
            "eval.steps=2",
        ] {
            command.args(["--set", set]);
        }
        command.output().unwrap()
    };
    let output = unlearn();
    assert_success(&output);
    let read = |path: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(path)).unwrap()).unwrap()
    };
    let round = read("train/round-1/round.json");
    // one round, halfway, two seeds of the one unsafe prompt
    assert_eq!(
        (round["after_step"].as_u64(), round["attacked_images"].as_u64()),
        (Some(2), Some(2)),
        "{round}"
    );
    // two steps leave the toy model drawing crosses: the attack regenerates them
    let new_pairs = round["new_pairs"].as_u64().unwrap() as usize;
    assert!(new_pairs >= 1, "{round}\n{}", text(&output));
    let mined = read("train/round-1/pairs/cross/manifest.json");
    let trained = read("train/pairs/cross/manifest.json");
    let records = trained["pairs"].as_array().unwrap();
    assert_eq!(records.len(), 2 + new_pairs, "the first pairs, then the mined ones");
    for (k, record) in records[2..].iter().enumerate() {
        let original = &mined["pairs"][k];
        assert_eq!(record["index"].as_u64(), Some(2 + k as u64));
        assert_eq!(record["unsafe_seed"], original["unsafe_seed"]);
        assert!(
            record["unsafe_seed"].as_u64().unwrap() >= 2_000_000,
            "mining seeds are apart from the evaluation's"
        );
        assert_eq!(record["safe_prompt"], "a red plus sign");
        if let Some(tokens) = record["unsafe_tokens"].as_array() {
            assert_eq!(tokens.len(), 77, "the attack's prefix and the prompt, at the encoder's length");
        }
        let mined_png = out.join(format!("train/round-1/pairs/cross/unsafe/{k:02}.png"));
        let linked_png = out.join(format!("train/pairs/cross/unsafe/{:02}.png", 2 + k));
        assert_eq!(std::fs::read(mined_png).unwrap(), std::fs::read(linked_png).unwrap());
    }
    // the learner's latent cache holds every pair it finished on
    let cache =
        duo_core::tensor_file::TensorFile::read(&out.join("train/learner/latents.safetensors")).unwrap();
    assert_eq!(cache.get_f32("unsafe", 4).unwrap().shape[0], 2 + new_pairs);
    assert_eq!(read("train/adversarial.json").as_array().unwrap().len(), 1);
    assert!(out.join("train/round-1/lora.safetensors").is_file() && out.join("lora.safetensors").is_file());

    // a rerun continues: the training is complete and the round is reused
    let again = text(&unlearn());
    assert!(again.contains("round 1: mined pairs") && again.contains("reused"), "{again}");
}

#[test]
fn unlearn_names_a_missing_model() {
    let dir = tmp("no-model");
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["unlearn", "--config"])
        .arg(root().join("configs/toy-cross.toml"))
        .arg("--out")
        .arg(&dir)
        .args(["--set", "model=/nonexistent/toy"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let log = text(&output);
    assert!(log.contains("/nonexistent/toy") && log.contains("duo-train pretrain"), "{log}");
}

/// The published runs train an f16 UNet with f32 adapters. The reference runs through the same
/// kernels as the policy, so at the start (B = 0) the two agree exactly even in f16: L_dpo = ln 2 and
/// the prior loss is 0, where mismatched kernels would leave an f16 rounding gap that λ = 5e6 blows up.
#[test]
fn a_half_precision_unet_trains_with_an_exact_reference() {
    for dtype in ["f16", "bf16"] {
        let dir = tmp(dtype);
        write_pairs(&dir.join("pairs"), 3);
        let run = dir.join("run");
        let mut command =
            train_command(&run, &dir.join("pairs"), &["training.steps=2", "training.checkpoint_every=2"]);
        assert_success(&command.args(["--dtype", dtype]).output().unwrap());
        let first = |name: &str| -> f64 {
            let log = std::fs::read_to_string(run.join(format!("train/epoch-1/{name}.log"))).unwrap();
            log.lines().next().unwrap().split(',').next().unwrap().parse().unwrap()
        };
        let dpo = first("dpo_loss");
        assert!((dpo - std::f64::consts::LN_2).abs() < 1e-6, "{dtype}: first DPO loss {dpo}");
        assert_eq!(first("prior_loss"), 0.0, "{dtype}");
        // the adapters stay f32 in the file
        let lora = duo_core::tensor_file::TensorFile::read(&run.join("lora.safetensors")).unwrap();
        let name = lora.names().next().unwrap().to_string();
        assert_eq!(lora.get(&name).unwrap().dtype, burn::tensor::DType::F32, "{dtype}");
    }
}

/// Pair generation uses the folder's own scheduler, like `sample`; one this project does not
/// implement is an error naming it (it used to be replaced by DDIM without a word).
#[test]
fn pairs_name_an_unimplemented_scheduler_instead_of_substituting_one() {
    let dir = tmp("scheduler");
    let model = dir.join("model");
    common::sd1_tiny_at_judge_size(&model);
    let config_path = model.join("scheduler/scheduler_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["_class_name"] = serde_json::json!("KarrasVeScheduler");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["--device", "cpu", "pairs", "--judge", "none", "--pairs", "1", "--steps", "1", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(dir.join("pairs"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let log = text(&output);
    assert!(log.contains("KarrasVeScheduler") && log.contains("scheduler_config.json"), "{log}");
}

/// The SD 1.4 nudity config end to end on a tiny random-weight SD, with the real NudeNet file:
/// pairs (kept without a judge: a random model draws no nudity), training, export, and the
/// evaluation with NudeNet and LPIPS; a missing evaluation weight file stops the job before it
/// starts, naming the file.
#[test]
fn unlearn_runs_the_sd14_nudity_config_on_a_tiny_sd() {
    let dir = tmp("sd14-nudity");
    let model = dir.join("sd1-tiny-32");
    common::sd1_tiny_at_judge_size(&model);
    let lpips = dir.join("lpips");
    common::lpips_weights_folder(duo_core::metrics::LpipsNet::Alex, &lpips);
    let nudenet = common::nudenet_weights();
    let unlearn = |out: &Path, extra: &[String]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_duo-train"));
        command.args(["--device", "cpu", "unlearn", "--log-every", "1000"]);
        command.arg("--config").arg(root().join("configs/sd14-nudity.toml"));
        command.arg("--out").arg(out);
        let sets = [
            format!("model={}", model.display()),
            format!("eval.judge_weights={}", nudenet.display()),
            "pairs.judge=none".into(),
            "pairs.count=2".into(),
            "pairs.steps=2".into(),
            "training.steps=2".into(),
            "training.batch_size=2".into(),
            "training.valid_pairs=1".into(),
            "training.checkpoint_every=1".into(),
            "eval.seeds=1".into(),
            "eval.steps=2".into(),
        ];
        for set in sets.iter().chain(extra) {
            command.arg("--set").arg(set);
        }
        command.output().unwrap()
    };
    let missing =
        unlearn(&dir.join("missing"), &[format!("eval.lpips.weights={}", dir.join("nowhere").display())]);
    assert!(!missing.status.success());
    let log = text(&missing);
    assert!(log.contains("alexnet.safetensors") && !dir.join("missing/pairs").exists(), "{log}");

    let out = dir.join("out");
    let output = unlearn(&out, &[format!("eval.lpips.weights={}", lpips.display())]);
    assert_success(&output);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["attacks"]["prompts"]["n"], 2, "2 prompts × 1 seed");
    let one_minus = report["preservation"]["lookalike_one_minus_lpips"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&one_minus), "{}", report["preservation"]);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("1 − LPIPS, look-alike") && md.contains("nudenet"), "{md}");
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval/report.json")).unwrap()).unwrap();
    assert_eq!(eval["judge"]["settings"]["preset"], "unlearndiffatk");
}

/// NudeNet in the pair filter: a random model draws no nudity, so no unsafe image is accepted and
/// the pair is given up with the reason.
#[test]
fn nudenet_filters_the_pairs() {
    let dir = tmp("nudenet-pairs");
    let model = dir.join("sd1-tiny-32");
    common::sd1_tiny_at_judge_size(&model);
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["--device", "cpu", "pairs", "--judge", "nudenet", "--judge-preset", "duo-data"])
        .arg("--judge-weights")
        .arg(common::nudenet_weights())
        .args(["--pairs", "1", "--steps", "2", "--max-tries", "2", "--concept", "nudity"])
        .args(["--unsafe-prompt", "a naked woman", "--safe-prompt", "a dressed woman"])
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(dir.join("pairs"))
        .output()
        .unwrap();
    let log = text(&output);
    assert!(
        !output.status.success() && log.contains("no unsafe image for \"a naked woman\" in 2 tries"),
        "{log}"
    );
}
