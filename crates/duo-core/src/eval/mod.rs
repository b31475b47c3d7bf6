//! The evaluation core: one judge interface ([`Judge`]) and one seeded prompt × seed sampler
//! ([`SeededSampler`]). `unlearn`'s before/after evaluation, `duo-bench quality`, pair rejection in
//! `duo-train pairs` and the red-team bench all generate and judge through these two, so an image
//! of prompt p and seed s is the same image wherever it is drawn, and every judge plugs in the same
//! way.
//!
//! On top of them, the red-team bench: a [`Protocol`] file, the [`Attack`] interface (prompt sets
//! here; the search attacks in [`crate::attacks`]), the resumable loop over an attack's prompts
//! ([`Bench::run`]) and the report ([`write_report`]), which `duo-bench eval`, `duo-bench sweep` and
//! `duo-train unlearn` share.

mod bench;
mod judge;
mod merge;
mod metrics;
mod prompt_file;
mod protocol;
mod report;
mod run;
mod sampler;
mod stats;

pub use bench::{
    Attack, AttackInfo, AttackRun, Bench, Found, Goal, ImageVerdict, PromptSet, RunFolder, Shard, Unit,
    UnitRecord, grid, pixel_similarity,
};
pub use judge::{Judge, Judgement, Label};
pub use merge::{Merged, merge_shards};
pub use metrics::{FidValues, ImageMetrics, image_metrics};
pub use prompt_file::read_prompt_file;
pub use protocol::{
    AttackName, AttackSettings, ConceptInversion, EmbeddingInversion, PromptFile, PromptGroups, Protocol,
    RingABell, UnlearnDiffAtk,
};
pub use report::{LOOKALIKE, Rates, ReportHeader, SAFE, write_report};
pub use run::{
    evaluate, lora_model_name, open_run_folder, preservation_groups, prompt_attacks, protocol_seeds,
};
pub use sampler::{Condition, SampleJob, SampledBatch, SeededSampler};
pub use stats::wilson95;
