//! ferry-fleet: the operator side of Ferry. It follows a fleet over MQTT
//! (the protocol in `ferry-protocol`), keeps per-device state that survives
//! restarts, serves a live dashboard, runs canary rollouts and fires
//! retraining triggers.
//!
//! # Layout
//! - `model`: the per-device state and the other values the API shows.
//! - `store`: the sled store: devices, drift history, events, samples,
//!   de-duplication, change notifications.
//! - `ingest`: the MQTT subscription that feeds the store.
//! - `server`: the dashboard and its JSON API (axum, SSE).
//! - `rollout`: canary rollouts as a state machine without I/O.

pub mod ingest;
pub mod model;
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
