//! The wall clock. Code whose decisions depend on time (rollouts,
//! retraining, probation) takes `now_ms` as an argument, so tests pass the
//! time they want; only the callers at the edge read this clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds; 0 if the system clock is before 1970.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_2020_and_monotone_enough() {
        let a = now_ms();
        let b = now_ms();
        assert!(a > 1_577_836_800_000, "{a}");
        assert!(b >= a);
    }
}
