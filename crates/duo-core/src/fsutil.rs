//! File writes that never leave a half-written file behind: a crash or Ctrl-C keeps the old one.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{DuoError, Result};

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DuoError::io(dir, e))?;
    }
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp).map_err(|e| DuoError::io(&tmp, e))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| DuoError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DuoError::io(path, e))
}

/// Writes `value` as pretty-printed JSON (with a final newline), atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| DuoError::Invalid(format!("serialising {}: {e}", path.display())))?;
    write_atomic(path, format!("{text}\n").as_bytes())
}

/// `dest` as a hard link to `source` (no copy of the bytes), or a copy where the file system cannot
/// link them (another device); its folder is created.
pub fn link_or_copy(source: &Path, dest: &Path) -> Result<()> {
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DuoError::io(dir, e))?;
    }
    if std::fs::hard_link(source, dest).is_err() {
        std::fs::copy(source, dest).map_err(|e| DuoError::io(dest, e))?;
    }
    Ok(())
}

/// The images of `path`: the file itself, or a folder's PNG and JPEG files by name.
pub fn image_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| DuoError::io(path, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
            matches!(ext.as_str(), "png" | "jpg" | "jpeg")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DuoError::Invalid(format!("{}: no PNG or JPEG images", path.display())));
    }
    Ok(files)
}
