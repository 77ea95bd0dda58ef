//! Broker URLs: `mqtt://host[:port]` and `mqtts://host[:port]`. No I/O.

/// Where a broker is: the `mqtt://host[:port]` / `mqtts://host[:port]` URLs
/// the agent (`mqtt.url`) and the console (`--broker`) take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `mqtts://`: TLS (rustls on ring).
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

/// Why a broker URL was refused. Displays as the end of a sentence about
/// the URL ("... must start with mqtt:// or mqtts://"): callers name the
/// setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    /// Not `mqtt://` or `mqtts://`.
    #[error("must start with mqtt:// or mqtts://, got {0:?}")]
    Scheme(String),
    /// `user:password@` in the URL (credentials belong elsewhere).
    #[error("must not hold credentials")]
    Credentials,
    /// A path, query or fragment.
    #[error("takes a host and a port only (a host name or IPv4 address), got {0:?}")]
    NotHostPort(String),
    /// `[::1]`-style hosts.
    #[error("holds an IPv6 literal, which is not supported: use a host name (got {0:?})")]
    Ipv6(String),
    /// Not 1..=65535.
    #[error("has an invalid port: {0:?}")]
    Port(String),
    /// Nothing between the scheme and the port.
    #[error("has no host: {0:?}")]
    NoHost(String),
}

impl BrokerUrlError {
    /// Stable identifier, for logs and telemetry.
    pub fn code(&self) -> &'static str {
        match self {
            BrokerUrlError::Scheme(_) => "broker_url_scheme",
            BrokerUrlError::Credentials => "broker_url_credentials",
            BrokerUrlError::NotHostPort(_) => "broker_url_not_host_port",
            BrokerUrlError::Ipv6(_) => "broker_url_ipv6",
            BrokerUrlError::Port(_) => "broker_url_port",
            BrokerUrlError::NoHost(_) => "broker_url_no_host",
        }
    }
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]` (default ports
    /// 1883 and 8883; a trailing `/` is allowed). No credentials, paths or
    /// IPv6 literals.
    pub fn parse(url: &str) -> Result<BrokerUrl, BrokerUrlError> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(BrokerUrlError::Scheme(url.to_string()));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(BrokerUrlError::Credentials);
        }
        if rest.contains(['/', '?', '#']) {
            return Err(BrokerUrlError::NotHostPort(url.to_string()));
        }
        if rest.starts_with('[') {
            return Err(BrokerUrlError::Ipv6(url.to_string()));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| BrokerUrlError::Port(url.to_string()))?;
                (host, port)
            }
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(BrokerUrlError::NoHost(url.to_string()));
        }
        Ok(BrokerUrl {
            tls,
            host: host.to_string(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(url: &str) -> (bool, String, u16) {
        let u = BrokerUrl::parse(url).unwrap();
        (u.tls, u.host, u.port)
    }

    #[test]
    fn urls_parse_with_default_ports() {
        assert_eq!(
            parts("mqtt://broker.local"),
            (false, "broker.local".into(), 1883)
        );
        assert_eq!(
            parts("mqtts://a.iot.eu-west-1.amazonaws.com:8883/"),
            (true, "a.iot.eu-west-1.amazonaws.com".into(), 8883)
        );
        assert_eq!(
            parts("mqtts://10.0.0.1:8884/"),
            (true, "10.0.0.1".into(), 8884)
        );
        assert_eq!(parts("mqtts://10.0.0.1").2, 8883);
        assert_eq!(parts("mqtts://h").2, 8883);
        assert_eq!(parts("mqtt://h:65535").2, 65535);
    }

    #[test]
    fn bad_urls_say_why() {
        use BrokerUrlError as E;
        for (bad, error, says) in [
            ("tcp://x", E::Scheme("tcp://x".into()), "mqtt://"),
            ("mqtt://u:p@x", E::Credentials, "credentials"),
            ("mqtt://x:0", E::Port("mqtt://x:0".into()), "port"),
            ("mqtt://x:99999", E::Port("mqtt://x:99999".into()), "port"),
            ("mqtt://x:", E::Port("mqtt://x:".into()), "port"),
            (
                "mqtt://x/path",
                E::NotHostPort("mqtt://x/path".into()),
                "host and a port",
            ),
            (
                "mqtt://x/path",
                E::NotHostPort("mqtt://x/path".into()),
                "host name",
            ),
            (
                "mqtt://x?q",
                E::NotHostPort("mqtt://x?q".into()),
                "port only",
            ),
            ("mqtt://:1883", E::NoHost("mqtt://:1883".into()), "no host"),
            ("mqtt://", E::NoHost("mqtt://".into()), "no host"),
            (
                "mqtt://[::1]:1883",
                E::Ipv6("mqtt://[::1]:1883".into()),
                "IPv6",
            ),
            (
                "mqtt://[::1]:1883",
                E::Ipv6("mqtt://[::1]:1883".into()),
                "host name",
            ),
        ] {
            let e = BrokerUrl::parse(bad).unwrap_err();
            assert_eq!(e, error, "{bad}");
            assert!(e.to_string().contains(says), "{bad}: {e}");
            assert!(e.code().starts_with("broker_url_"), "{bad}");
        }
    }

    #[test]
    fn codes_are_distinct() {
        let codes: std::collections::BTreeSet<_> = [
            BrokerUrlError::Scheme(String::new()),
            BrokerUrlError::Credentials,
            BrokerUrlError::NotHostPort(String::new()),
            BrokerUrlError::Ipv6(String::new()),
            BrokerUrlError::Port(String::new()),
            BrokerUrlError::NoHost(String::new()),
        ]
        .iter()
        .map(BrokerUrlError::code)
        .collect();
        assert_eq!(codes.len(), 6);
    }
}
