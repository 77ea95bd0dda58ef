//! The retraining loop.
//!
//! - `the_hook_fires_once_per_episode_with_the_drifted_samples`: mosquitto,
//!   three real agents (two fed shifted iris data, one data like the
//!   baseline) and the console (`ferry_fleet::run`, which evaluates the
//!   rule every second) in this process, whose hook is a real command,
//!   watched through its HTTP API (`ferry_fleet::Client`).
//!   The hook runs exactly once while drift windows keep arriving and after
//!   a console restart; samples.csv holds the drifting devices' samples
//!   (the shifted petal lengths) and nothing of the calm one; request.json
//!   names petal_length and petal_width; `GET /api/fleet-drift` shows the
//!   shares; `ferry-fleet retrain --export` writes the same data set from
//!   the console's API. When the shifted devices calm down the episode
//!   ends, and the next shift fires a second episode.
//! - `a_webhook_is_retried_and_its_outcome_recorded`: a store fed directly,
//!   a webhook on a `TcpListener` that answers 503 then 200: one episode,
//!   two POSTs of request.json; a 404 is not retried and is recorded as
//!   failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_fleet::retrain::{Episode, HookState, Options, Request, Retrainer};
use ferry_fleet::store::Store;
use ferry_host::now_ms;
use ferry_protocol::{
    Batch, DriftRecord, FeatureDrift, OutputSummary, SCHEMA_VERSION, SampleRecord, Status, Stream,
    TelemetryRecord, Topic, message_id, topic,
};
use serde::Serialize;
use serde_json::Value;

use crate::broker::Mosquitto;
use crate::device::{Device, Setup, iris_batch, iris_rows};
use crate::fixtures::{FLEET, V1, bundles};
use crate::state::{RunningConsole, console_config};

const DEVICES: [&str; 3] = ["rt-a", "rt-b", "rt-c"];
/// Generous: two cores shared by agents, mosquitto and the tests.
const WAIT: Duration = Duration::from_secs(90);
/// Several of the console's ticks (one a second).
const TICKS: Duration = Duration::from_millis(3500);

fn start_console(
    rt: &tokio::runtime::Runtime,
    broker: &Mosquitto,
    state: &Path,
    options: Options,
) -> RunningConsole {
    let mut config = console_config(broker, state, "retrain-console", None);
    config.retrain = options;
    RunningConsole::start(rt, config)
}

impl RunningConsole {
    fn episodes(&self) -> Vec<Episode> {
        self.client.retrain().unwrap().episodes
    }

    fn current(&self) -> Option<Episode> {
        self.client.retrain().unwrap().current
    }

    /// Polls every 200 ms until `done` holds (or panics).
    fn wait_for(&self, what: &str, done: impl Fn(&RunningConsole) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nepisodes: {:#?}\nfleet drift: {:#?}",
                self.episodes(),
                self.client.fleet_drift().unwrap()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every device in `devices` has a drift window with id
    /// above `after` (or panics).
    fn wait_windows(&self, devices: &[&str], after: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let ids: Vec<u64> = devices
                .iter()
                .filter_map(|d| self.client.device(d).unwrap()?.drift.map(|w| w.id))
                .collect();
            if ids.len() == devices.len() && ids.iter().all(|id| *id > after) {
                return ids.into_iter().min().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no new drift windows from {devices:?}: {:#}",
                self.client.devices().unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn get(&self, path: &str) -> Value {
        let mut r = ureq::get(format!("{}{path}", self.client.base()))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .unwrap();
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }
}

/// Whether `e`'s hook has finished (or could not run).
fn hook_done(e: &Episode) -> bool {
    !matches!(e.hook, HookState::Pending | HookState::Running { .. })
}

/// Lines the hook script appended.
fn calls(file: &Path) -> Vec<String> {
    match std::fs::read_to_string(file) {
        Ok(t) => t.lines().map(str::to_string).collect(),
        Err(_) => Vec::new(),
    }
}

/// A parsed CSV (no quoted fields in these data sets): header and rows.
fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect());
    (lines.next().unwrap(), lines.collect())
}

fn column(header: &[String], name: &str) -> usize {
    header
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name} in {header:?}"))
}

/// Checks a data set: rows from both drifting devices only, most of them
/// with a petal length of the shifted data (not of the calm data).
fn check_data_set(csv: &Path, shifted: &[f64], calm: &[f64]) -> usize {
    let (header, rows) = read_csv(csv);
    assert_eq!(
        header[..3],
        ["device", "ts_ms", "bundle_version"],
        "{header:?}"
    );
    assert_eq!(header[header.len() - 2..], ["top1", "score"], "{header:?}");
    let features = &header[3..header.len() - 2];
    let mut sorted = features.to_vec();
    sorted.sort();
    assert_eq!(features, sorted);
    assert_eq!(
        features,
        ["petal_length", "petal_width", "sepal_length", "sepal_width"]
    );
    let (device, petal) = (column(&header, "device"), column(&header, "petal_length"));
    let near = |set: &[f64], v: f64| set.iter().any(|x| (x - v).abs() < 1e-4);
    for d in ["rt-a", "rt-b"] {
        let mine: Vec<f64> = rows
            .iter()
            .filter(|r| r[device] == d)
            .map(|r| r[petal].parse().unwrap())
            .collect();
        let only_shifted = mine
            .iter()
            .filter(|v| near(shifted, **v) && !near(calm, **v))
            .count();
        assert!(
            only_shifted >= 100,
            "{d}: {only_shifted} of {} rows with a shifted petal length",
            mine.len()
        );
        assert!(
            rows.iter()
                .all(|r| r[column(&header, "bundle_version")] == "1.0.0")
        );
    }
    assert!(
        rows.iter()
            .all(|r| r[device] == "rt-a" || r[device] == "rt-b"),
        "rows of the calm device"
    );
    rows.len()
}

#[test]
fn the_hook_fires_once_per_episode_with_the_drifted_samples() {
    let rt = crate::state::runtime();
    let broker = Mosquitto::start(&DEVICES);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let called = dir.path().join("calls.txt");
    let script = dir.path().join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "echo \"$1|$FERRY_RETRAIN_REQUEST\" >> '{}'\necho retraining started\n",
            called.display()
        ),
    )
    .unwrap();
    // The data set waits 10 s after the rule holds, so the drifting
    // windows' samples (their own topic) are in (`--retrain-settle`).
    let options = || Options {
        min_devices: 2,
        calm_ms: 3000,
        settle_ms: 10_000,
        hook: ferry_fleet::retrain::Hook::command(&format!("/bin/sh {}", script.display()))
            .unwrap(),
        hook_timeout: Duration::from_secs(30),
        ..Options::default()
    };
    let c = start_console(&rt, &broker, &state, options());
    // Every request sampled, so the calm device has samples too (which
    // must stay out of the data set).
    let agents: Vec<Device> = std::thread::scope(|s| {
        let handles: Vec<_> = DEVICES
            .iter()
            .map(|id| {
                let mut setup = Setup::new(id).mqtt(&broker);
                setup.window_predictions = 200;
                setup.extra = "[telemetry]\nsample_rate = 1.0\n".into();
                s.spawn(move || Device::start(setup))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let v1 = bundles().digest(V1);
    let deadline = Instant::now() + WAIT;
    while !DEVICES.iter().all(|d| {
        c.client
            .device(d)
            .unwrap()
            .is_some_and(|s| s.online && s.bundle.is_some_and(|b| b.digest == v1))
    }) {
        assert!(
            Instant::now() < deadline,
            "{:#}",
            c.client.devices().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(TICKS);
    assert!(c.episodes().is_empty(), "no drift, no episode");

    let shifted_rows = iris_rows("current_shifted.csv");
    let same_rows = iris_rows("current_same.csv");
    let shifted_petals: Vec<f64> = shifted_rows.iter().map(|r| r[2]).collect();
    let same_petals: Vec<f64> = same_rows.iter().map(|r| r[2]).collect();
    let feed = |agent: &Device, rows: &[[f64; 4]]| {
        for chunk in rows.chunks(50) {
            let (status, body) = agent.predict_json(&iris_batch(chunk));
            assert_eq!(status, 200, "{body}");
        }
    };
    // Two of three devices drift (two thirds of the traffic).
    feed(&agents[0], &shifted_rows[..200]);
    feed(&agents[1], &shifted_rows[..200]);
    feed(&agents[2], &same_rows[..200]);
    let first = c.wait_windows(&DEVICES, 0);
    // The drift samples (up to 200 rows of a drifted window) and the
    // sampled requests (one sample per request) are in.
    let deadline = Instant::now() + WAIT;
    while !DEVICES.iter().enumerate().all(|(i, d)| {
        c.client
            .device(d)
            .unwrap()
            .is_some_and(|s| s.samples >= if i < 2 { 200 } else { 4 })
    }) {
        assert!(
            Instant::now() < deadline,
            "{:#}",
            c.client.devices().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The fleet view.
    let drift = c.get("/api/fleet-drift");
    let petal = drift["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "petal_length")
        .unwrap()
        .clone();
    let share = petal["share"].as_f64().unwrap();
    assert!((share - 2.0 / 3.0).abs() < 0.01, "{drift:#}");
    assert_eq!(petal["devices"], serde_json::json!(["rt-a", "rt-b"]));
    assert!(petal["max_value"].as_f64().unwrap() > 0.2, "{petal:#}");
    let firing = drift["firing"].as_array().unwrap();
    assert!(
        firing.contains(&"petal_length".into()) && firing.contains(&"petal_width".into()),
        "{drift:#}"
    );
    assert!(!firing.contains(&"sepal_width".into()), "{drift:#}");

    // The rule fires: one episode, one hook run.
    c.wait_for("the episode's hook", |c| {
        c.episodes().first().is_some_and(hook_done)
    });
    let episodes = c.episodes();
    assert_eq!(episodes.len(), 1, "{episodes:#?}");
    let e = &episodes[0];
    assert!(
        matches!(&e.hook, HookState::Ok { detail, .. } if detail.contains("retraining started")),
        "{e:#?}"
    );
    assert_eq!(e.devices, ["rt-a", "rt-b"]);
    let episode_dir = state.join("retrain").join(&e.id);
    let request_path = episode_dir.join("request.json");
    let request_text = request_path.display().to_string();
    assert_eq!(
        calls(&called),
        [format!("{request_text}|{request_text}")],
        "the request's path as last argument and in the environment"
    );
    let request: Request = serde_json::from_slice(&std::fs::read(&request_path).unwrap()).unwrap();
    assert_eq!(request.schema, 1);
    assert_eq!(request.episode.as_deref(), Some(e.id.as_str()));
    assert_eq!(request.fleet, FLEET);
    let mut features: Vec<&str> = request.features.iter().map(|f| f.name.as_str()).collect();
    features.sort();
    assert_eq!(features, ["petal_length", "petal_width"]);
    assert!(request.features.iter().all(|f| f.share > 0.6));
    let devices: Vec<&str> = request.devices.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(devices, ["rt-a", "rt-b"]);
    assert!(
        request
            .devices
            .iter()
            .all(|d| d.drift.is_some() && d.rows >= 200)
    );
    assert_eq!(request.bundles.len(), 1);
    assert_eq!(request.bundles[0].digest, v1);
    assert_eq!(request.bundles[0].version, "1.0.0");
    let csv = episode_dir.join("samples.csv");
    assert_eq!(request.samples_csv, csv.display().to_string());
    let rows = check_data_set(&csv, &shifted_petals, &same_petals);
    assert_eq!(request.rows, rows as u64);
    assert_eq!(e.rows, rows as u64);

    // More drift windows keep arriving: still one run.
    feed(&agents[0], &shifted_rows[200..400]);
    feed(&agents[1], &shifted_rows[200..400]);
    c.wait_windows(&DEVICES[..2], first);
    std::thread::sleep(TICKS);
    assert_eq!(calls(&called).len(), 1);
    assert_eq!(c.episodes().len(), 1);

    // The export on demand, through the CLI and the console's API.
    let export = dir.path().join("export");
    let out = c.cli("retrain", &["--export", export.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported: Request =
        serde_json::from_slice(&std::fs::read(export.join("request.json")).unwrap()).unwrap();
    let devices: Vec<&str> = exported.devices.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(devices, ["rt-a", "rt-b"]);
    assert!(exported.episode.is_none());
    assert!(exported.features.iter().any(|f| f.name == "petal_width"));
    let rows = check_data_set(&export.join("samples.csv"), &shifted_petals, &same_petals);
    assert_eq!(exported.rows, rows as u64);
    assert!(exported.samples_csv.ends_with("samples.csv"));
    let out = c.cli("retrain", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&e.id), "{text}");
    assert!(text.contains("petal_length"), "{text}");

    // A console restart: the open episode is known, nothing fires again.
    c.stop(&rt);
    let c = start_console(&rt, &broker, &state, options());
    assert_eq!(c.current().unwrap().id, e.id);
    std::thread::sleep(TICKS);
    assert_eq!(calls(&called).len(), 1);
    assert_eq!(c.episodes().len(), 1);

    // The shifted devices calm down: the episode ends after the calm period.
    let second = c.wait_windows(&DEVICES[..2], first + 1);
    feed(&agents[0], &same_rows[200..400]);
    feed(&agents[1], &same_rows[200..400]);
    c.wait_windows(&DEVICES[..2], second);
    c.wait_for("the episode's end", |c| c.current().is_none());
    assert!(c.episodes()[0].ended_ms.is_some());
    // A new shift is a new episode, and the hook runs again.
    feed(&agents[0], &shifted_rows[400..600]);
    feed(&agents[1], &shifted_rows[400..600]);
    c.wait_for("a second episode and its hook", |c| {
        let episodes = c.episodes();
        episodes.len() == 2 && hook_done(&episodes[1])
    });
    assert_eq!(calls(&called).len(), 2);
    let log: Vec<String> = c
        .client
        .retrain()
        .unwrap()
        .log
        .into_iter()
        .map(|l| l.what)
        .collect();
    assert_eq!(
        log,
        [
            "opened", "data_set", "hook_ok", "ended", "opened", "data_set", "hook_ok"
        ]
    );
    let on_disk = std::fs::read_to_string(state.join("retrain/log.jsonl")).unwrap();
    assert_eq!(on_disk.lines().count(), 7);
    c.stop(&rt);
}

// A store fed directly, for the webhook.

fn payload<T: Serialize + Clone>(device: &str, stream: Stream, records: &[T]) -> Vec<u8> {
    serde_json::to_vec(&Batch {
        schema: SCHEMA_VERSION,
        stream,
        message_id: message_id(device, stream, 1, records.len() as u64),
        device: device.into(),
        fleet: FLEET.into(),
        sent_ms: now_ms(),
        records: records.to_vec(),
    })
    .unwrap()
}

/// A device with 10 requests, a drift window (petal_length drifted or not)
/// and 3 samples.
fn feed_store(store: &Store, device: &str, drifted: bool) {
    feed_store_on(store, device, drifted, None);
}

/// [`feed_store`], the device's status claiming a bundle of `sequence`.
fn feed_store_on(store: &Store, device: &str, drifted: bool, sequence: Option<u64>) {
    let now = now_ms();
    let t = |which| topic(FLEET, device, which);
    let mut status = Status::offline(FLEET, device, "0.1.0");
    status.online = true;
    status.ts_ms = now;
    status.bundle = sequence.map(|sequence| ferry_protocol::BundleRef {
        name: "iris".into(),
        version: format!("1.{sequence}"),
        digest: "ab".repeat(32),
        fleet: FLEET.into(),
        channel: "stable".into(),
        sequence,
        release: String::new(),
    });
    store
        .apply(
            &t(Topic::Status),
            &serde_json::to_vec(&status).unwrap(),
            now,
        )
        .unwrap();
    let telemetry: Vec<TelemetryRecord> = (1..=10)
        .map(|id| TelemetryRecord {
            id,
            ts_ms: now,
            bundle_version: "1.0.0".into(),
            latency_us: 50,
            ok: true,
            output: OutputSummary::default(),
            error: None,
            rows: 1,
        })
        .collect();
    let window = DriftRecord {
        id: 1,
        ts_ms: now,
        bundle_version: "1.0.0".into(),
        bundle_digest: "ab".into(),
        window_start_ms: now - 1000,
        rows: 200,
        features: vec![FeatureDrift {
            name: "petal_length".into(),
            kind: "numeric".into(),
            method: "psi".into(),
            value: Some(if drifted { 1.5 } else { 0.01 }),
            threshold: 0.2,
            drifted,
            psi: None,
            rows: 200,
            missing: 0,
        }],
        drifted_features: u32::from(drifted),
        share: 1.0,
        dataset_drifted: drifted,
    };
    let samples: Vec<SampleRecord> = (1..=3)
        .map(|id| SampleRecord {
            id,
            ts_ms: now,
            bundle_version: "1.0.0".into(),
            features: [("petal_length".to_string(), serde_json::json!(6.5))].into(),
            content_type: None,
            raw_base64: None,
            output: OutputSummary {
                top1: Some(2),
                score: Some(0.9),
                value: None,
            },
        })
        .collect();
    let apply = |stream, bytes: Vec<u8>| {
        assert!(
            !store
                .apply(&t(Topic::Stream(stream)), &bytes, now)
                .unwrap()
                .is_empty()
        );
    };
    apply(
        Stream::Telemetry,
        payload(device, Stream::Telemetry, &telemetry),
    );
    apply(Stream::Drift, payload(device, Stream::Drift, &[window]));
    apply(Stream::Samples, payload(device, Stream::Samples, &samples));
}

/// A webhook: answers each POST with the next status of `statuses` (the
/// last one from then on) and keeps the bodies.
fn webhook(statuses: Vec<u16>) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/retrain", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            let mut first = String::new();
            reader.read_line(&mut first).unwrap();
            assert!(first.starts_with("POST /hooks/retrain "), "{first}");
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            seen.lock().unwrap().push(body);
            let status = statuses[n.min(statuses.len() - 1)];
            let text = format!("pipeline run {n}");
            write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            )
            .unwrap();
        }
    });
    (url, bodies)
}

fn webhook_episode(statuses: Vec<u16>) -> (Episode, Vec<Vec<u8>>, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let store = Arc::new(Store::open(&dir.join("store")).unwrap());
    feed_store(&store, "wh-a", true);
    feed_store(&store, "wh-b", false);
    let (url, bodies) = webhook(statuses);
    let options = Options {
        hook: ferry_fleet::retrain::Hook::webhook(&url).unwrap(),
        hook_timeout: Duration::from_secs(10),
        ..Options::default()
    };
    let r = Retrainer::open(&dir, store, options).unwrap();
    r.tick(now_ms()).unwrap();
    r.tick(now_ms()).unwrap();
    let episodes = r.episodes().unwrap();
    assert_eq!(episodes.len(), 1, "{episodes:#?}");
    let bodies = bodies.lock().unwrap().clone();
    (episodes[0].clone(), bodies, tmp)
}

#[test]
fn a_webhook_is_retried_and_its_outcome_recorded() {
    // 503, then 200: retried once.
    let (e, bodies, tmp) = webhook_episode(vec![503, 200]);
    let dir = tmp.path();
    assert!(
        matches!(&e.hook, HookState::Ok { detail, .. } if detail.contains("200") && detail.contains("pipeline run 1")),
        "{e:#?}"
    );
    assert_eq!(bodies.len(), 2);
    let request: Request = serde_json::from_slice(&bodies[1]).unwrap();
    assert_eq!(request.features[0].name, "petal_length");
    // 10 of 20 requests drift.
    assert!(
        (request.features[0].share - 0.5).abs() < 1e-9,
        "{request:#?}"
    );
    assert_eq!(request.features[0].max_value, Some(1.5));
    assert_eq!(request.rows, 3);
    assert_eq!(request.devices.len(), 1);
    assert_eq!(request.devices[0].device, "wh-a");
    let on_disk = std::fs::read(dir.join("retrain").join(&e.id).join("request.json")).unwrap();
    assert_eq!(bodies[1], on_disk);
    let csv = std::fs::read_to_string(dir.join("retrain").join(&e.id).join("samples.csv")).unwrap();
    assert_eq!(
        csv.lines().collect::<Vec<_>>(),
        [
            "device,ts_ms,bundle_version,petal_length,top1,score",
            &format!("wh-a,{},1.0.0,6.5,2,0.9", sample_ts(&csv)),
            &format!("wh-a,{},1.0.0,6.5,2,0.9", sample_ts(&csv)),
            &format!("wh-a,{},1.0.0,6.5,2,0.9", sample_ts(&csv)),
        ]
    );

    // A 404 will not get better: no retry, recorded as failed.
    let (e, bodies, tmp) = webhook_episode(vec![404]);
    let dir = tmp.path();
    assert_eq!(bodies.len(), 1);
    assert!(
        matches!(&e.hook, HookState::Failed { error, .. } if error.contains("404")),
        "{e:#?}"
    );
    let log = std::fs::read_to_string(dir.join("retrain/log.jsonl")).unwrap();
    assert!(log.contains("hook_failed"), "{log}");
}

/// The ts_ms of the first data row.
fn sample_ts(csv: &str) -> u64 {
    csv.lines()
        .nth(1)
        .unwrap()
        .split(',')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn forged_sequences_are_not_believed_and_no_device_fills_the_data_set() {
    // Issue 11 item 5: a forged status (sequence u64::MAX - 1) with a
    // drifting window used to count toward the fleet's drift and put its
    // rows into the training set. A device whose reported sequence is
    // beyond the registry's highest for its channel is now flagged (in
    // /api/fleet-drift and request.json) and has no say; and each device
    // contributes at most `max_samples_per_device` rows (its most recent).
    use ferry_fleet::releases::{ReleaseRecord, ReleaseStatus};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let store = Arc::new(Store::open(&dir.join("store")).unwrap());
    let record = ReleaseRecord {
        release: "r2".into(),
        name: "iris".into(),
        version: "1.2".into(),
        fleet: FLEET.into(),
        channel: "stable".into(),
        sequence: 2,
        digest: "ab".repeat(32),
        signed_by: Vec::new(),
        lineage: Value::Null,
        uploaded_by: "ci".into(),
        first_seen_ms: 1,
        status: ReleaseStatus::Approved,
        approved_by: None,
        approved_ms: None,
        rejection: None,
        size_bytes: 0,
        review: None,
    };
    store.record_release(&record.release, &record).unwrap();
    feed_store_on(&store, "honest", true, Some(2));
    feed_store_on(&store, "evil-1", true, Some(u64::MAX - 1));
    feed_store_on(&store, "calm", false, Some(1));
    let options = Options {
        max_samples_per_device: 2,
        ..Options::default()
    };
    let r = Retrainer::open(&dir, store, options).unwrap();
    let view = r.fleet_drift_view(now_ms());
    assert_eq!(view.flagged.len(), 1, "{view:#?}");
    assert_eq!(view.flagged[0].device, "evil-1");
    assert!(
        view.flagged[0]
            .reason
            .contains("beyond the registry's highest 2"),
        "{view:#?}"
    );
    // honest drifts, calm does not; evil-1 is not counted at all: half of
    // the traffic that counts drifts, not two thirds.
    let f = &view.drift.features[0];
    assert_eq!(f.devices, ["honest"], "{view:#?}");
    assert!((f.share - 0.5).abs() < 1e-9, "{view:#?}");

    // The data set the hook would get, asked for every device.
    let devices = [
        "honest".to_string(),
        "evil-1".to_string(),
        "calm".to_string(),
    ];
    let (request, csv) = r.request(Vec::new(), &devices, None, now_ms(), "samples.csv");
    assert_eq!(request.flagged.len(), 1);
    assert_eq!(request.flagged[0].device, "evil-1");
    assert!(
        request.devices.iter().all(|d| d.device != "evil-1"),
        "{request:#?}"
    );
    for d in &request.devices {
        assert_eq!((d.rows, d.dropped), (2, 1), "{d:#?}");
    }
    assert_eq!(request.rows, 4);
    assert!(!csv.contains("evil-1"), "{csv}");
    assert_eq!(csv.lines().count(), 5, "{csv}");
}
