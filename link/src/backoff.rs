//! Reconnect delays: [`Backoff`] (the delay of one attempt) and
//! [`Reconnect`] (the attempt count, reset after a stable connection). No
//! I/O: callers pass the time and the random number.

use std::time::Duration;

use tokio::time::Instant;

/// Reconnect delays: doubling from `min`, capped at `max`, with "equal
/// jitter" (uniform in the upper half) so a fleet that lost its broker at
/// once does not come back in lockstep. Used by the agent and the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay before reconnect attempt `attempt` (0 for the first retry);
    /// `unit` is uniform in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        let ceiling = self.min.saturating_mul(factor).min(self.max);
        ceiling
            .mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
            .clamp(self.min, self.max)
    }
}

/// When to reconnect: counts consecutive failed attempts and resets the
/// count only after a connection that lasted `stable_after`, so a broker
/// that accepts and then drops a client at once (duplicate client id,
/// quota) does not see it come back at the minimum delay forever.
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Backoff,
    stable_after: Duration,
    /// Consecutive failed attempts.
    attempt: u32,
    /// The CONNACK of the current connection.
    connected_at: Option<Instant>,
}

impl Reconnect {
    pub fn new(backoff: Backoff, stable_after: Duration) -> Reconnect {
        Reconnect {
            backoff,
            stable_after,
            attempt: 0,
            connected_at: None,
        }
    }

    /// A CONNACK arrived at `now`.
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The connection failed or was lost at `now`: the delay before the next
    /// attempt (`unit` uniform in `[0, 1)`, see [`Backoff::delay`]).
    pub fn failed(&mut self, now: Instant, unit: f64) -> Duration {
        if self
            .connected_at
            .take()
            .is_some_and(|at| now.saturating_duration_since(at) >= self.stable_after)
        {
            self.attempt = 0;
        }
        let delay = self.backoff.delay(self.attempt, unit);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Consecutive failed attempts so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: Backoff = Backoff {
        min: Duration::from_millis(500),
        max: Duration::from_secs(30),
    };

    #[test]
    fn backoff_stays_within_bounds_and_grows() {
        let b = AGENT;
        for attempt in 0..100 {
            for unit in [0.0, 0.25, 0.5, 0.999_999, 1.0, -1.0, -3.0, 7.0, 9.0] {
                let d = b.delay(attempt, unit);
                assert!(
                    d >= b.min && d <= b.max,
                    "attempt {attempt} unit {unit}: {d:?}"
                );
            }
        }
        assert_eq!(b.delay(0, 0.0), b.min);
        // Upper half of a doubling ceiling: 4 s at attempt 3.
        assert_eq!(b.delay(3, 0.0), Duration::from_secs(2));
        assert_eq!(b.delay(3, 1.0), Duration::from_secs(4));
        assert_eq!(b.delay(40, 1.0), b.max);
        assert!(b.delay(40, 0.0) >= b.max / 2);
        let tight = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(100),
        };
        assert_eq!(tight.delay(9, 0.3), Duration::from_millis(100));
    }

    #[test]
    fn only_a_stable_connection_resets_the_attempts() {
        let stable = Duration::from_secs(10);
        let mut r = Reconnect::new(AGENT, stable);
        let t0 = Instant::now();
        // Failed connects: the delay ceiling doubles.
        assert_eq!(r.failed(t0, 1.0), Duration::from_millis(500));
        assert_eq!(r.failed(t0, 1.0), Duration::from_secs(1));
        assert_eq!(r.failed(t0, 1.0), Duration::from_secs(2));
        assert_eq!(r.attempt(), 3);
        // Accepted, then dropped at once: no reset.
        r.connected(t0);
        assert_eq!(
            r.failed(t0 + Duration::from_secs(1), 1.0),
            Duration::from_secs(4)
        );
        assert_eq!(r.attempt(), 4);
        // A connection that lasted: back to the minimum.
        r.connected(t0);
        assert_eq!(r.failed(t0 + stable, 1.0), Duration::from_millis(500));
        assert_eq!(r.attempt(), 1);
        // The CONNACK counts once: a second failure without one grows again.
        assert_eq!(r.failed(t0 + stable * 3, 1.0), Duration::from_secs(1));
    }
}
