//! Shadow evaluation: a candidate bundle runs on copies of live requests on
//! its own thread and never answers them. Requests are handed over through a
//! bounded queue; when it is full the request is simply not shadowed, so the
//! candidate can never slow the active model down. After `target` compared
//! requests (or on `shadow_stop`) a [`ShadowReport`] is published: top-1
//! agreement for classifiers, mean absolute difference of the first output,
//! the candidate's failures and both latencies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_protocol::{BundleRef, OutputSummary, ShadowInfo, ShadowReport};
use ferry_runtime::{ResponseForm, Session};

use crate::observe::summarize;

/// Largest `samples` a shadow run accepts: bounds the latency samples kept
/// (8 bytes each) to under 1 MiB.
pub const MAX_SHADOW_SAMPLES: u64 = 100_000;

/// What the active bundle answered, for comparison.
#[derive(Debug, Clone)]
pub struct ActiveAnswer {
    pub summary: OutputSummary,
    /// The first floating-point output, flattened.
    pub values: Vec<f64>,
    pub latency: Duration,
}

struct Job {
    content_type: String,
    body: Vec<u8>,
    /// The form the active bundle answered in: the candidate answers in the
    /// same one, so their latencies cover the same work.
    form: ResponseForm,
    active: ActiveAnswer,
}

#[derive(Default)]
struct Tally {
    compared: u64,
    candidate_errors: u64,
    top1_total: u64,
    top1_same: u64,
    diff_sum: f64,
    diff_count: u64,
    active_us: Vec<u64>,
    candidate_us: Vec<u64>,
}

/// A running shadow evaluation.
pub struct Shadow {
    pub candidate: BundleRef,
    pub active: BundleRef,
    target: u64,
    tx: Mutex<Option<SyncSender<Job>>>,
    tally: Arc<Mutex<Tally>>,
    compared: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
}

impl Shadow {
    /// Starts the worker. `on_report` is called once, from the worker thread,
    /// when `target` requests were compared or [`stop`](Self::stop) is called.
    pub fn start(
        session: Arc<Session>,
        candidate: BundleRef,
        active: BundleRef,
        target: u64,
        queue: usize,
        on_report: Box<dyn FnOnce(ShadowReport) + Send>,
    ) -> Arc<Shadow> {
        let (tx, rx) = sync_channel(queue.max(1));
        let shadow = Arc::new(Shadow {
            candidate,
            active,
            target: target.clamp(1, MAX_SHADOW_SAMPLES),
            tx: Mutex::new(Some(tx)),
            tally: Arc::new(Mutex::new(Tally::default())),
            compared: Arc::new(AtomicU64::new(0)),
            done: Arc::new(AtomicBool::new(false)),
        });
        let worker = shadow.clone();
        std::thread::Builder::new()
            .name("ferry-shadow".into())
            .spawn(move || worker.run(rx, session, on_report))
            .expect("spawning the shadow worker");
        shadow
    }

    /// Offers a request to the candidate; false when it was not taken (queue
    /// full or the run is over).
    pub fn offer(
        &self,
        content_type: &str,
        body: &[u8],
        form: ResponseForm,
        active: ActiveAnswer,
    ) -> bool {
        if self.done.load(Ordering::Relaxed) {
            return false;
        }
        let guard = self.tx.lock().unwrap();
        let Some(tx) = guard.as_ref() else {
            return false;
        };
        let job = Job {
            content_type: content_type.to_string(),
            body: body.to_vec(),
            form,
            active,
        };
        match tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Ends the run early; the report says `stopped_early`.
    pub fn stop(&self) {
        self.tx.lock().unwrap().take();
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    pub fn info(&self) -> ShadowInfo {
        ShadowInfo {
            candidate: self.candidate.clone(),
            compared: self.compared.load(Ordering::Relaxed),
            target: self.target,
        }
    }

    fn run(
        self: Arc<Self>,
        rx: Receiver<Job>,
        session: Arc<Session>,
        on_report: Box<dyn FnOnce(ShadowReport) + Send>,
    ) {
        let mut stopped_early = true;
        while let Ok(job) = rx.recv() {
            let start = Instant::now();
            let mut seen: Option<(OutputSummary, Vec<f64>)> = None;
            // A candidate with more outputs than `.npy` holds answers the nearest binary form.
            let form = session
                .response_form(Some(job.form.media_type()))
                .unwrap_or(ResponseForm::Tensors);
            let result = session.infer_with(&job.content_type, &job.body, form, &mut |obs| {
                let (summary, _) = summarize(obs.outputs);
                seen = Some((summary, first_float(obs.outputs)));
            });
            let latency = start.elapsed();
            let mut t = self.tally.lock().unwrap();
            t.compared += 1;
            t.active_us.push(job.active.latency.as_micros() as u64);
            match (result, seen) {
                (Ok(_), Some((summary, values))) => {
                    t.candidate_us.push(latency.as_micros() as u64);
                    if let (Some(a), Some(b)) = (job.active.summary.top1, summary.top1) {
                        t.top1_total += 1;
                        t.top1_same += (a == b) as u64;
                    }
                    if !values.is_empty() && values.len() == job.active.values.len() {
                        let sum: f64 = values
                            .iter()
                            .zip(&job.active.values)
                            .map(|(a, b)| (a - b).abs())
                            .sum();
                        t.diff_sum += sum / values.len() as f64;
                        t.diff_count += 1;
                    }
                }
                _ => t.candidate_errors += 1,
            }
            self.compared.store(t.compared, Ordering::Relaxed);
            if t.compared >= self.target {
                stopped_early = false;
                break;
            }
        }
        self.done.store(true, Ordering::Relaxed);
        self.tx.lock().unwrap().take();
        let mut t = std::mem::take(&mut *self.tally.lock().unwrap());
        let report = ShadowReport {
            candidate: self.candidate.clone(),
            active: self.active.clone(),
            compared: t.compared,
            candidate_errors: t.candidate_errors,
            top1_agreement: (t.top1_total > 0).then(|| t.top1_same as f64 / t.top1_total as f64),
            mean_abs_diff: (t.diff_count > 0).then(|| t.diff_sum / t.diff_count as f64),
            active_latency_us_p50: percentile(&mut t.active_us, 0.5),
            candidate_latency_us_p50: percentile(&mut t.candidate_us, 0.5),
            candidate_latency_us_p99: percentile(&mut t.candidate_us, 0.99),
            stopped_early,
        };
        on_report(report);
    }
}

/// The first floating-point output, flattened (empty when there is none).
pub fn first_float(outputs: &[ferry_runtime::Tensor]) -> Vec<f64> {
    use ferry_runtime::DType;
    outputs
        .iter()
        .find(|t| matches!(t.dtype, DType::F32 | DType::F64))
        .map(|t| t.to_f64_vec())
        .unwrap_or_default()
}

fn percentile(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&mut v, 0.5), 51);
        assert_eq!(percentile(&mut v, 0.99), 99);
        assert_eq!(percentile(&mut [], 0.5), 0);
    }
}
