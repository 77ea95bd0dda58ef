//! Host chores that every Ferry program needs, written once with one set of
//! guarantees: durable file writes, the clock, and opening a sled database
//! with its lock detected by the lock itself.
//!
//! # Layout
//! - `durable`: [`write_durably`] — unique temporary name, fsync, rename,
//!   directory fsync, cleanup on failure — and [`sync_dir`].
//! - `clock`: [`now_ms`], the one reading of the wall clock.
//! - `http` (feature `http`): [`http::serve`], the HTTP/1.1 accept loop of
//!   the agent and the console: header, body and request timeouts, and a
//!   connection cap where the oldest idle connection makes room.
//! - `kv` (feature `sled`): `open_sled`, the only place in this crate naming sled: a lock
//!   file taken before sled opens, and a busy sled lock told apart from a
//!   real failure by probing the lock (never by matching error text).
//!
//! # Invariants
//! - A crash during [`write_durably`] leaves the old content or the new one
//!   at the target path, never a torn file; a failed write leaves no
//!   temporary file behind.
//! - No function here panics on I/O errors: every failure is a typed error
//!   that names the path and the step.

#![forbid(unsafe_code)]

mod clock;
mod durable;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "sled")]
mod kv;

pub use clock::now_ms;
pub use durable::{WriteError, sync_dir, write_durably};
#[cfg(feature = "sled")]
pub use kv::{LOCK_FILE, OpenError, SledHandle, open_sled};
