//! ferry-agent's integration tests: real mosquitto, real bundles packed by
//! the real `ferry`, the real `ferry-agent` binary where the whole daemon is
//! under test. The harnesses (mosquitto, bundles, agent processes, update
//! channels) are in ferry-testkit.
//!
//! - `buffer`: the sled telemetry buffer (budget, priorities, checksums, ids).
//! - `mqtt`: the reporter against mosquitto (outages, ACLs, will, commands, TLS).
//! - `updates`: channels, resumable downloads, candidate checks, the bundle
//!   store's atomic activation and recovery.
//! - `agent`: the `ferry-agent` binary: HTTP API, drift, updates, rollbacks.
//! - `agent_mqtt`: the binary with mosquitto: outages, SIGKILL, will, commands.
//! - `cross`: the lean device builds for aarch64 and armv7 under qemu-user
//!   (when `.ci/run` names them): predictions, a refused bundle, an update,
//!   a rollback, MQTT.

mod agent;
mod agent_mqtt;
mod buffer;
mod cross;
mod mqtt;
mod updates;
