//! Shared helpers: a minimal valid bundle.

use ferry_format as rt;
use ferry_testkit::fixtures::examples;

/// The guest artifact's bytes: the format does not look inside them.
pub const GUEST: &[u8] = b"\0asm\x01\0\0\0 a guest the format never runs";

/// Builds a small signed bundle with the test guest and the iris model.
pub fn small_bundle(signers: &[&rt::SecretKey]) -> Vec<u8> {
    let onnx = std::fs::read(examples().join("iris/model.onnx")).unwrap();
    let artifacts = vec![
        rt::ArtifactInput {
            role: rt::role::MODEL.into(),
            media_type: "application/onnx".into(),
            content: onnx,
            target: None,
            try_shuffle: true,
        },
        rt::ArtifactInput {
            role: rt::role::GUEST.into(),
            media_type: "application/wasm".into(),
            content: GUEST.to_vec(),
            target: None,
            try_shuffle: false,
        },
    ];
    rt::write_bundle(manifest(), &artifacts, signers, 3)
        .unwrap()
        .1
}

pub use ferry_testkit::fixtures::minimal_manifest as manifest;
