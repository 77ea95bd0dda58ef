//! Canary rollouts against real agents: the console (`ferry_fleet::run`:
//! store, MQTT, rollouts, the HTTP routes devices download from) in this
//! process, driven through its HTTP API with `ferry_fleet::Client`,
//! mosquitto, and three `ferry-agent` processes.
//!
//! `refused_uploads_are_never_stored_and_unused_bundles_are_collected`:
//! uploads refused by verification, fleet, parameters or a running rollout
//! leave no file (a bad `bake` used to leave one); the bundle of a rollout
//! a later `done` rollout replaced is deleted when that one finishes, and
//! unknown files at the next start.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_fleet::RolloutsConfig;
use ferry_fleet::rollout::{Phase, Rollout};
use ferry_fleet::rollouts::NewRollout;
use ferry_format::{PublicKey, SecretKey, TrustPolicy};

use crate::broker::Mosquitto;
use crate::device::{Device, Setup, iris_batch, iris_request, iris_rows};
use crate::fixtures::{self, bundles};
use crate::state::{RunningConsole, console_config};

const DEVICES: [&str; 3] = ["ro-a", "ro-b", "ro-c"];

/// Starts a console with rollouts (the fixtures' release key trusted and
/// signing); `http` is the address to serve on (a restarted console keeps
/// its address: rollouts persist the download URLs they give out).
fn start_console(
    rt: &tokio::runtime::Runtime,
    broker: &Mosquitto,
    state: &Path,
    http: Option<&str>,
) -> RunningConsole {
    let b = bundles();
    let trust = TrustPolicy::new(
        PublicKey::all_from_pem(&std::fs::read_to_string(b.path("release.pub")).unwrap()).unwrap(),
    )
    .unwrap();
    let key =
        SecretKey::from_pem(&std::fs::read_to_string(b.path("release.key")).unwrap()).unwrap();
    let mut config = console_config(broker, state, "rollout-console", http);
    config.rollouts = Some(RolloutsConfig {
        trust,
        key: Some(key),
        public_url: None,
    });
    RunningConsole::start(rt, config)
}

impl RunningConsole {
    /// Waits (the console steps its rollouts every second) until `done`
    /// holds for the latest rollout (or panics).
    fn drive(&self, what: &str, timeout: Duration, done: impl Fn(&Rollout) -> bool) -> Rollout {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.client.rollouts().unwrap().pop().expect("a rollout");
            if done(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:#?}\naudit: {:#?}",
                r,
                self.client.audit().unwrap()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the console knows every device with `sequence`.
    fn wait_fleet_on(&self, sequence: u64, devices: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !devices.iter().all(|d| {
            self.client
                .device(d)
                .unwrap()
                .and_then(|s| s.bundle)
                .is_some_and(|b| b.sequence == sequence)
        }) {
            assert!(
                Instant::now() < deadline,
                "devices not on sequence {sequence}: {:#}",
                self.client.devices().unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether some rollout is not finished.
    fn running(&self) -> bool {
        self.client
            .rollouts()
            .unwrap()
            .iter()
            .any(|r| !r.phase.is_finished())
    }
}

fn params(canary: &str, bake: &str, abort_if: &str) -> NewRollout {
    NewRollout {
        canary: canary.into(),
        bake: bake.into(),
        abort_if: abort_if.into(),
        waves: None,
        shadow: 0,
        install_timeout: Some("60s".into()),
        allow_downgrade: false,
        release: None,
    }
}

fn fleet_of_agents(broker: &Mosquitto, window: u64) -> Vec<Device> {
    DEVICES
        .iter()
        .map(|id| {
            let mut setup = Setup::new(id).mqtt(broker);
            setup.window_predictions = window;
            Device::start(setup)
        })
        .collect()
}

#[test]
fn healthy_canaries_promote_to_everyone_and_a_restart_mid_rollout_resumes() {
    let rt = crate::state::runtime();
    let broker = Mosquitto::start(&DEVICES);
    let state = tempfile::tempdir().unwrap();
    let c = start_console(&rt, &broker, state.path(), None);
    let agents = fleet_of_agents(&broker, 1000);
    c.wait_fleet_on(1, &DEVICES);

    let v2 = bundles().bytes(fixtures::V2);
    // A bake long enough that the console restarted below is still baking.
    let rollout = c
        .client
        .create_rollout(
            &v2,
            &params("34%", "8s", "error_rate>20%;failed_installs>0"),
        )
        .unwrap();
    assert_eq!(rollout.canaries, 2, "34% of 3 rounds up to 2");
    // Canaries install; the others wait.
    let r = c.drive("bake", Duration::from_secs(90), |r| {
        matches!(r.phase, Phase::Bake { .. })
    });
    let canaries = &r.order[..r.canaries];
    let rest = &r.order[r.canaries..];
    for d in canaries {
        assert_eq!(
            agents[DEVICES.iter().position(|x| x == d).unwrap()]
                .model()
                .1,
            2,
            "{d}"
        );
    }
    for d in rest {
        assert_eq!(
            agents[DEVICES.iter().position(|x| x == d).unwrap()]
                .model()
                .1,
            1,
            "{d}"
        );
    }
    // Traffic during the bake, all good.
    for a in &agents {
        for _ in 0..5 {
            assert_eq!(a.predict_json(&iris_request([5.4, 3.4, 1.7, 0.2])).0, 200);
        }
    }

    // The console restarts mid-rollout: the rollout resumes from disk.
    let http = c.client.base().to_string();
    c.stop(&rt);
    let c = start_console(&rt, &broker, state.path(), Some(&http));
    assert!(matches!(
        c.client.rollouts().unwrap()[0].phase,
        Phase::Bake { .. }
    ));
    let r = c.drive("done", Duration::from_secs(120), |r| r.phase == Phase::Done);
    assert_eq!(r.id, rollout.id);
    c.wait_fleet_on(2, &DEVICES);
    for a in &agents {
        assert_eq!(a.model().1, 2);
    }
    // The audit trail says who did what with which bundle.
    let audit = c.client.audit().unwrap();
    let digest = bundles().digest(fixtures::V2);
    assert!(
        audit
            .iter()
            .all(|e| e.bundle_digest == digest && e.operator == "admin")
    );
    let text: Vec<&str> = audit.iter().map(|e| e.what.as_str()).collect();
    assert!(text[0].starts_with("created"), "{text:#?}");
    assert_eq!(
        text.iter()
            .filter(|t| t.starts_with("sent install"))
            .count(),
        3,
        "{text:#?}"
    );
    assert!(text.iter().any(|t| t.contains("promoting")), "{text:#?}");
    assert!(
        text.last()
            .unwrap()
            .contains("every device (3) runs the bundle"),
        "{text:#?}"
    );
    c.stop(&rt);
}

#[test]
fn drifting_canaries_abort_the_rollout_and_go_back() {
    let rt = crate::state::runtime();
    let broker = Mosquitto::start(&DEVICES);
    let state = tempfile::tempdir().unwrap();
    let c = start_console(&rt, &broker, state.path(), None);
    let agents = fleet_of_agents(&broker, 200);
    c.wait_fleet_on(1, &DEVICES);

    let v2 = bundles().bytes(fixtures::V2);
    let rollout = c
        .client
        .create_rollout(&v2, &params("1%", "10m", "drift.psi>0.25"))
        .unwrap();
    assert_eq!(rollout.canaries, 1);
    let r = c.drive("bake", Duration::from_secs(90), |r| {
        matches!(r.phase, Phase::Bake { .. })
    });
    let canary = r.order[0].clone();
    let agent = &agents[DEVICES.iter().position(|x| *x == canary).unwrap()];
    assert_eq!(agent.model().1, 2);
    // The canary's inputs shift: its drift window on v2 crosses the rule.
    for chunk in iris_rows("current_shifted.csv")[..400].chunks(50) {
        assert_eq!(agent.predict_json(&iris_batch(chunk)).0, 200);
    }
    let r = c.drive("aborted", Duration::from_secs(120), |r| {
        matches!(r.phase, Phase::Aborted { .. })
    });
    let Phase::Aborted { reason } = &r.phase else {
        unreachable!()
    };
    assert!(
        reason.contains("drift.psi>0.25") && reason.contains(&canary),
        "{reason}"
    );
    // The canary is back on v1 (a signed rollback command); nobody else
    // was ever told to install.
    assert_eq!(agent.model().1, 1);
    for a in &agents {
        assert_eq!(a.model().1, 1);
    }
    let audit = c.client.audit().unwrap();
    let text: Vec<&str> = audit.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(
        text.iter()
            .filter(|t| t.starts_with("sent install"))
            .count(),
        1,
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|t| t.starts_with(&format!("sent rollback to {canary}"))),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|t| t.starts_with("abort: drift.psi>0.25")),
        "{text:#?}"
    );
    // Only one rollout at a time, and a finished one does not block.
    assert!(!c.running());
    c.stop(&rt);
}

#[test]
fn the_rollout_commands_drive_a_real_console() {
    let broker = Mosquitto::start(&DEVICES[..2]);
    let state = tempfile::tempdir().unwrap();
    let b = bundles();
    let public = b.path("release.pub");
    let key = b.path("release.key");
    let serve = crate::state::Serve::start_with(
        &broker,
        state.path(),
        &[
            "--trust",
            public.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    );
    let agents: Vec<Device> = DEVICES[..2]
        .iter()
        .map(|id| Device::start(Setup::new(id).mqtt(&broker)))
        .collect();
    // An operator's token, made by the admin with the CLI: the audit log
    // names its holder.
    let admin_file = state.path().join(ferry_fleet::auth::ADMIN_TOKEN_FILE);
    let made = crate::state::ferry_fleet_bin()
        .args(["token", "create", "--name", "alice", "--role", "operator"])
        .args(["--console", &serve.url])
        .arg("--token-file")
        .arg(&admin_file)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let alice = String::from_utf8(made.stdout).unwrap().trim().to_string();
    let cli = |args: &[&str]| {
        let o = crate::state::ferry_fleet_bin()
            .args(args)
            .args(["--console", &serve.url])
            .env("FERRY_FLEET_TOKEN", &alice)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // Wait until the console knows both devices.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !DEVICES[..2]
        .iter()
        .all(|d| serve.client().device(d).unwrap().is_some())
    {
        assert!(
            Instant::now() < deadline,
            "devices unknown:\n{}",
            serve.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A bundle the console does not trust is refused with the reason.
    let (code, _, err) = cli(&[
        "rollout",
        b.path(fixtures::UNTRUSTED).to_str().unwrap(),
        "--canary",
        "50%",
        "--bake",
        "1s",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("untrusted_key"), "{err}");
    // A bad rule is refused before anything is sent.
    let (code, _, err) = cli(&[
        "rollout",
        b.path(fixtures::V2).to_str().unwrap(),
        "--canary",
        "50%",
        "--bake",
        "1s",
        "--abort-if",
        "latency>5",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unknown metric"), "{err}");

    let (code, out, err) = cli(&[
        "rollout",
        b.path(fixtures::V2).to_str().unwrap(),
        "--canary",
        "50%",
        "--bake",
        "2s",
        "--abort-if",
        "error_rate>20%",
        "--abort-if",
        "failed_installs>0",
        "--operator",
        "mallory",
    ]);
    // A name of one's choosing is refused: the token names the operator.
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("--operator is not accepted"), "{err}");
    let (code, out, err) = cli(&[
        "rollout",
        b.path(fixtures::V2).to_str().unwrap(),
        "--canary",
        "50%",
        "--bake",
        "2s",
        "--abort-if",
        "error_rate>20%",
        "--abort-if",
        "failed_installs>0",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("rollout r") && out.contains("canaries: "),
        "{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let listing = loop {
        let (code, out, err) = cli(&["rollouts", "--json"]);
        assert_eq!(code, Some(0), "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        if v["rollouts"][0]["phase"]["phase"] == "done" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "rollout not done: {v:#}\n{}",
            serve.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    for a in &agents {
        assert_eq!(a.model().1, 2);
    }
    let audit = listing["audit"].as_array().unwrap();
    assert!(audit.iter().all(|e| e["operator"] == "alice"), "{audit:#?}");
    let (_, table, _) = cli(&["rollouts"]);
    assert!(
        table.contains("done") && table.contains("audit trail:"),
        "{table}"
    );
    // The dashboard's API shows the rollout too, in the JSON shape other
    // clients read (pinned raw, not only through the typed client).
    let r = serve.client().rollouts().unwrap();
    assert_eq!(r[0].phase, Phase::Done);
    let mut answer = ureq::get(format!("{}/api/rollouts", serve.url))
        .header("Authorization", format!("Bearer {alice}"))
        .call()
        .unwrap();
    let raw: serde_json::Value =
        serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(raw[0]["phase"]["phase"], "done", "{raw}");
}

#[test]
fn a_canary_refusing_the_bundle_aborts_the_rollout_and_nobody_changes() {
    let rt = crate::state::runtime();
    let broker = Mosquitto::start(&DEVICES);
    let state = tempfile::tempdir().unwrap();
    let c = start_console(&rt, &broker, state.path(), None);
    let agents = fleet_of_agents(&broker, 1000);
    c.wait_fleet_on(1, &DEVICES);
    // Signed by the trusted key (the console accepts it), but its golden
    // examples fail on the device: the agent refuses to activate it.
    let bad = bundles().bytes(fixtures::GOLDEN_FAILS);
    let rollout = c
        .client
        .create_rollout(&bad, &params("1%", "10m", "failed_installs>0"))
        .unwrap();
    let r = c.drive("aborted", Duration::from_secs(120), |r| {
        matches!(r.phase, Phase::Aborted { .. })
    });
    assert_eq!(r.id, rollout.id);
    let Phase::Aborted { reason } = &r.phase else {
        unreachable!()
    };
    assert!(reason.contains("failed_installs>0"), "{reason}");
    let audit: Vec<String> = c
        .client
        .audit()
        .unwrap()
        .into_iter()
        .map(|e| e.what)
        .collect();
    assert!(
        audit
            .iter()
            .any(|t| t.contains("refused the bundle (golden_failed)")),
        "{audit:#?}"
    );
    // One install command (the canary), no rollback needed, every device
    // still on v1.
    assert_eq!(
        audit
            .iter()
            .filter(|t| t.starts_with("sent install"))
            .count(),
        1,
        "{audit:#?}"
    );
    assert!(
        !audit.iter().any(|t| t.starts_with("sent rollback")),
        "{audit:#?}"
    );
    for a in &agents {
        assert_eq!(a.model().1, 1);
    }
    c.stop(&rt);
}

/// The bundle files in the console's store (`<state>/bundles/`).
fn stored_bundles(state: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state.join("bundles"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn refused_uploads_are_never_stored_and_unused_bundles_are_collected() {
    const ID: &str = "ro-a";
    let rt = crate::state::runtime();
    let broker = Mosquitto::start(&[ID]);
    let state = tempfile::tempdir().unwrap();
    let b = bundles();
    let file = |digest: &str| format!("{digest}.ferry");
    let (v1, v2) = (b.digest(fixtures::V1), b.digest(fixtures::V2));
    let c = start_console(&rt, &broker, state.path(), None);
    let agent = Device::start(Setup::new(ID).mqtt(&broker));
    c.wait_fleet_on(1, &[ID]);

    // Refused by verification, by the fleet, by its parameters, by the
    // fleet's devices: each answered with its reason, nothing kept.
    let refused = [
        (fixtures::UNTRUSTED, params("100%", "1s", "")),
        (fixtures::TAMPERED_PAYLOAD, params("100%", "1s", "")),
        (fixtures::TRUNCATED, params("100%", "1s", "")),
        (fixtures::WRONG_FLEET, params("100%", "1s", "")),
        (fixtures::V2, params("150%", "1s", "")),
        (fixtures::V2, params("100%", "soon", "")),
        (fixtures::V2, params("no-such-device", "1s", "")),
    ];
    for (name, p) in refused {
        let e = c.client.create_rollout(&b.bytes(name), &p).unwrap_err();
        assert_eq!(e.status(), Some(400), "{name}: {e}");
        assert_eq!(
            stored_bundles(state.path()),
            Vec::<String>::new(),
            "{name}: {e}"
        );
    }

    // A rollout of v2: its bundle is kept while it runs and after it is
    // done (the fleet's current release).
    c.client
        .create_rollout(&b.bytes(fixtures::V2), &params("100%", "1s", ""))
        .unwrap();
    assert_eq!(stored_bundles(state.path()), [file(&v2)]);
    // Another one while it runs: refused (busy), not kept.
    let e = c
        .client
        .create_rollout(&b.bytes(fixtures::V1), &params("100%", "1s", ""))
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert_eq!(stored_bundles(state.path()), [file(&v2)]);
    c.drive("v2 done", Duration::from_secs(120), |r| {
        r.phase == Phase::Done
    });
    assert_eq!(agent.model().1, 2);
    assert_eq!(stored_bundles(state.path()), [file(&v2)]);

    // Back to v1 (signed by the operator key: a downgrade, which the
    // admin allows): once that rollout is done, nothing refers to v2's
    // file any more.
    let mut downgrade = params("100%", "1s", "");
    downgrade.allow_downgrade = true;
    c.client
        .create_rollout(&b.bytes(fixtures::V1), &downgrade)
        .unwrap();
    c.drive("v1 done", Duration::from_secs(120), |r| {
        r.phase == Phase::Done && r.spec.bundle.digest == v1
    });
    assert_eq!(agent.model().1, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored_bundles(state.path()) != [file(&v1)] {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            stored_bundles(state.path())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.stop(&rt);

    // At start: what nothing refers to (a file left by an older console, a
    // write interrupted by a crash) goes; v1's file stays.
    let stray = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff.ferry";
    std::fs::write(state.path().join("bundles").join(stray), b"junk").unwrap();
    std::fs::write(state.path().join("bundles").join(".tmp-123-x"), b"junk").unwrap();
    let c = start_console(&rt, &broker, state.path(), None);
    assert_eq!(stored_bundles(state.path()), [file(&v1)]);
    // The history still names v2's rollout and digest.
    let all = c.client.rollouts().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].spec.bundle.digest, v2);
    c.stop(&rt);
}

#[test]
fn with_a_root_of_trust_the_console_takes_only_approved_releases_and_an_operator_key() {
    // Issue 11 item 2 (in part): a console given the devices' root refuses
    // an upload that lacks the approver's signature, and refuses to start
    // with a signing key the devices' root does not make an operator.
    let keys = RootKeys::new();
    let k = |name: &str| keys.path(name);
    let b = bundles();
    let root_file = k("root.json");
    // The binary: a key outside the operator role is refused at start.
    let state = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(fixtures::workspace_bin("ferry-fleet"))
        .args(["serve", "--fleet", fixtures::FLEET, "--root", &root_file])
        .args(["--key", &k("stranger.key"), "--state"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not in the root's operator role"), "{err}");

    // The console with the root's release policy: builder alone is refused
    // (nothing stored), builder + approver is taken.
    let rt = crate::state::runtime();
    let broker = Mosquitto::start(&["ra-1"]);
    let c = keys.console(&rt, &broker, state.path());
    let agent = Device::start(Setup::new("ra-1").mqtt(&broker));
    c.wait_fleet_on(1, &["ra-1"]);
    let e = c
        .client
        .create_rollout(&b.bytes(fixtures::V2), &params("100%", "1s", ""))
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("approver"), "{e}");
    assert_eq!(stored_bundles(state.path()), Vec::<String>::new());
    let approved =
        ferry_format::add_signatures(&b.bytes(fixtures::V2), &[&keys.key("approver")]).unwrap();
    c.client
        .create_rollout(&approved, &params("100%", "1s", ""))
        .unwrap();
    drop(agent);
}

#[test]
fn the_release_registry_records_every_release_and_hands_out_sequences_devices_cannot_push() {
    // Issue 11 items 2 and 3: a forged status claiming sequence u64::MAX - 1
    // made the example retraining hook pack u64::MAX (max reported + 1), and
    // the fleet could never be updated again. Sequences now come from the
    // registry of releases the console took.
    use crate::broker::{Subscriber, SubscriberOptions};
    use ferry_protocol::{BundleRef, Status, Topic, topic};
    const ID: &str = "rg-a";
    let rt = crate::state::runtime();
    let broker = Mosquitto::start(&[ID]);
    let state = tempfile::tempdir().unwrap();
    let b = bundles();
    let c = start_console(&rt, &broker, state.path(), None);
    let agent = Device::start(Setup::new(ID).mqtt(&broker));
    c.wait_fleet_on(1, &[ID]);
    assert_eq!(
        c.client.next_sequence("stable").unwrap(),
        1,
        "an empty registry"
    );
    let r = c
        .client
        .create_rollout(&b.bytes(fixtures::V2), &params("100%", "1s", ""))
        .unwrap();
    c.drive("done", Duration::from_secs(90), |r| r.phase == Phase::Done);
    // A forged status, as any client of the broker could publish it.
    let mut forged = Status::offline(fixtures::FLEET, "rg-forged", "0.1.0");
    forged.online = true;
    forged.ts_ms = ferry_host::now_ms();
    forged.bundle = Some(BundleRef {
        name: "iris".into(),
        version: "9".into(),
        digest: "0".repeat(64),
        fleet: fixtures::FLEET.into(),
        channel: fixtures::CHANNEL.into(),
        sequence: u64::MAX - 1,
        release: String::new(),
    });
    let evil = rt.block_on(Subscriber::connect(&broker, SubscriberOptions::admin(&[])));
    rt.block_on(evil.publish(
        &topic(fixtures::FLEET, "rg-forged", Topic::Status),
        serde_json::to_vec(&forged).unwrap(),
    ));
    // The registry: the release by its signed identity, who uploaded and
    // signed it, its rollout, where it runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let release = loop {
        let releases = c.client.releases().unwrap();
        assert_eq!(releases.len(), 1, "{releases:?}");
        let v = releases[0].clone();
        if v.running_on == [ID.to_string()] {
            break v;
        }
        assert!(Instant::now() < deadline, "{v:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(release.record.release, b.release(fixtures::V2));
    assert_eq!(release.record.sequence, 2);
    assert_eq!(release.record.uploaded_by, "admin");
    assert_eq!(release.record.signed_by.len(), 1);
    assert_eq!(release.rollouts.len(), 1);
    assert_eq!(release.rollouts[0].id, r.id);
    assert_eq!(release.rollouts[0].phase, "done");
    // The next sequence ignores what devices report, through the API and
    // the CLI CI would call.
    assert_eq!(c.client.next_sequence("stable").unwrap(), 3);
    assert_eq!(c.client.next_sequence("beta").unwrap(), 1);
    let out = c.cli("releases", &["--next-sequence"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    let out = c.cli("releases", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&r.id), "{text}");
    drop(agent);
}

/// Keys of a root of trust with a builder (the fixtures' release key), an
/// approver and an operator, made with the real `ferry root init`.
struct RootKeys {
    dir: tempfile::TempDir,
    root: ferry_format::Root,
}

impl RootKeys {
    fn new() -> RootKeys {
        use ferry_testkit::cli::{assert_exit, ferry};
        let dir = tempfile::tempdir().unwrap();
        let k = |name: &str| dir.path().join(name).display().to_string();
        for name in ["root", "approver", "operator", "stranger"] {
            assert_exit(&ferry(&["keygen", "-o", &k(name)]), 0);
        }
        let b = bundles();
        assert_exit(
            &ferry(&[
                "root",
                "init",
                "--root",
                &k("root.pub"),
                "--builder",
                b.path("release.pub").to_str().unwrap(),
                "--approver",
                &k("approver.pub"),
                "--operator",
                &k("operator.pub"),
                "--key",
                &k("root.key"),
                "-o",
                &k("root.json"),
            ]),
            0,
        );
        let root =
            ferry_format::Root::from_envelope(&std::fs::read(k("root.json")).unwrap()).unwrap();
        RootKeys { dir, root }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn key(&self, name: &str) -> SecretKey {
        SecretKey::from_pem(&std::fs::read_to_string(self.path(&format!("{name}.key"))).unwrap())
            .unwrap()
    }

    /// A console over `state` with the root's release policy and the
    /// operator key.
    fn console(
        &self,
        rt: &tokio::runtime::Runtime,
        broker: &Mosquitto,
        state: &Path,
    ) -> RunningConsole {
        let mut config = console_config(broker, state, "approval-console", None);
        config.rollouts = Some(RolloutsConfig {
            trust: self.root.release_policy().clone(),
            key: Some(self.key("operator")),
            public_url: None,
        });
        RunningConsole::start(rt, config)
    }
}

#[test]
fn a_release_reaches_devices_only_after_a_second_person_approves_it() {
    // Issue 11 item 2: CI submits a release the builder signed; it waits in
    // the registry with what an approver needs (manifest, golden examples,
    // baseline, size, diff against the running release); only a second
    // person with an approver credential and the approver's own key (the
    // console holds none) makes it deployable; a rejected release never
    // goes out; a downgrade needs an admin. Every step is in the audit log
    // under the credential's holder.
    use ferry_fleet::client::Client;
    use ferry_fleet::releases::ReleaseStatus;
    use ferry_testkit::cli::{assert_exit, ferry};
    const ID: &str = "ap-a";
    let keys = RootKeys::new();
    let b = bundles();
    let rt = crate::state::runtime();
    let broker = Mosquitto::start(&[ID]);
    let state = tempfile::tempdir().unwrap();
    let c = keys.console(&rt, &broker, state.path());
    // The device enforces the same root: builder and approver on every
    // bundle, the operator's signature on every command.
    let v1 =
        ferry_format::add_signatures(&b.bytes(fixtures::V1), &[&keys.key("approver")]).unwrap();
    let v1_file = keys.dir.path().join("v1-approved.ferry");
    std::fs::write(&v1_file, &v1).unwrap();
    let agent = Device::start({
        let mut setup = Setup::new(ID).mqtt(&broker);
        setup.initial = Some(v1_file.display().to_string());
        setup.root = Some(keys.path("root.json").into());
        setup
    });
    c.wait_fleet_on(1, &[ID]);
    let token = |name: &str, role: &str| {
        let t = c.client.create_token(name, role).unwrap();
        Client::new(c.client.base()).with_token(&t.token)
    };
    let ci = token("ci", "operator");
    let alice = token("alice", "approver");
    let bob = token("bob", "approver");
    let viewer = token("vera", "viewer");

    // CI submits v2, signed by the builder alone: it waits.
    let v2 = b.bytes(fixtures::V2);
    let v2_id = b.release(fixtures::V2);
    let submitted = ci.submit_release(&v2).unwrap();
    assert_eq!(submitted.status, ReleaseStatus::AwaitingApproval);
    assert_eq!(submitted.release, v2_id);
    assert_eq!(submitted.uploaded_by, "ci");
    let review = submitted.review.clone().expect("a review");
    assert!(!review.golden.is_empty(), "{review:?}");
    assert!(!review.baseline.is_empty(), "{review:?}");
    assert_eq!(review.size_bytes, v2.len() as u64);
    assert_eq!(review.manifest["release"]["sequence"], 2);
    // Submitting again changes nothing.
    assert_eq!(
        ci.submit_release(&v2).unwrap().status,
        ReleaseStatus::AwaitingApproval
    );

    // It cannot go out yet: by id, or uploaded with the builder's
    // signature alone.
    let mut by_id = params("100%", "1s", "");
    by_id.release = Some(v2_id.clone());
    let e = ci.create_rollout(&[], &by_id).unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(409), "refused"), "{e}");
    assert!(e.to_string().contains("awaiting_approval"), "{e}");
    let e = ci
        .create_rollout(&v2, &params("100%", "1s", ""))
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");

    // Who may not approve: a viewer, an operator, the submitter, a copy
    // signed by a key that is not an approver's, another release.
    let approved_v2 = keys.dir.path().join("v2-approved.ferry");
    std::fs::write(&approved_v2, &v2).unwrap();
    assert_exit(
        &ferry(&[
            "approve",
            approved_v2.to_str().unwrap(),
            "--key",
            &keys.path("approver.key"),
        ]),
        0,
    );
    let approved = std::fs::read(&approved_v2).unwrap();
    for (who, status) in [(&viewer, 403), (&ci, 403)] {
        let e = who.approve_release(&v2_id, &approved).unwrap_err();
        assert_eq!(e.status(), Some(status), "{e}");
    }
    let stranger = ferry_format::add_signatures(&v2, &[&keys.key("stranger")]).unwrap();
    let e = alice.approve_release(&v2_id, &stranger).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("approver"), "{e}");
    let bad = b.bytes(fixtures::BAD_RELEASE);
    let bad_id = b.release(fixtures::BAD_RELEASE);
    assert_eq!(
        bob.submit_release(&bad).unwrap().status,
        ReleaseStatus::AwaitingApproval
    );
    let bad_approved = ferry_format::add_signatures(&bad, &[&keys.key("approver")]).unwrap();
    let e = alice.approve_release(&v2_id, &bad_approved).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains(&bad_id), "{e}");
    let e = bob.approve_release(&bad_id, &bad_approved).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(e.to_string().contains("second person"), "{e}");
    assert_eq!(
        c.client.release(&v2_id).unwrap().view.record.status,
        ReleaseStatus::AwaitingApproval,
        "nothing changed"
    );

    // Alice approves v2 with the copy she signed; ci rolls it out by id
    // (the CLI, with a prefix of the id), and the device runs it.
    let approved_record = alice.approve_release(&v2_id, &approved).unwrap();
    assert_eq!(approved_record.status, ReleaseStatus::Approved);
    assert_eq!(approved_record.approved_by.as_deref(), Some("alice"));
    assert_eq!(approved_record.signed_by.len(), 2);
    let out = std::process::Command::new(fixtures::workspace_bin("ferry-fleet"))
        .args([
            "rollout",
            "--release",
            &v2_id[..12],
            "--canary",
            "100%",
            "--bake",
            "1s",
        ])
        .args(["--console", c.client.base()])
        .env("FERRY_FLEET_TOKEN", ci_token(&c, "ci-cli"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.drive("done", Duration::from_secs(90), |r| r.phase == Phase::Done);
    c.wait_fleet_on(2, &[ID]);

    // The approver of the next candidate sees what changes from the
    // running release: the digits model in the iris channel.
    let detail = alice.release(&bad_id).unwrap();
    assert_eq!(detail.running_release.as_deref(), Some(v2_id.as_str()));
    let paths: Vec<&str> = detail.diff.iter().map(|d| d.path.as_str()).collect();
    assert!(paths.contains(&"manifest.release.sequence"), "{paths:?}");
    assert!(
        paths.iter().any(|p| p.starts_with("manifest.model.inputs")),
        "{paths:?}"
    );
    let out = c.cli("releases", &["show", &bad_id[..12]]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("changes from the running release"),
        "{text}"
    );
    // She rejects it: it can never go out, and its bundle is gone.
    let rejected = alice
        .reject_release(&bad_id, "digits model in the iris channel")
        .unwrap();
    assert_eq!(rejected.status, ReleaseStatus::Rejected);
    let mut bad_by_id = params("100%", "1s", "");
    bad_by_id.release = Some(bad_id.clone());
    let e = ci.create_rollout(&[], &bad_by_id).unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("rejected"), "{e}");
    for attempt in [&bad, &bad_approved] {
        let e = ci.submit_release(attempt).unwrap_err();
        assert_eq!(e.status(), Some(409), "{e}");
    }
    let e = ci
        .create_rollout(&bad_approved, &params("100%", "1s", ""))
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    let bad_digest = ferry_testkit::fixtures::sha256_hex(&bad);
    assert!(
        !stored_bundles(state.path())
            .iter()
            .any(|f| f.contains(&bad_digest)),
        "{:?}",
        stored_bundles(state.path())
    );

    // Back to v1 (approved, sequence 1) is a downgrade: refused for the
    // operator, who cannot allow it either; an admin can, on the record.
    let e = ci
        .create_rollout(&v1, &params("100%", "1s", ""))
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("downgrade"), "{e}");
    let mut downgrade = params("100%", "1s", "");
    downgrade.allow_downgrade = true;
    let e = ci.create_rollout(&v1, &downgrade).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    // Submitted with both signatures (approved offline): recorded approved,
    // its bundle kept until a rollout takes it by id.
    let v1_record = ci.submit_release(&v1).unwrap();
    assert_eq!(v1_record.status, ReleaseStatus::Approved);
    assert_eq!(v1_record.approved_by, None);
    assert!(
        stored_bundles(state.path())
            .iter()
            .any(|f| f.contains(&v1_record.digest)),
        "{:?}",
        stored_bundles(state.path())
    );
    downgrade.release = Some(v1_record.release.clone());
    c.client.create_rollout(&[], &downgrade).unwrap();
    c.drive("done", Duration::from_secs(90), |r| r.phase == Phase::Done);
    c.wait_fleet_on(1, &[ID]);

    // The audit log names each person and decision.
    let audit: Vec<(String, String)> = c
        .client
        .audit()
        .unwrap()
        .into_iter()
        .map(|e| (e.operator, e.what))
        .collect();
    let has = |who: &str, what: &str| audit.iter().any(|(o, w)| o == who && w.contains(what));
    assert!(has("ci", "submitted"), "{audit:#?}");
    assert!(has("alice", "approved"), "{audit:#?}");
    assert!(has("alice", "rejected"), "{audit:#?}");
    assert!(has("admin", "downgrade allowed by admin"), "{audit:#?}");
    // The registry lists all three with their status and people.
    let releases = c.client.releases().unwrap();
    let status_of = |id: &str| {
        releases
            .iter()
            .find(|r| r.record.release == id)
            .map(|r| r.record.status)
    };
    assert_eq!(status_of(&v2_id), Some(ReleaseStatus::Approved));
    assert_eq!(status_of(&bad_id), Some(ReleaseStatus::Rejected));
    drop(agent);
}

/// A fresh operator token's text (for a CLI run under another name).
fn ci_token(c: &RunningConsole, name: &str) -> String {
    c.client.create_token(name, "operator").unwrap().token
}

#[test]
fn an_approver_reviews_and_approves_a_release_on_the_dashboard() {
    // Issue 11 items 2 and 3 in a real browser: the Releases section lists
    // the registry; a viewer sees the waiting release's review but no form;
    // an approver logs in, reads the review (golden examples, baseline,
    // lineage), picks the copy they signed with `ferry approve` and
    // approves it: the console records her as the approver.
    use crate::dashboard::Browser;
    use ferry_fleet::releases::ReleaseStatus;
    use ferry_testkit::cli::{assert_exit, ferry};
    use serde_json::json;
    let keys = RootKeys::new();
    let b = bundles();
    let rt = crate::state::runtime();
    let broker = Mosquitto::start(&[]);
    let state = tempfile::tempdir().unwrap();
    let c = keys.console(&rt, &broker, state.path());
    let v2_id = b.release(fixtures::V2);
    let ci = c.client.create_token("ci", "operator").unwrap();
    ferry_fleet::client::Client::new(c.client.base())
        .with_token(&ci.token)
        .submit_release(&b.bytes(fixtures::V2))
        .unwrap();
    let signed = keys.dir.path().join("signed.ferry");
    std::fs::write(&signed, b.bytes(fixtures::V2)).unwrap();
    assert_exit(
        &ferry(&[
            "approve",
            signed.to_str().unwrap(),
            "--key",
            &keys.path("approver.key"),
        ]),
        0,
    );
    const RELEASES: &str = r#"(() => {
      const s = document.getElementById('releases');
      if (!s || document.body.dataset.state !== 'ready') return null;
      const row = s.querySelector('tr[data-release]');
      const review = s.querySelector('[data-review]');
      return {
        row: row ? row.textContent : '',
        status: row ? row.dataset.status : '',
        review: review ? review.textContent : '',
        form: !!s.querySelector('form.approve'),
      };
    })()"#;

    // A viewer: the review, no form.
    let vera = c.client.create_token("vera", "viewer").unwrap();
    let mut browser = Browser::launch(1400, 1000);
    browser.login(c.client.base(), &vera.token);
    let seen = browser.wait("the waiting release", RELEASES, |v| {
        v["review"]
            .as_str()
            .is_some_and(|t| t.contains("Golden examples"))
    });
    assert_eq!(seen["status"], "awaiting_approval", "{seen:#}");
    assert_eq!(seen["form"], false, "{seen:#}");
    let review = seen["review"].as_str().unwrap();
    for shown in [
        "Review iris",
        "Submitted by ci",
        "Drift baseline",
        "petal_length",
        "An approver credential is needed",
    ] {
        assert!(review.contains(shown), "{shown:?} not in {review}");
    }
    drop(browser);

    // An approver: picks her signed copy and presses Approve.
    let alice = c.client.create_token("alice", "approver").unwrap();
    let mut browser = Browser::launch(1400, 1000);
    browser.login(c.client.base(), &alice.token);
    browser.wait("the approval form", RELEASES, |v| v["form"] == true);
    let document = browser.call("DOM.getDocument", json!({}));
    let input = browser.call(
        "DOM.querySelector",
        json!({"nodeId": document["root"]["nodeId"], "selector": "form.approve input[type=file]"}),
    );
    browser.call(
        "DOM.setFileInputFiles",
        json!({"nodeId": input["nodeId"], "files": [signed.display().to_string()]}),
    );
    browser.eval("document.querySelector('form.approve button').click(); true");
    let seen = browser.wait("the approved release", RELEASES, |v| {
        v["status"] == "approved"
    });
    assert!(
        seen["row"].as_str().unwrap().contains("approved by alice"),
        "{seen:#}"
    );
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fleet-releases.png");
    browser.screenshot(&shot);
    println!("releases screenshot: {}", shot.display());
    let record = c.client.release(&v2_id).unwrap().view.record;
    assert_eq!(record.status, ReleaseStatus::Approved);
    assert_eq!(record.approved_by.as_deref(), Some("alice"));
    assert_eq!(record.signed_by.len(), 2);
    let errors = browser.errors(&[]);
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn an_operator_pauses_resumes_and_aborts_a_rollout() {
    // Issue 11 item 1: operators start, pause and abort rollouts. A paused
    // rollout installs nothing more and does not promote (past its bake);
    // resumed, it finishes; an abort rolls the canary back. A viewer can
    // do none of it; the audit log names who did each.
    use ferry_fleet::client::Client;
    use ferry_fleet::rollout::Target;
    use ferry_fleet::rollouts::Control;
    let rt = crate::state::runtime();
    let broker = Mosquitto::start(&DEVICES);
    let state = tempfile::tempdir().unwrap();
    let b = bundles();
    let c = start_console(&rt, &broker, state.path(), None);
    let agents = fleet_of_agents(&broker, 50);
    c.wait_fleet_on(1, &DEVICES);
    let token = |name: &str, role: &str| {
        let t = c.client.create_token(name, role).unwrap();
        Client::new(c.client.base()).with_token(&t.token)
    };
    let ops = token("olga", "operator");
    let viewer = token("vera", "viewer");

    let r = ops
        .create_rollout(&b.bytes(fixtures::V2), &params(DEVICES[0], "1s", ""))
        .unwrap();
    c.drive("the bake", Duration::from_secs(90), |r| {
        matches!(r.phase, Phase::Bake { .. })
    });
    let e = viewer.control_rollout(&r.id, &Control::Pause).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let paused = ops.control_rollout(&r.id, &Control::Pause).unwrap();
    assert_eq!(paused.paused.as_ref().map(|p| p.by.as_str()), Some("olga"));
    let e = ops.control_rollout(&r.id, &Control::Pause).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    // Several of the console's ticks, well past the 1 s bake.
    std::thread::sleep(Duration::from_secs(4));
    let now = c.client.rollout(&r.id).unwrap();
    assert!(matches!(now.phase, Phase::Bake { .. }), "{now:#?}");
    for d in &DEVICES[1..] {
        assert_eq!(now.targets[*d], Target::Waiting, "{now:#?}");
    }
    ops.control_rollout(&r.id, &Control::Resume).unwrap();
    c.drive("done", Duration::from_secs(90), |r| r.phase == Phase::Done);
    c.wait_fleet_on(2, &DEVICES);

    // A canary of v1 (a downgrade the admin allows), aborted by the
    // operator while it bakes: the canary goes back to v2.
    let mut back = params(DEVICES[0], "10m", "");
    back.allow_downgrade = true;
    let r = c
        .client
        .create_rollout(&b.bytes(fixtures::V1), &back)
        .unwrap();
    c.drive("v1's bake", Duration::from_secs(90), |x| {
        x.id == r.id && matches!(x.phase, Phase::Bake { .. })
    });
    let e = ops
        .control_rollout(&r.id, &Control::Abort { reason: " ".into() })
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "an abort needs a reason: {e}");
    let e = viewer
        .control_rollout(
            &r.id,
            &Control::Abort {
                reason: "no".into(),
            },
        )
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    ops.control_rollout(
        &r.id,
        &Control::Abort {
            reason: "customer complaint".into(),
        },
    )
    .unwrap();
    let done = c.drive("aborted", Duration::from_secs(90), |x| {
        matches!(x.phase, Phase::Aborted { .. })
    });
    assert!(
        matches!(&done.phase, Phase::Aborted { reason } if reason.contains("aborted by olga: customer complaint")),
        "{done:#?}"
    );
    c.wait_fleet_on(2, &DEVICES);
    let audit = c.client.audit().unwrap();
    for what in [
        "paused by olga",
        "resumed by olga",
        "abort requested by olga",
    ] {
        assert!(
            audit
                .iter()
                .any(|e| e.operator == "olga" && e.what.contains(what)),
            "{what}: {audit:#?}"
        );
    }
    drop(agents);
}
