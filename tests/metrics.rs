//! LPIPS against the `lpips` package (AlexNet and VGG16 backbones). The backbones' weights follow
//! the integer pattern of tests/fixtures/generate_lpips.py, rebuilt here and saved with
//! torchvision's key names; the heads are the script's PyTorch pickles.

mod common;

use burn::prelude::*;
use duo_core::metrics::{Lpips, LpipsNet};
use duo_core::tensor_file::TensorFile;

#[test]
fn lpips_matches_the_lpips_package() {
    let device = Default::default();
    let cases = TensorFile::read(&common::fixtures().join("lpips/cases.safetensors")).unwrap();
    let image = |key: &str| Tensor::<common::B, 4>::from_data(cases.get(key).unwrap().clone(), &device);
    for net in [LpipsNet::Alex, LpipsNet::Vgg] {
        let dir = std::env::temp_dir().join(format!("duo-lpips-{}-{}", std::process::id(), net.name()));
        common::lpips_weights_folder(net, &dir);
        let lpips = Lpips::<common::B>::load(&dir, net, &device).unwrap();
        let ours = lpips.distance(image("a"), image("b")).unwrap();
        let theirs = cases.get(net.name()).unwrap().clone().into_vec::<f32>().unwrap();
        for (o, t) in ours.iter().zip(&theirs) {
            assert!((o - t).abs() <= 1e-5 * t.abs().max(1.0), "{}: {ours:?} vs {theirs:?}", net.name());
        }
        let same = lpips.distance(image("a"), image("a")).unwrap();
        assert!(same.iter().all(|d| d.abs() < 1e-7), "an image is at distance 0 from itself: {same:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn missing_or_mismatched_lpips_weights_are_named() {
    let device = burn::tensor::Device::<common::B>::default();
    let dir = std::env::temp_dir().join(format!("duo-lpips-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let error = Lpips::<common::B>::load(&dir, LpipsNet::Alex, &device).unwrap_err().to_string();
    assert!(error.contains("alexnet.safetensors") && error.contains("torchvision"), "{error}");
    // VGG heads beside an AlexNet backbone
    common::lpips_weights_folder(LpipsNet::Alex, &dir);
    std::fs::copy(dir.join("alex.pth"), dir.join("vgg.pth")).unwrap();
    std::fs::copy(dir.join("alexnet.safetensors"), dir.join("vgg16.safetensors")).unwrap();
    let error = Lpips::<common::B>::load(&dir, LpipsNet::Vgg, &device).unwrap_err().to_string();
    assert!(error.contains("shape"), "{error}");
    std::fs::remove_dir_all(&dir).ok();
}
