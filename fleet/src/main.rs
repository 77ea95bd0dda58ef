//! `ferry-fleet`: the operator's console for a fleet of `ferry-agent`s.
//! Thin: parses the command line, sets up logging, and runs one
//! subcommand; the work is in the library (`ferry_fleet::run` for `serve`,
//! `ferry_fleet::Client` for the commands that talk to a console).
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
//! - `token`: make, list and revoke API tokens (admin), over the API of a
//!   running console or (`--state`) on a stopped console's state directory.
//! - `enrol`: enrol devices, remove them, list them and the devices
//!   refused (admin): `serve` follows only enrolled devices unless
//!   `--follow-unenrolled`.
//!
//! The commands that talk to a console authenticate with a token:
//! `--token-file FILE`, or `FERRY_FLEET_TOKEN` (`--token`).
//!
//! Exit codes: 0 ok, 1 error, 2 usage.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_fleet::ingest::{self, IngestOptions};
use ferry_fleet::rollout::{Phase, Target};
use ferry_fleet::{Client, ClientError, HTTP_GRACE};

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
  ferry-fleet retrain [--export DIR] [--json]\n\
  ferry-fleet token create --name ci --role operator    (admin; prints the token once)\n\
  ferry-fleet enrol pump-1 pump-2    (admin: serve follows only enrolled devices)\n\n\
Commands that talk to a console need a token: --token-file FILE or FERRY_FLEET_TOKEN.\n\
The first admin token is written to <state>/admin.token when a console first starts.\n\n\
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
    /// Show the console's rollouts (progress, history) and the audit trail;
    /// pause, resume or abort the running one.
    Rollouts(RolloutsCmd),
    /// Show the release registry (every release the console took, where it
    /// runs, its rollouts), or the next sequence for CI.
    Releases(ReleasesCmd),
    /// Show retraining episodes, or export the drifting devices' samples.
    Retrain(RetrainCmd),
    /// Make, list or revoke API tokens (admin).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Enrol devices, remove them, or list them with the devices refused
    /// (admin).
    Enrol(EnrolCmd),
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
    /// The devices' root of trust (`ferry root init`) instead of --trust:
    /// uploads need its release policy (builder, and approver when it has
    /// one), and --key must hold its operator role.
    #[arg(long, value_name = "FILE", conflicts_with = "trust")]
    root: Option<PathBuf>,
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
    /// Follow every device that publishes under the fleet's topics, enrolled
    /// or not (demos, small trusted networks). Without it, only the devices
    /// an admin enrolled (`ferry-fleet enrol`) are followed: messages of
    /// others are counted (`GET /api/enrolment`) and ignored for state,
    /// rollouts and retraining.
    #[arg(long)]
    follow_unenrolled: bool,
    /// Mark the dashboard's session cookie `Secure`: set it when browsers
    /// reach the console over HTTPS (a TLS-terminating reverse proxy, see
    /// docs/fleet-security.md).
    #[arg(long)]
    secure_cookies: bool,
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
    /// Samples one device contributes to a data set at most (its most
    /// recent): no single device can make the training set its own.
    #[arg(long, value_name = "N", default_value_t = ferry_fleet::retrain::DEFAULT_MAX_SAMPLES_PER_DEVICE as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    retrain_max_samples_per_device: u64,
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
            max_samples_per_device: usize::try_from(self.retrain_max_samples_per_device)
                .unwrap_or(usize::MAX),
        })
    }
}

impl Serve {
    /// Parses and checks everything, binds the listener, then runs the
    /// console (`ferry_fleet::run`) until SIGTERM or Ctrl-C.
    fn run(self) -> Result<()> {
        let retrain = self.retrain.options()?;
        let rollouts = self.rollouts()?;
        let default_broker = self
            .embedded_broker
            .map(ferry_fleet::broker::EmbeddedBroker::url_of);
        let mqtt = self
            .broker
            .options(self.client_id.clone(), default_broker)?;
        let listener = std::net::TcpListener::bind(self.listen)
            .with_context(|| format!("cannot listen on {}", self.listen))?;
        let config = ferry_fleet::ServeConfig {
            state: self.state,
            listener,
            mqtt,
            embedded_broker: self.embedded_broker,
            rollouts,
            retrain,
            require_enrolment: !self.follow_unenrolled,
            secure_cookies: self.secure_cookies,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let result = runtime.block_on(ferry_fleet::run_notify(
            config,
            async {
                let signal = shutdown_signal().await;
                tracing::info!(signal, "Stopping");
            },
            |addr| println!("Dashboard: http://{addr}/"),
        ));
        // A retraining hook still running (up to its timeout) must not hold
        // the exit: its episode is marked interrupted at the next start.
        runtime.shutdown_timeout(HTTP_GRACE);
        Ok(result?)
    }

    /// The rollouts' settings: none without `--trust`.
    fn rollouts(&self) -> Result<Option<ferry_fleet::RolloutsConfig>> {
        if self.trust.is_empty() && self.root.is_none() {
            return Ok(None);
        }
        let root = match &self.root {
            Some(path) => Some(
                ferry_format::Root::from_envelope(
                    &std::fs::read(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
                .with_context(|| format!("{} is not a valid root of trust", path.display()))?,
            ),
            None => None,
        };
        let trust = match &root {
            Some(root) => root.release_policy().clone(),
            None => {
                let mut keys = Vec::new();
                for path in &self.trust {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    keys.extend(ferry_format::PublicKey::all_from_pem(&text).with_context(
                        || format!("{} holds no valid public key", path.display()),
                    )?);
                }
                ferry_format::TrustPolicy::new(keys)?
            }
        };
        let key = match &self.key {
            Some(path) => Some(
                ferry_format::SecretKey::from_pem(
                    &std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
                .with_context(|| format!("{} is not a signing key", path.display()))?,
            ),
            None => None,
        };
        if let (Some(root), Some(key)) = (&root, &key) {
            let id = key.key_id();
            let operator = root.operator_policy();
            if !operator.keys().any(|k| k.key_id() == id) {
                bail!(
                    "--key {id} is not in the root's operator role: devices would refuse every command it signs"
                );
            }
            if operator.roles().iter().any(|r| r.threshold() > 1) {
                tracing::warn!(
                    "The root's operator threshold is above 1: the console signs with one key, so its commands need more signatures (ferry command) before devices obey them"
                );
            }
        }
        Ok(Some(ferry_fleet::RolloutsConfig {
            trust,
            key,
            public_url: self.public_url.clone(),
        }))
    }
}

/// The console's HTTP API address and the credential, for the commands
/// that talk to a running console.
#[derive(Args)]
struct ConsoleArgs {
    /// The running console (`ferry-fleet serve`).
    #[arg(
        long,
        env = "FERRY_FLEET_CONSOLE",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    console: String,
    /// File holding the API token (e.g. `<state>/admin.token`, or one made
    /// by `ferry-fleet token create`); wins over FERRY_FLEET_TOKEN.
    #[arg(long, value_name = "FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The API token; prefer the environment variable (a token on the
    /// command line shows in `ps`).
    #[arg(long, env = "FERRY_FLEET_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

impl ConsoleArgs {
    fn client(&self) -> Result<Client> {
        let client = Client::new(&self.console);
        let token = match (&self.token_file, &self.token) {
            (Some(path), _) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?,
            (None, Some(t)) => t.clone(),
            (None, None) => return Ok(client),
        };
        if token.trim().is_empty() {
            bail!("the token is empty");
        }
        Ok(client.with_token(&token))
    }
}

/// A client error as the CLI says it: a refusal prefixed with `what`.
fn refused(what: &str) -> impl FnOnce(ClientError) -> anyhow::Error + '_ {
    move |e| match e {
        ClientError::Refused { status: 401, .. } => anyhow::anyhow!(
            "{what}: {e}\n(give a token: --token-file FILE or FERRY_FLEET_TOKEN; the first \
             admin token is in <state>/admin.token)"
        ),
        ClientError::Refused { .. } => anyhow::anyhow!("{what}: {e}"),
        e => e.into(),
    }
}

#[derive(Args)]
struct RolloutCmd {
    /// The bundle (carrying every signature the devices require).
    #[arg(required_unless_present = "release", conflicts_with = "release")]
    bundle: Option<PathBuf>,
    /// Roll out an approved release of the console's registry instead (its
    /// id, or a unique prefix of it as `ferry-fleet releases` shows it).
    #[arg(long)]
    release: Option<String>,
    /// Allow a rollout of a release older than the one its channel runs
    /// (admin tokens only; recorded in the audit log).
    #[arg(long)]
    allow_downgrade: bool,
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
    /// No longer accepted: the audit log names the token's holder.
    #[arg(long, hide = true)]
    operator: Option<String>,
    #[command(flatten)]
    console: ConsoleArgs,
    /// Print the rollout as JSON.
    #[arg(long)]
    json: bool,
}

impl RolloutCmd {
    fn run(self) -> Result<()> {
        let bytes = match &self.bundle {
            Some(path) => {
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
            }
            None => Vec::new(),
        };
        let client = self.console.client()?;
        let release = match &self.release {
            Some(id) => Some(resolve_release(&client, id)?),
            None => None,
        };
        for rule in &self.abort_if {
            rule.parse::<ferry_fleet::rollout::Rule>()
                .map_err(anyhow::Error::msg)?;
            if rule.contains(';') {
                bail!("{rule:?}: one rule per --abort-if");
            }
        }
        if self.operator.is_some() {
            bail!(
                "--operator is not accepted: the audit log records the holder of the token \
                 (ferry-fleet token create --name NAME)"
            );
        }
        let params = ferry_fleet::rollouts::NewRollout {
            canary: self.canary.clone(),
            bake: self.bake.clone(),
            abort_if: self.abort_if.join(";"),
            waves: self.waves.clone(),
            shadow: self.shadow,
            install_timeout: Some(self.install_timeout.clone()),
            allow_downgrade: self.allow_downgrade,
            release,
        };
        let rollout = client
            .create_rollout(&bytes, &params)
            .map_err(refused("the console refused the rollout"))?;
        if self.json {
            println!("{}", serde_json::to_string(&rollout)?);
        } else {
            let bundle = &rollout.spec.bundle;
            println!(
                "rollout {} started: {} {} (sequence {}) to {} devices",
                rollout.id,
                bundle.name,
                bundle.version,
                bundle.sequence,
                rollout.order.len()
            );
            println!(
                "canaries: {}",
                rollout.order[..rollout.canaries.min(rollout.order.len())].join(", ")
            );
            println!("follow it with `ferry-fleet rollouts` or on the dashboard");
        }
        Ok(())
    }
}

#[derive(Args)]
struct ReleasesCmd {
    #[command(subcommand)]
    action: Option<ReleaseAction>,
    #[command(flatten)]
    console: ConsoleArgs,
    /// Print only the sequence the next release of --channel should carry
    /// (one above the registry's highest; what CI packs with).
    #[arg(long)]
    next_sequence: bool,
    /// The channel for --next-sequence.
    #[arg(long, default_value = "stable", requires = "next_sequence")]
    channel: String,
    /// Print the registry as JSON.
    #[arg(long)]
    json: bool,
}

/// What to do with one release (two-person approval).
#[derive(Subcommand)]
enum ReleaseAction {
    /// Submit a bundle to the registry (CI, after `ferry pack`): one only
    /// the builder signed awaits an approver.
    Submit {
        bundle: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// What an approver reviews: manifest, lineage, golden examples, drift
    /// baseline, size, and the differences from the release its channel runs.
    Show {
        /// The release id (or a unique prefix).
        release: String,
        #[arg(long)]
        json: bool,
    },
    /// Download a release's bundle (to review and sign it with `ferry approve`).
    Download {
        release: String,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Approve a release: upload the bundle you signed with `ferry approve`
    /// (approver token; not the one who submitted it).
    Approve {
        release: String,
        /// The bundle with your approver signature added.
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Reject a release (approver token): it can never be rolled out.
    Reject {
        release: String,
        #[arg(long)]
        reason: String,
    },
}

/// A full release id from `id` or a unique prefix of one.
fn resolve_release(client: &ferry_fleet::client::Client, id: &str) -> Result<String> {
    let id = id.trim().trim_start_matches("sha256:");
    if id.len() == 64 {
        return Ok(id.to_string());
    }
    if id.len() < 4 {
        bail!("{id:?}: give the release id, or at least 4 of its first characters");
    }
    let releases = client.releases().map_err(refused("/api/releases"))?;
    let found: Vec<&str> = releases
        .iter()
        .map(|r| r.record.release.as_str())
        .filter(|r| r.starts_with(id))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.to_string()),
        [] => bail!("no release starts with {id}"),
        many => bail!(
            "{id} is the start of {} releases: give more of it",
            many.len()
        ),
    }
}

fn print_record(r: &ferry_fleet::releases::ReleaseRecord) {
    println!(
        "release {}: {} {} (sequence {}, {}/{}), {}",
        r.release,
        r.name,
        r.version,
        r.sequence,
        r.fleet,
        r.channel,
        r.status.name().replace('_', " ")
    );
    if let Some(by) = &r.approved_by {
        println!("approved by {by}");
    }
    if let Some(x) = &r.rejection {
        println!("rejected by {}: {}", x.by, x.reason);
    }
}

impl ReleaseAction {
    fn run(self, console: ConsoleArgs) -> Result<()> {
        match self {
            ReleaseAction::Submit { bundle, json } => {
                let bytes = std::fs::read(&bundle)
                    .with_context(|| format!("cannot read {}", bundle.display()))?;
                let r = console
                    .client()?
                    .submit_release(&bytes)
                    .map_err(refused("the console refused the release"))?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    print_record(&r);
                    if r.status == ferry_fleet::releases::ReleaseStatus::AwaitingApproval {
                        println!(
                            "an approver reviews it with `ferry-fleet releases show {}`",
                            &r.release[..12]
                        );
                    }
                }
                Ok(())
            }
            ReleaseAction::Show { release, json } => {
                let client = console.client()?;
                let id = resolve_release(&client, &release)?;
                let d = client.release(&id).map_err(refused("/api/releases"))?;
                if json {
                    println!("{}", serde_json::to_string(&d)?);
                    return Ok(());
                }
                print_record(&d.view.record);
                let r = &d.view.record;
                println!(
                    "submitted by {}; signed by {}",
                    r.uploaded_by,
                    r.signed_by.join(", ")
                );
                println!("size: {} bytes", r.size_bytes);
                println!("lineage: {}", r.lineage);
                if let Some(review) = &r.review {
                    println!("golden examples ({}):", review.golden.len());
                    for g in &review.golden {
                        println!(
                            "  {}: expects {} (tolerance {})",
                            g.name, g.expected, g.tolerance
                        );
                    }
                    println!("drift baseline ({} features):", review.baseline.len());
                    for f in &review.baseline {
                        let stats: Vec<String> =
                            f.stats.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
                        println!("  {} ({}, n {}): {}", f.name, f.kind, f.n, stats.join(", "));
                    }
                }
                match &d.running_release {
                    Some(running) if !d.diff.is_empty() => {
                        println!(
                            "changes from the running release {}:",
                            &running[..running.len().min(12)]
                        );
                        for c in &d.diff {
                            println!("  {}: {} -> {}", c.path, c.running, c.candidate);
                        }
                    }
                    Some(_) => println!("no differences from the running release"),
                    None => println!(
                        "channel {} runs no release rolled out by this console",
                        r.channel
                    ),
                }
                Ok(())
            }
            ReleaseAction::Download { release, out } => {
                let client = console.client()?;
                let id = resolve_release(&client, &release)?;
                let d = client.release(&id).map_err(refused("/api/releases"))?;
                let bytes = client
                    .bundle(&d.view.record.digest)
                    .map_err(refused("the bundle"))?;
                std::fs::write(&out, &bytes)
                    .with_context(|| format!("cannot write {}", out.display()))?;
                println!(
                    "wrote {} ({} bytes); check it (ferry verify), sign it (ferry approve {} --key KEY)                      and upload it (ferry-fleet releases approve {} --bundle {})",
                    out.display(),
                    bytes.len(),
                    out.display(),
                    &id[..12],
                    out.display()
                );
                Ok(())
            }
            ReleaseAction::Approve { release, bundle } => {
                let client = console.client()?;
                let id = resolve_release(&client, &release)?;
                let bytes = std::fs::read(&bundle)
                    .with_context(|| format!("cannot read {}", bundle.display()))?;
                let r = client
                    .approve_release(&id, &bytes)
                    .map_err(refused("the console refused the approval"))?;
                print_record(&r);
                println!(
                    "roll it out with `ferry-fleet rollout --release {}`",
                    &r.release[..12]
                );
                Ok(())
            }
            ReleaseAction::Reject { release, reason } => {
                let client = console.client()?;
                let id = resolve_release(&client, &release)?;
                let r = client
                    .reject_release(&id, &reason)
                    .map_err(refused("the console refused the rejection"))?;
                print_record(&r);
                Ok(())
            }
        }
    }
}

impl ReleasesCmd {
    fn run(self) -> Result<()> {
        if let Some(action) = self.action {
            return action.run(self.console);
        }
        let client = self.console.client()?;
        if self.next_sequence {
            let next = client
                .next_sequence(&self.channel)
                .map_err(refused("/api/releases/next-sequence"))?;
            println!("{next}");
            return Ok(());
        }
        let releases = client.releases().map_err(refused("/api/releases"))?;
        if self.json {
            println!("{}", serde_json::to_string(&releases)?);
            return Ok(());
        }
        if releases.is_empty() {
            println!("no releases");
            return Ok(());
        }
        println!(
            "{:<10} {:<20} {:>5}  {:<14} {:<17} {:<12} {:<12} {:>7}  LAST ROLLOUT",
            "RELEASE",
            "NAME VERSION",
            "SEQ",
            "CHANNEL",
            "STATUS",
            "SUBMITTED BY",
            "APPROVED BY",
            "RUNNING"
        );
        for r in &releases {
            let last = r
                .rollouts
                .last()
                .map(|o| format!("{} {}", o.id, o.phase))
                .unwrap_or_default();
            println!(
                "{:<10} {:<20} {:>5}  {:<14} {:<17} {:<12} {:<12} {:>7}  {}",
                &r.record.release[..r.record.release.len().min(8)],
                format!("{} {}", r.record.name, r.record.version),
                r.record.sequence,
                r.record.channel,
                r.record.status.name(),
                r.record.uploaded_by,
                r.record.approved_by.as_deref().unwrap_or("-"),
                r.running_on.len(),
                last
            );
        }
        Ok(())
    }
}

#[derive(Args)]
struct RolloutsCmd {
    #[command(subcommand)]
    action: Option<RolloutAction>,
    #[command(flatten)]
    console: ConsoleArgs,
    /// Print JSON: {"rollouts": [...], "audit": [...]}.
    #[arg(long)]
    json: bool,
}

/// An operator's decision on a running rollout.
#[derive(Subcommand)]
enum RolloutAction {
    /// No new installs and no promotion until resumed (the abort rules keep watching).
    Pause { rollout: String },
    /// Go on from where it was paused.
    Resume { rollout: String },
    /// Roll back every device that installed it, and end it aborted.
    Abort {
        rollout: String,
        /// Why (kept in the audit log and the rollout).
        #[arg(long)]
        reason: String,
    },
}

impl RolloutsCmd {
    fn run(self) -> Result<()> {
        let client = self.console.client()?;
        if let Some(action) = self.action {
            use ferry_fleet::rollouts::Control;
            let (id, control) = match action {
                RolloutAction::Pause { rollout } => (rollout, Control::Pause),
                RolloutAction::Resume { rollout } => (rollout, Control::Resume),
                RolloutAction::Abort { rollout, reason } => (rollout, Control::Abort { reason }),
            };
            let r = client
                .control_rollout(&id, &control)
                .map_err(refused("the console refused"))?;
            println!(
                "rollout {}: {} ({})",
                r.id,
                control.name(),
                ferry_fleet::rollouts::phase_name(&r.phase)
            );
            return Ok(());
        }
        let rollouts = client.rollouts().map_err(refused("/api/rollouts"))?;
        let audit = client.audit().map_err(refused("/api/audit"))?;
        if self.json {
            println!(
                "{}",
                serde_json::json!({"rollouts": rollouts, "audit": audit})
            );
            return Ok(());
        }
        if rollouts.is_empty() {
            println!("no rollouts");
            return Ok(());
        }
        println!(
            "{:<28} {:<10} {:<18} {:>8}  DETAIL",
            "ROLLOUT", "PHASE", "BUNDLE", "RUNNING"
        );
        for r in &rollouts {
            let running = r
                .targets
                .values()
                .filter(|t| matches!(t, Target::Running { .. }))
                .count();
            let detail = match &r.phase {
                Phase::Aborting { reason, .. } | Phase::Aborted { reason } => reason.as_str(),
                _ => "",
            };
            println!(
                "{:<28} {:<10} {:<18} {:>8}  {}",
                r.id,
                ferry_fleet::rollouts::phase_name(&r.phase),
                format!("{} {}", r.spec.bundle.name, r.spec.bundle.version),
                format!("{running}/{}", r.targets.len()),
                detail
            );
        }
        println!("\naudit trail:");
        for e in &audit {
            println!("  {} {} {} {}", e.ts_ms, e.rollout, e.operator, e.what);
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
        let client = self.console.client()?;
        if let Some(dir) = &self.export {
            return self.export(&client, dir);
        }
        let drift = client.fleet_drift().map_err(refused("/api/fleet-drift"))?;
        let retrain = client.retrain().map_err(refused("/api/retrain"))?;
        if self.json {
            println!(
                "{}",
                serde_json::json!({"fleet_drift": drift, "retrain": retrain})
            );
            return Ok(());
        }
        println!(
            "rule: {} (at least {} device(s)); {} device(s) with recent drift windows",
            retrain.rule, retrain.min_devices, drift.drift.devices
        );
        for f in &drift.drift.features {
            println!(
                "  {:<24} {:>5.1}%  {}",
                f.name,
                f.share * 100.0,
                f.devices.join(", ")
            );
        }
        if retrain.episodes.is_empty() {
            println!("no retraining episodes");
        }
        for e in &retrain.episodes {
            let features: Vec<&str> = e.features.iter().map(|f| f.name.as_str()).collect();
            let hook = serde_json::to_value(&e.hook)?;
            println!(
                "{} {} hook {} rows {} features {}",
                e.id,
                if e.ended_ms.is_none() {
                    "open "
                } else {
                    "ended"
                },
                hook["state"].as_str().unwrap_or("?"),
                e.rows,
                features.join(", ")
            );
        }
        Ok(())
    }

    fn export(&self, client: &Client, dir: &std::path::Path) -> Result<()> {
        let refusal = "the console refused the export";
        let mut request = client
            .retrain_request(self.devices.as_deref())
            .map_err(refused(refusal))?;
        // The CSV of exactly the devices the request names.
        let devices: Vec<String> = request.devices.iter().map(|d| d.device.clone()).collect();
        let (rows, csv) = client
            .retrain_export(&devices.join(","))
            .map_err(refused(refusal))?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let csv_path = dir.join("samples.csv");
        std::fs::write(&csv_path, &csv)
            .with_context(|| format!("cannot write {}", csv_path.display()))?;
        let csv_path = std::fs::canonicalize(&csv_path).unwrap_or(csv_path);
        request.rows = rows;
        request.samples_csv = csv_path.display().to_string();
        let request_path = dir.join("request.json");
        std::fs::write(&request_path, serde_json::to_vec_pretty(&request)?)
            .with_context(|| format!("cannot write {}", request_path.display()))?;
        if self.json {
            println!("{}", serde_json::to_string(&request)?);
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

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a token and print it (the only time it is shown).
    Create(TokenCreate),
    /// List the tokens (names, roles, who made them; never the tokens).
    List(TokenList),
    /// Revoke a holder's token: it and its dashboard sessions stop working.
    Revoke(TokenRevoke),
}

/// Where the tokens are: a running console (an admin token), or a stopped
/// console's state directory.
#[derive(Args)]
struct TokenWhere {
    /// Work on this state directory instead (the console must be stopped:
    /// one process at a time).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    #[command(flatten)]
    console: ConsoleArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl TokenWhere {
    /// Runs `local` on the state directory's tokens, or `remote` on the
    /// console's.
    fn run<T: serde::Serialize>(
        &self,
        local: impl FnOnce(&ferry_fleet::Auth) -> Result<T, ferry_fleet::AuthError>,
        remote: impl FnOnce(&Client) -> Result<T, ClientError>,
        print: impl FnOnce(&T),
    ) -> Result<()> {
        let out =
            match &self.state {
                Some(dir) => {
                    let store = ferry_fleet::Store::open(&dir.join(ferry_fleet::store::DIR))
                        .map_err(|e| match e {
                            ferry_fleet::StoreError::Locked { .. } => anyhow::anyhow!(
                                "{e} (a console runs on it: use its API instead, --console URL \
                             with an admin token)"
                            ),
                            e => e.into(),
                        })?;
                    local(&ferry_fleet::Auth::new(std::sync::Arc::new(store)))?
                }
                None => remote(&self.console.client()?).map_err(refused("the console refused"))?,
            };
        if self.json {
            println!("{}", serde_json::to_string(&out)?);
        } else {
            print(&out);
        }
        Ok(())
    }
}

#[derive(Args)]
struct TokenCreate {
    /// The holder (a person or a CI job): what the audit log records.
    #[arg(long)]
    name: String,
    /// viewer, operator, approver or admin.
    #[arg(long)]
    role: String,
    #[command(flatten)]
    at: TokenWhere,
}

impl TokenCreate {
    fn run(self) -> Result<()> {
        let role: ferry_fleet::Role = self.role.parse()?;
        self.at.run(
            |auth| auth.create(&self.name, role, "state directory", ferry_host::now_ms()),
            |client| client.create_token(&self.name, role.name()),
            |t| {
                println!("{}", t.token);
                eprintln!(
                    "token for {} ({}): shown once; keep it in a file only they can read",
                    t.name, t.role
                );
            },
        )
    }
}

#[derive(Args)]
struct TokenList {
    #[command(flatten)]
    at: TokenWhere,
}

impl TokenList {
    fn run(self) -> Result<()> {
        self.at.run(
            |auth| auth.list(),
            |client| client.tokens(),
            |all| {
                println!(
                    "{:<24} {:<9} {:<9} {:<24} STATE",
                    "NAME", "ROLE", "ID", "CREATED BY"
                );
                for t in all {
                    let state = match t.revoked_ms {
                        Some(ms) => format!("revoked at {ms}"),
                        None => "active".into(),
                    };
                    println!(
                        "{:<24} {:<9} {:<9} {:<24} {state}",
                        t.name, t.role, t.id, t.created_by
                    );
                }
            },
        )
    }
}

#[derive(Args)]
struct TokenRevoke {
    /// The holder whose token is revoked.
    name: String,
    #[command(flatten)]
    at: TokenWhere,
}

impl TokenRevoke {
    fn run(self) -> Result<()> {
        self.at.run(
            |auth| auth.revoke(&self.name, ferry_host::now_ms()),
            |client| client.revoke_token(&self.name),
            |t| println!("revoked {} ({})", t.name, t.role),
        )
    }
}

impl TokenCmd {
    fn run(self) -> Result<()> {
        match self {
            TokenCmd::Create(c) => c.run(),
            TokenCmd::List(c) => c.run(),
            TokenCmd::Revoke(c) => c.run(),
        }
    }
}

#[derive(Args)]
struct EnrolCmd {
    /// Devices to enrol (or with --remove, to remove).
    devices: Vec<String>,
    /// Remove these devices' enrolment instead.
    #[arg(long)]
    remove: bool,
    /// Print the enrolled devices and the devices refused.
    #[arg(long, conflicts_with = "remove")]
    list: bool,
    #[command(flatten)]
    console: ConsoleArgs,
    /// Print JSON (with --list).
    #[arg(long)]
    json: bool,
}

impl EnrolCmd {
    fn run(self) -> Result<()> {
        let client = self.console.client()?;
        for d in &self.devices {
            if self.remove {
                client.unenrol(d).map_err(refused("the console refused"))?;
                println!("removed {d}");
            } else {
                client.enrol(d).map_err(refused("the console refused"))?;
                println!("enrolled {d}");
            }
        }
        if self.list || self.devices.is_empty() {
            let e = client.enrolment().map_err(refused("the console refused"))?;
            if self.json {
                println!("{}", serde_json::to_string(&e)?);
                return Ok(());
            }
            println!(
                "enrolment {}",
                if e.required {
                    "required"
                } else {
                    "not required (serve --follow-unenrolled)"
                }
            );
            for d in &e.devices {
                println!("  enrolled {} (by {})", d.device, d.by);
            }
            for (d, n) in &e.not_enrolled {
                println!("  refused  {d}: {n} message(s)");
            }
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
            print!(
                "{}",
                ferry_fleet::text::status_table(&statuses, ferry_host::now_ms())
            );
        }
        Ok(())
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
        Cmd::Releases(c) => c.run(),
        Cmd::Retrain(c) => c.run(),
        Cmd::Token(c) => c.run(),
        Cmd::Enrol(c) => c.run(),
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
