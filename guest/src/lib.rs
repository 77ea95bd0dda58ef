//! Ferry's standard guest: the preprocessing and postprocessing every bundle gets unless it
//! brings its own `.wasm`.
//!
//! Built for `wasm32-wasip1` (by `packager/build.rs`) it is a guest as described in
//! `docs/guest-abi.md`; built natively it is an ordinary library whose [`Guest`] does exactly
//! what the WASM module does, so every behaviour is unit-tested on the host. The semantics of
//! every `kind` are specified in `docs/project-file.md`: that document is the contract, this
//! crate implements it.
//!
//! # Layout
//! - `error`: [`Error`], the two failure statuses of the ABI (bad input, internal).
//! - `config`: the `ferry_init` JSON: the model's inputs and outputs, and the helpers that turn
//!   a `[preprocess]`/`[postprocess]` table into a typed configuration with precise errors.
//! - `json`: a borrowed JSON tree for requests, and the names of JSON types in messages.
//! - `tensor`: `kind = "tensor"` preprocessing (named tensors in JSON, passed through).
//! - `binary`: the binary forms of a tensor request (`.npy`, the ABI's tensor set).
//! - `tabular`: `kind = "tabular"` preprocessing (records to a standardised, one-hot matrix).
//! - `image`: `kind = "image"` preprocessing (PNG/JPEG to a normalised image tensor).
//! - `post`: every postprocessing kind (tensor JSON, classification, regression).
//! - `guest`: [`Guest`], which parses the configuration once and dispatches calls.
//! - `abi` (only on `wasm32`): the `ferry_*` exports, state in thread-locals.
//!
//! # Invariants
//! - Configuration is parsed and checked once, in [`Guest::from_config`]; a call does no
//!   configuration work beyond looking things up.
//! - No input makes the guest panic (a panic is a WASM trap): every malformed request is an
//!   [`Error::BadInput`] naming the field and the problem.
//! - Nothing here reads files, the clock, the environment or randomness.

mod binary;
mod config;
mod error;
mod guest;
mod image;
mod json;
mod post;
mod tabular;
mod tensor;

#[cfg(target_arch = "wasm32")]
mod abi;

pub use error::Error;
pub use guest::Guest;
