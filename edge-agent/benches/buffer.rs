//! Telemetry buffer throughput on real sled, in a temporary directory:
//! appends of a ~200-byte telemetry record (one thread, four threads, and
//! with the budget full so every append evicts), then read + ack.
//!
//! `cargo bench --release --workspace --bench buffer` (plain `std::time`).
//! The target is 100,000 appends/s. Set `FERRY_BENCH_DIR` to measure on
//! another disk (the device's) instead of the system's temporary directory,
//! and `FERRY_BENCH_BUDGET_MIB` for the budget of the full-buffer run.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_agent::buffer::{Buffer, BufferOptions, Stream};

const RECORDS: u64 = 200_000;
const THREADS: u64 = 4;
const READ_BATCH: usize = 500;
/// Same as `mqtt.max_message_bytes` by default.
const READ_BATCH_BYTES: usize = 128 * 1024;

/// A telemetry record as the agent writes it, about 200 bytes.
fn record(id: u64) -> Vec<u8> {
    format!(
        "{{\"id\":{id},\"ts_ms\":1767225600000,\"bundle_version\":\"2026.01.3\",\"latency_us\":1834,\
         \"ok\":true,\"output\":{{\"top1\":3,\"score\":0.91734,\"value\":null}},\"error\":null,\
         \"rows\":1,\"pad\":\"{}\"}}",
        "p".repeat(33)
    )
    .into_bytes()
}

fn open(dir: &std::path::Path, name: &str, max_bytes: u64) -> Buffer {
    Buffer::open(BufferOptions {
        path: dir.join(name),
        max_bytes,
        // The agent's defaults.
        flush_interval: Duration::from_millis(1000),
        cache_bytes: 4 * 1024 * 1024,
    })
    .unwrap()
}

fn disk_use(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                disk_use(&e.path())
            } else {
                // Allocated blocks, not the apparent (maybe sparse) length.
                std::os::unix::fs::MetadataExt::blocks(&meta) * 512
            }
        })
        .sum()
}

fn rate(n: u64, d: Duration) -> u64 {
    (n as f64 / d.as_secs_f64()) as u64
}

fn main() {
    let base = std::env::var_os("FERRY_BENCH_DIR");
    let dir = match &base {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    println!(
        "record: {} bytes, {} records per run",
        record(1).len(),
        RECORDS
    );

    // One thread.
    let b = open(dir.path(), "single", 1 << 30);
    let t = Instant::now();
    for _ in 0..RECORDS {
        black_box(b.append(Stream::Telemetry, record).unwrap());
    }
    let appended = t.elapsed();
    let t = Instant::now();
    b.flush().unwrap();
    println!(
        "buffer append: {} records/s (1 thread)",
        rate(RECORDS, appended)
    );
    println!("buffer flush after appends: {:?}", t.elapsed());

    // Read + ack everything back, in MQTT-sized batches.
    let t = Instant::now();
    let (mut after, mut n) = (0, 0u64);
    loop {
        let batch = b
            .read(Stream::Telemetry, after, READ_BATCH, READ_BATCH_BYTES)
            .unwrap();
        let Some(last) = batch.last() else { break };
        after = last.id;
        let ids: Vec<u64> = batch.iter().map(|r| r.id).collect();
        b.ack(Stream::Telemetry, &ids).unwrap();
        n += ids.len() as u64;
    }
    let drained = t.elapsed();
    assert_eq!(n, RECORDS);
    assert_eq!(b.pending(Stream::Telemetry), 0);
    println!("buffer read+ack: {} records/s", rate(n, drained));
    drop(b);

    // Four threads.
    let b = Arc::new(open(dir.path(), "threads", 1 << 30));
    let t = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let b = b.clone();
            std::thread::spawn(move || {
                for _ in 0..RECORDS / THREADS {
                    black_box(b.append(Stream::Telemetry, record).unwrap());
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let appended = t.elapsed();
    println!(
        "buffer append: {} records/s ({THREADS} threads)",
        rate(RECORDS, appended)
    );
    drop(b);

    // Budget full: every append evicts the oldest record. The records
    // churned are at least five budgets' worth, so sled's space use settles.
    let budget = budget_mib() << 20;
    let churn = RECORDS.max(5 * budget / record(1).len() as u64);
    let b = open(dir.path(), "full", budget);
    while b.stats().bytes + 300 < b.stats().budget_bytes {
        b.append(Stream::Telemetry, record).unwrap();
    }
    let t = Instant::now();
    for _ in 0..churn {
        black_box(b.append(Stream::Telemetry, record).unwrap());
    }
    let appended = t.elapsed();
    let dropped = b.stats().dropped[&Stream::Telemetry];
    println!(
        "buffer append: {} records/s (1 thread, budget full, {dropped} evicted)",
        rate(churn, appended)
    );
    println!(
        "buffer disk use: {} bytes for a budget of {budget} bytes (budget full, open)",
        disk_use(&dir.path().join("full"))
    );
    drop(b);
    println!(
        "buffer disk use: {} bytes for a budget of {budget} bytes (budget full, after close)",
        disk_use(&dir.path().join("full"))
    );
    // Opening checks every record.
    let t = Instant::now();
    let b = open(dir.path(), "full", budget);
    println!(
        "buffer open: {:?} for {} records ({} bytes)",
        t.elapsed(),
        b.stats().records,
        b.stats().bytes
    );
}

/// `FERRY_BENCH_BUDGET_MIB`: budget of the full-buffer run (default 4).
fn budget_mib() -> u64 {
    std::env::var("FERRY_BENCH_BUDGET_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}
