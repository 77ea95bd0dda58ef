//! Opening sled. The only module of this crate that names sled.
//!
//! Two processes must never share one database. Before sled opens, the
//! caller's process takes an exclusive lock on [`LOCK_FILE`] in the
//! database's directory, held as long as the [`SledHandle`] lives: a second
//! process (or a second open in this one) gets [`OpenError::Locked`] once
//! `lock_wait` has passed. The wait is for a handle of this same process
//! that is still closing (a console restarting in-process while a blocking
//! task still holds its store). sled also locks its own `db` file, and
//! sled's background threads may keep a closed database's lock a moment
//! after its last handle is dropped: when sled's open fails while we hold
//! our lock and sled's lock is busy, we wait for it too, within the same
//! `lock_wait`.
//! Whether sled's lock is what failed is learnt by probing that lock, not by
//! reading sled's error message.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lock file taken in the database's directory before sled opens.
pub const LOCK_FILE: &str = "ferry.lock";

/// sled's own lock file inside the database directory (sled 0.34 locks it
/// with `flock` while a `Db` is open).
const SLED_DB_FILE: &str = "db";

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process (or another open handle) holds the database.
    #[error("{} is in use by another process", path.display())]
    Locked {
        /// The database directory.
        path: PathBuf,
    },
    /// The directory or the lock file cannot be created or opened.
    #[error("cannot open {}: {source}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// sled refused the database (corrupt files, unsupported version...).
    #[error("cannot open the database in {}: {source}", path.display())]
    Sled {
        /// The database directory.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
}

impl OpenError {
    /// A stable identifier for telemetry.
    pub fn code(&self) -> &'static str {
        match self {
            OpenError::Locked { .. } => "locked",
            OpenError::Io { .. } => "io",
            OpenError::Sled { .. } => "corrupt",
        }
    }
}

/// An open sled database and the lock that keeps other processes out.
#[derive(Debug)]
pub struct SledHandle {
    /// The database.
    pub db: sled::Db,
    _lock: File,
}

/// Opens the sled database in `path` (created if absent) with `config`
/// (whose path is set here), holding [`LOCK_FILE`] for as long as the
/// returned handle lives. `lock_wait` bounds the wait for either lock (a
/// handle still closing); past it the answer is [`OpenError::Locked`].
pub fn open_sled(
    path: &Path,
    config: sled::Config,
    lock_wait: Duration,
) -> Result<SledHandle, OpenError> {
    let io = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(io)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.join(LOCK_FILE))
        .map_err(io)?;
    let started = Instant::now();
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) if started.elapsed() < lock_wait => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(OpenError::Locked {
                    path: path.to_path_buf(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
    }
    let config = config.path(path);
    loop {
        match config.open() {
            Ok(db) => return Ok(SledHandle { db, _lock: lock }),
            Err(source) => {
                if !sled_lock_busy(path) {
                    return Err(OpenError::Sled {
                        path: path.to_path_buf(),
                        source,
                    });
                }
                if started.elapsed() >= lock_wait {
                    return Err(OpenError::Locked {
                        path: path.to_path_buf(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Whether sled's own lock on its `db` file is held right now (by a handle
/// of this process still closing, or by a program that does not take
/// [`LOCK_FILE`]).
fn sled_lock_busy(path: &Path) -> bool {
    let Ok(file) = File::open(path.join(SLED_DB_FILE)) else {
        return false;
    };
    matches!(file.try_lock(), Err(TryLockError::WouldBlock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_is_refused_as_locked_and_the_first_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let first = open_sled(dir.path(), sled::Config::new(), Duration::ZERO).unwrap();
        first.db.insert(b"k", b"v").unwrap();
        let e = open_sled(dir.path(), sled::Config::new(), Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, OpenError::Locked { .. }), "{e}");
        assert_eq!(e.code(), "locked");
        assert_eq!(first.db.get(b"k").unwrap().unwrap().as_ref(), b"v");
        drop(first);
        let again = open_sled(dir.path(), sled::Config::new(), Duration::from_secs(2)).unwrap();
        assert_eq!(again.db.get(b"k").unwrap().unwrap().as_ref(), b"v");
    }

    #[test]
    fn sleds_own_lock_held_elsewhere_is_reported_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        // A database opened without our lock file (as an older program would).
        let foreign = sled::Config::new().path(dir.path()).open().unwrap();
        let e = open_sled(dir.path(), sled::Config::new(), Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, OpenError::Locked { .. }), "{e}");
        drop(foreign);
    }

    #[test]
    fn garbage_in_the_directory_is_a_sled_error_not_a_lock() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("conf"), b"\x00\xffnot a sled config at all").unwrap();
        std::fs::write(dir.path().join("db"), b"garbage").unwrap();
        match open_sled(dir.path(), sled::Config::new(), Duration::from_millis(100)) {
            Err(e @ OpenError::Sled { .. }) => assert_eq!(e.code(), "corrupt"),
            other => panic!("expected a sled error, got {other:?}"),
        }
    }
}
