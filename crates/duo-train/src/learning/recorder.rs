//! burn-train's checkpoints, written atomically: burn's file recorders truncate the file in place,
//! so a crash or a kill while a checkpoint is written would leave the newest one unreadable.

use std::path::PathBuf;

use burn::prelude::*;
use burn::record::{FileRecorder, FullPrecisionSettings, Recorder, RecorderError};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// `DefaultRecorder`'s format (named MessagePack, f32), through a temporary file and a rename.
#[derive(Debug, Default, Clone)]
pub struct AtomicRecorder;

impl<B: Backend> FileRecorder<B> for AtomicRecorder {
    fn file_extension() -> &'static str {
        "mpk"
    }
}

impl<B: Backend> Recorder<B> for AtomicRecorder {
    type Settings = FullPrecisionSettings;
    type RecordArgs = PathBuf;
    type RecordOutput = ();
    type LoadArgs = PathBuf;

    fn save_item<I: Serialize>(&self, item: I, file: PathBuf) -> Result<(), RecorderError> {
        let path = file.with_extension(<Self as FileRecorder<B>>::file_extension());
        let mut bytes = Vec::new();
        rmp_serde::encode::write_named(&mut bytes, &item)
            .map_err(|e| RecorderError::Unknown(e.to_string()))?;
        duo_core::fsutil::write_atomic(&path, &bytes).map_err(|e| RecorderError::Unknown(e.to_string()))
    }

    fn load_item<I: DeserializeOwned>(&self, file: &mut PathBuf) -> Result<I, RecorderError> {
        file.set_extension(<Self as FileRecorder<B>>::file_extension());
        let bytes = std::fs::read(&*file).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RecorderError::FileNotFound(format!("{}: {e}", file.display())),
            _ => RecorderError::Unknown(format!("{}: {e}", file.display())),
        })?;
        rmp_serde::decode::from_slice(&bytes)
            .map_err(|e| RecorderError::Unknown(format!("{}: {e}", file.display())))
    }
}
