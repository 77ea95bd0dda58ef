//! Authentication, attacked as the issue did, against the real
//! `ferry-fleet serve` (with rollouts: trusted keys and the operator key)
//! and the real `ferry-fleet token` commands.
//!
//! - `nothing_answers_without_a_credential_and_roles_hold`: every route but
//!   `/healthz` and the login page refuses a request without credentials
//!   (the downgrade POST with `operator=alice` included: 401, no
//!   rollout, no audit line, no file); the first admin token is a 0600
//!   file whose path (never the token) is logged; tokens made with the
//!   CLI: a viewer reads but cannot roll out or manage tokens; `operator=`
//!   is refused with a clear error; a revoked token stops at once; the
//!   offline command refuses a state directory a console holds.
//! - `a_browser_session_cannot_be_used_from_another_origin`: a login sets
//!   an `HttpOnly; SameSite=Strict` cookie; with that cookie, the issue's
//!   cross-origin `text/plain` POST is refused (`Origin` of another port,
//!   `Sec-Fetch-Site: same-site`), so is a same-origin POST without the
//!   CSRF token, and a login from another origin; with the token the
//!   request reaches the rollouts (which refuse an empty fleet); logging
//!   out and revoking the token end the session.

use std::time::Duration;

use serde_json::Value;

use crate::broker::Mosquitto;
use crate::fixtures::{self, bundles};
use crate::state::{Serve, ferry_fleet_bin};

/// One HTTP request: status, headers (lower-case names), body. (Requests
/// refused before their body is read get a small body: the console
/// answers at once and closes the connection, and a client still sending a
/// whole bundle would see a broken pipe instead of the answer.)
fn call(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut r = agent.run(req.body(body.to_vec()).unwrap()).unwrap();
    let headers = r
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (status, headers, text)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn code(body: &str) -> String {
    serde_json::from_str::<Value>(body).unwrap_or_default()["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// A console with rollouts on (the fixtures' release key trusted, and an
/// operator key), following an empty fleet.
fn console(broker: &Mosquitto, state: &std::path::Path) -> Serve {
    let b = bundles();
    let (public, key) = (b.path("release.pub"), b.path("release.key"));
    Serve::start_with(
        broker,
        state,
        &[
            "--trust",
            public.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    )
}

/// `ferry-fleet token create` over the console's API with the admin token.
fn make_token(serve: &Serve, state: &std::path::Path, name: &str, role: &str) -> String {
    let o = ferry_fleet_bin()
        .args(["token", "create", "--name", name, "--role", role])
        .args(["--console", &serve.url])
        .arg("--token-file")
        .arg(state.join(ferry_fleet::auth::ADMIN_TOKEN_FILE))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn bundle_files(state: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(state.join("bundles"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn nothing_answers_without_a_credential_and_roles_hold() {
    let broker = Mosquitto::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let serve = console(&broker, &state);
    let url = serve.url.clone();

    // The first admin token: a private file, named (not shown) in the log.
    let token_file = state.join(ferry_fleet::auth::ADMIN_TOKEN_FILE);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let log = serve.log_text();
    assert!(log.contains("first admin token"), "{log}");
    assert!(log.contains(&token_file.display().to_string()), "{log}");
    assert!(!log.contains(&serve.token), "the log shows the token");

    // Without credentials: nothing but /healthz and the login page.
    assert_eq!(call("GET", &format!("{url}/healthz"), &[], b"").0, 200);
    assert_eq!(call("GET", &format!("{url}/login"), &[], b"").0, 200);
    let (status, headers, _) = call("GET", &format!("{url}/"), &[], b"");
    assert_eq!(
        (status, header(&headers, "location")),
        (303, Some("/login"))
    );
    for path in [
        "/dashboard.js",
        "/dashboard.css",
        "/api/devices",
        "/api/devices/x",
        "/api/drift",
        "/api/events",
        "/api/stream",
        "/api/rollouts",
        "/api/audit",
        "/api/fleet-drift",
        "/api/retrain",
        "/api/retrain/request",
        "/api/retrain/export",
        "/api/session",
        "/api/tokens",
        "/no-such-route",
    ] {
        let (status, headers, body) = call("GET", &format!("{url}{path}"), &[], b"");
        assert_eq!(status, 401, "GET {path}: {body}");
        assert_eq!(code(&body), "unauthenticated", "{path}");
        assert!(header(&headers, "www-authenticate").is_some(), "{path}");
    }
    // The downgrade: an old signed bundle, any name as operator.
    let v1 = bundles().bytes(fixtures::V1);
    let downgrade = format!("{url}/api/rollouts?canary=100%25&bake=1s&operator=alice");
    for headers in [
        &[("content-type", "application/octet-stream")][..],
        &[
            ("content-type", "text/plain"),
            ("origin", "http://127.0.0.1:1"),
        ],
        &[("authorization", "Bearer ferry_0123")],
        &[("authorization", &*format!("Basic {}", serve.token))],
    ] {
        let (status, _, body) = call("POST", &downgrade, headers, &v1[..64]);
        assert_eq!(status, 401, "{headers:?}: {body}");
    }
    assert!(serve.client().rollouts().unwrap().is_empty());
    assert!(serve.client().audit().unwrap().is_empty());
    assert_eq!(bundle_files(&state), Vec::<String>::new());

    // Tokens made by the admin with the CLI; shown once, stored hashed.
    let viewer = make_token(&serve, &state, "val", "viewer");
    let alice = make_token(&serve, &state, "alice", "operator");
    assert!(viewer.starts_with("ferry_") && alice.starts_with("ferry_"));
    let store_files = walk(&state.join(ferry_fleet::store::DIR));
    for f in &store_files {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(alice.len()).any(|w| w == alice.as_bytes()),
            "{} holds a token",
            f.display()
        );
    }
    let bearer = |t: &str| format!("Bearer {t}");
    let as_viewer = bearer(&viewer);
    let as_alice = bearer(&alice);
    let (status, _, body) = call(
        "GET",
        &format!("{url}/api/devices"),
        &[("authorization", &as_viewer)],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let rollout = format!("{url}/api/rollouts?canary=100%25&bake=1s");
    let (status, _, body) = call(
        "POST",
        &rollout,
        &[("authorization", &as_viewer)],
        &v1[..64],
    );
    assert_eq!((status, code(&body)), (403, "forbidden".into()), "{body}");
    assert!(body.contains("val has the role viewer"), "{body}");
    let (status, _, _) = call(
        "GET",
        &format!("{url}/api/tokens"),
        &[("authorization", &as_alice)],
        b"",
    );
    assert_eq!(status, 403);
    // A name in the query is refused, with the reason.
    let (status, _, body) = call("POST", &downgrade, &[("authorization", &as_alice)], &v1);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("operator= is not accepted"), "{body}");
    // Who is who.
    let who = ferry_fleet::Client::new(&url)
        .with_token(&alice)
        .whoami()
        .unwrap();
    assert_eq!(
        (who.name.as_str(), who.role),
        ("alice", ferry_fleet::Role::Operator)
    );

    // The CLI without a token says how to get one.
    let o = ferry_fleet_bin()
        .args(["rollouts", "--console", &url])
        .env_remove("FERRY_FLEET_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("401") && err.contains("--token-file"), "{err}");

    // Listed without tokens; revoked at once.
    let list = ferry_fleet_bin()
        .args(["token", "list", "--json", "--console", &url])
        .env("FERRY_FLEET_TOKEN", &serve.token)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("\"alice\"") && !listed.contains(&alice),
        "{listed}"
    );
    let revoke = ferry_fleet_bin()
        .args(["token", "revoke", "alice", "--console", &url])
        .env("FERRY_FLEET_TOKEN", &serve.token)
        .output()
        .unwrap();
    assert!(revoke.status.success(), "{revoke:?}");
    let (status, _, _) = call(
        "GET",
        &format!("{url}/api/devices"),
        &[("authorization", &as_alice)],
        b"",
    );
    assert_eq!(status, 401);
    // The state directory is the running console's: the offline command
    // says so instead of waiting or corrupting it.
    let offline = ferry_fleet_bin()
        .args(["token", "list", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&offline.stderr);
    assert_eq!(offline.status.code(), Some(1), "{err}");
    assert!(err.contains("in use") && err.contains("--console"), "{err}");
    assert!(serve.client().audit().unwrap().is_empty());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_browser_session_cannot_be_used_from_another_origin() {
    let broker = Mosquitto::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let serve = console(&broker, &state);
    let url = serve.url.clone();
    let host = url.strip_prefix("http://").unwrap().to_string();
    let alice = make_token(&serve, &state, "alice", "operator");
    let form = format!("token={alice}");
    let form_type = ("content-type", "application/x-www-form-urlencoded");

    // A login posted from another origin is refused (no login CSRF).
    let (status, _, body) = call(
        "POST",
        &format!("{url}/login"),
        &[form_type, ("origin", "http://127.0.0.1:1")],
        form.as_bytes(),
    );
    assert_eq!(
        (status, code(&body)),
        (403, "cross_origin".into()),
        "{body}"
    );
    // A wrong token: the page again, 401.
    let (status, _, body) = call(
        "POST",
        &format!("{url}/login"),
        &[form_type],
        b"token=ferry_00",
    );
    assert_eq!(status, 401);
    assert!(body.contains("not valid"), "{body}");
    // The login: a cookie scripts cannot read, never sent cross-site.
    let own_origin = format!("http://{host}");
    let (status, headers, _) = call(
        "POST",
        &format!("{url}/login"),
        &[
            form_type,
            ("origin", &own_origin),
            ("sec-fetch-site", "same-origin"),
        ],
        form.as_bytes(),
    );
    assert_eq!((status, header(&headers, "location")), (303, Some("/")));
    let set_cookie = header(&headers, "set-cookie").unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let (status, _, body) = call(
        "GET",
        &format!("{url}/api/session"),
        &[("cookie", &cookie)],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let session: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(session["name"], "alice");
    let csrf = session["csrf"].as_str().unwrap().to_string();

    // The attack with the cookie: another origin (another port of
    // the same host is the same *site*, so SameSite does not stop it).
    let v1 = bundles().bytes(fixtures::V1);
    let rollout = format!("{url}/api/rollouts?canary=100%25&bake=1s");
    let attacks: [&[(&str, &str)]; 4] = [
        &[
            ("cookie", &cookie),
            ("content-type", "text/plain"),
            ("origin", "http://127.0.0.1:1"),
            ("sec-fetch-site", "same-site"),
        ],
        &[
            ("cookie", &cookie),
            ("content-type", "text/plain"),
            ("origin", "null"),
        ],
        // Even with the CSRF token (which another origin cannot read).
        &[
            ("cookie", &cookie),
            ("x-ferry-csrf", &csrf),
            ("sec-fetch-site", "cross-site"),
        ],
        // Same origin, but no CSRF token.
        &[
            ("cookie", &cookie),
            ("content-type", "text/plain"),
            ("origin", &own_origin),
        ],
    ];
    let codes = ["cross_origin", "cross_origin", "cross_origin", "csrf"];
    for (headers, expected) in attacks.iter().zip(codes) {
        let (status, _, body) = call("POST", &rollout, headers, &v1[..64]);
        assert_eq!(
            (status, code(&body)),
            (403, expected.to_string()),
            "{headers:?}: {body}"
        );
    }
    assert!(serve.client().rollouts().unwrap().is_empty());
    assert!(serve.client().audit().unwrap().is_empty());
    // From the page itself (same origin, CSRF token): past authentication,
    // to the rollouts, which refuse a fleet without devices.
    let (status, _, body) = call(
        "POST",
        &rollout,
        &[
            ("cookie", &cookie),
            ("x-ferry-csrf", &csrf),
            ("origin", &own_origin),
            ("sec-fetch-site", "same-origin"),
            ("content-type", "application/octet-stream"),
        ],
        &v1,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no devices"), "{body}");

    // Logging out ends the session (the logout itself needs the token).
    let (status, _, _) = call(
        "POST",
        &format!("{url}/logout"),
        &[("cookie", &cookie)],
        b"",
    );
    assert_eq!(status, 403);
    let (status, _, _) = call(
        "POST",
        &format!("{url}/logout"),
        &[("cookie", &cookie), ("x-ferry-csrf", &csrf)],
        b"",
    );
    assert_eq!(status, 204);
    let (status, _, _) = call(
        "GET",
        &format!("{url}/api/devices"),
        &[("cookie", &cookie)],
        b"",
    );
    assert_eq!(status, 401);

    // A revoked token ends its sessions too.
    let (_, headers, _) = call(
        "POST",
        &format!("{url}/login"),
        &[form_type],
        form.as_bytes(),
    );
    let cookie = header(&headers, "set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let (status, _, _) = call(
        "GET",
        &format!("{url}/api/devices"),
        &[("cookie", &cookie)],
        b"",
    );
    assert_eq!(status, 200);
    serve.client().revoke_token("alice").unwrap();
    let (status, _, _) = call(
        "GET",
        &format!("{url}/api/devices"),
        &[("cookie", &cookie)],
        b"",
    );
    assert_eq!(status, 401);
}
