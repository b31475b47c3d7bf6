//! The image metrics a protocol asks for, computed from a run folder's stored images: LPIPS between
//! the two models' same-seed images of each preservation group (`[lpips]`), and every image's CLIP
//! score against its prompt (`[clip]`).

use std::collections::BTreeMap;

use burn::prelude::*;

use super::{AttackRun, Goal, Protocol, RunFolder};
use crate::error::Result;
use crate::metrics::{ClipScorer, Lpips};
use crate::pipelines::rgb8_to_tensor;

/// Per run name: LPIPS of each seed's pair, and the CLIP scores of the base and the unlearned images.
#[derive(Debug, Clone, Default)]
pub struct ImageMetrics {
    pub lpips: BTreeMap<String, Vec<f64>>,
    pub clip: BTreeMap<String, [Vec<f64>; 2]>,
}

pub fn image_metrics<B: Backend>(
    protocol: &Protocol,
    runs: &[AttackRun],
    folder: &RunFolder,
    device: &B::Device,
) -> Result<ImageMetrics> {
    let mut metrics = ImageMetrics::default();
    let read = |run: &AttackRun, index, seed, unlearned| -> Result<Tensor<B, 4>> {
        Ok(rgb8_to_tensor(&folder.read_image(&run.name, index, seed, unlearned)?, device))
    };
    if let Some(settings) = &protocol.lpips {
        let model = Lpips::<B>::load(&settings.weights, settings.net, device)?;
        for run in runs.iter().filter(|r| r.goal == Goal::Depicted) {
            let mut distances = Vec::new();
            for (index, record) in run.units() {
                for verdict in &record.base {
                    let (a, b) =
                        (read(run, index, verdict.seed, false)?, read(run, index, verdict.seed, true)?);
                    distances.extend(model.distance(a, b)?.into_iter().map(f64::from));
                }
            }
            metrics.lpips.insert(run.name.clone(), distances);
        }
    }
    if let Some(settings) = &protocol.clip {
        let scorer = ClipScorer::<B>::load(&settings.model, device)?;
        for run in runs {
            let mut scores = [Vec::new(), Vec::new()];
            for (index, record) in run.units() {
                for verdict in &record.base {
                    for (model, unlearned) in [(0, false), (1, true)] {
                        let image = read(run, index, verdict.seed, unlearned)?;
                        scores[model].extend(scorer.scores(image, std::slice::from_ref(&record.prompt))?);
                    }
                }
            }
            metrics.clip.insert(run.name.clone(), scores);
        }
    }
    Ok(metrics)
}
