use ferry_runtime::compare_json;

use ferry_testkit::cli::{assert_exit, ferry, ferry_env, stderr, stdout};
use ferry_testkit::fixtures::{bundles, example, examples, read_json};

/// Every golden example of a project, run through `ferry run`, equals the
/// response computed with onnxruntime (examples/*/train.py) within 1e-5.
fn goldens_match(name: &str) {
    let f = bundles();
    let project: toml::Table =
        toml::from_str(&std::fs::read_to_string(examples().join(name).join("ferry.toml")).unwrap())
            .unwrap();
    let goldens = project["golden"].as_array().unwrap();
    assert!(!goldens.is_empty());
    for g in goldens {
        let input = example(&format!("{name}/{}", g["input"].as_str().unwrap()));
        let expected = read_json(&examples().join(name).join(g["expected"].as_str().unwrap()));
        let o = ferry(&[
            "run",
            &f.bundle(name),
            "--pub",
            &f.public(),
            "--input",
            &input,
            "--json",
        ]);
        assert_exit(&o, 0);
        let actual: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let diff = compare_json(&expected, &actual, 1e-5);
        assert!(diff.is_empty(), "{input}: {diff:?}");
        // The whole response, not a subset: same keys on both sides.
        assert_eq!(
            compare_json(&actual, &expected, 1e-5),
            vec![],
            "{input}: extra keys"
        );
    }
}

#[test]
fn iris_round_trip_matches_onnxruntime() {
    goldens_match("iris");
}

#[test]
fn digits_round_trip_matches_onnxruntime() {
    goldens_match("digits");
}

#[test]
fn bare_model_round_trip_matches_onnxruntime() {
    let f = bundles();
    let o = ferry(&[
        "run",
        &f.bundle("raw"),
        "--pub",
        &f.public(),
        "--input",
        &example("iris/golden/tensor_request.json"),
        "--json",
    ]);
    assert_exit(&o, 0);
    let actual: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let expected = read_json(&examples().join("iris/golden/tensor_request.expected.json"));
    assert_eq!(compare_json(&expected, &actual, 1e-5), vec![]);
}

#[test]
fn human_output_names_the_class() {
    let f = bundles();
    let o = ferry(&[
        "run",
        &f.bundle("iris"),
        "--pub",
        &f.public(),
        "--input",
        &example("iris/golden/setosa.json"),
    ]);
    assert_exit(&o, 0);
    assert!(stdout(&o).starts_with("0: setosa ("), "{}", stdout(&o));
    // A raw PNG and a CSV are inputs too.
    let o = ferry(&[
        "run",
        &f.bundle("digits"),
        "--pub",
        &f.public(),
        "--input",
        &example("digits/golden/digit_7.png"),
        "--json",
    ]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("\"label\":\"7\""), "{}", stdout(&o));
    let o = ferry(&[
        "run",
        &f.bundle("iris"),
        "--pub",
        &f.public(),
        "--input",
        &example("iris/data/iris_test.csv"),
        "--json",
    ]);
    assert_exit(&o, 0);
}

#[test]
fn two_packs_of_the_same_inputs_are_byte_identical() {
    let f = bundles();
    // The portable fixture, packed again.
    let again = f.scratch("iris-again.ferry");
    assert_exit(
        &ferry(&[
            "pack",
            &example("iris"),
            "--key",
            &f.key(),
            "-o",
            &again,
            "--precompile",
            "none",
        ]),
        0,
    );
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(f.bundle("iris")).unwrap()
    );
    // The default pack, with its guests precompiled for three targets, twice.
    let packs = ["iris-default-1.ferry", "iris-default-2.ferry"].map(|name| {
        let out = f.scratch(name);
        assert_exit(
            &ferry(&["pack", &example("iris"), "--key", &f.key(), "-o", &out]),
            0,
        );
        std::fs::read(out).unwrap()
    });
    assert_eq!(packs[0], packs[1]);
}

#[test]
fn verify_and_inspect_describe_the_bundle() {
    let f = bundles();
    let o = ferry(&[
        "verify",
        &f.bundle("digits"),
        "--pub",
        &f.public(),
        "--json",
    ]);
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["name"], "digits");
    assert_eq!(v["fleet"], "demo");
    let o = ferry(&["inspect", &f.bundle("digits"), "--json"]);
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["signatures_verified"], false);
    let roles: Vec<&str> = v["manifest"]["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["model", "guest", "drift-baseline", "golden"]);
    assert_eq!(
        v["manifest"]["model"]["inputs"][0]["shape"],
        serde_json::json!([null, 1, 8, 8])
    );
    let o = ferry(&["inspect", &f.bundle("digits")]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("not verified"));
}

#[test]
fn pack_json_summary_and_key_from_environment() {
    let f = bundles();
    let pem = std::fs::read_to_string(f.key()).unwrap();
    let out = f.scratch("env.ferry");
    let o = ferry_env(
        &[
            "pack",
            &example("iris"),
            "--key-env",
            "MY_KEY",
            "-o",
            &out,
            "--json",
        ],
        &[("MY_KEY", &pem)],
    );
    assert_exit(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["golden"]["passed"], 4);
    assert!(v["digest"].as_str().unwrap().len() == 64);
    assert!(v["timings_ms"]["model_load"].as_f64().is_some());
    // The same key, base64-encoded as CI secret stores like it.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(pem);
    let o = ferry_env(
        &["pack", &example("iris"), "--key-env", "MY_KEY", "-o", &out],
        &[("MY_KEY", &b64)],
    );
    assert_exit(&o, 0);
    assert_exit(&ferry(&["verify", &out, "--pub", &f.public()]), 0);
}

#[test]
fn a_golden_example_off_beyond_tolerance_fails_the_pack_with_a_diff() {
    let f = bundles();
    let dir = tempfile::tempdir().unwrap();
    for entry in ["ferry.toml", "model.onnx"] {
        std::fs::copy(examples().join("iris").join(entry), dir.path().join(entry)).unwrap();
    }
    std::fs::create_dir_all(dir.path().join("golden")).unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::copy(
        examples().join("iris/data/baseline.csv"),
        dir.path().join("data/baseline.csv"),
    )
    .unwrap();
    for g in ["setosa", "versicolor", "virginica", "batch"] {
        std::fs::copy(
            examples().join(format!("iris/golden/{g}.json")),
            dir.path().join(format!("golden/{g}.json")),
        )
        .unwrap();
        std::fs::copy(
            examples().join(format!("iris/golden/{g}.expected.json")),
            dir.path().join(format!("golden/{g}.expected.json")),
        )
        .unwrap();
    }
    let path = dir.path().join("golden/versicolor.expected.json");
    let mut v = read_json(&path);
    let score = v["predictions"][0]["score"].as_f64().unwrap();
    v["predictions"][0]["score"] = serde_json::json!(score + 0.01);
    std::fs::write(&path, v.to_string()).unwrap();
    let out = dir.path().join("out.ferry");
    let o = ferry(&[
        "pack",
        dir.path().to_str().unwrap(),
        "--key",
        &f.key(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_exit(&o, 5);
    let err = stderr(&o);
    assert!(err.contains("golden `versicolor`"), "{err}");
    assert!(err.contains("predictions[0].score: expected"), "{err}");
    assert!(
        !out.exists(),
        "no bundle may be written when a golden example fails"
    );
}

#[test]
fn keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("k/release");
    let o = ferry(&["keygen", "-o", prefix.to_str().unwrap()]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim().len(), 16, "prints the key id");
    let key = dir.path().join("k/release.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert!(
        std::fs::read_to_string(dir.path().join("k/release.pub"))
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    let before = std::fs::read(&key).unwrap();
    let o = ferry(&["keygen", "-o", prefix.to_str().unwrap()]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

fn openssl(args: &[&str]) -> std::process::Output {
    std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs (scripts/test.sh installs it)")
}

#[test]
fn keys_are_exchanged_with_openssl_both_ways() {
    // Issue 10: `ferry keygen` wrote PKCS#8 v2, which `openssl pkey` refused.
    let dir = tempfile::tempdir().unwrap();
    let p = |rel: &str| dir.path().join(rel).to_string_lossy().into_owned();
    assert_exit(&ferry(&["keygen", "-o", &p("ferry")]), 0);
    let o = openssl(&["pkey", "-in", &p("ferry.key"), "-pubout"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        std::fs::read_to_string(p("ferry.pub")).unwrap().trim(),
        "openssl derives the same public key"
    );
    // And a key made by openssl signs a bundle that verifies with the
    // public key openssl derived.
    let o = openssl(&["genpkey", "-algorithm", "ed25519", "-out", &p("ossl.key")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = openssl(&[
        "pkey",
        "-in",
        &p("ossl.key"),
        "-pubout",
        "-out",
        &p("ossl.pub"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bundle = p("ossl.ferry");
    let o = ferry(&[
        "pack",
        "--model",
        &example("iris/model.onnx"),
        "--key",
        &p("ossl.key"),
        "-o",
        &bundle,
    ]);
    assert_exit(&o, 0);
    assert_exit(&ferry(&["verify", &bundle, "--pub", &p("ossl.pub")]), 0);
}

/// The iris example packed with guests precompiled for x86_64 and aarch64,
/// at `name` in the scratch directory.
fn pack_iris_for_x86_64_and_aarch64(name: &str) -> String {
    let f = bundles();
    let out = f.scratch(name);
    let o = ferry(&[
        "pack",
        &example("iris"),
        "--key",
        &f.key(),
        "-o",
        &out,
        "--precompile",
        "x86_64,aarch64",
    ]);
    assert_exit(&o, 0);
    out
}

#[test]
fn precompiled_guests_for_x86_64_and_aarch64_are_stored_and_the_bundle_still_runs() {
    let f = bundles();
    let out = pack_iris_for_x86_64_and_aarch64("pre.ferry");
    let o = ferry(&["inspect", &out, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let targets: Vec<&str> = v["manifest"]["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["role"] == "guest-precompiled")
        .map(|a| a["target"].as_str().unwrap())
        .collect();
    assert_eq!(
        targets,
        [
            "x86_64-unknown-linux-gnu:wasmtime-48.0.8",
            "aarch64-unknown-linux-gnu:wasmtime-48.0.8"
        ]
    );
    let o = ferry(&[
        "run",
        &out,
        "--pub",
        &f.public(),
        "--input",
        &example("iris/golden/setosa.json"),
        "--json",
    ]);
    assert_exit(&o, 0);
    let expected = read_json(&examples().join("iris/golden/setosa.expected.json"));
    let actual: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        ferry_runtime::compare_json(&expected, &actual, 1e-5),
        vec![]
    );
    let o = ferry(&[
        "pack",
        &example("iris"),
        "--key",
        &f.key(),
        "-o",
        &out,
        "--precompile",
        "sparc64-unknown-linux-gnu",
    ]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("sparc64"), "{}", stderr(&o));
}

/// `ferry run` decompresses only the guest precompiled for this machine, but
/// a bundle whose guest for another machine was tampered with is still
/// refused: every stored artifact is checked against the signed manifest.
#[test]
fn a_tampered_guest_for_another_machine_refuses_the_bundle() {
    let f = bundles();
    let out = pack_iris_for_x86_64_and_aarch64("pre-tampered.ferry");
    let bytes = std::fs::read(&out).unwrap();
    let (manifest, _) =
        ferry_runtime::inspect_unverified(&bytes, &ferry_runtime::ReadLimits::default()).unwrap();
    let other = if cfg!(target_arch = "aarch64") {
        "x86_64"
    } else {
        "aarch64"
    };
    let a = manifest
        .artifacts
        .iter()
        .find(|a| a.target.as_deref().is_some_and(|t| t.starts_with(other)))
        .unwrap();
    let payload_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let at = bytes.len() - payload_len + a.offset as usize + a.compressed_size as usize / 2;
    let mut tampered = bytes.clone();
    tampered[at] ^= 0x40;
    let bad = f.scratch("pre-tampered-bad.ferry");
    std::fs::write(&bad, &tampered).unwrap();
    let run = |bundle: &str| {
        ferry(&[
            "run",
            bundle,
            "--pub",
            &f.public(),
            "--input",
            &example("iris/golden/setosa.json"),
        ])
    };
    assert_exit(&run(&out), 0);
    let o = run(&bad);
    assert_exit(&o, 3);
    assert!(
        stderr(&o).contains("guest-precompiled") && stderr(&o).contains("digest"),
        "{}",
        stderr(&o)
    );
}

/// One observed inference: feature names, feature rows, output names.
type Seen = (Vec<String>, Vec<Vec<ferry_runtime::Value>>, Vec<String>);

/// Records what an observer sees.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<Seen>>);

impl ferry_runtime::Observer for Recorder {
    fn observe(&self, o: &ferry_runtime::Observation<'_>) {
        let f = o.features.expect("the standard guest reports features");
        self.0.lock().unwrap().push((
            f.names.iter().map(|(n, _)| n.clone()).collect(),
            f.rows.clone(),
            o.outputs.iter().map(|t| t.name.clone()).collect(),
        ));
    }
}

#[test]
fn an_observer_sees_features_and_outputs_and_sessions_serve_threads() {
    use std::sync::Arc;
    let f = bundles();
    let bytes = std::fs::read(f.bundle("iris")).unwrap();
    let trust = ferry_runtime::TrustPolicy::new(
        ferry_runtime::PublicKey::all_from_pem(&std::fs::read_to_string(f.public()).unwrap())
            .unwrap(),
    )
    .unwrap();
    let recorder = Arc::new(Recorder::default());
    let session = ferry_runtime::Session::load(&bytes, &trust)
        .unwrap()
        .with_observer(recorder.clone());
    let batch = std::fs::read(examples().join("iris/golden/batch.json")).unwrap();
    let expected = read_json(&examples().join("iris/golden/batch.expected.json"));
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..25 {
                    let out: serde_json::Value =
                        serde_json::from_slice(&session.infer("application/json", &batch).unwrap())
                            .unwrap();
                    assert_eq!(ferry_runtime::compare_json(&expected, &out, 1e-5), vec![]);
                }
            });
        }
    });
    let seen = recorder.0.lock().unwrap();
    assert_eq!(seen.len(), 100);
    let (names, rows, outputs) = &seen[0];
    assert_eq!(
        names,
        &["sepal_length", "sepal_width", "petal_length", "petal_width"]
    );
    assert_eq!(rows.len(), 5, "one row per record of the batch");
    let request: serde_json::Value = serde_json::from_slice(&batch).unwrap();
    let first = request["records"][0]["sepal_length"].as_f64().unwrap();
    assert_eq!(
        rows[0][0],
        ferry_runtime::Value::Num(first),
        "raw value, before standardisation"
    );
    assert_eq!(outputs, &["label", "probabilities"]);
    drop(seen);
    // A bad request is not observed and does not disturb the session.
    assert!(
        session
            .infer("application/json", b"{\"records\": []}")
            .unwrap_err()
            .is_bad_input()
    );
    assert_eq!(recorder.0.lock().unwrap().len(), 100);
}
