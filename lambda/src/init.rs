//! Initialisation, once per execution environment: find the bundle and the
//! trusted keys, verify, load. Everything here runs before the first
//! invocation, outside the handler, so warm invocations pay none of it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ferry_runtime::{PublicKey, Session, TrustPolicy};

/// Where a Lambda layer's files appear.
const LAYER_DIR: &str = "/opt";

/// Why the function cannot start.
#[derive(Debug)]
pub enum InitError {
    /// No bundle was found, or several and none chosen.
    NoBundle(String),
    /// No trusted public key was found or one does not parse.
    Keys(String),
    /// The bundle file cannot be read.
    Read(String),
    /// The bundle was rejected or cannot be loaded.
    Bundle(ferry_runtime::Error),
}

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InitError::NoBundle(m) | InitError::Keys(m) | InitError::Read(m) => f.write_str(m),
            InitError::Bundle(e) => write!(f, "bundle rejected: {e}"),
        }
    }
}

impl InitError {
    /// Error type reported to Lambda (shown in the console and in logs).
    pub fn code(&self) -> String {
        match self {
            InitError::NoBundle(_) => "Ferry.NoBundle".into(),
            InitError::Keys(_) => "Ferry.NoTrustedKey".into(),
            InitError::Read(_) => "Ferry.BundleUnreadable".into(),
            InitError::Bundle(e) => format!("Ferry.{}", e.code()),
        }
    }
}

fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .parent()
        .map(Path::to_path_buf)
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == ext))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The bundle: `FERRY_BUNDLE`, else the one `.ferry` file next to
/// `bootstrap` (the deployment package), else the one in `/opt` (a layer).
pub fn locate_bundle() -> Result<PathBuf, InitError> {
    if let Some(p) = std::env::var_os("FERRY_BUNDLE") {
        return Ok(PathBuf::from(p));
    }
    let mut searched = Vec::new();
    for dir in exe_dir().into_iter().chain([PathBuf::from(LAYER_DIR)]) {
        match files_with_ext(&dir, "ferry").as_slice() {
            [] => searched.push(dir.display().to_string()),
            [one] => return Ok(one.clone()),
            many => {
                return Err(InitError::NoBundle(format!(
                    "several bundles in {}: {}; set FERRY_BUNDLE to choose one",
                    dir.display(),
                    many.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    Err(InitError::NoBundle(format!(
        "no bundle: set FERRY_BUNDLE or put one .ferry file in {}",
        searched.join(" or ")
    )))
}

/// The trusted keys: `FERRY_PUBLIC_KEYS` (PEM text, or paths separated by
/// `:`), else the `.pub` files in `keys/` next to `bootstrap`, else in
/// `/opt/keys`. `FERRY_SIGNATURE_THRESHOLD` (default 1) signatures needed.
pub fn trust_policy() -> Result<TrustPolicy, InitError> {
    let parse = |text: &str, from: &str| {
        PublicKey::all_from_pem(text).map_err(|e| InitError::Keys(format!("{from}: {e}")))
    };
    let mut keys = Vec::new();
    if let Ok(v) = std::env::var("FERRY_PUBLIC_KEYS") {
        if v.contains("-----BEGIN") {
            keys = parse(&v, "FERRY_PUBLIC_KEYS")?;
        } else {
            for path in v.split(':').filter(|p| !p.is_empty()) {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| InitError::Keys(format!("cannot read key {path}: {e}")))?;
                keys.extend(parse(&text, path)?);
            }
        }
    } else {
        for dir in exe_dir()
            .map(|d| d.join("keys"))
            .into_iter()
            .chain([PathBuf::from(LAYER_DIR).join("keys")])
        {
            for path in files_with_ext(&dir, "pub") {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    InitError::Keys(format!("cannot read key {}: {e}", path.display()))
                })?;
                keys.extend(parse(&text, &path.display().to_string())?);
            }
            if !keys.is_empty() {
                break;
            }
        }
    }
    if keys.is_empty() {
        return Err(InitError::Keys(
            "no trusted public key: set FERRY_PUBLIC_KEYS or ship keys/*.pub next to bootstrap"
                .into(),
        ));
    }
    let threshold = match std::env::var("FERRY_SIGNATURE_THRESHOLD") {
        Ok(t) => t.parse().map_err(|_| {
            InitError::Keys(format!("FERRY_SIGNATURE_THRESHOLD=`{t}` is not a number"))
        })?,
        Err(_) => 1,
    };
    TrustPolicy::with_threshold(keys, threshold).map_err(|e| InitError::Keys(e.to_string()))
}

/// The file `ferry lambda-package --engine` writes beside `bootstrap`.
pub const ENGINE_FILE: &str = "ferry.engine";

/// The engine: `FERRY_ENGINE` (`tract`, `onnxruntime`, `auto`), else the
/// one `ferry lambda-package --engine` recorded in [`ENGINE_FILE`] beside
/// `bootstrap`, else `auto`; onnxruntime from `FERRY_ONNXRUNTIME`, else the
/// `libonnxruntime.so` that `ferry lambda-package --onnxruntime` put beside
/// `bootstrap`.
pub fn engine_options() -> Result<ferry_runtime::EngineOptions, InitError> {
    let parse = |what: &str, v: &str| {
        v.trim()
            .parse()
            .map_err(|e| InitError::Read(format!("{what}: {e}")))
    };
    let choice = match std::env::var("FERRY_ENGINE") {
        Ok(v) if !v.trim().is_empty() => parse("FERRY_ENGINE", &v)?,
        _ => match exe_dir().map(|d| d.join(ENGINE_FILE)) {
            Some(path) if path.is_file() => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| InitError::Read(format!("cannot read {}: {e}", path.display())))?;
                parse(&path.display().to_string(), &text)?
            }
            _ => ferry_runtime::EngineChoice::Auto,
        },
    };
    Ok(ferry_runtime::EngineOptions {
        choice,
        onnxruntime: None,
    })
}

/// Finds, verifies and loads the bundle.
pub fn load() -> Result<Session, InitError> {
    let path = locate_bundle()?;
    let trust = trust_policy()?;
    let engines = engine_options()?;
    let bytes = std::fs::read(&path)
        .map_err(|e| InitError::Read(format!("cannot read {}: {e}", path.display())))?;
    Session::load_with(&bytes, &trust, &engines).map_err(InitError::Bundle)
}

/// Reports an init failure to the Runtime API
/// (`POST /2018-06-01/runtime/init/error`), so Lambda shows the cause.
/// `lambda_runtime` has no public call for it, and the API is plain HTTP/1.1
/// on a local address, so a blocking request does.
pub fn report_init_error(e: &InitError) -> Result<(), String> {
    let api = std::env::var("AWS_LAMBDA_RUNTIME_API")
        .map_err(|_| "AWS_LAMBDA_RUNTIME_API is not set".to_string())?;
    let api = api.trim_start_matches("http://");
    let (host, base) = match api.find('/') {
        Some(i) => (&api[..i], api[i..].trim_end_matches('/')),
        None => (api, ""),
    };
    let body = serde_json::json!({ "errorMessage": e.to_string(), "errorType": e.code(), "stackTrace": [] }).to_string();
    let request = format!(
        "POST {base}/2018-06-01/runtime/init/error HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Lambda-Runtime-Function-Error-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        e.code(),
        body.len()
    );
    let mut stream =
        std::net::TcpStream::connect(host).map_err(|e| format!("cannot connect to {host}: {e}"))?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    match answer.split(' ').nth(1) {
        Some(code) if code.starts_with('2') => Ok(()),
        other => Err(format!("Runtime API answered {other:?}")),
    }
}
