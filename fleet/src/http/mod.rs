//! The console's HTTP layer: the only module naming axum.
//!
//! # Layout
//! - `dashboard`: the page, the device/drift/event API and the live stream
//!   (`/`, `/api/devices`, `/api/drift`, `/api/events`, `/api/stream`,
//!   `/healthz`).
//! - `rollouts`: `/api/rollouts`, `/api/audit`, and the bundle downloads
//!   devices make (`/bundles/<digest>.ferry`, streamed from disk, with
//!   Range).
//! - `retrain`: `/api/fleet-drift`, `/api/retrain`, `/api/retrain/request`,
//!   `/api/retrain/export`.
//! - `auth`: authentication in front of all of them ([`protect`]): who may
//!   call what, the login page, sessions, CSRF and origin checks, the token
//!   routes.
//!
//! # Errors
//! Every route answers an error as [`ApiError`]: a status and
//! `{"error": message, "code": code}`, the code being the domain error's
//! stable `code()`. The status of each domain error is chosen here, in one
//! place (`From<RolloutError>`, `From<RetrainError>`).

pub mod auth;
pub mod dashboard;
pub mod retrain;
pub mod rollouts;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

pub use auth::{COOKIE, CSRF_HEADER, CookiePolicy, protect, required_role};
pub use dashboard::{ChangeSource, Counts, DeviceView, Fleet, router, router_with};

use crate::auth::{Auth, AuthError};
use crate::retrain::{RetrainError, Retrainer};
use crate::rollouts::{RolloutError, Rollouts};
use crate::store::Store;

/// An error answer: a status, a message and a stable code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// 404 with `message`.
    pub fn not_found(message: String) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message,
        }
    }

    /// 400 with `message`.
    pub fn bad_request(message: String) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message,
        }
    }

    /// 503 with `code` and `message` (a limit reached; try again later).
    pub fn unavailable(code: &'static str, message: String) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code,
            message,
        }
    }

    /// 403 with `message` (the credential's role does not allow it).
    pub fn forbidden(message: String) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message,
        }
    }

    /// 500 with `message` (a failure of the console itself).
    pub fn internal(code: &'static str, message: String) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code,
            message,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.status.as_u16()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message, "code": self.code })),
        )
            .into_response()
    }
}

impl From<RolloutError> for ApiError {
    fn from(e: RolloutError) -> ApiError {
        let status = match &e {
            RolloutError::BundleRefused { .. }
            | RolloutError::WrongFleet { .. }
            | RolloutError::NoOperatorKey
            | RolloutError::WrongRelease { .. }
            | RolloutError::Invalid(_) => StatusCode::BAD_REQUEST,
            RolloutError::Busy { .. }
            | RolloutError::NotApproved { .. }
            | RolloutError::Downgrade { .. } => StatusCode::CONFLICT,
            RolloutError::SamePerson { .. } => StatusCode::FORBIDDEN,
            RolloutError::TooManyWaiting { .. } => StatusCode::TOO_MANY_REQUESTS,
            RolloutError::NotFound(_) => StatusCode::NOT_FOUND,
            RolloutError::Send { .. } => StatusCode::BAD_GATEWAY,
            RolloutError::Io { .. } | RolloutError::Write(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        let status = match &e {
            AuthError::Invalid(_) => StatusCode::BAD_REQUEST,
            AuthError::NameTaken(_) => StatusCode::CONFLICT,
            AuthError::NotFound(_) => StatusCode::NOT_FOUND,
            AuthError::Random(_) | AuthError::Store(_) | AuthError::Io { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError {
            status,
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl From<RetrainError> for ApiError {
    fn from(e: RetrainError) -> ApiError {
        let status = match &e {
            RetrainError::NoDriftingDevices { .. } => StatusCode::NOT_FOUND,
            RetrainError::Invalid(_) => StatusCode::BAD_REQUEST,
            RetrainError::Store(_) | RetrainError::Io { .. } | RetrainError::Write(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError {
            status,
            code: e.code(),
            message: e.to_string(),
        }
    }
}

/// Runs `f` off the async workers (sled scans, CSV building, bundle
/// verification).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::internal("panicked", e.to_string())))
}

/// Everything the console serves: the dashboard over `store`, and the
/// rollouts and retraining routes when they run, all behind `auth`. Open
/// event streams end when `stop` is cancelled.
pub(crate) fn console_router(
    store: Arc<Store>,
    rollouts: Option<Arc<Rollouts>>,
    retrainer: Arc<Retrainer>,
    auth: Arc<Auth>,
    cookies: CookiePolicy,
    stop: CancellationToken,
) -> axum::Router {
    let mut router = dashboard::routes(store, Vec::new(), stop);
    if let Some(r) = rollouts {
        router = router.merge(rollouts::routes(r));
    }
    protect(router.merge(retrain::routes(retrainer)), auth, cookies)
}

/// The console's HTTP limits (`ferry_host::http`): headers within 10 s,
/// 30 s at most between pieces of a body, 15 minutes to answer (an upload
/// of the largest bundle, [`crate::rollouts::MAX_BUNDLE_BYTES`], over a
/// slow link, then its verification), 512 connections (half the common
/// 1,024-descriptor limit; the oldest idle one makes room for a new one).
pub const LIMITS: ferry_host::http::Limits = ferry_host::http::Limits {
    header_read_timeout: std::time::Duration::from_secs(10),
    body_read_timeout: std::time::Duration::from_secs(30),
    request_timeout: std::time::Duration::from_secs(15 * 60),
    max_connections: 512,
};

/// Serves `router` on `listener` within [`LIMITS`] until `stop` is
/// cancelled, then waits for open responses up to `grace` before closing
/// them.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: CancellationToken,
    grace: std::time::Duration,
) -> std::io::Result<()> {
    let graceful = stop.clone();
    let mut server = tokio::spawn(async move {
        ferry_host::http::serve(listener, router, LIMITS, async move {
            graceful.cancelled().await
        })
        .await
    });
    tokio::select! {
        ended = &mut server => return ended.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        () = stop.cancelled() => {}
    }
    match tokio::time::timeout(grace, &mut server).await {
        Ok(ended) => ended.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        Err(_) => {
            tracing::info!("Closing the HTTP responses still open");
            server.abort();
            let _ = server.await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(e: impl Into<ApiError>) -> (u16, &'static str) {
        let e = e.into();
        (e.status(), e.code)
    }

    #[test]
    fn each_domain_error_has_its_status_and_code() {
        // The one place statuses are decided: pinned here so a change is a
        // decision, not an accident.
        let io = || std::io::Error::other("disk");
        let rollouts = [
            (
                RolloutError::BundleRefused {
                    code: "bad_signature",
                    message: "x".into(),
                },
                400,
            ),
            (
                RolloutError::WrongFleet {
                    bundle: "a".into(),
                    console: "b".into(),
                },
                400,
            ),
            (RolloutError::NoOperatorKey, 400),
            (RolloutError::Invalid("canary".into()), 400),
            (
                RolloutError::Busy {
                    id: "r1".into(),
                    name: "iris".into(),
                    version: "1".into(),
                },
                409,
            ),
            (RolloutError::NotFound("r9".into()), 404),
            (
                RolloutError::Io {
                    what: "write",
                    path: "x".into(),
                    source: io(),
                },
                500,
            ),
        ];
        for (e, status) in rollouts {
            let code = e.code();
            assert_eq!(answer(e), (status, code));
        }
        let retrain = [
            (RetrainError::Invalid("rule".into()), 400),
            (RetrainError::NoDriftingDevices { max_age_s: 60 }, 404),
            (
                RetrainError::Io {
                    what: "write",
                    path: "x".into(),
                    source: io(),
                },
                500,
            ),
        ];
        for (e, status) in retrain {
            let code = e.code();
            assert_eq!(answer(e), (status, code));
        }
        assert_eq!(ApiError::not_found("x".into()).status(), 404);
        assert_eq!(ApiError::bad_request("x".into()).status(), 400);
    }
}
