//! The stored baseline: what a bundle keeps of the training data, per feature
//! ([`Baseline`], persisted in bundles: see the crate doc's versioning rule),
//! its validation, and [`BaselineBuilder`], which computes it from training
//! rows at packaging time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::kind::{check_names, check_row};
use crate::stats::{bin_proportions, neumaier_sum, quantile_sorted};
use crate::{DriftError, DriftKind, DriftValue};

/// Version written into new baselines; [`compare`](crate::compare()) accepts
/// `1..=BASELINE_VERSION`.
pub const BASELINE_VERSION: u32 = 1;
/// Number of reference bins (interior edges at the 10 %, …, 90 % quantiles).
pub const REFERENCE_BINS: usize = 10;
/// Up to this many values the sketch stores every value.
pub const SKETCH_EXACT_MAX: usize = 2048;
/// Above [`SKETCH_EXACT_MAX`] the sketch stores the quantiles at k / this, k = 0..=this.
pub const SKETCH_INTERVALS: usize = 2048;

/// The drift baseline of a bundle. Persisted: see the crate doc's versioning rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub version: u32,
    pub features: Vec<FeatureBaseline>,
}

/// Baseline of one feature. Persisted: see the crate doc's versioning rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureBaseline {
    pub name: String,
    pub stats: FeatureStats,
}

/// Per-kind statistics of a feature. Persisted: a new variant needs a
/// [`BASELINE_VERSION`] bump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureStats {
    Numeric(NumericBaseline),
    Categorical(CategoricalBaseline),
}

/// Reference statistics of a numeric feature. Persisted: see the crate doc's
/// versioning rule. When `n == 0` the floats are 0 and the vectors empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumericBaseline {
    /// Non-missing values.
    pub n: u64,
    /// Missing (non-finite) values.
    pub missing: u64,
    pub mean: f64,
    /// Sample standard deviation (ddof = 1); 0 when `n < 2`.
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// The 9 interior bin edges: quantiles at 0.1, …, 0.9 (linear interpolation).
    pub bin_edges: Vec<f64>,
    /// Reference proportion of each of the 10 bins (left-closed).
    pub bin_proportions: Vec<f64>,
    pub sketch: QuantileSketch,
}

/// Sorted values (`exact`, n ≤ 2048) or the 2049 quantiles at k/2048.
/// Persisted: see the crate doc's versioning rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantileSketch {
    pub exact: bool,
    pub values: Vec<f64>,
}

/// Reference counts of a categorical feature. Persisted: see the crate doc's
/// versioning rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoricalBaseline {
    /// Non-missing values (the sum of `counts`).
    pub n: u64,
    pub missing: u64,
    pub counts: BTreeMap<String, u64>,
}

impl FeatureStats {
    pub fn kind(&self) -> DriftKind {
        match self {
            FeatureStats::Numeric(_) => DriftKind::Numeric,
            FeatureStats::Categorical(_) => DriftKind::Categorical,
        }
    }

    /// Non-missing reference values.
    pub fn n(&self) -> u64 {
        match self {
            FeatureStats::Numeric(b) => b.n,
            FeatureStats::Categorical(b) => b.n,
        }
    }
}

impl FeatureBaseline {
    pub fn kind(&self) -> DriftKind {
        self.stats.kind()
    }
}

impl Baseline {
    /// The baseline feature with this name.
    pub fn feature(&self, name: &str) -> Option<&FeatureBaseline> {
        self.features.iter().find(|f| f.name == name)
    }

    /// Feature names and kinds, in baseline order (the order of
    /// [`CurrentSample::push_row`](crate::CurrentSample::push_row) rows).
    pub fn feature_kinds(&self) -> Vec<(String, DriftKind)> {
        self.features
            .iter()
            .map(|f| (f.name.clone(), f.kind()))
            .collect()
    }

    /// Checks the version and the internal consistency of every feature
    /// (lengths, sortedness, finiteness), so that
    /// [`compare`](crate::compare()) never reads a malformed baseline.
    /// [`compare`](crate::compare()) calls it.
    pub fn validate(&self) -> Result<(), DriftError> {
        if self.version == 0 || self.version > BASELINE_VERSION {
            return Err(DriftError::UnsupportedVersion {
                found: self.version,
                supported: BASELINE_VERSION,
            });
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.features {
            if !seen.insert(f.name.as_str()) {
                return Err(DriftError::DuplicateFeature(f.name.clone()));
            }
            let bad = |reason| {
                Err(DriftError::InvalidBaseline {
                    feature: f.name.clone(),
                    reason,
                })
            };
            match &f.stats {
                FeatureStats::Numeric(b) => {
                    if let Err(reason) = b.check() {
                        return bad(reason);
                    }
                }
                FeatureStats::Categorical(b) => {
                    let sum = b.counts.values().try_fold(0u64, |a, &c| a.checked_add(c));
                    if sum != Some(b.n) {
                        return bad("n is not the sum of the category counts");
                    }
                }
            }
        }
        Ok(())
    }
}

fn sorted_finite(v: &[f64]) -> bool {
    v.iter().all(|x| x.is_finite()) && v.windows(2).all(|w| w[0] <= w[1])
}

impl NumericBaseline {
    /// Baseline of a numeric feature; non-finite values count as missing.
    pub fn from_values(values: &[f64]) -> NumericBaseline {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        let missing = (values.len() - v.len()) as u64;
        v.sort_unstable_by(f64::total_cmp);
        NumericBaseline::from_sorted(&v, missing)
    }

    /// `sorted`: finite values in ascending order.
    fn from_sorted(sorted: &[f64], missing: u64) -> NumericBaseline {
        let n = sorted.len();
        if n == 0 {
            return NumericBaseline {
                n: 0,
                missing,
                mean: 0.0,
                std: 0.0,
                min: 0.0,
                max: 0.0,
                bin_edges: Vec::new(),
                bin_proportions: Vec::new(),
                sketch: QuantileSketch {
                    exact: true,
                    values: Vec::new(),
                },
            };
        }
        let mean = neumaier_sum(sorted.iter().copied()) / n as f64;
        let std = if n < 2 {
            0.0
        } else {
            (neumaier_sum(sorted.iter().map(|x| (x - mean) * (x - mean))) / (n - 1) as f64).sqrt()
        };
        let bin_edges: Vec<f64> = (1..REFERENCE_BINS)
            .map(|k| quantile_sorted(sorted, k as f64 / REFERENCE_BINS as f64))
            .collect();
        let bin_proportions = bin_proportions(sorted, &bin_edges);
        let sketch = if n <= SKETCH_EXACT_MAX {
            QuantileSketch {
                exact: true,
                values: sorted.to_vec(),
            }
        } else {
            let values = (0..=SKETCH_INTERVALS)
                .map(|k| quantile_sorted(sorted, k as f64 / SKETCH_INTERVALS as f64))
                .collect();
            QuantileSketch {
                exact: false,
                values,
            }
        };
        NumericBaseline {
            n: n as u64,
            missing,
            mean,
            std,
            min: sorted[0],
            max: sorted[n - 1],
            bin_edges,
            bin_proportions,
            sketch,
        }
    }

    /// Population standard deviation (ddof = 0), derived from `std`.
    pub fn population_std(&self) -> f64 {
        if self.n < 2 {
            0.0
        } else {
            self.std * ((self.n - 1) as f64 / self.n as f64).sqrt()
        }
    }

    fn check(&self) -> Result<(), &'static str> {
        let s = &self.sketch.values;
        if self.n == 0 {
            return if s.is_empty() {
                Ok(())
            } else {
                Err("sketch of an empty feature is not empty")
            };
        }
        if ![self.mean, self.std, self.min, self.max]
            .iter()
            .all(|x| x.is_finite())
            || self.std < 0.0
        {
            return Err("non-finite mean, std, min or max");
        }
        if self.bin_edges.len() != REFERENCE_BINS - 1 || !sorted_finite(&self.bin_edges) {
            return Err("bin edges are not 9 sorted finite values");
        }
        if self.bin_proportions.len() != REFERENCE_BINS
            || !self.bin_proportions.iter().all(|p| (0.0..=1.0).contains(p))
        {
            return Err("bin proportions are not 10 values in [0, 1]");
        }
        if !sorted_finite(s) {
            return Err("sketch values are not sorted finite values");
        }
        let expected = if self.sketch.exact {
            self.n
        } else {
            SKETCH_INTERVALS as u64 + 1
        };
        if s.len() as u64 != expected {
            return Err("sketch has the wrong number of values");
        }
        Ok(())
    }
}

impl CategoricalBaseline {
    /// Baseline of a categorical feature from its (non-missing) values.
    pub fn from_values<'a, I: IntoIterator<Item = &'a str>>(values: I) -> CategoricalBaseline {
        let mut counts = BTreeMap::new();
        for v in values {
            bump(&mut counts, v);
        }
        CategoricalBaseline::from_counts(counts, 0)
    }

    /// Baseline from category counts (zero counts are dropped).
    pub fn from_counts(mut counts: BTreeMap<String, u64>, missing: u64) -> CategoricalBaseline {
        counts.retain(|_, c| *c > 0);
        let n = counts.values().sum();
        CategoricalBaseline { n, missing, counts }
    }
}

fn bump(counts: &mut BTreeMap<String, u64>, key: &str) {
    match counts.get_mut(key) {
        Some(c) => *c += 1,
        None => {
            counts.insert(key.to_owned(), 1);
        }
    }
}

// ---------------------------------------------------------------------------
// Building a baseline from rows
// ---------------------------------------------------------------------------

/// Accumulates training rows and computes a [`Baseline`] (packaging time:
/// keeps every numeric value until [`finish`](Self::finish)).
#[derive(Debug, Clone)]
pub struct BaselineBuilder {
    features: Vec<(String, DriftKind)>,
    columns: Vec<BuildColumn>,
    rows: u64,
}

#[derive(Debug, Clone)]
enum BuildColumn {
    Numeric {
        values: Vec<f64>,
        missing: u64,
    },
    Categorical {
        counts: BTreeMap<String, u64>,
        missing: u64,
    },
}

impl BaselineBuilder {
    /// A builder for these features, in row order. Names must be unique.
    pub fn new<S: Into<String>>(
        features: impl IntoIterator<Item = (S, DriftKind)>,
    ) -> Result<Self, DriftError> {
        let features = check_names(features)?;
        let columns = features
            .iter()
            .map(|(_, k)| match k {
                DriftKind::Numeric => BuildColumn::Numeric {
                    values: Vec::new(),
                    missing: 0,
                },
                DriftKind::Categorical => BuildColumn::Categorical {
                    counts: BTreeMap::new(),
                    missing: 0,
                },
            })
            .collect();
        Ok(BaselineBuilder {
            features,
            columns,
            rows: 0,
        })
    }

    /// Adds one row (one value per feature, in the order given to [`new`](Self::new)).
    /// A rejected row changes nothing.
    pub fn push_row(&mut self, row: &[DriftValue<'_>]) -> Result<(), DriftError> {
        check_row(&self.features, row)?;
        for (col, v) in self.columns.iter_mut().zip(row) {
            match (col, v) {
                (BuildColumn::Numeric { values, .. }, DriftValue::Num(x)) if x.is_finite() => {
                    values.push(*x)
                }
                (BuildColumn::Numeric { missing, .. }, _) => *missing += 1,
                (BuildColumn::Categorical { counts, .. }, DriftValue::Cat(s)) => bump(counts, s),
                (BuildColumn::Categorical { missing, .. }, _) => *missing += 1,
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Computes the baseline (sorts each numeric column once).
    pub fn finish(self) -> Baseline {
        let features = self
            .features
            .into_iter()
            .zip(self.columns)
            .map(|((name, _), col)| {
                let stats = match col {
                    BuildColumn::Numeric {
                        mut values,
                        missing,
                    } => {
                        values.sort_unstable_by(f64::total_cmp);
                        FeatureStats::Numeric(NumericBaseline::from_sorted(&values, missing))
                    }
                    BuildColumn::Categorical { counts, missing } => {
                        FeatureStats::Categorical(CategoricalBaseline::from_counts(counts, missing))
                    }
                };
                FeatureBaseline { name, stats }
            })
            .collect();
        Baseline {
            version: BASELINE_VERSION,
            features,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::two_feature_case;

    #[test]
    fn baseline_round_trips_and_is_validated() {
        let (b, _) = two_feature_case(3000, 0.0);
        // CBOR, as in bundles: exact.
        let mut cbor = Vec::new();
        ciborium::into_writer(&b, &mut cbor).unwrap();
        let back: Baseline = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(back, b);
        back.validate().unwrap();
        let json = serde_json::to_string(&b).unwrap();
        // Unknown (future) fields are ignored.
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["features"][0]["stats"]["numeric"]["future_field"] = 1.into();
        v["extra"] = "x".into();
        assert_eq!(
            serde_json::from_value::<Baseline>(v)
                .unwrap()
                .features
                .len(),
            2
        );

        let broken = |f: &dyn Fn(&mut Baseline)| {
            let mut x = b.clone();
            f(&mut x);
            x.validate().unwrap_err()
        };
        assert!(matches!(
            broken(&|x| x.version = 99),
            DriftError::UnsupportedVersion { found: 99, .. }
        ));
        fn num(x: &mut Baseline) -> &mut NumericBaseline {
            match &mut x.features[0].stats {
                FeatureStats::Numeric(n) => n,
                FeatureStats::Categorical(_) => unreachable!(),
            }
        }
        assert!(matches!(
            broken(&|x| num(x).sketch.values.truncate(10)),
            DriftError::InvalidBaseline { .. }
        ));
        assert!(matches!(
            broken(&|x| num(x).sketch.values.reverse()),
            DriftError::InvalidBaseline { .. }
        ));
        assert!(matches!(
            broken(&|x| num(x).bin_edges.pop().map(drop).unwrap()),
            DriftError::InvalidBaseline { .. }
        ));
        assert!(matches!(
            broken(&|x| num(x).std = f64::NAN),
            DriftError::InvalidBaseline { .. }
        ));
        assert!(matches!(
            broken(
                &|x| if let FeatureStats::Categorical(c) = &mut x.features[1].stats {
                    c.n += 1;
                }
            ),
            DriftError::InvalidBaseline { .. }
        ));
        assert!(matches!(
            broken(&|x| x.features[1].name = "x".into()),
            DriftError::DuplicateFeature(_)
        ));
    }
}
