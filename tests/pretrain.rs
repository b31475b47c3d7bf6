//! `duo-train pretrain` end to end at toy-of-toy sizes: training lowers the loss, the exported folder
//! loads and samples through our pipeline, `--resume` continues the step count, Ctrl-C stops on a
//! checkpoint, unknown keys are errors; and the exporter writes diffusers' keys and layouts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use burn::backend::Flex;
use burn::tensor::DType;
use duo_core::ModelFolder;
use duo_core::pipelines::{Generation, NoiseSource, StableDiffusion};
use duo_core::schedulers::{Scheduler, SchedulerKind};
use duo_core::weights::{UNET_SAVE_REMAPS, safetensors_bytes};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("duo-pretrain-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Sizes small enough for seconds per run; the keys are the shipped config's.
const TINY: &[&str] = &[
    "vae.block_out_channels=[8, 8, 8]",
    "vae.norm_num_groups=4",
    "text_encoder.hidden_size=8",
    "text_encoder.intermediate_size=16",
    "text_encoder.num_hidden_layers=1",
    "text_encoder.num_attention_heads=2",
    "unet.block_out_channels=[8, 16]",
    "unet.attention_head_dim=2",
    "unet.norm_num_groups=4",
    "vae_training.batch_size=4",
    "vae_training.warmup=0",
    "vae_training.lr=1e-2",
    "vae_training.scaling_images=8",
    "diffusion_training.batch_size=4",
    "diffusion_training.warmup=0",
    "diffusion_training.lr=1e-2",
    "diffusion_training.valid_batches=1",
    "samples.seeds=1",
    "samples.steps=2",
];

fn pretrain(run_dir: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_duo-train"));
    command.current_dir(root()).args(["--device", "cpu", "pretrain", "--log-every", "1"]);
    command.arg("--run-dir").arg(run_dir).arg("--out").arg(out);
    for set in TINY.iter().chain(extra) {
        command.args(["--set", set]);
    }
    command
}

fn resume(run_dir: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_duo-train"));
    command.current_dir(root()).args(["--device", "cpu", "pretrain", "--log-every", "1", "--resume"]);
    command.arg(run_dir);
    for set in extra {
        command.args(["--set", set]);
    }
    command
}

fn run_ok(mut command: Command) -> String {
    let Output { status, stdout, stderr } = command.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    assert!(status.success(), "duo-train failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    stdout.into_owned()
}

/// The mean of a metric log `<stage>/<split>/epoch-<epoch>/<name>.log` (lines "value,count"; burn
/// writes spaces in metric names as underscores).
fn logged_mean(run_dir: &Path, stage: &str, split: &str, epoch: usize, name: &str) -> f64 {
    let file = format!("{}.log", name.replace(' ', "_"));
    let path = run_dir.join(stage).join(split).join(format!("epoch-{epoch}")).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let values: Vec<f64> = text.lines().map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert!(!values.is_empty(), "{} is empty", path.display());
    values.iter().sum::<f64>() / values.len() as f64
}

#[test]
fn a_tiny_run_lowers_the_loss_and_exports_a_loadable_folder() {
    let dir = scratch("full");
    let (run_dir, out) = (dir.join("run"), dir.join("toy"));
    let steps = [
        // the tiny VAE needs a few more steps than the diffusion stage to move off the mean image
        "vae_training.steps=24",
        "vae_training.checkpoint_every=8",
        "diffusion_training.steps=12",
        "diffusion_training.checkpoint_every=4",
    ];
    let stdout = run_ok(pretrain(&run_dir, &out, &steps));
    assert!(stdout.contains("[diffusion] step 12/12"), "{stdout}");

    // The fixed validation batches score lower after training than after the first interval.
    for (stage, name) in [("vae", "loss"), ("diffusion", "loss"), ("diffusion", "ema loss")] {
        let (first, last) =
            (logged_mean(&run_dir, stage, "valid", 1, name), logged_mean(&run_dir, stage, "valid", 3, name));
        assert!(last < first, "{stage} valid {name}: {first} → {last}");
    }
    let effective = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    assert!(effective.contains("hidden_size = 8"), "{effective}");
    assert!(run_dir.join("samples.png").is_file());

    // The folder: diffusers' layout, the measured scaling factor, f16 weights that load as f32.
    for file in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "vae/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        assert!(out.join(file).is_file(), "missing {file}");
    }
    let vae_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vae/config.json")).unwrap()).unwrap();
    let scaling: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("vae/scaling_factor.json")).unwrap())
            .unwrap();
    assert_eq!(vae_config["scaling_factor"], scaling["scaling_factor"]);
    assert_ne!(vae_config["scaling_factor"], serde_json::json!(0.18215));

    let device = Default::default();
    let sd = StableDiffusion::<Flex>::load(&ModelFolder::open(&out).unwrap(), &device).unwrap();
    assert_eq!(sd.unet.conv_in.weight.val().dtype(), DType::F32);
    let scheduler = Scheduler::new(SchedulerKind::Ddim, &sd.scheduler_config, 3).unwrap();
    let generation =
        Generation { prompts: vec!["a red cross".into()], negative_prompts: Vec::new(), guidance_scale: 7.5 };
    let mut noise = NoiseSource::new(0);
    let latents = noise.normal::<Flex, 4>([1, 4, 8, 8], &device);
    let image = sd.txt2img(&generation, &scheduler, latents, &mut noise, |_, _| {}).unwrap();
    assert_eq!(image.dims(), [1, 3, 32, 32]);
    let values = image.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    assert!(values.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));

    // --resume with more steps continues the count from the last checkpoint, and re-exports.
    let stdout = run_ok(resume(&run_dir, &["diffusion_training.steps=16"]));
    assert!(stdout.contains("[vae] complete: loading checkpoint 3 (step 24)"), "{stdout}");
    assert!(stdout.contains("[diffusion] resuming after step 12"), "{stdout}");
    assert!(
        stdout.contains("[diffusion] step 13/16") && stdout.contains("[diffusion] step 16/16"),
        "{stdout}"
    );
    assert!(!stdout.contains("[diffusion] step 1/"), "{stdout}");
    assert!(run_dir.join("diffusion/train/epoch-4").is_dir());
    let resumed = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    assert!(resumed.contains("steps = 16"), "the effective config records the override");

    // --snapshot exports the latest diffusion checkpoint's EMA without training.
    let snapshot = dir.join("snapshot");
    let mut command = resume(&run_dir, &[]);
    command.arg("--snapshot").arg("--out").arg(&snapshot);
    let stdout = run_ok(command);
    assert!(stdout.contains("[diffusion] snapshot of checkpoint 4 (step 16)"), "{stdout}");
    assert!(!stdout.contains("[diffusion] step"), "no training: {stdout}");
    assert!(run_dir.join("samples-snapshot.png").is_file());
    let exported = |dir: &Path| std::fs::read(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(exported(&snapshot) == exported(&out), "the finished run's EMA, as its own export");

    // Resuming cannot change what the checkpoints fix.
    let output = resume(&run_dir, &["unet.layers_per_block=2"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot change `unet`"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ctrl_c_stops_on_a_checkpoint_and_resume_finishes() {
    let dir = scratch("interrupt");
    let (run_dir, out) = (dir.join("run"), dir.join("toy"));
    let steps = [
        "vae_training.steps=2",
        "vae_training.checkpoint_every=2",
        // Far more than the test waits for: only the signal ends this stage.
        "diffusion_training.steps=10000",
        "diffusion_training.checkpoint_every=1",
    ];
    let child =
        pretrain(&run_dir, &out, &steps).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let first = run_dir.join("diffusion/checkpoint/model-1.mpk");
    let start = Instant::now();
    while !first.is_file() {
        assert!(start.elapsed() < Duration::from_secs(120), "no diffusion checkpoint after 2 minutes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("stopped at the last checkpoint"), "{stdout}");
    assert!(!out.exists(), "a stopped run exports nothing");

    // The run stopped right after a checkpoint: resuming to one more step finishes and exports.
    let last = (1..10000)
        .take_while(|k| run_dir.join(format!("diffusion/train/epoch-{k}")).is_dir())
        .last()
        .unwrap();
    assert!(
        run_dir.join(format!("diffusion/checkpoint/model-{last}.mpk")).is_file(),
        "epoch {last} was saved"
    );
    let target = format!("diffusion_training.steps={}", last + 1);
    let stdout = run_ok(resume(&run_dir, &[&target]));
    assert!(stdout.contains(&format!("[diffusion] resuming after step {last}")), "{stdout}");
    assert!(out.join("unet/diffusion_pytorch_model.safetensors").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configs_are_errors_naming_the_key() {
    let dir = scratch("keys");
    let output = pretrain(&dir.join("run"), &dir.join("toy"), &["unet.dropout=0.1"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown key `unet.dropout`"), "{stderr}");

    let config = dir.join("extra.toml");
    let shipped = std::fs::read_to_string(root().join("configs/toy-pretrain.toml")).unwrap();
    std::fs::write(&config, shipped.replace("[unet]\n", "[unet]\nlayers = 3\n")).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .current_dir(root())
        .args(["pretrain", "--config"])
        .arg(&config)
        .arg("--run-dir")
        .arg(dir.join("run2"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("extra.toml") && stderr.contains("unknown field `layers`"), "{stderr}");
    assert!(!dir.join("run2").exists(), "nothing is written for a bad config");

    // Sizes are checked by diffusers' own rules, naming the config file and key, before a run exists.
    let output = pretrain(&dir.join("run3"), &dir.join("toy"), &["unet.norm_num_groups=3"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unet/config.json") && stderr.contains("norm_num_groups=3 does not divide"),
        "{stderr}"
    );
    assert!(!dir.join("run3").exists(), "no run directory is left for bad sizes");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// name → (dtype, shape, data offsets) of a safetensors file.
fn header(bytes: &[u8]) -> BTreeMap<String, (String, Vec<usize>, [usize; 2])> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let json: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    json.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let offsets = v["data_offsets"].as_array().unwrap();
            let offsets = [
                offsets[0].as_u64().unwrap() as usize + 8 + n,
                offsets[1].as_u64().unwrap() as usize + 8 + n,
            ];
            (k.clone(), (v["dtype"].as_str().unwrap().to_string(), shape, offsets))
        })
        .collect()
}

/// The exporter's files, from modules loaded out of a diffusers-made fixture, hold the fixture's keys,
/// shapes and bytes (f32), so diffusers reads them as it reads its own.
#[test]
fn saved_weights_have_diffusers_keys_layouts_and_values() {
    let fixture = root().join("tests/fixtures/models/sd1-tiny");
    let folder = ModelFolder::open(&fixture).unwrap();
    let device = Default::default();
    let saved = [
        (
            "unet/diffusion_pytorch_model.safetensors",
            safetensors_bytes(&folder.unet::<Flex>(&device).unwrap(), UNET_SAVE_REMAPS, DType::F32).unwrap(),
        ),
        (
            "vae/diffusion_pytorch_model.safetensors",
            safetensors_bytes(&folder.vae::<Flex>(&device).unwrap(), &[], DType::F32).unwrap(),
        ),
        (
            "text_encoder/model.safetensors",
            safetensors_bytes(&folder.text_encoder::<Flex>(&device).unwrap(), &[], DType::F32).unwrap(),
        ),
    ];
    for (file, ours) in saved {
        let theirs = std::fs::read(fixture.join(file)).unwrap();
        // transformers 5 saves CLIPTextModel without the `text_model.` prefix that SD checkpoints (and
        // transformers 4) use; we keep the prefix, which both versions load.
        let strip = |k: &String| k.strip_prefix("text_model.").unwrap_or(k).to_string();
        let (ours_h, theirs_h) = (header(&ours), header(&theirs));
        let ours_keys: Vec<String> = ours_h.keys().map(strip).collect();
        let theirs_keys: Vec<String> = theirs_h.keys().map(strip).collect();
        assert_eq!(ours_keys, theirs_keys, "{file}");
        for (key, (dtype, shape, at)) in &ours_h {
            let (their_dtype, their_shape, their_at) =
                theirs_h.get(&strip(key)).or(theirs_h.get(key)).unwrap();
            assert_eq!((dtype, shape), (their_dtype, their_shape), "{file}: {key}");
            assert_eq!(&ours[at[0]..at[1]], &theirs[their_at[0]..their_at[1]], "{file}: {key} values");
        }
        assert!(
            String::from_utf8_lossy(&ours[..200]).contains(r#""format":"pt""#),
            "{file}: transformers needs format=pt"
        );
    }
}

/// Both stages draw their batches as a function of (epoch, batch index), so stopping after a
/// checkpoint and resuming ends with the exported weights of the uninterrupted run.
#[test]
fn a_resumed_run_exports_the_same_weights_as_an_uninterrupted_one() {
    let dir = scratch("replay");
    let steps = |vae: usize, diffusion: usize| {
        [
            format!("vae_training.steps={vae}"),
            "vae_training.checkpoint_every=2".to_string(),
            format!("diffusion_training.steps={diffusion}"),
            "diffusion_training.checkpoint_every=2".to_string(),
        ]
    };
    fn strs(v: &[String; 4]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let read = |root: &Path, file: &str| std::fs::read(root.join("toy").join(file)).unwrap();
    let whole = dir.join("whole");
    run_ok(pretrain(&whole.join("run"), &whole.join("toy"), &strs(&steps(4, 4))));
    // the VAE stopped after 2 of 4 steps (its diffusion stage then used that VAE, so only the VAE
    // compares)
    let vae_parts = dir.join("vae-parts");
    run_ok(pretrain(&vae_parts.join("run"), &vae_parts.join("toy"), &strs(&steps(2, 2))));
    run_ok(resume(&vae_parts.join("run"), &["vae_training.steps=4", "diffusion_training.steps=4"]));
    let vae = "vae/diffusion_pytorch_model.safetensors";
    assert!(read(&whole, vae) == read(&vae_parts, vae), "VAE: 2+2 steps differ from 4 steps");
    // the diffusion stage stopped after 2 of 4 steps
    let parts = dir.join("diffusion-parts");
    run_ok(pretrain(&parts.join("run"), &parts.join("toy"), &strs(&steps(4, 2))));
    run_ok(resume(&parts.join("run"), &["diffusion_training.steps=4"]));
    for file in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"] {
        assert!(read(&whole, file) == read(&parts, file), "{file}: 2+2 steps differ from 4 steps");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
