//! Updates: finding, downloading, checking and activating bundles, and
//! going back when a new one misbehaves.
//!
//! # Layout
//! - `channel`: [`Source`] (an HTTP(S) index URL or a directory) and
//!   [`Fetcher`]: the size-capped index read and resumable, digest-checked
//!   downloads into staging.
//! - `check`: [`check_candidate`] (identity, signatures, integrity, fleet,
//!   channel, sequence), [`load_session`], [`health_check`] (golden examples
//!   on this device), [`skip_reason`] (judging an index before downloading).
//!   Refusals are [`Rejection`]s with stable codes.
//! - `metadata`: signed channel metadata ([`open_index`]) and its
//!   [`Freshness`] (versions only grow, expired metadata is refused).
//! - `store`: [`BundleStore`], the bundles on disk, the activation record,
//!   atomic activation, rollback, boot attempts, garbage collection.
//! - `error`: [`UpdateError`], failures of the machinery itself (network,
//!   disk), each with a stable `code()`.
//!
//! Everything here is blocking and holds no global state: the agent calls it
//! from a blocking thread and composes the steps:
//!
//! ```text
//! fetch_index → skip_reason? → download → check_candidate → load_session
//!     → health_check → store.activate → swap the session
//!   (a refusal: store.refuse(release, digest), so the same release is not fetched again)
//! ```
//!
//! # The state directory
//! ```text
//! store.lock                 flock held while a BundleStore is open (one agent per directory)
//! active.json                the activation record: active, previous, boot_attempts,
//!                            healthy, activated_ms, rejected_digests, rejected_releases,
//!                            floor (a rolled-back sequence), pin (an operator's downgrade)
//! active.json.prev           the record as it was before its last change
//! bundles/<digest>.ferry     activated bundles (the active and the previous one;
//!                            anything else is garbage for gc)
//! staging/<digest>.part      a download in progress (resumable)
//! staging/<digest>.ferry     a complete, digest-checked download
//! ```
//!
//! # Activation protocol
//! [`BundleStore::activate`] takes a staged file whose SHA-256 is the
//! candidate's digest (checked again before anything moves), then:
//!
//! 1. moves it to `bundles/<digest>.ferry` (a rename within the state
//!    directory; a file from elsewhere is copied to a `.tmp` and renamed),
//!    and fsyncs the file and the directories;
//! 2. writes the current record to `active.json.prev` (temporary file, fsync,
//!    rename);
//! 3. writes the new record (active = new, previous = the old active,
//!    `boot_attempts = 0`, `healthy = false`) to `active.json.tmp` and
//!    fsyncs it;
//! 4. renames `active.json.tmp` over `active.json` (the switch) and fsyncs
//!    the state directory.
//!
//! Every other change of the record (rollback, boot attempt, healthy,
//! rejection) is steps 2 to 4.
//!
//! # Crash guarantees
//! - A crash at any instant leaves `active.json` naming either the old or
//!   the new bundle, and that bundle's file complete: a bundle file is
//!   complete and fsynced before any record names it (step 1 before 3), and
//!   `active.json` is only ever replaced by an atomic rename of a complete,
//!   fsynced file. Before step 4 the old record is in force; after it, the
//!   new one. A crash before the directory fsync of step 4 may lose the
//!   switch on power loss, never tear it.
//! - A bundle is never deleted while a record names it: only [`BundleStore::gc`]
//!   deletes bundles, and only those neither active nor previous.
//! - `boot_attempts` is on disk (fsynced) before [`BundleStore::record_boot_attempt`]
//!   returns, so a crash loop is counted even if every start dies early.
//!
//! The steps are observable: [`BundleStore::activate_with`] runs a hook before
//! each [`ActivationStep`], and the tests stop there, reopen the store, and
//! check that the active bundle is complete and is the old or the new one.
//!
//! # Recovery rules ([`BundleStore::open`])
//! Half-written temporaries (`active.json.tmp`, `active.json.prev.tmp`,
//! `bundles/*.tmp`) are deleted: an activation that had not switched did not
//! happen. Then the first rule that applies wins:
//!
//! 1. `active.json` is readable and its active bundle's file has its digest
//!    (`open` reads the file once to check): used as is (a previous bundle
//!    whose file is gone is forgotten).
//! 2. It is readable but the active file is missing or damaged, and the
//!    previous bundle's file is intact: the previous bundle becomes active.
//! 3. `active.json` is missing, unreadable, of an unknown schema, or names
//!    no intact bundle, and `active.json.prev` names an intact one: the
//!    backup is restored.
//! 4. Otherwise, the bundle in `bundles/` whose file matches its digest,
//!    not rejected, with the highest release sequence (newest file on a tie)
//!    becomes active. This also completes a first activation that stopped
//!    after step 1 (the record named no bundle yet).
//! 5. Otherwise the store is empty, as on first boot.
//!
//! So the device is never left without a bundle while a complete one that
//! was not rejected is on disk. Rules 2 to 5 rewrite the record (boot attempts reset, not
//! healthy: the agent watches the bundle again), log a warning, and are
//! reported by [`BundleStore::recovery`]. The store checks digests, not
//! signatures: the agent verifies every bundle it loads, including after a
//! recovery.
//!
//! # Rollback
//! [`BundleStore::rollback`] makes the previous bundle active again (its file
//! checked first), adds the abandoned bundle's digest to `rejected_digests`
//! and its release (manifest hash) to `rejected_releases` (bounded, oldest
//! forgotten first) so the channel poller does not install it again, however
//! its file is re-signed, and raises the sequence `floor` of its fleet and
//! channel to its sequence: the channel installs only releases above it.
//! Only an operator-signed install goes below; when it is a downgrade it
//! sets `pin`, and the channel installs nothing until an operator-signed
//! `unpin`. There is no previous after a rollback.

mod channel;
mod check;
mod error;
mod metadata;
mod store;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

pub use channel::{
    CONNECT_TIMEOUT, DOWNLOAD_DEADLINE, Fetcher, MAX_INDEX_BYTES, READ_TIMEOUT, Source, parse_index,
};
pub use check::{
    Rejection, Want, bundle_ref, check_candidate, health_check, load_session, skip_reason,
};
pub use error::UpdateError;
pub use metadata::{FRESHNESS_FILE, Freshness, Seen, open_index};
pub use store::{
    ActivationRecord, ActivationStep, BundleStore, Crash, GcReport, MAX_REJECTED, PART_KEEP, Pin,
    RECORD_SCHEMA, Recovery, RecoveryAction, SequenceFloor, Slot, SlotRecord,
};

/// Checks that a digest is a SHA-256 in lowercase hex: it becomes a file
/// name, so anything else (`../`, separators) is refused first.
pub fn check_digest(digest: &str) -> Result<(), UpdateError> {
    if digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(UpdateError::BadDigest(digest.chars().take(80).collect()))
    }
}

/// SHA-256 (hex) and length of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), len))
}

/// Makes a directory's entries (creations, renames) durable.
fn sync_dir(dir: &Path) -> Result<(), UpdateError> {
    ferry_host::sync_dir(dir).map_err(|e| UpdateError::io("fsync", dir, e.source))
}

use ferry_host::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_before_they_name_files() {
        assert!(check_digest(&"ab".repeat(32)).is_ok());
        for bad in [
            String::new(),
            "ab".repeat(31),
            "AB".repeat(32),
            format!("../{}", "a".repeat(61)),
            "g".repeat(64),
        ] {
            assert_eq!(
                check_digest(&bad).unwrap_err().code(),
                "bad_digest",
                "{bad}"
            );
        }
    }
}
