//! Authentication on every route: [`protect`] wraps a router with the
//! check, and adds the login page, the session and the token routes.
//!
//! # Who may call what ([`required_role`], one table)
//! | route | needs |
//! |---|---|
//! | `GET /healthz`, `GET`/`POST /login` | nothing |
//! | `GET /bundles/<sha256>.ferry` | nothing (see below) |
//! | `/api/tokens...`, `/api/enrolment...` | admin |
//! | any other `GET`/`HEAD` | viewer |
//! | any other method | operator (`POST /logout`: any session) |
//!
//! A credential is either `Authorization: Bearer <token>` (the CLI, CI,
//! the typed client) or the session cookie [`COOKIE`] of a dashboard
//! login. A request without one answers 401 (`GET /` redirects to
//! `/login`); a role too low answers 403. A bad `Authorization` header is
//! refused, never ignored for a cookie.
//!
//! # Browsers (CSRF)
//! The cookie is `HttpOnly; SameSite=Strict; Path=/` (and `Secure` with
//! `serve --secure-cookies`, behind HTTPS). A request that changes state
//! (not `GET`/`HEAD`) authenticated by the cookie must also:
//! - not come from another origin: a `Sec-Fetch-Site` other than
//!   `same-origin`, or an `Origin` whose host and port are not the `Host`
//!   header's, is refused (403 `cross_origin`). `SameSite` alone does not
//!   cover another port of the same host, which is the same *site*;
//! - carry the session's CSRF token in [`CSRF_HEADER`] (403 `csrf`), which
//!   the page reads from `GET /api/session` and no other origin can read.
//!
//! `POST /login` is held to the origin rule too (no login CSRF).
//!
//! # Bundle downloads
//! `GET /bundles/<sha256>.ferry` is what devices fetch during a rollout
//! (the URL is in the signed command; devices hold no console
//! credential). It is answered without credentials on purpose: bundles
//! are signed and verified by the devices, the URL names a SHA-256 that
//! cannot be guessed, and only bundles a rollout refers to are kept.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Form, Json, Router};
use ferry_host::now_ms;
use serde::Deserialize;

use super::{ApiError, blocking};
use crate::auth::{Auth, Enrolled, Enrolment, NewToken, Principal, Role, TokenView};

/// The session cookie's name.
pub const COOKIE: &str = "ferry_session";
/// The header a browser sends the session's CSRF token in.
pub const CSRF_HEADER: &str = "x-ferry-csrf";

/// How the cookie is set.
#[derive(Debug, Clone, Copy, Default)]
pub struct CookiePolicy {
    /// Add `Secure` (the console is reached over HTTPS).
    pub secure: bool,
}

#[derive(Clone)]
struct Guard {
    auth: Arc<Auth>,
    cookies: CookiePolicy,
}

/// `router` behind authentication, with `/login`, `/logout`,
/// `/api/session` and the token routes added (see the module header).
pub fn protect(router: Router, auth: Arc<Auth>, cookies: CookiePolicy) -> Router {
    let guard = Guard { auth, cookies };
    let own = Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/api/session", get(session))
        .route("/api/tokens", get(list_tokens).post(create_token))
        .route("/api/tokens/{name}", delete(revoke_token))
        .route("/api/enrolment", get(enrolment).post(enrol))
        .route("/api/enrolment/{device}", delete(unenrol))
        .with_state(guard.clone());
    router
        .merge(own)
        .layer(axum::middleware::from_fn_with_state(guard, check))
}

/// The role a request needs; `None`: none (see the module header).
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    let read = method == Method::GET || method == Method::HEAD;
    match path {
        "/healthz" | "/login" => None,
        p if read && p.starts_with("/bundles/") => None,
        p if p == "/api/tokens" || p.starts_with("/api/tokens/") => Some(Role::Admin),
        p if p == "/api/enrolment" || p.starts_with("/api/enrolment/") => Some(Role::Admin),
        "/logout" => Some(Role::Viewer),
        _ if read => Some(Role::Viewer),
        p if p.starts_with("/api/releases/")
            && (p.ends_with("/approve") || p.ends_with("/reject")) =>
        {
            Some(Role::Approver)
        }
        _ => Some(Role::Operator),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn refuse(status: StatusCode, code: &'static str, message: String) -> Response {
    let mut r = (
        status,
        Json(serde_json::json!({ "error": message, "code": code })),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ferry-fleet\""),
        );
    }
    r
}

/// `Some(refusal)` when the request comes from another origin than the
/// console's (see the module header).
fn cross_origin(headers: &HeaderMap) -> Option<Response> {
    let refused = |why: String| {
        Some(refuse(
            StatusCode::FORBIDDEN,
            "cross_origin",
            format!("refused a request from another origin ({why})"),
        ))
    };
    if let Some(site) = headers.get("sec-fetch-site")
        && site.as_bytes() != b"same-origin"
    {
        return refused(format!(
            "Sec-Fetch-Site: {}",
            String::from_utf8_lossy(site.as_bytes())
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if authority.is_none() || authority != host {
            return refused(format!("Origin: {origin}"));
        }
    }
    None
}

/// Bytes of a refused request's body read and discarded so the client
/// reads the refusal (see `ferry_host::http::discard_body`): an upload by a
/// token without the role gets its 403, not a broken pipe.
pub const DISCARD_LIMIT: u64 = 64 * 1024 * 1024;

/// The middleware: finds the credential, checks the role (and for a
/// cookie, the origin and the CSRF token), and hands the [`Principal`] to
/// the route as an extension. A refused request's body is discarded (up to
/// [`DISCARD_LIMIT`]) before the refusal goes out.
async fn check(State(g): State<Guard>, mut req: Request, next: Next) -> Response {
    match authorize(&g, &mut req).await {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            let length = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            ferry_host::http::discard_body(req.into_body(), length, DISCARD_LIMIT).await;
            refusal
        }
    }
}

/// The checks of [`check`]: `Err` is the refusal.
async fn authorize(g: &Guard, req: &mut Request) -> Result<(), Response> {
    let Some(need) = required_role(req.method(), req.uri().path()) else {
        return Ok(());
    };
    let headers = req.headers();
    let unsafe_method = !(req.method() == Method::GET || req.method() == Method::HEAD);
    let principal = if let Some(value) = headers.get(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .map(str::to_string);
        let auth = g.auth.clone();
        let found = match token {
            Some(t) => tokio::task::spawn_blocking(move || auth.check_token(&t))
                .await
                .ok()
                .flatten(),
            None => None,
        };
        match found {
            Some(p) => p,
            None => {
                return Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "the Authorization header holds no valid token (Bearer <token>; revoked?)"
                        .into(),
                ));
            }
        }
    } else if let Some(id) = cookie(headers, COOKIE).map(str::to_string) {
        let auth = g.auth.clone();
        let sid = id.clone();
        let found = tokio::task::spawn_blocking(move || auth.session(&sid, now_ms()))
            .await
            .ok()
            .flatten();
        let Some((principal, _)) = found else {
            return Err(unauthenticated(req));
        };
        if unsafe_method {
            if let Some(refusal) = cross_origin(headers) {
                return Err(refusal);
            }
            let csrf = headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !g.auth.check_csrf(&id, csrf) {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "csrf",
                    format!("a request from the browser needs the session's {CSRF_HEADER} header"),
                ));
            }
        }
        principal
    } else {
        return Err(unauthenticated(req));
    };
    if principal.role < need {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} has the role {}; {} {} needs {need}",
                principal.name,
                principal.role,
                req.method(),
                req.uri().path()
            ),
        ));
    }
    req.extensions_mut().insert(principal);
    Ok(())
}

fn unauthenticated(req: &Request) -> Response {
    if req.method() == Method::GET && req.uri().path() == "/" {
        return Redirect::to("/login").into_response();
    }
    refuse(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "credentials needed: Authorization: Bearer <token> (ferry-fleet --token-file, \
         FERRY_FLEET_TOKEN), or a dashboard login at /login"
            .into(),
    )
}

/// The login page: self-contained, no script.
const LOGIN_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; \
                         base-uri 'none'; frame-ancestors 'none'";

fn login_html(message: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Ferry fleet: log in</title>
<link rel="icon" href="data:,">
<style>
body {{ font: 16px system-ui, sans-serif; max-width: 28rem; margin: 4rem auto; padding: 0 1rem; color: #1d2733; }}
label {{ display: block; margin: 1rem 0 .3rem; }}
input {{ width: 100%; box-sizing: border-box; padding: .5rem; font: inherit; font-family: monospace; }}
button {{ margin-top: 1rem; padding: .5rem 1.2rem; font: inherit; }}
.error {{ color: #a01616; }}
.hint {{ color: #55606d; font-size: .9rem; }}
</style>
</head>
<body>
<h1>Ferry fleet</h1>
<p id="message" class="error" role="alert">{message}</p>
<form method="post" action="/login">
<label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<button id="login" type="submit">Log in</button>
</form>
<p class="hint">An admin makes tokens with <code>ferry-fleet token create --name NAME --role viewer</code>.
The first admin token is in <code>&lt;state&gt;/admin.token</code>.</p>
</body>
</html>
"#
    )
}

fn login_response(status: StatusCode, message: &str) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        login_html(message),
    )
        .into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(LOGIN_CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn login_page() -> Response {
    login_response(StatusCode::OK, "")
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(g): State<Guard>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if let Some(refusal) = cross_origin(&headers) {
        return refusal;
    }
    let auth = g.auth.clone();
    let token = form.token.trim().to_string();
    let login = blocking(move || {
        auth.login(&token, now_ms())
            .map_err(|e| ApiError::internal(e.code(), e.to_string()))
    })
    .await;
    match login {
        Ok(Some(login)) => {
            tracing::info!(name = %login.principal.name, role = %login.principal.role, "Dashboard login");
            let secure = if g.cookies.secure { "; Secure" } else { "" };
            let cookie = format!(
                "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
                login.session,
                crate::auth::SESSION_TTL_MS / 1000
            );
            let mut r = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Ok(None) => {
            tracing::warn!("Refused a dashboard login (unknown or revoked token)");
            login_response(
                StatusCode::UNAUTHORIZED,
                "That token is not valid (or was revoked).",
            )
        }
        Err(e) => e.into_response(),
    }
}

async fn logout(State(g): State<Guard>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        g.auth.logout(id);
    }
    let secure = if g.cookies.secure { "; Secure" } else { "" };
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `GET /api/session`: who is logged in, and (for a cookie) the CSRF
/// token the page sends with requests that change state.
async fn session(
    State(g): State<Guard>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
) -> Json<serde_json::Value> {
    let csrf = cookie(&headers, COOKIE).and_then(|id| g.auth.session(id, now_ms()).map(|s| s.1));
    Json(serde_json::json!({ "name": p.name, "role": p.role, "csrf": csrf }))
}

/// `POST /api/tokens` body. Unknown fields are refused (a typo must not
/// make a token of another role than meant).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    name: String,
    role: String,
}

async fn list_tokens(State(g): State<Guard>) -> Result<Json<Vec<TokenView>>, ApiError> {
    let auth = g.auth.clone();
    Ok(Json(blocking(move || Ok(auth.list()?)).await?))
}

async fn create_token(
    State(g): State<Guard>,
    Extension(p): Extension<Principal>,
    Json(req): Json<TokenRequest>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    let auth = g.auth.clone();
    let new = blocking(move || {
        let role: Role = req.role.parse()?;
        Ok(auth.create(&req.name, role, &p.name, now_ms())?)
    })
    .await?;
    tracing::info!(name = %new.name, role = %new.role, "Token created");
    Ok((StatusCode::CREATED, Json(new)))
}

async fn revoke_token(
    State(g): State<Guard>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let auth = g.auth.clone();
    let revoked = blocking(move || Ok(auth.revoke(&name, now_ms())?)).await?;
    tracing::info!(name = %revoked.name, by = %p.name, "Token revoked");
    Ok(Json(revoked))
}

/// `POST /api/enrolment` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolRequest {
    device: String,
}

async fn enrolment(State(g): State<Guard>) -> Result<Json<Enrolment>, ApiError> {
    let auth = g.auth.clone();
    Ok(Json(blocking(move || Ok(auth.enrolment()?)).await?))
}

async fn enrol(
    State(g): State<Guard>,
    Extension(p): Extension<Principal>,
    Json(req): Json<EnrolRequest>,
) -> Result<(StatusCode, Json<Enrolled>), ApiError> {
    let auth = g.auth.clone();
    let by = p.name.clone();
    let e = blocking(move || Ok(auth.enrol(&req.device, &by, now_ms())?)).await?;
    tracing::info!(device = %e.device, by = %p.name, "Device enrolled");
    Ok((StatusCode::CREATED, Json(e)))
}

async fn unenrol(
    State(g): State<Guard>,
    Extension(p): Extension<Principal>,
    Path(device): Path<String>,
) -> Result<StatusCode, ApiError> {
    let auth = g.auth.clone();
    let d = device.clone();
    blocking(move || Ok(auth.unenrol(&d)?)).await?;
    tracing::info!(%device, by = %p.name, "Device enrolment removed");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_of_roles() {
        let get = Method::GET;
        let post = Method::POST;
        let delete = Method::DELETE;
        let cases = [
            (&get, "/healthz", None),
            (&get, "/login", None),
            (&post, "/login", None),
            (&get, "/bundles/ab.ferry", None),
            (&post, "/bundles/ab.ferry", Some(Role::Operator)),
            (&get, "/", Some(Role::Viewer)),
            (&get, "/api/devices", Some(Role::Viewer)),
            (&get, "/api/audit", Some(Role::Viewer)),
            (&get, "/api/stream", Some(Role::Viewer)),
            (&post, "/logout", Some(Role::Viewer)),
            (&post, "/api/rollouts", Some(Role::Operator)),
            (&post, "/api/releases", Some(Role::Operator)),
            (&get, "/api/releases/abc", Some(Role::Viewer)),
            (&post, "/api/releases/abc/approve", Some(Role::Approver)),
            (&post, "/api/releases/abc/reject", Some(Role::Approver)),
            (&get, "/api/tokens", Some(Role::Admin)),
            (&post, "/api/tokens", Some(Role::Admin)),
            (&delete, "/api/tokens/ci", Some(Role::Admin)),
            (&get, "/api/enrolment", Some(Role::Admin)),
            (&post, "/api/enrolment", Some(Role::Admin)),
            (&delete, "/api/enrolment/d1", Some(Role::Admin)),
            (&post, "/api/anything-new", Some(Role::Operator)),
            (&get, "/healthz/x", Some(Role::Viewer)),
        ];
        for (m, p, need) in cases {
            assert_eq!(required_role(m, p), need, "{m} {p}");
        }
    }

    #[test]
    fn cross_origin_requests_are_told_apart() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        let host = ("host", "127.0.0.1:8080");
        assert!(cross_origin(&headers(&[host])).is_none());
        assert!(cross_origin(&headers(&[host, ("origin", "http://127.0.0.1:8080")])).is_none());
        assert!(cross_origin(&headers(&[host, ("sec-fetch-site", "same-origin")])).is_none());
        for bad in [
            &[host, ("origin", "http://127.0.0.1:9999")][..],
            &[host, ("origin", "null")],
            &[host, ("origin", "http://evil.example")],
            &[host, ("sec-fetch-site", "same-site")],
            &[host, ("sec-fetch-site", "cross-site")],
            &[("origin", "http://127.0.0.1:8080")],
        ] {
            assert!(cross_origin(&headers(bad)).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; ferry_session=abc; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
