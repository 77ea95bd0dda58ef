//! The device's root of trust: which keys sign releases, commands and
//! channel metadata (see `ferry_format::Root`).
//!
//! ```text
//! paths.root            the root installed at provisioning (a signed envelope)
//! <state_dir>/root.json the newest root reached by rotation (written durably)
//! ```
//!
//! At start the newer of the two is used (a device re-provisioned with a
//! newer root takes it; a rotated one keeps its rotation). Without
//! `paths.root` the root is derived from `paths.trusted_keys` and
//! `key_threshold` (version 0: those keys sign releases, commands and roots),
//! so agents configured before roots existed keep working, and such a device
//! moves to a real root when the channel offers version 1 signed by those
//! keys.
//!
//! A rotation is applied only through [`Roots::apply`], which checks it
//! against the current root (`Root::update`: next version, old and new root
//! thresholds) before anything is written.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use ferry_format::{MetadataError, PublicKey, Root};

use crate::config::Config;

/// The file under the state directory that holds the newest root.
pub const ROOT_FILE: &str = "root.json";

/// The root in force, replaced atomically by a rotation.
pub struct Roots {
    path: PathBuf,
    current: ArcSwap<Root>,
}

impl Roots {
    /// Loads the provisioned (or derived) root and the stored rotation, and
    /// keeps the newer.
    pub fn open(config: &Config) -> Result<Roots> {
        let provisioned = match &config.paths.root {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read paths.root {}", path.display()))?;
                Root::from_envelope(&bytes)
                    .with_context(|| format!("paths.root {} is not a valid root", path.display()))?
            }
            None => legacy(config)?,
        };
        let path = config.paths.state_dir.join(ROOT_FILE);
        let stored = match std::fs::read(&path) {
            Ok(bytes) => match Root::from_envelope(&bytes) {
                Ok(root) => Some(root),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "Stored root is damaged; using the provisioned one");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let root = match stored {
            Some(s) if s.version() > provisioned.version() => s,
            _ => provisioned,
        };
        tracing::info!(
            version = root.version(),
            legacy = root.is_legacy(),
            channel_signed = root.channel_policy().is_some(),
            "Root of trust"
        );
        Ok(Roots {
            path,
            current: ArcSwap::from_pointee(root),
        })
    }

    /// The root in force.
    pub fn current(&self) -> Arc<Root> {
        self.current.load_full()
    }

    /// Checks `bytes` as the next root and, if it passes, stores it durably
    /// and puts it in force.
    pub fn apply(&self, bytes: &[u8]) -> Result<Arc<Root>, ApplyError> {
        let next = self.current().update(bytes).map_err(ApplyError::Refused)?;
        ferry_host::write_durably(&self.path, bytes).map_err(|e| ApplyError::Io(e.to_string()))?;
        let next = Arc::new(next);
        self.current.store(next.clone());
        tracing::warn!(version = next.version(), "Root of trust rotated");
        Ok(next)
    }

    /// Where rotations are stored.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Why a root update was not applied.
#[derive(Debug)]
pub enum ApplyError {
    Refused(MetadataError),
    Io(String),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Refused(e) => write!(f, "{e}"),
            ApplyError::Io(e) => write!(f, "cannot store the new root: {e}"),
        }
    }
}

impl ApplyError {
    pub fn code(&self) -> &'static str {
        match self {
            ApplyError::Refused(e) => e.code(),
            ApplyError::Io(_) => "io",
        }
    }
}

fn legacy(config: &Config) -> Result<Root> {
    let mut keys = Vec::new();
    for path in &config.paths.trusted_keys {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read trusted key {}", path.display()))?;
        keys.extend(
            PublicKey::all_from_pem(&text)
                .with_context(|| format!("invalid trusted key file {}", path.display()))?,
        );
    }
    Root::legacy(keys, config.paths.key_threshold)
        .context("invalid trust settings (paths.trusted_keys / key_threshold)")
}
