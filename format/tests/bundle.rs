use ferry_format::{self as rt, BundleError, ReadLimits, SecretKey, TrustPolicy};

use crate::common::{manifest, small_bundle};

fn trust(keys: &[&SecretKey]) -> TrustPolicy {
    TrustPolicy::new(keys.iter().map(|k| k.public()).collect()).unwrap()
}

fn verify(bytes: &[u8], policy: &TrustPolicy) -> Result<rt::VerifiedBundle, BundleError> {
    rt::verify(bytes, policy, &ReadLimits::default())
}

/// Re-signs a bundle after `edit` changed its manifest (what an attacker
/// holding a trusted key, or a buggy packager, could produce).
fn resign(
    bytes: &[u8],
    key: &SecretKey,
    edit: impl FnOnce(&mut rt::Manifest),
    payload: Option<Vec<u8>>,
) -> Vec<u8> {
    let framing = rt::parse_framing(bytes).unwrap();
    let mut m: rt::Manifest = rt::from_cbor(framing.manifest_bytes).unwrap();
    edit(&mut m);
    let payload = payload.unwrap_or_else(|| framing.payload.to_vec());
    rt::frame(&m, &payload, &[key]).unwrap()
}

#[test]
fn round_trip_keeps_every_artifact() {
    let key = SecretKey::generate().unwrap();
    let bytes = small_bundle(&[&key]);
    let b = verify(&bytes, &trust(&[&key])).unwrap();
    assert_eq!(b.signed_by(), &[key.key_id()]);
    assert_eq!(
        b.content(rt::role::MODEL).unwrap(),
        std::fs::read(ferry_testkit::fixtures::examples().join("iris/model.onnx")).unwrap()
    );
    assert_eq!(b.content(rt::role::GUEST).unwrap(), crate::common::GUEST);
    assert_eq!(b.manifest().name, "test");
}

/// Which error each region of the file must give when one of its bytes flips.
fn expected_codes(offset: usize, manifest_len: usize, sig_end: usize) -> &'static [&'static str] {
    match offset {
        0..8 => &["bad_magic"],
        8..10 => &["unsupported_version"],
        // counts and lengths: the file no longer adds up
        10..24 => &["bad_size", "truncated"],
        o if o < 24 + manifest_len => &["bad_signature"],
        // key ids: the signature is now by an unknown key
        o if o < sig_end && (o - 24 - manifest_len) % 72 < 8 => &["untrusted_key"],
        o if o < sig_end => &["bad_signature"],
        _ => &["digest_mismatch"],
    }
}

#[test]
fn every_flipped_byte_is_rejected_with_the_right_error() {
    let key = SecretKey::generate().unwrap();
    let policy = trust(&[&key]);
    let bytes = small_bundle(&[&key]);
    let manifest_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let sig_end = 24 + manifest_len + 72;
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        let err = verify(&b, &policy).expect_err(&format!("flip at {i} accepted"));
        let want = expected_codes(i, manifest_len, sig_end);
        assert!(
            want.contains(&err.code()),
            "flip at {i}: got {err:?}, want one of {want:?}"
        );
    }
}

#[test]
fn every_truncation_is_rejected() {
    let key = SecretKey::generate().unwrap();
    let policy = trust(&[&key]);
    let bytes = small_bundle(&[&key]);
    for len in 0..bytes.len() {
        let err =
            verify(&bytes[..len], &policy).expect_err(&format!("truncation to {len} accepted"));
        assert_eq!(err.code(), "truncated", "truncated to {len}: {err:?}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(verify(&longer, &policy).unwrap_err().code(), "bad_size");
    assert_eq!(
        verify(b"PK\x03\x04 a zip file", &policy)
            .unwrap_err()
            .code(),
        "bad_magic"
    );
}

#[test]
fn wrong_and_untrusted_keys_are_rejected() {
    let key = SecretKey::generate().unwrap();
    let other = SecretKey::generate().unwrap();
    let bytes = small_bundle(&[&key]);
    let err = verify(&bytes, &trust(&[&other])).unwrap_err();
    assert!(
        matches!(&err, BundleError::UntrustedKey(ids) if ids == &vec![key.key_id()]),
        "{err:?}"
    );
    // A signature claiming a trusted key's id but made with another key.
    let mut forged = bytes.clone();
    let manifest_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    forged[24 + manifest_len..24 + manifest_len + 8].copy_from_slice(&other.key_id().0);
    let err = verify(&forged, &trust(&[&other])).unwrap_err();
    assert!(
        matches!(err, BundleError::BadSignature(id) if id == other.key_id()),
        "{err:?}"
    );
}

#[test]
fn unsigned_bundles_are_rejected() {
    let key = SecretKey::generate().unwrap();
    let bytes = small_bundle(&[&key]);
    let manifest_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let mut unsigned = bytes[..24 + manifest_len].to_vec();
    unsigned[10..12].copy_from_slice(&0u16.to_le_bytes());
    unsigned.extend_from_slice(&bytes[24 + manifest_len + 72..]);
    assert!(matches!(
        verify(&unsigned, &trust(&[&key])),
        Err(BundleError::Unsigned)
    ));
    assert!(matches!(
        rt::write_bundle(manifest(), &[], &[], 3),
        Err(BundleError::Unsigned)
    ));
}

#[test]
fn thresholds_count_distinct_trusted_keys() {
    let a = SecretKey::generate().unwrap();
    let b = SecretKey::generate().unwrap();
    let c = SecretKey::generate().unwrap();
    let two_of_three =
        TrustPolicy::with_threshold(vec![a.public(), b.public(), c.public()], 2).unwrap();
    let err = verify(&small_bundle(&[&a]), &two_of_three).unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::BelowThreshold {
                valid: 1,
                required: 2,
                ..
            }
        ),
        "{err:?}"
    );
    // The same key twice is still one key.
    let err = verify(&small_bundle(&[&a, &a]), &two_of_three).unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::BelowThreshold {
                valid: 1,
                required: 2,
                ..
            }
        ),
        "{err:?}"
    );
    let ok = verify(&small_bundle(&[&a, &c]), &two_of_three).unwrap();
    assert_eq!(ok.signed_by().len(), 2);
    // An extra signature by an unknown key does not hurt.
    let stranger = SecretKey::generate().unwrap();
    assert!(verify(&small_bundle(&[&stranger, &a, &b]), &two_of_three).is_ok());
    assert!(TrustPolicy::with_threshold(vec![a.public()], 2).is_err());
    assert!(TrustPolicy::with_threshold(vec![], 1).is_err());
}

#[test]
fn declared_sizes_over_the_limits_are_rejected_before_decompressing() {
    let key = SecretKey::generate().unwrap();
    let bytes = small_bundle(&[&key]);
    let huge = resign(&bytes, &key, |m| m.artifacts[0].size = 1 << 40, None);
    let err = verify(&huge, &trust(&[&key])).unwrap_err();
    assert!(
        matches!(&err, BundleError::BadSize(m) if m.contains("over the")),
        "{err:?}"
    );
    let limits = ReadLimits {
        max_artifact_bytes: 100,
        max_total_bytes: 1000,
    };
    let err = rt::verify(&bytes, &trust(&[&key]), &limits).unwrap_err();
    assert_eq!(err.code(), "bad_size");
    // Offsets that do not tile the payload.
    let shifted = resign(&bytes, &key, |m| m.artifacts[1].offset += 1, None);
    assert_eq!(
        verify(&shifted, &trust(&[&key])).unwrap_err().code(),
        "bad_size"
    );
    // Content smaller than declared.
    let lie = resign(&bytes, &key, |m| m.artifacts[0].size += 10, None);
    let err = verify(&lie, &trust(&[&key])).unwrap_err();
    assert!(
        matches!(err, BundleError::SizeMismatch { declared, .. } if declared > 0),
        "{err:?}"
    );
    // Header sizes over their limits.
    let mut b = bytes.clone();
    b[12..16].copy_from_slice(&(u32::MAX).to_le_bytes());
    assert_eq!(verify(&b, &trust(&[&key])).unwrap_err().code(), "bad_size");
    let mut b = bytes.clone();
    b[10..12].copy_from_slice(&1000u16.to_le_bytes());
    assert_eq!(verify(&b, &trust(&[&key])).unwrap_err().code(), "bad_size");
    let mut b = bytes.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        verify(&b, &trust(&[&key])).unwrap_err().code(),
        "bad_size" | "truncated"
    ));
}

#[test]
fn a_zstd_bomb_is_stopped_at_its_declared_size() {
    let key = SecretKey::generate().unwrap();
    let bytes = small_bundle(&[&key]);
    // 256 MiB of zeros compress to a few KiB; the manifest declares 1000 bytes.
    let bomb = zstd::bulk::compress(&vec![0u8; 256 << 20], 3).unwrap();
    assert!(bomb.len() < 100_000);
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bomb));
    let framing = rt::parse_framing(&bytes).unwrap();
    let model = framing.payload[..rt::from_cbor::<rt::Manifest>(framing.manifest_bytes)
        .unwrap()
        .artifacts[1]
        .offset as usize]
        .to_vec();
    let mut payload = model.clone();
    payload.extend_from_slice(&bomb);
    let b = resign(
        &bytes,
        &key,
        |m| {
            let a = &mut m.artifacts[1];
            a.encoding = rt::Encoding::Zstd;
            a.compressed_size = bomb.len() as u64;
            a.compressed_sha256 = digest.clone();
            a.size = 1000;
        },
        Some(payload),
    );
    let err = verify(&b, &trust(&[&key])).unwrap_err();
    assert!(
        matches!(&err, BundleError::SizeMismatch { declared: 1000, actual, .. } if actual == "more than 1000"),
        "{err:?}"
    );
    // The same on the runtime's path, which trusts zstd for the content.
    let now = |_: &rt::Manifest, _: &rt::Artifact| rt::Extract::Now;
    let err = rt::verify_selected(&b, &trust(&[&key]), &ReadLimits::default(), &now).unwrap_err();
    assert_eq!(err.code(), "size_mismatch", "{err}");
}

#[test]
fn two_writes_of_the_same_inputs_are_identical() {
    let key = SecretKey::generate().unwrap();
    assert_eq!(small_bundle(&[&key]), small_bundle(&[&key]));
}

#[test]
fn keys_round_trip_through_pem() {
    let key = SecretKey::generate().unwrap();
    let again = SecretKey::from_pem(&key.to_pem()).unwrap();
    assert_eq!(again.key_id(), key.key_id());
    let pubs = rt::PublicKey::all_from_pem(&format!(
        "{}{}",
        key.public().to_pem(),
        SecretKey::generate().unwrap().public().to_pem()
    ))
    .unwrap();
    assert_eq!(pubs.len(), 2);
    assert_eq!(pubs[0], key.public());
    assert!(
        SecretKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----")
            .is_err()
    );
    assert!(rt::PublicKey::all_from_pem("nothing here").is_err());
}

#[test]
fn a_bundle_needing_a_newer_runtime_is_refused() {
    let key = SecretKey::generate().unwrap();
    let b = resign(
        &small_bundle(&[&key]),
        &key,
        |m| m.min_runtime = "99.0.0".into(),
        None,
    );
    assert_eq!(
        verify(&b, &trust(&[&key])).unwrap_err().code(),
        "runtime_too_old"
    );
}

/// `ModelInfo.engines` (docs/bundle-format.md §4): absent from the bytes of
/// a manifest without it (so bundles packed before it, and their signatures,
/// are unchanged), read back as absent, and covered by the signature when
/// present.
#[test]
fn the_engines_record_is_optional_left_out_when_absent_and_signed() {
    let key = SecretKey::generate().unwrap();
    let old = manifest();
    assert!(old.model.engines.is_none());
    let cbor = rt::to_cbor(&old);
    assert!(!cbor.windows(7).any(|w| w == b"engines"));
    let back: rt::Manifest = rt::from_cbor(&cbor).unwrap();
    assert_eq!(back, old);

    let bytes = small_bundle(&[&key]);
    let recorded = resign(
        &bytes,
        &key,
        |m| {
            m.model.engines = Some(rt::EngineSupport {
                preference: "auto".into(),
                engines: vec![rt::EngineReport {
                    name: "tract".into(),
                    serves: Some(true),
                    reason: None,
                }],
            })
        },
        None,
    );
    let b = verify(&recorded, &trust(&[&key])).unwrap();
    let engines = b.manifest().model.engines.clone().unwrap();
    assert_eq!(engines.engines[0].serves, Some(true));
    // Turning `serves: true` into `false` (CBOR 0xf5 -> 0xf4) breaks the signature.
    let at = recorded.windows(6).position(|w| w == b"serves").unwrap() + 6;
    assert_eq!(recorded[at], 0xf5);
    let mut forged = recorded.clone();
    forged[at] = 0xf4;
    let err = verify(&forged, &trust(&[&key])).unwrap_err();
    assert_eq!(err.code(), "bad_signature", "{err}");
}

/// A reader that decompresses only what it uses (`verify_selected`, what a
/// runtime does with guests precompiled for other machines) still refuses a
/// bundle whose unused artifact was tampered with: every stored byte is
/// checked against the signed manifest, and the unused artifact is never
/// handed out.
#[test]
fn an_artifact_left_compressed_is_still_checked_and_never_handed_out() {
    let key = SecretKey::generate().unwrap();
    let policy = trust(&[&key]);
    let onnx = std::fs::read(ferry_testkit::fixtures::examples().join("iris/model.onnx")).unwrap();
    let artifact = |role: &str, content: Vec<u8>, target: Option<&str>| rt::ArtifactInput {
        role: role.into(),
        media_type: "application/octet-stream".into(),
        content,
        target: target.map(str::to_owned),
        try_shuffle: false,
    };
    let (m, bytes) = rt::write_bundle(
        crate::common::manifest(),
        &[
            artifact(rt::role::MODEL, onnx.clone(), None),
            artifact(rt::role::GUEST, crate::common::GUEST.to_vec(), None),
            artifact(
                rt::role::GUEST_PRECOMPILED,
                b"native code for a machine this reader is not".repeat(100),
                Some("elsewhere:wasmtime-0"),
            ),
        ],
        &[&key],
        3,
    )
    .unwrap();
    let not_precompiled = |_: &rt::Manifest, a: &rt::Artifact| {
        if a.role == rt::role::GUEST_PRECOMPILED {
            rt::Extract::CheckOnly
        } else {
            rt::Extract::Now
        }
    };
    let selected =
        |b: &[u8]| rt::verify_selected(b, &policy, &ReadLimits::default(), &not_precompiled);

    let b = selected(&bytes).unwrap();
    assert_eq!(b.content(rt::role::MODEL).unwrap(), onnx);
    assert!(b.content(rt::role::GUEST_PRECOMPILED).is_none());
    assert!(b.precompiled_guests().is_empty());
    assert!(b.contents()[2].is_none());
    // The full reader hands it out, from the same bytes.
    assert_eq!(
        verify(&bytes, &policy).unwrap().precompiled_guests().len(),
        1
    );

    let a = m.artifact(rt::role::GUEST_PRECOMPILED).unwrap();
    let payload_start = bytes.len() - rt::parse_framing(&bytes).unwrap().payload.len();
    let start = payload_start + a.offset as usize;
    for i in start..start + a.compressed_size as usize {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        let err = selected(&b).expect_err(&format!("flip at {i} accepted"));
        assert!(
            matches!(&err, BundleError::DigestMismatch(r) if r == rt::role::GUEST_PRECOMPILED),
            "flip at {i}: {err:?}"
        );
    }
}

/// What a runtime runs (`verify_selected`): an artifact left for later
/// (`Extract::OnDemand`: the portable guest while a precompiled one may
/// load) has every stored byte checked now and is decoded only when asked;
/// the content digests are left to `verify` (which `ferry pack` runs on
/// what it writes), because zstd's output is a function of the stored bytes
/// the signed manifest authenticates. So a signer's manifest whose content
/// digest disagrees with its own stored bytes is refused by `verify`, and a
/// runtime serves what those authenticated bytes decode to; declared sizes
/// and zstd bombs are refused on both paths.
#[test]
fn a_runtime_checks_every_stored_byte_and_decodes_only_what_it_uses() {
    let key = SecretKey::generate().unwrap();
    let policy = trust(&[&key]);
    let bytes = small_bundle(&[&key]);
    let full = verify(&bytes, &policy).unwrap();
    let later = |_: &rt::Manifest, a: &rt::Artifact| {
        if a.role == rt::role::GUEST {
            rt::Extract::OnDemand
        } else {
            rt::Extract::Now
        }
    };
    let runtime = |b: &[u8]| rt::verify_selected(b, &policy, &ReadLimits::default(), &later);

    let b = runtime(&bytes).unwrap();
    assert!(b.content(rt::role::GUEST).is_none());
    assert_eq!(
        b.extract(rt::role::GUEST).unwrap().unwrap().as_ref(),
        crate::common::GUEST
    );
    assert_eq!(b.content(rt::role::MODEL), full.content(rt::role::MODEL));
    assert_eq!(b.extract(rt::role::GOLDEN).unwrap(), None);
    assert_eq!(
        (b.digest(), b.release_id()),
        (full.digest(), full.release_id())
    );

    // Any stored byte of the deferred artifact changed: refused at once.
    let framing = rt::parse_framing(&bytes).unwrap();
    let m: rt::Manifest = rt::from_cbor(framing.manifest_bytes).unwrap();
    let guest = m.artifact(rt::role::GUEST).unwrap();
    let start = bytes.len() - framing.payload.len() + guest.offset as usize;
    for i in start..start + guest.compressed_size as usize {
        let mut t = bytes.clone();
        t[i] ^= 0x80;
        let err = runtime(&t).expect_err(&format!("flip at {i} accepted"));
        assert!(
            matches!(&err, BundleError::DigestMismatch(r) if r == rt::role::GUEST),
            "flip at {i}: {err:?}"
        );
    }

    // A signed manifest whose model content digest is wrong.
    let lying = resign(
        &bytes,
        &key,
        |m| m.artifacts[0].sha256 = "00".repeat(32),
        None,
    );
    let err = verify(&lying, &policy).unwrap_err();
    assert!(
        matches!(&err, BundleError::DigestMismatch(r) if r == rt::role::MODEL),
        "{err:?}"
    );
    assert_eq!(
        runtime(&lying).unwrap().content(rt::role::MODEL),
        full.content(rt::role::MODEL)
    );
    // A declared size that is off, now and on demand.
    for role in [rt::role::MODEL, rt::role::GUEST] {
        let i = m.artifacts.iter().position(|a| a.role == role).unwrap();
        let off = resign(&bytes, &key, |m| m.artifacts[i].size += 1, None);
        let err = match runtime(&off) {
            Err(e) => e,
            Ok(b) => b.extract(role).unwrap_err(),
        };
        assert_eq!(err.code(), "size_mismatch", "{role}: {err}");
    }
}
