//! The event-loop driver: one future that polls rumqttc's event loop once,
//! owned by the caller's `select!` loop, and what to do with the loop when
//! a connection ends.
//!
//! Typical use (one task owns the connection; see the agent's reporter and
//! the console's ingest):
//!
//! ```text
//! let conn = drive(eventloop, None);
//! tokio::pin!(conn);
//! loop {
//!     tokio::select! {
//!         (mut el, result) = &mut conn => {
//!             let delay = match result {
//!                 Ok(event) => { handle(event); None }
//!                 Err(_) => { forget_resends(&mut el); Some(reconnect.failed(now, unit)) }
//!             };
//!             conn.set(drive(el, delay));
//!         }
//!         // ... other work, publishing with `try_publish` only
//!     }
//! }
//! ```

use std::time::Duration;

use rumqttc::{ConnectionError, Event, EventLoop};

/// Polls the event loop once, after an optional delay (a reconnect
/// backoff). The future owns the event loop so that it can live across
/// `select!` rounds and is never dropped midway: rumqttc's poll is not
/// cancel-safe while it writes (a cancelled poll can lose a packet rumqttc
/// already counted as written). `EventLoop::poll` reconnects by itself on
/// the call after an error; the delay is the caller's.
pub async fn drive(
    mut el: EventLoop,
    delay: Option<Duration>,
) -> (EventLoop, Result<Event, ConnectionError>) {
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let result = el.poll().await;
    (el, result)
}

/// After a lost connection: drops what rumqttc would re-send by itself on
/// the next one (its unacknowledged QoS 1 publishes, re-sent only when the
/// broker reports `session_present`, and requests it had not written yet).
/// Callers that keep their own outbox re-send from it, so one path covers
/// every case (session resumed or not) and packet ids are never carried
/// across connections. Also clears a publish parked on a packet id
/// collision, which would otherwise stop the event loop from taking any
/// request on the next connection.
pub fn forget_resends(el: &mut EventLoop) {
    el.pending.clear();
    el.state.collision = None;
}

/// Drops the network connection now, without acknowledging anything more,
/// and forgets what rumqttc would re-send ([`forget_resends`]); the next
/// poll reconnects. Requests still in the channel are dropped too.
pub fn drop_connection(el: &mut EventLoop) {
    el.clean();
    forget_resends(el);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BrokerUrl, FileNames, Settings, TlsFiles, client};
    use rumqttc::QoS;

    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn event_loop() -> (rumqttc::AsyncClient, EventLoop) {
        let url = BrokerUrl::parse(&format!("mqtt://127.0.0.1:{}", closed_port())).unwrap();
        let names = FileNames {
            ca_file: "ca",
            client_cert: "cert",
            client_key: "key",
        };
        client(
            Settings::new(url, "t", TlsFiles::none(names))
                .options()
                .unwrap(),
        )
    }

    #[tokio::test]
    async fn drive_waits_then_hands_the_loop_back_with_the_result() {
        let (_client, el) = event_loop();
        let started = tokio::time::Instant::now();
        let (el, result) = drive(el, Some(Duration::from_millis(50))).await;
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(result.is_err(), "nothing listens: {result:?}");
        // The loop is usable again: the next poll tries to reconnect.
        let (_el, result) = drive(el, None).await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn dropping_the_connection_forgets_every_request() {
        let (client, mut el) = event_loop();
        client
            .try_publish("a/b", QoS::AtLeastOnce, false, vec![1u8])
            .unwrap();
        client.try_subscribe("a/#", QoS::AtLeastOnce).unwrap();
        drop_connection(&mut el);
        assert!(el.pending.is_empty());
        assert!(el.state.collision.is_none());
        // The channel was drained too: the next publish is the only one.
        client
            .try_publish("a/c", QoS::AtLeastOnce, false, vec![2u8])
            .unwrap();
        el.clean();
        assert_eq!(el.pending.len(), 1);
        forget_resends(&mut el);
        assert!(el.pending.is_empty());
    }
}
