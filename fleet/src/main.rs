//! `ferry-fleet`: the operator's console for a fleet of `ferry-agent`s.
//! Thin: parses the command line, sets up logging, and runs one
//! subcommand; the work is in the library (`store`, `ingest`, `server`).
//!
//! - `serve`: follows the fleet (MQTT, persistent session), keeps its state
//!   in a directory, serves the dashboard; stops cleanly on SIGTERM/Ctrl-C.
//! - `status`: reads the devices' retained statuses from the broker and
//!   prints them; needs no running console.
//! - `rollout` / `rollouts`: start a canary rollout on a running console,
//!   and show rollouts with their audit trail (both over the console's
//!   HTTP API).
//! - `retrain`: show the retraining episodes, or `--export DIR` the
//!   drifting devices' samples and a request from a running console.
//!
//! Exit codes: 0 ok, 1 error, 2 usage.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_fleet::ingest::{self, Console, IngestOptions};
use ferry_fleet::store::Store;
use ferry_protocol::{Status, UpdateState};

/// How long a stopping `serve` waits for open HTTP responses (dashboards
/// hold an event stream open forever) before it closes them.
const HTTP_GRACE: Duration = Duration::from_secs(3);

#[derive(Parser)]
#[command(
    name = "ferry-fleet",
    version,
    about = "Ferry's fleet console: device state over MQTT, a live dashboard, canary rollouts, retraining triggers",
    long_about = "Ferry's fleet console: device state over MQTT, a live dashboard, canary rollouts, retraining triggers.\n\n\
  ferry-fleet serve --broker mqtt://broker:1883 --fleet plant-7\n\
  ferry-fleet serve --embedded-broker --fleet demo    (demos: a broker with NO authentication)\n\
  ferry-fleet status --broker mqtt://broker:1883 --fleet plant-7 [--json]\n\
  ferry-fleet rollout iris-v2.ferry --canary 10% --bake 10m --abort-if 'error_rate>1%' --abort-if 'drift.psi>0.25'\n\
  ferry-fleet rollouts [--json]\n\
  ferry-fleet retrain [--export DIR] [--json]\n\n\
Exit codes: 0 ok, 1 error, 2 usage."
)]
struct Cli {
    /// Log format (default: json when stderr is not a terminal).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Cmd {
    /// Follow the fleet, keep its state and serve the dashboard.
    Serve(Box<Serve>),
    /// Print every device's retained status (works without a console).
    Status(StatusCmd),
    /// Start a canary rollout of a bundle on a running console.
    Rollout(RolloutCmd),
    /// Show the console's rollouts (progress, history) and the audit trail.
    Rollouts(RolloutsCmd),
    /// Show retraining episodes, or export the drifting devices' samples.
    Retrain(RetrainCmd),
}

/// Where the broker is and who we are on it.
#[derive(Args)]
struct BrokerArgs {
    /// The broker: mqtt://host[:port] or mqtts://host[:port] (`serve
    /// --embedded-broker`: default mqtt://<its address>).
    #[arg(long, env = "FERRY_FLEET_BROKER")]
    broker: Option<String>,
    /// The fleet (the <fleet> of ferry/v1/<fleet>/...).
    #[arg(long, env = "FERRY_FLEET")]
    fleet: String,
    /// MQTT user name (needs read on ferry/v1/<fleet>/#, and write on its
    /// cmd topics for rollouts).
    #[arg(long)]
    username: Option<String>,
    /// Name of the environment variable holding the password (a password
    /// on the command line would show in `ps`).
    #[arg(long, value_name = "VAR", requires = "username")]
    password_env: Option<String>,
    /// CA certificates (PEM) for mqtts:// (default: the system's).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
}

impl BrokerArgs {
    /// `default_broker`: the URL used without `--broker` (the embedded
    /// broker's); without either, a usage error (exit code 2).
    fn options(
        &self,
        client_id: Option<String>,
        default_broker: Option<String>,
    ) -> Result<IngestOptions> {
        use clap::CommandFactory;
        let Some(broker) = self.broker.clone().or(default_broker) else {
            Cli::command()
                .error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "--broker <BROKER> (or FERRY_FLEET_BROKER) is required \
                     (`serve --embedded-broker` needs none)",
                )
                .exit()
        };
        let mut o = IngestOptions::new(&broker, &self.fleet);
        if let Some(id) = client_id {
            o.client_id = id;
        }
        o.username = self.username.clone();
        o.ca_file = self.ca.clone();
        if let Some(var) = &self.password_env {
            o.password = Some(std::env::var(var).with_context(|| {
                format!("--password-env names {var}, which is not set (or not UTF-8)")
            })?);
        }
        Ok(o)
    }
}

#[derive(Args)]
struct Serve {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Address of the dashboard and its API (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// State directory: `store/` holds the devices, drift history, events
    /// and samples.
    #[arg(long, value_name = "DIR", default_value = "./ferry-fleet-state")]
    state: PathBuf,
    /// MQTT client id: names the broker session that queues messages while
    /// the console is down; one console per id (default ferry-fleet-<fleet>).
    #[arg(long)]
    client_id: Option<String>,
    /// Public keys (PEM) bundles must be signed with to be rolled out (the
    /// devices' trusted keys). Repeatable. Without it, rollouts are off.
    #[arg(long = "trust", value_name = "FILE")]
    trust: Vec<PathBuf>,
    /// Operator signing key (PKCS#8 PEM, e.g. from `ferry keygen`), trusted
    /// by the devices: signs rollout commands (rollbacks need it).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Base URL devices download rollout bundles from (this console's
    /// address as the devices reach it; default http://<listen>).
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// Start an MQTT broker (rumqttd) in this process on ADDR (default
    /// 127.0.0.1:1883), for demos and small trusted networks: NO
    /// authentication, NO ACL, state in memory only. `--broker` then
    /// defaults to mqtt://ADDR. Production: mosquitto, EMQX, AWS IoT Core.
    #[arg(
        long,
        value_name = "ADDR",
        num_args = 0..=1,
        default_missing_value = ferry_fleet::broker::DEFAULT_ADDR
    )]
    embedded_broker: Option<SocketAddr>,
    #[command(flatten)]
    retrain: RetrainArgs,
}

/// The retraining loop of `serve` (see `ferry_fleet::retrain`).
#[derive(Args)]
struct RetrainArgs {
    /// When a feature counts as drifting on the fleet: its share of the
    /// traffic of devices with a recent drift window, `share>=30%` or
    /// `share>0.3`.
    #[arg(long, value_name = "RULE", default_value = ferry_fleet::retrain::DEFAULT_RULE)]
    retrain_if: String,
    /// Devices that must drift on a feature for the rule to hold.
    #[arg(long, value_name = "N", default_value_t = 1)]
    retrain_min_devices: usize,
    /// Drift windows older than this (by the device's clock) do not count.
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    retrain_max_age: String,
    /// An episode ends when the rule has not held for this long; the next
    /// time it holds fires again.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    retrain_calm: String,
    /// Wait this long after the rule starts holding before assembling the
    /// data set and calling the hook (drifting windows' samples arrive on
    /// their own topic, a little after the drift records).
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    retrain_settle: String,
    /// Command run once per episode: "<program> [args]", never through a
    /// shell; gets request.json's path as last argument and in
    /// FERRY_RETRAIN_REQUEST.
    #[arg(long, value_name = "COMMAND", conflicts_with = "retrain_webhook")]
    retrain_hook_cmd: Option<String>,
    /// URL request.json is POSTed to once per episode (retried on 5xx and
    /// connection errors).
    #[arg(long, value_name = "URL")]
    retrain_webhook: Option<String>,
    /// Limit on the hook command's run, and on each webhook attempt.
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    retrain_hook_timeout: String,
}

impl RetrainArgs {
    fn options(&self) -> Result<ferry_fleet::retrain::Options> {
        use ferry_fleet::retrain::{Hook, Options};
        use ferry_fleet::rollouts::parse_duration_ms;
        let hook = match (&self.retrain_hook_cmd, &self.retrain_webhook) {
            (Some(cmd), _) => Hook::command(cmd).context("--retrain-hook-cmd")?,
            (None, Some(url)) => Hook::webhook(url)?,
            (None, None) => Hook::None,
        };
        Ok(Options {
            rule: self
                .retrain_if
                .parse()
                .map_err(anyhow::Error::msg)
                .context("--retrain-if")?,
            min_devices: self.retrain_min_devices,
            max_age_ms: parse_duration_ms(&self.retrain_max_age).context("--retrain-max-age")?,
            calm_ms: parse_duration_ms(&self.retrain_calm).context("--retrain-calm")?,
            settle_ms: parse_duration_ms(&self.retrain_settle).context("--retrain-settle")?,
            hook,
            hook_timeout: Duration::from_millis(
                parse_duration_ms(&self.retrain_hook_timeout).context("--retrain-hook-timeout")?,
            ),
        })
    }
}

impl Serve {
    fn run(self) -> Result<()> {
        // Parse and validate before anything starts.
        let retrain = self.retrain.options()?;
        // The embedded broker accepts connections before the console
        // connects to it.
        let embedded = self
            .embedded_broker
            .map(ferry_fleet::broker::EmbeddedBroker::start)
            .transpose()?;
        let options = self
            .broker
            .options(self.client_id.clone(), embedded.as_ref().map(|b| b.url()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let result = runtime.block_on(self.serve(options, retrain));
        // A retraining hook still running (up to its timeout) must not hold
        // the exit: its episode is marked interrupted at the next start.
        runtime.shutdown_timeout(HTTP_GRACE);
        result
    }

    async fn serve(
        self,
        options: IngestOptions,
        retrain: ferry_fleet::retrain::Options,
    ) -> Result<()> {
        let path = self.state.join(ferry_fleet::store::DIR);
        let store = tokio::task::spawn_blocking({
            let path = path.clone();
            move || Store::open(&path)
        })
        .await
        .context("opening the state panicked")?
        .with_context(|| format!("cannot open the state in {}", path.display()))?;
        let store = Arc::new(store);
        tracing::info!(state = %self.state.display(), devices = store.devices().len(), "State opened");
        let console = Arc::new(Console::start(&options, store.clone())?);

        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.listen))?;
        let addr = listener.local_addr()?;
        let mut router = ferry_fleet::server::router(store.clone());
        let mut ticker = None;
        if !self.trust.is_empty() {
            let public_url = self
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{addr}"));
            let rollouts = Arc::new(self.rollouts(store.clone(), console.clone(), &public_url)?);
            router = router.merge(ferry_fleet::rollouts::routes(rollouts.clone()));
            // Rollouts advance once a second.
            ticker = Some(tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    every.tick().await;
                    if let Err(e) = rollouts.tick(ferry_fleet::now_ms()).await {
                        tracing::error!(error = %format!("{e:#}"), "Rollout step failed");
                    }
                }
            }));
            tracing::info!(%public_url, "Rollouts enabled");
        } else {
            tracing::warn!("No --trust keys: rollouts are off");
        }
        let retrainer = Arc::new(
            ferry_fleet::retrain::Retrainer::open(&self.state, store.clone(), retrain)
                .context("cannot open the retraining state")?,
        );
        router = router.merge(ferry_fleet::retrain::routes(retrainer.clone()));
        // The retraining rule is evaluated once a second, off the async
        // threads (a hook blocks its tick up to its timeout).
        let retrain_ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let r = retrainer.clone();
                match tokio::task::spawn_blocking(move || r.tick(ferry_fleet::now_ms())).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %format!("{e:#}"), "Retraining step failed")
                    }
                    Err(e) => tracing::error!(error = %e, "Retraining step panicked"),
                }
            }
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut http = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await
        });
        println!("Dashboard: http://{addr}/");
        tracing::info!(%addr, broker = %options.broker, fleet = %options.fleet, "Serving the dashboard");

        tokio::select! {
            signal = shutdown_signal() => {
                tracing::info!(signal, "Stopping");
            }
            ended = &mut http => {
                console.stop().await.ok();
                return match ended {
                    Ok(Ok(())) => bail!("the HTTP server stopped unexpectedly"),
                    Ok(Err(e)) => Err(e).context("the HTTP server failed"),
                    Err(e) => Err(e).context("the HTTP server panicked"),
                };
            }
        }
        if let Some(t) = ticker {
            t.abort();
        }
        retrain_ticker.abort();
        let _ = stop_tx.send(());
        if tokio::time::timeout(HTTP_GRACE, &mut http).await.is_err() {
            tracing::info!("Closing the dashboards still open");
            http.abort();
        }
        console
            .stop()
            .await
            .context("cannot flush the state at shutdown")?;
        tracing::info!("Stopped");
        Ok(())
    }
}

impl Serve {
    fn rollouts(
        &self,
        store: Arc<Store>,
        console: Arc<Console>,
        public_url: &str,
    ) -> Result<ferry_fleet::rollouts::Rollouts> {
        let mut keys = Vec::new();
        for path in &self.trust {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            keys.extend(
                ferry_format::PublicKey::all_from_pem(&text)
                    .with_context(|| format!("{} holds no valid public key", path.display()))?,
            );
        }
        let trust = ferry_format::TrustPolicy::new(keys)?;
        let key = match &self.key {
            Some(path) => Some(
                ferry_format::SecretKey::from_pem(
                    &std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
                .with_context(|| format!("{} is not a signing key", path.display()))?,
            ),
            None => {
                tracing::warn!("No --key: rollouts cannot sign rollbacks and will refuse to start");
                None
            }
        };
        let sink: Arc<dyn ferry_fleet::rollouts::CommandSink> = console;
        ferry_fleet::rollouts::Rollouts::open(
            &self.state,
            &self.broker.fleet,
            public_url,
            trust,
            key,
            store,
            sink,
        )
    }
}

/// The console's HTTP API address, for `rollout` / `rollouts`.
#[derive(Args)]
struct ConsoleArgs {
    /// The running console (`ferry-fleet serve`).
    #[arg(
        long,
        env = "FERRY_FLEET_CONSOLE",
        default_value = "http://127.0.0.1:8080"
    )]
    console: String,
}

impl ConsoleArgs {
    fn agent(&self) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.console.trim_end_matches('/'))
    }
}

/// The JSON body of an answer, or its error message as an error.
fn answer(mut r: ureq::http::Response<ureq::Body>, what: &str) -> Result<serde_json::Value> {
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    let value: serde_json::Value =
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    if status >= 400 {
        let message = value["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or(value.to_string());
        bail!("{what}: {status} {message}");
    }
    Ok(value)
}

#[derive(Args)]
struct RolloutCmd {
    /// The bundle (signed by a key the console and the devices trust).
    bundle: PathBuf,
    /// Canaries: a share of the fleet (`10%`) or a comma-separated device list.
    #[arg(long)]
    canary: String,
    /// How long the canaries are watched before the rest of the fleet (30s, 10m, 2h).
    #[arg(long)]
    bake: String,
    /// Abort rule, repeatable: error_rate>1%, drift.psi>0.25, drift.share>0.5,
    /// shadow.agreement<0.97, failed_installs>0.
    #[arg(long = "abort-if", value_name = "RULE")]
    abort_if: Vec<String>,
    /// Cumulative waves after the canaries (default: everyone at once), e.g. 50%,100%.
    #[arg(long)]
    waves: Option<String>,
    /// Run the bundle in shadow on the canaries for this many requests first.
    #[arg(long, default_value_t = 0)]
    shadow: u64,
    /// A device that does not run the bundle this long after its command counts as failed.
    #[arg(long, default_value = "10m")]
    install_timeout: String,
    /// Who is rolling out (the audit log), default $USER.
    #[arg(long)]
    operator: Option<String>,
    #[command(flatten)]
    console: ConsoleArgs,
    /// Print the rollout as JSON.
    #[arg(long)]
    json: bool,
}

impl RolloutCmd {
    fn run(self) -> Result<()> {
        let bytes = std::fs::read(&self.bundle)
            .with_context(|| format!("cannot read {}", self.bundle.display()))?;
        for rule in &self.abort_if {
            rule.parse::<ferry_fleet::rollout::Rule>()
                .map_err(anyhow::Error::msg)?;
            if rule.contains(';') {
                bail!("{rule:?}: one rule per --abort-if");
            }
        }
        let operator = self
            .operator
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "operator".into());
        let mut req = self
            .console
            .agent()
            .post(self.console.url("/api/rollouts"))
            .query("canary", &self.canary)
            .query("bake", &self.bake)
            .query("abort_if", self.abort_if.join(";"))
            .query("shadow", self.shadow.to_string())
            .query("install_timeout", &self.install_timeout)
            .query("operator", &operator)
            .header("Content-Type", "application/octet-stream");
        if let Some(w) = &self.waves {
            req = req.query("waves", w);
        }
        let r = req
            .send(&bytes[..])
            .with_context(|| format!("cannot reach the console at {}", self.console.console))?;
        let rollout = answer(r, "the console refused the rollout")?;
        if self.json {
            println!("{rollout}");
        } else {
            let order = rollout["order"].as_array().cloned().unwrap_or_default();
            let canaries = rollout["canaries"].as_u64().unwrap_or(0) as usize;
            println!(
                "rollout {} started: {} {} (sequence {}) to {} devices",
                rollout["id"].as_str().unwrap_or("?"),
                rollout["spec"]["bundle"]["name"].as_str().unwrap_or("?"),
                rollout["spec"]["bundle"]["version"].as_str().unwrap_or("?"),
                rollout["spec"]["bundle"]["sequence"],
                order.len()
            );
            let names: Vec<&str> = order.iter().filter_map(|d| d.as_str()).collect();
            println!(
                "canaries: {}",
                names[..canaries.min(names.len())].join(", ")
            );
            println!("follow it with `ferry-fleet rollouts` or on the dashboard");
        }
        Ok(())
    }
}

#[derive(Args)]
struct RolloutsCmd {
    #[command(flatten)]
    console: ConsoleArgs,
    /// Print JSON: {"rollouts": [...], "audit": [...]}.
    #[arg(long)]
    json: bool,
}

impl RolloutsCmd {
    fn run(self) -> Result<()> {
        let agent = self.console.agent();
        let get = |path: &str| -> Result<serde_json::Value> {
            let r = agent
                .get(self.console.url(path))
                .call()
                .with_context(|| format!("cannot reach the console at {}", self.console.console))?;
            answer(r, path)
        };
        let rollouts = get("/api/rollouts")?;
        let audit = get("/api/audit")?;
        if self.json {
            println!(
                "{}",
                serde_json::json!({"rollouts": rollouts, "audit": audit})
            );
            return Ok(());
        }
        let list = rollouts.as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            println!("no rollouts");
            return Ok(());
        }
        println!(
            "{:<28} {:<10} {:<18} {:>8}  DETAIL",
            "ROLLOUT", "PHASE", "BUNDLE", "RUNNING"
        );
        for r in &list {
            let targets = r["targets"].as_object().cloned().unwrap_or_default();
            let running = targets.values().filter(|t| t["state"] == "running").count();
            let phase = r["phase"]["phase"].as_str().unwrap_or("?");
            let detail = r["phase"]["reason"].as_str().unwrap_or("");
            println!(
                "{:<28} {:<10} {:<18} {:>8}  {}",
                r["id"].as_str().unwrap_or("?"),
                phase,
                format!(
                    "{} {}",
                    r["spec"]["bundle"]["name"].as_str().unwrap_or("?"),
                    r["spec"]["bundle"]["version"].as_str().unwrap_or("?")
                ),
                format!("{running}/{}", targets.len()),
                detail
            );
        }
        println!("\naudit trail:");
        for e in audit.as_array().cloned().unwrap_or_default() {
            println!(
                "  {} {} {} {}",
                e["ts_ms"],
                e["rollout"].as_str().unwrap_or("?"),
                e["operator"].as_str().unwrap_or("?"),
                e["what"].as_str().unwrap_or("?")
            );
        }
        Ok(())
    }
}

#[derive(Args)]
struct RetrainCmd {
    /// Write the drifting devices' samples (samples.csv) and a retraining
    /// request (request.json) into this directory.
    #[arg(long, value_name = "DIR")]
    export: Option<PathBuf>,
    /// With --export: these devices (comma-separated) instead of the
    /// drifting ones.
    #[arg(long, requires = "export")]
    devices: Option<String>,
    #[command(flatten)]
    console: ConsoleArgs,
    /// Print JSON: the request written, or {"fleet_drift", "retrain"}.
    #[arg(long)]
    json: bool,
}

impl RetrainCmd {
    fn run(self) -> Result<()> {
        let agent = self.console.agent();
        let reach = || format!("cannot reach the console at {}", self.console.console);
        match &self.export {
            Some(dir) => self.export(&agent, dir, &reach),
            None => {
                let get = |path: &str| -> Result<serde_json::Value> {
                    let r = agent
                        .get(self.console.url(path))
                        .call()
                        .with_context(reach)?;
                    answer(r, path)
                };
                let drift = get("/api/fleet-drift")?;
                let retrain = get("/api/retrain")?;
                if self.json {
                    println!(
                        "{}",
                        serde_json::json!({"fleet_drift": drift, "retrain": retrain})
                    );
                    return Ok(());
                }
                println!(
                    "rule: {} (at least {} device(s)); {} device(s) with recent drift windows",
                    retrain["rule"].as_str().unwrap_or("?"),
                    retrain["min_devices"],
                    drift["devices"]
                );
                for f in drift["features"].as_array().into_iter().flatten() {
                    let devices: Vec<&str> = f["devices"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|d| d.as_str())
                        .collect();
                    println!(
                        "  {:<24} {:>5.1}%  {}",
                        f["name"].as_str().unwrap_or("?"),
                        f["share"].as_f64().unwrap_or(0.0) * 100.0,
                        devices.join(", ")
                    );
                }
                let episodes = retrain["episodes"].as_array().cloned().unwrap_or_default();
                if episodes.is_empty() {
                    println!("no retraining episodes");
                }
                for e in &episodes {
                    let features: Vec<&str> = e["features"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|f| f["name"].as_str())
                        .collect();
                    println!(
                        "{} {} hook {} rows {} features {}",
                        e["id"].as_str().unwrap_or("?"),
                        if e["ended_ms"].is_null() {
                            "open "
                        } else {
                            "ended"
                        },
                        e["hook"]["state"].as_str().unwrap_or("?"),
                        e["rows"],
                        features.join(", ")
                    );
                }
                Ok(())
            }
        }
    }

    fn export(
        &self,
        agent: &ureq::Agent,
        dir: &std::path::Path,
        reach: &dyn Fn() -> String,
    ) -> Result<()> {
        let mut req = agent.get(self.console.url("/api/retrain/request"));
        if let Some(d) = &self.devices {
            req = req.query("devices", d);
        }
        let mut request = answer(
            req.call().with_context(reach)?,
            "the console refused the export",
        )?;
        // The CSV of exactly the devices the request names.
        let devices: Vec<String> = request["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["device"].as_str().map(str::to_string))
            .collect();
        let mut r = agent
            .get(self.console.url("/api/retrain/export"))
            .query("devices", devices.join(","))
            .call()
            .with_context(reach)?;
        if r.status().as_u16() >= 400 {
            answer(r, "the console refused the export")?;
            unreachable!("an error status is an error");
        }
        let rows: u64 = r
            .headers()
            .get(ferry_fleet::retrain::ROWS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .context("the console's export has no row count")?;
        let csv = r
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_string()
            .context("cannot read the export")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let csv_path = dir.join("samples.csv");
        std::fs::write(&csv_path, &csv)
            .with_context(|| format!("cannot write {}", csv_path.display()))?;
        let csv_path = std::fs::canonicalize(&csv_path).unwrap_or(csv_path);
        request["rows"] = rows.into();
        request["samples_csv"] = csv_path.display().to_string().into();
        let request_path = dir.join("request.json");
        std::fs::write(&request_path, serde_json::to_vec_pretty(&request)?)
            .with_context(|| format!("cannot write {}", request_path.display()))?;
        if self.json {
            println!("{request}");
        } else {
            println!(
                "{rows} samples of {} written to {}",
                devices.join(", "),
                csv_path.display()
            );
            println!("request: {}", request_path.display());
        }
        Ok(())
    }
}

/// Resolves on SIGTERM or Ctrl-C, with the signal's name.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = ctrl_c => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                ctrl_c.await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c.await;
        "Ctrl-C"
    }
}

#[derive(Args)]
struct StatusCmd {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Print JSON (`{"fleet": ..., "devices": [status, ...]}`, statuses as
    /// the devices publish them) instead of a table.
    #[arg(long)]
    json: bool,
    /// How long to collect statuses after subscribing, in milliseconds.
    #[arg(long, default_value_t = 1500)]
    wait_ms: u64,
}

impl StatusCmd {
    fn run(self) -> Result<()> {
        // A clean session of its own: it must not take over the console's.
        let client_id = format!(
            "ferry-fleet-status-{}-{:08x}",
            self.broker.fleet,
            fastrand::u32(..)
        );
        let options = self.broker.options(Some(client_id), None)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let statuses = runtime.block_on(ingest::read_statuses(
            &options,
            Duration::from_millis(self.wait_ms),
        ))?;
        if self.json {
            let out = serde_json::json!({"fleet": options.fleet, "devices": statuses});
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            print!("{}", table(&statuses, ferry_fleet::now_ms()));
        }
        Ok(())
    }
}

/// The human table of `status`.
fn table(statuses: &[Status], now_ms: u64) -> String {
    let header = [
        "DEVICE",
        "ONLINE",
        "BUNDLE",
        "BACKLOG",
        "DROPPED",
        "PREDICTIONS",
        "ERRORS",
        "UPDATE",
        "STATUS AGE",
    ];
    let rows: Vec<[String; 9]> = statuses
        .iter()
        .map(|s| {
            [
                s.device.clone(),
                if s.online { "yes" } else { "no" }.to_string(),
                s.bundle.as_ref().map_or("-".to_string(), |b| {
                    format!("{} #{}", b.version, b.sequence)
                }),
                s.buffer.records.to_string(),
                s.buffer.dropped.values().sum::<u64>().to_string(),
                s.predictions.to_string(),
                s.errors.to_string(),
                update_text(&s.update),
                if s.ts_ms == 0 {
                    "-".to_string()
                } else {
                    age(now_ms.saturating_sub(s.ts_ms))
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let text: Vec<String> = cells.zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    if rows.is_empty() {
        out.push_str("(no device has published a status on this fleet)\n");
    }
    out
}

fn update_text(u: &UpdateState) -> String {
    match u {
        UpdateState::Idle => "idle".into(),
        UpdateState::Downloading {
            version,
            received,
            total,
        } => format!(
            "downloading {version} {}%",
            received * 100 / (*total).max(1)
        ),
        UpdateState::Verifying { version } => format!("verifying {version}"),
        UpdateState::Rejected { version, code, .. } => format!("rejected {version} ({code})"),
        UpdateState::Probation { version } => format!("probation {version}"),
    }
}

fn age(ms: u64) -> String {
    match ms / 1000 {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Cmd::Serve(c) => (*c).run(),
        Cmd::Status(c) => c.run(),
        Cmd::Rollout(c) => c.run(),
        Cmd::Rollouts(c) => c.run(),
        Cmd::Retrain(c) => c.run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "Failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: Option<LogFormat>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        // rumqttd (the embedded broker) logs every connection at info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::{BufferInfo, BundleRef};

    #[test]
    fn the_status_table() {
        let mut s = Status::offline("demo", "dev-2", "0.1.0");
        let mut t = s.clone();
        t.device = "dev-1".into();
        t.online = true;
        t.ts_ms = 1_000_000;
        t.bundle = Some(BundleRef {
            name: "iris".into(),
            version: "1.1.0".into(),
            digest: "ab".into(),
            fleet: "demo".into(),
            channel: "stable".into(),
            sequence: 2,
        });
        t.buffer = BufferInfo {
            records: 12,
            dropped: [(ferry_protocol::Stream::Samples, 3)].into(),
            ..BufferInfo::default()
        };
        t.update = UpdateState::Downloading {
            version: "1.2.0".into(),
            received: 50,
            total: 200,
        };
        s.errors = 0;
        let text = table(&[t, s], 1_090_000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("DEVICE  ONLINE  BUNDLE"), "{text}");
        assert!(
            lines[1].contains("dev-1   yes     1.1.0 #2  12       3"),
            "{text}"
        );
        assert!(
            lines[1].contains("downloading 1.2.0 25%") && lines[1].ends_with("90s"),
            "{text}"
        );
        assert!(lines[2].starts_with("dev-2   no      -"), "{text}");
        assert!(table(&[], 0).contains("no device"));
    }
}
