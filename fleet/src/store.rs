//! The console's state: what it knows of every device of its fleet, their
//! drift windows, events and samples, kept in sled so that it survives a
//! restart. One [`Store`] per fleet and state directory; it is `Send +
//! Sync` and shared as `Arc<Store>` by the ingest (the only writer), the
//! dashboard and the rollouts.
//!
//! # Applying messages
//! [`Store::apply`] takes one MQTT message of the fleet as it arrived
//! (topic, payload) and returns what changed, which it also broadcasts
//! ([`Store::subscribe`]). It never fails on what a device (or anyone
//! allowed to publish under the fleet's topics) sends: a payload that is not
//! JSON, not of schema 1, not the type its topic promises, or names another
//! device or fleet than its topic is refused, logged (at most every
//! [`WARN_EVERY`] per reason) and counted by reason in [`StoreStats`]; a
//! single bad record in a batch is refused alone. Commands (`cmd` topics,
//! including the console's own) are ignored. [`StoreError`] is reserved for
//! the store itself failing (I/O).
//!
//! # De-duplication
//! Delivery is at least once end to end: a device re-sends the batches that
//! were in flight when its connection broke, and the broker re-sends to the
//! console what the console had not acknowledged. Records are dropped by a
//! watermark per (device, stream), the highest record id applied
//! ([`DeviceState::watermarks`]), which is exact because:
//! - record ids increase strictly per device and are never reused, even
//!   across agent restarts (the agent's buffer persists its next id);
//! - the agent publishes a stream's records in id order, and after a lost
//!   connection it rewinds the stream to its oldest unacknowledged record and
//!   re-sends from there, in order: a record the broker never received is
//!   always re-sent before any record with a higher id reaches the broker
//!   (one TCP connection keeps order, and the rewind goes back to it);
//! - MQTT keeps the order of one client's QoS 1 messages on one topic, and
//!   so does the broker's queue for the console's persistent session.
//!
//! So the first time a record id at or below the watermark is seen, it was
//! applied before. The watermark is written in the same atomic sled batch as
//! the records it covers, so a crash cannot separate them. A batch made only
//! of duplicates changes nothing and returns no changes. Batch `message_id`s
//! are not used: a re-sent batch may be cut differently.
//!
//! # Statuses
//! Applied in arrival order (the device's clock is not trusted for ordering:
//! edge devices without a real-time clock restart in 1970). The last will is
//! the status with `online: false` and `ts_ms: 0`: it marks the device
//! offline and keeps what the console knew of it (bundle, counters). A
//! status with the `ts_ms` of the one already applied is the same message
//! again (the broker re-sends retained statuses whenever the console
//! subscribes) and changes nothing.
//!
//! # What is kept (keys by prefix)
//! The store owns every sled tree of the console's database; nothing else
//! names sled. The tree [`TREE`] holds the fleet's state:
//!
//! | key | value |
//! |---|---|
//! | `m/layout` | [`LAYOUT_VERSION`] (u32 big-endian): the version of this key layout |
//! | `d/<device>` | [`DeviceState`] (JSON) |
//! | `D/<seq>` | [`DriftPoint`] (JSON); `seq`: u64 big-endian, store-wide arrival order |
//! | `Dx/<device>\0<seq>` | empty: index of a device's drift windows |
//! | `E/<seq>`, `Ex/<device>\0<seq>` | [`DeviceEvent`], the same way |
//! | `S/<device>\0<record id>` | [`ferry_protocol::SampleRecord`] (JSON) |
//! | `m/seq` | the last `seq` used |
//!
//! The tree [`EPISODES_TREE`] holds the retraining episodes (`e/<id>`, JSON,
//! written by [`Store::save_episode`], read by [`Store::episodes`]; the
//! type is the retraining module's).
//!
//! The tree [`AUTH_TREE`] holds the console's API tokens (`t/<SHA-256 of
//! the token, hex>`, JSON, the type is the `auth` module's; the token
//! itself is never stored) and `m/bootstrapped` (set once the first admin
//! token was made), and the enrolled devices (`n/<device>`, JSON, the
//! `auth` module's type). With enrolment required
//! ([`Store::set_require_enrolment`], what `serve` does unless
//! `--follow-unenrolled`), a message of a device that is not
//! enrolled is refused (`not_enrolled`, counted per device id in
//! [`Store::unenrolled`]) and [`Store::devices`] lists enrolled devices
//! only, so neither the dashboard nor rollouts nor retraining see others.
//! Added in layout 1 without a version change: a console
//! that does not know the tree never opens it.
//!
//! # Layout version
//! A new database gets `m/layout` = [`LAYOUT_VERSION`] when it is created;
//! a database without it (written before the key existed, in the same
//! layout) gets it on its first open. A database with any other version is
//! refused ([`StoreError::UnknownLayout`]) and left untouched: a console
//! never reads or rewrites keys it does not understand. Changing the layout
//! means a new version and a migration here.
//!
//! Device ids are checked ([`ferry_protocol::validate_name`]: no `\0`, no
//! `/`), so a device's prefix never matches another device's keys. Bounds
//! per device: [`DRIFT_HISTORY`] drift windows, [`EVENT_HISTORY`] events,
//! [`MAX_SAMPLES_PER_DEVICE`] samples; the oldest go first.
//!
//! # Durability
//! Each message is applied as one sled batch (all or nothing, also across a
//! crash). sled writes its log every [`FLUSH_EVERY_MS`] and on
//! [`Store::flush`]; the ingest acknowledges a message to the broker only
//! after a flush that covers it, so a console killed at any point loses
//! nothing the broker delivered (the broker re-sends what was not
//! acknowledged, and the watermarks drop what was applied twice). Dropping
//! the store flushes it too.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferry_protocol::{
    Batch, DriftRecord, Event, EventRecord, SCHEMA_VERSION, SampleRecord, Status, Stream,
    TelemetryRecord, Topic, parse_topic, validate_name,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::model::{
    Change, DRIFT_HISTORY, DeviceEvent, DeviceState, DriftPoint, EVENT_HISTORY, RATE_BUCKET_MS,
    RATE_BUCKETS, RateBucket,
};

/// Samples kept per device for retraining: at about 300 bytes each, 6 MB
/// per device at most; enough for a retraining set per drifting device
/// without letting one chatty device fill the disk.
pub const MAX_SAMPLES_PER_DEVICE: u64 = 20_000;

/// sled's page cache. The console reads little and writes small records;
/// sled's default (1 GiB) would let it grow far beyond what it needs.
pub const CACHE_BYTES: u64 = 16 << 20;

/// How often sled writes its log to disk by itself (sled's default). The
/// ingest flushes explicitly before acknowledging, so this only bounds what
/// other writers (rollouts) lose in a crash.
pub const FLUSH_EVERY_MS: u64 = 500;

/// Changes buffered per subscriber: a subscriber that falls further behind
/// gets `Lagged` and should reload what it shows.
pub const CHANGES_CAPACITY: usize = 4096;

/// A refusal is logged at most this often per reason (a broken device must
/// not flood the log); every one is counted.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Where `ferry-fleet serve` keeps the store inside its state directory
/// (`--state`); other parts of the console use sibling directories.
pub const DIR: &str = "store";

/// The sled tree of the fleet's state.
pub const TREE: &str = "fleet-state";

/// The sled tree of the retraining episodes.
pub const EPISODES_TREE: &str = "retrain";

/// The sled tree of the API tokens (hashed).
pub const AUTH_TREE: &str = "auth";

/// The sled tree of the release registry (`releases.rs`), by release id.
pub const RELEASES_TREE: &str = "releases";

/// The version of the key layout this console reads and writes (see the
/// module header).
pub const LAYOUT_VERSION: u32 = 1;

/// How long `open` waits for a handle of this process that is still closing
/// (sled releases its lock when its last handle and flusher are gone).
const LOCK_WAIT: Duration = Duration::from_secs(3);

const SEQ_KEY: &[u8] = b"m/seq";
const LAYOUT_KEY: &[u8] = b"m/layout";
const EPISODE_PREFIX: &[u8] = b"e/";
const TOKEN_PREFIX: &[u8] = b"t/";
const ENROLLED_PREFIX: &[u8] = b"n/";
/// Device ids not enrolled whose messages are counted one by one; more are
/// counted in the total only.
pub const MAX_UNENROLLED_IDS: usize = 1000;
const BOOTSTRAPPED_KEY: &[u8] = b"m/bootstrapped";

/// What can go wrong with the store itself (never with what devices send:
/// see the module header).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (another console, or a `ferry-fleet` command) has the
    /// state directory open; one process at a time.
    #[error("the state directory {} is in use by another process", path.display())]
    Locked { path: PathBuf },
    /// The state directory cannot be created or opened (permissions, not a
    /// sled database, damaged beyond sled's recovery).
    #[error("cannot open the state directory {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: ferry_host::OpenError,
    },
    /// The database was written in a key layout this console does not know
    /// (a newer console's, or damaged): refused, left untouched.
    #[error(
        "the state directory {} has key layout version {found}; this console reads version {LAYOUT_VERSION}",
        path.display()
    )]
    UnknownLayout { path: PathBuf, found: String },
    /// A read, write or flush of the database failed (disk full, I/O error).
    #[error("state storage failed: {0}")]
    Storage(#[from] sled::Error),
}

impl StoreError {
    /// A stable code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Locked { .. } => "locked",
            StoreError::Open { .. } => "open",
            StoreError::UnknownLayout { .. } => "unknown_layout",
            StoreError::Storage(_) => "storage",
        }
    }
}

/// Counters of what [`Store::apply`] saw since the store was opened.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StoreStats {
    /// Messages given to `apply`.
    pub messages: u64,
    /// Records applied (seen for the first time).
    pub records: u64,
    /// Records dropped as already applied (re-sent after a reconnect).
    pub duplicates: u64,
    /// Statuses applied.
    pub statuses: u64,
    /// Statuses that were the one already applied (retained, re-sent).
    pub repeated_statuses: u64,
    /// Messages ignored on purpose (commands).
    pub ignored: u64,
    /// Messages and single records refused, by reason: `unknown_topic`,
    /// `bad_name`, `not_json`, `unsupported_schema`, `invalid`,
    /// `wrong_topic`, `bad_record`; and `corrupt_state` for a stored device
    /// state that could not be read (the device starts afresh).
    pub rejected: BTreeMap<String, u64>,
}

impl StoreStats {
    /// Every refusal, whatever the reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// The fleet's state in sled. See the module header.
pub struct Store {
    tree: sled::Tree,
    episodes: sled::Tree,
    auth: sled::Tree,
    releases: sled::Tree,
    /// Whether only enrolled devices are followed.
    require_enrolment: std::sync::atomic::AtomicBool,
    path: PathBuf,
    /// Serialises writers: `apply` reads, modifies and writes a device.
    writer: Mutex<Writer>,
    changes: broadcast::Sender<Change>,
    /// The database and the lock file that keeps other processes out.
    /// Last, so it is dropped (and the lock released) after the trees.
    handle: ferry_host::SledHandle,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Writer {
    /// The last `seq` written.
    seq: u64,
    stats: StoreStats,
    last_warned: HashMap<&'static str, Instant>,
    /// Messages refused per device id that is not enrolled (at most
    /// [`MAX_UNENROLLED_IDS`] ids).
    unenrolled: BTreeMap<String, u64>,
}

impl Writer {
    fn refuse(&mut self, reason: &Refusal, topic: &str) {
        *self
            .stats
            .rejected
            .entry(reason.code.to_string())
            .or_default() += 1;
        let now = Instant::now();
        let due = self
            .last_warned
            .get(reason.code)
            .is_none_or(|at| now.duration_since(*at) >= WARN_EVERY);
        if due {
            self.last_warned.insert(reason.code, now);
            warn!(topic, reason = reason.code, detail = %reason.detail, "Refused a message");
        } else {
            debug!(topic, reason = reason.code, detail = %reason.detail, "Refused a message");
        }
    }
}

/// Why a message (or a record) was refused.
#[derive(Debug)]
struct Refusal {
    code: &'static str,
    detail: String,
}

fn refusal(code: &'static str, detail: impl std::fmt::Display) -> Refusal {
    Refusal {
        code,
        detail: detail.to_string(),
    }
}

/// A message, checked against its topic.
enum Message {
    Command,
    Status(Box<Status>),
    Batch {
        device: String,
        fleet: String,
        stream: Stream,
        records: Vec<Value>,
    },
}

impl Message {
    /// The device that sent it (none for commands).
    fn device(&self) -> Option<&str> {
        match self {
            Message::Command => None,
            Message::Status(s) => Some(&s.device),
            Message::Batch { device, .. } => Some(device),
        }
    }
}

fn parse_message(topic: &str, payload: &[u8]) -> Result<Message, Refusal> {
    let (fleet, device, kind) =
        parse_topic(topic).ok_or_else(|| refusal("unknown_topic", "not a ferry/v1 topic"))?;
    if kind == Topic::Command {
        return Ok(Message::Command);
    }
    validate_name("fleet", fleet).map_err(|e| refusal("bad_name", e))?;
    validate_name("device id", device).map_err(|e| refusal("bad_name", e))?;
    let value: Value = serde_json::from_slice(payload).map_err(|e| refusal("not_json", e))?;
    match value.get("schema").and_then(Value::as_u64) {
        Some(s) if s == u64::from(SCHEMA_VERSION) => {}
        other => {
            return Err(refusal(
                "unsupported_schema",
                format_args!("schema {other:?}, this console reads {SCHEMA_VERSION}"),
            ));
        }
    }
    let wrong = |what: &str, got: &str, want: &str| {
        refusal(
            "wrong_topic",
            format_args!("payload {what} {got:?} on a topic of {want:?}"),
        )
    };
    match kind {
        Topic::Status => {
            let status: Status =
                serde_json::from_value(value).map_err(|e| refusal("invalid", e))?;
            if status.device != device {
                return Err(wrong("device", &status.device, device));
            }
            if status.fleet != fleet {
                return Err(wrong("fleet", &status.fleet, fleet));
            }
            Ok(Message::Status(Box::new(status)))
        }
        Topic::Stream(stream) => {
            let batch: Batch<Value> =
                serde_json::from_value(value).map_err(|e| refusal("invalid", e))?;
            if batch.stream != stream {
                return Err(wrong("stream", batch.stream.as_str(), stream.as_str()));
            }
            if batch.device != device {
                return Err(wrong("device", &batch.device, device));
            }
            if batch.fleet != fleet {
                return Err(wrong("fleet", &batch.fleet, fleet));
            }
            Ok(Message::Batch {
                device: device.to_string(),
                fleet: fleet.to_string(),
                stream,
                records: batch.records,
            })
        }
        Topic::Command => Ok(Message::Command),
    }
}

// Keys (see the module header).

fn device_key(device: &str) -> Vec<u8> {
    [b"d/", device.as_bytes()].concat()
}

fn seq_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    [prefix, &seq.to_be_bytes()].concat()
}

fn index_prefix(prefix: &[u8], device: &str) -> Vec<u8> {
    [prefix, device.as_bytes(), b"\0"].concat()
}

fn index_key(prefix: &[u8], device: &str, n: u64) -> Vec<u8> {
    [prefix, device.as_bytes(), b"\0", &n.to_be_bytes()].concat()
}

/// The big-endian u64 that ends a key.
fn key_tail(key: &[u8]) -> Option<u64> {
    let tail = key.get(key.len().checked_sub(8)?..)?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

const DRIFT: &[u8] = b"D/";
const DRIFT_INDEX: &[u8] = b"Dx/";
const EVENTS: &[u8] = b"E/";
const EVENTS_INDEX: &[u8] = b"Ex/";
const SAMPLES: &[u8] = b"S/";

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("the store's types serialise")
}

fn from_json<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Option<T> {
    match serde_json::from_slice(bytes) {
        Ok(v) => Some(v),
        Err(error) => {
            warn!(key = %String::from_utf8_lossy(key), %error, "Skipped an unreadable stored value");
            None
        }
    }
}

/// The `event` tag of an event, as on the wire.
pub fn event_name(event: &Event) -> &'static str {
    match event {
        Event::UpdateInstalled { .. } => "update_installed",
        Event::UpdateRejected { .. } => "update_rejected",
        Event::RolledBack { .. } => "rolled_back",
        Event::DriftAlert { .. } => "drift_alert",
        Event::ShadowReport(_) => "shadow_report",
        Event::CommandRejected { .. } => "command_rejected",
        Event::Started { .. } => "started",
        Event::BufferRecovered { .. } => "buffer_recovered",
        Event::MetadataRejected { .. } => "metadata_rejected",
        Event::RootRotated { .. } => "root_rotated",
        Event::Unknown => "unknown",
    }
}

/// Start of the oldest rate bucket kept at `now_ms`.
fn rate_horizon(now_ms: u64) -> u64 {
    (now_ms - now_ms % RATE_BUCKET_MS).saturating_sub((RATE_BUCKETS as u64 - 1) * RATE_BUCKET_MS)
}

/// Counts one telemetry record in its minute (by the device's clock, never
/// later than `now_ms`). Records older than the kept hour are not counted
/// in the rates (the status totals still have them).
fn count_request(rates: &mut Vec<RateBucket>, r: &TelemetryRecord, now_ms: u64) {
    let ts = r.ts_ms.min(now_ms);
    let start = ts - ts % RATE_BUCKET_MS;
    if start < rate_horizon(now_ms) {
        return;
    }
    let i = match rates.binary_search_by_key(&start, |b| b.start_ms) {
        Ok(i) => i,
        Err(i) => {
            rates.insert(
                i,
                RateBucket {
                    start_ms: start,
                    ..RateBucket::default()
                },
            );
            i
        }
    };
    let b = &mut rates[i];
    if r.ok {
        b.predictions += 1;
        b.latency_us_sum = b.latency_us_sum.saturating_add(r.latency_us);
    } else {
        b.errors += 1;
    }
}

fn trim_rates(rates: &mut Vec<RateBucket>, now_ms: u64) {
    let horizon = rate_horizon(now_ms);
    rates.retain(|b| b.start_ms >= horizon);
    if rates.len() > RATE_BUCKETS {
        rates.drain(..rates.len() - RATE_BUCKETS);
    }
}

/// Records of one batch that passed the watermark, by kind.
#[derive(Default)]
struct Fresh {
    drift: Vec<DriftRecord>,
    events: Vec<EventRecord>,
    samples: Vec<SampleRecord>,
}

impl Store {
    /// Opens (or creates) the state in the directory `path`. Refuses a
    /// directory another process holds ([`StoreError::Locked`]; a handle of
    /// this process still closing is waited for) and a database of another
    /// key layout ([`StoreError::UnknownLayout`]).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let config = sled::Config::new()
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(Some(FLUSH_EVERY_MS));
        let handle = ferry_host::open_sled(path, config, LOCK_WAIT).map_err(|e| match e {
            ferry_host::OpenError::Locked { .. } => StoreError::Locked {
                path: path.to_path_buf(),
            },
            source => StoreError::Open {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let tree = handle.db.open_tree(TREE)?;
        match tree.get(LAYOUT_KEY)? {
            Some(v) if v.as_ref() == LAYOUT_VERSION.to_be_bytes() => {}
            // New, or written before the key existed (the same layout).
            None => {
                tree.insert(LAYOUT_KEY, &LAYOUT_VERSION.to_be_bytes())?;
                handle.db.flush()?;
            }
            Some(v) => {
                let found = match <[u8; 4]>::try_from(v.as_ref()) {
                    Ok(b) => u32::from_be_bytes(b).to_string(),
                    Err(_) => format!("(unreadable: {} bytes)", v.len()),
                };
                return Err(StoreError::UnknownLayout {
                    path: path.to_path_buf(),
                    found,
                });
            }
        }
        let episodes = handle.db.open_tree(EPISODES_TREE)?;
        let auth = handle.db.open_tree(AUTH_TREE)?;
        let releases = handle.db.open_tree(RELEASES_TREE)?;
        let seq = tree
            .get(SEQ_KEY)?
            .and_then(|v| key_tail(&v))
            .unwrap_or_default();
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        Ok(Store {
            tree,
            episodes,
            auth,
            releases,
            require_enrolment: std::sync::atomic::AtomicBool::new(false),
            path: path.to_path_buf(),
            writer: Mutex::new(Writer {
                seq,
                ..Writer::default()
            }),
            changes,
            handle,
        })
    }

    /// Applies one MQTT message of the fleet and returns what changed
    /// (nothing for a duplicate, a refused or an ignored message); the
    /// changes are also broadcast. See the module header for the rules.
    /// `now_ms` is the console's clock (Unix ms): it sets `last_seen_ms` and
    /// bounds the rate buckets.
    pub fn apply(
        &self,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Vec<Change>, StoreError> {
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        w.stats.messages += 1;
        let changes = match parse_message(topic, payload) {
            Err(reason) => {
                w.refuse(&reason, topic);
                Vec::new()
            }
            Ok(m) if !m.device().is_none_or(|d| self.follows(d)) => {
                let device = m.device().unwrap_or_default().to_string();
                w.refuse(&refusal("not_enrolled", &device), topic);
                let known = w.unenrolled.contains_key(&device);
                if known || w.unenrolled.len() < MAX_UNENROLLED_IDS {
                    *w.unenrolled.entry(device).or_default() += 1;
                }
                Vec::new()
            }
            Ok(Message::Command) => {
                w.stats.ignored += 1;
                Vec::new()
            }
            Ok(Message::Status(status)) => self.apply_status(&mut w, *status, now_ms)?,
            Ok(Message::Batch {
                device,
                fleet,
                stream,
                records,
            }) => self.apply_batch(&mut w, &device, &fleet, stream, records, now_ms, topic)?,
        };
        drop(w);
        for change in &changes {
            // No subscriber is fine.
            let _ = self.changes.send(change.clone());
        }
        Ok(changes)
    }

    /// The stored state of `device`, or a new one; a state that cannot be
    /// read is counted and replaced.
    fn load(
        &self,
        w: &mut Writer,
        device: &str,
        fleet: &str,
    ) -> Result<(DeviceState, bool), StoreError> {
        let key = device_key(device);
        if let Some(bytes) = self.tree.get(&key)? {
            match serde_json::from_slice::<DeviceState>(&bytes) {
                Ok(state) => return Ok((state, false)),
                Err(e) => w.refuse(
                    &refusal("corrupt_state", e),
                    &format!("(stored state of {device})"),
                ),
            }
        }
        Ok((
            DeviceState {
                device: device.to_string(),
                fleet: fleet.to_string(),
                ..DeviceState::default()
            },
            true,
        ))
    }

    fn apply_status(
        &self,
        w: &mut Writer,
        s: Status,
        now_ms: u64,
    ) -> Result<Vec<Change>, StoreError> {
        let (mut state, new) = self.load(w, &s.device, &s.fleet)?;
        let will = !s.online && s.ts_ms == 0;
        if !new && !will && s.ts_ms == state.status_ts_ms {
            w.stats.repeated_statuses += 1;
            return Ok(Vec::new());
        }
        let before = state.clone();
        state.fleet = s.fleet;
        state.online = s.online;
        if will {
            // Only the identity fields of the will mean something.
            if state.agent_version.is_empty() {
                state.agent_version = s.agent_version;
            }
        } else {
            state.agent_version = s.agent_version;
            state.bundle = s.bundle;
            state.previous = s.previous;
            state.update = s.update;
            state.backlog = s.buffer.records;
            state.dropped = s.buffer.dropped;
            state.predictions = s.predictions;
            state.errors = s.errors;
            state.status_ts_ms = s.ts_ms;
            state.last_seen_ms = state.last_seen_ms.max(now_ms);
        }
        w.stats.statuses += 1;
        if !new && state == before {
            return Ok(Vec::new());
        }
        if new {
            info!(device = %state.device, online = state.online, "New device");
        } else if state.online != before.online {
            info!(device = %state.device, online = state.online, "Device went {}", if state.online { "online" } else { "offline" });
        }
        self.tree
            .insert(device_key(&state.device), to_json(&state))?;
        Ok(vec![Change::Device {
            device: state.device,
        }])
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_batch(
        &self,
        w: &mut Writer,
        device: &str,
        fleet: &str,
        stream: Stream,
        records: Vec<Value>,
        now_ms: u64,
        topic: &str,
    ) -> Result<Vec<Change>, StoreError> {
        let (mut state, new) = self.load(w, device, fleet)?;
        let mut watermark = state.watermarks.get(&stream).copied();
        let mut fresh = Fresh::default();
        let mut applied = 0u64;
        for raw in records {
            let Some(id) = raw.get("id").and_then(Value::as_u64) else {
                w.refuse(&refusal("bad_record", "a record without an id"), topic);
                continue;
            };
            if watermark.is_some_and(|m| id <= m) {
                w.stats.duplicates += 1;
                continue;
            }
            let parsed = match stream {
                Stream::Telemetry => serde_json::from_value::<TelemetryRecord>(raw)
                    .map(|r| count_request(&mut state.rates, &r, now_ms)),
                Stream::Drift => serde_json::from_value(raw).map(|r| fresh.drift.push(r)),
                Stream::Events => serde_json::from_value(raw).map(|r| fresh.events.push(r)),
                Stream::Samples => serde_json::from_value(raw).map(|r| fresh.samples.push(r)),
            };
            if let Err(e) = parsed {
                w.refuse(
                    &refusal("bad_record", format_args!("record {id}: {e}")),
                    topic,
                );
                continue;
            }
            watermark = Some(id);
            applied += 1;
        }
        if applied == 0 {
            return Ok(Vec::new());
        }
        w.stats.records += applied;
        if let Some(m) = watermark {
            state.watermarks.insert(stream, m);
        }
        state.last_seen_ms = state.last_seen_ms.max(now_ms);
        trim_rates(&mut state.rates, now_ms);

        let mut batch = sled::Batch::default();
        let mut seq = w.seq;
        let mut changes = vec![Change::Device {
            device: device.to_string(),
        }];
        if let Some(latest) = fresh.drift.last() {
            state.drift = Some(latest.clone());
            changes.push(Change::Drift {
                device: device.to_string(),
            });
            let points = fresh.drift.into_iter().map(|record| DriftPoint {
                device: device.to_string(),
                record,
            });
            self.append(
                &mut batch,
                &mut seq,
                device,
                DRIFT,
                DRIFT_INDEX,
                DRIFT_HISTORY,
                points,
            )?;
        }
        if !fresh.events.is_empty() {
            for e in &fresh.events {
                if let Event::ShadowReport(report) = &e.event {
                    state.shadow = Some(report.clone());
                }
                changes.push(Change::Event {
                    device: device.to_string(),
                    event: event_name(&e.event).to_string(),
                });
            }
            let events = fresh.events.into_iter().map(|record| DeviceEvent {
                device: device.to_string(),
                record,
            });
            self.append(
                &mut batch,
                &mut seq,
                device,
                EVENTS,
                EVENTS_INDEX,
                EVENT_HISTORY,
                events,
            )?;
        }
        if !fresh.samples.is_empty() {
            self.keep_samples(&mut batch, &mut state, fresh.samples)?;
        }
        if seq != w.seq {
            batch.insert(SEQ_KEY, &seq.to_be_bytes());
        }
        batch.insert(device_key(device), to_json(&state));
        self.tree.apply_batch(batch)?;
        w.seq = seq;
        if new {
            info!(device, "New device");
        }
        Ok(changes)
    }

    /// Adds `items` to a device's bounded history (`data` by store-wide
    /// sequence, `index` by device), dropping the oldest beyond `limit`.
    #[allow(clippy::too_many_arguments)]
    fn append<T: Serialize>(
        &self,
        batch: &mut sled::Batch,
        seq: &mut u64,
        device: &str,
        data: &[u8],
        index: &[u8],
        limit: usize,
        items: impl ExactSizeIterator<Item = T>,
    ) -> Result<(), StoreError> {
        let incoming = items.len();
        let skip_new = incoming.saturating_sub(limit);
        let kept_new = incoming - skip_new;
        let existing: Vec<sled::IVec> = self
            .tree
            .scan_prefix(index_prefix(index, device))
            .keys()
            .collect::<Result<_, _>>()?;
        let remove = (existing.len() + kept_new).saturating_sub(limit);
        for key in existing.iter().take(remove) {
            if let Some(old) = key_tail(key) {
                batch.remove(seq_key(data, old));
            }
            batch.remove(key.as_ref());
        }
        for item in items.skip(skip_new) {
            *seq += 1;
            batch.insert(seq_key(data, *seq), to_json(&item));
            batch.insert(index_key(index, device, *seq), &[]);
        }
        Ok(())
    }

    fn keep_samples(
        &self,
        batch: &mut sled::Batch,
        state: &mut DeviceState,
        samples: Vec<SampleRecord>,
    ) -> Result<(), StoreError> {
        let limit = MAX_SAMPLES_PER_DEVICE as usize;
        let skip_new = samples.len().saturating_sub(limit);
        let kept_new = (samples.len() - skip_new) as u64;
        let excess = (state.samples + kept_new).saturating_sub(MAX_SAMPLES_PER_DEVICE);
        if excess > 0 {
            for key in self
                .tree
                .scan_prefix(index_prefix(SAMPLES, &state.device))
                .keys()
                .take(excess as usize)
            {
                batch.remove(key?);
            }
        }
        for s in samples.into_iter().skip(skip_new) {
            batch.insert(index_key(SAMPLES, &state.device, s.id), to_json(&s));
        }
        state.samples = (state.samples + kept_new).min(MAX_SAMPLES_PER_DEVICE);
        Ok(())
    }

    /// Every device, sorted by id.
    pub fn devices(&self) -> Vec<DeviceState> {
        self.tree
            .scan_prefix(b"d/")
            .filter_map(|kv| match kv {
                Ok((k, v)) => from_json::<DeviceState>(&k, &v),
                Err(error) => {
                    warn!(%error, "Cannot read a device state");
                    None
                }
            })
            .filter(|d| self.follows(&d.device))
            .collect()
    }

    /// Requires enrolment (see the module header) or not.
    pub fn set_require_enrolment(&self, required: bool) {
        self.require_enrolment
            .store(required, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether enrolment is required.
    pub fn requires_enrolment(&self) -> bool {
        self.require_enrolment
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the console follows `device`: enrolment is not required, or
    /// the device is enrolled.
    pub fn follows(&self, device: &str) -> bool {
        !self.requires_enrolment() || self.is_enrolled(device)
    }

    /// Whether `device` is enrolled.
    pub fn is_enrolled(&self, device: &str) -> bool {
        let key = [ENROLLED_PREFIX, device.as_bytes()].concat();
        matches!(self.auth.get(key), Ok(Some(_)))
    }

    /// Enrols `device` with `record` (flushed).
    pub fn save_enrolment<T: Serialize>(&self, device: &str, record: &T) -> Result<(), StoreError> {
        self.auth.insert(
            [ENROLLED_PREFIX, device.as_bytes()].concat(),
            to_json(record),
        )?;
        self.handle.db.flush()?;
        Ok(())
    }

    /// Removes `device`'s enrolment (flushed); whether it was enrolled.
    pub fn remove_enrolment(&self, device: &str) -> Result<bool, StoreError> {
        let old = self
            .auth
            .remove([ENROLLED_PREFIX, device.as_bytes()].concat())?;
        self.handle.db.flush()?;
        Ok(old.is_some())
    }

    /// Every enrolment record, by device id.
    pub fn enrolments<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for kv in self.auth.scan_prefix(ENROLLED_PREFIX) {
            let (k, v) = kv?;
            out.extend(from_json(&k, &v));
        }
        Ok(out)
    }

    /// Messages refused because their device is not enrolled: per device id
    /// (at most [`MAX_UNENROLLED_IDS`] ids) since the store was opened.
    pub fn unenrolled(&self) -> BTreeMap<String, u64> {
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unenrolled
            .clone()
    }

    /// One device.
    pub fn device(&self, id: &str) -> Option<DeviceState> {
        if !self.follows(id) {
            return None;
        }
        let key = device_key(id);
        match self.tree.get(&key) {
            Ok(v) => v.and_then(|v| from_json(&key, &v)),
            Err(error) => {
                warn!(%error, device = id, "Cannot read a device state");
                None
            }
        }
    }

    /// Drift windows of one device or of every device, oldest first: the
    /// newest `limit` of them (in arrival order at the console).
    pub fn drift_history(&self, device: Option<&str>, limit: usize) -> Vec<DriftPoint> {
        self.history(device, limit, DRIFT, DRIFT_INDEX)
    }

    /// Events of one device or of every device, oldest first: the newest
    /// `limit` of them (in arrival order at the console).
    pub fn events(&self, device: Option<&str>, limit: usize) -> Vec<DeviceEvent> {
        self.history(device, limit, EVENTS, EVENTS_INDEX)
    }

    fn history<T: DeserializeOwned>(
        &self,
        device: Option<&str>,
        limit: usize,
        data: &[u8],
        index: &[u8],
    ) -> Vec<T> {
        let read = || -> Result<Vec<T>, sled::Error> {
            let mut out = Vec::new();
            match device {
                None => {
                    for kv in self.tree.scan_prefix(data).rev().take(limit) {
                        let (k, v) = kv?;
                        out.extend(from_json(&k, &v));
                    }
                }
                Some(device) => {
                    for key in self
                        .tree
                        .scan_prefix(index_prefix(index, device))
                        .keys()
                        .rev()
                        .take(limit)
                    {
                        let Some(seq) = key_tail(&key?) else { continue };
                        let key = seq_key(data, seq);
                        if let Some(v) = self.tree.get(&key)? {
                            out.extend(from_json(&key, &v));
                        }
                    }
                }
            }
            out.reverse();
            Ok(out)
        };
        read().unwrap_or_else(|error| {
            warn!(%error, "Cannot read the history");
            Vec::new()
        })
    }

    /// The samples kept for `device`, oldest first.
    pub fn samples(&self, device: &str) -> Vec<SampleRecord> {
        self.tree
            .scan_prefix(index_prefix(SAMPLES, device))
            .filter_map(|kv| match kv {
                Ok((k, v)) => from_json(&k, &v),
                Err(error) => {
                    warn!(%error, device, "Cannot read a sample");
                    None
                }
            })
            .collect()
    }

    /// Changes from now on (see [`CHANGES_CAPACITY`] for slow receivers).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Broadcasts a change made elsewhere (a rollout's progress) to the
    /// same subscribers.
    pub fn notify(&self, change: Change) {
        let _ = self.changes.send(change);
    }

    /// Writes everything applied so far to disk (fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.handle.db.flush()?;
        Ok(())
    }

    /// Stores a retraining episode under its id (replacing the previous
    /// version) and flushes it to disk before returning: the retraining
    /// loop relies on a `running` episode being durable before its hook
    /// starts.
    pub fn save_episode<T: Serialize>(&self, id: &str, episode: &T) -> Result<(), StoreError> {
        self.episodes
            .insert([EPISODE_PREFIX, id.as_bytes()].concat(), to_json(episode))?;
        self.handle.db.flush()?;
        Ok(())
    }

    /// Every retraining episode, by id (oldest first: ids sort by time); an
    /// unreadable one is skipped with a warning.
    pub fn episodes<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for kv in self.episodes.scan_prefix(EPISODE_PREFIX) {
            let (k, v) = kv?;
            out.extend(from_json(&k, &v));
        }
        Ok(out)
    }

    /// Records a release the first time the console takes it (flushed);
    /// returns false when the registry already had it (the first record,
    /// with its first uploader and time, is kept).
    pub fn record_release<T: Serialize>(
        &self,
        release: &str,
        record: &T,
    ) -> Result<bool, StoreError> {
        let fresh = self
            .releases
            .compare_and_swap(
                release.as_bytes(),
                None as Option<&[u8]>,
                Some(to_json(record)),
            )?
            .is_ok();
        if fresh {
            self.handle.db.flush()?;
        }
        Ok(fresh)
    }

    /// Replaces a release's record (its approval changed) and flushes it.
    pub fn update_release<T: Serialize>(
        &self,
        release: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        self.releases.insert(release.as_bytes(), to_json(record))?;
        self.handle.db.flush()?;
        Ok(())
    }

    /// One release's record, if the registry has it.
    pub fn release<T: DeserializeOwned>(&self, release: &str) -> Result<Option<T>, StoreError> {
        Ok(match self.releases.get(release.as_bytes())? {
            Some(v) => from_json(release.as_bytes(), &v),
            None => None,
        })
    }

    /// Every release in the registry (an unreadable one is skipped with a
    /// warning).
    pub fn releases<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for kv in self.releases.iter() {
            let (k, v) = kv?;
            out.extend(from_json(&k, &v));
        }
        Ok(out)
    }

    /// Stores an API token's record under the hash of the token (replacing
    /// the previous version) and flushes it to disk before returning (a
    /// token shown to an admin must survive a crash; a revocation too).
    pub fn save_token<T: Serialize>(&self, hash: &str, record: &T) -> Result<(), StoreError> {
        self.auth
            .insert([TOKEN_PREFIX, hash.as_bytes()].concat(), to_json(record))?;
        self.handle.db.flush()?;
        Ok(())
    }

    /// The record of the token whose hash is `hash`.
    pub fn token<T: DeserializeOwned>(&self, hash: &str) -> Result<Option<T>, StoreError> {
        let key = [TOKEN_PREFIX, hash.as_bytes()].concat();
        Ok(self.auth.get(&key)?.and_then(|v| from_json(&key, &v)))
    }

    /// Every token's record, by hash.
    pub fn tokens<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for kv in self.auth.scan_prefix(TOKEN_PREFIX) {
            let (k, v) = kv?;
            out.extend(from_json(&k, &v));
        }
        Ok(out)
    }

    /// Whether the first admin token was made (see `auth`).
    pub fn auth_bootstrapped(&self) -> Result<bool, StoreError> {
        Ok(self.auth.get(BOOTSTRAPPED_KEY)?.is_some())
    }

    /// Records that the first admin token was made (flushed).
    pub fn set_auth_bootstrapped(&self) -> Result<(), StoreError> {
        self.auth.insert(BOOTSTRAPPED_KEY, &[1u8])?;
        self.handle.db.flush()?;
        Ok(())
    }

    /// The state directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes another layout version (what a newer console would leave
    /// behind), for tests of the refusal.
    #[cfg(test)]
    pub(crate) fn set_layout_version(&self, version: u32) {
        self.tree
            .insert(LAYOUT_KEY, &version.to_be_bytes())
            .unwrap();
        self.handle.db.flush().unwrap();
    }

    /// What `apply` saw since the store was opened.
    pub fn stats(&self) -> StoreStats {
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stats
            .clone()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(error) = self.handle.db.flush() {
            warn!(%error, path = %self.path.display(), "Cannot flush the state at close");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::{BufferInfo, BundleRef, FeatureDrift, OutputSummary, ShadowReport, topic};
    use serde_json::json;

    const FLEET: &str = "plant";
    const NOW: u64 = 1_795_000_000_000;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        (dir, store)
    }

    fn bundle(version: &str, sequence: u64) -> BundleRef {
        BundleRef {
            name: "iris".into(),
            version: version.into(),
            digest: format!("digest-{version}"),
            fleet: FLEET.into(),
            channel: "stable".into(),
            sequence,
            release: String::new(),
        }
    }

    fn status(device: &str, ts_ms: u64) -> Status {
        Status {
            schema: 1,
            device: device.into(),
            fleet: FLEET.into(),
            online: true,
            agent_version: "0.1.0".into(),
            ts_ms,
            bundle: Some(bundle("1.0.0", 1)),
            previous: None,
            update: Default::default(),
            buffer: BufferInfo {
                records: 7,
                dropped: [(Stream::Samples, 2)].into(),
                ..BufferInfo::default()
            },
            predictions: 100,
            errors: 3,
            uptime_s: 5,
            shadow: None,
        }
    }

    fn batch<T: Serialize>(device: &str, stream: Stream, records: &[T]) -> Vec<u8> {
        to_json(&Batch {
            schema: 1,
            stream,
            message_id: "m".into(),
            device: device.into(),
            fleet: FLEET.into(),
            sent_ms: NOW,
            records: records.iter().collect(),
        })
    }

    fn telemetry(id: u64, ts_ms: u64, ok: bool) -> TelemetryRecord {
        TelemetryRecord {
            id,
            ts_ms,
            bundle_version: "1.0.0".into(),
            latency_us: 40,
            ok,
            output: OutputSummary::default(),
            error: (!ok).then(|| "bad_input".into()),
            rows: 1,
        }
    }

    fn drift(id: u64, drifted: bool) -> DriftRecord {
        DriftRecord {
            id,
            ts_ms: NOW,
            bundle_version: "1.0.0".into(),
            bundle_digest: "d".into(),
            window_start_ms: NOW - 1000,
            rows: 200,
            features: vec![FeatureDrift {
                name: "petal_length".into(),
                kind: "numeric".into(),
                method: "ks".into(),
                value: Some(if drifted { 0.001 } else { 0.5 }),
                threshold: 0.05,
                drifted,
                psi: Some(0.3),
                rows: 200,
                missing: 0,
            }],
            drifted_features: u32::from(drifted),
            share: 0.25,
            dataset_drifted: false,
        }
    }

    fn t(device: &str, kind: Topic) -> String {
        topic(FLEET, device, kind)
    }

    #[test]
    fn statuses_and_the_last_will() {
        let (_dir, store) = store();
        let mut changes = store.subscribe();
        let c = store
            .apply(&t("d1", Topic::Status), &to_json(&status("d1", 10)), NOW)
            .unwrap();
        assert_eq!(
            c,
            [Change::Device {
                device: "d1".into()
            }]
        );
        assert_eq!(changes.try_recv().unwrap(), c[0]);
        let d = store.device("d1").unwrap();
        assert!(d.online);
        assert_eq!(d.bundle.as_ref().unwrap().version, "1.0.0");
        assert_eq!((d.backlog, d.predictions, d.errors), (7, 100, 3));
        assert_eq!(d.dropped[&Stream::Samples], 2);
        assert_eq!(d.last_seen_ms, NOW);

        // The retained status again (console re-subscribed): nothing new.
        let c = store
            .apply(
                &t("d1", Topic::Status),
                &to_json(&status("d1", 10)),
                NOW + 5,
            )
            .unwrap();
        assert!(c.is_empty());
        assert_eq!(store.stats().repeated_statuses, 1);
        assert_eq!(store.device("d1").unwrap().last_seen_ms, NOW);

        // The will: offline, the rest kept.
        let will = Status::offline(FLEET, "d1", "0.1.0");
        let c = store
            .apply(&t("d1", Topic::Status), &to_json(&will), NOW + 9)
            .unwrap();
        assert_eq!(c.len(), 1);
        let d = store.device("d1").unwrap();
        assert!(!d.online);
        assert_eq!(d.bundle.as_ref().unwrap().version, "1.0.0");
        assert_eq!(d.last_seen_ms, NOW);
        // The same will again: nothing.
        assert!(
            store
                .apply(&t("d1", Topic::Status), &to_json(&will), NOW + 10)
                .unwrap()
                .is_empty()
        );

        // A will of a device never seen: it exists, offline.
        store
            .apply(
                &t("d0", Topic::Status),
                &to_json(&Status::offline(FLEET, "d0", "0.0.9")),
                NOW,
            )
            .unwrap();
        let ids: Vec<_> = store
            .devices()
            .into_iter()
            .map(|d| (d.device, d.online))
            .collect();
        assert_eq!(ids, [("d0".to_string(), false), ("d1".to_string(), false)]);

        // Back online, even with an earlier clock (restarted without RTC).
        store
            .apply(
                &t("d1", Topic::Status),
                &to_json(&status("d1", 3)),
                NOW + 20,
            )
            .unwrap();
        assert!(store.device("d1").unwrap().online);
    }

    #[test]
    fn records_are_applied_once() {
        let (_dir, store) = store();
        let tel = |ids: std::ops::RangeInclusive<u64>| {
            let records: Vec<_> = ids.map(|i| telemetry(i, NOW - 1000, i % 5 != 0)).collect();
            batch("d1", Stream::Telemetry, &records)
        };
        let topic = t("d1", Topic::Stream(Stream::Telemetry));
        assert_eq!(store.apply(&topic, &tel(1..=10), NOW).unwrap().len(), 1);
        // The same batch, and a re-sent batch cut differently.
        assert!(store.apply(&topic, &tel(1..=10), NOW).unwrap().is_empty());
        assert_eq!(store.apply(&topic, &tel(6..=12), NOW).unwrap().len(), 1);
        let d = store.device("d1").unwrap();
        let r = d.rate(NOW, 60_000);
        assert_eq!(r.requests, 12);
        assert_eq!(d.rates[0].errors, 2);
        assert_eq!(d.rates[0].latency_us_sum, 10 * 40);
        assert_eq!(d.watermarks[&Stream::Telemetry], 12);
        let s = store.stats();
        assert_eq!((s.records, s.duplicates), (12, 15));

        // Watermarks are per stream: a drift record with a lower id is new.
        let c = store
            .apply(
                &t("d1", Topic::Stream(Stream::Drift)),
                &batch("d1", Stream::Drift, &[drift(4, true)]),
                NOW,
            )
            .unwrap();
        assert_eq!(
            c,
            [
                Change::Device {
                    device: "d1".into()
                },
                Change::Drift {
                    device: "d1".into()
                }
            ]
        );
        assert_eq!(
            store
                .device("d1")
                .unwrap()
                .drift_value("petal_length", "psi"),
            Some(0.3)
        );
    }

    #[test]
    fn rates_follow_the_device_clock_within_the_hour() {
        let (_dir, store) = store();
        let topic = t("d1", Topic::Stream(Stream::Telemetry));
        let records = [
            telemetry(1, NOW - 2 * 3_600_000, true), // too old for the rates
            telemetry(2, NOW - 30 * 60_000, true),
            telemetry(3, NOW + 3_600_000, false), // ahead: counted now
        ];
        store
            .apply(&topic, &batch("d1", Stream::Telemetry, &records), NOW)
            .unwrap();
        let d = store.device("d1").unwrap();
        assert_eq!(d.rates.len(), 2);
        assert!(d.rates[0].start_ms < d.rates[1].start_ms);
        assert_eq!(d.rate(NOW, 3_600_000).requests, 2);
        assert_eq!(d.rate(NOW, 60_000).error_rate, 1.0);
        // An hour later everything has aged out.
        store
            .apply(
                &topic,
                &batch(
                    "d1",
                    Stream::Telemetry,
                    &[telemetry(4, NOW + 2 * 3_600_000, true)],
                ),
                NOW + 2 * 3_600_000,
            )
            .unwrap();
        assert_eq!(store.device("d1").unwrap().rates.len(), 1);
    }

    #[test]
    fn histories_are_bounded_and_ordered() {
        let (_dir, store) = store();
        let topic = t("d1", Topic::Stream(Stream::Drift));
        let n = DRIFT_HISTORY as u64 + 15;
        for id in 1..=n {
            store
                .apply(
                    &topic,
                    &batch("d1", Stream::Drift, &[drift(id, id % 2 == 0)]),
                    NOW,
                )
                .unwrap();
        }
        store
            .apply(
                &t("d2", Topic::Stream(Stream::Drift)),
                &batch("d2", Stream::Drift, &[drift(1, false)]),
                NOW,
            )
            .unwrap();
        let h = store.drift_history(Some("d1"), usize::MAX);
        assert_eq!(h.len(), DRIFT_HISTORY);
        assert_eq!(h.first().unwrap().record.id, 16);
        assert_eq!(h.last().unwrap().record.id, n);
        let last3: Vec<_> = store
            .drift_history(Some("d1"), 3)
            .iter()
            .map(|p| p.record.id)
            .collect();
        assert_eq!(last3, [n - 2, n - 1, n]);
        let all: Vec<_> = store
            .drift_history(None, 2)
            .into_iter()
            .map(|p| (p.device, p.record.id))
            .collect();
        assert_eq!(all, [("d1".to_string(), n), ("d2".to_string(), 1)]);
        assert!(store.drift_history(Some("d"), 10).is_empty());

        // One batch larger than the bound keeps its newest.
        let many: Vec<_> = (1..=(EVENT_HISTORY as u64 + 3))
            .map(|id| EventRecord {
                id,
                ts_ms: NOW,
                event: Event::CommandRejected {
                    command_id: format!("c{id}"),
                    reason: "r".into(),
                },
            })
            .collect();
        let c = store
            .apply(
                &t("d3", Topic::Stream(Stream::Events)),
                &batch("d3", Stream::Events, &many),
                NOW,
            )
            .unwrap();
        assert_eq!(c.len(), 1 + many.len());
        let e = store.events(Some("d3"), usize::MAX);
        assert_eq!(e.len(), EVENT_HISTORY);
        assert_eq!(e[0].record.id, 4);
    }

    #[test]
    fn shadow_reports_and_samples() {
        let (_dir, store) = store();
        let report = ShadowReport {
            candidate: bundle("2.0.0", 2),
            active: bundle("1.0.0", 1),
            compared: 50,
            candidate_errors: 0,
            top1_agreement: Some(0.98),
            mean_abs_diff: Some(0.01),
            active_latency_us_p50: 40,
            candidate_latency_us_p50: 42,
            candidate_latency_us_p99: 90,
            stopped_early: false,
        };
        let events = [EventRecord {
            id: 9,
            ts_ms: NOW,
            event: Event::ShadowReport(report.clone()),
        }];
        let c = store
            .apply(
                &t("d1", Topic::Stream(Stream::Events)),
                &batch("d1", Stream::Events, &events),
                NOW,
            )
            .unwrap();
        assert!(c.contains(&Change::Event {
            device: "d1".into(),
            event: "shadow_report".into()
        }));
        assert_eq!(store.device("d1").unwrap().shadow, Some(report));

        let sample = |id| SampleRecord {
            id,
            ts_ms: NOW,
            bundle_version: "1.0.0".into(),
            features: [("petal_length".to_string(), json!(6.2))].into(),
            content_type: None,
            raw_base64: None,
            output: OutputSummary::default(),
        };
        let topic = t("d1", Topic::Stream(Stream::Samples));
        let first: Vec<_> = (1..=(MAX_SAMPLES_PER_DEVICE - 1)).map(sample).collect();
        store
            .apply(&topic, &batch("d1", Stream::Samples, &first), NOW)
            .unwrap();
        store
            .apply(
                &topic,
                &batch(
                    "d1",
                    Stream::Samples,
                    &[
                        sample(MAX_SAMPLES_PER_DEVICE),
                        sample(MAX_SAMPLES_PER_DEVICE + 1),
                    ],
                ),
                NOW,
            )
            .unwrap();
        let kept = store.samples("d1");
        assert_eq!(kept.len() as u64, MAX_SAMPLES_PER_DEVICE);
        assert_eq!(kept[0].id, 2);
        assert_eq!(kept.last().unwrap().id, MAX_SAMPLES_PER_DEVICE + 1);
        assert_eq!(store.device("d1").unwrap().samples, MAX_SAMPLES_PER_DEVICE);
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        let (_dir, store) = store();
        let status_topic = t("d1", Topic::Status);
        let cases: [(&str, Vec<u8>, &str); 8] = [
            (
                "ferry/v2/plant/d1/status",
                to_json(&status("d1", 1)),
                "unknown_topic",
            ),
            (
                &t("a+b", Topic::Status),
                to_json(&status("a+b", 1)),
                "bad_name",
            ),
            (&status_topic, b"\xff not json".to_vec(), "not_json"),
            (
                &status_topic,
                to_json(&json!({"schema": 2})),
                "unsupported_schema",
            ),
            (
                &status_topic,
                to_json(&json!({"schema": 1, "device": "d1"})),
                "invalid",
            ),
            (&status_topic, to_json(&status("d2", 1)), "wrong_topic"),
            (
                &t("d1", Topic::Stream(Stream::Drift)),
                batch("d1", Stream::Telemetry, &[telemetry(1, NOW, true)]),
                "wrong_topic",
            ),
            (
                &t("d1", Topic::Stream(Stream::Telemetry)),
                batch(
                    "d1",
                    Stream::Telemetry,
                    &[json!({"id": 1}), json!({"no": "id"})],
                ),
                "bad_record",
            ),
        ];
        for (topic, payload, code) in &cases {
            let before = store.stats().rejected.get(*code).copied().unwrap_or(0);
            assert!(
                store.apply(topic, payload, NOW).unwrap().is_empty(),
                "{code}"
            );
            assert!(
                store.stats().rejected[*code] > before,
                "{code}: {:?}",
                store.stats()
            );
        }
        assert!(store.devices().is_empty());
        // Commands are ignored, not refused.
        store.apply(&t("all", Topic::Command), b"{}", NOW).unwrap();
        assert_eq!(store.stats().ignored, 1);
        // A bad record does not stop the good ones next to it.
        let mixed = batch(
            "d1",
            Stream::Telemetry,
            &[json!({"id": 1}), to_value(telemetry(2, NOW, true))],
        );
        assert_eq!(
            store
                .apply(&t("d1", Topic::Stream(Stream::Telemetry)), &mixed, NOW)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(store.device("d1").unwrap().rate(NOW, 60_000).requests, 1);
    }

    fn to_value<T: Serialize>(v: T) -> Value {
        serde_json::to_value(v).unwrap()
    }

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        {
            let store = Store::open(&path).unwrap();
            store
                .apply(&t("d1", Topic::Status), &to_json(&status("d1", 10)), NOW)
                .unwrap();
            for id in [1, 2] {
                store
                    .apply(
                        &t("d1", Topic::Stream(Stream::Drift)),
                        &batch("d1", Stream::Drift, &[drift(id, true)]),
                        NOW,
                    )
                    .unwrap();
            }
            // A second handle is refused while the first is open.
            let e = Store::open(&path).unwrap_err();
            assert_eq!(e.code(), "locked", "{e}");
        }
        let store = Store::open(&path).unwrap();
        assert!(store.device("d1").unwrap().online);
        assert_eq!(store.drift_history(None, 10).len(), 2);
        // The sequence continues: the next window sorts last.
        store
            .apply(
                &t("d2", Topic::Stream(Stream::Drift)),
                &batch("d2", Stream::Drift, &[drift(1, false)]),
                NOW,
            )
            .unwrap();
        assert_eq!(store.drift_history(None, 1)[0].device, "d2");
        // Duplicates are still recognised after the restart.
        assert!(
            store
                .apply(
                    &t("d1", Topic::Stream(Stream::Drift)),
                    &batch("d1", Stream::Drift, &[drift(2, true)]),
                    NOW
                )
                .unwrap()
                .is_empty()
        );
    }
    #[test]
    fn an_unknown_layout_version_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        {
            let store = Store::open(&path).unwrap();
            let v = store.tree.get(LAYOUT_KEY).unwrap().unwrap();
            assert_eq!(
                v.as_ref(),
                LAYOUT_VERSION.to_be_bytes(),
                "written on creation"
            );
            store
                .apply(&t("d1", Topic::Status), &to_json(&status("d1", 10)), NOW)
                .unwrap();
            // What a newer console would leave behind.
            store
                .tree
                .insert(LAYOUT_KEY, &(LAYOUT_VERSION + 1).to_be_bytes())
                .unwrap();
        }
        let e = Store::open(&path).unwrap_err();
        assert_eq!(e.code(), "unknown_layout", "{e}");
        assert!(
            matches!(&e, StoreError::UnknownLayout { found, .. } if *found == (LAYOUT_VERSION + 1).to_string()),
            "{e:?}"
        );
        assert!(e.to_string().contains("key layout version 2"), "{e}");
        // Left as it was; a database from before the key existed (same
        // layout, no key) opens and gets the key.
        {
            let db = sled::Config::new().path(&path).open().unwrap();
            let tree = db.open_tree(TREE).unwrap();
            let v = tree.get(LAYOUT_KEY).unwrap().unwrap();
            assert_eq!(v.as_ref(), (LAYOUT_VERSION + 1).to_be_bytes());
            assert!(tree.get(device_key("d1")).unwrap().is_some());
            tree.remove(LAYOUT_KEY).unwrap();
            db.flush().unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert!(store.device("d1").unwrap().online);
        let v = store.tree.get(LAYOUT_KEY).unwrap().unwrap();
        assert_eq!(v.as_ref(), LAYOUT_VERSION.to_be_bytes());
    }

    #[test]
    fn episodes_are_kept_in_their_own_tree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        {
            let store = Store::open(&path).unwrap();
            store.save_episode("rt-2", &json!({"id": "rt-2"})).unwrap();
            store.save_episode("rt-1", &json!({"id": "rt-1"})).unwrap();
            store
                .save_episode("rt-1", &json!({"id": "rt-1", "v": 2}))
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let all: Vec<Value> = store.episodes().unwrap();
        assert_eq!(all, [json!({"id": "rt-1", "v": 2}), json!({"id": "rt-2"})]);
        assert!(store.devices().is_empty());
    }
}
