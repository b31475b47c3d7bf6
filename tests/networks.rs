//! Parity of the UNet, text encoder and VAE with diffusers/transformers on the tiny random-weight
//! models of `tests/fixtures` (made by `tests/fixtures/generate.py`).

mod common;

use common::{B, assert_close, fixtures};
use duo_core::ModelFolder;
use duo_core::forward::{Component, run_forward};
use duo_core::tensor_file::TensorFile;

/// Runs every `forward/<model>-<component>*.in.safetensors` fixture and compares with its `.out`.
fn check_component(component: &str) {
    let dir = fixtures().join("forward");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.ends_with(".in.safetensors") && name.contains(&format!("-{component}"))
        })
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no {component} fixtures in {}", dir.display());
    let device = Default::default();
    for input in cases {
        let name = input.file_name().unwrap().to_string_lossy().replace(".in.safetensors", "");
        let model = name.split(&format!("-{component}")).next().unwrap().to_string();
        let folder = ModelFolder::open(fixtures().join("models").join(&model)).unwrap();
        let inputs = TensorFile::read(&input).unwrap();
        let expected = TensorFile::read(&input.with_file_name(format!("{name}.out.safetensors"))).unwrap();
        let outputs = run_forward::<B>(&folder, component.parse::<Component>().unwrap(), &inputs, &device)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (key, actual) in outputs {
            let want = expected.get(&key).unwrap().clone();
            assert_close(&format!("{name}/{key}"), &actual, &want, 1e-4);
        }
    }
}

#[test]
fn unet_matches_diffusers() {
    check_component("unet");
}

#[test]
fn text_encoder_matches_transformers() {
    check_component("text_encoder");
}

#[test]
fn vae_matches_diffusers() {
    check_component("vae");
}

/// `--dtype f16`: weights cast on load, activations in f16, norms accumulating in f32; the output stays
/// close to the f32 reference.
#[test]
fn unet_runs_in_f16() {
    let name = "sd1-tiny-unet-int";
    let dir = fixtures().join("forward");
    let folder =
        ModelFolder::open(fixtures().join("models/sd1-tiny")).unwrap().with_dtype(burn::tensor::DType::F16);
    let inputs = TensorFile::read(&dir.join(format!("{name}.in.safetensors"))).unwrap();
    let expected = TensorFile::read(&dir.join(format!("{name}.out.safetensors"))).unwrap();
    let outputs = run_forward::<B>(&folder, Component::Unet, &inputs, &Default::default()).unwrap();
    assert_close(&format!("{name} (f16)"), &outputs[0].1, expected.get("out").unwrap(), 2e-2);
}
