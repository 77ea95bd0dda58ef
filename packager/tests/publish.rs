//! `ferry publish`: channel directories that `ferry-agent` polls.

use ferry_testkit::cli::{assert_exit, ferry, stderr, stdout};
use ferry_testkit::fixtures::{bundles, example, read_json};

#[test]
fn publishes_a_bundle_and_refuses_to_go_backwards() {
    let f = bundles();
    let channel = tempfile::tempdir().unwrap();
    let to = channel.path().to_str().unwrap();
    let o = ferry(&[
        "publish",
        &f.bundle("iris"),
        "--to",
        to,
        "--pub",
        &f.public(),
        "--json",
    ]);
    assert_exit(&o, 0);
    let index = read_json(&channel.path().join("index.json"));
    assert_eq!(
        index,
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()
    );
    assert_eq!(index["schema"], 1);
    assert_eq!(
        (index["fleet"].as_str(), index["channel"].as_str()),
        (Some("demo"), Some("stable"))
    );
    let latest = &index["latest"];
    assert_eq!(latest["name"], "iris");
    assert_eq!(latest["sequence"], 1);
    let file = channel.path().join(latest["url"].as_str().unwrap());
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(latest["size"], bytes.len() as u64);
    let verify = ferry(&[
        "verify",
        file.to_str().unwrap(),
        "--pub",
        &f.public(),
        "--json",
    ]);
    assert_exit(&verify, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&verify)).unwrap();
    assert_eq!(v["digest"], latest["digest"]);

    // Publishing the same bundle again is harmless.
    assert_exit(
        &ferry(&[
            "publish",
            &f.bundle("iris"),
            "--to",
            to,
            "--pub",
            &f.public(),
        ]),
        0,
    );

    // A bundle with a lower or equal sequence but other bytes is refused
    // (exit 3) unless forced; the index is untouched.
    let older = f.scratch("iris-older.ferry");
    assert_exit(
        &ferry(&[
            "pack",
            &example("iris"),
            "--key",
            &f.key(),
            "-o",
            &older,
            "--sequence",
            "1",
            "--level",
            "3",
        ]),
        0,
    );
    let o = ferry(&["publish", &older, "--to", to, "--pub", &f.public()]);
    assert_exit(&o, 3);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(read_json(&channel.path().join("index.json")), index);
    assert_exit(
        &ferry(&[
            "publish",
            &older,
            "--to",
            to,
            "--pub",
            &f.public(),
            "--force",
        ]),
        0,
    );

    // Another fleet's bundle does not go into this channel.
    let other = f.scratch("iris-other-fleet.ferry");
    assert_exit(
        &ferry(&[
            "pack",
            &example("iris"),
            "--key",
            &f.key(),
            "-o",
            &other,
            "--fleet",
            "plant-9",
            "--sequence",
            "5",
        ]),
        0,
    );
    let o = ferry(&["publish", &other, "--to", to, "--pub", &f.public()]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("plant-9"), "{}", stderr(&o));
}

#[test]
fn refuses_bundles_the_devices_would_refuse() {
    let f = bundles();
    let channel = tempfile::tempdir().unwrap();
    let to = channel.path().to_str().unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_key = other.path().join("other");
    assert_exit(&ferry(&["keygen", "-o", other_key.to_str().unwrap()]), 0);
    let o = ferry(&[
        "publish",
        &f.bundle("iris"),
        "--to",
        to,
        "--pub",
        &format!("{}.pub", other_key.display()),
    ]);
    assert_exit(&o, 3);
    assert!(!channel.path().join("index.json").exists());
}
