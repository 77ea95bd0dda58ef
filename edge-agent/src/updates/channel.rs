//! Update channels: where the agent finds the latest bundle of its channel
//! (`index.json`, a [`ChannelIndex`]) and how it downloads it into staging.
//!
//! A channel is an HTTP(S) URL of an index, or a local directory holding
//! `index.json` (a USB stick, a mounted share, a test). Nothing fetched here
//! is trusted: the index only says what to download, and the bundle's own
//! signature is checked afterwards ([`super::check_candidate`]). What this
//! module guarantees is narrower: it never holds more than a bounded number of
//! bytes from the network, and a file it returns has the SHA-256 it was asked
//! for.
//!
//! # Downloads
//! A download streams into `staging/<digest>.part`. When that file exists
//! (an earlier attempt broke), the download resumes with `Range:
//! bytes=<len>-`: a `206` appends, a `200` (the server ignores ranges) starts
//! over, a `416` (nothing left past `len`: the part is stale) starts over. The
//! size limit is enforced on the bytes that actually arrive, never on
//! `Content-Length` alone. Once complete, the file's SHA-256 is compared with
//! the expected digest (a mismatch deletes the part), the file is fsynced and
//! renamed to `staging/<digest>.ferry`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_protocol::{ChannelIndex, SCHEMA_VERSION};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::error::UpdateError;
use super::{check_digest, sync_dir};

/// Largest `index.json` read. Real indexes are a few hundred bytes; 64 KiB
/// bounds what a hostile or broken server can make the agent buffer.
pub const MAX_INDEX_BYTES: u64 = 64 * 1024;

/// Time to establish a connection (DNS included). Generous for cellular links.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest silence on an open connection before it counts as broken. A stall
/// this long ends the attempt; the bytes received are kept for resuming.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes read per chunk while streaming a download.
const CHUNK: usize = 64 * 1024;

/// Slowest transfer accepted, averaged over [`MIN_RATE_WINDOW`]: a server
/// that trickles bytes (one every few seconds never trips
/// [`READ_TIMEOUT`]) would otherwise hold the update worker for days. 1 KiB/s
/// is below any working link a device uses (2G EDGE manages ~20 KiB/s).
pub const MIN_RATE_BYTES_PER_S: u64 = 1024;

/// The window the minimum rate is averaged over: long enough for a slow
/// start or a short radio stall, short enough that an attacker holds the
/// worker for seconds, not hours. The attempt ends resumable.
pub const MIN_RATE_WINDOW: Duration = Duration::from_secs(30);

/// Longest one download attempt may take (the default of
/// `updates.max_download_s`): a server that keeps just above the minimum rate
/// still cannot hold the update worker for longer.
pub const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(3600);

/// Where updates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The URL of `index.json` on an HTTP(S) server.
    Http(String),
    /// A directory holding `index.json` and the bundles.
    Dir(PathBuf),
}

impl Source {
    /// `http://...` or `https://...` (the URL of the index), or a directory.
    /// A URL ending in `/` names a directory on the server: `index.json` is
    /// appended.
    pub fn parse(s: &str) -> Result<Source, UpdateError> {
        let bad = |reason: &str| UpdateError::BadSource {
            source_text: s.to_string(),
            reason: reason.to_string(),
        };
        let s = s.trim();
        if s.is_empty() {
            return Err(bad("empty"));
        }
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let (_, rest) = s.split_once("://").expect("checked above");
            if rest.is_empty() || rest.starts_with('/') {
                return Err(bad("the URL has no host"));
            }
            let url = if s.ends_with('/') {
                format!("{s}index.json")
            } else {
                s.to_string()
            };
            return Ok(Source::Http(url));
        }
        if s.contains("://") {
            return Err(bad(
                "only http://, https:// or a directory path are supported",
            ));
        }
        Ok(Source::Dir(PathBuf::from(s)))
    }

    /// Where the index is, for messages.
    pub fn index_location(&self) -> String {
        match self {
            Source::Http(url) => url.clone(),
            Source::Dir(dir) => dir.join("index.json").display().to_string(),
        }
    }

    /// Resolves an index entry's `url` against the index's location: an
    /// absolute URL stays, a path is joined to the index's directory (or, on
    /// a server, to its URL, `/path` meaning the server's root).
    pub fn resolve(&self, url: &str) -> String {
        if is_http(url) {
            return url.to_string();
        }
        match self {
            Source::Dir(dir) => {
                let path = url.strip_prefix("file://").unwrap_or(url);
                dir.join(path).display().to_string()
            }
            Source::Http(index) => resolve_url(index, url),
        }
    }
}

/// Whether a directory channel's `url` names a file inside the channel
/// directory: a relative path of plain components, at least one of them a
/// name (no root, no `..`, not `.` alone, no scheme such as `file://` or
/// `https://`). A directory index never sends
/// the device anywhere else.
fn is_inside_channel(url: &str) -> bool {
    use std::path::Component;
    let path = Path::new(url);
    !url.contains("://")
        && path.components().any(|c| matches!(c, Component::Normal(_)))
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// At most `limit + 1` bytes of a file: one more than allowed tells the
/// caller it is too large without reading it all.
fn read_capped(file: File, path: &Path, limit: u64) -> Result<Vec<u8>, UpdateError> {
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| UpdateError::io("read", path, e))?;
    Ok(bytes)
}

/// `scheme://authority` of a URL, lowercased.
fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    format!("{}://{}", scheme, &rest[..end]).to_ascii_lowercase()
}

fn is_http(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// RFC 3986 reference resolution, for the only two shapes an index holds:
/// `/absolute/path` and `relative/path` (query and fragment of the base dropped).
fn resolve_url(base: &str, reference: &str) -> String {
    let base = base.split(['?', '#']).next().unwrap_or(base);
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let origin = format!("{scheme}://{}", &rest[..authority_end]);
    if reference.starts_with('/') {
        return format!("{origin}{reference}");
    }
    let path = &rest[authority_end..];
    let dir = match path.rfind('/') {
        Some(i) => &path[..=i],
        None => "/",
    };
    format!("{origin}{dir}{reference}")
}

/// Fetches indexes and bundles. Holds one HTTP agent (connection pool,
/// timeouts, TLS roots); cheap to share, blocking: call it from a blocking
/// thread.
#[derive(Debug, Clone)]
pub struct Fetcher {
    agent: ureq::Agent,
    /// Slowest accepted transfer: bytes per second over a window.
    min_rate: (u64, Duration),
    /// Longest a single download attempt may take, whatever its rate.
    deadline: Duration,
    /// Set to stop a download in progress at its next chunk (a rollback
    /// or SIGTERM pre-empts it); what arrived stays for a resumed attempt.
    cancel: Arc<AtomicBool>,
}

impl Fetcher {
    /// A fetcher trusting the public web roots, or only the CA(s) of
    /// `ca_file` when given (a channel behind a private CA: its server is
    /// certified by that CA, and nothing else needs to be trusted for it).
    pub fn new(ca_file: Option<&Path>) -> Result<Fetcher, UpdateError> {
        Fetcher::with_timeouts(ca_file, CONNECT_TIMEOUT, READ_TIMEOUT)
    }

    /// As [`Fetcher::new`] with other timeouts (tests use short ones).
    pub fn with_timeouts(
        ca_file: Option<&Path>,
        connect: Duration,
        read: Duration,
    ) -> Result<Fetcher, UpdateError> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = ca_file {
            let bad = |reason: String| UpdateError::BadCa {
                path: path.to_path_buf(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let certs = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no `BEGIN CERTIFICATE` block found".into()));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            // Statuses are handled here (206, 416, ...), not turned into errors.
            .http_status_as_error(false)
            .timeout_connect(Some(connect))
            .timeout_recv_response(Some(read))
            .timeout_per_read(Some(read))
            .user_agent(concat!("ferry-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Fetcher {
            agent,
            min_rate: (MIN_RATE_BYTES_PER_S, MIN_RATE_WINDOW),
            deadline: DOWNLOAD_DEADLINE,
            cancel: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The same fetcher with another overall deadline per download attempt.
    pub fn with_deadline(mut self, deadline: Duration) -> Fetcher {
        self.deadline = deadline;
        self
    }

    /// The flag that stops downloads in progress (shared by clones).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// The same fetcher with another minimum transfer rate (tests use a
    /// short window).
    pub fn with_min_rate(mut self, bytes_per_s: u64, window: Duration) -> Fetcher {
        self.min_rate = (bytes_per_s, window);
        self
    }

    /// A fetcher configured from `[updates]`.
    pub fn from_config(config: &crate::config::UpdatesConfig) -> Result<Fetcher, UpdateError> {
        Ok(Fetcher::new(config.ca_file.as_deref())?
            .with_deadline(Duration::from_secs(config.max_download_s)))
    }

    /// Reads and checks a channel's index (at most [`MAX_INDEX_BYTES`]).
    /// `latest.url` comes back resolved: an absolute URL or path that
    /// [`Fetcher::download`] takes as is.
    pub fn fetch_index(&self, source: &Source) -> Result<ChannelIndex, UpdateError> {
        let bytes = self.fetch_index_bytes(source)?;
        parse_index(source, &bytes)
    }

    /// The index file's bytes (at most [`MAX_INDEX_BYTES`]), not parsed:
    /// signed channel metadata is opened before [`parse_index`] reads it.
    pub fn fetch_index_bytes(&self, source: &Source) -> Result<Vec<u8>, UpdateError> {
        let location = source.index_location();
        let bytes = match source {
            Source::Http(url) => self.get_small(url, MAX_INDEX_BYTES)?,
            Source::Dir(dir) => {
                let path = dir.join("index.json");
                let file = File::open(&path).map_err(|e| UpdateError::io("open", &path, e))?;
                read_capped(file, &path, MAX_INDEX_BYTES)?
            }
        };
        if bytes.len() as u64 > MAX_INDEX_BYTES {
            return Err(UpdateError::BadIndex {
                location,
                reason: format!("larger than {MAX_INDEX_BYTES} bytes"),
            });
        }
        Ok(bytes)
    }

    /// A small file beside the index (`root/2.json`), at most `limit` bytes;
    /// `None` when the channel does not have it (HTTP 404, no such file).
    pub fn fetch_beside(
        &self,
        source: &Source,
        relative: &str,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, UpdateError> {
        let bytes = match source {
            Source::Http(index) => {
                let url = resolve_url(index, relative);
                match self.get_small(&url, limit) {
                    Ok(b) => b,
                    Err(UpdateError::HttpStatus { status: 404, .. }) => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
            Source::Dir(dir) => {
                let path = dir.join(relative);
                match File::open(&path) {
                    Ok(file) => read_capped(file, &path, limit)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(UpdateError::io("open", &path, e)),
                }
            }
        };
        if bytes.len() as u64 > limit {
            return Err(UpdateError::BadIndex {
                location: relative.to_string(),
                reason: format!("larger than {limit} bytes"),
            });
        }
        Ok(Some(bytes))
    }
}

/// Parses and checks an index's JSON (the payload of signed channel
/// metadata, or a plain index): schema, digest, and where `latest.url` may
/// point (inside a directory channel; on an HTTP channel, the index's own
/// origin: a channel never sends the device to another host). The URL comes
/// back resolved against the index's location.
pub fn parse_index(source: &Source, bytes: &[u8]) -> Result<ChannelIndex, UpdateError> {
    let location = source.index_location();
    let bad = |reason: String| UpdateError::BadIndex {
        location: location.clone(),
        reason,
    };
    // The schema first, so a future index says "schema 2" rather than
    // failing on a field it renamed.
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    match value.get("schema").and_then(|s| s.as_u64()) {
        Some(s) if s == u64::from(SCHEMA_VERSION) => {}
        Some(s) => {
            return Err(bad(format!(
                "schema {s}; this agent reads {SCHEMA_VERSION}"
            )));
        }
        None => return Err(bad("no numeric `schema` field".into())),
    }
    let mut index: ChannelIndex = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    check_digest(&index.latest.digest).map_err(|e| bad(e.to_string()))?;
    if index.latest.url.trim().is_empty() {
        return Err(bad("`latest.url` is empty".into()));
    }
    if let Source::Dir(_) = source
        && !is_inside_channel(&index.latest.url)
    {
        return Err(bad(format!(
            "`latest.url` {:?} is not a file in the channel directory (a relative path \
                 without `..`; what `ferry publish` writes)",
            index.latest.url
        )));
    }
    let resolved = source.resolve(&index.latest.url);
    if let Source::Http(url) = source
        && origin(&resolved) != origin(url)
    {
        return Err(bad(format!(
            "`latest.url` {resolved:?} is not on the channel's origin {:?}",
            origin(url)
        )));
    }
    index.latest.url = resolved;
    debug!(
        index = %location,
        version = %index.latest.version,
        sequence = index.latest.sequence,
        "Fetched channel index"
    );
    Ok(index)
}

impl Fetcher {
    fn get_small(&self, url: &str, limit: u64) -> Result<Vec<u8>, UpdateError> {
        let net = |e: &dyn std::fmt::Display| UpdateError::Network {
            url: url.to_string(),
            received: 0,
            detail: e.to_string(),
        };
        let resp = self.agent.get(url).call().map_err(|e| net(&e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(UpdateError::HttpStatus {
                url: url.to_string(),
                status,
                received: 0,
            });
        }
        let mut bytes = Vec::new();
        resp.into_body()
            .into_reader()
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| net(&e))?;
        Ok(bytes)
    }

    /// Downloads `url_or_path` (an `http(s)://` URL, or a local path) into
    /// `staging_dir/<expected_digest>.ferry` and returns that path.
    ///
    /// At most `max_bytes` (and `expected_size`, when known) are accepted.
    /// `progress(received, total)` is called as bytes arrive (`total` is 0
    /// when unknown). A broken transfer leaves `<digest>.part` for the next
    /// call to resume; a file that is too large or does not match the digest
    /// is deleted. A file already complete in staging is returned at once
    /// (after checking its digest).
    pub fn download(
        &self,
        url_or_path: &str,
        expected_digest: &str,
        expected_size: Option<u64>,
        max_bytes: u64,
        staging_dir: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PathBuf, UpdateError> {
        check_digest(expected_digest)?;
        std::fs::create_dir_all(staging_dir)
            .map_err(|e| UpdateError::io("create", staging_dir, e))?;
        let done = staging_dir.join(format!("{expected_digest}.ferry"));
        let part = staging_dir.join(format!("{expected_digest}.part"));
        let cap = match expected_size {
            Some(size) if size > max_bytes => {
                return Err(UpdateError::TooLarge {
                    url: url_or_path.to_string(),
                    received: size,
                    limit: max_bytes,
                });
            }
            Some(size) => size,
            None => max_bytes,
        };

        if done.exists() {
            match super::sha256_file(&done) {
                Ok((digest, _)) if digest == expected_digest => {
                    debug!(file = %done.display(), "Bundle already downloaded");
                    return Ok(done);
                }
                _ => {
                    warn!(file = %done.display(), "Staged bundle does not match its name; fetching again");
                    remove(&done)?;
                }
            }
        }

        let mut job = Job {
            url: url_or_path,
            part: &part,
            cap,
            exact: expected_size.is_some(),
            total: expected_size.unwrap_or(0),
            progress,
        };
        // At most two attempts: a resumed one and, when the server cannot
        // resume (200 to a range, 416), one from zero.
        let (mut file, mut hasher, received) = match self.transfer(&mut job, true)? {
            Transfer::Done(f, h, n) => (f, h, n),
            Transfer::Restart => match self.transfer(&mut job, false)? {
                Transfer::Done(f, h, n) => (f, h, n),
                Transfer::Restart => {
                    return Err(UpdateError::Network {
                        url: url_or_path.to_string(),
                        received: 0,
                        detail: "the server answered a range to a request without one".into(),
                    });
                }
            },
        };
        if let Some(size) = expected_size
            && received != size
        {
            // The stream ended early without the transport noticing (no
            // Content-Length): keep the part, the next attempt resumes.
            return Err(UpdateError::Network {
                url: url_or_path.to_string(),
                received,
                detail: format!("the transfer ended after {received} of {size} bytes"),
            });
        }
        let actual = hex::encode(std::mem::take(&mut hasher).finalize());
        if actual != expected_digest {
            drop(file);
            remove(&part)?;
            return Err(UpdateError::DigestMismatch {
                url: url_or_path.to_string(),
                expected: expected_digest.to_string(),
                actual,
                received,
            });
        }
        file.flush()
            .map_err(|e| UpdateError::io("write", &part, e))?;
        file.sync_all()
            .map_err(|e| UpdateError::io("fsync", &part, e))?;
        drop(file);
        std::fs::rename(&part, &done).map_err(|e| UpdateError::io("rename", &part, e))?;
        sync_dir(staging_dir)?;
        info!(url = %url_or_path, bytes = received, digest = %expected_digest, "Downloaded bundle");
        Ok(done)
    }

    /// One attempt. With `resume`, continues an existing part file.
    fn transfer(&self, job: &mut Job<'_>, resume: bool) -> Result<Transfer, UpdateError> {
        let mut have = if resume {
            std::fs::metadata(job.part).map(|m| m.len()).unwrap_or(0)
        } else {
            0
        };
        if have > job.cap {
            warn!(part = %job.part.display(), bytes = have, limit = job.cap, "Partial download larger than expected; starting over");
            have = 0;
        }
        if have > 0 && job.exact && have == job.cap {
            // Every byte is already here (the process stopped before the
            // rename): only the digest check is left.
            let mut f = OpenOptions::new()
                .read(true)
                .append(true)
                .open(job.part)
                .map_err(|e| UpdateError::io("open", job.part, e))?;
            let mut hasher = Sha256::new();
            hash_prefix(&mut f, have, &mut hasher)
                .map_err(|e| UpdateError::io("read", job.part, e))?;
            (job.progress)(have, job.total);
            return Ok(Transfer::Done(f, hasher, have));
        }
        let (mut body, start, declared): (Box<dyn Read>, u64, Option<u64>) = if is_http(job.url) {
            let mut req = self
                .agent
                .get(job.url)
                // A compressed representation would make byte ranges meaningless.
                .header("Accept-Encoding", "identity");
            if have > 0 {
                req = req.header("Range", format!("bytes={have}-"));
            }
            let resp = req.call().map_err(|e| UpdateError::Network {
                url: job.url.to_string(),
                received: have,
                detail: e.to_string(),
            })?;
            let status = resp.status().as_u16();
            let length = resp
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            match status {
                206 if have > 0 => {
                    let range = resp
                        .headers()
                        .get("content-range")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if !content_range_starts_at(range, have) {
                        warn!(url = %job.url, range, expected_start = have, "Server answered another range; starting over");
                        return restart(job);
                    }
                    debug!(url = %job.url, from = have, "Resuming download");
                    (Box::new(resp.into_body().into_reader()), have, length)
                }
                200 => {
                    if have > 0 {
                        debug!(url = %job.url, "Server ignored the range; downloading from zero");
                    }
                    (Box::new(resp.into_body().into_reader()), 0, length)
                }
                416 if have > 0 => {
                    warn!(url = %job.url, bytes = have, "Server refused the range (416); starting over");
                    return restart(job);
                }
                status => {
                    return Err(UpdateError::HttpStatus {
                        url: job.url.to_string(),
                        status,
                        received: have,
                    });
                }
            }
        } else {
            let path = Path::new(job.url.strip_prefix("file://").unwrap_or(job.url));
            let mut file = File::open(path).map_err(|e| UpdateError::io("open", path, e))?;
            let len = file
                .metadata()
                .map_err(|e| UpdateError::io("stat", path, e))?
                .len();
            let start = if have <= len { have } else { 0 };
            file.seek(SeekFrom::Start(start))
                .map_err(|e| UpdateError::io("seek", path, e))?;
            (Box::new(file), start, Some(len - start))
        };

        if let Some(len) = declared
            && start.saturating_add(len) > job.cap
        {
            // Refused before a byte is read; the limit is enforced on the
            // stream below as well, for servers that lie or do not say.
            return Err(too_large(job, start.saturating_add(len)));
        }

        if job.total == 0
            && let Some(len) = declared
        {
            job.total = start.saturating_add(len);
        }
        let mut hasher = Sha256::new();
        let mut file = if start > 0 {
            let mut f = OpenOptions::new()
                .read(true)
                .append(true)
                .open(job.part)
                .map_err(|e| UpdateError::io("open", job.part, e))?;
            hash_prefix(&mut f, start, &mut hasher)
                .map_err(|e| UpdateError::io("read", job.part, e))?;
            f
        } else {
            File::create(job.part).map_err(|e| UpdateError::io("create", job.part, e))?
        };

        let mut received = start;
        let mut buf = vec![0u8; CHUNK];
        (job.progress)(received, job.total);
        let (min_rate, window) = self.min_rate;
        let mut window_start = (std::time::Instant::now(), received);
        let started = std::time::Instant::now();
        loop {
            if self.cancel.load(Ordering::SeqCst) {
                return Err(UpdateError::Cancelled {
                    url: job.url.to_string(),
                    received,
                });
            }
            if started.elapsed() > self.deadline {
                return Err(UpdateError::Deadline {
                    url: job.url.to_string(),
                    received,
                    seconds: self.deadline.as_secs(),
                });
            }
            let elapsed = window_start.0.elapsed();
            if elapsed >= window {
                let got = received - window_start.1;
                let rate = got as f64 / elapsed.as_secs_f64();
                if rate < min_rate as f64 {
                    // What arrived is on disk: the next attempt resumes.
                    return Err(UpdateError::TooSlow {
                        url: job.url.to_string(),
                        received,
                        rate: rate as u64,
                        min_rate,
                    });
                }
                window_start = (std::time::Instant::now(), received);
            }
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // What arrived is on disk (unbuffered writes): resumable.
                    return Err(UpdateError::Network {
                        url: job.url.to_string(),
                        received,
                        detail: e.to_string(),
                    });
                }
            };
            if received + n as u64 > job.cap {
                drop(file);
                let over = received + n as u64;
                remove(job.part)?;
                return Err(too_large(job, over));
            }
            file.write_all(&buf[..n])
                .map_err(|e| UpdateError::io("write", job.part, e))?;
            hasher.update(&buf[..n]);
            received += n as u64;
            (job.progress)(received, job.total);
        }
        Ok(Transfer::Done(file, hasher, received))
    }
}

struct Job<'a> {
    url: &'a str,
    part: &'a Path,
    /// Largest acceptable file.
    cap: u64,
    /// `cap` is the exact size (the index announced it).
    exact: bool,
    /// For progress reports; 0 when unknown.
    total: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

enum Transfer {
    Done(File, Sha256, u64),
    Restart,
}

/// Drops the part file: the next attempt starts from zero.
fn restart(job: &Job<'_>) -> Result<Transfer, UpdateError> {
    remove(job.part)?;
    Ok(Transfer::Restart)
}

fn too_large(job: &Job<'_>, received: u64) -> UpdateError {
    UpdateError::TooLarge {
        url: job.url.to_string(),
        received,
        limit: job.cap,
    }
}

/// Whether a `Content-Range: bytes <start>-<end>/<len>` starts at `start`.
fn content_range_starts_at(header: &str, start: u64) -> bool {
    header
        .trim()
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('-'))
        .and_then(|(s, _)| s.trim().parse::<u64>().ok())
        == Some(start)
}

fn hash_prefix(file: &mut File, len: u64, hasher: &mut Sha256) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = (&mut *file).take(len);
    let mut buf = vec![0u8; CHUNK];
    let mut seen = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        seen += n as u64;
    }
    if seen != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("partial file shrank to {seen} bytes"),
        ));
    }
    Ok(())
}

fn remove(path: &Path) -> Result<(), UpdateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(UpdateError::io("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            Source::parse("https://h.example/ch/index.json").unwrap(),
            Source::Http("https://h.example/ch/index.json".into())
        );
        assert_eq!(
            Source::parse("http://h:8080/ch/").unwrap(),
            Source::Http("http://h:8080/ch/index.json".into())
        );
        assert_eq!(
            Source::parse("/media/usb/ferry").unwrap(),
            Source::Dir("/media/usb/ferry".into())
        );
        for bad in ["", "  ", "ftp://h/x", "https://", "http:///x"] {
            assert_eq!(
                Source::parse(bad).unwrap_err().code(),
                "bad_source",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn entry_urls_resolve_against_the_index() {
        let s = Source::Http("https://h.example:8443/fleet/stable/index.json?x=1".into());
        assert_eq!(
            s.resolve("b-2.ferry"),
            "https://h.example:8443/fleet/stable/b-2.ferry"
        );
        assert_eq!(
            s.resolve("/dl/b.ferry"),
            "https://h.example:8443/dl/b.ferry"
        );
        assert_eq!(s.resolve("https://cdn/b.ferry"), "https://cdn/b.ferry");
        assert_eq!(
            Source::Http("http://h".into()).resolve("b.ferry"),
            "http://h/b.ferry"
        );
        let d = Source::Dir("/mnt/ch".into());
        assert_eq!(d.resolve("b.ferry"), "/mnt/ch/b.ferry");
        assert_eq!(d.resolve("/abs/b.ferry"), "/abs/b.ferry");
        assert_eq!(d.resolve("HTTP://h/b.ferry"), "HTTP://h/b.ferry");
    }

    #[test]
    fn an_http_index_cannot_send_the_device_to_another_origin() {
        // Issue 10, item 4: fetches go only to the channel's origin (or to
        // URLs inside a signed command).
        let s = Source::Http("https://h.example:8443/fleet/stable/index.json".into());
        let index = |url: &str| {
            format!(
                r#"{{"schema":1,"fleet":"f","channel":"c","latest":{{"name":"n","version":"1",
                "sequence":2,"digest":"{}","size":1,"url":"{url}"}}}}"#,
                "a".repeat(64)
            )
        };
        for ok in [
            "b.ferry",
            "/dl/b.ferry",
            "https://h.example:8443/x/b.ferry",
            "HTTPS://H.example:8443/b.ferry",
        ] {
            parse_index(&s, index(ok).as_bytes()).unwrap();
        }
        for bad in [
            "https://evil.example/b.ferry",
            "https://h.example/b.ferry",
            "http://h.example:8443/b.ferry",
            "https://127.0.0.1:22/b.ferry",
        ] {
            let err = parse_index(&s, index(bad).as_bytes()).unwrap_err();
            assert_eq!(err.code(), "bad_index", "{bad}");
            assert!(err.to_string().contains("origin"), "{err}");
        }
    }

    #[test]
    fn content_ranges() {
        assert!(content_range_starts_at("bytes 100-199/200", 100));
        assert!(!content_range_starts_at("bytes 0-199/200", 100));
        assert!(!content_range_starts_at("", 100));
        assert!(!content_range_starts_at("bytes */200", 100));
    }
}
