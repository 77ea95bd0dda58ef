//! PUBACK bookkeeping: which of the caller's publishes each packet id
//! stands for. A state machine without I/O: the caller feeds it rumqttc's
//! events and acts on what it returns; what it attaches to a publish (`T`)
//! is its own business (a batch's record ids, a reply channel).
//!
//! How packet ids reach us: rumqttc does not return them from `publish`;
//! it assigns the id when its event loop takes a publish off the request
//! channel, and reports it as `Outgoing::Publish(pkid)`. The channel is
//! FIFO, so when the caller is the only one publishing QoS 1 on its client,
//! the n-th such event belongs to the n-th publish handed over
//! ([`Tracker::handed_over`]). One exception: when the next id is still
//! taken (a broker acking out of order), rumqttc parks the publish and
//! reports `Outgoing::AwaitAck(pkid)`; it sends it, with a second
//! `Outgoing::Publish(pkid)`, right after the PUBACK that frees the id.
//! QoS 0 publishes are reported with id 0 and never acknowledged: they are
//! not tracked.
//!
//! A lost connection ends every attribution: ids restart and a PUBACK from
//! the old connection can name a newer publish. The caller takes everything
//! out ([`Tracker::drain`]) and clears rumqttc's re-send queue
//! ([`crate::forget_resends`]) so that re-sends are its own.

use std::collections::{HashMap, VecDeque};

/// What the tracker noticed that its owner should log: its bookkeeping and
/// rumqttc's are out of step (another QoS 1 publisher on the same client?).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Anomaly {
    /// rumqttc reported a packet id but no publish was waiting for one.
    #[error("rumqttc reported packet id {0} but no publish was waiting for one")]
    UnexpectedPublish(u16),
}

impl Anomaly {
    /// Stable identifier, for logs and telemetry.
    pub fn code(&self) -> &'static str {
        match self {
            Anomaly::UnexpectedPublish(_) => "unexpected_publish",
        }
    }
}

/// QoS 1 publishes between `try_publish` and their PUBACK, each with the
/// caller's `T`.
#[derive(Debug)]
pub struct Tracker<T> {
    /// Handed over, no packet id yet (FIFO, as the request channel).
    waiting: VecDeque<T>,
    /// Parked by rumqttc behind an id still in flight.
    parked: Option<(u16, T)>,
    /// Written with this id, waiting for its PUBACK.
    on_wire: HashMap<u16, T>,
}

impl<T> Default for Tracker<T> {
    fn default() -> Self {
        Tracker {
            waiting: VecDeque::new(),
            parked: None,
            on_wire: HashMap::new(),
        }
    }
}

impl<T> Tracker<T> {
    /// Records a QoS 1 publish just accepted by `try_publish`.
    pub fn handed_over(&mut self, item: T) {
        self.waiting.push_back(item);
    }

    /// `Outgoing::Publish(pkid)`: the publish is on the wire under `pkid`
    /// (the parked one when it was parked under this id, else the oldest
    /// handed over). Id 0 (QoS 0) is ignored.
    pub fn on_publish(&mut self, pkid: u16) -> Result<(), Anomaly> {
        if pkid == 0 {
            return Ok(());
        }
        let item = match self.parked.take() {
            Some((parked, item)) if parked == pkid => item,
            other => {
                self.parked = other;
                self.waiting
                    .pop_front()
                    .ok_or(Anomaly::UnexpectedPublish(pkid))?
            }
        };
        self.on_wire.insert(pkid, item);
        Ok(())
    }

    /// `Outgoing::AwaitAck(pkid)`: the oldest publish handed over waits for
    /// `pkid` to be freed.
    pub fn on_await_ack(&mut self, pkid: u16) -> Result<(), Anomaly> {
        let item = self
            .waiting
            .pop_front()
            .ok_or(Anomaly::UnexpectedPublish(pkid))?;
        self.parked = Some((pkid, item));
        Ok(())
    }

    /// `Incoming::PubAck(pkid)`: what the broker just acknowledged (`None`
    /// for an id we do not know, which rumqttc reports as an error anyway).
    pub fn on_puback(&mut self, pkid: u16) -> Option<T> {
        self.on_wire.remove(&pkid)
    }

    /// Takes out everything not acknowledged: waiting (in order), then
    /// parked, then on the wire (in no particular order). Leaves the tracker
    /// empty, as after a lost connection.
    pub fn drain(&mut self) -> Vec<T> {
        let mut out: Vec<T> = self.waiting.drain(..).collect();
        out.extend(self.parked.take().map(|(_, item)| item));
        out.extend(self.on_wire.drain().map(|(_, item)| item));
        out
    }

    /// Publishes handed over and not yet acknowledged.
    pub fn len(&self) -> usize {
        self.waiting.len() + usize::from(self.parked.is_some()) + self.on_wire.len()
    }

    /// Nothing handed over is waiting for a PUBACK.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_in_order_and_acks_free_them() {
        let mut t = Tracker::default();
        t.handed_over("a");
        t.handed_over("b");
        t.handed_over("c");
        assert_eq!(t.len(), 3);
        t.on_publish(1).unwrap();
        t.on_publish(2).unwrap();
        // An ack can arrive before later publishes are even written.
        assert_eq!(t.on_puback(1), Some("a"));
        t.on_publish(3).unwrap();
        assert_eq!(t.on_puback(3), Some("c"));
        assert_eq!(t.on_puback(2), Some("b"));
        assert_eq!(t.on_puback(2), None, "a second PUBACK acknowledges nothing");
        assert_eq!(t.on_puback(9), None, "an unknown id acknowledges nothing");
        assert!(t.is_empty());
        assert_eq!(t.on_publish(4), Err(Anomaly::UnexpectedPublish(4)));
        assert_eq!(t.on_await_ack(4), Err(Anomaly::UnexpectedPublish(4)));
        assert_eq!(Anomaly::UnexpectedPublish(4).code(), "unexpected_publish");
        assert!(t.is_empty());
    }

    #[test]
    fn qos0_publishes_are_not_tracked() {
        let mut t = Tracker::default();
        t.handed_over(1u8);
        t.on_publish(0).unwrap();
        assert_eq!(t.len(), 1);
        t.on_publish(5).unwrap();
        assert_eq!(t.on_puback(5), Some(1));
    }

    #[test]
    fn packet_ids_are_reused_after_their_ack() {
        // rumqttc cycles ids 1..=inflight: the same id stands for different
        // publishes over time.
        let mut t = Tracker::default();
        for round in 0..3u64 {
            t.handed_over(round);
            t.on_publish(1).unwrap();
            assert_eq!(t.on_puback(1), Some(round));
        }
        assert!(t.is_empty());
    }

    #[test]
    fn a_collision_parks_the_publish_until_its_id_is_free() {
        let mut t = Tracker::default();
        t.handed_over("t1"); // pkid 1
        t.handed_over("t2"); // pkid 2
        t.on_publish(1).unwrap();
        t.on_publish(2).unwrap();
        // Broker acks 2 first; the next publish wraps to id 1, still taken.
        assert_eq!(t.on_puback(2), Some("t2"));
        t.handed_over("t3");
        t.handed_over("d1");
        t.on_await_ack(1).unwrap();
        assert_eq!(t.len(), 3);
        // PUBACK(1) is the old publish; rumqttc then sends the parked one as 1.
        assert_eq!(t.on_puback(1), Some("t1"));
        t.on_publish(1).unwrap();
        t.on_publish(2).unwrap();
        assert_eq!(t.on_puback(1), Some("t3"));
        assert_eq!(t.on_puback(2), Some("d1"));
        assert!(t.is_empty());
    }

    #[test]
    fn a_parked_publish_waits_while_others_go_out() {
        // The console's case: a publish parked on id 3 while the next one
        // takes id 2; the parked one leaves when 3 is reported.
        let mut t = Tracker::default();
        for i in 0..3 {
            t.handed_over(i);
        }
        t.on_publish(1).unwrap();
        t.on_await_ack(3).unwrap();
        t.on_publish(2).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.on_puback(2), Some(2));
        t.on_publish(3).unwrap();
        assert_eq!(t.on_puback(3), Some(1));
        assert_eq!(t.len(), 1);
        assert_eq!(t.drain(), vec![0]);
        assert!(t.is_empty());
    }

    #[test]
    fn a_lost_connection_drains_everything() {
        let mut t = Tracker::default();
        t.handed_over("b1");
        t.handed_over("b2");
        t.handed_over("s");
        t.handed_over("b3");
        t.on_publish(1).unwrap();
        assert_eq!(t.on_puback(1), Some("b1"));
        t.on_publish(2).unwrap();
        t.on_await_ack(3).unwrap();
        // Waiting first (in order), then parked, then on the wire.
        assert_eq!(t.drain(), vec!["b3", "s", "b2"]);
        assert!(t.is_empty());
        // A PUBACK from the old connection cannot be attributed any more.
        assert_eq!(t.on_puback(2), None);
        assert_eq!(t.on_publish(3), Err(Anomaly::UnexpectedPublish(3)));
        // The new connection's ids start over cleanly.
        t.handed_over("b2");
        t.on_publish(1).unwrap();
        assert_eq!(t.on_puback(1), Some("b2"));
        assert!(t.is_empty());
    }
}
