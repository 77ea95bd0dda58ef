//! The fleet state: `Store` fed by the MQTT ingest (`ingest::Console`) from
//! a real mosquitto, with real `ferry-agent` processes where devices are
//! under test, and the real `ferry-fleet` binary where its commands are.
//!
//! - `agents_report_status_and_drift_and_a_killed_agent_goes_offline`: two
//!   agents, one fed shifted iris data and one fed data like the baseline:
//!   statuses, rates, drift windows (petal_length / petal_width drifted for
//!   the first only), drift alert and samples reach the store; the
//!   `ferry-fleet status` command lists both with their bundle (JSON and
//!   table); a command published through the console reaches an agent and
//!   its answer (an event) comes back into the store; SIGKILL of one agent
//!   marks it offline through its last will.
//! - `duplicates_are_dropped`: the same batch twice and a re-sent batch cut
//!   differently (as the admin) count each record once.
//! - `garbage_is_counted_not_fatal`: payloads that are not JSON, of another
//!   schema, of another device, on an unknown topic, or 200 KiB of junk are
//!   counted; the console stays connected and applies what follows.
//! - `state_survives_a_restart_and_what_came_meanwhile_arrives`: a console
//!   stopped while an agent keeps predicting: reopened, the store still has
//!   the device; reconnected with the same client id, it receives what the
//!   broker queued for its session: every prediction once.
//! - `one_device_cannot_speak_for_another_through_the_broker_acl`: a
//!   device account publishing as another device is stopped by the
//!   broker's ACL; the console never hears of the other device.
//! - `only_enrolled_devices_are_followed`: `serve` counts and ignores
//!   devices no admin enrolled; `ferry-fleet enrol`.
//! - `serve_killed_mid_stream_loses_nothing`: `ferry-fleet serve` SIGKILLed
//!   while 1000 records stream in, restarted: each record counted exactly
//!   once (acknowledged only after a flush), visible through the JSON API,
//!   and on disk after a SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_fleet::ingest::{Console, IngestOptions};
use ferry_fleet::model::{Change, DeviceState};
use ferry_fleet::store::Store;
use ferry_fleet::{Client, ServeConfig, ServeError};
use ferry_protocol::{
    Batch, BufferInfo, SCHEMA_VERSION, Status, Stream, TelemetryRecord, Topic, message_id, topic,
};
use serde_json::Value;

use crate::broker::{ADMIN, Mosquitto, Subscriber, SubscriberOptions, password};
use crate::device::{Device, Setup, iris_batch, iris_rows};
use crate::fixtures::{self, FLEET, V1, bundles};

/// Generous: two cores shared by agents, mosquitto and the tests.
const WAIT: Duration = Duration::from_secs(60);

/// The environment variable the `ferry-fleet` binary reads the admin's
/// password from in these tests.
const PASSWORD_ENV: &str = "FERRY_TEST_FLEET_PASSWORD";

fn t(device: &str, which: Topic) -> String {
    topic(FLEET, device, which)
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn now_ms() -> u64 {
    ferry_host::now_ms()
}

/// Waits until `done` holds (polling), or panics with `what` and `context()`.
pub(crate) fn wait_until(what: &str, context: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn admin_options(broker: &Mosquitto, client_id: &str) -> IngestOptions {
    let mut o = IngestOptions::new(broker.url(), FLEET);
    o.client_id = client_id.to_string();
    o.username = Some(ADMIN.into());
    o.password = Some(password(ADMIN));
    o
}

/// The configuration of a console in this process (`ferry_fleet::run`)
/// following the fleet as the admin with `client_id`, its state in
/// `state`, serving HTTP on `http` (an `http://addr` a restarted console
/// keeps) or on a free port; no rollouts, the default retraining options.
pub(crate) fn console_config(
    broker: &Mosquitto,
    state: &Path,
    client_id: &str,
    http: Option<&str>,
) -> ServeConfig {
    let addr = http
        .map(|h| h.trim_start_matches("http://").to_string())
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let deadline = Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match std::net::TcpListener::bind(&addr) {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebinding {addr}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    };
    ServeConfig {
        state: state.to_path_buf(),
        listener,
        mqtt: admin_options(broker, client_id),
        embedded_broker: None,
        rollouts: None,
        retrain: ferry_fleet::retrain::Options::default(),
        require_enrolment: false,
        secure_cookies: false,
    }
}

/// The first admin token a console wrote into its state directory
/// `state` (waits for it: the console writes it at start).
pub(crate) fn admin_token(state: &Path) -> String {
    let path = state.join(ferry_fleet::auth::ADMIN_TOKEN_FILE);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(t) = std::fs::read_to_string(&path)
            && !t.trim().is_empty()
        {
            return t.trim().to_string();
        }
        assert!(Instant::now() < deadline, "no {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A console running in this process (`ferry_fleet::run` on the test's
/// runtime), reached through its HTTP API. Dropping it stops it.
pub(crate) struct RunningConsole {
    pub(crate) client: Client,
    /// The first admin token (the client's).
    pub(crate) token: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl RunningConsole {
    /// `ferry-fleet SUBCOMMAND --console <this console> ARGS...` with the
    /// admin token, run to completion.
    pub fn cli(&self, subcommand: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new(fixtures::workspace_bin("ferry-fleet"))
            .args([subcommand, "--console", self.client.base()])
            .args(args)
            .env("FERRY_FLEET_TOKEN", &self.token)
            .output()
            .unwrap()
    }

    /// Starts `run(config)` and returns once its HTTP API answers.
    pub(crate) fn start(rt: &tokio::runtime::Runtime, config: ServeConfig) -> RunningConsole {
        let addr = config.listener.local_addr().unwrap();
        let state = config.state.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut task = rt.spawn(ferry_fleet::run(config, async {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + WAIT;
        let token_file = state.join(ferry_fleet::auth::ADMIN_TOKEN_FILE);
        while !token_file.exists() {
            if task.is_finished() {
                let ended = rt.block_on(&mut task).unwrap();
                panic!("the console stopped at start: {ended:?}");
            }
            assert!(Instant::now() < deadline, "the console did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let token = admin_token(&state);
        let client = Client::new(&format!("http://{addr}")).with_token(&token);
        while client.devices().is_err() {
            if task.is_finished() {
                let ended = rt.block_on(&mut task).unwrap();
                panic!("the console stopped at start: {ended:?}");
            }
            assert!(Instant::now() < deadline, "the console did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        RunningConsole {
            client,
            token,
            stop,
            task,
        }
    }

    /// Stops it as SIGTERM stops `serve`, and checks it stopped cleanly.
    pub(crate) fn stop(self, rt: &tokio::runtime::Runtime) {
        let _ = self.stop.send(());
        rt.block_on(self.task)
            .unwrap()
            .expect("the console stopped cleanly");
    }
}

/// A store and the ingest that feeds it, on a runtime of their own.
struct Fleet {
    store: Arc<Store>,
    console: Console,
}

impl Fleet {
    fn start(
        rt: &tokio::runtime::Runtime,
        broker: &Mosquitto,
        state: &Path,
        client_id: &str,
    ) -> Fleet {
        let store = Arc::new(Store::open(state).unwrap());
        let console = {
            let _in = rt.enter();
            Console::start(&admin_options(broker, client_id), store.clone()).unwrap()
        };
        assert!(
            rt.block_on(console.wait_connected(WAIT)),
            "the console did not subscribe: {:?}\n{}",
            console.stats().last_error(),
            broker.log()
        );
        Fleet { store, console }
    }

    /// A graceful stop: PUBACKs for what is on disk, DISCONNECT, flush.
    fn stop(self, rt: &tokio::runtime::Runtime) {
        rt.block_on(self.console.stop()).unwrap();
        let Fleet { store, console } = self;
        drop(console);
        assert_eq!(
            Arc::strong_count(&store),
            1,
            "someone still holds the store"
        );
    }

    fn device(&self, id: &str) -> Option<DeviceState> {
        self.store.device(id)
    }

    fn dump(&self) -> String {
        format!(
            "devices: {:#?}\nstats: {:?}\ningest error: {:?}",
            self.store.devices(),
            self.store.stats(),
            self.console.stats().last_error()
        )
    }
}

/// Requests (telemetry records) counted in the store's rate buckets.
fn requests(d: &DeviceState) -> u64 {
    d.rate(now_ms(), 3_600_000).requests
}

pub(crate) fn ferry_fleet_bin() -> Command {
    let path = fixtures::workspace_bin("ferry-fleet");
    assert!(path.exists(), "{} is missing", path.display());
    let mut c = Command::new(path);
    c.env(PASSWORD_ENV, password(ADMIN))
        .env("FERRY_LOG", "info");
    c
}

/// `ferry-fleet status` against the broker, as the admin.
fn status_command(broker: &Mosquitto, json: bool) -> String {
    let mut c = ferry_fleet_bin();
    c.args(["status", "--broker", &broker.url(), "--fleet", FLEET])
        .args(["--username", ADMIN, "--password-env", PASSWORD_ENV])
        .args(["--wait-ms", "1500", "--log-format", "text"]);
    if json {
        c.arg("--json");
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "ferry-fleet status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The devices `ferry-fleet status --json` lists, by id.
fn listed(broker: &Mosquitto) -> Vec<Value> {
    let out: Value = serde_json::from_str(&status_command(broker, true)).unwrap();
    assert_eq!(out["fleet"], FLEET);
    out["devices"].as_array().unwrap().clone()
}

fn drifted(d: &DeviceState) -> Vec<String> {
    let mut names = d.drifted_features();
    names.sort();
    names
}

#[test]
fn agents_report_status_and_drift_and_a_killed_agent_goes_offline() {
    let (shifted_id, same_id) = ("fl-shift", "fl-same");
    let broker = Mosquitto::start(&[shifted_id, same_id]);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(&rt, &broker, &dir.path().join("state"), "console-drift");
    let mut changes = fleet.store.subscribe();

    // Both agents at once: each takes seconds to verify and warm up.
    let (shifted, mut same) = std::thread::scope(|s| {
        let start = |id: &str| {
            let mut setup = Setup::new(id).mqtt(&broker);
            setup.window_predictions = 200;
            s.spawn(move || Device::start(setup))
        };
        let (a, b) = (start(shifted_id), start(same_id));
        (a.join().unwrap(), b.join().unwrap())
    });
    let v1_digest = bundles().digest(V1);
    wait_until(
        "both agents online in the store",
        || fleet.dump(),
        || {
            [shifted_id, same_id].iter().all(|id| {
                fleet.device(id).is_some_and(|d| {
                    d.online && d.bundle.as_ref().is_some_and(|b| b.digest == v1_digest)
                })
            })
        },
    );
    let d = fleet.device(shifted_id).unwrap();
    assert_eq!(d.fleet, FLEET);
    assert_eq!(d.bundle.as_ref().unwrap().sequence, 1);
    assert!(!d.agent_version.is_empty());
    assert!(d.last_seen_ms > 0);

    // 200 rows in 4 requests each: one drift window closes per device.
    let feed = |d: &Device, file: &str| {
        for chunk in iris_rows(file)[..200].chunks(50) {
            let (status, body) = d.predict_json(&iris_batch(chunk));
            assert_eq!(status, 200, "{body}");
        }
    };
    feed(&shifted, "current_shifted.csv");
    feed(&same, "current_same.csv");
    wait_until(
        "a drift window and 4 requests from each agent",
        || fleet.dump(),
        || {
            [shifted_id, same_id].iter().all(|id| {
                fleet
                    .device(id)
                    .is_some_and(|d| d.drift.is_some() && requests(&d) == 4)
            })
        },
    );
    let d = fleet.device(shifted_id).unwrap();
    assert_eq!(
        drifted(&d),
        ["petal_length", "petal_width"],
        "{:#?}",
        d.drift
    );
    assert_eq!(d.drift.as_ref().unwrap().rows, 200);
    let d = fleet.device(same_id).unwrap();
    assert!(drifted(&d).is_empty(), "{:#?}", d.drift);
    assert_eq!(d.rate(now_ms(), 3_600_000).error_rate, 0.0);

    // The drift history, the drift alert and the samples that came with it.
    let history = fleet.store.drift_history(Some(shifted_id), 10);
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].device, shifted_id);
    assert_eq!(fleet.store.drift_history(None, 10).len(), 2);
    wait_until(
        "the drift alert and the drifted samples",
        || fleet.dump(),
        || {
            fleet
                .store
                .events(Some(shifted_id), 50)
                .iter()
                .any(|e| matches!(e.record.event, ferry_protocol::Event::DriftAlert { .. }))
                && !fleet.store.samples(shifted_id).is_empty()
        },
    );
    assert!(
        !fleet
            .store
            .events(Some(same_id), 50)
            .iter()
            .any(|e| matches!(e.record.event, ferry_protocol::Event::DriftAlert { .. }))
    );
    let sample = &fleet.store.samples(shifted_id)[0];
    assert!(sample.features.contains_key("petal_length"), "{sample:?}");
    let mut seen = Vec::new();
    while let Ok(c) = changes.try_recv() {
        seen.push(c);
    }
    assert!(seen.contains(&Change::Drift {
        device: shifted_id.into()
    }));
    assert!(seen.contains(&Change::Event {
        device: shifted_id.into(),
        event: "drift_alert".into()
    }));

    // `ferry-fleet status` needs no console: the retained statuses.
    let devices = listed(&broker);
    let ids: Vec<&str> = devices
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [same_id, shifted_id]);
    for d in &devices {
        assert_eq!(d["online"], true, "{d:#}");
        assert_eq!(d["bundle"]["digest"], v1_digest.as_str(), "{d:#}");
        assert_eq!(d["bundle"]["sequence"], 1, "{d:#}");
        assert_eq!(d["schema"], SCHEMA_VERSION);
    }

    // A command through the console's connection, and the agent's answer
    // back through it: an unknown action comes back as `command_rejected`.
    let command = br#"{"schema":1,"id":"probe-1","issued_ms":0,"action":"explode"}"#;
    rt.block_on(
        fleet
            .console
            .publish(&t(shifted_id, Topic::Command), command.to_vec()),
    )
    .expect("the broker acknowledged the command");
    assert_eq!(fleet.console.stats().commands.load(Relaxed), 1);
    wait_until(
        "the agent's answer to the command",
        || fleet.dump(),
        || {
            fleet.store.events(Some(shifted_id), 50).iter().any(|e| {
            matches!(&e.record.event, ferry_protocol::Event::CommandRejected { command_id, .. } if command_id == "probe-1")
        })
        },
    );
    // The console hears its own command on the fleet's topics, and ignores it.
    assert!(fleet.store.stats().ignored >= 1);

    // SIGKILL: no goodbye; the broker publishes the last will.
    same.kill9();
    wait_until(
        "the killed agent offline",
        || fleet.dump(),
        || fleet.device(same_id).is_some_and(|d| !d.online),
    );
    let d = fleet.device(same_id).unwrap();
    assert_eq!(
        d.bundle.as_ref().map(|b| b.digest.as_str()),
        Some(v1_digest.as_str()),
        "what was known of the device is kept"
    );
    assert!(fleet.device(shifted_id).unwrap().online);
    let devices = listed(&broker);
    let gone = devices.iter().find(|d| d["device"] == same_id).unwrap();
    assert_eq!(gone["online"], false, "{gone:#}");
    let table = status_command(&broker, false);
    let row = table.lines().find(|l| l.starts_with(same_id)).unwrap();
    assert!(row.split_whitespace().nth(1) == Some("no"), "{table}");
    let row = table.lines().find(|l| l.starts_with(shifted_id)).unwrap();
    assert!(row.contains("yes") && row.contains(" #1 "), "{table}");

    drop(shifted);
    fleet.stop(&rt);
}

fn batch_of(device: &str, ids: std::ops::RangeInclusive<u64>, ts_ms: u64) -> Vec<u8> {
    let records: Vec<TelemetryRecord> = ids
        .clone()
        .map(|id| TelemetryRecord {
            id,
            ts_ms,
            bundle_version: "1.0.0".into(),
            latency_us: 50,
            ok: true,
            output: Default::default(),
            error: None,
            rows: 1,
        })
        .collect();
    serde_json::to_vec(&Batch {
        schema: SCHEMA_VERSION,
        stream: Stream::Telemetry,
        message_id: message_id(device, Stream::Telemetry, *ids.start(), *ids.end()),
        device: device.into(),
        fleet: FLEET.into(),
        sent_ms: ts_ms,
        records,
    })
    .unwrap()
}

fn status_of(device: &str) -> Vec<u8> {
    let mut s = Status::offline(FLEET, device, "0.1.0");
    s.online = true;
    s.ts_ms = now_ms();
    s.buffer = BufferInfo {
        records: 3,
        ..BufferInfo::default()
    };
    s.predictions = 42;
    serde_json::to_vec(&s).unwrap()
}

fn admin(rt: &tokio::runtime::Runtime, broker: &Mosquitto) -> Subscriber {
    rt.block_on(Subscriber::connect(broker, SubscriberOptions::admin(&[])))
}

#[test]
fn duplicates_are_dropped() {
    let broker = Mosquitto::start(&[]);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(&rt, &broker, &dir.path().join("state"), "console-dups");
    let admin = admin(&rt, &broker);
    let device = "sim-dup";
    let telemetry = t(device, Topic::Stream(Stream::Telemetry));
    let now = now_ms();
    rt.block_on(async {
        admin
            .publish(&t(device, Topic::Status), status_of(device))
            .await;
        admin
            .publish(&telemetry, batch_of(device, 1..=5, now))
            .await;
        // The same batch again (a PUBACK lost), then a re-send cut differently.
        admin
            .publish(&telemetry, batch_of(device, 1..=5, now))
            .await;
        admin
            .publish(&telemetry, batch_of(device, 4..=8, now))
            .await;
    });
    wait_until(
        "four messages applied",
        || fleet.dump(),
        || fleet.store.stats().messages >= 4,
    );
    let d = fleet.device(device).unwrap();
    assert_eq!(requests(&d), 8, "{}", fleet.dump());
    assert_eq!(d.watermarks[&Stream::Telemetry], 8);
    assert_eq!((d.predictions, d.backlog), (42, 3));
    let stats = fleet.store.stats();
    assert_eq!((stats.records, stats.duplicates), (8, 5 + 2), "{stats:?}");
    assert_eq!(stats.rejected_total(), 0);
    fleet.stop(&rt);
}

#[test]
fn garbage_is_counted_not_fatal() {
    let broker = Mosquitto::start(&[]);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(&rt, &broker, &dir.path().join("state"), "console-garbage");
    let admin = admin(&rt, &broker);
    let device = "sim-junk";
    let status = t(device, Topic::Status);
    let junk: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    rt.block_on(async {
        admin.publish(&status, &b"{not json"[..]).await;
        admin
            .publish(&status, &br#"{"schema": 99, "device": "sim-junk"}"#[..])
            .await;
        admin.publish(&status, status_of("someone-else")).await;
        admin
            .publish(
                &format!("ferry/v1/{FLEET}/{device}/diary"),
                status_of(device),
            )
            .await;
        admin
            .publish(&t(device, Topic::Stream(Stream::Samples)), junk)
            .await;
        // Commands (the console's own included) are not data: ignored.
        admin
            .publish(&t("all", Topic::Command), &br#"{"schema":1}"#[..])
            .await;
        // What follows the garbage is applied.
        admin.publish(&status, status_of(device)).await;
    });
    wait_until(
        "the good status after the garbage",
        || fleet.dump(),
        || fleet.device(device).is_some(),
    );
    let stats = fleet.store.stats();
    assert_eq!(stats.rejected.get("not_json"), Some(&2), "{stats:?}");
    assert_eq!(
        stats.rejected.get("unsupported_schema"),
        Some(&1),
        "{stats:?}"
    );
    assert_eq!(stats.rejected.get("wrong_topic"), Some(&1), "{stats:?}");
    assert_eq!(stats.rejected.get("unknown_topic"), Some(&1), "{stats:?}");
    assert_eq!(stats.ignored, 1, "{stats:?}");
    assert_eq!(fleet.store.devices().len(), 1);
    assert!(fleet.console.is_connected());
    assert_eq!(fleet.console.stats().disconnects.load(Relaxed), 0);
    fleet.stop(&rt);
}

#[test]
fn state_survives_a_restart_and_what_came_meanwhile_arrives() {
    let id = "fl-restart";
    let broker = Mosquitto::start(&[id]);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let client_id = "console-restart";
    // Watches what the agent sends, to know when the broker has it all.
    let watch = rt.block_on(Subscriber::connect(
        &broker,
        SubscriberOptions::admin(&[&t(id, Topic::Stream(Stream::Telemetry))]),
    ));
    let sent = || -> usize {
        let mut ids: Vec<u64> = watch
            .messages()
            .iter()
            .flat_map(|m| {
                m.json()["records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["id"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };

    let fleet = Fleet::start(&rt, &broker, &state, client_id);
    let agent = Device::start(Setup::new(id).mqtt(&broker));
    let rows = iris_rows("current_same.csv");
    for row in &rows[..3] {
        assert_eq!(agent.predict_json(&iris_batch(&[*row])).0, 200);
    }
    wait_until(
        "3 requests in the store",
        || fleet.dump(),
        || {
            fleet
                .device(id)
                .is_some_and(|d| d.online && requests(&d) == 3)
        },
    );
    fleet.stop(&rt);

    // The console is away; the agent keeps serving and reporting.
    for row in &rows[3..10] {
        assert_eq!(agent.predict_json(&iris_batch(&[*row])).0, 200);
    }
    wait_until(
        "the broker to have all 10 telemetry records",
        || format!("seen {}", sent()),
        || sent() == 10,
    );

    // Reopened: the state is there before any message arrives.
    let store = Store::open(&state).unwrap();
    let d = store.device(id).expect("the device survived the restart");
    assert!(d.online);
    assert_eq!(requests(&d), 3);
    assert_eq!(d.bundle.as_ref().unwrap().digest, bundles().digest(V1));
    drop(store);

    // Same session: the broker delivers what it queued meanwhile, once.
    let fleet = Fleet::start(&rt, &broker, &state, client_id);
    wait_until(
        "the 7 queued requests",
        || fleet.dump(),
        || fleet.device(id).is_some_and(|d| requests(&d) == 10),
    );
    // Nothing more trickles in later (no double counting).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(requests(&fleet.device(id).unwrap()), 10);
    drop(agent);
    fleet.stop(&rt);
}

/// A `ferry-fleet serve` process; killed on drop.
pub(crate) struct Serve {
    child: Child,
    pub(crate) url: String,
    /// The first admin token, from `<state>/admin.token`.
    pub(crate) token: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    fn start(broker: &Mosquitto, state: &Path) -> Serve {
        Serve::start_with(broker, state, &[])
    }

    /// With extra `serve` arguments.
    pub(crate) fn start_with(broker: &Mosquitto, state: &Path, extra: &[&str]) -> Serve {
        let url = broker.url();
        let mut args = vec!["--broker", &url];
        args.extend(["--username", ADMIN, "--password-env", PASSWORD_ENV]);
        args.extend(extra);
        Serve::start_args(state, &args)
    }

    /// `serve --fleet FLEET --listen 127.0.0.1:0 --state <state>` with
    /// `args` (the broker's among them).
    /// (Every test of the binary but the enrolment one follows devices
    /// it did not enrol: `--follow-unenrolled`.)
    pub(crate) fn start_args(state: &Path, args: &[&str]) -> Serve {
        let mut all = vec!["--follow-unenrolled"];
        all.extend(args);
        Serve::start_command(state, &all, None)
    }

    /// As `serve` starts by default: only enrolled devices followed.
    fn start_enrolled_only(broker: &Mosquitto, state: &Path) -> Serve {
        let url = broker.url();
        let args = [
            "--broker",
            &url,
            "--username",
            ADMIN,
            "--password-env",
            PASSWORD_ENV,
        ];
        Serve::start_command(state, &args, None)
    }

    /// [`Serve::start_with`], the process limited to `nofile` descriptors.
    pub(crate) fn start_limited(broker: &Mosquitto, state: &Path, nofile: u64) -> Serve {
        let url = broker.url();
        let args = [
            "--broker",
            &url,
            "--username",
            ADMIN,
            "--password-env",
            PASSWORD_ENV,
        ];
        Serve::start_command(state, &args, Some(nofile))
    }

    fn start_command(state: &Path, args: &[&str], nofile: Option<u64>) -> Serve {
        let mut command = ferry_fleet_bin();
        command
            .args(["serve", "--fleet", FLEET])
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--state")
            .arg(state)
            .args(args);
        if let Some(n) = nofile {
            command = ferry_testkit::slow::with_nofile(&command, n);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn({
            let log = log.clone();
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("Dashboard: ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}: {:?}", log.lock().unwrap()))
            .trim_end_matches('/')
            .to_string();
        let token = admin_token(state);
        let serve = Serve {
            child,
            url,
            token,
            log,
        };
        wait_until(
            "serve to subscribe",
            || serve.log_text(),
            || serve.log_text().contains("\"Subscribed\""),
        );
        serve
    }

    pub(crate) fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// A typed client of it, with the admin token.
    pub(crate) fn client(&self) -> Client {
        Client::new(&self.url).with_token(&self.token)
    }

    /// The device as `GET /api/devices/{id}` shows it (its state is
    /// flattened into the answer).
    fn device(&self, id: &str) -> Option<DeviceState> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut r = agent
            .get(format!("{}/api/devices/{id}", self.url))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .ok()?;
        let text = r.body_mut().read_to_string().ok()?;
        (r.status() == 200).then(|| serde_json::from_str(&text).unwrap())
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "serve ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_killed_mid_stream_loses_nothing() {
    let broker = Mosquitto::start(&[]);
    let rt = runtime();
    let admin = admin(&rt, &broker);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let device = "sim-crash";

    let serve = Serve::start(&broker, &state);
    rt.block_on(admin.publish(&t(device, Topic::Status), status_of(device)));
    // 50 batches of 20 records over about a second, while the console is
    // killed and restarted.
    let publisher = rt.spawn(async move {
        let telemetry = t(device, Topic::Stream(Stream::Telemetry));
        let now = now_ms();
        for b in 0..50u64 {
            admin
                .publish(&telemetry, batch_of(device, b * 20 + 1..=b * 20 + 20, now))
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        admin
    });
    wait_until(
        "the first records in the console",
        || serve.log_text(),
        || serve.device(device).is_some_and(|d| requests(&d) > 0),
    );
    serve.kill9();
    // What is sent while no console runs waits in its broker session.
    let serve = Serve::start(&broker, &state);
    let _admin = rt.block_on(publisher).unwrap();
    wait_until(
        "all 1000 records through the API",
        || serve.log_text(),
        || {
            serve
                .device(device)
                .is_some_and(|d| d.watermarks.get(&Stream::Telemetry) == Some(&1000))
        },
    );
    let d = serve.device(device).unwrap();
    assert_eq!(requests(&d), 1000, "each record exactly once");
    assert!(d.online);
    let status = serve.terminate();
    assert!(status.success(), "serve exited with {status}");

    let store = Store::open(&state.join(ferry_fleet::store::DIR)).unwrap();
    let d = store.device(device).unwrap();
    assert_eq!(requests(&d), 1000);
    assert_eq!(store.stats().messages, 0, "a fresh handle applied nothing");
}

/// The broker's ACL (the testkit's mosquitto: `pattern readwrite
/// ferry/v1/+/%u/#`, `pattern read ferry/v1/+/all/cmd`, the one
/// docs/mqtt-protocol.md shows) stops a device from speaking for another:
/// `evil-1`, a real device account, publishes a status and telemetry as
/// `victim`; the real `ferry-fleet serve` never hears of `victim`, while
/// `evil-1`'s own status arrives. The same messages from an account the
/// ACL lets write anywhere (the operator's) do reach the console: the ACL
/// is what stopped them.
#[test]
fn one_device_cannot_speak_for_another_through_the_broker_acl() {
    let broker = Mosquitto::start(&["evil-1", "victim"]);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&broker, &dir.path().join("state"));
    let client = serve.client();
    let evil = rt.block_on(Subscriber::connect(
        &broker,
        SubscriberOptions {
            user: "evil-1".into(),
            client_id: "evil-1".into(),
            clean_session: true,
            filters: Vec::new(),
        },
    ));
    let forged_status = {
        let mut s: Status = serde_json::from_slice(&status_of("victim")).unwrap();
        s.predictions = u64::MAX / 2;
        serde_json::to_vec(&s).unwrap()
    };
    let telemetry = t("victim", Topic::Stream(Stream::Telemetry));
    rt.block_on(async {
        evil.publish(&t("victim", Topic::Status), forged_status.clone())
            .await;
        evil.publish(&telemetry, batch_of("victim", 1..=20, now_ms()))
            .await;
        // Last: its own status (QoS 1, one connection: in order).
        evil.publish(&t("evil-1", Topic::Status), status_of("evil-1"))
            .await;
    });
    wait_until(
        "evil-1's own status",
        || serve.log_text(),
        || client.device("evil-1").unwrap().is_some(),
    );
    assert_eq!(client.device("victim").unwrap(), None);
    // Without the ACL's restriction, the same forgery would have worked.
    let admin = admin(&rt, &broker);
    rt.block_on(admin.publish(&t("victim", Topic::Status), forged_status));
    wait_until(
        "the operator account's message",
        || serve.log_text(),
        || client.device("victim").unwrap().is_some(),
    );
}

/// `serve` as it starts by default (the real binary): statuses and telemetry
/// of devices no admin enrolled are counted per device and ignored (no
/// state, so no rollout or retraining sees them); `ferry-fleet enrol`
/// (admin) lets one in; removing it hides it again.
#[test]
fn only_enrolled_devices_are_followed() {
    let broker = Mosquitto::start(&[]);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let serve = Serve::start_enrolled_only(&broker, &state);
    let client = serve.client();
    let admin = admin(&rt, &broker);
    let publish_all = |admin: &Subscriber| {
        std::thread::sleep(Duration::from_millis(5));
        rt.block_on(async {
            for d in ["dev-known", "dev-stranger"] {
                admin.publish(&t(d, Topic::Status), status_of(d)).await;
            }
            let telemetry = t("dev-stranger", Topic::Stream(Stream::Telemetry));
            admin
                .publish(&telemetry, batch_of("dev-stranger", 1..=5, now_ms()))
                .await;
        });
    };
    publish_all(&admin);
    wait_until(
        "both devices refused and counted",
        || serve.log_text(),
        || client.enrolment().unwrap().not_enrolled.len() == 2,
    );
    let e = client.enrolment().unwrap();
    assert!(e.required && e.devices.is_empty(), "{e:?}");
    assert_eq!(e.not_enrolled["dev-stranger"], 2, "{e:?}");
    assert_eq!(client.device("dev-known").unwrap(), None);
    assert_eq!(client.devices().unwrap()["counts"]["devices"], 0);

    let enrol = ferry_fleet_bin()
        .args(["enrol", "dev-known", "--console", &serve.url])
        .env("FERRY_FLEET_TOKEN", &serve.token)
        .output()
        .unwrap();
    assert!(enrol.status.success(), "{enrol:?}");
    publish_all(&admin);
    wait_until(
        "the enrolled device",
        || serve.log_text(),
        || client.device("dev-known").unwrap().is_some(),
    );
    wait_until(
        "the stranger refused again",
        || serve.log_text(),
        || client.enrolment().unwrap().not_enrolled["dev-stranger"] == 4,
    );
    assert_eq!(client.device("dev-stranger").unwrap(), None);
    let list = ferry_fleet_bin()
        .args(["enrol", "--list", "--console", &serve.url])
        .env("FERRY_FLEET_TOKEN", &serve.token)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("enrolled dev-known (by admin)") && text.contains("refused  dev-stranger: 4"),
        "{text}"
    );
    client.unenrol("dev-known").unwrap();
    assert_eq!(client.devices().unwrap()["counts"]["devices"], 0);
}
