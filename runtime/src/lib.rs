//! Ferry's runtime: the bundle format, the WASM sandbox, model execution, the
//! inference pipeline and drift statistics.
//!
//! # Layout
//! - `bundle`: the bundle format v1 (write, frame, verify, extract). No I/O.
//! - `keys`: ed25519 keys in PEM, key ids, the trust policy (keys + threshold).
//! - `sandbox`: the only module naming wasmtime: engine, limits, instance pool.
//! - `model`: the only module naming tract: ONNX loading, optimisation, runs.
//! - `session`: the pipeline (guest → model → guest), observers, golden checks.
//! - `golden`: comparing responses with expected outputs.
//! - `drift`: drift baselines and statistics (PSI, KS, Wasserstein, JS, chi²).
//! - `error`: one error enum per subsystem, each with a stable `code()`.
//!
//! # Loading, step by step
//! [`verify`] checks framing, signatures, sizes and digests and returns a
//! [`VerifiedBundle`]; [`Session::from_verified`] compiles the guest (or loads
//! a compatible precompiled one) and optimises the model; [`Session::infer`]
//! serves requests. [`Session::load`] does both.

mod bundle;
mod drift;
mod error;
mod golden;
mod keys;
mod model;
mod sandbox;
mod session;

pub use bundle::{
    Artifact, ArtifactInput, Encoding, FORMAT_VERSION, Framing, GoldenExample, GuestLimits,
    HEADER_LEN, Lineage, MAGIC, MAX_MANIFEST_LEN, MAX_SIGNATURES, MAX_UPFRONT_RESERVE, Manifest,
    ModelInfo, Pipeline, RUNTIME_VERSION, ReadLimits, Release, SIGNATURE_ENTRY_LEN,
    SIGNING_CONTEXT, TensorSpec, VerifiedBundle, check_signatures, compress, extract_artifact,
    frame, from_cbor, inspect_unverified, lineage_training, parse_framing, parse_manifest, role,
    shuffle4, to_cbor, unshuffle4, verify, verify_integrity_only, write_bundle,
};
pub use drift::*;
pub use error::{BundleError, Error, GuestError, KeyError, ModelError};
pub use ferry_guest_abi::{DType, FeatureKind, Features, Tensor, TensorSet, Value};
pub use golden::{Mismatch, compare_json};
pub use keys::{KeyId, PublicKey, SecretKey, TrustPolicy};
pub use model::{BATCH_SYMBOL, Model, fmt_shape};
pub use sandbox::{
    EPOCH_TICK, GuestRuntime, HOST_TARGET, MAX_POOLED_INSTANCES, SandboxLimits, WASMTIME_VERSION,
    compatibility_key, precompile, validate,
};
pub use session::{
    GoldenOutcome, LoadTimings, Observation, Observer, Preprocessor, Session, drift_value,
};
