//! The embedded MQTT broker of `ferry-fleet serve --embedded-broker`:
//! rumqttd 0.20 in this process, on its own threads, for demos and small
//! fleets on a trusted network.
//!
//! # Not a production broker
//! It has **no authentication and no ACL**: any client that reaches the
//! port may connect with any (or no) credentials, read every device's
//! telemetry and publish commands. It binds loopback unless told otherwise.
//! It keeps everything in memory: retained statuses and persistent sessions
//! are lost when the console stops. Production fleets use mosquitto, EMQX or
//! AWS IoT Core (fleet/README.md, "Broker settings").
//!
//! # What the fleet relies on, as rumqttd 0.20 does it
//! - Retained messages (the devices' `status`): kept and sent to new
//!   subscribers.
//! - Last wills (a device going away is marked offline): published when a
//!   connection ends without DISCONNECT (no will delay for MQTT 3.1.1).
//! - Persistent sessions (`clean_session = false`): subscriptions and the
//!   read position survive a reconnect; what was published meanwhile is
//!   delivered from the broker's in-memory log, as far back as that log
//!   reaches ([`SEGMENT_BYTES`] × [`SEGMENTS`] per subscribed filter).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The default address of `--embedded-broker` given without a value.
pub const DEFAULT_ADDR: &str = "127.0.0.1:1883";
/// Connections the broker accepts (devices, the console, tools).
pub const MAX_CONNECTIONS: usize = 5_000;
/// Largest packet accepted: the console's own incoming limit, so that the
/// broker never forwards a message that would break its connection.
pub const MAX_PAYLOAD: usize = crate::ingest::MAX_INCOMING_PACKET;
/// Size of one segment of the in-memory log kept per subscribed filter.
pub const SEGMENT_BYTES: usize = 16 << 20;
/// Segments kept per filter: older messages are dropped beyond that.
pub const SEGMENTS: usize = 4;
/// QoS 1 messages sent to one client and not yet acknowledged.
pub const MAX_INFLIGHT: usize = 100;
/// Time a client has, once connected, to send CONNECT.
pub const CONNECT_TIMEOUT_MS: u16 = 10_000;
/// How long [`EmbeddedBroker::start`] waits for the port to accept.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// rumqttd's configuration: one MQTT 3.1.1 server on `addr`, no TLS, no
/// authentication, no console or metrics endpoints.
pub fn config(addr: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: CONNECT_TIMEOUT_MS,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: MAX_INFLIGHT,
        auth: None,
        external_auth: None,
        // Topics nobody subscribes to yet get their own log (a device's
        // status before the console subscribed is kept, not refused).
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "ferry-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: 200,
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENTS,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    }
}

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Port 0: agents must be configured with the broker's port.
    #[error("the embedded broker needs a fixed port (agents are configured with it)")]
    NeedsFixedPort,
    /// The address cannot be bound (taken, not local, no permission).
    #[error("the embedded broker cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The broker's thread could not be started.
    #[error("cannot start the embedded broker's thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The broker stopped before it accepted connections.
    #[error("the embedded broker could not listen on {addr} (see the log)")]
    Stopped { addr: SocketAddr },
    /// It did not answer an MQTT handshake within the start timeout.
    #[error("the embedded broker did not accept connections on {addr} in time")]
    Timeout { addr: SocketAddr },
}

impl BrokerError {
    /// A stable code for logs.
    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::NeedsFixedPort => "needs_fixed_port",
            BrokerError::Bind { .. } => "bind",
            BrokerError::Thread(_) => "thread",
            BrokerError::Stopped { .. } => "stopped",
            BrokerError::Timeout { .. } => "timeout",
        }
    }
}

/// A running embedded broker. It runs until the process exits.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `addr` and returns once the port accepts
    /// connections. Fails when the port is taken or the broker stops.
    pub fn start(addr: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
        if addr.port() == 0 {
            return Err(BrokerError::NeedsFixedPort);
        }
        // rumqttd only logs a failed bind: check first, for a clear error
        // (and not to mistake another broker on that port for ours).
        drop(TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?);
        let (ended_tx, ended_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                let result = rumqttd::Broker::new(config(addr)).start();
                tracing::error!(?result, "The embedded MQTT broker stopped");
                let _ = ended_tx.send(());
            })
            .map_err(BrokerError::Thread)?;
        let probe = probe_addr(addr);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ended_rx.try_recv().is_ok() {
                return Err(BrokerError::Stopped { addr });
            }
            if mqtt_handshake(probe).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(BrokerError::Timeout { addr });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(
            %addr,
            "Embedded MQTT broker listening: no authentication, no ACL, state in memory only \
             (for demos and small trusted networks)"
        );
        Ok(EmbeddedBroker { addr: probe })
    }

    /// The URL clients on this machine use: `mqtt://<addr>`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// The URL clients on this machine use for a broker started on `addr`
    /// (an unspecified address is reached on loopback).
    pub fn url_of(addr: SocketAddr) -> String {
        format!("mqtt://{}", probe_addr(addr))
    }
}

/// Where a broker listening on `addr` is reached from this machine.
fn probe_addr(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

/// An MQTT 3.1.1 CONNECT (clean session), its CONNACK, and a DISCONNECT:
/// the broker answers MQTT (a bare TCP probe would be logged as a failed
/// connection).
fn mqtt_handshake(addr: SocketAddr) -> std::io::Result<()> {
    use std::io::{Read, Write};
    const ID: &[u8] = b"ferry-fleet-probe";
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    // Variable header: protocol name "MQTT", level 4, flags (clean
    // session), keep alive 10 s; payload: the client id.
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        10,
        0,
        ID.len() as u8,
    ];
    body.extend_from_slice(ID);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    s.write_all(&packet)?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)?;
    if ack != [0x20, 2, 0, 0] {
        return Err(std::io::Error::other(format!("unexpected CONNACK {ack:?}")));
    }
    s.write_all(&[0xe0, 0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_one_v4_server_and_room_for_batches() {
        let c = config("127.0.0.1:1883".parse().unwrap());
        let v4 = c.v4.as_ref().unwrap();
        assert_eq!(v4.len(), 1);
        let s = v4.values().next().unwrap();
        assert!(s.connections.max_payload_size >= 1 << 20);
        assert!(s.connections.max_payload_size >= ferry_protocol::MAX_MESSAGE_BYTES);
        assert!(s.connections.auth.is_none() && s.tls.is_none());
        assert!(c.v5.is_none() && c.ws.is_none() && c.console.is_none());
        assert!(c.prometheus.is_none());
        assert!(c.router.max_segment_size >= MAX_PAYLOAD);
    }
}
