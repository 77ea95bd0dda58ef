//! Bundle downloads under concurrency: eight devices resuming a 256 MiB
//! bundle at once (`Range: bytes=1-`) from the real `ferry-fleet serve`
//! (embedded broker, rollouts on), while the console's resident memory is
//! sampled from `/proc/<pid>/status`. Measured: the console's RSS before,
//! its peak (`VmHWM`) after, and the throughput.
//!
//! `cargo bench --workspace --bench downloads` (Linux). `FERRY_BENCH_MIB`
//! sets the bundle's size (default 256), `FERRY_BENCH_CLIENTS` the
//! concurrent downloads (default 8).
//!
//! The bundle file is written into `<state>/bundles/` after the console
//! started (its bundle collector runs at start and when a rollout ends):
//! downloads are served from that directory by name, whatever made the
//! file, and no 256 MiB model needs packing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `VmRSS` or `VmHWM` of `pid`, in KiB.
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Downloads `path` from `addr` with `Range: bytes=1-`: the bytes read.
fn download(addr: &str, path: &str) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nRange: bytes=1-\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::with_capacity(1 << 20, s);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 206"), "{line}");
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

fn main() {
    let mib = env("FERRY_BENCH_MIB", 256);
    let clients = env("FERRY_BENCH_CLIENTS", 8);
    let bin = ferry_testkit::fixtures::workspace_bin("ferry-fleet");
    let b = ferry_testkit::fixtures::bundles();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let broker = format!("127.0.0.1:{}", ferry_testkit::free_port());
    let mut child = Command::new(bin)
        .args(["serve", "--fleet", "bench", "--listen", "127.0.0.1:0"])
        .args(["--embedded-broker", &broker, "--log-format", "json"])
        .arg("--state")
        .arg(&state)
        .arg("--trust")
        .arg(b.path("release.pub"))
        .arg("--key")
        .arg(b.path("release.key"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("Dashboard: ")
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let addr = url.trim_start_matches("http://").to_string();
    let pid = child.id();

    // The bundle file: incompressible bytes, named by their SHA-256.
    let mut bytes = vec![0u8; mib << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let digest = hex::encode(Sha256::digest(&bytes));
    std::fs::write(
        state.join("bundles").join(format!("{digest}.ferry")),
        &bytes,
    )
    .unwrap();
    drop(bytes);
    std::thread::sleep(Duration::from_millis(500));
    let before = memory_kib(pid, "VmRSS:");
    let peak_before = memory_kib(pid, "VmHWM:");

    let path = format!("/bundles/{digest}.ferry");
    let start = Instant::now();
    let sampler = {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let h = std::thread::spawn(move || {
            let mut max = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(memory_kib(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(20));
            }
            max
        });
        (stop, h)
    };
    let read: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| s.spawn(|| download(&addr, &path)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let elapsed = start.elapsed();
    sampler.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let sampled_max = sampler.1.join().unwrap();
    let peak = memory_kib(pid, "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();

    let expected = clients as u64 * ((mib as u64) << 20).saturating_sub(1);
    assert_eq!(read, expected, "short downloads");
    let mib_f = |kib: u64| kib as f64 / 1024.0;
    println!(
        "{clients} concurrent `Range: bytes=1-` downloads of a {mib} MiB bundle from ferry-fleet serve"
    );
    println!(
        "  served {:.0} MiB in {:.2} s ({:.0} MiB/s)",
        read as f64 / (1 << 20) as f64,
        elapsed.as_secs_f64(),
        read as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  console RSS: {:.1} MiB before, {:.1} MiB at most while sampled (20 ms), peak (VmHWM) {:.1} MiB (before the downloads: {:.1} MiB)",
        mib_f(before),
        mib_f(sampled_max),
        mib_f(peak),
        mib_f(peak_before)
    );
}
