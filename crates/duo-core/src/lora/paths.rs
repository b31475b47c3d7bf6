//! Every layer a LoRA can adapt, with its diffusers/transformers module path (its weight key minus
//! `.weight`), walked explicitly: the paths are diffusers' (`to_out.0`, `ff.net.0.proj`, `proj_in`),
//! not our field paths, so targets, LoRA files and PEFT configs all speak the same names. The UNet's
//! linear layers carry adapters; its convolutions take LoRA deltas merged in (`files.rs`); the text
//! encoder's linear layers carry adapters, under `text_model.encoder.layers.N.…` (the prefix the
//! published SD text encoders' keys have).

use burn::nn::conv::Conv2d;
use burn::prelude::*;

use super::LoraAdapter;
use crate::models::layers::Linear;
use crate::models::{ClipTextModel, UNet2DConditionModel};

/// Written once for `&` and `&mut`: `$($r)+` is the borrow.
macro_rules! unet_linears {
    ($unet:expr, $($r:tt)+) => {{
        let unet = $unet;
        let mut out = Vec::new();
        out.push(("time_embedding.linear_1".to_string(), $($r)+ unet.time_embedding.linear_1));
        out.push(("time_embedding.linear_2".to_string(), $($r)+ unet.time_embedding.linear_2));

        // (prefix, resnets, transformers) of every down, mid and up block
        let mut blocks = Vec::new();
        for (i, block) in ($($r)+ unet.down_blocks).into_iter().enumerate() {
            blocks.push((format!("down_blocks.{i}"), $($r)+ block.resnets, $($r)+ block.attentions));
        }
        let mid = $($r)+ unet.mid_block;
        blocks.push(("mid_block".to_string(), $($r)+ mid.resnets, $($r)+ mid.attentions));
        for (i, block) in ($($r)+ unet.up_blocks).into_iter().enumerate() {
            blocks.push((format!("up_blocks.{i}"), $($r)+ block.resnets, $($r)+ block.attentions));
        }

        for (block_path, resnets, transformers) in blocks {
            for (j, resnet) in resnets.into_iter().enumerate() {
                if let Some(linear) = $($r)+ resnet.time_emb_proj {
                    out.push((format!("{block_path}.resnets.{j}.time_emb_proj"), linear));
                }
            }
            for (j, transformer) in transformers.into_iter().enumerate() {
                let path = format!("{block_path}.attentions.{j}");
                // only with `use_linear_projection` (SD 2.x); SD 1.x projects with 1×1 convs
                if let Some(linear) = $($r)+ transformer.proj_in_linear {
                    out.push((format!("{path}.proj_in"), linear));
                }
                for (k, tb) in ($($r)+ transformer.transformer_blocks).into_iter().enumerate() {
                    let path = format!("{path}.transformer_blocks.{k}");
                    for (name, attn) in [("attn1", $($r)+ tb.attn1), ("attn2", $($r)+ tb.attn2)] {
                        out.push((format!("{path}.{name}.to_q"), $($r)+ attn.to_q));
                        out.push((format!("{path}.{name}.to_k"), $($r)+ attn.to_k));
                        out.push((format!("{path}.{name}.to_v"), $($r)+ attn.to_v));
                        for (o, linear) in ($($r)+ attn.to_out).into_iter().enumerate() {
                            out.push((format!("{path}.{name}.to_out.{o}"), linear));
                        }
                    }
                    out.push((format!("{path}.ff.net.0.proj"), $($r)+ tb.ff.proj_in));
                    out.push((format!("{path}.ff.net.2"), $($r)+ tb.ff.proj_out));
                }
                if let Some(linear) = $($r)+ transformer.proj_out_linear {
                    out.push((format!("{path}.proj_out"), linear));
                }
            }
        }
        out
    }};
}

pub(crate) fn linears<B: Backend>(unet: &UNet2DConditionModel<B>) -> Vec<(String, &Linear<B>)> {
    unet_linears!(unet, &)
}

pub(crate) fn linears_mut<B: Backend>(unet: &mut UNet2DConditionModel<B>) -> Vec<(String, &mut Linear<B>)> {
    unet_linears!(unet, &mut)
}

/// Every convolution of the UNet with its diffusers path: `conv_in`, `conv_out`, the resnets'
/// `conv1`/`conv2`/`conv_shortcut`, the down- and upsamplers' `conv`, and SD 1.x's 1×1 `proj_in`/
/// `proj_out` (Kohya's LoRA and LoCon adapt them).
pub(crate) fn convs_mut<B: Backend>(unet: &mut UNet2DConditionModel<B>) -> Vec<(String, &mut Conv2d<B>)> {
    let mut out =
        vec![("conv_in".to_string(), &mut unet.conv_in), ("conv_out".to_string(), &mut unet.conv_out)];
    let mut blocks = Vec::new();
    for (i, block) in unet.down_blocks.iter_mut().enumerate() {
        let path = format!("down_blocks.{i}");
        for (j, sampler) in block.downsamplers.iter_mut().enumerate() {
            out.push((format!("{path}.downsamplers.{j}.conv"), &mut sampler.conv));
        }
        blocks.push((path, &mut block.resnets, &mut block.attentions));
    }
    let mid = &mut unet.mid_block;
    blocks.push(("mid_block".to_string(), &mut mid.resnets, &mut mid.attentions));
    for (i, block) in unet.up_blocks.iter_mut().enumerate() {
        let path = format!("up_blocks.{i}");
        for (j, sampler) in block.upsamplers.iter_mut().enumerate() {
            out.push((format!("{path}.upsamplers.{j}.conv"), &mut sampler.conv));
        }
        blocks.push((path, &mut block.resnets, &mut block.attentions));
    }
    for (path, resnets, transformers) in blocks {
        for (j, resnet) in resnets.iter_mut().enumerate() {
            out.push((format!("{path}.resnets.{j}.conv1"), &mut resnet.conv1));
            out.push((format!("{path}.resnets.{j}.conv2"), &mut resnet.conv2));
            if let Some(conv) = &mut resnet.conv_shortcut {
                out.push((format!("{path}.resnets.{j}.conv_shortcut"), conv));
            }
        }
        for (j, transformer) in transformers.iter_mut().enumerate() {
            if let Some(conv) = &mut transformer.proj_in {
                out.push((format!("{path}.attentions.{j}.proj_in"), conv));
            }
            if let Some(conv) = &mut transformer.proj_out {
                out.push((format!("{path}.attentions.{j}.proj_out"), conv));
            }
        }
    }
    out
}

/// Written once for `&` and `&mut`, as `unet_linears!`.
macro_rules! text_encoder_linears {
    ($te:expr, $($r:tt)+) => {{
        let mut out = Vec::new();
        for (i, layer) in ($($r)+ $te.text_model.encoder.layers).into_iter().enumerate() {
            let path = format!("text_model.encoder.layers.{i}");
            let attn = $($r)+ layer.self_attn;
            out.push((format!("{path}.self_attn.q_proj"), $($r)+ attn.q_proj));
            out.push((format!("{path}.self_attn.k_proj"), $($r)+ attn.k_proj));
            out.push((format!("{path}.self_attn.v_proj"), $($r)+ attn.v_proj));
            out.push((format!("{path}.self_attn.out_proj"), $($r)+ attn.out_proj));
            out.push((format!("{path}.mlp.fc1"), $($r)+ layer.mlp.fc1));
            out.push((format!("{path}.mlp.fc2"), $($r)+ layer.mlp.fc2));
        }
        out
    }};
}

pub(crate) fn text_encoder_linears<B: Backend>(te: &ClipTextModel<B>) -> Vec<(String, &Linear<B>)> {
    text_encoder_linears!(te, &)
}

pub(crate) fn text_encoder_linears_mut<B: Backend>(
    te: &mut ClipTextModel<B>,
) -> Vec<(String, &mut Linear<B>)> {
    text_encoder_linears!(te, &mut)
}

/// The text encoder's adapters with their module paths, in a fixed order.
pub fn text_encoder_adapters<B: Backend>(te: &ClipTextModel<B>) -> Vec<(String, &LoraAdapter<B>)> {
    text_encoder_linears(te)
        .into_iter()
        .filter_map(|(path, linear)| Some((path, linear.lora.as_ref()?)))
        .collect()
}

/// The UNet's adapters with their diffusers module paths, in a fixed order.
pub fn lora_adapters<B: Backend>(unet: &UNet2DConditionModel<B>) -> Vec<(String, &LoraAdapter<B>)> {
    linears(unet).into_iter().filter_map(|(path, linear)| Some((path, linear.lora.as_ref()?))).collect()
}

/// Module path → Kohya/A1111 module name: `lora_unet_` (UNet) or `lora_te_` (text encoder) + the
/// path with `.` → `_`.
pub(crate) fn kohya_name(network: Network, path: &str) -> String {
    format!("{}{}", network.kohya_prefix(), path.replace('.', "_"))
}

/// The network a LoRA entry adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Network {
    Unet,
    TextEncoder,
}

impl Network {
    /// The key prefix of diffusers' LoRA files.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
        }
    }

    pub(crate) fn kohya_prefix(self) -> &'static str {
        match self {
            Self::Unet => "lora_unet_",
            Self::TextEncoder => "lora_te_",
        }
    }
}
