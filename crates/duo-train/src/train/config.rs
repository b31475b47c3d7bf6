//! A DUO run's config (`configs/toy-cross.toml`, `configs/sd14-*.toml`), read, overridden
//! (`--set duo.beta=250`) and resumed as every run config is (`duo_core::run_config`).

use std::path::PathBuf;

use duo_core::Result;
use duo_core::eval::Protocol;
pub use duo_core::judge::JudgeChoice;
use duo_core::judge::JudgeSettings;
use duo_core::judge::nudenet::NudityPreset;
use duo_core::lora::{LoraConfig, LoraTargets};
use duo_core::objective::{Objective, effective_lambda, effective_lr};
use duo_core::run_config::RunConfig;
use duo_core::schedulers::SchedulerChoice;
use serde::{Deserialize, Serialize};

use crate::erase::config::{EsdSection, ReceSection, UceSection};
use crate::learning::Schedule;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuoConfig {
    /// The diffusers folder whose UNet gets the LoRA.
    pub model: PathBuf,
    /// The concept's name: pairs live in `<pairs.dir>/<concept>/{unsafe,safe}`.
    pub concept: String,
    pub pairs: PairsSection,
    pub lora: LoraSection,
    pub duo: DuoSection,
    pub training: TrainingSection,
    /// `duo-train unlearn`'s before/after evaluation: a red-team protocol, usually with its
    /// prompt sets only (`duo-bench eval` takes the same protocol with every attack).
    pub eval: Protocol,
    /// The baselines of `duo-train erase`, each at the authors' setting unless given.
    #[serde(default)]
    pub uce: UceSection,
    #[serde(default)]
    pub rece: ReceSection,
    #[serde(default)]
    pub esd: EsdSection,
}

/// How `duo-train unlearn` (and `duo-train pairs --config`) makes the SDEdit pairs, and where
/// `duo-train train` reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairsSection {
    pub dir: PathBuf,
    /// Number of pairs; the prompt lists are cycled over them.
    pub count: usize,
    pub unsafe_prompts: Vec<String>,
    /// One per unsafe prompt.
    pub safe_prompts: Vec<String>,
    /// SDEdit strength of the safe twin.
    pub strength: f64,
    pub steps: usize,
    pub guidance: f64,
    /// pndm, ddim, euler, dpm-solver, or "default" (the folder's scheduler).
    pub scheduler: SchedulerChoice,
    /// "nudenet", a toy concept judge folder, or "none" (accept every image); the other judge
    /// keys as in a protocol ([`duo_core::judge::JudgeSettings`]).
    pub judge: JudgeChoice,
    /// The toy-world shape the judge looks for ("cross").
    #[serde(default)]
    pub judge_shape: String,
    #[serde(default)]
    pub threshold: Option<f32>,
    #[serde(default)]
    pub judge_preset: Option<NudityPreset>,
    #[serde(default)]
    pub judge_classes: Option<Vec<String>>,
    #[serde(default)]
    pub judge_weights: Option<PathBuf>,
    pub max_tries: usize,
    pub seed: u64,
}

impl PairsSection {
    /// The judge keys.
    pub fn judge_settings(&self) -> JudgeSettings<'_> {
        JudgeSettings {
            judge: &self.judge,
            shape: &self.judge_shape,
            threshold: self.threshold,
            preset: self.judge_preset,
            classes: self.judge_classes.as_deref(),
            weights: self.judge_weights.as_deref(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    pub rank: usize,
    pub alpha: f64,
    /// `self-attn`, `all-attn`, or a regex over diffusers module paths.
    pub targets: String,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuoSection {
    /// `duo`; `diffusion-dpo` (shared t, −½β) for ablations; `sft`, the supervised baseline on the
    /// safe twins alone (no preference, no prior term; β only sets the coupled lr).
    pub objective: Objective,
    pub beta: f64,
    pub base_lr: f64,
    pub base_lambda: f64,
    /// The authors' coupling: lr = base_lr·100/β, λ = base_λ·β/100. Off: both as given.
    pub beta_coupling: bool,
    /// Timesteps of the pair branches, uniform integers in [t_min, t_max).
    pub t_min: usize,
    pub t_max: usize,
    /// The output-preservation branch: pure noise at this timestep.
    pub prior_timestep: usize,
    /// The conditioning prompt of all three branches ("" in the published runs).
    pub prompt: String,
    /// Condition each pair's two branches on the unsafe prompt it was made from (the pair
    /// folder's `manifest.json`) instead of `prompt`; the prior branch keeps `prompt`. Off in the
    /// published runs.
    pub pair_prompts: bool,
    /// Rounds of adversarially mined pairs (0: none). In each, UnlearnDiffAtk (`eval.attack.unlearndiffatk`)
    /// attacks the LoRA trained so far from every unsafe prompt; each image in which it still
    /// regenerates the concept becomes a new pair with its SDEdit safe twin, conditioned on the
    /// prompt the attack found, and training continues on all pairs.
    #[serde(default)]
    pub adversarial_rounds: usize,
    /// Training steps between rounds (a multiple of `training.checkpoint_every`); 0 spreads the
    /// rounds evenly over `training.steps`.
    #[serde(default)]
    pub adversarial_every: usize,
    /// Seeds per unsafe prompt that each round attacks with.
    #[serde(default = "default_adversarial_seeds")]
    pub adversarial_seeds: usize,
}

fn default_adversarial_seeds() -> usize {
    2
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// Optimizer steps.
    pub steps: usize,
    /// Pairs per batch.
    pub batch_size: usize,
    /// Batches per optimizer step (their losses are averaged, as accelerate does).
    pub grad_accumulation: usize,
    /// Global gradient-norm clipping (PyTorch's `clip_grad_norm_`).
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    /// Steps between checkpoints (LoRA + optimizer state); `steps` must be a multiple.
    pub checkpoint_every: usize,
    /// Pairs of the fixed validation batch, run at every checkpoint.
    pub valid_pairs: usize,
    pub seed: u64,
    /// Recompute the cheap, memory-bound ops (softmax, norms, activations) in the backward pass
    /// instead of storing their outputs (Burn's balanced checkpointing). Same gradients, less
    /// memory, more time.
    pub gradient_checkpointing: bool,
}

impl RunConfig for DuoConfig {
    /// What the checkpoints hold and how their batches are drawn.
    const FROZEN_ON_RESUME: &'static [&'static str] = &[
        "model",
        "concept",
        "pairs.dir",
        "lora",
        "training.checkpoint_every",
        "training.batch_size",
        "training.grad_accumulation",
        "training.seed",
    ];

    fn validate(&self) -> std::result::Result<(), String> {
        self.check()
    }
}

impl DuoConfig {
    /// Where `train` reads the pairs and `unlearn` writes them.
    pub fn pair_dir(&self) -> PathBuf {
        self.pairs.dir.join(&self.concept)
    }

    pub fn lr(&self) -> f64 {
        effective_lr(self.duo.base_lr, self.duo.beta, self.duo.beta_coupling)
    }

    pub fn lambda(&self) -> f64 {
        if self.duo.beta_coupling {
            effective_lambda(self.duo.base_lambda, self.duo.beta)
        } else {
            self.duo.base_lambda
        }
    }

    pub fn lora_config(&self) -> Result<LoraConfig> {
        Ok(LoraConfig {
            rank: self.lora.rank,
            alpha: self.lora.alpha,
            targets: self.lora.targets.parse::<LoraTargets>()?,
            seed: self.lora.seed,
        })
    }

    pub fn schedule(&self) -> Schedule {
        let t = &self.training;
        Schedule {
            steps: t.steps,
            batch_size: t.batch_size,
            lr: self.lr(),
            lr_changes: Vec::new(),
            weight_decay: t.weight_decay,
            warmup: 0,
            checkpoint_every: t.checkpoint_every,
            valid_batches: 1,
            grad_accumulation: t.grad_accumulation,
        }
    }

    /// The training steps after which a round of adversarial pairs is mined, in order.
    pub fn adversarial_steps(&self) -> Vec<usize> {
        let (d, t) = (&self.duo, &self.training);
        let every = t.checkpoint_every;
        (1..=d.adversarial_rounds)
            .map(|round| match d.adversarial_every {
                0 => (round * t.steps / (d.adversarial_rounds + 1) + every / 2) / every * every,
                k => round * k,
            })
            .collect()
    }

    fn check(&self) -> std::result::Result<(), String> {
        let (d, t, p) = (&self.duo, &self.training, &self.pairs);
        p.judge_settings().validate().map_err(|message| format!("pairs.{message}"))?;
        self.eval.validate().map_err(|message| format!("eval.{message}"))?;
        for (key, value) in [("duo.beta", d.beta), ("duo.base_lr", d.base_lr)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("{key} = {value}: must be positive"));
            }
        }
        if !(d.base_lambda.is_finite() && d.base_lambda >= 0.0) {
            return Err(format!("duo.base_lambda = {}: must be ≥ 0", d.base_lambda));
        }
        if d.t_min >= d.t_max {
            return Err(format!("duo.t_min = {} must be below duo.t_max = {}", d.t_min, d.t_max));
        }
        for (key, value) in [
            ("training.steps", t.steps),
            ("training.batch_size", t.batch_size),
            ("training.grad_accumulation", t.grad_accumulation),
            ("training.checkpoint_every", t.checkpoint_every),
            ("training.valid_pairs", t.valid_pairs),
            ("pairs.count", p.count),
            ("pairs.steps", p.steps),
            ("pairs.max_tries", p.max_tries),
            ("lora.rank", self.lora.rank),
        ] {
            if value == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        if !t.steps.is_multiple_of(t.checkpoint_every) {
            return Err(format!(
                "training.steps = {} is not a multiple of training.checkpoint_every = {} (checkpoints are burn-train epochs)",
                t.steps, t.checkpoint_every
            ));
        }
        if t.max_grad_norm.is_nan() || t.max_grad_norm <= 0.0 {
            return Err(format!("training.max_grad_norm = {}: must be positive", t.max_grad_norm));
        }
        if p.unsafe_prompts.is_empty() {
            return Err("pairs.unsafe_prompts is empty: give at least one unsafe prompt".into());
        }
        if p.unsafe_prompts.len() != p.safe_prompts.len() {
            return Err(format!(
                "pairs.unsafe_prompts has {} prompts but pairs.safe_prompts has {}: one safe prompt per unsafe one",
                p.unsafe_prompts.len(),
                p.safe_prompts.len()
            ));
        }
        if !(p.strength > 0.0 && p.strength <= 1.0) {
            return Err(format!("pairs.strength = {}: must be in (0, 1]", p.strength));
        }
        self.lora.targets.parse::<LoraTargets>().map_err(|e| format!("lora.targets: {e}"))?;
        self.check_adversarial()?;
        self.uce.check()?;
        self.rece.check()?;
        self.esd.check()
    }

    fn check_adversarial(&self) -> std::result::Result<(), String> {
        let (d, t) = (&self.duo, &self.training);
        if d.adversarial_rounds == 0 {
            return Ok(());
        }
        if self.eval.attack.unlearndiffatk.is_none() {
            return Err(format!(
                "duo.adversarial_rounds = {} mines with UnlearnDiffAtk, whose settings this config lacks: \
                 add an [eval.attack.unlearndiffatk] table (configs/toy-cross.toml has one)",
                d.adversarial_rounds
            ));
        }
        if self.pairs.judge == JudgeChoice::None {
            return Err(
                "duo.adversarial_rounds needs pairs.judge: the mined images are those it sees the concept in"
                    .into(),
            );
        }
        if d.adversarial_seeds == 0 {
            return Err("duo.adversarial_seeds must be at least 1".into());
        }
        let steps = self.adversarial_steps();
        let ordered = steps.windows(2).all(|w| w[0] < w[1]);
        let fits = steps.iter().all(|&s| s > 0 && s < t.steps && s.is_multiple_of(t.checkpoint_every));
        if !ordered || !fits {
            return Err(format!(
                "duo.adversarial_rounds = {} with duo.adversarial_every = {} mines after steps {steps:?}: each must \
                 lie strictly between 0 and training.steps = {}, on a multiple of training.checkpoint_every = {}, \
                 one round per checkpoint at most",
                d.adversarial_rounds, d.adversarial_every, t.steps, t.checkpoint_every
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn configs() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs")
    }

    /// `configs/toy-cross.toml` with `edit` applied, written to a fresh temporary file.
    fn edited_toy_config(name: &str, edit: impl Fn(String) -> String) -> PathBuf {
        let text = std::fs::read_to_string(configs().join("toy-cross.toml")).unwrap();
        let dir = std::env::temp_dir().join(format!("duo-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, edit(text)).unwrap();
        path
    }

    fn load_err(path: &Path, sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        match DuoConfig::load(path, &sets) {
            Ok(_) => panic!("{} with {sets:?} should not load", path.display()),
            Err(e) => e.to_string(),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs()
    }

    /// Every config shipped loads, each with its own schema.
    #[test]
    fn every_run_config_in_configs_loads() {
        let mut loaded = Vec::new();
        for entry in std::fs::read_dir(configs()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            // the other schemas, each through its own type
            match name.as_str() {
                "toy-pretrain.toml" => {
                    crate::pretrain::config::PretrainConfig::load(&path, &[]).unwrap();
                    continue;
                }
                "judge.toml" => {
                    duo_core::judge::JudgeTrainConfig::load(&path, &[]).unwrap();
                    continue;
                }
                _ if name.starts_with("eval-") => {
                    duo_core::eval::Protocol::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                    continue;
                }
                _ if !name.ends_with(".toml") => continue,
                _ => {}
            }
            if let Err(e) = DuoConfig::load(&path, &[]) {
                panic!("{e}");
            }
            loaded.push(name);
        }
        loaded.sort();
        println!("loaded {loaded:?}");
        for name in ["sd14-nudity.toml", "sd14-violence-blood.toml", "toy-cross.toml"] {
            assert!(loaded.iter().any(|n| n == name), "{name} missing from {loaded:?}");
        }
    }

    /// docs/duo-algorithm.md §1 and §3: the SD 1.4 configs hold the published runs' numbers and prompts.
    #[test]
    fn sd14_configs_carry_the_published_settings() {
        let load = |name: &str| DuoConfig::load(&configs().join(name), &[]).unwrap();
        let nudity = load("sd14-nudity.toml");
        assert_eq!(nudity.model, PathBuf::from("models/stable-diffusion-v1-4"));
        assert_eq!((nudity.duo.beta, nudity.pairs.count, nudity.training.steps), (500.0, 64, 1000));
        assert_eq!(nudity.pairs.strength, 0.75);
        assert!(
            close(nudity.lr(), 6e-5) && close(nudity.lambda(), 5e6),
            "{} {}",
            nudity.lr(),
            nudity.lambda()
        );
        assert_eq!(
            nudity.pairs.unsafe_prompts,
            ["a naked white woman, realistic photo", "a naked black woman, realistic photo"]
        );
        assert_eq!(
            nudity.pairs.safe_prompts,
            ["a dressed white woman, realistic photo", "a dressed black woman, realistic photo"]
        );

        let subject =
            |suffix: &str| ["white", "black"].map(|c| format!("a {c} man, realistic photo{suffix}")).to_vec();
        let violence = [
            ("blood", subject(", bleeding"), subject(", in comfort")),
            ("suffer", subject(", suffering"), subject(", enjoying")),
            ("gun", subject(", with a gun"), subject(", with a peace")),
            ("horror", vec!["horror".to_string()], vec!["comfort".to_string()]),
        ];
        for (name, unsafe_prompts, safe_prompts) in violence {
            let c = load(&format!("sd14-violence-{name}.toml"));
            assert_eq!(c.concept, format!("violence-{name}"));
            assert_eq!((c.duo.beta, c.pairs.count, c.training.steps), (1000.0, 32, 500), "{name}");
            assert_eq!(c.pairs.strength, 0.8, "{name}");
            assert!(close(c.lr(), 3e-5) && close(c.lambda(), 1e7), "{name}: {} {}", c.lr(), c.lambda());
            assert_eq!((c.pairs.unsafe_prompts, c.pairs.safe_prompts), (unsafe_prompts, safe_prompts));
            // everything else as in the nudity run
            assert_eq!((&c.model, &c.lora), (&nudity.model, &nudity.lora), "{name}");
            assert_eq!(c.eval.prompts.lookalike, ["ketchup", "strawberry jam", "tomato sauce"], "{name}");
            assert_eq!(c.training.batch_size, nudity.training.batch_size, "{name}");
            assert_eq!(
                (c.pairs.steps, c.pairs.guidance, &c.pairs.scheduler),
                (nudity.pairs.steps, nudity.pairs.guidance, &nudity.pairs.scheduler)
            );
            assert_eq!(
                c.pairs.judge,
                JudgeChoice::None,
                "{name}: violence pairs have no filter in the paper"
            );
            let (d, n) = (&c.duo, &nudity.duo);
            assert_eq!(
                (d.base_lr, d.base_lambda, d.beta_coupling, d.t_min, d.t_max, d.prior_timestep, &d.prompt),
                (n.base_lr, n.base_lambda, n.beta_coupling, n.t_min, n.t_max, n.prior_timestep, &n.prompt)
            );
            assert!(!d.pair_prompts, "{name}");
        }

        // what `duo-bench perf --duo-step` times is this run's step
        let step = duo_core::objective::DuoStep::published();
        assert_eq!(
            (step.beta, step.lambda, step.objective),
            (nudity.duo.beta, nudity.lambda(), nudity.duo.objective)
        );
        assert_eq!(step.max_grad_norm, nudity.training.max_grad_norm);
        assert_eq!(step.grad_accumulation, nudity.training.grad_accumulation);
        use duo_core::objective::published;
        assert_eq!(
            (published::BASE_LR, published::WEIGHT_DECAY),
            (nudity.duo.base_lr, nudity.training.weight_decay)
        );
        let (l, d, t, p) = (&nudity.lora, &nudity.duo, &nudity.training, &nudity.pairs);
        assert_eq!((l.rank, l.alpha, l.targets.as_str()), (32, 32.0, "self-attn"));
        assert_eq!((d.base_lr, d.base_lambda, d.beta_coupling), (3e-4, 1e6, true));
        assert_eq!((d.t_min, d.t_max, d.prior_timestep, d.prompt.as_str()), (0, 750, 999, ""));
        assert!(!d.pair_prompts, "the published runs condition every branch on the prompt");
        assert_eq!((t.batch_size, t.grad_accumulation, t.max_grad_norm, t.weight_decay), (4, 1, 1.0, 1e-2));
        assert_eq!((p.steps, p.guidance), (50, 7.5));
        assert_eq!(
            (p.scheduler, &p.judge),
            (SchedulerChoice::Kind(duo_core::schedulers::SchedulerKind::Pndm), &JudgeChoice::Nudenet)
        );
        // the authors' data filter, and UnlearnDiffAtk's rule for the evaluation
        use duo_core::judge::nudenet::NudityPreset;
        assert_eq!(
            (p.judge_preset, nudity.eval.judge_preset),
            (Some(NudityPreset::DuoData), Some(NudityPreset::Unlearndiffatk))
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let file =
            edited_toy_config("unknown-key.toml", |text| text.replace("[duo]\n", "[duo]\nbetta = 3.0\n"));
        let err = load_err(&file, &[]);
        assert!(err.contains("unknown field `betta`") && err.contains("unknown-key.toml"), "{err}");

        let toy = configs().join("toy-cross.toml");
        let err = load_err(&toy, &["duo.betta=250"]);
        assert!(err.contains("unknown key `duo.betta`"), "{err}");
        let err = load_err(&toy, &["trainig.steps=10"]);
        assert!(err.contains("no section `trainig`"), "{err}");
        let err = load_err(&toy, &["duo.beta"]);
        assert!(err.contains("KEY=VALUE"), "{err}");
        // the words are checked: no silent default
        let err = load_err(&toy, &["duo.objective=dpo"]);
        assert!(err.contains("unknown variant `dpo`") && err.contains("toy-cross.toml"), "{err}");
        let err = load_err(&toy, &["eval.scheduler=heun"]);
        assert!(err.contains("unknown scheduler \"heun\""), "{err}");
        let err = load_err(&toy, &["pairs.judge_shape=star"]);
        assert!(err.contains("pairs.judge_shape = \"star\""), "{err}");
        // each judge takes its own keys
        let err = load_err(&toy, &["pairs.judge=nudenet"]);
        assert!(err.contains("pairs.judge_shape = \"cross\" is a toy-judge setting"), "{err}");
        let err = load_err(&toy, &["eval.judge=nudenet", "eval.judge_shape="]);
        assert!(err.contains("eval.judge_preset is missing"), "{err}");
        let with_preset = |name: &str, preset: &str| {
            let line = format!("[pairs]\njudge_preset = \"{preset}\"\n");
            edited_toy_config(name, |text| text.replace("[pairs]\n", &line))
        };
        let err = load_err(&with_preset("toy-preset.toml", "rece"), &[]);
        assert!(err.contains("pairs.judge_preset is a NudeNet setting"), "{err}");
        let err = load_err(&with_preset("bad-preset.toml", "strict"), &[]);
        assert!(err.contains("unknown variant `strict`"), "{err}");
        let nudenet = ["pairs.judge=nudenet", "pairs.judge_shape="];
        let config =
            DuoConfig::load(&with_preset("preset.toml", "duo-data"), &nudenet.map(String::from)).unwrap();
        assert_eq!(config.pairs.judge_preset, Some(duo_core::judge::nudenet::NudityPreset::DuoData));
    }

    #[test]
    fn set_overrides_keys() {
        let toy = configs().join("toy-cross.toml");
        let sets =
            ["duo.beta=250", "pairs.unsafe_prompts=[\"a red cross\"]", "pairs.safe_prompts=[\"a plus\"]"];
        let config = DuoConfig::load(&toy, &sets.map(String::from)).unwrap();
        assert_eq!(config.duo.beta, 250.0);
        assert!(close(config.lr(), 1e-3 * 100.0 / 250.0), "the coupling follows β: {}", config.lr());
        assert_eq!(config.pairs.unsafe_prompts, ["a red cross"]);
        // a value that is not TOML is a string
        let config = DuoConfig::load(&toy, &["duo.prompt=a red cross".to_string()]).unwrap();
        assert_eq!(config.duo.prompt, "a red cross");
        // the rest is the file's: the toy's departures from the published runs
        let d = &config.duo;
        assert_eq!((d.beta, d.base_lr, d.t_max, d.pair_prompts), (100.0, 1e-3, 1000, true));
        let config = DuoConfig::load(&toy, &["duo.pair_prompts=false".to_string()]).unwrap();
        assert!(!config.duo.pair_prompts);
    }

    #[test]
    fn empty_unsafe_prompts_are_an_error() {
        let toy = configs().join("toy-cross.toml");
        let err = load_err(&toy, &["pairs.unsafe_prompts=[]", "pairs.safe_prompts=[]"]);
        assert!(err.contains("pairs.unsafe_prompts is empty"), "{err}");

        let file = edited_toy_config("empty-prompts.toml", |text| {
            let lines: Vec<String> = text
                .lines()
                .map(|line| match line.split_once(" = ") {
                    Some((key @ ("unsafe_prompts" | "safe_prompts"), _)) => format!("{key} = []"),
                    _ => line.to_string(),
                })
                .collect();
            lines.join("\n")
        });
        let err = load_err(&file, &[]);
        assert!(err.contains("pairs.unsafe_prompts is empty") && err.contains("empty-prompts.toml"), "{err}");
    }

    #[test]
    fn adversarial_rounds_fall_on_checkpoints_within_the_training() {
        let toy = configs().join("toy-cross.toml");
        let load = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            DuoConfig::load(&toy, &sets).unwrap()
        };
        assert!(load(&[]).adversarial_steps().is_empty(), "off by default");
        // 400 steps, checkpoints every 50: thirds at 133 and 267, on the nearest checkpoints
        assert_eq!(load(&["duo.adversarial_rounds=2"]).adversarial_steps(), [150, 250]);
        let every = load(&["duo.adversarial_rounds=3", "duo.adversarial_every=100"]);
        assert_eq!(every.adversarial_steps(), [100, 200, 300]);
        for (sets, expected) in [
            (
                &["duo.adversarial_rounds=4", "duo.adversarial_every=100"][..],
                "strictly between 0 and training.steps",
            ),
            (
                &["duo.adversarial_rounds=1", "duo.adversarial_every=75"],
                "multiple of training.checkpoint_every",
            ),
            (&["duo.adversarial_rounds=12"], "one round per checkpoint"),
            (&["duo.adversarial_rounds=1", "pairs.judge=none"], "needs pairs.judge"),
            (&["duo.adversarial_rounds=1", "duo.adversarial_seeds=0"], "adversarial_seeds"),
        ] {
            let err = load_err(&toy, sets);
            assert!(err.contains(expected), "{sets:?}: {err}");
        }
        // a config without the attack's settings names the table to add
        let violence = configs().join("sd14-violence-blood.toml");
        let err = load_err(&violence, &["duo.adversarial_rounds=1"]);
        assert!(err.contains("[eval.attack.unlearndiffatk]"), "{err}");
    }
}
