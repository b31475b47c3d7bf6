//! Plain safetensors files of named tensors: inputs and outputs of `duo-bench forward`, latents given to
//! the pipelines, parity fixtures. (Module weights go through `burn-store` in `weights.rs`.)

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::{DType, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::{DuoError, Result};

/// The tensors of one file, by name, in their stored element type, and its header's string metadata.
pub struct TensorFile {
    path: std::path::PathBuf,
    tensors: BTreeMap<String, TensorData>,
    metadata: HashMap<String, String>,
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DuoError::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// A safetensors file's bytes; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let file = SafeTensors::deserialize(bytes).map_err(|e| DuoError::parse(path, e.to_string()))?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| DuoError::parse(path, e.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let dtype = match view.dtype() {
                Dtype::F64 => DType::F64,
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                Dtype::I64 => DType::I64,
                Dtype::I32 => DType::I32,
                Dtype::U8 => DType::U8,
                other => {
                    return Err(DuoError::parse(
                        path,
                        format!("tensor `{name}` has unsupported dtype {other:?}"),
                    ));
                }
            };
            let data = TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), dtype);
            tensors.insert(name, data);
        }
        Ok(Self { path: path.to_path_buf(), tensors, metadata })
    }

    /// Every tensor, by name, in name order.
    pub fn into_tensors(self) -> Vec<(String, TensorData)> {
        self.tensors.into_iter().collect()
    }

    /// The header's `__metadata__` entry `key` (e.g. a LoRA's alpha), if present.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor `name` as stored; an error naming the file and key when absent.
    pub fn get(&self, name: &str) -> Result<&TensorData> {
        self.tensors.get(name).ok_or_else(|| {
            let have: Vec<&str> = self.names().collect();
            DuoError::parse(&self.path, format!("no tensor `{name}` (the file has: {})", have.join(", ")))
        })
    }

    /// The tensor `name` converted to f32, with its rank checked.
    pub fn get_f32(&self, name: &str, rank: usize) -> Result<TensorData> {
        let data = self.get(name)?;
        if data.shape.len() != rank {
            return Err(DuoError::parse(
                &self.path,
                format!("tensor `{name}` has shape {:?}, expected rank {rank}", data.shape),
            ));
        }
        Ok(data.clone().convert::<f32>())
    }

    /// The tensor `name` as f64 values (any float or int dtype), flattened.
    pub fn get_f64_vec(&self, name: &str) -> Result<Vec<f64>> {
        let data = self.get(name)?.clone().convert::<f64>();
        data.into_vec::<f64>().map_err(|e| DuoError::parse(&self.path, format!("tensor `{name}`: {e:?}")))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes named tensors to a safetensors file, atomically (temp file + rename).
pub fn write_tensor_file(path: &Path, tensors: &[(&str, TensorData)]) -> Result<()> {
    write_tensor_file_with_metadata(path, tensors, HashMap::new())
}

/// [`write_tensor_file`] with string metadata in the header (`__metadata__`), as LoRA files carry
/// their alpha.
pub fn write_tensor_file_with_metadata(
    path: &Path,
    tensors: &[(&str, TensorData)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, data) in tensors {
        let dtype = match data.dtype {
            DType::F64 => Dtype::F64,
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::I64 => Dtype::I64,
            DType::I32 => Dtype::I32,
            DType::U8 => Dtype::U8,
            other => {
                return Err(DuoError::Invalid(format!("cannot save tensor `{name}` of dtype {other:?}")));
            }
        };
        let view = safetensors::tensor::TensorView::new(dtype, data.shape.to_vec(), data.as_bytes())
            .map_err(|e| DuoError::Invalid(format!("tensor `{name}`: {e}")))?;
        views.push((name.to_string(), view));
    }
    let metadata = (!metadata.is_empty()).then_some(metadata);
    let bytes = safetensors::serialize(views, metadata).map_err(|e| DuoError::Invalid(e.to_string()))?;
    crate::fsutil::write_atomic(path, &bytes)
}
