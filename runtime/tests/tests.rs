//! Integration tests of ferry-runtime. Modules:
//! - `sandbox`: runaway, greedy and nosy guests are stopped; the host keeps serving.
//! - `engines`: tract and onnxruntime agree; each runs what the other refuses; `auto`'s candidates.
//! - `model`: tract runs the example models like onnxruntime.
//! - `common`: a guest that misbehaves on request and a manifest for it.

mod common;
mod engines;
mod model;
mod sandbox;
