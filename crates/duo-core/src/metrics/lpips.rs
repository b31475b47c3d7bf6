//! LPIPS (Zhang et al., CVPR 2018), version 0.1 as the `lpips` package computes it: the images
//! through an ImageNet backbone (AlexNet or VGG16, torchvision's), five ReLU outputs each unit-
//! normalised over channels, squared differences weighted per channel by the learned linear
//! heads, averaged over space and summed over the five layers.
//!
//! Weights are the user's, in one folder: the backbone as torchvision saves it
//! (`alexnet.safetensors` / `vgg16.safetensors`, or `.pth`; keys `features.<i>.weight|bias`,
//! the classifier's keys are ignored) and the heads the `lpips` package ships
//! (`lpips/weights/v0.1/alex.pth` / `vgg.pth`; keys `lin<k>.model.1.weight`).

use std::path::{Path, PathBuf};

use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

use crate::error::{DuoError, Result};
use crate::weights::{load_snapshots, read_checkpoint};

/// The backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LpipsNet {
    /// AlexNet, the `lpips` package's default and the DUO paper's.
    #[default]
    Alex,
    Vgg,
}

/// One conv of a backbone: torchvision's `features` index, channels in and out, kernel, stride,
/// padding, and whether a 3×3 stride-2 (AlexNet) or 2×2 (VGG) max pool comes before it.
struct ConvSpec {
    index: usize,
    channels: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: usize,
    pool_before: bool,
}

const fn conv(
    index: usize,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    pool_before: bool,
) -> ConvSpec {
    ConvSpec { index, channels: [c_in, c_out], kernel, stride, padding, pool_before }
}

const ALEX: [ConvSpec; 5] = [
    conv(0, 3, 64, 11, 4, 2, false),
    conv(3, 64, 192, 5, 1, 2, true),
    conv(6, 192, 384, 3, 1, 1, true),
    conv(8, 384, 256, 3, 1, 1, false),
    conv(10, 256, 256, 3, 1, 1, false),
];

const VGG: [ConvSpec; 13] = [
    conv(0, 3, 64, 3, 1, 1, false),
    conv(2, 64, 64, 3, 1, 1, false),
    conv(5, 64, 128, 3, 1, 1, true),
    conv(7, 128, 128, 3, 1, 1, false),
    conv(10, 128, 256, 3, 1, 1, true),
    conv(12, 256, 256, 3, 1, 1, false),
    conv(14, 256, 256, 3, 1, 1, false),
    conv(17, 256, 512, 3, 1, 1, true),
    conv(19, 512, 512, 3, 1, 1, false),
    conv(21, 512, 512, 3, 1, 1, false),
    conv(24, 512, 512, 3, 1, 1, true),
    conv(26, 512, 512, 3, 1, 1, false),
    conv(28, 512, 512, 3, 1, 1, false),
];

impl LpipsNet {
    fn convs(self) -> &'static [ConvSpec] {
        match self {
            Self::Alex => &ALEX,
            Self::Vgg => &VGG,
        }
    }

    /// The convs after whose ReLU LPIPS reads a layer (positions in [`Self::convs`]).
    fn taps(self) -> &'static [usize] {
        match self {
            Self::Alex => &[0, 1, 2, 3, 4],
            // relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
            Self::Vgg => &[1, 3, 6, 9, 12],
        }
    }

    fn pool(self) -> MaxPool2dConfig {
        match self {
            Self::Alex => MaxPool2dConfig::new([3, 3]).with_strides([2, 2]),
            Self::Vgg => MaxPool2dConfig::new([2, 2]).with_strides([2, 2]),
        }
    }

    /// The weight files' stems: torchvision's backbone, the `lpips` package's heads.
    pub fn files(self) -> (&'static str, &'static str) {
        match self {
            Self::Alex => ("alexnet", "alex"),
            Self::Vgg => ("vgg16", "vgg"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Alex => "alex",
            Self::Vgg => "vgg",
        }
    }
}

impl std::str::FromStr for LpipsNet {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "alex" => Ok(Self::Alex),
            "vgg" => Ok(Self::Vgg),
            _ => Err(format!("unknown LPIPS backbone {s:?}; use alex or vgg")),
        }
    }
}

/// The `lpips` package's input scaling (version 0.1): (x − shift) / scale on [−1, 1] images.
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

#[derive(Module, Debug)]
pub struct Lpips<B: Backend> {
    /// The backbone's convs, in order.
    pub convs: Vec<Conv2d<B>>,
    /// The linear heads: 1×1 convs from each tapped layer's channels to one, without bias.
    pub lins: Vec<Conv2d<B>>,
    pool: MaxPool2d,
    #[module(skip)]
    net: LpipsNet,
}

impl<B: Backend> Lpips<B> {
    /// Randomly initialised (loading replaces every parameter).
    pub fn init(net: LpipsNet, device: &B::Device) -> Self {
        let convs = (net.convs().iter())
            .map(|c| {
                let p = c.padding;
                Conv2dConfig::new(c.channels, [c.kernel, c.kernel])
                    .with_stride([c.stride, c.stride])
                    .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                    .init(device)
            })
            .collect();
        let lins = (net.taps().iter())
            .map(|&t| {
                Conv2dConfig::new([net.convs()[t].channels[1], 1], [1, 1]).with_bias(false).init(device)
            })
            .collect();
        Self { convs, lins, pool: net.pool().init(), net }
    }

    /// Loads the backbone and the heads from `dir` (see the module's documentation); a missing
    /// file is named with where to get it.
    pub fn load(dir: &Path, net: LpipsNet, device: &B::Device) -> Result<Self> {
        let (backbone_stem, heads_stem) = net.files();
        let backbone = find(
            dir,
            backbone_stem,
            "torchvision's ImageNet weights of the backbone, with torchvision's key names (features.<i>.weight)",
        )?;
        let heads =
            find(dir, heads_stem, "the linear heads the PyPI package lpips ships as lpips/weights/v0.1/")?;
        let mut snapshots: Vec<_> = read_checkpoint(&backbone)?
            .into_iter()
            .filter(|s| s.full_path().starts_with("features."))
            .collect();
        snapshots.extend(read_checkpoint(&heads)?);
        let mut remaps: Vec<(String, String)> = (net.convs().iter().enumerate())
            .map(|(i, c)| (format!(r"^features\.{}\.", c.index), format!("convs.{i}.")))
            .collect();
        remaps.push((r"^lin(\d)\.model\.1\.".into(), "lins.$1.".into()));
        let remaps: Vec<(&str, &str)> = remaps.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        load_snapshots(Self::init(net, device), snapshots, dir, &remaps, DType::F32, &[])
    }

    pub fn net(&self) -> LpipsNet {
        self.net
    }

    /// LPIPS between `a` and `b`, image by image: [n, 3, H, W] each, in [0, 1] → n distances.
    pub fn distance(&self, a: Tensor<B, 4>, b: Tensor<B, 4>) -> Result<Vec<f32>> {
        if a.dims() != b.dims() || a.dims()[1] != 3 {
            return Err(DuoError::Invalid(format!(
                "LPIPS compares two image batches of one shape [n, 3, H, W]; got {:?} and {:?}",
                a.dims(),
                b.dims()
            )));
        }
        let n = a.dims()[0];
        let device = a.device();
        let shift = Tensor::<B, 1>::from_floats(SHIFT, &device).reshape([1, 3, 1, 1]);
        let scale = Tensor::<B, 1>::from_floats(SCALE, &device).reshape([1, 3, 1, 1]);
        let mut x = (Tensor::cat(vec![a, b], 0) * 2.0 - 1.0 - shift) / scale;
        let mut total = Tensor::<B, 1>::zeros([n], &device);
        let (specs, taps) = (self.net.convs(), self.net.taps());
        for (i, (conv, spec)) in self.convs.iter().zip(specs).enumerate() {
            if spec.pool_before {
                x = self.pool.forward(x);
            }
            x = relu(conv.forward(x));
            if let Some(k) = taps.iter().position(|&t| t == i) {
                let unit = x.clone() / (x.clone().powi_scalar(2).sum_dim(1).sqrt() + 1e-10);
                let (f0, f1) = (unit.clone().narrow(0, 0, n), unit.narrow(0, n, n));
                let weighted = self.lins[k].forward((f0 - f1).powi_scalar(2));
                total = total + weighted.mean_dim(3).mean_dim(2).reshape([n]);
            }
        }
        let values = total.into_data().convert::<f32>().into_vec::<f32>();
        values.map_err(|e| DuoError::Invalid(format!("LPIPS: reading the distances: {e:?}")))
    }
}

/// `dir/<stem>.safetensors` or `dir/<stem>.pth`.
fn find(dir: &Path, stem: &str, what: &str) -> Result<PathBuf> {
    let candidates = [dir.join(format!("{stem}.safetensors")), dir.join(format!("{stem}.pth"))];
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let message =
            format!("LPIPS weights not found: put {what} there as {stem}.safetensors or {stem}.pth");
        DuoError::io(&candidates[0], std::io::Error::new(std::io::ErrorKind::NotFound, message))
    })
}

/// Mean and sample standard deviation (n − 1) of `values`; the deviation is 0 for one value.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}
