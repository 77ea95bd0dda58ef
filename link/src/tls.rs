//! TLS for `mqtts://`: one rustls client configuration on ring (no C
//! build, no aws-lc), from PEM files. The roots are a CA file or the
//! system's (rustls-native-certs: `SSL_CERT_FILE` / `SSL_CERT_DIR` when set,
//! else the platform's store); a client certificate and key add mutual TLS
//! (AWS IoT Core, port 8883: no ALPN is set, so AWS's port 443 is not
//! supported). Files are read once, when the options are built: a changed
//! certificate needs a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How errors name the files, in the words of the caller's settings
/// (`mqtt.ca_file` in the agent's configuration, "the CA file" for the
/// console's `--ca`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileNames {
    pub ca_file: &'static str,
    pub client_cert: &'static str,
    pub client_key: &'static str,
}

/// The PEM files of a TLS connection. All `None`: the system's roots, no
/// client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain, for mutual TLS; goes with `client_key`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub names: FileNames,
}

impl TlsFiles {
    /// No files: the system's roots, no client certificate.
    pub fn none(names: FileNames) -> TlsFiles {
        TlsFiles {
            ca_file: None,
            client_cert: None,
            client_key: None,
            names,
        }
    }

    /// Some file is set (which a plain `mqtt://` URL would ignore).
    pub fn any(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }
}

/// Why a TLS configuration could not be built. Each variant names the
/// file in the caller's words ([`FileNames`]).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {name} {}", path.display())]
    Read {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid PEM.
    #[error("{name} {}: invalid PEM", path.display())]
    Pem {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{name} {} holds no PEM certificate", path.display())]
    NoCertificate { name: &'static str, path: PathBuf },
    /// A CA certificate rustls does not accept as a trust anchor.
    #[error("{name} {}: invalid CA certificate", path.display())]
    InvalidCa {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// No CA file and no usable system roots.
    #[error(
        "no system CA certificates found for mqtts:// (install ca-certificates or set {ca_file}){}",
        detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
    )]
    NoSystemRoots {
        ca_file: &'static str,
        /// The first error met while loading them, if any.
        detail: Option<String>,
    },
    /// The key file holds no private key.
    #[error("{name} {} holds no private key", path.display())]
    NoKey { name: &'static str, path: PathBuf },
    /// A client certificate without a key or the reverse.
    #[error("{cert} and {key} go together")]
    HalfClientAuth {
        cert: &'static str,
        key: &'static str,
    },
    /// The client certificate and key do not match (or are unusable).
    #[error("{cert} and {key} do not make a usable pair")]
    ClientAuth {
        cert: &'static str,
        key: &'static str,
        #[source]
        source: rustls::Error,
    },
    /// rustls refused its own default protocol versions (cannot happen with ring).
    #[error("rustls refused its default protocol versions")]
    Protocols(#[source] rustls::Error),
}

impl TlsError {
    /// Stable identifier, for logs and telemetry.
    pub fn code(&self) -> &'static str {
        match self {
            TlsError::Read { .. } => "tls_read",
            TlsError::Pem { .. } => "tls_pem",
            TlsError::NoCertificate { .. } => "tls_no_certificate",
            TlsError::InvalidCa { .. } => "tls_invalid_ca",
            TlsError::NoSystemRoots { .. } => "tls_no_system_roots",
            TlsError::NoKey { .. } => "tls_no_key",
            TlsError::HalfClientAuth { .. } => "tls_half_client_auth",
            TlsError::ClientAuth { .. } => "tls_client_auth",
            TlsError::Protocols(_) => "tls_protocols",
        }
    }
}

/// A rustls client configuration on ring: the CA from `ca_file` (every
/// certificate in it must be valid) or the system's roots (the parsable
/// ones), and the client certificate for mutual TLS when set.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let names = files.names;
    let mut roots = RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            for cert in read_certs(path, names.ca_file)? {
                roots.add(cert).map_err(|source| TlsError::InvalidCa {
                    name: names.ca_file,
                    path: path.clone(),
                    source,
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::NoSystemRoots {
                    ca_file: names.ca_file,
                    detail: found.errors.first().map(|e| e.to_string()),
                });
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?
        .with_root_certificates(roots);
    match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, names.client_cert)?;
            let key = read_key(key, names.client_key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsError::ClientAuth {
                    cert: names.client_cert,
                    key: names.client_key,
                    source,
                })
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(TlsError::HalfClientAuth {
            cert: names.client_cert,
            key: names.client_key,
        }),
    }
}

fn read(path: &Path, name: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        name,
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path, name: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, name)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            name,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            name,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path, name: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path, name)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            name,
            path: path.to_path_buf(),
        },
        source => TlsError::Pem {
            name,
            path: path.to_path_buf(),
            source,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: FileNames = FileNames {
        ca_file: "mqtt.ca_file",
        client_cert: "mqtt.client_cert",
        client_key: "mqtt.client_key",
    };

    fn files() -> TlsFiles {
        TlsFiles::none(NAMES)
    }

    #[test]
    fn bad_files_are_named_in_the_callers_words() {
        let e = client_config(&TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..files()
        })
        .unwrap_err();
        assert_eq!(e.code(), "tls_read");
        assert!(
            e.to_string()
                .contains("cannot read mqtt.ca_file /nonexistent/ca.pem"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client_config(&TlsFiles {
            ca_file: Some(empty.clone()),
            ..files()
        })
        .unwrap_err();
        assert_eq!(e.code(), "tls_no_certificate");
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let e = client_config(&TlsFiles {
            ca_file: Some(broken),
            ..files()
        })
        .unwrap_err();
        assert_eq!(e.code(), "tls_pem");
        assert!(e.to_string().contains("invalid PEM"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = client_config(&TlsFiles {
            ca_file: Some(garbage),
            ..files()
        })
        .unwrap_err();
        assert_eq!(e.code(), "tls_invalid_ca");
        assert!(e.to_string().contains("invalid CA certificate"), "{e}");
        let e = client_config(&TlsFiles {
            client_cert: Some(empty.clone()),
            ..files()
        })
        .unwrap_err();
        assert_eq!(e.code(), "tls_half_client_auth");
        assert!(
            e.to_string()
                .contains("mqtt.client_cert and mqtt.client_key go together"),
            "{e}"
        );
        let e = client_config(&TlsFiles {
            client_key: Some(empty.clone()),
            ..files()
        })
        .unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
        let e = read_key(&empty, NAMES.client_key).unwrap_err();
        assert_eq!(e.code(), "tls_no_key");
        assert!(
            e.to_string().contains("mqtt.client_key") && e.to_string().contains("no private key"),
            "{e}"
        );
    }

    #[test]
    fn missing_system_roots_say_what_to_do() {
        let e = TlsError::NoSystemRoots {
            ca_file: "mqtt.ca_file",
            detail: None,
        };
        assert_eq!(
            e.to_string(),
            "no system CA certificates found for mqtts:// (install ca-certificates or set mqtt.ca_file)"
        );
        let e = TlsError::NoSystemRoots {
            ca_file: "mqtt.ca_file",
            detail: Some("no such file".into()),
        };
        assert!(
            e.to_string().ends_with("mqtt.ca_file): no such file"),
            "{e}"
        );
    }

    #[test]
    fn any_file_counts() {
        assert!(!files().any());
        for f in [
            TlsFiles {
                ca_file: Some("a".into()),
                ..files()
            },
            TlsFiles {
                client_cert: Some("a".into()),
                ..files()
            },
            TlsFiles {
                client_key: Some("a".into()),
                ..files()
            },
        ] {
            assert!(f.any());
        }
    }
}
