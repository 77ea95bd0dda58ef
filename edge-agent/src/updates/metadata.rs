//! Signed channel metadata: the channel's `index.json` as a DSSE envelope
//! signed by the root's `channel` role, with a version that only grows and
//! an expiry (TUF's timestamp role, for a device that pulls).
//!
//! - [`open_index`]: with a channel role in the root, the index must be an
//!   envelope of type [`CHANNEL_PAYLOAD_TYPE`] meeting the role's threshold
//!   (`unsigned_metadata`, `metadata_signature`); without one (a root derived
//!   from `trusted_keys`, or one without that role) a plain index is read as
//!   before.
//! - [`Freshness`]: the highest version and the newest signing time seen,
//!   persisted in `<state_dir>/channel.json`. Metadata below that version is
//!   refused (`metadata_rollback`), and so is metadata whose `expires_ms` is
//!   not after the device's idea of now: the later of its clock and the
//!   newest signing time it has seen (`metadata_expired`), so a clock set
//!   back does not revive expired metadata.
//!
//! A refusal leaves the running release in place; the poller keeps trying.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_format::{Envelope, Root};
use ferry_protocol::{CHANNEL_PAYLOAD_TYPE, ChannelIndex};
use serde::{Deserialize, Serialize};

use super::Rejection;

/// The freshness record's file under the state directory.
pub const FRESHNESS_FILE: &str = "channel.json";

/// Returns the index JSON to parse: the verified payload of signed
/// metadata, or the bytes themselves when the root has no channel role.
pub fn open_index(bytes: &[u8], root: &Root) -> Result<(Vec<u8>, bool), Rejection> {
    let envelope = Envelope::from_json(bytes)
        .ok()
        .filter(|e| !e.payload_type.is_empty());
    match (root.channel_policy(), envelope) {
        (Some(policy), Some(envelope)) => envelope
            .verify(CHANNEL_PAYLOAD_TYPE, policy)
            .map(|(payload, _)| (payload, true))
            .map_err(|e| Rejection::new("metadata_signature", e.to_string())),
        (Some(_), None) => Err(Rejection::new(
            "unsigned_metadata",
            "the channel index is not signed, and this device's root has a channel role",
        )),
        (None, Some(envelope)) => envelope
            .payload_unverified()
            .map(|p| (p, false))
            .map_err(|e| Rejection::new("bad_metadata", e.to_string())),
        (None, None) => Ok((bytes.to_vec(), false)),
    }
}

/// What the device has seen of signed channel metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub version: u64,
    pub newest_issued_ms: u64,
}

/// The persisted [`Seen`] record and the checks against it.
pub struct Freshness {
    path: PathBuf,
    seen: Mutex<Seen>,
}

impl Freshness {
    /// Reads `<state_dir>/channel.json` (a missing or damaged record starts
    /// from nothing, with a warning: the signatures still hold).
    pub fn open(state_dir: &Path) -> Freshness {
        let path = state_dir.join(FRESHNESS_FILE);
        let seen = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "Channel freshness record damaged; starting afresh");
                Seen::default()
            }),
            Err(_) => Seen::default(),
        };
        Freshness {
            path,
            seen: Mutex::new(seen),
        }
    }

    /// What has been seen.
    pub fn seen(&self) -> Seen {
        *self.seen.lock().unwrap()
    }

    /// Checks signed metadata against what was seen and the time, then
    /// records it. `now_ms` is the device's clock.
    pub fn check(&self, index: &ChannelIndex, now_ms: u64) -> Result<(), Rejection> {
        if index.version == 0 || index.expires_ms == 0 {
            return Err(Rejection::new(
                "bad_metadata",
                "signed channel metadata needs a `version` and an `expires_ms`",
            ));
        }
        let mut seen = self.seen.lock().unwrap();
        if index.version < seen.version {
            return Err(Rejection::new(
                "metadata_rollback",
                format!(
                    "channel metadata version {} is older than version {} seen before",
                    index.version, seen.version
                ),
            ));
        }
        let believed_now = now_ms.max(seen.newest_issued_ms);
        if index.expires_ms <= believed_now {
            return Err(Rejection::new(
                "metadata_expired",
                format!(
                    "channel metadata version {} expired at {} ms; it is {} ms (the later of this clock and the newest signed time seen)",
                    index.version, index.expires_ms, believed_now
                ),
            ));
        }
        let next = Seen {
            version: seen.version.max(index.version),
            newest_issued_ms: seen.newest_issued_ms.max(index.issued_ms),
        };
        if next != *seen {
            let bytes = serde_json::to_vec(&next).expect("serialises");
            if let Err(e) = ferry_host::write_durably(&self.path, &bytes) {
                tracing::error!(file = %self.path.display(), error = %e, "Cannot record channel freshness");
            }
            *seen = next;
        }
        Ok(())
    }
}
