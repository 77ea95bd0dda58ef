//! Builds the standard guest (`guest/`, package `ferry-std-guest`) for `wasm32-wasip1` and
//! hands the module to the packager: `include_bytes!(env!("FERRY_STD_GUEST_WASM"))`.
//!
//! The guest is built by a nested `cargo build` with its own target directory (next to this
//! build's, so it is reused across builds) and its own settings, so nothing of the host build
//! leaks into it: the bytes of the module go into signed bundles and must be the same on every
//! machine that builds the same source with the same toolchain. To that end the nested build
//! - drops the environment that configures the outer build (`RUSTFLAGS`, `CARGO_PROFILE_*`,
//!   `CARGO_BUILD_TARGET`, the jobserver, `RUSTC_WORKSPACE_WRAPPER` from `cargo clippy`, ...);
//! - fixes its profile with `--config` (optimised, fat LTO, one codegen unit, no debug info,
//!   symbols stripped; the `ferry_*` exports survive stripping);
//! - remaps the checkout, the cargo home and the target directory out of every embedded path
//!   (panic locations) with `--remap-path-prefix`.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The guest's target.
const TARGET: &str = "wasm32-wasip1";
/// The guest's package, and the file its build produces.
const PACKAGE: &str = "ferry-std-guest";
const ARTIFACT: &str = "ferry_std_guest.wasm";

/// The nested build's profile. Level 3 rather than "s": in wasmtime it makes image
/// preprocessing about 2.5x and a tabular call about 20% faster, for about 10% more bytes.
const PROFILE: &[&str] = &[
    "profile.release.opt-level=3",
    "profile.release.lto=\"fat\"",
    "profile.release.codegen-units=1",
    "profile.release.debug=false",
    "profile.release.strip=\"symbols\"",
    "profile.release.incremental=false",
    "profile.release.debug-assertions=false",
    "profile.release.package.\"*\".opt-level=3",
];

fn main() {
    if let Err(message) = run() {
        // One line per `cargo::error`, so multi-line messages stay readable; then a failing
        // exit status, so cargo also shows the nested build's output (this script's stderr).
        for line in message.lines() {
            println!("cargo::error={line}");
        }
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .ok_or("packager/ has no parent directory")?
        .to_path_buf();
    let out_dir = PathBuf::from(var("OUT_DIR")?);

    for path in ["guest", "guest-abi", "Cargo.toml", "Cargo.lock"] {
        println!("cargo::rerun-if-changed={}", workspace.join(path).display());
    }

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    check_target_installed(&rustc)?;

    let target_dir = guest_target_dir(&out_dir);
    let cargo_home = cargo_home();
    let mut rustflags = vec!["-Cdebuginfo=0".to_owned(), "-Cstrip=symbols".to_owned()];
    // The last matching prefix wins: most specific (the target dir may be in the checkout) last.
    for (from, to) in [
        (Some(&workspace), "/ferry"),
        (cargo_home.as_ref(), "/cargo"),
        (Some(&target_dir), "/target"),
    ] {
        if let Some(from) = from {
            rustflags.push(format!("--remap-path-prefix={}={to}", from.display()));
        }
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(workspace.join("guest").join("Cargo.toml"))
        .args(["-p", PACKAGE, "--release", "--locked", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    for setting in PROFILE {
        cmd.args(["--config", setting]);
    }
    for (key, _) in env::vars_os() {
        if key.to_str().is_none_or(leaks_into_nested_build) {
            cmd.env_remove(key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"));
    // The nested cargo's stdout must not be read as build script instructions.
    cmd.stdout(Stdio::from(std::io::stderr()));

    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", cargo.display()))?;
    if !status.success() {
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        return Err(format!(
            "building the standard guest failed ({status}); the nested cargo's output is under \"--- stderr\".\n\
             The command: CARGO_ENCODED_RUSTFLAGS={:?} {} {}",
            rustflags.join("\x1f"),
            cargo.display(),
            args.join(" ")
        ));
    }

    let built = target_dir.join(TARGET).join("release").join(ARTIFACT);
    // A copy per build of this package: a concurrent build of another profile that rebuilds
    // the shared guest cannot change the bytes under this one's `include_bytes!`.
    let wasm = out_dir.join(ARTIFACT);
    std::fs::copy(&built, &wasm)
        .map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), wasm.display()))?;
    println!("cargo::rustc-env=FERRY_STD_GUEST_WASM={}", wasm.display());
    Ok(())
}

fn var(key: &str) -> Result<String, String> {
    env::var(key).map_err(|_| format!("{key} is not set (this build script runs under cargo)"))
}

/// Fails with instructions when the standard library for the guest's target is missing.
fn check_target_installed(rustc: &OsString) -> Result<(), String> {
    let output = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", rustc.display()))?;
    let libdir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if output.status.success() && !libdir.is_empty() && Path::new(&libdir).is_dir() {
        return Ok(());
    }
    Err(format!(
        "the standard guest needs the {TARGET} target: run `rustup target add {TARGET}`\n\
         ({} --print target-libdir --target {TARGET} gave {:?})",
        rustc.display(),
        libdir
    ))
}

/// `<target>/guest-wasm` (beside `debug/` and `release/`, shared by both: the nested build is
/// always a release build), found as the parent of the `build` directory holding `OUT_DIR`;
/// else a directory in `OUT_DIR`.
fn guest_target_dir(out_dir: &Path) -> PathBuf {
    let build_dir = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"));
    match build_dir.and_then(Path::parent).and_then(Path::parent) {
        Some(target) => target.join("guest-wasm"),
        None => out_dir.join("guest-wasm"),
    }
}

/// Where cargo keeps registry sources, to remap out of embedded paths.
fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

/// Whether an environment variable of the outer build would change the nested one.
fn leaks_into_nested_build(key: &str) -> bool {
    // Where and how cargo fetches and prints: the nested build should do as the outer one.
    const KEEP_PREFIXES: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_SOURCE_",
        "CARGO_TERM_",
        "CARGO_BUILD_JOBS",
    ];
    if key.starts_with("CARGO_") {
        // Flags, profiles, target, target dir, incremental, jobserver, and everything cargo
        // sets for build scripts (CARGO_PKG_*, CARGO_CFG_*, CARGO_FEATURE_*, CARGO_MANIFEST_*).
        return !KEEP_PREFIXES.iter().any(|p| key.starts_with(p));
    }
    matches!(
        key,
        "RUSTFLAGS"
            | "RUSTDOCFLAGS"
            | "RUSTC_WORKSPACE_WRAPPER"
            | "MAKEFLAGS"
            | "MFLAGS"
            | "TARGET"
            | "HOST"
            | "OUT_DIR"
            | "OPT_LEVEL"
            | "PROFILE"
            | "DEBUG"
            | "NUM_JOBS"
            | "RUSTC_LINKER"
    )
}
