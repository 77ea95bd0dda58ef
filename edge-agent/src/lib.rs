//! ferry-agent: the on-device daemon. It serves predictions from the active
//! bundle over local HTTP, pulls signed updates and activates them atomically
//! (rolling back by itself when a new bundle misbehaves), buffers telemetry in
//! sled, measures drift against the baseline inside the bundle, runs
//! candidates in shadow, and reports over MQTT.
//!
//! # Layout
//! - `config`: the TOML configuration and its commented default (`ferry-agent init`).
//! - `buffer`: the telemetry buffer on sled; its header states the durability contract.
//! - `mqtt`: reporting over MQTT through `ferry-link` (the only crate that
//!   depends on rumqttc; the rumqttc types named here are its re-exports):
//!   batching, the in-flight window, retained status and last will,
//!   commands in.
//! - `updates`: update channels (HTTP with resumable downloads, or a directory),
//!   the checks a candidate must pass, and the on-disk bundle store with atomic
//!   activation and rollback.
//! - `observe`: what each prediction leaves behind: telemetry records, samples,
//!   and the drift window (bounded memory, same statistics as `ferry drift`).
//! - `shadow`: a candidate bundle run on live inputs, never answering.
//! - `agent`: the core: the active session, the update flow, probation and
//!   automatic rollback, commands, status.
//! - `trust`: the root of trust (provisioned, derived from `trusted_keys`, or
//!   rotated) whose roles sign releases, commands and channel metadata.
//! - `engines`: `auto`'s engine choice per release, remembered across restarts.
//! - `replay`: the persisted record of signed commands already obeyed.
//! - `metrics`: Prometheus metrics.
//! - `server`: the HTTP API (axum): predict, model, healthz, metrics.
//!
//! The MQTT topics and payloads live in the `ferry-protocol` crate
//! (`protocol/`), shared with the fleet console.
//!
//! # Invariants
//! - Inference never waits on the network: a prediction appends to the local
//!   buffer and returns; a separate task ships the buffer.
//! - A record leaves the buffer only after the broker acknowledged it (PUBACK).
//! - Nothing from a bundle runs before its signatures meet the root's release
//!   policy (builder, and approver when the root has one).
//! - Nothing a command asks changes the device unless operator keys signed it
//!   up to the root's threshold (only `ping` and `check_update` may be
//!   unsigned).
//! - At every instant the disk holds an activation record that names a
//!   complete, verified bundle (or none before the first install).

pub mod agent;
pub mod buffer;
pub mod config;
pub mod engines;
pub mod metrics;
pub mod mqtt;
pub mod observe;
pub mod replay;
pub mod server;
pub mod shadow;
pub mod trust;
pub mod updates;
