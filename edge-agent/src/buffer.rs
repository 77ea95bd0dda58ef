//! The telemetry buffer: records waiting for the broker, on disk (sled).
//!
//! Every stream ([`Stream`]) is a queue of records in id order. The agent
//! appends (inference never waits on the network), the MQTT task reads
//! batches after the last id it published and acknowledges them once the
//! broker sent PUBACK. Delivery is at least once: receivers drop duplicates
//! by record id.
//!
//! # Durability contract
//! - **Checksummed records.** Every record carries a CRC-32 of its id, its
//!   format version and its payload. A record that fails the check (or has an
//!   unknown version byte or a malformed key) is never returned: it is
//!   removed, logged with the code of [`BufferError::Corrupt`]
//!   (`buffer_corrupt_record`) and counted in [`BufferInfo::corrupt`]
//!   (persisted). Records are checked when read and, all of them, on open.
//! - **Increasing ids.** Ids start at 1, strictly increase across all streams
//!   and are never reused, even across crashes and restarts; they may have
//!   gaps (refused records, restarts). The id counter is reserved in blocks
//!   of [`ID_BLOCK`]: a block's upper bound is written *and flushed* before
//!   any id in it is handed out, so not even a power cut can make an id come
//!   back (an id the broker acknowledged could otherwise be given to a new
//!   record, which receivers would then drop as a duplicate). On open the
//!   counter resumes above both that mark and the largest stored id.
//! - **No missed records.** An id is allocated and its record inserted under
//!   one lock, and [`Buffer::read`] returns nothing above the last completed
//!   insert, so a reader asking for `id > after` never sees an id before a
//!   smaller one has become visible.
//! - **Deletion only after acknowledgement**, with two counted exceptions: a
//!   full budget evicts the lowest-priority records (counted per stream in
//!   [`BufferInfo::dropped`], persisted with every flush), and corrupt
//!   records are removed (above). Nothing else deletes.
//! - **Loss window.** sled keeps recent writes in an in-memory log buffer;
//!   only a flush is sure to write and fsync them. This buffer flushes every
//!   [`BufferOptions::flush_interval`] (on its own thread; sled's flusher is
//!   off), on [`Buffer::flush`] and when dropped. A process crash (SIGKILL,
//!   abort, OOM kill), not only a power cut, can therefore lose what happened
//!   since the last flush, about one interval at most: appended records are
//!   gone, acknowledged ones come back and are sent again, drop counts
//!   lag. Every append that returned before [`Buffer::flush`] was called is
//!   durable once it returns `Ok`; [`Buffer::flushed_id`] says up to which
//!   id. A zero interval flushes on every append (durable on return, much
//!   slower).
//! - **One process.** [`Buffer::open`] takes an exclusive lock
//!   ([`LOCK_FILE`] in the buffer's directory, `flock`) before sled opens; a
//!   second opener, in this process or another, gets [`BufferError::Locked`].
//!   The lock goes with the process, so a crash never leaves a stale lock.
//!
//! # Budget and priorities
//! [`BufferOptions::max_bytes`] bounds the stored payload bytes plus
//! [`RECORD_OVERHEAD`] per record (so empty records cannot grow the buffer
//! without bound). sled's own space (log, pages, garbage awaiting
//! compaction) comes on top: with the budget full and records churning, the
//! bench (`benches/buffer.rs`) measured 2.6 times a 32 MiB budget and 3.7
//! times a 4 MiB one on disk. Plan for about three times the budget.
//! Priorities: samples lowest, then telemetry, then drift and events. When a
//! record does not fit, the oldest records of the lowest priority present go
//! first (oldest by id across streams of equal priority), but only records of
//! priority at most the new record's: if those cannot make room, the new
//! record is refused ([`BufferError::Full`]) and nothing is evicted. A record
//! larger than the whole budget is refused with [`BufferError::TooLarge`].
//! Every evicted or refused record is counted per stream.
//!
//! # On-disk layout
//! One ordered key space per stream (sled trees `stream/<name>`) plus `meta`.
//! Record key: the id, 8 bytes big-endian. Record value:
//! `[version u8 = 1][crc32 u32 big-endian][payload]`, the CRC-32 (IEEE,
//! `crc32fast`) taken over key, version byte and payload. `meta` holds
//! big-endian u64 values: `layout` ([`LAYOUT_VERSION`]), `next_id` (the id
//! reservation mark), `dropped/<stream>` and `corrupt`.
//!
//! Changing the format: do not change the meaning of an existing version
//! byte or meta key, and never rename a tree or key (they are persisted).
//! A new record encoding takes a new version byte, and readers keep decoding
//! every older version (so an upgrade keeps the queue); a downgrade counts
//! records of a version it does not know as corrupt. New meta keys may be
//! added (missing means zero). A change that old agents must not read at all
//! bumps [`LAYOUT_VERSION`]: an older agent then refuses to open the buffer
//! ([`BufferError::Unsupported`]) rather than misread it.
//!
//! sled is named only here, behind the small private `Storage` trait (an
//! ordered key-value store with trees, a counter and flush), so a store with
//! durable commits (redb) can replace it if measurements demand it.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

pub use ferry_protocol::{BufferInfo, Stream};

/// Version byte of the record encoding written by this agent.
pub const RECORD_VERSION: u8 = 1;

/// Version of the trees and meta keys. An agent refuses to open a buffer
/// with a higher one.
pub const LAYOUT_VERSION: u64 = 1;

/// Bytes counted against the budget per record on top of its payload: the
/// key (8), the record header (5) and some of the store's own bookkeeping.
pub const RECORD_OVERHEAD: u64 = 16;

/// Ids reserved (and flushed) at a time. A restart skips what was left of
/// the block; 65,536 ids last a device doing 100 predictions a second 10
/// minutes, and a reservation costs one fsync. Ids stay far below 2^53, the
/// largest integer JSON readers in JavaScript keep exactly.
pub const ID_BLOCK: u64 = 1 << 16;

/// The lock file inside the buffer's directory (taken by
/// [`ferry_host::open_sled`]).
pub const LOCK_FILE: &str = ferry_host::LOCK_FILE;

/// Bytes before the payload in a stored value: version (1) and CRC-32 (4).
const HEADER_LEN: usize = 5;

/// How long `open` waits for the buffer's locks (ours, then sled's own): a
/// sled handle dropped by this process a moment ago keeps sled's lock until
/// its background threads finish (seen in tests: reopening right after a
/// close). A second agent on the same directory is refused after it.
const SLED_LOCK_RETRY: Duration = Duration::from_secs(5);

/// Corrupt records logged one by one per scan before only a summary is.
const MAX_CORRUPT_LOGS: usize = 8;

// Meta keys (persisted: never rename).
const META_LAYOUT: &[u8] = b"layout";
const META_NEXT_ID: &[u8] = b"next_id";
const META_CORRUPT: &[u8] = b"corrupt";

fn meta_dropped_key(stream: Stream) -> &'static [u8] {
    match stream {
        Stream::Telemetry => b"dropped/telemetry",
        Stream::Drift => b"dropped/drift",
        Stream::Samples => b"dropped/samples",
        Stream::Events => b"dropped/events",
    }
}

/// Eviction priority: lower goes first.
fn priority(stream: Stream) -> u8 {
    match stream {
        Stream::Samples => 0,
        Stream::Telemetry => 1,
        Stream::Drift | Stream::Events => 2,
    }
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Telemetry => 0,
        Stream::Drift => 1,
        Stream::Samples => 2,
        Stream::Events => 3,
    }
}

/// How to open a [`Buffer`].
#[derive(Debug, Clone)]
pub struct BufferOptions {
    /// The buffer's directory (created if missing).
    pub path: PathBuf,
    /// Byte budget: payloads plus [`RECORD_OVERHEAD`] per record.
    pub max_bytes: u64,
    /// Time between background flushes (the loss window of a crash). Zero
    /// flushes on every append.
    pub flush_interval: Duration,
    /// sled's page cache.
    pub cache_bytes: u64,
}

impl BufferOptions {
    /// The buffer of an agent whose state lives in `dir`: `dir/buffer`.
    pub fn from_config(dir: &Path, c: &crate::config::BufferConfig) -> BufferOptions {
        BufferOptions {
            path: dir.join("buffer"),
            max_bytes: c.max_bytes,
            flush_interval: Duration::from_millis(c.flush_interval_ms),
            cache_bytes: c.cache_bytes,
        }
    }
}

/// A record read back from the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: u64,
    pub stream: Stream,
    pub payload: Vec<u8>,
}

/// What can go wrong with the buffer.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// Another buffer (in this process or another) has this directory open.
    #[error("buffer {} is in use by another process or handle", .path.display())]
    Locked { path: PathBuf },
    /// The buffer's directory or lock file could not be created or opened.
    #[error("cannot open buffer directory {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store failed (disk full, I/O error, corrupt store files).
    #[error("buffer storage failed to {op}")]
    Storage {
        op: &'static str,
        #[source]
        source: StorageError,
    },
    /// The buffer was written by a newer agent with a layout this one does not know.
    #[error("buffer layout version {found} is newer than this agent's ({LAYOUT_VERSION})")]
    Unsupported { found: u64 },
    /// The record is larger than the whole budget; it was dropped (and counted).
    #[error("{stream:?} record of {bytes} bytes exceeds the buffer budget of {budget} bytes")]
    TooLarge {
        stream: Stream,
        /// What the record would count against the budget: its payload
        /// plus [`RECORD_OVERHEAD`].
        bytes: u64,
        budget: u64,
    },
    /// The budget is taken by records of higher priority; the new record was
    /// dropped (and counted).
    #[error("buffer full of higher-priority records: {stream:?} record dropped")]
    Full { stream: Stream },
    /// A stored record failed its check. Never returned: such records are
    /// skipped and removed, logged with this code and counted in
    /// [`BufferInfo::corrupt`].
    #[error("corrupt {stream:?} record (key {key}): {reason}")]
    Corrupt {
        stream: Stream,
        /// The key in hex (the big-endian id when it has 8 bytes).
        key: String,
        reason: &'static str,
    },
}

impl BufferError {
    /// A stable code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            BufferError::Locked { .. } => "buffer_locked",
            BufferError::Io { .. } => "buffer_io",
            BufferError::Storage { .. } => "buffer_storage",
            BufferError::Unsupported { .. } => "buffer_unsupported_layout",
            BufferError::TooLarge { .. } => "buffer_record_too_large",
            BufferError::Full { .. } => "buffer_full",
            BufferError::Corrupt { .. } => "buffer_corrupt_record",
        }
    }
}

/// The underlying store's error, opaque so the store can change.
#[derive(Debug)]
pub struct StorageError(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Not `From`: the public surface does not name sled.
fn sled_err(e: sled::Error) -> StorageError {
    StorageError(Box::new(e))
}

fn storage_err(op: &'static str) -> impl FnOnce(StorageError) -> BufferError {
    move |source| BufferError::Storage { op, source }
}

// ---------------------------------------------------------------------------
// Record format (no I/O).

fn checksum(key: &[u8], version: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(&[version]);
    h.update(payload);
    h.finalize()
}

fn encode(id: u64, payload: &[u8]) -> Vec<u8> {
    let key = id.to_be_bytes();
    let mut value = Vec::with_capacity(HEADER_LEN + payload.len());
    value.push(RECORD_VERSION);
    value.extend_from_slice(&checksum(&key, RECORD_VERSION, payload).to_be_bytes());
    value.extend_from_slice(payload);
    value
}

/// The id of a key, if it is one.
fn key_id(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Checks a stored record: its id and payload, or why it is corrupt.
fn decode<'v>(key: &[u8], value: &'v [u8]) -> Result<(u64, &'v [u8]), &'static str> {
    let id = key_id(key).ok_or("key is not an 8-byte id")?;
    if value.len() < HEADER_LEN {
        return Err("value shorter than the record header");
    }
    if value[0] != RECORD_VERSION {
        return Err("unknown record version");
    }
    let stored = u32::from_be_bytes(value[1..5].try_into().unwrap());
    let payload = &value[HEADER_LEN..];
    if checksum(key, value[0], payload) != stored {
        return Err("checksum mismatch");
    }
    Ok((id, payload))
}

/// Budget bytes of a stored value: payload plus [`RECORD_OVERHEAD`]. A
/// function of the value's length only, so removing a corrupt record frees
/// exactly what it was counted for.
fn cost(value_len: usize) -> u64 {
    (value_len.saturating_sub(HEADER_LEN) as u64) + RECORD_OVERHEAD
}

fn read_u64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.try_into().ok()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Storage seam.

/// A key space of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Space {
    Stream(Stream),
    Meta,
}

/// A visitor of `(key, value)` entries in a scan.
type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// What the buffer needs from a store: ordered key spaces, an atomic
/// counter, and a flush that makes everything before it durable.
trait Storage: Send + Sync {
    fn insert(&self, space: Space, key: &[u8], value: &[u8]) -> Result<(), StorageError>;
    /// Removes a key; the length of the value it held, if any.
    fn remove(&self, space: Space, key: &[u8]) -> Result<Option<usize>, StorageError>;
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// The smallest key.
    fn first_key(&self, space: Space) -> Result<Option<Vec<u8>>, StorageError>;
    /// Visits the entries with key >= `from`, ascending, until `visit` breaks.
    fn scan(&self, space: Space, from: &[u8], visit: &mut Visit<'_>) -> Result<(), StorageError>;
    /// Adds `delta` to the big-endian u64 at `key` (missing or malformed:
    /// zero) atomically; the new value.
    fn add(&self, space: Space, key: &[u8], delta: u64) -> Result<u64, StorageError>;
    /// Makes every write before it durable.
    fn flush(&self) -> Result<(), StorageError>;
}

/// The sled store. Fields drop in order: the trees and the database close
/// (sled flushes on close) before the lock is released.
struct SledStorage {
    streams: [sled::Tree; 4],
    meta: sled::Tree,
    /// The database and the lock file, held as long as the storage lives
    /// (`SledHandle` drops its database before its lock).
    handle: ferry_host::SledHandle,
}

impl SledStorage {
    fn open(opts: &BufferOptions) -> Result<SledStorage, BufferError> {
        let path = &opts.path;
        let io = |source| BufferError::Io {
            path: path.clone(),
            source,
        };
        let config = sled::Config::new()
            .cache_capacity(opts.cache_bytes)
            .mode(sled::Mode::LowSpace)
            // This buffer flushes on its own schedule (to know what is durable).
            .flush_every_ms(None);
        let handle = match ferry_host::open_sled(path, config, SLED_LOCK_RETRY) {
            Ok(h) => h,
            Err(ferry_host::OpenError::Locked { .. }) => {
                return Err(BufferError::Locked { path: path.clone() });
            }
            Err(ferry_host::OpenError::Io { source, .. }) => return Err(io(source)),
            Err(ferry_host::OpenError::Sled { source, .. }) => {
                return Err(storage_err("open")(sled_err(source)));
            }
        };
        let tree = |name: &str| {
            handle
                .db
                .open_tree(name)
                .map_err(|e| storage_err("open")(sled_err(e)))
        };
        Ok(SledStorage {
            streams: [
                tree(tree_name(Stream::Telemetry))?,
                tree(tree_name(Stream::Drift))?,
                tree(tree_name(Stream::Samples))?,
                tree(tree_name(Stream::Events))?,
            ],
            meta: tree("meta")?,
            handle,
        })
    }

    fn tree(&self, space: Space) -> &sled::Tree {
        match space {
            Space::Stream(s) => &self.streams[index(s)],
            Space::Meta => &self.meta,
        }
    }
}

/// sled tree of a stream (persisted: never rename).
fn tree_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Telemetry => "stream/telemetry",
        Stream::Drift => "stream/drift",
        Stream::Samples => "stream/samples",
        Stream::Events => "stream/events",
    }
}

impl Storage for SledStorage {
    fn insert(&self, space: Space, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.tree(space).insert(key, value).map_err(sled_err)?;
        Ok(())
    }

    fn remove(&self, space: Space, key: &[u8]) -> Result<Option<usize>, StorageError> {
        Ok(self
            .tree(space)
            .remove(key)
            .map_err(sled_err)?
            .map(|v| v.len()))
    }

    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .tree(space)
            .get(key)
            .map_err(sled_err)?
            .map(|v| v.to_vec()))
    }

    fn first_key(&self, space: Space) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .tree(space)
            .first()
            .map_err(sled_err)?
            .map(|(k, _)| k.to_vec()))
    }

    fn scan(&self, space: Space, from: &[u8], visit: &mut Visit<'_>) -> Result<(), StorageError> {
        for entry in self.tree(space).range(from..) {
            let (k, v) = entry.map_err(sled_err)?;
            if visit(&k, &v).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn add(&self, space: Space, key: &[u8], delta: u64) -> Result<u64, StorageError> {
        let new = self
            .tree(space)
            .update_and_fetch(key, |old| {
                let old = old.and_then(read_u64).unwrap_or(0);
                Some(old.saturating_add(delta).to_be_bytes().to_vec())
            })
            .map_err(sled_err)?;
        Ok(new.as_deref().and_then(read_u64).unwrap_or(0))
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.handle.db.flush().map_err(sled_err)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The buffer.

/// The telemetry buffer. Cheap to share (`Arc<Buffer>`); every method takes
/// `&self`. See the module documentation for its guarantees.
pub struct Buffer {
    inner: Arc<Inner>,
    flusher: Option<Flusher>,
}

struct Flusher {
    /// Dropping it stops the thread.
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

struct Inner {
    storage: Box<dyn Storage>,
    path: PathBuf,
    max_bytes: u64,
    flush_every_append: bool,
    writer: Mutex<Writer>,
    /// Highest id whose insert completed: readers return nothing above it.
    visible: AtomicU64,
    /// Highest id known durable.
    flushed: AtomicU64,
    records: [AtomicU64; 4],
    bytes: [AtomicU64; 4],
    dropped: [AtomicU64; 4],
    corrupt: AtomicU64,
}

/// The id counter, under the append lock.
struct Writer {
    next_id: u64,
    /// Ids below this are covered by a flushed reservation mark.
    durable_limit: u64,
    /// The last reservation mark written (maybe not yet flushed).
    written_limit: u64,
    /// The drop counters changed since the last flush wrote them.
    dropped_dirty: bool,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("path", &self.inner.path)
            .field("stats", &self.stats())
            .field("flushed_id", &self.flushed_id())
            .finish()
    }
}

/// A damaged buffer that [`Buffer::open_or_recover`] moved aside.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Where the damaged directory now is (a sibling of the buffer's).
    pub moved_to: PathBuf,
    /// Why it could not be opened.
    pub reason: String,
}

impl Buffer {
    /// Opens (or creates) the buffer at `opts.path`, checks every stored
    /// record and starts the flusher thread.
    pub fn open(opts: BufferOptions) -> Result<Buffer, BufferError> {
        let storage = SledStorage::open(&opts)?;
        Buffer::with_storage(Box::new(storage), &opts)
    }

    /// [`Buffer::open`], and when the store's files are damaged (sled
    /// refuses them, or panics on them), moves the directory aside to
    /// `<name>.damaged-<unix ms>` next to it, kept for inspection, and
    /// opens a new, empty buffer. The buffer holds telemetry only: losing
    /// what it held is better than not serving predictions. A buffer in use
    /// by another process, or a directory that cannot be read at all, is
    /// still an error (moving it would not help).
    pub fn open_or_recover(opts: BufferOptions) -> Result<(Buffer, Option<Recovery>), BufferError> {
        let attempt =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Buffer::open(opts.clone())));
        let reason = match attempt {
            Ok(Ok(buffer)) => return Ok((buffer, None)),
            Ok(Err(e @ BufferError::Storage { .. })) => e.to_string(),
            Ok(Err(e)) => return Err(e),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                format!("the store panicked while opening: {what}")
            }
        };
        let name = opts
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "buffer".into());
        let moved_to = opts
            .path
            .with_file_name(format!("{name}.damaged-{}", crate::observe::now_ms()));
        std::fs::rename(&opts.path, &moved_to).map_err(|source| BufferError::Io {
            path: opts.path.clone(),
            source,
        })?;
        let buffer = Buffer::open(opts)?;
        Ok((buffer, Some(Recovery { moved_to, reason })))
    }

    fn with_storage(
        storage: Box<dyn Storage>,
        opts: &BufferOptions,
    ) -> Result<Buffer, BufferError> {
        let inner = Arc::new(Inner::recover(storage, opts)?);
        let flusher = if opts.flush_interval.is_zero() {
            None
        } else {
            let (stop, stopped) = mpsc::channel::<()>();
            let interval = opts.flush_interval;
            let weak = Arc::downgrade(&inner);
            let thread = std::thread::Builder::new()
                .name("ferry-buffer-flush".into())
                .spawn(move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval)
                    {
                        let Some(inner) = weak.upgrade() else { return };
                        if let Err(error) = inner.flush() {
                            tracing::warn!(%error, code = error.code(), "Buffer flush failed");
                        }
                    }
                })
                .map_err(|source| BufferError::Io {
                    path: opts.path.clone(),
                    source,
                })?;
            Some(Flusher { stop, thread })
        };
        Ok(Buffer { inner, flusher })
    }

    /// Appends one record; `payload` gets the id the buffer assigned (records
    /// embed their id in their JSON). Ids strictly increase across all
    /// streams and are never reused, even across restarts.
    ///
    /// `payload` runs under the append lock: keep it short and do not call
    /// the buffer from it. A refused record ([`BufferError::Full`],
    /// [`BufferError::TooLarge`]) is counted as dropped and its id skipped.
    pub fn append(
        &self,
        stream: Stream,
        payload: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<u64, BufferError> {
        let inner = &*self.inner;
        let id = {
            let mut w = inner.lock_writer();
            if w.next_id >= w.durable_limit {
                inner.reserve_ids(&mut w)?;
            }
            let id = w.next_id;
            w.next_id += 1;
            let value = encode(id, &payload(id));
            inner.insert_within_budget(&mut w, stream, id, &value)?;
            inner.visible.store(id, Ordering::Release);
            id
        };
        if inner.flush_every_append {
            inner.flush()?;
        }
        Ok(id)
    }

    /// Up to `max_records` records of `stream` with id > `after`, ascending,
    /// whose payloads add up to at most `max_bytes` (but always at least one
    /// record if there is any). Corrupt records are counted, removed and
    /// skipped.
    pub fn read(
        &self,
        stream: Stream,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, BufferError> {
        let inner = &*self.inner;
        let mut out = Vec::new();
        if max_records == 0 || after == u64::MAX {
            return Ok(out);
        }
        let upto = inner.visible.load(Ordering::Acquire);
        let mut corrupt = Vec::new();
        let mut total = 0usize;
        let from = (after + 1).to_be_bytes();
        inner
            .storage
            .scan(Space::Stream(stream), &from, &mut |key, value| {
                match decode(key, value) {
                    Ok((id, _)) if id > upto => return ControlFlow::Break(()),
                    Ok((id, payload)) => {
                        if !out.is_empty() && total + payload.len() > max_bytes {
                            return ControlFlow::Break(());
                        }
                        total += payload.len();
                        out.push(Record {
                            id,
                            stream,
                            payload: payload.to_vec(),
                        });
                        if out.len() >= max_records {
                            return ControlFlow::Break(());
                        }
                    }
                    Err(reason) => {
                        // Above the visible id is the business of a later read.
                        if key_id(key).is_some_and(|id| id > upto) {
                            return ControlFlow::Break(());
                        }
                        corrupt.push((key.to_vec(), reason));
                    }
                }
                ControlFlow::Continue(())
            })
            .map_err(storage_err("read"))?;
        inner.discard_corrupt(stream, corrupt)?;
        Ok(out)
    }

    /// Deletes records once the broker acknowledged them. Idempotent: ids
    /// that are gone (acknowledged, evicted or never stored) are ignored.
    pub fn ack(&self, stream: Stream, ids: &[u64]) -> Result<(), BufferError> {
        for id in ids {
            self.inner.remove(stream, &id.to_be_bytes())?;
        }
        Ok(())
    }

    /// Writes and fsyncs everything appended or acknowledged before the call.
    pub fn flush(&self) -> Result<(), BufferError> {
        self.inner.flush()
    }

    /// Highest id known durable (flushed): a crash cannot lose a record with
    /// this id or a smaller one (unless acknowledged or evicted).
    pub fn flushed_id(&self) -> u64 {
        self.inner.flushed.load(Ordering::Acquire)
    }

    /// Occupancy and losses; cheap (in-memory counters).
    pub fn stats(&self) -> BufferInfo {
        let i = &*self.inner;
        let sum = |a: &[AtomicU64; 4]| a.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        BufferInfo {
            records: sum(&i.records),
            bytes: sum(&i.bytes),
            budget_bytes: i.max_bytes,
            dropped: Stream::ALL
                .iter()
                .map(|&s| (s, i.dropped[index(s)].load(Ordering::Relaxed)))
                .collect(),
            corrupt: i.corrupt.load(Ordering::Relaxed),
        }
    }

    /// Records of `stream` in the buffer.
    pub fn pending(&self, stream: Stream) -> u64 {
        self.inner.records[index(stream)].load(Ordering::Relaxed)
    }

    /// The buffer's directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(Flusher { stop, thread }) = self.flusher.take() {
            drop(stop);
            let _ = thread.join();
        }
        if let Err(error) = self.inner.flush() {
            tracing::warn!(%error, code = error.code(), "Buffer flush on close failed");
        }
    }
}

impl Inner {
    /// Reads the counters, checks every record (removing corrupt ones) and
    /// reserves the first block of ids.
    fn recover(storage: Box<dyn Storage>, opts: &BufferOptions) -> Result<Inner, BufferError> {
        let inner = Inner {
            storage,
            path: opts.path.clone(),
            max_bytes: opts.max_bytes,
            flush_every_append: opts.flush_interval.is_zero(),
            writer: Mutex::new(Writer {
                next_id: 0,
                durable_limit: 0,
                written_limit: 0,
                dropped_dirty: false,
            }),
            visible: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            records: Default::default(),
            bytes: Default::default(),
            dropped: Default::default(),
            corrupt: AtomicU64::new(0),
        };
        match inner.meta_u64(META_LAYOUT)? {
            Some(found) if found > LAYOUT_VERSION => {
                return Err(BufferError::Unsupported { found });
            }
            Some(_) => {}
            None => inner
                .storage
                .insert(Space::Meta, META_LAYOUT, &LAYOUT_VERSION.to_be_bytes())
                .map_err(storage_err("write meta"))?,
        }
        let corrupt = inner.meta_u64(META_CORRUPT)?.unwrap_or(0);
        inner.corrupt.store(corrupt, Ordering::Relaxed);
        let mut max_id = 0;
        for stream in Stream::ALL {
            let i = index(stream);
            let dropped = inner.meta_u64(meta_dropped_key(stream))?.unwrap_or(0);
            inner.dropped[i].store(dropped, Ordering::Relaxed);
            let (mut records, mut bytes) = (0, 0);
            let mut corrupt = Vec::new();
            inner
                .storage
                .scan(Space::Stream(stream), &[], &mut |key, value| {
                    if let Some(id) = key_id(key) {
                        max_id = max_id.max(id);
                    }
                    match decode(key, value) {
                        Ok(_) => {
                            records += 1;
                            bytes += cost(value.len());
                        }
                        // Counted first, so that discarding subtracts it.
                        Err(reason) => {
                            records += 1;
                            bytes += cost(value.len());
                            corrupt.push((key.to_vec(), reason));
                        }
                    }
                    ControlFlow::Continue(())
                })
                .map_err(storage_err("scan"))?;
            inner.records[i].store(records, Ordering::Relaxed);
            inner.bytes[i].store(bytes, Ordering::Relaxed);
            inner.discard_corrupt(stream, corrupt)?;
        }
        let mark = inner.meta_u64(META_NEXT_ID)?.unwrap_or(0);
        let next_id = mark.max(max_id + 1).max(1);
        {
            let mut w = inner.lock_writer();
            w.next_id = next_id;
            w.durable_limit = next_id;
            w.written_limit = next_id;
            inner.reserve_ids(&mut w)?;
        }
        inner.visible.store(next_id - 1, Ordering::Release);
        inner.flushed.store(next_id - 1, Ordering::Release);
        Ok(inner)
    }

    /// A big-endian u64 of `meta`; a malformed one is logged and ignored.
    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, BufferError> {
        let value = self
            .storage
            .get(Space::Meta, key)
            .map_err(storage_err("read meta"))?;
        let parsed = value.as_deref().and_then(read_u64);
        if value.is_some() && parsed.is_none() {
            let key = String::from_utf8_lossy(key);
            tracing::warn!(%key, "Malformed buffer meta value ignored");
        }
        Ok(parsed)
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        // A panic in an append's payload closure leaves the counter consistent
        // (the id was taken, nothing was inserted): carry on.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the next reservation mark and flushes it, so the ids below it
    /// may be handed out. Rare: the flusher tops the reservation up ahead.
    fn reserve_ids(&self, w: &mut Writer) -> Result<(), BufferError> {
        if w.written_limit <= w.next_id {
            let limit = w.next_id + ID_BLOCK;
            self.storage
                .insert(Space::Meta, META_NEXT_ID, &limit.to_be_bytes())
                .map_err(storage_err("reserve ids"))?;
            w.written_limit = limit;
        }
        let visible = self.visible.load(Ordering::Acquire);
        self.storage.flush().map_err(storage_err("flush"))?;
        w.durable_limit = w.written_limit;
        self.flushed.fetch_max(visible, Ordering::AcqRel);
        Ok(())
    }

    fn flush(&self) -> Result<(), BufferError> {
        let (visible, limit) = {
            let mut w = self.lock_writer();
            // Top up the reservation ahead of need, so appends rarely wait
            // for an fsync.
            if w.written_limit.saturating_sub(w.next_id) < ID_BLOCK / 2 {
                let limit = w.next_id + ID_BLOCK;
                self.storage
                    .insert(Space::Meta, META_NEXT_ID, &limit.to_be_bytes())
                    .map_err(storage_err("reserve ids"))?;
                w.written_limit = limit;
            }
            if w.dropped_dirty {
                for s in Stream::ALL {
                    let n = self.dropped[index(s)].load(Ordering::Acquire);
                    self.storage
                        .insert(Space::Meta, meta_dropped_key(s), &n.to_be_bytes())
                        .map_err(storage_err("count dropped"))?;
                }
                w.dropped_dirty = false;
            }
            (self.visible.load(Ordering::Acquire), w.written_limit)
        };
        self.storage.flush().map_err(storage_err("flush"))?;
        self.flushed.fetch_max(visible, Ordering::AcqRel);
        let mut w = self.lock_writer();
        w.durable_limit = w.durable_limit.max(limit);
        Ok(())
    }

    fn used(&self) -> u64 {
        self.bytes.iter().map(|b| b.load(Ordering::Acquire)).sum()
    }

    /// Evicts what the priorities allow to make room for `value`, then
    /// inserts it; or refuses it. Called under the append lock (`w`).
    fn insert_within_budget(
        &self,
        w: &mut Writer,
        stream: Stream,
        id: u64,
        value: &[u8],
    ) -> Result<(), BufferError> {
        let need = cost(value.len());
        if need > self.max_bytes {
            self.count_dropped(w, stream, 1);
            return Err(BufferError::TooLarge {
                stream,
                bytes: need,
                budget: self.max_bytes,
            });
        }
        let mut evicted = [0u64; 4];
        let fits = self.make_room(stream, need, &mut evicted);
        for s in Stream::ALL {
            if evicted[index(s)] > 0 {
                self.count_dropped(w, s, evicted[index(s)]);
            }
        }
        if !fits? {
            self.count_dropped(w, stream, 1);
            return Err(BufferError::Full { stream });
        }
        let i = index(stream);
        // Counted before it becomes visible, so a concurrent ack never
        // subtracts what was not added.
        self.records[i].fetch_add(1, Ordering::AcqRel);
        self.bytes[i].fetch_add(need, Ordering::AcqRel);
        if let Err(e) = self
            .storage
            .insert(Space::Stream(stream), &id.to_be_bytes(), value)
        {
            saturating_sub(&self.records[i], 1);
            saturating_sub(&self.bytes[i], need);
            return Err(storage_err("append")(e));
        }
        Ok(())
    }

    /// Evicts until `need` more bytes fit; false if the records this stream
    /// may evict cannot make room (then nothing is evicted).
    fn make_room(
        &self,
        stream: Stream,
        need: u64,
        evicted: &mut [u64; 4],
    ) -> Result<bool, BufferError> {
        let p = priority(stream);
        loop {
            let used = self.used();
            if used + need <= self.max_bytes {
                return Ok(true);
            }
            let evictable: u64 = Stream::ALL
                .iter()
                .filter(|&&s| priority(s) <= p)
                .map(|&s| self.bytes[index(s)].load(Ordering::Acquire))
                .sum();
            if used.saturating_sub(evictable) + need > self.max_bytes {
                return Ok(false);
            }
            // The oldest record of the lowest priority present.
            let mut victim: Option<((u8, u64), Stream, Vec<u8>)> = None;
            for s in Stream::ALL {
                if priority(s) > p || self.records[index(s)].load(Ordering::Acquire) == 0 {
                    continue;
                }
                let first = self
                    .storage
                    .first_key(Space::Stream(s))
                    .map_err(storage_err("evict"))?;
                if let Some(key) = first {
                    // A malformed key (corruption) sorts as oldest: garbage first.
                    let rank = (priority(s), key_id(&key).unwrap_or(0));
                    if victim.as_ref().is_none_or(|(r, _, _)| rank < *r) {
                        victim = Some((rank, s, key));
                    }
                }
            }
            let Some((_, s, key)) = victim else {
                return Ok(false);
            };
            if self.remove(s, &key)? {
                evicted[index(s)] += 1;
            }
        }
    }

    /// Removes a record and its share of the counters; whether it was there.
    fn remove(&self, stream: Stream, key: &[u8]) -> Result<bool, BufferError> {
        let removed = self
            .storage
            .remove(Space::Stream(stream), key)
            .map_err(storage_err("remove"))?;
        if let Some(len) = removed {
            saturating_sub(&self.records[index(stream)], 1);
            saturating_sub(&self.bytes[index(stream)], cost(len));
        }
        Ok(removed.is_some())
    }

    /// Counts dropped records; persisted by the next flush (under the
    /// append lock, like every change of the drop counters).
    fn count_dropped(&self, w: &mut Writer, stream: Stream, n: u64) {
        self.dropped[index(stream)].fetch_add(n, Ordering::AcqRel);
        w.dropped_dirty = true;
    }

    /// Logs, removes and counts corrupt records.
    fn discard_corrupt(
        &self,
        stream: Stream,
        corrupt: Vec<(Vec<u8>, &'static str)>,
    ) -> Result<(), BufferError> {
        if corrupt.is_empty() {
            return Ok(());
        }
        let mut removed = 0;
        for (n, (key, reason)) in corrupt.iter().enumerate() {
            if n < MAX_CORRUPT_LOGS {
                let error = BufferError::Corrupt {
                    stream,
                    key: hex(key),
                    reason,
                };
                tracing::warn!(%error, code = error.code(), "Corrupt buffer record removed");
            }
            // Another reader may have removed it already: count it once.
            if self.remove(stream, key)? {
                removed += 1;
            }
        }
        if corrupt.len() > MAX_CORRUPT_LOGS {
            tracing::warn!(
                stream = stream.as_str(),
                count = corrupt.len(),
                code = "buffer_corrupt_record",
                "Corrupt buffer records removed"
            );
        }
        if removed > 0 {
            let total = self
                .storage
                .add(Space::Meta, META_CORRUPT, removed)
                .map_err(storage_err("count corrupt"))?;
            self.corrupt.fetch_max(total, Ordering::AcqRel);
        }
        Ok(())
    }
}

fn saturating_sub(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(n))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    type Tree = BTreeMap<Vec<u8>, Vec<u8>>;

    /// An in-memory store that keeps what was flushed apart from what was
    /// written, so tests can crash it, and fails on demand.
    #[derive(Default)]
    struct MemState {
        live: BTreeMap<Space, Tree>,
        durable: BTreeMap<Space, Tree>,
        fail_inserts: bool,
        fail_flush: bool,
        flushes: u64,
    }

    #[derive(Clone, Default)]
    struct Mem(Arc<Mutex<MemState>>);

    impl Mem {
        fn state(&self) -> MutexGuard<'_, MemState> {
            self.0.lock().unwrap()
        }

        /// What a power cut leaves: only flushed writes.
        fn crash(&self) -> Mem {
            let durable = self.state().durable.clone();
            Mem(Arc::new(Mutex::new(MemState {
                live: durable.clone(),
                durable,
                ..MemState::default()
            })))
        }

        fn fault() -> StorageError {
            StorageError(Box::new(std::io::Error::other("injected fault")))
        }
    }

    impl Storage for Mem {
        fn insert(&self, space: Space, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
            let mut s = self.state();
            if s.fail_inserts {
                return Err(Mem::fault());
            }
            s.live
                .entry(space)
                .or_default()
                .insert(key.to_vec(), value.to_vec());
            Ok(())
        }

        fn remove(&self, space: Space, key: &[u8]) -> Result<Option<usize>, StorageError> {
            Ok(self
                .state()
                .live
                .entry(space)
                .or_default()
                .remove(key)
                .map(|v| v.len()))
        }

        fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
            Ok(self
                .state()
                .live
                .get(&space)
                .and_then(|t| t.get(key))
                .cloned())
        }

        fn first_key(&self, space: Space) -> Result<Option<Vec<u8>>, StorageError> {
            Ok(self
                .state()
                .live
                .get(&space)
                .and_then(|t| t.keys().next().cloned()))
        }

        fn scan(
            &self,
            space: Space,
            from: &[u8],
            visit: &mut Visit<'_>,
        ) -> Result<(), StorageError> {
            let entries: Vec<_> = match self.state().live.get(&space) {
                Some(t) => t
                    .range(from.to_vec()..)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                None => Vec::new(),
            };
            for (k, v) in entries {
                if visit(&k, &v).is_break() {
                    break;
                }
            }
            Ok(())
        }

        fn add(&self, space: Space, key: &[u8], delta: u64) -> Result<u64, StorageError> {
            let mut s = self.state();
            let slot = s
                .live
                .entry(space)
                .or_default()
                .entry(key.to_vec())
                .or_default();
            let new = read_u64(slot).unwrap_or(0) + delta;
            *slot = new.to_be_bytes().to_vec();
            Ok(new)
        }

        fn flush(&self) -> Result<(), StorageError> {
            let mut s = self.state();
            if s.fail_flush {
                return Err(Mem::fault());
            }
            s.durable = s.live.clone();
            s.flushes += 1;
            Ok(())
        }
    }

    fn opts(max_bytes: u64) -> BufferOptions {
        BufferOptions {
            path: PathBuf::from("/nonexistent/mem"),
            max_bytes,
            // Long: tests flush explicitly.
            flush_interval: Duration::from_secs(3600),
            cache_bytes: 0,
        }
    }

    fn open(mem: &Mem, max_bytes: u64) -> Buffer {
        Buffer::with_storage(Box::new(mem.clone()), &opts(max_bytes)).unwrap()
    }

    fn put(b: &Buffer, s: Stream, len: usize) -> Result<u64, BufferError> {
        b.append(s, |_| vec![b'x'; len])
    }

    fn ids(b: &Buffer, s: Stream) -> Vec<u64> {
        b.read(s, 0, usize::MAX, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect()
    }

    #[test]
    fn record_format_round_trips_and_detects_damage() {
        let value = encode(7, b"hello");
        assert_eq!(value[0], RECORD_VERSION);
        assert_eq!(value.len(), HEADER_LEN + 5);
        let key = 7u64.to_be_bytes();
        assert_eq!(decode(&key, &value), Ok((7, &b"hello"[..])));
        // Same value under another key: the checksum covers the id.
        assert_eq!(
            decode(&8u64.to_be_bytes(), &value),
            Err("checksum mismatch")
        );
        for i in 0..value.len() {
            let mut bad = value.clone();
            bad[i] ^= 0x10;
            assert!(decode(&key, &bad).is_err(), "flip at byte {i} undetected");
        }
        assert_eq!(
            decode(&key, &value[..3]),
            Err("value shorter than the record header")
        );
        assert_eq!(decode(&[1, 2], &value), Err("key is not an 8-byte id"));
        assert_eq!(cost(value.len()), 5 + RECORD_OVERHEAD);
    }

    #[test]
    fn crash_without_flush_never_reuses_ids() {
        let mem = Mem::default();
        let b = open(&mem, 1 << 20);
        let first = put(&b, Stream::Telemetry, 10).unwrap();
        b.flush().unwrap();
        assert_eq!(b.flushed_id(), first);
        let lost: Vec<u64> = (0..5)
            .map(|_| put(&b, Stream::Events, 10).unwrap())
            .collect();
        // Acknowledged before any flush: the broker has these ids.
        b.ack(Stream::Events, &lost).unwrap();
        assert_eq!(b.flushed_id(), first);
        let crashed = mem.crash();
        std::mem::forget(b); // no flush on drop: a crash
        let b = open(&crashed, 1 << 20);
        assert_eq!(ids(&b, Stream::Telemetry), vec![first]);
        assert_eq!(b.pending(Stream::Events), 0);
        let next = put(&b, Stream::Events, 10).unwrap();
        assert!(
            next > *lost.last().unwrap(),
            "{next} reuses an id handed out before the crash"
        );
    }

    #[test]
    fn id_reservations_are_flushed_before_use_and_topped_up_ahead() {
        let mem = Mem::default();
        let b = open(&mem, 1 << 30);
        let flushes = || mem.state().flushes;
        let mark = || read_u64(&mem.state().durable[&Space::Meta][META_NEXT_ID]).unwrap();
        assert_eq!(flushes(), 1, "open flushes the first reservation");
        assert_eq!(mark(), 1 + ID_BLOCK);
        for _ in 0..ID_BLOCK {
            put(&b, Stream::Samples, 0).unwrap();
        }
        assert_eq!(flushes(), 1, "a block is used without any fsync");
        // The first id past the block waits for a new, flushed reservation.
        let id = put(&b, Stream::Samples, 0).unwrap();
        assert_eq!(id, ID_BLOCK + 1);
        assert_eq!(flushes(), 2);
        assert_eq!(mark(), id + ID_BLOCK);
        // Half a block later, a (periodic) flush tops the reservation up...
        for _ in 0..ID_BLOCK / 2 {
            put(&b, Stream::Samples, 0).unwrap();
        }
        b.flush().unwrap();
        assert_eq!(flushes(), 3);
        let topped = mark();
        assert_eq!(topped, id + ID_BLOCK / 2 + 1 + ID_BLOCK);
        // ...so the appends that follow need no fsync of their own.
        for _ in 0..ID_BLOCK / 2 {
            put(&b, Stream::Samples, 0).unwrap();
        }
        assert_eq!(flushes(), 3);
        std::mem::forget(b);
        let b = open(&mem.crash(), 1 << 30);
        assert_eq!(put(&b, Stream::Samples, 0).unwrap(), topped);
    }

    #[test]
    fn flush_every_append_when_interval_is_zero() {
        let mem = Mem::default();
        let mut o = opts(1 << 20);
        o.flush_interval = Duration::ZERO;
        let b = Buffer::with_storage(Box::new(mem.clone()), &o).unwrap();
        let id = put(&b, Stream::Drift, 3).unwrap();
        assert_eq!(b.flushed_id(), id);
        std::mem::forget(b);
        let b = open(&mem.crash(), 1 << 20);
        assert_eq!(ids(&b, Stream::Drift), vec![id]);
    }

    #[test]
    fn background_flusher_advances_flushed_id() {
        let mem = Mem::default();
        let mut o = opts(1 << 20);
        o.flush_interval = Duration::from_millis(10);
        let b = Buffer::with_storage(Box::new(mem.clone()), &o).unwrap();
        let id = put(&b, Stream::Telemetry, 3).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while b.flushed_id() < id {
            assert!(
                std::time::Instant::now() < deadline,
                "flusher never flushed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn corrupt_records_found_while_open_are_counted_and_skipped() {
        let mem = Mem::default();
        let b = open(&mem, 1 << 20);
        let a = put(&b, Stream::Telemetry, 20).unwrap();
        let bad = put(&b, Stream::Telemetry, 20).unwrap();
        let c = put(&b, Stream::Telemetry, 20).unwrap();
        let before = b.stats();
        {
            // Flip one payload bit of the middle record (same length).
            let mut s = mem.state();
            let v = s
                .live
                .get_mut(&Space::Stream(Stream::Telemetry))
                .unwrap()
                .get_mut(&bad.to_be_bytes()[..])
                .unwrap();
            v[HEADER_LEN + 3] ^= 1;
        }
        assert_eq!(ids(&b, Stream::Telemetry), vec![a, c]);
        let after = b.stats();
        assert_eq!(after.corrupt, 1);
        assert_eq!(after.records, 2);
        assert_eq!(after.bytes, before.bytes - (20 + RECORD_OVERHEAD));
        assert!(
            !mem.state().live[&Space::Stream(Stream::Telemetry)]
                .contains_key(&bad.to_be_bytes()[..])
        );
        // Persisted.
        drop(b);
        assert_eq!(open(&mem, 1 << 20).stats().corrupt, 1);
    }

    #[test]
    fn corrupt_records_found_on_open_are_removed() {
        let mem = Mem::default();
        let b = open(&mem, 1 << 20);
        let a = put(&b, Stream::Samples, 20).unwrap();
        drop(b);
        {
            let mut s = mem.state();
            let t = s.live.get_mut(&Space::Stream(Stream::Samples)).unwrap();
            t.insert(vec![1, 2, 3], b"garbage key".to_vec());
            t.insert(999_999u64.to_be_bytes().to_vec(), vec![9, 0, 0, 0, 0, b'x']);
            t.insert(999_998u64.to_be_bytes().to_vec(), vec![1]);
        }
        let b = open(&mem, 1 << 20);
        assert_eq!(b.stats().corrupt, 3);
        assert_eq!(b.stats().records, 1);
        assert_eq!(b.stats().bytes, 20 + RECORD_OVERHEAD);
        assert_eq!(ids(&b, Stream::Samples), vec![a]);
        // The ids of corrupt records are never reused either.
        assert!(put(&b, Stream::Samples, 1).unwrap() > 999_999);
    }

    #[test]
    fn newer_layout_is_refused() {
        let mem = Mem::default();
        mem.insert(
            Space::Meta,
            META_LAYOUT,
            &(LAYOUT_VERSION + 1).to_be_bytes(),
        )
        .unwrap();
        let err = Buffer::with_storage(Box::new(mem), &opts(1 << 20)).unwrap_err();
        assert_eq!(err.code(), "buffer_unsupported_layout");
    }

    #[test]
    fn failed_insert_changes_no_counter() {
        let mem = Mem::default();
        let b = open(&mem, 1 << 20);
        put(&b, Stream::Events, 10).unwrap();
        let before = b.stats();
        mem.state().fail_inserts = true;
        let err = put(&b, Stream::Events, 10).unwrap_err();
        assert_eq!(err.code(), "buffer_storage");
        assert_eq!(b.stats(), before);
        mem.state().fail_inserts = false;
        let id = put(&b, Stream::Events, 10).unwrap();
        assert_eq!(ids(&b, Stream::Events).len(), 2);
        assert!(id > 0);
    }

    #[test]
    fn failed_flush_is_reported_and_does_not_advance_flushed_id() {
        let mem = Mem::default();
        let b = open(&mem, 1 << 20);
        let before = b.flushed_id();
        put(&b, Stream::Events, 10).unwrap();
        mem.state().fail_flush = true;
        assert_eq!(b.flush().unwrap_err().code(), "buffer_storage");
        assert_eq!(b.flushed_id(), before);
        mem.state().fail_flush = false;
        b.flush().unwrap();
        assert!(b.flushed_id() > before);
    }

    #[test]
    fn a_panicking_payload_does_not_poison_the_buffer() {
        let mem = Mem::default();
        let b = Arc::new(open(&mem, 1 << 20));
        let b2 = b.clone();
        let r = std::thread::spawn(move || {
            let _ = b2.append(Stream::Telemetry, |_| panic!("payload failed"));
        })
        .join();
        assert!(r.is_err());
        let id = put(&b, Stream::Telemetry, 1).unwrap();
        assert_eq!(ids(&b, Stream::Telemetry), vec![id]);
    }

    #[test]
    fn reads_stop_at_the_last_completed_insert() {
        // A key above the visible id (an insert in flight) is not returned,
        // and not taken for corrupt either.
        let mem = Mem::default();
        let b = open(&mem, 1 << 20);
        let a = put(&b, Stream::Telemetry, 1).unwrap();
        mem.insert(
            Space::Stream(Stream::Telemetry),
            &(a + 1).to_be_bytes(),
            &encode(a + 1, b"in flight"),
        )
        .unwrap();
        assert_eq!(ids(&b, Stream::Telemetry), vec![a]);
        assert_eq!(b.stats().corrupt, 0);
    }

    /// The rules of the budget, stated simply: the model the buffer is
    /// checked against.
    #[derive(Default)]
    struct Model {
        records: Vec<(u64, Stream, u64)>, // (id, stream, cost), ascending ids
        dropped: BTreeMap<Stream, u64>,
    }

    impl Model {
        fn append(&mut self, budget: u64, id: u64, stream: Stream, cost: u64) -> bool {
            if cost > budget {
                *self.dropped.entry(stream).or_default() += 1;
                return false;
            }
            let used: u64 = self.records.iter().map(|r| r.2).sum();
            let keep: u64 = self
                .records
                .iter()
                .filter(|r| priority(r.1) > priority(stream))
                .map(|r| r.2)
                .sum();
            if keep + cost > budget {
                *self.dropped.entry(stream).or_default() += 1;
                return false;
            }
            let mut used = used;
            while used + cost > budget {
                let victim = (0..self.records.len())
                    .min_by_key(|&i| (priority(self.records[i].1), self.records[i].0))
                    .unwrap();
                let (_, s, c) = self.records.remove(victim);
                *self.dropped.entry(s).or_default() += 1;
                used -= c;
            }
            self.records.push((id, stream, cost));
            true
        }
    }

    #[test]
    fn randomised_operations_match_the_model() {
        // 64 seeded cases of random appends, acks, reads and restarts; the
        // seed is printed on failure.
        for seed in 0..64u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let budget = rng.u64(100..2000);
            let mut mem = Mem::default();
            let mut b = open(&mem, budget);
            let mut model = Model::default();
            for step in 0..200 {
                let ctx = format!("seed {seed} step {step}");
                match rng.u8(0..10) {
                    0..=6 => {
                        let stream = Stream::ALL[rng.usize(0..4)];
                        let len = rng.usize(0..300);
                        let mut got = 0;
                        let r = b.append(stream, |id| {
                            got = id;
                            vec![7; len]
                        });
                        let kept = model.append(budget, got, stream, len as u64 + RECORD_OVERHEAD);
                        match r {
                            Ok(id) => assert!(kept && id == got, "{ctx}: kept {id}"),
                            Err(BufferError::Full { .. }) => {
                                assert!(!kept && len as u64 + RECORD_OVERHEAD <= budget, "{ctx}")
                            }
                            Err(BufferError::TooLarge { .. }) => {
                                assert!(!kept && len as u64 + RECORD_OVERHEAD > budget, "{ctx}")
                            }
                            Err(e) => panic!("{ctx}: {e}"),
                        }
                    }
                    7 => {
                        let stream = Stream::ALL[rng.usize(0..4)];
                        let got = b.read(stream, 0, rng.usize(1..5), usize::MAX).unwrap();
                        let n = got.len();
                        let acked: Vec<u64> = got.iter().map(|r| r.id).collect();
                        b.ack(stream, &acked).unwrap();
                        b.ack(stream, &acked).unwrap(); // idempotent
                        let before = model.records.len();
                        model.records.retain(|r| !acked.contains(&r.0));
                        assert_eq!(before - model.records.len(), n, "{ctx}");
                    }
                    8 => {
                        drop(b);
                        b = open(&mem, budget);
                    }
                    _ => {
                        // Crash after a flush: nothing is lost.
                        b.flush().unwrap();
                        std::mem::forget(b);
                        mem = mem.crash();
                        b = open(&mem, budget);
                    }
                }
                for stream in Stream::ALL {
                    let want: Vec<u64> = model
                        .records
                        .iter()
                        .filter(|r| r.1 == stream)
                        .map(|r| r.0)
                        .collect();
                    assert_eq!(ids(&b, stream), want, "{ctx} {stream:?}");
                    assert_eq!(b.pending(stream), want.len() as u64, "{ctx}");
                }
                let stats = b.stats();
                let used: u64 = model.records.iter().map(|r| r.2).sum();
                assert_eq!(stats.bytes, used, "{ctx}");
                assert!(stats.bytes <= budget, "{ctx}");
                for stream in Stream::ALL {
                    let want = model.dropped.get(&stream).copied().unwrap_or(0);
                    assert_eq!(stats.dropped[&stream], want, "{ctx} dropped {stream:?}");
                }
            }
        }
    }
}
