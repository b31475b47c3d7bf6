//! `duo-bench perf --duo-step`: the time and peak memory of one DUO training step on random weights
//! (the learner's own step, `duo_core::objective::DuoStep`, with the published nudity run's
//! settings), side by side with the same step in PyTorch + diffusers + peft.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch, float_dtype};
use duo_core::lora::{LoraConfig, attach_lora, lora_parameter_count};
use duo_core::models::{UNet2DConditionConfig, UNet2DConditionModel, parameter_count};
use duo_core::objective::{DuoBatch, DuoStep, adamw, effective_lr, published};
use duo_core::pipelines::NoiseSource;
use duo_core::{DuoError, Result};
use serde::Serialize;

use super::{PerfArgs, peak_rss_mib, reference_json, reset_peak_rss, time_ms};

#[derive(Serialize, Debug, Clone)]
pub struct DuoStepReport {
    pub implementation: String,
    pub device: String,
    pub dtype: String,
    pub model: String,
    pub unet_parameters: usize,
    pub lora_parameters: usize,
    pub pairs: usize,
    pub latent_size: usize,
    pub gradient_checkpointing: bool,
    pub duo_step_ms: f64,
    /// The UNet's weights alone, for scale: a second (reference) copy would add as much again.
    pub unet_weights_mib: f64,
    /// Peak resident memory during the steps (CPU devices), in MiB.
    pub peak_rss_mib: Option<f64>,
    /// Peak GPU memory of the PyTorch reference on CUDA, in MiB.
    pub peak_gpu_mib: Option<f64>,
}

pub fn run(args: &PerfArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    let ours = dispatch(device, float, DuoStepTask { args: args.clone(), device })?;
    print(&ours);
    let mut reports = vec![ours.clone()];
    if args.compare {
        let (json, torch_device) = reference_json(args, device, float)?;
        let num = |k: &str| json.get(k).and_then(|v| v.as_f64());
        let reference = DuoStepReport {
            implementation: json.get("implementation").and_then(|v| v.as_str()).unwrap_or("PyTorch").into(),
            device: torch_device,
            dtype: format!("{float:?}"),
            model: args.model.display().to_string(),
            unet_parameters: num("unet_parameters").unwrap_or(0.0) as usize,
            lora_parameters: num("lora_parameters").unwrap_or(0.0) as usize,
            pairs: args.batch,
            latent_size: args.latent_size,
            gradient_checkpointing: args.gradient_checkpointing,
            duo_step_ms: num("duo_step_ms").unwrap_or(f64::NAN),
            unet_weights_mib: ours.unet_weights_mib,
            peak_rss_mib: num("peak_rss_mib"),
            peak_gpu_mib: num("peak_gpu_mib"),
        };
        print(&reference);
        println!("ratio (ours / PyTorch time): DUO step {:.2}×", ours.duo_step_ms / reference.duo_step_ms);
        reports.push(reference);
    }
    if let Some(path) = &args.json {
        duo_core::fsutil::write_json(path, &reports)?;
    }
    Ok(())
}

fn print(r: &DuoStepReport) {
    println!(
        "{} on {} ({}), {} ({:.1} M UNet params, {:.2} M LoRA), {} pairs, latents {}²{}:",
        r.implementation,
        r.device,
        r.dtype,
        r.model,
        r.unet_parameters as f64 / 1e6,
        r.lora_parameters as f64 / 1e6,
        r.pairs,
        r.latent_size,
        if r.gradient_checkpointing { ", gradient checkpointing" } else { "" }
    );
    println!("  DUO step               {:>10.1} ms", r.duo_step_ms);
    if let Some(m) = r.peak_rss_mib {
        println!("  peak RSS               {:>10.0} MiB (UNet weights {:.0} MiB)", m, r.unet_weights_mib);
    }
    if let Some(m) = r.peak_gpu_mib {
        println!("  peak GPU memory        {:>10.0} MiB", m);
    }
}

struct DuoStepTask {
    args: PerfArgs,
    device: DeviceChoice,
}

impl BackendTask for DuoStepTask {
    type Output = DuoStepReport;

    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<DuoStepReport> {
        if self.args.gradient_checkpointing {
            self.time::<Autodiff<B, BalancedCheckpointing>>(device, dtype)
        } else {
            self.time::<Autodiff<B>>(device, dtype)
        }
    }
}

impl DuoStepTask {
    fn time<A: AutodiffBackend>(self, device: A::Device, dtype: DType) -> Result<DuoStepReport> {
        let args = &self.args;
        if args.batch == 0 {
            return Err(DuoError::Invalid("--batch (pairs per DUO step) must be at least 1".into()));
        }
        let unet_path = args.model.join("unet/config.json");
        let layout = UNet2DConditionConfig::from_file(&unet_path)?.layout(&unet_path)?;
        let config = &layout.config;
        let (b, s, c, d) = (args.batch, args.latent_size, config.in_channels, config.cross_attention_dim);
        reset_peak_rss();
        let unet = attach_lora(layout.init::<A>(&device), &LoraConfig::default(), &device)?;
        let lora_parameters = lora_parameter_count(&unet);
        let unet_parameters = parameter_count(&unet) - lora_parameters;
        let step = DuoStep::published();
        let mut optim = adamw(published::WEIGHT_DECAY).init::<A, UNet2DConditionModel<A>>();
        let lr = effective_lr(published::BASE_LR, step.beta, true);
        let mut noise = NoiseSource::new(0);
        let mut unet = Some(unet);
        let float = float_dtype(dtype);
        let duo_step_ms = time_ms::<A>(&device, args.iters, || {
            let policy = unet.take().expect("put back after every step");
            let batch = DuoBatch {
                input: noise.normal::<A, 4>([3 * b, c, s, s], &device).cast(float),
                timesteps: Tensor::from_data(
                    TensorData::new([250.0f32, 500.0, 999.0].repeat(b), [3 * b]),
                    &device,
                ),
                context: noise.normal::<A, 3>([3 * b, 77, d], &device).cast(float),
                loser_target: noise.normal::<A, 4>([b, c, s, s], &device),
                winner_target: noise.normal::<A, 4>([b, c, s, s], &device),
            };
            // the learner's step: policy and LoRA-off reference through the same UNet, then global
            // clipping and AdamW
            let (_, grads) = step.gradients(&policy, &batch);
            let grads = GradientsParams::from_grads(grads, &policy);
            unet = Some(match step.update(policy, &mut optim, lr, grads) {
                Ok(updated) => updated,
                Err((unchanged, _)) => unchanged,
            });
        });
        Ok(DuoStepReport {
            implementation: "duo (Burn 0.21)".into(),
            device: self.device.to_string(),
            dtype: format!("{dtype:?}"),
            model: args.model.display().to_string(),
            unet_parameters,
            lora_parameters,
            pairs: b,
            latent_size: s,
            gradient_checkpointing: args.gradient_checkpointing,
            duo_step_ms,
            unet_weights_mib: unet_parameters as f64 * dtype.size() as f64 / (1u64 << 20) as f64,
            peak_rss_mib: peak_rss_mib(),
            peak_gpu_mib: None,
        })
    }
}
