//! Running rollouts: persistence, the audit log, commands to devices, and
//! the HTTP routes behind `ferry-fleet rollout` / `rollouts`.
//!
//! # Files (under the console's state directory)
//! ```text
//! rollouts/<id>.json      one rollout (`rollout::Rollout`), replaced atomically
//!                         (write, fsync, rename) after every step that changed it
//! rollouts/audit.jsonl    the audit log: one JSON object per line, appended and
//!                         fsynced, never rewritten
//! bundles/<digest>.ferry  the bundles rollouts install, served to devices at
//!                         GET /bundles/<digest>.ferry (with Range, so an
//!                         interrupted device download resumes)
//! ```
//! A console restarted mid-rollout reloads every unfinished rollout and
//! steps it again: what was sent is recorded per device, so nothing is sent
//! twice within its timeout, and the rollout continues where it stopped.
//!
//! Audit entries (`AuditEntry`) say who, when, which rollout and bundle
//! digest, and what: commands sent, phase changes, the reason of an abort.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use ferry_format::{ReadLimits, SecretKey, TrustPolicy};
use ferry_protocol::{Action as Cmd, Command, OperatorSignature, SCHEMA_VERSION, Topic, topic};
use serde::{Deserialize, Serialize};

use crate::model::Change;
use crate::rollout::{Action, Canary, Phase, Rollout, Rule, Spec};
use crate::store::Store;
use crate::write_atomically;

/// Where commands go: the console's MQTT connection (QoS 1).
pub trait CommandSink: Send + Sync {
    fn send(
        &self,
        topic: String,
        payload: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + '_>>;
}

impl CommandSink for crate::ingest::Console {
    fn send(
        &self,
        topic: String,
        payload: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move { self.publish(&topic, payload).await })
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
    #[serde(default)]
    pub operator: Option<String>,
}

/// Parses `30s`, `10m`, `2h`, `1500ms` or bare milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64> {
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
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow!("{s:?} is not a duration (e.g. 30s, 10m, 2h)"))?;
    if !(n >= 0.0 && n.is_finite()) {
        bail!("{s:?} is not a duration");
    }
    Ok((n * mult as f64).round() as u64)
}

/// Parses `10%` or `0.1` into a share.
pub fn parse_share(s: &str) -> Result<f64> {
    let s = s.trim();
    let v = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => s.parse::<f64>(),
    }
    .map_err(|_| anyhow!("{s:?} is not a share (e.g. 10% or 0.1)"))?;
    if !(v > 0.0 && v <= 1.0) {
        bail!("{s:?} must be more than 0% and at most 100%");
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
    ) -> Result<Rollouts> {
        let dir = state_dir.join("rollouts");
        let bundles = state_dir.join("bundles");
        for d in [&dir, &bundles] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read(&path)?;
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
        Ok(Rollouts {
            dir,
            bundles,
            fleet: fleet.to_string(),
            public_url: public_url.trim_end_matches('/').to_string(),
            trust,
            key,
            store,
            sink,
            active: Mutex::new(all),
            audit_lock: Mutex::new(()),
            retry: Mutex::new(Vec::new()),
        })
    }

    pub fn bundles_dir(&self) -> &Path {
        &self.bundles
    }

    /// Every rollout, oldest first.
    pub fn list(&self) -> Vec<Rollout> {
        self.active.lock().unwrap().clone()
    }

    /// Starts a rollout of `bundle` (its bytes) as `params` say.
    pub fn create(&self, bundle: &[u8], params: &NewRollout, now_ms: u64) -> Result<Rollout> {
        let verified = ferry_format::verify(bundle, &self.trust, &ReadLimits::default())
            .map_err(|e| anyhow!("bundle refused ({}): {e}", e.code()))?;
        let m = verified.manifest();
        if m.release.fleet != self.fleet {
            bail!(
                "the bundle is for fleet {:?}; this console follows {:?}",
                m.release.fleet,
                self.fleet
            );
        }
        if self.key.is_none() {
            bail!("the console has no operator key (serve --key): rollbacks could not be signed");
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
            Some(w) => w.split(',').map(parse_share).collect::<Result<Vec<_>>>()?,
            None => vec![1.0],
        };
        let abort_if = params
            .abort_if
            .split(';')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|r| r.parse::<Rule>().map_err(anyhow::Error::msg))
            .collect::<Result<Vec<_>>>()?;
        let digest = verified.digest().to_string();
        let path = self.bundles.join(format!("{digest}.ferry"));
        write_atomically(&path, bundle)?;
        let spec = Spec {
            bundle: ferry_protocol::BundleRef {
                name: m.name.clone(),
                version: m.version.clone(),
                digest: digest.clone(),
                fleet: m.release.fleet.clone(),
                channel: m.release.channel.clone(),
                sequence: m.release.sequence,
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
            operator: params.operator.clone().unwrap_or_else(|| "operator".into()),
        };
        let devices: Vec<String> = self
            .store
            .devices()
            .into_iter()
            .filter(|d| d.fleet == self.fleet || d.fleet.is_empty())
            .map(|d| d.device)
            .collect();
        let id = format!("r{now_ms}-{}", &digest[..8]);
        let rollout = Rollout::new(id, spec, &devices, now_ms).map_err(anyhow::Error::msg)?;
        {
            let mut active = self.active.lock().unwrap();
            if let Some(running) = active.iter().find(|r| !r.phase.is_finished()) {
                bail!(
                    "rollout {} ({} {}) is still running; one rollout at a time",
                    running.id,
                    running.spec.bundle.name,
                    running.spec.bundle.version
                );
            }
            active.push(rollout.clone());
        }
        self.persist(&rollout)?;
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
    pub async fn tick(&self, now_ms: u64) -> Result<()> {
        let mut work = Vec::new();
        {
            let mut active = self.active.lock().unwrap();
            for r in active.iter_mut().filter(|r| !r.phase.is_finished()) {
                let before = r.clone();
                let store = &self.store;
                let actions = r.step(now_ms, &|d| store.device(d));
                if *r != before || !actions.is_empty() {
                    work.push((r.clone(), actions));
                }
            }
        }
        // Commands that could not be sent last time go first.
        let retry: Vec<(Rollout, Action)> = std::mem::take(&mut *self.retry.lock().unwrap());
        for (rollout, action) in retry {
            if let Err(e) = self.execute(&rollout, action.clone(), now_ms).await {
                tracing::warn!(error = %format!("{e:#}"), "Command still not sent; retrying");
                self.retry.lock().unwrap().push((rollout, action));
            }
        }
        for (rollout, actions) in work {
            for action in actions {
                if let Err(e) = self.execute(&rollout, action.clone(), now_ms).await {
                    tracing::warn!(error = %format!("{e:#}"), "Command not sent; retrying");
                    self.retry.lock().unwrap().push((rollout.clone(), action));
                }
            }
            self.persist(&rollout)?;
            self.store.notify(Change::Rollout {
                id: rollout.id.clone(),
            });
        }
        Ok(())
    }

    async fn execute(&self, r: &Rollout, action: Action, now_ms: u64) -> Result<()> {
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
            .with_context(|| format!("cannot send {what} to {device}"))?;
        self.audit(
            r,
            now_ms,
            format!("sent {what} to {device} (command {})", command.id),
        )
    }

    /// Writes the rollout's current state (the in-memory one, which may be
    /// newer than `r`).
    fn persist(&self, r: &Rollout) -> Result<()> {
        let path = self.dir.join(format!("{}.json", r.id));
        let current = self
            .active
            .lock()
            .unwrap()
            .iter()
            .find(|x| x.id == r.id)
            .cloned()
            .unwrap_or_else(|| r.clone());
        write_atomically(
            &path,
            &serde_json::to_vec_pretty(&current).expect("rollouts serialise"),
        )
    }

    fn audit(&self, r: &Rollout, now_ms: u64, what: String) -> Result<()> {
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
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut line = serde_json::to_vec(&entry).expect("audit entries serialise");
        line.push(b'\n');
        f.write_all(&line)?;
        f.sync_data()?;
        Ok(())
    }

    /// The audit log, oldest first.
    pub fn audit_log(&self) -> Result<Vec<AuditEntry>> {
        let path = self.dir.join("audit.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
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

/// `POST /api/rollouts` (query: [`NewRollout`], body: the bundle),
/// `GET /api/rollouts`, `GET /api/rollouts/{id}`, `GET /api/audit`, and
/// `GET /bundles/{digest}.ferry` (what devices download; honours
/// `Range: bytes=N-` so an interrupted download resumes). Merge into the
/// dashboard's router.
pub fn routes(rollouts: Arc<Rollouts>) -> axum::Router {
    use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;

    fn error(status: StatusCode, message: String) -> Response {
        (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
    }

    async fn create(
        State(r): State<Arc<Rollouts>>,
        Query(params): Query<NewRollout>,
        body: axum::body::Bytes,
    ) -> Response {
        if body.is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "the request body must be the bundle".into(),
            );
        }
        let now = crate::now_ms();
        let r2 = r.clone();
        match tokio::task::spawn_blocking(move || r2.create(&body, &params, now)).await {
            Ok(Ok(rollout)) => (StatusCode::CREATED, axum::Json(rollout)).into_response(),
            Ok(Err(e)) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }

    async fn list(State(r): State<Arc<Rollouts>>) -> Response {
        axum::Json(r.list()).into_response()
    }

    async fn one(State(r): State<Arc<Rollouts>>, UrlPath(id): UrlPath<String>) -> Response {
        match r.list().into_iter().find(|x| x.id == id) {
            Some(x) => axum::Json(x).into_response(),
            None => error(StatusCode::NOT_FOUND, format!("no rollout {id}")),
        }
    }

    async fn audit(State(r): State<Arc<Rollouts>>) -> Response {
        match r.audit_log() {
            Ok(log) => axum::Json(log).into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        }
    }

    async fn bundle(
        State(r): State<Arc<Rollouts>>,
        UrlPath(file): UrlPath<String>,
        headers: HeaderMap,
    ) -> Response {
        let Some(digest) = file.strip_suffix(".ferry").filter(|d| {
            d.len() == 64
                && d.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }) else {
            return error(StatusCode::NOT_FOUND, format!("no bundle {file}"));
        };
        let path = r.bundles_dir().join(format!("{digest}.ferry"));
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(_) => return error(StatusCode::NOT_FOUND, format!("no bundle {file}")),
        };
        let total = bytes.len();
        let start = headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.strip_suffix('-'))
            .and_then(|v| v.parse::<usize>().ok());
        match start {
            Some(s) if s >= total => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{total}"))],
            )
                .into_response(),
            Some(s) => (
                StatusCode::PARTIAL_CONTENT,
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (
                        header::CONTENT_RANGE,
                        format!("bytes {s}-{}/{total}", total - 1),
                    ),
                    (header::ACCEPT_RANGES, "bytes".to_string()),
                ],
                bytes[s..].to_vec(),
            )
                .into_response(),
            None => (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (header::ACCEPT_RANGES, "bytes".to_string()),
                ],
                bytes,
            )
                .into_response(),
        }
    }

    axum::Router::new()
        .route(
            "/api/rollouts",
            get(list)
                .post(create)
                .layer(DefaultBodyLimit::max(MAX_BUNDLE_BYTES)),
        )
        .route("/api/rollouts/{id}", get(one))
        .route("/api/audit", get(audit))
        .route("/bundles/{file}", get(bundle))
        .with_state(rollouts)
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
