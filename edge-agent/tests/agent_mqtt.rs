//! The real `ferry-agent` binary reporting to a real mosquitto: outages,
//! SIGKILL, the last will, and commands from the fleet.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine as _;
use ferry_protocol::{Action, Command, OperatorSignature, SCHEMA_VERSION, Stream, Topic, topic};
use ferry_runtime::SecretKey;
use serde_json::Value;

use ferry_testkit::broker::{Message, Mosquitto, Subscriber, SubscriberOptions};
use ferry_testkit::channel::ChannelServer;
use ferry_testkit::device::{Device, Setup, iris_request};
use ferry_testkit::fixtures::{self, bundles};

const FLEET: &str = fixtures::FLEET;

fn t(device: &str, which: Topic) -> String {
    topic(FLEET, device, which)
}

/// Record ids (with multiplicity) of every batch received on a stream topic.
fn record_ids(messages: &[Message]) -> Vec<u64> {
    messages
        .iter()
        .flat_map(|m| {
            let batch = m.json();
            batch["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_u64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn events(messages: &[Message]) -> Vec<Value> {
    messages
        .iter()
        .flat_map(|m| m.json()["records"].as_array().unwrap().clone())
        .collect()
}

/// A persistent-session subscriber for a device's streams: the broker
/// queues what arrives while it is away (broker restarts included).
async fn watch(broker: &Mosquitto, device: &str) -> Subscriber {
    let filters = [
        t(device, Topic::Stream(Stream::Telemetry)),
        t(device, Topic::Stream(Stream::Events)),
        t(device, Topic::Status),
    ];
    let options = SubscriberOptions {
        clean_session: false,
        client_id: format!("watch-{device}"),
        ..SubscriberOptions::admin(&filters.iter().map(String::as_str).collect::<Vec<_>>())
    };
    Subscriber::connect(broker, options).await
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_predictions_during_a_broker_outage_all_arrive() {
    let device = "mq-outage";
    let mut broker = Mosquitto::start(&[device]);
    let sub = watch(&broker, device).await;
    let d = blocking({
        let setup = Setup::new(device).mqtt(&broker);
        move || Device::start(setup)
    })
    .await;
    let telemetry = t(device, Topic::Stream(Stream::Telemetry));
    // Connected and reporting.
    let d = blocking(move || {
        assert_eq!(d.predict_json(&iris_request([5.4, 3.4, 1.7, 0.2])).0, 200);
        d
    })
    .await;
    assert!(
        sub.wait_for(Duration::from_secs(30), |m| m
            .iter()
            .any(|m| m.topic == telemetry))
            .await,
        "nothing reported before the outage"
    );

    broker.stop();
    let d = blocking(move || {
        std::thread::scope(|s| {
            for _ in 0..8 {
                let d = &d;
                s.spawn(move || {
                    for i in 0..1250 {
                        let x = 4.5 + (i % 30) as f64 * 0.1;
                        let (status, r) = d.predict_json(&iris_request([x, 3.0, 1.5, 0.2]));
                        assert_eq!(status, 200, "{r}");
                    }
                });
            }
        });
        d
    })
    .await;
    broker.restart();

    let total = 10_001;
    let arrived = sub
        .wait_for(Duration::from_secs(120), |m| {
            let msgs: Vec<Message> = m.iter().filter(|m| m.topic == telemetry).cloned().collect();
            record_ids(&msgs).into_iter().collect::<BTreeSet<_>>().len() >= total
        })
        .await;
    let ids = record_ids(&sub.on(&telemetry));
    let distinct: BTreeSet<u64> = ids.iter().copied().collect();
    assert!(
        arrived,
        "only {} of {total} records arrived\n{}",
        distinct.len(),
        d.log_text()
    );
    assert_eq!(distinct.len(), total);
    // Duplicates only within the in-flight window (16 batches).
    let duplicates = ids.len() - distinct.len();
    let per_batch = ids.len() / sub.on(&telemetry).len().max(1) + 1;
    assert!(duplicates <= 16 * per_batch * 2, "{duplicates} duplicates");
    // Everything acknowledged leaves the buffer.
    blocking(move || {
        d.wait_status(Duration::from_secs(30), "buffer drained", |s| {
            s["buffer"]["records"].as_u64() == Some(0)
        });
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_flushed_before_a_sigkill_are_delivered_after_restart() {
    let device = "mq-kill";
    let mut broker = Mosquitto::start(&[device]);
    let sub = watch(&broker, device).await;
    let mut d = blocking({
        let setup = Setup::new(device).mqtt(&broker);
        move || Device::start(setup)
    })
    .await;
    broker.stop();
    d = blocking(move || {
        for i in 0..500 {
            let x = 4.5 + (i % 30) as f64 * 0.1;
            assert_eq!(d.predict_json(&iris_request([x, 3.0, 1.5, 0.2])).0, 200);
        }
        // flush_interval_ms is 100 in the test config: wait for a few flushes.
        std::thread::sleep(Duration::from_millis(600));
        d.kill9();
        d
    })
    .await;
    broker.restart();
    d = blocking(move || {
        d.spawn();
        d.wait_ready();
        d
    })
    .await;
    let telemetry = t(device, Topic::Stream(Stream::Telemetry));
    let ok = sub
        .wait_for(Duration::from_secs(60), |m| {
            let msgs: Vec<Message> = m.iter().filter(|m| m.topic == telemetry).cloned().collect();
            record_ids(&msgs).into_iter().collect::<BTreeSet<_>>().len() >= 500
        })
        .await;
    let distinct: BTreeSet<u64> = record_ids(&sub.on(&telemetry)).into_iter().collect();
    assert!(
        ok,
        "{} of 500 records arrived after the SIGKILL\n{}",
        distinct.len(),
        d.log_text()
    );
    let ok_records: usize = sub
        .on(&telemetry)
        .iter()
        .flat_map(|m| m.json()["records"].as_array().unwrap().clone())
        .filter(|r| r["ok"] == true)
        .map(|r| r["id"].as_u64().unwrap())
        .collect::<BTreeSet<_>>()
        .len();
    assert_eq!(ok_records, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retained_status_and_last_will() {
    let device = "mq-will";
    let broker = Mosquitto::start(&[device]);
    let status_topic = t(device, Topic::Status);
    let sub = Subscriber::connect(&broker, SubscriberOptions::admin(&[&status_topic])).await;
    let mut d = blocking({
        let setup = Setup::new(device).mqtt(&broker);
        move || Device::start(setup)
    })
    .await;
    let online = |want: bool| {
        let status_topic = status_topic.clone();
        move |m: &[Message]| {
            m.iter()
                .rev()
                .find(|m| m.topic == status_topic)
                .is_some_and(|m| m.json()["online"] == want)
        }
    };
    assert!(
        sub.wait_for(Duration::from_secs(30), online(true)).await,
        "no online status"
    );
    let last = sub.on(&status_topic).pop().unwrap().json();
    assert_eq!(last["bundle"]["sequence"], 1);
    assert_eq!(last["schema"], SCHEMA_VERSION);
    // Killed: the broker publishes the last will.
    d = blocking(move || {
        d.kill9();
        d
    })
    .await;
    assert!(
        sub.wait_for(Duration::from_secs(30), online(false)).await,
        "no last will after SIGKILL"
    );
    // A new subscriber sees the retained offline status.
    let late = Subscriber::connect(&broker, SubscriberOptions::admin(&[&status_topic])).await;
    assert!(late.wait_for(Duration::from_secs(10), online(false)).await);
    assert!(late.on(&status_topic)[0].retain);
    // Back online, then a graceful stop says offline too.
    d = blocking(move || {
        d.spawn();
        d.wait_ready();
        d
    })
    .await;
    assert!(sub.wait_for(Duration::from_secs(30), online(true)).await);
    blocking(move || {
        assert!(d.terminate().success());
    })
    .await;
    assert!(sub.wait_for(Duration::from_secs(30), online(false)).await);
}

fn command(id: &str, action: Action) -> Command {
    Command {
        schema: SCHEMA_VERSION,
        id: id.into(),
        issued_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        action,
        signature: None,
        signatures: Vec::new(),
    }
}

fn sign(mut c: Command, device: &str) -> Command {
    let key = SecretKey::from_pem(&std::fs::read_to_string(bundles().path("release.key")).unwrap())
        .unwrap();
    let sig = key.sign_detached(&c.signing_bytes(FLEET, device));
    c.signature = Some(OperatorSignature {
        key_id: key.key_id().to_string(),
        signature: base64::engine::general_purpose::STANDARD.encode(sig),
    });
    c
}

/// Signs `c` for `device` and publishes it on the device's command topic.
async fn send_signed(admin: &Subscriber, device: &str, c: Command) {
    admin
        .publish(
            &t(device, Topic::Command),
            serde_json::to_vec(&sign(c, device)).unwrap(),
        )
        .await
}

/// A signed-to-be rollback that leaves v2.
fn leave_v2(id: &str, reason: &str) -> Command {
    command(
        id,
        Action::Rollback {
            reason: Some(reason.into()),
            from: Some(bundles().release(fixtures::V2)),
        },
    )
}

/// A device on mosquitto, commanded by an admin client, with a channel
/// server holding v2; returns once the device reported itself online.
struct Commanded {
    broker: Mosquitto,
    sub: Subscriber,
    admin: Subscriber,
    channel_dir: tempfile::TempDir,
    server: ChannelServer,
    device: Device,
    cmd_topic: String,
}

async fn commanded(device: &'static str) -> Commanded {
    let broker = Mosquitto::start(&[device]);
    let sub = watch(&broker, device).await;
    let channel_dir = tempfile::tempdir().unwrap();
    bundles().copy_to(fixtures::V2, channel_dir.path());
    let server = ChannelServer::start(channel_dir.path());
    let d = blocking({
        let setup = Setup::new(device).mqtt(&broker);
        move || Device::start(setup)
    })
    .await;
    let admin = Subscriber::connect(&broker, SubscriberOptions::admin(&[])).await;
    // Wait until the agent is connected (online status seen).
    let status_topic = t(device, Topic::Status);
    assert!(
        sub.wait_for(Duration::from_secs(30), |m| m
            .iter()
            .any(|m| m.topic == status_topic && m.json()["online"] == true))
            .await
    );
    Commanded {
        broker,
        sub,
        admin,
        channel_dir,
        server,
        device: d,
        cmd_topic: t(device, Topic::Command),
    }
}

/// Publishes a signed install of v2 on `topic` and waits until the device
/// serves it.
async fn install_v2(
    admin: &Subscriber,
    topic: &str,
    server: &ChannelServer,
    id: &str,
    d: Device,
) -> Device {
    let install = command(
        id,
        Action::Install {
            url: server.url(fixtures::V2),
            digest: bundles().digest(fixtures::V2),
        },
    );
    // Signed for the whole fleet when sent to `all`, else for the device.
    let target = topic.split('/').nth(3).unwrap().to_string();
    let install = sign(install, &target);
    admin
        .publish(topic, serde_json::to_vec(&install).unwrap())
        .await;
    blocking(move || {
        d.wait_status(Duration::from_secs(30), "v2 installed by command", |s| {
            s["bundle"]["sequence"] == 2
        });
        d
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_install_roll_back_and_shadow() {
    let device = "mq-cmd";
    let Commanded {
        broker: _broker,
        sub,
        admin,
        channel_dir,
        server,
        device: d,
        cmd_topic,
    } = commanded(device).await;
    let all_topic = topic(FLEET, ferry_protocol::ALL_DEVICES, Topic::Command);
    let v2 = bundles().digest(fixtures::V2);
    let d = install_v2(&admin, &all_topic, &server, "c-install", d).await;

    // An unsigned install (here of v1 over v2) is refused: only operators
    // may make the device fetch a URL.
    let d = blocking(move || {
        d.wait_status(Duration::from_secs(10), "v2 serving", |s| {
            s["bundle"]["sequence"] == 2
        });
        d
    })
    .await;
    let v1_url = server.url(fixtures::V1);
    let v1 = bundles().digest(fixtures::V1);
    bundles().copy_to(fixtures::V1, channel_dir.path());
    let downgrade = command(
        "c-downgrade",
        Action::Install {
            url: v1_url.clone(),
            digest: v1.clone(),
        },
    );
    admin
        .publish(&cmd_topic, serde_json::to_vec(&downgrade).unwrap())
        .await;
    let events_topic = t(device, Topic::Stream(Stream::Events));
    assert!(
        rejected(
            &sub,
            &events_topic,
            "c-downgrade",
            "needs operator signatures",
            1
        )
        .await
    );
    assert_eq!(d.model().1, 2);

    // An unsigned rollback is refused; a signed one goes back to v1.
    let leave_v2 = Some(bundles().release(fixtures::V2));
    let unsigned = command(
        "c-rb-unsigned",
        Action::Rollback {
            reason: None,
            from: leave_v2.clone(),
        },
    );
    admin
        .publish(&cmd_topic, serde_json::to_vec(&unsigned).unwrap())
        .await;
    assert!(rejected(&sub, &events_topic, "c-rb-unsigned", "", 1).await);
    let forged = {
        let mut c = sign(
            command(
                "c-rb-forged",
                Action::Rollback {
                    reason: None,
                    from: leave_v2.clone(),
                },
            ),
            device,
        );
        c.id = "c-rb-forged-2".into(); // the signature no longer matches
        c
    };
    admin
        .publish(&cmd_topic, serde_json::to_vec(&forged).unwrap())
        .await;
    assert!(rejected(&sub, &events_topic, "c-rb-forged-2", "", 1).await);
    let signed = sign(
        command(
            "c-rb",
            Action::Rollback {
                reason: Some("operator test".into()),
                from: leave_v2,
            },
        ),
        device,
    );
    admin
        .publish(&cmd_topic, serde_json::to_vec(&signed).unwrap())
        .await;
    let d = blocking(move || {
        d.wait_status(Duration::from_secs(30), "rolled back by command", |s| {
            s["bundle"]["sequence"] == 1
        });
        d
    })
    .await;

    // Shadow: v2 (the same model) on live traffic agrees completely.
    let shadow = sign(
        command(
            "c-shadow",
            Action::ShadowStart {
                url: server.url(fixtures::V2),
                digest: v2,
                samples: 20,
            },
        ),
        device,
    );
    admin
        .publish(&cmd_topic, serde_json::to_vec(&shadow).unwrap())
        .await;
    let d = blocking(move || {
        d.wait_status(Duration::from_secs(30), "shadow running", |s| {
            !s["shadow"].is_null()
        });
        for i in 0..40 {
            let x = 4.5 + (i % 30) as f64 * 0.1;
            let request = iris_request([x, 3.0, 1.5 + (i % 5) as f64, 0.2]);
            if i % 2 == 0 {
                assert_eq!(d.predict_json(&request).0, 200);
            } else {
                // Live requests answered in a binary form are compared too (the
                // candidate answers in the same form).
                let (status, ct, _) = d.post_accept(
                    "application/json",
                    "application/x-ferry-tensors",
                    request.to_string().as_bytes(),
                );
                assert_eq!((status, ct.as_str()), (200, "application/x-ferry-tensors"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        d
    })
    .await;
    let report = |m: &[Message]| {
        let evs: Vec<Message> = m
            .iter()
            .filter(|m| m.topic == events_topic)
            .cloned()
            .collect();
        events(&evs)
            .into_iter()
            .find(|e| e["event"] == "shadow_report")
    };
    assert!(
        sub.wait_for(Duration::from_secs(30), |m| report(m).is_some())
            .await,
        "no shadow report\n{}",
        d.log_text()
    );
    let r = report(&sub.messages()).unwrap();
    assert_eq!(r["compared"], 20, "{r}");
    assert_eq!(r["candidate_errors"], 0, "{r}");
    assert_eq!(r["top1_agreement"], 1.0, "{r}");
    assert!(r["mean_abs_diff"].as_f64().unwrap() < 1e-9, "{r}");
    assert_eq!(r["candidate"]["sequence"], 2);
    assert_eq!(r["stopped_early"], false);
    // The event log tells the story, in order.
    let kinds: Vec<String> = events(&sub.on(&events_topic))
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    let mut counts = BTreeMap::new();
    for k in &kinds {
        *counts.entry(k.as_str()).or_insert(0) += 1;
    }
    assert!(counts.contains_key("update_installed"), "{kinds:?}");
    assert!(counts.contains_key("rolled_back"), "{kinds:?}");
}

/// Waits (30 s at most) until `n` `command_rejected` events for `id` whose
/// reason contains `why` arrived on `events_topic`.
async fn rejected(sub: &Subscriber, events_topic: &str, id: &str, why: &str, n: usize) -> bool {
    let (topic, id, why) = (events_topic.to_string(), id.to_string(), why.to_string());
    sub.wait_for(Duration::from_secs(30), move |m| {
        rejections(m, &topic, &id, &why) >= n
    })
    .await
}

/// Events `command_rejected` for `id` whose reason contains `why`.
fn rejections(messages: &[Message], events_topic: &str, id: &str, why: &str) -> usize {
    let evs: Vec<Message> = messages
        .iter()
        .filter(|m| m.topic == events_topic)
        .cloned()
        .collect();
    events(&evs)
        .iter()
        .filter(|e| {
            e["event"] == "command_rejected"
                && e["command_id"] == id
                && e["reason"].as_str().is_some_and(|r| r.contains(why))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_commands_cannot_be_preempted_replayed_or_dated_ahead() {
    // Issue 10, item 3: duplicate ids were kept in one in-memory ring filled
    // by unsigned commands too: an unsigned command sent first with the id
    // of a later signed one made the signed one be dropped silently; after
    // 256 unsigned pings, or any restart, a captured signed rollback ran
    // again; `issued_ms` in the future was accepted.
    let device = "mq-replay";
    let Commanded {
        broker: _broker,
        sub,
        admin,
        channel_dir: _channel_dir,
        server,
        device: d,
        cmd_topic,
    } = commanded(device).await;
    let events_topic = t(device, Topic::Stream(Stream::Events));
    // v2 by an (unsigned) install, so a rollback has somewhere to go.
    let d = install_v2(&admin, &cmd_topic, &server, "r-install", d).await;

    // Pre-emption: an unsigned ping claims the signed rollback's id first.
    admin
        .publish(
            &cmd_topic,
            serde_json::to_vec(&command("r-rb", Action::Ping)).unwrap(),
        )
        .await;
    let rollback = sign(
        command(
            "r-rb",
            Action::Rollback {
                reason: Some("replay test".into()),
                from: Some(bundles().release(fixtures::V2)),
            },
        ),
        device,
    );
    let captured = serde_json::to_vec(&rollback).unwrap();
    admin.publish(&cmd_topic, captured.clone()).await;
    let mut d = blocking(move || {
        d.wait_status(
            Duration::from_secs(30),
            "rolled back by the signed command",
            |s| s["bundle"]["sequence"] == 1,
        );
        d
    })
    .await;

    // A replay of the captured command, in the same process: refused, visibly.
    admin.publish(&cmd_topic, captured.clone()).await;
    assert!(rejected(&sub, &events_topic, "r-rb", "replay", 1).await);

    // Dated an hour ahead of the device's clock: refused.
    let mut ahead = command("r-ahead", Action::Ping);
    ahead.issued_ms += 3_600_000;
    admin
        .publish(
            &cmd_topic,
            serde_json::to_vec(&sign(ahead, device)).unwrap(),
        )
        .await;
    assert!(rejected(&sub, &events_topic, "r-ahead", "future", 1).await);

    // After a restart the record is still there: the replay is refused again
    // and v1 keeps serving.
    d = blocking(move || {
        assert!(d.terminate().success());
        d.spawn();
        d.wait_ready();
        d
    })
    .await;
    admin.publish(&cmd_topic, captured).await;
    assert!(rejected(&sub, &events_topic, "r-rb", "replay", 2).await);
    blocking(move || {
        assert_eq!(d.model().1, 1);
        let metrics = d.metrics();
        assert!(metrics.contains("ferry_predictions_total"), "{metrics}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolled_back_release_stays_out_however_resigned_and_a_downgrade_pins() {
    // Issue 10, items 1 and 9: refusals were remembered by the file's digest,
    // which the signature block does not cover: one junk signature under an
    // unknown key id gave a rolled-back release a new digest and the channel
    // reinstalled it. And after an operator's downgrade the next poll
    // reinstalled the newer release.
    let device = "mq-identity";
    let broker = Mosquitto::start(&[device]);
    let sub = watch(&broker, device).await;
    let admin = Subscriber::connect(&broker, SubscriberOptions::admin(&[])).await;
    let channel = tempfile::tempdir().unwrap();
    let server = ChannelServer::start(channel.path());
    let events_topic = t(device, Topic::Stream(Stream::Events));
    let d = blocking({
        let mut setup = Setup::new(device).mqtt(&broker);
        setup.source = Some(channel.path().display().to_string());
        move || Device::start(setup)
    })
    .await;
    ferry_testkit::channel::publish(channel.path(), &bundles().path(fixtures::V2));
    let d = blocking(move || {
        d.wait_status(Duration::from_secs(30), "v2 from the channel", |s| {
            s["bundle"]["sequence"] == 2
        });
        d
    })
    .await;
    let send = |c: Command| send_signed(&admin, device, c);

    // An operator's signed downgrade to v1 installs and pins: the channel,
    // still offering v2, does not undo it.
    bundles().copy_to(fixtures::V1, channel.path());
    send(command(
        "p-install-v1",
        Action::Install {
            url: server.url(fixtures::V1),
            digest: bundles().digest(fixtures::V1),
        },
    ))
    .await;
    let d = blocking(move || {
        d.wait_status(Duration::from_secs(30), "v1 by the operator", |s| {
            s["bundle"]["sequence"] == 1
        });
        d.wait_update_refused("pinned");
        assert_eq!(d.model().1, 1);
        d
    })
    .await;
    // `unpin` lifts it: the channel's v2 comes back.
    send(command("p-unpin", Action::Unpin)).await;
    let d = blocking(move || {
        d.wait_status(Duration::from_secs(30), "v2 after unpin", |s| {
            s["bundle"]["sequence"] == 2
        });
        d
    })
    .await;

    // A rollback that does not name the release it leaves is refused.
    send(command(
        "p-rb-unnamed",
        Action::Rollback {
            reason: None,
            from: None,
        },
    ))
    .await;
    assert!(
        rejected(
            &sub,
            &events_topic,
            "p-rb-unnamed",
            "must name the release",
            1
        )
        .await
    );
    // A stale rollback (naming a release the device does not run) is refused.
    send(command(
        "p-rb-stale",
        Action::Rollback {
            reason: None,
            from: Some(bundles().release(fixtures::V1)),
        },
    ))
    .await;
    assert!(rejected(&sub, &events_topic, "p-rb-stale", "stale rollback", 1).await);
    // The operator rolls v2 back.
    send(leave_v2("p-rb", "bad release")).await;
    let d = blocking(move || {
        d.wait_status(Duration::from_secs(30), "rolled back to v1", |s| {
            s["bundle"]["sequence"] == 1
        });
        // The original v2, still on the channel, is refused first (waited
        // for: with a guest that compiles fast the rollback is over before
        // the next poll, and the re-signed copy must not race it).
        d.wait_metric("ferry_updates_rejected_total{code=\"rejected_before\"} 1");
        d
    })
    .await;
    // The attack: v2 with one more signature, by a key nobody knows. It
    // still verifies (unknown keys are skipped) and its file digest is new;
    // its release (the signed manifest) is the same, and stays refused.
    let junk = SecretKey::generate().unwrap();
    let resigned = ferry_format::add_signatures(&bundles().bytes(fixtures::V2), &[&junk]).unwrap();
    assert_ne!(
        fixtures::sha256_hex(&resigned),
        bundles().digest(fixtures::V2)
    );
    ferry_format::verify(&resigned, &bundles().trust(), &Default::default()).unwrap();
    let path = channel.path().join("v2-resigned.ferry");
    std::fs::write(&path, &resigned).unwrap();
    ferry_testkit::channel::publish(channel.path(), &path);
    let d = blocking(move || {
        d.wait_metric("ferry_updates_rejected_total{code=\"rejected_before\"} 2");
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(d.model().1, 1, "the re-signed release came back");
        let metrics = d.metrics();
        // Refused twice: the original v2 still on the channel right after
        // the rollback, then the re-signed copy.
        assert!(
            metrics.contains("ferry_updates_rejected_total{code=\"rejected_before\"} 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains("ferry_commands_rejected_total 2"),
            "{metrics}"
        );
        d
    })
    .await;

    // A release refused by its golden examples, re-signed and published by
    // an older publisher whose index has no `release`: the device can only
    // tell after downloading and verifying it; then it remembers the file's
    // digest too, so later polls do not download it again.
    ferry_testkit::channel::publish(channel.path(), &bundles().path(fixtures::GOLDEN_FAILS));
    let d = blocking(move || {
        d.wait_update_refused("golden_failed");
        d
    })
    .await;
    let resigned =
        ferry_format::add_signatures(&bundles().bytes(fixtures::GOLDEN_FAILS), &[&junk]).unwrap();
    let path = channel.path().join("golden-fails-resigned.ferry");
    std::fs::write(&path, &resigned).unwrap();
    ferry_testkit::channel::publish(channel.path(), &path);
    let index_path = channel.path().join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["latest"].as_object_mut().unwrap().remove("release");
    std::fs::write(&index_path, index.to_string()).unwrap();
    let resigned_digest = fixtures::sha256_hex(&resigned);
    blocking(move || {
        let needle = "ferry_updates_rejected_total{code=\"rejected_before\"} 3";
        d.wait_metric(needle);
        let record: Value =
            serde_json::from_slice(&std::fs::read(d.dir.path().join("state/active.json")).unwrap())
                .unwrap();
        assert!(
            record["rejected_digests"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == resigned_digest.as_str()),
            "{record}"
        );
        // Polls go on (every second): no download, so no new refusal.
        std::thread::sleep(Duration::from_secs(3));
        assert!(d.metrics().contains(needle), "{}", d.metrics());
        assert_eq!(d.model().1, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_root_of_trust_requires_a_builder_and_an_approver_and_two_operators() {
    // Issue 10, item 2: with `key_threshold = 2` a rollback signed by one key
    // was obeyed, and the keys that sign bundles also signed commands. A
    // root with roles: builder + approver for releases, 2 of 2 operators
    // for commands, made with the real `ferry` tools.
    use ferry_testkit::cli::{assert_exit, ferry, stdout};
    let keys = tempfile::tempdir().unwrap();
    let k = |name: &str| keys.path().join(name).display().to_string();
    for name in ["root", "builder", "approver", "op1", "op2"] {
        assert_exit(&ferry(&["keygen", "-o", &k(name)]), 0);
    }
    let root_file = k("root.json");
    let o = ferry(&[
        "root",
        "init",
        "--root",
        &k("root.pub"),
        "--builder",
        &k("builder.pub"),
        "--approver",
        &k("approver.pub"),
        "--operator",
        &k("op1.pub"),
        "--operator",
        &k("op2.pub"),
        "--operator-threshold",
        "2",
        "--key",
        &k("root.key"),
        "-o",
        &root_file,
    ]);
    assert_exit(&o, 0);
    assert_exit(&ferry(&["root", "verify", &root_file]), 0);
    // Releases: the fixtures' manifests countersigned by builder (and approver).
    let secret = |name: &str| {
        SecretKey::from_pem(&std::fs::read_to_string(k(&format!("{name}.key"))).unwrap()).unwrap()
    };
    let (builder, approver) = (secret("builder"), secret("approver"));
    let v1 = keys.path().join("v1-approved.ferry");
    std::fs::write(
        &v1,
        ferry_format::add_signatures(&bundles().bytes(fixtures::V1), &[&builder, &approver])
            .unwrap(),
    )
    .unwrap();
    let channel = tempfile::tempdir().unwrap();
    let v2 = channel.path().join("v2.ferry");
    std::fs::write(
        &v2,
        ferry_format::add_signatures(&bundles().bytes(fixtures::V2), &[&builder]).unwrap(),
    )
    .unwrap();
    // The builder alone is not enough, for `ferry verify` as for the device.
    let o = ferry(&["verify", &v2.display().to_string(), "--root", &root_file]);
    assert_exit(&o, 3);

    let device = "mq-root";
    let broker = Mosquitto::start(&[device]);
    let sub = watch(&broker, device).await;
    let admin = Subscriber::connect(&broker, SubscriberOptions::admin(&[])).await;
    let events_topic = t(device, Topic::Stream(Stream::Events));
    let cmd_topic = t(device, Topic::Command);
    let d = blocking({
        let mut setup = Setup::new(device).mqtt(&broker);
        setup.initial = Some(v1.display().to_string());
        setup.root = Some(root_file.clone().into());
        setup.source = Some(channel.path().display().to_string());
        move || Device::start(setup)
    })
    .await;
    ferry_testkit::channel::publish(channel.path(), &v2);
    let d = blocking(move || {
        d.wait_update_refused("below_threshold");
        d
    })
    .await;
    assert_eq!(d.model().1, 1);
    // The approver reviews and adds their signature: now it installs.
    let o = ferry(&[
        "approve",
        &v2.display().to_string(),
        "--key",
        &k("approver.key"),
    ]);
    assert_exit(&o, 0);
    assert_exit(
        &ferry(&["verify", &v2.display().to_string(), "--root", &root_file]),
        0,
    );
    ferry_testkit::channel::publish(channel.path(), &v2);
    let d = blocking(move || {
        d.wait_status(Duration::from_secs(30), "approved v2", |s| {
            s["bundle"]["sequence"] == 2
        });
        d
    })
    .await;

    // Commands: one operator, or a release key, is not enough.
    let signed = |id: &str, keys: &[&str]| {
        let mut args = vec![
            "command".to_string(),
            "rollback".into(),
            "--fleet".into(),
            FLEET.into(),
            "--device".into(),
            device.into(),
            "--from".into(),
            v2.display().to_string(),
            "--id".into(),
            id.into(),
        ];
        for key in keys {
            args.push("--key".into());
            args.push(k(&format!("{key}.key")));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ferry(&args);
        assert_exit(&o, 0);
        stdout(&o).trim().to_string()
    };
    for (id, by) in [
        ("rb-op1", vec!["op1"]),
        ("rb-builder", vec!["builder", "op1"]),
    ] {
        admin.publish(&cmd_topic, signed(id, &by)).await;
        assert!(
            rejected(&sub, &events_topic, id, "operator", 1).await,
            "{id} not refused"
        );
    }
    let d = blocking(move || {
        assert_eq!(d.model().1, 2);
        d
    })
    .await;
    admin
        .publish(&cmd_topic, signed("rb-both", &["op1", "op2"]))
        .await;
    blocking(move || {
        d.wait_status(
            Duration::from_secs(30),
            "rolled back by two operators",
            |s| s["bundle"]["sequence"] == 1,
        );
        assert!(d.metrics().contains("ferry_commands_rejected_total 2"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollback_preempts_a_stalled_download_staging_holds_one_bundle_and_sigterm_is_prompt() {
    // Issue 10, item 5: with a server trickling bytes, the single update
    // worker held on: a signed rollback sent meanwhile had not started after
    // 193 s, abandoned partial downloads piled up in staging, and SIGTERM
    // waited 60 s.
    let device = "mq-stall";
    let Commanded {
        broker: _broker,
        sub: _sub,
        admin,
        channel_dir,
        server,
        device: d,
        cmd_topic,
    } = commanded(device).await;
    let d = install_v2(&admin, &cmd_topic, &server, "s-install", d).await;
    let staging = d.dir.path().join("state/staging");
    let send = |c: Command| send_signed(&admin, device, c);
    let install = |id: &str, fixture: &str| {
        bundles().copy_to(fixture, channel_dir.path());
        command(
            id,
            Action::Install {
                url: server.url(fixture),
                digest: bundles().digest(fixture),
            },
        )
    };
    // One byte every 0.5 s: the minimum rate would end it only after 30 s.
    server.trickle(Some(Duration::from_millis(500)));
    send(install("s-slow-1", fixtures::BAD_RELEASE)).await;
    let d = blocking(move || {
        d.wait_status(Duration::from_secs(30), "downloading", |s| {
            s["update"]["state"] == "downloading"
        });
        d
    })
    .await;
    send(leave_v2("s-rb", "pre-empts the download")).await;
    let d = blocking(move || {
        // Well before the 30 s the stalled download alone would hold it.
        d.wait_status(
            Duration::from_secs(15),
            "rolled back during a download",
            |s| s["bundle"]["sequence"] == 1,
        );
        d
    })
    .await;
    // A second download, from a server gone silent (a byte every two
    // minutes): the first one's partial file is gone.
    server.trickle(Some(Duration::from_secs(120)));
    send(install("s-slow-2", fixtures::GOLDEN_FAILS)).await;
    let mut d = blocking(move || {
        d.wait_status(Duration::from_secs(30), "downloading again", |s| {
            s["update"]["state"] == "downloading"
        });
        d
    })
    .await;
    let names: Vec<String> = std::fs::read_dir(&staging)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let golden = bundles().digest(fixtures::GOLDEN_FAILS);
    assert!(
        names.iter().all(|n| n.starts_with(&golden)),
        "staging holds only the current download: {names:?}"
    );
    // SIGTERM in the middle of it (the download blocked in a read): the
    // process ends promptly, cleanly.
    let started = std::time::Instant::now();
    let status = blocking(move || {
        let s = d.terminate();
        (s, d)
    })
    .await;
    assert!(status.0.success());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "SIGTERM took {:?}",
        started.elapsed()
    );
}
