//! Reporting over MQTT, through `ferry-link` (options and TLS, the
//! event-loop driver, backoff, PUBACK attribution; it is the only crate that
//! depends on rumqttc, whose types it re-exports). One task, the
//! [`Reporter`], owns the connection: it drains the telemetry buffer in
//! batches, keeps the retained status fresh, and takes commands in.
//!
//! # Delivery guarantee
//! At least once, per record. A record leaves the buffer only when the
//! broker has acknowledged (PUBACK, QoS 1) the batch that carried it. A lost
//! connection forgets every batch in flight and rewinds the per-stream
//! cursors, so their records are read from the buffer and published again
//! after the reconnect. Duplicates are therefore bounded by the in-flight
//! window: at most `max_inflight` batches per lost connection. Receivers
//! drop them by `(device, record id)` (ids increase strictly per device and
//! are never reused); a re-sent batch may cut records differently, so its
//! `message_id` (`<device>:<stream>:<first>-<last>`) can differ from the
//! first attempt's and is only a cheap first filter.
//!
//! The broker keeps our session (`clean_session = false`, client id = device
//! id): subscriptions and commands queued while we were away survive a
//! reconnect. rumqttc (0.25) keeps unacknowledged publishes in memory and
//! re-sends them itself when the broker says `session_present`, and drops
//! them silently otherwise. We do not rely on either: after every connection
//! error we empty rumqttc's pending queue, and the buffer is the only source
//! of re-sends. One path for every case (broker restarted with or without
//! persistence, session expired, AWS IoT Core's session rules), no record
//! counted twice, no packet-id bookkeeping carried across connections.
//! Leaving rumqttc's copies in place would send the in-flight window twice
//! after a resumed session (the test `a_cut_connection_resends_exactly_the_
//! batches_in_flight` measures twice the duplicates then), and its re-sent
//! publishes would report packet ids that the FIFO matching (next section) attributes
//! to newer batches: records acknowledged that the broker never saw.
//!
//! # Batches
//! Each round takes at most one batch per stream, in priority order: events,
//! drift, telemetry, samples. A batch is the `ferry_protocol::Batch` JSON,
//! built by joining the raw record bytes (no re-serialisation), and never
//! exceeds `max_message_bytes` envelope included (module `batch`). A record
//! that cannot fit any batch on its own, or is not a JSON object, is
//! dropped from the buffer with a warning and counted in
//! [`MqttStats::dropped_records`]: keeping it would wedge its stream forever.
//!
//! # PUBACK bookkeeping
//! rumqttc does not return packet ids from `publish`: it reports
//! `Outgoing::Publish(pkid)` when its event loop takes the publish off the
//! request channel, in FIFO order. Only this task publishes QoS 1, so the
//! n-th report belongs to the n-th publish handed over; `Incoming::PubAck`
//! then names the batch whose records are deleted. `ferry_link::Tracker`
//! holds this state machine (with rumqttc's packet-id collision case) apart
//! from any I/O, with its own tests; the module `inflight` adds the
//! per-stream cursors and the counts of batches and statuses in flight.
//!
//! # Limits
//! - `max_inflight` batches unacknowledged at once: bounds duplicates after a
//!   reconnect and the memory held (`max_inflight × max_message_bytes`).
//! - At most one status in flight, and change-driven statuses at most every
//!   [`MIN_STATUS_GAP`]: a download's progress must not flood the broker.
//! - MQTT packets are limited to `max_message_bytes` + [`PACKET_HEADROOM`]
//!   both ways (rumqttc's default, 10 KiB, is too small for batches). A
//!   command larger than that breaks the connection each time the broker
//!   re-sends it: set the broker's `max_packet_size` to match.
//! - New records are picked up within [`POLL_INTERVAL`] (the buffer has no
//!   notification), which also lets small records accumulate into batches.
//!
//! # Never blocking inference
//! Only this task talks to the network; producers append to the buffer and
//! never wait for it. The task never awaits a full request channel
//! (`try_publish` only, within a window sized to fit it), and it never
//! cancels `EventLoop::poll` midway: a cancelled poll can lose a packet
//! rumqttc already counted as written. The poll future owns the event loop
//! and lives across `select!` rounds (see `ferry_link::drive`).
//!
//! # Status and last will
//! On every connection the reporter publishes the latest status from the
//! watch (retained, QoS 1), then on every change of the watch and every
//! `status_interval_s`. It stamps `online: true`, `ts_ms` and the buffer's
//! figures at send time. The last will is `Status::offline` (retained), which
//! the broker publishes when the connection dies without a DISCONNECT. A
//! graceful shutdown publishes the latest status with `online: false`, waits
//! up to [`SHUTDOWN_GRACE`] for outstanding PUBACKs, then disconnects.
//!
//! # Commands
//! The device subscribes (QoS 1) to its own and the fleet's command topic
//! after every CONNACK. A payload that is not JSON, not a `Command` or not of
//! this schema is answered with an `Event::CommandRejected` record on the
//! events stream. Valid commands go to the agent's channel without waiting;
//! when it is full the command is rejected the same way ("busy"). QoS 1 and
//! the persistent session mean a command can arrive twice (the broker
//! re-sends what we had not acknowledged when the connection broke): the
//! agent must act on a command id once.
//!
//! # Connection
//! Client id = device id, `clean_session = false`, keep alive from the
//! config, user name and password (from the environment variable
//! `password_env` names) when set. `mqtts://` uses rustls on ring (no C
//! build): the CA from `ca_file`, else the system's roots; a client
//! certificate and key for mutual TLS (AWS IoT Core, port 8883: no ALPN is
//! set, so AWS's port 443 is not supported). Everything is read and checked
//! in [`Reporter::new`]: a bad setting fails there with a message, not in a
//! reconnect loop. Connection errors are retried forever and kept in
//! [`MqttStats::last_error`] (for example `TLS: I/O: invalid peer
//! certificate: UnknownIssuer` for a wrong CA).
//!
//! # Reconnecting
//! Exponential backoff with jitter between `reconnect_min_ms` and
//! `reconnect_max_ms`. A connection counts as stable (and resets the
//! backoff) only after [`STABLE_AFTER`]: a broker that accepts and then
//! drops us at once (duplicate client id, quota) must not see us reconnect
//! at the minimum delay forever.

mod batch;
mod inflight;
mod options;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_link::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS,
    Reconnect, SubscribeFilter, SubscribeReasonCode, drive, forget_resends,
};
use ferry_protocol::{
    Command, Event as AgentEvent, EventRecord, SCHEMA_VERSION, Status, Stream, Topic,
    command_topics, topic,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use options::PACKET_HEADROOM;

use crate::buffer::Buffer;
use crate::config::MqttConfig;
use batch::{Envelope, Plan};
use inflight::{InFlight, Sent};

/// How often the buffer is checked for new records when nothing else wakes
/// the reporter: the added latency of a record, and the idle cost (one small
/// read per stream).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Shortest gap between two status messages caused by watch changes.
pub const MIN_STATUS_GAP: Duration = Duration::from_secs(1);

/// How long a graceful shutdown waits for outstanding PUBACKs (records acked
/// now are not sent twice after the restart) before it disconnects anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A connection that lasted this long resets the reconnect backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Records read per batch at most: bounds the id list kept per batch in
/// flight when records are tiny (the byte limit bounds the rest).
pub const MAX_RECORDS_PER_BATCH: usize = 4096;

/// Publish order each round: rare and important first.
const PRIORITY: [Stream; 4] = [
    Stream::Events,
    Stream::Drift,
    Stream::Telemetry,
    Stream::Samples,
];

/// Who this device is on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub device: String,
    pub fleet: String,
    pub agent_version: String,
}

/// Live connection facts for `/metrics` and the status. Counters only grow.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// Between a CONNACK and the connection's end.
    pub connected: AtomicBool,
    /// Batches handed to the connection (a re-sent batch counts again).
    pub published: AtomicU64,
    /// Batches the broker acknowledged.
    pub acked_batches: AtomicU64,
    /// Records acknowledged, hence deleted from the buffer.
    pub acked_records: AtomicU64,
    /// Connection attempts after a failure (failed connects and lost connections).
    pub reconnects: AtomicU64,
    /// Batches in flight when a connection was lost (their records are sent again).
    pub unacked_on_disconnect: AtomicU64,
    /// Records dropped as unpublishable (larger than a message, or not a JSON object).
    pub dropped_records: AtomicU64,
    /// Status messages written.
    pub statuses: AtomicU64,
    /// Commands forwarded to the agent.
    pub commands: AtomicU64,
    /// Commands answered with `CommandRejected`.
    pub commands_rejected: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl MqttStats {
    /// The last connection error, for people (`None` before the first; kept
    /// after a successful reconnect).
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_last_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub use ferry_link::Backoff;

/// Ships the buffer and the status, takes commands in. Build it with
/// [`Reporter::new`] (all configuration errors surface there), then `run`.
pub struct Reporter {
    options: MqttOptions,
    identity: Identity,
    buffer: Arc<Buffer>,
    stats: Arc<MqttStats>,
    max_inflight: usize,
    max_message_bytes: usize,
    backoff: Backoff,
    status_interval: Duration,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("broker", &self.options.broker_address())
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Reporter {
    /// Checks the URL, reads the password from its environment variable and
    /// loads the TLS files.
    pub fn new(
        config: &MqttConfig,
        identity: Identity,
        buffer: Arc<Buffer>,
        stats: Arc<MqttStats>,
    ) -> Result<Reporter> {
        let password = options::password(config)?;
        Self::with_password(config, identity, buffer, stats, password)
    }

    /// [`Reporter::new`] with the password given instead of read from
    /// `password_env` (tests; callers with their own secret store).
    pub fn with_password(
        config: &MqttConfig,
        identity: Identity,
        buffer: Arc<Buffer>,
        stats: Arc<MqttStats>,
        password: Option<String>,
    ) -> Result<Reporter> {
        ferry_protocol::validate_name("device id", &identity.device).map_err(anyhow::Error::msg)?;
        ferry_protocol::validate_name("fleet", &identity.fleet).map_err(anyhow::Error::msg)?;
        let options = options::mqtt_options(config, &identity, password)
            .with_context(|| format!("invalid MQTT settings for {}", config.url))?;
        if config.max_inflight == 0 {
            anyhow::bail!("mqtt.max_inflight must be at least 1");
        }
        if config.reconnect_min_ms == 0 || config.reconnect_min_ms > config.reconnect_max_ms {
            anyhow::bail!(
                "mqtt.reconnect_min_ms must be positive and at most mqtt.reconnect_max_ms"
            );
        }
        for stream in Stream::ALL {
            Envelope::new(
                &identity.device,
                &identity.fleet,
                stream,
                config.max_message_bytes,
            )
            .context("mqtt.max_message_bytes is too small to hold a batch")?;
        }
        Ok(Reporter {
            options,
            identity,
            buffer,
            stats,
            max_inflight: usize::from(config.max_inflight),
            max_message_bytes: config.max_message_bytes,
            backoff: Backoff {
                min: Duration::from_millis(config.reconnect_min_ms),
                max: Duration::from_millis(config.reconnect_max_ms),
            },
            status_interval: Duration::from_secs(config.status_interval_s.max(1)),
        })
    }

    /// Runs until `shutdown` is cancelled (see the module header). Errors
    /// of the connection are retried forever, never returned.
    pub async fn run(
        self,
        mut status: watch::Receiver<Status>,
        commands: mpsc::Sender<Command>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let (client, eventloop) = ferry_link::client(self.options.clone());
        let mut s = Session::new(self, client, commands);
        let conn = drive(eventloop, None);
        tokio::pin!(conn);
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut refresh =
            tokio::time::interval_at(Instant::now() + s.status_interval, s.status_interval);
        refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut watching = true;
        s.latest = status.borrow_and_update().clone();

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                (mut el, result) = &mut conn => {
                    let delay = s.on_poll(&mut el, result);
                    conn.set(drive(el, delay));
                }
                changed = status.changed(), if watching => match changed {
                    Ok(()) => {
                        s.latest = status.borrow_and_update().clone();
                        s.status_due = true;
                    }
                    Err(_) => watching = false,
                },
                _ = refresh.tick() => s.status_due = true,
                _ = tick.tick() => s.dirty = [true; 4],
            }
            s.pump();
        }

        // Graceful shutdown: say goodbye, let outstanding PUBACKs arrive,
        // disconnect (which tells the broker not to publish the will).
        s.closing = true;
        if s.connected {
            let mut goodbye = s.latest.clone();
            goodbye.online = false;
            s.publish_status(goodbye);
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            let mut disconnect_requested = false;
            while s.connected && !s.disconnected_cleanly {
                if !disconnect_requested && s.tracker.is_idle() {
                    disconnect_requested = true;
                    if s.client.try_disconnect().is_err() {
                        break;
                    }
                }
                tokio::select! {
                    (mut el, result) = &mut conn => {
                        let delay = s.on_poll(&mut el, result);
                        conn.set(drive(el, delay));
                    }
                    _ = tokio::time::sleep_until(deadline), if !disconnect_requested => {
                        let left = s.tracker.batches_in_flight();
                        warn!(batches = left, "Shutting down before every PUBACK arrived; those records go out again next time");
                        disconnect_requested = true;
                        if s.client.try_disconnect().is_err() {
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline + SHUTDOWN_GRACE) => break,
                }
            }
        }
        s.stats.connected.store(false, Ordering::Relaxed);
        info!("MQTT reporter stopped");
        Ok(())
    }
}

/// The reporter's state while it runs.
struct Session {
    identity: Identity,
    buffer: Arc<Buffer>,
    stats: Arc<MqttStats>,
    client: AsyncClient,
    commands: mpsc::Sender<Command>,
    command_topics: [String; 2],
    envelopes: [Envelope; 4],
    max_inflight: usize,
    status_interval: Duration,
    tracker: InFlight,
    /// Streams that may hold records past their cursor.
    dirty: [bool; 4],
    connected: bool,
    /// The reconnect backoff's attempts; reset by a stable connection.
    reconnect: Reconnect,
    latest: Status,
    status_due: bool,
    last_status: Option<Instant>,
    closing: bool,
    disconnected_cleanly: bool,
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Telemetry => 0,
        Stream::Drift => 1,
        Stream::Samples => 2,
        Stream::Events => 3,
    }
}

use ferry_host::now_ms;

impl Session {
    fn new(r: Reporter, client: AsyncClient, commands: mpsc::Sender<Command>) -> Session {
        let envelope = |stream| {
            Envelope::new(
                &r.identity.device,
                &r.identity.fleet,
                stream,
                r.max_message_bytes,
            )
            .expect("checked in Reporter::new")
        };
        let latest = Status::offline(
            &r.identity.fleet,
            &r.identity.device,
            &r.identity.agent_version,
        );
        Session {
            command_topics: command_topics(&r.identity.fleet, &r.identity.device),
            envelopes: [
                envelope(Stream::Telemetry),
                envelope(Stream::Drift),
                envelope(Stream::Samples),
                envelope(Stream::Events),
            ],
            identity: r.identity,
            buffer: r.buffer,
            stats: r.stats,
            client,
            commands,
            max_inflight: r.max_inflight,
            status_interval: r.status_interval,
            tracker: InFlight::default(),
            dirty: [true; 4],
            connected: false,
            reconnect: Reconnect::new(r.backoff, STABLE_AFTER),
            latest,
            status_due: true,
            last_status: None,
            closing: false,
            disconnected_cleanly: false,
        }
    }

    /// Handles one result of `EventLoop::poll`; returns the delay before the
    /// next poll (a reconnect backoff after an error).
    fn on_poll(
        &mut self,
        el: &mut EventLoop,
        result: Result<Event, ConnectionError>,
    ) -> Option<Duration> {
        match result {
            Ok(event) => {
                self.on_event(event);
                None
            }
            Err(error) => Some(self.on_error(el, error)),
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Incoming::ConnAck(ack)) => {
                info!(session_present = ack.session_present, "MQTT connected");
                self.connected = true;
                self.reconnect.connected(Instant::now());
                self.stats.connected.store(true, Ordering::Relaxed);
                let filters = self
                    .command_topics
                    .iter()
                    .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                if let Err(error) = self.client.try_subscribe_many(filters) {
                    warn!(%error, "Cannot subscribe to the command topics");
                }
                self.status_due = true;
                self.last_status = None;
                self.dirty = [true; 4];
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Err(anomaly) = self.tracker.on_publish(pkid) {
                    warn!(%anomaly, code = anomaly.code(), "MQTT packet id bookkeeping out of step");
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                debug!(
                    pkid,
                    "Publish waits for a packet id (broker acks out of order)"
                );
                if let Err(anomaly) = self.tracker.on_await_ack(pkid) {
                    warn!(%anomaly, code = anomaly.code(), "MQTT packet id bookkeeping out of step");
                }
            }
            Event::Incoming(Incoming::PubAck(ack)) => match self.tracker.on_puback(ack.pkid) {
                Some(Sent::Batch { stream, ids }) => {
                    if let Err(error) = self.buffer.ack(stream, &ids) {
                        warn!(%error, stream = stream.as_str(), "Cannot delete acknowledged records from the buffer");
                    }
                    MqttStats::add(&self.stats.acked_batches, 1);
                    MqttStats::add(&self.stats.acked_records, ids.len() as u64);
                }
                Some(Sent::Status) => {}
                None => debug!(pkid = ack.pkid, "PUBACK for nothing we track"),
            },
            Event::Incoming(Incoming::Publish(publish)) => {
                self.on_message(&publish.topic, &publish.payload);
            }
            Event::Incoming(Incoming::SubAck(ack))
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure)) =>
            {
                warn!(topics = ?self.command_topics, codes = ?ack.return_codes, "The broker refused a command subscription");
            }
            Event::Outgoing(Outgoing::Disconnect) => {
                self.disconnected_cleanly = true;
                self.connected = false;
                self.stats.connected.store(false, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    fn on_error(&mut self, el: &mut EventLoop, error: ConnectionError) -> Duration {
        let message = error.to_string();
        if self.connected {
            warn!(%error, "MQTT connection lost");
            let lost = self.tracker.connection_lost();
            MqttStats::add(&self.stats.unacked_on_disconnect, lost as u64);
        } else {
            warn!(%error, "MQTT connection failed");
        }
        self.stats.set_last_error(message);
        self.stats.connected.store(false, Ordering::Relaxed);
        MqttStats::add(&self.stats.reconnects, 1);
        self.connected = false;
        // The buffer re-sends; rumqttc must not (see the module header). Its
        // `clean()` also keeps a parked (collided) publish, which would stop
        // it from taking any request on the next connection.
        forget_resends(el);
        self.reconnect.failed(Instant::now(), fastrand::f64())
    }

    /// Publishes whatever is due, within the in-flight window.
    fn pump(&mut self) {
        if !self.connected || self.closing {
            return;
        }
        if self.status_due
            && self.tracker.statuses_in_flight() == 0
            && self
                .last_status
                .is_none_or(|at| at.elapsed() >= MIN_STATUS_GAP)
        {
            let mut status = self.latest.clone();
            status.online = true;
            self.publish_status(status);
        }
        loop {
            let mut progressed = false;
            for stream in PRIORITY {
                if self.tracker.batches_in_flight() >= self.max_inflight {
                    return;
                }
                if self.dirty[index(stream)] {
                    progressed |= self.publish_next(stream);
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// Publishes the next batch of `stream` (or drops an unpublishable
    /// record); false when there was nothing to do.
    fn publish_next(&mut self, stream: Stream) -> bool {
        let i = index(stream);
        let cursor = self.tracker.cursor(stream);
        let envelope = &self.envelopes[i];
        let records =
            match self
                .buffer
                .read(stream, cursor, MAX_RECORDS_PER_BATCH, envelope.budget())
            {
                Ok(records) => records,
                Err(error) => {
                    warn!(%error, stream = stream.as_str(), "Cannot read the buffer");
                    self.dirty[i] = false;
                    return false;
                }
            };
        let Some(plan) = envelope.plan(records.iter().map(|r| r.payload.as_slice())) else {
            self.dirty[i] = false;
            return false;
        };
        match plan {
            Plan::Publish(n) => {
                let chosen: Vec<(u64, &[u8])> = records[..n]
                    .iter()
                    .map(|r| (r.id, r.payload.as_slice()))
                    .collect();
                let payload = envelope.encode(&chosen, now_ms());
                let t = topic(
                    &self.identity.fleet,
                    &self.identity.device,
                    Topic::Stream(stream),
                );
                if let Err(error) = self.client.try_publish(t, QoS::AtLeastOnce, false, payload) {
                    // Cannot happen within the window; try again next round.
                    warn!(%error, "MQTT request queue refused a batch");
                    self.dirty[i] = false;
                    return false;
                }
                let ids = chosen.iter().map(|r| r.0).collect();
                self.tracker.handed_over(Sent::Batch { stream, ids });
                MqttStats::add(&self.stats.published, 1);
            }
            Plan::Drop(reason) => {
                let record = &records[0];
                warn!(
                    stream = stream.as_str(),
                    id = record.id,
                    bytes = record.payload.len(),
                    reason = reason.code(),
                    "Dropped a record that can never be published"
                );
                if let Err(error) = self.buffer.ack(stream, &[record.id]) {
                    warn!(%error, "Cannot delete a dropped record from the buffer");
                }
                self.tracker.skip_to(stream, record.id);
                MqttStats::add(&self.stats.dropped_records, 1);
            }
        }
        true
    }

    fn publish_status(&mut self, mut status: Status) {
        status.ts_ms = now_ms();
        status.buffer = self.buffer.stats();
        let t = topic(&self.identity.fleet, &self.identity.device, Topic::Status);
        let payload = serde_json::to_vec(&status).expect("status serialises");
        match self.client.try_publish(t, QoS::AtLeastOnce, true, payload) {
            Ok(()) => {
                self.tracker.handed_over(Sent::Status);
                self.status_due = false;
                self.last_status = Some(Instant::now());
                MqttStats::add(&self.stats.statuses, 1);
            }
            Err(error) => warn!(%error, "MQTT request queue refused a status"),
        }
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        if !self.command_topics.iter().any(|t| t == topic) {
            debug!(topic, "Ignored a message on an unexpected topic");
            return;
        }
        match parse_command(payload) {
            Ok(command) => match self.commands.try_send(command) {
                Ok(()) => MqttStats::add(&self.stats.commands, 1),
                Err(mpsc::error::TrySendError::Full(command)) => {
                    self.reject(
                        &command.id,
                        "the agent is busy: too many commands waiting".into(),
                    );
                }
                Err(mpsc::error::TrySendError::Closed(command)) => {
                    debug!(command_id = %command.id, "The agent stopped taking commands");
                }
            },
            Err(Rejected { command_id, reason }) => self.reject(&command_id, reason),
        }
    }

    fn reject(&mut self, command_id: &str, reason: String) {
        warn!(command_id, %reason, "Rejected a command");
        MqttStats::add(&self.stats.commands_rejected, 1);
        let ts_ms = now_ms();
        let appended = self.buffer.append(Stream::Events, |id| {
            let event = AgentEvent::CommandRejected {
                command_id: command_id.to_string(),
                reason,
            };
            serde_json::to_vec(&EventRecord { id, ts_ms, event }).expect("events serialise")
        });
        match appended {
            Ok(_) => self.dirty[index(Stream::Events)] = true,
            Err(error) => warn!(%error, "Cannot record the rejected command"),
        }
    }
}

/// Why a command payload was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The payload's `id` when it has one, else empty.
    pub command_id: String,
    pub reason: String,
}

/// Parses a command payload; the check every command goes through before
/// the agent sees it.
pub fn parse_command(payload: &[u8]) -> Result<Command, Rejected> {
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| Rejected {
        command_id: String::new(),
        reason: format!("not JSON: {e}"),
    })?;
    let command_id = value
        .get("id")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    match value.get("schema").and_then(|v| v.as_u64()) {
        Some(schema) if schema == u64::from(SCHEMA_VERSION) => {}
        other => {
            let got = other.map_or_else(|| "none".to_string(), |s| s.to_string());
            return Err(Rejected {
                command_id,
                reason: format!(
                    "unsupported schema {got}; this agent speaks schema {SCHEMA_VERSION}"
                ),
            });
        }
    }
    serde_json::from_value(value).map_err(|e| Rejected {
        command_id,
        reason: format!("invalid command: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::Action;

    #[test]
    fn commands_are_checked() {
        let ok = parse_command(br#"{"schema":1,"id":"c1","issued_ms":5,"action":"ping"}"#).unwrap();
        assert_eq!((ok.id.as_str(), &ok.action), ("c1", &Action::Ping));

        let e = parse_command(b"{not json").unwrap_err();
        assert_eq!(e.command_id, "");
        assert!(e.reason.starts_with("not JSON"), "{}", e.reason);

        let e =
            parse_command(br#"{"schema":2,"id":"c2","issued_ms":5,"action":"ping"}"#).unwrap_err();
        assert_eq!(e.command_id, "c2");
        assert!(e.reason.contains("unsupported schema 2"), "{}", e.reason);

        let e = parse_command(br#"{"id":"c3","issued_ms":5,"action":"ping"}"#).unwrap_err();
        assert!(e.reason.contains("unsupported schema none"), "{}", e.reason);

        let e = parse_command(br#"{"schema":1,"id":"c4","issued_ms":5,"action":"explode"}"#)
            .unwrap_err();
        assert_eq!(e.command_id, "c4");
        assert!(e.reason.starts_with("invalid command"), "{}", e.reason);
    }
}
