//! The agent's configuration file (`ferry-agent --config agent.toml`).
//!
//! Every limit on untrusted input is here with the reason for its default.
//! [`DEFAULT_CONFIG`] is what `ferry-agent init` writes: the same defaults,
//! commented. Unknown keys are refused, so a typo never silently falls back
//! to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The commented default configuration written by `ferry-agent init`.
pub const DEFAULT_CONFIG: &str = include_str!("../agent.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub device: DeviceConfig,
    #[serde(default)]
    pub paths: PathsConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub updates: UpdatesConfig,
    #[serde(default)]
    pub buffer: BufferConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub drift: DriftWindowConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub shadow: ShadowConfig,
    #[serde(default)]
    pub engine: EngineConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// MQTT client id and the `<device>` of every topic.
    pub id: String,
    pub fleet: String,
    /// The release channel this device follows (`stable`, `beta`, ...).
    #[serde(default = "default_channel")]
    pub channel: String,
}

fn default_channel() -> String {
    "stable".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// Bundles, the activation record and the telemetry buffer live here.
    pub state_dir: PathBuf,
    /// The bundle installed when `state_dir` holds none yet (first boot).
    pub initial_bundle: Option<PathBuf>,
    /// The root of trust installed at provisioning (`ferry root init`): the
    /// keys and thresholds of each role. Takes precedence over
    /// `trusted_keys`.
    pub root: Option<PathBuf>,
    /// Without `root`: PEM files of the keys that sign bundles, commands and
    /// roots (a root derived from them, version 0).
    pub trusted_keys: Vec<PathBuf>,
    /// Without `root`: distinct trusted signatures a bundle or command needs.
    pub key_threshold: usize,
}

impl Default for PathsConfig {
    fn default() -> Self {
        PathsConfig {
            state_dir: PathBuf::from("/var/lib/ferry-agent"),
            initial_bundle: None,
            root: None,
            trusted_keys: Vec::new(),
            key_threshold: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Loopback by default: the prediction API has no authentication.
    pub listen: SocketAddr,
    /// Largest request body. 6 MiB is Lambda's synchronous payload limit, so
    /// a request that works on the device also works on Lambda.
    pub max_body_bytes: usize,
    /// Requests processed at once; more wait (bounded by `max_queue`).
    pub max_concurrency: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8089".parse().unwrap(),
            max_body_bytes: 6 * 1024 * 1024,
            max_concurrency: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdatesConfig {
    /// `https://host/path/index.json`, `http://...`, or a local directory
    /// holding `index.json`. Empty: updates only by MQTT command.
    pub source: String,
    /// Seconds between polls of `source`.
    pub poll_interval_s: u64,
    /// Extra CA certificate (PEM) for an HTTPS channel with a private CA.
    pub ca_file: Option<PathBuf>,
    /// Largest bundle accepted for download: bounds disk use in staging.
    pub max_bundle_bytes: u64,
    /// Seconds a new bundle is watched after activation before it counts as
    /// good; a crash loop or error rate above `max_error_rate` within it rolls
    /// back.
    pub probation_s: u64,
    /// Share of failed predictions that makes a bundle on probation roll back.
    pub max_error_rate: f64,
    /// Requests needed before the error rate is judged (avoids rolling back
    /// on one bad request).
    pub min_requests: u64,
    /// Starts in a row that did not reach a healthy state before the agent
    /// gives up on the active bundle and rolls back.
    pub max_boot_attempts: u32,
    /// Signed commands older than this are refused (replay protection).
    pub max_command_age_s: u64,
    /// Longest one download attempt may take, whatever its rate (a resumed
    /// attempt starts a new one).
    pub max_download_s: u64,
    /// Accept a plain `http://` channel (a lab without TLS). Off by default:
    /// on plain HTTP anyone on the path can hold back or replay the index.
    pub allow_http: bool,
}

impl Default for UpdatesConfig {
    fn default() -> Self {
        UpdatesConfig {
            source: String::new(),
            poll_interval_s: 300,
            ca_file: None,
            max_bundle_bytes: 512 * 1024 * 1024,
            probation_s: 300,
            max_error_rate: 0.05,
            min_requests: 20,
            max_boot_attempts: 3,
            max_command_age_s: 24 * 3600,
            max_download_s: 3600,
            allow_http: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Byte budget of the buffer on disk (payload bytes). When full, the
    /// lowest-priority records go first: samples, then predictions, then
    /// drift reports and events.
    pub max_bytes: u64,
    /// Milliseconds between flushes (fsync): the window of records a crash
    /// (SIGKILL, power cut) can take. Everything appended before a flush
    /// survives. 0 flushes every append (slow).
    pub flush_interval_ms: u64,
    /// sled's page cache. sled defaults to 1 GiB, far too much for a device.
    pub cache_bytes: u64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: 64 * 1024 * 1024,
            flush_interval_ms: 1000,
            cache_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Share of predictions whose features are kept as a sample for retraining.
    pub sample_rate: f64,
    /// Also keep the raw request body with a sample.
    pub sample_raw: bool,
    /// Raw bodies larger than this are not kept (the features still are).
    pub sample_max_bytes: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            sample_rate: 0.01,
            sample_raw: false,
            sample_max_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftWindowConfig {
    /// A window closes after this many predictions...
    pub window_predictions: u64,
    /// ...or this many seconds, whichever comes first (if it has rows).
    pub window_seconds: u64,
    /// Rows kept per window for the statistics; more rows are sampled
    /// (reservoir), so memory stays bounded whatever the traffic.
    pub max_rows: usize,
    /// Fewer rows than this in a window: no verdict (too little evidence).
    pub min_rows: u64,
    /// Upload the window's samples when it drifts (on the `samples` topic).
    pub upload_samples_on_drift: bool,
    /// How many of the window's rows to upload then.
    pub samples_on_drift: usize,
}

impl Default for DriftWindowConfig {
    fn default() -> Self {
        DriftWindowConfig {
            window_predictions: 1000,
            window_seconds: 300,
            max_rows: 2048,
            min_rows: 30,
            upload_samples_on_drift: true,
            samples_on_drift: 200,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:1883` or `mqtts://host:8883`. Empty: no reporting (the
    /// buffer still fills, within its budget).
    pub url: String,
    pub username: Option<String>,
    /// Name of an environment variable holding the password (kept out of
    /// the file).
    pub password_env: Option<String>,
    /// CA certificate (PEM) for `mqtts://`; the system roots when absent.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS (AWS IoT Core).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub keep_alive_s: u64,
    /// Batches published and not yet acknowledged. Bounds the duplicates a
    /// reconnect can cause.
    pub max_inflight: u16,
    /// Largest payload; AWS IoT Core refuses more than 128 KB.
    pub max_message_bytes: usize,
    /// Reconnect backoff bounds, milliseconds (doubling, with jitter).
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Seconds between retained status refreshes.
    pub status_interval_s: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: String::new(),
            username: None,
            password_env: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_alive_s: 30,
            max_inflight: 16,
            max_message_bytes: ferry_protocol::MAX_MESSAGE_BYTES,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
            status_interval_s: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowConfig {
    /// Shadow inferences waiting to run; when full, live requests are not
    /// shadowed (the candidate never slows the active model down).
    pub queue: usize,
}

/// `[engine]`: which engine runs models on this device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// `auto` (the bundle's preference, else of the engines present that
    /// can serve the model tract unless onnxruntime is 1.25x faster,
    /// measured on a release's first load and remembered in the state
    /// directory), `tract` or `onnxruntime`.
    pub choice: String,
    /// libonnxruntime's path; unset: `FERRY_ONNXRUNTIME`, else beside the
    /// agent's binary. Without the library everything runs on tract.
    pub onnxruntime: Option<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            choice: "auto".into(),
            onnxruntime: None,
        }
    }
}

impl EngineConfig {
    /// The runtime's engine options (the choice was checked by `validate`).
    pub fn options(&self) -> ferry_runtime::EngineOptions {
        ferry_runtime::EngineOptions {
            choice: self.choice.parse().unwrap_or_default(),
            onnxruntime: self.onnxruntime.clone(),
        }
    }
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig { queue: 64 }
    }
}

impl Config {
    /// Reads and checks a configuration file. Relative paths in it are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut config: Config =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config
            .validate()
            .with_context(|| format!("invalid config {}", path.display()))?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.paths.state_dir);
        if let Some(p) = &mut self.paths.initial_bundle {
            fix(p);
        }
        if let Some(p) = &mut self.paths.root {
            fix(p);
        }
        self.paths.trusted_keys.iter_mut().for_each(fix);
        for p in [
            &mut self.updates.ca_file,
            &mut self.mqtt.ca_file,
            &mut self.mqtt.client_cert,
            &mut self.mqtt.client_key,
            &mut self.engine.onnxruntime,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        let s = &self.updates.source;
        if !s.is_empty() && !s.contains("://") && Path::new(s).is_relative() {
            self.updates.source = base.join(s).display().to_string();
        }
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<()> {
        ferry_protocol::validate_name("device id", &self.device.id).map_err(anyhow::Error::msg)?;
        ferry_protocol::validate_name("fleet", &self.device.fleet).map_err(anyhow::Error::msg)?;
        ferry_protocol::validate_name("channel", &self.device.channel)
            .map_err(anyhow::Error::msg)?;
        if self.paths.trusted_keys.is_empty() && self.paths.root.is_none() {
            bail!(
                "neither paths.root nor paths.trusted_keys is set: the agent only runs signed bundles"
            );
        }
        if self.paths.key_threshold == 0 {
            bail!("paths.key_threshold must be at least 1");
        }
        if self
            .updates
            .source
            .trim()
            .to_ascii_lowercase()
            .starts_with("http://")
            && !self.updates.allow_http
        {
            bail!(
                "updates.source {:?} is plain http: use https, or set updates.allow_http = true for a lab",
                self.updates.source
            );
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_rate) {
            bail!("telemetry.sample_rate must be within 0..=1");
        }
        if !(0.0..=1.0).contains(&self.updates.max_error_rate) {
            bail!("updates.max_error_rate must be within 0..=1");
        }
        if self.updates.max_download_s == 0 {
            bail!("updates.max_download_s must be at least 1");
        }
        if self.http.max_body_bytes == 0 || self.http.max_concurrency == 0 {
            bail!("http.max_body_bytes and http.max_concurrency must be positive");
        }
        if self.buffer.max_bytes < 64 * 1024 {
            bail!("buffer.max_bytes must be at least 64 KiB");
        }
        let m = &self.mqtt;
        if !m.url.is_empty() && !m.url.starts_with("mqtt://") && !m.url.starts_with("mqtts://") {
            bail!(
                "mqtt.url must start with mqtt:// or mqtts://, got {:?}",
                m.url
            );
        }
        if !(4096..=ferry_protocol::MAX_MESSAGE_BYTES).contains(&m.max_message_bytes) {
            bail!(
                "mqtt.max_message_bytes must be within 4096..={}",
                ferry_protocol::MAX_MESSAGE_BYTES
            );
        }
        if m.max_inflight == 0 {
            bail!("mqtt.max_inflight must be at least 1");
        }
        if m.client_cert.is_some() != m.client_key.is_some() {
            bail!("mqtt.client_cert and mqtt.client_key go together");
        }
        if m.reconnect_min_ms == 0 || m.reconnect_min_ms > m.reconnect_max_ms {
            bail!("mqtt.reconnect_min_ms must be positive and at most mqtt.reconnect_max_ms");
        }
        let d = &self.drift;
        if d.window_predictions == 0 || d.window_seconds == 0 || d.max_rows == 0 {
            bail!("drift.window_predictions, window_seconds and max_rows must be positive");
        }
        if self.updates.poll_interval_s == 0 {
            bail!("updates.poll_interval_s must be positive");
        }
        if let Err(e) = self.engine.choice.parse::<ferry_runtime::EngineChoice>() {
            bail!("engine.choice: {e}");
        }
        Ok(())
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs(self.updates.poll_interval_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_and_matches_the_defaults() {
        let c: Config = toml::from_str(DEFAULT_CONFIG).unwrap();
        c.validate().unwrap();
        assert_eq!(c.http.max_body_bytes, HttpConfig::default().max_body_bytes);
        assert_eq!(c.buffer.max_bytes, BufferConfig::default().max_bytes);
        assert_eq!(
            c.mqtt.max_message_bytes,
            MqttConfig::default().max_message_bytes
        );
        assert_eq!(
            c.drift.window_predictions,
            DriftWindowConfig::default().window_predictions
        );
        assert_eq!(c.updates.probation_s, UpdatesConfig::default().probation_s);
    }

    #[test]
    fn typos_and_nonsense_are_refused() {
        let base = "[device]\nid = \"d\"\nfleet = \"f\"\n[paths]\ntrusted_keys = [\"k.pub\"]\n";
        assert!(toml::from_str::<Config>(&format!("{base}[http]\nlisten_addr = \"x\"\n")).is_err());
        let bad = |extra: &str| {
            let c: Config = toml::from_str(&format!("{base}{extra}")).unwrap();
            c.validate().unwrap_err().to_string()
        };
        assert!(bad("[mqtt]\nurl = \"tcp://x\"\n").contains("mqtt://"));
        assert!(bad("[telemetry]\nsample_rate = 2.0\n").contains("sample_rate"));
        assert!(bad("[mqtt]\nmax_message_bytes = 1000000\n").contains("max_message_bytes"));
        // A plain-http channel only when explicitly allowed (a lab).
        assert!(bad("[updates]\nsource = \"http://h/index.json\"\n").contains("allow_http"));
        let lab: Config = toml::from_str(&format!(
            "{base}[updates]\nsource = \"http://h/index.json\"\nallow_http = true\n"
        ))
        .unwrap();
        lab.validate().unwrap();
        // Neither a root nor trusted keys: nothing could be verified.
        let keyless: Config = toml::from_str("[device]\nid = \"d\"\nfleet = \"f\"\n").unwrap();
        assert!(
            keyless
                .validate()
                .unwrap_err()
                .to_string()
                .contains("paths.root")
        );
        let c: Config = toml::from_str(&base.replace("id = \"d\"", "id = \"a/b\"")).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("device id"));
    }
}
