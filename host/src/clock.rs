//! The wall clock, behind a seam.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds; 0 if the system clock is before 1970.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A source of wall-clock time. Production code uses [`SystemClock`]; tests
/// pass a clock they move by hand.
pub trait Clock: Send + Sync {
    /// Unix time in milliseconds.
    fn now_ms(&self) -> u64;
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        now_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_2020_and_monotone_enough() {
        let a = now_ms();
        let b = SystemClock.now_ms();
        assert!(a > 1_577_836_800_000, "{a}");
        assert!(b >= a);
    }
}
