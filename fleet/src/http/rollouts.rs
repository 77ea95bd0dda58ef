//! The rollouts' routes: `POST /api/rollouts` (query: [`NewRollout`],
//! body: the bundle, or none with `release=<id>` for an approved release of
//! the registry; `allow_downgrade=true` needs an admin),
//! `GET /api/rollouts`, `GET /api/rollouts/{id}`,
//! `POST /api/rollouts/{id}/pause|resume|abort` (`{"reason"}` for an
//! abort), `GET /api/audit`, the
//! release registry (`GET /api/releases`, `POST /api/releases` to submit a
//! bundle, `GET /api/releases/{id}` with its review and diff,
//! `POST /api/releases/{id}/approve` with the approver-signed bundle,
//! `POST /api/releases/{id}/reject` with `{"reason"}`,
//! `GET /api/releases/next-sequence?channel=C`), and
//! `GET /bundles/{digest}.ferry`, what devices download.
//!
//! # Bundle downloads
//! Streamed from the file in `<state>/bundles/` in chunks of
//! [`CHUNK_BYTES`], never read whole into memory (eight devices resuming a
//! 256 MiB bundle at once must not cost eight copies of it). `Range:
//! bytes=N-` answers 206 with `Content-Range: bytes N-<last>/<total>` and
//! the bytes from N (an interrupted download resumes); N at or past the end
//! answers 416 with `Content-Range: bytes */<total>`; any other or no
//! `Range` answers 200 with the whole file. Every answer has
//! `Accept-Ranges: bytes` and its exact `Content-Length`.

use std::io::SeekFrom;
use std::path::Path;
use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::ApiError;
use crate::auth::{Principal, Role};
use crate::releases::{ReleaseDetail, ReleaseRecord};
use crate::rollout::Rollout;
use crate::rollouts::{
    AuditEntry, Control, MAX_BUNDLE_BYTES, NewRollout, Rollouts, Source, bundle_path,
};

/// Bytes read from a bundle file per chunk of a download.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// The routes over `rollouts`; merged into the console's router.
pub fn routes(rollouts: Arc<Rollouts>) -> axum::Router {
    axum::Router::new()
        .route(
            "/api/rollouts",
            get(list)
                .post(create)
                .layer(DefaultBodyLimit::max(MAX_BUNDLE_BYTES)),
        )
        .route("/api/rollouts/{id}", get(one))
        .route("/api/rollouts/{id}/{control}", axum::routing::post(control))
        .route("/api/audit", get(audit))
        .route(
            "/api/releases",
            get(releases)
                .post(submit)
                .layer(DefaultBodyLimit::max(MAX_BUNDLE_BYTES)),
        )
        .route("/api/releases/next-sequence", get(next_sequence))
        .route("/api/releases/{id}", get(release))
        .route(
            "/api/releases/{id}/approve",
            axum::routing::post(approve).layer(DefaultBodyLimit::max(MAX_BUNDLE_BYTES)),
        )
        .route("/api/releases/{id}/reject", axum::routing::post(reject))
        .route("/bundles/{file}", get(bundle))
        .with_state(rollouts)
}

async fn create(
    State(r): State<Arc<Rollouts>>,
    Extension(who): Extension<Principal>,
    RawQuery(raw): RawQuery,
    Query(params): Query<NewRollout>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, axum::Json<Rollout>), ApiError> {
    // The audit log names the credential's holder; a name in the query
    // would let anyone write anyone's name there.
    let named = raw
        .as_deref()
        .unwrap_or("")
        .split('&')
        .any(|kv| kv.split('=').next() == Some("operator"));
    if named {
        return Err(ApiError::bad_request(
            "operator= is not accepted: the audit log records the holder of the credential \
             (the token's name)"
                .into(),
        ));
    }
    if params.allow_downgrade && who.role < Role::Admin {
        return Err(ApiError::forbidden(
            "allow_downgrade needs an admin: a downgrade takes devices back to an older model"
                .into(),
        ));
    }
    let release = params.release.clone();
    match (&release, body.is_empty()) {
        (None, true) => {
            return Err(ApiError::bad_request(
                "the request body must be the bundle (or name an approved release: release=<id>)"
                    .into(),
            ));
        }
        (Some(_), false) => {
            return Err(ApiError::bad_request(
                "either a bundle in the body or release=<id>, not both".into(),
            ));
        }
        _ => {}
    }
    let now = ferry_host::now_ms();
    let rollout = super::blocking(move || {
        let source = match &release {
            Some(id) => Source::Release(id),
            None => Source::Upload(&body),
        };
        Ok(r.create(source, &params, &who.name, now)?)
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(rollout)))
}

/// `POST /api/releases`: submits a bundle to the registry (201 with its
/// record; 200 when the registry already had it).
async fn submit(
    State(r): State<Arc<Rollouts>>,
    Extension(who): Extension<Principal>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, axum::Json<ReleaseRecord>), ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body must be the bundle".into(),
        ));
    }
    let now = ferry_host::now_ms();
    let record = super::blocking(move || Ok(r.submit(&body, &who.name, now)?)).await?;
    let status = if record.first_seen_ms == now {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(record)))
}

async fn release(
    State(r): State<Arc<Rollouts>>,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<ReleaseDetail>, ApiError> {
    let detail = super::blocking(move || Ok(r.release_detail(&id)?)).await?;
    Ok(axum::Json(detail))
}

/// `POST /api/releases/{id}/approve`: the body is the bundle with the
/// approver's signature added (`ferry approve`).
async fn approve(
    State(r): State<Arc<Rollouts>>,
    Extension(who): Extension<Principal>,
    UrlPath(id): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<axum::Json<ReleaseRecord>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body must be the bundle with the approver's signature (ferry approve)"
                .into(),
        ));
    }
    let now = ferry_host::now_ms();
    let record = super::blocking(move || Ok(r.approve(&id, &body, &who.name, now)?)).await?;
    Ok(axum::Json(record))
}

#[derive(serde::Deserialize)]
struct Rejecting {
    reason: String,
}

/// `POST /api/releases/{id}/reject` with `{"reason": "..."}`.
async fn reject(
    State(r): State<Arc<Rollouts>>,
    Extension(who): Extension<Principal>,
    UrlPath(id): UrlPath<String>,
    axum::Json(body): axum::Json<Rejecting>,
) -> Result<axum::Json<ReleaseRecord>, ApiError> {
    let now = ferry_host::now_ms();
    let record = super::blocking(move || Ok(r.reject(&id, &body.reason, &who.name, now)?)).await?;
    Ok(axum::Json(record))
}

#[derive(serde::Deserialize, Default)]
struct ControlBody {
    #[serde(default)]
    reason: String,
}

/// `POST /api/rollouts/{id}/pause`, `.../resume`, `.../abort` (body
/// `{"reason": "..."}`, needed for an abort).
async fn control(
    State(r): State<Arc<Rollouts>>,
    Extension(who): Extension<Principal>,
    UrlPath((id, control)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Result<axum::Json<Rollout>, ApiError> {
    let body: ControlBody = if body.is_empty() {
        ControlBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!("the body must be {{\"reason\": ...}}: {e}"))
        })?
    };
    let control = match control.as_str() {
        "pause" => Control::Pause,
        "resume" => Control::Resume,
        "abort" => Control::Abort {
            reason: body.reason,
        },
        other => {
            return Err(ApiError::not_found(format!(
                "no action {other:?} on a rollout (pause, resume, abort)"
            )));
        }
    };
    let now = ferry_host::now_ms();
    let rollout = super::blocking(move || Ok(r.control(&id, control, &who.name, now)?)).await?;
    Ok(axum::Json(rollout))
}

async fn list(State(r): State<Arc<Rollouts>>) -> axum::Json<Vec<Rollout>> {
    axum::Json(r.list())
}

async fn one(
    State(r): State<Arc<Rollouts>>,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<Rollout>, ApiError> {
    Ok(axum::Json(r.get(&id)?))
}

async fn audit(State(r): State<Arc<Rollouts>>) -> Result<axum::Json<Vec<AuditEntry>>, ApiError> {
    let log = super::blocking(move || Ok(r.audit_log()?)).await?;
    Ok(axum::Json(log))
}

async fn releases(
    State(r): State<Arc<Rollouts>>,
) -> Result<axum::Json<Vec<crate::releases::ReleaseView>>, ApiError> {
    let list = super::blocking(move || Ok(r.releases()?)).await?;
    Ok(axum::Json(list))
}

#[derive(serde::Deserialize)]
struct ChannelQuery {
    #[serde(default = "stable")]
    channel: String,
}

fn stable() -> String {
    "stable".into()
}

/// `{"fleet", "channel", "next_sequence"}`: what CI packs the next release with.
async fn next_sequence(
    State(r): State<Arc<Rollouts>>,
    Query(q): Query<ChannelQuery>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    ferry_protocol::validate_name("channel", &q.channel).map_err(ApiError::bad_request)?;
    let fleet = r.fleet().to_string();
    let channel = q.channel.clone();
    let next = super::blocking(move || Ok(r.next_sequence(&channel)?)).await?;
    Ok(axum::Json(serde_json::json!({
        "fleet": fleet, "channel": q.channel, "next_sequence": next,
    })))
}

async fn bundle(
    State(r): State<Arc<Rollouts>>,
    UrlPath(file): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve_bundle(r.bundles_dir(), &file, &headers).await
}

/// The answer to `GET /bundles/{file}` from the bundles in `dir` (see the
/// module header).
pub async fn serve_bundle(
    dir: &Path,
    file: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found(format!("no bundle {file}"));
    let path = bundle_path(dir, file).ok_or_else(not_found)?;
    let mut f = tokio::fs::File::open(&path)
        .await
        .map_err(|_| not_found())?;
    let io = |e: std::io::Error| ApiError::internal("io", format!("cannot read {file}: {e}"));
    let total = f.metadata().await.map_err(io)?.len();
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<u64>().ok());
    let (status, from) = match start {
        Some(s) if s >= total => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{total}"))],
            )
                .into_response());
        }
        Some(s) => (StatusCode::PARTIAL_CONTENT, s),
        None => (StatusCode::OK, 0),
    };
    if from > 0 {
        f.seek(SeekFrom::Start(from)).await.map_err(io)?;
    }
    let length = total - from;
    // `take`: exactly the length announced, even if the file changed.
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        f.take(length),
        CHUNK_BYTES,
    ));
    let mut response = (
        status,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::ACCEPT_RANGES, "bytes".to_string()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        body,
    )
        .into_response();
    if status == StatusCode::PARTIAL_CONTENT {
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            format!("bytes {from}-{}/{total}", total - 1)
                .parse()
                .expect("a valid header value"),
        );
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    /// GET /bundles/{file} with `range`: status, headers, body.
    fn fetch(base: &str, file: &str, range: Option<&str>) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut req = agent.get(format!("{base}/bundles/{file}"));
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        let mut r = req.call().unwrap();
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let body = r
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .unwrap();
        (r.status().as_u16(), headers, body)
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn downloads_are_streamed_with_range() {
        let dir = tempfile::tempdir().unwrap();
        // Several chunks and a partial one.
        let bytes: Vec<u8> = (0..(3 * CHUNK_BYTES + 1234))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(dir.path().join(format!("{DIGEST}.ferry")), &bytes).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let base = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let dir = dir.path().to_path_buf();
            let app = axum::Router::new().route(
                "/bundles/{file}",
                get(move |UrlPath(file): UrlPath<String>, headers: HeaderMap| {
                    let dir = dir.clone();
                    async move { serve_bundle(&dir, &file, &headers).await }
                }),
            );
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            format!("http://{addr}")
        });
        let file = format!("{DIGEST}.ferry");
        let total = bytes.len();

        let (status, headers, body) = fetch(&base, &file, None);
        assert_eq!(status, 200);
        assert_eq!(body, bytes);
        assert_eq!(header(&headers, "accept-ranges"), Some("bytes"));
        assert_eq!(
            header(&headers, "content-length"),
            Some(total.to_string().as_str())
        );
        assert_eq!(header(&headers, "content-range"), None);

        for from in [1, CHUNK_BYTES - 1, CHUNK_BYTES, total - 1] {
            let (status, headers, body) = fetch(&base, &file, Some(&format!("bytes={from}-")));
            assert_eq!(status, 206, "from {from}");
            assert_eq!(body, bytes[from..], "from {from}");
            assert_eq!(
                header(&headers, "content-range"),
                Some(format!("bytes {from}-{}/{total}", total - 1).as_str())
            );
            assert_eq!(
                header(&headers, "content-length"),
                Some((total - from).to_string().as_str())
            );
        }
        let (status, headers, body) = fetch(&base, &file, Some(&format!("bytes={total}-")));
        assert_eq!(status, 416);
        assert!(body.is_empty());
        assert_eq!(
            header(&headers, "content-range"),
            Some(format!("bytes */{total}").as_str())
        );
        // Other forms of Range are not honoured: the whole file.
        let (status, _, body) = fetch(&base, &file, Some("bytes=0-9"));
        assert_eq!((status, body.len()), (200, total));
        // Names that are not a digest, and digests without a file.
        let (status, _, _) = fetch(&base, "../secret.ferry", None);
        assert_eq!(status, 404);
        let (status, _, _) = fetch(&base, &format!("{}.ferry", "a".repeat(64)), None);
        assert_eq!(status, 404);
        let (status, _, _) = fetch(&base, &format!("{DIGEST}.zip"), None);
        assert_eq!(status, 404);
    }
}
