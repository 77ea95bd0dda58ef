//! Lambda cold start: process start → ready for the first invocation (first
//! `GET .../invocation/next`) and → first response, for the digits bundle
//! (portable and with a precompiled guest), against a Python handler that
//! imports onnxruntime, creates a session for the same model and answers
//! one prediction; and warm invocation latency vs an in-process
//! `Session::infer`. Run: `cargo bench -p ferry-lambda --bench cold_start`
//! (needs `ferry` built beside `bootstrap`, and `pip install onnxruntime`
//! for the Python side). Prints Markdown for docs/PERFORMANCE.md.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::bench::{ferry_ok as ferry, median};
use ferry_testkit::fixtures::examples;
use ferry_testkit::lambda::{Outcome, RuntimeApi};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Starts `bootstrap` as Lambda would, against `api`.
fn spawn_bootstrap(api: &RuntimeApi, bundle: &str, public: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_bootstrap"))
        .env_clear()
        .env("AWS_LAMBDA_FUNCTION_NAME", "bench")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_RUNTIME_API", &api.addr)
        .env("FERRY_BUNDLE", bundle)
        .env("FERRY_PUBLIC_KEYS", public)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// One cold start: (ready, first response), from spawning the process.
fn cold_start(bundle: &str, public: &str, event: &serde_json::Value) -> (Duration, Duration) {
    let api = RuntimeApi::start();
    let start = Instant::now();
    let mut child = spawn_bootstrap(&api, bundle, public);
    let out = api.invoke(event.clone());
    let first_response = start.elapsed();
    assert!(matches!(out, Outcome::Response { .. }), "{out:?}");
    let ready = api
        .first_next
        .lock()
        .unwrap()
        .expect("asked for an invocation")
        - start;
    let _ = child.kill();
    let _ = child.wait();
    (ready, first_response)
}

const PYTHON_HANDLER: &str = r#"
import sys, time, json
t0 = time.perf_counter()
import numpy as np
import onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
t1 = time.perf_counter()
x = np.zeros((1, 1, 8, 8), dtype=np.float32)
out = sess.run(None, {sess.get_inputs()[0].name: x})
print(json.dumps({"init_ms": (t1 - t0) * 1e3}))
"#;

fn main() {
    let quick = std::env::args().any(|a| a == "--test" || a == "--quick");
    let runs = if quick { 1 } else { 10 };
    let dir = tempfile::tempdir().unwrap();
    let p = |rel: &str| dir.path().join(rel).to_string_lossy().into_owned();
    ferry(&["keygen", "-o", &p("k")]);
    let digits = examples().join("digits").to_string_lossy().into_owned();
    ferry(&[
        "pack",
        &digits,
        "--key",
        &p("k.key"),
        "-o",
        &p("portable.ferry"),
    ]);
    ferry(&[
        "pack",
        &digits,
        "--key",
        &p("k.key"),
        "-o",
        &p("pre.ferry"),
        "--precompile",
        std::env::consts::ARCH,
    ]);
    let png = std::fs::read(examples().join("digits/golden/digit_3.png")).unwrap();
    use base64::Engine as _;
    let event =
        serde_json::json!({ "image": base64::engine::general_purpose::STANDARD.encode(&png) });

    println!(
        "## Lambda cold start (digits; process spawn → ready / → first response; median of {runs})\n"
    );
    println!("| function | ready ms | first response ms |");
    println!("|---|---|---|");
    for (label, bundle) in [
        ("ferry bootstrap, precompiled guest", "pre.ferry"),
        ("ferry bootstrap, portable bundle", "portable.ferry"),
    ] {
        let (mut ready, mut first) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (r, f) = cold_start(&p(bundle), &p("k.pub"), &event);
            ready.push(r);
            first.push(f);
        }
        println!(
            "| {label} | {:.1} | {:.1} |",
            ms(median(ready)),
            ms(median(first))
        );
    }
    let model = examples().join("digits/model.onnx");
    let mut py = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let o = Command::new("python3")
            .args(["-c", PYTHON_HANDLER, model.to_str().unwrap()])
            .output()
            .unwrap();
        if !o.status.success() {
            println!(
                "| python3 + onnxruntime | (skipped: {}) | |",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            py.clear();
            break;
        }
        py.push(start.elapsed());
    }
    if !py.is_empty() {
        println!(
            "| python3 + onnxruntime (import, session, one run; whole process) | | {:.1} |",
            ms(median(py))
        );
    }

    println!("\n## Warm invocation vs in-process Session::infer (digits, precompiled)\n");
    let api = RuntimeApi::start();
    let mut child = spawn_bootstrap(&api, &p("pre.ferry"), &p("k.pub"));
    let trust = ferry_runtime::TrustPolicy::new(
        ferry_runtime::PublicKey::all_from_pem(&std::fs::read_to_string(p("k.pub")).unwrap())
            .unwrap(),
    )
    .unwrap();
    let session =
        ferry_runtime::Session::load(&std::fs::read(p("pre.ferry")).unwrap(), &trust).unwrap();
    let body = event.to_string();
    let n = if quick { 3 } else { 300 };
    let (mut warm, mut local) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let out = api.invoke(event.clone());
        warm.push(t.elapsed());
        assert!(matches!(out, Outcome::Response { .. }));
        let t = Instant::now();
        std::hint::black_box(session.infer("application/json", body.as_bytes()).unwrap());
        local.push(t.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();
    let (w, l) = (median(warm), median(local));
    println!("| path | median µs |\n|---|---|");
    println!(
        "| in-process Session::infer | {:.1} |",
        l.as_secs_f64() * 1e6
    );
    println!(
        "| warm invocation through the Runtime API on loopback | {:.1} |",
        w.as_secs_f64() * 1e6
    );
    println!(
        "\nratio warm / in-process: {:.2}",
        w.as_secs_f64() / l.as_secs_f64()
    );
}
