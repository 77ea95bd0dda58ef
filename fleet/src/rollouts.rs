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
use ferry_format::{ReadLimits, SecretKey, TrustPolicy};
use ferry_host::{WriteError, write_durably};
use ferry_protocol::{Action as Cmd, Command, OperatorSignature, SCHEMA_VERSION, Topic, topic};
use serde::{Deserialize, Serialize};

use crate::model::Change;
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
}

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
        needed
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

    /// Starts a rollout of `bundle` (its bytes) as `params` say, for
    /// `operator` (the credential's holder, recorded in the audit log).
    pub fn create(
        &self,
        bundle: &[u8],
        params: &NewRollout,
        operator: &str,
        now_ms: u64,
    ) -> Result<Rollout, RolloutError> {
        let verified =
            ferry_format::verify(bundle, &self.trust, &ReadLimits::default()).map_err(|e| {
                RolloutError::BundleRefused {
                    code: e.code(),
                    message: e.to_string(),
                }
            })?;
        let m = verified.manifest();
        if m.release.fleet != self.fleet {
            return Err(RolloutError::WrongFleet {
                bundle: m.release.fleet.clone(),
                console: self.fleet.clone(),
            });
        }
        if self.key.is_none() {
            return Err(RolloutError::NoOperatorKey);
        }
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
        let record = crate::releases::ReleaseRecord {
            release: verified.release_id().to_string(),
            name: m.name.clone(),
            version: m.version.clone(),
            fleet: m.release.fleet.clone(),
            channel: m.release.channel.clone(),
            sequence: m.release.sequence,
            digest: digest.clone(),
            signed_by: verified.signed_by().iter().map(|k| k.to_string()).collect(),
            lineage: serde_json::json!({
                "source_commit": m.lineage.source_commit,
                "dataset_sha256": m.lineage.dataset_sha256,
                "training": m
                    .lineage
                    .training_json
                    .as_deref()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok()),
            }),
            uploaded_by: operator.to_string(),
            first_seen_ms: now_ms,
        };
        if let Err(e) = self.store.record_release(&record.release, &record) {
            tracing::error!(error = %e, release = %record.release, "Cannot record the release in the registry");
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
        let entry = AuditEntry {
            ts_ms: now_ms,
            rollout: r.id.clone(),
            operator: r.spec.operator.clone(),
            bundle_digest: r.spec.bundle.digest.clone(),
            what,
        };
        tracing::info!(rollout = %entry.rollout, what = %entry.what, "Rollout");
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
