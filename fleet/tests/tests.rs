//! ferry-fleet's integration tests, with a real mosquitto and real
//! `ferry-agent` processes.
//!
//! - `broker`, `fixtures`, `device`: the edge agent's test harnesses
//!   (mosquitto, bundles, agent processes), shared by path.

#[path = "../../edge-agent/tests/broker.rs"]
#[allow(dead_code)]
mod broker;
#[path = "../../edge-agent/tests/device.rs"]
#[allow(dead_code)]
mod device;
#[path = "../../edge-agent/tests/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;
