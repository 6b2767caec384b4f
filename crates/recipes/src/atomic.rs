//! Crash-safe writes: every file goes to a temporary name in the same folder and is renamed into
//! place, so a kill at any moment leaves either the old file or the new one, never a torn one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_name(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| {
            format!(
                "cannot write {} (is the disk full or the folder read-only?)",
                path.display()
            )
        });
    }
    Ok(())
}

/// Saves tensors as safetensors atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    let tmp = temp_name(path);
    let saved = candle_core::safetensors::save(tensors, &tmp)
        .with_context(|| format!("cannot write {} (is the disk full?)", path.display()));
    if let Err(e) = saved {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot rename into {}", path.display()))
}

/// Replaces directory `dest` by the fully written `staging` directory. The old `dest` (if any) is
/// moved aside first and deleted only after the new one is in place.
pub fn replace_dir(staging: &Path, dest: &Path) -> Result<()> {
    let old = dest.with_file_name(format!(
        ".{}.old-{}",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let had_old = dest.exists();
    if had_old {
        fs::rename(dest, &old).with_context(|| format!("cannot move aside {}", dest.display()))?;
    }
    fs::rename(staging, dest)
        .with_context(|| format!("cannot move {} into place", dest.display()))?;
    if had_old {
        fs::remove_dir_all(&old).ok();
    }
    Ok(())
}

/// A fresh staging directory next to `dest`.
pub fn staging_dir(dest: &Path) -> Result<PathBuf> {
    let staging = dest.with_file_name(format!(
        ".{}.partial-{}",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    if staging.exists() {
        fs::remove_dir_all(&staging).ok();
    }
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    Ok(staging)
}
