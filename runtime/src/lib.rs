//! Ferry's runtime: the WASM sandbox, model execution and the inference
//! pipeline. The bundle format and keys are `ferry-format`'s, the drift
//! statistics `ferry-drift`'s; both are re-exported here.
//!
//! # Layout
//! - `sandbox`: the only module naming wasmtime: engine, limits, instance pool.
//! - `model`: the only module naming tract: ONNX loading, optimisation, runs.
//! - `onnxruntime`: the only module naming `ort`: the library loaded at run
//!   time, sessions, runs.
//! - `engine`: which engine serves a bundle, and `EngineModel` over both.
//! - `session`: the pipeline (guest → model → guest), observers, golden checks.
//! - `golden`: comparing responses with expected outputs.
//! - `error`: one error enum per subsystem, each with a stable `code()`.
//!
//! # Loading, step by step
//! [`verify`] checks framing, signatures, sizes and digests and returns a
//! [`VerifiedBundle`] ([`verify_for_host`] the same, leaving out guests
//! precompiled for other machines: checked, not decompressed); [`Session::from_verified`] compiles the guest (or loads
//! a compatible precompiled one) and optimises the model; [`Session::infer`]
//! serves requests. [`Session::load`] does both.

mod engine;
mod error;
mod external;
mod golden;
mod model;
mod onnxruntime;
mod response;
mod sandbox;
mod session;

// The format and drift crates, re-exported so that a program built on the
// runtime names one crate.
pub use engine::{
    AUTO_MARGIN, Engine, EngineChoice, EngineDecision, EngineModel, EngineOptions, ONNXRUNTIME_ENV,
    ONNXRUNTIME_MIN_OPSET, Preload, RACE_BUDGET, RACE_MIN_RUNS, RACE_MIN_TIME, auto_pick,
    engine_candidates, onnx_opset, onnxruntime_info, onnxruntime_library, preload, race,
    zero_tensors,
};
pub use error::{Error, GuestError, ModelError};
pub use external::inline_external_data;
pub use ferry_drift::{
    BASELINE_VERSION, Baseline, BaselineBuilder, CategoricalBaseline, CurrentSample,
    DEFAULT_DRIFT_SHARE, DriftConfig, DriftError, DriftKind, DriftMethod, DriftReport, DriftRule,
    DriftValue, FeatureBaseline, FeatureReport, FeatureStats, LARGE_REFERENCE, NumericBaseline,
    PSI_FLOOR, QuantileSketch, REFERENCE_BINS, SKETCH_EXACT_MAX, SKETCH_INTERVALS, compare,
};
pub use ferry_format::{
    Artifact, ArtifactInput, BundleError, Encoding, EngineReport, EngineSupport, Extract,
    FORMAT_VERSION, GoldenExample, GuestLimits, HEADER_LEN, Header, KEY_ID_LEN, KeyError, KeyId,
    Lineage, MAX_ARTIFACTS, MAX_SIGNATURES, MAX_UPFRONT_RESERVE, Manifest, ModelInfo, Pipeline,
    PrecompiledGuest, PublicKey, RUNTIME_VERSION, ReadLimits, Release, SecretKey, TensorSpec,
    TrustPolicy, VerifiedBundle, compress, inspect_unverified, lineage_training,
    manifest_unverified, role, shuffle4, to_cbor, unshuffle4, verify, verify_integrity_only,
    verify_selected, write_bundle,
};
pub use ferry_guest_abi::{DType, FeatureKind, Features, Tensor, TensorSet, Value};
pub use golden::{Mismatch, compare_json};
pub use model::{
    BATCH_SYMBOL, MAX_RUN_STATES, MAX_SPECIALISED_PLANS, Model, PRIVATE_CONSTANTS_BUDGET,
    PlanChoice, SPECIALISE_AFTER, SPECIALISED_PLANS_BUDGET, fmt_shape, quiet_caught_panics,
};
pub use onnxruntime::{
    MAX_ORT_SESSIONS, ONNXRUNTIME_TELEMETRY_VARIABLE, OrtModel, keep_onnxruntime_telemetry_off,
};
pub use response::ResponseForm;
pub use sandbox::{
    CAN_COMPILE, EPOCH_TICK, GuestCompiler, GuestRuntime, HOST_TARGET, MAX_POOLED_INSTANCES,
    ON_DEVICE_COMPILER, PULLEY_TARGET, SandboxLimits, WASMTIME_VERSION, check_runnable_bundle,
    compatibility_key, map_precompiled_guests_in, runnable_targets,
};
#[cfg(feature = "compiler")]
pub use sandbox::{precompile, validate};
pub use session::{
    GoldenOutcome, LoadTimings, Observation, Observer, Preprocessor, Session, drift_kind,
    drift_value, verify_for_host,
};
