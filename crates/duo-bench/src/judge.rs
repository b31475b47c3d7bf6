//! `duo-bench judge`: a concept judge over a folder of images, every image's verdict and what the
//! judge read in it (NudeNet: each detection's class, score and box) in one JSON file.

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::judge::nudenet::NudityPreset;
use duo_core::judge::{JudgeChoice, JudgeSettings};
use duo_core::pipelines::rgb8_to_tensor;
use duo_core::progress::Progress;
use duo_core::{DuoError, Result};
use serde_json::json;

#[derive(Args, Debug, Clone)]
pub struct JudgeArgs {
    /// "nudenet", "q16", or a toy concept-judge folder.
    #[arg(long, default_value = "nudenet")]
    pub judge: String,
    /// NudeNet's ONNX file (scripts/fetch-nudenet.sh puts it at the default), or Q16's folder.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// NudeNet's classes and threshold, as papers set them: unlearndiffatk, rece or duo-data.
    #[arg(long)]
    pub preset: Option<NudityPreset>,
    /// NudeNet classes that count, comma-separated, replacing the preset's.
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<String>>,
    /// Score above which a NudeNet detection counts (replacing the preset's); Q16's inappropriate
    /// probability (0.5); the toy judge's probability.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// The toy judge's shape.
    #[arg(long, default_value = "")]
    pub shape: String,
    /// A folder of PNG or JPEG images (or one image).
    #[arg(long)]
    pub images: PathBuf,
    #[arg(long, default_value = "judgments.json")]
    pub out: PathBuf,
}

pub fn run(args: JudgeArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    let files = duo_core::fsutil::image_files(&args.images)?;
    dispatch(device, float, JudgeTask { args, files })
}

struct JudgeTask {
    args: JudgeArgs,
    files: Vec<PathBuf>,
}

impl BackendTask for JudgeTask {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device, _dtype: DType) -> Result<()> {
        let Self { args, files } = self;
        let choice = JudgeChoice::from(args.judge.clone());
        let settings = JudgeSettings {
            judge: &choice,
            shape: &args.shape,
            threshold: args.threshold,
            preset: args.preset,
            classes: args.classes.as_deref(),
            weights: args.weights.as_deref(),
        };
        let judge = settings
            .load::<B>(&device)?
            .ok_or_else(|| DuoError::Invalid("--judge none judges nothing".into()))?;
        let progress = Progress::new("judge", files.len() as u64, "images");
        let mut rows = Vec::with_capacity(files.len());
        let mut present = 0;
        for file in &files {
            let image = image::open(file).map_err(|e| DuoError::parse(file, e.to_string()))?.to_rgb8();
            let judgement = judge.judge(rgb8_to_tensor::<B>(&image, &device))?.remove(0);
            present += usize::from(judgement.present);
            rows.push(json!({
                "image": file.file_name().map(|n| n.to_string_lossy().into_owned()),
                "present": judgement.present, "score": judgement.score, "labels": judgement.labels,
            }));
            progress.inc(1);
        }
        progress.finish();
        let report = json!({
            "judge": judge.settings(), "images": files.len(), "present": present,
            "present_rate": present as f64 / files.len() as f64, "judgments": rows,
        });
        duo_core::fsutil::write_json(&args.out, &report)?;
        println!(
            "{} of {} images show the concept ({}); judgments in {}",
            present,
            files.len(),
            judge.name(),
            args.out.display()
        );
        Ok(())
    }
}
