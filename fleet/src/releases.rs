//! The release registry: every release the console has taken (a verified
//! upload), by release id (the SHA-256 of its signed manifest), with who
//! uploaded it and who signed it, its lineage, the rollouts that carried it
//! and the devices running it now. Sequences for new releases come from it
//! ([`next_sequence`]), never from what devices report.
//!
//! Records live in the store's `releases` tree (JSON, one per release id);
//! rollouts and device states are joined in at read time ([`views`]).

use serde::{Deserialize, Serialize};

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

/// The sequence a new release of `fleet`/`channel` should carry: one above
/// the highest the registry holds (1 for a channel it has never seen).
/// Devices' reports play no part: a forged status cannot push it.
pub fn next_sequence(records: &[ReleaseRecord], fleet: &str, channel: &str) -> u64 {
    records
        .iter()
        .filter(|r| r.fleet == fleet && r.channel == channel)
        .map(|r| r.sequence)
        .max()
        .map_or(1, |s| s.saturating_add(1))
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
        }
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
