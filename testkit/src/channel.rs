//! Update channels as the agent reads them: a directory with an
//! `index.json` ([`publish`]), and [`ChannelServer`], a small HTTP server for
//! such a directory that can break a download halfway.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_format::{ReadLimits, inspect_unverified, release_id_of};
use ferry_protocol::{ChannelIndex, IndexEntry, SCHEMA_VERSION};

use crate::fixtures::sha256_hex;

/// Puts `bundle` in the channel directory `dir` and writes `dir/index.json`
/// naming it as the latest (relative `url`, the bundle's own release fields).
pub fn publish(dir: &Path, bundle: &Path) -> ChannelIndex {
    std::fs::create_dir_all(dir).unwrap();
    let bytes = std::fs::read(bundle).unwrap();
    let (manifest, _) = inspect_unverified(&bytes, &ReadLimits::default()).unwrap();
    let file_name = bundle.file_name().unwrap().to_str().unwrap().to_string();
    let target = dir.join(&file_name);
    if target != bundle {
        std::fs::write(&target, &bytes).unwrap();
    }
    let index = ChannelIndex {
        schema: SCHEMA_VERSION,
        version: 0,
        issued_ms: 0,
        expires_ms: 0,
        fleet: manifest.release.fleet,
        channel: manifest.release.channel,
        latest: IndexEntry {
            name: manifest.name,
            version: manifest.version,
            sequence: manifest.release.sequence,
            digest: sha256_hex(&bytes),
            size: bytes.len() as u64,
            url: file_name,
            release: release_id_of(&bytes).unwrap(),
        },
    };
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    index
}

/// [`publish`], then signs `dir/index.json` as channel metadata (a DSSE
/// envelope) with `version`, `issued_ms` and `expires_ms` as given.
pub fn publish_signed(
    dir: &Path,
    bundle: &Path,
    keys: &[&ferry_format::SecretKey],
    version: u64,
    issued_ms: u64,
    expires_ms: u64,
) -> ChannelIndex {
    let mut index = publish(dir, bundle);
    index.version = version;
    index.issued_ms = issued_ms;
    index.expires_ms = expires_ms;
    let mut envelope = ferry_format::Envelope::new(
        ferry_protocol::CHANNEL_PAYLOAD_TYPE,
        &serde_json::to_vec(&index).unwrap(),
    );
    for k in keys {
        envelope.sign(k).unwrap();
    }
    std::fs::write(dir.join("index.json"), envelope.to_json()).unwrap();
    index
}

/// A request the [`ChannelServer`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The request path (`/v2.ferry`).
    pub path: String,
    /// The `Range` header as sent, if any.
    pub range: Option<String>,
    pub status: u16,
    /// Body bytes actually written.
    pub body_bytes: u64,
}

#[derive(Debug, Default)]
struct Plan {
    /// The next body is cut after this many bytes (the connection closes).
    cut_after: Option<u64>,
    /// Answer every request with the whole file (200), as servers without
    /// range support do.
    ignore_ranges: bool,
    /// Leave `Content-Length` out (the body ends when the connection closes).
    omit_length: bool,
    /// The next request gets this status and an empty body.
    fail_next: Option<u16>,
    /// Send bodies one byte at a time, this long apart (a slow-retrieval
    /// attacker: never silent long enough for a read timeout).
    trickle: Option<std::time::Duration>,
}

struct Shared {
    root: PathBuf,
    plan: Mutex<Plan>,
    seen: Mutex<Vec<Seen>>,
}

/// A static file server on `127.0.0.1:0` for update channels: `GET` with
/// `Range: bytes=N-` support (206, 416), every response `Connection: close`.
/// It can cut the next body after N bytes, ignore ranges, omit
/// `Content-Length`, or fail the next request, and records what it saw.
///
/// (Hand-written on `std::net` rather than tiny_http: tiny_http keeps a
/// connection open after a short body, so it cannot simulate a transfer that
/// breaks halfway.)
pub struct ChannelServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ChannelServer {
    /// Serves the files under `root`.
    pub fn start(root: &Path) -> ChannelServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            plan: Mutex::new(Plan::default()),
            seen: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        let _ = serve(&shared, stream);
                    });
                }
            })
        };
        ChannelServer {
            addr,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>/<rel>`.
    pub fn url(&self, rel: &str) -> String {
        format!("http://{}/{}", self.addr, rel.trim_start_matches('/'))
    }

    /// The next response body stops after `n` bytes and the connection
    /// closes (its headers still announce the whole length).
    pub fn cut_next_body_after(&self, n: u64) {
        self.shared.plan.lock().unwrap().cut_after = Some(n);
    }

    /// Answer ranged requests with the whole file (200).
    pub fn ignore_ranges(&self, yes: bool) {
        self.shared.plan.lock().unwrap().ignore_ranges = yes;
    }

    /// Send bodies without `Content-Length` (delimited by closing).
    pub fn omit_content_length(&self, yes: bool) {
        self.shared.plan.lock().unwrap().omit_length = yes;
    }

    /// The next request is answered with `status` and no body.
    pub fn fail_next(&self, status: u16) {
        self.shared.plan.lock().unwrap().fail_next = Some(status);
    }

    /// Send every body one byte at a time, `every` apart, until the client
    /// goes away (`None`: at full speed again).
    pub fn trickle(&self, every: Option<std::time::Duration>) {
        self.shared.plan.lock().unwrap().trickle = every;
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// The `Range` headers received, in order.
    pub fn ranges(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter_map(|s| s.range)
            .collect()
    }
}

impl Drop for ChannelServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(shared: &Shared, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let mut range = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("range")
        {
            range = Some(value.trim().to_string());
        }
    }
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    let (cut_after, ignore_ranges, omit_length, fail, trickle) = {
        let mut plan = shared.plan.lock().unwrap();
        (
            plan.cut_after.take(),
            plan.ignore_ranges,
            plan.omit_length,
            plan.fail_next.take(),
            plan.trickle,
        )
    };

    let file = (!path.split('/').any(|c| c == ".."))
        .then(|| std::fs::read(shared.root.join(path.trim_start_matches('/'))).ok())
        .flatten();
    let (status, mut extra, body): (u16, Vec<String>, Vec<u8>) = match (fail, file) {
        (Some(status), _) => (status, vec![], vec![]),
        _ if method != "GET" => (405, vec![], vec![]),
        (None, None) => (404, vec![], b"not found".to_vec()),
        (None, Some(bytes)) => {
            let len = bytes.len() as u64;
            let start = range
                .as_deref()
                .filter(|_| !ignore_ranges)
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<u64>().ok());
            match start {
                None => (200, vec![], bytes),
                Some(s) if s >= len => (416, vec![format!("Content-Range: bytes */{len}")], vec![]),
                Some(s) => (
                    206,
                    vec![format!("Content-Range: bytes {s}-{}/{len}", len - 1)],
                    bytes[s as usize..].to_vec(),
                ),
            }
        }
    };
    if !omit_length || body.is_empty() {
        extra.push(format!("Content-Length: {}", body.len()));
    }
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n"
    );
    for h in &extra {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let sent = cut_after.map_or(body.len(), |n| (n as usize).min(body.len()));
    shared.seen.lock().unwrap().push(Seen {
        path,
        range,
        status,
        body_bytes: sent as u64,
    });
    stream.write_all(head.as_bytes())?;
    if let Some(every) = trickle {
        for byte in &body[..sent] {
            stream.write_all(std::slice::from_ref(byte))?;
            stream.flush()?;
            std::thread::sleep(every);
        }
    }
    stream.write_all(&body[..sent])?;
    stream.flush()?;
    stream.shutdown(Shutdown::Both)
}
