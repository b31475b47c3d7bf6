//! `duo-bench perf`: UNet forward and forward+backward time, peak memory and sampling throughput for
//! a model config on a device, with random weights (only the configs are needed), side by side with
//! the PyTorch reference (`tests/perf/reference.py`) when `--compare` is given.

mod duo_step;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch, float_dtype};
use duo_core::models::{AutoencoderKLConfig, UNet2DConditionConfig};
use duo_core::pipelines::NoiseSource;
use duo_core::{DuoError, Result};
use serde::Serialize;

#[derive(Args, Debug, Clone)]
pub struct PerfArgs {
    /// A diffusers folder whose unet/config.json (and vae/config.json for sampling) define the model;
    /// weights are not needed (random init).
    #[arg(long)]
    pub model: PathBuf,
    /// Batch size of the UNet timings.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Latent height and width (64 for SD 1.x at 512²).
    #[arg(long, default_value_t = 8)]
    pub latent_size: usize,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Denoising steps of the sampling measurement (0 skips it).
    #[arg(long, default_value_t = 5)]
    pub sample_steps: usize,
    /// Also run the PyTorch reference on the same config and print the ratios.
    #[arg(long)]
    pub compare: bool,
    /// Python interpreter with torch + diffusers, for --compare.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// The PyTorch side of --compare (default: tests/perf/reference.py of the repository the
    /// command runs in, else of the one it was built from).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Time one DUO training step instead: `--batch` pairs, so the UNet runs on 3×batch inputs
    /// ([x⁻ ; x⁺ ; ε]) with LoRA (rank 32, self-attention) through the policy and, adapters off and
    /// without a graph, the reference; then the loss, backward, global clipping and AdamW.
    #[arg(long)]
    pub duo_step: bool,
    /// With --duo-step: recompute memory-bound activations in the backward pass (the trainer's
    /// `training.gradient_checkpointing`; the PyTorch reference then uses diffusers'
    /// `enable_gradient_checkpointing`).
    #[arg(long, requires = "duo_step")]
    pub gradient_checkpointing: bool,
}

#[derive(Serialize, Debug, Default, Clone)]
pub struct PerfReport {
    pub implementation: String,
    pub device: String,
    pub dtype: String,
    pub model: String,
    pub unet_parameters: usize,
    pub batch: usize,
    pub latent_size: usize,
    pub unet_forward_ms: f64,
    pub unet_forward_backward_ms: f64,
    /// Peak resident memory of the process during the UNet timings (CPU devices), in MiB.
    pub peak_rss_mib: Option<f64>,
    /// UNet steps per second of classifier-free-guided sampling (batch 2 through the UNet) plus VAE
    /// decoding, expressed as images per second for `sample_steps` steps.
    pub sampling_images_per_s: Option<f64>,
    pub sample_steps: usize,
}

pub fn run(args: PerfArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    if args.duo_step {
        return duo_step::run(&args, device, float);
    }
    let ours = dispatch(device, float, PerfTask { args: args.clone(), device })?;
    print_report(&ours);
    let mut reports = vec![ours.clone()];
    if args.compare {
        let reference = run_reference(&args, device, float)?;
        print_report(&reference);
        println!(
            "ratio (ours / PyTorch time): forward {:.2}×, forward+backward {:.2}×",
            ours.unet_forward_ms / reference.unet_forward_ms,
            ours.unet_forward_backward_ms / reference.unet_forward_backward_ms
        );
        reports.push(reference);
    }
    if let Some(path) = &args.json {
        duo_core::fsutil::write_json(path, &reports)?;
    }
    Ok(())
}

fn print_report(r: &PerfReport) {
    println!(
        "{} on {} ({}), {} ({:.1} M UNet params), batch {}, latents {}²:",
        r.implementation,
        r.device,
        r.dtype,
        r.model,
        r.unet_parameters as f64 / 1e6,
        r.batch,
        r.latent_size
    );
    println!("  UNet forward           {:>10.1} ms", r.unet_forward_ms);
    println!("  UNet forward+backward  {:>10.1} ms", r.unet_forward_backward_ms);
    if let Some(m) = r.peak_rss_mib {
        println!("  peak RSS               {:>10.0} MiB", m);
    }
    if let Some(s) = r.sampling_images_per_s {
        println!("  sampling ({} steps)     {:>10.3} images/s", r.sample_steps, s);
    }
}

struct PerfTask {
    args: PerfArgs,
    device: DeviceChoice,
}

impl BackendTask for PerfTask {
    type Output = PerfReport;
    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<PerfReport> {
        let args = &self.args;
        let unet_path = args.model.join("unet/config.json");
        let layout = UNet2DConditionConfig::from_file(&unet_path)?.layout(&unet_path)?;
        let config = &layout.config;
        let (b, s, c) = (args.batch, args.latent_size, config.in_channels);
        let mut noise = NoiseSource::new(0);
        let inputs = |noise: &mut NoiseSource| {
            let sample = noise.normal::<B, 4>([b, c, s, s], &device).cast(float_dtype(dtype));
            let t = Tensor::<B, 1>::full([b], 500.0, &device);
            let ctx =
                noise.normal::<B, 3>([b, 77, config.cross_attention_dim], &device).cast(float_dtype(dtype));
            (sample, t, ctx)
        };
        reset_peak_rss();

        // forward (inference backend)
        let unet = layout.init::<B>(&device);
        let unet_parameters = duo_core::models::parameter_count(&unet);
        let unet_forward_ms = time_ms::<B>(&device, args.iters, || {
            let (x, t, ctx) = inputs(&mut noise);
            let _ = unet.forward(x, t, ctx).into_data();
        });
        drop(unet);

        // forward + backward of a full fine-tune (all UNet parameters tracked)
        let unet = layout.init::<Autodiff<B>>(&device);
        let unet_forward_backward_ms = time_ms::<B>(&device, args.iters, || {
            let (x, t, ctx) = inputs(&mut noise);
            let x = Tensor::<Autodiff<B>, 4>::from_inner(x);
            let ctx = Tensor::<Autodiff<B>, 3>::from_inner(ctx);
            let t = Tensor::<Autodiff<B>, 1>::from_inner(t);
            let loss = unet.forward(x, t, ctx).square().mean();
            let _grads = loss.backward();
        });
        drop(unet);
        let peak_rss_mib = peak_rss_mib();

        let sampling_images_per_s = if args.sample_steps > 0 {
            Some(sampling_throughput::<B>(&args.model, &layout, s, args.sample_steps, &device, dtype)?)
        } else {
            None
        };
        Ok(PerfReport {
            implementation: "duo (Burn 0.21)".into(),
            device: self.device.to_string(),
            dtype: format!("{dtype:?}"),
            model: args.model.display().to_string(),
            unet_parameters,
            batch: b,
            latent_size: s,
            unet_forward_ms,
            unet_forward_backward_ms,
            peak_rss_mib,
            sampling_images_per_s,
            sample_steps: args.sample_steps,
        })
    }
}

/// Images per second of `steps` guided UNet steps (batch 2) plus one VAE decode, for one image.
fn sampling_throughput<B: Backend>(
    model: &Path,
    layout: &duo_core::models::UNetLayout,
    latent_size: usize,
    steps: usize,
    device: &B::Device,
    dtype: DType,
) -> Result<f64> {
    let vae = AutoencoderKLConfig::from_file(&model.join("vae/config.json"))?.init::<B>(device);
    let unet = layout.init::<B>(device);
    let config = &layout.config;
    let mut noise = NoiseSource::new(1);
    let ctx = noise.normal::<B, 3>([2, 77, config.cross_attention_dim], device).cast(float_dtype(dtype));
    let mut latents = noise
        .normal::<B, 4>([1, config.in_channels, latent_size, latent_size], device)
        .cast(float_dtype(dtype));
    // warm-up: initialises the lazy random weights and (on GPUs) compiles and tunes the kernels
    let pair = Tensor::cat(vec![latents.clone(), latents.clone()], 0);
    let warm = unet.forward(pair, Tensor::full([2], 999.0, device), ctx.clone());
    let _ = vae.decode(warm.narrow(0, 0, 1)).into_data();
    let start = Instant::now();
    for i in 0..steps {
        let input = Tensor::cat(vec![latents.clone(), latents.clone()], 0);
        let t = Tensor::<B, 1>::full([2], 999.0 - i as f32, device);
        let pred = unet.forward(input, t, ctx.clone());
        latents = latents - pred.narrow(0, 0, 1) * 0.01;
    }
    let image = vae.decode(latents);
    let _ = image.into_data();
    Ok(1.0 / start.elapsed().as_secs_f64())
}

/// Mean wall time of `iters` runs after one warm-up run (which also autotunes GPU kernels).
pub(crate) fn time_ms<B: Backend>(device: &B::Device, iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let _ = B::sync(device);
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        f();
    }
    let _ = B::sync(device);
    start.elapsed().as_secs_f64() * 1000.0 / iters.max(1) as f64
}

/// Linux: writing "5" to clear_refs resets the peak resident set size (VmHWM).
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub(crate) fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs `tests/perf/reference.py` (PyTorch + diffusers [+ peft]) with the same settings and reads
/// its JSON.
pub(crate) fn reference_json(
    args: &PerfArgs,
    device: DeviceChoice,
    float: FloatType,
) -> Result<(serde_json::Value, String)> {
    let script = match &args.reference {
        Some(script) => script.clone(),
        None => [
            PathBuf::from("tests/perf/reference.py"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/perf/reference.py"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("tests/perf/reference.py")),
    };
    let torch_device = match device {
        DeviceChoice::Cuda(i) | DeviceChoice::TorchCuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    };
    let out = std::env::temp_dir().join(format!("duo-perf-reference-{}.json", std::process::id()));
    let mut command = std::process::Command::new(&args.python);
    command
        .arg(&script)
        .args(["--model", &args.model.display().to_string()])
        .args(["--batch", &args.batch.to_string(), "--latent-size", &args.latent_size.to_string()])
        .args(["--iters", &args.iters.to_string(), "--sample-steps", &args.sample_steps.to_string()])
        .args(["--device", &torch_device, "--dtype", &format!("{float:?}").to_lowercase()])
        .args(["--out", &out.display().to_string()]);
    if args.duo_step {
        command.arg("--duo-step");
    }
    if args.gradient_checkpointing {
        command.arg("--gradient-checkpointing");
    }
    // our measurement is over: the memory its allocator kept would only crowd the reference out
    duo_core::device::release_freed_memory();
    let status = command
        .status()
        .map_err(|e| DuoError::Invalid(format!("could not run {} {}: {e}", args.python, script.display())))?;
    if !status.success() {
        return Err(DuoError::Invalid(format!(
            "the PyTorch reference {} failed: {}",
            script.display(),
            reference_failure(status, &args.python)
        )));
    }
    let report: serde_json::Value = duo_core::error::read_json(&out)?;
    let _ = std::fs::remove_file(&out);
    Ok((report, torch_device))
}

/// Why the reference process failed, in words.
fn reference_failure(status: std::process::ExitStatus, python: &str) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if status.signal() == Some(9) {
            return "killed (SIGKILL), most often by the kernel for want of memory (see `dmesg`)".into();
        }
    }
    format!(
        "{status}; is torch + diffusers (+ peft for --duo-step) installed for `{python}`? \
         (docs/reference-stack.md)"
    )
}

fn run_reference(args: &PerfArgs, device: DeviceChoice, float: FloatType) -> Result<PerfReport> {
    let (report, torch_device) = reference_json(args, device, float)?;
    let num = |k: &str| report.get(k).and_then(|v| v.as_f64());
    Ok(PerfReport {
        implementation: report
            .get("implementation")
            .and_then(|v| v.as_str())
            .unwrap_or("PyTorch")
            .to_string(),
        device: torch_device,
        dtype: format!("{float:?}"),
        model: args.model.display().to_string(),
        unet_parameters: num("unet_parameters").unwrap_or(0.0) as usize,
        batch: args.batch,
        latent_size: args.latent_size,
        unet_forward_ms: num("unet_forward_ms").unwrap_or(f64::NAN),
        unet_forward_backward_ms: num("unet_forward_backward_ms").unwrap_or(f64::NAN),
        peak_rss_mib: num("peak_rss_mib"),
        sampling_images_per_s: num("sampling_images_per_s"),
        sample_steps: args.sample_steps,
    })
}
