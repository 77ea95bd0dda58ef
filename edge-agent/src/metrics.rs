//! Prometheus metrics (`GET /metrics`, text format 0.0.4).
//!
//! Request-path metrics (predictions, errors, latency) are updated as they
//! happen; state owned elsewhere (buffer occupancy and drops, MQTT counters,
//! update state) is copied in by [`Metrics::encode`] at scrape time, so the
//! hot path pays nothing for it.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeatureLabel {
    pub feature: String,
    pub statistic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundleLabel {
    pub name: String,
    pub version: String,
    pub digest: String,
    /// The engine serving it (`tract`, `onnxruntime`).
    pub engine: String,
}

/// Everything the agent exposes.
pub struct Metrics {
    registry: Registry,
    pub predictions: Counter,
    pub errors: Family<CodeLabel, Counter>,
    /// Seconds from request to response, inference only (the HTTP layer's
    /// own time is not in it).
    pub latency: Histogram,
    buffer_records: Gauge,
    buffer_bytes: Gauge,
    buffer_budget: Gauge,
    buffer_dropped: Family<StreamLabel, Counter>,
    buffer_corrupt: Counter,
    /// Damaged buffers moved aside at start (0 or 1 per process).
    pub buffer_recovered: Counter,
    /// Latest drift statistic per feature (the one its rule uses).
    pub drift_score: Family<FeatureLabel, Gauge<f64, AtomicU64>>,
    /// 1 while a feature is over its threshold in the latest window.
    pub drift_drifted: Family<FeatureLabel, Gauge>,
    pub drift_windows: Counter,
    update_state: Family<StateLabel, Gauge>,
    pub updates_installed: Counter,
    pub updates_rejected: Family<CodeLabel, Counter>,
    pub rollbacks: Counter,
    /// Commands refused (signatures, replays, stale rollbacks...).
    pub commands_rejected: Counter,
    /// Channel metadata and roots refused, by reason code
    /// (`metadata_expired`, `metadata_rollback`, `metadata_signature`...).
    pub metadata_rejected: Family<CodeLabel, Counter>,
    /// The version of the root of trust in force (0: derived from trusted_keys).
    pub root_version: Gauge,
    bundle: Family<BundleLabel, Gauge>,
    mqtt_connected: Gauge,
    mqtt_published: Counter,
    mqtt_acked: Counter,
    mqtt_reconnects: Counter,
    pub shadow_compared: Counter,
}

/// Values owned elsewhere, copied in at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub buffer: ferry_protocol::BufferInfo,
    pub update_state: &'static str,
    /// Name, version, digest and engine of the active bundle.
    pub bundle: Option<(String, String, String, String)>,
    pub mqtt_connected: bool,
    pub mqtt_published: u64,
    pub mqtt_acked_records: u64,
    pub mqtt_reconnects: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ferry");
        // 50 µs .. ~3.3 s: from a small tabular model to a large CNN on a slow board.
        let latency = Histogram::new(exponential_buckets(0.00005, 2.0, 17));
        let m = Metrics {
            registry: Registry::default(),
            predictions: Counter::default(),
            errors: Family::default(),
            latency,
            buffer_records: Gauge::default(),
            buffer_bytes: Gauge::default(),
            buffer_budget: Gauge::default(),
            buffer_dropped: Family::default(),
            buffer_corrupt: Counter::default(),
            buffer_recovered: Counter::default(),
            drift_score: Family::default(),
            drift_drifted: Family::default(),
            drift_windows: Counter::default(),
            update_state: Family::default(),
            updates_installed: Counter::default(),
            updates_rejected: Family::default(),
            rollbacks: Counter::default(),
            commands_rejected: Counter::default(),
            metadata_rejected: Family::default(),
            root_version: Gauge::default(),
            bundle: Family::default(),
            mqtt_connected: Gauge::default(),
            mqtt_published: Counter::default(),
            mqtt_acked: Counter::default(),
            mqtt_reconnects: Counter::default(),
            shadow_compared: Counter::default(),
        };
        let r = &mut registry;
        r.register(
            "predictions",
            "Successful predictions",
            m.predictions.clone(),
        );
        r.register(
            "prediction_errors",
            "Failed predictions by error code",
            m.errors.clone(),
        );
        r.register(
            "prediction_latency_seconds",
            "Inference time per request (guest + model)",
            m.latency.clone(),
        );
        r.register(
            "buffer_records",
            "Records waiting in the telemetry buffer",
            m.buffer_records.clone(),
        );
        r.register(
            "buffer_bytes",
            "Payload bytes in the telemetry buffer",
            m.buffer_bytes.clone(),
        );
        r.register(
            "buffer_budget_bytes",
            "Byte budget of the telemetry buffer",
            m.buffer_budget.clone(),
        );
        r.register(
            "buffer_dropped_records",
            "Records dropped because the buffer was full, by stream",
            m.buffer_dropped.clone(),
        );
        r.register(
            "buffer_recovered",
            "Damaged telemetry buffers moved aside and recreated at start",
            m.buffer_recovered.clone(),
        );
        r.register(
            "buffer_corrupt_records",
            "Buffer records that failed their checksum",
            m.buffer_corrupt.clone(),
        );
        r.register(
            "drift_score",
            "Latest drift statistic per feature (the one its rule uses)",
            m.drift_score.clone(),
        );
        r.register(
            "drift_drifted",
            "1 while a feature is over its drift threshold in the latest window",
            m.drift_drifted.clone(),
        );
        r.register(
            "drift_windows",
            "Drift windows evaluated",
            m.drift_windows.clone(),
        );
        r.register(
            "update_state",
            "1 for the update machinery's current state",
            m.update_state.clone(),
        );
        r.register(
            "updates_installed",
            "Bundles activated",
            m.updates_installed.clone(),
        );
        r.register(
            "updates_rejected",
            "Candidate bundles refused, by reason code",
            m.updates_rejected.clone(),
        );
        r.register(
            "rollbacks",
            "Returns to a previous bundle",
            m.rollbacks.clone(),
        );
        r.register(
            "commands_rejected",
            "Commands refused (signatures, replays, stale or malformed)",
            m.commands_rejected.clone(),
        );
        r.register(
            "metadata_rejected",
            "Channel metadata or roots refused, by reason code",
            m.metadata_rejected.clone(),
        );
        r.register(
            "root_version",
            "Version of the root of trust in force (0: derived from trusted_keys)",
            m.root_version.clone(),
        );
        r.register(
            "bundle_info",
            "The active bundle and the engine serving it (value 1)",
            m.bundle.clone(),
        );
        r.register(
            "mqtt_connected",
            "1 while connected to the broker",
            m.mqtt_connected.clone(),
        );
        r.register(
            "mqtt_published_batches",
            "Batches published",
            m.mqtt_published.clone(),
        );
        r.register(
            "mqtt_acked_records",
            "Records acknowledged by the broker",
            m.mqtt_acked.clone(),
        );
        r.register(
            "mqtt_reconnects",
            "Connection attempts after a failure",
            m.mqtt_reconnects.clone(),
        );
        r.register(
            "shadow_compared",
            "Requests answered by both the active and the shadow bundle",
            m.shadow_compared.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records one finished request.
    pub fn observe_request(&self, seconds: f64, error_code: Option<&str>) {
        match error_code {
            None => self.predictions.inc(),
            Some(code) => self
                .errors
                .get_or_create(&CodeLabel {
                    code: code.to_string(),
                })
                .inc(),
        };
        self.latency.observe(seconds);
    }

    /// The text exposition, after copying `snapshot` in.
    pub fn encode(&self, snapshot: &Snapshot) -> String {
        let b = &snapshot.buffer;
        self.buffer_records.set(b.records as i64);
        self.buffer_bytes.set(b.bytes as i64);
        self.buffer_budget.set(b.budget_bytes as i64);
        for (stream, n) in &b.dropped {
            let c = self.buffer_dropped.get_or_create(&StreamLabel {
                stream: stream.as_str().to_string(),
            });
            mirror(&c, *n);
        }
        mirror(&self.buffer_corrupt, b.corrupt);
        self.update_state.clear();
        self.update_state
            .get_or_create(&StateLabel {
                state: snapshot.update_state.to_string(),
            })
            .set(1);
        self.bundle.clear();
        if let Some((name, version, digest, engine)) = &snapshot.bundle {
            self.bundle
                .get_or_create(&BundleLabel {
                    name: name.clone(),
                    version: version.clone(),
                    digest: digest.clone(),
                    engine: engine.clone(),
                })
                .set(1);
        }
        self.mqtt_connected.set(snapshot.mqtt_connected as i64);
        mirror(&self.mqtt_published, snapshot.mqtt_published);
        mirror(&self.mqtt_acked, snapshot.mqtt_acked_records);
        mirror(&self.mqtt_reconnects, snapshot.mqtt_reconnects);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// Brings a counter up to a total kept elsewhere (counters only go up; the
/// totals copied in are monotonic too).
fn mirror(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// A monotonic total shared between threads, mirrored into a counter.
pub type Total = AtomicU64;

/// Reads a [`Total`].
pub fn total(t: &Total) -> u64 {
    t.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family() {
        let m = Metrics::new();
        m.observe_request(0.001, None);
        m.observe_request(0.002, Some("bad_input"));
        m.drift_score
            .get_or_create(&FeatureLabel {
                feature: "petal_length".into(),
                statistic: "psi".into(),
            })
            .set(0.4);
        let mut snap = Snapshot {
            update_state: "idle",
            ..Default::default()
        };
        snap.buffer
            .dropped
            .insert(ferry_protocol::Stream::Samples, 7);
        snap.mqtt_connected = true;
        let text = m.encode(&snap);
        for needle in [
            "ferry_predictions_total 1",
            "ferry_prediction_errors_total{code=\"bad_input\"} 1",
            "ferry_prediction_latency_seconds_bucket",
            "ferry_buffer_dropped_records_total{stream=\"samples\"} 7",
            "ferry_drift_score{feature=\"petal_length\",statistic=\"psi\"} 0.4",
            "ferry_update_state{state=\"idle\"} 1",
            "ferry_mqtt_connected 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        // Mirrored totals never go down or double count.
        snap.buffer
            .dropped
            .insert(ferry_protocol::Stream::Samples, 9);
        let text = m.encode(&snap);
        assert!(text.contains("ferry_buffer_dropped_records_total{stream=\"samples\"} 9"));
    }
}
