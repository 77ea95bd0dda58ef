//! `ferry publish`: put a bundle on an update channel (a directory served
//! over HTTP(S) or read directly by `ferry-agent`) and point the channel's
//! `index.json` at it. The index format is `ferry_protocol::ChannelIndex`
//! (docs/mqtt-protocol.md, "Update channels").

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_protocol::{ChannelIndex, IndexEntry, SCHEMA_VERSION};

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
        let index = ChannelIndex {
            schema: SCHEMA_VERSION,
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
