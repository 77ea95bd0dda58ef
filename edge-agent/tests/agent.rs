//! The whole daemon: the real `ferry-agent` binary with real bundles, a real
//! update channel and (where MQTT is involved) a real mosquitto.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use ferry_testkit::channel::publish;
use ferry_testkit::device::{Device, Setup, iris_batch, iris_request, iris_rows};
use ferry_testkit::fixtures::{self, bundles};

fn setosa() -> Value {
    iris_request([5.4, 3.4, 1.7, 0.2])
}

fn label_of(response: &Value) -> String {
    // The standard classification postprocess: {"predictions": [{"label": ...}]}.
    let p = &response["predictions"][0];
    p["label"]
        .as_str()
        .or_else(|| p["top"][0]["label"].as_str())
        .unwrap_or_else(|| panic!("no label in {response}"))
        .to_string()
}

#[test]
fn serves_predictions_and_describes_itself() {
    let d = Device::start(Setup::new("http-1"));
    let (status, r) = d.predict_json(&setosa());
    assert_eq!(status, 200, "{r}");
    assert_eq!(label_of(&r), "setosa");
    let (status, m) = d.get("/v1/model");
    assert_eq!(status, 200);
    assert_eq!(m["name"], "iris");
    assert_eq!(m["sequence"], 1);
    assert_eq!(m["digest"], bundles().digest(fixtures::V1));
    assert_eq!(d.get("/healthz").0, 200);
    let metrics = d.metrics();
    for family in [
        "ferry_predictions_total 1",
        "ferry_prediction_latency_seconds_bucket",
        "ferry_buffer_records",
        "ferry_buffer_bytes",
        "ferry_buffer_dropped_records_total",
        "ferry_update_state{state=\"idle\"} 1",
        "ferry_mqtt_connected 0",
        "ferry_bundle_info{",
    ] {
        assert!(metrics.contains(family), "missing {family}:\n{metrics}");
    }
}

#[test]
fn bad_requests_get_clear_4xx_and_nothing_breaks() {
    let d = Device::start(Setup::new("http-2"));
    /// (what, content type, body, expected status, text the error must contain)
    type Case = (
        &'static str,
        Option<&'static str>,
        Vec<u8>,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        ("empty body", Some("application/json"), vec![], 400, "empty"),
        ("no content type", None, setosa().to_string().into_bytes(), 415, "Content-Type"),
        ("not JSON", Some("application/json"), b"{not json".to_vec(), 400, ""),
        ("NaN literal", Some("application/json"),
            br#"{"record": {"sepal_length": NaN, "sepal_width": 1, "petal_length": 1, "petal_width": 1}}"#.to_vec(), 400, ""),
        ("wrong feature type", Some("application/json"),
            br#"{"record": {"sepal_length": "long", "sepal_width": 1, "petal_length": 1, "petal_width": 1}}"#.to_vec(), 400, "sepal_length"),
        ("wrong tensor shape", Some("application/json"),
            br#"{"inputs": {"float_input": {"shape": [1, 3], "data": [1, 2, 3]}}}"#.to_vec(), 400, ""),
        ("image for a tabular model", Some("image/png"), b"\x89PNG\r\n\x1a\nxxxx".to_vec(), 400, ""),
        ("oversized", Some("application/json"), vec![b' '; 2 * 1024 * 1024], 413, "limit"),
    ];
    for (what, ct, body, want, needle) in cases {
        let (status, r) = d.post_alone(ct, &body);
        assert_eq!(status, want, "{what}: {r}");
        let message = r["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error field in {r}"));
        assert!(
            !message.is_empty() && message.contains(needle),
            "{what}: {message}"
        );
        assert!(r["code"].is_string(), "{what}: {r}");
    }
    // Still serving, and the failures were counted.
    assert_eq!(d.predict_json(&setosa()).0, 200);
    assert!(
        d.metrics()
            .contains("ferry_prediction_errors_total{code=\"bad_input\"}")
    );
}

#[test]
fn binary_tensors_are_served_and_malformed_ones_get_400() {
    use ferry_testkit::tensors::{iris_tensor, npy, npy_f32, tensor_set_f32};
    // The iris model packed alone (a tensor pipeline), for the test fleet.
    let f = bundles();
    let raw = f.scratch("binary/raw-demo.ferry");
    std::fs::create_dir_all(std::path::Path::new(&raw).parent().unwrap()).unwrap();
    let o = ferry_testkit::cli::ferry(&[
        "pack",
        "--model",
        &fixtures::example("iris/model.onnx"),
        "--key",
        &f.key(),
        "-o",
        &raw,
        "--fleet",
        fixtures::FLEET,
        "--channel",
        fixtures::CHANNEL,
    ]);
    ferry_testkit::cli::assert_exit(&o, 0);
    let mut setup = Setup::new("http-binary");
    // An absolute path: `Bundles::path` joins it as it is.
    setup.initial = Some(raw);
    let d = Device::start(setup);
    let request =
        fixtures::read_json(&fixtures::examples().join("iris/golden/tensor_request.json"));
    let (status, want) = d.predict_json(&request);
    assert_eq!(status, 200, "{want}");
    let (shape, values) = iris_tensor();
    for (ct, body) in [
        ("application/x-npy", npy_f32(&shape, &values)),
        (
            "application/x-ferry-tensors",
            tensor_set_f32("float_input", &shape, &values),
        ),
    ] {
        let (status, got) = d.post(Some(ct), &body);
        assert_eq!((status, &got), (200, &want), "{ct}");
    }
    let good = npy_f32(&shape, &values);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "application/x-npy",
            good[..good.len() - 1].to_vec(),
            "holds 31 bytes",
        ),
        ("application/x-npy", good[..12].to_vec(), "truncated header"),
        ("application/x-npy", npy("<f8", &shape, &[0; 64]), "astype"),
        (
            "application/x-npy",
            b"{\"inputs\": {}}".to_vec(),
            "not a .npy array",
        ),
        (
            "application/x-ferry-tensors",
            b"FTS1\xff\xff\xff\xff".to_vec(),
            "not a valid",
        ),
        ("application/x-ferry-tensors", good.clone(), "not a valid"),
    ];
    for (ct, body, needle) in cases {
        let (status, r) = d.post(Some(ct), &body);
        assert_eq!(status, 400, "{ct} {needle}: {r}");
        assert!(
            r["error"].as_str().unwrap_or("").contains(needle),
            "{needle}: {r}"
        );
        assert_eq!(r["code"], "bad_input", "{r}");
    }
    // Still serving binary and JSON requests alike.
    assert_eq!(
        d.post(Some("application/x-npy"), &good),
        (200, want.clone())
    );
    assert_eq!(d.predict_json(&request), (200, want.clone()));

    // Binary responses: the model's outputs, before postprocessing.
    let (status, ct, body) =
        d.post_accept("application/x-npy", "application/x-ferry-tensors", &good);
    assert_eq!((status, ct.as_str()), (200, "application/x-ferry-tensors"));
    let set = ferry_runtime::TensorSet::decode(&body).unwrap();
    let names: Vec<&str> = set.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["label", "probabilities"]);
    for t in &set.tensors {
        ferry_testkit::tensors::assert_matches_json_output(t, &want);
    }
    // One .npy cannot carry two outputs: 406, counted, and nothing else changes.
    let (status, ct, body) = d.post_accept("application/x-npy", "application/x-npy", &good);
    assert_eq!((status, ct.as_str()), (406, "application/json"));
    let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(r["code"], "not_acceptable", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("this model has 2 outputs"),
        "{r}"
    );
    assert!(
        d.metrics()
            .contains(r#"ferry_prediction_errors_total{code="not_acceptable"} 1"#),
        "{}",
        d.metrics()
    );
    // A client that also takes JSON gets JSON; one naming no form we have, too.
    for accept in [
        "application/x-npy, application/json;q=0.5",
        "text/html",
        "*/*",
    ] {
        let (status, ct, body) = d.post_accept("application/x-npy", accept, &good);
        assert_eq!((status, ct.as_str()), (200, "application/json"), "{accept}");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            want
        );
    }
    // One refusing JSON with q=0 and accepting no binary form is not sent the JSON it refused.
    let (status, _, body) = d.post_accept("application/x-npy", "application/json;q=0", &good);
    assert_eq!(status, 406);
    let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(r["code"], "not_acceptable", "{r}");
    assert!(
        d.metrics()
            .contains(r#"ferry_prediction_errors_total{code="not_acceptable"} 2"#),
        "{}",
        d.metrics()
    );
}

#[test]
fn a_one_output_model_answers_npy_when_asked() {
    let f = bundles();
    let digits = f.scratch("binary/digits-npy.ferry");
    std::fs::create_dir_all(std::path::Path::new(&digits).parent().unwrap()).unwrap();
    let o = ferry_testkit::cli::ferry(&[
        "pack",
        &fixtures::example("digits"),
        "--key",
        &f.key(),
        "-o",
        &digits,
        "--fleet",
        fixtures::FLEET,
        "--channel",
        fixtures::CHANNEL,
    ]);
    ferry_testkit::cli::assert_exit(&o, 0);
    let mut setup = Setup::new("http-npy");
    setup.initial = Some(digits);
    let d = Device::start(setup);
    let png = std::fs::read(fixtures::examples().join("digits/golden/digit_3.png")).unwrap();
    let (status, ct, body) = d.post_accept("image/png", "application/x-npy", &png);
    assert_eq!((status, ct.as_str()), (200, "application/x-npy"));
    let (status, _, tensors) = d.post_accept("image/png", "application/x-ferry-tensors", &png);
    assert_eq!(status, 200);
    let logits = &ferry_runtime::TensorSet::decode(&tensors).unwrap().tensors[0];
    assert_eq!(body, logits.to_npy());
    assert_eq!(logits.shape, [1, 10]);
    // The JSON answer is the same model's: class 3, from these logits.
    let (status, json) = d.post(Some("image/png"), &png);
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["predictions"][0]["class"], 3, "{json}");
    let values = logits.to_f64_vec();
    let argmax = (0..values.len()).max_by(|&a, &b| values[a].total_cmp(&values[b]));
    assert_eq!(argmax, Some(3));
}

#[test]
fn concurrent_requests_are_all_answered_correctly() {
    let d = Device::start(Setup::new("http-3"));
    let rows = iris_rows("iris_test.csv");
    // The expected label of each row, asked one at a time first.
    let expected: Vec<String> = rows
        .iter()
        .map(|r| label_of(&d.predict_json(&iris_request(*r)).1))
        .collect();
    std::thread::scope(|s| {
        for t in 0..8 {
            let (d, rows, expected) = (&d, &rows, &expected);
            s.spawn(move || {
                for round in 0..5 {
                    for (i, r) in rows.iter().enumerate() {
                        if (i + t + round) % 3 != 0 {
                            continue;
                        }
                        let (status, resp) = d.predict_json(&iris_request(*r));
                        assert_eq!(status, 200, "{resp}");
                        assert_eq!(label_of(&resp), expected[i]);
                    }
                }
            });
        }
    });
}

#[test]
fn shifted_inputs_are_reported_as_drift() {
    let mut setup = Setup::new("drift-1");
    setup.window_predictions = 1000;
    let d = Device::start(setup);
    assert_eq!(d.get("/v1/drift").0, 404);
    let rows = iris_rows("current_shifted.csv");
    assert_eq!(rows.len(), 1000);
    for chunk in rows.chunks(50) {
        let (status, r) = d.predict_json(&iris_batch(chunk));
        assert_eq!(status, 200, "{r}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let report = loop {
        let (status, r) = d.get("/v1/drift");
        if status == 200 {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no drift report:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut drifted: Vec<&str> = report["features"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["drifted"] == true)
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    drifted.sort();
    // The same verdict as the foundation's `ferry drift` test on this data.
    assert_eq!(drifted, ["petal_length", "petal_width"], "{report:#}");
    assert_eq!(report["rows"], 1000);
    let metrics = d.metrics();
    assert!(
        metrics.contains("ferry_drift_drifted{feature=\"petal_length\""),
        "{metrics}"
    );

    // The same data from the baseline's distribution: no drift.
    let mut setup = Setup::new("drift-2");
    setup.window_predictions = 1000;
    let d = Device::start(setup);
    for chunk in iris_rows("current_same.csv").chunks(50) {
        assert_eq!(d.predict_json(&iris_batch(chunk)).0, 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let report = loop {
        let (status, r) = d.get("/v1/drift");
        if status == 200 {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no drift report");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(report["drifted_features"], 0, "{report:#}");
}

/// Writes a channel index naming `fixture` as the latest bundle with a high
/// sequence, without reading the bundle (a damaged one cannot be read): the
/// index is only a hint, the agent must judge the bundle itself.
fn publish_blind(channel: &std::path::Path, fixture: &str) {
    let bytes = bundles().bytes(fixture);
    std::fs::write(channel.join(fixture), &bytes).unwrap();
    let index = json!({
        "schema": 1, "fleet": fixtures::FLEET, "channel": fixtures::CHANNEL,
        "latest": {"name": "iris", "version": "9.9.9", "sequence": 99,
                   "digest": fixtures::sha256_hex(&bytes), "size": bytes.len(), "url": fixture}
    });
    std::fs::write(channel.join("index.json"), index.to_string()).unwrap();
}

/// Publishes `fixture` on the channel and waits until the agent refuses it
/// with `code`; the old bundle keeps serving throughout.
fn expect_refused(d: &Device, channel: &std::path::Path, fixture: &str, code: &str) {
    publish_blind(channel, fixture);
    d.wait_status(
        Duration::from_secs(30),
        &format!("{fixture} refused"),
        |s| s["update"]["state"] == "rejected" && s["update"]["code"] == code,
    );
    assert_eq!(d.model(), ("1.0.0".to_string(), 1), "{fixture}");
    let (status, r) = d.predict_json(&setosa());
    assert_eq!(
        (status, label_of(&r)),
        (200, "setosa".to_string()),
        "{fixture}"
    );
}

#[test]
fn bad_updates_are_refused_while_the_old_bundle_serves_then_a_good_one_installs() {
    let channel = tempfile::tempdir().unwrap();
    let mut setup = Setup::new("upd-1");
    setup.source = Some(channel.path().display().to_string());
    let d = Device::start(setup);
    let cases = [
        (fixtures::TAMPERED_MANIFEST, "bad_signature"),
        (fixtures::TAMPERED_PAYLOAD, "digest_mismatch"),
        (fixtures::TRUNCATED, "truncated"),
        (fixtures::UNSIGNED, "unsigned"),
        (fixtures::UNTRUSTED, "untrusted_key"),
        (fixtures::WRONG_FLEET, "wrong_fleet"),
        (fixtures::WRONG_CHANNEL, "wrong_channel"),
        (fixtures::GOLDEN_FAILS, "golden_failed"),
    ];
    for (fixture, code) in cases {
        expect_refused(&d, channel.path(), fixture, code);
    }
    // A good update installs, keeps the previous bundle for rollback.
    publish(channel.path(), &bundles().path(fixtures::V2));
    d.wait_status(Duration::from_secs(30), "v2 installed", |s| {
        s["bundle"]["sequence"] == 2
    });
    let s = d.status();
    assert_eq!(s["previous"]["sequence"], 1);
    assert_eq!(d.predict_json(&setosa()).0, 200);
    // Publishing v1 again is a downgrade: ignored by the poller (sequence
    // not higher), so the state never changes to v1.
    publish(channel.path(), &bundles().path(fixtures::V1));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.model().1, 2);
    assert!(d.metrics().contains("ferry_updates_installed_total 1"));
}

#[test]
fn a_bundle_with_a_high_error_rate_is_rolled_back_by_itself() {
    let channel = tempfile::tempdir().unwrap();
    let mut setup = Setup::new("rb-1");
    setup.source = Some(channel.path().display().to_string());
    let d = Device::start(setup);
    publish(channel.path(), &bundles().path(fixtures::BAD_RELEASE));
    // The status names the new bundle a moment before it says "probation"
    // (seen failing under load when read right after): wait for both.
    d.wait_status(Duration::from_secs(60), "v3 installed, on probation", |s| {
        s["bundle"]["sequence"] == 3 && s["update"]["state"] == "probation"
    });
    // The fleet's traffic is iris: every request fails on the digits model.
    for _ in 0..15 {
        let (status, _) = d.predict_json(&setosa());
        assert_eq!(status, 400);
    }
    let s = d.wait_status(Duration::from_secs(30), "rolled back", |s| {
        s["bundle"]["sequence"] == 1
    });
    assert_eq!(s["update"]["state"], "idle", "{s}");
    assert_eq!(d.predict_json(&setosa()).0, 200);
    assert!(d.metrics().contains("ferry_rollbacks_total 1"));
    // The bad release stays refused: the poller does not reinstall it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.model().1, 1);
}

#[test]
fn a_crash_looping_agent_rolls_back_its_new_bundle() {
    let channel = tempfile::tempdir().unwrap();
    let mut setup = Setup::new("rb-2");
    setup.source = Some(channel.path().display().to_string());
    let mut d = Device::start(setup);
    publish(channel.path(), &bundles().path(fixtures::V2));
    d.wait_status(Duration::from_secs(30), "v2 installed", |s| {
        s["bundle"]["sequence"] == 2
    });
    // Take the channel away so the poller cannot reinstall v2 by itself.
    std::fs::remove_file(channel.path().join("index.json")).unwrap();
    // Crash right after every start while v2 is on probation.
    for _ in 0..3 {
        d.kill9();
        d.spawn();
        d.wait_ready();
        assert_eq!(d.model().1, 2);
    }
    d.kill9();
    d.spawn();
    d.wait_ready();
    assert_eq!(
        d.model().1,
        1,
        "not rolled back after 4 starts:\n{}",
        d.log_text()
    );
    assert!(d.log_text().contains("crash loop"), "{}", d.log_text());
}

#[test]
fn sigterm_stops_cleanly() {
    let mut d = Device::start(Setup::new("term-1"));
    assert_eq!(d.predict_json(&setosa()).0, 200);
    let status = d.terminate();
    assert!(status.success(), "{status}:\n{}", d.log_text());
    assert!(d.log_text().contains("Buffer flushed"), "{}", d.log_text());
    // It starts again on the same state, with the same bundle.
    d.spawn();
    d.wait_ready();
    assert_eq!(d.model().1, 1);
}

#[test]
fn init_writes_a_config_that_check_config_accepts_after_editing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("agent.toml");
    let run = |args: &[&str]| {
        std::process::Command::new(ferry_testkit::device::agent_bin())
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["init", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Refuses to overwrite.
    let o = run(&["init", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    // As written it names a key that does not exist here; point it at ours.
    let text = std::fs::read_to_string(&out).unwrap().replace(
        "/etc/ferry/keys/release.pub",
        bundles().path("release.pub").to_str().unwrap(),
    );
    std::fs::write(&out, text).unwrap();
    let o = run(&["--config", out.to_str().unwrap(), "check-config"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("derived from paths.trusted_keys"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A root of trust that is not one is refused before anything runs.
    let good = std::fs::read_to_string(&out).unwrap();
    let bad_root = dir.path().join("root.json");
    std::fs::write(&bad_root, b"{\"payloadType\": \"x\"}").unwrap();
    let with_root = good.replace(
        "# root = \"/etc/ferry/root.json\"",
        &format!("root = {:?}", bad_root.to_str().unwrap()),
    );
    assert_ne!(with_root, good, "the template names paths.root");
    std::fs::write(&out, with_root).unwrap();
    let o = run(&["--config", out.to_str().unwrap(), "check-config"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not a valid root"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(&out, &good).unwrap();
    // A typo is refused with the key's name.
    let text = std::fs::read_to_string(&out)
        .unwrap()
        .replace("poll_interval_s", "poll_intervall_s");
    std::fs::write(&out, text).unwrap();
    let o = run(&["--config", out.to_str().unwrap(), "check-config"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("poll_intervall_s"));
}

#[test]
fn a_damaged_telemetry_buffer_is_moved_aside_and_the_model_keeps_serving() {
    // Issue 10: random bytes in the sled directory's `conf` file made the
    // agent exit ("cannot open the telemetry buffer"): a store that only
    // holds telemetry took the model down.
    let mut d = Device::start(Setup::new("damaged-1"));
    assert_eq!(d.predict_json(&setosa()).0, 200);
    assert!(d.terminate().success());
    let state = d.dir.path().join("state");
    let garbage: Vec<u8> = (0..512u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(state.join("buffer/conf"), &garbage).unwrap();

    d.spawn();
    d.wait_ready();
    let (status, r) = d.predict_json(&setosa());
    assert_eq!(status, 200, "{r}");
    assert_eq!(label_of(&r), "setosa");
    // Kept for inspection, exactly as it was.
    let moved: Vec<PathBuf> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("buffer.damaged-")
        })
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(std::fs::read(moved[0].join("conf")).unwrap(), garbage);
    // Counted, and visible to an operator: metric, log and a queued event.
    let metrics = d.metrics();
    assert!(
        metrics.contains("ferry_buffer_recovered_total 1"),
        "{metrics}"
    );
    let log = d.log_text();
    assert!(log.contains("buffer_recovered"), "{log}");
    // The new buffer works: telemetry of this prediction is in it.
    assert!(!metrics.contains("ferry_buffer_records 0\n"), "{metrics}");
    // A clean restart does not move the new buffer again.
    let stopped = d.terminate();
    assert!(stopped.success(), "{stopped:?}\n{}", d.log_text());
    d.spawn();
    d.wait_ready();
    assert!(d.metrics().contains("ferry_buffer_recovered_total 0"));
    let again = std::fs::read_dir(&state)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("buffer.damaged-")
        })
        .count();
    assert_eq!(again, 1);
}

#[test]
fn no_bundle_means_503_not_a_crash() {
    let mut setup = Setup::new("empty-1");
    setup.initial = None;
    let mut d = Device::create(setup);
    d.spawn();
    d.wait_listening();
    assert_eq!(d.get("/healthz").0, 503);
    let (status, r) = d.predict_json(&setosa());
    assert_eq!(status, 503, "{r}");
    assert_eq!(r["code"], "no_bundle");
    assert!(d.is_running());
}

#[test]
fn tells_systemd_it_is_ready_pings_the_watchdog_and_says_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut setup = Setup::new("sd-1");
    setup.env = vec![
        ("NOTIFY_SOCKET".into(), socket_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "2000000".into()),
    ];
    let mut d = Device::create(setup);
    d.spawn();
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    // READY=1 once serving, then WATCHDOG=1 pings.
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().any(|m| m.contains("WATCHDOG=1")))
    {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{e}; got {seen:?}\n{}", d.log_text()));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // Ready means ready: the API answers.
    d.wait_ready();
    assert!(d.terminate().success());
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM; got {seen:?}");
}

#[test]
fn channel_metadata_is_signed_fresh_never_older_and_keys_rotate_with_the_root() {
    // Issue 10, item 6: `index.json` was unsigned and never expired, so a
    // mirror or a man in the middle could keep a device on an old release
    // forever, unseen. Times are relative to the test's clock (never a fixed
    // value); the device's "now" moves forward with a signed time.
    use ferry_format::SecretKey;
    use ferry_testkit::channel::publish_signed;
    use ferry_testkit::cli::{assert_exit, ferry};
    const DAY: u64 = 86_400_000;
    let keys = tempfile::tempdir().unwrap();
    let k = |name: &str| keys.path().join(name).display().to_string();
    for name in ["root", "root2", "op", "channel", "channel2"] {
        assert_exit(&ferry(&["keygen", "-o", &k(name)]), 0);
    }
    let secret = |name: &str| {
        SecretKey::from_pem(&std::fs::read_to_string(k(&format!("{name}.key"))).unwrap()).unwrap()
    };
    let release_pub = bundles().path("release.pub").display().to_string();
    let root_file = k("root.json");
    assert_exit(
        &ferry(&[
            "root",
            "init",
            "--root",
            &k("root.pub"),
            "--builder",
            &release_pub,
            "--operator",
            &k("op.pub"),
            "--channel",
            &k("channel.pub"),
            "--key",
            &k("root.key"),
            "-o",
            &root_file,
        ]),
        0,
    );
    let channel = tempfile::tempdir().unwrap();
    let mut setup = Setup::new("meta-1");
    setup.source = Some(channel.path().display().to_string());
    setup.root = Some(root_file.clone().into());
    let mut d = Device::start(setup);
    let now = ferry_host::now_ms();
    let v2 = bundles().path(fixtures::V2);

    // Unsigned: refused, visibly; v1 keeps serving.
    publish(channel.path(), &v2);
    d.wait_update_refused("unsigned_metadata");
    // Signed by a key that is not the channel's.
    publish_signed(channel.path(), &v2, &[&secret("op")], 1, now, now + DAY);
    d.wait_update_refused("metadata_signature");
    // Signed, but expired an hour ago.
    publish_signed(
        channel.path(),
        &v2,
        &[&secret("channel")],
        1,
        now - DAY,
        now - 3_600_000,
    );
    d.wait_update_refused("metadata_expired");
    assert_eq!(d.model().1, 1);
    assert_eq!(d.predict_json(&setosa()).0, 200);
    let metrics = d.metrics();
    assert!(
        metrics.contains("ferry_metadata_rejected_total{code=\"metadata_expired\"}"),
        "{metrics}"
    );
    // `ferry publish` signing with the channel key: accepted, v2 installs.
    assert_exit(
        &ferry(&[
            "publish",
            &v2.display().to_string(),
            "--to",
            &channel.path().display().to_string(),
            "--pub",
            &release_pub,
            "--channel-key",
            &k("channel.key"),
            "--expires",
            "1d",
        ]),
        0,
    );
    d.wait_status(Duration::from_secs(30), "v2 from signed metadata", |s| {
        s["bundle"]["sequence"] == 2
    });
    // An older version (a replayed index) is refused.
    publish_signed(
        channel.path(),
        &v2,
        &[&secret("channel")],
        1,
        now,
        now + DAY,
    );
    d.wait_update_refused("metadata_rollback");
    // Metadata signed "two days from now" moves the device's clock forward:
    // metadata valid for one day from the real now is then already expired.
    publish_signed(
        channel.path(),
        &v2,
        &[&secret("channel")],
        10,
        now + 2 * DAY,
        now + 3 * DAY,
    );
    d.wait_status(Duration::from_secs(30), "accepted again", |s| {
        s["update"]["state"] != "rejected"
    });
    publish_signed(
        channel.path(),
        &v2,
        &[&secret("channel")],
        11,
        now,
        now + DAY,
    );
    d.wait_update_refused("metadata_expired");
    // What was seen survives a restart.
    assert!(d.terminate().success());
    d.spawn();
    d.wait_ready();
    publish_signed(
        channel.path(),
        &v2,
        &[&secret("channel")],
        9,
        now + 2 * DAY,
        now + 4 * DAY,
    );
    d.wait_update_refused("metadata_rollback");

    publish_signed(
        channel.path(),
        &v2,
        &[&secret("channel")],
        12,
        now + 2 * DAY,
        now + 4 * DAY,
    );
    d.wait_status(Duration::from_secs(30), "accepted after the restart", |s| {
        s["update"]["state"] != "rejected"
    });

    // Rotation: root 2 replaces the channel key; it is signed by the old root
    // key and the new one, and put beside the index as root/2.json.
    let root2 = k("root2.json");
    assert_exit(
        &ferry(&[
            "root",
            "init",
            "--version",
            "2",
            "--root",
            &k("root2.pub"),
            "--builder",
            &release_pub,
            "--operator",
            &k("op.pub"),
            "--channel",
            &k("channel2.pub"),
            "-o",
            &root2,
        ]),
        0,
    );
    // Signed by the new root key alone: refused (a thief of one new key
    // cannot make itself root), and the old channel key still works.
    assert_exit(
        &ferry(&["root", "sign", &root2, "--key", &k("root2.key")]),
        0,
    );
    assert_exit(
        &ferry(&["root", "verify", &root2, "--previous", &root_file]),
        3,
    );
    std::fs::create_dir_all(channel.path().join("root")).unwrap();
    std::fs::copy(&root2, channel.path().join("root/2.json")).unwrap();
    d.wait_update_refused("metadata_signature");
    assert!(d.metrics().contains("ferry_root_version 1"));
    // With the old root's signature too it is applied.
    assert_exit(
        &ferry(&["root", "sign", &root2, "--key", &k("root.key")]),
        0,
    );
    assert_exit(
        &ferry(&["root", "verify", &root2, "--previous", &root_file]),
        0,
    );
    std::fs::copy(&root2, channel.path().join("root/2.json")).unwrap();
    publish_signed(
        channel.path(),
        &v2,
        &[&secret("channel")],
        20,
        now + 2 * DAY,
        now + 5 * DAY,
    );
    d.wait_metric("ferry_root_version 2");
    d.wait_status(
        Duration::from_secs(30),
        "old channel key refused after rotation",
        |s| s["update"]["code"] == "metadata_signature",
    );
    publish_signed(
        channel.path(),
        &v2,
        &[&secret("channel2")],
        21,
        now + 2 * DAY,
        now + 5 * DAY,
    );
    d.wait_status(Duration::from_secs(30), "new channel key accepted", |s| {
        s["update"]["state"] != "rejected"
    });
    // The rotation is kept across a restart.
    assert!(d.terminate().success());
    d.spawn();
    d.wait_ready();
    assert!(d.metrics().contains("ferry_root_version 2"));
    assert_eq!(d.model().1, 2);
}

#[test]
fn a_lying_index_cannot_send_endless_data_or_mix_releases() {
    // TUF's endless-data and mix-and-match attacks against the real binary:
    // an index announcing a small size for a large file, and an index whose
    // digest names one release while its URL serves another.
    let channel = tempfile::tempdir().unwrap();
    let mut setup = Setup::new("lying-1");
    setup.source = Some(channel.path().display().to_string());
    let d = Device::start(setup);
    let write_index = |file: &str, digest: &str, size: usize| {
        let index = json!({
            "schema": 1, "fleet": fixtures::FLEET, "channel": fixtures::CHANNEL,
            "latest": {"name": "iris", "version": "2.0.0", "sequence": 2,
                       "digest": digest, "size": size, "url": file}
        });
        std::fs::write(channel.path().join("index.json"), index.to_string()).unwrap();
    };
    bundles().copy_to(fixtures::V2, channel.path());
    bundles().copy_to(fixtures::BAD_RELEASE, channel.path());
    // Endless data: the file is far larger than announced; the download
    // stops at the announced size.
    write_index(fixtures::V2, &bundles().digest(fixtures::V2), 1000);
    d.wait_update_refused("too_large");
    // Mix-and-match: v2's digest, another release's bytes.
    write_index(
        fixtures::BAD_RELEASE,
        &bundles().digest(fixtures::V2),
        bundles().bytes(fixtures::BAD_RELEASE).len(),
    );
    d.wait_update_refused("download_digest_mismatch");
    assert_eq!(d.model().1, 1);
    assert_eq!(d.predict_json(&setosa()).0, 200);
    let metrics = d.metrics();
    for code in ["too_large", "download_digest_mismatch"] {
        assert!(
            metrics.contains(&format!("ferry_updates_rejected_total{{code=\"{code}\"}}")),
            "{metrics}"
        );
    }
}

/// The issue's attack: 1,000 connections that send half a request's
/// headers and wait, against an agent limited to 1,024 descriptors (the
/// common default that 1,100 such connections used up). The agent keeps
/// answering (its connection cap, 256, keeps descriptors to spare; the
/// oldest idle connection makes room for a new one), and closes every
/// half-open connection (pushed out, or at the header timeout). A body
/// that stops arriving is answered and closed at the body timeout, and a
/// JSON body nested 100,000 deep is refused.
#[test]
fn half_open_connections_cannot_hold_the_server() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    use ferry_testkit::slow::{CLOSE_WAIT, closed_by_server, half_open};

    let mut setup = Setup::new("slowloris");
    setup.nofile = Some(1024);
    let d = Device::start(setup);
    let addr = d.http.trim_start_matches("http://").to_string();
    // Headers complete, 10 of 100 body bytes, then nothing.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled
        .write_all(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"records\"",
        )
        .unwrap();
    let mut held = half_open(&addr, 1000);
    for _ in 0..3 {
        assert_eq!(d.get("/healthz").0, 200);
    }
    assert_eq!(d.predict_json(&setosa()).0, 200);
    assert!(
        !d.log_text().contains("Too many open files"),
        "{}",
        d.log_text()
    );

    // Every half-open connection is closed by the agent.
    let deadline = Instant::now() + CLOSE_WAIT;
    loop {
        let open = held.iter_mut().map(closed_by_server).filter(|c| !c).count();
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} still open");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(d.get("/healthz").0, 200);

    // The stalled body: a 400 answer, and the connection closed.
    stalled.set_read_timeout(Some(CLOSE_WAIT)).unwrap();
    let mut answer = String::new();
    let _ = stalled.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");

    // Nesting: serde_json's recursion limit (128) refuses it, quickly and
    // without a stack overflow.
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    let (status, body) = d.post(Some("application/json"), deep.as_bytes());
    assert_eq!(status, 400, "{body}");
    assert_eq!(d.get("/healthz").0, 200);
}

/// The device's engine choice: the golden examples run on the engine that
/// will serve before a bundle is installed, and an engine asked for but
/// absent refuses the bundle with a clear reason (tract keeps nothing
/// running in its place).
#[test]
fn the_configured_engine_serves_and_an_absent_one_refuses_the_bundle() {
    let mut setup = Setup::new("engine-1");
    setup.extra =
        "[engine]\nchoice = \"onnxruntime\"\nonnxruntime = \"/nonexistent/libonnxruntime.so\"\n"
            .into();
    let mut d = Device::create(setup);
    d.spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while d.is_running() {
        assert!(std::time::Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = d.log_text();
    assert!(log.contains("initial bundle"), "{log}");
    assert!(log.contains("refused"), "{log}");
    assert!(log.contains("/nonexistent/libonnxruntime.so"), "{log}");

    let mut setup = Setup::new("engine-2");
    setup.extra = "[engine]\nchoice = \"tract\"\n".into();
    let d = Device::start(setup);
    assert_eq!(d.get("/v1/model").1["engine"], "tract");
    let Some(lib) = ferry_testkit::onnxruntime::library(
        "the_configured_engine_serves_and_an_absent_one_refuses_the_bundle",
    ) else {
        return;
    };
    let mut setup = Setup::new("engine-3");
    setup.extra = format!(
        "[engine]\nchoice = \"onnxruntime\"\nonnxruntime = \"{}\"\n",
        lib.display()
    );
    let d = Device::start(setup);
    assert_eq!(d.get("/v1/model").1["engine"], "onnxruntime");
    let (status, r) = d.predict_json(&setosa());
    assert_eq!(status, 200, "{r}");
    assert_eq!(label_of(&r), "setosa");
    let log = d.log_text();
    assert!(
        log.contains("Loaded a bundle") && log.contains("onnxruntime"),
        "{log}"
    );
}

/// `auto` with both engines present measures them on a release's first load
/// (two processes racing could each pick another engine for the same
/// release); the device remembers the outcome per release in its state
/// directory, so a restart serves on the same engine without measuring
/// again, and says how it chose (`/v1/model`'s `engine_decision`, the
/// `engine` label of `ferry_bundle_info`). A changed library is measured
/// again.
#[test]
fn auto_remembers_its_engine_per_release_across_restarts() {
    let Some(lib) = ferry_testkit::onnxruntime::library(
        "auto_remembers_its_engine_per_release_across_restarts",
    ) else {
        return;
    };
    // A copy of the library this test may touch.
    let libdir = tempfile::tempdir().unwrap();
    let copy = libdir.path().join(lib.file_name().unwrap());
    std::fs::copy(&lib, &copy).unwrap();
    let mut setup = Setup::new("engine-memory");
    setup.extra = format!(
        "[engine]\nchoice = \"auto\"\nonnxruntime = \"{}\"\n",
        copy.display()
    );
    // A home of its own, and the agent's default for onnxruntime's telemetry (the test
    // setup may turn it off for the whole suite; empty counts as unset).
    let home = tempfile::tempdir().unwrap();
    for (k, v) in [
        ("HOME", home.path().to_str().unwrap()),
        (
            "XDG_CACHE_HOME",
            home.path().join("cache").to_str().unwrap(),
        ),
        ("ORT_DISABLE_TELEMETRY", ""),
    ] {
        setup.env.push((k.to_string(), v.to_string()));
    }
    let mut d = Device::start(setup);
    let model = d.get("/v1/model").1;
    assert_eq!(model["engine_decision"], "measured", "{model}");
    let first = model["engine"].as_str().unwrap().to_string();
    let memory = d.dir.path().join("state").join("engines.json");
    let remembered: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&memory).unwrap()).unwrap();
    let choices = remembered["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1, "{remembered}");
    assert_eq!(choices[0]["engine"], first.as_str(), "{remembered}");

    for _ in 0..2 {
        d.terminate();
        d.spawn();
        d.wait_ready();
        let model = d.get("/v1/model").1;
        assert_eq!(model["engine"], first.as_str(), "{model}");
        assert_eq!(model["engine_decision"], "remembered", "{model}");
        let metrics = d.metrics();
        assert!(
            metrics.contains(&format!("engine=\"{first}\"")),
            "{metrics}"
        );
    }

    // The memory, not a new race, decides: the other engine written in the
    // file is the one that serves after a restart (golden examples passing
    // on it).
    let other = if first == "tract" {
        "onnxruntime"
    } else {
        "tract"
    };
    let edited = std::fs::read_to_string(&memory).unwrap().replace(
        &format!("\"engine\": \"{first}\""),
        &format!("\"engine\": \"{other}\""),
    );
    std::fs::write(&memory, edited).unwrap();
    d.terminate();
    d.spawn();
    d.wait_ready();
    let model = d.get("/v1/model").1;
    assert_eq!(model["engine"], other, "{model}");
    assert_eq!(model["engine_decision"], "remembered", "{model}");
    let (status, r) = d.predict_json(&setosa());
    assert_eq!(status, 200, "{r}");
    assert_eq!(label_of(&r), "setosa");

    // Another library (here: the same file, modified later) is measured again.
    d.terminate();
    std::fs::File::options()
        .write(true)
        .open(&copy)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60))
        .unwrap();
    d.spawn();
    d.wait_ready();
    let model = d.get("/v1/model").1;
    assert_eq!(model["engine_decision"], "measured", "{model}");
    assert!(d.log_text().contains("measuring again"), "{}", d.log_text());
    // onnxruntime served in four processes and kept no telemetry store or device id
    // (packager/tests/engines.rs shows the library writing them when allowed).
    let mut written = Vec::new();
    let mut dirs = vec![home.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            written.push(entry.path());
            if entry.path().is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    assert!(written.is_empty(), "onnxruntime wrote {written:?}");
}

/// The inodes of the unnamed files the agent maps from `state` (its
/// precompiled guests), from /proc/PID/maps.
fn unnamed_mappings(pid: u32, state: &std::path::Path) -> Vec<(String, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let state = state.canonicalize().unwrap();
    let mut found: Vec<(String, String)> = maps
        .lines()
        .filter(|l| l.contains(state.to_str().unwrap()) && l.ends_with("(deleted)"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[4].to_string(), f[1].to_string())
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

#[test]
fn a_precompiled_guest_runs_from_an_unnamed_file_no_one_can_swap() {
    // The guest's native code is mapped from a file the agent wrote from
    // the verified bytes, in its state directory, but with no name: an
    // attacker who can write the state directory finds nothing there to
    // replace after verification, and an update leaves nothing behind.
    let v1 = crate::cross::pack_for("mapped-v1.ferry", "1", "x86_64");
    let v2 = crate::cross::pack_for("mapped-v2.ferry", "2", "x86_64");
    let channel = tempfile::tempdir().unwrap();
    let mut setup = Setup::new("mapped-1");
    setup.initial = Some(v1);
    setup.source = Some(channel.path().display().to_string());
    let d = Device::start(setup);
    let (_, m) = d.get("/v1/model");
    assert_eq!(m["guest_target"], "x86_64-unknown-linux-gnu", "{m}");
    assert_eq!(d.predict_json(&setosa()).0, 200);
    let state = d.dir.path().join("state");
    let pid = d.pid().unwrap();
    let v1_maps = unnamed_mappings(pid, &state);
    assert!(
        v1_maps.iter().any(|(_, perms)| perms == "r-xp"),
        "the guest's code is not mapped from the state directory: {v1_maps:?}"
    );
    // No file in the state directory holds a guest (precompiled guests are
    // ELF files): there is nothing to swap.
    let mut stack = vec![state.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let head = std::fs::read(&path).unwrap_or_default();
                assert!(!head.starts_with(b"\x7fELF"), "{}", path.display());
            }
        }
    }
    // An update maps the new guest and frees the old one's file.
    publish(channel.path(), std::path::Path::new(&v2));
    d.wait_status(Duration::from_secs(60), "v2 installed", |s| {
        s["bundle"]["sequence"] == 2
    });
    assert_eq!(d.predict_json(&setosa()).0, 200);
    let old: Vec<&String> = v1_maps.iter().map(|(inode, _)| inode).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = unnamed_mappings(pid, &state);
        let stale = now.iter().any(|(inode, _)| old.contains(&inode));
        if !stale && now.iter().any(|(_, perms)| perms == "r-xp") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "v1's guest still mapped, or v2's not: {now:?} (v1: {v1_maps:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
