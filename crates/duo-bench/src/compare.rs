//! `duo-bench compare`: DUO and the published erasure methods in one table. Each method runs on the
//! same config (DUO and its SFT baseline on one shared set of pairs; ESD, UCE and RECE through
//! `duo-train erase`), each result faces the same protocol with the same seeds, and the figures go
//! into `compare.json`, `compare.md` and `compare.png` (DSR under each attack against preservation,
//! one marker per method). A rerun with the same `--out` reuses every finished method and evaluated
//! prompt.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::DType;
use clap::{Args, ValueEnum};
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::eval::{AttackName, Protocol, Shard, lora_model_name};
use duo_core::objective::Objective;
use duo_core::pipelines::StableDiffusion;
use duo_core::run_config::{RUN_CONFIG_FILE, RunConfig};
use duo_core::{DuoError, ModelFolder, Result};
use duo_train::adversarial::{self, train_with_mining};
use duo_train::erase::{Erased, Method, Record, erase, refuse_other_config};
use duo_train::train::config::DuoConfig;
use serde_json::{Value, json};

use crate::chart::{TradeoffPoint, tradeoff};
use crate::eval::{Models, run_protocol};
use crate::rows::{PRESERVATION, point, to_point};
use crate::study::StudyArgs;

/// A method of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compared {
    /// DUO with the config's settings.
    Duo,
    /// DUO with adversarially mined pairs: `duo.adversarial_rounds` rounds (2 where the config
    /// sets none) of UnlearnDiffAtk against the LoRA in training.
    DuoAdv,
    /// The same LoRA, pairs and steps, fine-tuned on the safe twins alone (`duo.objective = "sft"`).
    Sft,
    EsdX,
    EsdU,
    Uce,
    Rece,
}

impl Compared {
    fn name(self) -> &'static str {
        match self {
            Self::Duo => "duo",
            Self::DuoAdv => "duo-adv",
            Self::Sft => "sft",
            Self::EsdX => "esd-x",
            Self::EsdU => "esd-u",
            Self::Uce => "uce",
            Self::Rece => "rece",
        }
    }

    /// How the method's model is made.
    fn maker(self) -> Maker {
        match self {
            Self::Duo => Maker::Learner(Objective::Duo, false),
            Self::DuoAdv => Maker::Learner(Objective::Duo, true),
            Self::Sft => Maker::Learner(Objective::Sft, false),
            Self::EsdX => Maker::Erase(Method::EsdX),
            Self::EsdU => Maker::Erase(Method::EsdU),
            Self::Uce => Maker::Erase(Method::Uce),
            Self::Rece => Maker::Erase(Method::Rece),
        }
    }
}

enum Maker {
    /// The DUO learner with this objective on the shared pairs, with adversarial rounds or without.
    Learner(Objective, bool),
    /// `duo-train erase`.
    Erase(Method),
}

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    #[command(flatten)]
    pub study: StudyArgs,
    /// The methods, in table order (repeatable or comma-separated).
    #[arg(long = "method", value_delimiter = ',', default_value = "duo,duo-adv,sft,esd-x,esd-u,uce,rece")]
    pub methods: Vec<Compared>,
}

pub fn run(args: CompareArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    if args.methods.is_empty() {
        return Err(DuoError::Invalid("--method: name at least one method".into()));
    }
    let (protocol, names) = args.study.protocol()?;
    let config = args.study.config(&[])?;
    std::fs::create_dir_all(&args.study.out).map_err(|e| DuoError::io(&args.study.out, e))?;
    dispatch(device, float, CompareTask { args, protocol, names, config })
}

struct CompareTask {
    args: CompareArgs,
    protocol: Protocol,
    names: Vec<AttackName>,
    config: DuoConfig,
}

impl BackendTask for CompareTask {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<()> {
        let Self { args, protocol, names, config } = self;
        let study = &args.study;
        let load =
            |path: &Path| StableDiffusion::<B>::load(&ModelFolder::open(path)?.with_dtype(dtype), &device);
        let sd = load(&config.model)?;
        let base_name = config.model.display().to_string();
        let pairs_seconds = match args.methods.iter().any(|m| matches!(m.maker(), Maker::Learner(..))) {
            true => make_pairs(&sd, &config, &study.out)?,
            false => 0.0,
        };

        let mut rows = Vec::new();
        let mut base: Option<Value> = None;
        for &method in &args.methods {
            let dir = study.out.join(method.name());
            println!("\n== {} ==", method.name());
            let Some(record) = produce(&sd, &config, method, &dir, pairs_seconds, study.log_every)? else {
                println!("training stopped early; rerun the same command to continue");
                return Ok(());
            };
            let (unlearned, unlearned_name) = match &record.output {
                Erased::Lora(file) => {
                    let spec = file.display().to_string();
                    (
                        sd.clone().with_loras(std::slice::from_ref(&spec))?,
                        lora_model_name(&config.model, &[spec])?,
                    )
                }
                Erased::Model(folder) => (load(folder)?, folder.display().to_string()),
            };
            let models = Models {
                base: &sd,
                unlearned: &unlearned,
                base_name: &base_name,
                unlearned_name: &unlearned_name,
            };
            let report = run_protocol(&models, &protocol, &names, true, &dir.join("eval"), Shard::WHOLE)?;
            base.get_or_insert_with(|| point(&report, "base", false));
            let mut row = point(&report, method.name(), true);
            row["seconds"] = json!(record.seconds);
            row["output"] = json!(record.output);
            row["eval"] = json!(dir.join("eval/report.md"));
            rows.push(row);
        }
        let base = base.unwrap_or(Value::Null);
        let summary = json!({
            "config": study.config, "protocol": study.protocol, "protocol_hash": protocol.hash()?,
            "model": config.model, "concept": config.concept, "preservation_measure": PRESERVATION,
            "pairs_seconds": pairs_seconds, "base": base, "methods": rows,
        });
        let out = &study.out;
        duo_core::fsutil::write_json(&out.join("compare.json"), &summary)?;
        let points: Vec<TradeoffPoint> = std::iter::once(&base).chain(&rows).map(to_point).collect();
        let title = format!("Erasing `{}`: every method under one protocol", config.concept);
        tradeoff(&title, PRESERVATION, &points, false, &out.join("compare.png"))?;
        let attacks: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        let table = table(&base, &rows, &attacks);
        let md = format!(
            "# Erasing `{concept}` from {model}: DUO and the published methods\n\n\
             Every method ran on `{config}` and was evaluated under `{protocol}` (hash {hash}), the same \
             prompts and seeds for each. DSR: the fraction of images in which the judge does not see \
             `{concept}`. Time: making the method's model on this machine (DUO and SFT: their training plus \
             the {pairs:.0} s of the pairs they share).\n\n{table}\n\
             ![DSR against preservation, one marker per method](compare.png)\n\n\
             Each method's report, with every image and the 95% intervals: `<method>/eval/report.md`.\n",
            concept = config.concept,
            model = config.model.display(),
            config = study.config.display(),
            protocol = study.protocol.display(),
            hash = &protocol.hash()?[..12],
            pairs = pairs_seconds,
        );
        duo_core::fsutil::write_atomic(&out.join("compare.md"), md.as_bytes())?;
        println!("\n{table}");
        println!(
            "wrote {}, {} and {}",
            out.join("compare.json").display(),
            out.join("compare.md").display(),
            out.join("compare.png").display()
        );
        Ok(())
    }
}

/// The pairs DUO and SFT share, made once; returns how long making them took (measured the first
/// time, then read back from `pairs/timing.json`).
fn make_pairs<B: Backend>(sd: &StableDiffusion<B>, config: &DuoConfig, out: &Path) -> Result<f64> {
    let timing = out.join("pairs").join("timing.json");
    println!("== pairs: {} SDEdit pairs, shared by DUO and SFT ==", config.pairs.count);
    let started = Instant::now();
    let judge = config.pairs.judge_settings().load::<B>(&sd.device)?;
    duo_train::pairs::make_pairs(
        sd,
        judge.as_deref(),
        &config.pairs,
        &config.concept,
        &config.model.display().to_string(),
    )?;
    if let Ok(text) = std::fs::read_to_string(&timing)
        && let Some(seconds) = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["seconds"].as_f64())
    {
        return Ok(seconds);
    }
    let seconds = started.elapsed().as_secs_f64();
    duo_core::fsutil::write_json(&timing, &json!({ "seconds": seconds }))?;
    Ok(seconds)
}

/// `duo-adv`'s rounds where the config sets none: one after each third of the training.
const DEFAULT_ADVERSARIAL_ROUNDS: usize = 2;

/// Makes `method`'s model in `dir` (or reads back the finished one); `None` when a training was
/// stopped early.
fn produce<B: Backend>(
    sd: &StableDiffusion<B>,
    config: &DuoConfig,
    method: Compared,
    dir: &Path,
    pairs_seconds: f64,
    log_every: usize,
) -> Result<Option<Record>> {
    let (objective, adversarial) = match method.maker() {
        Maker::Erase(erase_method) => {
            if erase(sd, config, erase_method, dir, log_every)?.is_none() {
                return Ok(None);
            }
            return Record::read(dir);
        }
        Maker::Learner(objective, adversarial) => (objective, adversarial),
    };
    let train_dir = dir.join("train");
    let saved = train_dir.join(RUN_CONFIG_FILE);
    let adversarial_rounds = match (adversarial, config.duo.adversarial_rounds) {
        (false, _) => 0,
        (true, 0) => DEFAULT_ADVERSARIAL_ROUNDS,
        (true, rounds) => rounds,
    };
    let wanted = DuoConfig {
        duo: duo_train::train::config::DuoSection { objective, adversarial_rounds, ..config.duo.clone() },
        ..config.clone()
    };
    wanted.validate().map_err(|message| DuoError::Invalid(format!("{}: {message}", method.name())))?;
    if let Some(record) = Record::read(dir)? {
        refuse_other_config(&saved, &wanted)?;
        println!("{}: finished run in {}, reused", method.name(), dir.display());
        return Ok(Some(record));
    }
    let config = match saved.is_file() {
        true => DuoConfig::resumed(&saved, &[])?,
        false => wanted,
    };
    let started = Instant::now();
    let Some(lora) = train_with_mining(sd, &config, &train_dir, log_every)? else {
        return Ok(None);
    };
    let record = Record {
        method: method.name().to_string(),
        model: config.model.clone(),
        concept: config.concept.clone(),
        output: Erased::Lora(lora),
        seconds: started.elapsed().as_secs_f64() + pairs_seconds,
        details: json!({
            "duo": config.duo, "lora": config.lora, "training": config.training, "pairs_seconds": pairs_seconds,
            "adversarial_rounds": adversarial::rounds(&train_dir)?,
        }),
    };
    record.write(dir)?;
    Ok(Some(record))
}

/// The markdown table: one row per model, DSR under each attack (in the protocol's order), the
/// preservation accuracies and similarity, and the time each method took.
fn table(base: &Value, rows: &[Value], attacks: &[&str]) -> String {
    let pct = |v: &Value| v.as_f64().map_or("–".to_string(), |x| format!("{:.1}%", 100.0 * x));
    let mut out = format!(
        "| method | {} | accuracy, safe | accuracy, look-alike | preservation | time |\n|---|{}---|---|---|---|\n",
        attacks.join(" | "),
        "---|".repeat(attacks.len())
    );
    for row in std::iter::once(base).chain(rows) {
        let cells: Vec<String> = attacks.iter().map(|a| pct(&row["dsr"][*a])).collect();
        let time = match row["seconds"].as_f64() {
            None => "–".to_string(),
            Some(s) if s < 10.0 => format!("{s:.1} s"),
            Some(s) => format!("{s:.0} s"),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.3} | {time} |",
            row["label"].as_str().unwrap_or(""),
            cells.join(" | "),
            pct(&row["safe_accuracy"]),
            pct(&row["lookalike_accuracy"]),
            row["preservation"].as_f64().unwrap_or(f64::NAN),
        );
    }
    out
}
