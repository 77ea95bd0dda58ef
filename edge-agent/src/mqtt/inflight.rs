//! The reporter's window of publishes in flight: per-stream cursors (where
//! the next batch starts) and counts of batches and statuses not yet
//! acknowledged, over `ferry-link`'s [`Tracker`], which attributes packet
//! ids and PUBACKs. A state machine without I/O: the reporter feeds it
//! rumqttc's events and acts on what it returns.

use std::collections::HashMap;

use ferry_link::{Anomaly, Tracker};
use ferry_protocol::Stream;

/// One QoS 1 publish handed to rumqttc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Buffer records; acknowledged in the buffer on PUBACK.
    Batch { stream: Stream, ids: Vec<u64> },
    /// A retained status message.
    Status,
}

#[derive(Debug, Default)]
pub(crate) struct InFlight {
    pubacks: Tracker<Sent>,
    /// Last record id handed over, per stream.
    cursors: HashMap<Stream, u64>,
    batches: usize,
    statuses: usize,
}

impl InFlight {
    /// Records a publish just handed to rumqttc; moves the stream's cursor
    /// past a batch's records.
    pub(crate) fn handed_over(&mut self, sent: Sent) {
        match &sent {
            Sent::Batch { stream, ids } => {
                if let Some(last) = ids.last() {
                    self.skip_to(*stream, *last);
                }
                self.batches += 1;
            }
            Sent::Status => self.statuses += 1,
        }
        self.pubacks.handed_over(sent);
    }

    /// Moves a stream's cursor to `id` (records up to it are in flight or
    /// gone) without a batch: used for records dropped as unpublishable.
    pub(crate) fn skip_to(&mut self, stream: Stream, id: u64) {
        let cursor = self.cursors.entry(stream).or_default();
        *cursor = (*cursor).max(id);
    }

    /// `Outgoing::Publish(pkid)`.
    pub(crate) fn on_publish(&mut self, pkid: u16) -> Result<(), Anomaly> {
        self.pubacks.on_publish(pkid)
    }

    /// `Outgoing::AwaitAck(pkid)`.
    pub(crate) fn on_await_ack(&mut self, pkid: u16) -> Result<(), Anomaly> {
        self.pubacks.on_await_ack(pkid)
    }

    /// `Incoming::PubAck(pkid)`: what the broker just acknowledged.
    pub(crate) fn on_puback(&mut self, pkid: u16) -> Option<Sent> {
        let sent = self.pubacks.on_puback(pkid)?;
        match sent {
            Sent::Batch { .. } => self.batches -= 1,
            Sent::Status => self.statuses -= 1,
        }
        Some(sent)
    }

    /// The connection is gone: nothing in flight will be acknowledged any
    /// more, so forget it all and rewind every cursor; the records are still
    /// in the buffer and go out again after the reconnect. Returns how many
    /// batches were in flight.
    pub(crate) fn connection_lost(&mut self) -> usize {
        let batches = self.batches;
        *self = InFlight::default();
        batches
    }

    /// Where the next batch of `stream` starts (exclusive).
    pub(crate) fn cursor(&self, stream: Stream) -> u64 {
        self.cursors.get(&stream).copied().unwrap_or(0)
    }

    /// Batches handed over and not yet acknowledged.
    pub(crate) fn batches_in_flight(&self) -> usize {
        self.batches
    }

    /// Status messages handed over and not yet acknowledged.
    pub(crate) fn statuses_in_flight(&self) -> usize {
        self.statuses
    }

    /// Nothing handed over is waiting for a PUBACK.
    pub(crate) fn is_idle(&self) -> bool {
        self.pubacks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(stream: Stream, ids: std::ops::RangeInclusive<u64>) -> Sent {
        Sent::Batch {
            stream,
            ids: ids.collect(),
        }
    }

    #[test]
    fn cursors_and_counts_follow_publishes_and_acks() {
        let mut t = InFlight::default();
        t.handed_over(batch(Stream::Telemetry, 1..=3));
        t.handed_over(Sent::Status);
        t.handed_over(batch(Stream::Events, 1..=1));
        assert_eq!(t.cursor(Stream::Telemetry), 3);
        assert_eq!(t.cursor(Stream::Events), 1);
        assert_eq!(t.cursor(Stream::Drift), 0);
        assert_eq!((t.batches_in_flight(), t.statuses_in_flight()), (2, 1));
        t.on_publish(1).unwrap();
        t.on_publish(2).unwrap();
        assert_eq!(t.on_puback(1), Some(batch(Stream::Telemetry, 1..=3)));
        t.on_publish(3).unwrap();
        assert_eq!(t.on_puback(3), Some(batch(Stream::Events, 1..=1)));
        assert_eq!((t.batches_in_flight(), t.statuses_in_flight()), (0, 1));
        assert!(!t.is_idle());
        assert_eq!(t.on_puback(2), Some(Sent::Status));
        assert_eq!(t.on_puback(2), None, "a second PUBACK acknowledges nothing");
        assert!(t.is_idle());
        assert_eq!((t.batches_in_flight(), t.statuses_in_flight()), (0, 0));
        // Cursors stay where they were: those records are gone.
        assert_eq!(t.cursor(Stream::Telemetry), 3);
        assert_eq!(t.on_publish(4), Err(Anomaly::UnexpectedPublish(4)));
    }

    #[test]
    fn packet_ids_are_reused_after_their_ack() {
        let mut t = InFlight::default();
        for round in 0..3u64 {
            let ids = round * 10 + 1..=round * 10 + 10;
            t.handed_over(batch(Stream::Samples, ids.clone()));
            t.on_publish(1).unwrap();
            assert_eq!(t.on_puback(1), Some(batch(Stream::Samples, ids)));
        }
        assert_eq!(t.cursor(Stream::Samples), 30);
    }

    #[test]
    fn a_collision_is_counted_until_its_ack() {
        let mut t = InFlight::default();
        t.handed_over(batch(Stream::Telemetry, 1..=1));
        t.handed_over(batch(Stream::Telemetry, 2..=2));
        t.on_publish(1).unwrap();
        t.on_publish(2).unwrap();
        assert_eq!(t.on_puback(2), Some(batch(Stream::Telemetry, 2..=2)));
        t.handed_over(batch(Stream::Telemetry, 3..=3));
        t.handed_over(batch(Stream::Drift, 1..=1));
        t.on_await_ack(1).unwrap();
        assert_eq!(t.batches_in_flight(), 3);
        assert_eq!(t.on_puback(1), Some(batch(Stream::Telemetry, 1..=1)));
        t.on_publish(1).unwrap();
        t.on_publish(2).unwrap();
        assert_eq!(t.on_puback(1), Some(batch(Stream::Telemetry, 3..=3)));
        assert_eq!(t.on_puback(2), Some(batch(Stream::Drift, 1..=1)));
        assert!(t.is_idle());
        assert_eq!(t.batches_in_flight(), 0);
    }

    #[test]
    fn a_lost_connection_rewinds_everything() {
        let mut t = InFlight::default();
        t.handed_over(batch(Stream::Telemetry, 1..=5));
        t.handed_over(batch(Stream::Telemetry, 6..=9));
        t.handed_over(Sent::Status);
        t.on_publish(1).unwrap();
        assert_eq!(t.on_puback(1), Some(batch(Stream::Telemetry, 1..=5)));
        t.on_publish(2).unwrap();
        assert_eq!(t.connection_lost(), 1);
        assert!(t.is_idle());
        assert_eq!((t.batches_in_flight(), t.statuses_in_flight()), (0, 0));
        // Records 6..=9 were never acknowledged: read again from the start
        // (the buffer no longer holds 1..=5).
        assert_eq!(t.cursor(Stream::Telemetry), 0);
        // A PUBACK from the old connection cannot be attributed any more.
        assert_eq!(t.on_puback(2), None);
        // The new connection's ids start over cleanly.
        t.handed_over(batch(Stream::Telemetry, 6..=9));
        t.on_publish(3).unwrap();
        assert_eq!(t.on_puback(3), Some(batch(Stream::Telemetry, 6..=9)));
    }

    #[test]
    fn skipping_only_moves_cursors_forward() {
        let mut t = InFlight::default();
        t.skip_to(Stream::Events, 7);
        t.skip_to(Stream::Events, 3);
        assert_eq!(t.cursor(Stream::Events), 7);
        assert!(t.is_idle());
    }
}
