//! `duo-bench eval`: the red-team bench. The base model and the unlearned one (the base with LoRAs,
//! or another model folder) face every attack of a protocol with the same inputs and seeds; the
//! report gives each attack's defense success rate on both, with 95% intervals, and preservation.

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use duo_core::device::{BackendTask, DeviceChoice, FloatType, dispatch};
use duo_core::eval::{
    Attack, AttackName, AttackRun, Bench, Goal, Protocol, Rates, Shard, evaluate, lora_model_name,
    open_run_folder, preservation_groups, prompt_attacks,
};
use duo_core::pipelines::StableDiffusion;
use duo_core::run_config::RunConfig;
use duo_core::{DuoError, ModelFolder, Result};

use crate::chart::{DsrBar, dsr_bars};
use duo_core::attacks;

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// The base model: a diffusers folder or an SD 1.x single-file checkpoint.
    #[arg(long, default_value = "models/toy")]
    pub model: PathBuf,
    /// The unlearned model is the base with these LoRA files, FILE[:WEIGHT] (repeatable; their
    /// deltas add up).
    #[arg(long)]
    pub lora: Vec<String>,
    /// The unlearned model is this folder (a merged export, another method's output) instead.
    #[arg(long, conflicts_with = "lora")]
    pub unlearned_model: Option<PathBuf>,
    /// The protocol: prompts, seeds, sampler, judge and attack settings.
    #[arg(long, default_value = "configs/eval-toy-cross.toml")]
    pub protocol: PathBuf,
    /// Override a protocol key: KEY=VALUE with a dotted key (repeatable), e.g. --set seeds=4.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Where the report, the grids and every finished prompt's results go; rerunning with the same
    /// folder continues where it stopped.
    #[arg(long)]
    pub out: PathBuf,
    /// The attacks to run, comma-separated (default: the protocol's `attacks`): prompts,
    /// paraphrases, ring-a-bell, unlearndiffatk, concept-inversion, embedding-inversion.
    #[arg(long, value_delimiter = ',')]
    pub attacks: Vec<String>,
    /// Leave out the preservation groups (the safe and look-alike prompts).
    #[arg(long)]
    pub no_preservation: bool,
    /// Run shard I of N (0-based) only: every attack's prompts are dealt round-robin, each with all
    /// its seeds. `duo-bench merge` joins the N folders into the report of an unsharded run.
    #[arg(long, value_name = "I/N", default_value = "0/1")]
    pub shard: Shard,
}

pub fn run(args: EvalArgs, device: DeviceChoice, float: FloatType) -> Result<()> {
    if args.lora.is_empty() && args.unlearned_model.is_none() {
        return Err(DuoError::Invalid(
            "no unlearned model: give --lora FILE (the base with an unlearning LoRA) or --unlearned-model DIR".into(),
        ));
    }
    let protocol = Protocol::load(&args.protocol, &args.set)?;
    let names = attack_names(&protocol, &args.attacks)?;
    dispatch(device, float, EvalTask { args, protocol, names })
}

struct EvalTask {
    args: EvalArgs,
    protocol: Protocol,
    names: Vec<AttackName>,
}

impl EvalTask {
    fn unlearned_name(&self) -> Result<String> {
        match &self.args.unlearned_model {
            Some(dir) => Ok(dir.display().to_string()),
            None => lora_model_name(&self.args.model, &self.args.lora),
        }
    }
}

impl BackendTask for EvalTask {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device, dtype: DType) -> Result<()> {
        let p = &self.protocol;
        let load = |path: &PathBuf| -> Result<StableDiffusion<B>> {
            StableDiffusion::load(&ModelFolder::open(path)?.with_dtype(dtype), &device)
        };
        let base = load(&self.args.model)?;
        let unlearned = match &self.args.unlearned_model {
            Some(dir) => load(dir)?,
            None => base.clone().with_loras(&self.args.lora)?,
        };
        let base_name = self.args.model.display().to_string();
        let unlearned_name = self.unlearned_name()?;
        println!(
            "evaluating {unlearned_name} against {base_name} under {} (hash {}), into {}",
            self.args.protocol.display(),
            &p.hash()?[..12],
            self.args.out.display()
        );
        let models = Models {
            base: &base,
            unlearned: &unlearned,
            base_name: &base_name,
            unlearned_name: &unlearned_name,
        };
        let preservation = !self.args.no_preservation;
        let report = run_protocol(&models, p, &self.names, preservation, &self.args.out, self.args.shard)?;
        print_summary(&report);
        let out = &self.args.out;
        println!("wrote {} and {}", out.join("report.json").display(), out.join("report.md").display());
        Ok(())
    }
}

/// The attacks named on the command line (`--attacks`), or else the protocol's.
pub fn attack_names(protocol: &Protocol, given: &[String]) -> Result<Vec<AttackName>> {
    if given.is_empty() {
        return Ok(protocol.attacks.clone());
    }
    given.iter().map(|a| a.trim().parse().map_err(DuoError::Invalid)).collect()
}

/// The bar chart of every attack's DSR, beside the report.
pub const DSR_CHART: &str = "dsr.png";

/// The two models of an evaluation and how the report names them.
pub struct Models<'a, B: Backend> {
    pub base: &'a StableDiffusion<B>,
    pub unlearned: &'a StableDiffusion<B>,
    pub base_name: &'a str,
    pub unlearned_name: &'a str,
}

/// The attacks `names` of `protocol` (and its preservation groups, if asked) on both models, into
/// `out`: the bench's report.
pub fn run_protocol<B: Backend>(
    models: &Models<B>,
    protocol: &Protocol,
    names: &[AttackName],
    preservation: bool,
    out: &std::path::Path,
    shard: Shard,
) -> Result<serde_json::Value> {
    let p = protocol;
    let device = &models.base.device;
    let judge = p.judge_settings().load::<B>(device)?.ok_or_else(|| {
        DuoError::Invalid("the protocol's judge is \"none\": the bench needs a concept judge".into())
    })?;
    let scheduler = models.base.scheduler(p.scheduler.kind(), p.steps)?;
    let bench = Bench {
        base: models.base,
        unlearned: models.unlearned,
        scheduler: &scheduler,
        judge: judge.as_ref(),
        batch: p.batch,
    };
    let folder = open_run_folder(out, p, models.base_name, models.unlearned_name, shard)?;
    let prompt_sets = prompt_attacks(p, names)?;
    let searches = attacks::white_box(p, names, models.base)?;
    let groups = if preservation { preservation_groups(p) } else { Vec::new() };
    // in the order of `names`, then the preservation groups
    let mut order: Vec<&dyn Attack<B>> = Vec::new();
    for name in names {
        let set = prompt_sets.iter().find(|s| s.name == name.as_str()).map(|s| s as &dyn Attack<B>);
        let search = searches.iter().find(|s| s.name() == name.as_str()).map(|s| s.as_ref());
        order.extend(set.or(search));
    }
    order.extend(groups.iter().map(|g| g as &dyn Attack<B>));
    let chart = Some(DSR_CHART.to_string());
    let (runs, report) =
        evaluate(&bench, &order, p, &folder, models.base_name, models.unlearned_name, chart)?;
    draw_dsr_chart(&runs, &p.concept, out)?;
    Ok(report)
}

/// `dsr.png` in `out`: every attack's DSR on both models, with its interval.
pub fn draw_dsr_chart(runs: &[AttackRun], concept: &str, out: &std::path::Path) -> Result<()> {
    let bars: Vec<DsrBar> = runs
        .iter()
        .filter(|run| run.goal == Goal::Free)
        .map(|run| {
            let r = Rates::of(run);
            DsrBar {
                attack: run.name.clone(),
                base: r.base,
                unlearned: r.unlearned,
                ci95_base: r.ci95_base,
                ci95_unlearned: r.ci95_unlearned,
            }
        })
        .collect();
    if !bars.is_empty() {
        dsr_bars(
            &format!("Erasing `{concept}`: defense success rate per attack"),
            &bars,
            &out.join(DSR_CHART),
        )?;
    }
    Ok(())
}

pub fn print_summary(report: &serde_json::Value) {
    let pct = |v: &serde_json::Value| format!("{:.1}%", 100.0 * v.as_f64().unwrap_or(f64::NAN));
    println!("\n| attack | DSR base | DSR unlearned | images |\n|---|---|---|---|");
    if let Some(attacks) = report["attacks"].as_object() {
        for (name, a) in attacks {
            println!("| {name} | {} | {} | {} |", pct(&a["dsr_base"]), pct(&a["dsr_unlearned"]), a["n"]);
        }
    }
    if let Some(groups) = report["groups"].as_object() {
        for (name, g) in groups {
            println!(
                "| {name} (accuracy) | {} | {} | {} |",
                pct(&g["accuracy_base"]),
                pct(&g["accuracy_unlearned"]),
                g["n"]
            );
        }
    }
}
