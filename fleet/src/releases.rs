//! The release registry: every release the console has taken (a verified
//! upload), by release id (the SHA-256 of its signed manifest), with who
//! uploaded it and who signed it, its lineage, the rollouts that carried it
//! and the devices running it now. Sequences for new releases come from it
//! ([`next_sequence`]), never from what devices report.
//!
//! Records live in the store's `releases` tree (JSON, one per release id);
//! rollouts and device states are joined in at read time ([`views`]).
//!
//! # Approval
//! With a root of trust that has an approver role, a release reaches the
//! console in two steps: CI submits it signed by the builder alone
//! ([`ReleaseStatus::AwaitingApproval`]); an approver reviews it (the
//! [`Review`] taken at submission and its [`diff`] against the release the
//! channel runs), signs it on their own machine (`ferry approve`, the
//! console never holds release keys) and uploads the signed copy
//! ([`ReleaseStatus::Approved`]), or rejects it
//! ([`ReleaseStatus::Rejected`]). Only an approved release can be rolled
//! out, and devices check the same signatures themselves.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::DeviceState;
use crate::rollout::{Phase, Rollout};
use crate::rollouts::phase_name;

/// What the console recorded when it first took a release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// SHA-256 (hex) of the signed manifest.
    pub release: String,
    pub name: String,
    pub version: String,
    pub fleet: String,
    pub channel: String,
    pub sequence: u64,
    /// SHA-256 (hex) of the bundle file as uploaded.
    pub digest: String,
    /// Key ids whose signatures verified (the builder's, the approver's).
    pub signed_by: Vec<String>,
    /// The manifest's lineage (source commit, dataset digest, training
    /// metadata such as MLflow's run id).
    pub lineage: serde_json::Value,
    /// The credential that uploaded it first.
    pub uploaded_by: String,
    pub first_seen_ms: u64,
    /// Where it stands in the approval (records older than approval were
    /// taken fully signed: approved).
    #[serde(default)]
    pub status: ReleaseStatus,
    /// The approver's credential, when approved through the console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_ms: Option<u64>,
    /// Who rejected it, when and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<Rejection>,
    /// Size of the bundle file in bytes.
    #[serde(default)]
    pub size_bytes: u64,
    /// What an approver reviews, taken from the bundle when it was
    /// submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<Review>,
}

/// Where a release stands in the two-person approval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    /// Signed by the builder; an approver has not decided.
    AwaitingApproval,
    /// Carries every signature the devices' policy requires.
    #[default]
    Approved,
    /// An approver refused it; it can never be rolled out (resubmitting
    /// the same release does not revive it).
    Rejected,
}

impl ReleaseStatus {
    /// `awaiting_approval`, `approved` or `rejected`.
    pub fn name(self) -> &'static str {
        match self {
            ReleaseStatus::AwaitingApproval => "awaiting_approval",
            ReleaseStatus::Approved => "approved",
            ReleaseStatus::Rejected => "rejected",
        }
    }
}

/// An approver's refusal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub by: String,
    pub ms: u64,
    pub reason: String,
}

/// What an approver needs to decide, read from the bundle once when it is
/// submitted: the manifest (with its pipeline configuration and training
/// metadata parsed), the golden examples every device runs before it
/// activates the release (the packager ran them before the builder
/// signed), a summary of the drift baseline, and the size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    pub manifest: Value,
    pub golden: Vec<GoldenView>,
    pub baseline: Vec<FeatureSummary>,
    pub size_bytes: u64,
}

/// A golden example as a reviewer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenView {
    pub name: String,
    pub content_type: String,
    /// The request, when it is text (JSON); its size otherwise.
    pub input: Value,
    pub expected: Value,
    pub tolerance: f64,
}

/// One feature of the drift baseline, summarised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSummary {
    pub name: String,
    /// `numeric` or `categorical`.
    pub kind: String,
    pub n: u64,
    pub missing: u64,
    /// Numeric: mean, std, min, max. Categorical: the most frequent
    /// categories (at most [`TOP_CATEGORIES`]) and their shares.
    pub stats: BTreeMap<String, f64>,
}

/// Categories shown per categorical feature.
pub const TOP_CATEGORIES: usize = 5;
/// Golden inputs and answers longer than this (bytes) are shown by size.
pub const MAX_GOLDEN_SHOWN: usize = 4096;
/// Differences [`diff`] lists at most.
pub const MAX_DIFFERENCES: usize = 200;

impl Review {
    /// The review of a verified bundle of `size_bytes` bytes.
    pub fn of(bundle: &ferry_format::VerifiedBundle, size_bytes: u64) -> Review {
        let m = bundle.manifest();
        let mut manifest = serde_json::to_value(m).unwrap_or(Value::Null);
        // JSON held as text in the manifest, shown as JSON.
        for (parent, field) in [("pipeline", "config_json"), ("lineage", "training_json")] {
            if let Some(obj) = manifest.get_mut(parent).and_then(Value::as_object_mut)
                && let Some(text) = obj.get(field).and_then(Value::as_str)
                && let Ok(parsed) = serde_json::from_str::<Value>(text)
            {
                obj.insert(field.trim_end_matches("_json").to_string(), parsed);
                obj.remove(field);
            }
        }
        // Artifacts by role (and target) with their sizes: offsets and
        // hashes say nothing to a reviewer and differ in every release.
        if let Some(obj) = manifest.as_object_mut() {
            let artifacts: serde_json::Map<String, Value> = m
                .artifacts
                .iter()
                .map(|a| {
                    let key = match &a.target {
                        Some(t) => format!("{} ({t})", a.role),
                        None => a.role.clone(),
                    };
                    (
                        key,
                        serde_json::json!({ "size": a.size, "stored": a.compressed_size }),
                    )
                })
                .collect();
            obj.insert("artifacts".into(), Value::Object(artifacts));
        }
        // Large inputs (an image) and answers are shown by size: the
        // registry keeps every review.
        let shown = |bytes: &[u8]| -> Value {
            if bytes.len() > MAX_GOLDEN_SHOWN {
                return Value::String(format!("{} bytes", bytes.len()));
            }
            std::str::from_utf8(bytes)
                .ok()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_else(|| Value::String(format!("{} bytes", bytes.len())))
        };
        let golden = bundle
            .golden()
            .unwrap_or_default()
            .into_iter()
            .map(|g| GoldenView {
                input: shown(&g.input),
                expected: shown(g.expected_json.as_bytes()),
                name: g.name,
                content_type: g.content_type,
                tolerance: g.tolerance,
            })
            .collect();
        let baseline = bundle
            .baseline()
            .ok()
            .flatten()
            .map(|b| b.features.iter().map(summarise).collect())
            .unwrap_or_default();
        Review {
            manifest,
            golden,
            baseline,
            size_bytes,
        }
    }
}

fn summarise(f: &ferry_drift::FeatureBaseline) -> FeatureSummary {
    use ferry_drift::FeatureStats;
    let (kind, n, missing, stats) = match &f.stats {
        FeatureStats::Numeric(b) => (
            "numeric",
            b.n,
            b.missing,
            [
                ("mean", b.mean),
                ("std", b.std),
                ("min", b.min),
                ("max", b.max),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ),
        FeatureStats::Categorical(b) => {
            let mut counts: Vec<(&String, &u64)> = b.counts.iter().collect();
            counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let total = b.n.max(1) as f64;
            (
                "categorical",
                b.n,
                b.missing,
                counts
                    .into_iter()
                    .take(TOP_CATEGORIES)
                    .map(|(k, v)| (k.clone(), *v as f64 / total))
                    .collect(),
            )
        }
    };
    FeatureSummary {
        name: f.name.clone(),
        kind: kind.to_string(),
        n,
        missing,
        stats,
    }
}

/// One difference between two reviews: a path (`manifest.version`,
/// `baseline.petal_length.mean`, `golden.setosa.expected.label`) and the
/// value on each side (`null` where it is absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    pub path: String,
    pub running: Value,
    pub candidate: Value,
}

/// What changes from `running` to `candidate`, path by path: the
/// manifest's first, then the size, the baseline's and the golden
/// examples' (each example's input and expected answer compared whole);
/// sorted within each part, at most [`MAX_DIFFERENCES`]. Baseline features
/// and golden examples are keyed by name, so a reordering is not a change.
pub fn diff(running: &Review, candidate: &Review) -> Vec<Difference> {
    let mut out = Vec::new();
    for part in 0..4 {
        let (a, b) = (
            flatten_review(running, part),
            flatten_review(candidate, part),
        );
        let paths: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for path in paths {
            let (x, y) = (a.get(path), b.get(path));
            if x != y {
                out.push(Difference {
                    path: path.clone(),
                    running: x.cloned().unwrap_or(Value::Null),
                    candidate: y.cloned().unwrap_or(Value::Null),
                });
                if out.len() == MAX_DIFFERENCES {
                    return out;
                }
            }
        }
    }
    out
}

/// Part `part` of a review as path → value (0: manifest, 1: size,
/// 2: baseline, 3: golden examples).
fn flatten_review(r: &Review, part: u8) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    match part {
        0 => flatten("manifest", &r.manifest, &mut out),
        1 => {
            out.insert("size_bytes".into(), Value::from(r.size_bytes));
        }
        2 => {
            for f in &r.baseline {
                let v = serde_json::json!({
                    "kind": f.kind, "n": f.n, "missing": f.missing, "stats": f.stats,
                });
                flatten(&format!("baseline.{}", f.name), &v, &mut out);
            }
        }
        _ => {
            for g in &r.golden {
                let at = |what: &str| format!("golden.{}.{what}", g.name);
                out.insert(at("input"), g.input.clone());
                out.insert(at("expected"), g.expected.clone());
                out.insert(at("tolerance"), Value::from(g.tolerance));
            }
        }
    }
    out
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// A rollout that carried a release, and where it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutOutcome {
    pub id: String,
    pub operator: String,
    pub created_ms: u64,
    /// `shadow`, `canary`, `bake`, `wave`, `aborting`, `done` or `aborted`.
    pub phase: String,
    /// Why it was aborted, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A registry entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseView {
    #[serde(flatten)]
    pub record: ReleaseRecord,
    pub rollouts: Vec<RolloutOutcome>,
    /// Devices whose latest status names this release.
    pub running_on: Vec<String>,
}

/// One release in detail (`GET /api/releases/{id}`): the registry entry,
/// the release its channel runs now (the latest rollout of the channel
/// that finished `done`), and what changes from that one to this one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseDetail {
    #[serde(flatten)]
    pub view: ReleaseView,
    /// The channel's running release id, if the console rolled one out.
    pub running_release: Option<String>,
    /// Differences from the running release's review to this one's (empty
    /// when there is no running release, it is this one, or either has no
    /// review).
    pub diff: Vec<Difference>,
}

/// Joins records with the rollouts that carried them and the devices that
/// run them; newest sequence first.
pub fn views(
    records: Vec<ReleaseRecord>,
    rollouts: &[Rollout],
    devices: &[DeviceState],
) -> Vec<ReleaseView> {
    let mut out: Vec<ReleaseView> = records
        .into_iter()
        .map(|record| {
            let carried = |r: &&Rollout| {
                r.spec.bundle.release == record.release
                    || (r.spec.bundle.release.is_empty() && r.spec.bundle.digest == record.digest)
            };
            let rollouts = rollouts
                .iter()
                .filter(carried)
                .map(|r| RolloutOutcome {
                    id: r.id.clone(),
                    operator: r.spec.operator.clone(),
                    created_ms: r.created_ms,
                    phase: phase_name(&r.phase).to_string(),
                    reason: match &r.phase {
                        Phase::Aborting { reason, .. } | Phase::Aborted { reason } => {
                            Some(reason.clone())
                        }
                        _ => None,
                    },
                })
                .collect();
            let running_on = devices
                .iter()
                .filter(|d| {
                    d.bundle.as_ref().is_some_and(|b| {
                        b.release == record.release
                            || (b.release.is_empty() && b.digest == record.digest)
                    })
                })
                .map(|d| d.device.clone())
                .collect();
            ReleaseView {
                record,
                rollouts,
                running_on,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (b.record.sequence, b.record.first_seen_ms)
            .cmp(&(a.record.sequence, a.record.first_seen_ms))
    });
    out
}

/// The highest sequence the registry holds for `fleet`/`channel`, if it
/// holds any release of it.
pub fn highest_sequence(records: &[ReleaseRecord], fleet: &str, channel: &str) -> Option<u64> {
    records
        .iter()
        .filter(|r| r.fleet == fleet && r.channel == channel)
        .map(|r| r.sequence)
        .max()
}

/// The sequence a new release of `fleet`/`channel` should carry: one above
/// the highest the registry holds (1 for a channel it has never seen).
/// Devices' reports play no part: a forged status cannot push it.
pub fn next_sequence(records: &[ReleaseRecord], fleet: &str, channel: &str) -> u64 {
    highest_sequence(records, fleet, channel).map_or(1, |s| s.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(channel: &str, sequence: u64) -> ReleaseRecord {
        ReleaseRecord {
            release: format!("{channel}-{sequence}"),
            name: "iris".into(),
            version: format!("1.{sequence}.0"),
            fleet: "plant".into(),
            channel: channel.into(),
            sequence,
            digest: "d".into(),
            signed_by: Vec::new(),
            lineage: serde_json::Value::Null,
            uploaded_by: "ci".into(),
            first_seen_ms: sequence,
            status: ReleaseStatus::Approved,
            approved_by: None,
            approved_ms: None,
            rejection: None,
            size_bytes: 0,
            review: None,
        }
    }

    fn review(version: &str, mean: f64, expected: &str) -> Review {
        Review {
            manifest: serde_json::json!({"version": version, "model": {"inputs": [{"shape": [null, 4]}]}}),
            golden: vec![GoldenView {
                name: "setosa".into(),
                content_type: "application/json".into(),
                input: serde_json::json!({"x": [1, 2]}),
                expected: serde_json::json!({"label": expected}),
                tolerance: 1e-4,
            }],
            baseline: vec![FeatureSummary {
                name: "petal_length".into(),
                kind: "numeric".into(),
                n: 100,
                missing: 0,
                stats: [("mean".to_string(), mean)].into(),
            }],
            size_bytes: 10,
        }
    }

    #[test]
    fn the_diff_lists_what_changed_manifest_first() {
        let a = review("1", 1.5, "setosa");
        assert!(diff(&a, &a).is_empty());
        let b = review("2", 1.7, "versicolor");
        let d = diff(&a, &b);
        let paths: Vec<&str> = d.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "manifest.version",
                "baseline.petal_length.stats.mean",
                "golden.setosa.expected"
            ]
        );
        assert_eq!(d[0].running, "1");
        assert_eq!(d[0].candidate, "2");
        assert_eq!(d[2].candidate, serde_json::json!({"label": "versicolor"}));
    }

    #[test]
    fn the_next_sequence_comes_from_the_registry_per_channel() {
        let records = [record("stable", 3), record("stable", 7), record("beta", 9)];
        assert_eq!(next_sequence(&records, "plant", "stable"), 8);
        assert_eq!(next_sequence(&records, "plant", "beta"), 10);
        assert_eq!(next_sequence(&records, "plant", "canary"), 1);
        assert_eq!(next_sequence(&records, "other", "stable"), 1);
        let views = views(records.to_vec(), &[], &[]);
        assert_eq!(views[0].record.sequence, 9, "newest first");
    }
}
