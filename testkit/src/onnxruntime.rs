//! The onnxruntime library for the engine tests. `scripts/test.sh` takes
//! `libonnxruntime.so.1.*` from the PyPI `onnxruntime` wheel, exports its
//! path as `FERRY_ONNXRUNTIME` and sets `FERRY_REQUIRE_ONNXRUNTIME=1`. A
//! test that needs the library calls [`library`]: without it, the test says
//! so on stderr and skips its onnxruntime part, unless the library is
//! required, when it fails (CI never skips silently).

use std::path::PathBuf;

/// Set to `1` where the library must be present (CI, `scripts/test.sh`).
pub const REQUIRE_ENV: &str = "FERRY_REQUIRE_ONNXRUNTIME";

/// The library's path, or `None` (said on stderr) when this machine has none
/// and does not require it. Panics when it is required and absent.
pub fn library(test: &str) -> Option<PathBuf> {
    let set = std::env::var_os("FERRY_ONNXRUNTIME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let why = match set {
        Some(p) if p.is_file() => return Some(p),
        Some(p) => format!("FERRY_ONNXRUNTIME={} does not exist", p.display()),
        None => "FERRY_ONNXRUNTIME is not set".to_string(),
    };
    if required() {
        panic!("{test} needs onnxruntime and {REQUIRE_ENV}=1, but {why}");
    }
    eprintln!(
        "{test}: the onnxruntime part is skipped: {why} (scripts/test.sh installs the library)"
    );
    None
}

/// Whether this run must have the library.
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}
