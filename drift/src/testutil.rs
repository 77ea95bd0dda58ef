//! Test helpers shared by the modules' unit tests: the scipy reference data
//! (`tests/data/drift_reference.json`, made by `make_drift_reference.py`),
//! tolerance checks, and small baselines and samples.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{
    Baseline, BaselineBuilder, CurrentSample, DriftKind, DriftMethod, DriftValue, FeatureStats,
    NumericBaseline,
};

const REFERENCE: &str = include_str!("../tests/data/drift_reference.json");

#[derive(Deserialize)]
pub(crate) struct Reference {
    pub(crate) numeric: Vec<NumCase>,
    pub(crate) categorical: Vec<CatCase>,
    pub(crate) kstwo_sf: Vec<KsTwo>,
    pub(crate) ks_2samp_pvalue: Vec<Ks2>,
    pub(crate) chi2_sf: Vec<Chi2>,
}

#[derive(Deserialize)]
pub(crate) struct NumCase {
    pub(crate) name: String,
    #[serde(rename = "ref")]
    pub(crate) reference: Vec<Option<f64>>,
    pub(crate) cur: Vec<Option<f64>>,
    pub(crate) n: u64,
    pub(crate) missing: u64,
    pub(crate) cur_missing: usize,
    pub(crate) mean: f64,
    pub(crate) std: f64,
    pub(crate) std_pop: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) edges_bits: Vec<u64>,
    pub(crate) ref_props: Vec<f64>,
    pub(crate) psi: f64,
    pub(crate) jensen_shannon: f64,
    pub(crate) ks_statistic: f64,
    pub(crate) ks_pvalue_auto: f64,
    pub(crate) ks_pvalue_asymp: f64,
    pub(crate) wasserstein: f64,
    pub(crate) wasserstein_normed: f64,
    pub(crate) sketch_exact: bool,
    pub(crate) sketch_bits: Option<Vec<u64>>,
    pub(crate) sketch_wasserstein: Option<f64>,
    pub(crate) sketch_ks_statistic: Option<f64>,
    pub(crate) sketch_ks_pvalue_exact: Option<f64>,
    pub(crate) sketch_ks_pvalue_asymp: Option<f64>,
    pub(crate) default_method: DriftMethod,
    pub(crate) default_drifted: bool,
}

#[derive(Deserialize)]
pub(crate) struct CatCase {
    pub(crate) name: String,
    pub(crate) ref_counts: BTreeMap<String, u64>,
    pub(crate) cur_counts: BTreeMap<String, u64>,
    pub(crate) ref_missing: u64,
    pub(crate) cur_missing: usize,
    pub(crate) n: u64,
    pub(crate) psi: f64,
    pub(crate) jensen_shannon: f64,
    pub(crate) chi2_statistic: f64,
    pub(crate) chi2_pvalue: f64,
    pub(crate) default_method: DriftMethod,
    pub(crate) default_drifted: bool,
}

#[derive(Deserialize)]
pub(crate) struct KsTwo {
    pub(crate) n: u64,
    pub(crate) x: f64,
    pub(crate) sf: f64,
}

#[derive(Deserialize)]
pub(crate) struct Ks2 {
    pub(crate) n1: u64,
    pub(crate) n2: u64,
    pub(crate) d: f64,
    pub(crate) p_exact: Option<f64>,
    pub(crate) p_asymp: f64,
}

#[derive(Deserialize)]
pub(crate) struct Chi2 {
    pub(crate) df: f64,
    pub(crate) x: f64,
    pub(crate) sf: f64,
}

pub(crate) fn reference() -> Reference {
    serde_json::from_str(REFERENCE).expect("drift_reference.json parses")
}

pub(crate) fn rel_err(got: f64, want: f64) -> f64 {
    if got == want {
        0.0
    } else {
        (got - want).abs() / want.abs().max(f64::MIN_POSITIVE)
    }
}

#[track_caller]
pub(crate) fn assert_close(what: &str, got: f64, want: f64, rel: f64, abs: f64) {
    assert!(
        (got - want).abs() <= abs || rel_err(got, want) <= rel,
        "{what}: got {got:e}, want {want:e} (rel err {:e})",
        rel_err(got, want)
    );
}

pub(crate) fn num_rows(values: &[Option<f64>]) -> Vec<DriftValue<'static>> {
    values
        .iter()
        .map(|v| v.map_or(DriftValue::Missing, DriftValue::Num))
        .collect()
}

pub(crate) fn one_feature_baseline(
    name: &str,
    kind: DriftKind,
    rows: &[DriftValue<'_>],
) -> Baseline {
    let mut b = BaselineBuilder::new([(name, kind)]).unwrap();
    for v in rows {
        b.push_row(std::slice::from_ref(v)).unwrap();
    }
    b.finish()
}

pub(crate) fn sample_for(baseline: &Baseline, rows: &[DriftValue<'_>]) -> CurrentSample {
    let mut s = CurrentSample::new(baseline, usize::MAX);
    for v in rows {
        s.push_row(std::slice::from_ref(v)).unwrap();
    }
    s
}

pub(crate) fn numeric(b: &Baseline) -> &NumericBaseline {
    match &b.features[0].stats {
        FeatureStats::Numeric(n) => n,
        FeatureStats::Categorical(_) => panic!("not numeric"),
    }
}

pub(crate) fn lcg_values(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 10.0 - 3.0
        })
        .collect()
}

pub(crate) fn two_feature_case(n_ref: usize, shift: f64) -> (Baseline, CurrentSample) {
    let xs = lcg_values(7, n_ref);
    let cats = ["a", "b", "c", "d"];
    let mut b =
        BaselineBuilder::new([("x", DriftKind::Numeric), ("c", DriftKind::Categorical)]).unwrap();
    for (i, &x) in xs.iter().enumerate() {
        b.push_row(&[DriftValue::Num(x), DriftValue::Cat(cats[i % 4])])
            .unwrap();
    }
    let baseline = b.finish();
    let mut s = CurrentSample::new(&baseline, usize::MAX);
    for (i, &x) in lcg_values(8, 600).iter().enumerate() {
        let c = if shift > 0.0 && i % 2 == 0 {
            "a"
        } else {
            cats[i % 4]
        };
        s.push_row(&[DriftValue::Num(x + shift), DriftValue::Cat(c)])
            .unwrap();
    }
    (baseline, s)
}
