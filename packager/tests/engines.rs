//! Engines through the real `ferry`: `ferry pack` says which engines can
//! serve a model and records it (signed); a model tract refuses packs and
//! runs on onnxruntime; the examples pass their golden examples on both;
//! asking for onnxruntime without its library is a clear error. Tests that
//! need the library take it from `FERRY_ONNXRUNTIME` (see
//! `ferry_testkit::onnxruntime`).

use std::path::Path;

use ferry_testkit::cli::{assert_exit, ferry_env, stderr, stdout};
use ferry_testkit::fixtures::{
    bundles, example, examples, paths_under, telemetry_probe_env, workspace_bin,
};
use ferry_testkit::onnxruntime::library;

/// No onnxruntime anywhere: the variable set empty (the binary's directory
/// has no library).
const NO_LIBRARY: (&str, &str) = ("FERRY_ONNXRUNTIME", "");

fn fixture(name: &str) -> String {
    examples()
        .join("../runtime/tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = Path::new(&bundles().scratch(name)).to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_model_tract_refuses_packs_where_onnxruntime_is_and_runs_on_it() {
    let f = bundles();
    let dir = scratch_dir("sequence");
    let out = dir.join("seq.ferry").to_string_lossy().into_owned();
    let model = fixture("sequence_concat.onnx");
    // Without onnxruntime, no engine can serve it: the packer says why.
    let o = ferry_env(
        &["pack", "--model", &model, "--key", &f.key(), "-o", &out],
        &[NO_LIBRARY],
    );
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(err.contains("no engine can serve the model"), "{err}");
    assert!(err.contains("SequenceConstruct"), "{err}");
    assert!(err.contains("onnxruntime: not checked"), "{err}");
    assert!(!Path::new(&out).exists());

    let Some(lib) = library("a_model_tract_refuses_packs_where_onnxruntime_is_and_runs_on_it")
    else {
        return;
    };
    let lib = lib.to_string_lossy().into_owned();
    let with_lib = ("FERRY_ONNXRUNTIME", lib.as_str());
    let o = ferry_env(
        &["pack", "--model", &model, "--key", &f.key(), "-o", &out],
        &[with_lib],
    );
    assert_exit(&o, 0);
    let text = stdout(&o);
    assert!(
        text.contains("engine tract: cannot serve the model"),
        "{text}"
    );
    assert!(
        text.contains("engine onnxruntime: can serve the model"),
        "{text}"
    );
    // The manifest records it, under the signature.
    let o = ferry_env(&["inspect", &out, "--pub", &f.public(), "--json"], &[]);
    assert_exit(&o, 0);
    let m: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let engines = &m["manifest"]["model"]["engines"];
    assert_eq!(engines["preference"], "auto", "{m}");
    assert_eq!(engines["engines"][0]["name"], "tract", "{m}");
    assert_eq!(engines["engines"][0]["serves"], false, "{m}");
    assert_eq!(engines["engines"][1]["name"], "onnxruntime", "{m}");
    assert_eq!(engines["engines"][1]["serves"], true, "{m}");

    let request = dir.join("x.json");
    std::fs::write(
        &request,
        r#"{"inputs": {"x": {"shape": [1, 4], "data": [1, -2, 3.5, 0]}}}"#,
    )
    .unwrap();
    let request = request.to_string_lossy().into_owned();
    let public = f.public();
    let run = |extra: &[&str], env: (&str, &str)| {
        let mut args = vec!["run", &out, "--pub", &public, "-i", &request, "--json"];
        args.extend_from_slice(extra);
        ferry_env(&args, &[env])
    };
    let o = run(&[], with_lib);
    assert_exit(&o, 0);
    let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        r["outputs"]["y"]["data"],
        serde_json::json!([1.0, -2.0, 3.5, 0.0, 2.0, -4.0, 7.0, 0.0]),
        "{r}"
    );
    // Where onnxruntime is absent, or tract is asked for: refused, saying why.
    let o = run(&[], NO_LIBRARY);
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(err.contains("no engine here can serve this model"), "{err}");
    assert!(err.contains("tract cannot"), "{err}");
    let o = run(&["--engine", "tract"], with_lib);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("tract was asked for and cannot serve"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn the_examples_pass_their_golden_examples_on_both_engines() {
    let Some(lib) = library("the_examples_pass_their_golden_examples_on_both_engines") else {
        return;
    };
    let lib = lib.to_string_lossy().into_owned();
    let f = bundles();
    let dir = scratch_dir("both");
    for name in ["iris", "digits"] {
        let out = dir
            .join(format!("{name}.ferry"))
            .to_string_lossy()
            .into_owned();
        let o = ferry_env(
            &[
                "pack",
                &example(name),
                "--key",
                &f.key(),
                "-o",
                &out,
                "--json",
            ],
            &[("FERRY_ONNXRUNTIME", &lib)],
        );
        assert_exit(&o, 0);
        let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        // `serves` is true only when the engine passed the golden examples.
        for (i, engine) in ["tract", "onnxruntime"].iter().enumerate() {
            assert_eq!(s["engines"]["engines"][i]["name"], *engine, "{s}");
            assert_eq!(s["engines"]["engines"][i]["serves"], true, "{name}: {s}");
        }
        assert!(s["golden"]["passed"].as_u64().unwrap() > 0, "{s}");
    }
    // The same answer from each engine, and `bench` says which one ran.
    let digits = dir.join("digits.ferry").to_string_lossy().into_owned();
    let mut answers = Vec::new();
    for engine in ["tract", "onnxruntime"] {
        let o = ferry_env(
            &[
                "bench",
                &digits,
                "--pub",
                &f.public(),
                "-i",
                &example("digits/golden/digit_3.png"),
                "--engine",
                engine,
                "--seconds",
                "0.02",
                "--json",
            ],
            &[("FERRY_ONNXRUNTIME", &lib)],
        );
        assert_exit(&o, 0);
        let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(r["engine"], engine, "{r}");
        let o = ferry_env(
            &[
                "run",
                &digits,
                "--pub",
                &f.public(),
                "-i",
                &example("digits/golden/digit_3.png"),
                "--engine",
                engine,
                "--json",
            ],
            &[("FERRY_ONNXRUNTIME", &lib)],
        );
        assert_exit(&o, 0);
        let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        answers.push(r["predictions"][0]["class"].clone());
    }
    assert_eq!(answers, vec![serde_json::json!(3), serde_json::json!(3)]);
    // `auto` with both present measures both on load and keeps tract unless
    // onnxruntime is 1.25x faster (which one is the machine's business: the report must agree with itself).
    let o = ferry_env(
        &[
            "bench",
            &digits,
            "--pub",
            &f.public(),
            "-i",
            &example("digits/golden/digit_3.png"),
            "--seconds",
            "0.02",
            "--json",
        ],
        &[("FERRY_ONNXRUNTIME", &lib)],
    );
    assert_exit(&o, 0);
    let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let race = r["engine_race"].as_array().unwrap();
    assert_eq!(race.len(), 2, "{r}");
    let fastest = race
        .iter()
        .min_by(|a, b| {
            a["median_us"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["median_us"].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(r["engine"], fastest["engine"], "{r}");
    assert!(r["cold"]["engine_race_ms"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn asking_for_onnxruntime_without_its_library_is_a_clear_error() {
    let f = bundles();
    let o = ferry_env(
        &[
            "run",
            &f.bundle("iris"),
            "--pub",
            &f.public(),
            "-i",
            &example("iris/golden/setosa.json"),
            "--engine",
            "onnxruntime",
        ],
        &[NO_LIBRARY],
    );
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(err.contains("onnxruntime is not available"), "{err}");
    assert!(err.contains("FERRY_ONNXRUNTIME is not set"), "{err}");
    // A configured path that is not there is named.
    let o = ferry_env(
        &[
            "run",
            &f.bundle("iris"),
            "--pub",
            &f.public(),
            "-i",
            &example("iris/golden/setosa.json"),
            "--engine",
            "onnxruntime",
            "--onnxruntime",
            "/nonexistent/libonnxruntime.so",
        ],
        &[],
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("/nonexistent/libonnxruntime.so"),
        "{}",
        stderr(&o)
    );
}

/// `ferry init` on a model only onnxruntime runs: it scaffolds the project
/// from the model's declared inputs and outputs and says which engines can
/// serve it; without onnxruntime it says why nothing can (it used to load
/// the model with tract alone and refuse it).
#[test]
fn ferry_init_scaffolds_a_model_only_onnxruntime_runs() {
    let dir = scratch_dir("init-sequence");
    let project = dir.join("project").to_string_lossy().into_owned();
    let model = fixture("sequence_concat.onnx");
    let o = ferry_env(&["init", &model, "-o", &project], &[NO_LIBRARY]);
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(err.contains("no engine can serve the model"), "{err}");
    assert!(err.contains("SequenceConstruct"), "{err}");
    assert!(err.contains("onnxruntime: not checked"), "{err}");
    assert!(!Path::new(&project).join("ferry.toml").exists());

    let Some(lib) = library("ferry_init_scaffolds_a_model_only_onnxruntime_runs") else {
        return;
    };
    let lib = lib.to_string_lossy().into_owned();
    let o = ferry_env(
        &["init", &model, "-o", &project],
        &[("FERRY_ONNXRUNTIME", lib.as_str())],
    );
    assert_exit(&o, 0);
    let err = stderr(&o);
    assert!(
        err.contains("engine tract: cannot serve the model"),
        "{err}"
    );
    assert!(err.contains("engine onnxruntime: loads the model"), "{err}");
    let toml = std::fs::read_to_string(Path::new(&project).join("ferry.toml")).unwrap();
    assert!(toml.contains("x f32 [N, 4]"), "{toml}");
    assert!(toml.contains("y f32 [N, 8]"), "{toml}");
    // And the project packs and serves on onnxruntime.
    let f = bundles();
    let out = dir.join("seq.ferry").to_string_lossy().into_owned();
    let o = ferry_env(
        &[
            "pack",
            &project,
            "--key",
            &f.key(),
            "-o",
            &out,
            "--precompile",
            "none",
        ],
        &[("FERRY_ONNXRUNTIME", lib.as_str())],
    );
    assert_exit(&o, 0);
}

/// tract panics optimising the GRU fixture for a batch of 3 (see
/// `runtime/tests/model.rs`, `an_engine_panic_is_an_error_not_a_crash`).
/// Through the real `ferry run`, that request fails with a clear error
/// (exit 1, the panic's message in it) and nothing else on stderr: not the
/// default panic hook's "thread ... panicked at" report with its backtrace
/// hint, which reads like a crash of the program.
#[test]
fn an_engine_panic_is_one_clear_error_on_stderr() {
    let f = bundles();
    let dir = scratch_dir("gru");
    let out = dir.join("gru.ferry").to_string_lossy().into_owned();
    let o = ferry_env(
        &[
            "pack",
            "--model",
            &fixture("gru.onnx"),
            "--key",
            &f.key(),
            "-o",
            &out,
            "--engine",
            "tract",
        ],
        &[NO_LIBRARY],
    );
    assert_exit(&o, 0);
    let input = dir.join("batch3.npy");
    let values: Vec<f32> = (0..45).map(|i| i as f32 / 45.0).collect();
    std::fs::write(&input, ferry_testkit::tensors::npy_f32(&[3, 5, 3], &values)).unwrap();
    let o = ferry_env(
        &[
            "run",
            &out,
            "--pub",
            &f.public(),
            "--input",
            input.to_str().unwrap(),
            "--engine",
            "tract",
        ],
        &[NO_LIBRARY],
    );
    assert_exit(&o, 1);
    let err = stderr(&o);
    assert!(err.contains("tract panicked while"), "{err}");
    assert!(!err.contains("panicked at"), "{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
}

#[test]
fn onnxruntime_keeps_no_telemetry_store_or_device_id_unless_the_user_asks() {
    // onnxruntime's PyPI builds (1.32 checked) start Microsoft's 1DS telemetry when the
    // library initialises: a persistent device id and an offline event store (SQLite) under
    // ~/.cache/Microsoft/DeveloperTools, uploaded when the network allows, whatever
    // `DisableTelemetryEvents` says afterwards. Ferry turns it off before loading the library
    // (ORT_DISABLE_TELEMETRY=1) unless the environment already decides. The environment is
    // cleared: onnxruntime also stays quiet when it sees a CI system's variables.
    let Some(lib) =
        library("onnxruntime_keeps_no_telemetry_store_or_device_id_unless_the_user_asks")
    else {
        return;
    };
    let lib = lib.to_string_lossy().into_owned();
    let f = bundles();
    let run = |home: &Path, extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(workspace_bin("ferry"));
        cmd.args([
            "run",
            &f.bundle("digits"),
            "--pub",
            &f.public(),
            "--input",
            &example("digits/golden/digit_3.png"),
            "--engine",
            "onnxruntime",
        ])
        .env_clear()
        .envs(telemetry_probe_env(home))
        .env("FERRY_ONNXRUNTIME", &lib)
        .envs(extra.iter().copied());
        let o = cmd.output().unwrap();
        assert_exit(&o, 0);
        paths_under(home)
    };
    let quiet = scratch_dir("telemetry/default");
    let written = run(&quiet, &[]);
    assert!(written.is_empty(), "onnxruntime wrote {written:?}");
    // The user's own choice stands: with telemetry on, the store appears (which also shows
    // this test would see it). Any upload goes to a closed loopback port (the library sends
    // with libcurl, which honours the proxy variables).
    let chosen = scratch_dir("telemetry/on");
    let closed = "http://127.0.0.1:9";
    let written = run(
        &chosen,
        &[
            ("ORT_DISABLE_TELEMETRY", "0"),
            ("https_proxy", closed),
            ("HTTPS_PROXY", closed),
            ("http_proxy", closed),
            ("ALL_PROXY", closed),
        ],
    );
    assert!(
        written
            .iter()
            .any(|p| p.to_string_lossy().contains("Microsoft/DeveloperTools")),
        "{written:?}"
    );
}
