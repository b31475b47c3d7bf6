//! Bad model folders give clear errors naming the file and the key, never a panic or random weights.

mod common;

use std::path::{Path, PathBuf};

use common::{B, fixtures};
use duo_core::ModelFolder;
use duo_core::tensor_file::{TensorFile, write_tensor_file};

/// A private copy of the sd1-tiny fixture folder to break.
fn copy_of_tiny(tag: &str) -> PathBuf {
    let src = fixtures().join("models/sd1-tiny");
    let dst = std::env::temp_dir().join(format!("duo-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&src, &dst);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let target = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

fn unet_error(dir: &Path) -> String {
    match ModelFolder::open(dir).unwrap().unet::<B>(&Default::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_model_folder_is_named() {
    let err = ModelFolder::open("/nonexistent/model").unwrap_err().to_string();
    assert!(err.contains("/nonexistent/model"), "{err}");
}

#[test]
fn missing_weight_file_is_named() {
    let dir = copy_of_tiny("missing-file");
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let err = unet_error(&dir);
    assert!(err.contains("unet/diffusion_pytorch_model.safetensors") && err.contains("not found"), "{err}");
}

#[test]
fn missing_config_is_named() {
    let dir = copy_of_tiny("missing-config");
    std::fs::remove_file(dir.join("vae/config.json")).unwrap();
    let err = match ModelFolder::open(&dir).unwrap().vae::<B>(&Default::default()) {
        Ok(_) => panic!("should fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("vae/config.json"), "{err}");
}

#[test]
fn missing_key_is_named() {
    let dir = copy_of_tiny("missing-key");
    let path = dir.join("unet/diffusion_pytorch_model.safetensors");
    let file = TensorFile::read(&path).unwrap();
    let dropped = "conv_in.weight";
    let kept: Vec<(String, burn::tensor::TensorData)> = file
        .names()
        .filter(|n| *n != dropped)
        .map(|n| (n.to_string(), file.get(n).unwrap().clone()))
        .collect();
    let kept: Vec<(&str, burn::tensor::TensorData)> =
        kept.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    write_tensor_file(&path, &kept).unwrap();
    let err = unet_error(&dir);
    assert!(err.contains("conv_in.weight") && err.contains("missing"), "{err}");
}

#[test]
fn unexpected_key_is_named() {
    let dir = copy_of_tiny("extra-key");
    let path = dir.join("unet/diffusion_pytorch_model.safetensors");
    let file = TensorFile::read(&path).unwrap();
    let mut all: Vec<(String, burn::tensor::TensorData)> =
        file.names().map(|n| (n.to_string(), file.get(n).unwrap().clone())).collect();
    all.push(("mystery.weight".into(), burn::tensor::TensorData::new(vec![1f32], [1])));
    let all: Vec<(&str, burn::tensor::TensorData)> =
        all.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    write_tensor_file(&path, &all).unwrap();
    let err = unet_error(&dir);
    assert!(err.contains("mystery.weight") && err.contains("unexpected"), "{err}");
}

#[test]
fn shape_disagreeing_with_config_is_named() {
    let dir = copy_of_tiny("wrong-shape");
    // a different cross-attention width changes every attn2.to_k/to_v weight shape
    edit_json(&dir.join("unet/config.json"), |c| c["cross_attention_dim"] = serde_json::json!(48));
    let err = unet_error(&dir);
    assert!(err.contains("shape") && err.contains("attn2"), "{err}");
}

#[test]
fn unknown_block_type_is_named() {
    let dir = copy_of_tiny("block-type");
    edit_json(&dir.join("unet/config.json"), |c| {
        c["down_block_types"][0] = serde_json::json!("SimpleCrossAttnDownBlock2D")
    });
    let err = unet_error(&dir);
    assert!(err.contains("unet/config.json") && err.contains("SimpleCrossAttnDownBlock2D"), "{err}");
}

#[test]
fn unsupported_config_value_is_named() {
    let dir = copy_of_tiny("config-value");
    edit_json(&dir.join("unet/config.json"), |c| {
        c["resnet_time_scale_shift"] = serde_json::json!("scale_shift")
    });
    let err = unet_error(&dir);
    assert!(err.contains("resnet_time_scale_shift") && err.contains("scale_shift"), "{err}");
}

/// Rewrites one weight file of a folder copy: `edit` receives (key, data) pairs and returns the new ones.
fn rewrite(
    path: &Path,
    out: &Path,
    edit: impl Fn(String, burn::tensor::TensorData) -> Vec<(String, burn::tensor::TensorData)>,
) {
    let file = TensorFile::read(path).unwrap();
    let tensors: Vec<(String, burn::tensor::TensorData)> =
        file.names().flat_map(|n| edit(n.to_string(), file.get(n).unwrap().clone())).collect();
    let named: Vec<(&str, burn::tensor::TensorData)> =
        tensors.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    write_tensor_file(out, &named).unwrap();
}

fn forward_error(dir: &Path, component: &str, case: &str, variant: Option<&str>) -> f64 {
    use duo_core::forward::run_forward;
    let folder = ModelFolder::open(dir).unwrap().with_variant(variant.map(String::from));
    let fwd = fixtures().join("forward");
    let inputs = TensorFile::read(&fwd.join(format!("sd1-tiny-{component}{case}.in.safetensors"))).unwrap();
    let expected =
        TensorFile::read(&fwd.join(format!("sd1-tiny-{component}{case}.out.safetensors"))).unwrap();
    let outputs =
        run_forward::<B>(&folder, component.parse().unwrap(), &inputs, &Default::default()).unwrap();
    outputs.iter().map(|(k, v)| common::relative_max_error(v, expected.get(k).unwrap())).fold(0.0, f64::max)
}

/// `--variant fp16` reads `*.fp16.safetensors`, stored in f16 and computed in f32.
#[test]
fn fp16_variant_files_load() {
    let dir = copy_of_tiny("fp16");
    let unet = dir.join("unet/diffusion_pytorch_model.safetensors");
    rewrite(&unet, &dir.join("unet/diffusion_pytorch_model.fp16.safetensors"), |k, d| {
        vec![(k, d.convert_dtype(burn::tensor::DType::F16))]
    });
    std::fs::remove_file(&unet).unwrap();
    let err = forward_error(&dir, "unet", "-int", Some("fp16"));
    assert!(err < 5e-3, "fp16 weights: relative max error {err}");
}

/// Text encoders saved without the `text_model.` prefix, or with transformers' `position_ids`
/// buffer, load to the same outputs.
#[test]
fn text_encoder_key_variants_load() {
    let dir = copy_of_tiny("clip-keys");
    let file = dir.join("text_encoder/model.safetensors");
    rewrite(&file.clone(), &file, |k, d| {
        let mut out = vec![(k.trim_start_matches("text_model.").to_string(), d)];
        if k == "text_model.embeddings.token_embedding.weight" {
            let ids: Vec<i64> = (0..77).collect();
            out.push((
                "text_model.embeddings.position_ids".into(),
                burn::tensor::TensorData::new(ids, [1, 77]),
            ));
        }
        out
    });
    let err = forward_error(&dir, "text_encoder", "", None);
    assert!(err < 1e-4, "relative max error {err}");
}

/// VAE files from before diffusers 0.14 name the mid-block attention `query/key/value/proj_attn`.
#[test]
fn legacy_vae_attention_keys_load() {
    let dir = copy_of_tiny("vae-keys");
    let file = dir.join("vae/diffusion_pytorch_model.safetensors");
    rewrite(&file.clone(), &file, |k, d| {
        let k = k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.");
        vec![(k.replace(".to_out.0.", ".proj_attn."), d)]
    });
    let err = forward_error(&dir, "vae", "-square", None);
    assert!(err < 1e-4, "relative max error {err}");
}
