//! Connection settings from the configuration: the broker URL, credentials,
//! TLS files, packet limits and the last will, in `ferry-link`'s
//! [`Settings`]; errors name the configuration's keys. Read once at start;
//! a changed certificate needs a restart.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use ferry_link::{
    BrokerUrl, BrokerUrlError, FileNames, MqttOptions, Settings, SettingsError, TlsFiles, Will,
};
use ferry_protocol::{Status, Topic, topic};

use super::Identity;
use crate::config::MqttConfig;

/// Added to `max_message_bytes` for the packet limit each way: fixed
/// header, packet id and topic (at most ~290 bytes with the longest fleet
/// and device names). Generous so the limit that bites is always ours.
pub use ferry_link::PACKET_HEADROOM;

/// How TLS errors name the files: the configuration's keys.
const FILE_NAMES: FileNames = FileNames {
    ca_file: "mqtt.ca_file",
    client_cert: "mqtt.client_cert",
    client_key: "mqtt.client_key",
};

/// Parses `mqtt.url` (see [`BrokerUrl::parse`]).
pub(crate) fn parse_url(url: &str) -> Result<BrokerUrl> {
    BrokerUrl::parse(url).map_err(|e| match e {
        BrokerUrlError::Credentials => {
            anyhow!("mqtt.url {e}: use mqtt.username and mqtt.password_env")
        }
        e => anyhow!("mqtt.url {e}"),
    })
}

/// Everything rumqttc needs to connect, checked: clear errors here instead
/// of a reconnect loop later.
pub(crate) fn mqtt_options(
    config: &MqttConfig,
    identity: &Identity,
    password: Option<String>,
) -> Result<MqttOptions> {
    let url = parse_url(&config.url)?;
    let keep_alive = config.keep_alive_s.min(u64::from(u16::MAX));
    if keep_alive == 0 {
        bail!(
            "mqtt.keep_alive_s must be at least 1: without pings a dead connection goes unnoticed"
        );
    }
    let tls = TlsFiles {
        ca_file: config.ca_file.clone(),
        client_cert: config.client_cert.clone(),
        client_key: config.client_key.clone(),
        names: FILE_NAMES,
    };
    let mut s = Settings::new(url, identity.device.clone(), tls);
    // The broker keeps the session (subscriptions, queued commands) across
    // reconnects; see the module header for what that means for PUBACKs.
    s.clean_session = false;
    s.keep_alive = Duration::from_secs(keep_alive);
    let packet = config.max_message_bytes + PACKET_HEADROOM;
    s.max_incoming_packet = packet;
    s.max_outgoing_packet = packet;
    // rumqttc's own window is ours plus room for status messages (at most
    // one in flight, plus the offline status at shutdown), so its flow
    // control never holds back a batch we counted as sent.
    s.inflight = config.max_inflight.max(1).saturating_add(2);
    s.request_capacity = usize::from(config.max_inflight) + 8;
    s.username = config.username.clone();
    s.password = password;
    let will = Status::offline(&identity.fleet, &identity.device, &identity.agent_version);
    s.will = Some(Will {
        topic: topic(&identity.fleet, &identity.device, Topic::Status),
        payload: serde_json::to_vec(&will).expect("status serialises"),
        retain: true,
    });
    s.options().map_err(|e| match e {
        SettingsError::PasswordWithoutUser => {
            anyhow!("mqtt.password_env is set but mqtt.username is not")
        }
        SettingsError::TlsFilesWithoutTls => anyhow!(
            "mqtt.ca_file / mqtt.client_cert are set but mqtt.url is plain mqtt://; use mqtts://"
        ),
        e => anyhow::Error::new(e),
    })
}

/// Reads the password from the environment variable `password_env` names.
pub(crate) fn password(config: &MqttConfig) -> Result<Option<String>> {
    let Some(var) = &config.password_env else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(p) => Ok(Some(p)),
        Err(std::env::VarError::NotPresent) => {
            bail!("mqtt.password_env names {var}, which is not set in the environment")
        }
        Err(std::env::VarError::NotUnicode(_)) => bail!("environment variable {var} is not UTF-8"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            device: "dev-1".into(),
            fleet: "plant".into(),
            agent_version: "0.1.0".into(),
        }
    }

    #[test]
    fn url_errors_name_the_setting() {
        // The parser's cases are tested in ferry-link; here: the wording.
        let u = parse_url("mqtts://a.iot.eu-west-1.amazonaws.com:8883/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "a.iot.eu-west-1.amazonaws.com", 8883)
        );
        let e = parse_url("tcp://x").unwrap_err().to_string();
        assert!(e.starts_with("mqtt.url must start with mqtt://"), "{e}");
        let e = parse_url("mqtt://u:p@x").unwrap_err().to_string();
        assert!(
            e.contains("credentials") && e.contains("mqtt.username and mqtt.password_env"),
            "{e}"
        );
    }

    #[test]
    fn options_follow_the_config() {
        let config = MqttConfig {
            url: "mqtt://127.0.0.1:1999".into(),
            username: Some("dev-1".into()),
            max_message_bytes: 8192,
            max_inflight: 4,
            keep_alive_s: 7,
            ..MqttConfig::default()
        };
        let o = mqtt_options(&config, &identity(), Some("pw".into())).unwrap();
        assert_eq!(o.client_id(), "dev-1");
        assert!(!o.clean_session());
        assert!(!o.manual_acks());
        assert_eq!(o.keep_alive(), Duration::from_secs(7));
        assert_eq!(o.max_packet_size(), 8192 + PACKET_HEADROOM);
        assert_eq!(o.inflight(), 6);
        assert_eq!(o.request_channel_capacity(), 12);
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("dev-1", "pw")
        );
        let will = o.last_will().unwrap();
        assert_eq!(will.topic, "ferry/v1/plant/dev-1/status");
        assert!(will.retain);
        let status: Status = serde_json::from_slice(&will.message).unwrap();
        assert!(!status.online);
    }

    #[test]
    fn misconfigurations_say_what_is_wrong() {
        let err = |config: MqttConfig| {
            mqtt_options(&config, &identity(), None)
                .unwrap_err()
                .to_string()
        };
        let base = MqttConfig {
            url: "mqtts://localhost".into(),
            ..MqttConfig::default()
        };
        let e = err(MqttConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..base.clone()
        });
        assert!(
            e.contains("cannot read mqtt.ca_file /nonexistent/ca.pem"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = err(MqttConfig {
            ca_file: Some(empty.clone()),
            ..base.clone()
        });
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = err(MqttConfig {
            client_cert: Some(empty.clone()),
            ..base.clone()
        });
        assert!(e.contains("go together"), "{e}");
        let e = err(MqttConfig {
            url: "mqtt://localhost".into(),
            ca_file: Some(empty),
            ..MqttConfig::default()
        });
        assert!(e.contains("use mqtts://"), "{e}");
        let e = err(MqttConfig {
            keep_alive_s: 0,
            ..base.clone()
        });
        assert!(e.contains("keep_alive_s"), "{e}");
        let e = mqtt_options(&base, &identity(), Some("pw".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.username"), "{e}");
        let e = password(&MqttConfig {
            password_env: Some("FERRY_TEST_SURELY_UNSET_PASSWORD".into()),
            ..MqttConfig::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("FERRY_TEST_SURELY_UNSET_PASSWORD, which is not set"),
            "{e}"
        );
        // PATH is set wherever tests run: the success path without set_var.
        let from_path = MqttConfig {
            password_env: Some("PATH".into()),
            ..MqttConfig::default()
        };
        assert_eq!(password(&from_path).unwrap(), std::env::var("PATH").ok());
        assert_eq!(password(&MqttConfig::default()).unwrap(), None);
    }
}
