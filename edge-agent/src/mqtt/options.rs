//! Connection options from the configuration: the broker URL, credentials,
//! TLS (rustls with ring), packet limits and the last will. Read once at
//! start; a changed certificate needs a restart.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_protocol::{BrokerUrl, BrokerUrlError, Status, Topic, topic};
use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Identity;
use crate::config::MqttConfig;

/// Added to `max_message_bytes` for the packet limit each way: fixed
/// header, packet id and topic (at most ~290 bytes with the longest fleet
/// and device names). Generous so the limit that bites is always ours.
pub const PACKET_HEADROOM: usize = 4096;

/// Parses `mqtt.url` (see [`BrokerUrl::parse`]).
pub(crate) fn parse_url(url: &str) -> Result<BrokerUrl> {
    BrokerUrl::parse(url).map_err(|e| match e {
        BrokerUrlError::Credentials => {
            anyhow::anyhow!("mqtt.url {e}: use mqtt.username and mqtt.password_env")
        }
        e => anyhow::anyhow!("mqtt.url {e}"),
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
    let mut options = MqttOptions::new(identity.device.clone(), url.host.clone(), url.port);
    // The broker keeps the session (subscriptions, queued commands) across
    // reconnects; see the module header for what that means for PUBACKs.
    options.set_clean_session(false);
    let keep_alive = config.keep_alive_s.min(u64::from(u16::MAX));
    if keep_alive == 0 {
        bail!(
            "mqtt.keep_alive_s must be at least 1: without pings a dead connection goes unnoticed"
        );
    }
    options.set_keep_alive(Duration::from_secs(keep_alive));
    let packet = config.max_message_bytes + PACKET_HEADROOM;
    options.set_max_packet_size(packet, packet);
    // rumqttc's own window is ours plus room for status messages (at most
    // one in flight, plus the offline status at shutdown), so its flow
    // control never holds back a batch we counted as sent.
    options.set_inflight(config.max_inflight.max(1).saturating_add(2));
    options.set_request_channel_capacity(usize::from(config.max_inflight) + 8);
    match (&config.username, password) {
        (Some(user), password) => {
            options.set_credentials(user.clone(), password.unwrap_or_default());
        }
        (None, Some(_)) => bail!("mqtt.password_env is set but mqtt.username is not"),
        (None, None) => {}
    }
    let will = Status::offline(&identity.fleet, &identity.device, &identity.agent_version);
    options.set_last_will(LastWill::new(
        topic(&identity.fleet, &identity.device, Topic::Status),
        serde_json::to_vec(&will).expect("status serialises"),
        QoS::AtLeastOnce,
        true,
    ));
    if url.tls {
        let tls = tls_config(config)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    } else if config.ca_file.is_some() || config.client_cert.is_some() {
        bail!(
            "mqtt.ca_file / mqtt.client_cert are set but mqtt.url is plain mqtt://; use mqtts://"
        );
    }
    Ok(options)
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

/// A rustls client configuration on ring: the CA from `ca_file` or the
/// system's roots, and the client certificate for mutual TLS when set.
pub(crate) fn tls_config(config: &MqttConfig) -> Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let certs = read_certs(path, "mqtt.ca_file")?;
            for cert in certs {
                roots.add(cert).with_context(|| {
                    format!("mqtt.ca_file {}: invalid CA certificate", path.display())
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!(
                    "no system CA certificates found for mqtts:// (install ca-certificates or set mqtt.ca_file){}",
                    found
                        .errors
                        .first()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls refused its default protocol versions")?
        .with_root_certificates(roots);
    let tls = match (&config.client_cert, &config.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "mqtt.client_cert")?;
            let key = read_key(key)?;
            builder
                .with_client_auth_cert(chain, key)
                .context("mqtt.client_cert and mqtt.client_key do not make a usable pair")?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("mqtt.client_cert and mqtt.client_key go together"),
    };
    Ok(tls)
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what} {}: invalid PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read mqtt.client_key {}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(pem.as_slice()))
        .with_context(|| format!("mqtt.client_key {}: invalid PEM", path.display()))?
        .with_context(|| format!("mqtt.client_key {} holds no private key", path.display()))
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
    fn urls() {
        let u = parse_url("mqtt://broker.local").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (false, "broker.local", 1883)
        );
        let u = parse_url("mqtts://a.iot.eu-west-1.amazonaws.com:8883/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "a.iot.eu-west-1.amazonaws.com", 8883)
        );
        assert_eq!(parse_url("mqtts://10.0.0.1").unwrap().port, 8883);
        for (bad, says) in [
            ("tcp://x", "mqtt://"),
            ("mqtt://u:p@x", "credentials"),
            ("mqtt://x:0", "port"),
            ("mqtt://x:99999", "port"),
            ("mqtt://x/path", "host and a port"),
            ("mqtt://:1883", "no host"),
            ("mqtt://[::1]:1883", "IPv6"),
        ] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
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
        assert_eq!(o.keep_alive(), Duration::from_secs(7));
        assert_eq!(o.max_packet_size(), 8192 + PACKET_HEADROOM);
        assert_eq!(o.inflight(), 6);
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
