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
    // `format: pt` in the header, as torch's writer puts it: transformers before 4.48.2 fails on
    // a file without metadata.
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let saved = safetensors::tensor::serialize_to_file(tensors.iter(), Some(metadata), &tmp)
        .with_context(|| format!("cannot write {} (is the disk full?)", path.display()));
    // candle flushes but does not sync: without it a power cut after the rename (and after the
    // old checkpoint is deleted) could leave an empty file under the final name.
    let saved = saved.and_then(|()| {
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot write {} (is the disk full?)", path.display()))
    });
    if let Err(e) = saved {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot rename into {}", path.display()))
}

/// Makes a folder's entries (new names, renames) durable. Best effort: some platforms and file
/// systems cannot open or sync a folder.
fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
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
    sync_dir(staging);
    fs::rename(staging, dest)
        .with_context(|| format!("cannot move {} into place", dest.display()))?;
    if let Some(parent) = dest.parent() {
        sync_dir(parent);
    }
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

/// Removes what a killed process left in `dir`: hidden staging folders (`.NAME.partial-PID`),
/// folders moved aside (`.NAME.old-PID`) and temp files (`.NAME.tmp-PID`) whose process no
/// longer runs. Returns what was removed. Does nothing where running processes cannot be seen
/// (no `/proc`), so a live writer's files are never touched.
pub fn remove_stale(dir: &Path) -> Vec<PathBuf> {
    let proc = Path::new("/proc");
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    if !proc.join("self").exists() {
        return Vec::new();
    }
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_pid(&name) else {
            continue;
        };
        if pid == std::process::id() || proc.join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        let gone = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The writer's PID in a name this module makes for unfinished work, if `name` is one.
fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    [".partial-", ".old-", ".tmp-"].iter().find_map(|marker| {
        let (_, pid) = rest.rsplit_once(marker)?;
        pid.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_unfinished_work_carry_a_pid() {
        assert_eq!(stale_pid(".epoch_0.partial-123"), Some(123));
        assert_eq!(stale_pid(".epoch_0.old-7"), Some(7));
        assert_eq!(stale_pid(".model.safetensors.tmp-42"), Some(42));
        assert_eq!(stale_pid("epoch_0"), None);
        assert_eq!(stale_pid(".epoch_0.partial-x"), None);
        assert_eq!(stale_pid(".hidden"), None);
    }

    #[test]
    fn leftovers_of_a_dead_process_are_removed_and_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("tune-atomic-stale-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // PIDs above the kernel's maximum (2^22) never run.
        let dead = dir.join(".epoch_0.partial-4194400");
        fs::create_dir_all(dead.join("recipe_state")).unwrap();
        fs::write(dir.join(".torchtune_config.yaml.tmp-4194401"), "x").unwrap();
        let live = dir.join(format!(".epoch_1.partial-{}", std::process::id()));
        fs::create_dir_all(&live).unwrap();
        fs::create_dir_all(dir.join("epoch_0")).unwrap();
        let removed = remove_stale(&dir);
        if Path::new("/proc/self").exists() {
            assert_eq!(removed.len(), 2, "{removed:?}");
            assert!(!dead.exists());
        }
        assert!(live.exists() && dir.join("epoch_0").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
