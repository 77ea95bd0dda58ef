//! The MQTT reporter against a real mosquitto: ACLs, nothing lost across a
//! broker restart, retained status and last will, commands in, message
//! size limits, TLS.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_agent::buffer::{Buffer, BufferOptions};
use ferry_agent::config::MqttConfig;
use ferry_agent::mqtt::{Identity, MqttStats, Reporter};
use ferry_protocol::{
    Action, Batch, Command, Event, EventRecord, OutputSummary, Status, Stream, TelemetryRecord,
    Topic, topic,
};
use tempfile::TempDir;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use ferry_testkit::broker::{
    Message, Mosquitto, Pki, Relay, Subscriber, SubscriberOptions, password,
};

const FLEET: &str = "plant";

/// A device without the agent: a buffer and a reporter, driven by the test.
struct Device {
    id: String,
    buffer: Arc<Buffer>,
    stats: Arc<MqttStats>,
    status: watch::Sender<Status>,
    commands: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: TempDir,
}

impl Device {
    fn new(id: &str) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Buffer::open(BufferOptions {
            path: dir.path().join("buffer"),
            max_bytes: 256 << 20,
            flush_interval: Duration::from_secs(1),
            cache_bytes: 8 << 20,
        })
        .unwrap();
        let mut status = Status::offline(FLEET, id, "0.0.0-test");
        status.predictions = 7;
        let (commands_tx, commands) = mpsc::channel(16);
        Device {
            id: id.into(),
            buffer: Arc::new(buffer),
            stats: Arc::new(MqttStats::default()),
            status: watch::channel(status).0,
            commands,
            commands_tx,
            shutdown: CancellationToken::new(),
            task: None,
            _dir: dir,
        }
    }

    /// Plain TCP to `broker` as this device, short timeouts.
    fn config(&self, broker: &Mosquitto) -> MqttConfig {
        MqttConfig {
            url: broker.url(),
            username: Some(self.id.clone()),
            keep_alive_s: 5,
            max_inflight: 4,
            max_message_bytes: 16 * 1024,
            reconnect_min_ms: 20,
            reconnect_max_ms: 300,
            ..MqttConfig::default()
        }
    }

    fn start(&mut self, config: &MqttConfig) {
        let identity = Identity {
            device: self.id.clone(),
            fleet: FLEET.into(),
            agent_version: "0.0.0-test".into(),
        };
        let pw = config.username.as_ref().map(|u| password(u));
        let reporter = Reporter::with_password(
            config,
            identity,
            self.buffer.clone(),
            self.stats.clone(),
            pw,
        )
        .unwrap();
        self.shutdown = CancellationToken::new();
        let task = reporter.run(
            self.status.subscribe(),
            self.commands_tx.clone(),
            self.shutdown.clone(),
        );
        self.task = Some(tokio::spawn(task));
    }

    /// Graceful shutdown; returns how long it took.
    async fn stop(&mut self) -> Duration {
        let t = Instant::now();
        self.shutdown.cancel();
        self.task.take().unwrap().await.unwrap().unwrap();
        t.elapsed()
    }

    /// Kills the reporter: its socket closes without a DISCONNECT.
    async fn kill(&mut self) {
        let task = self.task.take().unwrap();
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
    }

    fn connected(&self) -> bool {
        self.stats.connected.load(Ordering::Relaxed)
    }

    fn append_telemetry(&self, pad: usize) -> u64 {
        self.buffer
            .append(Stream::Telemetry, |id| telemetry(id, pad))
            .unwrap()
    }

    fn topic(&self, t: Topic) -> String {
        topic(FLEET, &self.id, t)
    }
}

fn telemetry(id: u64, pad: usize) -> Vec<u8> {
    serde_json::to_vec(&TelemetryRecord {
        id,
        ts_ms: 1_700_000_000_000 + id,
        bundle_version: "1.0.0".into(),
        latency_us: 840,
        ok: pad == 0,
        output: OutputSummary {
            top1: Some(3),
            score: Some(0.91),
            value: None,
        },
        error: (pad > 0).then(|| "x".repeat(pad)),
        rows: 1,
    })
    .unwrap()
}

/// Record ids per batch message, in arrival order (batches the broker
/// re-delivered to the subscriber itself, flagged `dup`, are skipped when
/// `publisher_only`).
fn batch_ids(messages: &[Message], publisher_only: bool) -> Vec<Vec<u64>> {
    messages
        .iter()
        .filter(|m| !(publisher_only && m.dup))
        .map(|m| {
            let batch: Batch<serde_json::Value> = serde_json::from_slice(&m.payload).unwrap();
            batch
                .records
                .iter()
                .map(|r| r["id"].as_u64().unwrap())
                .collect()
        })
        .collect()
}

async fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status_of(m: &Message) -> Status {
    serde_json::from_slice(&m.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_devices_topics_are_refused() {
    let broker = Mosquitto::start(&["dev-a", "dev-b"]);
    let admin = Subscriber::connect(&broker, SubscriberOptions::admin(&["ferry/v1/#"])).await;
    let device_a = Subscriber::connect(
        &broker,
        SubscriberOptions {
            user: "dev-a".into(),
            client_id: "dev-a".into(),
            clean_session: true,
            filters: vec![
                topic(FLEET, "dev-a", Topic::Command),
                topic(FLEET, ferry_protocol::ALL_DEVICES, Topic::Command),
            ],
        },
    )
    .await;
    // mosquitto grants any subscription and applies the ACL per message:
    // another device's commands never reach this one.
    device_a
        .subscribe(&topic(FLEET, "dev-b", Topic::Command))
        .await;
    admin
        .publish(&topic(FLEET, "dev-b", Topic::Command), "for b")
        .await;
    admin
        .publish(&topic(FLEET, "dev-a", Topic::Command), "for a")
        .await;
    assert!(
        device_a
            .wait_for(Duration::from_secs(5), |m| !m.is_empty())
            .await
    );

    let own = topic(FLEET, "dev-a", Topic::Stream(Stream::Telemetry));
    let other = topic(FLEET, "dev-b", Topic::Stream(Stream::Telemetry));
    let fleet_cmd = topic(FLEET, ferry_protocol::ALL_DEVICES, Topic::Command);
    device_a.publish(&other, r#"{"forged":true}"#).await;
    device_a.publish(&fleet_cmd, r#"{"forged":true}"#).await;
    device_a.publish(&own, r#"{"mine":true}"#).await;
    assert!(
        admin
            .wait_for(Duration::from_secs(5), |m| m.iter().any(|m| m.topic == own))
            .await
    );
    // MQTT 3.1.1 has no way to refuse a publish: mosquitto acknowledges
    // and drops it. Published before the allowed one and still absent a
    // while after it arrived: refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen: BTreeSet<String> = admin.messages().into_iter().map(|m| m.topic).collect();
    let cmd_a = topic(FLEET, "dev-a", Topic::Command);
    let cmd_b = topic(FLEET, "dev-b", Topic::Command);
    assert_eq!(
        seen,
        BTreeSet::from([cmd_a.clone(), cmd_b, own]),
        "{}",
        broker.log()
    );
    let received: Vec<String> = device_a.messages().into_iter().map(|m| m.topic).collect();
    assert_eq!(received, [cmd_a]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing() {
    const RECORDS: u64 = 10_000;
    let mut broker = Mosquitto::start(&["dev-r"]);
    let mut device = Device::new("dev-r");
    let telemetry_topic = device.topic(Topic::Stream(Stream::Telemetry));
    // The operator keeps a persistent session: the broker queues for it
    // while it is away, so whatever is missing at the end is the device's.
    let admin = Subscriber::connect(
        &broker,
        SubscriberOptions {
            clean_session: false,
            client_id: "admin-restart".into(),
            ..SubscriberOptions::admin(&[&telemetry_topic])
        },
    )
    .await;
    let config = MqttConfig {
        max_inflight: 4,
        max_message_bytes: 8192,
        ..device.config(&broker)
    };
    device.start(&config);

    // Records arrive steadily (~10 k/s) while the broker goes away and
    // comes back: batches are in flight when it stops.
    let appender = {
        let buffer = device.buffer.clone();
        std::thread::spawn(move || {
            for chunk in 0..RECORDS / 10 {
                for _ in 0..10 {
                    buffer
                        .append(Stream::Telemetry, |id| telemetry(id, 0))
                        .unwrap();
                }
                if chunk % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        })
    };
    let acked = |n: u64| device.stats.acked_records.load(Ordering::Relaxed) >= n;
    wait_until("the first 1000 acks", Duration::from_secs(20), || {
        acked(1000)
    })
    .await;
    // Best effort: stop while batches are in flight.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = device.stats.clone();
    while stats.published.load(Ordering::Relaxed) == stats.acked_batches.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        std::hint::spin_loop();
    }
    broker.stop();
    wait_until("the device to notice", Duration::from_secs(10), || {
        !device.connected()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.restart();
    appender.join().unwrap();

    let all: BTreeSet<u64> = (1..=RECORDS).collect();
    let complete = admin
        .wait_for(Duration::from_secs(60), |m| {
            let got: BTreeSet<u64> = batch_ids(m, false).into_iter().flatten().collect();
            got.is_superset(&all)
        })
        .await;
    let batches = batch_ids(&admin.messages(), false);
    let got: BTreeSet<u64> = batches.iter().flatten().copied().collect();
    let missing: Vec<&u64> = all.difference(&got).take(10).collect();
    assert!(
        complete,
        "lost records, first: {missing:?}\n{}",
        broker.log()
    );

    wait_until("the buffer to empty", Duration::from_secs(10), || {
        device.buffer.pending(Stream::Telemetry) == 0
    })
    .await;
    // Duplicates sent by the device: only the batches in flight when the
    // connection went (at most max_inflight of them).
    let mut copies: BTreeMap<u64, usize> = BTreeMap::new();
    for id in batch_ids(&admin.messages(), true).into_iter().flatten() {
        *copies.entry(id).or_default() += 1;
    }
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    let largest = batches.iter().map(Vec::len).max().unwrap();
    let stats = &device.stats;
    let lost_with_connection = stats.unacked_on_disconnect.load(Ordering::Relaxed);
    assert!(
        duplicates <= usize::from(config.max_inflight) * largest,
        "{duplicates} duplicates, {lost_with_connection} batches in flight at the disconnect"
    );
    assert!(stats.reconnects.load(Ordering::Relaxed) >= 1);
    // Each record is acknowledged once: a batch lost with the connection
    // was never acknowledged, its re-send is.
    assert_eq!(stats.acked_records.load(Ordering::Relaxed), RECORDS);
    assert!(device.connected());
    eprintln!(
        "restart: {} batches, largest {largest} records, {duplicates} duplicate records, \
         {lost_with_connection} batches in flight at the disconnect",
        batches.len()
    );
    device.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resends_exactly_the_batches_in_flight() {
    const RECORDS: u64 = 2000;
    let broker = Mosquitto::start(&["dev-x"]);
    let relay = Relay::start(broker.port()).await;
    let mut device = Device::new("dev-x");
    let telemetry_topic = device.topic(Topic::Stream(Stream::Telemetry));
    let admin = Subscriber::connect(&broker, SubscriberOptions::admin(&[&telemetry_topic])).await;
    let config = MqttConfig {
        url: relay.url(),
        max_inflight: 4,
        max_message_bytes: 8192,
        ..device.config(&broker)
    };
    device.start(&config);
    let stats = device.stats.clone();
    wait_until("the first status", Duration::from_secs(10), || {
        stats.statuses.load(Ordering::Relaxed) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await; // its PUBACK

    // No PUBACK gets through: the window fills and stays full.
    relay.hold(true);
    for _ in 0..RECORDS {
        device.append_telemetry(0);
    }
    let window = usize::from(config.max_inflight);
    assert!(
        admin
            .wait_for(Duration::from_secs(10), |m| m.len() == window)
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        admin.messages().len(),
        window,
        "more than max_inflight batches unacknowledged"
    );
    assert_eq!(stats.published.load(Ordering::Relaxed), window as u64);
    let in_flight: usize = batch_ids(&admin.messages(), false)
        .iter()
        .map(Vec::len)
        .sum();

    // The broker got those batches, the device never heard back: after the
    // cut it sends their records again, once (not also rumqttc's copies of
    // the same publishes, although the broker resumes the session).
    relay.cut();
    relay.hold(false);
    let all: BTreeSet<u64> = (1..=RECORDS).collect();
    let complete = admin
        .wait_for(Duration::from_secs(20), |m| {
            batch_ids(m, false)
                .into_iter()
                .flatten()
                .collect::<BTreeSet<_>>()
                .is_superset(&all)
        })
        .await;
    assert!(complete);
    wait_until("the buffer to empty", Duration::from_secs(10), || {
        device.buffer.pending(Stream::Telemetry) == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received: usize = batch_ids(&admin.messages(), false)
        .iter()
        .map(Vec::len)
        .sum();
    assert_eq!(
        received - RECORDS as usize,
        in_flight,
        "duplicates beyond the window"
    );
    assert_eq!(
        stats.unacked_on_disconnect.load(Ordering::Relaxed),
        window as u64
    );
    assert!(stats.reconnects.load(Ordering::Relaxed) >= 1);
    device.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_retained_and_the_last_will_reports_a_crash() {
    let broker = Mosquitto::start(&["dev-s"]);
    let mut device = Device::new("dev-s");
    let status_topic = device.topic(Topic::Status);
    let admin = Subscriber::connect(&broker, SubscriberOptions::admin(&[&status_topic])).await;
    device.start(&device.config(&broker));
    assert!(
        admin
            .wait_for(Duration::from_secs(10), |m| m
                .iter()
                .any(|m| status_of(m).online))
            .await
    );

    // A console arriving later gets the retained status.
    let late = Subscriber::connect(&broker, SubscriberOptions::admin(&[&status_topic])).await;
    assert!(
        late.wait_for(Duration::from_secs(5), |m| !m.is_empty())
            .await
    );
    let retained = &late.messages()[0];
    assert!(retained.retain);
    let s = status_of(retained);
    assert!(s.online && s.ts_ms > 0);
    assert_eq!((s.device.as_str(), s.predictions), ("dev-s", 7));

    // A change of the watch is published.
    device.status.send_modify(|s| s.predictions = 42);
    assert!(
        admin
            .wait_for(Duration::from_secs(5), |m| m
                .iter()
                .any(|m| status_of(m).predictions == 42))
            .await
    );

    // A crash: the socket closes without DISCONNECT, the broker publishes
    // the will (retained, online false, no timestamp).
    device.kill().await;
    let will = |m: &Message| !status_of(m).online && status_of(m).ts_ms == 0;
    assert!(
        admin
            .wait_for(Duration::from_secs(10), |m| m.iter().any(will))
            .await,
        "{}",
        broker.log()
    );
    let after_crash =
        Subscriber::connect(&broker, SubscriberOptions::admin(&[&status_topic])).await;
    assert!(
        after_crash
            .wait_for(Duration::from_secs(5), |m| m
                .iter()
                .any(|m| m.retain && will(m)))
            .await
    );

    // Back, then a graceful stop: a stamped offline status, and no will.
    admin.clear();
    device.start(&device.config(&broker));
    assert!(
        admin
            .wait_for(Duration::from_secs(10), |m| m
                .iter()
                .any(|m| status_of(m).online))
            .await
    );
    let took = device.stop().await;
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    let goodbye = |m: &Message| !status_of(m).online && status_of(m).ts_ms > 0;
    assert!(
        admin
            .wait_for(Duration::from_secs(5), |m| m.iter().any(goodbye))
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !admin.messages().iter().any(will),
        "the will fired after a graceful stop"
    );
    let after_stop = Subscriber::connect(&broker, SubscriberOptions::admin(&[&status_topic])).await;
    assert!(
        after_stop
            .wait_for(Duration::from_secs(5), |m| m
                .iter()
                .any(|m| m.retain && goodbye(m)))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_the_agent_and_garbage_is_rejected() {
    let broker = Mosquitto::start(&["dev-c"]);
    let mut device = Device::new("dev-c");
    let events_topic = device.topic(Topic::Stream(Stream::Events));
    let status_topic = device.topic(Topic::Status);
    let admin = Subscriber::connect(
        &broker,
        SubscriberOptions::admin(&[&events_topic, &status_topic]),
    )
    .await;
    device.start(&device.config(&broker));
    // The status follows the subscription on the same connection: once it
    // is here, so are the subscriptions.
    assert!(
        admin
            .wait_for(Duration::from_secs(10), |m| m
                .iter()
                .any(|m| m.topic == status_topic))
            .await
    );

    let own = device.topic(Topic::Command);
    let fleet = topic(FLEET, ferry_protocol::ALL_DEVICES, Topic::Command);
    admin
        .publish(
            &own,
            r#"{"schema":1,"id":"c1","issued_ms":1,"action":"ping"}"#,
        )
        .await;
    admin
        .publish(
            &fleet,
            r#"{"schema":1,"id":"c2","issued_ms":2,"action":"check_update"}"#,
        )
        .await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let c = tokio::time::timeout(Duration::from_secs(5), device.commands.recv())
            .await
            .unwrap()
            .unwrap();
        got.push((c.id, c.action));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            ("c1".into(), Action::Ping),
            ("c2".into(), Action::CheckUpdate)
        ]
    );

    admin.publish(&own, "garbage").await;
    admin
        .publish(
            &own,
            r#"{"schema":2,"id":"c3","issued_ms":3,"action":"ping"}"#,
        )
        .await;
    let rejected = |m: &[Message]| -> Vec<(String, String)> {
        m.iter()
            .filter(|m| m.topic == events_topic)
            .flat_map(|m| {
                serde_json::from_slice::<Batch<EventRecord>>(&m.payload)
                    .unwrap()
                    .records
            })
            .filter_map(|r| match r.event {
                Event::CommandRejected { command_id, reason } => Some((command_id, reason)),
                _ => None,
            })
            .collect()
    };
    assert!(
        admin
            .wait_for(Duration::from_secs(10), |m| rejected(m).len() == 2)
            .await
    );
    let mut r = rejected(&admin.messages());
    r.sort();
    assert_eq!(r[0].0, "");
    assert!(r[0].1.starts_with("not JSON"), "{}", r[0].1);
    assert_eq!(r[1].0, "c3");
    assert!(r[1].1.contains("unsupported schema 2"), "{}", r[1].1);
    assert!(
        device.commands.try_recv().is_err(),
        "a rejected command reached the agent"
    );
    wait_until("the events to be acked", Duration::from_secs(5), || {
        device.buffer.pending(Stream::Events) == 0
    })
    .await;
    assert_eq!(device.stats.commands.load(Ordering::Relaxed), 2);
    assert_eq!(device.stats.commands_rejected.load(Ordering::Relaxed), 2);
    device.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_never_exceed_the_message_limit() {
    const MAX: usize = 8 * 1024;
    let broker = Mosquitto::start(&["dev-m"]);
    let mut device = Device::new("dev-m");
    let telemetry_topic = device.topic(Topic::Stream(Stream::Telemetry));
    let admin = Subscriber::connect(&broker, SubscriberOptions::admin(&[&telemetry_topic])).await;
    // ~200-byte records, a few near the limit, one that can never fit.
    let mut expected = BTreeSet::new();
    let mut too_big = 0;
    for i in 0..600 {
        let pad = match i {
            100 | 250 | 251 => 7000,
            400 => MAX + 100,
            _ => 70,
        };
        let id = device.append_telemetry(pad);
        assert!(telemetry(id, 70).len() >= 200);
        if pad > MAX {
            too_big = id;
        } else {
            expected.insert(id);
        }
    }
    let config = MqttConfig {
        max_message_bytes: MAX,
        ..device.config(&broker)
    };
    device.start(&config);
    let complete = admin
        .wait_for(Duration::from_secs(20), |m| {
            batch_ids(m, false)
                .into_iter()
                .flatten()
                .collect::<BTreeSet<_>>()
                .is_superset(&expected)
        })
        .await;
    assert!(complete);
    let messages = admin.messages();
    for m in &messages {
        assert!(m.payload.len() <= MAX, "a {} byte batch", m.payload.len());
    }
    let got: BTreeSet<u64> = batch_ids(&messages, false).into_iter().flatten().collect();
    assert!(!got.contains(&too_big));
    assert!(
        messages.len() >= 600 * 200 / MAX,
        "{} batches",
        messages.len()
    );
    wait_until("the buffer to empty", Duration::from_secs(5), || {
        device.buffer.pending(Stream::Telemetry) == 0
    })
    .await;
    assert_eq!(device.stats.dropped_records.load(Ordering::Relaxed), 1);
    device.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_needs_the_right_ca_and_a_client_certificate() {
    let devices = ["dev-t", "dev-u", "dev-v"];
    let pki = Pki::new(&devices);
    let broker = Mosquitto::start_with(&devices, Some(&pki));
    let admin = Subscriber::connect(
        &broker,
        SubscriberOptions::admin(&["ferry/v1/plant/+/status"]),
    )
    .await;
    let tls_device = |id: &str, ca: std::path::PathBuf, with_cert: bool| {
        let mut device = Device::new(id);
        let (cert, key) = pki.client(id);
        let config = MqttConfig {
            url: broker.tls_url(),
            // The broker takes the certificate's CN as the user name.
            username: None,
            ca_file: Some(ca),
            client_cert: with_cert.then_some(cert),
            client_key: with_cert.then_some(key),
            ..device.config(&broker)
        };
        device.start(&config);
        device
    };
    let mut good = tls_device("dev-t", pki.ca(), true);
    let mut wrong_ca = tls_device("dev-u", pki.other_ca(), true);
    let mut no_cert = tls_device("dev-v", pki.ca(), false);

    let status_t = good.topic(Topic::Status);
    assert!(
        admin
            .wait_for(Duration::from_secs(10), |m| m
                .iter()
                .any(|m| m.topic == status_t))
            .await,
        "{}",
        broker.log()
    );
    assert!(good.connected());
    good.append_telemetry(0);
    wait_until("a record over TLS", Duration::from_secs(5), || {
        good.stats.acked_records.load(Ordering::Relaxed) == 1
    })
    .await;

    wait_until("the wrong CA to fail", Duration::from_secs(10), || {
        wrong_ca.stats.last_error().is_some()
    })
    .await;
    let error = wrong_ca.stats.last_error().unwrap();
    assert!(
        error.contains("invalid peer certificate") && error.contains("UnknownIssuer"),
        "{error}"
    );
    wait_until("a refused client", Duration::from_secs(10), || {
        no_cert.stats.last_error().is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!wrong_ca.connected() && !no_cert.connected());
    let others: Vec<String> = admin
        .messages()
        .into_iter()
        .map(|m| m.topic)
        .filter(|t| *t != status_t)
        .collect();
    assert!(others.is_empty(), "{others:?}");
    eprintln!(
        "wrong CA: {error}\nno client certificate: {}",
        no_cert.stats.last_error().unwrap()
    );
    for d in [&mut good, &mut wrong_ca, &mut no_cert] {
        d.stop().await;
    }
}
