//! The two ways a guest call fails, matching the ABI's statuses.

use std::fmt;

use ferry_guest_abi::{STATUS_BAD_INPUT, STATUS_INTERNAL};

/// Why a call failed. The message is what the host shows (for bad input, to the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The request (or, at `ferry_init`, the configuration) is malformed: status 1. The message
    /// names the field and the problem, e.g. `record 2: field "age": expected a number, got string`.
    BadInput(String),
    /// Anything that is not the caller's fault, e.g. the model's outputs do not have the shape
    /// the configuration expects: status 2.
    Internal(String),
}

impl Error {
    /// The ABI status for this error.
    pub fn status(&self) -> i32 {
        match self {
            Error::BadInput(_) => STATUS_BAD_INPUT,
            Error::Internal(_) => STATUS_INTERNAL,
        }
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        match self {
            Error::BadInput(m) | Error::Internal(m) => m,
        }
    }
}

impl Error {
    /// The message, owned.
    pub fn into_message(self) -> String {
        match self {
            Error::BadInput(m) | Error::Internal(m) => m,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Error {}

/// A bad-input error (status 1).
pub(crate) fn bad(message: impl Into<String>) -> Error {
    Error::BadInput(message.into())
}

/// An internal error (status 2).
pub(crate) fn internal(message: impl Into<String>) -> Error {
    Error::Internal(message.into())
}
