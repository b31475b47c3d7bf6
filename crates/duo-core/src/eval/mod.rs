//! The evaluation core: one judge interface ([`Judge`]) and one seeded prompt × seed sampler
//! ([`SeededSampler`]). `unlearn`'s before/after evaluation, `duo-bench quality`, pair rejection in
//! `duo-train pairs` and the red-team bench all generate and judge through these two, so an image
//! of prompt p and seed s is the same image wherever it is drawn, and every judge plugs in the same
//! way.

mod judge;
mod sampler;

pub use judge::{Judge, Judgement, Label};
pub use sampler::{SampleJob, SampledBatch, SeededSampler};
