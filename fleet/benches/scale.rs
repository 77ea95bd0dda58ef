//! How many devices one console follows: N simulated devices publish through
//! a local mosquitto (loopback, QoS 1) into a console running in this
//! process (a `Store` in a temporary directory and its `Console`), each
//! device one retained status then `M` telemetry batches of `R` records.
//! Measured: messages and records per second applied *and acknowledged*
//! (after the store's fsync), memory and disk per device, `Store::devices()`.
//!
//! The devices are simulated by [`PUBLISHERS`] MQTT connections, each
//! publishing on its share of the devices' topics: one connection per device
//! is unrealistic for 10,000 devices on two cores, and the console sees the
//! same thing either way (one subscription, `ferry/v1/<fleet>/#`).
//!
//! `cargo bench --workspace --bench scale` (needs `/usr/sbin/mosquitto`).
//! `FERRY_BENCH_DEVICES=1000,10000` (the default) sets the fleet sizes, one
//! process each (so that the memory of one run does not hide the next),
//! `FERRY_BENCH_BATCHES` the batches per device (default 5), each of
//! [`RECORDS_PER_BATCH`] records.

use std::fmt::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_fleet::ingest::{Console, IngestOptions};
use ferry_fleet::store::Store;
use ferry_link::{AsyncClient, MqttOptions, QoS};
use ferry_protocol::{
    Batch, BufferInfo, SCHEMA_VERSION, Status, Stream, TelemetryRecord, Topic, message_id, topic,
};

const FLEET: &str = "bench";
const PUBLISHERS: usize = 4;
const RECORDS_PER_BATCH: u64 = 20;
const ONE: &str = "FERRY_BENCH_SCALE_ONE";

fn main() {
    if let Ok(n) = std::env::var(ONE) {
        run(n.parse().unwrap());
        return;
    }
    let sizes = std::env::var("FERRY_BENCH_DEVICES").unwrap_or_else(|_| "1000,10000".into());
    println!(
        "scale: mosquitto on loopback (max_inflight_messages 20), {PUBLISHERS} publisher \
         connections, QoS 1, {RECORDS_PER_BATCH} records per batch ({} bytes), status {} bytes\n",
        batch("dev-000000", 1).len(),
        status("dev-000000").len(),
    );
    println!(
        "| devices | messages | records | end to end | messages/s | records/s | console RSS per device | mosquitto RSS | disk per device | devices() |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let status = Command::new(std::env::current_exe().unwrap())
            .env(ONE, n)
            .status()
            .unwrap();
        assert!(status.success(), "the run for {n} devices failed");
    }
}

fn run(devices: usize) {
    let batches: u64 = std::env::var("FERRY_BENCH_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let store = Arc::new(Store::open(&state).unwrap());
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let console = rt.block_on(async {
        let console = Console::start(&IngestOptions::new(url, FLEET), store.clone()).unwrap();
        assert!(console.wait_connected(Duration::from_secs(10)).await);
        console
    });
    let baseline = rss_kib();
    let expected = devices as u64 * (1 + batches);
    let started = Instant::now();
    rt.block_on(async {
        let mut publishers = Vec::new();
        for k in 0..PUBLISHERS {
            let mut o = MqttOptions::new(format!("bench-pub-{k}"), "127.0.0.1", broker.port);
            o.set_inflight(100);
            o.set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut eventloop) = AsyncClient::new(o, 1024);
            let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
            let feed = tokio::spawn(async move {
                let mine: Vec<String> = (k..devices)
                    .step_by(PUBLISHERS)
                    .map(|i| format!("dev-{i:06}"))
                    .collect();
                for device in &mine {
                    let t = topic(FLEET, device, Topic::Status);
                    client
                        .publish(t, QoS::AtLeastOnce, true, status(device))
                        .await
                        .unwrap();
                }
                for b in 0..batches {
                    for device in &mine {
                        let t = topic(FLEET, device, Topic::Stream(Stream::Telemetry));
                        let first = b * RECORDS_PER_BATCH + 1;
                        client
                            .publish(t, QoS::AtLeastOnce, false, batch(device, first))
                            .await
                            .unwrap();
                    }
                }
                client
            });
            publishers.push((feed, driver));
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        while console.stats().acked.load(Ordering::Relaxed) < expected {
            assert!(Instant::now() < deadline, "timed out: {:?}", store.stats());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (feed, driver) in publishers {
            let client = feed.await.unwrap();
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
        }
    });
    let elapsed = started.elapsed();
    let after = rss_kib();
    let broker_rss = rss_kib_of(&format!("/proc/{}/status", broker.child.id()));
    let stats = store.stats();
    assert_eq!(stats.rejected_total(), 0, "{stats:?}");
    assert_eq!(stats.records, devices as u64 * batches * RECORDS_PER_BATCH);
    assert_eq!(stats.statuses, devices as u64, "{stats:?}");
    let t = Instant::now();
    let listed = store.devices();
    let list_time = t.elapsed();
    assert_eq!(listed.len(), devices);
    rt.block_on(console.stop()).unwrap();
    store.flush().unwrap();
    let disk = dir_bytes(&state);
    let secs = elapsed.as_secs_f64();
    println!(
        "| {devices} | {} | {} | {secs:.1} s | {:.0} | {:.0} | {:.1} KiB | {:.1} MiB | {:.1} KiB | {:.1} ms |",
        stats.messages,
        stats.records,
        stats.messages as f64 / secs,
        stats.records as f64 / secs,
        after.saturating_sub(baseline) as f64 / devices as f64,
        broker_rss as f64 / 1024.0,
        disk as f64 / 1024.0 / devices as f64,
        list_time.as_secs_f64() * 1e3,
    );
}

fn status(device: &str) -> Vec<u8> {
    let s = Status {
        online: true,
        ts_ms: ferry_host::now_ms(),
        buffer: BufferInfo {
            records: 3,
            ..BufferInfo::default()
        },
        predictions: 42,
        uptime_s: 60,
        ..Status::offline(FLEET, device, "0.1.0")
    };
    serde_json::to_vec(&s).unwrap()
}

fn batch(device: &str, first: u64) -> Vec<u8> {
    let last = first + RECORDS_PER_BATCH - 1;
    let now = ferry_host::now_ms();
    let records: Vec<TelemetryRecord> = (first..=last)
        .map(|id| TelemetryRecord {
            id,
            ts_ms: now,
            bundle_version: "1.0.0".into(),
            latency_us: 50,
            ok: true,
            output: Default::default(),
            error: None,
            rows: 1,
        })
        .collect();
    serde_json::to_vec(&Batch {
        schema: SCHEMA_VERSION,
        stream: Stream::Telemetry,
        message_id: message_id(device, Stream::Telemetry, first, last),
        device: device.into(),
        fleet: FLEET.into(),
        sent_ms: now,
        records,
    })
    .unwrap()
}

/// VmRSS of this process, KiB.
fn rss_kib() -> u64 {
    rss_kib_of("/proc/self/status")
}

fn rss_kib_of(status: &str) -> u64 {
    let s = std::fs::read_to_string(status).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

/// mosquitto on a free loopback port, anonymous, no persistence; killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut conf = String::new();
        writeln!(conf, "allow_anonymous true").unwrap();
        writeln!(conf, "user root").unwrap();
        writeln!(conf, "max_queued_messages 10000000").unwrap();
        writeln!(conf, "listener {port} 127.0.0.1").unwrap();
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("/usr/sbin/mosquitto: apt-get install mosquitto");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Mosquitto {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
