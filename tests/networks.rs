//! Parity of the UNet, text encoder and VAE with diffusers/transformers on the tiny random-weight
//! models of `tests/fixtures` (made by `tests/fixtures/generate.py`).

mod common;

use common::{B, assert_close, fixtures};
use duo_core::ModelFolder;
use duo_core::forward::{Component, run_forward};
use duo_core::tensor_file::TensorFile;

/// The README's parity table states these bounds (relative max error in f32); each is the largest
/// error measured over the fixtures, rounded up, so a kernel that drifts further fails here.
const UNET_TOLERANCE: f64 = 1.5e-6;
const TEXT_ENCODER_TOLERANCE: f64 = 6e-7;
const VAE_TOLERANCE: f64 = 4e-6;

/// Runs every `forward/<model>-<component>*.in.safetensors` fixture and compares with its `.out`.
fn check_component(component: &str, tolerance: f64) {
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
            assert_close(&format!("{name}/{key}"), &actual, &want, tolerance);
        }
    }
}

#[test]
fn unet_matches_diffusers() {
    check_component("unet", UNET_TOLERANCE);
}

#[test]
fn text_encoder_matches_transformers() {
    check_component("text_encoder", TEXT_ENCODER_TOLERANCE);
}

#[test]
fn vae_matches_diffusers() {
    check_component("vae", VAE_TOLERANCE);
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

/// A text encoder saved as a PyTorch pickle (`pytorch_model.bin`) loads to the same outputs.
#[test]
fn pytorch_bin_weights_load() {
    let name = "sd1-tiny-text_encoder";
    let dir = fixtures().join("forward");
    let folder = ModelFolder::open(fixtures().join("models/sd1-tiny-bin")).unwrap();
    let inputs = TensorFile::read(&dir.join(format!("{name}.in.safetensors"))).unwrap();
    let expected = TensorFile::read(&dir.join(format!("{name}.out.safetensors"))).unwrap();
    let outputs = run_forward::<B>(&folder, Component::TextEncoder, &inputs, &Default::default()).unwrap();
    for (key, actual) in outputs {
        assert_close(
            &format!("{name} (.bin)/{key}"),
            &actual,
            expected.get(&key).unwrap(),
            TEXT_ENCODER_TOLERANCE,
        );
    }
}

/// Attention at SD 1.x's largest self-attention (64×64 = 4,096 keys) in f16 stays as accurate as
/// the f16 output itself: the softmax sums 4,096 terms, which in f16 arithmetic would lose about
/// three digits. Compared with f32 attention on the same f16-rounded inputs.
#[test]
fn f16_attention_over_4096_keys_keeps_f32_accuracy() {
    use burn::tensor::{Distribution, FloatDType, Tensor};
    use duo_core::models::attention::multi_head_attention;

    let device = Default::default();
    let (len, heads, head_dim) = (4096, 2, 40);
    let draw = |scale: f64| {
        Tensor::<B, 3>::random([1, len, heads * head_dim], Distribution::Normal(0.0, scale), &device)
            .cast(FloatDType::F16)
    };
    // q·k/√d with std ≈ 2: a peaked but not degenerate softmax, as trained attention is
    let (q, k, v) = (draw(1.5), draw(1.5), draw(1.0));
    let half = multi_head_attention(q.clone(), k.clone(), v.clone(), heads, false).cast(FloatDType::F32);
    let full = multi_head_attention(
        q.cast(FloatDType::F32),
        k.cast(FloatDType::F32),
        v.cast(FloatDType::F32),
        heads,
        false,
    );
    let err: f32 = (half - full.clone()).abs().max().into_scalar();
    let scale: f32 = full.abs().max().into_scalar();
    println!("f16 attention over {len} keys: max abs error {err:.3e} (outputs up to {scale:.3})");
    // f16 has an 11-bit significand: rounding the outputs alone costs up to 2⁻¹¹ relative.
    assert!(err <= scale * 2e-3, "max abs error {err} vs outputs up to {scale}");
}
