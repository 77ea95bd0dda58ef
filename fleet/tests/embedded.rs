//! `ferry-fleet serve --embedded-broker`: rumqttd in the console's process,
//! with real `ferry-agent` processes and no mosquitto.
//!
//! - `agents_report_through_the_embedded_broker`: two agents (which send a
//!   user name and password: rumqttd without auth accepts them) come online
//!   with their bundle; their predictions are counted through
//!   `GET /api/devices`; `ferry-fleet status` reads their retained statuses
//!   from the embedded broker; a QoS 1 subscriber with a persistent session
//!   gets, after reconnecting, what was published while it was away;
//!   SIGKILL of one agent marks it offline through its last will.

use std::time::Duration;

use ferry_link::{AsyncClient, Event, MqttOptions, Packet, QoS};
use ferry_testkit::free_port;
use serde_json::Value;

use crate::device::{Device, Setup, iris_batch, iris_rows};
use crate::fixtures::{FLEET, V1, bundles};
use crate::state::{Serve, ferry_fleet_bin, runtime, wait_until};

/// `GET /api/devices`.
fn devices(serve: &Serve) -> Value {
    let mut r = ureq::get(format!("{}/api/devices", serve.url))
        .header("Authorization", format!("Bearer {}", serve.token))
        .call()
        .unwrap();
    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
}

fn device(fleet: &Value, id: &str) -> Option<Value> {
    fleet["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == id)
        .cloned()
}

/// Polls until the CONNACK: its `session_present`.
async fn connack(el: &mut ferry_link::EventLoop) -> bool {
    loop {
        if let Event::Incoming(Packet::ConnAck(a)) = el.poll().await.unwrap() {
            return a.session_present;
        }
    }
}

/// A persistent (clean_session = false) QoS 1 subscription on `topic`
/// survives a reconnect: what was published meanwhile arrives after it.
async fn persistent_session_survives_a_reconnect(port: u16, topic: &str) {
    let options = |id: &str, clean: bool| {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(clean);
        o.set_keep_alive(Duration::from_secs(5));
        o
    };
    // Session created, subscribed, then dropped.
    let (client, mut el) = AsyncClient::new(options("persistent-sub", false), 10);
    assert!(!connack(&mut el).await);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while el.poll().await.is_ok() {}
    })
    .await;
    drop((client, el));

    // Published while the subscriber is away.
    let (publisher, mut pel) = AsyncClient::new(options("persistent-pub", true), 10);
    publisher
        .publish(topic, QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = pel.poll().await.unwrap() {
            break;
        }
    }

    // Back: the broker kept the session and delivers the message.
    let (_client, mut el) = AsyncClient::new(options("persistent-sub", false), 10);
    assert!(connack(&mut el).await, "session_present after a reconnect");
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .expect("the message published while away");
    assert_eq!(&got.payload[..], b"while away");
    assert_eq!(got.topic, topic);
}

#[test]
fn agents_report_through_the_embedded_broker() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start_args(&dir.path().join("state"), &["--embedded-broker", &addr]);
    assert!(
        serve.log_text().contains("Embedded MQTT broker listening"),
        "{}",
        serve.log_text()
    );

    let ids = ["emb-1", "emb-2"];
    let (one, mut two) = std::thread::scope(|s| {
        let start = |id: &str| {
            let mut setup = Setup::new(id);
            setup.mqtt_port = Some(port);
            s.spawn(move || Device::start(setup))
        };
        let (a, b) = (start(ids[0]), start(ids[1]));
        (a.join().unwrap(), b.join().unwrap())
    });
    let digest = bundles().digest(V1);
    wait_until(
        "both agents online with their bundle",
        || format!("{}\n{}", devices(&serve), serve.log_text()),
        || {
            let fleet = devices(&serve);
            ids.iter().all(|id| {
                device(&fleet, id)
                    .is_some_and(|d| d["online"] == true && d["bundle"]["digest"] == digest)
            })
        },
    );

    // 3 requests for one, 2 for the other.
    let rows = iris_rows("current_same.csv");
    for (agent, n) in [(&one, 3), (&two, 2)] {
        for chunk in rows.chunks(10).take(n) {
            let (status, body) = agent.predict_json(&iris_batch(chunk));
            assert_eq!(status, 200, "{body}");
        }
    }
    wait_until(
        "the requests counted",
        || devices(&serve).to_string(),
        || {
            let fleet = devices(&serve);
            [(ids[0], 3), (ids[1], 2)]
                .iter()
                .all(|(id, n)| device(&fleet, id).is_some_and(|d| d["rate"]["requests"] == *n))
        },
    );
    let fleet = devices(&serve);
    assert_eq!(fleet["counts"]["devices"], 2);
    assert_eq!(fleet["counts"]["online"], 2);
    assert_eq!(device(&fleet, ids[0]).unwrap()["bundle"]["sequence"], 1);

    // Retained statuses: `status` reads them from the embedded broker.
    let out = ferry_fleet_bin()
        .args(["status", "--broker", &format!("mqtt://{addr}")])
        .args(["--fleet", FLEET, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let statuses: Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = statuses.to_string();
    assert!(
        ids.iter().all(|id| text.contains(&format!("\"{id}\""))),
        "{text}"
    );

    // Persistent sessions.
    runtime().block_on(persistent_session_survives_a_reconnect(
        port,
        "ferry-test/persistent",
    ));

    // The last will: SIGKILL leaves no time for an offline status.
    two.kill9();
    wait_until(
        "the killed agent offline (last will)",
        || format!("{}\n{}", devices(&serve), serve.log_text()),
        || device(&devices(&serve), ids[1]).is_some_and(|d| d["online"] == false),
    );
    let fleet = devices(&serve);
    assert_eq!(device(&fleet, ids[0]).unwrap()["online"], true);
    assert_eq!(fleet["counts"]["online"], 1);
    drop(one);
}
