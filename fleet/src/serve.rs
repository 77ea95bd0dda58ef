//! The whole console, assembled once: [`run`] is what `ferry-fleet serve`
//! does, and what the tests start.
//!
//! # What `run` does, in order
//! 1. starts the embedded broker when asked (it accepts connections before
//!    the console connects to it);
//! 2. opens the store in `<state>/store` (off the async workers), and
//!    the first time, writes the first admin token to
//!    `<state>/admin.token` (`auth`; the log names the file);
//! 3. starts following the fleet over MQTT (`ingest::Console`);
//! 4. with trusted keys, opens the rollouts (`<state>/rollouts`,
//!    `<state>/bundles`) and steps them every [`TICK`];
//! 5. opens the retraining loop (`<state>/retrain`) and evaluates it every
//!    [`TICK`] on the blocking pool (a hook blocks its tick);
//! 6. serves the dashboard, the API and the bundle downloads on the
//!    listener, behind authentication (`http::auth`);
//! 7. when `shutdown` resolves: stops the loops, ends the open event
//!    streams and waits for open responses up to [`HTTP_GRACE`], leaves the
//!    MQTT session with a DISCONNECT (the broker keeps queueing) and
//!    flushes the store, then returns.
//!
//! A retraining hook still running at shutdown is not waited for (its
//! episode is recorded as interrupted at the next start); the binary ends
//! its runtime with a timeout for that reason.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_format::{SecretKey, TrustPolicy};
use ferry_host::now_ms;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::broker::{BrokerError, EmbeddedBroker};
use crate::ingest::{Console, IngestOptions};
use crate::retrain::{self, RetrainError, Retrainer};
use crate::rollouts::{CommandSink, RolloutError, Rollouts};
use crate::store::{self, Store, StoreError};

/// How long a stopping console waits for open HTTP responses before it
/// closes them.
pub const HTTP_GRACE: Duration = Duration::from_secs(3);

/// How often rollouts are stepped and the retraining rule is evaluated.
pub const TICK: Duration = Duration::from_secs(1);

/// What the console needs to run (what `ferry-fleet serve`'s arguments
/// say, parsed and checked).
pub struct ServeConfig {
    /// The state directory (`--state`): `store/`, `rollouts/`, `bundles/`,
    /// `retrain/`.
    pub state: PathBuf,
    /// Where the dashboard and the API listen, bound by the caller (who
    /// then knows the address, even of port 0).
    pub listener: std::net::TcpListener,
    /// The MQTT connection.
    pub mqtt: IngestOptions,
    /// Start an embedded broker (no authentication) on this address first;
    /// `mqtt.broker` should then point at it ([`EmbeddedBroker::url_of`]).
    pub embedded_broker: Option<SocketAddr>,
    /// Rollouts, when the console has trusted keys; `None`: rollouts off.
    pub rollouts: Option<RolloutsConfig>,
    /// The retraining loop.
    pub retrain: retrain::Options,
    /// Follow only the devices an admin enrolled (`serve` does unless
    /// `--follow-unenrolled`).
    pub require_enrolment: bool,
    /// Mark the session cookie `Secure` (`--secure-cookies`: browsers reach
    /// the console over HTTPS, through a TLS-terminating proxy).
    pub secure_cookies: bool,
}

/// The rollouts' settings (`--trust`, `--key`, `--public-url`).
pub struct RolloutsConfig {
    /// Keys a bundle must be signed with (the devices' trusted keys).
    pub trust: TrustPolicy,
    /// The operator key commands are signed with (rollbacks need it).
    pub key: Option<SecretKey>,
    /// Base URL devices download bundles from; default `http://<listener's
    /// address>`.
    pub public_url: Option<String>,
}

/// Why the console could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The embedded broker did not start.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The state could not be opened (in use, unknown layout, damaged).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The MQTT settings are not valid.
    #[error("{0:#}")]
    Mqtt(anyhow::Error),
    /// The rollouts' state could not be opened.
    #[error(transparent)]
    Rollouts(#[from] RolloutError),
    /// The retraining state could not be opened.
    #[error(transparent)]
    Retrain(#[from] RetrainError),
    /// The listener cannot be used, or the HTTP server failed.
    #[error("the HTTP server: {0}")]
    Http(#[source] std::io::Error),
    /// The HTTP server ended without being asked to.
    #[error("the HTTP server stopped unexpectedly")]
    HttpStopped,
    /// The first admin token could not be made.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// A start-up step panicked.
    #[error("{0} panicked")]
    Panicked(&'static str),
}

impl ServeError {
    /// A stable code for logs.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::Broker(e) => e.code(),
            ServeError::Store(e) => e.code(),
            ServeError::Mqtt(_) => "mqtt",
            ServeError::Rollouts(e) => e.code(),
            ServeError::Retrain(e) => e.code(),
            ServeError::Auth(e) => e.code(),
            ServeError::Http(_) => "http",
            ServeError::HttpStopped => "http_stopped",
            ServeError::Panicked(_) => "panicked",
        }
    }
}

/// Runs the console until `shutdown` resolves (see the module header).
/// Needs a multi-threaded tokio runtime.
pub async fn run(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    run_notify(config, shutdown, |_| {}).await
}

/// [`run`], calling `ready` with the dashboard's address once everything is
/// started and the HTTP server accepts requests (the CLI prints the URL
/// then, so scripts waiting for it never race the start).
pub async fn run_notify(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), ServeError> {
    let ServeConfig {
        state,
        listener,
        mqtt,
        embedded_broker,
        rollouts,
        retrain,
        require_enrolment,
        secure_cookies,
    } = config;
    // The embedded broker accepts connections before the console connects.
    let _broker = match embedded_broker {
        Some(addr) => Some(
            tokio::task::spawn_blocking(move || EmbeddedBroker::start(addr))
                .await
                .map_err(|_| ServeError::Panicked("starting the embedded broker"))??,
        ),
        None => None,
    };
    let path = state.join(store::DIR);
    let store = Arc::new(
        tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .map_err(|_| ServeError::Panicked("opening the state"))??,
    );
    tracing::info!(state = %state.display(), devices = store.devices().len(), "State opened");
    store.set_require_enrolment(require_enrolment);
    let auth = Arc::new(Auth::new(store.clone()));
    {
        let (auth, state) = (auth.clone(), state.clone());
        let first = tokio::task::spawn_blocking(move || auth.bootstrap(&state, now_ms()))
            .await
            .map_err(|_| ServeError::Panicked("making the first admin token"))??;
        if let Some(path) = first {
            tracing::warn!(
                path = %path.display(),
                "Wrote the first admin token (mode 0600); keep it safe, it gives full control"
            );
        }
    }
    let console = Arc::new(Console::start(&mqtt, store.clone()).map_err(ServeError::Mqtt)?);

    // From here on, a failure stops what was started.
    let started = async {
        listener.set_nonblocking(true).map_err(ServeError::Http)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(ServeError::Http)?;
        let addr = listener.local_addr().map_err(ServeError::Http)?;
        let rollouts = match rollouts {
            Some(c) => {
                let public_url = c.public_url.unwrap_or_else(|| format!("http://{addr}"));
                if c.key.is_none() {
                    tracing::warn!(
                        "No --key: rollouts cannot sign rollbacks and will refuse to start"
                    );
                }
                let sink: Arc<dyn CommandSink> = console.clone();
                let r = Rollouts::open(
                    &state,
                    &mqtt.fleet,
                    &public_url,
                    c.trust,
                    c.key,
                    store.clone(),
                    sink,
                )?;
                tracing::info!(%public_url, "Rollouts enabled");
                Some(Arc::new(r))
            }
            None => {
                tracing::warn!("No --trust keys: rollouts are off");
                None
            }
        };
        let retrainer = Arc::new(Retrainer::open(&state, store.clone(), retrain)?);
        Ok::<_, ServeError>((listener, addr, rollouts, retrainer))
    }
    .await;
    let (listener, addr, rollouts, retrainer) = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = console.stop().await;
            return Err(e);
        }
    };
    let mut loops = Vec::new();
    if let Some(rollouts) = rollouts.clone() {
        loops.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            loop {
                every.tick().await;
                if let Err(error) = rollouts.tick(now_ms()).await {
                    tracing::error!(%error, code = error.code(), "Rollout step failed");
                }
            }
        }));
    }
    loops.push(tokio::spawn({
        let retrainer = retrainer.clone();
        async move {
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let r = retrainer.clone();
                match tokio::task::spawn_blocking(move || r.tick(now_ms())).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::error!(%error, code = error.code(), "Retraining step failed")
                    }
                    Err(error) => tracing::error!(%error, "Retraining step panicked"),
                }
            }
        }
    }));

    let stop = CancellationToken::new();
    let cookies = crate::http::CookiePolicy {
        secure: secure_cookies,
    };
    let router = crate::http::console_router(
        store.clone(),
        rollouts,
        retrainer,
        auth,
        cookies,
        stop.child_token(),
    );
    let mut http = tokio::spawn(crate::http::serve(
        listener,
        router,
        stop.clone(),
        HTTP_GRACE,
    ));
    tracing::info!(%addr, broker = %mqtt.broker, fleet = %mqtt.fleet, "Serving the dashboard");
    ready(addr);

    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        ended = &mut http => Err(match ended {
            Ok(Ok(())) => ServeError::HttpStopped,
            Ok(Err(e)) => ServeError::Http(e),
            Err(_) => ServeError::Panicked("the HTTP server"),
        }),
    };
    for task in &loops {
        task.abort();
    }
    for task in loops {
        let _ = task.await;
    }
    stop.cancel();
    if outcome.is_ok() {
        match http.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "The HTTP server failed while stopping"),
            Err(error) => tracing::warn!(%error, "The HTTP server panicked while stopping"),
        }
    }
    let flushed = console.stop().await;
    drop(console);
    outcome?;
    flushed?;
    tracing::info!("Stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_of_an_unknown_layout_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(&dir.path().join(store::DIR))
            .unwrap()
            .set_layout_version(store::LAYOUT_VERSION + 1);
        let config = ServeConfig {
            state: dir.path().to_path_buf(),
            listener: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            // Never reached: the store is refused first.
            mqtt: IngestOptions::new("mqtt://127.0.0.1:9", "plant"),
            embedded_broker: None,
            rollouts: None,
            retrain: retrain::Options::default(),
            require_enrolment: false,
            secure_cookies: false,
        };
        let e = run(config, std::future::pending()).await.unwrap_err();
        assert_eq!(e.code(), "unknown_layout", "{e}");
        assert!(
            matches!(e, ServeError::Store(StoreError::UnknownLayout { .. })),
            "{e:?}"
        );
    }
}
