//! Integration tests of ferry-runtime. Modules:
//! - `bundle`: the format against tampering, truncation, size lies, zstd bombs and key policies.
//! - `sandbox`: runaway, greedy and nosy guests are stopped; the host keeps serving.
//! - `model`: tract runs the example models like onnxruntime.
//! - `common`: a guest that misbehaves on request and a small bundle holding it.

mod bundle;
mod common;
mod model;
mod sandbox;
