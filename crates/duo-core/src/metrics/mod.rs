//! Image metrics: LPIPS, the perceptual distance the DUO paper reports prior preservation with
//! (1 − LPIPS between the base and the unlearned model's images of the same prompt and seed), and
//! the CLIP score of images against their prompts, and FID between image sets.

mod clip_score;
mod fid;
mod inception;
mod lpips;

pub use clip_score::{ClipScorer, clip_score};
pub use fid::{FeatureStats, Fid, frechet_distance, statistics};
pub use lpips::{Lpips, LpipsNet, mean_std};
