//! The retraining loop: drift aggregated over the fleet, the rule that
//! triggers retraining, retraining episodes, the data set and request they
//! write, and the hook they call.
//!
//! # Fleet drift ([`aggregate`])
//! Only each device's *latest* drift window counts, and only if it is
//! recent: its `ts_ms` (the device's clock) at most `max_age_ms` old. Each
//! such device weighs its traffic: the requests of the last hour
//! ([`TRAFFIC_WINDOW_MS`], from the telemetry rate buckets), at least 1, so
//! a device that sends drift but no telemetry still counts once. A
//! feature's share is the weight of the devices whose window flags it
//! drifted over the weight of every device with a recent window (devices
//! without one have no say). Each feature also lists its drifting devices
//! and the largest statistic among them.
//!
//! # Rule and episodes
//! A [`Rule`] (`share>=30%`, `share>0.3`) holds for a feature when its share
//! passes the threshold and at least `min_devices` devices drift on it. It
//! is evaluated on every [`Retrainer::tick`]. When it first holds, an
//! [`Episode`] opens and fires once: it writes the data set and the request
//! and calls the hook. While the episode is open, nothing fires again,
//! however many drift windows arrive. The episode ends when the rule has not
//! held for `calm_ms` in a row; the next time the rule holds opens a new
//! episode.
//!
//! Episodes live in the console's store ([`Store::save_episode`], flushed
//! on every save), so a restarted console knows the open episode and does
//! not fire again. The
//! hook is called at most once per episode: the episode is persisted (and
//! flushed) as `running` before the hook starts, and a console that finds
//! an episode still `running` when it opens records it as `interrupted`
//! instead of calling the hook a second time. An episode found `pending`
//! (opened, but the console stopped before its data set was written) fires
//! on the next tick.
//!
//! # Files (under the console's state directory)
//! ```text
//! retrain/<episode>/samples.csv   the data set: device, ts_ms, bundle_version,
//!                                 every feature (union of names, sorted), top1, score
//! retrain/<episode>/request.json  the request ([`Request`], schema 1), written last
//! retrain/log.jsonl               what happened ([`LogEntry`]), appended, never rewritten
//! ```
//! Both files of an episode are written durably ([`ferry_host::write_durably`]:
//! a unique temporary file, fsync, rename, directory fsync).
//! Parquet is not offered: no well-kept Rust crate writes it without
//! pulling in the Arrow stack, and every training pipeline reads CSV.
//!
//! # Hooks
//! A command (`--retrain-hook-cmd "<program> [args]"`, split like a shell
//! would split words but never run through one) gets the request's path as
//! its last argument and in `FERRY_RETRAIN_REQUEST`; it must exit 0 within
//! the timeout (else it is killed). A webhook (`--retrain-webhook URL`) gets
//! the request as a JSON `POST` body and must answer 2xx; connection
//! errors, 408, 429 and 5xx are retried [`WEBHOOK_ATTEMPTS`] times in all
//! with doubling backoff. The outcome goes into the episode and the log.
//!
//! # Errors
//! [`RetrainError`], with a stable `code()`. A failing hook is not an
//! error of the loop: its outcome is recorded in the episode. The HTTP
//! routes are in `http::retrain`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_host::now_ms;
use ferry_protocol::{BundleRef, DriftRecord, SampleRecord};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::DeviceState;
use crate::store::{Store, StoreError};

/// [`Options::max_samples_per_device`] unless told otherwise.
pub const DEFAULT_MAX_SAMPLES_PER_DEVICE: usize = 2_000;

/// The directory of data sets and the log, in the console's state directory.
pub const DIR: &str = "retrain";
/// Traffic that weighs a device: its requests over the last hour (the
/// store keeps an hour of rate buckets).
pub const TRAFFIC_WINDOW_MS: u64 = 3_600_000;
/// Version of [`Request`].
pub const REQUEST_SCHEMA: u32 = 1;
/// Webhook attempts in all (the first and the retries).
pub const WEBHOOK_ATTEMPTS: u32 = 4;
/// Wait before the first webhook retry; doubles after each.
pub const WEBHOOK_BACKOFF: Duration = Duration::from_secs(1);
/// Output of a hook command kept in the episode and the log: enough for an
/// error message or a pipeline URL, not a whole build log.
pub const MAX_HOOK_OUTPUT: usize = 4096;
/// The default rule: a feature drifting on 30% of the traffic.
pub const DEFAULT_RULE: &str = "share>=30%";

/// What can go wrong in the retraining loop (not in a hook: a hook's
/// failure is its episode's outcome).
#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    /// A setting (rule, hook command, webhook URL) is not valid.
    #[error("{0}")]
    Invalid(String),
    /// Reading or saving an episode failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file of the retraining directory cannot be read, created or
    /// appended to.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data set or request could not be written.
    #[error(transparent)]
    Write(#[from] ferry_host::WriteError),
    /// An export was asked for the drifting devices, and none drifts.
    #[error("no device is drifting (in windows of the last {max_age_s} s)")]
    NoDriftingDevices { max_age_s: u64 },
}

impl RetrainError {
    /// A stable code for logs and API answers.
    pub fn code(&self) -> &'static str {
        match self {
            RetrainError::Invalid(_) => "invalid",
            RetrainError::Store(e) => e.code(),
            RetrainError::Io { .. } => "io",
            RetrainError::Write(e) => e.code(),
            RetrainError::NoDriftingDevices { .. } => "no_drifting_devices",
        }
    }

    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RetrainError {
        let path = path.to_path_buf();
        move |source| RetrainError::Io { what, path, source }
    }
}

/// One feature over the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureShare {
    pub name: String,
    /// Weight of the devices drifting on it over the weight of every device
    /// with a recent window (0 to 1).
    pub share: f64,
    /// Weight (requests of the last hour, at least 1 per device) of the
    /// devices drifting on it.
    pub weight: f64,
    /// Devices whose latest window flags it drifted, sorted.
    pub devices: Vec<String>,
    /// The statistic of the verdict (`psi`, `ks`, ...), from the device with
    /// the largest value.
    pub method: String,
    /// The largest value of that statistic among the drifting devices.
    pub max_value: Option<f64>,
    /// The largest PSI among the drifting devices.
    pub max_psi: Option<f64>,
}

/// Drift over the fleet at one moment. See the module header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetDrift {
    pub now_ms: u64,
    pub max_age_ms: u64,
    /// Devices whose latest window is recent.
    pub devices: usize,
    /// Their total weight.
    pub weight: f64,
    /// Every feature of their windows, the largest share first (ties by name).
    pub features: Vec<FeatureShare>,
}

/// A device's weight: its requests of the last hour, at least 1.
pub fn weight(d: &DeviceState, now_ms: u64) -> f64 {
    d.rate(now_ms, TRAFFIC_WINDOW_MS).requests.max(1) as f64
}

/// The latest window of `d`, if it is at most `max_age_ms` old.
fn recent_window(d: &DeviceState, now_ms: u64, max_age_ms: u64) -> Option<&DriftRecord> {
    d.drift
        .as_ref()
        .filter(|w| now_ms.saturating_sub(w.ts_ms) <= max_age_ms)
}

/// Aggregates the latest drift windows of `devices`.
pub fn aggregate(devices: &[DeviceState], now_ms: u64, max_age_ms: u64) -> FleetDrift {
    let mut total = 0.0;
    let mut counted = 0;
    let mut features: BTreeMap<&str, FeatureShare> = BTreeMap::new();
    for d in devices {
        let Some(window) = recent_window(d, now_ms, max_age_ms) else {
            continue;
        };
        let w = weight(d, now_ms);
        total += w;
        counted += 1;
        for f in &window.features {
            let entry = features.entry(&f.name).or_insert_with(|| FeatureShare {
                name: f.name.clone(),
                share: 0.0,
                weight: 0.0,
                devices: Vec::new(),
                method: f.method.clone(),
                max_value: None,
                max_psi: None,
            });
            if !f.drifted {
                continue;
            }
            entry.weight += w;
            entry.devices.push(d.device.clone());
            if let Some(v) = f.value
                && entry.max_value.is_none_or(|m| v > m)
            {
                entry.max_value = Some(v);
                entry.method = f.method.clone();
            }
            if let Some(p) = f.psi {
                entry.max_psi = Some(entry.max_psi.map_or(p, |m| m.max(p)));
            }
        }
    }
    let mut features: Vec<FeatureShare> = features
        .into_values()
        .map(|mut f| {
            f.share = if total > 0.0 { f.weight / total } else { 0.0 };
            f.devices.sort();
            f
        })
        .collect();
    features.sort_by(|a, b| b.share.total_cmp(&a.share).then(a.name.cmp(&b.name)));
    FleetDrift {
        now_ms,
        max_age_ms,
        devices: counted,
        weight: total,
        features,
    }
}

/// `share>X` or `share>=X`, X a fraction (`0.3`) or a percentage (`30%`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// As written.
    pub text: String,
    /// `>=` rather than `>`.
    pub inclusive: bool,
    pub threshold: f64,
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Rule, String> {
        let text = s.trim();
        let usage = || format!("{text:?} is not a retraining rule (e.g. share>=30% or share>0.3)");
        let rest = text.strip_prefix("share").ok_or_else(usage)?.trim_start();
        let (inclusive, value) = if let Some(v) = rest.strip_prefix(">=") {
            (true, v)
        } else if let Some(v) = rest.strip_prefix('>') {
            (false, v)
        } else {
            return Err(usage());
        };
        let value = value.trim();
        let threshold = match value.strip_suffix('%') {
            Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
            None => value.parse::<f64>(),
        }
        .map_err(|_| usage())?;
        if !(0.0..=1.0).contains(&threshold) {
            return Err(format!("{text:?}: the share must be within 0% and 100%"));
        }
        Ok(Rule {
            text: text.to_string(),
            inclusive,
            threshold,
        })
    }
}

impl Rule {
    /// Whether `share` passes.
    pub fn passes(&self, share: f64) -> bool {
        if self.inclusive {
            share >= self.threshold
        } else {
            share > self.threshold
        }
    }

    /// The features of `fleet` the rule holds for: share passes, at least
    /// `min_devices` (and at least one) drifting devices.
    pub fn firing(&self, fleet: &FleetDrift, min_devices: usize) -> Vec<FeatureShare> {
        fleet
            .features
            .iter()
            .filter(|f| f.devices.len() >= min_devices.max(1) && self.passes(f.share))
            .cloned()
            .collect()
    }
}

/// Where an episode's hook is. Do not rename or remove variants or fields;
/// add new ones with defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HookState {
    /// Opened; the data set is not written yet.
    Pending,
    /// Data set written, hook started (a console that finds this at start
    /// stopped during the hook: see `Interrupted`).
    Running { started_ms: u64 },
    /// The hook succeeded.
    Ok { finished_ms: u64, detail: String },
    /// The hook failed (exit status, timeout, HTTP status), after retries.
    Failed { finished_ms: u64, error: String },
    /// The console stopped while the hook ran; it is not called again.
    Interrupted { noticed_ms: u64 },
    /// No hook is configured: the data set and request were written.
    NoHook,
    /// The data set could not be written (disk): the hook was not called.
    Error { error: String },
}

/// One retraining episode, stored as JSON by the store
/// ([`Store::save_episode`]). Do not rename or remove fields; add new ones
/// with `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    /// `rt-<unix ms, 13 digits>`: sorts by time.
    pub id: String,
    pub started_ms: u64,
    pub rule: String,
    /// The features the rule held for when it fired.
    pub features: Vec<FeatureShare>,
    /// Their drifting devices (the data set's devices), sorted.
    pub devices: Vec<String>,
    pub hook: HookState,
    /// Rows in the data set.
    #[serde(default)]
    pub rows: u64,
    /// The episode's directory (request.json, samples.csv), once written.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Since when the rule has not held (the episode ends after `calm_ms`).
    #[serde(default)]
    pub calm_since_ms: Option<u64>,
    #[serde(default)]
    pub ended_ms: Option<u64>,
}

/// What [`advance`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing to persist.
    None,
    /// A new episode opened: it must fire.
    Opened,
    /// The open episode changed (calm began or was broken).
    Changed,
    /// The open episode ended (it is returned, no longer current).
    Ended,
}

/// The episode state machine, without I/O: given the open episode (if any)
/// and the features the rule holds for now, opens, keeps or ends episodes.
/// On `Ended`, `current` is `None` and the ended episode is returned.
pub fn advance(
    current: &mut Option<Episode>,
    firing: Vec<FeatureShare>,
    rule: &Rule,
    now_ms: u64,
    calm_ms: u64,
) -> (Transition, Option<Episode>) {
    match current {
        None if firing.is_empty() => (Transition::None, None),
        None => {
            let devices: BTreeSet<String> = firing
                .iter()
                .flat_map(|f| f.devices.iter().cloned())
                .collect();
            *current = Some(Episode {
                id: format!("rt-{now_ms:013}"),
                started_ms: now_ms,
                rule: rule.text.clone(),
                features: firing,
                devices: devices.into_iter().collect(),
                hook: HookState::Pending,
                rows: 0,
                dir: None,
                calm_since_ms: None,
                ended_ms: None,
            });
            (Transition::Opened, None)
        }
        Some(e) if !firing.is_empty() => {
            if e.calm_since_ms.take().is_some() {
                (Transition::Changed, None)
            } else {
                (Transition::None, None)
            }
        }
        Some(e) => match e.calm_since_ms {
            None => {
                e.calm_since_ms = Some(now_ms);
                (Transition::Changed, None)
            }
            Some(since) if now_ms.saturating_sub(since) >= calm_ms => {
                let mut ended = current.take().expect("matched Some");
                ended.ended_ms = Some(now_ms);
                (Transition::Ended, Some(ended))
            }
            Some(_) => (Transition::None, None),
        },
    }
}

/// A device of a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestDevice {
    pub device: String,
    /// The bundle it runs.
    pub bundle: Option<BundleRef>,
    /// Its latest drift window: per feature statistic, threshold, verdict.
    pub drift: Option<DriftRecord>,
    /// Its rows in the data set.
    pub rows: u64,
    /// Its older samples left out by the per-device cap
    /// ([`Options::max_samples_per_device`]).
    #[serde(default)]
    pub dropped: u64,
}

/// A device whose report is not believed: it claims a release sequence
/// beyond the highest the release registry holds for its channel (a forged
/// or corrupted status). It has no say in fleet drift, and its samples stay
/// out of the data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlaggedDevice {
    pub device: String,
    pub reason: String,
}

/// `request.json`: what a retraining pipeline is asked to do. Schema
/// [`REQUEST_SCHEMA`]: do not rename or remove fields; add new ones at the
/// end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub schema: u32,
    /// The episode (absent for an export on demand).
    pub episode: Option<String>,
    pub created_ms: u64,
    pub fleet: String,
    pub rule: String,
    /// The features that drifted, with their fleet share and statistics.
    pub features: Vec<FeatureShare>,
    pub devices: Vec<RequestDevice>,
    /// The bundles the devices run (distinct by digest): the models to
    /// retrain.
    pub bundles: Vec<BundleRef>,
    /// Data rows in the CSV.
    pub rows: u64,
    /// The CSV's path.
    pub samples_csv: String,
    /// Devices left out because their reports are not believed.
    #[serde(default)]
    pub flagged: Vec<FlaggedDevice>,
}

/// The data set: a CSV of `rows` (device, sample). Returns the text and the
/// number of data rows.
pub fn samples_csv(rows: &[(String, SampleRecord)]) -> String {
    let names: BTreeSet<&str> = rows
        .iter()
        .flat_map(|(_, s)| s.features.keys().map(String::as_str))
        .collect();
    let mut out = String::new();
    let mut header = vec!["device", "ts_ms", "bundle_version"];
    header.extend(names.iter().copied());
    header.extend(["top1", "score"]);
    push_row(&mut out, header.iter().map(|h| h.to_string()));
    for (device, s) in rows {
        let mut cells = vec![
            device.clone(),
            s.ts_ms.to_string(),
            s.bundle_version.clone(),
        ];
        cells.extend(
            names
                .iter()
                .map(|n| s.features.get(*n).map_or(String::new(), cell)),
        );
        cells.push(s.output.top1.map_or(String::new(), |v| v.to_string()));
        cells.push(s.output.score.map_or(String::new(), |v| v.to_string()));
        push_row(&mut out, cells.into_iter());
    }
    out
}

/// One feature value as a CSV cell: numbers and strings as they are,
/// `null` empty, anything else as JSON.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

fn push_row(out: &mut String, cells: impl Iterator<Item = String>) {
    for (i, c) in cells.enumerate() {
        if i > 0 {
            out.push(',');
        }
        if c.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&c.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(&c);
        }
    }
    out.push('\n');
}

/// Splits `"<program> [args]"` into words: whitespace separates, single
/// quotes keep everything, double quotes keep everything but `\"` and
/// `\\`, a backslash outside quotes escapes the next character. No
/// variables, globs or pipes: the result is run directly, never by a shell.
pub fn split_command(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err(format!("unclosed ' in {s:?}")),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err(format!("unclosed \" in {s:?}")),
                        },
                        Some(c) => w.push(c),
                        None => return Err(format!("unclosed \" in {s:?}")),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err(format!("{s:?} ends with a backslash")),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    if words.is_empty() {
        return Err("the hook command is empty".into());
    }
    Ok(words)
}

/// What is called when an episode fires.
#[derive(Debug, Clone, PartialEq)]
pub enum Hook {
    None,
    /// A program and its arguments (the request's path is added last).
    Command {
        program: String,
        args: Vec<String>,
    },
    /// A URL the request is POSTed to.
    Webhook {
        url: String,
    },
}

impl Hook {
    /// From `--retrain-hook-cmd`.
    pub fn command(line: &str) -> Result<Hook, RetrainError> {
        let mut words = split_command(line).map_err(RetrainError::Invalid)?;
        let program = words.remove(0);
        Ok(Hook::Command {
            program,
            args: words,
        })
    }

    /// From `--retrain-webhook`.
    pub fn webhook(url: &str) -> Result<Hook, RetrainError> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(RetrainError::Invalid(format!(
                "--retrain-webhook {url:?} must be an http:// or https:// URL"
            )));
        }
        Ok(Hook::Webhook {
            url: url.to_string(),
        })
    }

    /// `none`, `command` or `webhook`.
    pub fn kind(&self) -> &'static str {
        match self {
            Hook::None => "none",
            Hook::Command { .. } => "command",
            Hook::Webhook { .. } => "webhook",
        }
    }
}

/// How the loop is configured (`serve --retrain-*`).
#[derive(Debug, Clone)]
pub struct Options {
    pub rule: Rule,
    /// Devices that must drift on a feature for the rule to hold.
    pub min_devices: usize,
    /// Windows older than this do not count.
    pub max_age_ms: u64,
    /// How long the rule must not hold for an episode to end.
    pub calm_ms: u64,
    /// Time between an episode opening and its data set and hook: the
    /// samples of a drifting window travel on their own topic and may reach
    /// the console a little after the window's drift record.
    pub settle_ms: u64,
    pub hook: Hook,
    /// Limit on a hook command's run, and on each webhook attempt.
    pub hook_timeout: Duration,
    /// Samples one device contributes to a data set at most (its most
    /// recent): one device, however chatty or hostile, cannot make the
    /// training set its own.
    pub max_samples_per_device: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            rule: DEFAULT_RULE.parse().expect("the default rule parses"),
            min_devices: 1,
            max_age_ms: 3_600_000,
            calm_ms: 10 * 60_000,
            settle_ms: 0,
            hook: Hook::None,
            hook_timeout: Duration::from_secs(300),
            max_samples_per_device: DEFAULT_MAX_SAMPLES_PER_DEVICE,
        }
    }
}

/// One line of `retrain/log.jsonl`. Do not rename or remove fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub ts_ms: u64,
    pub episode: String,
    /// `opened`, `data_set`, `hook_ok`, `hook_failed`, `interrupted`,
    /// `ended`, `error`.
    pub what: String,
    pub detail: String,
}

/// The retraining loop of one console.
pub struct Retrainer {
    store: Arc<Store>,
    dir: PathBuf,
    options: Options,
    /// The open episode, as last saved.
    current: Mutex<Option<Episode>>,
    /// Serialises ticks (a tick may run a hook for minutes; readers of
    /// `current` do not wait for it).
    ticking: Mutex<()>,
    log_lock: Mutex<()>,
}

impl Retrainer {
    /// Loads the episodes (kept by `store`); the data sets go under
    /// `state_dir/retrain`. An episode whose hook was running is recorded as
    /// interrupted (never called again).
    pub fn open(
        state_dir: &Path,
        store: Arc<Store>,
        options: Options,
    ) -> Result<Retrainer, RetrainError> {
        let dir = state_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(RetrainError::io("create", &dir))?;
        let r = Retrainer {
            store,
            dir,
            options,
            current: Mutex::new(None),
            ticking: Mutex::new(()),
            log_lock: Mutex::new(()),
        };
        let open = r.episodes()?.into_iter().rfind(|e| e.ended_ms.is_none());
        if let Some(mut e) = open {
            if let HookState::Running { .. } = e.hook {
                let now = now_ms();
                e.hook = HookState::Interrupted { noticed_ms: now };
                r.save(&e)?;
                r.log(
                    &e.id,
                    "interrupted",
                    "the console stopped while the hook ran; it is not called again".into(),
                )?;
            }
            tracing::info!(episode = %e.id, features = ?names(&e.features), "Retraining episode still open");
            *r.current.lock().unwrap() = Some(e);
        }
        Ok(r)
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Fleet drift now.
    pub fn fleet_drift(&self, now_ms: u64) -> FleetDrift {
        let (believed, _) = self.believed_devices();
        aggregate(&believed, now_ms, self.options.max_age_ms)
    }

    /// The devices whose reports are believed, and those flagged (see
    /// [`FlaggedDevice`]): a reported sequence above the highest the
    /// release registry holds for the device's fleet and channel. A channel
    /// the registry has never seen flags nobody (its releases reached the
    /// devices some other way, e.g. a channel directory).
    pub fn believed_devices(&self) -> (Vec<DeviceState>, Vec<FlaggedDevice>) {
        let records: Vec<crate::releases::ReleaseRecord> =
            self.store.releases().unwrap_or_else(|e| {
                tracing::error!(error = %e, "Cannot read the release registry");
                Vec::new()
            });
        let mut believed = Vec::new();
        let mut flagged = Vec::new();
        for d in self.store.devices() {
            let claim = d.bundle.as_ref().and_then(|b| {
                let highest = crate::releases::highest_sequence(&records, &b.fleet, &b.channel)?;
                (b.sequence > highest).then(|| {
                    format!(
                        "reports sequence {} on {}/{}, beyond the registry's highest {highest}",
                        b.sequence, b.fleet, b.channel
                    )
                })
            });
            match claim {
                Some(reason) => flagged.push(FlaggedDevice {
                    device: d.device.clone(),
                    reason,
                }),
                None => believed.push(d),
            }
        }
        (believed, flagged)
    }

    /// Every episode, oldest first.
    pub fn episodes(&self) -> Result<Vec<Episode>, RetrainError> {
        Ok(self.store.episodes()?)
    }

    /// The open episode.
    pub fn current(&self) -> Option<Episode> {
        self.current.lock().unwrap().clone()
    }

    /// The log, oldest first (a torn last line is skipped).
    pub fn log_entries(&self) -> Result<Vec<LogEntry>, RetrainError> {
        let path = self.dir.join("log.jsonl");
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(t
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(RetrainError::io("read", &path)(e)),
        }
    }

    /// Evaluates the rule and moves the episode on; fires a new episode
    /// (blocking: writes files and runs the hook up to its timeout).
    pub fn tick(&self, now_ms: u64) -> Result<(), RetrainError> {
        let _ticking = self.ticking.lock().unwrap();
        let mut current = self.current();
        let fleet = self.fleet_drift(now_ms);
        let firing = self.options.rule.firing(&fleet, self.options.min_devices);
        let (transition, ended) = advance(
            &mut current,
            firing,
            &self.options.rule,
            now_ms,
            self.options.calm_ms,
        );
        match transition {
            Transition::None => {}
            Transition::Opened => {
                let e = current.as_ref().expect("opened");
                self.save(e)?;
                let detail = e
                    .features
                    .iter()
                    .map(|f| format!("{} on {:.0}% of traffic", f.name, f.share * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ");
                tracing::warn!(episode = %e.id, devices = ?e.devices, "Retraining triggered: {detail}");
                self.log(&e.id, "opened", format!("{} holds: {detail}", e.rule))?;
            }
            Transition::Changed => self.save(current.as_ref().expect("changed"))?,
            Transition::Ended => {
                let e = ended.expect("ended");
                self.save(&e)?;
                tracing::info!(episode = %e.id, "Retraining episode ended");
                self.log(
                    &e.id,
                    "ended",
                    format!(
                        "{} has not held for {} s",
                        e.rule,
                        self.options.calm_ms / 1000
                    ),
                )?;
            }
        }
        if let Some(mut e) = current
            && e.hook == HookState::Pending
            && now_ms >= e.started_ms.saturating_add(self.options.settle_ms)
        {
            self.fire(&mut e, now_ms)?;
        }
        Ok(())
    }

    /// Writes the episode's data set and request, then calls the hook.
    fn fire(&self, e: &mut Episode, now_ms: u64) -> Result<(), RetrainError> {
        let dir = self.dir.join(&e.id);
        let written = (|| -> Result<(PathBuf, u64), RetrainError> {
            std::fs::create_dir_all(&dir).map_err(RetrainError::io("create", &dir))?;
            let csv_path = dir.join("samples.csv");
            let (request, csv) = self.request(
                e.features.clone(),
                &e.devices,
                Some(e.id.clone()),
                now_ms,
                &csv_path.display().to_string(),
            );
            ferry_host::write_durably(&csv_path, csv.as_bytes())?;
            let request_path = dir.join("request.json");
            ferry_host::write_durably(
                &request_path,
                &serde_json::to_vec_pretty(&request).expect("requests serialise"),
            )?;
            Ok((request_path, request.rows))
        })();
        let (request_path, rows) = match written {
            Ok(w) => w,
            Err(error) => {
                let error = error.to_string();
                tracing::error!(episode = %e.id, %error, "Cannot write the retraining data set");
                e.hook = HookState::Error {
                    error: error.clone(),
                };
                self.save(e)?;
                return self.log(&e.id, "error", error);
            }
        };
        e.rows = rows;
        e.dir = Some(dir.clone());
        self.log(
            &e.id,
            "data_set",
            format!(
                "{rows} rows from {} in {}",
                e.devices.join(", "),
                dir.display()
            ),
        )?;
        if self.options.hook == Hook::None {
            e.hook = HookState::NoHook;
            return self.save(e);
        }
        e.hook = HookState::Running {
            started_ms: ferry_host::now_ms(),
        };
        self.save(e)?;
        let outcome = match &self.options.hook {
            Hook::None => unreachable!("handled above"),
            Hook::Command { program, args } => {
                run_command(program, args, &request_path, self.options.hook_timeout)
            }
            Hook::Webhook { url } => post_webhook(url, &request_path, self.options.hook_timeout),
        };
        let finished_ms = ferry_host::now_ms();
        match outcome {
            Ok(detail) => {
                tracing::info!(episode = %e.id, hook = self.options.hook.kind(), %detail, "Retraining hook succeeded");
                self.log(&e.id, "hook_ok", detail.clone())?;
                e.hook = HookState::Ok {
                    finished_ms,
                    detail,
                };
            }
            Err(error) => {
                tracing::error!(episode = %e.id, hook = self.options.hook.kind(), %error, "Retraining hook failed");
                self.log(&e.id, "hook_failed", error.clone())?;
                e.hook = HookState::Failed { finished_ms, error };
            }
        }
        self.save(e)
    }

    /// The devices drifting now: those of the features the rule holds for,
    /// else those drifting on any feature (what an export takes by default).
    pub fn drifting_devices(&self, fleet: &FleetDrift) -> Vec<String> {
        let firing = self.options.rule.firing(fleet, self.options.min_devices);
        let pick = if firing.is_empty() {
            fleet.features.clone()
        } else {
            firing
        };
        let set: BTreeSet<String> = pick.into_iter().flat_map(|f| f.devices).collect();
        set.into_iter().collect()
    }

    /// A request for `devices` (and the data set's CSV text), with the
    /// `features` given, or when empty every feature one of them drifts on.
    pub fn request(
        &self,
        features: Vec<FeatureShare>,
        devices: &[String],
        episode: Option<String>,
        now_ms: u64,
        samples_csv_path: &str,
    ) -> (Request, String) {
        let features = if features.is_empty() {
            self.fleet_drift(now_ms)
                .features
                .into_iter()
                .filter(|f| f.devices.iter().any(|d| devices.contains(d)))
                .collect()
        } else {
            features
        };
        let mut rows = Vec::new();
        let mut per_device = Vec::new();
        let mut bundles: Vec<BundleRef> = Vec::new();
        let mut fleet = String::new();
        let (_, all_flagged) = self.believed_devices();
        let flagged: Vec<FlaggedDevice> = all_flagged
            .into_iter()
            .filter(|f| devices.contains(&f.device))
            .collect();
        for device in devices {
            if flagged.iter().any(|f| &f.device == device) {
                continue;
            }
            let state = self.store.device(device);
            let mut samples = self.store.samples(device);
            // The most recent ones (the store keeps them oldest first).
            let dropped = samples
                .len()
                .saturating_sub(self.options.max_samples_per_device);
            samples.drain(..dropped);
            if let Some(b) = state.as_ref().and_then(|s| s.bundle.clone())
                && !bundles.iter().any(|x| x.digest == b.digest)
            {
                bundles.push(b);
            }
            if fleet.is_empty()
                && let Some(s) = &state
            {
                fleet = s.fleet.clone();
            }
            per_device.push(RequestDevice {
                device: device.clone(),
                bundle: state.as_ref().and_then(|s| s.bundle.clone()),
                drift: state.and_then(|s| s.drift),
                rows: samples.len() as u64,
                dropped: dropped as u64,
            });
            rows.extend(samples.into_iter().map(|s| (device.clone(), s)));
        }
        let csv = samples_csv(&rows);
        let request = Request {
            schema: REQUEST_SCHEMA,
            episode,
            created_ms: now_ms,
            fleet,
            rule: self.options.rule.text.clone(),
            features,
            devices: per_device,
            bundles,
            rows: rows.len() as u64,
            samples_csv: samples_csv_path.to_string(),
            flagged,
        };
        (request, csv)
    }

    /// Persists `e` (flushed before this returns) and makes it the open
    /// episode, or none if it ended.
    fn save(&self, e: &Episode) -> Result<(), RetrainError> {
        self.store.save_episode(&e.id, e)?;
        let mut current = self.current.lock().unwrap();
        if e.ended_ms.is_none() {
            *current = Some(e.clone());
        } else if current.as_ref().is_some_and(|c| c.id == e.id) {
            *current = None;
        }
        Ok(())
    }

    fn log(&self, episode: &str, what: &str, detail: String) -> Result<(), RetrainError> {
        let entry = LogEntry {
            ts_ms: now_ms(),
            episode: episode.to_string(),
            what: what.to_string(),
            detail,
        };
        let _guard = self.log_lock.lock().unwrap();
        let path = self.dir.join("log.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(RetrainError::io("open", &path))?;
        let mut line = serde_json::to_vec(&entry).expect("log entries serialise");
        line.push(b'\n');
        f.write_all(&line)
            .and_then(|()| f.sync_data())
            .map_err(RetrainError::io("append to", &path))
    }
}

fn names(features: &[FeatureShare]) -> Vec<&str> {
    features.iter().map(|f| f.name.as_str()).collect()
}

/// The last [`MAX_HOOK_OUTPUT`] bytes of `bytes`, as text.
fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(MAX_HOOK_OUTPUT);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// Runs the hook command; `Ok` with its output when it exits 0 in time.
fn run_command(
    program: &str,
    args: &[String],
    request: &Path,
    timeout: Duration,
) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .arg(request)
        .env("FERRY_RETRAIN_REQUEST", request)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    // Both pipes are drained while the child runs (a full pipe would stop it).
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped")));
    let err = read(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| format!("cannot wait for {program}: {e}"))?
        {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // A grandchild holding the pipes open must not hang the console: the
    // readers are joined only once they finished.
    let collect = |h: std::thread::JoinHandle<Vec<u8>>| {
        let until = Instant::now() + Duration::from_secs(1);
        while !h.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if h.is_finished() {
            tail(&h.join().unwrap_or_default())
        } else {
            String::new()
        }
    };
    let (stdout, stderr) = (collect(out), collect(err));
    let output = match (stdout.is_empty(), stderr.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!("; stdout: {stdout}"),
        (true, false) => format!("; stderr: {stderr}"),
        (false, false) => format!("; stdout: {stdout}; stderr: {stderr}"),
    };
    match status {
        None => Err(format!(
            "{program} did not finish within {} s and was killed{output}",
            timeout.as_secs_f64()
        )),
        Some(s) if s.success() => Ok(format!("{program} exited 0{output}")),
        Some(s) => Err(format!("{program} failed ({s}){output}")),
    }
}

/// POSTs the request to `url`, retrying transient failures.
fn post_webhook(url: &str, request: &Path, timeout: Duration) -> Result<String, String> {
    let body =
        std::fs::read(request).map_err(|e| format!("cannot read {}: {e}", request.display()))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into();
    let mut backoff = WEBHOOK_BACKOFF;
    let mut last = "no attempt".to_string();
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        if attempt > 1 {
            std::thread::sleep(backoff);
            backoff *= 2;
        }
        match agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(&body[..])
        {
            Ok(mut r) => {
                let status = r.status().as_u16();
                let text = r
                    .body_mut()
                    .with_config()
                    .limit(MAX_HOOK_OUTPUT as u64)
                    .read_to_string()
                    .unwrap_or_default();
                if (200..300).contains(&status) {
                    return Ok(format!(
                        "{url} answered {status} (attempt {attempt}): {}",
                        text.trim()
                    ));
                }
                last = format!("{url} answered {status}: {}", text.trim());
                if !(status == 408 || status == 429 || status >= 500) {
                    break;
                }
            }
            Err(e) => last = format!("cannot reach {url}: {e}"),
        }
        tracing::warn!(url, attempt, error = %last, "Retraining webhook attempt failed");
    }
    Err(last)
}

/// The JSON of `GET /api/fleet-drift`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetDriftView {
    #[serde(flatten)]
    pub drift: FleetDrift,
    pub rule: String,
    pub min_devices: usize,
    /// The features the rule holds for now.
    pub firing: Vec<String>,
    /// Devices whose reports are not believed (not counted above).
    #[serde(default)]
    pub flagged: Vec<FlaggedDevice>,
}

/// The JSON of `GET /api/retrain`: the loop's settings, the open episode,
/// every episode and the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Overview {
    pub rule: String,
    pub min_devices: usize,
    /// `none`, `command` or `webhook`.
    pub hook: String,
    pub current: Option<Episode>,
    pub episodes: Vec<Episode>,
    pub log: Vec<LogEntry>,
}

/// Header of `GET /api/retrain/export` with the number of data rows.
pub const ROWS_HEADER: &str = "x-ferry-rows";

impl Retrainer {
    /// [`FleetDriftView`] now.
    pub fn fleet_drift_view(&self, now_ms: u64) -> FleetDriftView {
        let drift = self.fleet_drift(now_ms);
        let firing = names(&self.options.rule.firing(&drift, self.options.min_devices))
            .into_iter()
            .map(str::to_string)
            .collect();
        FleetDriftView {
            drift,
            rule: self.options.rule.text.clone(),
            min_devices: self.options.min_devices,
            firing,
            flagged: self.believed_devices().1,
        }
    }

    /// [`Overview`] now.
    pub fn overview(&self) -> Result<Overview, RetrainError> {
        Ok(Overview {
            rule: self.options.rule.text.clone(),
            min_devices: self.options.min_devices,
            hook: self.options.hook.kind().to_string(),
            current: self.current(),
            episodes: self.episodes()?,
            log: self.log_entries()?,
        })
    }

    /// The devices of an export: those of the comma-separated `devices`
    /// when it names any, else the drifting ones (none is an error).
    pub fn export_devices(
        &self,
        devices: Option<&str>,
        now_ms: u64,
    ) -> Result<Vec<String>, RetrainError> {
        let devices: Vec<String> = match devices {
            Some(list) if !list.trim().is_empty() => list
                .split(',')
                .map(|d| d.trim().to_string())
                .filter(|d| !d.is_empty())
                .collect(),
            _ => self.drifting_devices(&self.fleet_drift(now_ms)),
        };
        if devices.is_empty() {
            return Err(RetrainError::NoDriftingDevices {
                max_age_s: self.options.max_age_ms / 1000,
            });
        }
        Ok(devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RateBucket;
    use ferry_protocol::{FeatureDrift, OutputSummary};

    const NOW: u64 = 1_700_000_000_000;

    fn feature(name: &str, drifted: bool, value: f64) -> FeatureDrift {
        FeatureDrift {
            name: name.into(),
            kind: "numeric".into(),
            method: "psi".into(),
            value: Some(value),
            threshold: 0.2,
            drifted,
            psi: Some(value),
            rows: 200,
            missing: 0,
        }
    }

    /// A device with `requests` in the last hour and a window `age_ms` old
    /// that flags `drifted` (of features a, b).
    fn device(id: &str, requests: u64, age_ms: u64, drifted: &[(&str, f64)]) -> DeviceState {
        let features = ["a", "b"]
            .iter()
            .map(|n| match drifted.iter().find(|(d, _)| d == n) {
                Some((_, v)) => feature(n, true, *v),
                None => feature(n, false, 0.01),
            })
            .collect();
        DeviceState {
            device: id.into(),
            fleet: "f".into(),
            rates: vec![RateBucket {
                start_ms: NOW - NOW % 60_000,
                predictions: requests,
                ..RateBucket::default()
            }],
            drift: Some(DriftRecord {
                id: 1,
                ts_ms: NOW - age_ms,
                bundle_version: "1.0.0".into(),
                bundle_digest: "ab".into(),
                window_start_ms: 0,
                rows: 200,
                features,
                drifted_features: drifted.len() as u32,
                share: 0.0,
                dataset_drifted: false,
            }),
            ..DeviceState::default()
        }
    }

    #[test]
    fn shares_are_weighted_by_traffic_and_old_windows_do_not_count() {
        let devices = [
            device("busy", 60, 1000, &[("a", 0.5)]),
            device("quiet", 0, 1000, &[("a", 0.9), ("b", 0.3)]),
            device("calm", 39, 1000, &[]),
            device("stale", 1000, 7_200_000, &[("a", 2.0), ("b", 2.0)]),
            DeviceState {
                device: "silent".into(),
                ..DeviceState::default()
            },
        ];
        let f = aggregate(&devices, NOW, 3_600_000);
        assert_eq!(f.devices, 3);
        // 60 + 1 (at least one) + 39.
        assert_eq!(f.weight, 100.0);
        let a = &f.features[0];
        assert_eq!(a.name, "a");
        assert!((a.share - 0.61).abs() < 1e-9, "{a:?}");
        assert_eq!(a.devices, ["busy", "quiet"]);
        assert_eq!(a.max_value, Some(0.9));
        assert_eq!(a.max_psi, Some(0.9));
        let b = &f.features[1];
        assert_eq!((b.name.as_str(), b.devices.len()), ("b", 1));
        assert!((b.share - 0.01).abs() < 1e-9, "{b:?}");
        // Nothing recent: nothing counts, nothing divides by zero.
        let none = aggregate(&devices, NOW + 10 * 3_600_000, 3_600_000);
        assert_eq!((none.devices, none.weight), (0, 0.0));
        assert!(none.features.is_empty());
    }

    #[test]
    fn rules_parse_and_hold() {
        let r: Rule = "share>0.3".parse().unwrap();
        assert!(!r.inclusive && r.threshold == 0.3);
        assert!(r.passes(0.31) && !r.passes(0.3));
        let r: Rule = " share >= 30% ".parse().unwrap();
        assert!(r.inclusive && (r.threshold - 0.3).abs() < 1e-12);
        assert!(r.passes(0.3));
        assert_eq!(r.text, "share >= 30%");
        for bad in [
            "",
            "share",
            "share<0.3",
            "psi>0.3",
            "share>x",
            "share>150%",
            "share>-1",
        ] {
            let e = bad.parse::<Rule>().unwrap_err();
            assert!(e.contains("share"), "{bad}: {e}");
        }
        let devices = [
            device("d1", 10, 0, &[("a", 0.5)]),
            device("d2", 10, 0, &[]),
            device("d3", 10, 0, &[]),
        ];
        let f = aggregate(&devices, NOW, 60_000);
        let r: Rule = DEFAULT_RULE.parse().unwrap();
        assert_eq!(names(&r.firing(&f, 1)), ["a"]);
        assert!(r.firing(&f, 2).is_empty(), "one device is not two");
        assert!(
            "share>=34%"
                .parse::<Rule>()
                .unwrap()
                .firing(&f, 1)
                .is_empty()
        );
        // share>=0 never fires on a feature nobody drifts on.
        let zero: Rule = "share>=0".parse().unwrap();
        assert_eq!(names(&zero.firing(&f, 0)), ["a"]);
    }

    #[test]
    fn an_episode_opens_once_and_ends_after_a_calm_period() {
        let rule: Rule = DEFAULT_RULE.parse().unwrap();
        let hot = aggregate(&[device("d1", 1, 0, &[("a", 0.5)])], NOW, 60_000);
        let firing = || rule.firing(&hot, 1);
        let mut current = None;
        assert_eq!(
            advance(&mut current, vec![], &rule, NOW, 1000).0,
            Transition::None
        );
        assert_eq!(
            advance(&mut current, firing(), &rule, NOW, 1000).0,
            Transition::Opened
        );
        let e = current.clone().unwrap();
        assert_eq!((e.id.as_str(), e.devices.len()), ("rt-1700000000000", 1));
        assert_eq!(e.hook, HookState::Pending);
        // Still firing: nothing new.
        assert_eq!(
            advance(&mut current, firing(), &rule, NOW + 1, 1000).0,
            Transition::None
        );
        // Calm begins, is broken, begins again, and lasts.
        assert_eq!(
            advance(&mut current, vec![], &rule, NOW + 2, 1000).0,
            Transition::Changed
        );
        assert_eq!(
            advance(&mut current, vec![], &rule, NOW + 500, 1000).0,
            Transition::None
        );
        assert_eq!(
            advance(&mut current, firing(), &rule, NOW + 600, 1000).0,
            Transition::Changed
        );
        assert_eq!(current.as_ref().unwrap().calm_since_ms, None);
        assert_eq!(
            advance(&mut current, vec![], &rule, NOW + 700, 1000).0,
            Transition::Changed
        );
        let (t, ended) = advance(&mut current, vec![], &rule, NOW + 1700, 1000);
        assert_eq!(t, Transition::Ended);
        assert_eq!(ended.unwrap().ended_ms, Some(NOW + 1700));
        assert!(current.is_none());
        // The next time it holds is a new episode.
        assert_eq!(
            advance(&mut current, firing(), &rule, NOW + 1800, 1000).0,
            Transition::Opened
        );
        assert_eq!(current.unwrap().id, "rt-1700000001800");
    }

    #[test]
    fn the_csv_has_the_union_of_features_and_escapes() {
        let s = |id, features: &[(&str, Value)], top1| SampleRecord {
            id,
            ts_ms: 10 + id,
            bundle_version: "1.0.0".into(),
            features: features
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            content_type: None,
            raw_base64: None,
            output: OutputSummary {
                top1,
                score: top1.map(|_| 0.75),
                value: None,
            },
        };
        let rows = vec![
            (
                "d1".to_string(),
                s(1, &[("x", 1.5.into()), ("c", "a,\"b\"".into())], Some(2)),
            ),
            (
                "d2".to_string(),
                s(2, &[("y", Value::Null), ("x", 2.into())], None),
            ),
        ];
        let csv = samples_csv(&rows);
        assert_eq!(
            csv,
            "device,ts_ms,bundle_version,c,x,y,top1,score\n\
             d1,11,1.0.0,\"a,\"\"b\"\"\",1.5,,2,0.75\n\
             d2,12,1.0.0,,2,,,\n"
        );
        assert_eq!(samples_csv(&[]), "device,ts_ms,bundle_version,top1,score\n");
    }

    #[test]
    fn hook_commands_split_like_words_without_a_shell() {
        assert_eq!(
            split_command(r#"/bin/echo a  'b c' "d \"e\" \n" f\ g $HOME"#).unwrap(),
            ["/bin/echo", "a", "b c", "d \"e\" \\n", "f g", "$HOME"]
        );
        assert_eq!(split_command("x ''").unwrap(), ["x", ""]);
        assert!(split_command("  ").is_err());
        assert!(split_command("a 'b").is_err());
        assert!(split_command("a \"b").is_err());
        assert!(Hook::webhook("ftp://x").is_err());
    }

    #[test]
    fn a_hook_command_gets_the_request_and_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let request = dir.path().join("request.json");
        std::fs::write(&request, "{}").unwrap();
        let args = |s: &str| vec!["-c".to_string(), s.to_string(), "hook".to_string()];
        let ok = run_command(
            "/bin/sh",
            &args(r#"echo "$1 $FERRY_RETRAIN_REQUEST"; echo warn >&2"#),
            &request,
            Duration::from_secs(10),
        )
        .unwrap();
        let path = request.display().to_string();
        assert!(ok.contains(&format!("stdout: {path} {path}")), "{ok}");
        assert!(ok.contains("stderr: warn"), "{ok}");
        let e = run_command(
            "/bin/sh",
            &args("echo no; exit 3"),
            &request,
            Duration::from_secs(10),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("exit status: 3") && e.contains("stdout: no"),
            "{e}"
        );
        let started = Instant::now();
        let e = run_command(
            "/bin/sh",
            &args("exec sleep 30"),
            &request,
            Duration::from_millis(300),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("killed"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let e =
            run_command("/nonexistent/hook", &[], &request, Duration::from_secs(1)).unwrap_err();
        assert!(format!("{e:#}").contains("cannot start"), "{e:#}");
    }

    #[test]
    fn a_console_stopped_during_the_hook_does_not_call_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("called");
        let options = || Options {
            hook: Hook::Command {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), format!("touch {}", marker.display())],
            },
            ..Options::default()
        };
        let open = || {
            let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
            Retrainer::open(dir.path(), store, options()).unwrap()
        };
        {
            let r = open();
            let hot = aggregate(&[device("d1", 1, 0, &[("a", 0.5)])], NOW, 60_000);
            let mut current = None;
            advance(
                &mut current,
                r.options.rule.firing(&hot, 1),
                &r.options.rule,
                NOW,
                1000,
            );
            let mut e = current.unwrap();
            e.hook = HookState::Running { started_ms: NOW };
            r.save(&e).unwrap();
        }
        let r = open();
        let e = r.current().unwrap();
        assert!(matches!(e.hook, HookState::Interrupted { .. }), "{e:?}");
        r.tick(NOW + 1).unwrap();
        assert!(!marker.exists(), "the hook ran again");
        let log = r.log_entries().unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(
            (log[0].what.as_str(), log[0].episode.as_str()),
            ("interrupted", e.id.as_str())
        );
        assert_eq!(r.episodes().unwrap().len(), 1);
    }
}
