//! The image metrics a protocol asks for, computed from a run folder's stored images: LPIPS between
//! the two models' same-seed images of each preservation group (`[lpips]`), every image's CLIP
//! score against its prompt (`[clip]`), and FID per attack between the two models' image sets and
//! of each against real images (`[fid]`).

use std::collections::BTreeMap;

use burn::prelude::*;

use super::{AttackRun, Goal, Protocol, RunFolder};
use crate::error::Result;
use crate::metrics::{ClipScorer, Fid, Lpips, frechet_distance, statistics};
use crate::pipelines::rgb8_to_tensor;

/// Per run name: LPIPS of each seed's pair, and the CLIP scores of the base and the unlearned images.
#[derive(Debug, Clone, Default)]
pub struct ImageMetrics {
    pub lpips: BTreeMap<String, Vec<f64>>,
    pub clip: BTreeMap<String, [Vec<f64>; 2]>,
    pub fid: BTreeMap<String, FidValues>,
}

/// FID of one attack's images.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FidValues {
    pub base_vs_unlearned: f64,
    /// Against the reference images, when the protocol names them.
    pub base_vs_reference: Option<f64>,
    pub unlearned_vs_reference: Option<f64>,
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
    if let Some(settings) = &protocol.fid {
        let fid = Fid::<B>::load(&settings.weights, device)?;
        let features = |images: &mut dyn Iterator<Item = Result<Tensor<B, 4>>>| -> Result<Vec<Vec<f64>>> {
            let mut all = Vec::new();
            for image in images {
                all.extend(fid.features(image?)?);
            }
            Ok(all)
        };
        let reference = match &settings.reference {
            Some(dir) => {
                let files = crate::fsutil::image_files(dir)?;
                let mut images = files.iter().map(|file| -> Result<Tensor<B, 4>> {
                    let image =
                        image::open(file).map_err(|e| crate::error::DuoError::parse(file, e.to_string()))?;
                    Ok(rgb8_to_tensor(&image.to_rgb8(), device))
                });
                Some(statistics(&features(&mut images)?)?)
            }
            None => None,
        };
        for run in runs.iter().filter(|r| r.goal == Goal::Free) {
            let mut sets = Vec::new();
            for unlearned in [false, true] {
                let mut images = run
                    .units()
                    .flat_map(|(index, record)| record.base.iter().map(move |v| (index, v.seed)))
                    .map(|(index, seed)| read(run, index, seed, unlearned));
                sets.push(statistics(&features(&mut images)?)?);
            }
            let against = |set| reference.as_ref().map(|r| frechet_distance(set, r));
            metrics.fid.insert(
                run.name.clone(),
                FidValues {
                    base_vs_unlearned: frechet_distance(&sets[0], &sets[1]),
                    base_vs_reference: against(&sets[0]),
                    unlearned_vs_reference: against(&sets[1]),
                },
            );
        }
    }
    Ok(metrics)
}
