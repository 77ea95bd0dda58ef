//! How fast the MQTT reporter drains a pre-filled telemetry buffer into a
//! local mosquitto over loopback, QoS 1 (target: 20,000 records/s).
//!
//! `cargo bench --workspace --bench drain` (needs `/usr/sbin/mosquitto`).
//! `FERRY_BENCH_RECORDS` sets the records per run (default 100,000).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_agent::buffer::{Buffer, BufferOptions};
use ferry_agent::config::MqttConfig;
use ferry_agent::mqtt::{Identity, MqttStats, Reporter};
use ferry_protocol::{OutputSummary, Status, Stream, TelemetryRecord, Topic, topic};
use ferry_testkit::broker::{Mosquitto, Subscriber, SubscriberOptions};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const DEVICE: &str = "bench-dev";
const FLEET: &str = "bench";

struct Run {
    label: &'static str,
    max_inflight: u16,
    max_message_bytes: usize,
    subscriber: bool,
}

fn main() {
    let records: u64 = std::env::var("FERRY_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = Mosquitto::start(&[DEVICE]);
        println!(
            "drain: {records} telemetry records per run, mosquitto on 127.0.0.1:{}",
            broker.port()
        );
        for run in [
            Run {
                label: "defaults (16 in flight, 128 KiB)",
                max_inflight: 16,
                max_message_bytes: 128 * 1024,
                subscriber: false,
            },
            Run {
                label: "defaults + a QoS 1 subscriber",
                max_inflight: 16,
                max_message_bytes: 128 * 1024,
                subscriber: true,
            },
            Run {
                label: "4 in flight, 128 KiB",
                max_inflight: 4,
                max_message_bytes: 128 * 1024,
                subscriber: false,
            },
            Run {
                label: "16 in flight, 16 KiB",
                max_inflight: 16,
                max_message_bytes: 16 * 1024,
                subscriber: false,
            },
            Run {
                label: "1 in flight, 8 KiB",
                max_inflight: 1,
                max_message_bytes: 8 * 1024,
                subscriber: false,
            },
        ] {
            drain(&broker, records, &run).await;
        }
    });
}

async fn drain(broker: &Mosquitto, records: u64, run: &Run) {
    let dir = tempfile::tempdir().unwrap();
    let buffer = Arc::new(
        Buffer::open(BufferOptions {
            path: dir.path().join("buffer"),
            max_bytes: 1 << 30,
            flush_interval: Duration::from_secs(1),
            cache_bytes: 16 << 20,
        })
        .unwrap(),
    );
    let t = Instant::now();
    let mut bytes = 0usize;
    for _ in 0..records {
        buffer
            .append(Stream::Telemetry, |id| {
                let payload = serde_json::to_vec(&TelemetryRecord {
                    id,
                    ts_ms: 1_700_000_000_000 + id,
                    bundle_version: "1.4.2".into(),
                    latency_us: 812,
                    ok: true,
                    output: OutputSummary {
                        top1: Some(3),
                        score: Some(0.9134),
                        value: None,
                    },
                    error: None,
                    rows: 1,
                })
                .unwrap();
                bytes += payload.len();
                payload
            })
            .unwrap();
    }
    let fill = t.elapsed();

    let _subscriber = if run.subscriber {
        let t = topic(FLEET, DEVICE, Topic::Stream(Stream::Telemetry));
        Some(Subscriber::connect(broker, SubscriberOptions::admin(&[&t])).await)
    } else {
        None
    };
    let config = MqttConfig {
        url: broker.url(),
        username: Some(DEVICE.into()),
        max_inflight: run.max_inflight,
        max_message_bytes: run.max_message_bytes,
        ..MqttConfig::default()
    };
    let identity = Identity {
        device: DEVICE.into(),
        fleet: FLEET.into(),
        agent_version: "bench".into(),
    };
    let stats = Arc::new(MqttStats::default());
    let reporter = Reporter::with_password(
        &config,
        identity,
        buffer.clone(),
        stats.clone(),
        Some(ferry_testkit::broker::password(DEVICE)),
    )
    .unwrap();
    let (_status_tx, status_rx) = watch::channel(Status::offline(FLEET, DEVICE, "bench"));
    let (commands_tx, _commands_rx) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let t = Instant::now();
    let task = tokio::spawn(reporter.run(status_rx, commands_tx, shutdown.clone()));
    let deadline = t + Duration::from_secs(300);
    while buffer.pending(Stream::Telemetry) > 0 {
        assert!(Instant::now() < deadline, "not drained within 300 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = t.elapsed();
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let secs = took.as_secs_f64();
    let batches = stats.acked_batches.load(Ordering::Relaxed);
    println!(
        "  {:<34} {:>9.0} records/s  {:>6.1} MB/s  {:>6} batches ({:>4} records each)  {:>6.2} s  (fill {:.0} records/s)",
        run.label,
        records as f64 / secs,
        bytes as f64 / secs / 1e6,
        batches,
        records / batches.max(1),
        secs,
        records as f64 / fill.as_secs_f64(),
    );
    assert_eq!(stats.acked_records.load(Ordering::Relaxed), records);
}
