//! Following the fleet over MQTT, through `ferry-link` (options and TLS,
//! the event-loop driver, backoff, PUBACK attribution; the only crate that
//! depends on rumqttc, whose types it re-exports). One task, started by
//! [`Console::start`], owns the connection: it subscribes to
//! `ferry/v1/<fleet>/#`, feeds every message to [`Store::apply`], and
//! publishes the commands handed to [`Console::publish`].
//!
//! # Nothing lost while the console is away
//! The console connects with `clean_session = false` and a fixed client id
//! (default `ferry-fleet-<fleet>`), so the broker keeps its subscription and
//! queues the fleet's QoS 1 messages while it is down; devices keep in their
//! own buffers whatever the broker has not acknowledged. A console outage
//! therefore loses nothing, within the broker's queue limit for a session
//! (mosquitto `max_queued_messages`, 1000 by default: raise it; see the
//! README). Two consoles must not share a client id: they would take the
//! session from each other in turn.
//!
//! # Acknowledging only what is on disk
//! rumqttc acknowledges an incoming QoS 1 message as soon as it reads it,
//! before the application has seen it. The console uses manual
//! acknowledgements instead: a message is applied to the store, then a sled
//! flush that started after the apply completes (on the blocking pool, one
//! flush for every message applied meanwhile: group commit), and only then
//! its PUBACK goes out, in the order the messages came. A console killed at
//! any point loses nothing: the broker re-sends what was not acknowledged
//! and the store's watermarks drop what was applied twice. The broker's
//! window of unacknowledged messages per client (mosquitto
//! `max_inflight_messages`, 20 by default) times the flush rate bounds the
//! throughput: measured on loopback with mosquitto on 2 cores, about 5,500
//! messages of 20 telemetry records per second, applied and acknowledged.
//!
//! PUBACKs queued for a connection that is then lost are dropped: the broker
//! re-sends those messages on the next connection (same session) and they
//! are acknowledged then. A store that cannot write (disk full) is not
//! worked around: the console stops applying, drops the connection without
//! acknowledging, and reconnects with backoff, so the broker keeps the
//! messages until the store works again.
//!
//! # Subscribing
//! On every CONNACK, even when the broker kept the session: the broker then
//! re-sends every device's retained status, which refreshes what a full
//! session queue may have dropped; the store recognises a status it already
//! applied. [`Console::is_connected`] is true from the SUBACK to the end of
//! the connection.
//!
//! # Commands
//! [`Console::publish`] hands a QoS 1 message to this task and returns when
//! the broker acknowledged it (PUBACK), or an error when the connection was
//! lost before (the command may or may not have been delivered: publish it
//! again with the same command id; agents act on a command id once) or after
//! [`PUBLISH_TIMEOUT`]. At most [`MAX_COMMANDS_IN_FLIGHT`] are outstanding;
//! PUBACKs are matched to commands in the order rumqttc reports
//! `Outgoing::Publish` (FIFO; a packet id collision parks one publish, and
//! that case is tracked too: `ferry_link::Tracker`). After a lost
//! connection rumqttc's own re-sends are cleared (as in the agent): every
//! outstanding command fails, and one path (the caller's retry) covers
//! every case.
//!
//! # Never blocking the event loop
//! The task never awaits rumqttc's request channel (`try_*` only, with
//! [`REQUEST_CAPACITY`] far above what can be outstanding), and it never
//! cancels `EventLoop::poll` midway: the poll future owns the event loop and
//! lives across `select!` rounds (see `ferry_link::drive`). Callers of
//! `publish` wait on a channel of their own, never on rumqttc's.
//!
//! # Limits
//! - Incoming packets up to [`MAX_INCOMING_PACKET`]: devices send at most
//!   128 KiB ([`ferry_protocol::MAX_MESSAGE_BYTES`]); the rest is room for
//!   other publishers. A larger message breaks the connection each time the
//!   broker re-sends it: cap the broker's message size (mosquitto
//!   `message_size_limit`) at or below it.
//! - Outgoing commands up to [`ferry_protocol::MAX_MESSAGE_BYTES`].
//! - Reconnects: exponential backoff with jitter between [`BACKOFF_MIN`]
//!   and [`BACKOFF_MAX`], reset after a connection that lasted
//!   [`STABLE_AFTER`].

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ferry_link::{
    AsyncClient, Backoff, BrokerUrl, BrokerUrlError, ConnectionError, Event, EventLoop, FileNames,
    Incoming, MqttOptions, Outgoing, Publish, QoS, Reconnect, Settings, SettingsError,
    SubscribeReasonCode, TlsError, TlsFiles, Tracker, drive,
};
use ferry_protocol::{
    MAX_MESSAGE_BYTES, SCHEMA_VERSION, Status, TOPIC_ROOT, Topic, fleet_filter, parse_topic,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::store::{Store, StoreError};

/// Keep alive: how long a dead connection can go unnoticed (about 1.5×).
pub const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Largest incoming packet (see the module header).
pub const MAX_INCOMING_PACKET: usize = 1 << 20;

/// Added to [`MAX_MESSAGE_BYTES`] for the outgoing packet limit: fixed
/// header, packet id and topic.
pub use ferry_link::PACKET_HEADROOM;

/// Commands waiting for their PUBACK at once.
pub const MAX_COMMANDS_IN_FLIGHT: usize = 16;

/// rumqttc's own window of unacknowledged publishes: above ours, so its
/// flow control never holds back the PUBACKs that share its request channel.
const RUMQTTC_INFLIGHT: u16 = 2 * MAX_COMMANDS_IN_FLIGHT as u16;

/// rumqttc's request channel: PUBACKs (at most the broker's window, which
/// is 20 to 100 for common brokers), commands and subscriptions.
pub const REQUEST_CAPACITY: usize = 1024;

/// How long [`Console::publish`] waits for the broker's PUBACK.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Reconnect backoff bounds.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Reconnect delays: doubling from [`BACKOFF_MIN`], capped at
/// [`BACKOFF_MAX`], with jitter so a console and its fleet do not come back
/// in lockstep.
const BACKOFF: Backoff = Backoff {
    min: BACKOFF_MIN,
    max: BACKOFF_MAX,
};

/// A connection that lasted this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// How long a graceful stop waits for the last PUBACKs and the DISCONNECT.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// How long `read_statuses` waits for the broker to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to connect.
#[derive(Clone)]
pub struct IngestOptions {
    /// `mqtt://host[:port]` or `mqtts://host[:port]` (ports 1883 and 8883 by default).
    pub broker: String,
    pub fleet: String,
    /// The persistent session's name (see the module header).
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// CA certificates (PEM) for `mqtts://`; the system's otherwise.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for IngestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestOptions")
            .field("broker", &self.broker)
            .field("fleet", &self.fleet)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl IngestOptions {
    /// No credentials, no CA file, the default client id.
    pub fn new(broker: impl Into<String>, fleet: impl Into<String>) -> IngestOptions {
        let fleet = fleet.into();
        IngestOptions {
            broker: broker.into(),
            client_id: default_client_id(&fleet),
            fleet,
            username: None,
            password: None,
            ca_file: None,
        }
    }
}

/// `ferry-fleet-<fleet>`.
pub fn default_client_id(fleet: &str) -> String {
    format!("ferry-fleet-{fleet}")
}

/// Parses `--broker` (see [`BrokerUrl::parse`]).
fn parse_url(url: &str) -> Result<BrokerUrl> {
    BrokerUrl::parse(url).map_err(|e| match e {
        BrokerUrlError::Credentials => {
            anyhow!("the broker URL {e}: use --username and --password-env")
        }
        e => anyhow!("the broker URL {e}"),
    })
}

/// How TLS errors name the files (the console takes a CA file only: `--ca`).
const FILE_NAMES: FileNames = FileNames {
    ca_file: "the CA file",
    client_cert: "the client certificate",
    client_key: "the client key",
};

/// Checked connection options. `console`: the persistent session with
/// manual acknowledgements; otherwise a clean, short-lived session.
fn mqtt_options(o: &IngestOptions, console: bool) -> Result<MqttOptions> {
    ferry_protocol::validate_name("fleet", &o.fleet).map_err(anyhow::Error::msg)?;
    if o.client_id.is_empty() || o.client_id.len() > 128 {
        bail!("the MQTT client id must be 1 to 128 characters");
    }
    let url = parse_url(&o.broker)?;
    let tls = TlsFiles {
        ca_file: o.ca_file.clone(),
        ..TlsFiles::none(FILE_NAMES)
    };
    let mut s = Settings::new(url, o.client_id.clone(), tls);
    s.clean_session = !console;
    s.manual_acks = console;
    s.keep_alive = KEEP_ALIVE;
    s.max_incoming_packet = MAX_INCOMING_PACKET;
    s.max_outgoing_packet = MAX_MESSAGE_BYTES + PACKET_HEADROOM;
    s.inflight = RUMQTTC_INFLIGHT;
    s.request_capacity = if console { REQUEST_CAPACITY } else { 16 };
    s.username = o.username.clone();
    s.password = o.password.clone();
    s.options().map_err(|e| match e {
        SettingsError::TlsFilesWithoutTls => {
            anyhow!("a CA file is set but the broker URL is plain mqtt://; use mqtts://")
        }
        SettingsError::Tls(TlsError::NoSystemRoots { detail, .. }) => anyhow!(
            "no system CA certificates found for mqtts://: install ca-certificates or pass --ca{}",
            detail.map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        e => anyhow::Error::new(e),
    })
}

/// Counters of the ingest; they only grow.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// CONNACKs received.
    pub connects: AtomicU64,
    /// Connections lost or failed.
    pub disconnects: AtomicU64,
    /// Messages received and applied (duplicates and refusals included).
    pub messages: AtomicU64,
    /// Messages acknowledged to the broker (after a flush).
    pub acked: AtomicU64,
    /// Store failures (the message was left to the broker).
    pub store_errors: AtomicU64,
    /// Commands the broker acknowledged.
    pub commands: AtomicU64,
    /// Commands that failed (refused, connection lost, timed out).
    pub commands_failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl IngestStats {
    /// The last connection or store error, for people.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_last_error(&self, e: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(e);
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A command on its way to the broker.
struct PublishRequest {
    topic: String,
    payload: Vec<u8>,
    reply: oneshot::Sender<Result<(), String>>,
}

/// The connection to the broker on behalf of a [`Store`] (see the module
/// header). Stops when [`Console::stop`] is called or when dropped (then
/// without the graceful DISCONNECT).
pub struct Console {
    requests: mpsc::Sender<PublishRequest>,
    following: watch::Receiver<bool>,
    stats: Arc<IngestStats>,
    shutdown: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    store: Arc<Store>,
    fleet: String,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("fleet", &self.fleet)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// Checks the options (bad settings fail here, not in a reconnect
    /// loop) and starts following the fleet. Needs a tokio runtime.
    pub fn start(options: &IngestOptions, store: Arc<Store>) -> Result<Console> {
        let m = mqtt_options(options, true)
            .with_context(|| format!("invalid MQTT settings for {}", options.broker))?;
        let (client, eventloop) = ferry_link::client(m);
        let (requests_tx, requests) = mpsc::channel(MAX_COMMANDS_IN_FLIGHT * 4);
        let (following_tx, following) = watch::channel(false);
        let stats = Arc::new(IngestStats::default());
        let shutdown = CancellationToken::new();
        let session = Session {
            client,
            store: store.clone(),
            filter: fleet_filter(&options.fleet),
            stats: stats.clone(),
            following: following_tx,
            connected: false,
            retry: Reconnect::new(BACKOFF, STABLE_AFTER),
            generation: 0,
            applied: Vec::new(),
            ready: VecDeque::new(),
            halted: false,
            reconnect: false,
            outbox: Tracker::default(),
        };
        info!(broker = %options.broker, fleet = %options.fleet, client_id = %options.client_id, "Following the fleet");
        let task = tokio::spawn(run(session, eventloop, requests, shutdown.clone()));
        Ok(Console {
            requests: requests_tx,
            following,
            stats,
            shutdown,
            task: Mutex::new(Some(task)),
            store,
            fleet: options.fleet.clone(),
        })
    }

    /// Connected and subscribed to the fleet's topics.
    pub fn is_connected(&self) -> bool {
        *self.following.borrow()
    }

    /// Waits until [`Console::is_connected`] (true) or `timeout` (false).
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.following.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Counters and the last error.
    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }

    /// The fleet followed.
    pub fn fleet(&self) -> &str {
        &self.fleet
    }

    /// Publishes a command (QoS 1, not retained) and returns once the broker
    /// acknowledged it; see the module header for the failure cases.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<()> {
        if payload.len() > MAX_MESSAGE_BYTES {
            bail!(
                "a command of {} bytes is over the {MAX_MESSAGE_BYTES}-byte limit",
                payload.len()
            );
        }
        if topic.is_empty() || topic.contains(['+', '#']) {
            bail!("cannot publish to {topic:?}: not a topic name");
        }
        let (reply, answer) = oneshot::channel();
        let request = PublishRequest {
            topic: topic.to_string(),
            payload,
            reply,
        };
        let outcome = tokio::time::timeout(PUBLISH_TIMEOUT, async {
            self.requests
                .send(request)
                .await
                .map_err(|_| anyhow!("the console has stopped"))?;
            answer
                .await
                .map_err(|_| anyhow!("the console has stopped"))?
                .map_err(anyhow::Error::msg)
        })
        .await;
        match outcome {
            Ok(result) => {
                if result.is_ok() {
                    IngestStats::add(&self.stats.commands, 1);
                }
                result.with_context(|| format!("publishing to {topic}"))
            }
            Err(_) => {
                IngestStats::add(&self.stats.commands_failed, 1);
                bail!(
                    "publishing to {topic}: no PUBACK within {}s (broker unreachable?); it may still be delivered",
                    PUBLISH_TIMEOUT.as_secs()
                )
            }
        }
    }

    /// Stops: acknowledges what is already on disk, disconnects (the broker
    /// keeps the session and queues for the next start), flushes the
    /// store. Idempotent.
    pub async fn stop(&self) -> Result<(), StoreError> {
        self.shutdown.cancel();
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task
            && let Err(error) = task.await
        {
            warn!(%error, "The MQTT task ended badly");
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .unwrap_or_else(|e| panic!("flush panicked: {e}"))
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A message applied to the store, waiting to be acknowledged.
#[derive(Debug, Clone, Copy)]
struct Ack {
    pkid: u16,
    qos: QoS,
}

/// A flush in progress and the messages it makes durable.
struct Flush {
    handle: JoinHandle<Result<(), StoreError>>,
    acks: Vec<Ack>,
    generation: u64,
}

/// Where a command's outcome goes.
type Reply = oneshot::Sender<Result<(), String>>;

/// Fails every command not acknowledged yet; returns how many.
fn fail_all(outbox: &mut Tracker<Reply>, why: &str) -> u64 {
    let mut n = 0;
    for reply in outbox.drain() {
        n += 1;
        let _ = reply.send(Err(why.to_string()));
    }
    n
}

/// The task's state.
struct Session {
    client: AsyncClient,
    store: Arc<Store>,
    filter: String,
    stats: Arc<IngestStats>,
    following: watch::Sender<bool>,
    connected: bool,
    /// The reconnect backoff's attempts; reset by a stable connection.
    retry: Reconnect,
    /// Bumped when a connection ends: acknowledgements of an older one are dropped.
    generation: u64,
    /// Applied since the last flush started.
    applied: Vec<Ack>,
    /// Durable, to acknowledge.
    ready: VecDeque<Ack>,
    /// The store failed: apply nothing more on this connection.
    halted: bool,
    /// Drop the connection at the next poll result (store failure).
    reconnect: bool,
    /// Commands between `try_publish` and their PUBACK.
    outbox: Tracker<Reply>,
}

async fn join_flush(
    flush: &mut Option<Flush>,
) -> Result<Result<(), StoreError>, tokio::task::JoinError> {
    match flush {
        Some(f) => (&mut f.handle).await,
        None => std::future::pending().await,
    }
}

async fn run(
    mut s: Session,
    eventloop: EventLoop,
    mut requests: mpsc::Receiver<PublishRequest>,
    shutdown: CancellationToken,
) {
    let conn = drive(eventloop, None);
    tokio::pin!(conn);
    let mut flush: Option<Flush> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            (mut el, result) = &mut conn => {
                let delay = s.on_poll(&mut el, result);
                conn.set(drive(el, delay));
            }
            joined = join_flush(&mut flush) => {
                let f = flush.take().expect("a flush was running");
                s.on_flushed(f.acks, f.generation, joined);
            }
            Some(request) = requests.recv(), if s.connected && s.outbox.len() < MAX_COMMANDS_IN_FLIGHT => {
                s.publish(request);
            }
        }
        if flush.is_none() && !s.applied.is_empty() {
            flush = Some(s.start_flush());
        }
        s.send_acks();
    }

    // Graceful stop: acknowledge what is durable, then DISCONNECT (the
    // broker keeps the session and does not see a failure).
    if let Some(f) = flush.take() {
        let joined = f.handle.await;
        s.on_flushed(f.acks, f.generation, joined);
    }
    if !s.applied.is_empty() {
        let f = s.start_flush();
        let joined = f.handle.await;
        s.on_flushed(f.acks, f.generation, joined);
    }
    s.send_acks();
    fail_all(&mut s.outbox, "the console is stopping");
    // Messages still arriving are left to the broker for the next start.
    s.halted = true;
    if s.connected && s.client.try_disconnect().is_ok() {
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            tokio::select! {
                (el, result) = &mut conn => {
                    match result {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(event) => s.on_event(event),
                    }
                    conn.set(drive(el, None));
                }
                _ = tokio::time::sleep_until(deadline) => {
                    warn!("The broker did not take the DISCONNECT in time");
                    break;
                }
            }
        }
    }
    s.following.send_replace(false);
    info!("Stopped following the fleet");
}

impl Session {
    /// Handles one result of `EventLoop::poll`; returns the delay before
    /// the next poll (a reconnect backoff).
    fn on_poll(
        &mut self,
        el: &mut EventLoop,
        result: Result<Event, ConnectionError>,
    ) -> Option<Duration> {
        match result {
            Ok(event) => {
                self.on_event(event);
                if self.reconnect {
                    // Drop the connection without acknowledging anything.
                    ferry_link::drop_connection(el);
                    return Some(self.connection_lost(el, "the store cannot write".into()));
                }
                None
            }
            Err(error) => Some(self.connection_lost(el, error.to_string())),
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Incoming::ConnAck(ack)) => {
                info!(session_present = ack.session_present, "MQTT connected");
                self.connected = true;
                self.retry.connected(Instant::now());
                IngestStats::add(&self.stats.connects, 1);
                if let Err(error) = self
                    .client
                    .try_subscribe(self.filter.clone(), QoS::AtLeastOnce)
                {
                    warn!(%error, "Cannot subscribe to the fleet's topics");
                }
            }
            Event::Incoming(Incoming::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                {
                    info!(filter = %self.filter, "Subscribed");
                    self.following.send_replace(true);
                } else {
                    let e = format!(
                        "the broker refused the subscription to {} (check its ACL)",
                        self.filter
                    );
                    error!(filter = %self.filter, "The broker refused the subscription (check its ACL)");
                    self.stats.set_last_error(e);
                }
            }
            Event::Incoming(Incoming::Publish(p)) => self.on_message(p),
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Err(anomaly) = self.outbox.on_publish(pkid) {
                    warn!(%anomaly, code = anomaly.code(), "A publish nobody waits for (bookkeeping out of step)");
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                debug!(
                    pkid,
                    "A command waits for a packet id (broker acks out of order)"
                );
                if let Err(anomaly) = self.outbox.on_await_ack(pkid) {
                    debug!(%anomaly, "A parked publish nobody waits for");
                }
            }
            Event::Incoming(Incoming::PubAck(ack)) => {
                // `Console::publish` counts the command when its caller
                // learns of the PUBACK (counting here would race the caller).
                if let Some(reply) = self.outbox.on_puback(ack.pkid) {
                    let _ = reply.send(Ok(()));
                }
            }
            Event::Outgoing(Outgoing::Disconnect) => {
                self.connected = false;
                self.following.send_replace(false);
            }
            _ => {}
        }
    }

    fn on_message(&mut self, p: Publish) {
        if self.halted {
            // Left unacknowledged: the broker re-sends it on the next connection.
            return;
        }
        IngestStats::add(&self.stats.messages, 1);
        match self.store.apply(&p.topic, &p.payload, ferry_host::now_ms()) {
            Ok(_) => self.applied.push(Ack {
                pkid: p.pkid,
                qos: p.qos,
            }),
            Err(e) => {
                error!(error = %e, code = e.code(), topic = %p.topic, "Cannot store a message; reconnecting so that the broker keeps it");
                IngestStats::add(&self.stats.store_errors, 1);
                self.stats.set_last_error(e.to_string());
                self.halted = true;
                self.reconnect = true;
            }
        }
    }

    fn start_flush(&mut self) -> Flush {
        let store = self.store.clone();
        Flush {
            handle: tokio::task::spawn_blocking(move || store.flush()),
            acks: std::mem::take(&mut self.applied),
            generation: self.generation,
        }
    }

    fn on_flushed(
        &mut self,
        acks: Vec<Ack>,
        generation: u64,
        joined: Result<Result<(), StoreError>, tokio::task::JoinError>,
    ) {
        match joined {
            Ok(Ok(())) => {
                if generation == self.generation {
                    self.ready.extend(acks);
                }
            }
            Ok(Err(e)) => {
                error!(error = %e, "Cannot flush the store; reconnecting so that the broker keeps the messages");
                IngestStats::add(&self.stats.store_errors, 1);
                self.stats.set_last_error(e.to_string());
                self.halted = true;
                self.reconnect = true;
            }
            Err(e) => {
                error!(error = %e, "The store flush panicked");
                self.halted = true;
                self.reconnect = true;
            }
        }
    }

    /// Hands durable acknowledgements to rumqttc, in order; what does not
    /// fit waits for the next round.
    fn send_acks(&mut self) {
        while let Some(a) = self.ready.front() {
            let mut p = Publish::new("", a.qos, Vec::<u8>::new());
            p.pkid = a.pkid;
            if self.client.try_ack(&p).is_err() {
                break;
            }
            self.ready.pop_front();
            IngestStats::add(&self.stats.acked, 1);
        }
    }

    fn publish(&mut self, r: PublishRequest) {
        if r.reply.is_closed() {
            // The caller gave up (timeout) before its turn.
            return;
        }
        match self
            .client
            .try_publish(r.topic.clone(), QoS::AtLeastOnce, false, r.payload)
        {
            Ok(()) => self.outbox.handed_over(r.reply),
            Err(e) => {
                IngestStats::add(&self.stats.commands_failed, 1);
                let _ = r
                    .reply
                    .send(Err(format!("rumqttc refused the publish: {e}")));
            }
        }
    }

    fn connection_lost(&mut self, el: &mut EventLoop, error: String) -> Duration {
        if self.connected {
            warn!(%error, "MQTT connection lost");
        } else {
            warn!(%error, "MQTT connection failed");
        }
        self.stats.set_last_error(error);
        IngestStats::add(&self.stats.disconnects, 1);
        self.following.send_replace(false);
        self.connected = false;
        self.generation += 1;
        self.applied.clear();
        self.ready.clear();
        self.halted = false;
        self.reconnect = false;
        let failed = fail_all(
            &mut self.outbox,
            "the connection to the broker was lost before it acknowledged the command; it may or may not have been delivered",
        );
        IngestStats::add(&self.stats.commands_failed, failed);
        // Commands are re-sent by their callers, not by rumqttc (see the
        // module header); a parked publish would block the next connection.
        ferry_link::forget_resends(el);
        self.retry.failed(Instant::now(), fastrand::f64())
    }
}

/// Reads the retained statuses of a fleet: connects with a clean session
/// and its own client id, subscribes to `ferry/v1/<fleet>/+/status`, and
/// collects for `wait` after the SUBACK. Statuses that are not valid are
/// skipped (logged). Sorted by device id.
pub async fn read_statuses(options: &IngestOptions, wait: Duration) -> Result<Vec<Status>> {
    let m = mqtt_options(options, false)
        .with_context(|| format!("invalid MQTT settings for {}", options.broker))?;
    let (client, mut el) = ferry_link::client(m);
    let filter = format!("{TOPIC_ROOT}/{}/+/status", options.fleet);
    let mut statuses = BTreeMap::new();
    let connect_deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut until: Option<Instant> = None;
    loop {
        // Cancelling the poll is fine here: the connection is dropped after.
        let event =
            match tokio::time::timeout_at(until.unwrap_or(connect_deadline), el.poll()).await {
                Err(_) if until.is_some() => break,
                Err(_) => bail!(
                    "no answer from the broker {} within {}s",
                    options.broker,
                    CONNECT_TIMEOUT.as_secs()
                ),
                Ok(Err(e)) => bail!("cannot read statuses from {}: {e}", options.broker),
                Ok(Ok(event)) => event,
            };
        match event {
            Event::Incoming(Incoming::ConnAck(_)) => {
                client
                    .try_subscribe(filter.clone(), QoS::AtLeastOnce)
                    .context("cannot subscribe")?;
            }
            Event::Incoming(Incoming::SubAck(ack)) => {
                if !ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                {
                    bail!("the broker refused the subscription to {filter} (check its ACL)");
                }
                until = Some(Instant::now() + wait);
            }
            Event::Incoming(Incoming::Publish(p)) => {
                let Some((_, device, Topic::Status)) = parse_topic(&p.topic) else {
                    continue;
                };
                match serde_json::from_slice::<Status>(&p.payload) {
                    Ok(s) if s.schema == SCHEMA_VERSION && s.device == device => {
                        statuses.insert(device.to_string(), s);
                    }
                    Ok(_) => {
                        warn!(topic = %p.topic, "Skipped a status of another schema or device")
                    }
                    Err(error) => warn!(topic = %p.topic, %error, "Skipped an invalid status"),
                }
            }
            _ => {}
        }
    }
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(event) = el.poll().await {
                if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    Ok(statuses.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_errors_name_the_setting() {
        // The parser's cases are tested in ferry-link; here: the wording.
        let u = parse_url("mqtts://10.0.0.1:8884/").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "10.0.0.1", 8884));
        let e = parse_url("tcp://x").unwrap_err().to_string();
        assert!(
            e.starts_with("the broker URL must start with mqtt://"),
            "{e}"
        );
        let e = parse_url("mqtt://u:p@x").unwrap_err().to_string();
        assert!(
            e.contains("credentials") && e.contains("--username and --password-env"),
            "{e}"
        );
    }

    #[test]
    fn options() {
        let mut o = IngestOptions::new("mqtt://127.0.0.1:1999", "plant-7");
        assert_eq!(o.client_id, "ferry-fleet-plant-7");
        o.username = Some("console".into());
        o.password = Some("secret".into());
        assert!(!format!("{o:?}").contains("secret"));
        let m = mqtt_options(&o, true).unwrap();
        assert!(!m.clean_session());
        assert!(m.manual_acks());
        assert_eq!(m.client_id(), "ferry-fleet-plant-7");
        assert!(m.max_packet_size() >= MAX_MESSAGE_BYTES + PACKET_HEADROOM);
        let m = mqtt_options(&o, false).unwrap();
        assert!(m.clean_session() && !m.manual_acks());

        let e = |o: &IngestOptions| mqtt_options(o, true).unwrap_err().to_string();
        let mut bad = o.clone();
        bad.fleet = "a/b".into();
        assert!(e(&bad).contains("fleet"));
        let mut bad = o.clone();
        bad.username = None;
        assert!(e(&bad).contains("no user name"));
        let mut bad = o.clone();
        bad.ca_file = Some("/x.pem".into());
        assert!(e(&bad).contains("mqtts://"));
        let mut bad = o.clone();
        bad.broker = "mqtts://127.0.0.1".into();
        bad.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(e(&bad).contains("cannot read the CA file"), "{}", e(&bad));
    }

    #[test]
    fn options_keep_the_console_limits() {
        let o = IngestOptions::new("mqtt://127.0.0.1:1999", "plant-7");
        let m = mqtt_options(&o, true).unwrap();
        assert_eq!(m.keep_alive(), KEEP_ALIVE);
        assert_eq!(m.max_packet_size(), MAX_INCOMING_PACKET);
        assert_eq!(m.inflight(), RUMQTTC_INFLIGHT);
        assert_eq!(m.request_channel_capacity(), REQUEST_CAPACITY);
        assert!(m.credentials().is_none());
        assert!(m.last_will().is_none());
        let mut long = o.clone();
        long.client_id = "x".repeat(129);
        assert!(
            mqtt_options(&long, true)
                .unwrap_err()
                .to_string()
                .contains("client id")
        );
    }

    #[test]
    fn commands_are_matched_to_their_pubacks() {
        // The packet-id cases are ferry-link's (`Tracker`); here: every
        // command's caller learns its outcome.
        let mut o = Tracker::default();
        let mut answers = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = oneshot::channel();
            o.handed_over(tx);
            answers.push(rx);
        }
        o.on_publish(1).unwrap();
        // The second collides on packet id 3 and is parked.
        o.on_await_ack(3).unwrap();
        o.on_publish(2).unwrap();
        assert_eq!(o.len(), 3);
        let ack = |o: &mut Tracker<Reply>, pkid| match o.on_puback(pkid) {
            Some(reply) => {
                reply.send(Ok(())).unwrap();
                true
            }
            None => false,
        };
        assert!(ack(&mut o, 2));
        assert!(!ack(&mut o, 9));
        // The parked one goes out when its id is free.
        o.on_publish(3).unwrap();
        assert!(ack(&mut o, 3));
        assert_eq!(o.len(), 1);
        assert_eq!(fail_all(&mut o, "lost"), 1);
        assert!(o.is_empty());
        let got: Vec<_> = answers.iter_mut().map(|a| a.try_recv().unwrap()).collect();
        assert_eq!(got, [Err("lost".into()), Ok(()), Ok(())]);
    }
}
