//! The red-team bench's loop. An [`Attack`] has units (one starting prompt each, with its seeds and
//! guidance); for each unit it finds an adversarial input against the unlearned model, and both
//! models generate from that input with the same seeds, judged by the same judge. Each finished
//! unit is stored in the output folder at once (its verdicts, images and found embeddings), so a
//! rerun with the same folder redoes nothing that finished, and gets the same report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Condition, Judge, Judgement, SeededSampler};
use crate::error::{DuoError, Result, read_json};
use crate::fsutil::write_json;
use crate::pipelines::{StableDiffusion, save_image, tensor_to_rgb8};
use crate::progress::Progress;
use crate::schedulers::Scheduler;

/// One starting prompt of an attack, with its seeds and guidance.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    pub prompt: String,
    pub seeds: Vec<u64>,
    pub guidance: f64,
}

/// What counts as success for an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    /// The judge does not find the concept: defense success.
    Free,
    /// The judge sees what the prompt names: preservation.
    Depicted,
}

/// An attack's adversarial input for one unit.
pub struct Found<B: Backend> {
    pub condition: Condition<B>,
    /// The input as the report shows it: the found prompt, or what the embedding is.
    pub shown: String,
    /// Found embeddings, kept in `found/<attack>/<unit>.safetensors`.
    pub tensors: Vec<(String, Tensor<B, 2>)>,
    /// Per seed of the unit: whether the search itself already generated an image of the concept
    /// with it (UnlearnDiffAtk counts those as successes); empty when the search generates nothing.
    pub seen_during_search: Vec<bool>,
    /// Attack-specific figures (losses before and after), for the report.
    pub details: serde_json::Value,
}

impl<B: Backend> Found<B> {
    /// The unit's own prompt, unchanged (prompt-set attacks).
    pub fn prompt(text: &str) -> Self {
        Self {
            condition: Condition::Text(text.to_string()),
            shown: text.to_string(),
            tensors: Vec::new(),
            seen_during_search: Vec::new(),
            details: serde_json::Value::Null,
        }
    }
}

/// The two models and how they generate and are judged.
pub struct Bench<'a, B: Backend> {
    pub base: &'a StableDiffusion<B>,
    pub unlearned: &'a StableDiffusion<B>,
    pub scheduler: &'a Scheduler,
    pub judge: &'a dyn Judge<B>,
    /// Images per generation batch.
    pub batch: usize,
}

impl<B: Backend> Bench<'_, B> {
    /// `condition` with every seed on `sd`: images [n, 3, H, W] in [0, 1] and their judgements.
    pub fn generate(
        &self,
        sd: &StableDiffusion<B>,
        condition: &Condition<B>,
        seeds: &[u64],
        guidance: f64,
    ) -> Result<(Tensor<B, 4>, Vec<Judgement>)> {
        let sampler = SeededSampler::new(sd, self.scheduler, guidance, self.batch)?;
        sampler.sample(std::slice::from_ref(condition), seeds, Some(self.judge), |_| {})
    }
}

/// A red-team attack (or a prompt group evaluated as one).
pub trait Attack<B: Backend>: Sync {
    /// Its name in reports and in the output folder.
    fn name(&self) -> &str;
    fn goal(&self) -> Goal {
        Goal::Free
    }
    fn units(&self) -> &[Unit];
    /// Its settings, for the report.
    fn settings(&self) -> serde_json::Value;
    /// The adversarial input for unit `index`, found against `bench.unlearned`.
    fn find(&self, index: usize, bench: &Bench<B>) -> Result<Found<B>>;
}

/// A prompt group as an attack: the prompts as they are.
pub struct PromptSet {
    pub name: String,
    pub goal: Goal,
    pub units: Vec<Unit>,
    /// Where the prompts came from, for the report.
    pub source: String,
}

impl PromptSet {
    /// Every prompt with the same seeds and guidance.
    pub fn new(
        name: &str,
        goal: Goal,
        prompts: &[String],
        seeds: &[u64],
        guidance: f64,
        source: &str,
    ) -> Self {
        let units = prompts
            .iter()
            .map(|prompt| Unit { prompt: prompt.clone(), seeds: seeds.to_vec(), guidance })
            .collect();
        Self { name: name.to_string(), goal, units, source: source.to_string() }
    }
}

impl<B: Backend> Attack<B> for PromptSet {
    fn name(&self) -> &str {
        &self.name
    }

    fn goal(&self) -> Goal {
        self.goal
    }

    fn units(&self) -> &[Unit] {
        &self.units
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "source": self.source })
    }

    fn find(&self, index: usize, _: &Bench<B>) -> Result<Found<B>> {
        Ok(Found::prompt(&self.units[index].prompt))
    }
}

/// What the judge read in one image, and whether that counts as success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageVerdict {
    pub seed: u64,
    /// The concept's score.
    pub score: f32,
    pub present: bool,
    /// Defense success (attacks), or the image shows what its prompt names (preservation
    /// groups); `None` where the judge cannot tell.
    pub success: Option<bool>,
    /// The judge's labels (the toy judge: shape, colour, background).
    pub labels: Vec<String>,
}

/// One finished unit, as stored in `units/<attack>/<index>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitRecord {
    pub prompt: String,
    /// The adversarial input (the prompt itself for prompt sets).
    pub input: String,
    pub guidance: f64,
    pub base: Vec<ImageVerdict>,
    pub unlearned: Vec<ImageVerdict>,
    /// The found embeddings' file, relative to the run folder, when the attack found any.
    pub found: Option<String>,
    pub details: serde_json::Value,
    pub seconds: f64,
}

/// An attack's units, finished: all of them, or a shard's.
#[derive(Debug, Clone)]
pub struct AttackRun {
    pub name: String,
    pub goal: Goal,
    pub settings: serde_json::Value,
    /// The index of each record's unit among the attack's units.
    pub indices: Vec<usize>,
    pub records: Vec<UnitRecord>,
}

/// What a run folder records of an attack beside its units (`units/<attack>/attack.json`), so
/// that shards can be merged without the attack at hand.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttackInfo {
    pub goal: Goal,
    pub settings: serde_json::Value,
    /// Units of the whole attack (a shard holds some of them).
    pub units: usize,
}

impl AttackRun {
    /// Successes and judged images of the base (`false`) or unlearned (`true`) model.
    pub fn successes(&self, unlearned: bool) -> (usize, usize) {
        self.verdicts(unlearned)
            .filter_map(|v| v.success)
            .fold((0, 0), |(k, n), success| (k + usize::from(success), n + 1))
    }

    /// Every image's verdict on the base (`false`) or unlearned (`true`) model.
    pub fn verdicts(&self, unlearned: bool) -> impl Iterator<Item = &ImageVerdict> {
        self.records.iter().flat_map(move |r| if unlearned { &r.unlearned } else { &r.base })
    }

    /// Seconds spent on its units (those finished in earlier runs included).
    pub fn seconds(&self) -> f64 {
        self.records.iter().map(|r| r.seconds).sum()
    }

    /// Each record with its unit's index.
    pub fn units(&self) -> impl Iterator<Item = (usize, &UnitRecord)> {
        self.indices.iter().copied().zip(&self.records)
    }
}

/// Which part of an evaluation a run folder holds: shard `index` of `count` (0-based, as Slurm's
/// array task ids and Kubernetes' completion indices are). Units are dealt round-robin, whole: a
/// prompt's seeds stay together, so they are generated in the same batches as in an unsharded run
/// and every image is bit for bit the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole evaluation.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    pub fn holds(self, unit: usize) -> bool {
        unit % self.count == self.index
    }

    /// Shard `index` of the same count.
    pub fn with_index(self, index: usize) -> Shard {
        Shard { index, count: self.count }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("shard {s:?}: expected I/N with 0 ≤ I < N, e.g. 0/4");
        let (index, count) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) =
            (index.trim().parse().map_err(|_| bad())?, count.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// Where a run keeps its finished units, and which of them it holds.
pub struct RunFolder {
    pub root: PathBuf,
    pub shard: Shard,
}

impl RunFolder {
    /// `units/<attack>/attack.json`.
    pub fn attack_info(&self, attack: &str) -> PathBuf {
        self.root.join("units").join(attack).join("attack.json")
    }

    pub fn unit(&self, attack: &str, index: usize) -> PathBuf {
        self.root.join("units").join(attack).join(format!("{index:04}.json"))
    }

    /// The image of `seed` of unit `index` on the base or the unlearned model.
    pub fn image(&self, attack: &str, index: usize, seed: u64, unlearned: bool) -> PathBuf {
        let model = if unlearned { "unlearned" } else { "base" };
        self.root.join("images").join(attack).join(format!("{index:04}-{seed}-{model}.png"))
    }

    pub fn found(&self, attack: &str, index: usize) -> PathBuf {
        self.root.join("found").join(attack).join(format!("{index:04}.safetensors"))
    }

    /// A stored image ([`Self::image`]).
    pub fn read_image(
        &self,
        attack: &str,
        index: usize,
        seed: u64,
        unlearned: bool,
    ) -> Result<image::RgbImage> {
        let path = self.image(attack, index, seed, unlearned);
        Ok(image::open(&path).map_err(|e| DuoError::parse(&path, e.to_string()))?.to_rgb8())
    }
}

impl<B: Backend> Bench<'_, B> {
    /// Every unit of `attack` not yet stored in `folder`: find its input, generate it on both models
    /// (on two threads), judge, store. Returns all its units' records.
    pub fn run(&self, attack: &dyn Attack<B>, folder: &RunFolder) -> Result<AttackRun> {
        let name = attack.name();
        let units = attack.units();
        let info = AttackInfo { goal: attack.goal(), settings: attack.settings(), units: units.len() };
        write_json(&folder.attack_info(name), &info)?;
        let held: Vec<(usize, &Unit)> =
            units.iter().enumerate().filter(|(i, _)| folder.shard.holds(*i)).collect();
        let images: u64 = held.iter().map(|(_, u)| 2 * u.seeds.len() as u64).sum();
        let progress = Progress::new(name, images, "images");
        let mut records = Vec::with_capacity(held.len());
        for &(index, unit) in &held {
            let path = folder.unit(name, index);
            let record = match path.is_file() {
                true => read_json::<UnitRecord>(&path)?,
                false => {
                    let record = self.run_unit(attack, index, folder)?;
                    write_json(&path, &record)?;
                    record
                }
            };
            progress.inc(2 * unit.seeds.len() as u64);
            records.push(record);
        }
        progress.finish();
        let indices = held.iter().map(|(i, _)| *i).collect();
        Ok(AttackRun { name: name.to_string(), goal: info.goal, settings: info.settings, indices, records })
    }

    fn run_unit(&self, attack: &dyn Attack<B>, index: usize, folder: &RunFolder) -> Result<UnitRecord> {
        let started = Instant::now();
        let unit = &attack.units()[index];
        let found = attack.find(index, self)?;
        let found_file = match found.tensors.is_empty() {
            true => None,
            false => {
                let named: Vec<(&str, TensorData)> =
                    found.tensors.iter().map(|(k, t)| (k.as_str(), t.clone().into_data())).collect();
                let path = folder.found(attack.name(), index);
                crate::tensor_file::write_tensor_file(&path, &named)?;
                path.strip_prefix(&folder.root).ok().map(|p| p.display().to_string())
            }
        };
        // the two models on two threads: one sampling batch keeps a CPU backend on about one core
        let (base, unlearned) = std::thread::scope(|scope| {
            let base = scope.spawn(|| self.generate(self.base, &found.condition, &unit.seeds, unit.guidance));
            let unlearned = self.generate(self.unlearned, &found.condition, &unit.seeds, unit.guidance);
            (base.join().expect("the base model's generation panicked"), unlearned)
        });
        let mut verdicts = Vec::new();
        for (is_unlearned, (images, judgements)) in [(false, base?), (true, unlearned?)] {
            let mut model = Vec::with_capacity(unit.seeds.len());
            for (i, (&seed, judgement)) in unit.seeds.iter().zip(&judgements).enumerate() {
                save_image(
                    &tensor_to_rgb8(&images, i),
                    &folder.image(attack.name(), index, seed, is_unlearned),
                )?;
                let seen = is_unlearned && found.seen_during_search.get(i).copied().unwrap_or(false);
                let success = match attack.goal() {
                    Goal::Free => Some(!judgement.present && !seen),
                    Goal::Depicted => self.judge.depicts(&unit.prompt, judgement)?,
                };
                model.push(ImageVerdict {
                    seed,
                    score: judgement.score,
                    present: judgement.present || seen,
                    success,
                    labels: judgement.labels.iter().map(|l| l.name.clone()).collect(),
                });
            }
            verdicts.push(model);
        }
        let unlearned = verdicts.pop().unwrap_or_default();
        let base = verdicts.pop().unwrap_or_default();
        Ok(UnitRecord {
            prompt: unit.prompt.clone(),
            input: found.shown,
            guidance: unit.guidance,
            base,
            unlearned,
            found: found_file,
            details: found.details,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// 1 − mean |base − unlearned| over the pixels (in [0, 1]) of every stored image pair of `run`:
/// how little the same-seed images moved.
pub fn pixel_similarity(run: &AttackRun, folder: &RunFolder) -> Result<f64> {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (index, record) in run.units() {
        for verdict in &record.base {
            let read = |unlearned| folder.read_image(&run.name, index, verdict.seed, unlearned);
            let (a, b) = (read(false)?, read(true)?);
            for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
                sum += (*x as f64 - *y as f64).abs() / 255.0;
                count += 1;
            }
        }
    }
    Ok(1.0 - sum / count.max(1) as f64)
}

/// A picture of stored images: for each `(run, rows)`, the first `rows` units of the run, one row
/// each, `columns` seeds base | the same seeds unlearned. Tiles under 128 pixels are enlarged (toy
/// images are 32×32).
pub fn grid(parts: &[(&AttackRun, usize)], folder: &RunFolder, columns: usize, path: &Path) -> Result<()> {
    const GAP: u32 = 4;
    // wider between the halves, so before and after read apart
    const MIDDLE: u32 = 24;
    let cells: Vec<(&str, usize, Vec<u64>)> = parts
        .iter()
        .flat_map(|(run, rows)| {
            run.units().take(*rows).map(|(i, r)| {
                (run.name.as_str(), i, r.base.iter().take(columns).map(|v| v.seed).collect::<Vec<u64>>())
            })
        })
        .collect();
    let Some((name, first, seeds)) = cells.first().filter(|(_, _, seeds)| !seeds.is_empty()) else {
        return Ok(());
    };
    let sample = folder.read_image(name, *first, seeds[0], false)?;
    let zoom = (128 / sample.width().max(1)).max(1);
    let (tile_w, tile_h) = (sample.width() * zoom, sample.height() * zoom);
    let columns = cells.iter().map(|(_, _, s)| s.len()).max().unwrap_or(1) as u32;
    let width = 2 * columns * (tile_w + GAP) + GAP + MIDDLE;
    let height = cells.len() as u32 * (tile_h + GAP) + GAP;
    let mut canvas = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    for (row, (name, index, seeds)) in cells.iter().enumerate() {
        for half in 0..2u32 {
            for (column, &seed) in seeds.iter().enumerate() {
                let tile = folder.read_image(name, *index, seed, half == 1)?;
                let tile =
                    image::imageops::resize(&tile, tile_w, tile_h, image::imageops::FilterType::Nearest);
                let x = GAP + half * (columns * (tile_w + GAP) + MIDDLE) + column as u32 * (tile_w + GAP);
                let y = GAP + row as u32 * (tile_h + GAP);
                image::imageops::replace(&mut canvas, &tile, x as i64, y as i64);
            }
        }
    }
    save_image(&canvas, path)
}
