//! The crate's one error type.

use crate::{DriftKind, DriftMethod};

/// Why a baseline, a row, a sample or a configuration was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DriftError {
    #[error("duplicate feature name {0:?}")]
    DuplicateFeature(String),
    #[error("row has {got} value(s), expected {expected}")]
    RowLength { expected: usize, got: usize },
    #[error("feature {feature:?} is {expected}: got a value of the other kind")]
    ValueKind {
        feature: String,
        expected: DriftKind,
    },
    #[error("baseline feature {0:?} is missing from the current sample")]
    MissingFeature(String),
    #[error(
        "feature {feature:?} is {baseline} in the baseline but {current} in the current sample"
    )]
    KindMismatch {
        feature: String,
        baseline: DriftKind,
        current: DriftKind,
    },
    #[error("drift rule for {0:?}, which is not a feature of the baseline")]
    UnknownRuleFeature(String),
    #[error("drift method {method} does not apply to {kind} feature {feature:?}")]
    MethodNotApplicable {
        feature: String,
        method: DriftMethod,
        kind: DriftKind,
    },
    #[error("invalid threshold {threshold} for drift method {method} on feature {feature:?}")]
    InvalidThreshold {
        feature: String,
        method: DriftMethod,
        threshold: f64,
    },
    #[error("drift_share must be in (0, 1], got {0}")]
    InvalidDriftShare(f64),
    #[error("unsupported drift baseline version {found} (this runtime reads 1..={supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("invalid drift baseline for feature {feature:?}: {reason}")]
    InvalidBaseline {
        feature: String,
        reason: &'static str,
    },
}
