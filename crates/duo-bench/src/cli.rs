use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use clap::{Parser, Subcommand};
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::forward::{Component, run_forward};
use duo_core::tensor_file::{TensorFile, write_tensor_file};
use duo_core::tokenizer::ClipTokenizer;
use duo_core::{DuoError, ModelFolder, Result};

use crate::{compare, eval, fid, judge, judge_check, judge_train, lpips, merge, perf, quality, sweep};

#[derive(Parser, Debug)]
#[command(
    name = "duo-bench",
    version,
    about = "Attacks, judges, metrics and benchmarks for unlearned diffusion models"
)]
pub struct Cli {
    /// Device to run on: cpu, ndarray, wgpu[:N], vulkan[:N], cuda[:N], torch-cpu, torch-cuda[:N] (default:
    /// the best compiled in).
    #[arg(long, global = true)]
    pub device: Option<String>,
    /// Float type of weights and activations: f32, f16, bf16 (where the device supports it).
    #[arg(long, global = true, default_value = "f32")]
    pub dtype: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The red-team bench: the base and the unlearned model under every attack of a protocol (the
    /// same inputs and seeds), judged alike; writes report.json, report.md and image grids.
    Eval(eval::EvalArgs),
    /// DUO's robustness–preservation trade-off: one LoRA per β on shared pairs, each evaluated under
    /// a protocol; writes sweep.json and tradeoff.png.
    Sweep(sweep::SweepArgs),
    /// DUO and the published erasure methods (SFT, ESD-x, ESD-u, UCE, RECE) under one protocol: each
    /// method made on the same config, evaluated with the same seeds; writes compare.json,
    /// compare.md and compare.png.
    Compare(compare::CompareArgs),
    /// Run one component of a model folder on inputs from a safetensors file.
    ///
    /// unet: sample [B,C,H,W], timestep [B] (int64 or f32), encoder_hidden_states [B,S,D] → out.
    /// text_encoder: input_ids [B,L] int64 → last_hidden_state, pooler_output, penultimate_hidden_state.
    /// vae: image [B,3,H,W] in [-1,1] → latent_mean, latent_logvar, decoded_from_mean.
    Forward {
        /// Diffusers pipeline folder.
        #[arg(long)]
        model: PathBuf,
        /// unet, text_encoder or vae.
        #[arg(long)]
        component: String,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Weight file variant, e.g. fp16 for `*.fp16.safetensors`.
        #[arg(long)]
        variant: Option<String>,
        /// Reference outputs (e.g. a parity fixture's `.out.safetensors`): print each output's
        /// relative max error, max|ours − ref| / max|ref|, against the same-named tensor.
        #[arg(long)]
        expected: Option<PathBuf>,
        /// With --expected: also write the errors as JSON here.
        #[arg(long, requires = "expected")]
        errors_json: Option<PathBuf>,
    },
    /// Tokenize a JSON array of prompts as SD does (77 ids, padded).
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        /// A JSON array of strings.
        #[arg(long)]
        prompts: PathBuf,
        /// Writes {"input_ids": [[77 ints], ...]}.
        #[arg(long)]
        out: PathBuf,
    },
    /// Time the UNet (forward, forward+backward), its peak memory and sampling throughput.
    Perf(perf::PerfArgs),
    /// The toy model's quality gates: shape/colour accuracy, cross and plus rates and unconditional coverage
    /// of a toy-world model, read by the concept judge. Writes quality.json, grid.png and grid-tiles.png.
    Quality(quality::QualityArgs),
    /// Retrain the toy-world concept judge with the shipped recipe (every setting defaults to the one
    /// that produced models/judge), evaluate it on held-out renders and write config.json,
    /// model.safetensors and metrics.json into --out.
    JudgeTrain(judge_train::JudgeTrainArgs),
    /// Score a concept judge against a person's shape labels of generated images (by default the
    /// hand check in tests/fixtures/judge-hand-check): agreement, per-shape recall, the misreads.
    JudgeCheck(judge_check::JudgeCheckArgs),
    /// Run a concept judge (NudeNet, Q16, or a toy judge folder) over a folder of images: per image,
    /// what it detects (NudeNet: class, score, box) and its verdict, in one JSON file.
    Judge(judge::JudgeArgs),
    /// LPIPS between two images, or between same-named images of two folders (AlexNet or VGG,
    /// weights supplied by the user); prior preservation is 1 − LPIPS.
    Lpips(lpips::LpipsArgs),
    /// FID between two folders of images (pytorch-fid's Inception, weights supplied by the user).
    Fid(fid::FidArgs),
    /// Join the folders of a sharded evaluation (`eval --shard I/N`) into one folder whose report is
    /// the unsharded run's.
    Merge(merge::MergeArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    let device = match &cli.device {
        Some(d) => d.parse()?,
        None => DeviceChoice::best_available(),
    };
    let float: FloatType = cli.dtype.parse()?;
    match cli.command {
        Command::Forward { model, component, inputs, out, variant, expected, errors_json } => {
            let component: Component = component.parse()?;
            let task = ForwardTask { model, component, inputs, out, variant, expected, errors_json };
            dispatch(device, float, task)
        }
        Command::Tokenize { model, prompts, out } => tokenize(&model, &prompts, &out),
        Command::Eval(args) => eval::run(args, device, float),
        Command::Sweep(args) => sweep::run(args, device, float),
        Command::Compare(args) => compare::run(args, device, float),
        Command::Perf(args) => perf::run(args, device, float),
        Command::Quality(args) => quality::run(args, device, float),
        Command::JudgeTrain(args) => judge_train::run(args, device, float),
        Command::JudgeCheck(args) => judge_check::run(args, device, float),
        Command::Judge(args) => judge::run(args, device, float),
        Command::Lpips(args) => lpips::run(args, device, float),
        Command::Fid(args) => fid::run(args, device, float),
        Command::Merge(args) => merge::run(args, device, float),
    }
}

struct ForwardTask {
    model: PathBuf,
    component: Component,
    inputs: PathBuf,
    out: PathBuf,
    variant: Option<String>,
    expected: Option<PathBuf>,
    errors_json: Option<PathBuf>,
}

impl BackendTask for ForwardTask {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<()> {
        let folder = ModelFolder::open(&self.model)?.with_variant(self.variant).with_dtype(dtype);
        let inputs = TensorFile::read(&self.inputs)?;
        let outputs = run_forward::<B>(&folder, self.component, &inputs, &device)?;
        let named: Vec<(&str, TensorData)> = outputs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        write_tensor_file(&self.out, &named)?;
        for (name, data) in &outputs {
            println!("{name}: {:?}", data.shape.as_slice());
        }
        if let Some(expected) = &self.expected {
            let errors = relative_errors(&outputs, &TensorFile::read(expected)?)?;
            for (name, error) in &errors {
                println!("{name}: relative max error {error:.3e}");
            }
            if let Some(file) = &self.errors_json {
                let map: serde_json::Map<String, serde_json::Value> =
                    errors.into_iter().map(|(k, v)| (k, serde_json::json!(v))).collect();
                duo_core::fsutil::write_json(file, &serde_json::Value::Object(map))?;
            }
        }
        Ok(())
    }
}

/// max|ours − ref| / max(max|ref|, 1e-6) of every output the reference file also holds (the
/// measure the parity tests state their tolerances in).
fn relative_errors(outputs: &[(String, TensorData)], expected: &TensorFile) -> Result<Vec<(String, f64)>> {
    let mut errors = Vec::new();
    for (name, data) in outputs {
        let Ok(reference) = expected.get(name) else { continue };
        if reference.shape != data.shape {
            return Err(DuoError::Invalid(format!(
                "{}: `{name}` is {:?}, the output {:?}",
                expected.path().display(),
                reference.shape,
                data.shape
            )));
        }
        let values = |d: &TensorData| d.clone().convert::<f64>().into_vec::<f64>();
        let (ours, theirs) = match (values(data), values(reference)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Err(DuoError::Invalid(format!("`{name}`: not a float tensor"))),
        };
        let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let scale = theirs.iter().map(|b| b.abs()).fold(0.0, f64::max).max(1e-6);
        errors.push((name.clone(), diff / scale));
    }
    if errors.is_empty() {
        return Err(DuoError::Invalid(format!("{} holds none of the outputs", expected.path().display())));
    }
    Ok(errors)
}

fn tokenize(model: &std::path::Path, prompts: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let tokenizer = ClipTokenizer::from_folder(&model.join("tokenizer"))?;
    let prompts: Vec<String> = duo_core::error::read_json(prompts)?;
    let len = tokenizer.model_max_length();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tokenizer.encode_padded(p, len)).collect();
    let json = serde_json::json!({ "input_ids": ids });
    let text = serde_json::to_string(&json).map_err(|e| DuoError::Invalid(e.to_string()))?;
    duo_core::fsutil::write_atomic(out, text.as_bytes())?;
    println!("{} prompt(s) → {}", ids.len(), out.display());
    Ok(())
}
