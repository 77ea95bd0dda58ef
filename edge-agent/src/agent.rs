//! The agent's core: the active bundle, predictions, the update flow,
//! probation and automatic rollback, shadow runs, commands and status.
//!
//! # Update flow
//! poll (interval, or an MQTT command) → index → skip unless the sequence is
//! higher than the running one (or the command is operator-signed) and the
//! digest was not rejected before → download (resumable) → verify signatures,
//! fleet, channel, sequence → load → golden examples → activate on disk
//! (atomic) → swap the in-memory session → probation.
//!
//! # Probation and rollback
//! A newly activated bundle is on probation for `probation_s`. It is rolled
//! back automatically when, within probation, its error rate exceeds
//! `max_error_rate` (after `min_requests`), or when the agent starts
//! `max_boot_attempts` times in a row without the bundle completing
//! probation (a crash loop), or when it fails to load or fails its golden
//! examples at start. The bad bundle's digest is remembered so the channel
//! does not reinstall it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use arc_swap::ArcSwapOption;
use base64::Engine as _;
use ferry_protocol::{
    Action, BundleRef, ChannelIndex, Command, Event, OutputSummary, SCHEMA_VERSION, SampleRecord,
    Status, Stream, TelemetryRecord, UpdateState,
};
use ferry_runtime::{ReadLimits, ResponseForm, Session};
use tokio::sync::watch;

use crate::buffer::{Buffer, BufferOptions};
use crate::config::Config;
use crate::metrics::{Metrics, Snapshot};
use crate::mqtt::{Identity, MqttStats};
use crate::observe::{DriftMonitor, WindowOwner, append_event, now_ms, row_json, summarize};
use crate::shadow::{ActiveAnswer, Shadow, first_float};
use crate::updates::{self, BundleStore, Fetcher, Rejection, Source, Want};

/// Why a prediction failed.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// No bundle is active (first boot without an initial bundle, or every
    /// bundle failed to load).
    #[error("no model is loaded")]
    NoBundle,
    /// The request is wrong (the caller's fault).
    #[error("{message}")]
    BadInput { code: &'static str, message: String },
    /// The bundle or the host failed.
    #[error("{message}")]
    Failed { code: &'static str, message: String },
}

impl PredictError {
    pub fn code(&self) -> &'static str {
        match self {
            PredictError::NoBundle => "no_bundle",
            PredictError::BadInput { code, .. } | PredictError::Failed { code, .. } => code,
        }
    }
}

/// A response to a prediction request.
#[derive(Debug)]
pub struct Prediction {
    /// The form it is in (its `Content-Type`).
    pub form: ResponseForm,
    pub body: Vec<u8>,
}

/// The bundle serving requests.
pub struct Active {
    pub session: Arc<Session>,
    pub bundle: BundleRef,
    pub activated_ms: u64,
    /// Unix ms when probation ends; 0 when the bundle is trusted.
    probation_until_ms: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// The running agent. Shared as `Arc<Agent>` by the HTTP server and the
/// background tasks.
pub struct Agent {
    pub config: Config,
    pub identity: Identity,
    roots: crate::trust::Roots,
    freshness: updates::Freshness,
    /// `auto`'s engine choice per release, kept across restarts.
    engines: crate::engines::EngineMemory,
    /// Set once by [`Agent::begin_shutdown`]: downloads stay cancelled.
    shutting_down: std::sync::atomic::AtomicBool,
    /// The last metadata refusal reported (an event per new one).
    metadata_refusal: Mutex<std::collections::BTreeMap<&'static str, (String, String)>>,
    limits: ReadLimits,
    active: ArcSwapOption<Active>,
    /// Has its own lock; its methods take `&self`.
    store: BundleStore,
    fetcher: Fetcher,
    source: Option<Source>,
    pub buffer: Arc<Buffer>,
    pub metrics: Arc<Metrics>,
    pub mqtt_stats: Arc<MqttStats>,
    drift: DriftMonitor,
    shadow: Mutex<Option<Arc<Shadow>>>,
    update_state: Mutex<UpdateState>,
    /// One update (or rollback) at a time.
    update_lock: tokio::sync::Mutex<()>,
    status_tx: watch::Sender<Status>,
    predictions: AtomicU64,
    errors: AtomicU64,
    started: Instant,
    /// Ids of the latest commands acted on: QoS 1 with a persistent session
    /// may deliver a command twice.
    /// Ids of recent unsigned commands (MQTT redelivers at least once).
    recent_commands: Mutex<std::collections::VecDeque<String>>,
    /// Signed commands already obeyed, persisted (see `replay.rs`).
    replay: crate::replay::ReplayGuard,
}

/// A command that passed [`Agent::admit`].
#[derive(Debug)]
pub struct Admitted {
    pub id: String,
    pub action: Action,
}

/// An install an operator-signed command asked for.
#[derive(Debug, Clone)]
pub struct Commanded {
    pub url: String,
    pub digest: String,
    pub command_id: String,
}

/// Command ids remembered for de-duplication: far more than a broker
/// redelivers after a reconnect (its in-flight window).
const RECENT_COMMANDS: usize = 256;

impl Agent {
    /// Opens the state directory and the buffer, installs the initial bundle
    /// on first boot, applies the crash-loop rule and loads the active bundle.
    /// Blocking (bundle verification and compilation): call before starting
    /// the async runtime's work, or from `spawn_blocking`.
    pub fn open(config: Config) -> Result<Arc<Agent>> {
        let identity = Identity {
            device: config.device.id.clone(),
            fleet: config.device.fleet.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        std::fs::create_dir_all(&config.paths.state_dir).with_context(|| {
            format!(
                "cannot create state_dir {}",
                config.paths.state_dir.display()
            )
        })?;
        // Precompiled guests run from unnamed files there rather than from
        // copies in memory (clean pages the kernel can drop).
        ferry_runtime::map_precompiled_guests_in(&config.paths.state_dir);
        let roots = crate::trust::Roots::open(&config)?;
        let state_dir_for_freshness = config.paths.state_dir.clone();
        let (buffer, recovery) = Buffer::open_or_recover(BufferOptions::from_config(
            &config.paths.state_dir,
            &config.buffer,
        ))
        .context("cannot open the telemetry buffer")?;
        let buffer = Arc::new(buffer);
        if let Some(r) = &recovery {
            tracing::error!(
                code = "buffer_recovered",
                moved_to = %r.moved_to.display(),
                reason = %r.reason,
                "Telemetry buffer damaged: moved aside and recreated; predictions go on"
            );
        }
        let store =
            BundleStore::open(&config.paths.state_dir).context("cannot open the bundle store")?;
        let (replay, replay_moved) = crate::replay::ReplayGuard::open(
            &config.paths.state_dir,
            config.updates.max_command_age_s,
            now_ms(),
        )
        .map_err(anyhow::Error::msg)
        .context("cannot open the record of signed commands")?;
        if let Some(moved) = &replay_moved {
            tracing::error!(
                moved_to = %moved.display(),
                "Record of signed commands damaged: moved aside; signed commands issued before now are refused"
            );
        }
        let fetcher =
            Fetcher::from_config(&config.updates).context("cannot set up the update client")?;
        let source = match config.updates.source.trim() {
            "" => None,
            s => Some(Source::parse(s).context("invalid updates.source")?),
        };
        let metrics = Arc::new(Metrics::new());
        let drift = DriftMonitor::start(config.drift.clone(), buffer.clone(), metrics.clone());
        let status = Status::offline(&identity.fleet, &identity.device, &identity.agent_version);
        let (status_tx, _) = watch::channel(status);
        let agent = Arc::new(Agent {
            limits: ReadLimits::default(),
            config,
            identity,
            roots,
            freshness: updates::Freshness::open(&state_dir_for_freshness),
            engines: crate::engines::EngineMemory::open(&state_dir_for_freshness),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            metadata_refusal: Mutex::new(Default::default()),
            active: ArcSwapOption::empty(),
            store,
            fetcher,
            source,
            buffer,
            metrics,
            mqtt_stats: Arc::new(MqttStats::default()),
            drift,
            shadow: Mutex::new(None),
            update_state: Mutex::new(UpdateState::Idle),
            update_lock: tokio::sync::Mutex::new(()),
            status_tx,
            predictions: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            started: Instant::now(),
            recent_commands: Mutex::new(std::collections::VecDeque::new()),
            replay,
        });
        agent
            .metrics
            .root_version
            .set(agent.roots.current().version() as i64);
        agent.boot()?;
        agent.refresh_status();
        if let Some(r) = recovery {
            agent.metrics.buffer_recovered.inc();
            append_event(
                &agent.buffer,
                Event::BufferRecovered {
                    moved_to: r.moved_to.display().to_string(),
                    reason: r.reason,
                },
            );
        }
        append_event(
            &agent.buffer,
            Event::Started {
                agent_version: agent.identity.agent_version.clone(),
                bundle: agent.active_bundle(),
            },
        );
        Ok(agent)
    }

    fn want(&self) -> Want {
        Want {
            fleet: self.config.device.fleet.clone(),
            channel: self.config.device.channel.clone(),
        }
    }

    /// First boot, crash-loop detection, loading.
    fn boot(&self) -> Result<()> {
        let store = &self.store;
        if store.active().is_none() {
            if let Some(initial) = &self.config.paths.initial_bundle {
                // Serve the session the checks loaded: no second compile.
                let (session, bundle) = self.install_initial(initial)?;
                self.set_active(session, bundle, None);
                return Ok(());
            } else {
                tracing::warn!(
                    "No bundle installed and no paths.initial_bundle: serving nothing until an update arrives"
                );
                return Ok(());
            }
        }
        let record = store.record();
        if !record.healthy {
            let attempts = store.record_boot_attempt()?;
            if attempts > self.config.updates.max_boot_attempts && store.previous().is_some() {
                let from = store.active().map(|s| s.bundle.clone());
                let reason = format!(
                    "crash loop: {attempts} starts without the bundle completing probation"
                );
                let to = store.rollback()?;
                // The previous bundle was healthy before the update.
                store.mark_healthy()?;
                tracing::error!(%reason, to = %to.bundle.version, "Rolled back");
                self.metrics.rollbacks.inc();
                append_event(
                    &self.buffer,
                    Event::RolledBack {
                        from,
                        to: to.bundle.clone(),
                        reason,
                        automatic: true,
                    },
                );
            }
        }
        // Load the active bundle; if it fails, fall back to the previous one.
        for _ in 0..2 {
            let Some(slot) = store.active() else { break };
            match self.load_slot(&slot.path, &slot.bundle) {
                Ok(session) => {
                    let healthy = store.record().healthy;
                    let probation =
                        (!healthy).then(|| now_ms() + self.config.updates.probation_s * 1000);
                    self.set_active(session, slot.bundle.clone(), probation);
                    return Ok(());
                }
                Err(rejection) => {
                    tracing::error!(code = rejection.code, reason = %rejection.reason, bundle = %slot.bundle.version, "Active bundle does not load");
                    if store.previous().is_none() {
                        return Err(anyhow!(
                            "the active bundle {} does not load ({}) and there is no previous bundle",
                            slot.bundle.version,
                            rejection.reason
                        ));
                    }
                    let to = store.rollback()?;
                    store.mark_healthy()?;
                    self.metrics.rollbacks.inc();
                    append_event(
                        &self.buffer,
                        Event::RolledBack {
                            from: Some(slot.bundle.clone()),
                            to: to.bundle,
                            reason: format!("does not load: {}", rejection.reason),
                            automatic: true,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn install_initial(&self, path: &Path) -> Result<(Session, BundleRef)> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read initial bundle {}", path.display()))?;
        let (bundle, session) = self
            .check_and_load(&bytes, None, true)
            .map_err(|r| anyhow!("initial bundle {} refused: {}", path.display(), r.reason))?;
        let store = &self.store;
        let staged = store.staging_dir().join(format!("{}.ferry", bundle.digest));
        std::fs::write(&staged, &bytes)
            .with_context(|| format!("cannot stage {}", staged.display()))?;
        store.activate(&staged, &bundle)?;
        // The initial bundle was installed by a person: trusted at once.
        store.mark_healthy()?;
        tracing::info!(bundle = %bundle.version, digest = %bundle.digest, "Installed the initial bundle");
        Ok((session, bundle))
    }

    /// Verifies a candidate (signatures, fleet, channel, sequence), loads it
    /// and runs its golden examples. The verified contents move into the
    /// session (no copy of the decompressed artifacts).
    fn check_and_load(
        &self,
        bytes: &[u8],
        running: Option<&BundleRef>,
        allow_downgrade: bool,
    ) -> Result<(BundleRef, Session), Rejection> {
        let root = self.roots.current();
        let verified = updates::check_candidate(
            bytes,
            root.release_policy(),
            &self.limits,
            &self.want(),
            running,
            allow_downgrade,
        )?;
        let bundle = updates::bundle_ref(&verified);
        if !allow_downgrade {
            self.check_history(&bundle)?;
        }
        let options = self.config.engine.options();
        let remembered = self.engines.recall(&bundle.release, &options);
        let session = updates::load_session(verified, &options, remembered)?;
        updates::health_check(&session)?;
        self.engines.record(&bundle.release, &session, &options);
        Ok((bundle, session))
    }

    /// What this device remembers against a channel candidate: releases
    /// refused or rolled back (by manifest hash, whatever signatures the file
    /// carries), a rolled-back sequence (the floor) and an operator's pin.
    fn check_history(&self, b: &BundleRef) -> Result<(), Rejection> {
        if let Some(pin) = self.store.pin() {
            return Err(Rejection::new(
                "pinned",
                format!(
                    "an operator pinned this device to sequence {} (command {}); `unpin` lifts it",
                    pin.sequence, pin.command_id
                ),
            ));
        }
        if self.store.is_refused(&b.release, &b.digest) {
            return Err(Rejection::new(
                "rejected_before",
                format!(
                    "release {} ({} {}) was refused or rolled back before",
                    b.release, b.name, b.version
                ),
            ));
        }
        if let Some(f) = self.store.floor()
            && f.fleet == b.fleet
            && f.channel == b.channel
            && b.sequence <= f.sequence
        {
            return Err(Rejection::new(
                "below_floor",
                format!(
                    "sequence {} is not above {}, rolled back on this device; only an operator-signed install goes below",
                    b.sequence, f.sequence
                ),
            ));
        }
        Ok(())
    }

    /// Reads the channel: first any newer roots beside it (`root/<n>.json`,
    /// applied in order), then the index, opened as signed metadata when the
    /// root has a channel role and checked for freshness. `None` when the
    /// metadata was refused (reported; the running release stays).
    fn fetch_channel(&self, source: &Source) -> Result<Option<ChannelIndex>> {
        self.walk_roots(source);
        let bytes = self.fetcher.fetch_index_bytes(source)?;
        let root = self.roots.current();
        let (payload, signed) = match updates::open_index(&bytes, &root) {
            Ok(v) => v,
            Err(r) => {
                self.note_metadata_refused("index", r);
                return Ok(None);
            }
        };
        let index = updates::parse_index(source, &payload)?;
        if signed && let Err(r) = self.freshness.check(&index, now_ms()) {
            self.note_metadata_refused("index", r);
            return Ok(None);
        }
        if self
            .metadata_refusal
            .lock()
            .unwrap()
            .remove("index")
            .is_some()
        {
            tracing::info!("Channel metadata accepted again");
            if matches!(
                self.update_state(),
                UpdateState::Rejected { digest: None, .. }
            ) {
                self.set_update_state(UpdateState::Idle);
            }
        }
        Ok(Some(index))
    }

    /// Applies the roots the channel offers after the current one, in order.
    fn walk_roots(&self, source: &Source) {
        // A device offline through many rotations catches up over a few polls.
        const MAX_STEPS: usize = 16;
        for _ in 0..MAX_STEPS {
            let next = self.roots.current().version() + 1;
            let relative = format!("root/{next}.json");
            match self.fetcher.fetch_beside(
                source,
                &relative,
                ferry_format::MAX_ENVELOPE_BYTES as u64,
            ) {
                Ok(None) => {
                    self.metadata_refusal.lock().unwrap().remove("root");
                    return;
                }
                Ok(Some(bytes)) => match self.roots.apply(&bytes) {
                    Ok(root) => {
                        self.metrics.root_version.set(root.version() as i64);
                        append_event(
                            &self.buffer,
                            Event::RootRotated {
                                version: root.version(),
                            },
                        );
                    }
                    Err(e) => {
                        self.note_metadata_refused(
                            "root",
                            Rejection::new(e.code(), format!("{relative}: {e}")),
                        );
                        return;
                    }
                },
                Err(e) => {
                    tracing::warn!(file = %relative, error = %e, "Cannot read the channel's next root");
                    return;
                }
            }
        }
    }

    /// Counts a refused piece of channel metadata, `what` being `index` or
    /// `root` (metric at every poll; status and event when its reason changes).
    fn note_metadata_refused(&self, what: &'static str, r: Rejection) {
        self.metrics
            .metadata_rejected
            .get_or_create(&crate::metrics::CodeLabel {
                code: r.code.to_string(),
            })
            .inc();
        let key = (r.code.to_string(), r.reason.clone());
        let mut last = self.metadata_refusal.lock().unwrap();
        if last.get(what) == Some(&key) {
            return;
        }
        last.insert(what, key);
        drop(last);
        tracing::error!(code = r.code, reason = %r.reason, "Channel metadata refused; keeping the running release");
        append_event(
            &self.buffer,
            Event::MetadataRejected {
                code: r.code.to_string(),
                reason: r.reason.clone(),
            },
        );
        self.set_update_state(UpdateState::Rejected {
            version: "channel metadata".into(),
            code: r.code.to_string(),
            reason: r.reason,
            digest: None,
        });
    }

    /// Makes a channel candidate skipped for the device's history visible
    /// (status, metric, event) once per candidate, not at every poll (the
    /// status keeps the first reason it was refused for).
    fn note_skipped(&self, candidate: &BundleRef, r: Rejection) {
        let already = matches!(
            &*self.update_state.lock().unwrap(),
            UpdateState::Rejected { digest: Some(d), .. } if d == &candidate.digest
        );
        if already {
            return;
        }
        self.report_update_refused(&candidate.version, &candidate.digest, r.code, &r.reason);
    }

    /// A refused candidate, made visible: log, `updates_rejected{code}`,
    /// an `update_rejected` event and the status's update state.
    fn report_update_refused(&self, version: &str, digest: &str, code: &str, reason: &str) {
        tracing::warn!(code, %reason, %version, "Rejected update");
        self.metrics
            .updates_rejected
            .get_or_create(&crate::metrics::CodeLabel {
                code: code.to_string(),
            })
            .inc();
        append_event(
            &self.buffer,
            Event::UpdateRejected {
                version: version.to_string(),
                digest: Some(digest.to_string()),
                code: code.to_string(),
                reason: reason.to_string(),
            },
        );
        self.set_update_state(UpdateState::Rejected {
            version: version.to_string(),
            code: code.to_string(),
            reason: reason.to_string(),
            digest: Some(digest.to_string()),
        });
    }

    fn load_slot(&self, path: &Path, bundle: &BundleRef) -> Result<Session, Rejection> {
        let bytes = std::fs::read(path).map_err(|e| Rejection {
            code: "io",
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let (loaded, session) = self.check_and_load(&bytes, None, true)?;
        if loaded.digest != bundle.digest {
            return Err(Rejection {
                code: "digest_mismatch",
                reason: format!(
                    "{} holds {} instead of {}",
                    path.display(),
                    loaded.digest,
                    bundle.digest
                ),
            });
        }
        Ok(session)
    }

    fn set_active(&self, session: Session, bundle: BundleRef, probation_until_ms: Option<u64>) {
        let owner = session.baseline().map(|b| WindowOwner {
            version: bundle.version.clone(),
            digest: bundle.digest.clone(),
            baseline: Arc::new(b.clone()),
            config: session.manifest().drift.clone(),
        });
        self.drift.reset(owner);
        tracing::info!(
            bundle = %bundle.version,
            digest = %bundle.digest,
            sequence = bundle.sequence,
            precompiled_guest = session.used_precompiled_guest(),
            guest_target = session.guest_target(),
            load_ms = session.timings().total.as_millis() as u64,
            "Serving"
        );
        self.active.store(Some(Arc::new(Active {
            session: Arc::new(session),
            bundle,
            activated_ms: now_ms(),
            probation_until_ms: AtomicU64::new(probation_until_ms.unwrap_or(0)),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })));
        if probation_until_ms.is_some() {
            let version = self.active_bundle().map(|b| b.version).unwrap_or_default();
            self.set_update_state(UpdateState::Probation { version });
        }
    }

    /// The active bundle, if any.
    pub fn active(&self) -> Option<Arc<Active>> {
        self.active.load_full()
    }

    pub fn active_bundle(&self) -> Option<BundleRef> {
        self.active.load().as_ref().map(|a| a.bundle.clone())
    }

    pub fn previous_bundle(&self) -> Option<BundleRef> {
        self.store.previous().map(|s| s.bundle)
    }

    /// Runs one request through the active bundle and records what happened,
    /// answering in the form the HTTP `Accept` header asks for (JSON without
    /// one; see [`ResponseForm::negotiate`]). Never waits on the network.
    pub fn predict(
        &self,
        content_type: &str,
        accept: Option<&str>,
        body: &[u8],
    ) -> Result<Prediction, PredictError> {
        let Some(active) = self.active.load_full() else {
            self.metrics.observe_request(0.0, Some("no_bundle"));
            return Err(PredictError::NoBundle);
        };
        let start = Instant::now();
        let t = &self.config.telemetry;
        let sample = t.sample_rate > 0.0 && fastrand::f64() < t.sample_rate;
        let shadow = self.shadow.lock().unwrap().clone().filter(|s| !s.is_done());
        let mut summary = OutputSummary::default();
        let mut rows = 0u32;
        let mut sample_features = None;
        let mut shadow_values = None;
        let session = &active.session;
        let form = session.response_form(accept);
        let result = form.and_then(|form| {
            session
                .infer_with(content_type, body, form, &mut |obs| {
                    (summary, rows) = summarize(obs.outputs);
                    if let Some(features) = obs.features {
                        self.drift.observe(features);
                        if sample && !features.rows.is_empty() {
                            sample_features = Some(row_json(features, 0));
                        }
                    }
                    if shadow.is_some() {
                        shadow_values = Some(first_float(obs.outputs));
                    }
                })
                .map(|body| Prediction { form, body })
        });
        let latency = start.elapsed();
        active.requests.fetch_add(1, Ordering::Relaxed);
        let outcome = result.map_err(|e| {
            let message = e.to_string();
            if e.is_bad_input() {
                PredictError::BadInput {
                    code: e.code(),
                    message,
                }
            } else {
                PredictError::Failed {
                    code: e.code(),
                    message,
                }
            }
        });
        let error_code = outcome.as_ref().err().map(|e| e.code());
        if error_code.is_some() {
            active.errors.fetch_add(1, Ordering::Relaxed);
            self.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            self.predictions.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics
            .observe_request(latency.as_secs_f64(), error_code);
        let version = &active.bundle.version;
        let appended = self.buffer.append(Stream::Telemetry, |id| {
            serde_json::to_vec(&TelemetryRecord {
                id,
                ts_ms: now_ms(),
                bundle_version: version.clone(),
                latency_us: latency.as_micros() as u64,
                ok: error_code.is_none(),
                output: summary.clone(),
                error: error_code.map(str::to_string),
                rows,
            })
            .expect("telemetry serialises")
        });
        if let Err(e) = appended {
            tracing::debug!(error = %e, "Telemetry record not buffered");
        }
        if let Some(features) = sample_features {
            let raw = (t.sample_raw && body.len() <= t.sample_max_bytes)
                .then(|| base64::engine::general_purpose::STANDARD.encode(body));
            let _ = self.buffer.append(Stream::Samples, |id| {
                serde_json::to_vec(&SampleRecord {
                    id,
                    ts_ms: now_ms(),
                    bundle_version: version.clone(),
                    features,
                    content_type: raw.as_ref().map(|_| content_type.to_string()),
                    raw_base64: raw,
                    output: summary.clone(),
                })
                .expect("samples serialise")
            });
        }
        if let (Some(shadow), Some(values), Ok(answered)) = (shadow, shadow_values, &outcome) {
            let answer = ActiveAnswer {
                summary: summary.clone(),
                values,
                latency,
            };
            if shadow.offer(content_type, body, answered.form, answer) {
                self.metrics.shadow_compared.inc();
            }
        }
        outcome
    }

    /// The latest drift report of the active bundle.
    pub fn latest_drift(&self) -> Option<ferry_protocol::DriftRecord> {
        self.drift.latest()
    }

    fn set_update_state(&self, state: UpdateState) {
        *self.update_state.lock().unwrap() = state;
        self.refresh_status();
    }

    pub fn update_state(&self) -> UpdateState {
        self.update_state.lock().unwrap().clone()
    }

    /// The status as published (retained) over MQTT.
    pub fn status(&self) -> Status {
        Status {
            schema: SCHEMA_VERSION,
            device: self.identity.device.clone(),
            fleet: self.identity.fleet.clone(),
            online: true,
            agent_version: self.identity.agent_version.clone(),
            ts_ms: now_ms(),
            bundle: self.active_bundle(),
            previous: self.previous_bundle(),
            update: self.update_state(),
            buffer: self.buffer.stats(),
            predictions: self.predictions.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            uptime_s: self.started.elapsed().as_secs(),
            shadow: self
                .shadow
                .lock()
                .unwrap()
                .as_ref()
                .filter(|s| !s.is_done())
                .map(|s| s.info()),
        }
    }

    /// Publishes a fresh status to the MQTT task.
    pub fn refresh_status(&self) {
        self.status_tx.send_replace(self.status());
    }

    pub fn status_receiver(&self) -> watch::Receiver<Status> {
        self.status_tx.subscribe()
    }

    /// Prometheus text.
    pub fn metrics_text(&self) -> String {
        let state = match self.update_state() {
            UpdateState::Idle => "idle",
            UpdateState::Downloading { .. } => "downloading",
            UpdateState::Verifying { .. } => "verifying",
            UpdateState::Rejected { .. } => "rejected",
            UpdateState::Probation { .. } => "probation",
        };
        let s = &self.mqtt_stats;
        self.metrics.encode(&Snapshot {
            buffer: self.buffer.stats(),
            update_state: state,
            bundle: self.active().map(|a| {
                let b = &a.bundle;
                (
                    b.name.clone(),
                    b.version.clone(),
                    b.digest.clone(),
                    a.session.engine().name().to_string(),
                )
            }),
            mqtt_connected: s.connected.load(Ordering::Relaxed),
            mqtt_published: s.published.load(Ordering::Relaxed),
            mqtt_acked_records: s.acked_records.load(Ordering::Relaxed),
            mqtt_reconnects: s.reconnects.load(Ordering::Relaxed),
        })
    }

    /// Once a second: drift windows by time, probation verdicts.
    pub fn tick(&self) {
        self.drift.tick();
        let Some(active) = self.active.load_full() else {
            return;
        };
        let until = active.probation_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return;
        }
        let u = &self.config.updates;
        let requests = active.requests.load(Ordering::Relaxed);
        let errors = active.errors.load(Ordering::Relaxed);
        if requests >= u.min_requests && errors as f64 > u.max_error_rate * requests as f64 {
            let reason = format!(
                "error rate {:.1}% over {requests} requests on probation (limit {:.1}%)",
                100.0 * errors as f64 / requests as f64,
                100.0 * u.max_error_rate
            );
            if let Err(e) = self.rollback_blocking(&reason, true) {
                tracing::error!(error = %e, "Automatic rollback failed");
            }
        } else if now_ms() >= until {
            active.probation_until_ms.store(0, Ordering::Relaxed);
            match self.store.mark_healthy() {
                Ok(()) => {
                    tracing::info!(bundle = %active.bundle.version, "Bundle passed probation")
                }
                Err(e) => tracing::error!(error = %e, "Cannot record the bundle as healthy"),
            }
            self.set_update_state(UpdateState::Idle);
        }
    }

    /// Stops downloads in progress (at their next chunk) and any that would
    /// start: SIGTERM ends the process in seconds, not after a transfer.
    pub fn begin_shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.fetcher
            .cancel_flag()
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Goes back to the previous bundle. Blocking.
    pub fn rollback_blocking(&self, reason: &str, automatic: bool) -> Result<BundleRef> {
        let to = self.roll_back(reason, automatic);
        if to.is_ok() {
            // As after an update: what loading the previous bundle freed.
            release_freed_heap();
        }
        to
    }

    fn roll_back(&self, reason: &str, automatic: bool) -> Result<BundleRef> {
        let from = self.active_bundle();
        let store = &self.store;
        if store.previous().is_none() {
            return Err(anyhow!("there is no previous bundle to roll back to"));
        }
        let to = store.rollback()?;
        // The previous bundle was healthy before the update.
        store.mark_healthy()?;
        let session = self
            .load_slot(&to.path, &to.bundle)
            .map_err(|r| anyhow!("previous bundle does not load: {}", r.reason))?;
        self.set_active(session, to.bundle.clone(), None);
        self.metrics.rollbacks.inc();
        tracing::warn!(%reason, from = ?from.as_ref().map(|b| &b.version), to = %to.bundle.version, automatic, "Rolled back");
        append_event(
            &self.buffer,
            Event::RolledBack {
                from,
                to: to.bundle.clone(),
                reason: reason.to_string(),
                automatic,
            },
        );
        self.set_update_state(UpdateState::Idle);
        Ok(to.bundle)
    }

    /// Polls the channel, or installs the bundle an operator-signed command
    /// names (`commanded`: its URL, file digest and command id), and
    /// activates what passes every check. Returns the new bundle, if any.
    pub async fn check_updates(
        self: &Arc<Self>,
        commanded: Option<Commanded>,
    ) -> Result<Option<BundleRef>> {
        let _one_at_a_time = self.update_lock.lock().await;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let installed = this.update_blocking(commanded);
            // The download, the verified bundle and the loading's scratch
            // are freed by now; the old release once its last request ends.
            if matches!(installed, Ok(Some(_))) {
                release_freed_heap();
            }
            installed
        })
        .await
        .context("update task panicked")?
    }

    fn update_blocking(&self, commanded: Option<Commanded>) -> Result<Option<BundleRef>> {
        let running = self.active_bundle();
        let allow_downgrade = commanded.is_some();
        let (url, digest, version, size) = match &commanded {
            Some(c) => (
                c.url.clone(),
                c.digest.clone(),
                String::from("(commanded)"),
                None,
            ),
            None => {
                let Some(source) = &self.source else {
                    return Ok(None);
                };
                let Some(index) = self.fetch_channel(source)? else {
                    return Ok(None);
                };
                let e = index.latest;
                if running.as_ref().is_some_and(|r| e.sequence <= r.sequence) {
                    return Ok(None);
                }
                // Judged from the index before downloading; the same checks
                // run again on the verified bundle.
                let candidate = BundleRef {
                    name: e.name.clone(),
                    version: e.version.clone(),
                    digest: e.digest.clone(),
                    fleet: index.fleet.clone(),
                    channel: index.channel.clone(),
                    sequence: e.sequence,
                    release: e.release.clone(),
                };
                if let Err(r) = self.check_history(&candidate) {
                    self.note_skipped(&candidate, r);
                    return Ok(None);
                }
                (e.url, e.digest, e.version, Some(e.size))
            }
        };
        if running.as_ref().is_some_and(|r| r.digest == digest) {
            return Ok(None);
        }
        let reject = |code: &'static str, reason: String| {
            self.report_update_refused(&version, &digest, code, &reason);
            anyhow!("update {version} rejected ({code}): {reason}")
        };
        updates::check_digest(&digest).map_err(|e| anyhow!("{e}"))?;
        // Staging is cleared before the state says `downloading`: whoever
        // sees that state finds one bundle at most in staging.
        if let Err(e) = self.store.clear_staging_except(&digest) {
            tracing::warn!(error = %e, "Cannot clean staging");
        }
        self.set_update_state(UpdateState::Downloading {
            version: version.clone(),
            received: 0,
            total: size.unwrap_or(0),
        });
        let staging = self.store.staging_dir();
        let mut last = Instant::now();
        let staged = self
            .fetcher
            .download(
                &url,
                &digest,
                size,
                self.config.updates.max_bundle_bytes,
                &staging,
                &mut |received, total| {
                    if last.elapsed() > Duration::from_millis(500) {
                        last = Instant::now();
                        *self.update_state.lock().unwrap() = UpdateState::Downloading {
                            version: version.clone(),
                            received,
                            total,
                        };
                    }
                },
            )
            .map_err(|e| reject(e.code(), e.to_string()))?;
        self.set_update_state(UpdateState::Verifying {
            version: version.clone(),
        });
        let bytes = std::fs::read(&staged)
            .map_err(|e| reject("io", format!("cannot read {}: {e}", staged.display())))?;
        let (bundle, session) = match self.check_and_load(&bytes, running.as_ref(), allow_downgrade)
        {
            Ok(v) => v,
            Err(r) => {
                let _ = std::fs::remove_file(&staged);
                if matches!(r.code, "rejected_before" | "below_floor") {
                    // A verified file of a release refused before (an index
                    // without `release` could not tell): its digest too, so
                    // the next poll does not download it again.
                    let _ = self.store.refuse("", &digest);
                } else if !matches!(r.code, "already_active" | "downgrade" | "pinned") {
                    // A release whose signatures verified and that was judged
                    // bad is remembered by its manifest hash too: re-signed
                    // under a new file digest, it stays refused. A file that
                    // did not verify is remembered by its digest only, or a
                    // corrupted copy could blacklist the genuine release.
                    let judged = matches!(
                        r.code,
                        "wrong_fleet"
                            | "wrong_channel"
                            | "guest_target"
                            | "load_failed"
                            | "golden_failed"
                    );
                    let release = if judged {
                        ferry_format::release_id_of(&bytes).unwrap_or_default()
                    } else {
                        String::new()
                    };
                    let _ = self.store.refuse(&release, &digest);
                }
                return Err(reject(r.code, r.reason));
            }
        };
        self.store
            .activate(&staged, &bundle)
            .map_err(|e| reject(e.code(), e.to_string()))?;
        if let Some(c) = &commanded {
            // An operator's downgrade pins the device: the channel would
            // otherwise reinstall the newer release at its next poll.
            let downgrade = running
                .as_ref()
                .is_some_and(|r| bundle.sequence <= r.sequence);
            let pin = if downgrade {
                Some(updates::Pin {
                    release: bundle.release.clone(),
                    sequence: bundle.sequence,
                    command_id: c.command_id.clone(),
                    since_ms: now_ms(),
                })
            } else {
                self.store.pin()
            };
            if let Err(e) = self.store.set_operator_choice(Some(&bundle), pin) {
                tracing::error!(error = %e, "Cannot record the operator's install");
            }
        }
        let previous = running;
        let probation = now_ms() + self.config.updates.probation_s * 1000;
        self.set_active(session, bundle.clone(), Some(probation));
        self.metrics.updates_installed.inc();
        append_event(
            &self.buffer,
            Event::UpdateInstalled {
                bundle: bundle.clone(),
                previous,
            },
        );
        let _ = self.store.gc(&[]);
        self.refresh_status();
        Ok(Some(bundle))
    }

    /// Acts on a command from the fleet: [`Agent::admit`], then
    /// [`Agent::execute`].
    pub async fn handle_command(self: &Arc<Self>, command: Command) {
        if let Some(admitted) = self.admit(command) {
            self.execute(admitted).await;
        }
    }

    fn reject_command(&self, id: &str, reason: String) {
        tracing::warn!(command = %id, %reason, "Command rejected");
        self.metrics.commands_rejected.inc();
        append_event(
            &self.buffer,
            Event::CommandRejected {
                command_id: id.to_string(),
                reason,
            },
        );
    }

    /// Checks a command in the order commands arrive (schema, signatures,
    /// replay record, URL shape), quickly and without waiting for the update
    /// worker. A rollback admitted here stops a download in progress at its
    /// next chunk, so it never waits behind a stalled transfer.
    pub fn admit(&self, command: Command) -> Option<Admitted> {
        let id = command.id.clone();
        let signatures = command.all_signatures();
        // Unsigned commands are de-duplicated in a ring of their own: they
        // can neither push a signed command's id out nor claim it first.
        // Signed ones are checked (signatures, then the persisted replay
        // record) below.
        if signatures.is_empty() {
            let mut recent = self.recent_commands.lock().unwrap();
            if recent.contains(&id) {
                tracing::debug!(command = %id, "Duplicate command ignored");
                return None;
            }
            if recent.len() == RECENT_COMMANDS {
                recent.pop_front();
            }
            recent.push_back(id.clone());
        }
        let reject = |reason: String| {
            self.reject_command(&id, reason);
            None
        };
        if command.schema != SCHEMA_VERSION {
            return reject(format!(
                "schema {} is not supported (this agent speaks {SCHEMA_VERSION})",
                command.schema
            ));
        }
        let signed = !signatures.is_empty();
        if signed {
            if let Err(e) = self.verify_command(&command) {
                return reject(e);
            }
            // Recorded only now that the signatures verified: a forged
            // command cannot claim a genuine one's id.
            if let Err(e) = self.replay.accept(&id, command.issued_ms, now_ms()) {
                return reject(e);
            }
        } else if command.needs_signature() {
            let threshold = self.roots.current().operator_policy().roles()[0].threshold();
            return reject(format!(
                "{} needs operator signatures ({threshold} required); unsigned commands may only ping or check_update",
                action_name(&command.action)
            ));
        }
        if let Action::Install { url, .. } | Action::ShadowStart { url, .. } = &command.action {
            // A command comes over the network: it may not make the agent read
            // arbitrary local files (the checks would refuse them, but still).
            if !url.starts_with("https://") && !url.starts_with("http://") {
                return reject(format!("{url:?} is not an http(s) URL"));
            }
        }
        tracing::info!(command = %id, action = ?command.action, signed, "Command");
        if let Action::Rollback { from: None, .. } = &command.action {
            // A rollback names the release it leaves: captured and replayed
            // later, it must not undo a newer release.
            return reject(
                "a rollback must name the release it leaves (`from`: manifest hash or file digest)"
                    .into(),
            );
        }
        if matches!(command.action, Action::Rollback { .. }) {
            self.fetcher
                .cancel_flag()
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Some(Admitted {
            id,
            action: command.action,
        })
    }

    /// Carries out an admitted command. Updates, rollbacks and shadow
    /// downloads take the update lock (one at a time); the main loop runs
    /// each in its own task so the next command is admitted meanwhile.
    pub async fn execute(self: &Arc<Self>, admitted: Admitted) {
        let Admitted { id, action } = admitted;
        let reject = |reason: String| self.reject_command(&id, reason);
        match action {
            Action::CheckUpdate => {
                if let Err(e) = self.check_updates(None).await {
                    tracing::warn!(error = %format!("{e:#}"), "Update check failed");
                }
            }
            Action::Install { url, digest } => {
                let commanded = Commanded {
                    url,
                    digest,
                    command_id: id.clone(),
                };
                if let Err(e) = self.check_updates(Some(commanded)).await {
                    tracing::warn!(error = %format!("{e:#}"), "Commanded install failed");
                }
            }
            Action::Rollback { reason, from } => {
                // `admit` set the cancel flag: a download in progress stopped
                // at its next chunk (kept for resuming).
                let cancel = self.fetcher.cancel_flag();
                let _guard = self.update_lock.lock().await;
                if !self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
                    cancel.store(false, std::sync::atomic::Ordering::SeqCst);
                }
                let Some(from) = from else {
                    return reject("a rollback must name the release it leaves".into());
                };
                let running = self.active_bundle();
                if !running
                    .as_ref()
                    .is_some_and(|r| r.release == from || r.digest == from)
                {
                    return reject(format!(
                        "stale rollback: it leaves {from}, this device runs {}",
                        running
                            .map(|r| format!("{} {} ({})", r.name, r.version, r.release))
                            .unwrap_or_else(|| "nothing".into())
                    ));
                }
                let reason = reason.unwrap_or_else(|| format!("operator command {id}"));
                let this = self.clone();
                let r = tokio::task::spawn_blocking(move || this.rollback_blocking(&reason, false))
                    .await;
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => reject(format!("{e:#}")),
                    Err(e) => reject(format!("rollback task failed: {e}")),
                }
            }
            Action::Unpin => match self.store.set_operator_choice(None, None) {
                Ok(()) => {
                    tracing::warn!(command = %id, "Pin lifted: the channel may update this device again")
                }
                Err(e) => reject(format!("cannot lift the pin: {e}")),
            },
            Action::ShadowStart {
                url,
                digest,
                samples,
            } => {
                if let Err(e) = self.start_shadow(url, digest, samples).await {
                    reject(format!("{e:#}"));
                }
            }
            Action::ShadowStop => {
                if let Some(s) = self.shadow.lock().unwrap().as_ref() {
                    s.stop();
                }
            }
            Action::Ping => {}
        }
        self.refresh_status();
    }

    /// Checks a command's signatures against the root's operator role (its
    /// threshold of distinct keys), for this device or for the whole fleet.
    fn verify_command(&self, command: &Command) -> Result<(), String> {
        // Age, clock skew and replays are the replay record's to judge,
        // after the signatures verified.
        let mut decoded = Vec::new();
        for sig in command.all_signatures() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(sig.signature.trim())
                .map_err(|e| format!("signature by {} is not base64: {e}", sig.key_id))?;
            decoded.push((sig.key_id.as_str(), bytes));
        }
        let pairs: Vec<(&str, &[u8])> = decoded.iter().map(|(k, b)| (*k, b.as_slice())).collect();
        let root = self.roots.current();
        let policy = root.operator_policy();
        let fleet = &self.identity.fleet;
        let mut last = String::new();
        for target in [self.identity.device.as_str(), ferry_protocol::ALL_DEVICES] {
            let message = command.signing_bytes(fleet, target);
            match policy.verify_detached_all(&message, &pairs) {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!(
            "operator signatures do not verify for this device or fleet: {last}"
        ))
    }

    async fn start_shadow(
        self: &Arc<Self>,
        url: String,
        digest: String,
        samples: u64,
    ) -> Result<()> {
        let Some(active) = self.active() else {
            return Err(anyhow!("no active bundle to compare with"));
        };
        // One download at a time (staging holds one bundle; a rollback
        // pre-empts this one too).
        let _one_at_a_time = self.update_lock.lock().await;
        let this = self.clone();
        let (bundle, session) = tokio::task::spawn_blocking(move || -> Result<_> {
            crate::updates::check_digest(&digest)?;
            this.store.clear_staging_except(&digest)?;
            let staging = this.store.staging_dir();
            let staged = this.fetcher.download(
                &url,
                &digest,
                None,
                this.config.updates.max_bundle_bytes,
                &staging,
                &mut |_, _| {},
            )?;
            let bytes = std::fs::read(&staged)?;
            // A candidate may have any sequence: it only runs in shadow.
            this.check_and_load(&bytes, None, true)
                .map_err(|r| anyhow!("candidate refused ({}): {}", r.code, r.reason))
        })
        .await
        .context("shadow task panicked")??;
        let buffer = self.buffer.clone();
        let shadow = Shadow::start(
            Arc::new(session),
            bundle,
            active.bundle.clone(),
            samples,
            self.config.shadow.queue,
            Box::new(move |report| {
                tracing::info!(compared = report.compared, agreement = ?report.top1_agreement, "Shadow run finished");
                append_event(&buffer, Event::ShadowReport(report));
            }),
        );
        if let Some(old) = self.shadow.lock().unwrap().replace(shadow) {
            old.stop();
        }
        Ok(())
    }
}

/// A command's action as its wire name.
fn action_name(action: &Action) -> &'static str {
    match action {
        Action::CheckUpdate => "check_update",
        Action::Install { .. } => "install",
        Action::Rollback { .. } => "rollback",
        Action::Unpin => "unpin",
        Action::ShadowStart { .. } => "shadow_start",
        Action::ShadowStop => "shadow_stop",
        Action::Ping => "ping",
    }
}

/// Hands the heap memory that loading a bundle freed back to the system.
/// Loading allocates and frees megabytes (the bundle file, its decompressed
/// model and guest, tract's model before optimisation) on a blocking thread;
/// glibc keeps what that thread's arena freed resident until the arena's
/// top shrinks, which may be never. `malloc_trim` releases the free pages of
/// every arena; called after start-up and after every update or rollback
/// (measured in docs/PERFORMANCE.md, "The lean device build").
pub fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; no pointer of
    // ours is read or invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
}
