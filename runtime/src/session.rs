//! The inference pipeline: request → guest preprocess (sandbox) → tensors →
//! model (tract or onnxruntime) → tensors → guest postprocess → response JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_guest_abi::{FeatureKind, Features, Tensor, TensorSet, Value};

use ferry_drift::{DriftKind, DriftValue};
use ferry_format::{
    Artifact, BundleError, Extract, GoldenExample, Manifest, ReadLimits, VerifiedBundle, role,
};

use crate::engine::{
    Engine, EngineDecision, EngineModel, EngineOptions, auto_pick, engine_candidates, race,
    zero_tensors,
};
use crate::error::{Error, GuestError};
use crate::golden::{Mismatch, compare_json};
use crate::response::ResponseForm;
use crate::sandbox::{GuestRuntime, SandboxLimits, compatibility_key, runnable_targets};
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
    /// Measuring two engines under `auto` (zero otherwise).
    pub engine_race: Duration,
    pub total: Duration,
}

/// A loaded bundle, ready to serve. Cheap to share across threads (`&self`).
pub struct Session {
    manifest: Manifest,
    digest: String,
    golden: Vec<GoldenExample>,
    baseline: Option<ferry_drift::Baseline>,
    guest: GuestRuntime,
    model: EngineModel,
    /// What `auto` measured on load, when it had two engines to choose from.
    race: EngineRace,
    decision: EngineDecision,
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
        self.guest
            .preprocess_with(content_type, body, decode_preprocessed)?
    }
}

/// [`ferry_format::verify`] for running the bundle here: every artifact's
/// stored bytes are checked against the signed manifest (a bundle with any
/// byte changed is refused), but guests precompiled for targets this runtime
/// cannot load (another architecture, another Pulley width) are not
/// decompressed, and are never handed out.
pub fn verify_for_host(
    bytes: &[u8],
    trust: &TrustPolicy,
    limits: &ReadLimits,
) -> Result<VerifiedBundle, BundleError> {
    let runnable: Vec<String> = runnable_targets()
        .into_iter()
        .map(|t| compatibility_key(Some(t)))
        .collect();
    let runs_here = |a: &Artifact| {
        a.role == role::GUEST_PRECOMPILED && a.target.as_ref().is_some_and(|t| runnable.contains(t))
    };
    ferry_format::verify_selected(bytes, trust, limits, &|m: &Manifest, a: &Artifact| {
        if a.role == role::GUEST_PRECOMPILED {
            return if runs_here(a) {
                Extract::Now
            } else {
                Extract::CheckOnly
            };
        }
        // The portable guest is only needed when no precompiled one loads
        // (wasmtime refuses it, or there is none for this host).
        if a.role == role::GUEST && m.artifacts.iter().any(runs_here) {
            return Extract::OnDemand;
        }
        Extract::Now
    })
}

fn guest_of(bundle: &VerifiedBundle) -> Result<GuestRuntime, Error> {
    let m = bundle.manifest();
    // Precompiled guests are native code: the format crate hands them out
    // only from a bundle whose signature was checked (not from
    // `verify_integrity_only`, nor a packager's draft).
    let precompiled = bundle.precompiled_guests();
    let limits = SandboxLimits {
        memory_bytes: m.limits.memory_bytes,
        timeout_ms: m.limits.timeout_ms,
    };
    let config = m.pipeline.config_json.as_bytes();
    if bundle.content(role::GUEST).is_none() && !precompiled.is_empty() {
        // The portable guest was left compressed: try the precompiled ones
        // alone first, and decompress it only if none of them loads.
        match GuestRuntime::precompiled_only(&precompiled, config, limits) {
            Err(GuestError::NoRunnableGuest { .. }) => {}
            loaded => return Ok(loaded?),
        }
    }
    let wasm = bundle
        .extract(role::GUEST)?
        .ok_or(BundleError::MissingArtifact(role::GUEST))?;
    Ok(GuestRuntime::new(&wasm, &precompiled, config, limits)?)
}

/// Each engine `auto` measured on load and its median model run (`None`:
/// it failed to run).
pub type EngineRace = Vec<(Engine, Option<Duration>)>;

/// The model `auto` keeps: the only one loaded, or of two (tract first)
/// the one [`auto_pick`] prefers after [`race`] on the golden examples'
/// tensors (zeros of the inputs' shapes without examples). An engine that
/// failed to load or to run loses; when both failed to load, the first
/// one's error is returned.
fn pick_faster(
    models: Vec<Result<EngineModel, crate::ModelError>>,
    guest: &GuestRuntime,
    golden: &[GoldenExample],
    manifest: &Manifest,
) -> Result<(EngineModel, EngineRace), Error> {
    let mut loaded = Vec::new();
    let mut first_error = None;
    for m in models {
        match m {
            Ok(m) => loaded.push(m),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if loaded.len() < 2 {
        return match (loaded.pop(), first_error) {
            (Some(m), _) => Ok((m, Vec::new())),
            (None, Some(e)) => Err(e.into()),
            (None, None) => unreachable!("at least one engine is a candidate"),
        };
    }
    let mut sets: Vec<Vec<Tensor>> = golden
        .iter()
        .filter_map(|g| guest.preprocess(&g.content_type, &g.input).ok())
        .filter_map(|b| decode_preprocessed(&b).ok())
        .map(|s| s.tensors)
        .collect();
    if sets.is_empty() {
        sets.push(zero_tensors(&manifest.model.inputs));
    }
    let medians = race(&loaded.iter().collect::<Vec<_>>(), &sets);
    let race: EngineRace = loaded.iter().map(|m| m.engine()).zip(medians).collect();
    let median_of = |e: Engine| race.iter().find(|(r, _)| *r == e).and_then(|(_, d)| *d);
    let keep = auto_pick(median_of(Engine::Tract), median_of(Engine::OnnxRuntime));
    let best = loaded.iter().position(|m| m.engine() == keep).unwrap_or(0);
    Ok((loaded.swap_remove(best), race))
}

fn decode_preprocessed(encoded: &[u8]) -> Result<TensorSet, Error> {
    TensorSet::decode(encoded).map_err(|e| {
        GuestError::Failed(format!("preprocess returned an invalid tensor set: {e}")).into()
    })
}

impl Session {
    /// Verifies a bundle and loads it (engine options from the environment:
    /// `auto`, onnxruntime where [`crate::ONNXRUNTIME_ENV`] or the binary's
    /// directory has it).
    pub fn load(bytes: &[u8], trust: &TrustPolicy) -> Result<Session, Error> {
        Session::load_with(bytes, trust, &EngineOptions::default())
    }

    /// Verifies a bundle and loads it on the engine `options` pick.
    pub fn load_with(
        bytes: &[u8],
        trust: &TrustPolicy,
        options: &EngineOptions,
    ) -> Result<Session, Error> {
        let start = Instant::now();
        let _library = crate::engine::preload(options);
        let bundle = verify_for_host(bytes, trust, &ReadLimits::default())?;
        let verify = start.elapsed();
        let mut session = Session::from_verified_with(bundle, options)?;
        session.timings.verify = verify;
        session.timings.total = start.elapsed();
        Ok(session)
    }

    /// Loads a bundle that was already verified (engine options from the
    /// environment, as [`Session::load`]).
    pub fn from_verified(bundle: VerifiedBundle) -> Result<Session, Error> {
        Session::from_verified_with(bundle, &EngineOptions::default())
    }

    /// Loads a bundle that was already verified, on the engine `options`
    /// pick for it ([`engine_candidates`]).
    pub fn from_verified_with(
        bundle: VerifiedBundle,
        options: &EngineOptions,
    ) -> Result<Session, Error> {
        Session::from_verified_remembering(bundle, options, None)
    }

    /// [`Session::from_verified_with`], given the engine `auto` chose for
    /// this release on an earlier load on this machine: when `auto` has it
    /// among its candidates, only it is loaded and nothing is measured
    /// ([`EngineDecision::Remembered`]); otherwise (another engine named, or
    /// the remembered one gone) the choice is made as usual.
    pub fn from_verified_remembering(
        bundle: VerifiedBundle,
        options: &EngineOptions,
        remembered: Option<Engine>,
    ) -> Result<Session, Error> {
        let start = Instant::now();
        let mut candidates = engine_candidates(options, bundle.manifest())?;
        let decision = match remembered {
            Some(e) if candidates.len() > 1 && candidates.contains(&e) => {
                candidates = vec![e];
                EngineDecision::Remembered
            }
            _ if candidates.len() > 1 => EngineDecision::Measured,
            _ => EngineDecision::Only,
        };
        let onnx = bundle
            .content(role::MODEL)
            .ok_or(BundleError::MissingArtifact(role::MODEL))?;
        // Guest compilation and model optimisation are independent: overlap
        // them, and the two engines' loads under `auto` too.
        let (guest, guest_time, models, model_time) = std::thread::scope(|s| {
            let loads: Vec<_> = candidates
                .iter()
                .map(|&e| {
                    s.spawn(move || {
                        let t = Instant::now();
                        (EngineModel::load(onnx, e, options), t.elapsed())
                    })
                })
                .collect();
            let t = Instant::now();
            let guest = guest_of(&bundle);
            let guest_time = t.elapsed();
            let (models, times): (Vec<_>, Vec<_>) = loads
                .into_iter()
                .map(|l| l.join().expect("model loading panicked"))
                .unzip();
            let model_time = times.into_iter().max().unwrap_or_default();
            (guest, guest_time, models, model_time)
        });
        let guest = guest?;
        let golden = bundle.golden()?;
        let race_start = Instant::now();
        let (model, race) = pick_faster(models, &guest, &golden, bundle.manifest())?;
        let engine_race = race_start.elapsed();
        let baseline = bundle.baseline()?;
        let (manifest, digest) = bundle.into_identity();
        Ok(Session {
            manifest,
            digest,
            golden,
            baseline,
            guest,
            model,
            race,
            decision,
            observer: None,
            timings: LoadTimings {
                verify: Duration::ZERO,
                guest: guest_time,
                model: model_time,
                engine_race,
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

    /// The engine running the model.
    pub fn engine(&self) -> Engine {
        self.model.engine()
    }

    /// The median model run of each engine `auto` measured on load (empty
    /// when there was one engine to use); `None` for one that failed.
    pub fn engine_race(&self) -> &[(Engine, Option<Duration>)] {
        &self.race
    }

    /// How the engine was chosen: the only one, measured on this load, or
    /// remembered from an earlier one.
    pub fn engine_decision(&self) -> EngineDecision {
        self.decision
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
        self.guest
            .preprocess_with(content_type, body, decode_preprocessed)?
    }

    /// Runs the whole pipeline on a request and returns the JSON response.
    pub fn infer(&self, content_type: &str, body: &[u8]) -> Result<Vec<u8>, Error> {
        self.infer_as(content_type, body, ResponseForm::Json)
    }

    /// Runs the whole pipeline on a request and answers in `form`: JSON
    /// from the guest's postprocessing, or the model's outputs in a binary
    /// form (postprocessing skipped). [`Error::NotAcceptable`] for `.npy`
    /// from a model with several outputs, before anything runs.
    pub fn infer_as(
        &self,
        content_type: &str,
        body: &[u8],
        form: ResponseForm,
    ) -> Result<Vec<u8>, Error> {
        match &self.observer {
            None => self.infer_inner(content_type, body, form, None),
            Some(o) => self.infer_inner(content_type, body, form, Some(&mut |obs| o.observe(obs))),
        }
    }

    /// Like [`infer_as`](Self::infer_as), with an observer for this call
    /// only (the session's own observer, if any, is not called). Lets a
    /// caller tie what it sees to its own request (the agent's telemetry,
    /// shadow comparisons).
    pub fn infer_with(
        &self,
        content_type: &str,
        body: &[u8],
        form: ResponseForm,
        observe: &mut dyn FnMut(&Observation<'_>),
    ) -> Result<Vec<u8>, Error> {
        self.infer_inner(content_type, body, form, Some(observe))
    }

    /// Whether this model can answer in `form` ([`Error::NotAcceptable`]
    /// for `.npy` from a model with several outputs).
    pub fn check_form(&self, form: ResponseForm) -> Result<(), Error> {
        form.check(self.model.outputs().len())
    }

    /// The form to answer an HTTP `Accept` header with, for this model
    /// (see [`ResponseForm::negotiate`]).
    pub fn response_form(&self, accept: Option<&str>) -> Result<ResponseForm, Error> {
        ResponseForm::negotiate(accept, self.model.outputs().len())
    }

    fn infer_inner(
        &self,
        content_type: &str,
        body: &[u8],
        form: ResponseForm,
        observer: Option<&mut dyn FnMut(&Observation<'_>)>,
    ) -> Result<Vec<u8>, Error> {
        let start = Instant::now();
        form.check(self.model.outputs().len())?;
        let set = self.preprocess(content_type, body)?;
        let outputs = TensorSet {
            tensors: self.model.run(&set.tensors)?,
            features: None,
        };
        let response = match form {
            ResponseForm::Json => self.guest.postprocess(&outputs.encode())?,
            binary => binary.encode_outputs(&outputs),
        };
        if let Some(observer) = observer {
            observer(&Observation {
                features: set.features.as_ref(),
                outputs: &outputs.tensors,
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
