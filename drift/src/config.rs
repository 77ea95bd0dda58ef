//! The rules that turn statistics into verdicts: which statistic decides
//! ([`DriftMethod`]), per-feature overrides ([`DriftRule`]), the settings
//! stored in the manifest ([`DriftConfig`], persisted: see the crate doc's
//! versioning rule) and Evidently's default rules.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Baseline, DriftError, DriftKind, FeatureBaseline};

/// Reference sizes above this use the distance rules (Wasserstein, JS).
pub const LARGE_REFERENCE: u64 = 1000;
/// Default share of drifted features that makes the data set drifted.
pub const DEFAULT_DRIFT_SHARE: f64 = 0.5;

/// Statistic used to decide whether a feature drifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftMethod {
    /// Normalised Wasserstein distance (numeric).
    Wasserstein,
    /// Population stability index (both kinds).
    Psi,
    /// Kolmogorov–Smirnov p-value (numeric).
    Ks,
    /// Jensen–Shannon distance (both kinds).
    JensenShannon,
    /// Chi-square p-value (categorical).
    Chi2,
}

impl DriftMethod {
    /// The name used in configurations and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftMethod::Wasserstein => "wasserstein",
            DriftMethod::Psi => "psi",
            DriftMethod::Ks => "ks",
            DriftMethod::JensenShannon => "jensen_shannon",
            DriftMethod::Chi2 => "chi2",
        }
    }

    /// Threshold used when a rule gives none (Evidently's defaults).
    pub fn default_threshold(self) -> f64 {
        match self {
            DriftMethod::Ks | DriftMethod::Chi2 => 0.05,
            DriftMethod::Wasserstein | DriftMethod::Psi | DriftMethod::JensenShannon => 0.1,
        }
    }

    /// True for p-value methods (drifted when `p < threshold`); false for
    /// distances (drifted when `value >= threshold`).
    pub fn is_p_value(self) -> bool {
        matches!(self, DriftMethod::Ks | DriftMethod::Chi2)
    }

    /// Whether the method can be used on features of this kind.
    pub fn applies_to(self, kind: DriftKind) -> bool {
        match self {
            DriftMethod::Wasserstein | DriftMethod::Ks => kind == DriftKind::Numeric,
            DriftMethod::Chi2 => kind == DriftKind::Categorical,
            DriftMethod::Psi | DriftMethod::JensenShannon => true,
        }
    }

    fn threshold_valid(self, t: f64) -> bool {
        if self.is_p_value() {
            t > 0.0 && t <= 1.0
        } else {
            t.is_finite() && t > 0.0
        }
    }
}

impl fmt::Display for DriftMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Per-feature override of the default rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftRule {
    pub method: DriftMethod,
    /// Defaults to [`DriftMethod::default_threshold`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
}

/// Drift settings (stored in the manifest, so persisted: see the crate doc's
/// versioning rule). Missing fields take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DriftConfig {
    /// Feature name → rule; other features use the default rules.
    pub rules: BTreeMap<String, DriftRule>,
    /// The data set drifted when the share of drifted features is >= this.
    pub drift_share: f64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            rules: BTreeMap::new(),
            drift_share: DEFAULT_DRIFT_SHARE,
        }
    }
}

impl DriftConfig {
    /// Checks `drift_share`, that every rule names a feature of `baseline`,
    /// applies to its kind and has a valid threshold (p-values: (0, 1];
    /// distances: finite and > 0). [`compare`](crate::compare()) calls it.
    pub fn validate(&self, baseline: &Baseline) -> Result<(), DriftError> {
        if !(self.drift_share > 0.0 && self.drift_share <= 1.0) {
            return Err(DriftError::InvalidDriftShare(self.drift_share));
        }
        for name in self.rules.keys() {
            let f = baseline
                .feature(name)
                .ok_or_else(|| DriftError::UnknownRuleFeature(name.clone()))?;
            self.rule_for(f)?;
        }
        Ok(())
    }

    /// Method and threshold that decide for this feature.
    pub fn rule_for(&self, feature: &FeatureBaseline) -> Result<(DriftMethod, f64), DriftError> {
        let kind = feature.kind();
        let Some(rule) = self.rules.get(&feature.name) else {
            return Ok(default_rule(kind, feature.stats.n()));
        };
        if !rule.method.applies_to(kind) {
            return Err(DriftError::MethodNotApplicable {
                feature: feature.name.clone(),
                method: rule.method,
                kind,
            });
        }
        let threshold = rule
            .threshold
            .unwrap_or_else(|| rule.method.default_threshold());
        if !rule.method.threshold_valid(threshold) {
            return Err(DriftError::InvalidThreshold {
                feature: feature.name.clone(),
                method: rule.method,
                threshold,
            });
        }
        Ok((rule.method, threshold))
    }
}

/// Evidently's default rule for a feature of this kind and reference size.
fn default_rule(kind: DriftKind, n_ref: u64) -> (DriftMethod, f64) {
    let method = match (kind, n_ref > LARGE_REFERENCE) {
        (DriftKind::Numeric, true) => DriftMethod::Wasserstein,
        (DriftKind::Categorical, true) => DriftMethod::JensenShannon,
        (DriftKind::Numeric, false) => DriftMethod::Ks,
        (DriftKind::Categorical, false) => DriftMethod::Chi2,
    };
    (method, method.default_threshold())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare;
    use crate::testutil::two_feature_case;

    #[test]
    fn default_rules_follow_reference_size() {
        let (b, s) = two_feature_case(800, 0.0);
        let r = compare(&b, &s, &DriftConfig::default()).unwrap();
        assert_eq!(
            (r.features[0].method, r.features[0].threshold),
            (DriftMethod::Ks, 0.05)
        );
        assert_eq!(
            (r.features[1].method, r.features[1].threshold),
            (DriftMethod::Chi2, 0.05)
        );
        assert_eq!(r.drifted_features, 0);
        let (b, s) = two_feature_case(1001, 0.0);
        let r = compare(&b, &s, &DriftConfig::default()).unwrap();
        assert_eq!(
            (r.features[0].method, r.features[0].threshold),
            (DriftMethod::Wasserstein, 0.1)
        );
        assert_eq!(
            (r.features[1].method, r.features[1].threshold),
            (DriftMethod::JensenShannon, 0.1)
        );
        assert_eq!(r.drifted_features, 0);

        let (b, s) = two_feature_case(1001, 1.5);
        let r = compare(&b, &s, &DriftConfig::default()).unwrap();
        assert!(r.features.iter().all(|f| f.drifted), "{r:?}");
        assert_eq!(
            (r.drifted_features, r.share, r.dataset_drifted, r.rows),
            (2, 1.0, true, 600)
        );
    }

    #[test]
    fn overrides_and_drift_share() {
        let (b, s) = two_feature_case(800, 1.5);
        let mut config = DriftConfig::default();
        // Numeric: PSI with a huge threshold → not drifted; categorical still chi2.
        config.rules.insert(
            "x".into(),
            DriftRule {
                method: DriftMethod::Psi,
                threshold: Some(1e6),
            },
        );
        let r = compare(&b, &s, &config).unwrap();
        let (x, c) = (&r.features[0], &r.features[1]);
        assert_eq!(
            (x.method, x.threshold, x.drifted),
            (DriftMethod::Psi, 1e6, false)
        );
        assert!(c.drifted && c.method == DriftMethod::Chi2);
        assert_eq!((r.drifted_features, r.share), (1, 0.5));
        assert!(r.dataset_drifted, "0.5 >= default drift_share 0.5");
        config.drift_share = 0.75;
        assert!(!compare(&b, &s, &config).unwrap().dataset_drifted);

        // p-value rule: drifted when p < threshold; default threshold when omitted.
        config.rules.insert(
            "x".into(),
            DriftRule {
                method: DriftMethod::Ks,
                threshold: None,
            },
        );
        let x = &compare(&b, &s, &config).unwrap().features[0];
        assert_eq!(x.threshold, 0.05);
        assert!(x.drifted && x.ks_pvalue.unwrap() < 0.05);
        config.rules.insert(
            "x".into(),
            DriftRule {
                method: DriftMethod::Ks,
                threshold: Some(1e-300),
            },
        );
        let x = &compare(&b, &s, &config).unwrap().features[0];
        assert_eq!(x.drifted, x.ks_pvalue.unwrap() < 1e-300);
        // Distance rule: drifted when value >= threshold (equality drifts).
        let js = x.jensen_shannon.unwrap();
        config.rules.insert(
            "x".into(),
            DriftRule {
                method: DriftMethod::JensenShannon,
                threshold: Some(js),
            },
        );
        assert!(compare(&b, &s, &config).unwrap().features[0].drifted);
        config.rules.insert(
            "c".into(),
            DriftRule {
                method: DriftMethod::Psi,
                threshold: Some(0.01),
            },
        );
        let r = compare(&b, &s, &config).unwrap();
        assert_eq!(r.features[1].method, DriftMethod::Psi);
        assert_eq!(r.features[1].value(), r.features[1].psi);
    }

    #[test]
    fn invalid_rules_are_rejected() {
        let (b, s) = two_feature_case(100, 0.0);
        let with = |name: &str, method, threshold| {
            let mut c = DriftConfig::default();
            c.rules.insert(name.into(), DriftRule { method, threshold });
            compare(&b, &s, &c).unwrap_err()
        };
        assert!(matches!(
            with("x", DriftMethod::Chi2, None),
            DriftError::MethodNotApplicable { .. }
        ));
        assert!(matches!(
            with("c", DriftMethod::Ks, None),
            DriftError::MethodNotApplicable { .. }
        ));
        assert!(matches!(
            with("c", DriftMethod::Wasserstein, None),
            DriftError::MethodNotApplicable { .. }
        ));
        assert!(matches!(
            with("nope", DriftMethod::Psi, None),
            DriftError::UnknownRuleFeature(_)
        ));
        assert!(matches!(
            with("x", DriftMethod::Ks, Some(1.5)),
            DriftError::InvalidThreshold { .. }
        ));
        assert!(matches!(
            with("x", DriftMethod::Psi, Some(f64::NAN)),
            DriftError::InvalidThreshold { .. }
        ));
        assert!(matches!(
            with("x", DriftMethod::Psi, Some(0.0)),
            DriftError::InvalidThreshold { .. }
        ));
        for share in [0.0, -1.0, 1.5, f64::NAN] {
            let c = DriftConfig {
                drift_share: share,
                ..DriftConfig::default()
            };
            assert!(matches!(
                compare(&b, &s, &c),
                Err(DriftError::InvalidDriftShare(_))
            ));
        }
        let err = with("x", DriftMethod::Chi2, None).to_string();
        assert_eq!(
            err,
            "drift method chi2 does not apply to numeric feature \"x\""
        );
    }

    #[test]
    fn config_deserializes_with_defaults() {
        let c: DriftConfig =
            serde_json::from_str(r#"{"rules":{"age":{"method":"jensen_shannon"}}}"#).unwrap();
        assert_eq!(c.drift_share, DEFAULT_DRIFT_SHARE);
        assert_eq!(
            c.rules["age"],
            DriftRule {
                method: DriftMethod::JensenShannon,
                threshold: None
            }
        );
        let c: DriftConfig = serde_json::from_str(r#"{"drift_share":0.3,"future":1}"#).unwrap();
        assert_eq!((c.drift_share, c.rules.len()), (0.3, 0));
        assert_eq!(
            serde_json::from_str::<DriftConfig>("{}").unwrap(),
            DriftConfig::default()
        );
        assert!(serde_json::from_str::<DriftRule>(r#"{"method":"kl"}"#).is_err());
    }
}
