//! Running rollouts: persistence, the audit log, commands to devices, and
//! the bundles devices download. The HTTP routes behind `ferry-fleet
//! rollout` / `rollouts` are in `http::rollouts`; errors are
//! [`RolloutError`]s with a stable `code()`.
//!
//! # Files (under the console's state directory)
//! ```text
//! rollouts/<id>.json      one rollout (`rollout::Rollout`), replaced durably
//!                         (`ferry_host::write_durably`) after every step that changed it
//! rollouts/audit.jsonl    the audit log: one JSON object per line, appended and
//!                         fsynced, never rewritten
//! bundles/<digest>.ferry  the bundles rollouts install, served to devices at
//!                         GET /bundles/<digest>.ferry (streamed from the file,
//!                         with Range, so an interrupted device download resumes)
//! ```
//! A bundle is written only once every check of its rollout passed (a
//! refused upload is never stored), and deleted when no rollout needs it
//! any more ([`Rollouts::collect_bundles`], at start and whenever a rollout
//! finishes): kept are the bundles of unfinished rollouts and of the latest
//! rollout that finished `done`. A finished rollout's record keeps its
//! bundle's digest.
//! A console restarted mid-rollout reloads every unfinished rollout and
//! steps it again: what was sent is recorded per device, so nothing is sent
//! twice within its timeout, and the rollout continues where it stopped.
//!
//! Audit entries (`AuditEntry`) say who, when, which rollout and bundle
//! digest, and what: commands sent, phase changes, the reason of an abort.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use ferry_format::{ReadLimits, SecretKey, TrustPolicy, VerifiedBundle};
use ferry_host::{WriteError, write_durably};
use ferry_protocol::{Action as Cmd, Command, OperatorSignature, SCHEMA_VERSION, Topic, topic};
use serde::{Deserialize, Serialize};

use crate::model::Change;
use crate::releases::{ReleaseRecord, ReleaseStatus};
use crate::rollout::{Action, Canary, Phase, Rollout, Rule, Spec};
use crate::store::Store;

/// What can go wrong with a rollout.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The bundle failed verification against the trusted keys (`code` is
    /// the bundle error's code, e.g. `untrusted_key`).
    #[error("bundle refused ({code}): {message}")]
    BundleRefused { code: &'static str, message: String },
    /// The bundle is released for another fleet.
    #[error("the bundle is for fleet {bundle:?}; this console follows {console:?}")]
    WrongFleet { bundle: String, console: String },
    /// `serve` was started without `--key`: rollbacks could not be signed.
    #[error("the console has no operator key (serve --key): rollbacks could not be signed")]
    NoOperatorKey,
    /// A parameter (share, duration, rule, canary group) is not valid.
    #[error("{0}")]
    Invalid(String),
    /// Another rollout is still running.
    #[error("rollout {id} ({name} {version}) is still running; one rollout at a time")]
    Busy {
        id: String,
        name: String,
        version: String,
    },
    /// No rollout has this id.
    #[error("no rollout {0}")]
    NotFound(String),
    /// A file of the rollouts directory cannot be read, created or
    /// appended to.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A rollout or a bundle could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A command could not be handed to the broker (retried next tick).
    #[error("cannot send {what} to {device}: {message}")]
    Send {
        what: &'static str,
        device: String,
        message: String,
    },
    /// The release lacks the approver's signature (or was rejected): it
    /// cannot be rolled out, and an approval must come first.
    #[error("release {release} is {status}: {advice}")]
    NotApproved {
        release: String,
        status: &'static str,
        advice: &'static str,
    },
    /// An approver may not approve what they submitted themselves.
    #[error("{who} submitted release {release}: a second person must approve it (two-person rule)")]
    SamePerson { who: String, release: String },
    /// The approved copy is not the release under review.
    #[error("the uploaded bundle is release {got}, not {expected}")]
    WrongRelease { expected: String, got: String },
    /// The rollout would take the channel back to an older release.
    #[error(
        "{name} {version} (sequence {sequence}) would downgrade channel {channel}, which runs \
         sequence {running_sequence} (release {running}); an admin may allow it \
         (allow_downgrade=true, ferry-fleet rollout --allow-downgrade)"
    )]
    Downgrade {
        name: String,
        version: String,
        sequence: u64,
        channel: String,
        running: String,
        running_sequence: u64,
    },
    /// Too many releases wait to be approved or rolled out.
    #[error(
        "{waiting} releases already wait for approval or a rollout (at most {max}); approve, \
         reject or roll out one first"
    )]
    TooManyWaiting { waiting: usize, max: usize },
}

impl RolloutError {
    /// A stable code for logs and API answers.
    pub fn code(&self) -> &'static str {
        match self {
            RolloutError::BundleRefused { .. } => "bundle_refused",
            RolloutError::WrongFleet { .. } => "wrong_fleet",
            RolloutError::NoOperatorKey => "no_operator_key",
            RolloutError::Invalid(_) => "invalid",
            RolloutError::Busy { .. } => "busy",
            RolloutError::NotFound(_) => "not_found",
            RolloutError::Io { .. } => "io",
            RolloutError::Write(e) => e.code(),
            RolloutError::Send { .. } => "send_failed",
            RolloutError::NotApproved { status, .. } => match *status {
                "rejected" => "rejected",
                _ => "not_approved",
            },
            RolloutError::SamePerson { .. } => "same_person",
            RolloutError::WrongRelease { .. } => "wrong_release",
            RolloutError::Downgrade { .. } => "downgrade",
            RolloutError::TooManyWaiting { .. } => "too_many_waiting",
        }
    }

    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RolloutError {
        let path = path.to_path_buf();
        move |source| RolloutError::Io { what, path, source }
    }
}

/// Where commands go: the console's MQTT connection (QoS 1). An error is
/// the reason the command was not acknowledged by the broker.
pub trait CommandSink: Send + Sync {
    fn send(
        &self,
        topic: String,
        payload: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;
}

impl CommandSink for crate::ingest::Console {
    fn send(
        &self,
        topic: String,
        payload: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            self.publish(&topic, payload)
                .await
                .map_err(|e| format!("{e:#}"))
        })
    }
}

/// One line of the audit log. Do not rename or remove fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub ts_ms: u64,
    pub rollout: String,
    pub operator: String,
    pub bundle_digest: String,
    pub what: String,
}

/// Largest bundle a rollout accepts over HTTP (the agent's default cap).
pub const MAX_BUNDLE_BYTES: usize = 512 * 1024 * 1024;

/// What `POST /api/rollouts` takes (query string; the body is the bundle).
#[derive(Debug, Clone, Deserialize)]
pub struct NewRollout {
    /// `10%` or `0.1`, or a comma-separated device list (a named group).
    pub canary: String,
    /// `30s`, `10m`, `2h`, or milliseconds.
    pub bake: String,
    /// Abort rules separated by `;` (e.g. `error_rate>1%;drift.psi>0.25`).
    #[serde(default)]
    pub abort_if: String,
    /// Cumulative wave shares after the canaries, e.g. `50%,100%`.
    #[serde(default)]
    pub waves: Option<String>,
    /// Shadow requests per canary before installing (0: none).
    #[serde(default)]
    pub shadow: u64,
    #[serde(default)]
    pub install_timeout: Option<String>,
    /// Roll out a release older than the one its channel runs (the HTTP
    /// layer lets only an admin ask).
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Roll out this approved release of the registry (by release id)
    /// instead of a bundle in the request's body.
    #[serde(default)]
    pub release: Option<String>,
}

/// An operator's decision on a running rollout ([`Rollouts::control`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    Pause,
    Resume,
    Abort { reason: String },
}

impl Control {
    /// `pause`, `resume` or `abort`.
    pub fn name(&self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::Abort { .. } => "abort",
        }
    }
}

/// What a rollout installs.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A bundle uploaded with the request (carrying every signature the
    /// devices require).
    Upload(&'a [u8]),
    /// An approved release of the registry, by release id.
    Release(&'a str),
}

/// Releases that may wait for approval or for their first rollout at once
/// (their bundles are kept on disk until then).
pub const MAX_WAITING: usize = 16;

/// Parses `30s`, `10m`, `2h`, `1500ms` or bare milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, RolloutError> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60_000)
    } else if let Some(v) = s.strip_suffix('h') {
        (v, 3_600_000)
    } else {
        (s, 1)
    };
    let n: f64 = num.trim().parse().map_err(|_| {
        RolloutError::Invalid(format!("{s:?} is not a duration (e.g. 30s, 10m, 2h)"))
    })?;
    if !(n >= 0.0 && n.is_finite()) {
        return Err(RolloutError::Invalid(format!("{s:?} is not a duration")));
    }
    Ok((n * mult as f64).round() as u64)
}

/// Parses `10%` or `0.1` into a share.
pub fn parse_share(s: &str) -> Result<f64, RolloutError> {
    let s = s.trim();
    let v = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => s.parse::<f64>(),
    }
    .map_err(|_| RolloutError::Invalid(format!("{s:?} is not a share (e.g. 10% or 0.1)")))?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(RolloutError::Invalid(format!(
            "{s:?} must be more than 0% and at most 100%"
        )));
    }
    Ok(v)
}

/// The rollouts of one console.
pub struct Rollouts {
    dir: PathBuf,
    bundles: PathBuf,
    fleet: String,
    /// Base URL devices download bundles from (`http://console:8080`).
    public_url: String,
    trust: TrustPolicy,
    /// The builder role alone, when `trust` also requires an approver: what
    /// a release awaiting approval carries.
    builder: Option<TrustPolicy>,
    key: Option<SecretKey>,
    store: Arc<Store>,
    sink: Arc<dyn CommandSink>,
    active: Mutex<Vec<Rollout>>,
    /// Held by a create from its last check until its rollout is in
    /// `active`, and by the bundle collector.
    creating: Mutex<()>,
    audit_lock: Mutex<()>,
    /// Device commands whose send failed (broker away), retried each tick.
    retry: Mutex<Vec<(Rollout, Action)>>,
}

impl Rollouts {
    /// Loads the persisted rollouts under `state_dir`.
    pub fn open(
        state_dir: &Path,
        fleet: &str,
        public_url: &str,
        trust: TrustPolicy,
        key: Option<SecretKey>,
        store: Arc<Store>,
        sink: Arc<dyn CommandSink>,
    ) -> Result<Rollouts, RolloutError> {
        let dir = state_dir.join("rollouts");
        let bundles = state_dir.join("bundles");
        for d in [&dir, &bundles] {
            std::fs::create_dir_all(d).map_err(RolloutError::io("create", d))?;
        }
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(RolloutError::io("read", &dir))? {
            let path = entry.map_err(RolloutError::io("read", &dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read(&path).map_err(RolloutError::io("read", &path))?;
                match serde_json::from_slice::<Rollout>(&text) {
                    Ok(r) => all.push(r),
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "Unreadable rollout skipped")
                    }
                }
            }
        }
        all.sort_by_key(|r| r.created_ms);
        let resumed = all.iter().filter(|r| !r.phase.is_finished()).count();
        if resumed > 0 {
            tracing::info!(resumed, "Resuming rollouts");
        }
        let rollouts = Rollouts {
            dir,
            bundles,
            fleet: fleet.to_string(),
            public_url: public_url.trim_end_matches('/').to_string(),
            builder: builder_policy(&trust),
            trust,
            key,
            store,
            sink,
            active: Mutex::new(all),
            creating: Mutex::new(()),
            audit_lock: Mutex::new(()),
            retry: Mutex::new(Vec::new()),
        };
        rollouts.collect_bundles()?;
        Ok(rollouts)
    }

    /// The digests of the bundles still needed: those of the rollouts that
    /// are not finished (devices download them) and of the latest rollout
    /// that finished `done` (the fleet's current release).
    fn needed_bundles(&self) -> Vec<String> {
        let active = self.active.lock().unwrap();
        let mut needed: Vec<String> = active
            .iter()
            .filter(|r| !r.phase.is_finished())
            .map(|r| r.spec.bundle.digest.clone())
            .collect();
        if let Some(current) = active
            .iter()
            .filter(|r| r.phase == Phase::Done)
            .max_by_key(|r| r.created_ms)
        {
            needed.push(current.spec.bundle.digest.clone());
        }
        drop(active);
        // Releases waiting for approval or for their first rollout.
        needed.extend(self.waiting().into_iter().map(|r| r.digest));
        needed
    }

    /// The registry's releases awaiting approval, and the approved ones no
    /// rollout carried yet (submitted or approved, waiting to go out).
    fn waiting(&self) -> Vec<ReleaseRecord> {
        let records: Vec<ReleaseRecord> = match self.store.releases() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "Cannot read the release registry");
                return Vec::new();
            }
        };
        let active = self.active.lock().unwrap();
        records
            .into_iter()
            .filter(|r| match r.status {
                ReleaseStatus::AwaitingApproval => true,
                ReleaseStatus::Approved => {
                    !active.iter().any(|x| x.spec.bundle.release == r.release)
                }
                ReleaseStatus::Rejected => false,
            })
            .collect()
    }

    /// Deletes every file in `bundles/` that is not a needed bundle (see
    /// [`Rollouts::needed_bundles`]): bundles of finished rollouts that a
    /// later one replaced, and what an interrupted write or an older
    /// console left. Run at start and whenever a rollout finishes; returns
    /// the names deleted.
    pub fn collect_bundles(&self) -> Result<Vec<String>, RolloutError> {
        let _creating = self.creating.lock().unwrap();
        let keep: Vec<String> = self
            .needed_bundles()
            .into_iter()
            .map(|d| format!("{d}.ferry"))
            .collect();
        let mut deleted = Vec::new();
        let dir = &self.bundles;
        for entry in std::fs::read_dir(dir).map_err(RolloutError::io("read", dir))? {
            let entry = entry.map_err(RolloutError::io("read", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if !is_file || keep.contains(&name) {
                continue;
            }
            let path = entry.path();
            std::fs::remove_file(&path).map_err(RolloutError::io("delete", &path))?;
            tracing::info!(file = %name, "Deleted a bundle no rollout needs");
            deleted.push(name);
        }
        if !deleted.is_empty() {
            ferry_host::sync_dir(dir)?;
        }
        Ok(deleted)
    }

    /// The directory of the bundles devices download.
    pub fn bundles_dir(&self) -> &Path {
        &self.bundles
    }

    /// Every rollout, oldest first.
    /// The fleet this console serves.
    pub fn fleet(&self) -> &str {
        &self.fleet
    }

    /// The release registry joined with every rollout and the devices'
    /// current bundles (see `releases.rs`).
    pub fn releases(&self) -> Result<Vec<crate::releases::ReleaseView>, RolloutError> {
        let records = self.store.releases().map_err(|e| RolloutError::Io {
            what: "read the release registry of",
            path: self.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(crate::releases::views(
            records,
            &self.list(),
            &self.store.devices(),
        ))
    }

    /// The sequence the next release of `channel` should carry (see
    /// `releases::next_sequence`).
    pub fn next_sequence(&self, channel: &str) -> Result<u64, RolloutError> {
        let records: Vec<crate::releases::ReleaseRecord> =
            self.store.releases().map_err(|e| RolloutError::Io {
                what: "read the release registry of",
                path: self.dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(crate::releases::next_sequence(
            &records,
            &self.fleet,
            channel,
        ))
    }

    pub fn list(&self) -> Vec<Rollout> {
        self.active.lock().unwrap().clone()
    }

    /// One rollout.
    pub fn get(&self, id: &str) -> Result<Rollout, RolloutError> {
        self.active
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .ok_or_else(|| RolloutError::NotFound(id.to_string()))
    }

    /// Starts a rollout of `source` as `params` say, for `operator` (the
    /// credential's holder, recorded in the audit log). Refused: a bundle
    /// without every signature the devices require (one that only the
    /// builder signed is `not_approved`), a rejected release, another
    /// fleet's, and a downgrade of its channel unless `allow_downgrade`.
    pub fn create(
        &self,
        source: Source<'_>,
        params: &NewRollout,
        operator: &str,
        now_ms: u64,
    ) -> Result<Rollout, RolloutError> {
        let stored;
        let bundle: &[u8] = match source {
            Source::Upload(bytes) => bytes,
            Source::Release(id) => {
                let record = self.record(id)?;
                if record.status != ReleaseStatus::Approved {
                    return Err(not_approved(&record));
                }
                let path = self.bundles.join(format!("{}.ferry", record.digest));
                stored = std::fs::read(&path).map_err(RolloutError::io("read", &path))?;
                &stored
            }
        };
        let verified = self.verify_approved(bundle)?;
        let m = verified.manifest();
        if m.release.fleet != self.fleet {
            return Err(RolloutError::WrongFleet {
                bundle: m.release.fleet.clone(),
                console: self.fleet.clone(),
            });
        }
        if let Some(known) = self.find_record(verified.release_id())?
            && known.status == ReleaseStatus::Rejected
        {
            return Err(not_approved(&known));
        }
        if self.key.is_none() {
            return Err(RolloutError::NoOperatorKey);
        }
        let downgrade = match self.downgrade_of(&verified) {
            Some(e) if !params.allow_downgrade => return Err(e),
            d => d,
        };
        let canary = if params.canary.contains('%') || params.canary.trim().parse::<f64>().is_ok() {
            Canary::Share {
                share: parse_share(&params.canary)?,
            }
        } else {
            Canary::Group {
                devices: params
                    .canary
                    .split(',')
                    .map(|d| d.trim().to_string())
                    .filter(|d| !d.is_empty())
                    .collect(),
            }
        };
        let waves = match &params.waves {
            Some(w) => w
                .split(',')
                .map(parse_share)
                .collect::<Result<Vec<_>, _>>()?,
            None => vec![1.0],
        };
        let abort_if = params
            .abort_if
            .split(';')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|r| r.parse::<Rule>().map_err(RolloutError::Invalid))
            .collect::<Result<Vec<_>, _>>()?;
        let digest = verified.digest().to_string();
        let spec = Spec {
            bundle: ferry_protocol::BundleRef {
                name: m.name.clone(),
                version: m.version.clone(),
                digest: digest.clone(),
                fleet: m.release.fleet.clone(),
                channel: m.release.channel.clone(),
                sequence: m.release.sequence,
                release: verified.release_id().to_string(),
            },
            url: format!("{}/bundles/{digest}.ferry", self.public_url),
            canary,
            bake_ms: parse_duration_ms(&params.bake)?,
            waves,
            abort_if,
            shadow_samples: params.shadow,
            install_timeout_ms: match &params.install_timeout {
                Some(t) => parse_duration_ms(t)?,
                None => 10 * 60_000,
            },
            operator: operator.to_string(),
        };
        let devices: Vec<String> = self
            .store
            .devices()
            .into_iter()
            .filter(|d| d.fleet == self.fleet || d.fleet.is_empty())
            .map(|d| d.device)
            .collect();
        let id = format!("r{now_ms}-{}", &digest[..8]);
        let rollout = Rollout::new(id, spec, &devices, now_ms).map_err(RolloutError::Invalid)?;
        {
            // Every check passed but one: no other rollout may run. Only a
            // create starts one, so holding `creating` while the bundle is
            // written keeps the answer true (and the collector away).
            let _creating = self.creating.lock().unwrap();
            if let Some(running) = self
                .active
                .lock()
                .unwrap()
                .iter()
                .find(|r| !r.phase.is_finished())
            {
                return Err(RolloutError::Busy {
                    id: running.id.clone(),
                    name: running.spec.bundle.name.clone(),
                    version: running.spec.bundle.version.clone(),
                });
            }
            // Kept only now: a refused upload is never stored.
            write_durably(&self.bundles.join(format!("{digest}.ferry")), bundle)?;
            self.active.lock().unwrap().push(rollout.clone());
        }
        self.persist(&rollout)?;
        if let Err(e) = self.take_release(&verified, bundle.len(), operator, now_ms) {
            tracing::error!(error = %e, release = %verified.release_id(), "Cannot record the release in the registry");
        }
        if let Some(RolloutError::Downgrade {
            channel,
            running_sequence,
            ..
        }) = &downgrade
        {
            self.audit(
                &rollout,
                now_ms,
                format!(
                    "downgrade allowed by {operator}: channel {channel} from sequence \
                     {running_sequence} to {}",
                    rollout.spec.bundle.sequence
                ),
            )?;
        }
        self.audit(
            &rollout,
            now_ms,
            format!(
                "created: {} {} (sequence {}) to {} devices, {} canar{}, bake {} s, abort if [{}]",
                rollout.spec.bundle.name,
                rollout.spec.bundle.version,
                rollout.spec.bundle.sequence,
                rollout.order.len(),
                rollout.canaries,
                if rollout.canaries == 1 { "y" } else { "ies" },
                rollout.spec.bake_ms / 1000,
                rollout
                    .spec
                    .abort_if
                    .iter()
                    .map(|r| r.text.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )?;
        self.store.notify(Change::Rollout {
            id: rollout.id.clone(),
        });
        Ok(rollout)
    }

    /// An operator's decision on a running rollout (`POST
    /// /api/rollouts/{id}/pause|resume|abort`): pausing stops new installs
    /// and promotion (the abort rules keep watching); an abort is carried
    /// out by the next step (rollbacks for the devices that installed it).
    /// Recorded in the audit log under `who`.
    pub fn control(
        &self,
        id: &str,
        control: Control,
        who: &str,
        now_ms: u64,
    ) -> Result<Rollout, RolloutError> {
        let (rollout, what) = {
            let mut active = self.active.lock().unwrap();
            let r = active
                .iter_mut()
                .find(|r| r.id == id)
                .ok_or_else(|| RolloutError::NotFound(id.to_string()))?;
            let busy = |state: &str| {
                RolloutError::Invalid(format!(
                    "rollout {id} is {state}: there is nothing to {}",
                    control.name()
                ))
            };
            if r.phase.is_finished() {
                return Err(busy(phase_name(&r.phase)));
            }
            if matches!(r.phase, Phase::Aborting { .. }) || r.abort_requested.is_some() {
                return Err(busy("aborting"));
            }
            let what = match &control {
                Control::Pause => {
                    if r.paused.is_some() {
                        return Err(busy("paused"));
                    }
                    r.paused = Some(crate::rollout::Paused {
                        by: who.to_string(),
                        since_ms: now_ms,
                    });
                    format!("paused by {who}: no new installs or promotion until resumed")
                }
                Control::Resume => {
                    if r.paused.is_none() {
                        return Err(busy("not paused"));
                    }
                    r.paused = None;
                    format!("resumed by {who}")
                }
                Control::Abort { reason } => {
                    let reason = reason.trim();
                    if reason.is_empty() {
                        return Err(RolloutError::Invalid(
                            "an abort needs a reason (the audit log keeps it)".into(),
                        ));
                    }
                    let reason: String = reason.chars().take(500).collect();
                    r.abort_requested = Some(format!("aborted by {who}: {reason}"));
                    format!("abort requested by {who}: {reason}")
                }
            };
            (r.clone(), what)
        };
        self.persist(&rollout)?;
        self.append_audit(AuditEntry {
            ts_ms: now_ms,
            rollout: rollout.id.clone(),
            operator: who.to_string(),
            bundle_digest: rollout.spec.bundle.digest.clone(),
            what,
        })?;
        self.store.notify(Change::Rollout {
            id: rollout.id.clone(),
        });
        Ok(rollout)
    }

    /// Verifies a bundle against the whole policy; one that the builder
    /// alone signed is `not_approved` (with the advice to submit it).
    fn verify_approved(&self, bundle: &[u8]) -> Result<VerifiedBundle, RolloutError> {
        match ferry_format::verify(bundle, &self.trust, &ReadLimits::default()) {
            Ok(v) => Ok(v),
            Err(e) => {
                if let Some(builder) = &self.builder
                    && let Ok(v) = ferry_format::verify(bundle, builder, &ReadLimits::default())
                {
                    return Err(RolloutError::NotApproved {
                        release: v.release_id().to_string(),
                        status: ReleaseStatus::AwaitingApproval.name(),
                        advice: "only the builder signed it; submit it (ferry-fleet releases \
                                 submit) and have an approver approve it",
                    });
                }
                Err(RolloutError::BundleRefused {
                    code: e.code(),
                    message: e.to_string(),
                })
            }
        }
    }

    /// The release a channel runs: that of its latest rollout that
    /// finished `done`, as (release id or digest, sequence).
    fn running_release(&self, channel: &str) -> Option<(String, u64)> {
        self.active
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.phase == Phase::Done && r.spec.bundle.channel == channel)
            .max_by_key(|r| r.created_ms)
            .map(|r| {
                let b = &r.spec.bundle;
                let id = if b.release.is_empty() {
                    b.digest.clone()
                } else {
                    b.release.clone()
                };
                (id, b.sequence)
            })
    }

    /// A [`RolloutError::Downgrade`] if rolling out `v` would take its
    /// channel to a sequence not above the one it runs (another release of
    /// the same sequence included: devices order releases by sequence).
    fn downgrade_of(&self, v: &VerifiedBundle) -> Option<RolloutError> {
        let m = v.manifest();
        let (running, running_sequence) = self.running_release(&m.release.channel)?;
        let same = running == v.release_id() || running == v.digest();
        (!same && m.release.sequence <= running_sequence).then(|| RolloutError::Downgrade {
            name: m.name.clone(),
            version: m.version.clone(),
            sequence: m.release.sequence,
            channel: m.release.channel.clone(),
            running,
            running_sequence,
        })
    }

    /// A release's record; `NotFound` if the registry lacks it.
    fn record(&self, release: &str) -> Result<ReleaseRecord, RolloutError> {
        self.find_record(release)?
            .ok_or_else(|| RolloutError::NotFound(format!("release {release}")))
    }

    fn find_record(&self, release: &str) -> Result<Option<ReleaseRecord>, RolloutError> {
        self.store
            .release(release)
            .map_err(|e| self.registry_error(e))
    }

    fn registry_error(&self, e: crate::store::StoreError) -> RolloutError {
        RolloutError::Io {
            what: "use the release registry of",
            path: self.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    }

    /// Records a fully signed release in the registry: new, or one that
    /// awaited approval and now carries every signature (approved
    /// offline). A record already approved is kept as it is.
    fn take_release(
        &self,
        v: &VerifiedBundle,
        size: usize,
        who: &str,
        now_ms: u64,
    ) -> Result<ReleaseRecord, RolloutError> {
        match self.find_record(v.release_id())? {
            Some(mut r) if r.status == ReleaseStatus::AwaitingApproval => {
                approved_copy(&mut r, v, size);
                self.store
                    .update_release(&r.release, &r)
                    .map_err(|e| self.registry_error(e))?;
                Ok(r)
            }
            Some(r) => Ok(r),
            None => {
                let r = new_record(v, size, who, now_ms, ReleaseStatus::Approved);
                self.store
                    .record_release(&r.release, &r)
                    .map_err(|e| self.registry_error(e))?;
                Ok(r)
            }
        }
    }

    /// Takes a release into the registry (`POST /api/releases`): one that
    /// carries every signature is `approved`; one that only the builder
    /// signed (when the policy has an approver) awaits approval. Its bundle
    /// is kept for the approver and the rollout. Submitting a release the
    /// registry has answers its record (upgraded to approved if this copy
    /// carries the approver's signature); a rejected one stays rejected.
    pub fn submit(
        &self,
        bundle: &[u8],
        who: &str,
        now_ms: u64,
    ) -> Result<ReleaseRecord, RolloutError> {
        let (verified, status) =
            match ferry_format::verify(bundle, &self.trust, &ReadLimits::default()) {
                Ok(v) => (v, ReleaseStatus::Approved),
                Err(e) => match &self.builder {
                    Some(builder) => {
                        match ferry_format::verify(bundle, builder, &ReadLimits::default()) {
                            Ok(v) => (v, ReleaseStatus::AwaitingApproval),
                            Err(_) => {
                                return Err(RolloutError::BundleRefused {
                                    code: e.code(),
                                    message: e.to_string(),
                                });
                            }
                        }
                    }
                    None => {
                        return Err(RolloutError::BundleRefused {
                            code: e.code(),
                            message: e.to_string(),
                        });
                    }
                },
            };
        let m = verified.manifest();
        if m.release.fleet != self.fleet {
            return Err(RolloutError::WrongFleet {
                bundle: m.release.fleet.clone(),
                console: self.fleet.clone(),
            });
        }
        let _creating = self.creating.lock().unwrap();
        let known = self.find_record(verified.release_id())?;
        match (&known, status) {
            (Some(r), _) if r.status == ReleaseStatus::Rejected => return Err(not_approved(r)),
            (Some(r), ReleaseStatus::AwaitingApproval) => return Ok(r.clone()),
            (Some(r), _) if r.status == ReleaseStatus::Approved => return Ok(r.clone()),
            _ => {}
        }
        if known.is_none() {
            let waiting = self.waiting().len();
            if waiting >= MAX_WAITING {
                return Err(RolloutError::TooManyWaiting {
                    waiting,
                    max: MAX_WAITING,
                });
            }
        }
        write_durably(
            &self.bundles.join(format!("{}.ferry", verified.digest())),
            bundle,
        )?;
        let mut record = match known {
            Some(mut r) => {
                // Awaited approval; this copy carries it.
                approved_copy(&mut r, &verified, bundle.len());
                r
            }
            None => new_record(&verified, bundle.len(), who, now_ms, status),
        };
        record.review = Some(crate::releases::Review::of(&verified, bundle.len() as u64));
        self.store
            .update_release(&record.release, &record)
            .map_err(|e| self.registry_error(e))?;
        drop(_creating);
        self.audit_release(
            &record,
            who,
            now_ms,
            format!(
                "submitted: {} {} (sequence {}, channel {}), {}",
                record.name,
                record.version,
                record.sequence,
                record.channel,
                record.status.name()
            ),
        )?;
        self.store.notify(Change::Release {
            id: record.release.clone(),
        });
        Ok(record)
    }

    /// An approver's decision in favour (`POST /api/releases/{id}/approve`):
    /// `bundle` is the submitted bundle with the approver's signature added
    /// on their machine (`ferry approve`). It must be the same release,
    /// verify against the whole policy, and `who` must not be who submitted
    /// it.
    pub fn approve(
        &self,
        release: &str,
        bundle: &[u8],
        who: &str,
        now_ms: u64,
    ) -> Result<ReleaseRecord, RolloutError> {
        let mut record = self.record(release)?;
        if record.status != ReleaseStatus::AwaitingApproval {
            return Err(not_approved_or_done(&record));
        }
        if record.uploaded_by == who {
            return Err(RolloutError::SamePerson {
                who: who.to_string(),
                release: release.to_string(),
            });
        }
        let got = ferry_format::release_id_of(bundle).map_err(|e| RolloutError::BundleRefused {
            code: e.code(),
            message: e.to_string(),
        })?;
        if got != release {
            return Err(RolloutError::WrongRelease {
                expected: release.to_string(),
                got,
            });
        }
        let verified =
            ferry_format::verify(bundle, &self.trust, &ReadLimits::default()).map_err(|e| {
                RolloutError::BundleRefused {
                    code: e.code(),
                    message: e.to_string(),
                }
            })?;
        let _creating = self.creating.lock().unwrap();
        write_durably(
            &self.bundles.join(format!("{}.ferry", verified.digest())),
            bundle,
        )?;
        approved_copy(&mut record, &verified, bundle.len());
        record.approved_by = Some(who.to_string());
        record.approved_ms = Some(now_ms);
        self.store
            .update_release(&record.release, &record)
            .map_err(|e| self.registry_error(e))?;
        drop(_creating);
        self.audit_release(
            &record,
            who,
            now_ms,
            format!(
                "approved: {} {} (sequence {}), signed by {}",
                record.name,
                record.version,
                record.sequence,
                record.signed_by.join(", ")
            ),
        )?;
        self.collect_bundles()?;
        self.store.notify(Change::Release {
            id: record.release.clone(),
        });
        Ok(record)
    }

    /// An approver's decision against (`POST /api/releases/{id}/reject`):
    /// the release can never be rolled out; its bundle is deleted.
    pub fn reject(
        &self,
        release: &str,
        reason: &str,
        who: &str,
        now_ms: u64,
    ) -> Result<ReleaseRecord, RolloutError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(RolloutError::Invalid(
                "a rejection needs a reason (the builder reads it)".into(),
            ));
        }
        let mut record = self.record(release)?;
        if record.status != ReleaseStatus::AwaitingApproval {
            return Err(not_approved_or_done(&record));
        }
        record.status = ReleaseStatus::Rejected;
        record.rejection = Some(crate::releases::Rejection {
            by: who.to_string(),
            ms: now_ms,
            reason: reason.chars().take(1000).collect(),
        });
        self.store
            .update_release(&record.release, &record)
            .map_err(|e| self.registry_error(e))?;
        self.audit_release(
            &record,
            who,
            now_ms,
            format!(
                "rejected: {} {} (sequence {}): {reason}",
                record.name, record.version, record.sequence
            ),
        )?;
        self.collect_bundles()?;
        self.store.notify(Change::Release {
            id: record.release.clone(),
        });
        Ok(record)
    }

    /// One release with the diff against its channel's running release.
    pub fn release_detail(
        &self,
        release: &str,
    ) -> Result<crate::releases::ReleaseDetail, RolloutError> {
        let all = self.releases()?;
        let view = all
            .iter()
            .find(|v| v.record.release == release)
            .cloned()
            .ok_or_else(|| RolloutError::NotFound(format!("release {release}")))?;
        let running_release = self.running_release(&view.record.channel).map(|(id, _)| id);
        let diff = match (&running_release, &view.record.review) {
            (Some(id), Some(candidate)) if *id != release => all
                .iter()
                .find(|v| v.record.release == *id || v.record.digest == *id)
                .and_then(|v| v.record.review.as_ref())
                .map(|running| crate::releases::diff(running, candidate))
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        Ok(crate::releases::ReleaseDetail {
            view,
            running_release,
            diff,
        })
    }

    /// Steps every unfinished rollout once and sends what it asks for.
    pub async fn tick(&self, now_ms: u64) -> Result<(), RolloutError> {
        let mut work = Vec::new();
        let mut finished = false;
        {
            let mut active = self.active.lock().unwrap();
            for r in active.iter_mut().filter(|r| !r.phase.is_finished()) {
                let before = r.clone();
                let store = &self.store;
                let actions = r.step(now_ms, &|d| store.device(d));
                finished |= r.phase.is_finished();
                if *r != before || !actions.is_empty() {
                    work.push((r.clone(), actions));
                }
            }
        }
        // Commands that could not be sent last time go first.
        let retry: Vec<(Rollout, Action)> = std::mem::take(&mut *self.retry.lock().unwrap());
        for (rollout, action) in retry {
            if let Err(e) = self.execute(&rollout, action.clone(), now_ms).await {
                tracing::warn!(error = %e, "Command still not sent; retrying");
                self.retry.lock().unwrap().push((rollout, action));
            }
        }
        for (rollout, actions) in work {
            for action in actions {
                if let Err(e) = self.execute(&rollout, action.clone(), now_ms).await {
                    tracing::warn!(error = %e, "Command not sent; retrying");
                    self.retry.lock().unwrap().push((rollout.clone(), action));
                }
            }
            self.persist(&rollout)?;
            self.store.notify(Change::Rollout {
                id: rollout.id.clone(),
            });
        }
        if finished {
            // After the rollout's last state is on disk: a crash between the
            // two leaves a file the next start collects.
            self.collect_bundles()?;
        }
        Ok(())
    }

    async fn execute(&self, r: &Rollout, action: Action, now_ms: u64) -> Result<(), RolloutError> {
        let spec = &r.spec;
        let (device, cmd, what) = match action {
            Action::Audit { what } => return self.audit(r, now_ms, what),
            Action::Install { device } => (
                device,
                Cmd::Install {
                    url: spec.url.clone(),
                    digest: spec.bundle.digest.clone(),
                },
                "install",
            ),
            Action::ShadowStart { device } => (
                device,
                Cmd::ShadowStart {
                    url: spec.url.clone(),
                    digest: spec.bundle.digest.clone(),
                    samples: spec.shadow_samples,
                },
                "shadow_start",
            ),
            Action::ShadowStop { device } => (device, Cmd::ShadowStop, "shadow_stop"),
            Action::Rollback { device } => (
                device,
                Cmd::Rollback {
                    reason: Some(format!("rollout {} aborted", r.id)),
                    // The release this rollout installed (its file digest
                    // for rollouts recorded before releases had ids).
                    from: Some(if spec.bundle.release.is_empty() {
                        spec.bundle.digest.clone()
                    } else {
                        spec.bundle.release.clone()
                    }),
                },
                "rollback",
            ),
        };
        let mut command = Command {
            schema: SCHEMA_VERSION,
            id: format!("{}-{what}-{device}-{now_ms}", r.id),
            issued_ms: now_ms,
            action: cmd,
            signature: None,
            signatures: Vec::new(),
        };
        if let Some(key) = &self.key {
            let sig = key.sign_detached(&command.signing_bytes(&self.fleet, &device));
            command.signature = Some(OperatorSignature {
                key_id: key.key_id().to_string(),
                signature: base64::engine::general_purpose::STANDARD.encode(sig),
            });
        }
        let payload = serde_json::to_vec(&command).expect("commands serialise");
        self.sink
            .send(topic(&self.fleet, &device, Topic::Command), payload)
            .await
            .map_err(|message| RolloutError::Send {
                what,
                device: device.clone(),
                message,
            })?;
        self.audit(
            r,
            now_ms,
            format!("sent {what} to {device} (command {})", command.id),
        )
    }

    /// Writes the rollout's current state (the in-memory one, which may be
    /// newer than `r`).
    fn persist(&self, r: &Rollout) -> Result<(), RolloutError> {
        let path = self.dir.join(format!("{}.json", r.id));
        let current = self
            .active
            .lock()
            .unwrap()
            .iter()
            .find(|x| x.id == r.id)
            .cloned()
            .unwrap_or_else(|| r.clone());
        Ok(write_durably(
            &path,
            &serde_json::to_vec_pretty(&current).expect("rollouts serialise"),
        )?)
    }

    fn audit(&self, r: &Rollout, now_ms: u64, what: String) -> Result<(), RolloutError> {
        self.append_audit(AuditEntry {
            ts_ms: now_ms,
            rollout: r.id.clone(),
            operator: r.spec.operator.clone(),
            bundle_digest: r.spec.bundle.digest.clone(),
            what,
        })
    }

    fn append_audit(&self, entry: AuditEntry) -> Result<(), RolloutError> {
        tracing::info!(rollout = %entry.rollout, operator = %entry.operator, what = %entry.what, "Audit");
        let _guard = self.audit_lock.lock().unwrap();
        let path = self.dir.join("audit.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(RolloutError::io("open", &path))?;
        let mut line = serde_json::to_vec(&entry).expect("audit entries serialise");
        line.push(b'\n');
        f.write_all(&line)
            .and_then(|()| f.sync_data())
            .map_err(RolloutError::io("append to", &path))
    }

    /// An audit entry about a release (no rollout).
    fn audit_release(
        &self,
        r: &ReleaseRecord,
        who: &str,
        now_ms: u64,
        what: String,
    ) -> Result<(), RolloutError> {
        self.append_audit(AuditEntry {
            ts_ms: now_ms,
            rollout: String::new(),
            operator: who.to_string(),
            bundle_digest: r.digest.clone(),
            what: format!("release {}: {what}", r.release),
        })
    }

    /// The audit log, oldest first.
    pub fn audit_log(&self) -> Result<Vec<AuditEntry>, RolloutError> {
        let path = self.dir.join("audit.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RolloutError::io("read", &path)(e)),
        };
        // A torn last line (power cut mid-append) is skipped, not fatal.
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// True while some rollout is not finished.
    pub fn running(&self) -> bool {
        self.active
            .lock()
            .unwrap()
            .iter()
            .any(|r| !r.phase.is_finished())
    }
}

/// The file of the bundle a device asks for as `<digest>.ferry` (64
/// lower-case hex digits), if the name is one; whether it exists is the
/// caller's question.
pub fn bundle_path(bundles_dir: &Path, file: &str) -> Option<PathBuf> {
    let digest = file.strip_suffix(".ferry").filter(|d| {
        d.len() == 64
            && d.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })?;
    Some(bundles_dir.join(format!("{digest}.ferry")))
}

/// Phase name for tables.
/// The builder role alone, when `trust` has a builder and other roles.
fn builder_policy(trust: &TrustPolicy) -> Option<TrustPolicy> {
    if trust.roles().len() < 2 {
        return None;
    }
    let builder = trust.roles().iter().find(|r| r.name() == "builder")?;
    TrustPolicy::all_of(vec![builder.clone()]).ok()
}

fn new_record(
    v: &VerifiedBundle,
    size: usize,
    who: &str,
    now_ms: u64,
    status: ReleaseStatus,
) -> ReleaseRecord {
    let m = v.manifest();
    ReleaseRecord {
        release: v.release_id().to_string(),
        name: m.name.clone(),
        version: m.version.clone(),
        fleet: m.release.fleet.clone(),
        channel: m.release.channel.clone(),
        sequence: m.release.sequence,
        digest: v.digest().to_string(),
        signed_by: v.signed_by().iter().map(|k| k.to_string()).collect(),
        lineage: serde_json::json!({
            "source_commit": m.lineage.source_commit,
            "dataset_sha256": m.lineage.dataset_sha256,
            "training": m
                .lineage
                .training_json
                .as_deref()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok()),
        }),
        uploaded_by: who.to_string(),
        first_seen_ms: now_ms,
        status,
        approved_by: None,
        approved_ms: None,
        rejection: None,
        size_bytes: size as u64,
        review: Some(crate::releases::Review::of(v, size as u64)),
    }
}

/// `r` now stands for `v`, a copy of its release that carries every
/// signature (`size` bytes).
fn approved_copy(r: &mut ReleaseRecord, v: &VerifiedBundle, size: usize) {
    r.status = ReleaseStatus::Approved;
    r.digest = v.digest().to_string();
    r.signed_by = v.signed_by().iter().map(|k| k.to_string()).collect();
    r.size_bytes = size as u64;
}

/// The refusal to roll out a release that is not approved.
fn not_approved(r: &ReleaseRecord) -> RolloutError {
    RolloutError::NotApproved {
        release: r.release.clone(),
        status: r.status.name(),
        advice: match r.status {
            ReleaseStatus::Rejected => "an approver rejected it; it can never be rolled out",
            _ => "an approver must approve it first (ferry-fleet releases approve)",
        },
    }
}

/// The refusal to decide on a release that no longer awaits approval.
fn not_approved_or_done(r: &ReleaseRecord) -> RolloutError {
    match r.status {
        ReleaseStatus::Rejected => not_approved(r),
        _ => RolloutError::Invalid(format!(
            "release {} is {}: there is nothing to decide",
            r.release,
            r.status.name()
        )),
    }
}

pub fn phase_name(p: &Phase) -> &'static str {
    match p {
        Phase::Shadow { .. } => "shadow",
        Phase::Canary { .. } => "canary",
        Phase::Bake { .. } => "bake",
        Phase::Wave { .. } => "wave",
        Phase::Aborting { .. } => "aborting",
        Phase::Done => "done",
        Phase::Aborted { .. } => "aborted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_shares() {
        assert_eq!(parse_duration_ms("10m").unwrap(), 600_000);
        assert_eq!(parse_duration_ms("30s").unwrap(), 30_000);
        assert_eq!(parse_duration_ms("1500ms").unwrap(), 1500);
        assert_eq!(parse_duration_ms("2h").unwrap(), 7_200_000);
        assert!(parse_duration_ms("soon").is_err());
        assert_eq!(parse_share("10%").unwrap(), 0.1);
        assert_eq!(parse_share("0.5").unwrap(), 0.5);
        assert!(parse_share("0%").is_err());
        assert!(parse_share("150%").is_err());
    }
}
