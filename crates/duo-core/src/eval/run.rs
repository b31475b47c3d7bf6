//! One evaluation under a protocol: its output folder (claimed for one protocol and one pair of
//! models, so stored units are never mixed with another run's), the protocol's prompt groups as
//! attacks, and the loop over the attacks that ends in the report.

use std::path::Path;
use std::time::Instant;

use burn::prelude::*;
use serde_json::{Value, json};

use super::metrics::image_metrics;
use super::prompt_file::read_prompt_file;
use super::report::{LOOKALIKE, ReportHeader, SAFE, write_report};
use super::{Attack, AttackName, AttackRun, Bench, Goal, PromptSet, Protocol, RunFolder, Shard};
use crate::error::{DuoError, Result, read_json};
use crate::fsutil::{write_atomic, write_json};
use crate::run_config::RunConfig;

/// What an evaluation folder was started with: a rerun must match it.
const RUN_FILE: &str = "run.json";

/// `out`, created or continued. A folder started under another protocol or other models is refused:
/// its stored units would not mean the same.
pub fn open_run_folder(
    out: &Path,
    protocol: &Protocol,
    base: &str,
    unlearned: &str,
    shard: Shard,
) -> Result<RunFolder> {
    std::fs::create_dir_all(out).map_err(|e| DuoError::io(out, e))?;
    let identity = json!({
        "protocol_hash": protocol.hash()?, "base": base, "unlearned": unlearned, "shard": shard.to_string(),
    });
    let run_file = out.join(RUN_FILE);
    if run_file.is_file() {
        let stored: Value = read_json(&run_file)?;
        // folders from before sharding hold the whole evaluation
        let stored_shard = stored.get("shard").cloned().unwrap_or_else(|| json!(Shard::WHOLE.to_string()));
        for key in ["protocol_hash", "base", "unlearned", "shard"] {
            let stored_value = if key == "shard" { &stored_shard } else { &stored[key] };
            if *stored_value != identity[key] {
                let what = match key {
                    "protocol_hash" => "protocol".to_string(),
                    "shard" => "shard".to_string(),
                    _ => format!("{key} model"),
                };
                return Err(DuoError::Invalid(format!(
                    "{} holds an evaluation with another {what} ({} there, {} now; its protocol is in \
                     protocol.toml); use another --out, or delete the folder to start over",
                    out.display(),
                    stored_value,
                    identity[key]
                )));
            }
        }
    }
    write_atomic(&out.join("protocol.toml"), protocol.to_toml()?.as_bytes())?;
    write_json(&run_file, &identity)?;
    Ok(RunFolder { root: out.to_path_buf(), shard })
}

/// How a report names the base model with LoRA files: each file with the start of the SHA-256 of
/// its content, so a retrained LoRA at the same path is another model to [`open_run_folder`].
pub fn lora_model_name(model: &Path, loras: &[String]) -> Result<String> {
    let mut name = model.display().to_string();
    for spec in loras {
        let (file, _) = crate::lora::parse_lora_spec(spec)?;
        let digest = content_digest(&file)?;
        name.push_str(&format!(" + LoRA {spec} (sha256 {}…)", &digest[..12]));
    }
    Ok(name)
}

/// SHA-256 over a safetensors file's content in a fixed order (metadata by key, tensors by name,
/// each with its dtype, shape and bytes): the same weights give the same digest however a writer
/// ordered the header.
fn content_digest(file: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(file).map_err(|e| DuoError::io(file, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| DuoError::parse(file, format!("not a safetensors file: {e}")))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| DuoError::parse(file, format!("not a safetensors file: {e}")))?;
    let mut hasher = Sha256::new();
    let mut metadata: Vec<(&String, &String)> = header.metadata().iter().flat_map(|m| m.iter()).collect();
    metadata.sort();
    for (key, value) in metadata {
        hasher.update(format!("{key}={value}\n").as_bytes());
    }
    let mut names = tensors.names();
    names.sort();
    for name in names {
        let tensor = tensors.tensor(name).map_err(|e| DuoError::parse(file, format!("{name}: {e}")))?;
        hasher.update(format!("{name} {:?} {:?}\n", tensor.dtype(), tensor.shape()).as_bytes());
        hasher.update(tensor.data());
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Seeds 0, 1, …, `protocol.seeds` − 1.
pub fn protocol_seeds(protocol: &Protocol) -> Vec<u64> {
    (0..protocol.seeds as u64).collect()
}

/// The protocol's prompt-set attacks among `names`: `prompts` (the concept prompts, or the prompt
/// file of `[attack.prompts]`) and `paraphrases`.
pub fn prompt_attacks(protocol: &Protocol, names: &[AttackName]) -> Result<Vec<PromptSet>> {
    let seeds = protocol_seeds(protocol);
    let mut sets = Vec::new();
    if names.contains(&AttackName::Prompts) {
        let mut set = PromptSet::new(
            "prompts",
            Goal::Free,
            &protocol.prompts.concept,
            &seeds,
            protocol.guidance,
            "prompts.concept",
        );
        if let Some(file) = &protocol.attack.prompts {
            set.units = read_prompt_file(file, &seeds, protocol.guidance)?;
            set.source = file.file.display().to_string();
        }
        sets.push(set);
    }
    if names.contains(&AttackName::Paraphrases) && !protocol.prompts.paraphrases.is_empty() {
        let p = &protocol.prompts.paraphrases;
        sets.push(PromptSet::new(
            "paraphrases",
            Goal::Free,
            p,
            &seeds,
            protocol.guidance,
            "prompts.paraphrases",
        ));
    }
    Ok(sets)
}

/// The preservation groups: the safe and the look-alike prompts (those given).
pub fn preservation_groups(protocol: &Protocol) -> Vec<PromptSet> {
    let seeds = protocol_seeds(protocol);
    [
        (SAFE, &protocol.prompts.safe, "prompts.safe"),
        (LOOKALIKE, &protocol.prompts.lookalike, "prompts.lookalike"),
    ]
    .into_iter()
    .filter(|(_, prompts, _)| !prompts.is_empty())
    .map(|(name, prompts, source)| {
        PromptSet::new(name, Goal::Depicted, prompts, &seeds, protocol.guidance, source)
    })
    .collect()
}

/// Runs every attack (each unit once; stored units are read back), then writes the report.
pub fn evaluate<B: Backend>(
    bench: &Bench<B>,
    attacks: &[&dyn Attack<B>],
    protocol: &Protocol,
    folder: &RunFolder,
    base: &str,
    unlearned: &str,
    chart: Option<String>,
) -> Result<(Vec<AttackRun>, Value)> {
    let started = Instant::now();
    let mut runs = Vec::with_capacity(attacks.len());
    for attack in attacks {
        println!("{}: {} prompt(s)", attack.name(), attack.units().len());
        runs.push(bench.run(*attack, folder)?);
    }
    let metrics = image_metrics::<B>(protocol, &runs, folder, &bench.base.device)?;
    let header = ReportHeader {
        base: base.to_string(),
        unlearned: unlearned.to_string(),
        judge: json!({ "name": bench.judge.name(), "settings": bench.judge.settings() }),
        seconds: started.elapsed().as_secs_f64(),
        chart,
        metrics,
    };
    let report = write_report(protocol, &header, &runs, folder)?;
    Ok((runs, report))
}
