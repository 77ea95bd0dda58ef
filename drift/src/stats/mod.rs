//! The statistics, as pure functions on `f64` slices: they know nothing of
//! baselines, windows or rules, and every formula is documented against the
//! numpy/scipy function it reproduces (the unit tests check them against
//! values computed by scipy, `tests/data/drift_reference.json`).
//!
//! - `basic`: compensated sums, numpy's linear quantiles, reference bins, PSI
//!   and the Jensen–Shannon distance.
//! - `distance`: the KS statistic and the Wasserstein-1 distance, exact or
//!   against a quantile sketch.
//! - `ks2samp`: two-sample KS p-values (`scipy.stats.ks_2samp`).
//! - `kstwo`: the one-sample Kolmogorov distribution (`scipy.stats.kstwo`).
//! - `chi2`: the chi-square survival function (`scipy.stats.chi2.sf`).

mod basic;
mod chi2;
mod distance;
mod ks2samp;
mod kstwo;

pub use basic::PSI_FLOOR;
pub(crate) use basic::{bin_proportions, jensen_shannon, neumaier_sum, psi, quantile_sorted};
pub(crate) use chi2::chi2_sf;
pub(crate) use distance::{
    ks_statistic_exact, ks_statistic_sketch, wasserstein_exact, wasserstein_sketch,
};
pub(crate) use ks2samp::ks_2samp_pvalue;
