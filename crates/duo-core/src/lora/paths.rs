//! Every linear layer of the UNet with its diffusers module path (its weight key minus `.weight`),
//! walked explicitly: the paths are diffusers' (`to_out.0`, `ff.net.0.proj`, `proj_in`), not our
//! field paths, so targets, LoRA files and PEFT configs all speak the same names.

use burn::prelude::*;

use super::LoraAdapter;
use crate::models::UNet2DConditionModel;
use crate::models::layers::Linear;

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

/// The UNet's adapters with their diffusers module paths, in a fixed order.
pub fn lora_adapters<B: Backend>(unet: &UNet2DConditionModel<B>) -> Vec<(String, &LoraAdapter<B>)> {
    linears(unet).into_iter().filter_map(|(path, linear)| Some((path, linear.lora.as_ref()?))).collect()
}

/// diffusers path → Kohya/A1111 module name: `lora_unet_` + the path with `.` → `_`.
pub(crate) fn kohya_name(path: &str) -> String {
    format!("lora_unet_{}", path.replace('.', "_"))
}
