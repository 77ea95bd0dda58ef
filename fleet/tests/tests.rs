//! ferry-fleet's integration tests, with a real mosquitto and real
//! `ferry-agent` processes.
//!
//! - `embedded`: `serve --embedded-broker` (rumqttd, no mosquitto) with
//!   real agents: statuses, counts, retained statuses, a persistent
//!   session, the last will.
//! - `retrain`: the retraining loop against real agents: the hook fires
//!   once per episode (also across a console restart) with the drifted
//!   samples; the export CLI; a webhook retried.
//! - `demo`: `scripts/fleet-demo.sh` runs to the end.
//! - `rollouts`: canary rollouts against real agents: promote, abort on
//!   drift with rollback, resume after a console restart.
//! - `state`: the store fed by the MQTT ingest from mosquitto and real
//!   agents; `ferry-fleet serve` and `status`.
//! - `broker`, `fixtures`, `device`: the edge agent's test harnesses
//!   (mosquitto, bundles, agent processes), shared by path.

#[path = "../../edge-agent/tests/broker.rs"]
#[allow(dead_code)]
mod broker;
#[path = "../../edge-agent/tests/device.rs"]
#[allow(dead_code)]
mod device;
// fixtures.rs allows dead code itself.
mod dashboard;
mod demo;
mod embedded;
#[path = "../../edge-agent/tests/fixtures.rs"]
mod fixtures;
mod retrain;
mod rollouts;
mod state;
