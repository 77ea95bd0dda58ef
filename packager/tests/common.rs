use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Runs the real `ferry` binary.
pub fn ferry(args: &[&str]) -> Output {
    ferry_env(args, &[])
}

pub fn ferry_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(args)
        .env_remove("FERRY_PUB")
        .env("SOURCE_DATE_EPOCH", "1700000000");
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

/// A key pair and the two example bundles, made once for all tests.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn key(&self) -> String {
        self.path("keys/release.key")
    }
    pub fn public(&self) -> String {
        self.path("keys/release.pub")
    }
    pub fn bundle(&self, name: &str) -> String {
        self.path(&format!("{name}.ferry"))
    }
    pub fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).to_string_lossy().into_owned()
    }
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let f = Fixture {
            dir: tempfile::tempdir().unwrap(),
        };
        assert_exit(&ferry(&["keygen", "-o", &f.path("keys/release")]), 0);
        for name in ["iris", "digits"] {
            let o = ferry(&["pack", &ex(name), "--key", &f.key(), "-o", &f.bundle(name)]);
            assert_exit(&o, 0);
        }
        let o = ferry(&[
            "pack",
            "--model",
            &ex("iris/model.onnx"),
            "--key",
            &f.key(),
            "-o",
            &f.bundle("raw"),
        ]);
        assert_exit(&o, 0);
        f
    })
}

pub fn ex(rel: &str) -> String {
    examples().join(rel).to_string_lossy().into_owned()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}
