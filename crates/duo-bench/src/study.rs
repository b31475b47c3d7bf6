//! What a study of several models shares (`sweep`, `compare`): the run config every model is made
//! from, the protocol every model is evaluated under, and the folder it all goes into.

use std::path::PathBuf;

use clap::Args;
use duo_core::Result;
use duo_core::eval::{AttackName, Protocol};
use duo_core::run_config::RunConfig;
use duo_train::train::config::DuoConfig;

use crate::eval::attack_names;

#[derive(Args, Debug, Clone)]
pub struct StudyArgs {
    /// The run config every model is made from: model, concept, pairs, LoRA, training, and the
    /// baselines' sections ([esd], [uce], [rece]).
    #[arg(long, default_value = "configs/toy-cross.toml")]
    pub config: PathBuf,
    /// Override a config key (repeatable), e.g. --set training.steps=200.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The protocol every model is evaluated under.
    #[arg(long, default_value = "configs/eval-toy-cross.toml")]
    pub protocol: PathBuf,
    /// Override a protocol key (repeatable), e.g. --protocol-set seeds=4.
    #[arg(long = "protocol-set", value_name = "KEY=VALUE")]
    pub protocol_set: Vec<String>,
    /// The attacks (default: the protocol's).
    #[arg(long, value_delimiter = ',')]
    pub attacks: Vec<String>,
    /// Where the shared pairs, each model's run and evaluation, and the study's table and chart go;
    /// a rerun with the same folder continues.
    #[arg(long)]
    pub out: PathBuf,
    /// Without a terminal, print the training metrics every this many steps.
    #[arg(long, default_value_t = 50)]
    pub log_every: usize,
}

impl StudyArgs {
    /// The protocol and the attacks to run.
    pub fn protocol(&self) -> Result<(Protocol, Vec<AttackName>)> {
        let protocol = Protocol::load(&self.protocol, &self.protocol_set)?;
        let names = attack_names(&protocol, &self.attacks)?;
        Ok((protocol, names))
    }

    /// The run config with `--set` and then `extra` applied, its pairs in `<out>/pairs`.
    pub fn config(&self, extra: &[String]) -> Result<DuoConfig> {
        let mut sets = self.set.clone();
        sets.push(format!("pairs.dir={}", self.out.join("pairs").display()));
        sets.extend_from_slice(extra);
        DuoConfig::load(&self.config, &sets)
    }
}
