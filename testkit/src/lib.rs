//! ferry-testkit: the harnesses Ferry's integration tests and benchmarks
//! share, so every crate tests against the same real things: bundles packed
//! by the real `ferry`, the real binaries, a real mosquitto, real
//! `ferry-agent` processes. A dev-dependency only (`publish = false`).
//!
//! # Layout
//! - `fixtures`: the workspace's `examples/`, its built binaries
//!   ([`fixtures::workspace_bin`]: `ferry`, `ferry-agent`, `ferry-fleet`,
//!   `bootstrap`), and [`fixtures::bundles`]: keys and bundles packed from
//!   the examples once per test process (good releases and bad ones derived
//!   from them, each named by a constant).
//! - `cli`: runs the real `ferry` with a fixed clock
//!   ([`cli::SOURCE_DATE_EPOCH`]); exit-code and output helpers.
//! - `channel`: update channels: [`channel::publish`] writes a channel
//!   directory, [`channel::ChannelServer`] serves one over HTTP and can cut,
//!   fail or strip a download.
//! - `broker`: [`broker::Mosquitto`], a real mosquitto with passwords, an ACL,
//!   persistence and optional TLS ([`broker::Pki`]) on free loopback ports;
//!   [`broker::Subscriber`], a test-side MQTT client; [`broker::Relay`], a TCP
//!   relay a test can cut or hold.
//! - `device`: [`device::Device`], a real `ferry-agent` process with its
//!   configuration, state directory and HTTP client; iris request helpers.
//! - `cross`: [`cross::CrossAgent`], an agent built for another
//!   architecture (aarch64, armv7) that a [`device::Device`] runs under
//!   qemu-user, named by `FERRY_CROSS_AGENT_*` (set by `.ci/run`).
//! - `lambda`: [`lambda::RuntimeApi`], AWS Lambda's Runtime API for the real
//!   `bootstrap`.
//! - `onnxruntime`: [`onnxruntime::library`], the library for engine tests,
//!   or a skip said out loud (a failure where it is required).
//! - `tensors`: binary tensor request bodies (`.npy`, the ABI's tensor sets).
//! - `slow`: [`slow::half_open`] connections that send half a request and
//!   wait, and descriptor limits for this process and a child.
//! - [`free_port`]: a free loopback TCP port.
//!
//! # Conventions
//! Servers bind `127.0.0.1` on free ports; every process and temporary
//! directory belongs to a value that kills or removes it on drop. Helpers
//! panic with the output or log of what failed: they are for tests only.

#![forbid(unsafe_code)]

pub mod bench;
pub mod broker;
pub mod channel;
pub mod cli;
pub mod cross;
pub mod device;
pub mod fixtures;
pub mod lambda;
pub mod onnxruntime;
pub mod slow;
pub mod tensors;

/// A TCP port free on 127.0.0.1 at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
