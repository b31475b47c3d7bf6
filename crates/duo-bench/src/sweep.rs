//! `duo-bench sweep`: DUO's robustness–preservation trade-off. One set of pairs, one LoRA per β
//! (through the learner's library function, with the config's β coupling of lr and λ), each
//! evaluated under the same protocol; `sweep.json` and `tradeoff.png` (DSR under each attack
//! against preservation, one point per β plus the base model), as the paper's trade-off figure.
//! A rerun with the same `--out` continues: pairs, finished trainings and evaluated prompts are kept.

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::eval::{AttackName, Protocol, Shard, lora_model_name};
use duo_core::pipelines::StableDiffusion;
use duo_core::run_config::{RUN_CONFIG_FILE, RunConfig};
use duo_core::{DuoError, ModelFolder, Result};
use duo_train::train::config::DuoConfig;
use serde_json::{Value, json};

use crate::chart::{TradeoffPoint, tradeoff};
use crate::eval::{Models, run_protocol};
use crate::rows::{PRESERVATION, point, print_table, to_point};
use crate::study::StudyArgs;

#[derive(Args, Debug, Clone)]
pub struct SweepArgs {
    #[command(flatten)]
    pub study: StudyArgs,
    /// The β values, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "25,50,100,250,500")]
    pub betas: Vec<f64>,
}

pub fn run(args: SweepArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    if args.betas.is_empty() || args.betas.iter().any(|b| !(b.is_finite() && *b > 0.0)) {
        return Err(DuoError::Invalid(format!("--betas {:?}: give positive numbers", args.betas)));
    }
    let (protocol, names) = args.study.protocol()?;
    // every β loads the same config with its own β: a bad config fails here, before any work
    let configs = args
        .betas
        .iter()
        .map(|&beta| args.study.config(&[format!("duo.beta={beta}")]))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&args.study.out).map_err(|e| DuoError::io(&args.study.out, e))?;
    dispatch(device, float, SweepTask { args, protocol, names, configs })
}

struct SweepTask {
    args: SweepArgs,
    protocol: Protocol,
    names: Vec<AttackName>,
    configs: Vec<DuoConfig>,
}

impl BackendTask for SweepTask {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<()> {
        let Self { args, protocol, names, configs } = self;
        let study = &args.study;
        let first = &configs[0];
        let sd = StableDiffusion::<B>::load(&ModelFolder::open(&first.model)?.with_dtype(dtype), &device)?;
        let model_name = first.model.display().to_string();

        println!("== pairs: {} SDEdit pairs, shared by every β ==", first.pairs.count);
        let p = &first.pairs;
        let judge = p.judge_settings().load::<B>(&device)?;
        duo_train::pairs::make_pairs(&sd, judge.as_deref(), p, &first.concept, &model_name)?;

        let mut rows = Vec::new();
        let mut base: Option<Value> = None;
        for config in &configs {
            let beta = config.duo.beta;
            let dir = study.out.join(format!("beta-{beta}"));
            println!("\n== β {beta}: lr {:.2e}, λ {:.3e} ==", config.lr(), config.lambda());
            let train_dir = dir.join("train");
            let saved = train_dir.join(RUN_CONFIG_FILE);
            let config = if saved.is_file() { DuoConfig::resumed(&saved, &[])? } else { config.clone() };
            let Some(lora) = duo_train::train::train_lora(&sd, &config, &train_dir, study.log_every)? else {
                println!("training stopped early; rerun the same command to continue");
                return Ok(());
            };
            let spec = lora.display().to_string();
            let unlearned = sd.clone().with_loras(std::slice::from_ref(&spec))?;
            let unlearned_name = lora_model_name(&config.model, &[spec])?;
            let models = Models {
                base: &sd,
                unlearned: &unlearned,
                base_name: &model_name,
                unlearned_name: &unlearned_name,
            };
            let report = run_protocol(&models, &protocol, &names, true, &dir.join("eval"), Shard::WHOLE)?;
            base.get_or_insert_with(|| point(&report, "base", false));
            let mut row = point(&report, &format!("β {beta}"), true);
            row["beta"] = json!(beta);
            row["lr"] = json!(config.lr());
            row["lambda"] = json!(config.lambda());
            row["eval"] = json!(dir.join("eval/report.md"));
            rows.push(row);
        }
        let base = base.unwrap_or(Value::Null);
        let sweep = json!({
            "config": study.config, "protocol": study.protocol, "protocol_hash": protocol.hash()?,
            "preservation_measure": PRESERVATION, "base": base, "betas": rows,
        });
        duo_core::fsutil::write_json(&study.out.join("sweep.json"), &sweep)?;
        let points: Vec<TradeoffPoint> = std::iter::once(&base).chain(&rows).map(to_point).collect();
        let chart = study.out.join("tradeoff.png");
        tradeoff(
            &format!("DUO's trade-off: erasing `{}`", first.concept),
            PRESERVATION,
            &points,
            true,
            &chart,
        )?;
        print_table(&base, &rows);
        println!("wrote {} and {}", study.out.join("sweep.json").display(), chart.display());
        Ok(())
    }
}
