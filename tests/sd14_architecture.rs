//! The real SD 1.4 architecture, built from its real configs (`models/sd-v1-4-configs`, no weights).

mod common;

use burn::module::Module;
use burn::prelude::*;
use common::B;
use duo_core::ModelFolder;
use duo_core::models::{AutoencoderKLConfig, ClipTextConfig};

fn folder() -> ModelFolder {
    ModelFolder::open(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/sd-v1-4-configs"))
        .unwrap()
}

/// Parameter counts equal diffusers'/transformers' for the same configs, which pins down every layer
/// size (params are lazy: nothing is allocated).
#[test]
fn parameter_counts_match_diffusers() {
    let device = Default::default();
    let f = folder();
    let unet = f.unet_layout().unwrap().init::<B>(&device);
    assert_eq!(unet.num_params(), 859_520_964, "UNet");
    let vae =
        AutoencoderKLConfig::from_file(&f.file("vae", "config.json").unwrap()).unwrap().init::<B>(&device);
    assert_eq!(vae.num_params(), 83_653_863, "VAE");
    let text = ClipTextConfig::from_file(&f.file("text_encoder", "config.json").unwrap())
        .unwrap()
        .init::<B>(&device);
    assert_eq!(text.num_params(), 123_060_480, "text encoder");
}

/// One full-size UNet forward at 64×64 latents (512² images) with random weights. Slow on a CPU.
#[test]
#[ignore = "full-size SD 1.4 UNet forward: minutes and ~4 GB on a CPU"]
fn full_size_unet_forward_runs() {
    let device = Default::default();
    let unet = folder().unet_layout().unwrap().init::<B>(&device);
    let sample =
        Tensor::<B, 4>::random([1, 4, 64, 64], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
    let context = Tensor::<B, 3>::random([1, 77, 768], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
    let out = unet.forward(sample, Tensor::from_floats([500.0], &device), context);
    assert_eq!(out.dims(), [1, 4, 64, 64]);
    let values = out.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    assert!(values.iter().all(|v| v.is_finite()), "non-finite UNet output");
}
