//! Running the real `ferry` CLI and reading what it did.

use std::process::{Command, Output};

use crate::fixtures::workspace_bin;

/// The clock of every `ferry` run: bundles packed by the tests are
/// reproducible (`created` comes from `SOURCE_DATE_EPOCH`).
pub const SOURCE_DATE_EPOCH: &str = "1700000000";

/// Runs the real `ferry` binary with `args` (see [`ferry_env`]).
pub fn ferry(args: &[&str]) -> Output {
    ferry_env(args, &[])
}

/// Runs the real `ferry` binary with `args` and extra environment
/// variables, `SOURCE_DATE_EPOCH` set and `FERRY_PUB` removed (keys come
/// from the command line unless a test sets it).
pub fn ferry_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let path = workspace_bin("ferry");
    assert!(
        path.exists(),
        "{} is missing: run the workspace's tests (cargo test --workspace), which build the packager too",
        path.display()
    );
    let mut cmd = Command::new(path);
    cmd.args(args)
        .env_remove("FERRY_PUB")
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("ferry runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts an exit code, showing the output when it differs.
#[track_caller]
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}
