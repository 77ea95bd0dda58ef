//! The bundle store on disk: which bundle is active, which one came before,
//! and how one becomes the other without a window where neither is.
//!
//! ```text
//! <state_dir>/store.lock         held (flock) while a BundleStore is open
//! <state_dir>/active.json        the activation record (ActivationRecord)
//! <state_dir>/active.json.prev   the record as it was before the last change
//! <state_dir>/bundles/<digest>.ferry
//! <state_dir>/staging/<digest>.part | <digest>.ferry   downloads
//! ```
//!
//! The protocol and the recovery rules are written down in the module
//! header of `updates` (they are the contract the agent relies on).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ferry_format::{HEADER_LEN, Header, Manifest, ReadLimits, manifest_unverified};
use ferry_protocol::BundleRef;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tracing::{debug, info, warn};

use super::error::UpdateError;
use super::{check_digest, now_ms, sha256_file, sync_dir};

/// Version of [`ActivationRecord`].
pub const RECORD_SCHEMA: u32 = 1;

/// Rejected digests remembered. Enough to cover every candidate a channel
/// offers between two fixes; the oldest is forgotten first.
pub const MAX_REJECTED: usize = 32;

/// A partial download younger than this survives [`BundleStore::gc`] so an
/// interrupted transfer can still resume; older ones are assumed abandoned.
pub const PART_KEEP: Duration = Duration::from_secs(24 * 3600);

const RECORD: &str = "active.json";
const RECORD_TMP: &str = "active.json.tmp";
const BACKUP: &str = "active.json.prev";
const BACKUP_TMP: &str = "active.json.prev.tmp";
const LOCK: &str = "store.lock";
const BUNDLES: &str = "bundles";
const STAGING: &str = "staging";

/// A bundle the record names, as stored in `active.json`.
///
/// Do not reorder or remove fields; add new ones at the end with
/// `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub bundle: BundleRef,
    /// Relative to the state directory: `bundles/<digest>.ferry`. Written
    /// for people and tools; the store derives the path from the digest.
    pub file: String,
}

/// The activation record, `active.json`.
///
/// Do not reorder or remove fields; add new ones at the end with
/// `#[serde(default)]`. A change that cannot follow these rules bumps
/// [`RECORD_SCHEMA`]; an agent that finds a schema it does not know treats
/// the record as unusable and recovers (see the `updates` module header).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationRecord {
    pub schema: u32,
    pub active: Option<SlotRecord>,
    #[serde(default)]
    pub previous: Option<SlotRecord>,
    /// Starts of the active bundle that have not (yet) reached a healthy state.
    #[serde(default)]
    pub boot_attempts: u32,
    /// The active bundle passed probation.
    #[serde(default)]
    pub healthy: bool,
    /// Unix milliseconds of the last activation or rollback.
    #[serde(default)]
    pub activated_ms: u64,
    /// Bundle files refused or rolled back, oldest first (at most [`MAX_REJECTED`]).
    #[serde(default)]
    pub rejected_digests: Vec<String>,
    /// Releases (manifest hashes) refused or rolled back, oldest first (at
    /// most [`MAX_REJECTED`]): what identifies a release whatever signatures
    /// its file carries.
    #[serde(default)]
    pub rejected_releases: Vec<String>,
    /// The highest sequence rolled back in this fleet and channel: the
    /// channel installs only releases above it; an operator-signed install
    /// may go below.
    #[serde(default)]
    pub floor: Option<SequenceFloor>,
    /// Set by an operator-signed downgrade: the channel installs nothing
    /// until an operator-signed `unpin`.
    #[serde(default)]
    pub pin: Option<Pin>,
}

/// A rolled-back sequence (see [`ActivationRecord::floor`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceFloor {
    pub fleet: String,
    pub channel: String,
    pub sequence: u64,
}

/// An operator's pin (see [`ActivationRecord::pin`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The release pinned to (manifest hash).
    pub release: String,
    pub sequence: u64,
    /// The signed command that set it.
    pub command_id: String,
    pub since_ms: u64,
}

impl ActivationRecord {
    fn empty() -> ActivationRecord {
        ActivationRecord {
            schema: RECORD_SCHEMA,
            active: None,
            previous: None,
            boot_attempts: 0,
            healthy: false,
            activated_ms: 0,
            rejected_digests: Vec::new(),
            rejected_releases: Vec::new(),
            floor: None,
            pin: None,
        }
    }

    fn add_rejected_release(&mut self, release: &str) {
        if release.is_empty() {
            return;
        }
        self.rejected_releases.retain(|d| d != release);
        self.rejected_releases.push(release.to_string());
        let excess = self.rejected_releases.len().saturating_sub(MAX_REJECTED);
        self.rejected_releases.drain(..excess);
    }

    /// Raises the floor of `b`'s fleet and channel to its sequence.
    fn raise_floor(&mut self, b: &BundleRef) {
        match &mut self.floor {
            Some(f) if f.fleet == b.fleet && f.channel == b.channel => {
                f.sequence = f.sequence.max(b.sequence)
            }
            _ => {
                self.floor = Some(SequenceFloor {
                    fleet: b.fleet.clone(),
                    channel: b.channel.clone(),
                    sequence: b.sequence,
                })
            }
        }
    }

    fn add_rejected(&mut self, digest: &str) {
        self.rejected_digests.retain(|d| d != digest);
        self.rejected_digests.push(digest.to_string());
        let excess = self.rejected_digests.len().saturating_sub(MAX_REJECTED);
        self.rejected_digests.drain(..excess);
    }
}

/// A bundle in the store: its identity and its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub bundle: BundleRef,
    /// `<state_dir>/bundles/<digest>.ferry`.
    pub path: PathBuf,
}

/// The points of [`BundleStore::activate_with`] where a test hook runs,
/// each *before* the action it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationStep {
    /// Move (rename from staging) or copy the candidate into `bundles/`.
    MoveBundle,
    /// fsync the bundle file and the directories involved.
    SyncBundle,
    /// Save the current record as `active.json.prev`.
    BackupRecord,
    /// Write the new record to `active.json.tmp`.
    WriteRecord,
    /// Finish writing `active.json.tmp` (half of it is written: a crash here
    /// leaves a torn temporary file).
    FinishRecord,
    /// fsync `active.json.tmp`.
    SyncRecord,
    /// Rename `active.json.tmp` over `active.json`: the switch.
    Commit,
    /// fsync the state directory, making the switch durable.
    SyncDir,
}

impl ActivationStep {
    /// Every step, in order.
    pub const ALL: [ActivationStep; 8] = [
        ActivationStep::MoveBundle,
        ActivationStep::SyncBundle,
        ActivationStep::BackupRecord,
        ActivationStep::WriteRecord,
        ActivationStep::FinishRecord,
        ActivationStep::SyncRecord,
        ActivationStep::Commit,
        ActivationStep::SyncDir,
    ];
}

/// Returned by an activation hook to stop right there, as a crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crash;

/// What [`BundleStore::open`] had to do because the record was unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub action: RecoveryAction,
    /// Why the record could not be used as it was.
    pub reason: String,
    /// The active bundle after recovery.
    pub active: Option<BundleRef>,
}

/// How the store recovered (see the `updates` module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryAction {
    /// The active bundle's file was missing or corrupt: the previous bundle
    /// became active.
    PromotedPrevious,
    /// `active.json` was missing or unreadable: `active.json.prev` was restored.
    RestoredBackup,
    /// No usable record named a usable bundle: the complete bundle with the
    /// highest sequence in `bundles/` was adopted.
    AdoptedScanned,
    /// Nothing usable: the store is empty (as on first boot).
    Emptied,
}

/// What [`BundleStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub removed: Vec<PathBuf>,
    pub freed_bytes: u64,
}

/// The on-disk bundle store. Methods are blocking; changes are serialised
/// (an activation holds the store for as long as it copies and hashes, but
/// readers such as [`BundleStore::active`] never wait for that). One process
/// at a time may open a state directory (`store.lock`).
#[derive(Debug)]
pub struct BundleStore {
    dir: PathBuf,
    /// The record as on disk; locked only to read or replace it.
    record: Mutex<ActivationRecord>,
    /// Held by every operation that changes the record.
    ops: Mutex<()>,
    recovery: Option<Recovery>,
    /// Held for the store's lifetime: the OS lock on `store.lock`.
    _lock: File,
}

impl BundleStore {
    /// Opens (creating it if needed) the store in `state_dir`, recovering
    /// from whatever a crash or a broken disk left behind.
    pub fn open(state_dir: &Path) -> Result<BundleStore, UpdateError> {
        let dir = state_dir.to_path_buf();
        for d in [dir.clone(), dir.join(BUNDLES), dir.join(STAGING)] {
            std::fs::create_dir_all(&d).map_err(|e| UpdateError::io("create", &d, e))?;
        }
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| UpdateError::io("open", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(UpdateError::Locked(dir)),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(UpdateError::io("lock", &lock_path, e));
            }
        }
        let mut store = BundleStore {
            dir,
            record: Mutex::new(ActivationRecord::empty()),
            ops: Mutex::new(()),
            recovery: None,
            _lock: lock,
        };
        store.remove_temporaries()?;
        let (record, recovery, changed) = store.load()?;
        if changed {
            store.commit(&record, None, &mut |_| Ok(()))?;
        }
        if let Some(r) = &recovery {
            warn!(
                action = ?r.action,
                reason = %r.reason,
                active = r.active.as_ref().map(|b| b.digest.as_str()).unwrap_or("none"),
                "Recovered the bundle store"
            );
        }
        *store.record.get_mut().unwrap_or_else(|e| e.into_inner()) = record;
        store.recovery = recovery;
        Ok(store)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where downloads go ([`super::Fetcher::download`]'s `staging_dir`).
    pub fn staging_dir(&self) -> PathBuf {
        self.dir.join(STAGING)
    }

    /// Where a bundle with this digest lives once activated.
    pub fn bundle_path(&self, digest: &str) -> PathBuf {
        self.dir.join(BUNDLES).join(format!("{digest}.ferry"))
    }

    /// What [`BundleStore::open`] recovered from, if anything.
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// The active bundle (`None` before the first install).
    pub fn active(&self) -> Option<Slot> {
        self.lock().active.as_ref().map(|s| self.slot(s))
    }

    /// The bundle a rollback would go back to.
    pub fn previous(&self) -> Option<Slot> {
        self.lock().previous.as_ref().map(|s| self.slot(s))
    }

    /// A copy of the whole record (for status reports).
    pub fn record(&self) -> ActivationRecord {
        self.lock().clone()
    }

    /// Whether a release (manifest hash) or a bundle file (digest) was
    /// refused or rolled back before.
    pub fn is_refused(&self, release: &str, digest: &str) -> bool {
        let r = self.lock();
        (!release.is_empty() && r.rejected_releases.iter().any(|d| d == release))
            || r.rejected_digests.iter().any(|d| d == digest)
    }

    /// Remembers a refused release by its manifest hash and its file digest
    /// (persisted; at most [`MAX_REJECTED`] of each are kept).
    pub fn refuse(&self, release: &str, digest: &str) -> Result<(), UpdateError> {
        check_digest(digest)?;
        let _op = self.begin();
        let current = self.lock().clone();
        let mut next = current.clone();
        next.add_rejected(digest);
        next.add_rejected_release(release);
        if next == current {
            return Ok(());
        }
        self.commit(&next, Some(&current), &mut |_| Ok(()))?;
        *self.lock() = next;
        Ok(())
    }

    /// The sequence floor, if a rollback set one.
    pub fn floor(&self) -> Option<SequenceFloor> {
        self.lock().floor.clone()
    }

    /// The operator's pin, if any.
    pub fn pin(&self) -> Option<Pin> {
        self.lock().pin.clone()
    }

    /// Records what an operator-signed install did: it installed `b`
    /// (forgiven if it was refused before), and, when that was a downgrade,
    /// pins the device to it. `pin = None` lifts the pin (`unpin`).
    pub fn set_operator_choice(
        &self,
        forgive: Option<&BundleRef>,
        pin: Option<Pin>,
    ) -> Result<(), UpdateError> {
        let _op = self.begin();
        let current = self.lock().clone();
        let mut next = current.clone();
        if let Some(b) = forgive {
            next.rejected_releases.retain(|d| d != &b.release);
            next.rejected_digests.retain(|d| d != &b.digest);
        }
        next.pin = pin;
        if next == current {
            return Ok(());
        }
        self.commit(&next, Some(&current), &mut |_| Ok(()))?;
        *self.lock() = next;
        Ok(())
    }

    /// Makes `staged` (a file whose SHA-256 is `r.digest`, already checked
    /// by [`super::check_candidate`]) the active bundle; the active one
    /// becomes the previous. A file inside the staging directory is moved,
    /// any other (an initial bundle shipped with the system) is copied.
    pub fn activate(&self, staged: &Path, r: &BundleRef) -> Result<(), UpdateError> {
        self.activate_with(staged, r, &mut |_| Ok(()))
    }

    /// [`BundleStore::activate`] with a hook called before each step;
    /// returning `Err(Crash)` stops right there with
    /// [`UpdateError::Interrupted`], cleaning nothing up, as a crash would.
    /// After an interruption, drop the store and open it again.
    pub fn activate_with(
        &self,
        staged: &Path,
        r: &BundleRef,
        hook: &mut dyn FnMut(ActivationStep) -> Result<(), Crash>,
    ) -> Result<(), UpdateError> {
        check_digest(&r.digest)?;
        let _op = self.begin();
        let current = self.lock().clone();
        let staging = self.staging_dir();
        let in_staging = staged.parent().is_some_and(|p| same_dir(p, &staging));
        if current.active.as_ref().map(|a| a.bundle.digest.as_str()) == Some(r.digest.as_str()) {
            debug!(digest = %r.digest, "Bundle already active");
            if in_staging {
                remove_if_exists(staged)?;
            }
            return Ok(());
        }
        let (digest, len) = sha256_file(staged).map_err(|e| UpdateError::io("read", staged, e))?;
        if digest != r.digest {
            return Err(UpdateError::DigestMismatch {
                url: staged.display().to_string(),
                expected: r.digest.clone(),
                actual: digest,
                received: len,
            });
        }
        let target = self.bundle_path(&r.digest);
        let bundles = self.dir.join(BUNDLES);

        step(hook, ActivationStep::MoveBundle)?;
        let already = matches!(sha256_file(&target), Ok((d, _)) if d == r.digest);
        if already {
            if in_staging {
                remove_if_exists(staged)?;
            }
        } else if in_staging {
            std::fs::rename(staged, &target).map_err(|e| UpdateError::io("rename", staged, e))?;
        } else {
            let tmp = bundles.join(format!("{}.ferry.tmp", r.digest));
            std::fs::copy(staged, &tmp).map_err(|e| UpdateError::io("copy", staged, e))?;
            fsync(&tmp)?;
            std::fs::rename(&tmp, &target).map_err(|e| UpdateError::io("rename", &tmp, e))?;
        }
        step(hook, ActivationStep::SyncBundle)?;
        fsync(&target)?;
        sync_dir(&bundles)?;
        if in_staging {
            sync_dir(&staging)?;
        }

        let mut next = current.clone();
        next.schema = RECORD_SCHEMA;
        next.previous = current.active.clone();
        next.active = Some(slot_record(r));
        next.boot_attempts = 0;
        next.healthy = false;
        next.activated_ms = now_ms();
        // Installing a bundle again is an operator's decision that overrides
        // an earlier refusal.
        next.rejected_digests.retain(|d| d != &r.digest);
        self.commit(&next, Some(&current), hook)?;
        info!(
            bundle = %r.name,
            version = %r.version,
            digest = %r.digest,
            previous = next.previous.as_ref().map(|p| p.bundle.digest.as_str()).unwrap_or("none"),
            "Activated bundle"
        );
        *self.lock() = next;
        Ok(())
    }

    /// Goes back to the previous bundle. The bundle left behind is
    /// remembered as rejected (so the channel does not reinstall it) and is
    /// no longer kept: there is no previous after a rollback.
    pub fn rollback(&self) -> Result<Slot, UpdateError> {
        let _op = self.begin();
        let current = self.lock().clone();
        let previous = current.previous.clone().ok_or(UpdateError::NoPrevious)?;
        self.check_slot(&previous.bundle)
            .map_err(|reason| UpdateError::PreviousUnusable {
                digest: previous.bundle.digest.clone(),
                reason,
            })?;
        let mut next = current.clone();
        next.rejected_digests
            .retain(|d| d != &previous.bundle.digest);
        next.rejected_releases
            .retain(|d| d != &previous.bundle.release);
        if let Some(bad) = &current.active {
            next.add_rejected(&bad.bundle.digest);
            next.add_rejected_release(&bad.bundle.release);
            next.raise_floor(&bad.bundle);
        }
        next.active = Some(previous.clone());
        next.previous = None;
        next.boot_attempts = 0;
        next.healthy = false;
        next.activated_ms = now_ms();
        self.commit(&next, Some(&current), &mut |_| Ok(()))?;
        warn!(
            from = current.active.as_ref().map(|a| a.bundle.digest.as_str()).unwrap_or("none"),
            to = %previous.bundle.digest,
            "Rolled back to the previous bundle"
        );
        *self.lock() = next;
        Ok(self.slot(&previous))
    }

    /// Counts one more start of the active bundle (persisted and fsynced
    /// before it returns) and returns the count since it was last healthy.
    pub fn record_boot_attempt(&self) -> Result<u32, UpdateError> {
        let _op = self.begin();
        let current = self.lock().clone();
        let mut next = current.clone();
        next.boot_attempts = next.boot_attempts.saturating_add(1);
        self.commit(&next, Some(&current), &mut |_| Ok(()))?;
        let count = next.boot_attempts;
        *self.lock() = next;
        Ok(count)
    }

    /// The active bundle passed probation: healthy, boot attempts reset.
    pub fn mark_healthy(&self) -> Result<(), UpdateError> {
        let _op = self.begin();
        let current = self.lock().clone();
        if current.healthy && current.boot_attempts == 0 {
            return Ok(());
        }
        let mut next = current.clone();
        next.healthy = true;
        next.boot_attempts = 0;
        self.commit(&next, Some(&current), &mut |_| Ok(()))?;
        *self.lock() = next;
        Ok(())
    }

    /// Deletes bundles the record does not reference, and staging files
    /// except those of `keep_staged` digests (a download or candidate in
    /// flight: the caller knows which) and partial downloads younger than
    /// [`PART_KEEP`]. Runs after any activation in progress, never during.
    /// Removes everything in staging but the files of `digest` (its
    /// partial download, to resume): called before a download starts, so
    /// staging never holds more than one bundle (at most `max_bundle_bytes`),
    /// whatever was abandoned before.
    pub fn clear_staging_except(&self, digest: &str) -> Result<GcReport, UpdateError> {
        let _op = self.begin();
        let mut report = GcReport::default();
        for entry in read_dir(&self.staging_dir())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.split('.').next() != Some(digest) {
                remove_counted(&entry.path(), &mut report)?;
            }
        }
        if !report.removed.is_empty() {
            info!(
                files = report.removed.len(),
                bytes = report.freed_bytes,
                "Removed abandoned downloads from staging"
            );
        }
        Ok(report)
    }

    pub fn gc(&self, keep_staged: &[&str]) -> Result<GcReport, UpdateError> {
        let _op = self.begin();
        let current = self.lock().clone();
        let referenced: Vec<String> = [&current.active, &current.previous]
            .into_iter()
            .flatten()
            .map(|s| format!("{}.ferry", s.bundle.digest))
            .collect();
        let mut report = GcReport::default();
        for entry in read_dir(&self.dir.join(BUNDLES))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !referenced.contains(&name) {
                remove_counted(&entry.path(), &mut report)?;
            }
        }
        let now = SystemTime::now();
        for entry in read_dir(&self.staging_dir())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stem = name.split('.').next().unwrap_or("");
            if keep_staged.contains(&stem) {
                continue;
            }
            if name.ends_with(".part") {
                let age = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or(Duration::ZERO);
                if age < PART_KEEP {
                    continue;
                }
            }
            remove_counted(&entry.path(), &mut report)?;
        }
        if !report.removed.is_empty() {
            info!(
                files = report.removed.len(),
                bytes = report.freed_bytes,
                "Removed unused bundles"
            );
        }
        Ok(report)
    }

    /// Serialises changes: held for a whole operation (file copies and
    /// hashing included), while readers only wait for [`Self::lock`].
    fn begin(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, ActivationRecord> {
        // A panic while holding the lock leaves the in-memory copy as the
        // disk has it (it is replaced only after a successful commit).
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, s: &SlotRecord) -> Slot {
        Slot {
            bundle: s.bundle.clone(),
            path: self.bundle_path(&s.bundle.digest),
        }
    }

    /// The bundle's file exists and has its digest.
    fn check_slot(&self, b: &BundleRef) -> Result<(), String> {
        check_digest(&b.digest).map_err(|e| e.to_string())?;
        let path = self.bundle_path(&b.digest);
        match sha256_file(&path) {
            Ok((d, _)) if d == b.digest => Ok(()),
            Ok((d, n)) => Err(format!(
                "{} ({n} bytes) has SHA-256 {d}, not {}",
                path.display(),
                b.digest
            )),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    fn remove_temporaries(&self) -> Result<(), UpdateError> {
        for name in [RECORD_TMP, BACKUP_TMP] {
            let path = self.dir.join(name);
            if path.exists() {
                debug!(file = %path.display(), "Removing a record left half-written");
                remove_if_exists(&path)?;
            }
        }
        for entry in read_dir(&self.dir.join(BUNDLES))? {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                remove_if_exists(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Decides the record at open: (record, recovery, must be written).
    fn load(&self) -> Result<(ActivationRecord, Option<Recovery>, bool), UpdateError> {
        let primary = read_record(&self.dir.join(RECORD));
        let first_boot = matches!(&primary, Err(ReadFailure::Missing));
        // Rejections survive any recovery that can still read them.
        let mut rejected = Vec::new();

        let mut reason = match primary {
            Ok(mut rec) => {
                rejected = rec.rejected_digests.clone();
                let mut changed = false;
                if let Some(p) = rec.previous.clone()
                    && !self.bundle_path(&p.bundle.digest).is_file()
                {
                    warn!(digest = %p.bundle.digest, "Previous bundle's file is gone; forgetting it");
                    rec.previous = None;
                    changed = true;
                }
                match rec.active.clone() {
                    None => {
                        // A first activation may have stopped between moving
                        // its bundle in and the switch: adopt that bundle.
                        if let Some(found) = self.scan(&rec.rejected_digests)? {
                            let mut next = rec.clone();
                            next.active = Some(slot_record(&found));
                            next.boot_attempts = 0;
                            next.healthy = false;
                            next.activated_ms = now_ms();
                            let recovery = Recovery {
                                action: RecoveryAction::AdoptedScanned,
                                reason: "the record names no active bundle".into(),
                                active: Some(found),
                            };
                            return Ok((next, Some(recovery), true));
                        }
                        return Ok((rec, None, changed));
                    }
                    Some(active) => match self.check_slot(&active.bundle) {
                        Ok(()) => return Ok((rec, None, changed)),
                        Err(why) => {
                            let why = format!("active bundle unusable: {why}");
                            if let Some(p) = rec.previous.clone()
                                && self.check_slot(&p.bundle).is_ok()
                            {
                                // Not rejected: a damaged file is the disk's
                                // fault, and downloading it again repairs it.
                                let mut next = rec.clone();
                                next.active = Some(p.clone());
                                next.previous = None;
                                next.boot_attempts = 0;
                                next.healthy = false;
                                next.activated_ms = now_ms();
                                let recovery = Recovery {
                                    action: RecoveryAction::PromotedPrevious,
                                    reason: why,
                                    active: Some(p.bundle),
                                };
                                return Ok((next, Some(recovery), true));
                            }
                            why
                        }
                    },
                }
            }
            Err(ReadFailure::Missing) => format!("{RECORD} is missing"),
            Err(ReadFailure::Unusable(why)) => format!("{RECORD} is unusable: {why}"),
        };

        match read_record(&self.dir.join(BACKUP)) {
            Ok(backup) => {
                if let Some(active) = &backup.active {
                    match self.check_slot(&active.bundle) {
                        Ok(()) => {
                            let mut next = backup.clone();
                            for d in &rejected {
                                next.add_rejected(d);
                            }
                            if let Some(p) = &next.previous
                                && !self.bundle_path(&p.bundle.digest).is_file()
                            {
                                next.previous = None;
                            }
                            next.boot_attempts = 0;
                            next.healthy = false;
                            let recovery = Recovery {
                                action: RecoveryAction::RestoredBackup,
                                reason,
                                active: Some(active.bundle.clone()),
                            };
                            return Ok((next, Some(recovery), true));
                        }
                        Err(why) => reason.push_str(&format!("; {BACKUP}: {why}")),
                    }
                }
                for d in &backup.rejected_digests {
                    if !rejected.contains(d) {
                        rejected.push(d.clone());
                    }
                }
            }
            Err(ReadFailure::Missing) => {}
            Err(ReadFailure::Unusable(why)) => reason.push_str(&format!("; {BACKUP}: {why}")),
        }

        let mut next = ActivationRecord::empty();
        for d in &rejected {
            next.add_rejected(d);
        }
        if let Some(found) = self.scan(&rejected)? {
            next.active = Some(slot_record(&found));
            next.activated_ms = now_ms();
            let recovery = Recovery {
                action: RecoveryAction::AdoptedScanned,
                reason,
                active: Some(found),
            };
            return Ok((next, Some(recovery), true));
        }
        if first_boot {
            // Nothing was ever installed: not a recovery.
            return Ok((next, None, false));
        }
        let recovery = Recovery {
            action: RecoveryAction::Emptied,
            reason,
            active: None,
        };
        Ok((next, Some(recovery), true))
    }

    /// The complete bundle (file matching its name) with the highest
    /// sequence in `bundles/`, rejected ones excepted. Its identity comes
    /// from its manifest, read without checking signatures: the agent
    /// verifies every bundle it loads.
    fn scan(&self, rejected: &[String]) -> Result<Option<BundleRef>, UpdateError> {
        let mut best: Option<(u64, SystemTime, BundleRef)> = None;
        for entry in read_dir(&self.dir.join(BUNDLES))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(digest) = name.strip_suffix(".ferry") else {
                continue;
            };
            if check_digest(digest).is_err() || rejected.iter().any(|d| d == digest) {
                continue;
            }
            let path = entry.path();
            match sha256_file(&path) {
                Ok((d, _)) if d == digest => {}
                _ => {
                    warn!(file = %path.display(), "Bundle file does not match its digest; ignoring it");
                    continue;
                }
            }
            let (manifest, release) = match read_manifest(&path) {
                Ok(m) => m,
                Err(why) => {
                    warn!(file = %path.display(), reason = %why, "Bundle manifest unreadable; ignoring it");
                    continue;
                }
            };
            let mtime = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let r = BundleRef {
                name: manifest.name,
                version: manifest.version,
                digest: digest.to_string(),
                fleet: manifest.release.fleet,
                channel: manifest.release.channel,
                sequence: manifest.release.sequence,
                release,
            };
            let better = match &best {
                None => true,
                Some((seq, t, _)) => (r.sequence, mtime) > (*seq, *t),
            };
            if better {
                best = Some((r.sequence, mtime, r));
            }
        }
        Ok(best.map(|(_, _, r)| r))
    }

    /// Writes a new record: backup of the current one, temporary file,
    /// fsync, rename, fsync of the directory. The hook runs before each step.
    fn commit(
        &self,
        next: &ActivationRecord,
        current: Option<&ActivationRecord>,
        hook: &mut dyn FnMut(ActivationStep) -> Result<(), Crash>,
    ) -> Result<(), UpdateError> {
        step(hook, ActivationStep::BackupRecord)?;
        if let Some(current) = current {
            let bytes = serde_json::to_vec_pretty(current).expect("records serialise");
            let tmp = self.dir.join(BACKUP_TMP);
            write_synced(&tmp, &bytes)?;
            let backup = self.dir.join(BACKUP);
            std::fs::rename(&tmp, &backup).map_err(|e| UpdateError::io("rename", &tmp, e))?;
        }

        step(hook, ActivationStep::WriteRecord)?;
        let mut bytes = serde_json::to_vec_pretty(next).expect("records serialise");
        bytes.push(b'\n');
        let tmp = self.dir.join(RECORD_TMP);
        let mut file = File::create(&tmp).map_err(|e| UpdateError::io("create", &tmp, e))?;
        let half = bytes.len() / 2;
        file.write_all(&bytes[..half])
            .map_err(|e| UpdateError::io("write", &tmp, e))?;
        step(hook, ActivationStep::FinishRecord)?;
        file.write_all(&bytes[half..])
            .map_err(|e| UpdateError::io("write", &tmp, e))?;
        step(hook, ActivationStep::SyncRecord)?;
        file.sync_all()
            .map_err(|e| UpdateError::io("fsync", &tmp, e))?;
        drop(file);

        step(hook, ActivationStep::Commit)?;
        let record = self.dir.join(RECORD);
        std::fs::rename(&tmp, &record).map_err(|e| UpdateError::io("rename", &tmp, e))?;
        step(hook, ActivationStep::SyncDir)?;
        sync_dir(&self.dir)
    }
}

fn step(
    hook: &mut dyn FnMut(ActivationStep) -> Result<(), Crash>,
    s: ActivationStep,
) -> Result<(), UpdateError> {
    hook(s).map_err(|Crash| UpdateError::Interrupted(s))
}

fn slot_record(r: &BundleRef) -> SlotRecord {
    SlotRecord {
        bundle: r.clone(),
        file: format!("{BUNDLES}/{}.ferry", r.digest),
    }
}

enum ReadFailure {
    Missing,
    Unusable(String),
}

fn read_record(path: &Path) -> Result<ActivationRecord, ReadFailure> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadFailure::Missing),
        Err(e) => return Err(ReadFailure::Unusable(e.to_string())),
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ReadFailure::Unusable(format!("not JSON ({} bytes): {e}", bytes.len())))?;
    match value.get("schema").and_then(|s| s.as_u64()) {
        Some(s) if s == u64::from(RECORD_SCHEMA) => {}
        other => {
            return Err(ReadFailure::Unusable(format!(
                "schema {other:?}, this agent reads {RECORD_SCHEMA}"
            )));
        }
    }
    let record: ActivationRecord =
        serde_json::from_value(value).map_err(|e| ReadFailure::Unusable(e.to_string()))?;
    for slot in [&record.active, &record.previous].into_iter().flatten() {
        check_digest(&slot.bundle.digest).map_err(|e| ReadFailure::Unusable(e.to_string()))?;
    }
    Ok(record)
}

/// The manifest of a bundle file, read from its first bytes only (no
/// signature check: for naming a bundle found on disk, never for running it).
/// Returns the manifest and the release id (SHA-256 of its bytes).
fn read_manifest(path: &Path) -> Result<(Manifest, String), String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let mut prefix = [0u8; HEADER_LEN];
    file.read_exact(&mut prefix).map_err(|e| e.to_string())?;
    let header = Header::parse(&prefix).map_err(|e| e.to_string())?;
    let mut manifest = vec![0u8; header.manifest_len];
    file.read_exact(&mut manifest).map_err(|e| e.to_string())?;
    // Only naming the file: the limits that matter were applied when it was
    // verified before being stored.
    let limits = ReadLimits {
        max_artifact_bytes: u64::MAX,
        max_total_bytes: u64::MAX,
    };
    let release = hex::encode(sha2::Sha256::digest(&manifest));
    manifest_unverified(&header, &manifest, &limits)
        .map(|m| (m, release))
        .map_err(|e| e.to_string())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), UpdateError> {
    let mut file = File::create(path).map_err(|e| UpdateError::io("create", path, e))?;
    file.write_all(bytes)
        .map_err(|e| UpdateError::io("write", path, e))?;
    file.sync_all()
        .map_err(|e| UpdateError::io("fsync", path, e))
}

fn fsync(path: &Path) -> Result<(), UpdateError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| UpdateError::io("fsync", path, e))
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, UpdateError> {
    std::fs::read_dir(dir)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| UpdateError::io("list", dir, e))
}

fn remove_if_exists(path: &Path) -> Result<(), UpdateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(UpdateError::io("remove", path, e)),
    }
}

/// Removes a file (directories are left alone) and counts it.
fn remove_counted(path: &Path, report: &mut GcReport) -> Result<(), UpdateError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if meta.is_dir() {
        return Ok(());
    }
    let len = meta.len();
    remove_if_exists(path)?;
    report.freed_bytes += len;
    report.removed.push(path.to_path_buf());
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_digests_are_bounded_and_deduplicated() {
        let mut r = ActivationRecord::empty();
        for i in 0..(MAX_REJECTED + 5) {
            r.add_rejected(&format!("{i:064x}"));
        }
        assert_eq!(r.rejected_digests.len(), MAX_REJECTED);
        assert_eq!(r.rejected_digests[0], format!("{:064x}", 5));
        r.add_rejected(&format!("{:064x}", 5));
        assert_eq!(r.rejected_digests.len(), MAX_REJECTED);
        assert_eq!(r.rejected_digests.last().unwrap(), &format!("{:064x}", 5));
    }

    #[test]
    fn records_read_with_defaults_and_refuse_other_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        std::fs::write(&p, br#"{"schema":1,"active":null}"#).unwrap();
        let r = read_record(&p).ok().unwrap();
        assert_eq!(r, ActivationRecord::empty());
        std::fs::write(&p, br#"{"schema":2,"active":null}"#).unwrap();
        assert!(matches!(read_record(&p), Err(ReadFailure::Unusable(_))));
        std::fs::write(&p, b"{\"schema\":1,\"act").unwrap();
        assert!(matches!(read_record(&p), Err(ReadFailure::Unusable(_))));
        assert!(matches!(
            read_record(&dir.path().join("none")),
            Err(ReadFailure::Missing)
        ));
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BundleStore::open(dir.path()).unwrap();
        assert!(store.active().is_none());
        assert!(store.recovery().is_none());
        let err = BundleStore::open(dir.path()).unwrap_err();
        assert_eq!(err.code(), "locked");
        drop(store);
        BundleStore::open(dir.path()).unwrap();
    }
}
