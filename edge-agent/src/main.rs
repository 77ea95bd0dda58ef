//! `ferry-agent`: the on-device daemon. Thin: parses the command line, sets
//! up logging, and runs the agent's tasks until SIGTERM (see the library's
//! `agent` module for what they do).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ferry_agent::agent::Agent;
use ferry_agent::config::{Config, DEFAULT_CONFIG};
use ferry_agent::mqtt::Reporter;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "Ferry's on-device agent: local predictions, signed updates, telemetry, drift, MQTT"
)]
struct Cli {
    /// Configuration file (`ferry-agent init` writes a commented default).
    #[arg(
        short,
        long,
        global = true,
        env = "FERRY_AGENT_CONFIG",
        default_value = "/etc/ferry/agent.toml"
    )]
    config: PathBuf,
    /// Log format (default: json when stderr is not a terminal, as under systemd).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Write a commented default configuration.
    Init {
        /// Where to write it.
        #[arg(short, long, default_value = "agent.toml")]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Check the configuration file and exit.
    CheckConfig,
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any thread (the tokio runtime's included) starts.
    unsafe { ferry_runtime::keep_onnxruntime_telemetry_off() };
    let cli = Cli::parse();
    init_logging(cli.log_format);
    ferry_runtime::quiet_caught_panics(|panic| {
        tracing::warn!(
            panic,
            "The engine panicked: that request failed, the model keeps serving"
        );
    });
    let result = match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Init { out, force } => init(&out, force),
        Cmd::CheckConfig => check_config(&cli.config),
        Cmd::Run => run(&cli.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "Agent stopped");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: Option<LogFormat>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// The configuration parses and makes sense, and the root of trust it names
/// (or the keys it derives one from) loads: what `run` would refuse at start.
fn check_config(path: &std::path::Path) -> Result<()> {
    let config = Config::load(path)?;
    let roots = ferry_agent::trust::Roots::open(&config)?;
    let root = roots.current();
    let roles: Vec<String> = root
        .document()
        .roles
        .iter()
        .map(|(name, r)| format!("{name} {} of {}", r.threshold, r.keys.len()))
        .collect();
    eprintln!(
        "{}: ok (root of trust version {}{}: {})",
        path.display(),
        root.version(),
        if root.is_legacy() {
            ", derived from paths.trusted_keys"
        } else {
            ""
        },
        roles.join(", ")
    );
    Ok(())
}

fn init(out: &std::path::Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!("{} exists (use --force to overwrite)", out.display());
    }
    std::fs::write(out, DEFAULT_CONFIG)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "wrote {}: set device.id, device.fleet and paths.root (or paths.trusted_keys), then run `ferry-agent --config {}`",
        out.display(),
        out.display()
    );
    Ok(())
}

fn run(config_path: &std::path::Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // Inference runs on the blocking pool; two async workers are plenty
        // for HTTP and MQTT on a small device.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(serve(config));
    // The buffer is flushed and the tasks have stopped; a blocking download
    // waiting on a silent server (up to its read timeout) must not hold the
    // exit: it is resumable from its partial file.
    runtime.shutdown_timeout(Duration::from_secs(2));
    outcome
}

async fn serve(config: Config) -> Result<()> {
    // Installed before anything is served: a SIGTERM that arrives while the
    // agent starts must take the orderly path (flush, offline status), not
    // the default action, which kills the process on the spot.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    let agent = tokio::task::spawn_blocking(move || Agent::open(config))
        .await
        .context("agent start panicked")??;
    ferry_agent::agent::release_freed_heap();
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    // HTTP.
    let listener = tokio::net::TcpListener::bind(agent.config.http.listen)
        .await
        .with_context(|| format!("cannot listen on {}", agent.config.http.listen))?;
    let addr = listener.local_addr()?;
    let stop = shutdown.clone();
    let http_agent = agent.clone();
    tasks.spawn(async move {
        ferry_agent::server::serve(listener, http_agent, async move { stop.cancelled().await })
            .await
            .context("HTTP server failed")
    });
    tracing::info!(%addr, "HTTP API listening");

    // MQTT.
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::channel(32);
    if !agent.config.mqtt.url.is_empty() {
        let reporter = Reporter::new(
            &agent.config.mqtt,
            agent.identity.clone(),
            agent.buffer.clone(),
            agent.mqtt_stats.clone(),
        )?;
        let status = agent.status_receiver();
        let stop = shutdown.clone();
        tasks.spawn(async move { reporter.run(status, cmd_tx, stop).await });
    } else {
        tracing::warn!("mqtt.url is empty: telemetry stays in the local buffer");
        drop(cmd_tx);
    }

    // Commands: admitted one at a time, in order (signatures, replays);
    // each admitted one runs in a task of its own, so a rollback is admitted
    // (and pre-empts a download) while an install is still downloading.
    let a = agent.clone();
    let stop = shutdown.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                cmd = cmd_rx.recv() => match cmd {
                    Some(cmd) => {
                        if let Some(admitted) = a.admit(cmd) {
                            let a = a.clone();
                            tokio::spawn(async move { a.execute(admitted).await });
                        }
                    }
                    None => stop.cancelled().await,
                },
            }
        }
        Ok(())
    });

    // Update polling.
    if !agent.config.updates.source.is_empty() {
        let a = agent.clone();
        let stop = shutdown.clone();
        let every = agent.config.poll_interval();
        tasks.spawn(async move {
            let mut interval = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = interval.tick() => {
                        if let Err(e) = a.check_updates(None).await {
                            tracing::warn!(error = %format!("{e:#}"), "Update check failed");
                        }
                    }
                }
            }
            Ok(())
        });
    }

    // Once a second: drift windows by time, probation, status; systemd watchdog.
    let a = agent.clone();
    let stop = shutdown.clone();
    // Pinged every second: systemd units should give WatchdogSec of 2 s or more.
    let watchdog = sd_watchdog_interval();
    if let Some(timeout) = watchdog.filter(|t| *t < Duration::from_secs(2)) {
        tracing::warn!(
            ?timeout,
            "The systemd watchdog timeout is under 2 s; pings come every second"
        );
    }
    tasks.spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u64;
        let status_every = a.config.mqtt.status_interval_s.max(1);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = interval.tick() => {
                    let agent = a.clone();
                    // Probation verdicts may roll back (blocking work).
                    let _ = tokio::task::spawn_blocking(move || agent.tick()).await;
                    ticks += 1;
                    if ticks.is_multiple_of(status_every) {
                        a.refresh_status();
                    }
                    if watchdog.is_some() {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    }
                }
            }
        }
        Ok(())
    });

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(device = %agent.identity.device, fleet = %agent.identity.fleet, "Agent ready");

    // Run until a signal, or until a task fails.
    let outcome = tokio::select! {
        _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
        Some(r) = tasks.join_next() => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!("a task panicked: {e}")),
        },
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    agent.begin_shutdown();
    shutdown.cancel();
    // Give the tasks (the MQTT task publishes an offline status and waits for
    // in-flight acknowledgements) a bounded time to finish.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("Tasks did not stop within 10 s");
    }
    let buffer = agent.buffer.clone();
    match tokio::task::spawn_blocking(move || buffer.flush()).await {
        Ok(Ok(())) => tracing::info!("Buffer flushed"),
        Ok(Err(e)) => tracing::error!(error = %e, "Buffer flush failed"),
        Err(e) => tracing::error!(error = %e, "Buffer flush panicked"),
    }
    drop(Arc::clone(&agent));
    outcome
}

/// systemd's watchdog timeout when it asked for pings (WATCHDOG_USEC), with
/// libsystemd's rule: WATCHDOG_PID, when set, must be this process. (The
/// sd-notify crate also requires WATCHDOG_PID to be set, which is stricter
/// than systemd.)
fn sd_watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => (usec > 0).then(|| Duration::from_micros(usec)),
    }
}
