//! duo-core: Stable Diffusion components on Burn (networks, tokenizer, schedulers, pipelines),
//! LoRA and the DUO objective.

pub mod error;
pub mod fsutil;
pub mod schedulers;
pub mod tensor_file;

pub use error::{DuoError, Result};
