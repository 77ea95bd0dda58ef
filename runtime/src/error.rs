//! Errors, one enum per subsystem. Each variant has a stable `code()` for
//! telemetry and for tests that must tell rejections apart. Bundle and key
//! errors are the format crate's ([`ferry_format`]).

use ferry_format::{BundleError, KeyError};
use thiserror::Error;

/// Loading or running the WASM guest.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The module is not valid WebAssembly or does not compile.
    #[error("guest module does not compile: {0}")]
    Compile(String),
    /// The module lacks an export of the guest ABI or has the wrong ABI version.
    #[error("guest does not implement the Ferry guest ABI v1: {0}")]
    Abi(String),
    /// The guest refused its configuration.
    #[error("guest rejected its configuration: {0}")]
    Config(String),
    /// The guest refused the request (the caller's fault).
    #[error("{0}")]
    BadInput(String),
    /// The guest reported an internal failure.
    #[error("guest failed: {0}")]
    Failed(String),
    /// The guest ran past its deadline and was stopped.
    #[error("guest exceeded its time limit of {0} ms")]
    Timeout(u64),
    /// The guest tried to grow its memory beyond the cap.
    #[error("guest exceeded its memory limit of {0} bytes")]
    OutOfMemory(u64),
    /// The guest trapped (a bug in the guest: panic, out-of-bounds access...).
    #[error("guest trapped: {0}")]
    Trap(String),
    /// This build has no guest compiler (the lean device build) and the
    /// bundle carries no guest precompiled for a target it runs.
    #[error(
        "no guest in the bundle runs here: it carries guests precompiled for [{}], this build \
         (no guest compiler) runs [{}]; pack it with --precompile for this device",
        offered.join(", "),
        runnable.join(", ")
    )]
    NoRunnableGuest {
        /// The compatibility keys of the bundle's precompiled guests.
        offered: Vec<String>,
        /// The compatibility keys this build runs.
        runnable: Vec<String>,
    },
}

impl GuestError {
    /// A stable identifier of the variant.
    pub fn code(&self) -> &'static str {
        match self {
            GuestError::Compile(_) => "guest_compile",
            GuestError::Abi(_) => "guest_abi",
            GuestError::Config(_) => "guest_config",
            GuestError::BadInput(_) => "bad_input",
            GuestError::Failed(_) => "guest_failed",
            GuestError::Timeout(_) => "guest_timeout",
            GuestError::OutOfMemory(_) => "guest_out_of_memory",
            GuestError::Trap(_) => "guest_trap",
            GuestError::NoRunnableGuest { .. } => "guest_target",
        }
    }
}

/// Loading or running the model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// tract cannot load or optimise the model (unsupported operator, bad file).
    #[error("model cannot be loaded: {0}")]
    Load(String),
    /// The tensors given do not fit the model's inputs.
    #[error("{0}")]
    BadInput(String),
    /// tract failed while running the model.
    #[error("model failed: {0}")]
    Run(String),
    /// The onnxruntime engine was asked for and its library is absent or
    /// cannot be loaded (where it was looked for is in the message).
    #[error("onnxruntime is not available: {0}")]
    EngineUnavailable(String),
    /// The engine asked for (by the device or the bundle) cannot serve this
    /// model, as the packager recorded or as loading found.
    #[error("{0}")]
    EngineRefused(String),
}

impl ModelError {
    /// A stable identifier of the variant.
    pub fn code(&self) -> &'static str {
        match self {
            ModelError::Load(_) => "model_load",
            ModelError::BadInput(_) => "bad_input",
            ModelError::Run(_) => "model_run",
            ModelError::EngineUnavailable(_) => "engine_unavailable",
            ModelError::EngineRefused(_) => "engine_refused",
        }
    }
}

/// Any failure of the runtime.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The response form the caller asked for is one this model cannot give
    /// (see [`ResponseForm`](crate::ResponseForm)).
    #[error("{0}")]
    NotAcceptable(String),
}

impl Error {
    /// A stable identifier of the failure.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Bundle(e) => e.code(),
            Error::Guest(e) => e.code(),
            Error::Model(e) => e.code(),
            Error::Key(_) => "key",
            Error::NotAcceptable(_) => "not_acceptable",
        }
    }

    /// Whether the caller asked for a response form the model cannot give
    /// (HTTP 406); such a request is also [bad input](Self::is_bad_input).
    pub fn is_not_acceptable(&self) -> bool {
        matches!(self, Error::NotAcceptable(_))
    }

    /// Whether the failure is the caller's fault (a bad request), as opposed
    /// to the bundle's or the host's.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::Guest(GuestError::BadInput(_))
                | Error::Model(ModelError::BadInput(_))
                | Error::NotAcceptable(_)
        )
    }
}
