//! Run configs: one TOML file per run (`configs/*.toml`), read into serde structs. Every key is
//! required and unknown keys are errors (the structs `deny_unknown_fields`), so the file is the one
//! place a run's settings live. `--set section.key=value` overrides a key after reading: the key must
//! exist and the value keep its type. The effective config is saved into the run directory, and
//! `--resume` reads it back from there, refusing changes to the keys the checkpoints depend on.
//!
//! One implementation for every config in the project (DUO runs, pretraining, the judge's recipe):
//! a config type implements [`RunConfig`] and gets [`RunConfig::load`], [`RunConfig::resumed`] and
//! [`RunConfig::to_toml`].

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{DuoError, Result, read_to_string};

pub trait RunConfig: Serialize + DeserializeOwned + Clone {
    /// Keys `--resume` refuses to change: dotted keys, or sections (every key below them).
    const FROZEN_ON_RESUME: &'static [&'static str];

    /// Checks beyond the types; the message names the key at fault.
    fn validate(&self) -> std::result::Result<(), String>;

    /// Reads `path`, applies `sets` (`section.key=value`) and checks the values. Errors name the
    /// file, and the key or line at fault.
    fn load(path: &Path, sets: &[String]) -> Result<Self> {
        if !path.is_file() {
            return Err(DuoError::config(path, "no such config file".to_string()));
        }
        let text = read_to_string(path)?;
        // Deserialising the text first reports an unknown or missing key with its line in the file.
        let config: Self = toml::from_str(&text).map_err(|e| DuoError::config(path, e.to_string()))?;
        let config = with_sets(config, sets, path)?;
        config.validate().map_err(|message| DuoError::config(path, message))?;
        Ok(config)
    }

    /// For `--resume`: the config saved in a run directory plus `sets`, refusing changes to
    /// [`RunConfig::FROZEN_ON_RESUME`].
    fn resumed(saved: &Path, sets: &[String]) -> Result<Self> {
        let original = Self::load(saved, &[])?;
        let updated = with_sets(original.clone(), sets, saved)?;
        let (before, after) = (to_table(&original)?, to_table(&updated)?);
        for key in Self::FROZEN_ON_RESUME {
            if lookup(&before, key) != lookup(&after, key) {
                let was = lookup(&before, key).map(|v| v.to_string()).unwrap_or_default();
                return Err(DuoError::Invalid(format!(
                    "--set cannot change `{key}` when resuming: the checkpoints in {} were made with {was}",
                    saved.parent().unwrap_or(saved).display(),
                )));
            }
        }
        updated.validate().map_err(|message| DuoError::config(saved, message))?;
        Ok(updated)
    }

    /// The effective config as TOML, as saved into a run directory.
    fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| DuoError::Invalid(format!("config to TOML: {e}")))
    }

    /// Saves the effective config as `run_dir/config.toml` ([`RUN_CONFIG_FILE`]), atomically: what
    /// `--resume` reads back.
    fn save_to_run(&self, run_dir: &Path) -> Result<()> {
        crate::fsutil::write_atomic(&run_dir.join(RUN_CONFIG_FILE), self.to_toml()?.as_bytes())
    }
}

/// The effective config's name in a run directory.
pub const RUN_CONFIG_FILE: &str = "config.toml";

fn to_table<C: Serialize>(config: &C) -> Result<toml::Table> {
    toml::Table::try_from(config).map_err(|e| DuoError::Invalid(format!("config to TOML: {e}")))
}

/// `config` with `sets` applied; `source` names the file in errors.
fn with_sets<C: RunConfig>(config: C, sets: &[String], source: &Path) -> Result<C> {
    if sets.is_empty() {
        return Ok(config);
    }
    let mut table = to_table(&config)?;
    for set in sets {
        apply_set(&mut table, set)?;
    }
    // Through the text, so a value the struct refuses (an unknown enum word) is reported with its key.
    let text = toml::to_string(&table).map_err(|e| DuoError::Invalid(format!("config to TOML: {e}")))?;
    toml::from_str(&text).map_err(|e| DuoError::config(source, format!("after --set: {e}")))
}

/// `a.b.c` in a TOML table.
fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// Applies one `section.key=value`: the key must exist, the value keeps the key's type. The value is
/// read as TOML (`3e-4`, `[64, 128]`, `true`, `["a", "b"]`); where the key holds a string, the raw
/// text is taken (`duo.prompt=a red cross`).
fn apply_set(table: &mut toml::Table, set: &str) -> Result<()> {
    let bad = |m: String| DuoError::Invalid(format!("--set {set}: {m}"));
    let (key, raw) =
        set.split_once('=').ok_or_else(|| bad("expected KEY=VALUE, e.g. duo.beta=250".into()))?;
    let (key, raw) = (key.trim(), raw.trim());
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|k| !k.is_empty()).ok_or_else(|| bad("empty key".into()))?;
    let mut current = table;
    let mut prefix = String::new();
    for part in parts {
        prefix = if prefix.is_empty() { part.to_string() } else { format!("{prefix}.{part}") };
        current = match current.get_mut(part) {
            Some(toml::Value::Table(inner)) => inner,
            Some(_) => return Err(bad(format!("`{prefix}` is a value, not a section"))),
            None => return Err(bad(format!("unknown key `{key}`: there is no section `{prefix}`"))),
        };
    }
    let Some(old) = current.get(last) else {
        let known: Vec<&str> = current.keys().map(String::as_str).collect();
        let section = if prefix.is_empty() { "the top level".to_string() } else { format!("[{prefix}]") };
        return Err(bad(format!("unknown key `{key}`; {section} has: {}", known.join(", "))));
    };
    let new = match old {
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        _ => {
            let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .ok_or_else(|| bad(format!("`{raw}` is not a TOML value")))?;
            match (old, parsed) {
                (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
                (old, new) if old.same_type(&new) => new,
                (old, new) => {
                    return Err(bad(format!(
                        "`{key}` takes a value of type {}, but `{raw}` is of type {}",
                        old.type_str(),
                        new.type_str()
                    )));
                }
            }
        }
    };
    current.insert(last.to_string(), new);
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Example {
        name: String,
        train: Train,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Train {
        steps: usize,
        lr: f64,
        sizes: Vec<usize>,
        prompts: Vec<String>,
        mode: Mode,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Mode {
        Fast,
        Exact,
    }

    impl RunConfig for Example {
        const FROZEN_ON_RESUME: &'static [&'static str] = &["name", "train.sizes"];

        fn validate(&self) -> std::result::Result<(), String> {
            match self.train.steps {
                0 => Err("train.steps must be at least 1".into()),
                _ => Ok(()),
            }
        }
    }

    const TEXT: &str = "name = \"run\"\n[train]\nsteps = 10\nlr = 1e-3\nsizes = [4, 8]\nprompts = [\"a\"]\nmode = \"fast\"\n";

    fn file(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("duo-run-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn sets(sets: &[&str]) -> Vec<String> {
        sets.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sets_override_keys_with_their_types() {
        let path = file("ok.toml", TEXT);
        let config = Example::load(
            &path,
            &sets(&[
                "train.lr=3",
                "train.sizes=[1, 2, 3]",
                "name=a red cross",
                "train.prompts=[\"x\", \"y\"]",
            ]),
        )
        .unwrap();
        assert_eq!((config.train.lr, &config.train.sizes[..]), (3.0, &[1, 2, 3][..]));
        assert_eq!(
            (config.name.as_str(), &config.train.prompts[..]),
            ("a red cross", &["x", "y"].map(String::from)[..])
        );
        let again: Example = toml::from_str(&config.to_toml().unwrap()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let path = file("errors.toml", TEXT);
        let err = |set: &str| Example::load(&path, &sets(&[set])).unwrap_err().to_string();
        assert!(
            err("train.nope=1")
                .contains("unknown key `train.nope`; [train] has: lr, mode, prompts, sizes, steps"),
            "{}",
            err("train.nope=1")
        );
        assert!(err("nope.steps=1").contains("no section `nope`"));
        assert!(err("train.steps=abc").contains("`abc` is not a TOML value"));
        assert!(err("train.steps=1.5").contains("type integer, but `1.5` is of type float"));
        assert!(err("train.steps").contains("KEY=VALUE"));
        let mode = err("train.mode=slow");
        assert!(mode.contains("unknown variant `slow`") && mode.contains("errors.toml"), "{mode}");
        assert!(err("train.steps=0").contains("train.steps must be at least 1"));
        let unknown = file("unknown.toml", &TEXT.replace("steps = 10", "steps = 10\nstepz = 3"));
        let err = Example::load(&unknown, &[]).unwrap_err().to_string();
        assert!(err.contains("unknown field `stepz`") && err.contains("unknown.toml"), "{err}");
        let missing = file("missing.toml", &TEXT.replace("lr = 1e-3\n", ""));
        let err = Example::load(&missing, &[]).unwrap_err().to_string();
        assert!(err.contains("missing field `lr`"), "{err}");
    }

    #[test]
    fn resuming_refuses_frozen_keys() {
        let path = file("resume.toml", TEXT);
        let resumed = Example::resumed(&path, &sets(&["train.steps=20"])).unwrap();
        assert_eq!(resumed.train.steps, 20);
        let err = Example::resumed(&path, &sets(&["train.sizes=[2]"])).unwrap_err().to_string();
        assert!(err.contains("cannot change `train.sizes`"), "{err}");
        // setting a frozen key to the value it has is no change
        assert!(Example::resumed(&path, &sets(&["name=run"])).is_ok());
    }
}
