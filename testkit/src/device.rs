//! A real `ferry-agent` process under test: its configuration, state
//! directory, HTTP client, and ways to stop it (SIGTERM, SIGKILL).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::broker::{Mosquitto, password};
use crate::cross::CrossAgent;
use crate::fixtures::{self, bundles};
use crate::free_port;

/// How long a device gets to become ready (it verifies, compiles the
/// guest and runs the golden examples).
pub const READY: Duration = Duration::from_secs(60);

/// What a test device is set up with.
#[derive(Debug, Clone)]
pub struct Setup {
    pub device: String,
    pub fleet: String,
    /// Fixture installed on first boot (`None`: none).
    pub initial: Option<String>,
    /// `updates.source` (a channel directory or URL).
    pub source: Option<String>,
    pub mqtt_port: Option<u16>,
    /// Extra TOML appended to the generated configuration (sections only).
    pub extra: String,
    /// Extra environment variables for the process.
    pub env: Vec<(String, String)>,
    /// Start the process with only `env` (and what the harness itself sets), not this
    /// process's environment.
    pub env_clear: bool,
    pub probation_s: u64,
    pub window_predictions: u64,
    /// The process's descriptor limit (`None`: this process's).
    pub nofile: Option<u64>,
    /// `paths.root`: a root of trust file (else the root is derived from
    /// `release.pub`).
    pub root: Option<PathBuf>,
    /// Run an agent built for another architecture under its emulator
    /// (`None`: the workspace's own `ferry-agent`).
    pub cross: Option<CrossAgent>,
}

impl Setup {
    pub fn new(device: &str) -> Setup {
        Setup {
            device: device.into(),
            fleet: fixtures::FLEET.into(),
            initial: Some(fixtures::V1.into()),
            source: None,
            mqtt_port: None,
            extra: String::new(),
            env: Vec::new(),
            env_clear: false,
            probation_s: 300,
            window_predictions: 1000,
            nofile: None,
            root: None,
            cross: None,
        }
    }

    pub fn mqtt(mut self, broker: &Mosquitto) -> Setup {
        self.mqtt_port = Some(broker.port());
        self
    }
}

/// A running (or stopped) agent with its state directory.
pub struct Device {
    pub setup: Setup,
    pub dir: tempfile::TempDir,
    pub http: String,
    child: Option<Child>,
    pub log: Arc<Mutex<Vec<String>>>,
    client: ureq::Agent,
}

pub fn agent_bin() -> PathBuf {
    fixtures::workspace_bin("ferry-agent")
}

impl Device {
    /// Writes the configuration and starts the agent; waits until it serves.
    pub fn start(setup: Setup) -> Device {
        let mut d = Device::create(setup);
        d.spawn();
        d.wait_ready();
        d
    }

    /// Writes the configuration only.
    pub fn create(setup: Setup) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let b = bundles();
        let mut toml = format!(
            "[device]\nid = \"{}\"\nfleet = \"{}\"\nchannel = \"stable\"\n\n\
             [paths]\nstate_dir = \"state\"\ntrusted_keys = [\"{}\"]\n",
            setup.device,
            setup.fleet,
            b.path("release.pub").display()
        );
        if let Some(root) = &setup.root {
            toml += &format!("root = \"{}\"\n", root.display());
        }
        if let Some(initial) = &setup.initial {
            toml += &format!("initial_bundle = \"{}\"\n", b.path(initial).display());
        }
        toml += &format!(
            "\n[http]\nlisten = \"127.0.0.1:{port}\"\nmax_body_bytes = 1048576\n\n\
             [updates]\nsource = \"{}\"\npoll_interval_s = 1\nprobation_s = {}\nmin_requests = 10\nmax_error_rate = 0.2\n\n\
             [buffer]\nflush_interval_ms = 100\n\n\
             [drift]\nwindow_predictions = {}\nwindow_seconds = 3600\nmin_rows = 30\n",
            setup.source.clone().unwrap_or_default(),
            setup.probation_s,
            setup.window_predictions,
        );
        if let Some(mqtt) = setup.mqtt_port {
            toml += &format!(
                "\n[mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt}\"\nusername = \"{}\"\npassword_env = \"FERRY_TEST_MQTT_PASSWORD\"\n\
                 reconnect_min_ms = 100\nreconnect_max_ms = 1000\nstatus_interval_s = 2\nkeep_alive_s = 5\n",
                setup.device
            );
        }
        toml += &setup.extra;
        std::fs::write(dir.path().join("agent.toml"), toml).unwrap();
        let client: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Device {
            setup,
            dir,
            http: format!("http://127.0.0.1:{port}"),
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
            client,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    /// Starts the process (does not wait).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut command = match &self.setup.cross {
            Some(cross) => cross.command(),
            None => Command::new(agent_bin()),
        };
        if self.setup.env_clear {
            command.env_clear();
        }
        command
            .arg("--config")
            .arg(self.config_path())
            .args(["--log-format", "json"])
            .env("FERRY_TEST_MQTT_PASSWORD", password(&self.setup.device))
            .env("FERRY_LOG", "info")
            .envs(self.setup.env.iter().map(|(k, v)| (k, v)));
        if let Some(n) = self.setup.nofile {
            command = crate::slow::with_nofile(&command, n);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
    }

    /// Waits until `/healthz` answers 200 (panics with the log otherwise).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "agent exited with {status} before ready:\n{}",
                    self.log_text()
                );
            }
            if let Ok((200, _)) = self.try_get("/healthz") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the HTTP port answers at all (even 503).
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + READY;
        while self.try_get("/healthz").is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent not listening:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn try_get(&self, path: &str) -> Result<(u16, Value), ureq::Error> {
        let mut r = self.client.get(format!("{}{path}", self.http)).call()?;
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string()?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// GET, JSON (or the text as a JSON string).
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log_text()))
    }

    /// GET /metrics as text.
    pub fn metrics(&self) -> String {
        match self.get("/metrics") {
            (200, Value::String(s)) => s,
            other => panic!("metrics: {other:?}"),
        }
    }

    /// POST a body with a content type (None: no header).
    pub fn post(&self, content_type: Option<&str>, body: &[u8]) -> (u16, Value) {
        self.post_with(&self.client, content_type, body)
    }

    /// POST on a connection of its own (a server answering 413 before
    /// reading the body closes the connection it arrived on).
    pub fn post_alone(&self, content_type: Option<&str>, body: &[u8]) -> (u16, Value) {
        let client: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        self.post_with(&client, content_type, body)
    }

    fn post_with(
        &self,
        client: &ureq::Agent,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (u16, Value) {
        let mut req = client.post(format!("{}/v1/predict", self.http));
        if let Some(ct) = content_type {
            req = req.header("Content-Type", ct);
        }
        let mut r = req
            .send(body)
            .unwrap_or_else(|e| panic!("POST: {e}\n{}", self.log_text()));
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// POST a body with a content type and an `Accept` header: the status,
    /// the response's content type and its bytes.
    pub fn post_accept(
        &self,
        content_type: &str,
        accept: &str,
        body: &[u8],
    ) -> (u16, String, Vec<u8>) {
        let mut r = self
            .client
            .post(format!("{}/v1/predict", self.http))
            .header("Content-Type", content_type)
            .header("Accept", accept)
            .send(body)
            .unwrap_or_else(|e| panic!("POST: {e}\n{}", self.log_text()));
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let status = r.status().as_u16();
        // Every answer of the prediction (refusals included) depends on `Accept`.
        if matches!(status, 200 | 400 | 406) {
            let vary = r.headers().get("vary").and_then(|v| v.to_str().ok());
            assert_eq!(vary, Some("accept"), "{status} without Vary: accept");
        }
        let bytes = r.body_mut().read_to_vec().unwrap();
        (status, ct, bytes)
    }

    pub fn predict_json(&self, body: &Value) -> (u16, Value) {
        self.post(Some("application/json"), body.to_string().as_bytes())
    }

    /// The active bundle's version and sequence.
    pub fn model(&self) -> (String, u64) {
        let (status, m) = self.get("/v1/model");
        assert_eq!(status, 200, "{m}");
        (
            m["version"].as_str().unwrap().to_string(),
            m["sequence"].as_u64().unwrap(),
        )
    }

    pub fn status(&self) -> Value {
        self.get("/v1/status").1
    }

    /// Waits until `check` holds on `/v1/status` (panics after `timeout`).
    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if check(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status {s:#}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the update state is `rejected` with `code` (panics after 30 s).
    pub fn wait_update_refused(&self, code: &str) {
        self.wait_status(Duration::from_secs(30), code, |s| {
            s["update"]["state"] == "rejected" && s["update"]["code"] == code
        });
    }

    /// Waits until `/metrics` contains `line` (panics after 30 s).
    pub fn wait_metric(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = self.metrics();
            if metrics.contains(line) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no `{line}` in the metrics after 30 s:\n{metrics}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(&child, "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no cleanup of any kind.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

/// One iris request (JSON record).
pub fn iris_request(row: [f64; 4]) -> Value {
    serde_json::json!({"record": {
        "sepal_length": row[0], "sepal_width": row[1],
        "petal_length": row[2], "petal_width": row[3]}})
}

/// Rows of an example CSV file of iris measurements.
pub fn iris_rows(file: &str) -> Vec<[f64; 4]> {
    let path = fixtures::examples().join("iris/data").join(file);
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Vec<f64> = l
                .split(',')
                .take(4)
                .map(|x| x.trim().parse().unwrap())
                .collect();
            [v[0], v[1], v[2], v[3]]
        })
        .collect()
}

/// A JSON batch request of rows.
pub fn iris_batch(rows: &[[f64; 4]]) -> Value {
    let records: Vec<Value> = rows
        .iter()
        .map(|r| iris_request(*r)["record"].clone())
        .collect();
    serde_json::json!({ "records": records })
}
