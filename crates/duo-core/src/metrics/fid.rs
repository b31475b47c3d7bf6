//! FID (Heusel et al., 2017) as pytorch-fid computes it: images resized to 299 (bilinear, corners
//! not aligned), mapped to [−1, 1], through the FID Inception to 2,048 pool features; each set's
//! mean and covariance (n − 1) in f64; then ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½.
//!
//! The weights are the user's: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, or the same
//! tensors as safetensors (torchvision's `Inception3` key names; `fc.*` is ignored).

use std::path::Path;

use burn::prelude::*;
use burn::tensor::DType;
use nalgebra::{DMatrix, DVector, SymmetricEigen};

use super::inception::{BLOCKS, FidInception, SIDE};
use crate::error::{DuoError, Result};
use crate::weights::{load_snapshots, read_checkpoint};

pub struct Fid<B: Backend> {
    pub net: FidInception<B>,
}

impl<B: Backend> Fid<B> {
    pub fn load(file: &Path, device: &B::Device) -> Result<Self> {
        if !file.is_file() {
            let message = "FID's Inception weights not found: pytorch-fid's pt_inception-2015-12-05-6726825d.pth \
                           (github.com/mseitzer/pytorch-fid releases), or its tensors as safetensors";
            return Err(DuoError::io(file, std::io::Error::new(std::io::ErrorKind::NotFound, message)));
        }
        let snapshots: Vec<_> = read_checkpoint(file)?
            .into_iter()
            .filter(|s| {
                let key = s.full_path();
                !key.starts_with("fc.")
                    && !key.ends_with("num_batches_tracked")
                    && !key.starts_with("AuxLogits.")
            })
            .collect();
        let remaps: Vec<(String, String)> =
            BLOCKS.iter().map(|b| (format!(r"^{b}\."), format!("{}.", b.to_lowercase()))).collect();
        let remaps: Vec<(&str, &str)> = remaps.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let net = load_snapshots(FidInception::init(device), snapshots, file, &remaps, DType::F32, &[])?;
        Ok(Self { net })
    }

    /// The pool features of `images` [n, 3, H, W] in [0, 1], in f64.
    pub fn features(&self, images: Tensor<B, 4>) -> Result<Vec<Vec<f64>>> {
        let [n, c, h, w] = images.dims();
        let device = images.device();
        let rows = Tensor::<B, 2>::from_data(TensorData::new(bilinear(h, SIDE), [SIDE, h]), &device);
        let columns = Tensor::<B, 2>::from_data(TensorData::new(bilinear(w, SIDE), [SIDE, w]), &device);
        // [n, c, h, w] · columnsᵀ → [n, c, h, 299]; rows · that → [n, c, 299, 299]
        let x = images.matmul(columns.transpose().reshape([1, 1, w, SIDE]).expand([n, c, w, SIDE]));
        let x = rows.reshape([1, 1, SIDE, h]).expand([n, c, SIDE, h]).matmul(x);
        let features = self.net.features(x * 2.0 - 1.0);
        let dim = features.dims()[1];
        let values = features.into_data().convert::<f64>().into_vec::<f64>();
        let values = values.map_err(|e| DuoError::Invalid(format!("FID: reading the features: {e:?}")))?;
        Ok(values.chunks_exact(dim).map(<[f64]>::to_vec).collect())
    }
}

/// PyTorch's bilinear resize along one axis (`align_corners=False`, no antialiasing) as a
/// [to, from] matrix, row-major.
fn bilinear(from: usize, to: usize) -> Vec<f32> {
    let scale = from as f32 / to as f32;
    let mut weights = vec![0.0f32; to * from];
    for d in 0..to {
        let source = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (source.floor() as usize).min(from - 1);
        let i1 = (i0 + 1).min(from - 1);
        let lambda = source - i0 as f32;
        weights[d * from + i0] += 1.0 - lambda;
        weights[d * from + i1] += lambda;
    }
    weights
}

/// A set's features, centred, with their mean and covariance (divided by n − 1), in f64.
pub struct FeatureStats {
    pub mean: DVector<f64>,
    pub covariance: DMatrix<f64>,
    /// [n, dim]: each feature vector minus the mean.
    centred: DMatrix<f64>,
}

pub fn statistics(features: &[Vec<f64>]) -> Result<FeatureStats> {
    let n = features.len();
    let dim = features.first().map_or(0, Vec::len);
    if n < 2 || features.iter().any(|f| f.len() != dim) {
        return Err(DuoError::Invalid(format!("FID needs at least 2 feature vectors of one size; got {n}")));
    }
    let x = DMatrix::from_fn(n, dim, |i, j| features[i][j]);
    let mean = DVector::from_fn(dim, |j, _| x.column(j).mean());
    let centred = DMatrix::from_fn(n, dim, |i, j| x[(i, j)] - mean[j]);
    let covariance = centred.transpose() * &centred / (n as f64 - 1.0);
    Ok(FeatureStats { mean, covariance, centred })
}

/// ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½. tr (Σ₁Σ₂)^½ is the sum of the square roots of the
/// eigenvalues of Σ₁Σ₂ (real and ≥ 0: round-off below 0 counts as 0), found with a symmetric
/// eigensolver in the smaller of two spaces: Σ₁^½ Σ₂ Σ₁^½ (dim × dim), or, with fewer images than
/// features, (A Bᵀ)(A Bᵀ)ᵀ / ((n₁ − 1)(n₂ − 1)) for the centred features A and B, which has the
/// same non-zero eigenvalues (n × n: seconds instead of minutes for 2,048 features).
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> f64 {
    let diff = &a.mean - &b.mean;
    let (n1, n2, dim) = (a.centred.nrows(), b.centred.nrows(), a.mean.len());
    let root_sum = |m: DMatrix<f64>| -> f64 {
        let m = (&m + m.transpose()) * 0.5;
        SymmetricEigen::new(m).eigenvalues.iter().map(|l| l.max(0.0).sqrt()).sum()
    };
    let trace_root = if n1.min(n2) < dim {
        let cross = &a.centred * b.centred.transpose() / ((n1 as f64 - 1.0) * (n2 as f64 - 1.0)).sqrt();
        if n1 <= n2 { root_sum(&cross * cross.transpose()) } else { root_sum(cross.transpose() * &cross) }
    } else {
        let eigen = SymmetricEigen::new(a.covariance.clone());
        let roots = eigen.eigenvalues.map(|l| l.max(0.0).sqrt());
        let root = &eigen.eigenvectors * DMatrix::from_diagonal(&roots) * eigen.eigenvectors.transpose();
        root_sum(&root * &b.covariance * &root)
    };
    diff.dot(&diff) + a.covariance.trace() + b.covariance.trace() - 2.0 * trace_root
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two spaces give the same distance: 20 and 30 vectors of 64 features take the sample
    /// space; the same statistics marked as coming from 100 vectors take the feature space.
    #[test]
    fn sample_and_feature_space_agree() {
        let value = |i: usize, j: usize, shift: f64| {
            ((i * 31 + j * 17) % 23) as f64 / 7.0 - 1.5 + shift * (j % 3) as f64
        };
        let set = |n: usize, shift: f64| {
            (0..n).map(|i| (0..64).map(|j| value(i, j, shift)).collect()).collect::<Vec<Vec<f64>>>()
        };
        let (a, b) = (statistics(&set(20, 0.0)).unwrap(), statistics(&set(30, 0.4)).unwrap());
        let sample = frechet_distance(&a, &b);
        // the feature-space branch on the same statistics
        let feature = {
            let big = |s: &FeatureStats| FeatureStats {
                mean: s.mean.clone(),
                covariance: s.covariance.clone(),
                centred: DMatrix::zeros(100, 64),
            };
            frechet_distance(&big(&a), &big(&b))
        };
        // the feature space takes square roots of the covariance's round-off eigenvalues (rank ≤ 19
        // of 64), which costs it a few digits: ~2e-7 here
        assert!((sample - feature).abs() <= 1e-6 * feature.abs().max(1.0), "{sample} vs {feature}");
    }
}
