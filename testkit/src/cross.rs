//! Agents built for another architecture (the device builds of
//! docs/devices.md), run under qemu-user on the test machine.
//!
//! `.ci/run` cross-builds them and names each binary in an environment
//! variable, `FERRY_CROSS_AGENT_AARCH64` or `FERRY_CROSS_AGENT_ARMV7`. The
//! runner is `qemu-aarch64 -L /usr/aarch64-linux-gnu` or
//! `qemu-arm -L /usr/arm-linux-gnueabihf` (Debian's `qemu-user` with the glibc
//! of `libc6-arm64-cross` / `libc6-armhf-cross`), or the words of
//! `FERRY_CROSS_RUNNER_AARCH64` / `FERRY_CROSS_RUNNER_ARMV7`.
//! `FERRY_CROSS_REQUIRED` (architectures separated by spaces) makes a missing
//! variable an error instead of a skip: what `.ci/run` sets.

use std::path::PathBuf;
use std::process::Command;

/// An agent binary for another architecture and the command that runs it.
#[derive(Debug, Clone)]
pub struct CrossAgent {
    /// `aarch64` or `armv7`.
    pub arch: &'static str,
    pub binary: PathBuf,
    /// The emulator and its arguments, before the binary.
    pub runner: Vec<String>,
}

impl CrossAgent {
    /// The agent for `arch` named by the environment, `None` when its
    /// variable is unset (a run that did not cross-build). A variable that
    /// names no file, a runner that is not installed, or an unset variable
    /// for an architecture `FERRY_CROSS_REQUIRED` names, panics: the run
    /// asked for this architecture and must not pass without it.
    pub fn from_env(arch: &'static str) -> Option<CrossAgent> {
        let (var, runner_var, default_runner) = match arch {
            "aarch64" => (
                "FERRY_CROSS_AGENT_AARCH64",
                "FERRY_CROSS_RUNNER_AARCH64",
                "qemu-aarch64 -L /usr/aarch64-linux-gnu",
            ),
            "armv7" => (
                "FERRY_CROSS_AGENT_ARMV7",
                "FERRY_CROSS_RUNNER_ARMV7",
                "qemu-arm -L /usr/arm-linux-gnueabihf",
            ),
            other => panic!("no cross agent for {other}"),
        };
        let required = std::env::var("FERRY_CROSS_REQUIRED")
            .is_ok_and(|r| r.split_whitespace().any(|a| a == arch));
        let Some(binary) = std::env::var_os(var) else {
            assert!(
                !required,
                "FERRY_CROSS_REQUIRED names {arch} but {var} is not set"
            );
            return None;
        };
        let binary = PathBuf::from(binary);
        assert!(
            binary.is_file(),
            "{var} names {}, which is not a file: build it first (scripts/device-build.sh)",
            binary.display()
        );
        let runner: Vec<String> = std::env::var(runner_var)
            .unwrap_or_else(|_| default_runner.to_string())
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let agent = CrossAgent {
            arch,
            binary,
            runner,
        };
        let version = agent
            .command()
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", agent.runner));
        assert!(
            version.status.success(),
            "{} --version under {:?} failed: {}",
            agent.binary.display(),
            agent.runner,
            String::from_utf8_lossy(&version.stderr)
        );
        Some(agent)
    }

    /// A command that runs the binary under the runner (arguments follow).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.runner[0]);
        command.args(&self.runner[1..]).arg(&self.binary);
        command
    }
}
