//! Canary rollouts as a state machine without I/O.
//!
//! A rollout takes a verified bundle to every device of a fleet in stages:
//!
//! 1. **shadow** (optional): the canaries run the candidate in shadow on live
//!    traffic for `shadow_samples` requests and report their agreement;
//! 2. **canary**: the canaries (a deterministic subset: the devices whose
//!    `hash(rollout id, device id)` is smallest, `canary` of the fleet and at
//!    least one; or a named group) are told to install the bundle;
//! 3. **bake**: once every canary runs it, they are watched for `bake_ms`
//!    against the abort rules;
//! 4. **waves**: the rest of the fleet is told to install, in waves of
//!    increasing cumulative share (`waves`, e.g. 50% then 100%), each wave
//!    watched like the canaries until its devices run the bundle;
//! 5. **done**, or **aborted**: when a rule fires (an error rate, a drift
//!    statistic, shadow agreement, failed installs, devices not reporting back
//!    within `install_timeout_ms`), every device that installed the bundle is
//!    commanded back to its previous bundle (an operator-signed rollback),
//!    and the rollout ends `aborted` with the reason once they are back.
//!
//! [`Rollout::step`] looks at the fleet as the store sees it and returns the
//! commands to send and the audit entries to write; the caller (the
//! executor) sends, persists and repeats. Stepping again after a restart
//! continues where the persisted state stopped: commands already sent are
//! recorded per device, so none is sent twice within its timeout.
//!
//! Persisted as JSON: do not rename or remove fields; add new ones with
//! `#[serde(default)]`.

use std::collections::BTreeMap;

use ferry_protocol::{BundleRef, UpdateState};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::DeviceState;

/// How a device is compared with a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = ">")]
    Above,
    #[serde(rename = "<")]
    Below,
}

impl Op {
    fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Above => value > threshold,
            Op::Below => value < threshold,
        }
    }
}

/// What an abort rule measures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "metric")]
pub enum Metric {
    /// Share of failed requests of a device since it installed the bundle
    /// (`error_rate>1%`).
    ErrorRate,
    /// A drift statistic of any feature in a device's latest window
    /// (`drift.psi>0.25`, `drift.wasserstein>0.2`, `drift.ks<0.01`), or
    /// the share of drifted features (`drift.share>0.5`).
    Drift { statistic: String },
    /// Top-1 agreement of the shadow run (`shadow.agreement<0.97`).
    ShadowAgreement,
    /// Devices that refused or failed to install (`failed_installs>0`).
    FailedInstalls,
}

/// `metric op threshold`, e.g. `error_rate>1%`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub text: String,
    #[serde(flatten)]
    pub metric: Metric,
    pub op: Op,
    pub threshold: f64,
}

impl std::str::FromStr for Rule {
    type Err = String;

    fn from_str(text: &str) -> Result<Rule, String> {
        let t = text.trim();
        let (i, op) = t
            .char_indices()
            .find_map(|(i, c)| match c {
                '>' => Some((i, Op::Above)),
                '<' => Some((i, Op::Below)),
                _ => None,
            })
            .ok_or_else(|| format!("{text:?}: expected `metric>value` or `metric<value`"))?;
        let (name, value) = (t[..i].trim(), t[i + 1..].trim());
        let (number, percent) = match value.strip_suffix('%') {
            Some(v) => (v.trim(), true),
            None => (value, false),
        };
        let mut threshold: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: {value:?} is not a number"))?;
        if !threshold.is_finite() {
            return Err(format!("{text:?}: the threshold must be finite"));
        }
        if percent {
            threshold /= 100.0;
        }
        let metric = match name {
            "error_rate" => Metric::ErrorRate,
            "shadow.agreement" => Metric::ShadowAgreement,
            "failed_installs" => Metric::FailedInstalls,
            n => match n.strip_prefix("drift.") {
                Some(s @ ("psi" | "ks" | "wasserstein" | "jensen_shannon" | "chi2" | "share")) => {
                    Metric::Drift {
                        statistic: s.to_string(),
                    }
                }
                _ => {
                    return Err(format!(
                        "{text:?}: unknown metric {name:?}; known: error_rate, drift.psi, drift.ks, \
                         drift.wasserstein, drift.jensen_shannon, drift.chi2, drift.share, \
                         shadow.agreement, failed_installs"
                    ));
                }
            },
        };
        Ok(Rule {
            text: t.to_string(),
            metric,
            op,
            threshold,
        })
    }
}

/// Which devices go first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Canary {
    /// A share of the fleet (0 < share ≤ 1), chosen by hash.
    Share { share: f64 },
    /// These devices.
    Group { devices: Vec<String> },
}

/// What an operator asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub bundle: BundleRef,
    /// Where devices download the bundle.
    pub url: String,
    pub canary: Canary,
    pub bake_ms: u64,
    /// Cumulative shares of the fleet after the canaries, ending at 1.0.
    pub waves: Vec<f64>,
    pub abort_if: Vec<Rule>,
    /// Run the candidate in shadow on the canaries for this many requests
    /// first (0: no shadow stage).
    #[serde(default)]
    pub shadow_samples: u64,
    /// A device that does not run the bundle this long after its command
    /// counts as failed.
    pub install_timeout_ms: u64,
    /// Who started it (for the audit log).
    pub operator: String,
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    Shadow {
        since_ms: u64,
    },
    Canary {
        since_ms: u64,
    },
    Bake {
        until_ms: u64,
    },
    Wave {
        index: usize,
        since_ms: u64,
    },
    /// Rolling back after a rule fired.
    Aborting {
        reason: String,
        since_ms: u64,
    },
    Done,
    Aborted {
        reason: String,
    },
}

impl Phase {
    pub fn is_finished(&self) -> bool {
        matches!(self, Phase::Done | Phase::Aborted { .. })
    }
}

/// One device's part in a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Target {
    Waiting,
    Shadowing {
        at_ms: u64,
    },
    Installing {
        at_ms: u64,
        /// When the install command was last re-sent after a transient
        /// failure (network) on the device.
        #[serde(default)]
        resent_ms: u64,
    },
    /// Runs the bundle; requests/errors are the device's totals at install
    /// time, to compute its error rate since.
    Running {
        at_ms: u64,
        base_requests: u64,
        base_errors: u64,
    },
    Failed {
        reason: String,
    },
    RollingBack {
        at_ms: u64,
    },
    /// Told to install, then the rollout aborted before it reported the
    /// bundle: rolled back if it shows up running it, else left alone.
    Cancelled {
        at_ms: u64,
    },
    RolledBack,
}

/// Refusal codes that say the device could not fetch the bundle, not that
/// the bundle is bad: the install is asked for again (until the timeout).
pub const TRANSIENT_CODES: [&str; 4] = ["network", "http_status", "interrupted", "io"];

/// Time between two install commands to a device that could not fetch the
/// bundle: long enough for the agent to have finished its previous attempt.
pub const RESEND_AFTER_MS: u64 = 10_000;

/// Requests a device must have answered on the new bundle before its error
/// rate is judged: fewer say nothing (one failure in three requests is not
/// a 33% error rate worth aborting a fleet rollout for).
pub const MIN_REQUESTS_FOR_RATE: u64 = 20;

/// A rollout and everything it did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub spec: Spec,
    pub created_ms: u64,
    pub phase: Phase,
    /// Every device of the fleet when the rollout started, in wave order
    /// (canaries first).
    pub order: Vec<String>,
    pub canaries: usize,
    pub targets: BTreeMap<String, Target>,
    /// The bundle each device ran before (to judge a rollback).
    #[serde(default)]
    pub previous: BTreeMap<String, Option<BundleRef>>,
    /// Set by an operator: no new installs and no promotion until resumed
    /// (the abort rules keep watching).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Paused>,
    /// An operator's abort, carried out by the next step (with the reason
    /// it will end with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_requested: Option<String>,
}

/// Who paused a rollout, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paused {
    pub by: String,
    pub since_ms: u64,
}

/// What the executor must do after a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Install {
        device: String,
    },
    ShadowStart {
        device: String,
    },
    ShadowStop {
        device: String,
    },
    /// An operator-signed rollback.
    Rollback {
        device: String,
    },
    /// An entry for the audit log.
    Audit {
        what: String,
    },
}

/// The canaries: `share` of `devices` (at least one), by the smallest
/// `sha256(rollout id, device)`, so the choice is stable across restarts
/// and differs between rollouts.
pub fn canary_order(rollout_id: &str, devices: &[String]) -> Vec<String> {
    let mut keyed: Vec<([u8; 32], &String)> = devices
        .iter()
        .map(|d| {
            let mut h = Sha256::new();
            h.update(rollout_id.as_bytes());
            h.update([0]);
            h.update(d.as_bytes());
            (h.finalize().into(), d)
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, d)| d.clone()).collect()
}

fn count_for(share: f64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    ((share * n as f64).ceil() as usize).clamp(1, n)
}

impl Rollout {
    /// A new rollout over `devices` (the fleet as known now).
    pub fn new(id: String, spec: Spec, devices: &[String], now_ms: u64) -> Result<Rollout, String> {
        if devices.is_empty() {
            return Err("the fleet has no devices".into());
        }
        let (order, canaries) = match &spec.canary {
            Canary::Share { share } => {
                if !(*share > 0.0 && *share <= 1.0) {
                    return Err(format!("canary share {share} must be within (0, 1]"));
                }
                (canary_order(&id, devices), count_for(*share, devices.len()))
            }
            Canary::Group { devices: group } => {
                if group.is_empty() {
                    return Err("the canary group is empty".into());
                }
                if let Some(unknown) = group.iter().find(|g| !devices.contains(g)) {
                    return Err(format!("canary device {unknown:?} is not in the fleet"));
                }
                let rest = canary_order(&id, devices)
                    .into_iter()
                    .filter(|d| !group.contains(d));
                (group.iter().cloned().chain(rest).collect(), group.len())
            }
        };
        let mut last = 0.0;
        for w in &spec.waves {
            if !(*w > last && *w <= 1.0) {
                return Err(format!(
                    "waves must increase within (0, 1], got {:?}",
                    spec.waves
                ));
            }
            last = *w;
        }
        let phase = if spec.shadow_samples > 0 {
            Phase::Shadow { since_ms: now_ms }
        } else {
            Phase::Canary { since_ms: now_ms }
        };
        Ok(Rollout {
            targets: order.iter().map(|d| (d.clone(), Target::Waiting)).collect(),
            id,
            spec,
            created_ms: now_ms,
            phase,
            order,
            canaries,
            previous: BTreeMap::new(),
            paused: None,
            abort_requested: None,
        })
    }

    /// Devices of wave `index` (0 = the canaries), cumulative.
    fn wave_devices(&self, index: usize) -> &[String] {
        let n = if index == 0 {
            self.canaries
        } else {
            let share = self.spec.waves.get(index - 1).copied().unwrap_or(1.0);
            count_for(share, self.order.len()).max(self.canaries)
        };
        &self.order[..n]
    }

    fn runs_bundle(&self, d: &DeviceState) -> bool {
        d.bundle
            .as_ref()
            .is_some_and(|b| b.digest == self.spec.bundle.digest)
    }

    /// Advances the rollout given the fleet's state; returns what to do.
    pub fn step(
        &mut self,
        now_ms: u64,
        fleet: &dyn Fn(&str) -> Option<DeviceState>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.phase.is_finished() {
            return actions;
        }
        self.track_targets(now_ms, fleet, &mut actions);
        if !matches!(self.phase, Phase::Aborting { .. })
            && let Some(reason) = self
                .abort_requested
                .take()
                .or_else(|| self.check_rules(now_ms, fleet))
        {
            self.paused = None;
            self.abort(reason, now_ms, fleet, &mut actions);
            return actions;
        }
        if self.paused.is_some() && !matches!(self.phase, Phase::Aborting { .. }) {
            return actions;
        }
        match self.phase.clone() {
            Phase::Shadow { .. } => {
                let canaries: Vec<String> = self.wave_devices(0).to_vec();
                let mut all_reported = true;
                for d in &canaries {
                    match self.targets.get(d) {
                        Some(Target::Waiting) => {
                            self.targets
                                .insert(d.clone(), Target::Shadowing { at_ms: now_ms });
                            actions.push(Action::ShadowStart { device: d.clone() });
                            all_reported = false;
                        }
                        Some(Target::Shadowing { .. }) => {
                            let reported = fleet(d).and_then(|s| s.shadow).is_some_and(|r| {
                                r.candidate.digest == self.spec.bundle.digest
                                    && r.compared >= self.spec.shadow_samples
                            });
                            all_reported &= reported;
                        }
                        _ => {}
                    }
                }
                if all_reported {
                    for d in &canaries {
                        self.targets.insert(d.clone(), Target::Waiting);
                    }
                    actions.push(Action::Audit {
                        what: "shadow run passed the rules on every canary".into(),
                    });
                    self.phase = Phase::Canary { since_ms: now_ms };
                }
            }
            Phase::Canary { .. } => {
                self.command_installs(0, now_ms, fleet, &mut actions);
                if self.wave_running(0) {
                    actions.push(Action::Audit {
                        what: format!(
                            "{} canar{} run the bundle; baking for {} s",
                            self.canaries,
                            if self.canaries == 1 { "y" } else { "ies" },
                            self.spec.bake_ms / 1000
                        ),
                    });
                    self.phase = Phase::Bake {
                        until_ms: now_ms + self.spec.bake_ms,
                    };
                }
            }
            Phase::Bake { until_ms } => {
                if now_ms >= until_ms {
                    actions.push(Action::Audit {
                        what: "bake time passed with every rule holding; promoting".into(),
                    });
                    self.next_wave(1, now_ms, &mut actions);
                }
            }
            Phase::Wave { index, .. } => {
                self.command_installs(index, now_ms, fleet, &mut actions);
                if self.wave_running(index) {
                    self.next_wave(index + 1, now_ms, &mut actions);
                }
            }
            Phase::Aborting { reason, .. } => {
                let back = self.targets.values().all(|t| {
                    matches!(
                        t,
                        Target::Waiting | Target::Failed { .. } | Target::RolledBack
                    )
                });
                if back {
                    actions.push(Action::Audit {
                        what: format!(
                            "every device is back on its previous bundle; aborted: {reason}"
                        ),
                    });
                    self.phase = Phase::Aborted { reason };
                }
            }
            Phase::Done | Phase::Aborted { .. } => {}
        }
        actions
    }

    fn next_wave(&mut self, index: usize, now_ms: u64, actions: &mut Vec<Action>) {
        if index > self.spec.waves.len() || self.wave_devices(index - 1).len() == self.order.len() {
            actions.push(Action::Audit {
                what: format!("every device ({}) runs the bundle", self.order.len()),
            });
            self.phase = Phase::Done;
        } else {
            actions.push(Action::Audit {
                what: format!(
                    "wave {index}: {} of {} devices",
                    self.wave_devices(index).len(),
                    self.order.len()
                ),
            });
            self.phase = Phase::Wave {
                index,
                since_ms: now_ms,
            };
        }
    }

    fn wave_running(&self, index: usize) -> bool {
        self.wave_devices(index)
            .iter()
            .all(|d| matches!(self.targets.get(d), Some(Target::Running { .. })))
    }

    fn command_installs(
        &mut self,
        index: usize,
        now_ms: u64,
        fleet: &dyn Fn(&str) -> Option<DeviceState>,
        actions: &mut Vec<Action>,
    ) {
        let devices: Vec<String> = self.wave_devices(index).to_vec();
        for d in devices {
            if self.targets.get(&d) == Some(&Target::Waiting) {
                let state = fleet(&d);
                self.previous
                    .insert(d.clone(), state.as_ref().and_then(|s| s.bundle.clone()));
                if state.as_ref().is_some_and(|s| self.runs_bundle(s)) {
                    let s = state.unwrap();
                    self.targets.insert(
                        d,
                        Target::Running {
                            at_ms: now_ms,
                            base_requests: s.predictions + s.errors,
                            base_errors: s.errors,
                        },
                    );
                    continue;
                }
                self.targets.insert(
                    d.clone(),
                    Target::Installing {
                        at_ms: now_ms,
                        resent_ms: 0,
                    },
                );
                actions.push(Action::Install { device: d });
            }
        }
    }

    /// Moves devices along as they report: installed, failed, rolled back.
    fn track_targets(
        &mut self,
        now_ms: u64,
        fleet: &dyn Fn(&str) -> Option<DeviceState>,
        actions: &mut Vec<Action>,
    ) {
        let timeout = self.spec.install_timeout_ms;
        let version = self.spec.bundle.version.clone();
        for (device, target) in self.targets.iter_mut() {
            let state = fleet(device);
            match target.clone() {
                Target::Installing { at_ms, resent_ms } => {
                    if let Some(s) = state.as_ref().filter(|s| {
                        s.bundle
                            .as_ref()
                            .is_some_and(|b| b.digest == self.spec.bundle.digest)
                    }) {
                        *target = Target::Running {
                            at_ms: now_ms,
                            base_requests: s.predictions + s.errors,
                            base_errors: s.errors,
                        };
                    } else if let Some(UpdateState::Rejected { code, reason, .. }) =
                        state.as_ref().map(|s| &s.update).filter(|u| match u {
                            UpdateState::Rejected {
                                digest: Some(d), ..
                            } => *d == self.spec.bundle.digest,
                            // Agents that do not report the digest.
                            UpdateState::Rejected { version: v, .. } => *v == version,
                            _ => false,
                        })
                        && now_ms < at_ms + timeout
                    {
                        if TRANSIENT_CODES.contains(&code.as_str()) {
                            // The device could not fetch it (the console was
                            // away, a network blip): ask again, now and then.
                            if now_ms >= resent_ms.max(at_ms) + RESEND_AFTER_MS {
                                actions.push(Action::Audit {
                                    what: format!(
                                        "{device} could not fetch the bundle ({code}); asking again"
                                    ),
                                });
                                actions.push(Action::Install {
                                    device: device.clone(),
                                });
                                *target = Target::Installing {
                                    at_ms,
                                    resent_ms: now_ms,
                                };
                            }
                        } else {
                            let why = format!("{device} refused the bundle ({code}): {reason}");
                            actions.push(Action::Audit { what: why.clone() });
                            *target = Target::Failed { reason: why };
                        }
                    } else if now_ms >= at_ms + timeout {
                        let why = format!(
                            "{device} did not report the bundle within {} s",
                            timeout / 1000
                        );
                        actions.push(Action::Audit { what: why.clone() });
                        *target = Target::Failed { reason: why };
                    }
                }
                Target::Cancelled { at_ms } => {
                    let runs = state.as_ref().is_some_and(|s| {
                        s.bundle
                            .as_ref()
                            .is_some_and(|b| b.digest == self.spec.bundle.digest)
                    });
                    if runs {
                        actions.push(Action::Rollback {
                            device: device.clone(),
                        });
                        *target = Target::RollingBack { at_ms: now_ms };
                    } else if now_ms >= at_ms + timeout {
                        *target = Target::RolledBack;
                    }
                }
                Target::RollingBack { at_ms } => {
                    let back = state.as_ref().is_some_and(|s| {
                        s.bundle
                            .as_ref()
                            .is_none_or(|b| b.digest != self.spec.bundle.digest)
                    });
                    if back {
                        *target = Target::RolledBack;
                    } else if now_ms >= at_ms + timeout {
                        let why = format!("{device} did not roll back within {} s", timeout / 1000);
                        actions.push(Action::Audit { what: why.clone() });
                        *target = Target::Failed { reason: why };
                    }
                }
                _ => {}
            }
        }
    }

    /// The first rule that fires on a device in the rollout, as a reason.
    fn check_rules(
        &self,
        now_ms: u64,
        fleet: &dyn Fn(&str) -> Option<DeviceState>,
    ) -> Option<String> {
        let failed = self
            .targets
            .values()
            .filter(|t| matches!(t, Target::Failed { .. }))
            .count();
        for rule in &self.spec.abort_if {
            match &rule.metric {
                Metric::FailedInstalls => {
                    if rule.op.holds(failed as f64, rule.threshold) {
                        return Some(format!("{}: {failed} failed install(s)", rule.text));
                    }
                }
                Metric::ErrorRate => {
                    for (d, t) in &self.targets {
                        let Target::Running {
                            base_requests,
                            base_errors,
                            ..
                        } = t
                        else {
                            continue;
                        };
                        let Some(s) = fleet(d) else { continue };
                        let requests = (s.predictions + s.errors).saturating_sub(*base_requests);
                        let errors = s.errors.saturating_sub(*base_errors);
                        // Too few requests say nothing yet.
                        if requests < MIN_REQUESTS_FOR_RATE {
                            continue;
                        }
                        let rate = errors as f64 / requests as f64;
                        if rule.op.holds(rate, rule.threshold) {
                            return Some(format!(
                                "{}: {d} has {:.1}% errors over {requests} requests",
                                rule.text,
                                rate * 100.0
                            ));
                        }
                    }
                }
                Metric::Drift { statistic } => {
                    for (d, t) in &self.targets {
                        let Target::Running { at_ms, .. } = t else {
                            continue;
                        };
                        let Some(s) = fleet(d) else { continue };
                        let Some(drift) = s.drift.as_ref().filter(|r| {
                            r.bundle_digest == self.spec.bundle.digest && r.ts_ms >= *at_ms
                        }) else {
                            continue;
                        };
                        if statistic == "share" {
                            if rule.op.holds(drift.share, rule.threshold) {
                                return Some(format!(
                                    "{}: {d} has {:.0}% of its features drifting",
                                    rule.text,
                                    drift.share * 100.0
                                ));
                            }
                            continue;
                        }
                        for f in &drift.features {
                            let value = if statistic == "psi" {
                                f.psi
                            } else if *statistic == f.method {
                                f.value
                            } else {
                                None
                            };
                            if let Some(v) = value.filter(|v| rule.op.holds(*v, rule.threshold)) {
                                return Some(format!(
                                    "{}: {d} feature {} has {statistic} {v:.3}",
                                    rule.text, f.name
                                ));
                            }
                        }
                    }
                }
                Metric::ShadowAgreement => {
                    for d in self.wave_devices(0) {
                        let Some(report) = fleet(d)
                            .and_then(|s| s.shadow)
                            .filter(|r| r.candidate.digest == self.spec.bundle.digest)
                        else {
                            continue;
                        };
                        if let Some(a) = report
                            .top1_agreement
                            .filter(|a| rule.op.holds(*a, rule.threshold))
                        {
                            return Some(format!(
                                "{}: {d} agreed on {:.1}% of {} requests in shadow",
                                rule.text,
                                a * 100.0,
                                report.compared
                            ));
                        }
                    }
                }
            }
        }
        let _ = now_ms;
        None
    }

    fn abort(
        &mut self,
        reason: String,
        now_ms: u64,
        fleet: &dyn Fn(&str) -> Option<DeviceState>,
        actions: &mut Vec<Action>,
    ) {
        actions.push(Action::Audit {
            what: format!("abort: {reason}"),
        });
        for (device, target) in self.targets.iter_mut() {
            match target {
                Target::Running { .. } | Target::Installing { .. } => {
                    let runs = fleet(device).is_some_and(|s| {
                        s.bundle
                            .as_ref()
                            .is_some_and(|b| b.digest == self.spec.bundle.digest)
                    });
                    if runs || matches!(target, Target::Running { .. }) {
                        actions.push(Action::Rollback {
                            device: device.clone(),
                        });
                        *target = Target::RollingBack { at_ms: now_ms };
                    } else {
                        *target = Target::Cancelled { at_ms: now_ms };
                    }
                }
                Target::Shadowing { .. } => {
                    actions.push(Action::ShadowStop {
                        device: device.clone(),
                    });
                    *target = Target::Waiting;
                }
                _ => {}
            }
        }
        self.phase = Phase::Aborting {
            reason,
            since_ms: now_ms,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::{DriftRecord, FeatureDrift};

    fn bundle(digest: &str, seq: u64) -> BundleRef {
        BundleRef {
            name: "iris".into(),
            version: format!("1.{seq}.0"),
            digest: digest.into(),
            fleet: "demo".into(),
            channel: "stable".into(),
            sequence: seq,
            release: String::new(),
        }
    }

    fn spec(rules: &[&str]) -> Spec {
        Spec {
            bundle: bundle("new", 2),
            url: "http://console/bundles/new.ferry".into(),
            canary: Canary::Share { share: 0.1 },
            bake_ms: 60_000,
            waves: vec![0.5, 1.0],
            abort_if: rules.iter().map(|r| r.parse().unwrap()).collect(),
            shadow_samples: 0,
            install_timeout_ms: 120_000,
            operator: "test".into(),
        }
    }

    fn fleet_of(n: usize) -> BTreeMap<String, DeviceState> {
        (0..n)
            .map(|i| {
                let id = format!("dev-{i:02}");
                let s = DeviceState {
                    device: id.clone(),
                    online: true,
                    bundle: Some(bundle("old", 1)),
                    ..Default::default()
                };
                (id, s)
            })
            .collect()
    }

    fn run(r: &mut Rollout, fleet: &BTreeMap<String, DeviceState>, now: u64) -> Vec<Action> {
        r.step(now, &|d| fleet.get(d).cloned())
    }

    fn installs(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Install { device } => Some(device.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn rules_parse_with_percent_and_reject_nonsense() {
        let r: Rule = "error_rate>1%".parse().unwrap();
        assert_eq!(
            (r.metric, r.op, r.threshold),
            (Metric::ErrorRate, Op::Above, 0.01)
        );
        let r: Rule = " drift.psi > 0.25 ".parse().unwrap();
        assert_eq!(
            r.metric,
            Metric::Drift {
                statistic: "psi".into()
            }
        );
        let r: Rule = "shadow.agreement<0.97".parse().unwrap();
        assert_eq!((r.op, r.threshold), (Op::Below, 0.97));
        for bad in [
            "error_rate",
            "latency>5",
            "drift.foo>1",
            "error_rate>x",
            "error_rate>inf",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn canaries_are_deterministic_and_at_least_one() {
        let devices: Vec<String> = (0..20).map(|i| format!("d{i}")).collect();
        assert_eq!(canary_order("r1", &devices), canary_order("r1", &devices));
        assert_ne!(canary_order("r1", &devices), canary_order("r2", &devices));
        let r = Rollout::new("r1".into(), spec(&[]), &devices[..3], 0).unwrap();
        assert_eq!(r.canaries, 1);
        assert!(Rollout::new("r".into(), spec(&[]), &[], 0).is_err());
    }

    #[test]
    fn healthy_canaries_promote_in_waves_to_everyone() {
        let mut fleet = fleet_of(10);
        let devices: Vec<String> = fleet.keys().cloned().collect();
        let mut r = Rollout::new("r".into(), spec(&["error_rate>1%"]), &devices, 0).unwrap();
        let first = installs(&run(&mut r, &fleet, 0));
        assert_eq!(first.len(), 1);
        // Nothing more until the canary runs the bundle.
        assert!(installs(&run(&mut r, &fleet, 1000)).is_empty());
        fleet.get_mut(&first[0]).unwrap().bundle = Some(bundle("new", 2));
        run(&mut r, &fleet, 2000);
        assert!(matches!(r.phase, Phase::Bake { .. }));
        run(&mut r, &fleet, 30_000);
        assert!(matches!(r.phase, Phase::Bake { .. }));
        run(&mut r, &fleet, 62_001);
        assert!(matches!(r.phase, Phase::Wave { index: 1, .. }));
        let wave1 = installs(&run(&mut r, &fleet, 63_000));
        assert_eq!(wave1.len(), 4, "50% of 10 minus the canary");
        for d in &wave1 {
            fleet.get_mut(d).unwrap().bundle = Some(bundle("new", 2));
        }
        run(&mut r, &fleet, 64_000);
        let wave2 = installs(&run(&mut r, &fleet, 65_000));
        assert_eq!(wave2.len(), 5);
        for d in &wave2 {
            fleet.get_mut(d).unwrap().bundle = Some(bundle("new", 2));
        }
        run(&mut r, &fleet, 66_000);
        assert_eq!(r.phase, Phase::Done);
    }

    #[test]
    fn drifting_canaries_abort_and_are_rolled_back() {
        let mut fleet = fleet_of(4);
        let devices: Vec<String> = fleet.keys().cloned().collect();
        let mut r = Rollout::new("r".into(), spec(&["drift.psi>0.25"]), &devices, 0).unwrap();
        let canary = installs(&run(&mut r, &fleet, 0)).remove(0);
        fleet.get_mut(&canary).unwrap().bundle = Some(bundle("new", 2));
        run(&mut r, &fleet, 1000);
        fleet.get_mut(&canary).unwrap().drift = Some(DriftRecord {
            id: 1,
            ts_ms: 5000,
            bundle_version: "1.2.0".into(),
            bundle_digest: "new".into(),
            window_start_ms: 0,
            rows: 100,
            features: vec![FeatureDrift {
                name: "petal_length".into(),
                kind: "numeric".into(),
                method: "wasserstein".into(),
                value: Some(0.8),
                threshold: 0.1,
                drifted: true,
                psi: Some(4.2),
                rows: 100,
                missing: 0,
            }],
            drifted_features: 1,
            share: 0.25,
            dataset_drifted: false,
        });
        let actions = run(&mut r, &fleet, 6000);
        assert!(
            actions.contains(&Action::Rollback {
                device: canary.clone()
            }),
            "{actions:?}"
        );
        assert!(matches!(r.phase, Phase::Aborting { .. }));
        // Back on the old bundle: aborted, with the reason.
        fleet.get_mut(&canary).unwrap().bundle = Some(bundle("old", 1));
        run(&mut r, &fleet, 7000);
        match &r.phase {
            Phase::Aborted { reason } => assert!(reason.contains("petal_length"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // Nobody else was ever told to install.
        assert_eq!(
            r.targets
                .values()
                .filter(|t| matches!(t, Target::RolledBack))
                .count(),
            1
        );
    }

    fn shadow_report(agreement: f64, compared: u64) -> ferry_protocol::ShadowReport {
        ferry_protocol::ShadowReport {
            candidate: bundle("new", 2),
            active: bundle("old", 1),
            compared,
            candidate_errors: 0,
            top1_agreement: Some(agreement),
            mean_abs_diff: Some(0.01),
            active_latency_us_p50: 40,
            candidate_latency_us_p50: 42,
            candidate_latency_us_p99: 90,
            stopped_early: false,
        }
    }

    #[test]
    fn a_shadow_stage_gates_the_canaries() {
        let devices: Vec<String> = fleet_of(4).keys().cloned().collect();
        let mut s = spec(&["shadow.agreement<0.97"]);
        s.shadow_samples = 100;
        // Agreeing candidate: shadow first, then the canary installs.
        let mut fleet = fleet_of(4);
        let mut r = Rollout::new("r".into(), s.clone(), &devices, 0).unwrap();
        let actions = run(&mut r, &fleet, 0);
        let canary = r.order[0].clone();
        assert_eq!(
            actions,
            vec![Action::ShadowStart {
                device: canary.clone()
            }]
        );
        assert!(
            installs(&run(&mut r, &fleet, 1000)).is_empty(),
            "no install before the report"
        );
        fleet.get_mut(&canary).unwrap().shadow = Some(shadow_report(0.99, 100));
        run(&mut r, &fleet, 2000);
        assert!(matches!(r.phase, Phase::Canary { .. }), "{:?}", r.phase);
        assert_eq!(installs(&run(&mut r, &fleet, 3000)), vec![canary.clone()]);
        // Disagreeing candidate: aborted before anything is installed.
        let mut fleet = fleet_of(4);
        let mut r = Rollout::new("r".into(), s, &devices, 0).unwrap();
        run(&mut r, &fleet, 0);
        fleet.get_mut(&canary).unwrap().shadow = Some(shadow_report(0.80, 100));
        let actions = run(&mut r, &fleet, 1000);
        assert!(installs(&actions).is_empty());
        assert!(
            actions.contains(&Action::ShadowStop {
                device: canary.clone()
            }),
            "{actions:?}"
        );
        run(&mut r, &fleet, 2000);
        match &r.phase {
            Phase::Aborted { reason } => assert!(reason.contains("80.0%"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refused_and_silent_installs_count_as_failures() {
        let mut fleet = fleet_of(2);
        let devices: Vec<String> = fleet.keys().cloned().collect();
        let mut s = spec(&["failed_installs>0"]);
        s.canary = Canary::Group {
            devices: devices.clone(),
        };
        let mut r = Rollout::new("r".into(), s, &devices, 0).unwrap();
        run(&mut r, &fleet, 0);
        fleet.get_mut(&devices[0]).unwrap().update = UpdateState::Rejected {
            version: "(commanded)".into(),
            code: "wrong_fleet".into(),
            reason: "bundle is for another fleet".into(),
            digest: Some("new".into()),
        };
        run(&mut r, &fleet, 1000);
        match &r.phase {
            Phase::Aborting { reason, .. } | Phase::Aborted { reason } => {
                assert!(reason.contains("failed install"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // A rollout survives a round trip through JSON (persistence).
        let back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
