//! The dashboard and the JSON API behind it: devices, drift, events, the
//! live stream.
//!
//! # Routes
//! | route | answer |
//! |---|---|
//! | `GET /` | the dashboard (`dashboard/index.html`, its CSS and JS at `/dashboard.css`, `/dashboard.js`) |
//! | `GET /api/devices` | [`Fleet`]: counts and every device as a [`DeviceView`], sorted by id |
//! | `GET /api/devices/{id}` | one [`DeviceView`]; 404 `{"error": ...}` for an unknown device |
//! | `GET /api/drift?device=&limit=` | [`DriftPoint`]s, oldest first: the last `limit` windows *of each device* (default [`DEFAULT_DRIFT_WINDOWS`]) |
//! | `GET /api/events?device=&limit=` | [`DeviceEvent`]s, oldest first: the last `limit` (default [`DEFAULT_EVENTS`]) |
//! | `GET /api/stream` | server-sent events: `event: change` with a [`Change`] as JSON data; `event: resync` when this client fell behind and should re-read everything; a comment every [`KEEP_ALIVE`]; at most [`MAX_STREAMS`] at once (503 `too_many_streams` beyond) |
//! | `GET /healthz` | `ok` |
//!
//! `limit` is capped at [`MAX_LIMIT`]; an empty `device=` means every device.
//!
//! # Extending
//! [`router`] returns a `Router` whose state is already applied, so other
//! parts of the console add their routes with `router(store).merge(...)`.
//! Their live changes reach `/api/stream` either through the store
//! (`Store::notify`, which rollouts use) or, from a channel of their own,
//! through [`router_with`] (a list of functions returning a
//! `broadcast::Receiver<Change>`).
//! The page reads `GET /api/rollouts` (a JSON list) when it exists and says
//! "no rollouts" when it answers 404.
//!
//! # Shutdown
//! An SSE response never ends by itself: a graceful shutdown that waits for
//! open connections would wait for every open dashboard. The streams end
//! when the stop token given to `http::console_router` is
//! cancelled; `run` also bounds the wait with a timeout.
//!
//! # Invariants
//! The page is self-contained (no CDN, fonts or scripts from elsewhere: it
//! runs on an air-gapped plant network), and the `Content-Security-Policy`
//! sent with it lets the browser load nothing from any other origin.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferry_host::now_ms;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::ApiError;
use crate::model::{Change, DeviceEvent, DeviceState, DriftPoint, Rate};
use crate::store::Store;

/// The window the table's request and error rates are computed over: long
/// enough to smooth a quiet device's minute-to-minute noise, short enough
/// that a failing update shows within minutes.
pub const RATE_WINDOW_MS: u64 = 5 * 60_000;
/// Drift windows per device the heat map shows by default.
pub const DEFAULT_DRIFT_WINDOWS: usize = 12;
/// Events the list shows by default.
pub const DEFAULT_EVENTS: usize = 50;
/// Largest `limit` of a history query: keeps one answer to a few MB even
/// for a large fleet (the store keeps 200 drift windows per device anyway).
pub const MAX_LIMIT: usize = 1000;
/// Interval of SSE keep-alive comments: under the 30 to 60 s idle timeouts
/// of common proxies, and how soon a gone client's stream is noticed.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Bytes of SSE text buffered per client before its stream waits (and the
/// change channel behind it lags, which sends `resync`).
const STREAM_BUFFER: usize = 64 * 1024;
/// Changes queued per SSE client between the change sources and its stream.
const STREAM_QUEUE: usize = 256;
/// How long the browser waits before reconnecting a dropped stream.
const RETRY_MS: u64 = 3000;
/// Event streams open at once: each holds a connection for as long as its
/// page is open, so they are capped well under the connection cap
/// (`http::LIMITS`); one more answers 503 `too_many_streams` (the page
/// then polls).
pub const MAX_STREAMS: usize = 100;

const INDEX_HTML: &str = include_str!("../dashboard/index.html");
const DASHBOARD_CSS: &str = include_str!("../dashboard/dashboard.css");
const DASHBOARD_JS: &str = include_str!("../dashboard/dashboard.js");

/// Nothing but this origin: the page must work without any network but the
/// console's (and any injected content cannot call out).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// A source of live changes besides the store (the rollouts, for
/// example): called once per `/api/stream` client.
pub type ChangeSource = Arc<dyn Fn() -> broadcast::Receiver<Change> + Send + Sync>;

struct App {
    store: Arc<Store>,
    sources: Vec<ChangeSource>,
    /// One permit per open event stream.
    streams: Arc<tokio::sync::Semaphore>,
    /// Ends every open `/api/stream` when cancelled (shutdown).
    stop: CancellationToken,
}

/// The dashboard and its API over `store`, streaming the store's changes.
pub fn router(store: Arc<Store>) -> Router {
    router_with(store, Vec::new())
}

/// [`router`], also streaming the changes of `sources` on `/api/stream`.
pub fn router_with(store: Arc<Store>, sources: Vec<ChangeSource>) -> Router {
    routes(store, sources, CancellationToken::new())
}

/// The dashboard's routes; open event streams end when `stop` is cancelled.
pub(super) fn routes(
    store: Arc<Store>,
    sources: Vec<ChangeSource>,
    stop: CancellationToken,
) -> Router {
    let app = Arc::new(App {
        store,
        sources,
        streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        stop,
    });
    Router::new()
        .route("/", get(index))
        .route("/dashboard.css", get(css))
        .route("/dashboard.js", get(js))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/devices", get(devices))
        .route("/api/devices/{id}", get(device))
        .route("/api/drift", get(drift))
        .route("/api/events", get(events))
        .route("/api/stream", get(stream))
        .with_state(app)
}

/// What `GET /api/devices` answers.
#[derive(Debug, Clone, Serialize)]
pub struct Fleet {
    /// The console's clock (Unix ms) when it answered; the page draws rate
    /// buckets relative to it, not to the browser's clock.
    pub now_ms: u64,
    /// Fleet names the devices report (one, normally).
    pub fleets: Vec<String>,
    pub counts: Counts,
    pub devices: Vec<DeviceView>,
}

/// The header's numbers.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    pub devices: usize,
    pub online: usize,
    /// Devices whose latest drift window has a drifted feature.
    pub drifting: usize,
}

/// A device as the API shows it: its stored state and what is computed
/// from it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    #[serde(flatten)]
    pub state: DeviceState,
    /// Requests per minute and error rate over the last [`RATE_WINDOW_MS`].
    pub rate: Rate,
    /// Features over their threshold in the latest drift window.
    pub drifted_features: Vec<String>,
    /// Seconds since the device's latest message (`null`: never heard of).
    pub last_seen_s: Option<f64>,
}

impl DeviceView {
    pub fn new(state: DeviceState, now_ms: u64) -> DeviceView {
        DeviceView {
            rate: state.rate(now_ms, RATE_WINDOW_MS),
            drifted_features: state.drifted_features(),
            last_seen_s: (state.last_seen_ms > 0)
                .then(|| now_ms.saturating_sub(state.last_seen_ms) as f64 / 1000.0),
            state,
        }
    }
}

impl Fleet {
    pub fn new(devices: Vec<DeviceState>, now_ms: u64) -> Fleet {
        let devices: Vec<DeviceView> = devices
            .into_iter()
            .map(|d| DeviceView::new(d, now_ms))
            .collect();
        let mut fleets: Vec<String> = devices.iter().map(|d| d.state.fleet.clone()).collect();
        fleets.sort();
        fleets.dedup();
        fleets.retain(|f| !f.is_empty());
        let counts = Counts {
            devices: devices.len(),
            online: devices.iter().filter(|d| d.state.online).count(),
            drifting: devices
                .iter()
                .filter(|d| !d.drifted_features.is_empty())
                .count(),
        };
        Fleet {
            now_ms,
            fleets,
            counts,
            devices,
        }
    }
}

/// `?device=&limit=` of the history routes.
#[derive(Debug, Default, Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

impl HistoryQuery {
    fn device(&self) -> Option<&str> {
        self.device.as_deref().filter(|d| !d.is_empty())
    }

    fn limit(&self, default: usize) -> usize {
        self.limit.unwrap_or(default).min(MAX_LIMIT)
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    // Served from the binary: a new console version must not meet a
    // browser's stale copy.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn index() -> Response {
    let mut r = asset("text/html; charset=utf-8", INDEX_HTML);
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

/// Runs a store read off the async workers (sled reads may touch disk).
async fn read<T: Send + 'static>(
    app: &Arc<App>,
    f: impl FnOnce(&Store) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let store = app.store.clone();
    super::blocking(move || Ok(f(&store))).await
}

async fn devices(State(app): State<Arc<App>>) -> Result<axum::Json<Fleet>, ApiError> {
    let devices = read(&app, |s| s.devices()).await?;
    Ok(axum::Json(Fleet::new(devices, now_ms())))
}

async fn device(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<axum::Json<DeviceView>, ApiError> {
    let lookup = id.clone();
    match read(&app, move |s| s.device(&lookup)).await? {
        Some(d) => Ok(axum::Json(DeviceView::new(d, now_ms()))),
        None => Err(ApiError::not_found(format!("no device {id:?}"))),
    }
}

async fn drift(
    State(app): State<Arc<App>>,
    Query(q): Query<HistoryQuery>,
) -> Result<axum::Json<Vec<DriftPoint>>, ApiError> {
    let limit = q.limit(DEFAULT_DRIFT_WINDOWS);
    let device = q.device().map(str::to_string);
    let points = read(&app, move |s| -> Vec<DriftPoint> {
        match device {
            Some(d) => s.drift_history(Some(&d), limit),
            // Per device: a chatty device must not push the others' windows
            // out of the heat map.
            None => s
                .devices()
                .iter()
                .flat_map(|d| s.drift_history(Some(&d.device), limit))
                .collect(),
        }
    })
    .await?;
    Ok(axum::Json(points))
}

async fn events(
    State(app): State<Arc<App>>,
    Query(q): Query<HistoryQuery>,
) -> Result<axum::Json<Vec<DeviceEvent>>, ApiError> {
    let limit = q.limit(DEFAULT_EVENTS);
    let device = q.device().map(str::to_string);
    let events = read(&app, move |s| -> Vec<DeviceEvent> {
        s.events(device.as_deref(), limit)
    })
    .await?;
    Ok(axum::Json(events))
}

/// What a change source sends one SSE client.
enum Live {
    Change(Change),
    /// Wakes the client's pump after a loss (see `Client::missed`).
    Missed,
}

/// One SSE client's side of the change sources.
#[derive(Clone)]
struct Client {
    queue: mpsc::Sender<Live>,
    /// Set when a change for this client was dropped (a source lagged or
    /// the queue was full): the pump then sends one `resync` instead of
    /// pretending the stream is complete.
    missed: Arc<AtomicBool>,
}

async fn stream(State(app): State<Arc<App>>) -> Response {
    let Ok(permit) = app.streams.clone().try_acquire_owned() else {
        let mut r = ApiError::unavailable(
            "too_many_streams",
            format!("{MAX_STREAMS} event streams are open already; poll the API instead"),
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
        return r;
    };
    let (queue, rx) = mpsc::channel(STREAM_QUEUE);
    let client = Client {
        queue,
        missed: Arc::new(AtomicBool::new(false)),
    };
    let receivers =
        std::iter::once(app.store.subscribe()).chain(app.sources.iter().map(|source| source()));
    for receiver in receivers {
        tokio::spawn(forward(receiver, client.clone()));
    }
    // The body streams what `pump` writes into a pipe: no stream adapter
    // crate needed (tokio-util's `codec`, which rumqttc needs too), and a
    // client that reads slowly makes `pump` wait.
    let (reader, writer) = tokio::io::duplex(STREAM_BUFFER);
    tokio::spawn(async move {
        pump(rx, client.missed, writer, app.stop.clone()).await;
        drop(permit);
    });
    let body = Body::from_stream(tokio_util::codec::FramedRead::new(
        reader,
        tokio_util::codec::BytesCodec::new(),
    ));
    let mut r = ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies that buffer (nginx) would hold the events back.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Moves one source's changes to one client until either side goes away.
async fn forward(mut changes: broadcast::Receiver<Change>, client: Client) {
    loop {
        let live = tokio::select! {
            received = changes.recv() => match received {
                Ok(change) => Live::Change(change),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    client.missed.store(true, Ordering::SeqCst);
                    Live::Missed
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = client.queue.closed() => return,
        };
        match client.queue.try_send(live) {
            Ok(()) => {}
            // The client is behind: its pump has a queue to work through
            // and sees the flag after the next item.
            Err(mpsc::error::TrySendError::Full(_)) => client.missed.store(true, Ordering::SeqCst),
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// Writes one client's SSE text until the client goes away (a write fails:
/// noticed at the latest by the next keep-alive).
async fn pump(
    mut queue: mpsc::Receiver<Live>,
    missed: Arc<AtomicBool>,
    mut out: tokio::io::DuplexStream,
    stop: CancellationToken,
) {
    let mut text = format!("retry: {RETRY_MS}\n: ferry-fleet\n\n");
    let start = tokio::time::Instant::now() + KEEP_ALIVE;
    let mut keep_alive = tokio::time::interval_at(start, KEEP_ALIVE);
    loop {
        if missed.swap(false, Ordering::SeqCst) {
            // One `resync` replaces everything queued so far.
            while queue.try_recv().is_ok() {}
            text += &sse_event("resync", &serde_json::json!({}));
        }
        if !text.is_empty() && out.write_all(text.as_bytes()).await.is_err() {
            return;
        }
        text = tokio::select! {
            live = queue.recv() => match live {
                Some(Live::Change(change)) => sse_event("change", &change),
                Some(Live::Missed) => String::new(),
                None => return,
            },
            _ = keep_alive.tick() => ": keep-alive\n\n".to_string(),
            // Shutdown: the stream ends, so the connection can close.
            () = stop.cancelled() => return,
        };
    }
}

fn sse_event(name: &str, data: &impl Serialize) -> String {
    // serde_json writes no newline, so the data is one `data:` line.
    let json = serde_json::to_string(data).unwrap_or_else(|_| "{}".into());
    format!("event: {name}\ndata: {json}\n\n")
}
