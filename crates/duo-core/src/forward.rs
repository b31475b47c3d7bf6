//! One forward pass of one component on inputs from a tensor file: the engine of
//! `duo-bench forward`, which outside scripts use to compare us against diffusers.

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::error::{DuoError, Result};
use crate::folder::ModelFolder;
use crate::tensor_file::TensorFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Unet,
    TextEncoder,
    Vae,
}

impl std::str::FromStr for Component {
    type Err = DuoError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "unet" => Ok(Self::Unet),
            "text_encoder" => Ok(Self::TextEncoder),
            "vae" => Ok(Self::Vae),
            other => Err(DuoError::Invalid(format!("unknown component {other:?} (unet, text_encoder, vae)"))),
        }
    }
}

/// Runs `component` of `folder` on the tensors of `inputs`; returns the named outputs (f32).
///
/// unet: `sample`, `timestep` (int or float), `encoder_hidden_states` → `out`;
/// text_encoder: `input_ids` → `last_hidden_state`, `pooler_output`, `penultimate_hidden_state`;
/// vae: `image` → `latent_mean`, `latent_logvar`, `decoded_from_mean`.
pub fn run_forward<B: Backend>(
    folder: &ModelFolder,
    component: Component,
    inputs: &TensorFile,
    device: &B::Device,
) -> Result<Vec<(String, TensorData)>> {
    // inputs arrive as f32 and are cast to the dtype the weights were loaded in
    let dtype = folder.dtype();
    let float = |name: &str, rank: usize| inputs.get_f32(name, rank);
    let out = match component {
        Component::Unet => {
            let unet = folder.unet::<B>(device)?;
            let sample = Tensor::<B, 4>::from_data(float("sample", 4)?, (device, dtype));
            let batch = sample.dims()[0];
            let timestep = inputs.get_f64_vec("timestep")?;
            let timestep = match timestep.len() {
                1 => vec![timestep[0]; batch],
                n if n == batch => timestep,
                n => {
                    return Err(DuoError::parse(
                        inputs.path(),
                        format!("`timestep` has {n} values for a batch of {batch}"),
                    ));
                }
            };
            let timestep: Vec<f32> = timestep.iter().map(|&t| t as f32).collect();
            let timestep = Tensor::<B, 1>::from_data(TensorData::new(timestep, [batch]), device);
            let context = Tensor::<B, 3>::from_data(float("encoder_hidden_states", 3)?, (device, dtype));
            vec![("out", unet.forward(sample, timestep, context))]
                .into_iter()
                .map(|(k, t)| (k.to_string(), t.into_data()))
                .collect()
        }
        Component::TextEncoder => {
            let encoder = folder.text_encoder::<B>(device)?;
            let ids = inputs.get("input_ids")?.clone().convert::<i64>();
            let out = encoder.forward(Tensor::<B, 2, Int>::from_data(ids, device));
            vec![
                ("last_hidden_state".to_string(), out.last_hidden_state.into_data()),
                ("pooler_output".to_string(), out.pooler_output.into_data()),
                ("penultimate_hidden_state".to_string(), out.penultimate_hidden_state.into_data()),
            ]
        }
        Component::Vae => {
            let vae = folder.vae::<B>(device)?;
            let image = Tensor::<B, 4>::from_data(float("image", 4)?, (device, dtype));
            let dist = vae.encode(image);
            let decoded = vae.decode(dist.mean.clone());
            vec![
                ("latent_mean".to_string(), dist.mean.into_data()),
                ("latent_logvar".to_string(), dist.logvar.into_data()),
                ("decoded_from_mean".to_string(), decoded.into_data()),
            ]
        }
    };
    Ok(out.into_iter().map(|(k, d)| (k, d.convert::<f32>())).collect())
}
