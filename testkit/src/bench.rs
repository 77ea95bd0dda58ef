//! What the benchmark binaries share: running `ferry` that must succeed,
//! and the median and microseconds they report.

use std::time::Duration;

/// Runs the workspace's `ferry` with `args` and asserts it exits 0.
pub fn ferry_ok(args: &[&str]) {
    crate::cli::assert_exit(&crate::cli::ferry(args), 0);
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `d` in microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
