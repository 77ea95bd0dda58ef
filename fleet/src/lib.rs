//! ferry-fleet: the operator side of Ferry. It follows a fleet over MQTT
//! (the protocol in `ferry-protocol`), keeps per-device state that survives
//! restarts, serves a live dashboard, runs canary rollouts and fires
//! retraining triggers.
//!
//! The console is a library: [`run`] takes a [`ServeConfig`] and a shutdown
//! future and does everything `ferry-fleet serve` does; the binary only
//! parses arguments and calls it, and the tests call the same function
//! (the shape of tokio-rs/mini-redis).
//!
//! # Layout
//! - `serve`: [`run`], [`ServeConfig`], [`ServeError`]: the console
//!   assembled once (store, MQTT, embedded broker, rollouts, retraining,
//!   HTTP), and its orderly stop.
//! - `auth`: roles, API tokens (stored hashed), the first admin token,
//!   dashboard sessions ([`Auth`], [`Role`]).
//! - `store`: the one owner of the sled database: devices, drift history,
//!   events, samples, de-duplication, change notifications, retraining
//!   episodes, and the key layout version it refuses when unknown.
//! - `model`: the per-device state and the other values the API shows.
//! - `ingest`: the MQTT subscription that feeds the store, and `publish`
//!   for commands.
//! - `broker`: the embedded MQTT broker (rumqttd) of `serve
//!   --embedded-broker`, for demos: no authentication.
//! - `rollout`: canary rollouts as a state machine without I/O.
//! - `rollouts`: running rollouts: persistence, the audit log, signed
//!   commands, the bundles devices download ([`RolloutError`]).
//! - `retrain`: the retraining loop: fleet-wide drift shares, the rule,
//!   episodes (fire once), data sets, requests and hooks
//!   ([`RetrainError`]).
//! - `http`: the only module naming axum: one error type mapped to status
//!   codes (`ApiError`), the routes per area (`dashboard`, `rollouts`,
//!   `retrain`), bundle downloads streamed from disk.
//! - `client`: the typed client of the HTTP API ([`Client`]), used by the
//!   CLI and the tests.
//! - `text`: the CLI's human-readable tables (`status`).
//!
//! # Invariants
//! - Only `store` names sled, only `http` names axum, only `ingest` and
//!   `broker` name the MQTT crates.
//! - `rollouts` and `retrain` return typed errors with a stable `code()`;
//!   their HTTP status is decided in `http` alone.

#![forbid(unsafe_code)]

pub mod auth;
pub mod broker;
pub mod client;
pub mod http;
pub mod ingest;
pub mod model;
pub mod releases;
pub mod retrain;
pub mod rollout;
pub mod rollouts;
mod serve;
pub mod store;
pub mod text;

pub use auth::{Auth, AuthError, Principal, Role};
pub use client::{Client, ClientError};
pub use retrain::RetrainError;
pub use rollouts::RolloutError;
pub use serve::{HTTP_GRACE, RolloutsConfig, ServeConfig, ServeError, TICK, run, run_notify};
pub use store::{Store, StoreError};
