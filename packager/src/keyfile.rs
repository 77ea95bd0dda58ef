//! Key files: `<prefix>.key` (PKCS#8 PEM, mode 0600) and `<prefix>.pub`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use ferry_runtime::{PublicKey, SecretKey};

/// Writes a key pair; refuses to overwrite unless `force`.
pub fn write_key_pair(prefix: &Path, key: &SecretKey, force: bool) -> Result<(PathBuf, PathBuf)> {
    let key_path = with_suffix(prefix, "key");
    let pub_path = with_suffix(prefix, "pub");
    if let Some(dir) = key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    for p in [&key_path, &pub_path] {
        if p.exists() && !force {
            bail!(
                "{} already exists: pass --force to overwrite it",
                p.display()
            );
        }
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(&key_path)
        .with_context(|| format!("cannot write {}", key_path.display()))?;
    #[cfg(unix)]
    {
        // `mode` applies only when the file is created: tighten an existing one.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(key.to_pem().as_bytes())?;
    f.sync_all()?;
    std::fs::write(&pub_path, key.public().to_pem())
        .with_context(|| format!("cannot write {}", pub_path.display()))?;
    Ok((key_path, pub_path))
}

fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Reads a private key from a file.
pub fn read_secret_key(path: &Path) -> Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key {}", path.display()))?;
    SecretKey::from_pem(&text).with_context(|| format!("{} is not a signing key", path.display()))
}

/// Reads a private key from an environment variable holding the PEM text,
/// or the PEM text in base64 (CI secret stores often want one line).
pub fn read_secret_key_env(name: &str) -> Result<SecretKey> {
    let value =
        std::env::var(name).with_context(|| format!("environment variable {name} is not set"))?;
    let text = if value.contains("-----BEGIN") {
        value
    } else {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .with_context(|| format!("{name} holds neither a PEM key nor base64 of one"))?;
        String::from_utf8(decoded).with_context(|| format!("{name}: decoded base64 is not text"))?
    };
    SecretKey::from_pem(&text).with_context(|| format!("{name} does not hold a signing key"))
}

/// Reads every public key of a PEM file.
pub fn read_public_keys(path: &Path) -> Result<Vec<PublicKey>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read public key {}", path.display()))?;
    PublicKey::all_from_pem(&text)
        .with_context(|| format!("{} is not a public key file", path.display()))
}
