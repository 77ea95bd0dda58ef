//! The dashboard and its JSON API.
//!
//! - In process: the API's JSON shapes over a store fed with protocol
//!   messages, a 404 for an unknown device, and live changes over SSE
//!   (from the store and from an extra change source, with `resync` after a
//!   lag).
//! - In a real browser: two real agents report through mosquitto into a
//!   store; the page served by `router(store)` behind the console's
//!   authentication (`protect`) is reached through the real login page
//!   (a wrong token is refused there, the right one opens a session whose
//!   cookie scripts cannot read, and logging out ends it), then loaded by Debian's
//!   headless Chromium, driven over the DevTools protocol, and checked for
//!   what a person sees: both devices with their bundle, the drifting
//!   feature highlighted for the drifting device only, a device going
//!   offline without a reload. A screenshot is kept as
//!   `<CARGO_TARGET_TMPDIR>/fleet-dashboard.png`.
//!
//! Chromium runs with `--remote-debugging-pipe` rather than `--dump-dom
//! --virtual-time-budget`: a page holding an open EventSource never lets
//! virtual time run out, so `--dump-dom` would wait forever.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::response::IntoResponse as _;
use base64::Engine as _;
use ferry_fleet::auth::{Auth, Role};
use ferry_fleet::http::{ChangeSource, CookiePolicy, protect, router, router_with};
use ferry_fleet::ingest::{Console as Ingest, IngestOptions};
use ferry_fleet::model::Change;
use ferry_fleet::store::Store;
use ferry_protocol::{
    Batch, BufferInfo, BundleRef, DriftRecord, Event, EventRecord, FeatureDrift, SCHEMA_VERSION,
    Status, Stream, TelemetryRecord, Topic, UpdateState, message_id, topic,
};
use serde_json::{Value, json};

use crate::broker::{ADMIN, Mosquitto, password};
use crate::device::{Device, Setup, iris_batch, iris_request, iris_rows};
use crate::fixtures::FLEET;

/// A console: a store and `router(store)` on 127.0.0.1:0, on a runtime of
/// its own (the tests themselves stay blocking).
struct Console {
    url: String,
    /// An admin token (every route but /healthz needs a credential).
    token: String,
    store: Arc<Store>,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Console {
    fn start() -> Console {
        Self::serve(router)
    }

    fn start_with(sources: Vec<ChangeSource>) -> Console {
        Self::serve(|store| router_with(store, sources))
    }

    /// Serves the app that `app` makes of a new store, behind the
    /// console's authentication.
    fn serve(app: impl FnOnce(Arc<Store>) -> axum::Router) -> Console {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("fleet")).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let auth = Arc::new(Auth::new(store.clone()));
        let token = auth.create("tester", Role::Admin, "test", 1).unwrap().token;
        let app = protect(app(store.clone()), auth, CookiePolicy::default());
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Console {
            url,
            token,
            store,
            runtime,
            _dir: dir,
        }
    }

    /// GET, JSON (or the text as a JSON string).
    fn get(&self, path: &str) -> (u16, Value) {
        let (status, _, text) = self.get_text(path);
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// GET: status, content type, body.
    fn get_text(&self, path: &str) -> (u16, String, String) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut r = agent
            .get(format!("{}{path}", self.url))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let content_type = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (
            r.status().as_u16(),
            content_type,
            r.body_mut().read_to_string().unwrap(),
        )
    }

    /// One MQTT message of the fleet, as the broker would deliver it.
    fn apply(&self, device: &str, t: Topic, payload: &impl serde::Serialize) -> Vec<Change> {
        self.store
            .apply(
                &topic(FLEET, device, t),
                &serde_json::to_vec(payload).unwrap(),
                ferry_host::now_ms(),
            )
            .unwrap()
    }
}

// ---------------------------------------------------------------------------
// Protocol messages, for the in-process tests.

fn bundle(version: &str, sequence: u64) -> BundleRef {
    BundleRef {
        name: "iris".into(),
        version: version.into(),
        digest: format!("{sequence:0>64}"),
        fleet: FLEET.into(),
        channel: "stable".into(),
        sequence,
        release: String::new(),
    }
}

fn status(device: &str, online: bool, version: &str) -> Status {
    Status {
        online,
        ts_ms: ferry_host::now_ms(),
        bundle: Some(bundle(version, 1)),
        update: UpdateState::Idle,
        buffer: BufferInfo {
            records: 7,
            ..BufferInfo::default()
        },
        predictions: 100,
        errors: 1,
        uptime_s: 60,
        ..Status::offline(FLEET, device, "0.1.0")
    }
}

fn batch<T>(device: &str, stream: Stream, records: Vec<T>, first: u64, last: u64) -> Batch<T> {
    Batch {
        schema: SCHEMA_VERSION,
        stream,
        message_id: message_id(device, stream, first, last),
        device: device.into(),
        fleet: FLEET.into(),
        sent_ms: ferry_host::now_ms(),
        records,
    }
}

fn feature(name: &str, value: f64) -> FeatureDrift {
    FeatureDrift {
        name: name.into(),
        kind: "numeric".into(),
        method: "wasserstein".into(),
        value: Some(value),
        threshold: 0.1,
        drifted: value > 0.1,
        psi: Some(value * 2.0),
        rows: 250,
        missing: 0,
    }
}

fn drift_record(id: u64, petal_length: f64) -> DriftRecord {
    let features = vec![
        feature("sepal_length", 0.05),
        feature("petal_length", petal_length),
    ];
    let drifted = features.iter().filter(|f| f.drifted).count() as u32;
    let now = ferry_host::now_ms();
    DriftRecord {
        id,
        ts_ms: now,
        bundle_version: "1.0.0".into(),
        bundle_digest: format!("{:0>64}", 1),
        window_start_ms: now - 60_000,
        rows: 250,
        features,
        drifted_features: drifted,
        share: drifted as f64 / 2.0,
        dataset_drifted: false,
    }
}

fn telemetry(first_id: u64, n: u64, failed: u64) -> Vec<TelemetryRecord> {
    (0..n)
        .map(|i| TelemetryRecord {
            id: first_id + i,
            ts_ms: ferry_host::now_ms(),
            bundle_version: "1.0.0".into(),
            latency_us: 40,
            ok: i >= failed,
            output: Default::default(),
            error: (i < failed).then(|| "bad_input".to_string()),
            rows: 1,
        })
        .collect()
}

/// `press-1` drifts on petal_length (two windows, the latest drifted);
/// `press-2` does not. Both report telemetry and events.
fn small_fleet(c: &Console) {
    c.apply("press-1", Topic::Status, &status("press-1", true, "1.0.0"));
    c.apply("press-2", Topic::Status, &status("press-2", true, "1.1.0"));
    let drift = Topic::Stream(Stream::Drift);
    c.apply(
        "press-1",
        drift,
        &batch(
            "press-1",
            Stream::Drift,
            vec![drift_record(10, 0.04)],
            10,
            10,
        ),
    );
    c.apply(
        "press-1",
        drift,
        &batch(
            "press-1",
            Stream::Drift,
            vec![drift_record(20, 0.8)],
            20,
            20,
        ),
    );
    c.apply(
        "press-2",
        drift,
        &batch(
            "press-2",
            Stream::Drift,
            vec![drift_record(10, 0.03)],
            10,
            10,
        ),
    );
    let telemetry_topic = Topic::Stream(Stream::Telemetry);
    c.apply(
        "press-1",
        telemetry_topic,
        &batch("press-1", Stream::Telemetry, telemetry(1, 9, 0), 1, 9),
    );
    c.apply(
        "press-2",
        telemetry_topic,
        &batch("press-2", Stream::Telemetry, telemetry(1, 4, 1), 1, 4),
    );
    let events = |device: &str, id: u64, event: Event| {
        c.apply(
            device,
            Topic::Stream(Stream::Events),
            &batch(
                device,
                Stream::Events,
                vec![EventRecord {
                    id,
                    ts_ms: ferry_host::now_ms(),
                    event,
                }],
                id,
                id,
            ),
        );
    };
    events(
        "press-1",
        21,
        Event::DriftAlert {
            bundle_version: "1.0.0".into(),
            features: vec!["petal_length".into()],
            share: 0.5,
            dataset_drifted: false,
        },
    );
    events(
        "press-2",
        11,
        Event::Started {
            agent_version: "0.1.0".into(),
            bundle: Some(bundle("1.1.0", 1)),
        },
    );
}

#[test]
fn api_answers_devices_drift_and_events_in_their_documented_shapes() {
    let c = Console::start();
    let (status, fleet) = c.get("/api/devices");
    assert_eq!(status, 200, "{fleet}");
    assert_eq!(fleet["devices"], json!([]), "{fleet:#}");
    assert_eq!(
        fleet["counts"],
        json!({"devices": 0, "online": 0, "drifting": 0})
    );

    small_fleet(&c);

    let (status, fleet) = c.get("/api/devices");
    assert_eq!(status, 200, "{fleet}");
    assert_eq!(fleet["fleets"], json!([FLEET]), "{fleet:#}");
    assert_eq!(
        fleet["counts"],
        json!({"devices": 2, "online": 2, "drifting": 1}),
        "{fleet:#}"
    );
    assert!(fleet["now_ms"].as_u64().unwrap() > 0);
    let devices = fleet["devices"].as_array().unwrap();
    let ids: Vec<&str> = devices
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["press-1", "press-2"], "sorted by id");
    let (p1, p2) = (&devices[0], &devices[1]);
    // The stored state, flattened...
    assert_eq!(p1["online"], true);
    assert_eq!(p1["bundle"]["version"], "1.0.0");
    assert_eq!(p2["bundle"]["version"], "1.1.0");
    assert_eq!(p1["bundle"]["sequence"], 1);
    assert_eq!(p1["backlog"], 7);
    assert_eq!(p1["update"]["state"], "idle");
    assert_eq!(p1["drift"]["id"], 20, "the latest window: {p1:#}");
    assert!(p1["rates"].is_array());
    // ...and what is computed from it.
    assert_eq!(p1["drifted_features"], json!(["petal_length"]));
    assert_eq!(p2["drifted_features"], json!([]));
    assert_eq!(p1["rate"]["requests"], 9, "{p1:#}");
    assert_eq!(p1["rate"]["error_rate"], 0.0);
    assert_eq!(p2["rate"]["requests"], 4, "{p2:#}");
    assert_eq!(p2["rate"]["error_rate"], 0.25);
    // 9 requests over a 5-minute window.
    let rpm = p1["rate"]["requests_per_min"].as_f64().unwrap();
    assert!((rpm - 1.8).abs() < 1e-9, "{rpm}");
    let seen = p1["last_seen_s"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&seen), "{seen}");

    // One device: the same view as in the list.
    let (status, one) = c.get("/api/devices/press-1");
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["device"], "press-1");
    assert_eq!(one["drifted_features"], json!(["petal_length"]));
    assert_eq!(one["bundle"], p1["bundle"]);
    let (status, missing) = c.get("/api/devices/no-such-device");
    assert_eq!(status, 404, "{missing}");
    assert!(
        missing["error"]
            .as_str()
            .unwrap()
            .contains("no-such-device"),
        "{missing}"
    );

    // Drift history: per device, oldest first, `limit` windows of each.
    let (status, drift) = c.get("/api/drift");
    assert_eq!(status, 200, "{drift}");
    let points: Vec<(&str, u64)> = drift
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["device"].as_str().unwrap(),
                p["record"]["id"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        points,
        [("press-1", 10), ("press-1", 20), ("press-2", 10)],
        "{drift:#}"
    );
    assert_eq!(drift[1]["record"]["features"][1]["name"], "petal_length");
    assert_eq!(drift[1]["record"]["features"][1]["drifted"], true);
    let (_, latest) = c.get("/api/drift?limit=1");
    assert_eq!(latest.as_array().unwrap().len(), 2, "one per device");
    let (_, one) = c.get("/api/drift?device=press-1&limit=1");
    assert_eq!(one.as_array().unwrap().len(), 1, "{one:#}");
    assert_eq!(one[0]["record"]["id"], 20);
    let (_, all) = c.get("/api/drift?device=&limit=5");
    assert_eq!(all.as_array().unwrap().len(), 3, "empty device: all");
    let (status, _) = c.get("/api/drift?limit=many");
    assert_eq!(status, 400);

    // Events: oldest first, filtered by device.
    let (status, events) = c.get("/api/events");
    assert_eq!(status, 200, "{events}");
    let kinds: Vec<(&str, &str)> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["device"].as_str().unwrap(),
                e["record"]["event"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(kinds.contains(&("press-1", "drift_alert")), "{events:#}");
    assert!(kinds.contains(&("press-2", "started")), "{events:#}");
    let (_, p2_events) = c.get("/api/events?device=press-2");
    assert!(
        p2_events
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["device"] == "press-2"),
        "{p2_events:#}"
    );
    let (_, one) = c.get("/api/events?limit=1");
    assert_eq!(one.as_array().unwrap().len(), 1);

    // The rest of the surface.
    assert_eq!(c.get("/healthz"), (200, Value::String("ok".into())));
    assert_eq!(c.get("/api/rollouts").0, 404, "no rollouts without them");
}

#[test]
fn the_page_and_its_assets_are_served_from_the_binary_and_stay_local() {
    let c = Console::start();
    let (status, content_type, html) = c.get_text("/");
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    for id in [
        "id=\"devices\"",
        "id=\"heatmap\"",
        "id=\"events\"",
        "id=\"rollouts\"",
    ] {
        assert!(html.contains(id), "the page lacks {id}");
    }
    // Everything the page loads comes from the console itself.
    for attr in ["src=\"", "href=\""] {
        for (i, _) in html.match_indices(attr) {
            let target = &html[i + attr.len()..];
            assert!(
                target.starts_with('/') || target.starts_with("data:"),
                "the page refers elsewhere: {}",
                &target[..target.find('"').unwrap()]
            );
        }
    }
    for (path, kind) in [
        ("/dashboard.js", "text/javascript"),
        ("/dashboard.css", "text/css"),
    ] {
        let (status, content_type, body) = c.get_text(path);
        assert_eq!(status, 200, "{path}");
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        assert!(
            !body.contains("@import") && !body.contains("url(http"),
            "{path}"
        );
    }
    let csp = ureq::get(format!("{}/", c.url))
        .header("Authorization", format!("Bearer {}", c.token))
        .call()
        .unwrap();
    let csp = csp
        .headers()
        .get("content-security-policy")
        .expect("the page is sent with a CSP")
        .to_str()
        .unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
}

/// Reads server-sent events from a raw connection (chunked transfer
/// decoded by hand), each read bounded by a timeout.
struct EventStream {
    reader: BufReader<TcpStream>,
    text: String,
}

impl EventStream {
    fn open(c: &Console) -> EventStream {
        let host = c.url.strip_prefix("http://").unwrap();
        let mut tcp = TcpStream::connect(host).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            tcp,
            "GET /api/stream HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\
             Authorization: Bearer {}\r\n\r\n",
            c.token
        )
        .unwrap();
        let mut reader = BufReader::new(tcp);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            head += &line;
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("content-type: text/event-stream"), "{head}");
        assert!(lower.contains("transfer-encoding: chunked"), "{head}");
        EventStream {
            reader,
            text: String::new(),
        }
    }

    /// The next event (name, data), skipping comments and `retry:`.
    fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut name = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = Some(n.to_string());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(d).unwrap());
                    }
                }
                if let (Some(name), Some(data)) = (name, data) {
                    return (name, data);
                }
                continue;
            }
            // One chunk: its size in hex, CRLF, the bytes, CRLF.
            let mut size = String::new();
            self.reader
                .read_line(&mut size)
                .expect("an event within 10 s");
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            assert!(size > 0, "the stream ended");
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).unwrap();
            self.text += std::str::from_utf8(&chunk[..size]).unwrap();
        }
    }
}

#[test]
fn the_stream_sends_each_change_as_an_event() {
    let c = Console::start();
    let mut events = EventStream::open(&c);
    let changes = c.apply("press-9", Topic::Status, &status("press-9", true, "1.0.0"));
    assert!(!changes.is_empty(), "a new device is a change");
    let (name, data) = events.next();
    assert_eq!(name, "change");
    let change: Change = serde_json::from_value(data.clone()).unwrap();
    assert_eq!(change, changes[0], "{data}");
    assert_eq!(data["device"], "press-9");
    // The next change is the next event.
    let changes = c.apply(
        "press-9",
        Topic::Stream(Stream::Drift),
        &batch("press-9", Stream::Drift, vec![drift_record(3, 0.9)], 3, 3),
    );
    let mut seen = Vec::new();
    while seen.len() < changes.len() {
        let (name, data) = events.next();
        assert_eq!(name, "change");
        seen.push(serde_json::from_value::<Change>(data).unwrap());
    }
    assert_eq!(seen, changes);
    assert!(
        seen.contains(&Change::Drift {
            device: "press-9".into()
        }),
        "{seen:?}"
    );
}

#[test]
fn other_change_sources_reach_the_stream_and_a_lagging_one_asks_for_a_resync() {
    let (tx, _) = tokio::sync::broadcast::channel::<Change>(2);
    let rollout = |id: &str| Change::Rollout { id: id.into() };
    let source: ChangeSource = {
        let tx = tx.clone();
        Arc::new(move || {
            // This client falls behind before it reads anything: three
            // changes into a channel that keeps two.
            let rx = tx.subscribe();
            for id in ["r-1", "r-2", "r-3"] {
                tx.send(rollout(id)).unwrap();
            }
            rx
        })
    };
    let c = Console::start_with(vec![source]);
    let mut events = EventStream::open(&c);
    let (name, _) = events.next();
    assert_eq!(
        name, "resync",
        "a lost change is never passed over silently"
    );
    tx.send(rollout("r-4")).unwrap();
    // After the resync: perhaps changes it already covered, then the new one.
    loop {
        let (name, data) = events.next();
        assert_eq!(name, "change", "{data}");
        let change: Change = serde_json::from_value(data).unwrap();
        if change == rollout("r-4") {
            break;
        }
        assert!(
            [rollout("r-2"), rollout("r-3")].contains(&change),
            "{change:?}"
        );
    }
    // The store's changes still arrive on the same stream.
    c.apply("press-8", Topic::Status, &status("press-8", true, "1.0.0"));
    let (name, data) = events.next();
    assert_eq!(name, "change");
    assert_eq!(data["device"], "press-8", "{data}");
}

// ---------------------------------------------------------------------------
// The page in a real browser.

const CHROMIUM: &str = "/usr/bin/chromium";

/// Headless Chromium driven over the DevTools protocol on a pipe (fd 3 in,
/// fd 4 out, messages separated by NUL).
pub(crate) struct Browser {
    child: Child,
    to: ChildStdin,
    from: mpsc::Receiver<Value>,
    next_id: u64,
    /// Protocol events received so far (network requests, console, errors).
    events: Vec<Value>,
    stderr: Arc<Mutex<String>>,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium with one page of `width` × `height` CSS pixels.
    pub(crate) fn launch(width: u32, height: u32) -> Browser {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} not found: the dashboard test needs a real browser; \
             install Debian's Chromium with `apt-get install chromium` (scripts/test.sh does)"
        );
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            // The pipe protocol wants our stdin on fd 3 and our stdout on fd 4.
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--window-size={width},{height}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
        let to = child.stdin.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 64 * 1024];
            while let Ok(n) = out.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|b| *b == 0) {
                    let message: Vec<u8> = buf.drain(..=end).collect();
                    let value = serde_json::from_slice(&message[..end]).unwrap();
                    if tx.send(value).is_err() {
                        return;
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let stderr = stderr.clone();
            let err = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    stderr.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        let mut b = Browser {
            child,
            to,
            from,
            next_id: 0,
            events: Vec::new(),
            stderr,
            session: String::new(),
            _profile: profile,
        };
        let target = b.call_browser("Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = b.call_browser(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        for domain in [
            "Page.enable",
            "Network.enable",
            "Runtime.enable",
            "Log.enable",
        ] {
            b.call(domain, json!({}));
        }
        b
    }

    fn send(&mut self, session: Option<String>, method: &str, params: Value) -> Value {
        self.try_send(session, method, params)
            .unwrap_or_else(|error| panic!("{method}: {error}"))
    }

    /// `send`, with the protocol's error as an `Err` (a page navigating
    /// away has no context to evaluate in for a moment).
    fn try_send(
        &mut self,
        session: Option<String>,
        method: &str,
        params: Value,
    ) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            message["sessionId"] = s.into();
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        self.to.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = self.from.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "Chromium did not answer {method}:\n{}",
                    self.stderr.lock().unwrap()
                )
            });
            if reply["id"] == id {
                if let Some(error) = reply.get("error") {
                    return Err(error.clone());
                }
                return Ok(reply["result"].clone());
            }
            if reply.get("method").is_some() {
                self.events.push(reply);
            }
        }
    }

    fn call_browser(&mut self, method: &str, params: Value) -> Value {
        self.send(None, method, params)
    }

    /// A method of the page's session.
    pub(crate) fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(session), method, params)
    }

    fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url}));
        assert!(r.get("errorText").is_none(), "{url}: {r}");
    }

    /// Evaluates `expression` in the page; its (JSON-able) value.
    pub(crate) fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e:#}");
        }
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until `done` holds for its value (an
    /// evaluation that fails while the page navigates counts as `null`).
    pub(crate) fn wait(
        &mut self,
        what: &str,
        expression: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let session = self.session.clone();
            let v = match self.try_send(
                Some(session),
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            ) {
                Ok(r) if r.get("exceptionDetails").is_none() => r["result"]["value"].clone(),
                _ => Value::Null,
            };
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}; it shows {v:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Opens `url`, which sends a browser without a session to the login
    /// page, and logs in there with `token` as a person would: types it
    /// and presses the button.
    pub(crate) fn login(&mut self, url: &str, token: &str) {
        self.submit_login(url, token);
        self.wait("the dashboard after the login", "location.pathname", |v| {
            v == "/"
        });
    }

    /// The login up to pressing the button.
    fn submit_login(&mut self, url: &str, token: &str) {
        self.navigate(&format!("{url}/"));
        self.wait("the login page", "location.pathname", |v| v == "/login");
        self.wait(
            "the token field",
            "document.getElementById('token') !== null",
            |v| v == true,
        );
        // The click is scheduled so the evaluation returns before the page
        // navigates away.
        self.eval(&format!(
            "document.getElementById('token').value = {}; \
             setTimeout(() => document.getElementById('login').click(), 0); true",
            json!(token)
        ));
    }

    /// The whole page as a PNG.
    pub(crate) fn screenshot(&mut self, path: &Path) {
        let metrics = self.call("Page.getLayoutMetrics", json!({}));
        let size = &metrics["cssContentSize"];
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true, "clip": {
                "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// URLs the page requested.
    fn requests(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .map(|e| e["params"]["request"]["url"].as_str().unwrap().to_string())
            .collect()
    }

    /// Uncaught exceptions and console errors, except failed requests for
    /// `allowed` URLs.
    pub(crate) fn errors(&self, allowed: &[&str]) -> Vec<Value> {
        self.events
            .iter()
            .filter(|e| match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => true,
                Some("Runtime.consoleAPICalled") => e["params"]["type"] == "error",
                Some("Log.entryAdded") => {
                    let entry = &e["params"]["entry"];
                    entry["level"] == "error"
                        && !allowed
                            .iter()
                            .any(|a| entry["url"].as_str().is_some_and(|u| u.ends_with(a)))
                }
                _ => false,
            })
            .cloned()
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let id = self.next_id + 1;
        let close = json!({"id": id, "method": "Browser.close"}).to_string() + "\0";
        let _ = self.to.write_all(close.as_bytes());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a person sees on the page, as JSON (visible text, and the classes
/// that carry highlighting).
const SEEN: &str = r#"(() => {
  const state = document.body ? document.body.dataset.state : 'no document';
  if (state !== 'ready') return { state };
  return {
    state,
    heading: document.querySelector('h1').innerText,
    counts: ['devices', 'online', 'drifting'].map((k) => document.getElementById('count-' + k).innerText),
    connection: document.getElementById('connection').innerText,
    devices: [...document.querySelectorAll('#devices tbody tr[data-device]')].map((tr) => ({
      device: tr.dataset.device,
      cells: [...tr.children].map((c) => c.innerText.trim()),
      drifted: [...tr.querySelectorAll('.feature.drifted')].map((s) => s.innerText.replace('▲', '').trim()),
      bars: tr.querySelectorAll('svg.spark rect').length,
    })),
    heat: [...document.querySelectorAll('#heatmap tbody tr[data-feature]')].map((tr) => ({
      device: tr.dataset.device,
      feature: tr.dataset.feature,
      drifted: tr.classList.contains('drifted'),
      cells: [...tr.querySelectorAll('td.cell:not(.pad)')].map((td) => ({
        drifted: td.classList.contains('drifted'), text: td.innerText, title: td.title })),
    })),
    events: [...document.querySelectorAll('#events li')].map((li) => li.innerText),
    rollouts: document.getElementById('rollouts').innerText,
    problem: document.getElementById('problem').hidden ? null : document.getElementById('problem').innerText,
  };
})()"#;

/// Follows the fleet on `broker` into the console's store, as
/// `ferry-fleet serve` does.
fn follow_fleet(c: &Console, broker: &Mosquitto) -> Ingest {
    let mut options = IngestOptions::new(broker.url(), FLEET);
    options.client_id = "dashboard-test-console".into();
    options.username = Some(ADMIN.into());
    options.password = Some(password(ADMIN));
    let _runtime = c.runtime.enter();
    let ingest = Ingest::start(&options, c.store.clone()).unwrap();
    assert!(
        c.runtime
            .block_on(ingest.wait_connected(Duration::from_secs(10))),
        "the console did not follow the fleet: {:?}\n{}",
        ingest.stats().last_error(),
        broker.log()
    );
    ingest
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where the screenshot is kept.
fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fleet-dashboard.png")
}

#[test]
fn the_dashboard_in_a_browser_shows_the_fleet_and_highlights_drift() {
    const DRIFTING: &str = "dash-drift";
    const CALM: &str = "dash-calm";
    /// Rows per drift window: 3 windows from 750 rows. (The last quarter of
    /// both data files is noisy enough on sepal_width at 250 rows to drift.)
    const WINDOW: u64 = 250;
    const ROWS: usize = 750;

    let broker = Mosquitto::start(&[DRIFTING, CALM]);
    let c = Console::start();
    let _ingest = follow_fleet(&c, &broker);
    let setup = |id: &str| {
        let mut setup = Setup::new(id).mqtt(&broker);
        setup.window_predictions = WINDOW;
        setup
    };
    let (drifting, mut calm) = std::thread::scope(|s| {
        let drifting = s.spawn(|| Device::start(setup(DRIFTING)));
        let calm = s.spawn(|| Device::start(setup(CALM)));
        (drifting.join().unwrap(), calm.join().unwrap())
    });
    // Traffic: shifted inputs for one, inputs like the training data for
    // the other (which also gets two bad requests: errors to show).
    std::thread::scope(|s| {
        s.spawn(|| {
            for chunk in iris_rows("current_shifted.csv")[..ROWS].chunks(50) {
                assert_eq!(drifting.predict_json(&iris_batch(chunk)).0, 200);
            }
        });
        s.spawn(|| {
            for chunk in iris_rows("current_same.csv")[..ROWS].chunks(50) {
                assert_eq!(calm.predict_json(&iris_batch(chunk)).0, 200);
            }
            for _ in 0..2 {
                let bad = json!({"record": {"sepal_length": 5.0}});
                assert_ne!(calm.predict_json(&bad).0, 200);
            }
            assert_eq!(
                calm.predict_json(&iris_request([5.1, 3.5, 1.4, 0.2])).0,
                200
            );
        });
    });
    let windows = (ROWS as u64 / WINDOW) as usize;
    // 15 batches each; the calm device also 2 failed and 1 single request.
    let requests = [(DRIFTING, 15), (CALM, 18)];
    wait_until(
        "both devices' drift windows and telemetry in the store",
        || {
            let now = ferry_host::now_ms();
            [DRIFTING, CALM]
                .iter()
                .all(|d| c.store.drift_history(Some(d), 100).len() == windows)
                && requests.iter().all(|(d, n)| {
                    c.store.device(d).is_some_and(|d| {
                        d.bundle.is_some() && d.rate(now, 5 * 60_000).requests == *n
                    })
                })
                && c.store
                    .events(Some(DRIFTING), 100)
                    .iter()
                    .any(|e| matches!(e.record.event, Event::DriftAlert { .. }))
        },
    );

    let mut browser = Browser::launch(1400, 1000);
    // A wrong token is refused on the login page, with a message.
    browser.submit_login(&c.url, "ferry_0000");
    let refused = browser.wait(
        "the refusal's message",
        "document.getElementById('message') ? document.getElementById('message').innerText : ''",
        |v| v.as_str().is_some_and(|t| !t.is_empty()),
    );
    assert!(refused.as_str().unwrap().contains("not valid"), "{refused}");
    browser.login(&c.url, &c.token);
    let seen = browser.wait("both devices, their drift and a live stream", SEEN, |v| {
        v["state"] == "ready"
            && v["devices"].as_array().map_or(0, Vec::len) == 2
            && v["heat"].as_array().map_or(0, Vec::len) == 8
            && v["connection"] == "Live"
    });
    let shot = screenshot_path();
    browser.screenshot(&shot);
    println!("dashboard screenshot: {}", shot.display());

    // The header: the fleet, and its counts.
    assert!(
        seen["heading"].as_str().unwrap().contains(FLEET),
        "{seen:#}"
    );
    assert_eq!(seen["counts"], json!(["2", "2", "1"]), "{seen:#}");
    assert_eq!(seen["problem"], Value::Null, "{seen:#}");

    // The table: every device, online, with its bundle version and sequence.
    let devices = seen["devices"].as_array().unwrap();
    let row = |id: &str| devices.iter().find(|d| d["device"] == id).unwrap().clone();
    for id in [CALM, DRIFTING] {
        let r = row(id);
        let cells = r["cells"].as_array().unwrap();
        assert!(cells[0].as_str().unwrap().starts_with(id), "{r:#}");
        assert_eq!(cells[1], "online", "{r:#}");
        assert!(
            cells[2].as_str().unwrap().contains("iris 1.0.0")
                && cells[2].as_str().unwrap().contains("sequence 1"),
            "{r:#}"
        );
        assert!(r["bars"].as_u64().unwrap() > 0, "rate bars drawn: {r:#}");
    }
    assert_eq!(
        row(DRIFTING)["drifted"],
        json!(["petal_length", "petal_width"])
    );
    assert_eq!(row(CALM)["drifted"], json!([]));
    assert_eq!(row(CALM)["cells"][9], "none");
    let error_rate = row(CALM)["cells"][5].as_str().unwrap().to_string();
    assert!(
        error_rate.starts_with("11.1%"),
        "2 of 18 requests failed: {error_rate}"
    );

    // The heat map: the drifting device's petal_length row is highlighted,
    // each of its windows over the threshold; nothing of the calm device is.
    let heat = seen["heat"].as_array().unwrap();
    let heat_row = |device: &str, feature: &str| {
        heat.iter()
            .find(|r| r["device"] == device && r["feature"] == feature)
            .unwrap_or_else(|| panic!("no heat map row {device}/{feature}: {seen:#}"))
    };
    let petal = heat_row(DRIFTING, "petal_length");
    assert_eq!(petal["drifted"], true, "{petal:#}");
    let cells = petal["cells"].as_array().unwrap();
    assert_eq!(cells.len(), windows, "{petal:#}");
    for cell in cells {
        assert_eq!(cell["drifted"], true, "{cell:#}");
        let title = cell["title"].as_str().unwrap();
        assert!(
            title.contains("petal_length") && title.contains("DRIFTED"),
            "{title}"
        );
        assert!(cell["text"].as_str().unwrap().starts_with('▲'), "{cell:#}");
    }
    assert_eq!(heat_row(DRIFTING, "sepal_length")["drifted"], false);
    for r in heat.iter().filter(|r| r["device"] == CALM) {
        assert_eq!(r["drifted"], false, "{r:#}");
        assert!(
            r["cells"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["drifted"] == false),
            "{r:#}"
        );
    }
    assert_eq!(
        heat_row(CALM, "petal_length")["cells"]
            .as_array()
            .unwrap()
            .len(),
        windows
    );

    // Events and rollouts.
    let events = seen["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| {
            let e = e.as_str().unwrap();
            e.contains(DRIFTING) && e.contains("drift alert") && e.contains("petal_length")
        }),
        "{seen:#}"
    );
    assert!(
        seen["rollouts"].as_str().unwrap().contains("No rollouts."),
        "{seen:#}"
    );

    // Live: a device shutting down shows as offline without a reload.
    let _ = calm.terminate();
    let seen = browser.wait("the calm device offline", SEEN, |v| {
        v["counts"] == json!(["2", "1", "1"])
            && v["devices"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["device"] == CALM && d["cells"][1] == "offline")
    });
    assert_eq!(seen["connection"], "Live", "{seen:#}");

    // Air-gapped: the page asked nothing of anyone but the console, and
    // nothing went wrong in it (a CSP violation would be an error here).
    let requests = browser.requests();
    assert!(
        requests.iter().all(|u| u.starts_with(&c.url)),
        "{requests:#?}"
    );
    assert!(
        requests.iter().any(|u| u.ends_with("/api/stream")),
        "{requests:#?}"
    );
    // (The wrong token's login answered 401.)
    let errors = browser.errors(&["/api/rollouts", "/api/releases", "/login"]);
    assert!(errors.is_empty(), "{errors:#?}");

    // The session: its holder is shown, its cookie is out of scripts'
    // reach (HttpOnly), and logging out ends it.
    assert_eq!(
        browser.eval("document.getElementById('user').innerText"),
        "tester (admin)"
    );
    assert_eq!(browser.eval("document.cookie"), "");
    browser.eval("setTimeout(() => document.getElementById('logout').click(), 0); true");
    browser.wait(
        "the login page after logging out",
        "location.pathname",
        |v| v == "/login",
    );
    // The dashboard is out of reach again.
    browser.navigate(&format!("{}/", c.url));
    browser.wait("the login page again", "location.pathname", |v| {
        v == "/login"
    });
}

#[test]
fn without_the_stream_the_page_polls_and_it_shows_rollouts_when_there_are() {
    // A console whose stream is refused (a proxy that does not pass SSE),
    // and with rollouts merged in as the rollout part of the console does.
    let rollouts = json!([{
        "id": "r-7f3a", "created_ms": 1_795_000_000_000u64,
        "spec": {"bundle": bundle("2.0.0", 2), "abort_if": [{"text": "error_rate>1%"}]},
        "phase": {"phase": "bake", "until_ms": 1_795_000_600_000u64},
        "canaries": 1,
        "targets": {"press-1": {"state": "running"}, "press-2": {"state": "waiting"},
                    "press-3": {"state": "waiting"}},
    }]);
    let c = Console::serve(move |store| {
        let refuse_stream = axum::middleware::from_fn(
            |request: axum::extract::Request, next: axum::middleware::Next| async move {
                if request.uri().path() == "/api/stream" {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
                next.run(request).await
            },
        );
        let rollouts = axum::Router::new().route(
            "/api/rollouts",
            axum::routing::get(move || async move { axum::Json(rollouts) }),
        );
        router(store).merge(rollouts).layer(refuse_stream)
    });
    let mut browser = Browser::launch(1400, 800);
    browser.login(&c.url, &c.token);
    let seen = browser.wait("an empty fleet, polled", SEEN, |v| {
        v["connection"]
            .as_str()
            .is_some_and(|t| t.starts_with("Polling"))
    });
    assert_eq!(seen["counts"], json!(["0", "0", "0"]), "{seen:#}");
    assert_eq!(seen["devices"], json!([]), "{seen:#}");
    let rollouts = seen["rollouts"].as_str().unwrap();
    for shown in [
        "r-7f3a",
        "iris 2.0.0 (sequence 2)",
        "bake",
        "1/3 running",
        "error_rate>1%",
    ] {
        assert!(rollouts.contains(shown), "{shown:?} not in {rollouts}");
    }
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fleet-dashboard-polling.png");
    browser.screenshot(&shot);
    println!(
        "dashboard screenshot (polling, rollouts): {}",
        shot.display()
    );
    // A device appears by the next poll.
    c.apply("press-5", Topic::Status, &status("press-5", true, "1.0.0"));
    browser.wait("the new device", SEEN, |v| {
        v["devices"]
            .as_array()
            .is_some_and(|d| d.len() == 1 && d[0]["device"] == "press-5")
    });
    let errors = browser.errors(&["/api/stream", "/api/releases"]);
    assert!(errors.is_empty(), "{errors:#?}");
}
