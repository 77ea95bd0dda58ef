//! The local HTTP API (axum).
//!
//! - `POST /v1/predict`: the request forms of `ferry run` (JSON rows or
//!   tensors, CSV, PNG, JPEG, `.npy`, tensor sets) by `Content-Type`;
//!   answers the bundle's JSON, or the model's outputs as `.npy` or a tensor
//!   set when `Accept` asks for them (`ferry_runtime::ResponseForm`).
//! - `GET /v1/model`: the active bundle (name, version, digest, sequence, engine...).
//! - `GET /v1/drift`: the latest drift window of the active bundle.
//! - `GET /v1/status`: what the agent publishes as its MQTT status.
//! - `GET /healthz`: 200 while a bundle serves, 503 otherwise.
//! - `GET /metrics`: Prometheus text format.
//!
//! Every error is JSON `{"error": "...", "code": "..."}` with a 4xx status
//! when the request is at fault (400 bad input, 406 a response form the model
//! cannot give, 413 body over `http.max_body_bytes`, 415 missing content
//! type) and 5xx otherwise (500 the bundle failed, 503 no bundle or too
//! busy).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::agent::{Agent, PredictError};

struct Ctx {
    agent: Arc<Agent>,
    /// Bounds requests being processed; waiting ones queue in the runtime.
    permits: Semaphore,
}

/// The HTTP limits of the agent's API (`ferry_host::http`): headers within
/// 10 s, 30 s at most between pieces of a body, 60 s to answer, 256
/// connections (a quarter of the common 1,024-descriptor limit: the
/// buffer, bundles and MQTT need theirs; the oldest idle connection makes
/// room for a new one, so half-open connections cannot lock out a health
/// check).
pub const LIMITS: ferry_host::http::Limits = ferry_host::http::Limits {
    header_read_timeout: std::time::Duration::from_secs(10),
    body_read_timeout: std::time::Duration::from_secs(30),
    request_timeout: std::time::Duration::from_secs(60),
    max_connections: 256,
};

/// Serves the HTTP API on `listener` within [`LIMITS`] until `shutdown`
/// resolves, then stops taking connections and finishes the requests in
/// flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    ferry_host::http::serve(listener, router(agent), LIMITS, shutdown).await
}

/// The router, for [`serve`] (and for tests on `127.0.0.1:0`).
pub fn router(agent: Arc<Agent>) -> Router {
    let limit = agent.config.http.max_body_bytes;
    let permits = Semaphore::new(agent.config.http.max_concurrency);
    let ctx = Arc::new(Ctx { agent, permits });
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/model", get(model))
        .route("/v1/drift", get(drift))
        .route("/v1/status", get(status))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(ctx)
}

fn too_large(limit: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("request body is over the {limit}-byte limit (http.max_body_bytes)"),
    )
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": message.into(), "code": code})),
    )
        .into_response()
}

/// A body announced over the limit is read and discarded up to this many
/// times the limit before the 413 goes out, so a client still sending it
/// reads the answer rather than a broken pipe; beyond, the connection
/// closes after the answer.
const DISCARD_FACTOR: u64 = 4;

async fn predict(State(ctx): State<Arc<Ctx>>, request: axum::extract::Request) -> Response {
    let limit = ctx.agent.config.http.max_body_bytes;
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let announced: Option<u64> = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        ferry_host::http::discard_body(body, announced, DISCARD_FACTOR * limit as u64).await;
        return too_large(limit);
    }
    let body: Bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            // Over the limit without a Content-Length (chunked), or the
            // client stopped sending.
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<ferry_host::http::LengthLimitError>());
            if over {
                return too_large(limit);
            }
            return error(StatusCode::BAD_REQUEST, "bad_body", e.to_string());
        }
    };
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|v| !v.is_empty())
    else {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "no_content_type",
            "set Content-Type: application/json, text/csv, image/png, image/jpeg, \
             application/x-npy or application/x-ferry-tensors",
        );
    };
    if body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "empty_body",
            "request body is empty",
        );
    }
    let Ok(_permit) = ctx.permits.acquire().await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "shutting down",
        );
    };
    let agent = ctx.agent.clone();
    // The response form: JSON unless `Accept` asks for a binary one. The
    // header may be repeated (RFC 9110: the values form one list).
    let accepts: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let accept = (!accepts.is_empty()).then(|| accepts.join(", "));
    let result =
        tokio::task::spawn_blocking(move || agent.predict(&content_type, accept.as_deref(), &body))
            .await;
    let mut response = match result {
        Ok(Ok(p)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, p.form.media_type())],
            p.body,
        )
            .into_response(),
        Ok(Err(e)) => {
            let status = match &e {
                PredictError::NoBundle => StatusCode::SERVICE_UNAVAILABLE,
                PredictError::BadInput {
                    code: "not_acceptable",
                    ..
                } => StatusCode::NOT_ACCEPTABLE,
                PredictError::BadInput { .. } => StatusCode::BAD_REQUEST,
                PredictError::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, e.code(), e.to_string())
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "panic",
            format!("prediction task failed: {e}"),
        ),
    };
    // The answer's form, and a 406, depend on the request's `Accept`: caches
    // must key on it.
    response
        .headers_mut()
        .insert(header::VARY, header::HeaderValue::from_static("accept"));
    response
}

async fn model(State(ctx): State<Arc<Ctx>>) -> Response {
    let Some(active) = ctx.agent.active() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_bundle",
            "no model is loaded",
        );
    };
    let m = active.session.manifest();
    let b = &active.bundle;
    axum::Json(json!({
        "name": b.name,
        "version": b.version,
        "digest": b.digest,
        "sequence": b.sequence,
        "fleet": b.fleet,
        "channel": b.channel,
        "description": m.description,
        "activated_ms": active.activated_ms,
        "precompiled_guest": active.session.used_precompiled_guest(),
        // The engine serving (and the one the golden examples ran on).
        "engine": active.session.engine().name(),
        // How it was chosen: `only` (one could serve), `measured` (auto, on
        // this load), `remembered` (auto, measured on an earlier load of
        // this release on this device).
        "engine_decision": active.session.engine_decision().name(),
        "guest_target": active.session.guest_target(),
        "inputs": m.model.inputs,
        "outputs": m.model.outputs,
        "previous": ctx.agent.previous_bundle(),
        "update": ctx.agent.update_state(),
    }))
    .into_response()
}

async fn drift(State(ctx): State<Arc<Ctx>>) -> Response {
    match ctx.agent.latest_drift() {
        Some(r) => axum::Json(r).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no_drift_report",
            "no drift window has closed yet (or the bundle has no baseline)",
        ),
    }
}

async fn status(State(ctx): State<Arc<Ctx>>) -> Response {
    axum::Json(ctx.agent.status()).into_response()
}

async fn healthz(State(ctx): State<Arc<Ctx>>) -> Response {
    match ctx.agent.active_bundle() {
        Some(b) => axum::Json(json!({"status": "ok", "bundle": b.version})).into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_bundle",
            "no model is loaded",
        ),
    }
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctx.agent.metrics_text(),
    )
        .into_response()
}
