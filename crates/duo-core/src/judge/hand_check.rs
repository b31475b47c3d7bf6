//! Hand checks of the judge on *generated* images: a person labels the shape in each cell of a
//! `duo-bench quality` grid (`grid-tiles.png`, the cells at the model's own size), and the judge's
//! readings are scored against those labels. Renders alone cannot show how the judge reads an
//! under-trained model's blurry, two-tone, fat-armed shapes; this can.
//!
//! The labels file (JSON):
//! ```json
//! {"tiles": "grid-tiles.png", "tile_size": 32, "gap": 2, "source": "what was sampled, how",
//!  "rows": [{"prompt": "a red cross", "shapes": ["cross", null, "square", ...]}, ...]}
//! ```
//! `tiles` is relative to the labels file; each row is one grid row, left to right; a shape is
//! its canonical name (`Shape::name`), `null` where the person could not tell.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::Verdict;
use crate::error::{DuoError, Result, read_json};
use crate::world::{Shape, images_to_chw};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelsFile {
    tiles: PathBuf,
    tile_size: u32,
    gap: u32,
    source: String,
    rows: Vec<LabelledRow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelledRow {
    prompt: String,
    shapes: Vec<Option<String>>,
}

/// The labelled cells of one grid: images and the person's shape, row-major.
pub struct HandLabels {
    /// What was sampled and how (the file's `source`).
    pub source: String,
    /// `[n, 3, tile_size, tile_size]` values in [0, 1], channel-major, as the judge takes them.
    pub pixels: Vec<f32>,
    pub tile_size: usize,
    /// Per cell: the grid row's prompt and the shape a person saw (`None`: could not tell).
    pub cells: Vec<(String, Option<Shape>)>,
}

/// How far the judge agrees with the person, on the cells the person could label.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HandCheckReport {
    /// Cells the person labelled.
    pub labelled: usize,
    /// Of those, cells where the judge read the same shape.
    pub agreed: usize,
    /// Per shape (`Shape::ALL` order): (cells the person labelled as it, of those the judge read as it).
    pub recall: [(usize, usize); 6],
    /// The disagreements: (prompt, the person's shape, the judge's shape and its probability).
    pub misreads: Vec<(String, Shape, Shape, f32)>,
}

impl HandCheckReport {
    pub fn agreement(&self) -> f64 {
        self.agreed as f64 / self.labelled.max(1) as f64
    }
}

impl HandLabels {
    /// Reads a labels file and cuts its tiles image into cells. A grid whose size does not fit
    /// the rows, a row of another length, or an unknown shape name is an error naming the file.
    pub fn read(labels_path: &Path) -> Result<Self> {
        let file: LabelsFile = read_json(labels_path)?;
        let bad = |message: String| DuoError::parse(labels_path, message);
        let columns = file.rows.first().map_or(0, |r| r.shapes.len());
        if columns == 0 {
            return Err(bad("no rows, or a first row without cells".into()));
        }
        let mut cells = Vec::new();
        for (r, row) in file.rows.iter().enumerate() {
            if row.shapes.len() != columns {
                return Err(bad(format!(
                    "row {r} ({:?}) has {} cells, row 0 has {columns}",
                    row.prompt,
                    row.shapes.len()
                )));
            }
            for (c, label) in row.shapes.iter().enumerate() {
                let shape = match label {
                    None => None,
                    Some(name) => {
                        Some(Shape::ALL.into_iter().find(|s| s.name() == name).ok_or_else(|| {
                            let names: Vec<_> = Shape::ALL.iter().map(|s| s.name()).collect();
                            bad(format!(
                                "row {r}, cell {c}: unknown shape {name:?} (known: {names:?} or null)"
                            ))
                        })?)
                    }
                };
                cells.push((row.prompt.clone(), shape));
            }
        }
        let tiles_path = labels_path.parent().unwrap_or(Path::new(".")).join(&file.tiles);
        let grid =
            image::open(&tiles_path).map_err(|e| DuoError::parse(&tiles_path, e.to_string()))?.to_rgb8();
        let (step, rows) = (file.tile_size + file.gap, file.rows.len() as u32);
        let expected = (columns as u32 * step - file.gap, rows * step - file.gap);
        if grid.dimensions() != expected {
            return Err(bad(format!(
                "{} is {:?} pixels; {rows} rows × {columns} cells of {} px with {} px gaps need {expected:?}",
                tiles_path.display(),
                grid.dimensions(),
                file.tile_size,
                file.gap
            )));
        }
        // Row-major, as `cells`.
        let tiles: Vec<RgbImage> = (0..rows * columns as u32)
            .map(|i| {
                let (x, y) = ((i % columns as u32) * step, (i / columns as u32) * step);
                image::imageops::crop_imm(&grid, x, y, file.tile_size, file.tile_size).to_image()
            })
            .collect();
        Ok(Self {
            source: file.source,
            pixels: images_to_chw(&tiles)?,
            tile_size: file.tile_size as usize,
            cells,
        })
    }

    /// The cells as one `[n, 3, tile_size, tile_size]` batch, as the judge takes them.
    pub fn images<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4> {
        let (n, side) = (self.cells.len(), self.tile_size);
        Tensor::from_data(TensorData::new(self.pixels.clone(), [n, 3, side, side]), device)
    }

    /// Scores the judge's `verdicts`, one per cell in order, against the labels.
    pub fn score(&self, verdicts: &[Verdict]) -> Result<HandCheckReport> {
        if verdicts.len() != self.cells.len() {
            return Err(DuoError::Invalid(format!(
                "hand check: {} verdicts for {} cells",
                verdicts.len(),
                self.cells.len()
            )));
        }
        let mut report =
            HandCheckReport { labelled: 0, agreed: 0, recall: [(0, 0); 6], misreads: Vec::new() };
        for ((prompt, label), verdict) in self.cells.iter().zip(verdicts) {
            let Some(label) = *label else { continue };
            report.labelled += 1;
            report.recall[label.index()].0 += 1;
            if verdict.shape == label {
                report.agreed += 1;
                report.recall[label.index()].1 += 1;
            } else {
                report.misreads.push((prompt.clone(), label, verdict.shape, verdict.shape_prob));
            }
        }
        Ok(report)
    }
}
