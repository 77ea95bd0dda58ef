//! The inference pipeline: request → guest preprocess (sandbox) → tensors →
//! model (tract) → tensors → guest postprocess → response JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_guest_abi::{FeatureKind, Features, Tensor, TensorSet, Value};

use ferry_drift::{DriftKind, DriftValue};
use ferry_format::{BundleError, GoldenExample, Manifest, ReadLimits, VerifiedBundle, role};

use crate::error::{Error, GuestError};
use crate::golden::{Mismatch, compare_json};
use crate::model::Model;
use crate::sandbox::{GuestRuntime, SandboxLimits};
use ferry_format::TrustPolicy;

/// The drift statistics' kind of a guest's feature kind.
pub fn drift_kind(kind: FeatureKind) -> DriftKind {
    {
        match kind {
            FeatureKind::Numeric => DriftKind::Numeric,
            FeatureKind::Categorical => DriftKind::Categorical,
        }
    }
}

/// A guest's feature value as the drift statistics take it (NaN is missing).
pub fn drift_value(v: &Value) -> DriftValue<'_> {
    match v {
        Value::Num(x) => DriftValue::Num(*x),
        Value::Cat(s) => DriftValue::Cat(s),
    }
}

/// What an observer sees of one inference.
#[derive(Debug)]
pub struct Observation<'a> {
    /// The request's feature values, as the guest extracted them.
    pub features: Option<&'a Features>,
    /// The model's outputs.
    pub outputs: &'a [Tensor],
    /// Time from request to response.
    pub latency: Duration,
}

/// Sees every successful inference (telemetry, drift). Called on the
/// inference thread after the response is ready: keep it short (push to a
/// channel or a buffer). A session without an observer pays nothing for it.
pub trait Observer: Send + Sync {
    fn observe(&self, observation: &Observation<'_>);
}

/// How long each loading step took.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadTimings {
    pub verify: Duration,
    pub guest: Duration,
    pub model: Duration,
    pub total: Duration,
}

/// A loaded bundle, ready to serve. Cheap to share across threads (`&self`).
pub struct Session {
    manifest: Manifest,
    digest: String,
    golden: Vec<GoldenExample>,
    baseline: Option<ferry_drift::Baseline>,
    guest: GuestRuntime,
    model: Model,
    observer: Option<Arc<dyn Observer>>,
    timings: LoadTimings,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.manifest.name)
            .field("digest", &self.digest)
            .finish()
    }
}

/// Result of one golden example.
#[derive(Debug, Clone)]
pub struct GoldenOutcome {
    pub name: String,
    /// Empty when the example passed.
    pub mismatches: Vec<Mismatch>,
    /// Set when the pipeline failed instead of answering.
    pub error: Option<String>,
}

impl GoldenOutcome {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty() && self.error.is_none()
    }
}

/// The guest of a bundle alone, for extracting features (drift, baselines)
/// without loading the model.
pub struct Preprocessor {
    guest: GuestRuntime,
}

impl std::fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preprocessor").finish()
    }
}

impl Preprocessor {
    /// Compiles the bundle's guest.
    pub fn from_verified(bundle: &VerifiedBundle) -> Result<Preprocessor, Error> {
        Ok(Preprocessor {
            guest: guest_of(bundle)?,
        })
    }

    /// The tensors and features of a request.
    pub fn preprocess(&self, content_type: &str, body: &[u8]) -> Result<TensorSet, Error> {
        decode_preprocessed(&self.guest.preprocess(content_type, body)?)
    }
}

fn guest_of(bundle: &VerifiedBundle) -> Result<GuestRuntime, Error> {
    let m = bundle.manifest();
    let wasm = bundle
        .content(role::GUEST)
        .ok_or(BundleError::MissingArtifact(role::GUEST))?;
    // Precompiled guests are native code: the format crate hands them out
    // only from a bundle whose signature was checked (not from
    // `verify_integrity_only`, nor a packager's draft).
    let precompiled = bundle.precompiled_guests();
    let limits = SandboxLimits {
        memory_bytes: m.limits.memory_bytes,
        timeout_ms: m.limits.timeout_ms,
    };
    Ok(GuestRuntime::new(
        wasm,
        &precompiled,
        m.pipeline.config_json.as_bytes(),
        limits,
    )?)
}

fn decode_preprocessed(encoded: &[u8]) -> Result<TensorSet, Error> {
    TensorSet::decode(encoded).map_err(|e| {
        GuestError::Failed(format!("preprocess returned an invalid tensor set: {e}")).into()
    })
}

impl Session {
    /// Verifies a bundle and loads it.
    pub fn load(bytes: &[u8], trust: &TrustPolicy) -> Result<Session, Error> {
        let start = Instant::now();
        let bundle = ferry_format::verify(bytes, trust, &ReadLimits::default())?;
        let verify = start.elapsed();
        let mut session = Session::from_verified(bundle)?;
        session.timings.verify = verify;
        session.timings.total = start.elapsed();
        Ok(session)
    }

    /// Loads a bundle that was already verified.
    pub fn from_verified(bundle: VerifiedBundle) -> Result<Session, Error> {
        let start = Instant::now();
        let onnx = bundle
            .content(role::MODEL)
            .ok_or(BundleError::MissingArtifact(role::MODEL))?;
        // Guest compilation and model optimisation are independent: overlap them.
        let (guest, guest_time, model, model_time) = std::thread::scope(|s| {
            let model_thread = s.spawn(|| {
                let t = Instant::now();
                (Model::load(onnx), t.elapsed())
            });
            let t = Instant::now();
            let guest = guest_of(&bundle);
            let guest_time = t.elapsed();
            let (model, model_time) = model_thread.join().expect("model loading panicked");
            (guest, guest_time, model, model_time)
        });
        let model = model?;
        let guest = guest?;
        let golden = bundle.golden()?;
        let baseline = bundle.baseline()?;
        let (manifest, digest) = bundle.into_identity();
        Ok(Session {
            manifest,
            digest,
            golden,
            baseline,
            guest,
            model,
            observer: None,
            timings: LoadTimings {
                verify: Duration::ZERO,
                guest: guest_time,
                model: model_time,
                total: start.elapsed(),
            },
        })
    }

    /// Attaches an observer that sees every successful inference.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Session {
        self.observer = Some(observer);
        self
    }

    /// The bundle's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the bundle file, hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The drift baseline carried by the bundle.
    pub fn baseline(&self) -> Option<&ferry_drift::Baseline> {
        self.baseline.as_ref()
    }

    /// How long loading took.
    pub fn timings(&self) -> LoadTimings {
        self.timings
    }

    /// Whether the guest was loaded from a precompiled artifact.
    pub fn used_precompiled_guest(&self) -> bool {
        self.guest.used_precompiled
    }

    /// How the guest runs: the target it was precompiled for (the host's
    /// triple, or `pulley32`/`pulley64`: interpreted), or `compiled` here.
    pub fn guest_target(&self) -> &'static str {
        self.guest.precompiled_target.unwrap_or("compiled")
    }

    /// Runs preprocessing only: the tensors and features of a request.
    pub fn preprocess(&self, content_type: &str, body: &[u8]) -> Result<TensorSet, Error> {
        decode_preprocessed(&self.guest.preprocess(content_type, body)?)
    }

    /// Runs the whole pipeline on a request and returns the JSON response.
    pub fn infer(&self, content_type: &str, body: &[u8]) -> Result<Vec<u8>, Error> {
        match &self.observer {
            None => self.infer_inner(content_type, body, None),
            Some(o) => self.infer_inner(content_type, body, Some(&mut |obs| o.observe(obs))),
        }
    }

    /// Like [`infer`](Self::infer), with an observer for this call only (the
    /// session's own observer, if any, is not called). Lets a caller tie what
    /// it sees to its own request (the agent's telemetry, shadow comparisons).
    pub fn infer_with(
        &self,
        content_type: &str,
        body: &[u8],
        observe: &mut dyn FnMut(&Observation<'_>),
    ) -> Result<Vec<u8>, Error> {
        self.infer_inner(content_type, body, Some(observe))
    }

    fn infer_inner(
        &self,
        content_type: &str,
        body: &[u8],
        observer: Option<&mut dyn FnMut(&Observation<'_>)>,
    ) -> Result<Vec<u8>, Error> {
        let start = Instant::now();
        let set = self.preprocess(content_type, body)?;
        let outputs = self.model.run(&set.tensors)?;
        let encoded = TensorSet {
            tensors: outputs,
            features: None,
        }
        .encode();
        let response = self.guest.postprocess(&encoded)?;
        if let Some(observer) = observer {
            // Decoding again is cheaper than cloning the tensors on every
            // call when nobody observes.
            let outputs = TensorSet::decode(&encoded)
                .map(|s| s.tensors)
                .unwrap_or_default();
            observer(&Observation {
                features: set.features.as_ref(),
                outputs: &outputs,
                latency: start.elapsed(),
            });
        }
        Ok(response)
    }

    /// Runs the model alone on tensors (no guest), for benchmarks and tools.
    pub fn run_model(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        Ok(self.model.run(tensors)?)
    }

    /// Runs every golden example carried by the bundle.
    pub fn check_golden(&self) -> Vec<GoldenOutcome> {
        self.golden.iter().map(|g| self.check_example(g)).collect()
    }

    /// Runs one golden example.
    pub fn check_example(&self, g: &GoldenExample) -> GoldenOutcome {
        let outcome = |mismatches, error| GoldenOutcome {
            name: g.name.clone(),
            mismatches,
            error,
        };
        let expected: serde_json::Value = match serde_json::from_str(&g.expected_json) {
            Ok(v) => v,
            Err(e) => return outcome(vec![], Some(format!("expected output is not JSON: {e}"))),
        };
        match self.infer(&g.content_type, &g.input) {
            Err(e) => outcome(vec![], Some(e.to_string())),
            Ok(body) => match serde_json::from_slice::<serde_json::Value>(&body) {
                Err(e) => outcome(vec![], Some(format!("response is not JSON: {e}"))),
                Ok(actual) => outcome(compare_json(&expected, &actual, g.tolerance), None),
            },
        }
    }

    /// Names of model outputs left out because of their element type.
    pub fn dropped_outputs(&self) -> &[String] {
        self.model.dropped_outputs()
    }
}
