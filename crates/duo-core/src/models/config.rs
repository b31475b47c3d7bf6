//! Reading diffusers/transformers `config.json` files: the keys we implement are struct fields named
//! as in the file; every other key must either be harmless metadata or hold the value our code
//! implements, else loading fails naming the key and value.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{DuoError, Result};

/// A value diffusers accepts either as one number for every block or as a per-block list.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// One value per block, checking a list's length.
    pub fn resolve(&self, blocks: usize, key: &str, path: &Path) -> Result<Vec<usize>> {
        match self {
            Self::One(v) => Ok(vec![*v; blocks]),
            Self::Each(list) if list.len() == blocks => Ok(list.clone()),
            Self::Each(list) => Err(DuoError::config(
                path,
                format!("{key} has {} entries but there are {blocks} down blocks", list.len()),
            )),
        }
    }
}

/// Checks the keys a config holds beyond those we read.
///
/// `metadata`: keys whose value never matters here (names, versions, sizes hints).
/// `fixed`: keys we do not implement beyond one value (usually diffusers' default).
/// Any other key must be null or false (absent features); otherwise it is an error.
pub fn check_other_keys(
    path: &Path,
    other: &BTreeMap<String, Value>,
    metadata: &[&str],
    fixed: &[(&str, Value)],
) -> Result<()> {
    for (key, value) in other {
        if key.starts_with('_') || metadata.contains(&key.as_str()) {
            continue;
        }
        if let Some((_, supported)) = fixed.iter().find(|(k, _)| k == key) {
            if !same_value(value, supported) {
                return Err(DuoError::config(
                    path,
                    format!("{key}={value} is not supported (only {supported} is implemented)"),
                ));
            }
            continue;
        }
        if !(value.is_null() || value == &Value::Bool(false)) {
            return Err(DuoError::config(path, format!("unknown key {key}={value}: not implemented")));
        }
    }
    Ok(())
}

/// JSON equality that treats 1 and 1.0 as equal.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}
