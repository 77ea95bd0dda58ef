//! ferry-link: Ferry's MQTT client core, shared by the edge agent (which
//! reports through it) and the fleet console (which follows the fleet and
//! sends commands through it). The only crate that depends on rumqttc; the
//! wire format (topics, payloads, limits) is `ferry-protocol`'s.
//!
//! # Layout
//! - `url`: [`BrokerUrl`], the `mqtt://` / `mqtts://` URLs both sides take,
//!   and [`BrokerUrlError`].
//! - `tls`: [`client_config`], one rustls configuration on ring (no
//!   aws-lc) from a CA file or the system's roots, with an optional client
//!   certificate ([`TlsFiles`], [`TlsError`]).
//! - `options`: [`Settings`] → checked rumqttc options ([`SettingsError`]),
//!   and [`client`] to make the client and its event loop.
//! - `backoff`: [`Backoff`] (reconnect delays with jitter) and
//!   [`Reconnect`] (attempts, reset after a stable connection).
//! - `driver`: [`drive`], the poll future that owns the event loop across
//!   `select!` rounds; [`forget_resends`] and [`drop_connection`] for a
//!   connection that ended.
//! - `tracker`: [`Tracker`], which publish each packet id and PUBACK stands
//!   for: a state machine without I/O, generic over what the caller
//!   attaches to a publish.
//!
//! rumqttc's own types that callers handle (the client, the event loop, its
//! events and packets) are re-exported here, so that no other crate depends
//! on rumqttc: [`AsyncClient`], [`EventLoop`], [`MqttOptions`],
//! [`ConnectionError`], [`Event`], [`Incoming`] (= [`Packet`]), [`Outgoing`],
//! [`Publish`], [`QoS`], [`SubAck`], [`SubscribeFilter`],
//! [`SubscribeReasonCode`]. The tests' plain MQTT clients (mosquitto
//! harness, embedded broker, benchmarks) use them too.
//!
//! # What rumqttc (0.25) does and does not do, and what this crate adds
//! - It keeps nothing on disk and re-sends unacknowledged QoS 1 publishes
//!   after a reconnect only when the broker reports a resumed session. The
//!   agent and the console keep their own outboxes and call
//!   [`forget_resends`] after every connection error.
//! - `EventLoop::poll` reconnects on the next call after an error; the
//!   delay is the caller's ([`Reconnect`]).
//! - With a clean session, subscriptions vanish on reconnect: callers
//!   subscribe again on every CONNACK.
//! - `AsyncClient::publish` blocks when its request channel is full and
//!   nobody polls: callers use `try_*` only, within a window that fits the
//!   channel ([`Settings::request_capacity`]).
//! - Packets are limited to 10 KiB each way by default:
//!   [`Settings::max_incoming_packet`] and [`Settings::max_outgoing_packet`].
//! - TLS: rumqttc's `use-rustls-no-provider` feature; ring is chosen here.

#![forbid(unsafe_code)]

mod backoff;
mod driver;
mod options;
mod tls;
mod tracker;
mod url;

pub use backoff::{Backoff, Reconnect};
pub use driver::{drive, drop_connection, forget_resends};
pub use options::{MAX_CLIENT_ID_LEN, PACKET_HEADROOM, Settings, SettingsError, Will, client};
pub use tls::{FileNames, TlsError, TlsFiles, client_config};
pub use tracker::{Anomaly, Tracker};
pub use url::{BrokerUrl, BrokerUrlError};

pub use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, Packet,
    Publish, QoS, SubAck, SubscribeFilter, SubscribeReasonCode,
};
