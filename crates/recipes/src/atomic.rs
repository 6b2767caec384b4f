//! Crash-safe writes: every file goes to a temporary name in the same folder and is renamed into
//! place, so a kill at any moment leaves either the old file or the new one, never a torn one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The usual reason a write fails, and its fix.
const FULL_DISK: &str = "is the disk full? free space, or point output_dir at another disk";

fn temp_name(path: &Path) -> PathBuf {
    marked(path, "tmp")
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
                "cannot write {} ({FULL_DISK}, or is the folder read-only?)",
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
    // safetensors writes through a private temporary file (mode 0600); the checkpoint should be
    // as readable as any file this process creates (umask), e.g. by a serving process.
    let permissions = fs::File::create(&tmp)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions())
        .with_context(|| format!("cannot write {} ({FULL_DISK})", path.display()))?;
    // `format: pt` in the header, as torch's writer puts it: transformers before 4.48.2 fails on
    // a file without metadata.
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let saved = safetensors::tensor::serialize_to_file(tensors.iter(), Some(metadata), &tmp)
        .map_err(|e| match e {
            // The I/O error itself: safetensors' wrapper would print it twice.
            safetensors::SafeTensorError::IoError(io) => anyhow::Error::new(io),
            other => anyhow::anyhow!("{other}"),
        })
        .with_context(|| format!("cannot write {} ({FULL_DISK})", path.display()));
    // candle flushes but does not sync: without it a power cut after the rename (and after the
    // old checkpoint is deleted) could leave an empty file under the final name.
    let saved = saved.and_then(|()| {
        fs::set_permissions(&tmp, permissions)
            .and_then(|()| fs::File::open(&tmp))
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot write {} ({FULL_DISK})", path.display()))
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

/// This process's mark in the names of its unfinished work (`HOST-PID`): the host keeps two
/// machines sharing an output folder (NFS) from reaping each other's live saves.
fn owner() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().replace(['/', '.'], "_"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string());
    format!("{host}-{}", std::process::id())
}

/// `.NAME.KIND-HOST-PID` next to `dest`.
fn marked(dest: &Path, kind: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.{kind}-{}", owner()))
}

/// Replaces directory `dest` by the fully written `staging` directory. The old `dest` (if any) is
/// moved aside first and deleted only after the new one is in place; a crash in between leaves
/// it aside, and [`remove_stale`] moves it back.
pub fn replace_dir(staging: &Path, dest: &Path) -> Result<()> {
    let old = marked(dest, "old");
    // Durable before anything is moved: the window without `dest` stays two renames long.
    sync_dir(staging);
    let had_old = dest.exists();
    if had_old && !dest.is_dir() {
        // Moved aside, it could not be removed as an old folder would: leave it to its owner.
        fs::remove_dir_all(staging).ok();
        anyhow::bail!(
            "{} is in the way: it is not a folder this run wrote; move it and save again",
            dest.display()
        );
    }
    if had_old {
        fs::rename(dest, &old).with_context(|| format!("cannot move aside {}", dest.display()))?;
    }
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
    let staging = marked(dest, "partial");
    if staging.exists() {
        fs::remove_dir_all(&staging).ok();
    }
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    Ok(staging)
}

/// Cleans up after runs of this host that were killed, at the start of a run (before it writes
/// anything): staging folders (`.NAME.partial-HOST-PID`) and temp files (`.NAME.tmp-HOST-PID`)
/// are removed; a folder moved aside (`.NAME.old-HOST-PID`) goes back to `NAME` when the save
/// that replaced it never finished, else it is removed. Entries of processes still running, and
/// of other hosts, are left alone; so is everything where running processes cannot be seen (no
/// `/proc`). Returns what was done, for the log.
pub fn remove_stale(dir: &Path) -> Vec<String> {
    let proc = Path::new("/proc");
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    if !proc.join("self").exists() {
        return Vec::new();
    }
    let me = owner();
    let (host, _) = me.rsplit_once('-').expect("owner() is HOST-PID");
    let mut done = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((original, kind, entry_host, pid)) = unfinished(&name) else {
            continue;
        };
        // This process has written nothing yet: its own PID means an earlier, dead one.
        let alive = pid != std::process::id() && proc.join(pid.to_string()).exists();
        if entry_host != host || alive {
            continue;
        }
        let path = entry.path();
        let target = dir.join(original);
        if kind == "old" && !target.exists() {
            if fs::rename(&path, &target).is_ok() {
                done.push(format!(
                    "restored {} (its replacement never finished)",
                    target.display()
                ));
            }
            continue;
        }
        let gone = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if gone.is_ok() {
            done.push(format!("removed {} (left by a killed run)", path.display()));
        }
    }
    done
}

/// `(NAME, kind, host, pid)` of a name this module gives unfinished work, if `name` is one.
fn unfinished(name: &str) -> Option<(&str, &'static str, &str, u32)> {
    let rest = name.strip_prefix('.')?;
    ["partial", "old", "tmp"].into_iter().find_map(|kind| {
        let (original, mark) = rest.rsplit_once(&format!(".{kind}-"))?;
        let (host, pid) = mark.rsplit_once('-')?;
        Some((original, kind, host, pid.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_unfinished_work_parse() {
        assert_eq!(
            unfinished(".epoch_0.partial-node-1-123"),
            Some(("epoch_0", "partial", "node-1", 123))
        );
        assert_eq!(
            unfinished(".epoch_0.old-h-7"),
            Some(("epoch_0", "old", "h", 7))
        );
        assert_eq!(
            unfinished(".model.safetensors.tmp-h-42"),
            Some(("model.safetensors", "tmp", "h", 42))
        );
        assert_eq!(unfinished("epoch_0"), None);
        assert_eq!(unfinished(".epoch_0.partial-h-x"), None);
        assert_eq!(unfinished(".hidden"), None);
    }

    #[test]
    fn a_killed_runs_leftovers_are_cleaned_and_a_folder_moved_aside_comes_back() {
        if !Path::new("/proc/self").exists() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let me = owner();
        let host = me.rsplit_once('-').unwrap().0.to_string();
        // PIDs above the kernel's maximum (2^22) never run; PID 1 always does.
        let dead =
            |kind: &str, name: &str| dir.path().join(format!(".{name}.{kind}-{host}-4194400"));
        fs::create_dir_all(dead("partial", "epoch_1").join("recipe_state")).unwrap();
        fs::write(dead("tmp", "torchtune_config.yaml"), "x").unwrap();
        // A crash between moving epoch_0 aside and moving its replacement in.
        fs::create_dir_all(dead("old", "epoch_0")).unwrap();
        fs::write(dead("old", "epoch_0").join("weights"), "old").unwrap();
        // Kept: a live process's, another host's, and an old folder whose replacement landed.
        let live = dir.path().join(format!(".epoch_2.partial-{host}-1"));
        let other_host = dir.path().join(".epoch_3.partial-elsewhere-4194400");
        fs::create_dir_all(&live).unwrap();
        fs::create_dir_all(&other_host).unwrap();
        fs::create_dir_all(dir.path().join("step_4")).unwrap();
        fs::create_dir_all(dead("old", "step_4")).unwrap();

        let done = remove_stale(dir.path());
        assert_eq!(done.len(), 4, "{done:?}");
        assert_eq!(
            fs::read_to_string(dir.path().join("epoch_0/weights")).unwrap(),
            "old"
        );
        assert!(!dead("partial", "epoch_1").exists() && !dead("old", "step_4").exists());
        assert!(live.exists() && other_host.exists() && dir.path().join("step_4").exists());
    }
}
