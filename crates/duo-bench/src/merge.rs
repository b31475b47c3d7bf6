//! `duo-bench merge`: the folders of a sharded evaluation (`duo-bench eval --shard I/N`, one per
//! GPU of an array job) joined into one folder with the report of the unsharded run.

use std::path::PathBuf;
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::Result;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::eval::{ReportHeader, image_metrics, merge_shards, write_report};

use crate::eval::{DSR_CHART, draw_dsr_chart, print_summary};

#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// The shard folders, all N of them (any order).
    #[arg(required = true, num_args = 1..)]
    pub shards: Vec<PathBuf>,
    /// The merged folder: every unit, image and found embedding, report.json, report.md, grids.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: MergeArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    dispatch(device, float, MergeTask(args))
}

struct MergeTask(MergeArgs);

impl BackendTask for MergeTask {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device, _dtype: DType) -> Result<()> {
        let started = Instant::now();
        let args = self.0;
        let merged = merge_shards(&args.shards, &args.out)?;
        println!("merged {} shards into {}", args.shards.len(), args.out.display());
        // the image metrics read the images, so they are computed here, over every unit
        let metrics = image_metrics::<B>(&merged.protocol, &merged.runs, &merged.folder, &device)?;
        let header = ReportHeader {
            base: merged.base,
            unlearned: merged.unlearned,
            judge: merged.judge,
            seconds: started.elapsed().as_secs_f64(),
            chart: Some(DSR_CHART.to_string()),
            metrics,
        };
        let report = write_report(&merged.protocol, &header, &merged.runs, &merged.folder)?;
        draw_dsr_chart(&merged.runs, &merged.protocol.concept, &args.out)?;
        print_summary(&report);
        Ok(())
    }
}
