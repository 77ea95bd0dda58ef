//! The lean device builds (docs/devices.md) on their own architectures:
//! `ferry-agent` cross-built for aarch64 and armv7 without a guest compiler,
//! run under qemu-user against the same real bundles, channel and mosquitto
//! as the x86_64 agent. Each test runs when `.ci/run` names the binary
//! (`FERRY_CROSS_AGENT_AARCH64`, `FERRY_CROSS_AGENT_ARMV7`: testkit's
//! `cross`) and is skipped with a note otherwise; a variable that names no
//! binary fails it.

use std::time::Duration;

use ferry_protocol::{Stream, Topic, topic};
use ferry_testkit::broker::{Mosquitto, Subscriber, SubscriberOptions};
use ferry_testkit::channel::publish;
use ferry_testkit::cli::{assert_exit, ferry};
use ferry_testkit::cross::CrossAgent;
use ferry_testkit::device::{Device, Setup, iris_batch, iris_request, iris_rows};
use ferry_testkit::fixtures::{self, bundles, example, examples};
use serde_json::Value;

/// The packager's golden tolerance (examples/*/ferry.toml).
const TOLERANCE: f64 = 1e-5;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aarch64_device_build_predicts_like_x86_updates_rolls_back_and_reports() {
    exercise("aarch64", "aarch64-unknown-linux-gnu").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn armv7_device_build_predicts_like_x86_updates_rolls_back_and_reports() {
    exercise("armv7", "pulley32").await;
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Packs iris at `sequence` with the guest precompiled for `targets` only.
pub(crate) fn pack_for(name: &str, sequence: &str, targets: &str) -> String {
    let b = bundles();
    let out = b.scratch(name);
    let key = b.path("release.key");
    assert_exit(
        &ferry(&[
            "pack",
            &example("iris"),
            "--key",
            key.to_str().unwrap(),
            "-o",
            &out,
            "--sequence",
            sequence,
            "--fleet",
            fixtures::FLEET,
            "--channel",
            fixtures::CHANNEL,
            "--precompile",
            targets,
        ]),
        0,
    );
    out
}

/// Asserts that two responses agree within the golden tolerance.
fn assert_same(what: &str, x86: &Value, device: &Value) {
    let mismatches = ferry_runtime::compare_json(x86, device, TOLERANCE);
    assert!(
        mismatches.is_empty(),
        "{what}: the device differs from x86_64: {mismatches:?}\nx86: {x86}\ndevice: {device}"
    );
}

async fn exercise(arch: &'static str, guest_target: &'static str) {
    let Some(cross) = CrossAgent::from_env(arch) else {
        eprintln!(
            "skipped: FERRY_CROSS_AGENT_{} is not set (.ci/run sets it after cross-building)",
            arch.to_uppercase()
        );
        return;
    };
    let device = format!("cross-{arch}");
    let broker = Mosquitto::start(&[&device]);
    let topics = [
        topic(fixtures::FLEET, &device, Topic::Stream(Stream::Telemetry)),
        topic(fixtures::FLEET, &device, Topic::Stream(Stream::Events)),
        topic(fixtures::FLEET, &device, Topic::Status),
    ];
    let sub = Subscriber::connect(
        &broker,
        SubscriberOptions::admin(&topics.iter().map(String::as_str).collect::<Vec<_>>()),
    )
    .await;
    let channel = tempfile::tempdir().unwrap();
    let port = broker.port();
    let channel_dir = channel.path().to_path_buf();
    let d = blocking(move || {
        let mut setup = Setup::new(&device);
        setup.mqtt_port = Some(port);
        setup.source = Some(channel_dir.display().to_string());
        setup.cross = Some(cross);
        let d = Device::start(setup);
        // The x86_64 agent of this workspace, serving the same releases.
        let x86 = Device::start(Setup::new(&format!("x86-ref-{arch}")));
        let mut digits_setup = Setup::new(&format!("x86-digits-{arch}"));
        digits_setup.initial = Some(fixtures::BAD_RELEASE.into());
        let x86_digits = Device::start(digits_setup);

        // 1. The default bundle runs without compiling: native code on
        // aarch64, Pulley bytecode on armv7.
        let (status, m) = d.get("/v1/model");
        assert_eq!(status, 200, "{m}");
        assert_eq!(m["guest_target"], guest_target, "{m}");
        assert_eq!(m["precompiled_guest"], true, "{m}");

        // 2. Predictions equal x86_64's within the golden tolerance.
        let rows = iris_rows("iris_test.csv");
        let batch = iris_batch(&rows);
        let (status, on_device) = d.predict_json(&batch);
        assert_eq!(status, 200, "{on_device}");
        let (status, on_x86) = x86.predict_json(&batch);
        assert_eq!(status, 200, "{on_x86}");
        assert_same("iris batch", &on_x86, &on_device);

        // 3. A signed bundle with no guest this build runs (x86_64 native
        // code only) is refused before activation; v1 keeps serving and the
        // refusal is in the status and the metrics.
        let x86_only = pack_for(&format!("x86-only-{arch}.ferry"), "2", "x86_64");
        publish(&channel_dir, std::path::Path::new(&x86_only));
        d.wait_update_refused("guest_target");
        let status = d.status();
        assert!(
                status["update"]["reason"].as_str().is_some_and(|r| r
                    .contains("x86_64-unknown-linux-gnu")
                    && r.contains(guest_target)),
                "{status:#}"
            );
        assert_eq!(d.model(), ("1.0.0".to_string(), 1));
        assert_eq!(d.predict_json(&iris_request(rows[0])).0, 200);
        d.wait_metric("ferry_updates_rejected_total{code=\"guest_target\"} 1");

        // 4. A signed update installs (the digits model, sequence 3), answers
        // like x86_64, and is rolled back when the fleet's traffic fails on it.
        publish(&channel_dir, &bundles().path(fixtures::BAD_RELEASE));
        d.wait_status(
            Duration::from_secs(120),
            "v3 installed, on probation",
            |s| s["bundle"]["sequence"] == 3 && s["update"]["state"] == "probation",
        );
        let png = std::fs::read(examples().join("digits/golden/digit_3.png")).unwrap();
        let (status, on_device) = d.post(Some("image/png"), &png);
        assert_eq!(status, 200, "{on_device}");
        let (status, on_x86) = x86_digits.post(Some("image/png"), &png);
        assert_eq!(status, 200, "{on_x86}");
        assert_same("digit 3", &on_x86, &on_device);
        for _ in 0..15 {
            assert_eq!(d.predict_json(&iris_request(rows[0])).0, 400);
        }
        let s = d.wait_status(Duration::from_secs(60), "rolled back", |s| {
            s["bundle"]["sequence"] == 1
        });
        assert_eq!(s["update"]["state"], "idle", "{s}");
        assert_eq!(d.predict_json(&iris_request(rows[0])).0, 200);
        assert!(d.metrics().contains("ferry_rollbacks_total 1"));
        d.wait_metric("ferry_mqtt_connected 1");
        d
    })
    .await;

    // 5. Over MQTT: status, telemetry of the predictions, and the events of
    // the refusal and the rollback reached mosquitto.
    let arrived = sub
        .wait_for(Duration::from_secs(60), |messages| {
            let text = |t: &str| -> String {
                messages
                    .iter()
                    .filter(|m| m.topic == t)
                    .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                    .collect()
            };
            !text(&topics[0]).is_empty()
                && text(&topics[1]).contains("guest_target")
                && text(&topics[1]).contains("rolled_back")
                && !text(&topics[2]).is_empty()
        })
        .await;
    assert!(
        arrived,
        "MQTT: missing status, telemetry or events; got {:?}\n{}",
        sub.messages()
            .iter()
            .map(|m| (
                m.topic.clone(),
                String::from_utf8_lossy(&m.payload).into_owned()
            ))
            .collect::<Vec<_>>(),
        d.log_text()
    );
    drop(d);
    drop(channel);
}
