//! Connection options: everything rumqttc needs to connect, built from a
//! [`BrokerUrl`] and checked here, so a bad setting fails when the caller
//! starts, with a message, not in a reconnect loop.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

use crate::tls::{TlsError, TlsFiles, client_config};
use crate::url::BrokerUrl;

/// Longest client id accepted: brokers differ (MQTT 3.1.1 only promises 23
/// characters, mosquitto and AWS IoT Core take 128 or more); Ferry's
/// device ids and fleet names are at most 128 characters too.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// Added to a payload limit for the packet limit: fixed header, packet id
/// and topic (at most ~290 bytes with the longest fleet and device names).
/// Generous so the limit that bites is always the payload's.
pub const PACKET_HEADROOM: usize = 4096;

/// The message the broker publishes (QoS 1) when the connection dies
/// without a DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// One client's connection settings. [`Settings::new`] gives rumqttc's
/// defaults except where noted; callers set the rest.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: BrokerUrl,
    /// 1 to [`MAX_CLIENT_ID_LEN`] characters, not starting with a space
    /// (rumqttc panics on those).
    pub client_id: String,
    /// `false`: the broker keeps subscriptions and queued QoS 1 messages
    /// across reconnects (rumqttc then re-sends its unacknowledged
    /// publishes only on `session_present`; see [`crate::forget_resends`]).
    pub clean_session: bool,
    /// Incoming QoS 1 messages are acknowledged by the caller
    /// (`AsyncClient::try_ack`), not when rumqttc reads them.
    pub manual_acks: bool,
    /// At least one second.
    pub keep_alive: Duration,
    /// Packet limits; rumqttc's default (10 KiB each way) is too small for
    /// batched telemetry.
    pub max_incoming_packet: usize,
    pub max_outgoing_packet: usize,
    /// rumqttc's window of unacknowledged outgoing QoS 1 publishes (at least 1).
    pub inflight: u16,
    /// rumqttc's request channel (publishes, acks, subscriptions handed to
    /// the event loop and not yet taken).
    pub request_capacity: usize,
    /// A user name, with the password when one is set.
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Will>,
    /// For `mqtts://` only: a file set with a plain `mqtt://` URL is refused.
    pub tls: TlsFiles,
}

/// Why [`Settings`] could not make options. The caller words the ones that
/// name its own settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Empty, too long, or starting with a space.
    #[error(
        "the MQTT client id must be 1 to {MAX_CLIENT_ID_LEN} characters, not starting with a space"
    )]
    ClientId,
    /// Under a second (zero would turn pings off: a dead connection would go unnoticed).
    #[error("the keep alive must be at least 1 s: without pings a dead connection goes unnoticed")]
    KeepAlive,
    /// Zero in-flight publishes.
    #[error("the in-flight window must be at least 1")]
    Inflight,
    /// A password without a user name.
    #[error("a password is set but no user name")]
    PasswordWithoutUser,
    /// TLS files with a plain `mqtt://` URL.
    #[error("TLS files are set but the broker URL is plain mqtt://; use mqtts://")]
    TlsFilesWithoutTls,
    /// The TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl SettingsError {
    /// Stable identifier, for logs and telemetry.
    pub fn code(&self) -> &'static str {
        match self {
            SettingsError::ClientId => "client_id",
            SettingsError::KeepAlive => "keep_alive",
            SettingsError::Inflight => "inflight",
            SettingsError::PasswordWithoutUser => "password_without_user",
            SettingsError::TlsFilesWithoutTls => "tls_files_without_tls",
            SettingsError::Tls(e) => e.code(),
        }
    }
}

impl Settings {
    /// A clean session with rumqttc's defaults (keep alive 60 s, 10 KiB
    /// packets, 100 in flight, 10 requests queued), no login, no will, the
    /// system's roots for `mqtts://`.
    pub fn new(url: BrokerUrl, client_id: impl Into<String>, tls: TlsFiles) -> Settings {
        Settings {
            url,
            client_id: client_id.into(),
            clean_session: true,
            manual_acks: false,
            keep_alive: Duration::from_secs(60),
            max_incoming_packet: 10 * 1024,
            max_outgoing_packet: 10 * 1024,
            inflight: 100,
            request_capacity: 10,
            username: None,
            password: None,
            will: None,
            tls,
        }
    }

    /// Checks everything and reads the TLS files.
    pub fn options(&self) -> Result<MqttOptions, SettingsError> {
        if self.client_id.is_empty()
            || self.client_id.chars().count() > MAX_CLIENT_ID_LEN
            || self.client_id.starts_with(' ')
        {
            return Err(SettingsError::ClientId);
        }
        if self.keep_alive < Duration::from_secs(1) {
            return Err(SettingsError::KeepAlive);
        }
        if self.inflight == 0 {
            return Err(SettingsError::Inflight);
        }
        let url = &self.url;
        let mut o = MqttOptions::new(self.client_id.clone(), url.host.clone(), url.port);
        o.set_clean_session(self.clean_session);
        o.set_manual_acks(self.manual_acks);
        o.set_keep_alive(self.keep_alive);
        o.set_max_packet_size(self.max_incoming_packet, self.max_outgoing_packet);
        o.set_inflight(self.inflight);
        o.set_request_channel_capacity(self.request_capacity);
        match (&self.username, &self.password) {
            (Some(user), password) => {
                o.set_credentials(user.clone(), password.clone().unwrap_or_default());
            }
            (None, Some(_)) => return Err(SettingsError::PasswordWithoutUser),
            (None, None) => {}
        }
        if let Some(will) = &self.will {
            o.set_last_will(LastWill::new(
                will.topic.clone(),
                will.payload.clone(),
                QoS::AtLeastOnce,
                will.retain,
            ));
        }
        if url.tls {
            let tls = client_config(&self.tls)?;
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        } else if self.tls.any() {
            return Err(SettingsError::TlsFilesWithoutTls);
        }
        Ok(o)
    }
}

/// A client and its event loop, with the request channel the options ask
/// for. Nothing happens on the network before the event loop is polled.
pub fn client(options: MqttOptions) -> (AsyncClient, EventLoop) {
    let cap = options.request_channel_capacity();
    AsyncClient::new(options, cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::FileNames;

    const NAMES: FileNames = FileNames {
        ca_file: "the CA file",
        client_cert: "the client certificate",
        client_key: "the client key",
    };

    fn settings(url: &str) -> Settings {
        Settings::new(BrokerUrl::parse(url).unwrap(), "c-1", TlsFiles::none(NAMES))
    }

    #[test]
    fn options_follow_the_settings() {
        let mut s = settings("mqtt://127.0.0.1:1999");
        s.clean_session = false;
        s.manual_acks = true;
        s.keep_alive = Duration::from_secs(7);
        s.max_incoming_packet = 1 << 20;
        s.max_outgoing_packet = 8192;
        s.inflight = 6;
        s.request_capacity = 33;
        s.username = Some("u".into());
        s.password = Some("pw".into());
        s.will = Some(Will {
            topic: "t/status".into(),
            payload: b"bye".to_vec(),
            retain: true,
        });
        let o = s.options().unwrap();
        assert_eq!(o.client_id(), "c-1");
        assert_eq!(o.broker_address(), ("127.0.0.1".to_string(), 1999));
        assert!(!o.clean_session());
        assert!(o.manual_acks());
        assert_eq!(o.keep_alive(), Duration::from_secs(7));
        assert_eq!(o.max_packet_size(), 1 << 20);
        assert_eq!(o.inflight(), 6);
        assert_eq!(o.request_channel_capacity(), 33);
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("u", "pw")
        );
        let will = o.last_will().unwrap();
        assert_eq!(
            (will.topic.as_str(), &will.message[..]),
            ("t/status", &b"bye"[..])
        );
        assert_eq!(will.qos, QoS::AtLeastOnce);
        assert!(will.retain);
        // A user without a password logs in with an empty one.
        s.password = None;
        let o = s.options().unwrap();
        assert_eq!(o.credentials().unwrap().password, "");
        let (_client, el) = client(o);
        assert_eq!(el.mqtt_options.request_channel_capacity(), 33);
    }

    #[test]
    fn bad_settings_are_refused_before_rumqttc_sees_them() {
        let check = |s: Settings, code: &str| {
            let e = s.options().unwrap_err();
            assert_eq!(e.code(), code, "{e}");
            e.to_string()
        };
        for id in ["", " x", &"x".repeat(MAX_CLIENT_ID_LEN + 1)] {
            let mut s = settings("mqtt://h");
            s.client_id = id.to_string();
            s.clean_session = false;
            assert!(check(s, "client_id").contains("client id"));
        }
        let mut s = settings("mqtt://h");
        s.client_id = "x".repeat(MAX_CLIENT_ID_LEN);
        s.options().unwrap();
        let mut s = settings("mqtt://h");
        s.keep_alive = Duration::from_millis(999);
        assert!(check(s, "keep_alive").contains("keep alive"));
        let mut s = settings("mqtt://h");
        s.inflight = 0;
        check(s, "inflight");
        let mut s = settings("mqtt://h");
        s.password = Some("pw".into());
        assert!(check(s, "password_without_user").contains("no user name"));
        let mut s = settings("mqtt://h");
        s.tls.ca_file = Some("/x.pem".into());
        assert!(check(s, "tls_files_without_tls").contains("use mqtts://"));
        let mut s = settings("mqtts://h");
        s.tls.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(check(s, "tls_read").contains("cannot read the CA file /nonexistent/ca.pem"));
    }
}
