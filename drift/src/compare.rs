//! Comparing a window with a baseline: [`compare`] validates both sides,
//! computes the metrics of every feature (through `crate::stats`), applies
//! the rules of the configuration and returns a [`DriftReport`] with one
//! [`FeatureReport`] per baseline feature.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::stats::{
    bin_proportions, chi2_sf, jensen_shannon, ks_2samp_pvalue, ks_statistic_exact,
    ks_statistic_sketch, psi, wasserstein_exact, wasserstein_sketch,
};
use crate::window::WindowColumn;
use crate::{
    Baseline, CategoricalBaseline, CurrentSample, DriftConfig, DriftError, DriftKind, DriftMethod,
    FeatureStats, NumericBaseline,
};

/// Evidently's floor on the reference standard deviation.
const WASSERSTEIN_NORM_FLOOR: f64 = 0.001;

/// Drift of one feature. `None` statistics could not be computed (see the crate doc).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureReport {
    pub name: String,
    pub kind: DriftKind,
    /// Rows of the current sample (missing values included).
    pub current_rows: usize,
    /// Missing values among them.
    pub missing: usize,
    pub psi: Option<f64>,
    pub ks_statistic: Option<f64>,
    pub ks_pvalue: Option<f64>,
    pub wasserstein: Option<f64>,
    pub wasserstein_normed: Option<f64>,
    pub jensen_shannon: Option<f64>,
    pub chi2_pvalue: Option<f64>,
    /// The statistic that decided.
    pub method: DriftMethod,
    pub threshold: f64,
    pub drifted: bool,
}

impl FeatureReport {
    /// Value of the deciding statistic.
    pub fn value(&self) -> Option<f64> {
        match self.method {
            DriftMethod::Wasserstein => self.wasserstein_normed,
            DriftMethod::Psi => self.psi,
            DriftMethod::Ks => self.ks_pvalue,
            DriftMethod::JensenShannon => self.jensen_shannon,
            DriftMethod::Chi2 => self.chi2_pvalue,
        }
    }
}

/// Result of [`compare`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    /// One per baseline feature, in baseline order.
    pub features: Vec<FeatureReport>,
    pub drifted_features: usize,
    /// `drifted_features / features.len()` (0 without features).
    pub share: f64,
    /// `share >= drift_share`.
    pub dataset_drifted: bool,
    /// The configured `drift_share`.
    pub drift_share: f64,
    /// Rows of the current sample.
    pub rows: usize,
}

/// Compares the current sample with the baseline, feature by feature (matched
/// by name; features of the sample that the baseline lacks are ignored).
///
/// Errors: an invalid baseline ([`Baseline::validate`]) or configuration
/// ([`DriftConfig::validate`]), a baseline feature absent from the sample or
/// of another kind there.
pub fn compare(
    baseline: &Baseline,
    current: &CurrentSample,
    config: &DriftConfig,
) -> Result<DriftReport, DriftError> {
    baseline.validate()?;
    config.validate(baseline)?;
    let index: HashMap<&str, usize> = current
        .features()
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.as_str(), i))
        .collect();
    let mut features = Vec::with_capacity(baseline.features.len());
    for fb in &baseline.features {
        let &ci = index
            .get(fb.name.as_str())
            .ok_or_else(|| DriftError::MissingFeature(fb.name.clone()))?;
        let (method, threshold) = config.rule_for(fb)?;
        let mut report = FeatureReport {
            name: fb.name.clone(),
            kind: fb.kind(),
            current_rows: current.rows(),
            missing: 0,
            psi: None,
            ks_statistic: None,
            ks_pvalue: None,
            wasserstein: None,
            wasserstein_normed: None,
            jensen_shannon: None,
            chi2_pvalue: None,
            method,
            threshold,
            drifted: false,
        };
        match (&fb.stats, current.column(ci)) {
            (FeatureStats::Numeric(b), WindowColumn::Numeric(values)) => {
                let mut cur: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
                report.missing = values.len() - cur.len();
                cur.sort_unstable_by(f64::total_cmp);
                if let Some(m) = numeric_metrics(b, &cur) {
                    report.psi = Some(m.psi);
                    report.jensen_shannon = Some(m.jensen_shannon);
                    report.ks_statistic = Some(m.ks_statistic);
                    report.ks_pvalue = Some(m.ks_pvalue);
                    report.wasserstein = Some(m.wasserstein);
                    report.wasserstein_normed = Some(m.wasserstein_normed);
                }
            }
            (FeatureStats::Categorical(b), WindowColumn::Categorical(w)) => {
                report.missing = w.missing();
                if let Some(m) = categorical_metrics(b, &w.counts()) {
                    report.psi = Some(m.psi);
                    report.jensen_shannon = Some(m.jensen_shannon);
                    report.chi2_pvalue = Some(m.chi2_pvalue);
                }
            }
            _ => {
                return Err(DriftError::KindMismatch {
                    feature: fb.name.clone(),
                    baseline: fb.kind(),
                    current: current.features()[ci].1,
                });
            }
        }
        report.drifted = match report.value() {
            Some(v) if method.is_p_value() => v < threshold,
            Some(v) => v >= threshold,
            None => false,
        };
        features.push(report);
    }
    let drifted_features = features.iter().filter(|f| f.drifted).count();
    let share = if features.is_empty() {
        0.0
    } else {
        drifted_features as f64 / features.len() as f64
    };
    Ok(DriftReport {
        drifted_features,
        share,
        dataset_drifted: !features.is_empty() && share >= config.drift_share,
        drift_share: config.drift_share,
        rows: current.rows(),
        features,
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct NumericMetrics {
    psi: f64,
    jensen_shannon: f64,
    ks_statistic: f64,
    ks_pvalue: f64,
    wasserstein: f64,
    wasserstein_normed: f64,
}

/// `cur`: sorted finite values. None when either side is empty.
fn numeric_metrics(b: &NumericBaseline, cur: &[f64]) -> Option<NumericMetrics> {
    if b.n == 0 || cur.is_empty() {
        return None;
    }
    let cur_props = bin_proportions(cur, &b.bin_edges);
    let sketch = &b.sketch.values;
    let (ks_statistic, wasserstein) = if b.sketch.exact {
        (
            ks_statistic_exact(sketch, cur),
            wasserstein_exact(sketch, cur),
        )
    } else {
        (
            ks_statistic_sketch(sketch, cur),
            wasserstein_sketch(sketch, cur),
        )
    };
    let (ks_pvalue, _) = ks_2samp_pvalue(b.n, cur.len() as u64, ks_statistic);
    let wasserstein_normed = wasserstein / b.population_std().max(WASSERSTEIN_NORM_FLOOR);
    Some(NumericMetrics {
        psi: psi(&b.bin_proportions, &cur_props),
        jensen_shannon: jensen_shannon(&b.bin_proportions, &cur_props),
        ks_statistic,
        ks_pvalue,
        wasserstein,
        wasserstein_normed,
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct CategoricalMetrics {
    psi: f64,
    jensen_shannon: f64,
    chi2_statistic: f64,
    chi2_pvalue: f64,
}

/// None when either side has no (non-missing) value.
fn categorical_metrics(
    b: &CategoricalBaseline,
    cur: &BTreeMap<&str, u64>,
) -> Option<CategoricalMetrics> {
    // Union of the categories, sorted (both maps iterate in key order).
    let mut rc = Vec::new();
    let mut cc = Vec::new();
    let mut r = b
        .counts
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(k, c)| (k.as_str(), *c))
        .peekable();
    let mut c = cur
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(k, c)| (*k, *c))
        .peekable();
    loop {
        let (x, y) = match (r.peek(), c.peek()) {
            (None, None) => break,
            (Some(&(rk, rv)), Some(&(ck, cv))) => match rk.cmp(ck) {
                std::cmp::Ordering::Less => (Some(rv), None),
                std::cmp::Ordering::Greater => (None, Some(cv)),
                std::cmp::Ordering::Equal => (Some(rv), Some(cv)),
            },
            (Some(&(_, rv)), None) => (Some(rv), None),
            (None, Some(&(_, cv))) => (None, Some(cv)),
        };
        if x.is_some() {
            r.next();
        }
        if y.is_some() {
            c.next();
        }
        rc.push(x.unwrap_or(0) as f64);
        cc.push(y.unwrap_or(0) as f64);
    }
    let nr: f64 = rc.iter().sum();
    let nc: f64 = cc.iter().sum();
    if nr == 0.0 || nc == 0.0 {
        return None;
    }
    let rp: Vec<f64> = rc.iter().map(|x| x / nr).collect();
    let cp: Vec<f64> = cc.iter().map(|x| x / nc).collect();
    // Expected proportions: the reference's, half an observation for unseen categories.
    let e: Vec<f64> = rc
        .iter()
        .map(|&x| if x > 0.0 { x / nr } else { 0.5 / nr })
        .collect();
    let es: f64 = e.iter().sum();
    let chi2_statistic: f64 = e
        .iter()
        .zip(&cc)
        .map(|(&ei, &o)| {
            let f_exp = ei / es * nc;
            (o - f_exp) * (o - f_exp) / f_exp
        })
        .sum();
    let chi2_pvalue = if rc.len() < 2 {
        1.0
    } else {
        chi2_sf((rc.len() - 1) as f64, chi2_statistic)
    };
    Some(CategoricalMetrics {
        psi: psi(&rp, &cp),
        jensen_shannon: jensen_shannon(&rc, &cc),
        chi2_statistic,
        chi2_pvalue,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{
        assert_close, lcg_values, num_rows, numeric, one_feature_baseline, reference, rel_err,
        sample_for, two_feature_case,
    };
    use crate::{
        BASELINE_VERSION, BaselineBuilder, DriftValue, SKETCH_EXACT_MAX, SKETCH_INTERVALS,
    };

    /// Every numeric data set against numpy/scipy. Exact sketches: 1e-9
    /// relative (p-values 1e-8); quantile sketches: exact against the same
    /// statistics computed on the sketch in Python, and within the documented
    /// approximation of scipy on the raw reference.
    #[test]
    fn numeric_statistics_match_scipy() {
        for case in reference().numeric {
            let name = case.name.as_str();
            let baseline =
                one_feature_baseline(name, DriftKind::Numeric, &num_rows(&case.reference));
            let b = numeric(&baseline);
            assert_eq!((b.n, b.missing), (case.n, case.missing), "{name}: counts");
            assert_close(&format!("{name}: mean"), b.mean, case.mean, 1e-12, 1e-15);
            assert_close(&format!("{name}: std"), b.std, case.std, 1e-12, 0.0);
            assert_close(
                &format!("{name}: population std"),
                b.population_std(),
                case.std_pop,
                1e-12,
                0.0,
            );
            assert_eq!((b.min, b.max), (case.min, case.max), "{name}: min/max");
            let edges_bits: Vec<u64> = b.bin_edges.iter().map(|x| x.to_bits()).collect();
            assert_eq!(
                edges_bits, case.edges_bits,
                "{name}: edges are np.quantile's, bit for bit"
            );
            for (got, want) in b.bin_proportions.iter().zip(&case.ref_props) {
                assert_close(&format!("{name}: ref proportion"), *got, *want, 1e-15, 0.0);
            }
            assert_eq!(b.sketch.exact, case.sketch_exact, "{name}: sketch kind");
            if let Some(sketch) = &case.sketch_bits {
                let got: Vec<u64> = b.sketch.values.iter().map(|x| x.to_bits()).collect();
                assert_eq!(
                    &got, sketch,
                    "{name}: sketch is np.quantile(k/2048), bit for bit"
                );
            }

            let sample = sample_for(&baseline, &num_rows(&case.cur));
            let report = compare(&baseline, &sample, &DriftConfig::default()).unwrap();
            let f = &report.features[0];
            assert_eq!(f.current_rows, case.cur.len(), "{name}");
            assert_eq!(f.missing, case.cur_missing, "{name}");
            assert_close(
                &format!("{name}: psi"),
                f.psi.unwrap(),
                case.psi,
                1e-12,
                1e-15,
            );
            assert_close(
                &format!("{name}: js"),
                f.jensen_shannon.unwrap(),
                case.jensen_shannon,
                1e-12,
                1e-15,
            );
            let m = (case.cur.len() - case.cur_missing) as u64;
            let ks = f.ks_statistic.unwrap();
            let (_, exact_p) = ks_2samp_pvalue(case.n, m, ks);
            let w = f.wasserstein.unwrap();
            if case.sketch_exact {
                assert_close(
                    &format!("{name}: ks statistic"),
                    ks,
                    case.ks_statistic,
                    1e-12,
                    1e-15,
                );
                let want = if exact_p {
                    case.ks_pvalue_auto
                } else {
                    case.ks_pvalue_asymp
                };
                assert_close(
                    &format!("{name}: ks p-value"),
                    f.ks_pvalue.unwrap(),
                    want,
                    1e-8,
                    1e-300,
                );
                assert_close(
                    &format!("{name}: wasserstein"),
                    w,
                    case.wasserstein,
                    1e-9,
                    0.0,
                );
                assert_close(
                    &format!("{name}: normed"),
                    f.wasserstein_normed.unwrap(),
                    case.wasserstein_normed,
                    1e-9,
                    0.0,
                );
            } else {
                // Same statistics on the same sketch, computed differently in Python.
                assert_close(
                    &format!("{name}: sketch ks"),
                    ks,
                    case.sketch_ks_statistic.unwrap(),
                    1e-12,
                    1e-15,
                );
                assert_close(
                    &format!("{name}: sketch w1"),
                    w,
                    case.sketch_wasserstein.unwrap(),
                    1e-9,
                    0.0,
                );
                let want = if exact_p {
                    case.sketch_ks_pvalue_exact.unwrap()
                } else {
                    case.sketch_ks_pvalue_asymp.unwrap()
                };
                assert_close(
                    &format!("{name}: sketch ks p"),
                    f.ks_pvalue.unwrap(),
                    want,
                    1e-8,
                    1e-300,
                );
                // Against scipy on the raw reference: the sketch approximation.
                let (dw, dks) = (rel_err(w, case.wasserstein), (ks - case.ks_statistic).abs());
                eprintln!(
                    "{name}: sketch vs raw: wasserstein rel err {dw:.2e}, ks abs err {dks:.2e}, p {:e} vs {:e}",
                    f.ks_pvalue.unwrap(),
                    case.ks_pvalue_auto
                );
                assert!(
                    dw < 1e-2,
                    "{name}: wasserstein {w} vs raw {}",
                    case.wasserstein
                );
                assert!(dks < 2e-3, "{name}: ks {ks} vs raw {}", case.ks_statistic);
                assert_close(
                    &format!("{name}: normed (sketch)"),
                    f.wasserstein_normed.unwrap(),
                    case.wasserstein_normed,
                    1e-2,
                    0.0,
                );
            }
            assert_eq!(f.method, case.default_method, "{name}: default method");
            assert_eq!(f.drifted, case.default_drifted, "{name}: default verdict");
        }
    }

    #[test]
    fn categorical_statistics_match_scipy() {
        for case in reference().categorical {
            let name = case.name.as_str();
            let mut rows: Vec<DriftValue<'_>> = Vec::new();
            for (k, &c) in &case.ref_counts {
                rows.extend(std::iter::repeat_n(DriftValue::Cat(k.as_str()), c as usize));
            }
            rows.extend(std::iter::repeat_n(
                DriftValue::Missing,
                case.ref_missing as usize,
            ));
            let baseline = one_feature_baseline(name, DriftKind::Categorical, &rows);
            match &baseline.features[0].stats {
                FeatureStats::Categorical(c) => {
                    assert_eq!((c.n, c.missing), (case.n, case.ref_missing), "{name}");
                    assert_eq!(c.counts, case.ref_counts, "{name}");
                }
                FeatureStats::Numeric(_) => panic!("{name}: not categorical"),
            }
            // Interleave the current rows so that the window's interning is exercised.
            let mut cur: Vec<DriftValue<'_>> = Vec::new();
            let mut left: Vec<(&str, u64)> = case
                .cur_counts
                .iter()
                .map(|(k, c)| (k.as_str(), *c))
                .collect();
            while left.iter().any(|(_, c)| *c > 0) {
                for (k, c) in left.iter_mut().filter(|(_, c)| *c > 0) {
                    cur.push(DriftValue::Cat(k));
                    *c -= 1;
                }
            }
            cur.extend(std::iter::repeat_n(DriftValue::Missing, case.cur_missing));
            let sample = sample_for(&baseline, &cur);
            let report = compare(&baseline, &sample, &DriftConfig::default()).unwrap();
            let f = &report.features[0];
            assert_eq!(f.missing, case.cur_missing, "{name}");
            assert_close(
                &format!("{name}: psi"),
                f.psi.unwrap(),
                case.psi,
                1e-12,
                1e-15,
            );
            assert_close(
                &format!("{name}: js"),
                f.jensen_shannon.unwrap(),
                case.jensen_shannon,
                1e-12,
                1e-15,
            );
            assert_close(
                &format!("{name}: chi2 p"),
                f.chi2_pvalue.unwrap(),
                case.chi2_pvalue,
                1e-9,
                1e-300,
            );
            let FeatureStats::Categorical(cb) = &baseline.features[0].stats else {
                unreachable!()
            };
            let m = categorical_metrics(cb, &sample_counts(&sample)).unwrap();
            assert_close(
                &format!("{name}: chi2 statistic"),
                m.chi2_statistic,
                case.chi2_statistic,
                1e-12,
                0.0,
            );
            assert!(f.ks_statistic.is_none() && f.ks_pvalue.is_none() && f.wasserstein.is_none());
            assert_eq!(f.method, case.default_method, "{name}");
            assert_eq!(f.drifted, case.default_drifted, "{name}");
        }
    }

    fn sample_counts(s: &CurrentSample) -> BTreeMap<&str, u64> {
        match s.column(0) {
            WindowColumn::Categorical(w) => w.counts(),
            WindowColumn::Numeric(_) => panic!("not categorical"),
        }
    }

    #[test]
    fn identical_samples_do_not_drift() {
        for n in [1usize, 2, 50, 999, 1500, 2048, 2049, 6000] {
            let values = lcg_values(n as u64, n);
            let rows: Vec<DriftValue<'_>> = values.iter().map(|&x| DriftValue::Num(x)).collect();
            let baseline = one_feature_baseline("x", DriftKind::Numeric, &rows);
            let report = compare(
                &baseline,
                &sample_for(&baseline, &rows),
                &DriftConfig::default(),
            )
            .unwrap();
            let f = &report.features[0];
            assert!(f.psi.unwrap().abs() < 1e-12, "n={n}: psi {:?}", f.psi);
            assert!(
                f.jensen_shannon.unwrap() < 1e-7,
                "n={n}: js {:?}",
                f.jensen_shannon
            );
            if n <= SKETCH_EXACT_MAX {
                assert_eq!(f.ks_statistic, Some(0.0), "n={n}");
                assert_eq!(f.ks_pvalue, Some(1.0), "n={n}");
                assert_eq!(f.wasserstein, Some(0.0), "n={n}");
            } else {
                // The sketch is an approximation of the values themselves.
                assert!(
                    f.ks_statistic.unwrap() < 2.0 / SKETCH_INTERVALS as f64,
                    "n={n}: {:?}",
                    f.ks_statistic
                );
                assert!(
                    f.wasserstein_normed.unwrap() < 1e-3,
                    "n={n}: {:?}",
                    f.wasserstein_normed
                );
            }
            assert!(!f.drifted && !report.dataset_drifted, "n={n}");
        }
        let cats = ["a", "b", "b", "c", "c", "c"];
        let rows: Vec<DriftValue<'_>> = cats.iter().map(|c| DriftValue::Cat(c)).collect();
        let baseline = one_feature_baseline("c", DriftKind::Categorical, &rows);
        let f = &compare(
            &baseline,
            &sample_for(&baseline, &rows),
            &DriftConfig::default(),
        )
        .unwrap()
        .features[0];
        assert_eq!(
            (f.psi, f.jensen_shannon, f.chi2_pvalue),
            (Some(0.0), Some(0.0), Some(1.0))
        );
        assert!(!f.drifted);
    }

    #[test]
    fn empty_and_all_missing_samples_report_nulls() {
        let (b, _) = two_feature_case(500, 0.0);
        let mut s = CurrentSample::new(&b, 100);
        for rows in [0, 4] {
            for _ in 0..rows {
                s.push_row(&[DriftValue::Num(f64::NAN), DriftValue::Missing])
                    .unwrap();
            }
            let r = compare(&b, &s, &DriftConfig::default()).unwrap();
            assert_eq!(
                (r.rows, r.drifted_features, r.share, r.dataset_drifted),
                (rows, 0, 0.0, false)
            );
            for f in &r.features {
                assert_eq!((f.current_rows, f.missing, f.drifted), (rows, rows, false));
                assert!(f.psi.is_none() && f.jensen_shannon.is_none() && f.ks_pvalue.is_none());
                assert!(
                    f.wasserstein_normed.is_none()
                        && f.chi2_pvalue.is_none()
                        && f.value().is_none()
                );
            }
            let json = serde_json::to_string(&r).unwrap();
            assert!(
                json.contains("\"psi\":null") && !json.contains("NaN"),
                "{json}"
            );
        }
        // An all-missing reference compares to nothing either.
        let empty = one_feature_baseline("x", DriftKind::Numeric, &[DriftValue::Missing; 3]);
        assert_eq!(numeric(&empty).missing, 3);
        let r = compare(
            &empty,
            &sample_for(&empty, &[DriftValue::Num(1.0)]),
            &DriftConfig::default(),
        )
        .unwrap();
        assert!(r.features[0].ks_statistic.is_none() && !r.features[0].drifted);
        let empty = Baseline {
            version: BASELINE_VERSION,
            features: vec![],
        };
        let r = compare(
            &empty,
            &CurrentSample::new(&empty, 1),
            &DriftConfig::default(),
        )
        .unwrap();
        assert_eq!((r.share, r.dataset_drifted), (0.0, false));
    }

    #[test]
    fn constant_and_single_value_references_stay_finite() {
        let constant = one_feature_baseline("x", DriftKind::Numeric, &[DriftValue::Num(3.0); 50]);
        let nb = numeric(&constant);
        assert_eq!((nb.std, nb.min, nb.max), (0.0, 3.0, 3.0));
        assert_eq!(nb.bin_edges, vec![3.0; 9]);
        assert_eq!(nb.bin_proportions[9], 1.0);
        let same = compare(
            &constant,
            &sample_for(&constant, &[DriftValue::Num(3.0); 20]),
            &DriftConfig::default(),
        )
        .unwrap();
        let f = &same.features[0];
        assert_eq!(
            (f.wasserstein, f.wasserstein_normed, f.ks_statistic),
            (Some(0.0), Some(0.0), Some(0.0))
        );
        assert!(!f.drifted);
        let moved = compare(
            &constant,
            &sample_for(&constant, &[DriftValue::Num(3.5); 20]),
            &DriftConfig::default(),
        )
        .unwrap();
        let f = &moved.features[0];
        // σ = 0: normalised by Evidently's floor 0.001.
        assert_close("normed", f.wasserstein_normed.unwrap(), 500.0, 1e-12, 0.0);
        assert_eq!(f.ks_statistic, Some(1.0));
        assert!(f.drifted && f.psi.unwrap().is_finite());

        let single = one_feature_baseline("x", DriftKind::Numeric, &[DriftValue::Num(-1.0)]);
        assert_eq!((numeric(&single).n, numeric(&single).std), (1, 0.0));
        for cur in [[DriftValue::Num(-1.0)], [DriftValue::Num(7.0)]] {
            let r = compare(&single, &sample_for(&single, &cur), &DriftConfig::default()).unwrap();
            let json = serde_json::to_string(&r).unwrap();
            assert!(!json.contains("NaN") && !json.contains("inf"), "{json}");
            assert!(r.features[0].ks_pvalue.unwrap().is_finite());
        }
    }

    #[test]
    fn report_serializes_with_the_documented_field_names() {
        let (b, s) = two_feature_case(500, 0.5);
        let r = compare(&b, &s, &DriftConfig::default()).unwrap();
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        let x = &v["features"][0];
        for key in [
            "name",
            "kind",
            "psi",
            "ks_statistic",
            "ks_pvalue",
            "wasserstein",
            "wasserstein_normed",
            "jensen_shannon",
            "chi2_pvalue",
            "method",
            "threshold",
            "drifted",
            "current_rows",
            "missing",
        ] {
            assert!(x.get(key).is_some(), "missing {key} in {x}");
        }
        assert_eq!(
            (x["kind"].as_str(), x["method"].as_str()),
            (Some("numeric"), Some("ks"))
        );
        assert!(x["chi2_pvalue"].is_null());
        assert_eq!(v["features"][1]["method"], "chi2");
        for key in [
            "drifted_features",
            "share",
            "dataset_drifted",
            "drift_share",
            "rows",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(format!("[{:<6}]", DriftMethod::Ks), "[ks    ]");
        let back: DriftReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    /// 10 000 rows × 10 features (7 numeric over an exact and a sketched
    /// reference, 3 categorical): windows are capped, shifted numeric
    /// features are found, categorical ones left alone. (Speed is measured
    /// in the `pipeline` benchmark, not asserted here.)
    #[test]
    fn compare_on_wide_windows() {
        let mut kinds: Vec<(String, DriftKind)> = (0..7)
            .map(|i| (format!("n{i}"), DriftKind::Numeric))
            .collect();
        kinds.extend((0..3).map(|i| (format!("c{i}"), DriftKind::Categorical)));
        let cats: Vec<String> = (0..20).map(|i| format!("cat{i}")).collect();
        let rows = |seed: u64, n: usize, shift: f64| -> Vec<Vec<(f64, usize)>> {
            let vals = lcg_values(seed, n * 10);
            (0..n)
                .map(|r| {
                    (0..10)
                        .map(|f| {
                            (
                                vals[r * 10 + f] + shift,
                                (vals[r * 10 + f].abs() * 7.0) as usize % 20,
                            )
                        })
                        .collect()
                })
                .collect()
        };
        let to_row = |row: &[(f64, usize)]| -> Vec<DriftValue<'_>> {
            row.iter()
                .enumerate()
                .map(|(f, (x, c))| {
                    if f < 7 {
                        DriftValue::Num(*x)
                    } else {
                        DriftValue::Cat(&cats[*c])
                    }
                })
                .collect()
        };
        for n_ref in [2000usize, 100_000] {
            let mut b = BaselineBuilder::new(kinds.clone()).unwrap();
            for row in rows(1, n_ref, 0.0) {
                b.push_row(&to_row(&row)).unwrap();
            }
            let baseline = b.finish();
            // Values are uniform on [-3, 7]: a shift of 0.55 gives KS statistics
            // near the exact computation's work cap.
            for shift in [0.0, 0.3, 0.55] {
                let mut s = CurrentSample::new(&baseline, 10_000);
                for row in rows(2, 12_000, shift) {
                    s.push_row(&to_row(&row)).unwrap();
                }
                let r = compare(&baseline, &s, &DriftConfig::default()).unwrap();
                assert_eq!(r.rows, 10_000);
                if shift == 0.0 {
                    assert_eq!(r.drifted_features, 0, "n_ref={n_ref}");
                }
                if shift == 0.55 {
                    let drifted: Vec<&str> = r
                        .features
                        .iter()
                        .filter(|f| f.drifted)
                        .map(|f| f.name.as_str())
                        .collect();
                    assert_eq!(
                        drifted,
                        ["n0", "n1", "n2", "n3", "n4", "n5", "n6"],
                        "n_ref={n_ref}"
                    );
                }
            }
        }
    }
}
