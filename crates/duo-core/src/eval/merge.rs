//! Joining the folders of a sharded evaluation (`duo-bench eval --shard I/N`) into one folder
//! holding every unit, whose report is the report of the unsharded run.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::report::{LOOKALIKE, SAFE};
use super::{
    AttackInfo, AttackName, AttackRun, Goal, Protocol, RunFolder, Shard, UnitRecord, open_run_folder,
};
use crate::error::{DuoError, Result, read_json};
use crate::run_config::RunConfig;

/// A merged evaluation, ready for its report.
pub struct Merged {
    pub protocol: Protocol,
    pub base: String,
    pub unlearned: String,
    /// The judge as the shards' reports name it.
    pub judge: Value,
    pub runs: Vec<AttackRun>,
    pub folder: RunFolder,
}

/// Checks that `shards` are the N shards of one evaluation (the same protocol and models, each of
/// 0..N once, each finished), and copies their units, images and found embeddings into `out`.
pub fn merge_shards(shards: &[PathBuf], out: &Path) -> Result<Merged> {
    let first = shards.first().ok_or_else(|| DuoError::Invalid("merge needs the shard folders".into()))?;
    let identity = |dir: &Path| -> Result<(Value, Shard)> {
        let run: Value = read_json(&dir.join("run.json"))?;
        let shard = run["shard"].as_str().unwrap_or("0/1").parse::<Shard>().map_err(DuoError::Invalid)?;
        Ok((run, shard))
    };
    let (reference, first_shard) = identity(first)?;
    let mut holders: Vec<Option<&PathBuf>> = vec![None; first_shard.count];
    for dir in shards {
        let (run, shard) = identity(dir)?;
        for key in ["protocol_hash", "base", "unlearned"] {
            if run[key] != reference[key] {
                return Err(DuoError::Invalid(format!(
                    "{} and {} are not shards of one evaluation: their {key} differs ({} and {})",
                    first.display(),
                    dir.display(),
                    reference[key],
                    run[key]
                )));
            }
        }
        if shard.count != first_shard.count {
            return Err(DuoError::Invalid(format!(
                "{} is shard {shard} and {} is shard {first_shard}: one evaluation has one shard count",
                dir.display(),
                first.display()
            )));
        }
        if let Some(other) = holders[shard.index].replace(dir) {
            return Err(DuoError::Invalid(format!(
                "{} and {} are both shard {shard}",
                other.display(),
                dir.display()
            )));
        }
        if !dir.join("report.json").is_file() {
            return Err(DuoError::Invalid(format!(
                "{} (shard {shard}) has not finished: it has no report.json; rerun its eval, which continues where it stopped",
                dir.display()
            )));
        }
    }
    let holders: Vec<&PathBuf> = (holders.iter().enumerate())
        .map(|(i, h)| {
            h.ok_or_else(|| DuoError::Invalid(format!("shard {i}/{} is missing", first_shard.count)))
        })
        .collect::<Result<_>>()?;

    let protocol = Protocol::load(&first.join("protocol.toml"), &[])?;
    let text = |key: &str| reference[key].as_str().unwrap_or_default().to_string();
    let (base, unlearned) = (text("base"), text("unlearned"));
    let folder = open_run_folder(out, &protocol, &base, &unlearned, Shard::WHOLE)?;
    let judge = read_json::<Value>(&first.join("report.json"))?["judge"].clone();
    let sources: Vec<RunFolder> =
        holders.iter().map(|dir| RunFolder { root: dir.to_path_buf(), shard: first_shard }).collect();
    let runs = attack_names(first)?
        .into_iter()
        .map(|name| merge_attack(&name, &sources, &folder))
        .collect::<Result<Vec<_>>>()?;
    Ok(Merged { protocol, base, unlearned, judge, runs, folder })
}

/// The attacks a shard ran, in the protocol's order of attacks, then the preservation groups.
fn attack_names(shard: &Path) -> Result<Vec<String>> {
    let units = shard.join("units");
    let entries = std::fs::read_dir(&units).map_err(|e| DuoError::io(&units, e))?;
    let mut names: Vec<String> =
        entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let rank = |name: &String| match name.parse::<AttackName>() {
        Ok(attack) => (AttackName::ALL.iter().position(|a| *a == attack).unwrap_or(0), 0),
        Err(_) => (AttackName::ALL.len(), [SAFE, LOOKALIKE].iter().position(|g| g == name).unwrap_or(2)),
    };
    names.sort_by_key(|n| rank(n));
    Ok(names)
}

/// One attack's units from the shard that holds each, copied into `out`.
fn merge_attack(name: &str, shards: &[RunFolder], out: &RunFolder) -> Result<AttackRun> {
    let info: AttackInfo = read_json(&shards[0].attack_info(name))?;
    crate::fsutil::write_json(&out.attack_info(name), &info)?;
    let mut records = Vec::with_capacity(info.units);
    for index in 0..info.units {
        let source = &shards[index % shards.len()];
        let unit = source.unit(name, index);
        if !unit.is_file() {
            return Err(DuoError::Invalid(format!(
                "{} (shard {}) lacks {name}'s unit {index}: rerun its eval, which continues where it stopped",
                source.root.display(),
                source.shard.with_index(index % shards.len())
            )));
        }
        let record: UnitRecord = read_json(&unit)?;
        copy(&unit, &out.unit(name, index))?;
        for verdict in &record.base {
            for unlearned in [false, true] {
                copy(
                    &source.image(name, index, verdict.seed, unlearned),
                    &out.image(name, index, verdict.seed, unlearned),
                )?;
            }
        }
        if record.found.is_some() {
            copy(&source.found(name, index), &out.found(name, index))?;
        }
        records.push(record);
    }
    let indices = (0..info.units).collect();
    let goal: Goal = info.goal;
    Ok(AttackRun { name: name.to_string(), goal, settings: info.settings, indices, records })
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| DuoError::io(parent, e))?;
    }
    std::fs::copy(from, to).map(|_| ()).map_err(|e| DuoError::io(from, e))
}
