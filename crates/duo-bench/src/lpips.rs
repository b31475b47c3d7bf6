//! `duo-bench lpips`: LPIPS between two images, or between the same-named images of two folders
//! (the base and the unlearned model's images of the same prompts and seeds).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::metrics::{Lpips, LpipsNet, mean_std};
use duo_core::pipelines::rgb8_to_tensor;
use duo_core::progress::Progress;
use duo_core::{DuoError, Result};
use serde_json::json;

#[derive(Args, Debug, Clone)]
pub struct LpipsArgs {
    /// The folder with the backbone (alexnet.safetensors or vgg16.safetensors, torchvision's key
    /// names; or .pth) and the heads of the PyPI package lpips (alex.pth or vgg.pth).
    #[arg(long)]
    pub weights: PathBuf,
    /// The backbone: alex (the paper's) or vgg.
    #[arg(long, default_value = "alex")]
    pub net: LpipsNet,
    /// An image, or a folder of images.
    pub a: PathBuf,
    /// An image, or a folder whose images are matched to A's by file name.
    pub b: PathBuf,
    /// Writes the distances as JSON here (printed otherwise).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: LpipsArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    let pairs = matched(&args.a, &args.b)?;
    dispatch(device, float, LpipsTask { args, pairs })
}

/// The two files, or the images of folder `a` that folder `b` has under the same name.
fn matched(a: &Path, b: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    if a.is_file() && b.is_file() {
        return Ok(vec![(a.to_path_buf(), b.to_path_buf())]);
    }
    if !(a.is_dir() && b.is_dir()) {
        return Err(DuoError::Invalid(format!(
            "lpips compares two images or two folders; got {} and {}",
            a.display(),
            b.display()
        )));
    }
    let images = duo_core::fsutil::image_files(a)?;
    let pairs: Vec<(PathBuf, PathBuf)> = images
        .into_iter()
        .filter_map(|path| {
            let twin = b.join(path.file_name()?);
            twin.is_file().then_some((path, twin))
        })
        .collect();
    if pairs.is_empty() {
        return Err(DuoError::Invalid(format!(
            "no image of {} has a namesake in {}",
            a.display(),
            b.display()
        )));
    }
    Ok(pairs)
}

struct LpipsTask {
    args: LpipsArgs,
    pairs: Vec<(PathBuf, PathBuf)>,
}

impl BackendTask for LpipsTask {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device, _dtype: DType) -> Result<()> {
        let Self { args, pairs } = self;
        let model = Lpips::<B>::load(&args.weights, args.net, &device)?;
        let progress = Progress::new("lpips", pairs.len() as u64, "pairs");
        let mut rows = Vec::with_capacity(pairs.len());
        let mut values = Vec::with_capacity(pairs.len());
        for (a, b) in &pairs {
            let read = |path: &Path| -> Result<Tensor<B, 4>> {
                let image = image::open(path).map_err(|e| DuoError::parse(path, e.to_string()))?.to_rgb8();
                Ok(rgb8_to_tensor(&image, &device))
            };
            let (x, y) = (read(a)?, read(b)?);
            if x.dims() != y.dims() {
                return Err(DuoError::Invalid(format!(
                    "{} is {:?} and {} is {:?}: LPIPS compares images of one size",
                    a.display(),
                    &x.dims()[2..],
                    b.display(),
                    &y.dims()[2..]
                )));
            }
            let distance = f64::from(model.distance(x, y)?[0]);
            values.push(distance);
            rows.push(
                json!({ "a": a.display().to_string(), "b": b.display().to_string(), "lpips": distance }),
            );
            progress.inc(1);
        }
        progress.finish();
        let (mean, std) = mean_std(&values);
        let report = json!({
            "net": args.net.name(), "weights": args.weights.display().to_string(),
            "n": values.len(), "mean": mean, "std": std, "one_minus_lpips": 1.0 - mean, "pairs": rows,
        });
        match &args.out {
            Some(out) => {
                duo_core::fsutil::write_json(out, &report)?;
                println!(
                    "LPIPS ({}) over {} pair(s): {mean:.4} ± {std:.4} (1 − LPIPS = {:.4}); {}",
                    args.net.name(),
                    values.len(),
                    1.0 - mean,
                    out.display()
                );
            }
            None => println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default()),
        }
        Ok(())
    }
}
