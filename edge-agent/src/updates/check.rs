//! The checks a candidate bundle must pass before it may run, each refusal
//! with a stable code (see [`Rejection`]).
//!
//! In order: the release (manifest hash) must differ from the running one
//! (`already_active`); signatures, sizes and digests must verify (the codes of
//! [`BundleError::code`]); the signed release must name this device's fleet
//! (`wrong_fleet`) and channel (`wrong_channel`) and a higher sequence than the
//! running bundle's (`downgrade`, unless an operator allowed it); a build
//! without a guest compiler (the lean device build) must find a guest
//! precompiled for a target it runs (`guest_target`). Then, once
//! loaded (`load_failed`), its golden examples must pass on this device
//! (`golden_failed`): the packager ran them on the build machine, this run
//! proves the device's runtime gives the same answers.

use ferry_format::release_id_of;
use ferry_protocol::{BundleRef, ChannelIndex};
use ferry_runtime::{
    BundleError, GoldenOutcome, ReadLimits, Session, TrustPolicy, VerifiedBundle,
    check_runnable_bundle, verify_for_host,
};
use sha2::{Digest, Sha256};

/// What this device accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub fleet: String,
    pub channel: String,
}

/// Why a candidate was refused: a stable `code` for telemetry and tests, and
/// a `reason` for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub reason: String,
}

impl Rejection {
    pub fn new(code: &'static str, reason: impl Into<String>) -> Rejection {
        Rejection {
            code,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason, self.code)
    }
}

impl std::error::Error for Rejection {}

impl From<BundleError> for Rejection {
    fn from(e: BundleError) -> Rejection {
        Rejection::new(e.code(), e.to_string())
    }
}

/// Golden examples reported in a `golden_failed` reason (the rest are counted).
const MAX_REPORTED_EXAMPLES: usize = 3;
/// Mismatches reported per failed example.
const MAX_REPORTED_MISMATCHES: usize = 3;

/// Checks a candidate's bytes: identity, signatures, integrity, release.
/// Returns the verified bundle, ready for [`load_session`].
///
/// `running` is the active bundle (`None` before the first install);
/// `allow_downgrade` lets a sequence at or below it through (an operator's
/// signed install command), never the very same bytes.
pub fn check_candidate(
    bytes: &[u8],
    trust: &TrustPolicy,
    limits: &ReadLimits,
    want: &Want,
    running: Option<&BundleRef>,
    allow_downgrade: bool,
) -> Result<VerifiedBundle, Rejection> {
    // The running release (whatever signatures this file carries): nothing
    // to do, and no reason to pay for decompressing it again. The release id
    // is the manifest's hash, read from the framing before any signature
    // check; the same check runs again on the verified bundle below.
    if let Some(running) = running
        && let Ok(release) = release_id_of(bytes)
    {
        let digest = hex::encode(Sha256::digest(bytes));
        if release == running.release || digest == running.digest {
            return Err(Rejection::new(
                "already_active",
                format!(
                    "release {release} is the one running ({} {})",
                    running.name, running.version
                ),
            ));
        }
    }
    let bundle = verify_for_host(bytes, trust, limits)?;
    let release = &bundle.manifest().release;
    if release.fleet != want.fleet {
        return Err(Rejection::new(
            "wrong_fleet",
            format!(
                "bundle is for fleet {:?}, this device is in fleet {:?}",
                release.fleet, want.fleet
            ),
        ));
    }
    if release.channel != want.channel {
        return Err(Rejection::new(
            "wrong_channel",
            format!(
                "bundle is for channel {:?}, this device follows {:?}",
                release.channel, want.channel
            ),
        ));
    }
    if let Some(running) = running
        && release.sequence <= running.sequence
        && !allow_downgrade
    {
        return Err(Rejection::new(
            "downgrade",
            format!(
                "bundle sequence {} is not above the running bundle's {} ({} {})",
                release.sequence, running.sequence, running.name, running.version
            ),
        ));
    }
    // Judged from the manifest's artifact list, before anything is loaded:
    // a device that cannot compile guests refuses a bundle with none for it.
    if let Err(e) = check_runnable_bundle(&bundle) {
        return Err(Rejection::new(e.code(), e.to_string()));
    }
    Ok(bundle)
}

/// Loads a verified bundle (compiles the guest, optimises the model) on the
/// engine `engines` pick for it (`remembered`: the engine `auto` chose for
/// this release before, see `crate::engines`): the golden examples of
/// [`health_check`] then run on the engine that will serve.
pub fn load_session(
    bundle: VerifiedBundle,
    engines: &ferry_runtime::EngineOptions,
    remembered: Option<ferry_runtime::Engine>,
) -> Result<Session, Rejection> {
    let session = Session::from_verified_remembering(bundle, engines, remembered).map_err(|e| {
        Rejection::new(
            "load_failed",
            format!("bundle cannot be loaded ({}): {e}", e.code()),
        )
    })?;
    tracing::info!(
        engine = %session.engine(),
        decision = session.engine_decision().name(),
        bundle = %session.digest(),
        race = ?session.engine_race(),
        "Loaded a bundle"
    );
    Ok(session)
}

/// Runs the bundle's golden examples on this device. A bundle without any
/// passes (there is nothing to compare).
pub fn health_check(session: &Session) -> Result<(), Rejection> {
    let outcomes = session.check_golden();
    let failed: Vec<&GoldenOutcome> = outcomes.iter().filter(|o| !o.passed()).collect();
    if failed.is_empty() {
        return Ok(());
    }
    let mut parts: Vec<String> = failed
        .iter()
        .take(MAX_REPORTED_EXAMPLES)
        .map(|o| describe(o))
        .collect();
    if failed.len() > MAX_REPORTED_EXAMPLES {
        parts.push(format!("and {} more", failed.len() - MAX_REPORTED_EXAMPLES));
    }
    Err(Rejection::new(
        "golden_failed",
        format!(
            "{} of {} golden example(s) failed on this device: {}",
            failed.len(),
            outcomes.len(),
            parts.join("; ")
        ),
    ))
}

fn describe(o: &GoldenOutcome) -> String {
    if let Some(error) = &o.error {
        return format!("`{}` failed to run: {error}", o.name);
    }
    let mut shown: Vec<String> = o
        .mismatches
        .iter()
        .take(MAX_REPORTED_MISMATCHES)
        .map(|m| m.to_string())
        .collect();
    if o.mismatches.len() > MAX_REPORTED_MISMATCHES {
        shown.push(format!(
            "{} more",
            o.mismatches.len() - MAX_REPORTED_MISMATCHES
        ));
    }
    format!("`{}`: {}", o.name, shown.join(", "))
}

/// The identity of a verified bundle.
pub fn bundle_ref(v: &VerifiedBundle) -> BundleRef {
    let m = v.manifest();
    BundleRef {
        name: m.name.clone(),
        version: m.version.clone(),
        digest: v.digest().to_string(),
        fleet: m.release.fleet.clone(),
        channel: m.release.channel.clone(),
        sequence: m.release.sequence,
        release: v.release_id().to_string(),
    }
}

/// Why a channel's latest entry is not worth downloading, judged from the
/// (unsigned) index alone; `None` when it is. The downloaded bundle is
/// checked again by [`check_candidate`]: this only saves the download.
pub fn skip_reason(
    index: &ChannelIndex,
    want: &Want,
    running: Option<&BundleRef>,
    rejected: &[String],
) -> Option<Rejection> {
    let latest = &index.latest;
    if index.fleet != want.fleet || index.channel != want.channel {
        let code = if index.fleet != want.fleet {
            "wrong_fleet"
        } else {
            "wrong_channel"
        };
        return Some(Rejection::new(
            code,
            format!(
                "index is for {}/{}, this device follows {}/{}",
                index.fleet, index.channel, want.fleet, want.channel
            ),
        ));
    }
    if let Some(running) = running {
        if latest.digest == running.digest {
            return Some(Rejection::new(
                "already_active",
                "latest is the running bundle",
            ));
        }
        if latest.sequence <= running.sequence {
            return Some(Rejection::new(
                "up_to_date",
                format!(
                    "latest sequence {} is not above the running {}",
                    latest.sequence, running.sequence
                ),
            ));
        }
    }
    if rejected.iter().any(|d| d == &latest.digest) {
        return Some(Rejection::new(
            "rejected_before",
            format!(
                "bundle {} was rejected or rolled back before",
                latest.digest
            ),
        ));
    }
    None
}
