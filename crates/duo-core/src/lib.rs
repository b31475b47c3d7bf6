//! duo-core: Stable Diffusion components on Burn (networks, tokenizer, schedulers, pipelines),
//! LoRA and the DUO objective, and the procedural toy world the embedded model is trained on.

pub mod attacks;
pub mod device;
pub mod error;
pub mod eval;
pub mod folder;
pub mod forward;
pub mod fsutil;
pub mod judge;
pub mod lora;
pub mod metrics;
pub mod models;
pub mod objective;
pub mod pipelines;
pub mod progress;
pub mod run_config;
pub mod schedulers;
pub mod single_file;
pub mod tensor_file;
pub mod tokenizer;
pub mod weights;
pub mod world;

pub use error::{DuoError, Result};
pub use folder::ModelFolder;
