//! The device's memory of `auto`'s engine choices: one per release, in
//! `<state_dir>/engines.json`.
//!
//! Under `auto` with both engines present, the runtime measures tract and
//! onnxruntime on a bundle's first load and keeps one. Measured again at
//! every start, two engines within noise of each other could serve the same
//! release on different engines across restarts (last-digit differences in
//! answers, and a cold start paying for two model loads and a race). So the
//! agent remembers the outcome per release (the manifest's hash) and hands
//! it back on later loads ([`ferry_runtime::Session::from_verified_remembering`]):
//! the same release serves on the same engine until one of these changes,
//! which makes the next load measure again:
//! - the release (a new one is measured once, on its first load);
//! - `libonnxruntime`: its path, size or modification time (replaced,
//!   upgraded) or its absence;
//! - the agent's version (another tract, another `ort`).
//!
//! The file is small (at most [`MAX_REMEMBERED`] releases, the oldest
//! forgotten first), written whole to a temporary file and renamed. A file
//! that cannot be read or parsed is ignored (logged) and rewritten on the next
//! measurement: losing it costs one measurement, never a prediction.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_runtime::{Engine, EngineDecision, EngineOptions, Session};
use serde::{Deserialize, Serialize};

/// Releases remembered at most: the active and previous bundles, shadows and
/// refused candidates, with room to spare.
pub const MAX_REMEMBERED: usize = 16;

/// The file's name in the state directory.
pub const FILE_NAME: &str = "engines.json";

/// What the decision depended on besides the release: if any of it differs
/// at the next load, the engines are measured again.
///
/// Persisted: do not reorder or remove fields; add new ones at the end with
/// `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Circumstances {
    /// The agent's version (its tract and `ort`).
    pub agent_version: String,
    /// `libonnxruntime`'s path, size and modification time (ns since the
    /// epoch); `None` when it was not found.
    pub library: Option<(String, u64, u128)>,
}

impl Circumstances {
    /// This process's circumstances under `options`.
    pub fn now(options: &EngineOptions) -> Circumstances {
        let library = options.library().ok().and_then(|p| {
            let meta = std::fs::metadata(&p).ok()?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            Some((p.display().to_string(), meta.len(), modified))
        });
        Circumstances {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            library,
        }
    }
}

/// One remembered choice.
///
/// Persisted: do not reorder or remove fields; add new ones at the end with
/// `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// The release id (SHA-256 of the manifest).
    pub release: String,
    /// `tract` or `onnxruntime`.
    pub engine: String,
    pub circumstances: Circumstances,
    /// The medians measured, µs, per engine (for operators reading the file).
    pub measured_us: Vec<(String, Option<f64>)>,
    /// When it was measured, Unix ms.
    pub at_ms: u64,
}

/// The file's content.
///
/// Persisted: do not reorder or remove fields; add new ones at the end with
/// `#[serde(default)]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct File {
    choices: Vec<Choice>,
}

/// The memory, over its file.
#[derive(Debug)]
pub struct EngineMemory {
    path: PathBuf,
    lock: Mutex<()>,
}

impl EngineMemory {
    pub fn open(state_dir: &Path) -> EngineMemory {
        EngineMemory {
            path: state_dir.join(FILE_NAME),
            lock: Mutex::new(()),
        }
    }

    fn read(&self) -> File {
        match std::fs::read(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "Cannot read the engine choices: measuring again");
                File::default()
            }
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %self.path.display(), error = %e, "Engine choices unreadable: measuring again");
                File::default()
            }),
        }
    }

    /// The engine chosen for `release` before, if it was chosen in the same
    /// circumstances.
    pub fn recall(&self, release: &str, options: &EngineOptions) -> Option<Engine> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let now = Circumstances::now(options);
        let file = self.read();
        let choice = file.choices.iter().rev().find(|c| c.release == release)?;
        if choice.circumstances != now {
            tracing::info!(
                release,
                "The engine library or the agent changed since the engines were measured: measuring again"
            );
            return None;
        }
        Engine::from_name(&choice.engine)
    }

    /// Remembers the engine `auto` measured and chose for `release` (only
    /// when the session measured: a remembered or single-engine load has
    /// nothing new to record).
    pub fn record(&self, release: &str, session: &Session, options: &EngineOptions) {
        if session.engine_decision() != EngineDecision::Measured || release.is_empty() {
            return;
        }
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut file = self.read();
        file.choices.retain(|c| c.release != release);
        file.choices.push(Choice {
            release: release.to_string(),
            engine: session.engine().name().to_string(),
            circumstances: Circumstances::now(options),
            measured_us: session
                .engine_race()
                .iter()
                .map(|(e, d)| {
                    (
                        e.name().to_string(),
                        d.map(|d| (d.as_secs_f64() * 1e7).round() / 10.0),
                    )
                })
                .collect(),
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        });
        let excess = file.choices.len().saturating_sub(MAX_REMEMBERED);
        file.choices.drain(..excess);
        let tmp = self.path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "Cannot record the engine choice: the next start measures again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_file_is_ignored_and_nothing_is_recalled() {
        let dir = tempfile::tempdir().unwrap();
        let memory = EngineMemory::open(dir.path());
        let options = EngineOptions::default();
        assert_eq!(memory.recall("r1", &options), None);
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        assert_eq!(memory.recall("r1", &options), None);
    }

    #[test]
    fn a_choice_made_in_other_circumstances_is_not_recalled() {
        let dir = tempfile::tempdir().unwrap();
        let memory = EngineMemory::open(dir.path());
        let options = EngineOptions::default();
        let mut now = Circumstances::now(&options);
        let file = |c: Circumstances| File {
            choices: vec![Choice {
                release: "r1".into(),
                engine: "onnxruntime".into(),
                circumstances: c,
                measured_us: vec![],
                at_ms: 0,
            }],
        };
        std::fs::write(
            dir.path().join(FILE_NAME),
            serde_json::to_vec(&file(now.clone())).unwrap(),
        )
        .unwrap();
        assert_eq!(memory.recall("r1", &options), Some(Engine::OnnxRuntime));
        assert_eq!(memory.recall("r2", &options), None);
        now.agent_version = "0.0.0-other".into();
        std::fs::write(
            dir.path().join(FILE_NAME),
            serde_json::to_vec(&file(now)).unwrap(),
        )
        .unwrap();
        assert_eq!(memory.recall("r1", &options), None);
    }
}
