//! What each prediction leaves behind: a summary of the model's output (for
//! telemetry), a sample of its features (for retraining) and a row in the
//! drift window.
//!
//! The drift window measures the live inputs against the baseline inside the
//! active bundle with the statistics and rules of `ferry drift`
//! (`ferry_runtime::compare`). It closes after `window_predictions`
//! predictions, or after `window_seconds` once it holds `min_rows` rows
//! (a window with less evidence stays open rather than give a verdict on
//! noise). It keeps the most recent `max_rows` rows, so memory is bounded
//! whatever the traffic: about `max_rows × features × 8` bytes, plus up to
//! `samples_on_drift` rows kept for upload. Closed windows are evaluated on a
//! worker thread, never on the request path.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_protocol::{
    DriftRecord, Event, EventRecord, FeatureDrift, OutputSummary, SampleRecord, Stream,
};
use ferry_runtime::{
    Baseline, CurrentSample, DriftConfig, DriftValue, Features, Tensor, Value, compare,
};

use crate::buffer::Buffer;
use crate::config::DriftWindowConfig;
use crate::metrics::{FeatureLabel, Metrics};

pub use ferry_host::now_ms;

/// The summary kept per prediction: the first floating-point output's first
/// row (argmax and max for a vector, the value for a scalar), and the batch
/// size. Integer outputs (labels) are ignored: scores say more.
pub fn summarize(outputs: &[Tensor]) -> (OutputSummary, u32) {
    use ferry_runtime::DType;
    let Some(t) = outputs
        .iter()
        .find(|t| matches!(t.dtype, DType::F32 | DType::F64) && !t.data.is_empty())
        .or_else(|| outputs.first())
    else {
        return (OutputSummary::default(), 0);
    };
    let rows = if t.shape.len() >= 2 {
        t.shape[0].max(1)
    } else {
        1
    };
    let values = t.to_f64_vec();
    let per_row = values.len() / rows as usize;
    let first = &values[..per_row.min(values.len())];
    let mut summary = OutputSummary {
        value: first.first().copied().filter(|v| v.is_finite()),
        ..OutputSummary::default()
    };
    if first.len() > 1 {
        let (i, max) = first
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .fold(
                (0usize, f64::NEG_INFINITY),
                |a, b| if b.1 > a.1 { b } else { a },
            );
        if max.is_finite() {
            summary.top1 = Some(i as u32);
            summary.score = Some(max);
        }
    }
    (summary, rows.min(u32::MAX as u64) as u32)
}

/// Features of one row as JSON (numbers, strings, `null` for missing).
pub fn row_json(features: &Features, row: usize) -> BTreeMap<String, serde_json::Value> {
    values_json(features.names.iter().map(|(n, _)| n), &features.rows[row])
}

/// Feature values with their names as JSON (numbers, strings, `null` for
/// missing).
fn values_json<'a>(
    names: impl Iterator<Item = &'a String>,
    row: &[Value],
) -> BTreeMap<String, serde_json::Value> {
    names
        .zip(row)
        .map(|(name, v)| {
            let json = match v {
                Value::Num(x) if x.is_finite() => serde_json::json!(x),
                Value::Num(_) => serde_json::Value::Null,
                Value::Cat(s) => serde_json::Value::String(s.clone()),
            };
            (name.clone(), json)
        })
        .collect()
}

/// The bundle a window belongs to.
#[derive(Debug, Clone)]
pub struct WindowOwner {
    pub version: String,
    pub digest: String,
    pub baseline: Arc<Baseline>,
    pub config: DriftConfig,
}

struct Window {
    owner: WindowOwner,
    sample: CurrentSample,
    started: Instant,
    started_ms: u64,
    seen: u64,
    /// Guest feature names → baseline order, for the last seen name list.
    mapping: Option<(Vec<String>, Vec<Option<usize>>)>,
    /// The latest rows as the guest gave them (in the order of the names
    /// in `mapping`), turned into JSON only if the window drifts: the
    /// request path only copies values.
    recent: VecDeque<Vec<Value>>,
}

impl Window {
    fn new(owner: WindowOwner, max_rows: usize) -> Window {
        let sample = CurrentSample::new(&owner.baseline, max_rows);
        Window {
            owner,
            sample,
            started: Instant::now(),
            started_ms: now_ms(),
            seen: 0,
            mapping: None,
            recent: VecDeque::new(),
        }
    }
}

/// A window ready to be evaluated.
struct Closed {
    window: Window,
}

/// The drift window of the active bundle and the worker that evaluates it.
pub struct DriftMonitor {
    config: DriftWindowConfig,
    window: Mutex<Option<Window>>,
    tx: SyncSender<Closed>,
    /// The latest report, for `GET /v1/drift`.
    latest: Arc<Mutex<Option<DriftRecord>>>,
}

impl DriftMonitor {
    /// Starts the evaluation worker. It appends drift records, alert events
    /// and samples to `buffer` and updates `metrics`.
    pub fn start(
        config: DriftWindowConfig,
        buffer: Arc<Buffer>,
        metrics: Arc<Metrics>,
    ) -> DriftMonitor {
        // Two windows waiting is plenty: windows close at most every
        // `window_predictions` requests, and evaluating one takes milliseconds.
        let (tx, rx) = sync_channel(2);
        let latest = Arc::new(Mutex::new(None));
        let worker_latest = latest.clone();
        let cfg = config.clone();
        std::thread::Builder::new()
            .name("ferry-drift".into())
            .spawn(move || worker(rx, cfg, buffer, metrics, worker_latest))
            .expect("spawning the drift worker");
        DriftMonitor {
            config,
            window: Mutex::new(None),
            tx,
            latest,
        }
    }

    /// Starts measuring for a newly active bundle (drops the old window: its
    /// rows were judged against another baseline). `None`: the bundle has no
    /// baseline, nothing is measured.
    pub fn reset(&self, owner: Option<WindowOwner>) {
        let w = owner.map(|o| Window::new(o, self.config.max_rows));
        *self.window.lock().unwrap() = w;
    }

    /// Adds a request's feature rows. Cheap: pushes into the window and, when
    /// it is full, hands it to the worker.
    pub fn observe(&self, features: &Features) {
        let mut guard = self.window.lock().unwrap();
        let Some(w) = guard.as_mut() else { return };
        if w.mapping.as_ref().is_none_or(|(names, _)| {
            names.len() != features.names.len()
                || names.iter().zip(&features.names).any(|(a, (b, _))| a != b)
        }) {
            let names: Vec<String> = features.names.iter().map(|(n, _)| n.clone()).collect();
            let order = w
                .owner
                .baseline
                .features
                .iter()
                .map(|f| names.iter().position(|n| *n == f.name))
                .collect();
            w.mapping = Some((names, order));
        }
        let order = &w.mapping.as_ref().expect("set above").1;
        let missing = Value::Num(f64::NAN);
        let keep = self.config.samples_on_drift;
        for row in &features.rows {
            let ordered: Vec<DriftValue<'_>> = order
                .iter()
                .map(|i| ferry_runtime::drift_value(i.map_or(&missing, |i| &row[i])))
                .collect();
            if w.sample.push_row(&ordered).is_ok() {
                w.seen += 1;
            }
            if self.config.upload_samples_on_drift && keep > 0 {
                if w.recent.len() == keep {
                    w.recent.pop_front();
                }
                w.recent.push_back(row.clone());
            }
        }
        if w.seen >= self.config.window_predictions {
            self.close(&mut guard);
        }
    }

    /// Closes the window if its time is up and it has enough rows. Called
    /// every second or so by the agent.
    pub fn tick(&self) {
        let mut guard = self.window.lock().unwrap();
        let due = guard.as_ref().is_some_and(|w| {
            w.started.elapsed() >= Duration::from_secs(self.config.window_seconds)
                && w.seen >= self.config.min_rows.max(1)
        });
        if due {
            self.close(&mut guard);
        }
    }

    fn close(&self, guard: &mut Option<Window>) {
        let Some(w) = guard.take() else { return };
        let next = Window::new(w.owner.clone(), self.config.max_rows);
        *guard = Some(next);
        if w.seen < self.config.min_rows {
            return;
        }
        match self.tx.try_send(Closed { window: w }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!("Drift worker is behind; a window was skipped")
            }
            Err(TrySendError::Disconnected(_)) => tracing::error!("Drift worker is gone"),
        }
    }

    /// The latest evaluated window.
    pub fn latest(&self) -> Option<DriftRecord> {
        self.latest.lock().unwrap().clone()
    }
}

fn worker(
    rx: Receiver<Closed>,
    config: DriftWindowConfig,
    buffer: Arc<Buffer>,
    metrics: Arc<Metrics>,
    latest: Arc<Mutex<Option<DriftRecord>>>,
) {
    while let Ok(Closed { window: w }) = rx.recv() {
        let report = match compare(&w.owner.baseline, &w.sample, &w.owner.config) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, bundle = %w.owner.version, "Drift window not evaluated");
                continue;
            }
        };
        metrics.drift_windows.inc();
        let features: Vec<FeatureDrift> = report
            .features
            .iter()
            .map(|f| FeatureDrift {
                name: f.name.clone(),
                kind: f.kind.as_str().to_string(),
                method: f.method.as_str().to_string(),
                value: f.value(),
                threshold: f.threshold,
                drifted: f.drifted,
                psi: f.psi,
                rows: f.current_rows as u64,
                missing: f.missing as u64,
            })
            .collect();
        for f in &features {
            let label = FeatureLabel {
                feature: f.name.clone(),
                statistic: f.method.clone(),
            };
            if let Some(v) = f.value {
                metrics.drift_score.get_or_create(&label).set(v);
            }
            metrics
                .drift_drifted
                .get_or_create(&label)
                .set(f.drifted as i64);
        }
        let ts_ms = now_ms();
        let mut record = DriftRecord {
            id: 0,
            ts_ms,
            bundle_version: w.owner.version.clone(),
            bundle_digest: w.owner.digest.clone(),
            window_start_ms: w.started_ms,
            rows: w.seen,
            features,
            drifted_features: report.drifted_features as u32,
            share: report.share,
            dataset_drifted: report.dataset_drifted,
        };
        let appended = buffer.append(Stream::Drift, |id| {
            record.id = id;
            serde_json::to_vec(&record).expect("drift records serialise")
        });
        if let Err(e) = appended {
            tracing::warn!(error = %e, "Drift report not buffered");
        }
        let drifted: Vec<String> = record
            .features
            .iter()
            .filter(|f| f.drifted)
            .map(|f| f.name.clone())
            .collect();
        if !drifted.is_empty() {
            tracing::warn!(features = ?drifted, share = report.share, bundle = %w.owner.version, "Drift detected");
            let event = Event::DriftAlert {
                bundle_version: w.owner.version.clone(),
                features: drifted,
                share: report.share,
                dataset_drifted: report.dataset_drifted,
            };
            append_event(&buffer, event);
            if config.upload_samples_on_drift {
                let names: &[String] = w.mapping.as_ref().map_or(&[], |(names, _)| names);
                for row in &w.recent {
                    let features = values_json(names.iter(), row);
                    let r = buffer.append(Stream::Samples, |id| {
                        serde_json::to_vec(&SampleRecord {
                            id,
                            ts_ms,
                            bundle_version: w.owner.version.clone(),
                            features,
                            content_type: None,
                            raw_base64: None,
                            output: OutputSummary::default(),
                        })
                        .expect("samples serialise")
                    });
                    if r.is_err() {
                        break;
                    }
                }
            }
        }
        *latest.lock().unwrap() = Some(record);
    }
}

/// Appends an event to the buffer (logging, never failing the caller).
pub fn append_event(buffer: &Buffer, event: Event) {
    let r = buffer.append(Stream::Events, |id| {
        serde_json::to_vec(&EventRecord {
            id,
            ts_ms: now_ms(),
            event,
        })
        .expect("events serialise")
    });
    if let Err(e) = r {
        tracing::warn!(error = %e, "Event not buffered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_of_classifier_and_regressor_outputs() {
        let probs = Tensor::from_f32("probabilities", vec![2, 3], &[0.1, 0.7, 0.2, 0.5, 0.3, 0.2]);
        let (s, rows) = summarize(&[probs]);
        assert_eq!((s.top1, rows), (Some(1), 2));
        assert!((s.score.unwrap() - 0.7).abs() < 1e-6);
        let reg = Tensor::from_f32("y", vec![1, 1], &[3.5]);
        let (s, rows) = summarize(&[reg]);
        assert_eq!((s.top1, s.value, rows), (None, Some(3.5), 1));
        assert_eq!(summarize(&[]).1, 0);
    }
}
