//! Ferry's MQTT protocol: topic names and message types, shared by the edge
//! agent (`ferry-agent`, which publishes them) and the fleet console
//! (`ferry-fleet`, which reads them). Human-readable reference:
//! `docs/mqtt-protocol.md`; this crate is the source of truth.
//!
//! # Layout
//! - topics: [`Topic`], [`Stream`], [`topic`], [`command_topics`], [`parse_topic`].
//! - device → fleet: [`Status`], [`Batch`] of [`TelemetryRecord`],
//!   [`DriftRecord`], [`SampleRecord`] or [`EventRecord`].
//! - fleet → device: [`Command`].
//! - update channels: [`ChannelIndex`].
//! - limits: [`MAX_MESSAGE_BYTES`], [`MAX_NAME_LEN`] ([`validate_name`]).
//!
//! Only the wire format lives here: connecting (broker URLs, TLS,
//! reconnects, PUBACK bookkeeping) is `ferry-link`'s.
//!
//! # Changing these types
//! Every payload is JSON with a `schema` field ([`SCHEMA_VERSION`]).
//! Do not rename or remove fields and do not change their meaning; add new
//! fields at the end with `#[serde(default)]` (old readers ignore them, new
//! readers see the default in old messages). A change that cannot follow
//! these rules bumps [`SCHEMA_VERSION`] *and* the `v1` in the topic prefix,
//! so old and new devices can share a broker during a migration.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of every payload below.
pub const SCHEMA_VERSION: u32 = 1;

/// Prefix of every topic.
pub const TOPIC_ROOT: &str = "ferry/v1";

/// The pseudo-device that addresses every device of a fleet in commands.
pub const ALL_DEVICES: &str = "all";

/// Largest MQTT payload a device publishes: AWS IoT Core refuses messages
/// above 128 KB, the smallest limit among the brokers Ferry targets.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;

/// Device ids and fleet names: 1 to 128 characters of `[A-Za-z0-9_.-]`. The
/// limit keeps every topic short and free of MQTT wildcards and separators;
/// `all` is reserved.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a device id or fleet name.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} must be 1 to {MAX_NAME_LEN} characters, got {name:?}"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{what} {name:?} contains {c:?}; allowed: letters, digits, '_', '.', '-'"
        ));
    }
    if name == ALL_DEVICES && what == "device id" {
        return Err(format!(
            "device id {ALL_DEVICES:?} is reserved for fleet-wide commands"
        ));
    }
    Ok(())
}

/// The kinds of buffered records a device publishes, each on its own topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// One record per prediction.
    Telemetry,
    /// One record per drift window.
    Drift,
    /// Sampled raw inputs, for retraining.
    Samples,
    /// Installs, rollbacks, alerts, shadow results, rejected commands.
    Events,
}

impl Stream {
    pub const ALL: [Stream; 4] = [
        Stream::Telemetry,
        Stream::Drift,
        Stream::Samples,
        Stream::Events,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Telemetry => "telemetry",
            Stream::Drift => "drift",
            Stream::Samples => "samples",
            Stream::Events => "events",
        }
    }
}

/// Every topic a device publishes to or listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// Retained; also the last will (`online: false`).
    Status,
    Stream(Stream),
    /// Commands to one device (or, with device `all`, to the fleet).
    Command,
}

impl Topic {
    pub fn suffix(self) -> &'static str {
        match self {
            Topic::Status => "status",
            Topic::Stream(s) => s.as_str(),
            Topic::Command => "cmd",
        }
    }
}

/// `ferry/v1/<fleet>/<device>/<suffix>`.
pub fn topic(fleet: &str, device: &str, t: Topic) -> String {
    format!("{TOPIC_ROOT}/{fleet}/{device}/{}", t.suffix())
}

/// The two command topics a device subscribes to: its own and the fleet's.
pub fn command_topics(fleet: &str, device: &str) -> [String; 2] {
    [
        topic(fleet, device, Topic::Command),
        topic(fleet, ALL_DEVICES, Topic::Command),
    ]
}

/// `ferry/v1/<fleet>/#`: everything of a fleet, for consoles.
pub fn fleet_filter(fleet: &str) -> String {
    format!("{TOPIC_ROOT}/{fleet}/#")
}

/// Splits a topic into (fleet, device, topic); `None` for anything else.
pub fn parse_topic(t: &str) -> Option<(&str, &str, Topic)> {
    let rest = t.strip_prefix(TOPIC_ROOT)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let (fleet, device, suffix) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let topic = match suffix {
        "status" => Topic::Status,
        "cmd" => Topic::Command,
        "telemetry" => Topic::Stream(Stream::Telemetry),
        "drift" => Topic::Stream(Stream::Drift),
        "samples" => Topic::Stream(Stream::Samples),
        "events" => Topic::Stream(Stream::Events),
        _ => return None,
    };
    Some((fleet, device, topic))
}

/// Identity of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    pub name: String,
    pub version: String,
    /// SHA-256 (hex) of the bundle file: what a download is checked against.
    pub digest: String,
    pub fleet: String,
    pub channel: String,
    pub sequence: u64,
    /// SHA-256 (hex) of the signed manifest: the release's identity, which
    /// re-signing or adding signatures does not change. Empty from agents
    /// older than 0.4.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release: String,
}

impl BundleRef {
    /// Whether two refs name the same release (by manifest hash when both
    /// know it, else by file digest).
    pub fn same_release(&self, other: &BundleRef) -> bool {
        if !self.release.is_empty() && !other.release.is_empty() {
            self.release == other.release
        } else {
            self.digest == other.digest
        }
    }
}

/// What the update machinery is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum UpdateState {
    #[default]
    Idle,
    Downloading {
        version: String,
        received: u64,
        total: u64,
    },
    Verifying {
        version: String,
    },
    /// The last candidate was refused; `code` is stable, `reason` is for people.
    Rejected {
        version: String,
        code: String,
        reason: String,
        /// SHA-256 of the refused bundle, when known (added after schema 1
        /// shipped: absent from older agents).
        #[serde(default)]
        digest: Option<String>,
    },
    /// Activated recently; being watched for errors before it counts as good.
    Probation {
        version: String,
    },
}

/// Buffer occupancy and losses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BufferInfo {
    pub records: u64,
    pub bytes: u64,
    pub budget_bytes: u64,
    /// Records dropped because the buffer was full, by stream, since the
    /// buffer was created (persisted).
    pub dropped: BTreeMap<Stream, u64>,
    /// Records found corrupt (checksum) and skipped.
    pub corrupt: u64,
}

/// A candidate running in shadow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowInfo {
    pub candidate: BundleRef,
    pub compared: u64,
    pub target: u64,
}

/// The retained `status` message. The last will is the same message with
/// `online: false` and only the identity fields meaningful.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub schema: u32,
    pub device: String,
    pub fleet: String,
    pub online: bool,
    pub agent_version: String,
    /// Unix milliseconds when this status was produced.
    pub ts_ms: u64,
    #[serde(default)]
    pub bundle: Option<BundleRef>,
    /// Kept for rollback.
    #[serde(default)]
    pub previous: Option<BundleRef>,
    #[serde(default)]
    pub update: UpdateState,
    #[serde(default)]
    pub buffer: BufferInfo,
    #[serde(default)]
    pub predictions: u64,
    #[serde(default)]
    pub errors: u64,
    #[serde(default)]
    pub uptime_s: u64,
    #[serde(default)]
    pub shadow: Option<ShadowInfo>,
}

impl Status {
    /// The last will: the device went away without saying goodbye.
    pub fn offline(fleet: &str, device: &str, agent_version: &str) -> Status {
        Status {
            schema: SCHEMA_VERSION,
            device: device.to_string(),
            fleet: fleet.to_string(),
            online: false,
            agent_version: agent_version.to_string(),
            ts_ms: 0,
            bundle: None,
            previous: None,
            update: UpdateState::Idle,
            buffer: BufferInfo::default(),
            predictions: 0,
            errors: 0,
            uptime_s: 0,
            shadow: None,
        }
    }
}

/// A message on a stream topic: records from the device's buffer.
///
/// Delivery is at least once: a batch may arrive twice (after a reconnect).
/// Receivers drop duplicates by `message_id`, or per record by `(device,
/// record id)`: record ids increase strictly per device and are never reused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch<T> {
    pub schema: u32,
    pub stream: Stream,
    /// `<device>:<stream>:<first id>-<last id>`.
    pub message_id: String,
    pub device: String,
    pub fleet: String,
    /// Unix milliseconds when the batch was published.
    pub sent_ms: u64,
    pub records: Vec<T>,
}

/// The message id of a batch.
pub fn message_id(device: &str, stream: Stream, first: u64, last: u64) -> String {
    format!("{device}:{}:{first}-{last}", stream.as_str())
}

/// The summary of a model output kept per prediction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutputSummary {
    /// Top-1 class index (classifiers: argmax of the first float output).
    #[serde(default)]
    pub top1: Option<u32>,
    /// Its score (probability or logit, as the model produced it).
    #[serde(default)]
    pub score: Option<f64>,
    /// First value of the first output (regressors).
    #[serde(default)]
    pub value: Option<f64>,
}

/// One prediction (or one failed request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRecord {
    pub id: u64,
    pub ts_ms: u64,
    pub bundle_version: String,
    pub latency_us: u64,
    pub ok: bool,
    #[serde(default)]
    pub output: OutputSummary,
    /// Stable error code when `ok` is false.
    #[serde(default)]
    pub error: Option<String>,
    /// Rows in the request (batch size).
    #[serde(default)]
    pub rows: u32,
}

/// One feature's drift over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureDrift {
    pub name: String,
    /// `numeric` or `categorical`.
    pub kind: String,
    /// The statistic the verdict is based on (`psi`, `ks`, ...).
    pub method: String,
    /// Its value (`null` when the window had no usable values).
    pub value: Option<f64>,
    pub threshold: f64,
    pub drifted: bool,
    #[serde(default)]
    pub psi: Option<f64>,
    #[serde(default)]
    pub rows: u64,
    #[serde(default)]
    pub missing: u64,
}

/// One drift window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftRecord {
    pub id: u64,
    pub ts_ms: u64,
    pub bundle_version: String,
    pub bundle_digest: String,
    pub window_start_ms: u64,
    /// Predictions in the window.
    pub rows: u64,
    pub features: Vec<FeatureDrift>,
    pub drifted_features: u32,
    pub share: f64,
    pub dataset_drifted: bool,
}

/// A sampled input, for retraining.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub id: u64,
    pub ts_ms: u64,
    pub bundle_version: String,
    /// Features as the bundle's preprocessing extracted them (numbers, or
    /// strings for categorical features; `null` for missing).
    pub features: BTreeMap<String, serde_json::Value>,
    /// The raw request, base64, when raw samples are enabled and it fits the cap.
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub raw_base64: Option<String>,
    /// Top-1 output, for labelling.
    #[serde(default)]
    pub output: OutputSummary,
}

/// Something happened on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: u64,
    pub ts_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// The events a device reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// A new bundle passed every check and serves requests.
    UpdateInstalled {
        bundle: BundleRef,
        previous: Option<BundleRef>,
    },
    /// A candidate was refused; the running bundle keeps serving.
    UpdateRejected {
        version: String,
        digest: Option<String>,
        code: String,
        reason: String,
    },
    /// The device went back to an earlier bundle.
    RolledBack {
        from: Option<BundleRef>,
        to: BundleRef,
        reason: String,
        automatic: bool,
    },
    /// A feature crossed its drift threshold in a window.
    DriftAlert {
        bundle_version: String,
        features: Vec<String>,
        share: f64,
        dataset_drifted: bool,
    },
    /// Shadow evaluation finished (or was stopped).
    ShadowReport(ShadowReport),
    /// A command was refused.
    CommandRejected { command_id: String, reason: String },
    /// The agent started.
    Started {
        agent_version: String,
        bundle: Option<BundleRef>,
    },
    /// The telemetry buffer could not be opened (its files are damaged): it
    /// was moved aside to `moved_to` (kept for inspection) and an empty one
    /// created. What it held is not sent; predictions never stopped.
    BufferRecovered { moved_to: String, reason: String },
    /// Channel metadata or a root from the channel was refused
    /// (`metadata_expired`, `metadata_rollback`, `metadata_signature`,
    /// `unsigned_metadata`, `root_version`...); the running release stays.
    /// Sent once per new reason, not at every poll.
    MetadataRejected { code: String, reason: String },
    /// The root of trust was replaced by the next version from the channel.
    RootRotated { version: u64 },
    /// An event this reader does not know (from a newer agent): readers
    /// ignore what they do not know instead of refusing the whole batch.
    #[serde(other)]
    Unknown,
}

/// How a shadow candidate compared with the active bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowReport {
    pub candidate: BundleRef,
    pub active: BundleRef,
    /// Requests both answered.
    pub compared: u64,
    /// Requests the candidate failed on (the active one answered).
    pub candidate_errors: u64,
    /// Share of compared requests with the same top-1 class (`null` for
    /// non-classifiers).
    pub top1_agreement: Option<f64>,
    /// Mean absolute difference of the first output, element-wise.
    pub mean_abs_diff: Option<f64>,
    pub active_latency_us_p50: u64,
    pub candidate_latency_us_p50: u64,
    pub candidate_latency_us_p99: u64,
    /// True when the report was sent because of `shadow_stop` before `samples`.
    pub stopped_early: bool,
}

/// An ed25519 signature by an operator key (the root's `operator` role; with
/// a root derived from `trusted_keys`, a key the device trusts for bundles).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorSignature {
    /// Hex key id (as `ferry inspect` prints).
    pub key_id: String,
    /// Base64 of the 64-byte signature over [`Command::signing_bytes`].
    pub signature: String,
}

/// A command from the fleet, on `.../<device>/cmd` or `.../all/cmd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub schema: u32,
    /// Unique per command; echoed in events about it.
    pub id: String,
    /// Unix milliseconds when the operator issued it; signed commands older
    /// than the agent's `max_command_age` are refused (replay).
    pub issued_ms: u64,
    #[serde(flatten)]
    pub action: Action,
    /// One signature (the form of agents before 0.4; still accepted).
    #[serde(default)]
    pub signature: Option<OperatorSignature>,
    /// Signatures by distinct operator keys, up to the root's `operator`
    /// threshold. Each signs [`Command::signing_bytes`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<OperatorSignature>,
}

/// What a command asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    /// Poll the update channel now.
    CheckUpdate,
    /// Install this bundle (checked like a channel update, but it may go
    /// below the running sequence or a rollback's floor; a downgrade pins the
    /// device until `unpin`). Needs operator signatures.
    Install { url: String, digest: String },
    /// Go back to the previous bundle. Needs operator signatures and names
    /// the release it leaves (`from`: its manifest hash, or its file digest),
    /// so a captured rollback cannot undo a later release.
    Rollback {
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        from: Option<String>,
    },
    /// Lift the pin an operator's downgrade set: the channel may update the
    /// device again. Needs operator signatures.
    Unpin,
    /// Run a candidate in shadow on live inputs for `samples` requests.
    ShadowStart {
        url: String,
        digest: String,
        samples: u64,
    },
    /// Stop shadowing and report what was measured so far.
    ShadowStop,
    /// Publish status now.
    Ping,
}

impl Command {
    /// Domain separation: the prefix of every signed command, so that a
    /// command signature can never pass for a bundle signature (whose
    /// context, `ferry-bundle-v1`, is ferry-format's) or the reverse.
    pub const SIGNING_CONTEXT: &'static [u8] = b"ferry-command-v1\0";

    /// Every signature the command carries (`signature` and `signatures`).
    pub fn all_signatures(&self) -> Vec<&OperatorSignature> {
        self.signature
            .iter()
            .chain(self.signatures.iter())
            .collect()
    }

    /// Whether the action changes the device or makes it fetch from a URL
    /// the command names: such commands need operator signatures. `ping`
    /// and `check_update` (a poll of the configured channel) do not.
    pub fn needs_signature(&self) -> bool {
        !matches!(self.action, Action::Ping | Action::CheckUpdate)
    }

    /// The bytes an operator signs: context, fleet, target device (or
    /// `all`), id, time and the action as JSON (serde_json writes struct
    /// fields in declaration order, so this is stable).
    pub fn signing_bytes(&self, fleet: &str, device: &str) -> Vec<u8> {
        let mut out = Self::SIGNING_CONTEXT.to_vec();
        for part in [fleet, device, &self.id, &self.issued_ms.to_string()] {
            out.extend_from_slice(part.as_bytes());
            out.push(0);
        }
        out.extend_from_slice(&serde_json::to_vec(&self.action).expect("actions serialise"));
        out
    }
}

/// The index an update channel serves (`index.json` next to the bundles).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelIndex {
    pub schema: u32,
    pub fleet: String,
    pub channel: String,
    pub latest: IndexEntry,
    /// Signed channel metadata: grows with every publish; a device refuses
    /// a version below the highest it has seen (0 in unsigned indexes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u64,
    /// Signed channel metadata: Unix ms when it was signed. A device never
    /// believes a time earlier than the newest it has seen.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub issued_ms: u64,
    /// Signed channel metadata: Unix ms after which a device refuses it
    /// (`metadata_expired`) and keeps its current release.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expires_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The envelope type of signed channel metadata (a DSSE envelope whose
/// payload is a [`ChannelIndex`] as JSON).
pub const CHANNEL_PAYLOAD_TYPE: &str = "application/vnd.ferry.channel+json";

/// The latest bundle of a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub sequence: u64,
    /// SHA-256 (hex) of the bundle file.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Absolute, or relative to the index's own URL / directory.
    pub url: String,
    /// SHA-256 (hex) of the release's signed manifest (its identity; see
    /// [`BundleRef::release`]). Empty in indexes written before 0.4.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn topics_round_trip() {
        for t in [
            Topic::Status,
            Topic::Command,
            Topic::Stream(Stream::Telemetry),
            Topic::Stream(Stream::Drift),
            Topic::Stream(Stream::Samples),
            Topic::Stream(Stream::Events),
        ] {
            let s = topic("plant-7", "dev-1", t);
            assert_eq!(parse_topic(&s), Some(("plant-7", "dev-1", t)));
        }
        assert_eq!(parse_topic("ferry/v1/a/b/c/d"), None);
        assert_eq!(parse_topic("ferry/v2/a/b/status"), None);
        assert_eq!(parse_topic("ferry/v1/a/b/other"), None);
        assert_eq!(parse_topic("ferry/v1/a/b"), None);
        assert_eq!(parse_topic("ferry/v1a/b/status"), None);
        assert_eq!(parse_topic(""), None);
    }

    #[test]
    fn topic_names_are_fixed() {
        // The wire names: changing one is a protocol break (see the header).
        assert_eq!(
            topic("plant", "dev-1", Topic::Status),
            "ferry/v1/plant/dev-1/status"
        );
        assert_eq!(
            topic("plant", "dev-1", Topic::Command),
            "ferry/v1/plant/dev-1/cmd"
        );
        let streams: Vec<_> = Stream::ALL
            .iter()
            .map(|s| topic("p", "d", Topic::Stream(*s)))
            .collect();
        assert_eq!(
            streams,
            [
                "ferry/v1/p/d/telemetry",
                "ferry/v1/p/d/drift",
                "ferry/v1/p/d/samples",
                "ferry/v1/p/d/events"
            ]
        );
        for s in Stream::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
            assert_eq!(Topic::Stream(s).suffix(), s.as_str());
        }
        assert_eq!(
            command_topics("plant", "dev-1"),
            ["ferry/v1/plant/dev-1/cmd", "ferry/v1/plant/all/cmd"]
        );
        assert_eq!(fleet_filter("plant"), "ferry/v1/plant/#");
        assert_eq!(
            parse_topic("ferry/v1/plant/all/cmd"),
            Some(("plant", ALL_DEVICES, Topic::Command))
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("device id", "dev-1.a_b").is_ok());
        assert!(validate_name("device id", "").is_err());
        assert!(validate_name("device id", "a/b").is_err());
        assert!(validate_name("device id", "a+").is_err());
        assert!(validate_name("device id", "a#").is_err());
        assert!(validate_name("device id", "a b").is_err());
        assert!(validate_name("device id", "é").is_err());
        assert!(validate_name("device id", "all").is_err());
        // `all` is reserved for devices only.
        assert!(validate_name("fleet", "all").is_ok());
        assert!(validate_name("fleet", &"x".repeat(129)).is_err());
    }

    #[test]
    fn name_limits_are_exact() {
        assert_eq!(MAX_NAME_LEN, 128);
        assert!(validate_name("fleet", &"x".repeat(MAX_NAME_LEN)).is_ok());
        assert!(validate_name("device id", &"x".repeat(MAX_NAME_LEN)).is_ok());
        let e = validate_name("fleet", &"x".repeat(MAX_NAME_LEN + 1)).unwrap_err();
        assert!(e.starts_with("fleet must be 1 to 128 characters"), "{e}");
        let e = validate_name("device id", "").unwrap_err();
        assert!(e.starts_with("device id must be 1 to 128"), "{e}");
        let e = validate_name("device id", "a/b").unwrap_err();
        assert!(e.contains("contains '/'"), "{e}");
        let e = validate_name("device id", "all").unwrap_err();
        assert!(e.contains("reserved"), "{e}");
        // The longest topic stays far below MQTT's limits.
        let long = "x".repeat(MAX_NAME_LEN);
        assert!(topic(&long, &long, Topic::Stream(Stream::Telemetry)).len() < 300);
        assert_eq!(MAX_MESSAGE_BYTES, 131_072);
    }

    #[test]
    fn message_ids_name_device_stream_and_range() {
        assert_eq!(
            message_id("dev-1", Stream::Telemetry, 1, 20),
            "dev-1:telemetry:1-20"
        );
        assert_eq!(message_id("d", Stream::Events, 7, 7), "d:events:7-7");
        assert_eq!(
            message_id("d", Stream::Samples, 0, u64::MAX),
            format!("d:samples:0-{}", u64::MAX)
        );
    }

    fn bundle(version: &str) -> BundleRef {
        BundleRef {
            name: "iris".into(),
            version: version.into(),
            digest: "ab".repeat(32),
            fleet: "plant".into(),
            channel: "stable".into(),
            sequence: 3,
            release: String::new(),
        }
    }

    fn round_trip<T>(value: &T) -> serde_json::Value
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let v = serde_json::to_value(value).unwrap();
        let back: T = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(&back, value);
        v
    }

    /// Adds a field no reader knows, at the top level.
    fn with_unknown(mut v: serde_json::Value) -> serde_json::Value {
        v.as_object_mut()
            .unwrap()
            .insert("added_later".into(), json!({"x": [1, 2]}));
        v
    }

    fn status() -> Status {
        let mut s = Status::offline("plant", "dev-1", "0.1.0");
        s.online = true;
        s.ts_ms = 1_700_000_000_000;
        s.bundle = Some(bundle("1.1.0"));
        s.previous = Some(bundle("1.0.0"));
        s.update = UpdateState::Rejected {
            version: "1.2.0".into(),
            code: "signature".into(),
            reason: "no trusted key".into(),
            digest: Some("cd".into()),
        };
        s.buffer = BufferInfo {
            records: 5,
            bytes: 500,
            budget_bytes: 1 << 20,
            dropped: BTreeMap::from([(Stream::Samples, 2)]),
            corrupt: 1,
        };
        s.predictions = 9;
        s.errors = 1;
        s.uptime_s = 60;
        s.shadow = Some(ShadowInfo {
            candidate: bundle("1.2.0"),
            compared: 4,
            target: 100,
        });
        s
    }

    #[test]
    fn status_round_trips_and_ignores_unknown_fields() {
        let s = status();
        let v = round_trip(&s);
        assert_eq!(v["update"]["state"], "rejected");
        assert_eq!(v["buffer"]["dropped"]["samples"], 2);
        let back: Status = serde_json::from_value(with_unknown(v)).unwrap();
        assert_eq!(back, s);
        // The last will: only the identity fields matter.
        let will = Status::offline("plant", "dev-1", "0.1.0");
        assert!(!will.online);
        assert_eq!(will.schema, SCHEMA_VERSION);
        round_trip(&will);
        for u in [
            UpdateState::Idle,
            UpdateState::Downloading {
                version: "2".into(),
                received: 1,
                total: 2,
            },
            UpdateState::Verifying {
                version: "2".into(),
            },
            UpdateState::Probation {
                version: "2".into(),
            },
        ] {
            round_trip(&u);
        }
    }

    #[test]
    fn old_statuses_read_with_defaults() {
        // What a minimal (or older) agent sends: every defaulted field absent,
        // and a rejection without the digest added after schema 1 shipped.
        let v = json!({
            "schema": 1, "device": "dev-1", "fleet": "plant", "online": true,
            "agent_version": "0.0.9", "ts_ms": 5,
        });
        let s: Status = serde_json::from_value(v).unwrap();
        assert_eq!(s.update, UpdateState::Idle);
        assert_eq!(s.buffer, BufferInfo::default());
        assert_eq!((s.bundle, s.shadow, s.predictions), (None, None, 0));
        let u: UpdateState = serde_json::from_value(json!({
            "state": "rejected", "version": "1", "code": "c", "reason": "r",
        }))
        .unwrap();
        assert!(matches!(u, UpdateState::Rejected { digest: None, .. }));
    }

    #[test]
    fn batches_round_trip_and_ignore_unknown_fields() {
        let telemetry = Batch {
            schema: SCHEMA_VERSION,
            stream: Stream::Telemetry,
            message_id: message_id("dev-1", Stream::Telemetry, 1, 2),
            device: "dev-1".into(),
            fleet: "plant".into(),
            sent_ms: 10,
            records: vec![
                TelemetryRecord {
                    id: 1,
                    ts_ms: 9,
                    bundle_version: "1.0.0".into(),
                    latency_us: 120,
                    ok: true,
                    output: OutputSummary {
                        top1: Some(2),
                        score: Some(0.9),
                        value: None,
                    },
                    error: None,
                    rows: 1,
                },
                TelemetryRecord {
                    id: 2,
                    ts_ms: 9,
                    bundle_version: "1.0.0".into(),
                    latency_us: 80,
                    ok: false,
                    output: OutputSummary::default(),
                    error: Some("input_shape".into()),
                    rows: 0,
                },
            ],
        };
        let mut v = round_trip(&telemetry);
        assert_eq!(v["stream"], "telemetry");
        v["records"][0]["future"] = json!(1);
        let back: Batch<TelemetryRecord> = serde_json::from_value(with_unknown(v)).unwrap();
        assert_eq!(back, telemetry);
        // A record with only the required fields.
        let r: TelemetryRecord = serde_json::from_value(json!({
            "id": 3, "ts_ms": 1, "bundle_version": "1", "latency_us": 5, "ok": true,
        }))
        .unwrap();
        assert_eq!(
            (r.output, r.error, r.rows),
            (OutputSummary::default(), None, 0)
        );

        let drift = DriftRecord {
            id: 4,
            ts_ms: 5,
            bundle_version: "1.0.0".into(),
            bundle_digest: "ab".into(),
            window_start_ms: 1,
            rows: 500,
            features: vec![FeatureDrift {
                name: "petal_length".into(),
                kind: "numeric".into(),
                method: "psi".into(),
                value: Some(0.3),
                threshold: 0.2,
                drifted: true,
                psi: Some(0.3),
                rows: 500,
                missing: 0,
            }],
            drifted_features: 1,
            share: 0.25,
            dataset_drifted: false,
        };
        let v = round_trip(&drift);
        assert_eq!(
            serde_json::from_value::<DriftRecord>(with_unknown(v)).unwrap(),
            drift
        );

        let sample = SampleRecord {
            id: 6,
            ts_ms: 7,
            bundle_version: "1.0.0".into(),
            features: BTreeMap::from([
                ("a".to_string(), json!(1.5)),
                ("colour".to_string(), json!("red")),
                ("gap".to_string(), serde_json::Value::Null),
            ]),
            content_type: Some("application/json".into()),
            raw_base64: Some("e30=".into()),
            output: OutputSummary {
                top1: None,
                score: None,
                value: Some(3.5),
            },
        };
        let v = round_trip(&sample);
        assert_eq!(
            serde_json::from_value::<SampleRecord>(with_unknown(v)).unwrap(),
            sample
        );
    }

    #[test]
    fn events_are_tagged() {
        let e = EventRecord {
            id: 3,
            ts_ms: 9,
            event: Event::CommandRejected {
                command_id: "c".into(),
                reason: "r".into(),
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "command_rejected");
        assert_eq!(v["id"], 3);
        let back: EventRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn every_event_round_trips_and_ignores_unknown_fields() {
        let events = [
            (
                Event::UpdateInstalled {
                    bundle: bundle("2"),
                    previous: Some(bundle("1")),
                },
                "update_installed",
            ),
            (
                Event::UpdateRejected {
                    version: "2".into(),
                    digest: None,
                    code: "signature".into(),
                    reason: "r".into(),
                },
                "update_rejected",
            ),
            (
                Event::RolledBack {
                    from: Some(bundle("2")),
                    to: bundle("1"),
                    reason: "errors".into(),
                    automatic: true,
                },
                "rolled_back",
            ),
            (
                Event::DriftAlert {
                    bundle_version: "1".into(),
                    features: vec!["a".into()],
                    share: 0.5,
                    dataset_drifted: true,
                },
                "drift_alert",
            ),
            (
                Event::ShadowReport(ShadowReport {
                    candidate: bundle("2"),
                    active: bundle("1"),
                    compared: 10,
                    candidate_errors: 0,
                    top1_agreement: Some(0.9),
                    mean_abs_diff: None,
                    active_latency_us_p50: 100,
                    candidate_latency_us_p50: 110,
                    candidate_latency_us_p99: 300,
                    stopped_early: false,
                }),
                "shadow_report",
            ),
            (
                Event::CommandRejected {
                    command_id: "c".into(),
                    reason: "r".into(),
                },
                "command_rejected",
            ),
            (
                Event::Started {
                    agent_version: "0.1.0".into(),
                    bundle: None,
                },
                "started",
            ),
        ];
        for (i, (event, tag)) in events.into_iter().enumerate() {
            let record = EventRecord {
                id: i as u64 + 1,
                ts_ms: 5,
                event,
            };
            let v = round_trip(&record);
            assert_eq!(v["event"], tag);
            assert_eq!(
                serde_json::from_value::<EventRecord>(with_unknown(v)).unwrap(),
                record,
                "{tag}"
            );
        }
    }

    #[test]
    fn command_json_shape() {
        let c: Command = serde_json::from_str(
            r#"{"schema":1,"id":"c1","issued_ms":5,"action":"install","url":"http://x/b.ferry","digest":"ab"}"#,
        )
        .unwrap();
        assert_eq!(
            c.action,
            Action::Install {
                url: "http://x/b.ferry".into(),
                digest: "ab".into()
            }
        );
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["action"], "install");
        // The signed bytes depend on the target and the action.
        assert_ne!(c.signing_bytes("f", "d1"), c.signing_bytes("f", "d2"));
    }

    fn command(action: Action) -> Command {
        Command {
            schema: SCHEMA_VERSION,
            id: "c1".into(),
            issued_ms: 5,
            action,
            signature: None,
            signatures: Vec::new(),
        }
    }

    #[test]
    fn every_command_round_trips_and_ignores_unknown_fields() {
        let actions = [
            (Action::CheckUpdate, "check_update"),
            (
                Action::Install {
                    url: "u".into(),
                    digest: "d".into(),
                },
                "install",
            ),
            (
                Action::Rollback {
                    reason: Some("bad".into()),
                    from: Some("ab".repeat(32)),
                },
                "rollback",
            ),
            (
                Action::ShadowStart {
                    url: "u".into(),
                    digest: "d".into(),
                    samples: 100,
                },
                "shadow_start",
            ),
            (Action::ShadowStop, "shadow_stop"),
            (Action::Ping, "ping"),
        ];
        for (action, tag) in actions {
            let mut c = command(action);
            c.signature = Some(OperatorSignature {
                key_id: "k".into(),
                signature: "s".into(),
            });
            let v = round_trip(&c);
            assert_eq!(v["action"], tag);
            assert_eq!(
                serde_json::from_value::<Command>(with_unknown(v)).unwrap(),
                c,
                "{tag}"
            );
        }
        // Optional parts may be absent.
        let c: Command = serde_json::from_value(json!({
            "schema": 1, "id": "c", "issued_ms": 1, "action": "rollback",
        }))
        .unwrap();
        assert_eq!(
            c.action,
            Action::Rollback {
                reason: None,
                from: None
            }
        );
        assert_eq!(c.signature, None);
    }

    #[test]
    fn signing_bytes_are_stable() {
        // Operators' signatures are made over exactly these bytes: any
        // change here invalidates every signed command in flight.
        let c = command(Action::Install {
            url: "http://x/b.ferry".into(),
            digest: "ab".into(),
        });
        // Context, then fleet, device, id and time, each NUL-terminated,
        // then the action's JSON.
        let expected = [
            &b"ferry-command-v1\0"[..],
            b"plant\0dev-1\0c1\0",
            b"5\0",
            br#"{"action":"install","url":"http://x/b.ferry","digest":"ab"}"#,
        ]
        .concat();
        assert_eq!(c.signing_bytes("plant", "dev-1"), expected);
        assert_eq!(Command::SIGNING_CONTEXT, b"ferry-command-v1\0");
        assert_eq!(
            command(Action::Ping).signing_bytes("plant", ALL_DEVICES),
            [
                &b"ferry-command-v1\0plant\0all\0c1\0"[..],
                b"5\0",
                br#"{"action":"ping"}"#,
            ]
            .concat()
        );
        // The signature itself is not signed; everything else is.
        let mut signed = c.clone();
        signed.signature = Some(OperatorSignature {
            key_id: "k".into(),
            signature: "s".into(),
        });
        assert_eq!(signed.signing_bytes("plant", "dev-1"), expected);
        let mut later = c.clone();
        later.issued_ms = 6;
        assert_ne!(later.signing_bytes("plant", "dev-1"), expected);
        let mut other = c.clone();
        other.id = "c2".into();
        assert_ne!(other.signing_bytes("plant", "dev-1"), expected);
        assert_ne!(c.signing_bytes("plant2", "dev-1"), expected);
    }

    #[test]
    fn channel_index_round_trips_and_ignores_unknown_fields() {
        let index = ChannelIndex {
            schema: SCHEMA_VERSION,
            version: 0,
            issued_ms: 0,
            expires_ms: 0,
            fleet: "plant".into(),
            channel: "stable".into(),
            latest: IndexEntry {
                name: "iris".into(),
                version: "1.0.0".into(),
                sequence: 3,
                digest: "ab".into(),
                size: 1234,
                url: "iris-1.0.0.ferry".into(),
                release: "cd".repeat(32),
            },
        };
        let mut v = round_trip(&index);
        v["latest"]["mirrors"] = json!(["a"]);
        assert_eq!(
            serde_json::from_value::<ChannelIndex>(with_unknown(v)).unwrap(),
            index
        );
    }
}
