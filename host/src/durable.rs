//! Durable file writes.
//!
//! [`write_durably`] writes `bytes` to a temporary file in the target's
//! directory (a name unique to this process and call, so concurrent writers
//! never share one), fsyncs it, renames it over the target and fsyncs the
//! directory so the rename itself survives a power cut. If any step fails
//! the temporary file is removed and the target keeps its old content.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A durable write that failed. For every step but `fsync-dir` the target
/// is unchanged; after `fsync-dir` it holds the new content, but the rename
/// may not survive a power cut.
#[derive(Debug, thiserror::Error)]
#[error("cannot {step} {}: {source}", path.display())]
pub struct WriteError {
    /// The file (or directory) the failing step worked on.
    pub path: PathBuf,
    /// The step that failed: "create", "write", "fsync", "rename",
    /// "fsync-dir".
    pub step: &'static str,
    /// What the operating system said.
    #[source]
    pub source: std::io::Error,
}

impl WriteError {
    /// A stable identifier for telemetry.
    pub fn code(&self) -> &'static str {
        "write_failed"
    }
}

/// Calls on this process, so two threads writing the same target never
/// pick the same temporary name.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` so that a crash leaves the old or the new
/// content, never a torn file. Creates the parent directory if needed.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let err = |step, p: &Path| {
        let p = p.to_path_buf();
        move |source| WriteError {
            path: p,
            step,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(err("create", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(err("create", &tmp))?;
        f.write_all(bytes).map_err(err("write", &tmp))?;
        f.sync_all().map_err(err("fsync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(err("rename", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // The new content is in place; only the rename's durability is at stake.
    sync_dir(dir).map_err(|e| WriteError {
        step: "fsync-dir",
        ..e
    })
}

/// Fsyncs a directory, so renames and creations in it are durable. (On
/// systems other than Unix a directory cannot be opened for this: a no-op.)
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    if cfg!(not(unix)) {
        return Ok(());
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| WriteError {
            path: dir.to_path_buf(),
            step: "fsync",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn writes_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("sub/state.json");
        write_durably(&target, b"one").unwrap();
        write_durably(&target, b"two").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"two");
        assert!(leftovers(&dir.path().join("sub")).is_empty());
    }

    #[test]
    fn a_failed_rename_keeps_the_old_content_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        // A directory in the target's place: the rename must fail.
        let target = dir.path().join("taken");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), b"old").unwrap();
        let e = write_durably(&target, b"new").unwrap_err();
        assert_eq!(e.step, "rename", "{e}");
        assert_eq!(e.code(), "write_failed");
        assert_eq!(std::fs::read(target.join("inside")).unwrap(), b"old");
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }

    #[test]
    fn concurrent_writers_never_tear_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("shared");
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let target = &target;
                s.spawn(move || {
                    for _ in 0..50 {
                        write_durably(target, &[t; 4096]).unwrap();
                    }
                });
            }
        });
        let bytes = std::fs::read(&target).unwrap();
        assert_eq!(bytes.len(), 4096);
        assert!(bytes.iter().all(|b| *b == bytes[0]));
        assert!(leftovers(dir.path()).is_empty());
    }
}
