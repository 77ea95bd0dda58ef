//! The real `bootstrap` binary against a Runtime API server on loopback that
//! follows AWS's documented protocol: `GET /2018-06-01/runtime/invocation/next`
//! (with its headers), `POST .../invocation/{id}/response`,
//! `POST .../invocation/{id}/error`, `POST /2018-06-01/runtime/init/error`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use ferry_runtime::compare_json;
use ferry_testkit::cli::ferry;
use ferry_testkit::fixtures::{bundles, examples, read_json};
use ferry_testkit::lambda::{Outcome, RuntimeApi, WAIT};
use serde_json::{Value, json};

/// A running `bootstrap`, its stdout lines collected.
struct Function {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(api: &RuntimeApi, env: &[(&str, &str)]) -> Function {
    start_at(Path::new(env!("CARGO_BIN_EXE_bootstrap")), api, env)
}

fn start_at(bootstrap: &Path, api: &RuntimeApi, env: &[(&str, &str)]) -> Function {
    let mut cmd = Command::new(bootstrap);
    cmd.env_clear()
        .env("AWS_LAMBDA_FUNCTION_NAME", "ferry-test")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_RUNTIME_API", &api.addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Function { child, lines }
}

fn iris(api: &RuntimeApi) -> Function {
    example_function(api, "iris")
}

/// The function serving an example's bundle (`iris`, `raw`: tensors in, the model's
/// outputs out), trusting the release key.
fn example_function(api: &RuntimeApi, example: &str) -> Function {
    let b = bundles();
    start(
        api,
        &[
            ("FERRY_BUNDLE", &b.bundle(example)),
            ("FERRY_PUBLIC_KEYS", &b.file("release.pub")),
        ],
    )
}

fn read(rel: &str) -> Value {
    read_json(&examples().join(rel))
}

fn http_v2(body: &str, content_type: &str, base64: bool) -> Value {
    json!({
        "version": "2.0",
        "routeKey": "POST /predict",
        "rawPath": "/predict",
        "headers": {"content-type": content_type},
        "requestContext": {"http": {"method": "POST", "path": "/predict"}, "requestId": "abc"},
        "body": body,
        "isBase64Encoded": base64,
    })
}

fn response_body(outcome: &Outcome) -> (u64, Value) {
    let Outcome::Response { body, .. } = outcome else {
        panic!("expected a response, got {outcome:?}")
    };
    let status = body["statusCode"].as_u64().unwrap();
    assert_eq!(body["headers"]["content-type"], "application/json");
    (
        status,
        serde_json::from_str(body["body"].as_str().unwrap()).unwrap(),
    )
}

#[test]
fn direct_and_http_invocations_answer_like_ferry_run_and_reuse_one_session() {
    let api = RuntimeApi::start();
    let f = iris(&api);
    // Direct invocation: the event is the request.
    let out = api.invoke(read("iris/golden/setosa.json"));
    let Outcome::Response { id, body } = &out else {
        panic!("{out:?}")
    };
    assert_eq!(id, "req-1");
    assert_eq!(
        compare_json(&read("iris/golden/setosa.expected.json"), body, 1e-5),
        vec![]
    );
    // HTTP API / function URL (payload 2.0).
    let batch = std::fs::read_to_string(examples().join("iris/golden/batch.json")).unwrap();
    let (status, body) =
        response_body(&api.invoke(http_v2(&batch, "application/json; charset=utf-8", false)));
    assert_eq!(status, 200);
    assert_eq!(
        compare_json(&read("iris/golden/batch.expected.json"), &body, 1e-5),
        vec![]
    );
    // API Gateway REST (1.0), base64 body.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&batch);
    let v1 = json!({"httpMethod": "POST", "path": "/predict", "headers": {"Content-Type": "application/json"},
                    "requestContext": {"stage": "prod"}, "body": b64, "isBase64Encoded": true});
    let (status, body) = response_body(&api.invoke(v1));
    assert_eq!(status, 200);
    assert_eq!(
        compare_json(&read("iris/golden/batch.expected.json"), &body, 1e-5),
        vec![]
    );
    assert_eq!(*api.served.lock().unwrap(), 3);
    assert!(api.first_next.lock().unwrap().is_some());
    // One init for all invocations; EMF metrics with the cold-start flag on the first only.
    // The function logs its metrics after it posted the response: wait for the
    // third invocation's line rather than race it (a bound, not a timing
    // assertion: a loaded 2-core CI machine has taken more than 10 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while f
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("CloudWatchMetrics"))
        .count()
        < 3
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let lines = f.lines.lock().unwrap().clone();
    let logs: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        logs.iter()
            .filter(|l| l["message"] == "Initialized")
            .count(),
        1,
        "{lines:?}"
    );
    let emf: Vec<&Value> = logs
        .iter()
        .filter(|l| l["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"] == "Latency")
        .collect();
    assert_eq!(emf.len(), 3);
    assert_eq!(
        emf.iter()
            .map(|l| l["ColdStart"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 0, 0]
    );
    assert_eq!(emf[1]["Predictions"], 5);
    assert!(emf[0]["Latency"].as_f64().unwrap() > 0.0);
    let per_class: Vec<&Value> = logs
        .iter()
        .filter(|l| l.get("ClassPredictions").is_some())
        .collect();
    assert!(per_class.iter().any(|l| l["Class"] == "setosa"));
}

#[test]
fn bad_inputs_are_400s_or_function_errors_and_the_function_keeps_serving() {
    let api = RuntimeApi::start();
    let b = bundles();
    let _f = start(
        &api,
        &[
            ("FERRY_BUNDLE", &b.file("iris.ferry")),
            ("FERRY_PUBLIC_KEYS", &b.file("release.pub")),
            ("FERRY_MAX_BODY_BYTES", "4096"),
        ],
    );
    let missing =
        json!({"records": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4}]});
    let out = api.invoke(missing.clone());
    let Outcome::Error {
        id,
        body,
        error_type,
    } = &out
    else {
        panic!("{out:?}")
    };
    assert_eq!(id, "req-1");
    // lambda_runtime sends its own header value ("unhandled"); the body carries ours.
    assert!(!error_type.is_empty());
    assert_eq!(body["errorType"], "Ferry.bad_input");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("petal_width"),
        "{body}"
    );
    let (status, body) =
        response_body(&api.invoke(http_v2(&missing.to_string(), "application/json", false)));
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("petal_width"),
        "{body}"
    );
    for bad in ["not json", "{\"records\": []}"] {
        let (status, body) = response_body(&api.invoke(http_v2(bad, "application/json", false)));
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, body) = response_body(&api.invoke(http_v2("", "application/json", false)));
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("empty"));
    let (status, _) = response_body(&api.invoke(http_v2("%%%", "image/png", true)));
    assert_eq!(status, 400);
    let (status, body) =
        response_body(&api.invoke(http_v2(&"x".repeat(10_000), "application/json", false)));
    assert_eq!(status, 413);
    assert!(body["error"].as_str().unwrap().contains("4096"));
    // Still serving.
    let out = api.invoke(read("iris/golden/virginica.json"));
    let Outcome::Response { body, .. } = &out else {
        panic!("{out:?}")
    };
    assert_eq!(body["predictions"][0]["label"], "virginica");
}

#[test]
fn images_arrive_base64_through_function_urls() {
    let api = RuntimeApi::start();
    let b = bundles();
    let _f = start(
        &api,
        &[
            ("FERRY_BUNDLE", &b.file("digits.ferry")),
            ("FERRY_PUBLIC_KEYS", &b.file("release.pub")),
        ],
    );
    let png = std::fs::read(examples().join("digits/golden/digit_7.png")).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(png);
    let (status, body) = response_body(&api.invoke(http_v2(&b64, "image/png", true)));
    assert_eq!(status, 200);
    assert_eq!(
        compare_json(&read("digits/golden/digit_7.expected.json"), &body, 1e-5),
        vec![]
    );
    // The same image as a direct invocation in the JSON image form.
    let out = api.invoke(json!({ "image": b64 }));
    let Outcome::Response { body, .. } = &out else {
        panic!("{out:?}")
    };
    assert_eq!(body["predictions"][0]["label"], "7");
}

fn init_error(env: &[(&str, &str)]) -> (String, String, Option<i32>) {
    let api = RuntimeApi::start();
    let mut f = start(&api, env);
    let out = api
        .outcomes
        .recv_timeout(WAIT)
        .expect("an init error is reported");
    let Outcome::InitError { body, error_type } = out else {
        panic!("{out:?}")
    };
    let status = f.child.wait().unwrap().code();
    assert_eq!(body["errorType"].as_str().unwrap(), error_type);
    (
        error_type,
        body["errorMessage"].as_str().unwrap().to_string(),
        status,
    )
}

#[test]
fn a_corrupt_missing_or_untrusted_bundle_fails_init_with_a_clear_message() {
    let b = bundles();
    let mut bytes = std::fs::read(b.file("iris.ferry")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let corrupt = b.scratch("corrupt.ferry");
    std::fs::write(&corrupt, bytes).unwrap();
    let (kind, message, status) = init_error(&[
        ("FERRY_BUNDLE", &corrupt),
        ("FERRY_PUBLIC_KEYS", &b.file("release.pub")),
    ]);
    assert_eq!(kind, "Ferry.digest_mismatch");
    assert!(
        message.contains("bundle rejected") && message.contains("digest"),
        "{message}"
    );
    assert_eq!(status, Some(1));

    let (kind, message, _) = init_error(&[
        ("FERRY_BUNDLE", "/nonexistent.ferry"),
        ("FERRY_PUBLIC_KEYS", &b.file("release.pub")),
    ]);
    assert_eq!(kind, "Ferry.BundleUnreadable");
    assert!(message.contains("/nonexistent.ferry"), "{message}");

    let (kind, message, _) = init_error(&[("FERRY_BUNDLE", &b.file("iris.ferry"))]);
    assert_eq!(kind, "Ferry.NoTrustedKey");
    assert!(message.contains("FERRY_PUBLIC_KEYS"), "{message}");

    assert!(
        ferry(&["keygen", "-o", &b.scratch("stranger")])
            .status
            .success()
    );
    let (kind, message, _) = init_error(&[
        ("FERRY_BUNDLE", &b.file("iris.ferry")),
        ("FERRY_PUBLIC_KEYS", &b.scratch("stranger.pub")),
    ]);
    assert_eq!(kind, "Ferry.untrusted_key");
    assert!(message.contains("untrusted"), "{message}");
}

#[test]
fn outside_lambda_it_says_so_instead_of_panicking() {
    let o = Command::new(env!("CARGO_BIN_EXE_bootstrap"))
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let line: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(line["level"], "ERROR");
    assert!(
        line["missing_environment"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "AWS_LAMBDA_RUNTIME_API")
    );
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn lambda_package(args: &[&str]) -> std::process::Output {
    ferry(&[&["lambda-package"][..], args].concat())
}

#[test]
fn a_packaged_function_finds_its_bundle_and_keys_next_to_bootstrap() {
    let b = bundles();
    let dir = tempfile::tempdir().unwrap();
    let zip_path = dir.path().join("function.zip");
    let arch = if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "x86_64"
    };
    let args = [
        "--pub",
        &b.file("release.pub"),
        "--arch",
        arch,
        "-o",
        zip_path.to_str().unwrap(),
    ];
    let o = lambda_package(&[&[b.file("iris.ferry").as_str()][..], &args[..]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The fixture is portable: its guest would be compiled at every cold start.
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("no guest precompiled for") && stderr.contains("--precompile"),
        "{stderr}"
    );
    let bytes = std::fs::read(&zip_path).unwrap();
    // Deterministic: the same inputs give the same zip.
    let again = dir.path().join("again.zip");
    let o = lambda_package(&[
        b.file("iris.ferry").as_str(),
        "--pub",
        &b.file("release.pub"),
        "--arch",
        arch,
        "-o",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert_eq!(std::fs::read(&again).unwrap(), bytes);

    let root = dir.path().join("function");
    let entries = unzip_function(&bytes, &root);
    let names: Vec<&str> = entries.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["bootstrap", "iris.ferry", "keys/00-release.pub"]);
    for (name, mode, data) in &entries {
        if name == "bootstrap" {
            assert_eq!(*mode, 0o755);
            let machine = u16::from_le_bytes([data[18], data[19]]);
            assert_eq!(machine, if arch == "arm64" { 0xB7 } else { 0x3E });
        } else {
            assert_eq!(*mode, 0o644);
        }
    }
    // The unpacked function, with no FERRY_* variables: finds iris.ferry and keys/ itself.
    let api = RuntimeApi::start();
    let _f = start_at(&root.join("bootstrap"), &api, &[]);
    let out = api.invoke(read("iris/golden/setosa.json"));
    let Outcome::Response { body, .. } = &out else {
        panic!("{out:?}")
    };
    assert_eq!(
        compare_json(&read("iris/golden/setosa.expected.json"), body, 1e-5),
        vec![]
    );
}

#[test]
fn lambda_package_refuses_the_wrong_architecture_and_unverified_bundles() {
    let b = bundles();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f.zip");
    let other = if cfg!(target_arch = "aarch64") {
        "x86_64"
    } else {
        "arm64"
    };
    let o = lambda_package(&[
        b.file("iris.ferry").as_str(),
        "--pub",
        &b.file("release.pub"),
        "--arch",
        other,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--target"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = lambda_package(&[
        b.file("iris.ferry").as_str(),
        "--pub",
        &b.file("release.pub"),
        "--arch",
        other,
        "--bootstrap",
        env!("CARGO_BIN_EXE_bootstrap"),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is an ELF for machine"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        ferry(&["keygen", "-o", &b.scratch("someone")])
            .status
            .success()
    );
    let o = lambda_package(&[
        b.file("iris.ferry").as_str(),
        "--pub",
        &b.scratch("someone.pub"),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(!out.exists());
}

#[test]
fn binary_tensors_arrive_base64_and_malformed_ones_are_400s() {
    use ferry_testkit::tensors::{iris_tensor, npy, npy_f32, tensor_set_f32};
    let api = RuntimeApi::start();
    let _f = example_function(&api, "raw");
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let json = std::fs::read_to_string(examples().join("iris/golden/tensor_request.json")).unwrap();
    let (status, want) = response_body(&api.invoke(http_v2(&json, "application/json", false)));
    assert_eq!(status, 200, "{want}");
    let (shape, values) = iris_tensor();
    let good = npy_f32(&shape, &values);
    for (ct, body) in [
        ("application/x-npy", good.clone()),
        (
            "application/x-ferry-tensors",
            tensor_set_f32("float_input", &shape, &values),
        ),
    ] {
        let (status, got) = response_body(&api.invoke(http_v2(&b64(&body), ct, true)));
        assert_eq!((status, &got), (200, &want), "{ct}");
    }
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "application/x-npy",
            good[..good.len() - 1].to_vec(),
            "holds 31 bytes",
        ),
        ("application/x-npy", npy("<f8", &shape, &[0; 64]), "astype"),
        ("application/x-npy", b"garbage".to_vec(), "not a .npy array"),
        ("application/x-ferry-tensors", good.clone(), "not a valid"),
    ];
    for (ct, body, needle) in cases {
        let (status, r) = response_body(&api.invoke(http_v2(&b64(&body), ct, true)));
        assert_eq!(status, 400, "{needle}: {r}");
        assert!(
            r["error"].as_str().unwrap_or("").contains(needle),
            "{needle}: {r}"
        );
    }
    // Still serving.
    let (status, got) = response_body(&api.invoke(http_v2(&b64(&good), "application/x-npy", true)));
    assert_eq!((status, got), (200, want));
}

#[test]
fn binary_responses_go_out_base64_and_a_form_the_model_cannot_give_is_a_406() {
    use ferry_testkit::tensors::{iris_tensor, npy_f32};
    let api = RuntimeApi::start();
    let f = example_function(&api, "raw");
    let (shape, values) = iris_tensor();
    let event = npy_events(&npy_f32(&shape, &values));
    let (status, want) = response_body(&api.invoke(event("application/json")));
    assert_eq!(status, 200, "{want}");
    // The model's two outputs as a tensor set, base64-encoded for API Gateway.
    let set = tensor_set_response(&api.invoke(event("application/x-ferry-tensors")));
    assert_eq!(set.tensors[1].name, "probabilities");
    for t in &set.tensors {
        ferry_testkit::tensors::assert_matches_json_output(t, &want);
    }
    // One .npy cannot hold both: 406 (which depends on `accept` too), logged, and the
    // function keeps serving.
    let refused = api.invoke(event("application/x-npy"));
    let Outcome::Response { body: raw, .. } = &refused else {
        panic!("{refused:?}")
    };
    assert_eq!(raw["headers"]["vary"], "accept", "{raw}");
    let (status, r) = response_body(&refused);
    assert_eq!(status, 406, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("this model has 2 outputs"),
        "{r}"
    );
    // Nor is a client refusing JSON with q=0 sent JSON.
    let (status, r) = response_body(&api.invoke(event("application/json;q=0")));
    assert_eq!(status, 406, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("refuses application/json"),
        "{r}"
    );
    let (status, again) = response_body(&api.invoke(event("application/x-npy;q=0.9, */*;q=0.1")));
    assert_eq!((status, &again), (200, &want));
    let lines = wait_for_line(&f, &|l| {
        l.contains("Request refused") && l.contains("\"status\":406")
    });
    assert!(!lines.is_empty());
}

#[test]
fn an_answer_over_lambdas_response_limit_is_refused_with_advice_not_a_bare_502() {
    use ferry_testkit::tensors::{iris_tensor, npy_f32};
    let api = RuntimeApi::start();
    let f = example_function(&api, "raw");
    // 200,000 rows: a 3.1 MiB request whose JSON answer is over 6 MB; the same answer as
    // a tensor set (20 bytes a row) fits.
    let (_, row) = iris_tensor();
    let rows = 200_000usize;
    let values: Vec<f32> = row[..4].iter().copied().cycle().take(rows * 4).collect();
    let event = npy_events(&npy_f32(&[rows as u64, 4], &values));
    let (status, r) = response_body(&api.invoke(event("application/json")));
    assert_eq!(status, 500, "{r}");
    let message = r["error"].as_str().unwrap();
    assert!(
        message.contains("over Lambda's limit of 6290432")
            && message.contains("accept application/x-npy or application/x-ferry-tensors"),
        "{message}"
    );
    wait_for_line(&f, &|l| {
        l.contains("Request refused") && l.contains("over Lambda's limit")
    });
    let set = tensor_set_response(&api.invoke(event("application/x-ferry-tensors")));
    assert_eq!(set.tensors[1].shape, [rows as u64, 3]);
}

/// HTTP events carrying `npy` (base64, as API Gateway sends binary bodies), by `accept`.
fn npy_events(npy: &[u8]) -> impl Fn(&str) -> Value + use<> {
    let body = base64::engine::general_purpose::STANDARD.encode(npy);
    move |accept: &str| {
        let mut e = http_v2(&body, "application/x-npy", true);
        e["headers"]["Accept"] = json!(accept);
        e
    }
}

/// The tensor set of a 200 answered in `application/x-ferry-tensors`.
fn tensor_set_response(outcome: &Outcome) -> ferry_runtime::TensorSet {
    let Outcome::Response { body: r, .. } = outcome else {
        panic!("expected a response, got {outcome:?}")
    };
    assert_eq!(r["statusCode"], 200, "{r}");
    assert_eq!(r["headers"]["content-type"], "application/x-ferry-tensors");
    assert_eq!(r["headers"]["vary"], "accept");
    assert_eq!(r["isBase64Encoded"], true);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(r["body"].as_str().unwrap())
        .unwrap();
    ferry_runtime::TensorSet::decode(&bytes).unwrap()
}

/// The function's stdout lines once one matches `want` (they are collected by
/// another thread, so a line logged after a response may not be there yet);
/// panics after [`WAIT`].
fn wait_for_line(f: &Function, want: &dyn Fn(&str) -> bool) -> Vec<String> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let lines = f.lines.lock().unwrap().clone();
        if lines.iter().any(|l| want(l)) {
            return lines;
        }
        assert!(std::time::Instant::now() < deadline, "{lines:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn lambda_package_is_quiet_about_a_bundle_precompiled_for_its_architecture() {
    let b = bundles();
    let dir = tempfile::tempdir().unwrap();
    let (arch, machine) = if cfg!(target_arch = "aarch64") {
        ("arm64", "aarch64")
    } else {
        ("x86_64", "x86_64")
    };
    let bundle = dir.path().join("pre.ferry");
    let o = ferry(&[
        "pack",
        examples().join("iris").to_str().unwrap(),
        "--key",
        &b.key(),
        "-o",
        bundle.to_str().unwrap(),
        "--precompile",
        machine,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let zip = dir.path().join("f.zip");
    let o = lambda_package(&[
        bundle.to_str().unwrap(),
        "--pub",
        &b.public(),
        "--arch",
        arch,
        "-o",
        zip.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn lambda_package_ships_onnxruntime_beside_bootstrap_and_the_function_serves_with_it() {
    let b = bundles();
    let iris = b.file("iris.ferry");
    let public = b.file("release.pub");
    // Asked for and absent (nothing beside the workspace's bootstrap, no
    // FERRY_ONNXRUNTIME): init fails and says why; an unknown engine too.
    let (kind, message, _) = init_error(&[
        ("FERRY_BUNDLE", &iris),
        ("FERRY_PUBLIC_KEYS", &public),
        ("FERRY_ENGINE", "onnxruntime"),
    ]);
    assert_eq!(kind, "Ferry.engine_unavailable");
    assert!(
        message.contains("onnxruntime is not available"),
        "{message}"
    );
    let (_, message, _) = init_error(&[
        ("FERRY_BUNDLE", &iris),
        ("FERRY_PUBLIC_KEYS", &public),
        ("FERRY_ENGINE", "gpu"),
    ]);
    assert!(message.contains("unknown engine `gpu`"), "{message}");

    let dir = tempfile::tempdir().unwrap();
    let arch = if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "x86_64"
    };
    let zip_path = dir.path().join("function.zip");
    // Not a shared library: refused before anything is written.
    let o = lambda_package(&[
        &iris,
        "--pub",
        &public,
        "--arch",
        arch,
        "--onnxruntime",
        &public,
        "-o",
        zip_path.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a 64-bit Linux shared library"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!zip_path.exists());

    let Some(lib) = ferry_testkit::onnxruntime::library(
        "lambda_package_ships_onnxruntime_beside_bootstrap_and_the_function_serves_with_it",
    ) else {
        return;
    };
    let o = lambda_package(&[
        &iris,
        "--pub",
        &public,
        "--arch",
        arch,
        "--onnxruntime",
        lib.to_str().unwrap(),
        "-o",
        zip_path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&zip_path).unwrap();
    let root = dir.path().join("function");
    let entries = unzip_function(&bytes, &root);
    let mut names = Vec::new();
    for (name, _, data) in entries {
        if name == "libonnxruntime.so" {
            assert_eq!(data, std::fs::read(&lib).unwrap());
        }
        names.push(name);
    }
    assert_eq!(
        names,
        [
            "bootstrap",
            "iris.ferry",
            "keys/00-release.pub",
            "libonnxruntime.so"
        ]
    );
    // The unpacked function finds the library beside bootstrap by itself
    // (no FERRY_ONNXRUNTIME: the environment is cleared).
    let api = RuntimeApi::start();
    let home = tempfile::tempdir().unwrap();
    let f = start_at(
        &root.join("bootstrap"),
        &api,
        &[
            ("FERRY_ENGINE", "onnxruntime"),
            ("HOME", home.path().to_str().unwrap()),
            (
                "XDG_CACHE_HOME",
                home.path().join("cache").to_str().unwrap(),
            ),
        ],
    );
    let out = api.invoke(read("iris/golden/setosa.json"));
    let Outcome::Response { body, .. } = &out else {
        panic!("{out:?}")
    };
    assert_eq!(
        compare_json(&read("iris/golden/setosa.expected.json"), body, 1e-5),
        vec![]
    );
    // Its init log names the engine (logged before the first invocation).
    let lines = f.lines.lock().unwrap().clone();
    let init: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "Initialized")
        .collect();
    assert_eq!(init.len(), 1, "{lines:?}");
    assert_eq!(init[0]["engine"], "onnxruntime", "{lines:?}");
    // onnxruntime's own telemetry stays off: no device id, no event store in HOME
    // (packager/tests/engines.rs shows the library writing them when allowed).
    let written = ferry_testkit::fixtures::paths_under(home.path());
    assert!(written.is_empty(), "onnxruntime wrote {written:?}");
    drop(f);

    // Packaged with both engines and no --engine, the packager measured them here and said
    // what each cold start will do.
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("measured here") && stderr.contains("pass --engine"),
        "{stderr}"
    );

    // --engine records the engine beside bootstrap: the function loads it alone, with no
    // measurement at start; the function's FERRY_ENGINE still wins.
    let zip2 = dir.path().join("function-ort.zip");
    let o = lambda_package(&[
        &iris,
        "--pub",
        &public,
        "--arch",
        arch,
        "--onnxruntime",
        lib.to_str().unwrap(),
        "--engine",
        "onnxruntime",
        "-o",
        zip2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let root2 = dir.path().join("function-ort");
    let entries = unzip_function(&std::fs::read(&zip2).unwrap(), &root2);
    let engine_file: Vec<_> = entries.iter().filter(|e| e.0 == "ferry.engine").collect();
    assert_eq!(
        engine_file.len(),
        1,
        "{:?}",
        entries.iter().map(|e| &e.0).collect::<Vec<_>>()
    );
    assert_eq!(engine_file[0].2, b"onnxruntime\n");
    for (env, want) in [(None, "onnxruntime"), (Some("tract"), "tract")] {
        let api = RuntimeApi::start();
        let mut vars = vec![];
        if let Some(e) = env {
            vars.push(("FERRY_ENGINE", e));
        }
        let f = start_at(&root2.join("bootstrap"), &api, &vars);
        let out = api.invoke(read("iris/golden/setosa.json"));
        assert!(matches!(out, Outcome::Response { .. }), "{out:?}");
        let lines = wait_for_line(&f, &|l| l.contains("\"Initialized\""));
        let init: Vec<Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["message"] == "Initialized")
            .collect();
        assert_eq!(init[0]["engine"], want, "{lines:?}");
        assert_eq!(init[0]["engine_race"], json!([]), "{lines:?}");
    }
    // A file that names no engine stops the start with the file's name in the error.
    std::fs::write(root2.join("ferry.engine"), "gpu\n").unwrap();
    let api = RuntimeApi::start();
    let mut f = start_at(&root2.join("bootstrap"), &api, &[]);
    let out = api
        .outcomes
        .recv_timeout(WAIT)
        .expect("an init error is reported");
    let Outcome::InitError { body, .. } = out else {
        panic!("{out:?}")
    };
    let message = body["errorMessage"].as_str().unwrap();
    assert!(
        message.contains("ferry.engine") && message.contains("unknown engine `gpu`"),
        "{message}"
    );
    assert_ne!(f.child.wait().unwrap().code(), Some(0));

    // An engine the bundle's model cannot run on is refused when packaging, with the reason
    // recorded at pack time (tract does not run sequence operators).
    let seq = dir.path().join("seq.ferry");
    let o = ferry_testkit::cli::ferry_env(
        &[
            "pack",
            "--model",
            examples()
                .join("../runtime/tests/fixtures/sequence_concat.onnx")
                .to_str()
                .unwrap(),
            "--key",
            &b.key(),
            "-o",
            seq.to_str().unwrap(),
        ],
        &[("FERRY_ONNXRUNTIME", lib.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let zip3 = dir.path().join("function-seq.zip");
    let o = lambda_package(&[
        seq.to_str().unwrap(),
        "--pub",
        &public,
        "--arch",
        arch,
        "--engine",
        "tract",
        "-o",
        zip3.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("--engine tract: tract cannot serve") && stderr.contains("Sequence"),
        "{stderr}"
    );
    assert!(!zip3.exists());

    // Packed where onnxruntime was absent, the bundle records nothing about it: the
    // packager loads the model on it here instead, rather than ship a function whose every
    // cold start fails (here the "library" is not onnxruntime: bootstrap itself, an ELF
    // file for this architecture that does not load as one).
    let unchecked = dir.path().join("unchecked.ferry");
    let o = ferry_testkit::cli::ferry_env(
        &[
            "pack",
            "--model",
            examples()
                .join("../runtime/tests/fixtures/mlp.onnx")
                .to_str()
                .unwrap(),
            "--key",
            &b.key(),
            "-o",
            unchecked.to_str().unwrap(),
        ],
        &[("FERRY_ONNXRUNTIME", "")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let zip4 = dir.path().join("function-unchecked.zip");
    let package = |arch: &str, library: &Path, bootstrap: Option<&Path>| {
        let mut args = vec![
            unchecked.to_str().unwrap(),
            "--pub",
            &public,
            "--arch",
            arch,
            "--onnxruntime",
            library.to_str().unwrap(),
            "--engine",
            "onnxruntime",
            "-o",
            zip4.to_str().unwrap(),
        ];
        if let Some(b) = bootstrap {
            args.extend(["--bootstrap", b.to_str().unwrap()]);
        }
        lambda_package(&args)
    };
    let o = package(arch, &root.join("bootstrap"), None);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("--engine onnxruntime: onnxruntime cannot load this bundle's model"),
        "{stderr}"
    );
    assert!(!zip4.exists());
    // With the real library it loads here and ships, with nothing to warn about.
    let o = package(arch, &lib, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(zip4.exists());
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // For another architecture nothing can be loaded here: it ships, and says that nobody
    // checked (the files are bare ELF headers for that machine).
    let (other, machine) = if cfg!(target_arch = "aarch64") {
        ("x86_64", 0x3Eu16)
    } else {
        ("arm64", 0xB7u16)
    };
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(18, 0);
    elf.extend_from_slice(&machine.to_le_bytes());
    elf.resize(64, 0);
    let foreign = dir.path().join("foreign.so");
    std::fs::write(&foreign, &elf).unwrap();
    let o = package(other, &foreign, Some(&foreign));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: --engine onnxruntime: nobody checked that onnxruntime serves"),
        "{stderr}"
    );
}

/// Unpacks a `ferry lambda-package` zip into `root` as Lambda would (with
/// each entry's mode); every entry's name, mode and bytes, in order.
fn unzip_function(zip: &[u8], root: &Path) -> Vec<(String, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
    let mut entries = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().unwrap().to_string();
        let out = root.join(&name);
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        std::fs::write(&out, &data).unwrap();
        let mode = entry.unix_mode().unwrap() & 0o777;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(mode)).unwrap();
        entries.push((name, mode, data));
    }
    entries
}
