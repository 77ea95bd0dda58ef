//! PUBACK bookkeeping: which batch each packet id stands for, per-stream
//! cursors, and what a lost connection undoes. A state machine without I/O:
//! the reporter feeds it rumqttc's events and acts on what it returns.
//!
//! How packet ids reach us: rumqttc assigns the id when its event loop takes
//! a publish off the request channel, and reports it as
//! `Outgoing::Publish(pkid)`. The channel is FIFO and only this module's
//! owner publishes QoS 1, so the n-th such event belongs to the n-th publish
//! handed over ([`Tracker::handed_over`]). One exception: when the next id
//! is still taken (a broker acking out of order), rumqttc parks the publish
//! and reports `Outgoing::AwaitAck(pkid)`; it sends it, with a second
//! `Outgoing::Publish(pkid)`, right after the PUBACK that frees the id.

use std::collections::{HashMap, VecDeque};

use ferry_protocol::Stream;

/// One QoS 1 publish handed to rumqttc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Buffer records; acknowledged in the buffer on PUBACK.
    Batch { stream: Stream, ids: Vec<u64> },
    /// A retained status message.
    Status,
}

/// What the tracker noticed that its owner should log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Anomaly {
    /// A publish id was reported but nothing was waiting for one.
    UnexpectedPublish(u16),
}

#[derive(Debug, Default)]
pub(crate) struct Tracker {
    /// Handed over, no packet id yet (FIFO, as the request channel).
    waiting: VecDeque<Sent>,
    /// Parked by rumqttc behind an id still in flight.
    parked: Option<(u16, Sent)>,
    /// Written with this id, waiting for its PUBACK.
    on_wire: HashMap<u16, Sent>,
    /// Last record id handed over, per stream.
    cursors: HashMap<Stream, u64>,
    batches: usize,
    statuses: usize,
}

impl Tracker {
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
        self.waiting.push_back(sent);
    }

    /// Moves a stream's cursor to `id` (records up to it are in flight or
    /// gone) without a batch: used for records dropped as unpublishable.
    pub(crate) fn skip_to(&mut self, stream: Stream, id: u64) {
        let cursor = self.cursors.entry(stream).or_default();
        *cursor = (*cursor).max(id);
    }

    /// `Outgoing::Publish(pkid)`: the publish is on the wire under `pkid`.
    pub(crate) fn on_publish(&mut self, pkid: u16) -> Result<(), Anomaly> {
        let sent = match self.parked.take() {
            Some((parked, sent)) if parked == pkid => sent,
            other => {
                self.parked = other;
                self.waiting
                    .pop_front()
                    .ok_or(Anomaly::UnexpectedPublish(pkid))?
            }
        };
        self.on_wire.insert(pkid, sent);
        Ok(())
    }

    /// `Outgoing::AwaitAck(pkid)`: the next publish waits for `pkid` to be freed.
    pub(crate) fn on_await_ack(&mut self, pkid: u16) -> Result<(), Anomaly> {
        let sent = self
            .waiting
            .pop_front()
            .ok_or(Anomaly::UnexpectedPublish(pkid))?;
        self.parked = Some((pkid, sent));
        Ok(())
    }

    /// `Incoming::PubAck(pkid)`: what the broker just acknowledged (`None`
    /// for an id we do not know, which rumqttc reports as an error anyway).
    pub(crate) fn on_puback(&mut self, pkid: u16) -> Option<Sent> {
        let sent = self.on_wire.remove(&pkid)?;
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
        *self = Tracker::default();
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
        self.batches == 0 && self.statuses == 0
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
    fn ids_map_in_order_and_acks_free_them() {
        let mut t = Tracker::default();
        t.handed_over(batch(Stream::Telemetry, 1..=3));
        t.handed_over(Sent::Status);
        t.handed_over(batch(Stream::Events, 1..=1));
        assert_eq!(t.cursor(Stream::Telemetry), 3);
        assert_eq!(t.cursor(Stream::Events), 1);
        assert_eq!((t.batches_in_flight(), t.statuses_in_flight()), (2, 1));
        t.on_publish(1).unwrap();
        t.on_publish(2).unwrap();
        // An ack can arrive before later publishes are even written.
        assert_eq!(t.on_puback(1), Some(batch(Stream::Telemetry, 1..=3)));
        t.on_publish(3).unwrap();
        assert_eq!(t.on_puback(3), Some(batch(Stream::Events, 1..=1)));
        assert_eq!(t.on_puback(2), Some(Sent::Status));
        assert_eq!(t.on_puback(2), None, "a second PUBACK acknowledges nothing");
        assert!(t.is_idle());
        assert_eq!(t.on_publish(4), Err(Anomaly::UnexpectedPublish(4)));
    }

    #[test]
    fn packet_ids_are_reused_after_their_ack() {
        // rumqttc cycles ids 1..=inflight: the same id stands for different
        // batches over time.
        let mut t = Tracker::default();
        for round in 0..3u64 {
            let ids = round * 10 + 1..=round * 10 + 10;
            t.handed_over(batch(Stream::Samples, ids.clone()));
            t.on_publish(1).unwrap();
            assert_eq!(t.on_puback(1), Some(batch(Stream::Samples, ids)));
        }
        assert_eq!(t.cursor(Stream::Samples), 30);
    }

    #[test]
    fn a_collision_parks_the_publish_until_its_id_is_free() {
        let mut t = Tracker::default();
        t.handed_over(batch(Stream::Telemetry, 1..=1)); // pkid 1
        t.handed_over(batch(Stream::Telemetry, 2..=2)); // pkid 2
        t.on_publish(1).unwrap();
        t.on_publish(2).unwrap();
        // Broker acks 2 first; the next publish wraps to id 1, still taken.
        assert_eq!(t.on_puback(2), Some(batch(Stream::Telemetry, 2..=2)));
        t.handed_over(batch(Stream::Telemetry, 3..=3));
        t.handed_over(batch(Stream::Drift, 1..=1));
        t.on_await_ack(1).unwrap();
        // PUBACK(1) is the old batch; rumqttc then sends the parked one as 1.
        assert_eq!(t.on_puback(1), Some(batch(Stream::Telemetry, 1..=1)));
        t.on_publish(1).unwrap();
        t.on_publish(2).unwrap();
        assert_eq!(t.on_puback(1), Some(batch(Stream::Telemetry, 3..=3)));
        assert_eq!(t.on_puback(2), Some(batch(Stream::Drift, 1..=1)));
        assert!(t.is_idle());
    }

    #[test]
    fn a_lost_connection_rewinds_everything() {
        let mut t = Tracker::default();
        t.handed_over(batch(Stream::Telemetry, 1..=5));
        t.handed_over(batch(Stream::Telemetry, 6..=9));
        t.handed_over(Sent::Status);
        t.on_publish(1).unwrap();
        assert_eq!(t.on_puback(1), Some(batch(Stream::Telemetry, 1..=5)));
        t.on_publish(2).unwrap();
        assert_eq!(t.connection_lost(), 1);
        assert!(t.is_idle());
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
        let mut t = Tracker::default();
        t.skip_to(Stream::Events, 7);
        t.skip_to(Stream::Events, 3);
        assert_eq!(t.cursor(Stream::Events), 7);
        assert!(t.is_idle());
    }
}
