//! Prompt files for the `prompts` attack: a CSV in the I2P / UnlearnDiffAtk layout (a `prompt`
//! column; `evaluation_seed` and `evaluation_guidance`, or I2P's `sd_seed` and `sd_guidance_scale`,
//! where given; rows chosen by category or nudity percentage; other columns ignored), or a TOML file
//! with `prompts = ["…", …]`.

use super::{PromptFile, Unit};
use crate::error::{DuoError, Result, read_to_string};

/// The file's prompts as units. A CSV row's `evaluation_seed` replaces `seeds` and its
/// `evaluation_guidance` replaces `guidance`; a TOML list takes both from the protocol.
pub fn read_prompt_file(file: &PromptFile, seeds: &[u64], guidance: f64) -> Result<Vec<Unit>> {
    let path = file.file.as_path();
    let is_csv = path.extension().is_some_and(|e| e == "csv");
    if !is_csv && (file.category.is_some() || file.min_nudity_percentage.is_some()) {
        return Err(DuoError::parse(
            path,
            "category and min_nudity_percentage choose rows of a CSV prompt file",
        ));
    }
    let units = match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => read_csv(file, seeds, guidance)?,
        Some("toml") => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct PromptList {
                prompts: Vec<String>,
            }
            let list: PromptList =
                toml::from_str(&read_to_string(path)?).map_err(|e| DuoError::parse(path, e.to_string()))?;
            list.prompts.into_iter().map(|prompt| Unit { prompt, seeds: seeds.to_vec(), guidance }).collect()
        }
        _ => {
            return Err(DuoError::parse(
                path,
                "a prompt file is a .csv (with a `prompt` column) or a .toml (`prompts = [...]`)",
            ));
        }
    };
    if units.is_empty() {
        return Err(DuoError::parse(path, "the prompt file holds no prompt (after its row filters)"));
    }
    Ok(units)
}

fn read_csv(file: &PromptFile, seeds: &[u64], guidance: f64) -> Result<Vec<Unit>> {
    let path = file.file.as_path();
    let mut reader = csv::Reader::from_path(path).map_err(|e| DuoError::parse(path, e.to_string()))?;
    let headers = reader.headers().map_err(|e| DuoError::parse(path, e.to_string()))?.clone();
    let column = |name: &str| headers.iter().position(|h| h.trim() == name);
    let prompt_at = column("prompt").ok_or_else(|| {
        DuoError::parse(
            path,
            format!(
                "no `prompt` column (the columns are: {})",
                headers.iter().collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    let (seed_at, guidance_at) = (
        column("evaluation_seed").or(column("sd_seed")),
        column("evaluation_guidance").or(column("sd_guidance_scale")),
    );
    let needed = |name: &str, wanted: bool| -> Result<Option<usize>> {
        match (wanted, column(name)) {
            (false, _) => Ok(None),
            (true, Some(at)) => Ok(Some(at)),
            (true, None) => Err(DuoError::parse(path, format!("the row filter needs a `{name}` column"))),
        }
    };
    let category_at = needed("categories", file.category.is_some())?;
    let nudity_at = needed("nudity_percentage", file.min_nudity_percentage.is_some())?;
    let mut units = Vec::new();
    for (row, record) in reader.records().enumerate() {
        // row 1 is the header
        let line = row + 2;
        let record = record.map_err(|e| DuoError::parse(path, format!("row {line}: {e}")))?;
        let field = |at: usize| record.get(at).unwrap_or("").trim();
        let number = |at: usize, name: &str| -> Result<Option<f64>> {
            let text = field(at);
            if text.is_empty() {
                return Ok(None);
            }
            let value: f64 = text
                .parse()
                .map_err(|_| DuoError::parse(path, format!("row {line}: {name} {text:?} is not a number")))?;
            if !value.is_finite() {
                return Err(DuoError::parse(
                    path,
                    format!("row {line}: {name} {text:?} is not a finite number"),
                ));
            }
            Ok(Some(value))
        };
        if let (Some(at), Some(category)) = (category_at, &file.category)
            && !field(at).split(',').any(|c| c.trim() == category)
        {
            continue;
        }
        if let (Some(at), Some(min)) = (nudity_at, file.min_nudity_percentage)
            && number(at, "nudity_percentage")?.is_none_or(|p| p <= min)
        {
            continue;
        }
        let prompt = field(prompt_at).to_string();
        if prompt.is_empty() {
            return Err(DuoError::parse(path, format!("row {line}: the prompt is empty")));
        }
        let seeds = match seed_at.map(|at| number(at, "evaluation_seed")).transpose()?.flatten() {
            Some(seed) if seed >= 0.0 && seed.fract() == 0.0 => vec![seed as u64],
            Some(seed) => {
                return Err(DuoError::parse(
                    path,
                    format!("row {line}: evaluation_seed {seed} is not a whole number ≥ 0"),
                ));
            }
            None => seeds.to_vec(),
        };
        let guidance = guidance_at
            .map(|at| number(at, "evaluation_guidance"))
            .transpose()?
            .flatten()
            .unwrap_or(guidance);
        units.push(Unit { prompt, seeds, guidance });
    }
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PromptFile {
        let path = std::env::temp_dir().join(format!("duo-prompts-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        PromptFile { file: path, category: None, min_nudity_percentage: None }
    }

    #[test]
    fn csv_rows_bring_their_seed_and_guidance() {
        // the UnlearnDiffAtk layout, with a quoted prompt holding a comma
        let path = file(
            "udiff.csv",
            "case_number,prompt,categories,evaluation_seed,evaluation_guidance\n\
             0,\"a red cross, flat icon\",x,42,7\n1,a blue cross,x,,\n",
        );
        let units = read_prompt_file(&path, &[0, 1], 7.5).unwrap();
        assert_eq!(
            units[0],
            Unit { prompt: "a red cross, flat icon".into(), seeds: vec![42], guidance: 7.0 }
        );
        assert_eq!(units[1], Unit { prompt: "a blue cross".into(), seeds: vec![0, 1], guidance: 7.5 });
        let toml = file("list.toml", "prompts = [\"a red cross\"]\n");
        assert_eq!(read_prompt_file(&toml, &[3], 5.0).unwrap()[0].seeds, vec![3]);
    }

    #[test]
    fn i2p_rows_are_chosen_by_category_and_nudity() {
        // I2P's own column names, and an empty prompt in a row the filter leaves out
        let i2p = "prompt,categories,nudity_percentage,sd_seed,sd_guidance_scale
\
                   a,\"sexual,shocking\",80.5,11,7\n,violence,0,12,7\nc,sexual,20,13,9\nd,harassment,90,14,7\n";
        let mut rows = file("i2p.csv", i2p);
        rows.category = Some("sexual".into());
        let units = read_prompt_file(&rows, &[0], 7.5).unwrap();
        assert_eq!(units.iter().map(|u| u.prompt.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!((units[1].seeds.clone(), units[1].guidance), (vec![13], 9.0));
        rows.min_nudity_percentage = Some(50.0);
        assert_eq!(read_prompt_file(&rows, &[0], 7.5).unwrap().len(), 1);
        rows.category = None;
        let prompts: Vec<String> =
            read_prompt_file(&rows, &[0], 7.5).unwrap().into_iter().map(|u| u.prompt).collect();
        assert_eq!(prompts, ["a", "d"]);
        let mut udiff = file("no-categories.csv", "prompt\nx\n");
        udiff.category = Some("sexual".into());
        let err = read_prompt_file(&udiff, &[0], 7.5).unwrap_err().to_string();
        assert!(err.contains("needs a `categories` column"), "{err}");
    }

    #[test]
    fn bad_prompt_files_are_named() {
        let err =
            |name: &str, text: &str| read_prompt_file(&file(name, text), &[0], 7.5).unwrap_err().to_string();
        assert!(
            err("a.csv", "text,seed\nx,1\n").contains("no `prompt` column (the columns are: text, seed)")
        );
        assert!(err("b.csv", "prompt,evaluation_seed\nx,1.5\n").contains("row 2: evaluation_seed 1.5"));
        assert!(err("c.csv", "prompt,evaluation_guidance\nx,nan\n").contains("row 2"));
        assert!(err("d.csv", "prompt\n").contains("holds no prompt"));
        assert!(err("e.txt", "x").contains(".csv"));
    }
}
