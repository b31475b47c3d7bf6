//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::TensorData;

/// The backend the tests run on: the default CPU backend.
pub type B = burn::backend::Flex;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// max|a − b| / max(max|b|, 1e-6): the relative max error the parity criteria are stated in.
pub fn relative_max_error(actual: &TensorData, expected: &TensorData) -> f64 {
    let a = actual.clone().convert::<f64>().into_vec::<f64>().unwrap();
    let b = expected.clone().convert::<f64>().into_vec::<f64>().unwrap();
    assert_eq!(a.len(), b.len(), "element counts differ");
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-6);
    diff / scale
}

/// Asserts equal shapes and a relative max error within `tolerance`.
pub fn assert_close(what: &str, actual: &TensorData, expected: &TensorData, tolerance: f64) {
    assert_eq!(actual.shape, expected.shape, "{what}: shape");
    let err = relative_max_error(actual, expected);
    println!("{what}: relative max error {err:.2e}");
    assert!(err <= tolerance, "{what}: relative max error {err:.3e} > {tolerance:.0e}");
}

/// Copies the folder `from` to `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &path);
        } else {
            std::fs::copy(entry.path(), &path).unwrap();
        }
    }
}

/// A copy of the sd1-tiny fixture at `target` whose UNet `sample_size` is 16: it draws 32×32
/// images, the toy concept judge's size.
pub fn sd1_tiny_at_judge_size(target: &Path) {
    copy_dir(&fixtures().join("models/sd1-tiny"), target);
    let config_path = target.join("unet/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["sample_size"] = serde_json::json!(16);
    std::fs::write(&config_path, config.to_string()).unwrap();
}

/// Loads a UNet-only LoRA file into `unet` (no text encoder).
pub fn load_unet_lora<Bk: burn::prelude::Backend>(
    unet: duo_core::models::UNet2DConditionModel<Bk>,
    file: &Path,
    weight: f64,
) -> duo_core::Result<duo_core::models::UNet2DConditionModel<Bk>> {
    duo_core::lora::load_lora(duo_core::lora::LoraNetworks::unet_only(unet), file, weight)
        .map(|nets| nets.unet)
}

/// Saves the UNet's adapters.
pub fn save_unet_lora<Bk: burn::prelude::Backend>(
    unet: &duo_core::models::UNet2DConditionModel<Bk>,
    file: &Path,
    format: duo_core::lora::LoraFormat,
) -> duo_core::Result<()> {
    duo_core::lora::save_lora(&duo_core::lora::LoraNetworks::unet_only(unet.clone()), file, format)
}

/// NudeNet's detector (`320n.onnx`, AGPL-3.0, never committed): `$DUO_NUDENET` when set, otherwise
/// fetched once by `scripts/fetch-nudenet.sh` into a cache folder outside the repository.
pub fn nudenet_weights() -> PathBuf {
    if let Some(path) = std::env::var_os("DUO_NUDENET") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("duo/nudenet-3.4.2");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-nudenet.sh");
    // tests run in parallel: one fetch at a time
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let status = std::process::Command::new("bash").arg(&script).arg(&cache).status();
    match status {
        Ok(s) if s.success() => cache.join("320n.onnx"),
        other => panic!(
            "could not fetch NudeNet's detector with {} ({other:?}): it needs python3 with pip and the PyPI \
             registry, or DUO_NUDENET=<path to 320n.onnx>",
            script.display()
        ),
    }
}

/// The fixture script's `pattern`: weights in [−bound, bound) from a hash of the index.
pub fn pattern(p: u64, shape: &[usize], bound: f64) -> TensorData {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n as u64)
        .map(|i| {
            let h = (i * 2_654_435_761 + p * 40_503) % (1 << 32);
            let v = (h >> 16) as f64 / 65536.0 - 0.5;
            (v * 2.0 * bound) as f32
        })
        .collect();
    TensorData::new(values, shape.to_vec())
}

/// `(features index, [out, in, k, k])` of each conv.
fn lpips_convs(net: duo_core::metrics::LpipsNet) -> Vec<(usize, [usize; 4])> {
    let alex = [
        (0, [64, 3, 11, 11]),
        (3, [192, 64, 5, 5]),
        (6, [384, 192, 3, 3]),
        (8, [256, 384, 3, 3]),
        (10, [256, 256, 3, 3]),
    ];
    let vgg_channels = [
        (0, 3, 64),
        (2, 64, 64),
        (5, 64, 128),
        (7, 128, 128),
        (10, 128, 256),
        (12, 256, 256),
        (14, 256, 256),
        (17, 256, 512),
        (19, 512, 512),
        (21, 512, 512),
        (24, 512, 512),
        (26, 512, 512),
        (28, 512, 512),
    ];
    match net {
        duo_core::metrics::LpipsNet::Alex => alex.to_vec(),
        duo_core::metrics::LpipsNet::Vgg => {
            vgg_channels.iter().map(|&(i, c_in, c_out)| (i, [c_out, c_in, 3, 3])).collect()
        }
    }
}

/// An LPIPS weights folder as a user would lay it out, with the weights of
/// tests/fixtures/generate_lpips.py: torchvision's backbone file (with its
/// classifier, which LPIPS does not use) and the `lpips` package's heads.
pub fn lpips_weights_folder(net: duo_core::metrics::LpipsNet, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut tensors = Vec::new();
    for (n, (index, shape)) in lpips_convs(net).into_iter().enumerate() {
        let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
        tensors
            .push((format!("features.{index}.weight"), pattern(2 * n as u64, &shape, (6.0 / fan_in).sqrt())));
        tensors.push((format!("features.{index}.bias"), pattern(2 * n as u64 + 1, &shape[..1], 0.1)));
    }
    tensors.push(("classifier.1.weight".into(), pattern(99, &[4, 8], 0.1)));
    let named: Vec<(&str, TensorData)> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let (backbone, heads) = net.files();
    duo_core::tensor_file::write_tensor_file(&dir.join(format!("{backbone}.safetensors")), &named).unwrap();
    std::fs::copy(fixtures().join(format!("lpips/{heads}.pth")), dir.join(format!("{heads}.pth"))).unwrap();
}

/// FID Inception weights as tests/fixtures/generate_fid.py makes them (its `value` pattern over
/// fid/keys.json), with the classifier pytorch-fid's file also holds, at `file`.
pub fn fid_weights_file(file: &Path) {
    let keys: Vec<(String, Vec<usize>)> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("fid/keys.json")).unwrap()).unwrap();
    let mut tensors: Vec<(String, TensorData)> = keys
        .iter()
        .enumerate()
        .map(|(p, (key, shape))| {
            let p = p as u64;
            let shifted = |data: TensorData, by: f32| {
                TensorData::new(
                    data.into_vec::<f32>().unwrap().into_iter().map(|v| v + by).collect(),
                    shape.clone(),
                )
            };
            let data = if key.ends_with("conv.weight") {
                let fan_in: usize = shape[1..].iter().product();
                pattern(p, shape, (6.0 / fan_in as f64).sqrt())
            } else if key.ends_with("bn.weight") {
                shifted(pattern(p, shape, 0.2), 1.0)
            } else if key.ends_with("bn.running_var") {
                shifted(pattern(p, shape, 0.5), 1.0)
            } else {
                pattern(p, shape, 0.1)
            };
            (key.clone(), data)
        })
        .collect();
    tensors.push(("fc.weight".into(), pattern(9999, &[1008, 2048], 0.01)));
    let named: Vec<(&str, TensorData)> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    duo_core::tensor_file::write_tensor_file(file, &named).unwrap();
}
