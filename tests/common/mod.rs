//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

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
