//! Loading diffusers/transformers weight files into our modules, strictly.
//!
//! Module field paths equal the files' keys except for the few renames in the tables below. Loading
//! fails, naming the file and key, on any missing weight, shape mismatch or unexpected key: a module
//! is never left with random weights.

use std::path::Path;
use std::rc::Rc;

use burn::module::Module;
use burn::prelude::*;
use burn::store::{
    ApplyError, BurnToPyTorchAdapter, KeyRemapper, ModuleAdapter, ModuleSnapshot, ModuleStore,
    PyTorchToBurnAdapter, SafetensorsStore, TensorSnapshot,
};
use burn::tensor::DType;
use burn_store::PytorchStore;

use crate::error::{DuoError, Result};

/// Diffusers key (regex) → our field path, for every UNet.
pub const UNET_REMAPS: &[(&str, &str)] = &[
    // GEGLU feed-forward: diffusers' `ff.net` is [GEGLU, Dropout, Linear]
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
];

/// Extra UNet renames when `use_linear_projection` (SD 2.x): the projections are linear layers,
/// which we hold in their own fields beside the (absent) convs.
pub const UNET_LINEAR_PROJECTION_REMAPS: &[(&str, &str)] = &[
    (r"(attentions\.\d+)\.proj_in\.", "$1.proj_in_linear."),
    (r"(attentions\.\d+)\.proj_out\.", "$1.proj_out_linear."),
];

/// Our field path (regex) → diffusers key, for saving a UNet: the inverse of [`UNET_REMAPS`] and
/// [`UNET_LINEAR_PROJECTION_REMAPS`].
pub const UNET_SAVE_REMAPS: &[(&str, &str)] = &[
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
    (r"(attentions\.\d+)\.proj_in_linear\.", "$1.proj_in."),
    (r"(attentions\.\d+)\.proj_out_linear\.", "$1.proj_out."),
];

/// VAE files saved before diffusers 0.14 name the mid-block attention `query/key/value/proj_attn`.
pub const VAE_REMAPS: &[(&str, &str)] = &[
    (r"(attentions\.\d+)\.query\.", "$1.to_q."),
    (r"(attentions\.\d+)\.key\.", "$1.to_k."),
    (r"(attentions\.\d+)\.value\.", "$1.to_v."),
    (r"(attentions\.\d+)\.proj_attn\.", "$1.to_out.0."),
];

/// Text encoders saved without the `text_model.` prefix (some SD 2.x conversions).
pub const CLIP_REMAPS: &[(&str, &str)] = &[(r"^(embeddings|encoder|final_layer_norm)\.", "text_model.$1.")];

/// Buffers transformers saves that are not weights.
pub const CLIP_IGNORED: &[&str] = &["text_model.embeddings.position_ids"];

/// Casts float weights to the run's dtype on load: Burn 0.21 otherwise keeps the stored dtype, so an
/// fp16 file would silently give an f16 model.
#[derive(Clone)]
struct CastAdapter(DType);

impl ModuleAdapter for CastAdapter {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let target = self.0;
        if !snapshot.dtype.is_float() || snapshot.dtype == target {
            return snapshot.clone();
        }
        let data = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || Ok(data()?.convert_dtype(target))),
            target,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// Serialises `module` as a diffusers/transformers safetensors file: PyTorch layouts (linear weights
/// `[d_out, d_in]`), keys renamed by `remaps` (our path → file key), floats stored as `dtype`, and
/// the `format: pt` metadata transformers requires (it refuses burn-store's default "safetensors").
/// Returns the file's bytes; the caller writes them (atomically).
pub fn safetensors_bytes<B: Backend, M: Module<B>>(
    module: &M,
    remaps: &[(&str, &str)],
    dtype: DType,
) -> Result<Vec<u8>> {
    let remapper = KeyRemapper::from_patterns(remaps.to_vec())
        .map_err(|e| DuoError::Invalid(format!("bad key remap pattern: {e}")))?;
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter.chain(CastAdapter(dtype)))
        .remap(remapper)
        .clear_metadata()
        .metadata("format", "pt");
    module.save_into(&mut store).map_err(|e| DuoError::Invalid(format!("serialising weights: {e}")))?;
    store.get_bytes().map_err(|e| DuoError::Invalid(format!("serialising weights: {e}")))
}

/// Every tensor of a weight file: safetensors, or a PyTorch pickle (`.bin`, `.pt`, `.pth`, `.ckpt`).
fn read_snapshots(file: &Path) -> Result<Vec<TensorSnapshot>> {
    let is_pickle = file.extension().is_some_and(|e| e == "bin" || e == "pt" || e == "pth" || e == "ckpt");
    let snapshots = if is_pickle {
        // no index renumbering: diffusers keys have deliberate gaps (`ff.net.0`, `ff.net.2`), and
        // LDM keys too (`time_embed.0`, `time_embed.2`)
        let mut store = PytorchStore::from_file(file).map_indices_contiguous(false);
        store
            .get_all_snapshots()
            .map_err(|e| DuoError::weights(file, e.to_string()))?
            .values()
            .cloned()
            .collect()
    } else {
        let mut store = SafetensorsStore::from_file(file);
        store
            .get_all_snapshots()
            .map_err(|e| DuoError::weights(file, e.to_string()))?
            .values()
            .cloned()
            .collect()
    };
    Ok(snapshots)
}

/// Every tensor of a single-file checkpoint: a safetensors file, or a PyTorch pickle (`.ckpt`) whose
/// tensors sit under `state_dict` or at the top level.
pub fn read_checkpoint(file: &Path) -> Result<Vec<TensorSnapshot>> {
    if !file.is_file() {
        return Err(DuoError::weights(file, "checkpoint file not found"));
    }
    let is_pickle = file.extension().is_some_and(|e| e == "ckpt" || e == "pt" || e == "pth" || e == "bin");
    if !is_pickle {
        return read_snapshots(file);
    }
    let mut wrapped =
        PytorchStore::from_file(file).with_top_level_key("state_dict").map_indices_contiguous(false);
    match wrapped.get_all_snapshots() {
        Ok(snapshots) => Ok(snapshots.values().cloned().collect()),
        // a bare state dict: no `state_dict` key at the top
        Err(_) => read_snapshots(file),
    }
}

/// Loads `file` (safetensors or a PyTorch `.bin`) into `module` as `dtype`, with `remaps` applied to
/// the file's keys; `ignored` keys may be present in the file without a matching parameter.
pub fn load_weights<B: Backend, M: Module<B>>(
    module: M,
    file: &Path,
    remaps: &[(&str, &str)],
    dtype: DType,
    ignored: &[&str],
) -> Result<M> {
    if !file.is_file() {
        return Err(DuoError::weights(file, "weight file not found"));
    }
    load_snapshots(module, read_snapshots(file)?, file, remaps, dtype, ignored)
}

/// [`load_weights`] from tensors already read (`source` names where they came from in errors).
pub fn load_snapshots<B: Backend, M: Module<B>>(
    mut module: M,
    snapshots: Vec<TensorSnapshot>,
    file: &Path,
    remaps: &[(&str, &str)],
    dtype: DType,
    ignored: &[&str],
) -> Result<M> {
    let remapper = KeyRemapper::from_patterns(remaps.to_vec())
        .map_err(|e| DuoError::Invalid(format!("bad key remap pattern: {e}")))?;
    let (snapshots, _) = remapper.remap(snapshots);
    // an integer tensor where a weight belongs would crash the backend: converted where f32 holds
    // its values exactly, refused otherwise
    let snapshots = snapshots
        .into_iter()
        .map(|s| match ignored.contains(&s.full_path().as_str()) || is_float(s.dtype) {
            true => Ok(s),
            false => {
                let data =
                    s.to_data().map_err(|e| DuoError::weights(file, format!("`{}`: {e}", s.full_path())))?;
                let data = exact_f32(data)
                    .map_err(|why| DuoError::weights(file, format!("`{}` {why}", s.full_path())))?;
                let (path, container) = (s.path_stack.clone().unwrap_or_default(), s.container_stack.clone());
                Ok(TensorSnapshot::from_data(
                    data,
                    path,
                    container.unwrap_or_default(),
                    s.tensor_id.unwrap_or_default(),
                ))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let adapter = PyTorchToBurnAdapter.chain(CastAdapter(dtype));
    let result = module.apply(snapshots, None, Some(Box::new(adapter)), false);

    if let Some(error) = result.errors.first() {
        let message = match error {
            ApplyError::ShapeMismatch { path, expected, found } => format!(
                "weight `{path}` has shape {:?} but the config implies {:?}",
                found.as_slice(),
                expected.as_slice()
            ),
            other => other.to_string(),
        };
        return Err(DuoError::weights(file, format!("{message} ({} error(s) in all)", result.errors.len())));
    }
    if !result.missing.is_empty() {
        let names: Vec<&str> = result.missing.iter().take(5).map(|(path, _)| path.as_str()).collect();
        return Err(DuoError::weights(
            file,
            format!(
                "{} weight(s) missing from the file, e.g. `{}` — does the config.json match this file?",
                result.missing.len(),
                names.join("`, `")
            ),
        ));
    }
    let unexpected: Vec<&String> = result.unused.iter().filter(|k| !ignored.contains(&k.as_str())).collect();
    if !unexpected.is_empty() {
        let names: Vec<&str> = unexpected.iter().take(5).map(|k| k.as_str()).collect();
        return Err(DuoError::weights(
            file,
            format!(
                "{} unexpected key(s) the model has no parameter for, e.g. `{}` — does the config.json match this file?",
                unexpected.len(),
                names.join("`, `")
            ),
        ));
    }
    check_finite(&module, file)?;
    Ok(module)
}

/// An integer tensor as f32 when every value is exact in f32 (|v| ≤ 2^24), or why not: how the
/// model and LoRA loaders treat weights stored as integers.
pub fn exact_f32(data: TensorData) -> std::result::Result<TensorData, String> {
    let (dtype, shape) = (data.dtype, data.shape.clone());
    let values = data.convert::<f64>().into_vec::<f64>().map_err(|e| format!("is unreadable: {e:?}"))?;
    match values.iter().find(|v| v.abs() > (1u64 << 24) as f64) {
        Some(v) => Err(format!(
            "is stored as {dtype:?}, and its value {v} has no exact f32; weights are floating-point tensors"
        )),
        None => Ok(TensorData::new(values.into_iter().map(|v| v as f32).collect::<Vec<f32>>(), shape)),
    }
}

/// f64, f32, f16 and bf16: the dtypes a weight may be stored in (read as the run's dtype).
pub fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
}

/// A NaN or ∞ in loaded weights is an error naming the tensor: it would turn every output into NaN
/// without a word.
pub fn check_finite<B: Backend, M: Module<B>>(module: &M, file: &Path) -> Result<()> {
    struct Finite {
        path: Vec<String>,
        bad: Option<String>,
    }
    impl<B: Backend> burn::module::ModuleVisitor<B> for Finite {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            if self.bad.is_some() || !param.is_initialized() {
                return;
            }
            let finite = param.val().is_finite().all().into_data().iter::<bool>().all(|b| b);
            if !finite {
                self.bad = Some(self.path.join("."));
            }
        }
    }
    let mut visitor = Finite { path: Vec::new(), bad: None };
    module.visit(&mut visitor);
    match visitor.bad {
        Some(path) => Err(DuoError::weights(file, format!("weight `{path}` holds NaN or infinite values"))),
        None => Ok(()),
    }
}
