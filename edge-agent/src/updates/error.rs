//! [`UpdateError`]: what can go wrong while fetching, staging or activating
//! a bundle. Refusals of a candidate's *content* are not errors of this kind:
//! they are [`super::Rejection`]s, with their own codes.

use std::path::PathBuf;

use thiserror::Error;

use super::store::ActivationStep;

/// A failure of the update machinery (network, disk, state directory).
#[derive(Debug, Error)]
pub enum UpdateError {
    /// The update source string is neither an `http(s)://` URL nor a directory.
    #[error("invalid update source {source_text:?}: {reason}")]
    BadSource { source_text: String, reason: String },
    /// A digest is not 64 lowercase hex characters (it names files, so it is
    /// checked before it touches a path).
    #[error("invalid digest {0:?}: expected 64 lowercase hex characters (SHA-256)")]
    BadDigest(String),
    /// The CA file for the update channel cannot be read or holds no certificate.
    #[error("cannot use CA file {path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    /// The channel index is unreadable, too large, of another schema, or inconsistent.
    #[error("invalid channel index at {location}: {reason}")]
    BadIndex { location: String, reason: String },
    /// The server answered with an unexpected HTTP status.
    #[error(
        "GET {url} answered HTTP {status} (after {received} byte(s) of the file were already here)"
    )]
    HttpStatus {
        url: String,
        status: u16,
        received: u64,
    },
    /// The connection failed or broke; the bytes received so far are kept for
    /// a resumed download.
    #[error("fetching {url} failed after {received} byte(s) of the file: {detail}")]
    Network {
        url: String,
        received: u64,
        detail: String,
    },
    /// The server sends slower than the minimum rate (a stalled link or a
    /// slow-retrieval attack); what arrived is kept for a resumed download.
    #[error(
        "fetching {url} is too slow: {rate} bytes/s after {received} byte(s), at least {min_rate} bytes/s required"
    )]
    TooSlow {
        url: String,
        received: u64,
        rate: u64,
        min_rate: u64,
    },
    /// The download was stopped for a rollback or a shutdown; what arrived
    /// is kept for a resumed attempt.
    #[error("fetching {url} was stopped (rollback or shutdown) after {received} byte(s)")]
    Cancelled { url: String, received: u64 },
    /// One download attempt took longer than `updates.max_download_s`; what
    /// arrived is kept for a resumed attempt.
    #[error("fetching {url} took longer than {seconds} s ({received} byte(s) received)")]
    Deadline {
        url: String,
        received: u64,
        seconds: u64,
    },
    /// The file is larger than allowed (`max_bundle_bytes`, or the size the
    /// index announced). The partial file is deleted.
    #[error(
        "{url} is larger than allowed: {received} byte(s) received or announced, limit {limit}"
    )]
    TooLarge {
        url: String,
        received: u64,
        limit: u64,
    },
    /// The downloaded file is complete but its SHA-256 is not the expected
    /// one. The partial file is deleted.
    #[error("{url}: SHA-256 of the {received} byte(s) received is {actual}, expected {expected}")]
    DigestMismatch {
        url: String,
        expected: String,
        actual: String,
        received: u64,
    },
    /// A file operation in the state directory failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the state directory.
    #[error("state directory {0} is in use by another process (lock held on store.lock)")]
    Locked(PathBuf),
    /// A rollback was asked for but there is no previous bundle to go back to.
    #[error("no previous bundle to roll back to")]
    NoPrevious,
    /// The previous bundle's file is missing or does not match its digest.
    #[error("previous bundle {digest} is unusable: {reason}")]
    PreviousUnusable { digest: String, reason: String },
    /// A test hook stopped an activation at this step, as a crash would.
    #[error("activation interrupted at step {0:?} (simulated crash)")]
    Interrupted(ActivationStep),
}

impl UpdateError {
    /// A stable identifier of the variant, for telemetry and tests.
    pub fn code(&self) -> &'static str {
        match self {
            UpdateError::BadSource { .. } => "bad_source",
            UpdateError::BadDigest(_) => "bad_digest",
            UpdateError::BadCa { .. } => "bad_ca",
            UpdateError::BadIndex { .. } => "bad_index",
            UpdateError::HttpStatus { .. } => "http_status",
            UpdateError::Network { .. } => "network",
            UpdateError::TooSlow { .. } => "too_slow",
            UpdateError::Cancelled { .. } => "cancelled",
            UpdateError::Deadline { .. } => "deadline",
            UpdateError::TooLarge { .. } => "too_large",
            UpdateError::DigestMismatch { .. } => "download_digest_mismatch",
            UpdateError::Io { .. } => "io",
            UpdateError::Locked(_) => "locked",
            UpdateError::NoPrevious => "no_previous",
            UpdateError::PreviousUnusable { .. } => "previous_unusable",
            UpdateError::Interrupted(_) => "interrupted",
        }
    }

    /// Whether trying again later may succeed (network trouble, a server
    /// error) as opposed to a refusal that will repeat (too large, digest).
    pub fn is_transient(&self) -> bool {
        match self {
            UpdateError::Network { .. }
            | UpdateError::TooSlow { .. }
            | UpdateError::Cancelled { .. }
            | UpdateError::Deadline { .. }
            | UpdateError::Io { .. }
            | UpdateError::Locked(_) => true,
            UpdateError::HttpStatus { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            _ => false,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        UpdateError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
