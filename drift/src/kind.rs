//! What rows are made of: the kind of a feature ([`DriftKind`]), one value of
//! a row ([`DriftValue`]), and the checks every row passes before a
//! [`BaselineBuilder`](crate::BaselineBuilder) or a
//! [`CurrentSample`](crate::CurrentSample) takes it (a rejected row changes
//! nothing).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::DriftError;

/// Kind of a feature, as far as drift is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    Numeric,
    Categorical,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Numeric => "numeric",
            DriftKind::Categorical => "categorical",
        }
    }
}

impl fmt::Display for DriftKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One value of a row given to
/// [`BaselineBuilder::push_row`](crate::BaselineBuilder::push_row) or
/// [`CurrentSample::push_row`](crate::CurrentSample::push_row).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DriftValue<'a> {
    /// A number (numeric features); NaN and ±inf count as missing.
    Num(f64),
    /// A category (categorical features).
    Cat(&'a str),
    /// Missing, for either kind.
    Missing,
}

// ---------------------------------------------------------------------------
// Row checks (shared by the baseline builder and the window)
// ---------------------------------------------------------------------------

/// The features, once their names are known to be unique.
pub(crate) fn check_names<S: Into<String>>(
    features: impl IntoIterator<Item = (S, DriftKind)>,
) -> Result<Vec<(String, DriftKind)>, DriftError> {
    let features: Vec<(String, DriftKind)> =
        features.into_iter().map(|(n, k)| (n.into(), k)).collect();
    let mut seen = std::collections::HashSet::new();
    for (name, _) in &features {
        if !seen.insert(name.as_str()) {
            return Err(DriftError::DuplicateFeature(name.clone()));
        }
    }
    Ok(features)
}

/// One value per feature, each of its feature's kind or missing.
pub(crate) fn check_row(
    features: &[(String, DriftKind)],
    row: &[DriftValue<'_>],
) -> Result<(), DriftError> {
    if row.len() != features.len() {
        return Err(DriftError::RowLength {
            expected: features.len(),
            got: row.len(),
        });
    }
    for ((name, kind), v) in features.iter().zip(row) {
        let ok = matches!(
            (kind, v),
            (_, DriftValue::Missing)
                | (DriftKind::Numeric, DriftValue::Num(_))
                | (DriftKind::Categorical, DriftValue::Cat(_))
        );
        if !ok {
            return Err(DriftError::ValueKind {
                feature: name.clone(),
                expected: *kind,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::numeric;
    use crate::{BaselineBuilder, CurrentSample, DriftConfig, compare};

    #[test]
    fn rows_are_checked_and_rejected_rows_change_nothing() {
        let features = [("x", DriftKind::Numeric), ("c", DriftKind::Categorical)];
        assert!(matches!(
            BaselineBuilder::new([("x", DriftKind::Numeric), ("x", DriftKind::Categorical)]),
            Err(DriftError::DuplicateFeature(_))
        ));
        let mut b = BaselineBuilder::new(features).unwrap();
        assert!(matches!(
            b.push_row(&[DriftValue::Num(1.0)]),
            Err(DriftError::RowLength {
                expected: 2,
                got: 1
            })
        ));
        assert!(matches!(
            b.push_row(&[DriftValue::Cat("a"), DriftValue::Cat("a")]),
            Err(DriftError::ValueKind {
                expected: DriftKind::Numeric,
                ..
            })
        ));
        assert!(matches!(
            b.push_row(&[DriftValue::Num(1.0), DriftValue::Num(2.0)]),
            Err(DriftError::ValueKind {
                expected: DriftKind::Categorical,
                ..
            })
        ));
        b.push_row(&[DriftValue::Num(f64::INFINITY), DriftValue::Missing])
            .unwrap();
        b.push_row(&[DriftValue::Num(2.0), DriftValue::Cat("a")])
            .unwrap();
        assert_eq!(b.rows(), 2);
        let baseline = b.finish();
        let n = numeric(&baseline);
        assert_eq!((n.n, n.missing, n.mean, n.std), (1, 1, 2.0, 0.0));

        let mut s = CurrentSample::new(&baseline, 10);
        assert!(
            s.push_row(&[DriftValue::Cat("a"), DriftValue::Cat("a")])
                .is_err()
        );
        assert_eq!((s.rows(), s.rows_seen()), (0, 0));
        let other = CurrentSample::with_features(
            [("x", DriftKind::Categorical), ("c", DriftKind::Categorical)],
            5,
        )
        .unwrap();
        assert!(matches!(
            compare(&baseline, &other, &DriftConfig::default()),
            Err(DriftError::KindMismatch { .. })
        ));
        let other = CurrentSample::with_features([("c", DriftKind::Categorical)], 5).unwrap();
        assert!(matches!(
            compare(&baseline, &other, &DriftConfig::default()),
            Err(DriftError::MissingFeature(_))
        ));
    }
}
