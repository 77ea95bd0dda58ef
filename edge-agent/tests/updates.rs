//! The update machinery against real bundles: every refusal with its code,
//! downloads over HTTP (resumed, capped, digest-checked) and from a
//! directory, and the bundle store through crashes at every activation step,
//! garbage records and rollbacks.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_agent::updates::{
    ActivationStep, BundleStore, Crash, Fetcher, RecoveryAction, Rejection, Source, UpdateError,
    Want, bundle_ref, check_candidate, health_check, load_session, sha256_file, skip_reason,
};
use ferry_protocol::BundleRef;
use ferry_runtime::{ReadLimits, verify};

use ferry_testkit::channel::{ChannelServer, publish};
use ferry_testkit::fixtures::{self, bundles};

const MAX: u64 = 64 * 1024 * 1024;

fn want() -> Want {
    Want {
        fleet: fixtures::FLEET.into(),
        channel: fixtures::CHANNEL.into(),
    }
}

/// The identity of a good fixture bundle.
fn identity(name: &str) -> BundleRef {
    let b = bundles();
    bundle_ref(&verify(&b.bytes(name), &b.trust(), &ReadLimits::default()).unwrap())
}

fn check(name: &str, running: Option<&str>, allow_downgrade: bool) -> Result<BundleRef, Rejection> {
    let b = bundles();
    let running = running.map(identity);
    check_candidate(
        &b.bytes(name),
        &b.trust(),
        &ReadLimits::default(),
        &want(),
        running.as_ref(),
        allow_downgrade,
    )
    .map(|v| bundle_ref(&v))
}

fn no_progress() -> impl FnMut(u64, u64) {
    |_, _| {}
}

// ---------------------------------------------------------------- checks

#[test]
fn a_newer_bundle_for_this_device_passes_every_check() {
    let r = check(fixtures::V2, Some(fixtures::V1), false).unwrap();
    assert_eq!(r.sequence, 2);
    assert_eq!(r.digest, bundles().digest(fixtures::V2));
    assert_eq!((r.fleet.as_str(), r.channel.as_str()), ("demo", "stable"));
    assert_eq!(r.name, "iris");
    // First install: nothing running.
    assert!(check(fixtures::V1, None, false).is_ok());
}

#[test]
fn every_refusal_has_its_code() {
    use fixtures::*;
    let cases: &[(&str, Option<&str>, bool, &str)] = &[
        (TAMPERED_MANIFEST, Some(V1), false, "bad_signature"),
        (TAMPERED_PAYLOAD, Some(V1), false, "digest_mismatch"),
        (UNSIGNED, Some(V1), false, "unsigned"),
        (UNTRUSTED, Some(V1), false, "untrusted_key"),
        (TRUNCATED, Some(V1), false, "truncated"),
        (WRONG_FLEET, Some(V1), false, "wrong_fleet"),
        (WRONG_CHANNEL, Some(V1), false, "wrong_channel"),
        (V1, Some(V2), false, "downgrade"),
        (V2, Some(V2), false, "already_active"),
        // An operator may allow a lower sequence, never the same bytes.
        (V2, Some(V2), true, "already_active"),
        // Wrong fleet even when the bundle is otherwise fine as a first install.
        (WRONG_FLEET, None, false, "wrong_fleet"),
    ];
    for &(file, running, allow, code) in cases {
        let err = check(file, running, allow).unwrap_err();
        assert_eq!(err.code, code, "{file} over {running:?}: {err}");
        assert!(!err.reason.is_empty());
    }
    // Same sequence, different bytes: still not an upgrade.
    let mut same_seq = identity(V1);
    same_seq.sequence = 2;
    same_seq.digest = "0".repeat(64);
    let b = bundles();
    let err = check_candidate(
        &b.bytes(V2),
        &b.trust(),
        &ReadLimits::default(),
        &want(),
        Some(&same_seq),
        false,
    )
    .unwrap_err();
    assert_eq!(err.code, "downgrade");
    assert!(err.reason.contains("sequence 2"), "{}", err.reason);
    // An operator's signed install may go back.
    assert_eq!(check(V1, Some(V2), true).unwrap().sequence, 1);
}

#[test]
fn golden_examples_failing_on_the_device_are_refused_by_the_health_check() {
    let b = bundles();
    let verified = check_candidate(
        &b.bytes(fixtures::GOLDEN_FAILS),
        &b.trust(),
        &ReadLimits::default(),
        &want(),
        Some(&identity(fixtures::V2)),
        false,
    )
    .expect("the bundle itself is validly signed");
    let session = load_session(verified, &Default::default(), None).unwrap();
    let err = health_check(&session).unwrap_err();
    assert_eq!(err.code, "golden_failed");
    assert!(
        err.reason.contains("1 of 4")
            && err.reason.contains("setosa")
            && err.reason.contains("predictions[0].label"),
        "{}",
        err.reason
    );

    let good = check_candidate(
        &b.bytes(fixtures::V2),
        &b.trust(),
        &ReadLimits::default(),
        &want(),
        None,
        false,
    )
    .unwrap();
    health_check(&load_session(good, &Default::default(), None).unwrap()).unwrap();
}

#[test]
fn the_index_alone_can_say_a_download_is_pointless() {
    let dir = tempfile::tempdir().unwrap();
    let index = publish(dir.path(), &bundles().path(fixtures::V2));
    let v1 = identity(fixtures::V1);
    let v2 = identity(fixtures::V2);
    assert_eq!(skip_reason(&index, &want(), Some(&v1), &[]), None);
    assert_eq!(skip_reason(&index, &want(), None, &[]), None);
    let code = |r: Option<Rejection>| r.map(|r| r.code);
    assert_eq!(
        code(skip_reason(&index, &want(), Some(&v2), &[])),
        Some("already_active")
    );
    let mut newer = v1.clone();
    newer.sequence = 7;
    assert_eq!(
        code(skip_reason(&index, &want(), Some(&newer), &[])),
        Some("up_to_date")
    );
    let rejected = vec![v2.digest.clone()];
    assert_eq!(
        code(skip_reason(&index, &want(), Some(&v1), &rejected)),
        Some("rejected_before")
    );
    let other = Want {
        fleet: "other".into(),
        channel: "stable".into(),
    };
    assert_eq!(
        code(skip_reason(&index, &other, None, &[])),
        Some("wrong_fleet")
    );
}

// ---------------------------------------------------------------- channels

#[test]
fn http_channel_index_and_download() {
    let channel = tempfile::tempdir().unwrap();
    let published = publish(channel.path(), &bundles().path(fixtures::V2));
    let server = ChannelServer::start(channel.path());
    let fetcher = Fetcher::new(None).unwrap();
    let source = Source::parse(&server.url("index.json")).unwrap();

    let index = fetcher.fetch_index(&source).unwrap();
    assert_eq!(index.latest.digest, published.latest.digest);
    assert_eq!(
        index.latest.url,
        server.url("v2.ferry"),
        "relative url resolved"
    );

    let state = tempfile::tempdir().unwrap();
    let staging = state.path().join("staging");
    let mut calls = Vec::new();
    let path = fetcher
        .download(
            &index.latest.url,
            &index.latest.digest,
            Some(index.latest.size),
            MAX,
            &staging,
            &mut |got, total| calls.push((got, total)),
        )
        .unwrap();
    assert_eq!(path, staging.join(format!("{}.ferry", index.latest.digest)));
    assert_eq!(std::fs::read(&path).unwrap(), bundles().bytes(fixtures::V2));
    assert!(
        !staging
            .join(format!("{}.part", index.latest.digest))
            .exists()
    );
    assert_eq!(calls.last(), Some(&(index.latest.size, index.latest.size)));
    assert!(
        calls.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress only grows"
    );

    // Already complete in staging: no new request.
    let before = server.requests().len();
    let again = fetcher
        .download(
            &index.latest.url,
            &index.latest.digest,
            None,
            MAX,
            &staging,
            &mut no_progress(),
        )
        .unwrap();
    assert_eq!(again, path);
    assert_eq!(server.requests().len(), before);
}

#[test]
fn a_broken_download_resumes_with_a_range_request() {
    let channel = tempfile::tempdir().unwrap();
    let index = publish(channel.path(), &bundles().path(fixtures::V2));
    let server = ChannelServer::start(channel.path());
    let fetcher = Fetcher::new(None).unwrap();
    let staging = tempfile::tempdir().unwrap();
    let (url, digest, size) = (
        server.url("v2.ferry"),
        &index.latest.digest,
        index.latest.size,
    );
    let part = staging.path().join(format!("{digest}.part"));

    server.cut_next_body_after(size / 2);
    let err = fetcher
        .download(
            &url,
            digest,
            Some(size),
            MAX,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap_err();
    assert_eq!(err.code(), "network", "{err}");
    assert!(err.is_transient());
    let UpdateError::Network { received, .. } = &err else {
        unreachable!()
    };
    let kept = std::fs::metadata(&part).unwrap().len();
    assert_eq!(*received, kept, "the error says how much arrived: {err}");
    assert!(kept > 0 && kept <= size / 2, "kept {kept} of {size}");
    assert!(err.to_string().contains(&url), "{err}");

    let path = fetcher
        .download(
            &url,
            digest,
            Some(size),
            MAX,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap();
    assert_eq!(server.ranges(), vec![format!("bytes={kept}-")]);
    let last = server.requests().pop().unwrap();
    assert_eq!((last.status, last.body_bytes), (206, size - kept));
    assert_eq!(sha256_file(&path).unwrap().0, *digest);
    let b = bundles();
    verify(
        &std::fs::read(&path).unwrap(),
        &b.trust(),
        &ReadLimits::default(),
    )
    .unwrap();
    assert!(!part.exists());
}

#[test]
fn a_server_trickling_bytes_cannot_stall_a_download() {
    // Issue 10, item 5: a server sending one byte every 2 s never tripped
    // the read timeout, and the single command worker waited forever.
    let channel = tempfile::tempdir().unwrap();
    let index = publish(channel.path(), &bundles().path(fixtures::V2));
    let server = ChannelServer::start(channel.path());
    server.trickle(Some(Duration::from_millis(300)));
    // The read timeout (5 s) never trips: a byte comes every 0.3 s.
    let fetcher = Fetcher::with_timeouts(None, Duration::from_secs(5), Duration::from_secs(5))
        .unwrap()
        .with_min_rate(1024, Duration::from_secs(2));
    let staging = tempfile::tempdir().unwrap();
    let download = || {
        fetcher.download(
            &server.url("v2.ferry"),
            &index.latest.digest,
            Some(index.latest.size),
            MAX,
            staging.path(),
            &mut no_progress(),
        )
    };
    let started = std::time::Instant::now();
    let err = download().unwrap_err();
    assert_eq!(err.code(), "too_slow", "{err}");
    assert!(err.is_transient(), "retried later, from where it stopped");
    assert!(err.to_string().contains("bytes/s"), "{err}");
    // Not a speed assertion: the bundle would take a day at this rate;
    // the guard ends the attempt about one window (2 s) in.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // At full speed again, the download completes (resuming what arrived).
    server.trickle(None);
    let path = download().unwrap();
    assert_eq!(std::fs::read(path).unwrap(), bundles().bytes(fixtures::V2));
}

#[test]
fn a_server_without_ranges_or_a_stale_part_restarts_cleanly() {
    let channel = tempfile::tempdir().unwrap();
    let index = publish(channel.path(), &bundles().path(fixtures::V2));
    let server = ChannelServer::start(channel.path());
    let fetcher = Fetcher::new(None).unwrap();
    let (url, digest, size) = (
        server.url("v2.ferry"),
        &index.latest.digest,
        index.latest.size,
    );
    let full = bundles().bytes(fixtures::V2);

    // 200 to a ranged request: start over.
    let staging = tempfile::tempdir().unwrap();
    std::fs::write(staging.path().join(format!("{digest}.part")), &full[..1000]).unwrap();
    server.ignore_ranges(true);
    let path = fetcher
        .download(
            &url,
            digest,
            Some(size),
            MAX,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), full);
    let last = server.requests().pop().unwrap();
    assert_eq!(
        (last.range.as_deref(), last.status),
        (Some("bytes=1000-"), 200)
    );
    server.ignore_ranges(false);

    // 416 (the part already holds the whole length, size unknown): start over.
    let staging = tempfile::tempdir().unwrap();
    std::fs::write(staging.path().join(format!("{digest}.part")), &full).unwrap();
    fetcher
        .download(&url, digest, None, MAX, staging.path(), &mut no_progress())
        .unwrap();
    let seen = server.requests();
    let tail: Vec<_> = seen[seen.len() - 2..]
        .iter()
        .map(|s| (s.range.clone(), s.status))
        .collect();
    assert_eq!(
        tail,
        vec![(Some(format!("bytes={size}-")), 416), (None, 200)]
    );

    // A part longer than the announced size: discarded before asking.
    let staging = tempfile::tempdir().unwrap();
    let mut longer = full.clone();
    longer.extend_from_slice(b"junk");
    std::fs::write(staging.path().join(format!("{digest}.part")), &longer).unwrap();
    fetcher
        .download(
            &url,
            digest,
            Some(size),
            MAX,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap();
    let last = server.requests().pop().unwrap();
    assert_eq!((last.range, last.status), (None, 200));

    // A complete part (the process stopped before the rename): no request.
    let staging = tempfile::tempdir().unwrap();
    std::fs::write(staging.path().join(format!("{digest}.part")), &full).unwrap();
    let before = server.requests().len();
    fetcher
        .download(
            &url,
            digest,
            Some(size),
            MAX,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap();
    assert_eq!(server.requests().len(), before);
}

#[test]
fn a_digest_mismatch_is_refused_and_the_part_removed() {
    let channel = tempfile::tempdir().unwrap();
    let index = publish(channel.path(), &bundles().path(fixtures::V2));
    let server = ChannelServer::start(channel.path());
    let fetcher = Fetcher::new(None).unwrap();
    let staging = tempfile::tempdir().unwrap();
    let url = server.url("v2.ferry");

    // The index promises other bytes than the server sends.
    let wrong = bundles().digest(fixtures::V1);
    let err = fetcher
        .download(&url, &wrong, None, MAX, staging.path(), &mut no_progress())
        .unwrap_err();
    assert_eq!(err.code(), "download_digest_mismatch", "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains(&wrong) && err.to_string().contains(&index.latest.digest));
    assert_eq!(
        std::fs::read_dir(staging.path()).unwrap().count(),
        0,
        "nothing left behind"
    );

    // A poisoned partial file: the resumed whole does not verify, and the
    // part goes, so the next attempt starts clean and succeeds.
    let digest = &index.latest.digest;
    let part = staging.path().join(format!("{digest}.part"));
    std::fs::write(&part, vec![0u8; 1000]).unwrap();
    let err = fetcher
        .download(
            &url,
            digest,
            Some(index.latest.size),
            MAX,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap_err();
    assert_eq!(err.code(), "download_digest_mismatch");
    assert!(!part.exists());
    fetcher
        .download(
            &url,
            digest,
            Some(index.latest.size),
            MAX,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap();

    // A digest that is not one never becomes a file name.
    let err = fetcher
        .download(
            &url,
            "../../etc/passwd",
            None,
            MAX,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap_err();
    assert_eq!(err.code(), "bad_digest");
}

#[test]
fn the_size_cap_holds_whatever_the_server_says() {
    let channel = tempfile::tempdir().unwrap();
    let index = publish(channel.path(), &bundles().path(fixtures::V2));
    let server = ChannelServer::start(channel.path());
    let fetcher = Fetcher::new(None).unwrap();
    let staging = tempfile::tempdir().unwrap();
    let (url, digest, size) = (
        server.url("v2.ferry"),
        &index.latest.digest,
        index.latest.size,
    );
    let part = staging.path().join(format!("{digest}.part"));

    // Announced larger than allowed: refused before any request.
    let err = fetcher
        .download(
            &url,
            digest,
            Some(size),
            size - 1,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap_err();
    assert_eq!(err.code(), "too_large");
    assert!(server.requests().is_empty());

    // Content-Length over the cap: refused from the headers.
    let err = fetcher
        .download(&url, digest, None, 4096, staging.path(), &mut no_progress())
        .unwrap_err();
    assert_eq!(err.code(), "too_large", "{err}");
    assert!(!part.exists());

    // No Content-Length: the stream itself is cut at the cap.
    server.omit_content_length(true);
    let mut most = 0;
    let err = fetcher
        .download(&url, digest, None, 4096, staging.path(), &mut |got, _| {
            most = most.max(got)
        })
        .unwrap_err();
    let UpdateError::TooLarge {
        received, limit, ..
    } = err
    else {
        panic!("expected too_large, got {err}")
    };
    assert_eq!(limit, 4096);
    assert!(
        received > 4096 && most <= 4096,
        "received {received}, kept at most {most}"
    );
    assert!(!part.exists());

    // The index announces less than the server sends: refused as well.
    let err = fetcher
        .download(
            &url,
            digest,
            Some(size - 10),
            MAX,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap_err();
    assert_eq!(err.code(), "too_large");
    assert!(!part.exists());
    server.omit_content_length(false);

    // Body-less errors say what failed.
    server.fail_next(503);
    let err = fetcher
        .download(&url, digest, None, MAX, staging.path(), &mut no_progress())
        .unwrap_err();
    assert!(
        matches!(err, UpdateError::HttpStatus { status: 503, .. }),
        "{err}"
    );
    assert!(err.is_transient() && err.to_string().contains(&url));
    let err = fetcher
        .download(
            &server.url("missing.ferry"),
            digest,
            None,
            MAX,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap_err();
    assert!(
        matches!(err, UpdateError::HttpStatus { status: 404, .. }),
        "{err}"
    );
    assert!(!err.is_transient());
}

#[test]
fn a_directory_channel_works_like_a_server() {
    let channel = tempfile::tempdir().unwrap();
    let published = publish(channel.path(), &bundles().path(fixtures::V2));
    let source = Source::parse(channel.path().to_str().unwrap()).unwrap();
    assert_eq!(source, Source::Dir(channel.path().to_path_buf()));
    let fetcher = Fetcher::new(None).unwrap();
    let index = fetcher.fetch_index(&source).unwrap();
    assert_eq!(
        Path::new(&index.latest.url),
        channel.path().join("v2.ferry").as_path()
    );
    let staging = tempfile::tempdir().unwrap();
    let path = fetcher
        .download(
            &index.latest.url,
            &published.latest.digest,
            Some(published.latest.size),
            MAX,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), bundles().bytes(fixtures::V2));
    assert!(
        channel.path().join("v2.ferry").exists(),
        "the source is copied, not moved"
    );

    // A local file over the cap is refused too.
    let err = fetcher
        .download(
            &index.latest.url,
            &"a".repeat(64),
            None,
            100,
            staging.path(),
            &mut no_progress(),
        )
        .unwrap_err();
    assert_eq!(err.code(), "too_large");
}

#[test]
fn bad_indexes_are_refused() {
    let fetcher = Fetcher::new(None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = publish(dir.path(), &bundles().path(fixtures::V2));
    let source = Source::Dir(dir.path().to_path_buf());
    let write = |v: serde_json::Value| {
        std::fs::write(dir.path().join("index.json"), v.to_string()).unwrap();
        fetcher.fetch_index(&source)
    };
    let mut v = serde_json::to_value(&good).unwrap();
    v["schema"] = 2.into();
    let err = write(v).unwrap_err();
    assert_eq!(err.code(), "bad_index");
    assert!(err.to_string().contains("schema 2"), "{err}");
    let mut v = serde_json::to_value(&good).unwrap();
    v["latest"]["digest"] = "../x".into();
    assert_eq!(write(v).unwrap_err().code(), "bad_index");
    let mut v = serde_json::to_value(&good).unwrap();
    v["padding"] = "x".repeat(70_000).into();
    let err = write(v).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
    assert_eq!(
        write(serde_json::json!([1, 2])).unwrap_err().code(),
        "bad_index"
    );
    // Issue 10: a directory channel's `url` could be absolute or climb out
    // of the channel with `..`, or send the device to a URL nobody signed.
    let outside = dir.path().parent().unwrap().join("elsewhere.ferry");
    for url in [
        outside.display().to_string(),
        "../elsewhere.ferry".to_string(),
        "sub/../../elsewhere.ferry".to_string(),
        format!("file://{}", outside.display()),
        "https://attacker.invalid/x.ferry".to_string(),
        "http://127.0.0.1:9/x.ferry".to_string(),
        ".".to_string(),
    ] {
        let mut v = serde_json::to_value(&good).unwrap();
        v["latest"]["url"] = url.clone().into();
        let err = write(v).unwrap_err();
        assert_eq!(err.code(), "bad_index", "{url}: {err}");
        assert!(
            err.to_string().contains("channel directory"),
            "{url}: {err}"
        );
    }
    // A file in a subdirectory of the channel is fine.
    let mut v = serde_json::to_value(&good).unwrap();
    v["latest"]["url"] = "bundles/x.ferry".into();
    let index = write(v).unwrap();
    assert_eq!(
        Path::new(&index.latest.url),
        dir.path().join("bundles/x.ferry")
    );
    let missing = Source::Dir(dir.path().join("nope"));
    assert_eq!(fetcher.fetch_index(&missing).unwrap_err().code(), "io");
}

#[test]
fn a_ca_file_without_certificates_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    assert_eq!(Fetcher::new(Some(&ca)).unwrap_err().code(), "bad_ca");
    assert_eq!(
        Fetcher::new(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .code(),
        "bad_ca"
    );
}

// ---------------------------------------------------------------- store

/// Copies a fixture into the store's staging directory, as a download would.
fn stage(store: &BundleStore, name: &str) -> PathBuf {
    let digest = bundles().digest(name);
    let to = store.staging_dir().join(format!("{digest}.ferry"));
    std::fs::copy(bundles().path(name), &to).unwrap();
    to
}

/// The active slot is a complete bundle: its file has its digest and it
/// verifies against the trusted keys.
fn assert_active_is_complete(store: &BundleStore) -> BundleRef {
    let active = store.active().expect("an active bundle");
    let bytes = std::fs::read(&active.path).unwrap();
    let b = bundles();
    let v = verify(&bytes, &b.trust(), &ReadLimits::default()).unwrap();
    assert_eq!(v.digest(), active.bundle.digest);
    assert_eq!(bundle_ref(&v), active.bundle);
    active.bundle
}

#[test]
fn activation_keeps_the_previous_bundle_and_rollback_returns_to_it() {
    let state = tempfile::tempdir().unwrap();
    let store = BundleStore::open(state.path()).unwrap();
    assert!(store.active().is_none() && store.recovery().is_none());
    let (v1, v2) = (identity(fixtures::V1), identity(fixtures::V2));

    // A file outside staging (an initial bundle) is copied, not moved.
    store.activate(&bundles().path(fixtures::V1), &v1).unwrap();
    assert!(bundles().path(fixtures::V1).exists());
    assert_eq!(assert_active_is_complete(&store), v1);
    assert!(store.previous().is_none());

    // A staged file is moved.
    let staged = stage(&store, fixtures::V2);
    store.activate(&staged, &v2).unwrap();
    assert!(!staged.exists());
    assert_eq!(assert_active_is_complete(&store), v2);
    assert_eq!(store.previous().unwrap().bundle, v1);
    let record = store.record();
    assert_eq!((record.boot_attempts, record.healthy), (0, false));
    assert!(record.activated_ms > 0);

    // Activating what is active changes nothing.
    store.activate(&stage(&store, fixtures::V2), &v2).unwrap();
    assert_eq!(store.previous().unwrap().bundle, v1);

    let back = store.rollback().unwrap();
    assert_eq!(back.bundle, v1);
    assert_eq!(assert_active_is_complete(&store), v1);
    assert!(store.previous().is_none());
    assert!(
        store.is_refused("", &v2.digest),
        "the channel must not reinstall it"
    );
    assert_eq!(store.rollback().unwrap_err().code(), "no_previous");

    // All of it is on disk.
    drop(store);
    let store = BundleStore::open(state.path()).unwrap();
    assert!(store.recovery().is_none());
    assert_eq!(assert_active_is_complete(&store), v1);
    assert!(store.is_refused("", &v2.digest));

    // The abandoned bundle's file is garbage now.
    let report = store.gc(&[]).unwrap();
    assert_eq!(report.removed, vec![store.bundle_path(&v2.digest)]);
    assert!(store.active().unwrap().path.exists());

    // Installing it again on purpose lifts the rejection.
    store.activate(&bundles().path(fixtures::V2), &v2).unwrap();
    assert!(!store.is_refused("", &v2.digest));
}

#[test]
fn a_file_that_is_not_the_bundle_named_is_not_activated() {
    let state = tempfile::tempdir().unwrap();
    let store = BundleStore::open(state.path()).unwrap();
    let mut v2 = identity(fixtures::V2);
    let staged = stage(&store, fixtures::V1);
    let err = store.activate(&staged, &v2).unwrap_err();
    assert_eq!(err.code(), "download_digest_mismatch");
    assert!(store.active().is_none() && staged.exists());
    v2.digest = "../../x".into();
    assert_eq!(
        store.activate(&staged, &v2).unwrap_err().code(),
        "bad_digest"
    );
}

#[test]
fn a_crash_at_any_activation_step_leaves_the_old_or_the_new_bundle() {
    let (v1, v2) = (identity(fixtures::V1), identity(fixtures::V2));
    for crash_at in ActivationStep::ALL {
        let state = tempfile::tempdir().unwrap();
        let store = BundleStore::open(state.path()).unwrap();
        store.activate(&bundles().path(fixtures::V1), &v1).unwrap();
        let staged = stage(&store, fixtures::V2);
        let mut steps = Vec::new();
        let err = store
            .activate_with(&staged, &v2, &mut |s| {
                steps.push(s);
                if s == crash_at { Err(Crash) } else { Ok(()) }
            })
            .unwrap_err();
        assert!(
            matches!(err, UpdateError::Interrupted(s) if s == crash_at),
            "{err}"
        );
        let expected: Vec<_> = ActivationStep::ALL
            .into_iter()
            .take_while(|s| *s != crash_at)
            .chain([crash_at])
            .collect();
        assert_eq!(steps, expected, "steps run in order");
        drop(store);

        let store = BundleStore::open(state.path()).unwrap();
        let active = assert_active_is_complete(&store);
        // The switch is the rename: the hook runs before each step, so a
        // crash "at SyncDir" happens after it.
        let switched = crash_at == ActivationStep::SyncDir;
        assert_eq!(
            active,
            if switched { v2.clone() } else { v1.clone() },
            "crash at {crash_at:?}"
        );
        assert!(
            store.recovery().is_none(),
            "crash at {crash_at:?}: {:?}",
            store.recovery()
        );
        if switched {
            assert_eq!(store.previous().unwrap().bundle, v1);
        }
        for tmp in ["active.json.tmp", "active.json.prev.tmp"] {
            assert!(
                !state.path().join(tmp).exists(),
                "{tmp} after a crash at {crash_at:?}"
            );
        }
        // The store works on: the update can be tried again.
        store.activate(&bundles().path(fixtures::V2), &v2).unwrap();
        assert_eq!(assert_active_is_complete(&store), v2);
        assert_eq!(store.previous().unwrap().bundle, v1);
    }
}

#[test]
fn a_crash_during_the_first_activation_never_leaves_a_bundle_unused() {
    let v1 = identity(fixtures::V1);
    for crash_at in ActivationStep::ALL {
        let state = tempfile::tempdir().unwrap();
        let store = BundleStore::open(state.path()).unwrap();
        let staged = stage(&store, fixtures::V1);
        store
            .activate_with(&staged, &v1, &mut |s| {
                if s == crash_at { Err(Crash) } else { Ok(()) }
            })
            .unwrap_err();
        drop(store);
        let store = BundleStore::open(state.path()).unwrap();
        if crash_at == ActivationStep::MoveBundle {
            // Nothing was moved: nothing is installed, the download remains.
            assert!(store.active().is_none());
            assert!(staged.exists());
            continue;
        }
        // The bundle reached bundles/ complete: it is the one to run.
        assert_eq!(
            assert_active_is_complete(&store),
            v1,
            "crash at {crash_at:?}"
        );
    }
}

/// Collects what the store logs while `f` runs.
fn logs_of<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[test]
fn a_garbage_record_recovers_to_a_complete_bundle_with_a_clear_log() {
    let state = tempfile::tempdir().unwrap();
    let (v1, v2) = (identity(fixtures::V1), identity(fixtures::V2));
    let store = BundleStore::open(state.path()).unwrap();
    store.activate(&bundles().path(fixtures::V1), &v1).unwrap();
    store.activate(&stage(&store, fixtures::V2), &v2).unwrap();
    store.record_boot_attempt().unwrap();
    drop(store);

    // A torn active.json: the backup (the record before the boot attempt)
    // is restored.
    let record = state.path().join("active.json");
    let text = std::fs::read(&record).unwrap();
    std::fs::write(&record, &text[..text.len() / 3]).unwrap();
    let (store, log) = logs_of(|| BundleStore::open(state.path()).unwrap());
    let recovery = store.recovery().unwrap().clone();
    assert_eq!(recovery.action, RecoveryAction::RestoredBackup);
    assert!(
        recovery.reason.contains("active.json is unusable"),
        "{}",
        recovery.reason
    );
    assert_eq!(recovery.active.as_ref(), Some(&v2));
    assert_eq!(assert_active_is_complete(&store), v2);
    assert_eq!(store.previous().unwrap().bundle, v1);
    assert!(
        log.contains("WARN")
            && log.contains("Recovered the bundle store")
            && log.contains("RestoredBackup"),
        "{log}"
    );
    assert!(
        log.contains(&v2.digest),
        "the log names the bundle now active: {log}"
    );
    drop(store);

    // Both records garbage: the newest complete bundle on disk is adopted.
    std::fs::write(&record, b"\x00\x01 garbage").unwrap();
    std::fs::write(
        state.path().join("active.json.prev"),
        b"{\"schema\": 1, \"act",
    )
    .unwrap();
    let (store, log) = logs_of(|| BundleStore::open(state.path()).unwrap());
    assert_eq!(
        store.recovery().unwrap().action,
        RecoveryAction::AdoptedScanned
    );
    assert_eq!(assert_active_is_complete(&store), v2);
    assert!(log.contains("AdoptedScanned"), "{log}");
    drop(store);

    // The record is sound again: the next open has nothing to recover.
    let store = BundleStore::open(state.path()).unwrap();
    assert!(store.recovery().is_none());
    assert_eq!(assert_active_is_complete(&store), v2);
    drop(store);

    // A record of a future schema is not guessed at either.
    std::fs::write(&record, br#"{"schema": 99, "active": null}"#).unwrap();
    let store = BundleStore::open(state.path()).unwrap();
    assert!(store.recovery().unwrap().reason.contains("schema"));
    assert_eq!(assert_active_is_complete(&store), v2);
}

#[test]
fn a_damaged_active_file_falls_back_to_the_previous_bundle() {
    let state = tempfile::tempdir().unwrap();
    let (v1, v2) = (identity(fixtures::V1), identity(fixtures::V2));
    let store = BundleStore::open(state.path()).unwrap();
    store.activate(&bundles().path(fixtures::V1), &v1).unwrap();
    store.activate(&bundles().path(fixtures::V2), &v2).unwrap();
    let active = store.active().unwrap().path;
    drop(store);

    let bytes = std::fs::read(&active).unwrap();
    std::fs::write(&active, &bytes[..bytes.len() - 100]).unwrap();
    let store = BundleStore::open(state.path()).unwrap();
    assert_eq!(
        store.recovery().unwrap().action,
        RecoveryAction::PromotedPrevious
    );
    assert_eq!(assert_active_is_complete(&store), v1);
    assert!(
        !store.is_refused("", &v2.digest),
        "a damaged file is not the bundle's fault"
    );
    drop(store);

    // Nothing intact at all: the store is empty, and says so.
    let v1_file = BundleStore::open(state.path())
        .unwrap()
        .active()
        .unwrap()
        .path;
    std::fs::write(&v1_file, b"FERRY").unwrap();
    let store = BundleStore::open(state.path()).unwrap();
    assert_eq!(store.recovery().unwrap().action, RecoveryAction::Emptied);
    assert!(store.active().is_none());
}

#[test]
fn boot_attempts_and_health_are_persisted() {
    let state = tempfile::tempdir().unwrap();
    let v1 = identity(fixtures::V1);
    let store = BundleStore::open(state.path()).unwrap();
    store.activate(&bundles().path(fixtures::V1), &v1).unwrap();
    assert_eq!(store.record_boot_attempt().unwrap(), 1);
    assert_eq!(store.record_boot_attempt().unwrap(), 2);
    drop(store);
    let store = BundleStore::open(state.path()).unwrap();
    assert_eq!(store.record_boot_attempt().unwrap(), 3);
    assert!(!store.record().healthy);
    store.mark_healthy().unwrap();
    drop(store);
    let store = BundleStore::open(state.path()).unwrap();
    let record = store.record();
    assert_eq!((record.boot_attempts, record.healthy), (0, true));
    // A new activation starts on probation again.
    store.record_boot_attempt().unwrap();
    store
        .activate(&bundles().path(fixtures::V2), &identity(fixtures::V2))
        .unwrap();
    let record = store.record();
    assert_eq!((record.boot_attempts, record.healthy), (0, false));
}

#[test]
fn rejections_are_remembered_and_gc_keeps_what_matters() {
    let state = tempfile::tempdir().unwrap();
    let (v1, v2) = (identity(fixtures::V1), identity(fixtures::V2));
    let store = BundleStore::open(state.path()).unwrap();
    let bad = bundles().digest(fixtures::GOLDEN_FAILS);
    store.refuse("", &bad).unwrap();
    assert_eq!(store.refuse("", "nope").unwrap_err().code(), "bad_digest");
    store.activate(&bundles().path(fixtures::V1), &v1).unwrap();
    store.activate(&bundles().path(fixtures::V2), &v2).unwrap();
    drop(store);
    let store = BundleStore::open(state.path()).unwrap();
    assert!(store.is_refused("", &bad));
    assert_eq!(store.record().rejected_digests, vec![bad.clone()]);

    // Garbage: a stray bundle, an abandoned part, an old staged candidate;
    // kept: active, previous, a fresh part, a staged file asked for.
    let stray = store.bundle_path(&"c".repeat(64));
    std::fs::write(&stray, b"stray").unwrap();
    let staging = store.staging_dir();
    let old_part = staging.join(format!("{}.part", "d".repeat(64)));
    let f = std::fs::File::create(&old_part).unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 24 * 3600))
        .unwrap();
    drop(f);
    let fresh_part = staging.join(format!("{}.part", "e".repeat(64)));
    std::fs::write(&fresh_part, b"resume me").unwrap();
    let old_staged = stage(&store, fixtures::WRONG_FLEET);
    let kept_staged = stage(&store, fixtures::GOLDEN_FAILS);
    let keep = bundles().digest(fixtures::GOLDEN_FAILS);

    let report = store.gc(&[keep.as_str()]).unwrap();
    let mut removed = report.removed.clone();
    removed.sort();
    let mut expected = vec![stray, old_part, old_staged];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(report.freed_bytes > 0);
    assert!(fresh_part.exists() && kept_staged.exists());
    assert!(store.active().unwrap().path.exists() && store.previous().unwrap().path.exists());
}

#[test]
fn an_update_from_an_http_channel_end_to_end() {
    let b = bundles();
    let channel = tempfile::tempdir().unwrap();
    publish(channel.path(), &b.path(fixtures::V2));
    let server = ChannelServer::start(channel.path());
    let state = tempfile::tempdir().unwrap();
    let store = BundleStore::open(state.path()).unwrap();
    store
        .activate(&b.path(fixtures::V1), &identity(fixtures::V1))
        .unwrap();

    let fetcher = Fetcher::new(None).unwrap();
    let source = Source::parse(&server.url("index.json")).unwrap();
    let index = fetcher.fetch_index(&source).unwrap();
    let running = store.active().map(|s| s.bundle);
    let rejected = store.record().rejected_digests;
    assert_eq!(
        skip_reason(&index, &want(), running.as_ref(), &rejected),
        None
    );
    let staged = fetcher
        .download(
            &index.latest.url,
            &index.latest.digest,
            Some(index.latest.size),
            MAX,
            &store.staging_dir(),
            &mut no_progress(),
        )
        .unwrap();
    let bytes = std::fs::read(&staged).unwrap();
    let verified = check_candidate(
        &bytes,
        &b.trust(),
        &ReadLimits::default(),
        &want(),
        running.as_ref(),
        false,
    )
    .unwrap();
    let r = bundle_ref(&verified);
    let session = load_session(verified, &Default::default(), None).unwrap();
    health_check(&session).unwrap();
    store.activate(&staged, &r).unwrap();
    assert_eq!(session.digest(), r.digest);
    assert_eq!(assert_active_is_complete(&store), r);

    // The next poll has nothing to do.
    let index = fetcher.fetch_index(&source).unwrap();
    let running = store.active().map(|s| s.bundle);
    assert_eq!(
        skip_reason(&index, &want(), running.as_ref(), &[]).map(|r| r.code),
        Some("already_active")
    );
}
