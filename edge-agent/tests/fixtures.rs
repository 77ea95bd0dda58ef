//! Shared fixtures: real bundles packed once per test process by the real
//! `ferry`, bad bundles derived from them, channel helpers, and a small HTTP
//! server for update channels that can break a download halfway.
//!
//! Every bundle is `examples/iris`, fleet `demo`, channel `stable` unless its
//! name says otherwise:
//!
//! | file                     | what                                              | refused as        |
//! |--------------------------|---------------------------------------------------|-------------------|
//! | `v1.ferry`               | sequence 1                                        |                   |
//! | `v2.ferry`               | sequence 2                                        |                   |
//! | `wrong-fleet.ferry`      | sequence 3, fleet `other`                         | `wrong_fleet`     |
//! | `wrong-channel.ferry`    | sequence 3, channel `beta`                        | `wrong_channel`   |
//! | `untrusted.ferry`        | sequence 3, signed by `untrusted.key` only        | `untrusted_key`   |
//! | `tampered-manifest.ferry`| v2 with one manifest byte flipped                 | `bad_signature`   |
//! | `tampered-payload.ferry` | v2 with the last payload byte flipped             | `digest_mismatch` |
//! | `unsigned.ferry`         | v2 with its signature block removed               | `unsigned`        |
//! | `truncated.ferry`        | the first half of v2                              | `truncated`       |
//! | `golden-fails.ferry`     | sequence 3, validly signed, one golden expected   | `golden_failed`   |
//! |                          | output changed (the `setosa` label)               | (health check)    |
//!
//! Keys: `release.key`/`release.pub` (trusted, see [`Bundles::trust`]) and
//! `untrusted.key`/`untrusted.pub`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_protocol::{ChannelIndex, IndexEntry, SCHEMA_VERSION};
use ferry_runtime::{
    ArtifactInput, Encoding, PublicKey, ReadLimits, SecretKey, TrustPolicy, inspect_unverified,
    role, to_cbor, verify, write_bundle,
};
use sha2::{Digest, Sha256};

pub const V1: &str = "v1.ferry";
pub const V2: &str = "v2.ferry";
pub const WRONG_FLEET: &str = "wrong-fleet.ferry";
pub const WRONG_CHANNEL: &str = "wrong-channel.ferry";
pub const UNTRUSTED: &str = "untrusted.ferry";
pub const TAMPERED_MANIFEST: &str = "tampered-manifest.ferry";
pub const TAMPERED_PAYLOAD: &str = "tampered-payload.ferry";
pub const UNSIGNED: &str = "unsigned.ferry";
pub const TRUNCATED: &str = "truncated.ferry";
pub const GOLDEN_FAILS: &str = "golden-fails.ferry";

/// The fleet and channel every good fixture bundle is released to.
pub const FLEET: &str = "demo";
pub const CHANNEL: &str = "stable";

/// The workspace's `examples/`.
pub fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A binary of the workspace build, next to this test binary's `deps/`
/// directory (works for every crate that includes this harness).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    dir.join(name)
}

/// The `ferry` packager, built by the same workspace build as the agent.
pub fn ferry() -> Command {
    let path = workspace_bin("ferry");
    assert!(
        path.exists(),
        "{} is missing: run the workspace's tests (cargo test --workspace), which build the packager too",
        path.display()
    );
    Command::new(path)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SHA-256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The fixture bundles and keys, in one directory that lives as long as
/// the test process.
pub struct Bundles {
    dir: tempfile::TempDir,
}

/// Packs the fixtures on first use (a few seconds), then returns them.
pub fn bundles() -> &'static Bundles {
    static B: OnceLock<Bundles> = OnceLock::new();
    B.get_or_init(Bundles::build)
}

impl Bundles {
    fn build() -> Bundles {
        let b = Bundles {
            dir: tempfile::tempdir().unwrap(),
        };
        for key in ["release", "untrusted"] {
            run(ferry().args(["keygen", "-o"]).arg(b.path(key)));
        }
        let iris = examples().join("iris");
        let packs: [(&str, &str, &str, &str, &str); 5] = [
            (V1, "1", FLEET, CHANNEL, "release.key"),
            (V2, "2", FLEET, CHANNEL, "release.key"),
            (WRONG_FLEET, "3", "other", CHANNEL, "release.key"),
            (WRONG_CHANNEL, "3", FLEET, "beta", "release.key"),
            (UNTRUSTED, "3", FLEET, CHANNEL, "untrusted.key"),
        ];
        std::thread::scope(|s| {
            for (out, seq, fleet, channel, key) in packs {
                let (b, iris) = (&b, &iris);
                s.spawn(move || {
                    run(ferry()
                        .arg("pack")
                        .arg(iris)
                        .arg("--key")
                        .arg(b.path(key))
                        .arg("-o")
                        .arg(b.path(out))
                        .args(["--sequence", seq, "--fleet", fleet, "--channel", channel])
                        .args(["--level", "3"]));
                });
            }
        });

        let v2 = b.bytes(V2);
        let manifest_len = u32::from_le_bytes(v2[12..16].try_into().unwrap()) as usize;
        let sig_count = u16::from_le_bytes([v2[10], v2[11]]) as usize;
        let sigs_end = ferry_runtime::HEADER_LEN
            + manifest_len
            + sig_count * ferry_format::SIGNATURE_ENTRY_LEN;

        let mut tampered = v2.clone();
        tampered[ferry_runtime::HEADER_LEN + manifest_len / 2] ^= 0x01;
        b.write(TAMPERED_MANIFEST, &tampered);

        let mut tampered = v2.clone();
        *tampered.last_mut().unwrap() ^= 0x01;
        b.write(TAMPERED_PAYLOAD, &tampered);

        let mut unsigned = v2[..ferry_runtime::HEADER_LEN + manifest_len].to_vec();
        unsigned[10..12].copy_from_slice(&0u16.to_le_bytes());
        unsigned.extend_from_slice(&v2[sigs_end..]);
        b.write(UNSIGNED, &unsigned);

        b.write(TRUNCATED, &v2[..v2.len() / 2]);

        b.write(GOLDEN_FAILS, &b.golden_failing(&v2));
        b
    }

    /// v2 re-signed by the release key with sequence 3 and the `setosa`
    /// golden example expecting the wrong label. `ferry pack` refuses to
    /// write such a bundle, so it is written with the runtime's own writer.
    fn golden_failing(&self, v2: &[u8]) -> Vec<u8> {
        let v = verify(v2, &self.trust(), &ReadLimits::default()).unwrap();
        let mut golden = v.golden().unwrap();
        let example = golden
            .iter_mut()
            .find(|g| g.name == "setosa")
            .expect("iris has a `setosa` golden example");
        let mut expected: serde_json::Value = serde_json::from_str(&example.expected_json).unwrap();
        expected["predictions"][0]["label"] = "virginica".into();
        example.expected_json = expected.to_string();
        let inputs: Vec<ArtifactInput> = v
            .manifest()
            .artifacts
            .iter()
            .zip(v.contents())
            .map(|(a, content)| ArtifactInput {
                role: a.role.clone(),
                media_type: a.media_type.clone(),
                content: if a.role == role::GOLDEN {
                    to_cbor(&golden)
                } else {
                    content.clone()
                },
                target: a.target.clone(),
                try_shuffle: a.encoding == Encoding::Shuffle4Zstd,
            })
            .collect();
        let mut manifest = v.manifest().clone();
        manifest.release.sequence = 3;
        let key = SecretKey::from_pem(&std::fs::read_to_string(self.path("release.key")).unwrap())
            .unwrap();
        write_bundle(manifest, &inputs, &[&key], 3).unwrap().1
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap();
    }

    /// The directory holding every fixture.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fixture's path (`V1`, `"release.pub"`, ...).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A fixture's bytes.
    pub fn bytes(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// SHA-256 of a fixture file, hex (its identity as a bundle).
    pub fn digest(&self, name: &str) -> String {
        sha256_hex(&self.bytes(name))
    }

    /// Trusts `release.pub` only.
    pub fn trust(&self) -> TrustPolicy {
        let pem = std::fs::read_to_string(self.path("release.pub")).unwrap();
        TrustPolicy::new(PublicKey::all_from_pem(&pem).unwrap()).unwrap()
    }

    /// Copies a fixture into `dir` (under the same name) and returns the copy.
    pub fn copy_to(&self, name: &str, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let to = dir.join(name);
        std::fs::copy(self.path(name), &to).unwrap();
        to
    }
}

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
        fleet: manifest.release.fleet,
        channel: manifest.release.channel,
        latest: IndexEntry {
            name: manifest.name,
            version: manifest.version,
            sequence: manifest.release.sequence,
            digest: sha256_hex(&bytes),
            size: bytes.len() as u64,
            url: file_name,
        },
    };
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
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
    let (cut_after, ignore_ranges, omit_length, fail) = {
        let mut plan = shared.plan.lock().unwrap();
        (
            plan.cut_after.take(),
            plan.ignore_ranges,
            plan.omit_length,
            plan.fail_next.take(),
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
    stream.write_all(&body[..sent])?;
    stream.flush()?;
    stream.shutdown(Shutdown::Both)
}
