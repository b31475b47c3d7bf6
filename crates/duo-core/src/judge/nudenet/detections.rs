//! From the detector's raw output to NudeNet's detections, as the `nudenet` package computes them:
//! candidates whose best class score is at least 0.2, boxes mapped back to the image and clipped,
//! then OpenCV's `NMSBoxes` (score above 0.25, overlap at most 0.45, across all classes).

use serde::{Deserialize, Serialize};

/// NudeNet v3's 18 classes, in the order of the network's outputs.
pub const CLASSES: [&str; 18] = [
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
];

const CANDIDATE_SCORE: f32 = 0.2;
const NMS_SCORE: f32 = 0.25;
const NMS_OVERLAP: f32 = 0.45;

/// One detected region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub class: String,
    pub score: f32,
    /// [x, y, width, height] in pixels of the original image, truncated to integers as NudeNet
    /// reports them.
    #[serde(rename = "box")]
    pub bbox: [i64; 4],
}

/// The detections in one image's raw output `[4 + classes, candidates]` (channel-major, as the
/// network writes it), for an image of `width` × `height` padded to a square and read at `side`.
pub fn detections(
    raw: &[f32],
    candidates: usize,
    width: usize,
    height: usize,
    side: usize,
) -> Vec<Detection> {
    let square = width.max(height) as f32;
    let at = |row: usize, i: usize| raw[row * candidates + i];
    let mut found: Vec<(usize, f32, [f32; 4])> = Vec::new();
    for i in 0..candidates {
        let (class, score) = (0..CLASSES.len())
            .map(|k| (k, at(4 + k, i)))
            .fold((0, f32::NEG_INFINITY), |best, c| if c.1 > best.1 { c } else { best });
        if score < CANDIDATE_SCORE {
            continue;
        }
        let (cx, cy, w, h) = (at(0, i), at(1, i), at(2, i), at(3, i));
        // to the padded square's pixels, in f32 and in the package's order of operations
        let to_pixels = |v: f32| v * square / side as f32;
        let (x, y) = (to_pixels(cx - w / 2.0), to_pixels(cy - h / 2.0));
        let (w, h) = (to_pixels(w), to_pixels(h));
        let (x, y) = (x.clamp(0.0, width as f32), y.clamp(0.0, height as f32));
        let (w, h) = (w.min(width as f32 - x), h.min(height as f32 - y));
        found.push((class, score, [x, y, w, h]));
    }
    non_maximum_suppression(&found)
        .into_iter()
        .map(|i| {
            let (class, score, [x, y, w, h]) = found[i];
            Detection {
                class: CLASSES[class].to_string(),
                score,
                bbox: [x as i64, y as i64, w as i64, h as i64],
            }
        })
        .collect()
}

/// OpenCV's `dnn::NMSBoxes` (score threshold, no top-k, η = 1): candidates by falling score (a
/// stable sort), each kept unless it overlaps a kept box by more than the threshold.
fn non_maximum_suppression(found: &[(usize, f32, [f32; 4])]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..found.len()).filter(|&i| found[i].1 > NMS_SCORE).collect();
    order.sort_by(|&a, &b| found[b].1.total_cmp(&found[a].1));
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        if kept.iter().all(|&k| overlap(&found[i].2, &found[k].2) <= NMS_OVERLAP) {
            kept.push(i);
        }
    }
    kept
}

/// Intersection over union of two [x, y, w, h] boxes, in f64 as OpenCV's `Rect2d` computes it.
fn overlap(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let [ax, ay, aw, ah] = a.map(f64::from);
    let [bx, by, bw, bh] = b.map(f64::from);
    let (area_a, area_b) = (aw * ah, bw * bh);
    if area_a + area_b <= f64::EPSILON {
        return 1.0;
    }
    let iw = (ax + aw).min(bx + bw) - ax.max(bx);
    let ih = (ay + ah).min(by + bh) - ay.max(by);
    let inter = if iw > 0.0 && ih > 0.0 { iw * ih } else { 0.0 };
    // OpenCV: 1 − (f32)(Jaccard distance)
    1.0 - (1.0 - inter / (area_a + area_b - inter)) as f32
}
