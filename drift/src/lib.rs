//! Drift baselines and drift statistics.
//!
//! A [`Baseline`] is computed once, at packaging time, from the training data
//! ([`BaselineBuilder`]) and travels in the bundle (CBOR). Devices and
//! `ferry drift` collect current rows in a bounded [`CurrentSample`] and call
//! [`compare`](compare()), which returns a [`DriftReport`]: per feature
//! statistics, a per feature verdict and a data set verdict. This crate
//! depends on std, serde and thiserror only.
//!
//! # Layout
//! - `kind`: what rows are made of ([`DriftKind`], [`DriftValue`]) and the
//!   checks every row passes before a builder or a window takes it.
//! - `error`: [`DriftError`], every way a baseline, row, sample or
//!   configuration is rejected.
//! - `baseline`: the stored baseline ([`Baseline`] and its per-feature parts,
//!   persisted in bundles) and [`BaselineBuilder`], which computes it from
//!   training rows at packaging time.
//! - `window`: [`CurrentSample`], the bounded ring of recent rows a device
//!   compares against the baseline.
//! - `config`: the rules that turn statistics into verdicts ([`DriftMethod`],
//!   [`DriftRule`], [`DriftConfig`], stored in the manifest) and Evidently's
//!   default rules.
//! - `compare`: [`compare()`], the metrics of one feature and the
//!   [`DriftReport`] / [`FeatureReport`] it returns.
//! - `stats`: the statistics as pure functions on `f64` slices, knowing
//!   nothing of baselines, windows or rules: sums, quantiles, bins, PSI and
//!   Jensen–Shannon (`basic`); the KS statistic and the Wasserstein distance
//!   against samples or sketches (`distance`); the scipy ports, two-sample KS
//!   p-values (`ks2samp`), the one-sample Kolmogorov distribution (`kstwo`)
//!   and the chi-square survival function (`chi2`).
//! - `testutil` (tests only): the scipy reference data
//!   (`tests/data/drift_reference.json`) and helpers shared by the unit
//!   tests, which sit next to the code they test.
//!
//! Modules are private; the public surface is re-exported below by name, and
//! `stats` exposes nothing but [`PSI_FLOOR`]. Dependencies point one way:
//! `stats` uses nothing else of the crate, `baseline` uses `stats` for its
//! quantiles and bins, `window` computes no statistic, and only `compare`
//! puts a baseline, a window and a configuration together.
//!
//! # What the baseline stores
//! Missing values are never part of a statistic but are counted: for numeric
//! features every non-finite value (NaN, ±inf) is missing; for categorical
//! features [`DriftValue::Missing`] is.
//!
//! Numeric feature ([`NumericBaseline`]):
//! - `n` (non-missing values), `missing`, `mean`, `std` — the **sample**
//!   standard deviation (ddof = 1; 0 when n < 2) — `min`, `max`;
//! - ten reference bins: the interior edges are the 10 %, 20 %, …, 90 %
//!   quantiles with linear interpolation (numpy's default
//!   `np.quantile(x, q, method="linear")`, reproduced bit for bit). Bins are
//!   left-closed, `[e_i, e_{i+1})`, the outer ones open: `(-inf, e_1)` and
//!   `[e_9, +inf)`; `bin_proportions` holds the reference share of each bin;
//! - a quantile sketch ([`QuantileSketch`]) for KS and Wasserstein: when
//!   n ≤ 2048 it holds all sorted values (`exact = true`, the statistics are
//!   then exact); otherwise the 2049 quantiles at p = k/2048, k = 0..=2048
//!   (same linear interpolation), and the reference distribution is the
//!   continuous one whose CDF interpolates linearly between these knots
//!   (F(q_k) = k/2048). Size: at most 2049 f64 per numeric feature. Against
//!   scipy on the raw values, the tests measure errors of at most 0.9 %
//!   relative for the Wasserstein distance (largest for heavy tails, where
//!   the last knot interval is wide) and 3·10⁻⁴ for the KS statistic.
//!
//! Categorical feature ([`CategoricalBaseline`]): `n`, `missing` and the count
//! of every category (`BTreeMap<String, u64>`).
//!
//! # Statistics (per feature, reference vs current)
//! - `psi`: population stability index on the ten reference bins (numeric) or
//!   on the categories of either side (categorical); both proportions are
//!   floored at 1e-4; natural log: `sum (cur - ref) * ln(cur / ref)`.
//! - `jensen_shannon`: Jensen–Shannon **distance** (the square root of the
//!   divergence), natural log, as `scipy.spatial.distance.jensenshannon`, on
//!   the same bins / categories, without flooring.
//! - `ks_statistic`, `ks_pvalue` (numeric): two-sample Kolmogorov–Smirnov,
//!   two-sided, as `scipy.stats.ks_2samp(ref, cur)` with its default method
//!   "auto": the exact distribution (Hodges' lattice paths) when
//!   max(n, m) ≤ 10 000, otherwise scipy's "asymp", which is
//!   `kstwo.sf(D, round(n·m/(n+m)))` — the one-sample Kolmogorov
//!   distribution, computed with the algorithms and switch-over points scipy
//!   uses (Durbin matrix, Pomeranz, Pelz–Good, Smirnov; Simard & L'Ecuyer),
//!   *not* the limiting Kolmogorov distribution. One deviation from scipy:
//!   the exact computation costs ~2·D·n·m lattice cells (~1.5 ns each), so
//!   above 2.5·10⁶ cells the "asymp" value is used instead. With a reference
//!   of ≤ 2048 values that only happens for p < 1e-5; for larger (sketched)
//!   references and windows near 10 000 rows it can happen at any p (the two
//!   then differ by about 1 %). With a quantile sketch the statistic is
//!   taken against the sketch's CDF and the p-value uses n = baseline `n`.
//! - `wasserstein` (numeric): 1-D Wasserstein-1 distance
//!   (`scipy.stats.wasserstein_distance`) between the reference (sketch) and
//!   the current values; `wasserstein_normed` = `wasserstein / max(σ, 0.001)`
//!   with σ the **population** standard deviation of the reference (derived
//!   from `std`): exactly Evidently's normalisation, which also keeps a
//!   constant reference (σ = 0) finite.
//! - `chi2_pvalue` (categorical): Pearson's chi-square goodness of fit,
//!   `scipy.stats.chisquare(f_obs = current counts, f_exp)` over the union of
//!   categories, `f_exp = e / sum(e) * current_total` where `e` is the
//!   reference proportion, or `0.5 / n_ref` (half an observation) for a
//!   category the reference never saw; degrees of freedom = categories − 1;
//!   1.0 when there is a single category. The survival function is the
//!   regularized upper incomplete gamma function Q(df/2, x/2).
//!
//! Statistics that cannot be computed (empty or all-missing current sample,
//! empty reference, a method that does not apply to the kind) are `None`
//! (`null` in JSON); no NaN or infinity is ever reported.
//!
//! # Default rules (Evidently's)
//! - reference `n` > 1000: numeric drifted when `wasserstein_normed >= 0.1`,
//!   categorical when `jensen_shannon >= 0.1`;
//! - otherwise: numeric drifted when `ks_pvalue < 0.05`, categorical when
//!   `chi2_pvalue < 0.05`.
//!
//! A [`DriftRule`] in [`DriftConfig::rules`] overrides the method and/or
//! threshold of one feature: for p-value methods (`ks`, `chi2`) drifted means
//! `p < threshold`, for distances (`wasserstein`, `psi`, `jensen_shannon`)
//! `value >= threshold`. `ks`/`wasserstein` apply to numeric features only,
//! `chi2` to categorical ones only ([`DriftError::MethodNotApplicable`]).
//! A feature whose statistic is `None` is not drifted. The data set is
//! drifted when the share of drifted features (over all baseline features)
//! is `>= drift_share` (default 0.5, Evidently's).
//!
//! # Memory
//! [`CurrentSample`] keeps at most `max_rows` rows (the most recent ones, in a
//! ring): 8 bytes per row per numeric feature, 4 bytes per row per
//! categorical feature plus two copies of each distinct category currently in
//! the window. [`compare`](compare()) additionally sorts a copy of one
//! numeric column at a time (8 bytes × rows) and, for the exact KS p-value,
//! two vectors of at most 20 001 f64 (n, m ≤ 10 000 there).
//! [`BaselineBuilder`] keeps every numeric value (it runs at packaging time).
//!
//! # Versioning of the persisted structs
//! [`Baseline`] (and [`DriftConfig`], which lives in the manifest) are
//! persisted in signed bundles. **Do not reorder or remove fields; add new
//! ones at the end with `#[serde(default)]`.** Unknown fields are ignored
//! when reading, so older runtimes read newer baselines. Bump
//! [`BASELINE_VERSION`] only for a change that older readers must not
//! silently misread (new semantics, a new [`FeatureStats`] variant);
//! [`compare`](compare()) rejects versions it does not know.

#![forbid(unsafe_code)]

mod baseline;
mod compare;
mod config;
mod error;
mod kind;
mod stats;
#[cfg(test)]
mod testutil;
mod window;

pub use baseline::{
    BASELINE_VERSION, Baseline, BaselineBuilder, CategoricalBaseline, FeatureBaseline,
    FeatureStats, NumericBaseline, QuantileSketch, REFERENCE_BINS, SKETCH_EXACT_MAX,
    SKETCH_INTERVALS,
};
pub use compare::{DriftReport, FeatureReport, compare};
pub use config::{DEFAULT_DRIFT_SHARE, DriftConfig, DriftMethod, DriftRule, LARGE_REFERENCE};
pub use error::DriftError;
pub use kind::{DriftKind, DriftValue};
pub use stats::PSI_FLOOR;
pub use window::CurrentSample;
