//! ferry-fleet: the operator side of Ferry. It follows a fleet over MQTT
//! (the protocol in `ferry-protocol`), keeps per-device state that survives
//! restarts, serves a live dashboard, runs canary rollouts and fires
//! retraining triggers.
//!
//! # Layout
//! - `broker`: the embedded MQTT broker (rumqttd) of `serve
//!   --embedded-broker`, for demos: no authentication.
//! - `model`: the per-device state and the other values the API shows.
//! - `store`: the sled store: devices, drift history, events, samples,
//!   de-duplication, change notifications.
//! - `ingest`: the MQTT subscription that feeds the store.
//! - `server`: the dashboard and its JSON API (axum, SSE).
//! - `rollout`: canary rollouts as a state machine without I/O.
//! - `retrain`: the retraining loop: fleet-wide drift shares, the rule,
//!   episodes (fire once), data sets, requests and hooks, and its routes.

pub mod broker;
pub mod ingest;
pub mod model;
pub mod retrain;
pub mod rollout;
pub mod rollouts;
pub mod server;
pub mod store;

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes a file so that a crash leaves the old or the new content, never a
/// torn one: a temporary file, fsync, rename over the target, fsync of the
/// directory.
pub(crate) fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}
