//! The telemetry buffer on real sled: round trips, ids across restarts and
//! crashes, the budget and its priorities, corruption, concurrency, the lock.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::buffer::{Buffer, BufferError, BufferOptions, RECORD_OVERHEAD, Record};
use ferry_protocol::Stream;

fn options(dir: &Path, max_bytes: u64) -> BufferOptions {
    BufferOptions {
        path: dir.join("buffer"),
        max_bytes,
        // Long: these tests flush explicitly or on drop.
        flush_interval: Duration::from_secs(3600),
        cache_bytes: 1 << 20,
    }
}

fn open(dir: &Path, max_bytes: u64) -> Buffer {
    Buffer::open(options(dir, max_bytes)).unwrap()
}

/// A payload of `len` bytes.
fn put(b: &Buffer, stream: Stream, len: usize) -> Result<u64, BufferError> {
    b.append(stream, |_| vec![b'x'; len])
}

fn all(b: &Buffer, stream: Stream) -> Vec<u64> {
    b.read(stream, 0, usize::MAX, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect()
}

/// sled directly, for damage. A sled handle closed a moment ago may hold
/// its lock a little longer (its background threads finish): retry.
fn open_sled(path: &Path) -> sled::Db {
    let started = std::time::Instant::now();
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                assert!(e.to_string().contains("lock"), "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn options_from_config_put_the_buffer_under_the_state_dir() {
    let c = ferry_agent::config::BufferConfig::default();
    let o = BufferOptions::from_config(Path::new("/var/lib/ferry-agent"), &c);
    assert_eq!(o.path, Path::new("/var/lib/ferry-agent/buffer"));
    assert_eq!(o.max_bytes, c.max_bytes);
    assert_eq!(o.flush_interval, Duration::from_millis(c.flush_interval_ms));
    assert_eq!(o.cache_bytes, c.cache_bytes);
}

#[test]
fn append_read_ack_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), 1 << 20);
    let mut ids = Vec::new();
    for n in 0..5 {
        let id = b
            .append(Stream::Telemetry, |id| {
                format!("{{\"id\":{id},\"n\":{n}}}").into_bytes()
            })
            .unwrap();
        ids.push(id);
    }
    let event = b
        .append(Stream::Events, |id| format!("event {id}").into_bytes())
        .unwrap();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert!(event > ids[4]);
    assert_eq!(b.pending(Stream::Telemetry), 5);
    assert_eq!(b.pending(Stream::Events), 1);
    assert_eq!(b.pending(Stream::Drift), 0);

    // The payload is what the closure built with the assigned id.
    let got = b.read(Stream::Telemetry, 0, 100, usize::MAX).unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(
        got[2],
        Record {
            id: ids[2],
            stream: Stream::Telemetry,
            payload: format!("{{\"id\":{},\"n\":2}}", ids[2]).into_bytes(),
        }
    );
    // Streams are separate.
    assert_eq!(all(&b, Stream::Events), vec![event]);
    // Paging: by count, after an id, by bytes (but always one record).
    let page: Vec<u64> = b
        .read(Stream::Telemetry, 0, 2, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(page, ids[..2]);
    let page: Vec<u64> = b
        .read(Stream::Telemetry, ids[1], 2, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(page, ids[2..4]);
    let len = got[0].payload.len();
    assert_eq!(b.read(Stream::Telemetry, 0, 100, 2 * len).unwrap().len(), 2);
    assert_eq!(b.read(Stream::Telemetry, 0, 100, 1).unwrap().len(), 1);
    assert!(
        b.read(Stream::Telemetry, ids[4], 100, usize::MAX)
            .unwrap()
            .is_empty()
    );
    assert!(
        b.read(Stream::Telemetry, 0, 0, usize::MAX)
            .unwrap()
            .is_empty()
    );

    let stats = b.stats();
    assert_eq!(stats.records, 6);
    let payload_bytes: u64 = got.iter().map(|r| r.payload.len() as u64).sum::<u64>()
        + format!("event {event}").len() as u64;
    assert_eq!(stats.bytes, payload_bytes + 6 * RECORD_OVERHEAD);
    assert_eq!(stats.budget_bytes, 1 << 20);
    assert_eq!(stats.corrupt, 0);
    assert!(Stream::ALL.iter().all(|s| stats.dropped[s] == 0));

    // Ack deletes, idempotently; unknown ids are ignored.
    b.ack(Stream::Telemetry, &ids[..3]).unwrap();
    b.ack(Stream::Telemetry, &ids[..3]).unwrap();
    b.ack(Stream::Telemetry, &[999_999_999]).unwrap();
    assert_eq!(all(&b, Stream::Telemetry), ids[3..]);
    assert_eq!(b.pending(Stream::Telemetry), 2);
    // Acking on the wrong stream deletes nothing.
    b.ack(Stream::Events, &ids[3..]).unwrap();
    assert_eq!(b.pending(Stream::Telemetry), 2);
    b.ack(Stream::Telemetry, &ids[3..]).unwrap();
    b.ack(Stream::Events, &[event]).unwrap();
    assert_eq!(b.stats().records, 0);
    assert_eq!(b.stats().bytes, 0);

    // What was not acknowledged survives a restart.
    let kept = put(&b, Stream::Drift, 10).unwrap();
    drop(b);
    let b = open(dir.path(), 1 << 20);
    assert_eq!(all(&b, Stream::Drift), vec![kept]);
    assert_eq!(b.stats().records, 1);
    assert_eq!(b.stats().bytes, 10 + RECORD_OVERHEAD);
}

#[test]
fn ids_increase_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = 0;
    for _ in 0..3 {
        let b = open(dir.path(), 1 << 20);
        for s in Stream::ALL {
            let id = put(&b, s, 4).unwrap();
            assert!(id > last, "{id} after {last}");
            last = id;
        }
        // Everything acknowledged: the counter must not restart from the
        // largest stored id.
        for s in Stream::ALL {
            let ids = all(&b, s);
            b.ack(s, &ids).unwrap();
        }
        assert_eq!(b.stats().records, 0);
    }
}

#[test]
fn a_crash_without_flush_never_brings_an_id_back() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let b = open(dir.path(), 1 << 20);
    let durable: Vec<u64> = (0..10)
        .map(|_| put(&b, Stream::Telemetry, 50).unwrap())
        .collect();
    b.flush().unwrap();
    assert_eq!(b.flushed_id(), *durable.last().unwrap());
    let unflushed: Vec<u64> = (0..10)
        .map(|_| put(&b, Stream::Events, 50).unwrap())
        .collect();
    // Sent and acknowledged before any flush: the broker has seen these ids.
    b.ack(Stream::Events, &unflushed[..5]).unwrap();
    assert_eq!(b.flushed_id(), *durable.last().unwrap());
    // What a SIGKILL leaves: the files as they are now, without the flush
    // that a clean close does.
    copy_dir(&dir.path().join("buffer"), &crashed.path().join("buffer"));
    let after = open(crashed.path(), 1 << 20);
    assert_eq!(
        all(&after, Stream::Telemetry),
        durable,
        "flushed records survive"
    );
    // Unflushed ones may or may not; their ids are never handed out again.
    let next = put(&after, Stream::Samples, 1).unwrap();
    assert!(next > *unflushed.last().unwrap(), "{next} reuses an id");
    drop(after);
    drop(b);
}

#[test]
fn full_budget_drops_lowest_priority_first_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    // Room for exactly 10 records of 84 payload bytes (100 budget bytes each).
    let rec = 100 - RECORD_OVERHEAD as usize;
    let budget = 1000;
    let b = open(dir.path(), budget);
    let samples: Vec<u64> = (0..4)
        .map(|_| put(&b, Stream::Samples, rec).unwrap())
        .collect();
    let telemetry: Vec<u64> = (0..4)
        .map(|_| put(&b, Stream::Telemetry, rec).unwrap())
        .collect();
    let events: Vec<u64> = (0..2)
        .map(|_| put(&b, Stream::Events, rec).unwrap())
        .collect();
    assert_eq!(b.stats().bytes, budget);

    // A sample when full evicts the oldest sample.
    let s5 = put(&b, Stream::Samples, rec).unwrap();
    assert_eq!(all(&b, Stream::Samples), [&samples[1..], &[s5]].concat());
    // Telemetry evicts samples (lower) before any telemetry, oldest first.
    let t5 = put(&b, Stream::Telemetry, rec).unwrap();
    let t6 = put(&b, Stream::Telemetry, rec).unwrap();
    assert_eq!(all(&b, Stream::Samples), vec![samples[3], s5]);
    assert_eq!(
        all(&b, Stream::Telemetry),
        [&telemetry[..], &[t5, t6]].concat()
    );
    // A drift report needing room for two evicts the two remaining samples.
    let d1 = b
        .append(Stream::Drift, |_| {
            vec![b'd'; 2 * rec + RECORD_OVERHEAD as usize]
        })
        .unwrap();
    assert_eq!(b.pending(Stream::Samples), 0);
    // Now only higher priorities remain for a sample: it is refused.
    let err = put(&b, Stream::Samples, rec).unwrap_err();
    assert!(
        matches!(
            err,
            BufferError::Full {
                stream: Stream::Samples
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.code(), "buffer_full");
    // An event evicts the oldest telemetry, never drift or events.
    let e3 = put(&b, Stream::Events, rec).unwrap();
    assert_eq!(
        all(&b, Stream::Telemetry),
        [&telemetry[1..], &[t5, t6]].concat()
    );
    assert_eq!(all(&b, Stream::Events), [&events[..], &[e3]].concat());
    assert_eq!(all(&b, Stream::Drift), vec![d1]);
    assert!(b.stats().bytes <= budget);

    // Larger than the whole budget: a clear error, counted.
    let err = put(&b, Stream::Events, budget as usize).unwrap_err();
    assert!(
        matches!(
            err,
            BufferError::TooLarge {
                stream: Stream::Events,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.code(), "buffer_record_too_large");
    assert!(
        err.to_string().contains("exceeds the buffer budget"),
        "{err}"
    );

    let dropped = b.stats().dropped;
    // Samples: 1 + 2 (for telemetry) + 2 (for drift) evicted, 1 refused.
    assert_eq!(dropped[&Stream::Samples], 6);
    assert_eq!(dropped[&Stream::Telemetry], 1);
    assert_eq!(dropped[&Stream::Drift], 0);
    assert_eq!(dropped[&Stream::Events], 1);
    // Left: 5 telemetry, 3 events, the double-size drift report.
    assert_eq!(b.stats().records, 9);

    // Counts survive a restart.
    drop(b);
    let b = open(dir.path(), budget);
    assert_eq!(b.stats().dropped, dropped);
    assert_eq!(b.stats().bytes, budget);
    // Refusal when only higher priorities remain does not evict anything.
    let before: Vec<Vec<u64>> = Stream::ALL.iter().map(|&s| all(&b, s)).collect();
    put(&b, Stream::Samples, rec).unwrap_err();
    let after: Vec<Vec<u64>> = Stream::ALL.iter().map(|&s| all(&b, s)).collect();
    assert_eq!(before, after);
}

#[test]
fn equal_priorities_evict_the_oldest_across_streams() {
    let dir = tempfile::tempdir().unwrap();
    let rec = 100 - RECORD_OVERHEAD as usize;
    let b = open(dir.path(), 300);
    let d1 = put(&b, Stream::Drift, rec).unwrap();
    let e1 = put(&b, Stream::Events, rec).unwrap();
    let d2 = put(&b, Stream::Drift, rec).unwrap();
    // Drift and events share the top priority: the oldest of both goes.
    let e2 = put(&b, Stream::Events, rec).unwrap();
    assert_eq!(all(&b, Stream::Drift), vec![d2], "{d1} evicted");
    assert_eq!(all(&b, Stream::Events), vec![e1, e2]);
    let d3 = put(&b, Stream::Drift, rec).unwrap();
    assert_eq!(all(&b, Stream::Events), vec![e2], "{e1} evicted");
    assert_eq!(all(&b, Stream::Drift), vec![d2, d3]);
    assert_eq!(b.stats().dropped[&Stream::Drift], 1);
    assert_eq!(b.stats().dropped[&Stream::Events], 1);
}

#[test]
fn corrupt_records_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), 1 << 20);
    let ids: Vec<u64> = (0..4)
        .map(|_| put(&b, Stream::Telemetry, 30).unwrap())
        .collect();
    drop(b);
    {
        // Damage the store behind the buffer's back (it is closed).
        let db = open_sled(&dir.path().join("buffer"));
        let tree = db.open_tree("stream/telemetry").unwrap();
        let key = ids[1].to_be_bytes();
        let mut value = tree.get(key).unwrap().unwrap().to_vec();
        value[10] ^= 0x01;
        tree.insert(key, value).unwrap();
        tree.insert(ids[2].to_be_bytes(), &b"not a record"[..])
            .unwrap();
        db.flush().unwrap();
    }
    let b = open(dir.path(), 1 << 20);
    assert_eq!(all(&b, Stream::Telemetry), vec![ids[0], ids[3]]);
    let stats = b.stats();
    assert_eq!(stats.corrupt, 2);
    assert_eq!(stats.records, 2);
    assert_eq!(stats.bytes, 2 * (30 + RECORD_OVERHEAD));
    // Counted once, and persisted.
    drop(b);
    let b = open(dir.path(), 1 << 20);
    assert_eq!(b.stats().corrupt, 2);
    assert_eq!(all(&b, Stream::Telemetry), vec![ids[0], ids[3]]);
}

#[test]
fn concurrent_appends_get_unique_ids_and_readers_miss_none() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(open(dir.path(), 1 << 30));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader following the stream with an `after` cursor while appends
    // run must see every id.
    let reader = {
        let (b, done) = (b.clone(), done.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut after = 0;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::Acquire);
                let page = b.read(Stream::Telemetry, after, 97, usize::MAX).unwrap();
                if let Some(last) = page.last() {
                    after = last.id;
                }
                seen.extend(page.iter().map(|r| r.id));
                if finished && page.is_empty() {
                    return seen;
                }
            }
        })
    };
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || {
                (0..PER_THREAD)
                    .map(|n| {
                        let stream = if n % 10 == 0 {
                            Stream::Events
                        } else {
                            Stream::Telemetry
                        };
                        let id = b
                            .append(stream, |id| format!("{t}:{n}:{id}").into_bytes())
                            .unwrap();
                        (stream, id)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut appended = Vec::new();
    for w in writers {
        let mine = w.join().unwrap();
        // Each thread sees its own ids increase.
        assert!(mine.windows(2).all(|w| w[0].1 < w[1].1));
        appended.extend(mine);
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let seen = reader.join().unwrap();

    let unique: BTreeSet<u64> = appended.iter().map(|a| a.1).collect();
    assert_eq!(unique.len(), THREADS * PER_THREAD, "duplicate ids");
    let telemetry: Vec<u64> = appended
        .iter()
        .filter(|a| a.0 == Stream::Telemetry)
        .map(|a| a.1)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        seen, telemetry,
        "the following reader missed or repeated records"
    );
    assert_eq!(all(&b, Stream::Telemetry), telemetry);
    let events = all(&b, Stream::Events);
    assert_eq!(events.len(), THREADS * PER_THREAD / 10);
    // Payloads carry their own ids.
    for r in b.read(Stream::Events, 0, usize::MAX, usize::MAX).unwrap() {
        let text = String::from_utf8(r.payload).unwrap();
        assert!(text.ends_with(&format!(":{}", r.id)), "{text} for {}", r.id);
    }
    assert_eq!(b.stats().records, (THREADS * PER_THREAD) as u64);
}

#[test]
fn a_second_open_fails_with_locked() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), 1 << 20);
    let err = Buffer::open(options(dir.path(), 1 << 20)).unwrap_err();
    assert!(matches!(err, BufferError::Locked { .. }), "{err:?}");
    assert_eq!(err.code(), "buffer_locked");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(b);
    // Released on close.
    let b = open(dir.path(), 1 << 20);
    put(&b, Stream::Events, 1).unwrap();
}

#[test]
fn buffer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Buffer>();
}
