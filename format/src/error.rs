//! Errors of the format crate, one enum per subsystem. Each variant has a stable `code()` for
//! telemetry and for tests that must tell rejections apart.

use thiserror::Error;

use crate::keys::KeyId;

/// Reading or parsing keys.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The private key is not an ed25519 PKCS#8 PEM key.
    #[error("not an ed25519 PKCS#8 PEM private key: {0}")]
    BadPrivateKey(String),
    /// The public key is not an ed25519 SubjectPublicKeyInfo PEM key.
    #[error("not an ed25519 PEM public key: {0}")]
    BadPublicKey(String),
    /// A trust policy was built from no keys.
    #[error("no trusted public keys were given")]
    NoTrustedKeys,
    /// The threshold is 0 or more than the number of keys.
    #[error("signature threshold {threshold} is impossible with {keys} trusted key(s)")]
    BadThreshold { threshold: usize, keys: usize },
    /// The operating system's random generator failed.
    #[error("cannot get random bytes: {0}")]
    Random(String),
    /// A key is in two roles of one policy, so one signature would count twice.
    #[error("key {key} is in both the {first} and the {second} role; a key may hold one role")]
    SharedKey {
        key: KeyId,
        first: String,
        second: String,
    },
    /// A detached signature (operator command) is missing, malformed, by an
    /// untrusted key, or does not verify.
    #[error("bad signature: {0}")]
    BadSignature(String),
}

/// Why a bundle was refused. Checks run in this order: framing, signatures,
/// manifest, declared sizes, compressed digests, decompression, digests.
#[derive(Debug, Error)]
pub enum BundleError {
    /// The file does not start with the bundle magic.
    #[error("not a Ferry bundle (bad magic bytes)")]
    BadMagic,
    /// The format version is not one this runtime reads.
    #[error("bundle format version {0} is not supported (this runtime reads version 1)")]
    UnsupportedVersion(u16),
    /// The file is shorter than its header says.
    #[error("bundle is truncated: {0}")]
    Truncated(&'static str),
    /// A declared size is over its limit or inconsistent with the file.
    #[error("bundle declares an impossible size: {0}")]
    BadSize(String),
    /// The bundle carries no signature.
    #[error("bundle is not signed")]
    Unsigned,
    /// No signature is by a trusted key.
    #[error("bundle is signed only by untrusted key(s) {}", fmt_ids(.0))]
    UntrustedKey(Vec<KeyId>),
    /// A signature by a trusted key does not verify: the bundle was altered.
    #[error("signature by key {0} does not verify: the bundle was modified or corrupted")]
    BadSignature(KeyId),
    /// Fewer valid signatures by distinct trusted keys than required.
    #[error("bundle has {valid} valid signature(s) by {role} keys, {required} required")]
    BelowThreshold {
        role: String,
        valid: usize,
        required: usize,
    },
    /// The manifest is not valid CBOR of the expected shape.
    #[error("manifest is malformed: {0}")]
    BadManifest(String),
    /// An artifact's bytes do not match the digest in the manifest.
    #[error("artifact `{0}` does not match its digest")]
    DigestMismatch(String),
    /// An artifact decompresses to more (or fewer) bytes than declared.
    #[error("artifact `{name}` decompresses to {actual} bytes, {declared} declared")]
    SizeMismatch {
        name: String,
        declared: u64,
        actual: String,
    },
    /// An artifact could not be decompressed.
    #[error("artifact `{0}` cannot be decompressed: {1}")]
    Decompress(String, String),
    /// A required artifact is absent.
    #[error("bundle has no `{0}` artifact")]
    MissingArtifact(&'static str),
    /// The bundle needs a newer runtime.
    #[error("bundle needs runtime {required} or newer; this is {current}")]
    RuntimeTooOld { required: String, current: String },
}

fn fmt_ids(ids: &[KeyId]) -> String {
    ids.iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl BundleError {
    /// A stable identifier of the variant.
    pub fn code(&self) -> &'static str {
        match self {
            BundleError::BadMagic => "bad_magic",
            BundleError::UnsupportedVersion(_) => "unsupported_version",
            BundleError::Truncated(_) => "truncated",
            BundleError::BadSize(_) => "bad_size",
            BundleError::Unsigned => "unsigned",
            BundleError::UntrustedKey(_) => "untrusted_key",
            BundleError::BadSignature(_) => "bad_signature",
            BundleError::BelowThreshold { .. } => "below_threshold",
            BundleError::BadManifest(_) => "bad_manifest",
            BundleError::DigestMismatch(_) => "digest_mismatch",
            BundleError::SizeMismatch { .. } => "size_mismatch",
            BundleError::Decompress(..) => "decompress",
            BundleError::MissingArtifact(_) => "missing_artifact",
            BundleError::RuntimeTooOld { .. } => "runtime_too_old",
        }
    }
}

/// Why signed metadata (a root, channel metadata) was refused.
#[derive(Debug, Error)]
pub enum MetadataError {
    /// Not a well-formed envelope or document (JSON, base64, sizes).
    #[error("malformed signed metadata: {0}")]
    Malformed(String),
    /// The envelope holds another kind of document.
    #[error("signed metadata is of type {found:?}, {expected:?} expected")]
    WrongType { expected: String, found: String },
    /// Signatures missing, by untrusted keys, not verifying, or below a threshold.
    #[error("signed metadata: {0}")]
    Signature(KeyError),
    /// The root document is inconsistent (keys, roles, thresholds, schema).
    #[error("invalid root of trust: {0}")]
    BadRoot(String),
    /// A root update that is not the next version.
    #[error("root version {found} cannot follow: version {expected} expected")]
    RootVersion { expected: u64, found: u64 },
}

impl MetadataError {
    /// Stable code for telemetry and tests.
    pub fn code(&self) -> &'static str {
        match self {
            MetadataError::Malformed(_) => "bad_metadata",
            MetadataError::WrongType { .. } => "wrong_type",
            MetadataError::Signature(_) => "metadata_signature",
            MetadataError::BadRoot(_) => "bad_root",
            MetadataError::RootVersion { .. } => "root_version",
        }
    }
}
