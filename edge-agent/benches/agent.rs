//! The agent as a device sees it: idle resident memory with a bundle
//! loaded, and what the HTTP layer adds to a prediction compared with an
//! in-process `Session::infer` on the same bundle, measured in the same run.
//!
//! `cargo bench --workspace --bench agent` (needs the workspace's `ferry`
//! binary next to `ferry-agent`, which the workspace build provides).
//!
//! With `FERRY_BENCH_DEVICE_AGENT` naming another `ferry-agent` for this
//! machine (the lean device build: `scripts/device-build.sh x86_64`), it
//! also compares the two binaries on the same bundles: idle memory (VmRSS,
//! RssAnon, RssFile) and HTTP prediction latency in interleaved rounds.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_runtime::{PublicKey, Session, TrustPolicy};
use ferry_testkit::cli::assert_exit;
use ferry_testkit::fixtures::examples;
use ferry_testkit::free_port;

fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry-agent"))
}

fn ferry(args: &[&str]) {
    assert_exit(&ferry_testkit::cli::ferry(args), 0);
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `RssAnon:`, `RssFile:`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

struct Running {
    child: std::process::Child,
    url: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(dir: &Path, bundle: &Path, public: &Path) -> Running {
    start_binary(&agent_bin(), dir, bundle, public)
}

fn start_binary(binary: &Path, dir: &Path, bundle: &Path, public: &Path) -> Running {
    let port = free_port();
    let config = format!(
        "[device]\nid = \"bench\"\nfleet = \"demo\"\n\n[paths]\nstate_dir = \"{}\"\ninitial_bundle = \"{}\"\ntrusted_keys = [\"{}\"]\n\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n\n[telemetry]\nsample_rate = 0.0\n[drift]\nwindow_predictions = 100000000\n",
        dir.join("state").display(),
        bundle.display(),
        public.display()
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(binary)
        .arg("--config")
        .arg(&path)
        .env("FERRY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if ureq::get(format!("{url}/healthz"))
            .call()
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        assert!(Instant::now() < deadline, "agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Running { child, url }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("release");
    ferry(&["keygen", "-o", key.to_str().unwrap()]);
    let public = d.join("release.pub");
    let trust = TrustPolicy::new(
        PublicKey::all_from_pem(&std::fs::read_to_string(&public).unwrap()).unwrap(),
    )
    .unwrap();
    let mut cases = Vec::new();
    for (name, request, content_type) in [
        ("iris", "iris/golden/setosa.json", "application/json"),
        ("digits", "digits/golden/digit_7.png", "image/png"),
    ] {
        let bundle = d.join(format!("{name}.ferry"));
        ferry(&[
            "pack",
            examples().join(name).to_str().unwrap(),
            "--key",
            d.join("release.key").to_str().unwrap(),
            "-o",
            bundle.to_str().unwrap(),
            "--precompile",
            "x86_64,aarch64",
        ]);
        let body = std::fs::read(examples().join(request)).unwrap();
        cases.push((name, bundle, body, content_type));
    }

    println!("# ferry-agent bench");
    for (name, bundle, body, content_type) in &cases {
        let state = tempfile::tempdir().unwrap();
        let agent = start_agent(state.path(), bundle, &public);
        // Idle memory: after start-up settles, no requests yet.
        std::thread::sleep(Duration::from_secs(2));
        let idle = rss_kib(agent.child.id());

        let bytes = std::fs::read(bundle).unwrap();
        let session = Session::load(&bytes, &trust).unwrap();
        let http: ureq::Agent = ureq::Agent::config_builder().build().into();
        let post = |body: &[u8]| {
            let mut r = http
                .post(format!("{}/v1/predict", agent.url))
                .header("Content-Type", *content_type)
                .send(body)
                .unwrap();
            let mut out = Vec::new();
            r.body_mut().as_reader().read_to_end(&mut out).unwrap();
            out
        };
        // Same answer both ways.
        let a: serde_json::Value =
            serde_json::from_slice(&session.infer(content_type, body).unwrap()).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&post(body)).unwrap();
        assert_eq!(a, b);
        for _ in 0..200 {
            session.infer(content_type, body).unwrap();
            post(body);
        }
        // Interleaved rounds, so both see the same machine load.
        let n = 500;
        let (mut inproc, mut over_http) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            let t = Instant::now();
            for _ in 0..n {
                session.infer(content_type, body).unwrap();
            }
            inproc.push(t.elapsed().as_secs_f64() / n as f64 * 1e6);
            let t = Instant::now();
            for _ in 0..n {
                post(body);
            }
            over_http.push(t.elapsed().as_secs_f64() / n as f64 * 1e6);
        }
        // The transport alone: a request that does no inference.
        let mut health = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            for _ in 0..n {
                let mut r = http.get(format!("{}/healthz", agent.url)).call().unwrap();
                r.body_mut().read_to_vec().unwrap();
            }
            health.push(t.elapsed().as_secs_f64() / n as f64 * 1e6);
        }
        let floor = median(health);
        // A POST with a body that the server refuses before inference.
        let mut refused = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            for _ in 0..n {
                let r = http
                    .post(format!("{}/v1/predict", agent.url))
                    .header("Content-Type", *content_type)
                    .config()
                    .http_status_as_error(false)
                    .build()
                    .send(&b""[..])
                    .unwrap();
                assert_eq!(r.status(), 400);
            }
            refused.push(t.elapsed().as_secs_f64() / n as f64 * 1e6);
        }
        let post_floor = median(refused);
        // The agent's own bookkeeping (telemetry append, drift window,
        // metrics) without HTTP: Agent::predict in this process.
        let agent_dir = tempfile::tempdir().unwrap();
        let in_proc_agent = {
            let text = format!(
                "[device]\nid = \"bench-inproc\"\nfleet = \"demo\"\n[paths]\nstate_dir = \"{}\"\ninitial_bundle = \"{}\"\ntrusted_keys = [\"{}\"]\n[telemetry]\nsample_rate = 0.0\n",
                agent_dir.path().join("state").display(),
                bundle.display(),
                public.display()
            );
            let path = agent_dir.path().join("agent.toml");
            std::fs::write(&path, text).unwrap();
            ferry_agent::agent::Agent::open(ferry_agent::config::Config::load(&path).unwrap())
                .unwrap()
        };
        let mut agent_calls = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            for _ in 0..n {
                in_proc_agent.predict(content_type, None, body).unwrap();
            }
            agent_calls.push(t.elapsed().as_secs_f64() / n as f64 * 1e6);
        }
        let a = median(agent_calls);
        let (i, h) = (median(inproc), median(over_http));
        let busy = rss_kib(agent.child.id());
        println!(
            "{name}: idle RSS {:.1} MiB (after {} requests: {:.1} MiB); in-process Session::infer {i:.1} us; in-process Agent::predict {a:.1} us; HTTP predict {h:.1} us; HTTP layer adds {:.1} us over Session::infer ({:.2}x); GET /healthz round trip {floor:.1} us; refused POST {post_floor:.1} us",
            idle as f64 / 1024.0,
            200 + 10 * n,
            busy as f64 / 1024.0,
            h - i,
            h / i
        );
    }
    if let Some(device) = std::env::var_os("FERRY_BENCH_DEVICE_AGENT") {
        compare_builds(&PathBuf::from(device), &cases, &public);
    }
}

/// The release build against the device build: same bundles, same
/// requests, interleaved rounds.
fn compare_builds(device: &Path, cases: &[(&str, PathBuf, Vec<u8>, &str)], public: &Path) {
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64 / 1e6;
    println!(
        "\n# release build ({:.1} MB) vs device build ({:.1} MB)",
        size(&agent_bin()),
        size(device)
    );
    for (name, bundle, body, content_type) in cases {
        let (s1, s2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let builds = [
            (
                "release",
                start_binary(&agent_bin(), s1.path(), bundle, public),
            ),
            ("device", start_binary(device, s2.path(), bundle, public)),
        ];
        std::thread::sleep(Duration::from_secs(2));
        let http: ureq::Agent = ureq::Agent::config_builder().build().into();
        let post = |url: &str| {
            let mut r = http
                .post(format!("{url}/v1/predict"))
                .header("Content-Type", *content_type)
                .send(&body[..])
                .unwrap();
            r.body_mut().read_to_vec().unwrap()
        };
        for (build, agent) in &builds {
            let pid = agent.child.id();
            println!(
                "{name} {build}: idle VmRSS {:.1} MiB, RssAnon {:.1} MiB, RssFile {:.1} MiB",
                status_kib(pid, "VmRSS:") as f64 / 1024.0,
                status_kib(pid, "RssAnon:") as f64 / 1024.0,
                status_kib(pid, "RssFile:") as f64 / 1024.0
            );
        }
        let answers: Vec<serde_json::Value> = builds
            .iter()
            .map(|(_, a)| serde_json::from_slice(&post(&a.url)).unwrap())
            .collect();
        assert_eq!(answers[0], answers[1], "the builds answer differently");
        for (_, a) in &builds {
            for _ in 0..200 {
                post(&a.url);
            }
        }
        let n = 500;
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..10 {
            for (i, (_, a)) in builds.iter().enumerate() {
                let t = Instant::now();
                for _ in 0..n {
                    post(&a.url);
                }
                times[i].push(t.elapsed().as_secs_f64() / n as f64 * 1e6);
            }
        }
        let [release, device] = times.map(median);
        println!(
            "{name}: HTTP predict release {release:.1} us, device {device:.1} us (device/release {:.2}); after {} requests VmRSS release {:.1} MiB, device {:.1} MiB",
            device / release,
            200 + 10 * n + 1,
            rss_kib(builds[0].1.child.id()) as f64 / 1024.0,
            rss_kib(builds[1].1.child.id()) as f64 / 1024.0
        );
    }
}
