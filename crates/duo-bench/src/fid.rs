//! `duo-bench fid`: FID between two folders of images (pytorch-fid's definition and Inception).

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::fsutil::image_files;
use duo_core::metrics::{Fid, frechet_distance, statistics};
use duo_core::pipelines::rgb8_to_tensor;
use duo_core::progress::Progress;
use duo_core::{DuoError, Result};
use serde_json::json;

#[derive(Args, Debug, Clone)]
pub struct FidArgs {
    /// pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or its tensors as safetensors.
    #[arg(long)]
    pub weights: PathBuf,
    /// A folder of images (PNG or JPEG, any sizes).
    pub a: PathBuf,
    /// Another folder of images.
    pub b: PathBuf,
    /// Writes the result as JSON here too.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: FidArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    let files = [image_files(&args.a)?, image_files(&args.b)?];
    dispatch(device, float, FidTask { args, files })
}

struct FidTask {
    args: FidArgs,
    files: [Vec<PathBuf>; 2],
}

impl BackendTask for FidTask {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device, _dtype: DType) -> Result<()> {
        let Self { args, files } = self;
        let fid = Fid::<B>::load(&args.weights, &device)?;
        let progress = Progress::new("fid", (files[0].len() + files[1].len()) as u64, "images");
        let mut sets = Vec::new();
        for set in &files {
            let mut features = Vec::with_capacity(set.len());
            for file in set {
                let image = image::open(file).map_err(|e| DuoError::parse(file, e.to_string()))?.to_rgb8();
                features.extend(fid.features(rgb8_to_tensor::<B>(&image, &device))?);
                progress.inc(1);
            }
            sets.push(statistics(&features)?);
        }
        progress.finish();
        let distance = frechet_distance(&sets[0], &sets[1]);
        println!("FID {distance:.3} ({} and {} images)", files[0].len(), files[1].len());
        if let Some(out) = &args.out {
            let report = json!({ "fid": distance, "a": args.a, "b": args.b,
                                 "n_a": files[0].len(), "n_b": files[1].len(), "weights": args.weights });
            duo_core::fsutil::write_json(out, &report)?;
        }
        Ok(())
    }
}
