//! `ferry publish`: put a bundle on an update channel (a directory served
//! over HTTP(S) or read directly by `ferry-agent`) and point the channel's
//! `index.json` at it. The index format is `ferry_protocol::ChannelIndex`
//! (docs/mqtt-protocol.md, "Update channels").

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_protocol::{CHANNEL_PAYLOAD_TYPE, ChannelIndex, IndexEntry, SCHEMA_VERSION};

use crate::{TrustArgs, exit, fail, verified};

/// Largest index.json read back: the format is a few hundred bytes.
const MAX_INDEX_BYTES: u64 = 64 * 1024;

#[derive(Args)]
pub struct PublishArgs {
    /// The bundle to publish.
    bundle: PathBuf,
    /// The channel directory (created if missing): receives the bundle and index.json.
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
    /// Publish even if the channel's current bundle has a higher or equal
    /// sequence (devices refuse it anyway unless an operator signs a rollback).
    #[arg(long)]
    force: bool,
    /// Print the index written as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Sign the index as channel metadata with this key (the root's
    /// `channel` role): devices whose root has that role refuse unsigned or
    /// expired indexes. Repeatable (threshold).
    #[arg(long = "channel-key", value_name = "KEY")]
    channel_keys: Vec<PathBuf>,
    /// How long signed metadata stays valid (`90m`, `12h`, `7d`): devices
    /// refuse it afterwards (`metadata_expired`) until it is published again.
    #[arg(long, default_value = "7d", value_parser = parse_duration_ms)]
    expires: u64,
}

/// `90s`, `30m`, `12h`, `7d` → milliseconds.
fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d)"))?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(ms)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?}: out of range"))
}

impl PublishArgs {
    pub fn run(self) -> Result<()> {
        // Devices verify against their keys; publishing what they would
        // refuse is a mistake worth catching here.
        let bundle = verified(&self.bundle, &self.trust)?;
        let m = bundle.manifest();
        std::fs::create_dir_all(&self.to)
            .with_context(|| format!("cannot create {}", self.to.display()))?;
        let index_path = self.to.join("index.json");
        if let Some(current) = read_index(&index_path)? {
            if current.fleet != m.release.fleet || current.channel != m.release.channel {
                bail!(
                    "{} is the channel {}/{}; the bundle is for {}/{}",
                    self.to.display(),
                    current.fleet,
                    current.channel,
                    m.release.fleet,
                    m.release.channel
                );
            }
            if current.latest.sequence >= m.release.sequence
                && current.latest.digest != bundle.digest()
                && !self.force
            {
                return Err(fail(
                    exit::REJECTED,
                    anyhow::anyhow!(
                        "the channel already has sequence {} ({} {}); this bundle has sequence {} (use --force to publish anyway)",
                        current.latest.sequence,
                        current.latest.name,
                        current.latest.version,
                        m.release.sequence
                    ),
                ));
            }
        }
        let file_name = format!(
            "{}-{}-{}.ferry",
            sanitize(&m.name),
            sanitize(&m.version),
            m.release.sequence
        );
        let bytes = std::fs::read(&self.bundle)
            .with_context(|| format!("cannot read {}", self.bundle.display()))?;
        let target = self.to.join(&file_name);
        ferry_host::write_durably(&target, &bytes)?;
        let signed = !self.channel_keys.is_empty();
        let now_ms = ferry_host::now_ms();
        let previous_version = read_index(&index_path)?.map(|i| i.version).unwrap_or(0);
        let index = ChannelIndex {
            schema: SCHEMA_VERSION,
            // Versions only grow: a device refuses an older one.
            version: if signed { previous_version + 1 } else { 0 },
            issued_ms: if signed { now_ms } else { 0 },
            expires_ms: if signed {
                now_ms.saturating_add(self.expires)
            } else {
                0
            },
            fleet: m.release.fleet.clone(),
            channel: m.release.channel.clone(),
            latest: IndexEntry {
                name: m.name.clone(),
                version: m.version.clone(),
                sequence: m.release.sequence,
                digest: bundle.digest().to_string(),
                size: bytes.len() as u64,
                url: file_name,
                release: bundle.release_id().to_string(),
            },
        };
        let mut text = serde_json::to_vec_pretty(&index).expect("indexes serialise");
        text.push(b'\n');
        if signed {
            let mut envelope = ferry_format::Envelope::new(CHANNEL_PAYLOAD_TYPE, &text);
            for k in &self.channel_keys {
                envelope.sign(&crate::keyfile::read_secret_key(k)?)?;
            }
            text = envelope.to_json();
        }
        // The bundle is in place before the index names it: a device never
        // sees an index pointing at a missing file.
        ferry_host::write_durably(&index_path, &text)?;
        if self.json {
            println!(
                "{}",
                serde_json::to_string(&index).expect("indexes serialise")
            );
        } else {
            eprintln!(
                "published {} {} (sequence {}) to {}",
                m.name,
                m.version,
                m.release.sequence,
                index_path.display()
            );
        }
        Ok(())
    }
}

fn read_index(path: &Path) -> Result<Option<ChannelIndex>> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut text = Vec::new();
    file.take(MAX_INDEX_BYTES)
        .read_to_end(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    // Signed metadata: the index is the envelope's payload (this reads the
    // channel's own files; devices verify the signatures).
    if let Ok(envelope) = ferry_format::Envelope::from_json(&text) {
        text = envelope.payload_unverified()?;
    }
    let index: ChannelIndex = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a channel index", path.display()))?;
    Ok(Some(index))
}

/// File-name-safe: letters, digits, '.', '-', '_' (others become '_').
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
