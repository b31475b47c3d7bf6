//! UCE and RECE on a model: the cross-attention projections read into f64, the closed-form edits
//! of `closed_form.rs` applied to them, and the changes written as one exact LoRA.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::{FloatDType, TensorData};
use nalgebra::DMatrix;

use duo_core::lora::{
    LoraAdapter, LoraFormat, LoraNetworks, LoraTargets, matching_linears, put_lora_adapters, save_lora,
};
use duo_core::pipelines::StableDiffusion;
use duo_core::{DuoError, Result};

use super::closed_form::{EditScales, LowRank, adversarial_map, edit};
use super::config::{ReceSection, UceSection};

/// The projections an edit changes, as they were and with the edits so far.
pub struct Projections {
    /// Diffusers module paths (`…attn2.to_k`).
    pub paths: Vec<String>,
    /// The original weights, PyTorch layout [out, in].
    pub original: Vec<DMatrix<f64>>,
    /// The change of each so far.
    pub changes: Vec<Option<LowRank>>,
}

impl Projections {
    /// Every cross-attention's value projection, and its key projection when `with_to_k`.
    pub fn read<B: Backend>(sd: &StableDiffusion<B>, with_to_k: bool) -> Result<Self> {
        let pattern = if with_to_k { r".*\.attn2\.(to_k|to_v)" } else { r".*\.attn2\.to_v" };
        let linears = matching_linears(&sd.unet, &LoraTargets::Regex(pattern.into()))?;
        let mut paths = Vec::new();
        let mut original = Vec::new();
        for (path, linear) in linears {
            if linear.lora.is_some() {
                return Err(DuoError::Invalid(format!(
                    "`{path}` already carries a LoRA: the closed-form edits start from a model without one"
                )));
            }
            // ours is [in, out] (y = x·W): read as rows of that, then transposed
            let weight = linear.weight.val().cast(FloatDType::F32);
            let [inp, out] = weight.dims();
            let values = f32_values(weight.into_data(), &path)?;
            original.push(DMatrix::from_row_slice(inp, out, &values).transpose().map(f64::from));
            paths.push(path);
        }
        let changes = vec![None; paths.len()];
        Ok(Self { paths, original, changes })
    }

    /// The current weight of projection `i`: the original plus the changes so far.
    pub fn current(&self, i: usize) -> DMatrix<f64> {
        match &self.changes[i] {
            Some(change) => &self.original[i] + change.full(),
            None => self.original[i].clone(),
        }
    }

    fn apply(&mut self, i: usize, change: LowRank) {
        self.changes[i] = Some(match self.changes[i].take() {
            Some(old) => old.then(change),
            None => change,
        });
    }

    /// The LoRA rank of each change.
    pub fn ranks(&self) -> Vec<usize> {
        self.changes.iter().map(|c| c.as_ref().map_or(0, LowRank::rank)).collect()
    }

    /// Writes every change as a PEFT LoRA (alpha = rank, so scale 1): `down` is `lora_A`, `up` is
    /// `lora_B`, exactly.
    pub fn save<B: Backend>(&self, sd: &StableDiffusion<B>, file: &Path) -> Result<()> {
        let device = &sd.device;
        let tensor = |m: &DMatrix<f64>| -> Tensor<B, 2> {
            // row-major [rows, cols] from nalgebra's column-major storage
            let values: Vec<f32> = m.transpose().iter().map(|&v| v as f32).collect();
            Tensor::from_data(
                TensorData::new(values, [m.nrows(), m.ncols()]),
                (device, burn::tensor::DType::F32),
            )
        };
        let mut adapters = Vec::new();
        for (path, change) in self.paths.iter().zip(&self.changes) {
            if let Some(change) = change {
                // ours: A [in, r] = downᵀ, B [r, out] = upᵀ
                let adapter =
                    LoraAdapter::new(tensor(&change.down.transpose()), tensor(&change.up.transpose()), 1.0);
                adapters.push((path.as_str(), adapter));
            }
        }
        let unet = put_lora_adapters(sd.unet.clone(), adapters.iter().map(|(p, a)| (*p, a)))?;
        save_lora(&LoraNetworks::unet_only(unet), file, LoraFormat::Peft)
    }
}

fn f32_values(data: TensorData, what: &str) -> Result<Vec<f32>> {
    data.convert::<f32>().into_vec::<f32>().map_err(|e| DuoError::Invalid(format!("{what}: {e:?}")))
}

/// The text encoder's 77 token outputs of `prompt` as columns [dim, 77] (f64), and the position of
/// its last word token (`len − 2`: 0 for the empty prompt, whose "last word" is the start token).
pub fn token_outputs<B: Backend>(sd: &StableDiffusion<B>, prompt: &str) -> Result<(DMatrix<f64>, usize)> {
    let hidden = sd.encode_prompts(&[prompt.to_string()]).cast(FloatDType::F32);
    let [_, tokens, dim] = hidden.dims();
    let values = f32_values(hidden.into_data(), &format!("the text encoder's output for \"{prompt}\""))?;
    let columns = DMatrix::from_row_slice(tokens, dim, &values).transpose().map(f64::from);
    let last_word = sd.tokenizer.encode(prompt).len().min(tokens).saturating_sub(2);
    Ok((columns, last_word))
}

/// Columns `from..from + len` of `m`.
fn columns(m: &DMatrix<f64>, from: usize, len: usize) -> DMatrix<f64> {
    m.columns(from, len).into_owned()
}

fn side_by_side(parts: &[DMatrix<f64>], rows: usize) -> DMatrix<f64> {
    let total = parts.iter().map(DMatrix::ncols).sum();
    let mut out = DMatrix::zeros(rows, total);
    let mut at = 0;
    for part in parts {
        out.columns_mut(at, part.ncols()).copy_from(part);
        at += part.ncols();
    }
    out
}

/// UCE's edit (the authors' paper-era script): for each erased prompt and its guide, the last word
/// token and every token after it (end and padding), aligned from the last words on, map to the
/// guide's tokens under the original weights; the empty prompt and `preserve` keep all 77 outputs.
pub fn uce<B: Backend>(sd: &StableDiffusion<B>, s: &UceSection, concept: &str) -> Result<Projections> {
    let mut projections = Projections::read(sd, s.with_to_k)?;
    let erase: Vec<String> = match s.erase.is_empty() {
        true => vec![concept.to_string()],
        false => s.erase.clone(),
    };
    let mut keys = Vec::new();
    let mut guides = Vec::new();
    for (i, prompt) in erase.iter().enumerate() {
        let guide = if s.guide.len() == 1 { &s.guide[0] } else { &s.guide[i] };
        let (old, i_old) = token_outputs(sd, prompt)?;
        let (new, i_new) = token_outputs(sd, guide)?;
        let len = old.ncols() - i_old.max(i_new);
        keys.push(columns(&old, i_old, len));
        guides.push(columns(&new, i_new, len));
    }
    let mut retained = vec![token_outputs(sd, "")?.0];
    for prompt in &s.preserve {
        retained.push(token_outputs(sd, prompt)?.0);
    }
    let dim = keys[0].nrows();
    let scales = EditScales {
        erase: s.erase_scale,
        preserve: s.preserve_scale.unwrap_or((1.0 / retained.len() as f64).max(0.1)),
        lambda: s.lambda,
    };
    let (keys, guides, retained) =
        (side_by_side(&keys, dim), side_by_side(&guides, dim), side_by_side(&retained, dim));
    for i in 0..projections.paths.len() {
        let w = &projections.original[i];
        let change = edit(w, &keys, &(w * &guides), &retained, scales, &projections.paths[i])?;
        projections.apply(i, change);
    }
    Ok(projections)
}

/// RECE's rounds after a UCE edit: each finds, for every token of each erased prompt, the embedding
/// that the edited projections map closest to the original projections' image of it
/// ([`adversarial_map`]), then erases those embeddings towards the empty prompt's tokens,
/// position by position, anchored at the current weights and preserving the empty prompt.
pub fn rece<B: Backend>(
    sd: &StableDiffusion<B>,
    uce_settings: &UceSection,
    s: &ReceSection,
    concept: &str,
    mut on_round: impl FnMut(usize, &Projections) -> Result<()>,
) -> Result<Projections> {
    let mut projections = uce(sd, uce_settings, concept)?;
    let erase: Vec<String> = match uce_settings.erase.is_empty() {
        true => vec![concept.to_string()],
        false => uce_settings.erase.clone(),
    };
    let concepts: Vec<DMatrix<f64>> =
        erase.iter().map(|p| token_outputs(sd, p).map(|(c, _)| c)).collect::<Result<_>>()?;
    let empty = token_outputs(sd, " ")?.0;
    let dim = empty.nrows();
    let targets = side_by_side(&vec![empty; concepts.len()], dim);
    let scales = EditScales { erase: s.erase_scale, preserve: s.preserve_scale, lambda: s.lambda };
    for round in 1..=s.rounds {
        let current: Vec<DMatrix<f64>> =
            (0..projections.paths.len()).map(|i| projections.current(i)).collect();
        let pairs: Vec<_> = current.iter().zip(&projections.original).collect();
        let map = adversarial_map(&pairs, s.regularization, dim)?;
        let adversarial: Vec<DMatrix<f64>> = concepts.iter().map(|c| &map * c).collect();
        let adversarial = side_by_side(&adversarial, dim);
        for (i, w) in current.iter().enumerate() {
            let change = edit(w, &adversarial, &(w * &targets), &targets, scales, &projections.paths[i])?;
            projections.apply(i, change);
        }
        on_round(round, &projections)?;
    }
    Ok(projections)
}
