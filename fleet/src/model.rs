//! The fleet console's view of its devices: what the store keeps per device
//! and what the API and the dashboard show. Serialised as JSON by the API
//! and stored (JSON) in sled; persisted structs follow the usual rule: do
//! not rename or remove fields; add new ones with `#[serde(default)]`.

use std::collections::BTreeMap;

use ferry_protocol::{BundleRef, DriftRecord, EventRecord, ShadowReport, Stream, UpdateState};
use serde::{Deserialize, Serialize};

/// Width of the buckets that prediction and error rates are counted in.
pub const RATE_BUCKET_MS: u64 = 60_000;
/// Buckets kept per device (one hour of one-minute buckets).
pub const RATE_BUCKETS: usize = 60;
/// Drift windows kept per device for the heat map over time.
pub const DRIFT_HISTORY: usize = 200;
/// Events kept per device.
pub const EVENT_HISTORY: usize = 200;

/// Everything the console knows about one device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub device: String,
    pub fleet: String,
    /// From the retained status and the last will.
    pub online: bool,
    /// Unix ms of the latest message of any kind from the device.
    pub last_seen_ms: u64,
    pub agent_version: String,
    pub bundle: Option<BundleRef>,
    pub previous: Option<BundleRef>,
    #[serde(default)]
    pub update: UpdateState,
    /// Records waiting in the device's buffer (from its status).
    pub backlog: u64,
    /// Records the device dropped because its buffer was full, by stream.
    #[serde(default)]
    pub dropped: BTreeMap<Stream, u64>,
    /// Totals reported by the device's status.
    pub predictions: u64,
    pub errors: u64,
    /// Per-minute counts from telemetry records, oldest first (at most
    /// [`RATE_BUCKETS`]).
    #[serde(default)]
    pub rates: Vec<RateBucket>,
    /// The latest drift window.
    pub drift: Option<DriftRecord>,
    /// The latest shadow report.
    pub shadow: Option<ShadowReport>,
    /// Highest record id seen per stream (de-duplication watermark: record
    /// ids increase strictly per device, and a device re-sends in order).
    #[serde(default)]
    pub watermarks: BTreeMap<Stream, u64>,
    /// `ts_ms` of the latest status applied (the device's clock): a status
    /// with the same `ts_ms` is the same message delivered again (a
    /// retained status re-sent when the console subscribes).
    #[serde(default)]
    pub status_ts_ms: u64,
    /// Samples the console keeps for this device (at most
    /// [`crate::store::MAX_SAMPLES_PER_DEVICE`], oldest dropped first).
    #[serde(default)]
    pub samples: u64,
}

/// Telemetry counted over one bucket of [`RATE_BUCKET_MS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RateBucket {
    /// Unix ms at the start of the bucket.
    pub start_ms: u64,
    pub predictions: u64,
    pub errors: u64,
    /// Sum of latencies (µs) of the bucket's predictions.
    pub latency_us_sum: u64,
}

impl DeviceState {
    /// Predictions per minute and error rate over the buckets newer than
    /// `now_ms - window_ms`.
    pub fn rate(&self, now_ms: u64, window_ms: u64) -> Rate {
        let since = now_ms.saturating_sub(window_ms);
        let (mut n, mut e) = (0u64, 0u64);
        for b in self
            .rates
            .iter()
            .filter(|b| b.start_ms + RATE_BUCKET_MS > since)
        {
            n += b.predictions;
            e += b.errors;
        }
        let minutes = (window_ms as f64 / 60_000.0).max(1.0 / 60.0);
        Rate {
            requests_per_min: (n + e) as f64 / minutes,
            error_rate: if n + e == 0 {
                0.0
            } else {
                e as f64 / (n + e) as f64
            },
            requests: n + e,
        }
    }

    /// Names of the features over their threshold in the latest drift
    /// window (empty without one).
    pub fn drifted_features(&self) -> Vec<String> {
        self.drift
            .iter()
            .flat_map(|d| &d.features)
            .filter(|f| f.drifted)
            .map(|f| f.name.clone())
            .collect()
    }

    /// The drift statistic of `feature` in the latest window, if any.
    pub fn drift_value(&self, feature: &str, statistic: &str) -> Option<f64> {
        let f = self
            .drift
            .as_ref()?
            .features
            .iter()
            .find(|f| f.name == feature)?;
        match statistic {
            "psi" => f.psi,
            s if s == f.method => f.value,
            _ => None,
        }
    }
}

/// Request rate and error rate over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub requests_per_min: f64,
    pub error_rate: f64,
    pub requests: u64,
}

/// One drift window of one device, for the heat map over time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftPoint {
    pub device: String,
    pub record: DriftRecord,
}

/// One event of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceEvent {
    pub device: String,
    pub record: EventRecord,
}

/// What changed in the store (for live updates: SSE, rollouts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    Device {
        device: String,
    },
    Drift {
        device: String,
    },
    Event {
        device: String,
        event: String,
    },
    Rollout {
        id: String,
    },
    /// A release was submitted, approved or rejected.
    Release {
        id: String,
    },
}
