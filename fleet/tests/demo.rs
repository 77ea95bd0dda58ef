//! The one-command fleet demo (`scripts/fleet-demo.sh`, which the README's
//! first command ends with) runs to the end and shows what it promises.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_fleet_demo_runs_end_to_end() {
    let root = crate::fixtures::examples().join("..");
    let bin_dir = crate::fixtures::workspace_bin("ferry");
    let bin_dir = bin_dir.parent().unwrap();
    let mut child = Command::new("bash")
        .arg(root.join("scripts/fleet-demo.sh"))
        .env("FERRY_DEMO_BIN_DIR", bin_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Reads both pipes on threads so the demo never blocks on a full pipe.
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(out).unwrap());
    let err = std::thread::spawn(move || std::io::read_to_string(err).unwrap());
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within 5 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let text = format!("{out}\n{err}");
    assert!(status.success(), "{status}\n{text}");
    for needle in [
        "petal_length   drifting on  33.3% of traffic: device-3",
        "The retraining trigger fired (once)",
        "features: petal_length",
        "devices:  device-3",
        "every device (3) runs the bundle",
        "Dashboard: http://127.0.0.1:",
    ] {
        assert!(
            text.contains(needle),
            "missing {needle:?} in the demo's output:\n{text}"
        );
    }
    // Exactly one hook run.
    assert_eq!(text.matches("retraining requested: ").count(), 1, "{text}");
}
