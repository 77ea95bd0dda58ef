//! What the workspace gives the tests: its example projects, its built
//! binaries, and real bundles packed from the examples by the real `ferry`,
//! once per test process, with bad bundles derived from them.
//!
//! [`bundles`] makes the keys at once and packs each set of bundles below
//! the first time one of its files is asked for, so a test binary only
//! packs what its tests use. Every file lives in one temporary directory
//! that lasts as long as the process.
//!
//! The examples, as `ferry pack <project> --key release.key` makes them
//! (fleet and channel `default`, sequence 1):
//!
//! | file           | what                                      |
//! |----------------|-------------------------------------------|
//! | `iris.ferry`   | `examples/iris`                           |
//! | `digits.ferry` | `examples/digits`                         |
//! | `raw.ferry`    | `--model examples/iris/model.onnx` only   |
//!
//! Releases: `examples/iris`, fleet `demo`, channel `stable` unless the name
//! says otherwise (`--level 3`):
//!
//! | file                     | what                                              | refused as        |
//! |--------------------------|---------------------------------------------------|-------------------|
//! | `v1.ferry`               | sequence 1                                        |                   |
//! | `v2.ferry`               | sequence 2                                        |                   |
//! | `wrong-fleet.ferry`      | sequence 3, fleet `other`                         | `wrong_fleet`     |
//! | `wrong-channel.ferry`    | sequence 3, channel `beta`                        | `wrong_channel`   |
//! | `untrusted.ferry`        | sequence 3, signed by `untrusted.key` only        | `untrusted_key`   |
//! | `tampered-manifest.ferry`| v2 with one manifest byte flipped                 | `bad_signature`   |
//! | `tampered-payload.ferry` | v2 with the last payload byte flipped             | `digest_mismatch` |
//! | `unsigned.ferry`         | v2 with its signature block removed               | `unsigned`        |
//! | `truncated.ferry`        | the first half of v2                              | `truncated`       |
//! | `golden-fails.ferry`     | sequence 3, validly signed, one golden expected   | `golden_failed`   |
//! |                          | output changed (the `setosa` label)               | (health check)    |
//!
//! And a bad release, packed alone: `digits-v3.ferry` ([`BAD_RELEASE`]).
//!
//! Keys: `release.key`/`release.pub` (trusted, see [`Bundles::trust`]) and
//! `untrusted.key`/`untrusted.pub`. Every pack runs with the clock of
//! [`crate::cli::ferry`] (`SOURCE_DATE_EPOCH`), so the examples are
//! byte-identical to a `ferry pack` of the same project by a test.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferry_format::{
    ArtifactInput, Encoding, HEADER_LEN, Header, PublicKey, ReadLimits, SecretKey, TrustPolicy,
    role, to_cbor, verify, write_bundle,
};
use sha2::{Digest, Sha256};

use crate::cli::{assert_exit, ferry};

/// `examples/iris` (see the module's table).
pub const IRIS: &str = "iris.ferry";
/// `examples/digits`.
pub const DIGITS: &str = "digits.ferry";
/// `examples/iris/model.onnx` packed alone (`ferry pack --model`).
pub const RAW: &str = "raw.ferry";

pub const V1: &str = "v1.ferry";
pub const V2: &str = "v2.ferry";
pub const WRONG_FLEET: &str = "wrong-fleet.ferry";
pub const WRONG_CHANNEL: &str = "wrong-channel.ferry";
pub const UNTRUSTED: &str = "untrusted.ferry";
pub const TAMPERED_MANIFEST: &str = "tampered-manifest.ferry";
pub const TAMPERED_PAYLOAD: &str = "tampered-payload.ferry";
pub const UNSIGNED: &str = "unsigned.ferry";
pub const TRUNCATED: &str = "truncated.ferry";
pub const GOLDEN_FAILS: &str = "golden-fails.ferry";

/// The digits CNN packed for the iris fleet and channel with sequence 3: it
/// passes every check and its golden examples, but iris requests fail on it
/// (a "bad release" for the automatic rollback tests).
pub const BAD_RELEASE: &str = "digits-v3.ferry";

/// The fleet and channel every good release fixture is released to.
pub const FLEET: &str = "demo";
pub const CHANNEL: &str = "stable";

/// The workspace's `examples/`.
pub fn examples() -> PathBuf {
    // Read at run time (every crate sits one level under the workspace
    // root): a test binary reused from a shared target directory may have
    // been compiled from a checkout at another path.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../examples")
}

/// A path under `examples/`, as a string (for command lines).
pub fn example(rel: &str) -> String {
    examples().join(rel).to_string_lossy().into_owned()
}

/// A JSON file, parsed.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A binary of the workspace build (`ferry`, `ferry-agent`, `ferry-fleet`,
/// `bootstrap`): next to the running test binary's `deps/` directory, so it
/// works from every crate's tests and benchmarks. `cargo test --workspace`
/// builds them all.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    dir.join(name)
}

/// SHA-256 of bytes, hex.
/// Every path under `dir` (files and directories), recursively; empty when
/// `dir` does not exist.
pub fn paths_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    out
}

/// What onnxruntime's telemetry would write under a home directory, to check
/// Ferry keeps it off: the environment for a process that must show its own
/// default (everything else cleared, since onnxruntime also turns its
/// telemetry off when it sees a CI system's variables), with `HOME` and
/// `XDG_CACHE_HOME` in `home`.
pub fn telemetry_probe_env(home: &Path) -> Vec<(String, String)> {
    vec![
        ("HOME".into(), home.display().to_string()),
        (
            "XDG_CACHE_HOME".into(),
            home.join("cache").display().to_string(),
        ),
        ("PATH".into(), "/usr/bin:/bin".into()),
    ]
}

/// A fully verified bundle's artifacts as inputs to write it again (with
/// `ferry_format::write_bundle`), each content passed through `edit`, which
/// gets the artifact and its content and returns the content to store: a
/// test changes what it attacks and keeps the rest.
pub fn artifact_inputs(
    v: &ferry_format::VerifiedBundle,
    edit: &mut dyn FnMut(&ferry_format::Artifact, Vec<u8>) -> Vec<u8>,
) -> Vec<ArtifactInput> {
    v.manifest()
        .artifacts
        .iter()
        .zip(v.contents())
        .map(|(a, content)| ArtifactInput {
            role: a.role.clone(),
            media_type: a.media_type.clone(),
            content: edit(
                a,
                content
                    .clone()
                    .expect("a fully verified bundle has every content"),
            ),
            target: a.target.clone(),
            try_shuffle: a.encoding == Encoding::Shuffle4Zstd,
        })
        .collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Bundles packed together, on the first use of any of their files.
#[derive(Debug, Clone, Copy)]
enum Set {
    Examples,
    Releases,
    BadRelease,
}

impl Set {
    const ALL: [Set; 3] = [Set::Examples, Set::Releases, Set::BadRelease];

    fn files(self) -> &'static [&'static str] {
        match self {
            Set::Examples => &[IRIS, DIGITS, RAW],
            Set::Releases => &[
                V1,
                V2,
                WRONG_FLEET,
                WRONG_CHANNEL,
                UNTRUSTED,
                TAMPERED_MANIFEST,
                TAMPERED_PAYLOAD,
                UNSIGNED,
                TRUNCATED,
                GOLDEN_FAILS,
            ],
            Set::BadRelease => &[BAD_RELEASE],
        }
    }

    fn of(name: &str) -> Option<Set> {
        Set::ALL.into_iter().find(|s| s.files().contains(&name))
    }
}

/// The fixture bundles and keys, in one directory that lives as long as
/// the test process.
pub struct Bundles {
    dir: tempfile::TempDir,
    packed: [OnceLock<()>; Set::ALL.len()],
}

/// The fixtures: the keys are made on the first call (milliseconds), each
/// set of bundles on the first use of one of its files (seconds).
pub fn bundles() -> &'static Bundles {
    static B: OnceLock<Bundles> = OnceLock::new();
    B.get_or_init(Bundles::new)
}

/// The example bundles are portable (the guest compiled where it loads): the
/// tests of compiling runtimes use them. The releases carry `ferry pack`'s
/// default precompiled guests, so the lean device builds run them too.
const PORTABLE: &[&str] = &["--precompile", "none"];

/// One `ferry pack` of a fixture.
struct Pack {
    out: &'static str,
    /// What to pack: `[project]` or `["--model", file]`.
    source: Vec<String>,
    key: &'static str,
    /// `--sequence`, `--fleet`, `--channel`, `--level` and such.
    args: &'static [&'static str],
}

impl Bundles {
    fn new() -> Bundles {
        let b = Bundles {
            dir: tempfile::tempdir().unwrap(),
            packed: Default::default(),
        };
        std::fs::create_dir_all(b.dir.path().join("scratch")).unwrap();
        for key in ["release", "untrusted"] {
            let o = ferry(&["keygen", "-o", b.raw(key).to_str().unwrap()]);
            assert_exit(&o, 0);
        }
        b
    }

    /// Packs the set `name` belongs to, unless done.
    fn ensure(&self, name: &str) {
        if let Some(set) = Set::of(name) {
            self.packed[set as usize].get_or_init(|| match set {
                Set::Examples => self.pack_examples(),
                Set::Releases => self.pack_releases(),
                Set::BadRelease => self.pack_bad_release(),
            });
        }
    }

    /// A file's path, without packing anything.
    fn raw(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs the packs on threads of their own.
    fn pack(&self, packs: Vec<Pack>) {
        std::thread::scope(|s| {
            for p in &packs {
                s.spawn(move || {
                    let (key, out) = (self.raw(p.key), self.raw(p.out));
                    let mut args = vec!["pack"];
                    args.extend(p.source.iter().map(String::as_str));
                    args.extend(["--key", key.to_str().unwrap()]);
                    args.extend(["-o", out.to_str().unwrap()]);
                    args.extend(p.args);
                    assert_exit(&ferry(&args), 0);
                });
            }
        });
    }

    fn pack_examples(&self) {
        let project = |name| vec![example(name)];
        self.pack(vec![
            Pack {
                out: IRIS,
                source: project("iris"),
                key: "release.key",
                args: PORTABLE,
            },
            Pack {
                out: DIGITS,
                source: project("digits"),
                key: "release.key",
                args: PORTABLE,
            },
            Pack {
                out: RAW,
                source: vec!["--model".into(), example("iris/model.onnx")],
                key: "release.key",
                args: PORTABLE,
            },
        ]);
    }

    fn pack_bad_release(&self) {
        self.pack(vec![Pack {
            out: BAD_RELEASE,
            source: vec![example("digits")],
            key: "release.key",
            args: &[
                "--sequence",
                "3",
                "--fleet",
                FLEET,
                "--channel",
                CHANNEL,
                "--level",
                "3",
            ],
        }]);
    }

    fn pack_releases(&self) {
        let release = |out, key, args| Pack {
            out,
            source: vec![example("iris")],
            key,
            args,
        };
        self.pack(vec![
            release(
                V1,
                "release.key",
                &[
                    "--sequence",
                    "1",
                    "--fleet",
                    FLEET,
                    "--channel",
                    CHANNEL,
                    "--level",
                    "3",
                ],
            ),
            release(
                V2,
                "release.key",
                &[
                    "--sequence",
                    "2",
                    "--fleet",
                    FLEET,
                    "--channel",
                    CHANNEL,
                    "--level",
                    "3",
                ],
            ),
            release(
                WRONG_FLEET,
                "release.key",
                &[
                    "--sequence",
                    "3",
                    "--fleet",
                    "other",
                    "--channel",
                    CHANNEL,
                    "--level",
                    "3",
                ],
            ),
            release(
                WRONG_CHANNEL,
                "release.key",
                &[
                    "--sequence",
                    "3",
                    "--fleet",
                    FLEET,
                    "--channel",
                    "beta",
                    "--level",
                    "3",
                ],
            ),
            release(
                UNTRUSTED,
                "untrusted.key",
                &[
                    "--sequence",
                    "3",
                    "--fleet",
                    FLEET,
                    "--channel",
                    CHANNEL,
                    "--level",
                    "3",
                ],
            ),
        ]);

        let v2 = std::fs::read(self.raw(V2)).unwrap();
        let header = Header::parse(&v2).unwrap();
        let manifest_end = HEADER_LEN + header.manifest_len;
        let payload_start = v2.len() - header.payload_len as usize;

        let mut tampered = v2.clone();
        tampered[HEADER_LEN + header.manifest_len / 2] ^= 0x01;
        self.write(TAMPERED_MANIFEST, &tampered);

        let mut tampered = v2.clone();
        *tampered.last_mut().unwrap() ^= 0x01;
        self.write(TAMPERED_PAYLOAD, &tampered);

        // The header and manifest with a signature count of 0 (the count is
        // the u16 at bytes 10..12 of the header), then the payload.
        let mut unsigned = v2[..manifest_end].to_vec();
        unsigned[10..12].copy_from_slice(&0u16.to_le_bytes());
        unsigned.extend_from_slice(&v2[payload_start..]);
        self.write(UNSIGNED, &unsigned);

        self.write(TRUNCATED, &v2[..v2.len() / 2]);

        self.write(GOLDEN_FAILS, &self.golden_failing(&v2));
    }

    /// v2 re-signed by the release key with sequence 3 and the `setosa`
    /// golden example expecting the wrong label. `ferry pack` refuses to
    /// write such a bundle, so it is written with the format's own writer.
    fn golden_failing(&self, v2: &[u8]) -> Vec<u8> {
        let v = verify(v2, &self.trust(), &ReadLimits::default()).unwrap();
        let mut golden = v.golden().unwrap();
        let example = golden
            .iter_mut()
            .find(|g| g.name == "setosa")
            .expect("iris has a `setosa` golden example");
        let mut expected: serde_json::Value = serde_json::from_str(&example.expected_json).unwrap();
        expected["predictions"][0]["label"] = "virginica".into();
        example.expected_json = expected.to_string();
        let inputs = artifact_inputs(&v, &mut |a, content| {
            if a.role == role::GOLDEN {
                to_cbor(&golden)
            } else {
                content
            }
        });
        let mut manifest = v.manifest().clone();
        manifest.release.sequence = 3;
        let key = SecretKey::from_pem(&std::fs::read_to_string(self.raw("release.key")).unwrap())
            .unwrap();
        write_bundle(manifest, &inputs, &[&key], 3).unwrap().1
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.raw(name), bytes).unwrap();
    }

    /// The directory holding every fixture (packed or not yet).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fixture's path (`V1`, `IRIS`, `"release.pub"`, ...), packing its
    /// set first if needed.
    pub fn path(&self, name: &str) -> PathBuf {
        self.ensure(name);
        self.raw(name)
    }

    /// [`Bundles::path`] as a string (for command lines and environments).
    pub fn file(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    /// An example's bundle (`"iris"`, `"digits"`, `"raw"`), as a string.
    pub fn bundle(&self, example: &str) -> String {
        self.file(&format!("{example}.ferry"))
    }

    /// The trusted signing key, `release.key`.
    pub fn key(&self) -> String {
        self.file("release.key")
    }

    /// The trusted public key, `release.pub`.
    pub fn public(&self) -> String {
        self.file("release.pub")
    }

    /// A path for a file a test makes itself (a copy to tamper with, a key
    /// of its own), in a directory apart from the fixtures so it can never
    /// overwrite one. Parents are not created.
    pub fn scratch(&self, name: &str) -> String {
        self.raw("scratch")
            .join(name)
            .to_string_lossy()
            .into_owned()
    }

    /// A fixture's bytes.
    pub fn bytes(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// SHA-256 of a fixture file, hex (its identity as a bundle).
    pub fn digest(&self, name: &str) -> String {
        sha256_hex(&self.bytes(name))
    }

    /// The release id of a fixture bundle: SHA-256 of its signed manifest.
    pub fn release(&self, name: &str) -> String {
        ferry_format::release_id_of(&self.bytes(name)).unwrap()
    }

    /// Trusts `release.pub` only.
    pub fn trust(&self) -> TrustPolicy {
        let pem = std::fs::read_to_string(self.path("release.pub")).unwrap();
        TrustPolicy::new(PublicKey::all_from_pem(&pem).unwrap()).unwrap()
    }

    /// Copies a fixture into `dir` (under the same name) and returns the copy.
    pub fn copy_to(&self, name: &str, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let to = dir.join(name);
        std::fs::copy(self.path(name), &to).unwrap();
        to
    }
}

/// A minimal manifest (no artifacts yet) for tests that build bundles by
/// hand with `write_bundle`.
pub fn minimal_manifest() -> ferry_format::Manifest {
    ferry_format::Manifest {
        format_version: ferry_format::FORMAT_VERSION,
        name: "test".into(),
        version: "1".into(),
        description: None,
        created: 0,
        min_runtime: "0.1.0".into(),
        packager: "tests".into(),
        release: ferry_format::Release {
            fleet: "f".into(),
            channel: "c".into(),
            sequence: 1,
        },
        model: ferry_format::ModelInfo {
            format: "onnx".into(),
            inputs: vec![],
            outputs: vec![],
            engines: None,
        },
        pipeline: ferry_format::Pipeline {
            guest: "custom".into(),
            config_json: "{}".into(),
        },
        limits: ferry_format::GuestLimits {
            memory_bytes: 16 << 20,
            timeout_ms: 100,
        },
        drift: Default::default(),
        lineage: ferry_format::Lineage::default(),
        artifacts: vec![],
    }
}
