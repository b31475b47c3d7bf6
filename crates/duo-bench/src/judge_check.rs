//! `duo-bench judge-check`: scores a concept judge against a person's labels of generated images
//! (`HandLabels`; tests/fixtures/judge-hand-check/README.md says how to make them), so the judge's
//! reading of a new model's samples can be trusted, or not, before its counts are.

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::judge::{ConceptJudge, HandLabels};
use duo_core::world::Shape;
use duo_core::{DuoError, Result};

#[derive(Args, Debug, Clone)]
pub struct JudgeCheckArgs {
    /// Labels files (JSON: rows of shape names or null per cell, and the tiles image each names),
    /// e.g. tests/fixtures/judge-hand-check/*.json; each is scored on its own.
    #[arg(long, required = true, num_args = 1..)]
    pub labels: Vec<PathBuf>,
    /// The judge folder (config.json + model.safetensors).
    #[arg(long, default_value = "models/judge")]
    pub judge: PathBuf,
}

pub fn run(args: JudgeCheckArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    if float != FloatType::F32 {
        return Err(DuoError::Invalid(format!("judge-check runs in f32 only; got --dtype {float:?}")));
    }
    // Read before any device starts, so a bad file fails at once.
    let labels = args.labels.iter().map(|path| HandLabels::read(path)).collect::<Result<Vec<_>>>()?;
    dispatch(device, float, JudgeCheckTask { args, labels })
}

struct JudgeCheckTask {
    args: JudgeCheckArgs,
    labels: Vec<HandLabels>,
}

impl BackendTask for JudgeCheckTask {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device, _dtype: DType) -> Result<()> {
        let judge = ConceptJudge::<B>::load(&self.args.judge, &device)?;
        for (path, labels) in self.args.labels.iter().zip(&self.labels) {
            let report = labels.score(&judge.judge(labels.images::<B>(&device))?)?;
            let n = labels.cells.len();
            println!("{}: {}", path.display(), labels.source);
            println!(
                "judge {} agrees on {} of {} labelled cells ({:.1}%; {} cells unlabelled)",
                self.args.judge.display(),
                report.agreed,
                report.labelled,
                100.0 * report.agreement(),
                n - report.labelled
            );
            for (shape, (labelled, found)) in Shape::ALL.iter().zip(report.recall) {
                if labelled > 0 {
                    println!("  {:<10} read as itself in {found} of {labelled}", shape.name());
                }
            }
            for (prompt, person, judged, prob) in &report.misreads {
                println!("  misread: {prompt:?}: a {} judged {} ({prob:.2})", person.name(), judged.name());
            }
        }
        Ok(())
    }
}
