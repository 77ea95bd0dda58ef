//! The bundle format, version 1: bytes in, typed values or typed errors out.
//! This module does no I/O (see `docs/bundle-format.md` for the normative text).
//!
//! ```text
//! offset  size  field
//! 0       8     magic  b"FERRY\0\x01\x0a"
//! 8       2     format version (u16 LE) = 1
//! 10      2     signature count (u16 LE)
//! 12      4     manifest length in bytes (u32 LE)
//! 16      8     payload length in bytes (u64 LE)
//! 24      m     manifest: deterministic CBOR (ciborium) of [`Manifest`]
//! 24+m    72*s  signatures: key id (8 bytes) + ed25519 signature (64 bytes)
//! ...     p     payload: the compressed artifacts, back to back, in manifest order
//! ```
//!
//! Each signature signs `SIGNING_CONTEXT || SHA-256(manifest)`. The manifest
//! holds the SHA-256 of every artifact, compressed and not, so the signature
//! covers every byte of the file except the header fields, which are
//! themselves checked against the file length and the manifest.
//!
//! The reader's order is the security argument: framing and sizes, then
//! signatures (over bytes not yet parsed), then the manifest (bounded size),
//! then every artifact's declared sizes against the limits, then each
//! artifact's compressed digest *before* zstd sees it, then decompression
//! into a buffer of exactly the declared size (anything more is refused: a
//! zstd bomb never allocates past what the signed manifest declared), then
//! the content digest ([`verify`]; a runtime's [`verify_selected`] trusts
//! zstd's output of authenticated bytes).
//!
//! # Changing this format
//! New manifest fields go at the end of their struct with `#[serde(default)]`
//! (older readers ignore them: a minor change, same format version). Any
//! change to the framing, the signing rule or the meaning of an existing field
//! is a new format version; readers refuse versions they do not know.
//! A bundle that needs a newer runtime says so in `min_runtime`.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::BundleError;
use crate::keys::{KEY_ID_LEN, KeyId, SecretKey, TrustPolicy};
use ferry_drift::DriftConfig;

/// First bytes of every bundle. The `\0` stops text tools, `\x01` is the
/// major format generation, `\n` catches newline translation.
pub const MAGIC: [u8; 8] = *b"FERRY\0\x01\n";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 24;
/// Bytes per signature entry: key id + ed25519 signature.
pub const SIGNATURE_ENTRY_LEN: usize = KEY_ID_LEN + 64;
/// Domain separation: a bundle signature can never be replayed as a
/// signature over something else signed with the same key.
pub const SIGNING_CONTEXT: &[u8] = b"ferry-bundle-v1\0";
/// Largest manifest accepted. Manifests hold metadata only (the baseline and
/// golden examples are artifacts), so real ones are a few KiB; 1 MiB leaves
/// room for very wide models while bounding what an unsigned file can make
/// the reader hash.
pub const MAX_MANIFEST_LEN: usize = 1 << 20;
/// Most signatures on one bundle (a threshold policy needs a few).
pub const MAX_SIGNATURES: usize = 32;
/// Most artifacts in one bundle (model, guest, precompiled guests, baseline, goldens).
pub const MAX_ARTIFACTS: usize = 64;

/// Most bytes reserved before decompressing an artifact. A larger (signed,
/// within limits) declaration grows the buffer only as real bytes arrive, so
/// a lying manifest cannot make the reader reserve gigabytes up front.
pub const MAX_UPFRONT_RESERVE: u64 = 64 << 20;

/// Limits a reader applies to the decompressed contents.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Largest decompressed artifact. Default 2 GiB: bigger than any model
    /// meant for the edge, small enough to refuse absurd declarations.
    pub max_artifact_bytes: u64,
    /// Largest total of decompressed artifacts. Default 4 GiB.
    pub max_total_bytes: u64,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_artifact_bytes: 2 << 30,
            max_total_bytes: 4 << 30,
        }
    }
}

/// How an artifact's bytes are stored in the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// zstd frame of the content.
    #[serde(rename = "zstd")]
    Zstd,
    /// zstd frame of the content byte-shuffled with stride 4: byte k of every
    /// 4-byte group first, for k = 0..4, then the `len % 4` tail bytes as is.
    /// Float weights compress better this way.
    #[serde(rename = "shuffle4+zstd")]
    Shuffle4Zstd,
}

/// The role of an artifact.
pub mod role {
    /// The ONNX model.
    pub const MODEL: &str = "model";
    /// The portable WASM guest.
    pub const GUEST: &str = "guest";
    /// The guest precompiled by wasmtime for one target (see `target`).
    pub const GUEST_PRECOMPILED: &str = "guest-precompiled";
    /// The drift baseline (CBOR of [`crate::Baseline`]).
    pub const DRIFT_BASELINE: &str = "drift-baseline";
    /// The golden examples (CBOR of `Vec<`[`super::GoldenExample`]`>`).
    pub const GOLDEN: &str = "golden";
}

/// One artifact as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// What the artifact is (see [`role`]).
    pub role: String,
    /// Media type of the content, e.g. `application/onnx`, `application/wasm`.
    pub media_type: String,
    /// How the bytes are stored.
    pub encoding: Encoding,
    /// Offset of the stored bytes from the start of the payload.
    pub offset: u64,
    /// Stored (compressed) size.
    pub compressed_size: u64,
    /// Content (decompressed) size.
    pub size: u64,
    /// SHA-256 of the content, hex.
    pub sha256: String,
    /// SHA-256 of the stored bytes, hex: checked before decompression.
    pub compressed_sha256: String,
    /// For precompiled guests: the target triple and engine compatibility key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Element type, shape and name of a model input or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    /// `f32`, `f64`, `i64`, `i32`, `u8` or `bool`.
    pub dtype: String,
    /// Dimensions; `None` is symbolic (the batch dimension).
    pub shape: Vec<Option<u64>>,
}

/// What a device checks before accepting an update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// The fleet the bundle is meant for.
    pub fleet: String,
    /// The channel within the fleet (e.g. `stable`, `beta`).
    pub channel: String,
    /// Increases with every release on a channel; devices refuse lower ones.
    pub sequence: u64,
}

/// The model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `onnx`.
    pub format: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Which engines can serve the model, as the packager found; absent in
    /// bundles packed before engines were recorded (they run on tract).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engines: Option<EngineSupport>,
}

/// The engines a model may run on (`docs/bundle-format.md` §3). Names are
/// strings, not an enum, so a runtime reads a manifest that names an engine
/// it does not know (and ignores that entry).
///
/// Do not reorder or remove fields; add new ones at the end with
/// `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EngineSupport {
    /// The bundle's preference: `auto`, `tract` or `onnxruntime`.
    pub preference: String,
    /// What the packager found, one entry per engine it knows. Speed is not
    /// recorded: it depends on the machine (and would make packing
    /// irreproducible); `auto` measures where the bundle runs.
    pub engines: Vec<EngineReport>,
}

/// What the packager found about one engine.
///
/// Do not reorder or remove fields; add new ones at the end with
/// `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineReport {
    /// `tract` or `onnxruntime`.
    pub name: String,
    /// `true`: it loaded the model and passed the golden examples; `false`:
    /// it cannot serve the model (`reason` says why); absent: not checked
    /// (the engine was not present where the bundle was packed).
    pub serves: Option<bool>,
    pub reason: Option<String>,
}

/// The pre/postprocessing pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    /// `standard` (Ferry's guest, with its version) or `custom`.
    pub guest: String,
    /// The JSON configuration passed to `ferry_init` (see `docs/guest-abi.md`).
    pub config_json: String,
}

/// Sandbox limits for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GuestLimits {
    /// Cap on the guest's linear memory.
    pub memory_bytes: u64,
    /// Deadline for one guest call.
    pub timeout_ms: u64,
}

/// Where the model came from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Lineage {
    pub source_commit: Option<String>,
    /// SHA-256 (hex) of the training data set file.
    pub dataset_sha256: Option<String>,
    /// Free-form training metadata, as JSON text.
    pub training_json: Option<String>,
}

/// The signed description of a bundle.
///
/// Do not reorder or remove fields; add new ones at the end with
/// `#[serde(default)]` (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u16,
    pub name: String,
    pub version: String,
    pub description: Option<String>,
    /// Unix seconds; `SOURCE_DATE_EPOCH` when set, for reproducible builds.
    pub created: u64,
    /// Oldest runtime version that can run the bundle.
    pub min_runtime: String,
    /// Version of the packager that wrote the bundle.
    pub packager: String,
    pub release: Release,
    pub model: ModelInfo,
    pub pipeline: Pipeline,
    pub limits: GuestLimits,
    pub drift: DriftConfig,
    pub lineage: Lineage,
    pub artifacts: Vec<Artifact>,
}

impl Manifest {
    /// The first artifact with this role.
    pub fn artifact(&self, role: &str) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.role == role)
    }
}

/// A golden example: a request and (a subset of) its expected response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenExample {
    pub name: String,
    pub content_type: String,
    #[serde(with = "serde_bytes_compat")]
    pub input: Vec<u8>,
    /// Expected response, JSON text; numbers compared within `tolerance`.
    pub expected_json: String,
    pub tolerance: f64,
}

/// Stores byte vectors as CBOR byte strings rather than arrays of integers.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// An artifact's content, before it is stored.
#[derive(Debug, Clone)]
pub struct ArtifactInput {
    pub role: String,
    pub media_type: String,
    pub content: Vec<u8>,
    pub target: Option<String>,
    /// Try byte-shuffling and keep it when smaller.
    pub try_shuffle: bool,
}

/// Encodes a value as CBOR. ciborium writes struct fields in declaration
/// order, maps in their iteration order (we only use `BTreeMap`) and floats
/// in their shortest exact form, so equal values give equal bytes.
pub fn to_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("CBOR encoding into memory cannot fail");
    out
}

/// Decodes CBOR.
pub fn from_cbor<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    ciborium::from_reader(bytes).map_err(|e| e.to_string())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Byte-shuffles with stride 4 (see [`Encoding::Shuffle4Zstd`]).
pub fn shuffle4(data: &[u8]) -> Vec<u8> {
    let groups = data.len() / 4;
    let mut out = Vec::with_capacity(data.len());
    for k in 0..4 {
        out.extend(data[..groups * 4].iter().skip(k).step_by(4));
    }
    out.extend_from_slice(&data[groups * 4..]);
    out
}

/// Inverse of [`shuffle4`].
pub fn unshuffle4(data: &[u8]) -> Vec<u8> {
    let groups = data.len() / 4;
    let mut out = vec![0u8; data.len()];
    let (planes, tail) = data.split_at(groups * 4);
    let (p0, rest) = planes.split_at(groups);
    let (p1, rest) = rest.split_at(groups);
    let (p2, p3) = rest.split_at(groups);
    // One pass writing whole groups (the compiler vectorises it), not four
    // strided passes.
    for ((((o, &a), &b), &c), &d) in out[..groups * 4]
        .chunks_exact_mut(4)
        .zip(p0)
        .zip(p1)
        .zip(p2)
        .zip(p3)
    {
        o.copy_from_slice(&[a, b, c, d]);
    }
    out[groups * 4..].copy_from_slice(tail);
    out
}

/// Content per zstd frame of a large artifact: an artifact of at least
/// twice this is stored as several frames (at most [`MAX_FRAMES`], of equal
/// size) that readers decode in parallel. A stream of concatenated frames is
/// plain zstd: any reader decodes it, one frame after the other.
pub const FRAME_BYTES: usize = 1 << 20;
/// Most frames an artifact is cut into.
pub const MAX_FRAMES: usize = 16;

/// Compresses an artifact, choosing the smaller encoding when shuffling is tried.
pub fn compress(content: &[u8], try_shuffle: bool, level: i32) -> (Encoding, Vec<u8>) {
    let plain = zstd_frames(content, level);
    if try_shuffle && content.len() >= 1024 {
        let shuffled = zstd_frames(&shuffle4(content), level);
        if shuffled.len() < plain.len() {
            return (Encoding::Shuffle4Zstd, shuffled);
        }
    }
    (Encoding::Zstd, plain)
}

/// zstd at `level`, as one frame, or for a large content as frames of equal
/// size (see [`FRAME_BYTES`]), each declaring its content size, compressed
/// in parallel.
fn zstd_frames(content: &[u8], level: i32) -> Vec<u8> {
    let compress = |c: &[u8]| {
        zstd::bulk::compress(c, level).expect("zstd compression into memory cannot fail")
    };
    let frames = (content.len() / FRAME_BYTES).clamp(1, MAX_FRAMES);
    if frames == 1 {
        return compress(content);
    }
    let chunks: Vec<&[u8]> = content.chunks(content.len().div_ceil(frames)).collect();
    parallel_map(&chunks, usize::MAX, |chunk| compress(chunk)).concat()
}

/// `f` of every item, in the items' order, computed by up to `max_threads`
/// threads (the machine's CPUs at most) that each take the next item not
/// yet taken: the caller's thread is one of them.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    max_threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(max_threads)
        .min(items.len())
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(item) = items.get(i) else {
                return done;
            };
            done.push((i, f(item)));
        }
    };
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut all = work();
        for h in helpers {
            all.extend(h.join().expect("a worker thread panicked"));
        }
        all
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// The zstd frames of stored bytes and the content size each declares,
/// when there are several and every one declares its size; `None`
/// otherwise (one frame, or anything the one-call path should judge).
/// Only run on stored bytes whose digest was checked.
fn frames_of(stored: &[u8]) -> Option<Vec<(&[u8], usize)>> {
    use zstd::zstd_safe;
    let mut frames = Vec::new();
    let mut rest = stored;
    while !rest.is_empty() {
        if frames.len() == MAX_FRAMES {
            return None;
        }
        let len = zstd_safe::find_frame_compressed_size(rest).ok()?;
        let (frame, after) = rest.split_at_checked(len)?;
        let size = zstd_safe::get_frame_content_size(frame).ok()??;
        frames.push((frame, usize::try_from(size).ok()?));
        rest = after;
    }
    (frames.len() > 1).then_some(frames)
}

/// Writes a signed bundle. `manifest.artifacts` is filled in from `artifacts`.
pub fn write_bundle(
    mut manifest: Manifest,
    artifacts: &[ArtifactInput],
    signers: &[&SecretKey],
    level: i32,
) -> Result<(Manifest, Vec<u8>), BundleError> {
    if signers.is_empty() {
        return Err(BundleError::Unsigned);
    }
    if signers.len() > MAX_SIGNATURES || artifacts.len() > MAX_ARTIFACTS {
        return Err(BundleError::BadSize(
            "too many signatures or artifacts".into(),
        ));
    }
    let mut payload = Vec::new();
    manifest.format_version = FORMAT_VERSION;
    manifest.artifacts = artifacts
        .iter()
        .map(|a| {
            let (encoding, stored) = compress(&a.content, a.try_shuffle, level);
            let entry = Artifact {
                role: a.role.clone(),
                media_type: a.media_type.clone(),
                encoding,
                offset: payload.len() as u64,
                compressed_size: stored.len() as u64,
                size: a.content.len() as u64,
                sha256: sha256_hex(&a.content),
                compressed_sha256: sha256_hex(&stored),
                target: a.target.clone(),
            };
            payload.extend_from_slice(&stored);
            entry
        })
        .collect();
    let out = frame(&manifest, &payload, signers)?;
    Ok((manifest, out))
}

/// Encodes a manifest, signs it and frames it with the payload. The
/// manifest's artifact list must already describe `payload`.
pub fn frame(
    manifest: &Manifest,
    payload: &[u8],
    signers: &[&SecretKey],
) -> Result<Vec<u8>, BundleError> {
    let manifest_bytes = to_cbor(manifest);
    if manifest_bytes.len() > MAX_MANIFEST_LEN {
        return Err(BundleError::BadSize(format!(
            "manifest is {} bytes, over the {MAX_MANIFEST_LEN}-byte limit",
            manifest_bytes.len()
        )));
    }
    if signers.len() > MAX_SIGNATURES {
        return Err(BundleError::BadSize(format!(
            "{} signers, at most {MAX_SIGNATURES}",
            signers.len()
        )));
    }
    let message = signing_message(&manifest_bytes);
    let mut out = Vec::with_capacity(
        HEADER_LEN + manifest_bytes.len() + payload.len() + SIGNATURE_ENTRY_LEN * signers.len(),
    );
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(signers.len() as u16).to_le_bytes());
    out.extend_from_slice(&(manifest_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&manifest_bytes);
    for key in signers {
        out.extend_from_slice(&key.key_id().0);
        out.extend_from_slice(&key.sign(&message));
    }
    out.extend_from_slice(payload);
    Ok(out)
}

fn signing_message(manifest_bytes: &[u8]) -> Vec<u8> {
    let mut m = SIGNING_CONTEXT.to_vec();
    m.extend_from_slice(&Sha256::digest(manifest_bytes));
    m
}

/// The framing of a bundle, checked for sizes only.
#[derive(Debug, Clone)]
pub struct Framing<'a> {
    pub manifest_bytes: &'a [u8],
    pub signatures: Vec<(KeyId, [u8; 64])>,
    pub payload: &'a [u8],
}

/// The fixed header at the start of every bundle, checked: the magic, a
/// version this code reads, and declared sizes within their limits. Reading
/// it needs only the first [`HEADER_LEN`] bytes of a file, so a store can
/// name a bundle on disk without reading it whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The format version (always [`FORMAT_VERSION`] once parsed).
    pub version: u16,
    /// Number of signature entries after the manifest.
    pub signature_count: usize,
    /// Length of the CBOR manifest, at most [`MAX_MANIFEST_LEN`].
    pub manifest_len: usize,
    /// Length of the payload (the compressed artifacts).
    pub payload_len: u64,
}

impl Header {
    /// Parses the header from the first bytes of a file (`prefix` may be
    /// longer than [`HEADER_LEN`]; only the header is read).
    pub fn parse(prefix: &[u8]) -> Result<Header, BundleError> {
        if prefix.len() < MAGIC.len() {
            return Err(if MAGIC.starts_with(prefix) {
                BundleError::Truncated("header")
            } else {
                BundleError::BadMagic
            });
        }
        if prefix[..8] != MAGIC {
            return Err(BundleError::BadMagic);
        }
        if prefix.len() < HEADER_LEN {
            return Err(BundleError::Truncated("header"));
        }
        let version = u16::from_le_bytes([prefix[8], prefix[9]]);
        if version != FORMAT_VERSION {
            return Err(BundleError::UnsupportedVersion(version));
        }
        let signature_count = u16::from_le_bytes([prefix[10], prefix[11]]) as usize;
        let manifest_len = u32::from_le_bytes(prefix[12..16].try_into().unwrap()) as usize;
        let payload_len = u64::from_le_bytes(prefix[16..24].try_into().unwrap());
        if signature_count > MAX_SIGNATURES {
            return Err(BundleError::BadSize(format!(
                "{signature_count} signatures declared, at most {MAX_SIGNATURES}"
            )));
        }
        if manifest_len > MAX_MANIFEST_LEN {
            return Err(BundleError::BadSize(format!(
                "manifest of {manifest_len} bytes declared, at most {MAX_MANIFEST_LEN}"
            )));
        }
        Ok(Header {
            version,
            signature_count,
            manifest_len,
            payload_len,
        })
    }

    /// Where the manifest lies in the file.
    pub fn manifest_range(&self) -> std::ops::Range<usize> {
        HEADER_LEN..HEADER_LEN + self.manifest_len
    }

    /// Length of header, manifest and signatures: where the payload starts.
    pub fn fixed_len(&self) -> usize {
        HEADER_LEN + self.manifest_len + self.signature_count * SIGNATURE_ENTRY_LEN
    }
}

/// Reads the manifest of a bundle from its header and the manifest's bytes
/// (`bytes[header.manifest_range()]`) *without* checking signatures: for
/// naming a bundle found on disk, never for running it.
pub fn manifest_unverified(
    header: &Header,
    manifest_bytes: &[u8],
    limits: &ReadLimits,
) -> Result<Manifest, BundleError> {
    if manifest_bytes.len() != header.manifest_len {
        return Err(BundleError::Truncated("manifest or signatures"));
    }
    manifest_checked(manifest_bytes, header.payload_len, limits)
}

/// Checks magic, version and that the header's sizes fit the file exactly.
pub fn parse_framing(bytes: &[u8]) -> Result<Framing<'_>, BundleError> {
    let header = Header::parse(bytes)?;
    let Header {
        signature_count: sig_count,
        manifest_len,
        payload_len,
        ..
    } = header;
    let fixed = HEADER_LEN + manifest_len + sig_count * SIGNATURE_ENTRY_LEN;
    let expected = (fixed as u64)
        .checked_add(payload_len)
        .ok_or_else(|| BundleError::BadSize("payload length".into()))?;
    let actual = bytes.len() as u64;
    if actual < expected {
        return Err(BundleError::Truncated(if actual < fixed as u64 {
            "manifest or signatures"
        } else {
            "payload"
        }));
    }
    if actual > expected {
        return Err(BundleError::BadSize(format!(
            "{} bytes after the declared end of the bundle",
            actual - expected
        )));
    }
    let manifest_bytes = &bytes[HEADER_LEN..HEADER_LEN + manifest_len];
    let signatures = bytes[HEADER_LEN + manifest_len..fixed]
        .chunks_exact(SIGNATURE_ENTRY_LEN)
        .map(|c| {
            let mut id = [0u8; KEY_ID_LEN];
            id.copy_from_slice(&c[..KEY_ID_LEN]);
            let mut sig = [0u8; 64];
            sig.copy_from_slice(&c[KEY_ID_LEN..]);
            (KeyId(id), sig)
        })
        .collect();
    Ok(Framing {
        manifest_bytes,
        signatures,
        payload: &bytes[fixed..],
    })
}

/// Checks the signatures of a framed bundle against a trust policy. Returns
/// the ids of the trusted keys whose signatures verified.
pub fn check_signatures(
    framing: &Framing<'_>,
    trust: &TrustPolicy,
) -> Result<Vec<KeyId>, BundleError> {
    if framing.signatures.is_empty() {
        return Err(BundleError::Unsigned);
    }
    let message = signing_message(framing.manifest_bytes);
    let mut valid: Vec<KeyId> = Vec::new();
    let mut untrusted = Vec::new();
    for (id, sig) in &framing.signatures {
        let Some(key) = trust.find(id) else {
            untrusted.push(*id);
            continue;
        };
        let signature = ed25519_dalek::Signature::from_bytes(sig);
        key.0
            .verify_strict(&message, &signature)
            .map_err(|_| BundleError::BadSignature(*id))?;
        if !valid.contains(id) {
            valid.push(*id);
        }
    }
    if valid.is_empty() {
        return Err(BundleError::UntrustedKey(untrusted));
    }
    trust
        .check_threshold(&valid)
        .map_err(|s| BundleError::BelowThreshold {
            role: s.role,
            valid: s.valid,
            required: s.required,
        })?;
    Ok(valid)
}

/// The identity of a release: SHA-256 (hex) of its manifest's bytes, which
/// is what every signature covers. Adding or dropping signatures changes the
/// file's digest, never this.
pub fn release_id(framing: &Framing<'_>) -> String {
    sha256_hex(framing.manifest_bytes)
}

/// The release id (see [`release_id`]) of a bundle file's bytes, read from
/// its framing without checking signatures.
pub fn release_id_of(bytes: &[u8]) -> Result<String, BundleError> {
    parse_framing(bytes).map(|f| release_id(&f))
}

/// Adds signatures to a framed bundle without touching its manifest or
/// payload (an approver countersigning what a builder packed). A key that
/// already signed is not added twice; existing signatures are kept as they
/// are (the reader checks them).
pub fn add_signatures(bytes: &[u8], signers: &[&SecretKey]) -> Result<Vec<u8>, BundleError> {
    let framing = parse_framing(bytes)?;
    let message = signing_message(framing.manifest_bytes);
    let mut signatures = framing.signatures.clone();
    for key in signers {
        if !signatures.iter().any(|(id, _)| *id == key.key_id()) {
            signatures.push((key.key_id(), key.sign(&message)));
        }
    }
    if signatures.len() > MAX_SIGNATURES {
        return Err(BundleError::BadSize(format!(
            "{} signatures, at most {MAX_SIGNATURES}",
            signatures.len()
        )));
    }
    let mut out = Vec::with_capacity(bytes.len() + SIGNATURE_ENTRY_LEN * signers.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(signatures.len() as u16).to_le_bytes());
    out.extend_from_slice(&(framing.manifest_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&(framing.payload.len() as u64).to_le_bytes());
    out.extend_from_slice(framing.manifest_bytes);
    for (id, sig) in &signatures {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(sig);
    }
    out.extend_from_slice(framing.payload);
    Ok(out)
}

/// Parses the manifest and checks every artifact's declared sizes and
/// offsets against the payload and the limits. Nothing is decompressed.
pub fn parse_manifest(framing: &Framing<'_>, limits: &ReadLimits) -> Result<Manifest, BundleError> {
    manifest_checked(framing.manifest_bytes, framing.payload.len() as u64, limits)
}

/// [`parse_manifest`] given the manifest's bytes and the payload's length.
fn manifest_checked(
    manifest_bytes: &[u8],
    payload_len: u64,
    limits: &ReadLimits,
) -> Result<Manifest, BundleError> {
    let manifest: Manifest = from_cbor(manifest_bytes).map_err(BundleError::BadManifest)?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(BundleError::BadManifest(format!(
            "manifest says format version {}, header says {FORMAT_VERSION}",
            manifest.format_version
        )));
    }
    if manifest.artifacts.len() > MAX_ARTIFACTS {
        return Err(BundleError::BadSize(format!(
            "{} artifacts, at most {MAX_ARTIFACTS}",
            manifest.artifacts.len()
        )));
    }
    let mut expected_offset = 0u64;
    let mut total = 0u64;
    for a in &manifest.artifacts {
        if a.offset != expected_offset {
            return Err(BundleError::BadSize(format!(
                "artifact `{}` is not where the manifest says",
                a.role
            )));
        }
        expected_offset = a
            .offset
            .checked_add(a.compressed_size)
            .ok_or_else(|| BundleError::BadSize(format!("artifact `{}` size overflows", a.role)))?;
        if a.size > limits.max_artifact_bytes {
            return Err(BundleError::BadSize(format!(
                "artifact `{}` declares {} bytes, over the {}-byte limit",
                a.role, a.size, limits.max_artifact_bytes
            )));
        }
        total = total.saturating_add(a.size);
    }
    if expected_offset != payload_len {
        return Err(BundleError::BadSize(format!(
            "artifacts cover {expected_offset} bytes, payload is {payload_len} bytes"
        )));
    }
    if total > limits.max_total_bytes {
        return Err(BundleError::BadSize(format!(
            "artifacts total {total} bytes, over the {}-byte limit",
            limits.max_total_bytes
        )));
    }
    Ok(manifest)
}

/// Checks an artifact's stored digest, decompresses it into at most its
/// declared size and checks its content digest.
pub fn extract_artifact(
    framing: &Framing<'_>,
    artifact: &Artifact,
) -> Result<Vec<u8>, BundleError> {
    decode(
        check_stored(framing, artifact)?,
        artifact,
        ContentDigest::Check,
    )
}

/// Whether decoding an artifact hashes its content against the manifest's
/// `sha256` (step 21 of docs/bundle-format.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentDigest {
    /// Hash it: [`verify`], and every tool that vouches for a bundle.
    Check,
    /// Trust zstd: the stored bytes were authenticated (step 18) and
    /// decoding is a function of them, so the content is what the signer's
    /// packer produced (and `ferry pack` checked the content digests of the
    /// bundle it wrote). What a runtime loading the bundle does.
    FromStored,
}

/// Steps 19-21 on stored bytes whose digest was checked: decompresses into
/// at most the declared size, unshuffles, and (`Check`) checks the content
/// digest.
fn decode(
    stored: &[u8],
    artifact: &Artifact,
    digest: ContentDigest,
) -> Result<Vec<u8>, BundleError> {
    let declared = artifact.size;
    let mut content = match decompress_bounded_fast(stored, declared) {
        Some(content) => content,
        None => decompress_bounded(stored, artifact)?,
    };
    if artifact.encoding == Encoding::Shuffle4Zstd {
        content = unshuffle4(&content);
    }
    if digest == ContentDigest::Check && sha256_hex(&content) != artifact.sha256 {
        return Err(BundleError::DigestMismatch(artifact.role.clone()));
    }
    Ok(content)
}

/// Decompresses in one call into a buffer of the declared size plus one
/// byte (zstd stops at the buffer's end: a bomb produces at most that), when
/// the declaration is within [`MAX_UPFRONT_RESERVE`]. `None` when the content
/// is not exactly the declared size or zstd fails: [`decompress_bounded`]
/// then says which error it is. Saves the streaming decoder's copies.
fn decompress_bounded_fast(stored: &[u8], declared: u64) -> Option<Vec<u8>> {
    if declared >= MAX_UPFRONT_RESERVE {
        return None;
    }
    if let Some(frames) = frames_of(stored) {
        return decompress_frames(&frames, declared as usize);
    }
    // Zeroed pages come from the allocator untouched (no memset for large
    // buffers); zstd writes each once.
    let mut content = vec![0u8; declared as usize + 1];
    let n = zstd::bulk::decompress_to_buffer(stored, &mut content).ok()?;
    (n as u64 == declared).then(|| {
        content.truncate(n);
        content
    })
}

/// Decodes frames in parallel threads, each into its own part of a buffer of
/// the declared size: `None` unless the sizes the frames declare add up to
/// it and each frame decodes to exactly its size (a frame that holds more
/// than it declares overflows its part and fails).
fn decompress_frames(frames: &[(&[u8], usize)], declared: usize) -> Option<Vec<u8>> {
    if frames.iter().map(|(_, n)| *n).sum::<usize>() != declared {
        return None;
    }
    let mut content = vec![0u8; declared];
    let mut parts: Vec<(&[u8], std::sync::Mutex<&mut [u8]>)> = Vec::with_capacity(frames.len());
    let mut rest = content.as_mut_slice();
    for &(frame, size) in frames {
        let (part, after) = rest.split_at_mut(size);
        parts.push((frame, std::sync::Mutex::new(part)));
        rest = after;
    }
    let decoded = parallel_map(&parts, MAX_VERIFY_THREADS, |(frame, part)| {
        let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
        zstd::bulk::decompress_to_buffer(frame, &mut part).ok() == Some(part.len())
    });
    drop(parts);
    decoded.into_iter().all(|ok| ok).then_some(content)
}

/// Streams the decompression, reading at most one byte past the declared
/// size, and classifies what went wrong.
fn decompress_bounded(stored: &[u8], artifact: &Artifact) -> Result<Vec<u8>, BundleError> {
    let declared = artifact.size;
    let mut decoder = zstd::stream::read::Decoder::new(stored)
        .map_err(|e| BundleError::Decompress(artifact.role.clone(), e.to_string()))?;
    // Read one byte more than declared: if it arrives, the content is larger
    // than the signed manifest says, and nothing past that was allocated.
    let mut content = Vec::with_capacity(declared.min(MAX_UPFRONT_RESERVE) as usize);
    (&mut decoder)
        .take(declared + 1)
        .read_to_end(&mut content)
        .map_err(|e| BundleError::Decompress(artifact.role.clone(), e.to_string()))?;
    if content.len() as u64 != declared {
        let actual = if content.len() as u64 > declared {
            format!("more than {declared}")
        } else {
            content.len().to_string()
        };
        return Err(BundleError::SizeMismatch {
            name: artifact.role.clone(),
            declared,
            actual,
        });
    }
    Ok(content)
}

/// Checks an artifact's stored (compressed) bytes against the manifest's
/// digest and returns them: what is done for every artifact, used or not.
fn check_stored<'a>(framing: &Framing<'a>, artifact: &Artifact) -> Result<&'a [u8], BundleError> {
    let start = artifact.offset as usize;
    let stored = &framing.payload[start..start + artifact.compressed_size as usize];
    if sha256_hex(stored) != artifact.compressed_sha256 {
        return Err(BundleError::DigestMismatch(artifact.role.clone()));
    }
    Ok(stored)
}

/// A bundle whose signatures, sizes and digests have all been checked.
///
/// Its fields are private: a `VerifiedBundle` with signatures can only come
/// out of [`verify`], so what it hands out (in particular
/// [`VerifiedBundle::precompiled_guests`]) is known to be signed bytes.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    manifest: Manifest,
    digest: String,
    release_id: String,
    signed_by: Vec<KeyId>,
    /// By index in the manifest's artifacts; `None` for an artifact the
    /// reader did not ask for (its stored bytes were checked, not
    /// decompressed: see [`verify_selected`]).
    contents: Vec<Option<Vec<u8>>>,
    /// By index: the checked stored bytes of an artifact left for
    /// [`VerifiedBundle::extract`] ([`Extract::OnDemand`]).
    on_demand: Vec<Option<Vec<u8>>>,
    /// How [`VerifiedBundle::extract`] decodes them (as verification did).
    content_digest: ContentDigest,
}

/// Precompiled guest code (native machine code for one target) from a
/// bundle whose signatures verified: the token that lets the sandbox
/// deserialize it. Only this crate makes one, and only from a
/// [`VerifiedBundle`] signed by trusted keys.
#[derive(Debug, Clone, Copy)]
pub struct PrecompiledGuest<'a> {
    target: &'a str,
    bytes: &'a [u8],
}

impl<'a> PrecompiledGuest<'a> {
    /// The compatibility key it was compiled for (target and engine).
    pub fn target(&self) -> &'a str {
        self.target
    }

    /// The serialized module.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

impl VerifiedBundle {
    /// An unsigned bundle assembled in memory from contents that were never
    /// framed (the packager's draft, to run golden examples before signing).
    /// It never yields precompiled guests.
    pub fn draft(manifest: Manifest, contents: Vec<Vec<u8>>) -> VerifiedBundle {
        VerifiedBundle {
            manifest,
            digest: String::new(),
            release_id: String::new(),
            signed_by: Vec::new(),
            on_demand: contents.iter().map(|_| None).collect(),
            contents: contents.into_iter().map(Some).collect(),
            content_digest: ContentDigest::Check,
        }
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 (hex) of the whole bundle file: what a download is checked
    /// against. Not an identity: signatures are outside what is signed.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// SHA-256 (hex) of the manifest: the release's identity, what its
    /// signatures cover (see [`release_id`]).
    pub fn release_id(&self) -> &str {
        &self.release_id
    }

    /// Keys whose signatures verified (empty for integrity-only checks and
    /// drafts).
    pub fn signed_by(&self) -> &[KeyId] {
        &self.signed_by
    }

    /// Decompressed artifacts, by index in the manifest's artifacts (`None`:
    /// not decompressed, see [`verify_selected`]).
    pub fn contents(&self) -> &[Option<Vec<u8>>] {
        &self.contents
    }

    /// Takes the manifest and the digest, dropping the contents.
    pub fn into_identity(self) -> (Manifest, String) {
        (self.manifest, self.digest)
    }

    /// The precompiled guests, if (and only if) trusted signatures verified.
    pub fn precompiled_guests(&self) -> Vec<PrecompiledGuest<'_>> {
        if self.signed_by.is_empty() {
            return Vec::new();
        }
        self.all(role::GUEST_PRECOMPILED)
            .filter_map(|(a, c)| {
                a.target
                    .as_deref()
                    .map(|target| PrecompiledGuest { target, bytes: c })
            })
            .collect()
    }

    /// The content of the first artifact with this role (`None` also when
    /// it was not decompressed).
    pub fn content(&self, role: &str) -> Option<&[u8]> {
        self.manifest
            .artifacts
            .iter()
            .position(|a| a.role == role)
            .and_then(|i| self.contents[i].as_deref())
    }

    /// The content of the first artifact with this role, decompressed now
    /// if verification left it for later ([`Extract::OnDemand`]); `None`
    /// when there is no such artifact or it was only checked
    /// ([`Extract::CheckOnly`]). Its stored bytes were checked against the
    /// signed manifest during verification; this decodes them with the same
    /// checks (declared size, and the content digest where verification
    /// checked content digests).
    pub fn extract(&self, role: &str) -> Result<Option<std::borrow::Cow<'_, [u8]>>, BundleError> {
        let Some(i) = self.manifest.artifacts.iter().position(|a| a.role == role) else {
            return Ok(None);
        };
        if let Some(c) = self.contents[i].as_deref() {
            return Ok(Some(std::borrow::Cow::Borrowed(c)));
        }
        match &self.on_demand[i] {
            Some(stored) => decode(stored, &self.manifest.artifacts[i], self.content_digest)
                .map(|c| Some(std::borrow::Cow::Owned(c))),
            None => Ok(None),
        }
    }

    /// Artifacts with this role and their contents (those decompressed).
    pub fn all(&self, role: &'static str) -> impl Iterator<Item = (&Artifact, &[u8])> {
        self.manifest
            .artifacts
            .iter()
            .zip(&self.contents)
            .filter(move |(a, _)| a.role == role)
            .filter_map(|(a, c)| Some((a, c.as_deref()?)))
    }

    /// The golden examples.
    pub fn golden(&self) -> Result<Vec<GoldenExample>, BundleError> {
        match self.content(role::GOLDEN) {
            None => Ok(Vec::new()),
            Some(bytes) => from_cbor(bytes).map_err(BundleError::BadManifest),
        }
    }

    /// The drift baseline, if the bundle has one.
    pub fn baseline(&self) -> Result<Option<ferry_drift::Baseline>, BundleError> {
        self.content(role::DRIFT_BASELINE)
            .map(|b| from_cbor(b).map_err(BundleError::BadManifest))
            .transpose()
    }
}

/// Verifies a bundle completely (signatures, sizes, digests) and returns its
/// decompressed contents.
pub fn verify(
    bytes: &[u8],
    trust: &TrustPolicy,
    limits: &ReadLimits,
) -> Result<VerifiedBundle, BundleError> {
    let framing = parse_framing(bytes)?;
    let signed_by = check_signatures(&framing, trust)?;
    let all = |_: &Manifest, _: &Artifact| Extract::Now;
    open_checked(
        bytes,
        &framing,
        signed_by,
        limits,
        &all,
        ContentDigest::Check,
    )
}

/// What a reader does with one artifact beyond checking its stored bytes
/// against the signed manifest (which every reader does to every artifact).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extract {
    /// Decompress it during verification.
    Now,
    /// Keep its checked stored bytes; [`VerifiedBundle::extract`]
    /// decompresses them if it is ever needed (a fallback).
    OnDemand,
    /// Never decompress or hand it out (a guest for another machine).
    CheckOnly,
}

/// What a runtime runs: [`verify`], decompressing each artifact as `select`
/// says (a runtime leaves out guests precompiled for other machines, and
/// the portable guest while a precompiled one may load), and trusting zstd
/// for the content of what it decompresses. Every artifact's stored bytes
/// are still checked against the signed manifest's digest before zstd sees
/// them, so a bundle with any byte changed is refused whether or not this
/// reader would use that artifact, and the content is what the signer's
/// packer wrote; the content digests are left to [`verify`] (which `ferry
/// pack`, `ferry verify` and `ferry publish` run). Artifacts not
/// decompressed are not handed out by [`VerifiedBundle::content`] and
/// [`VerifiedBundle::precompiled_guests`].
pub fn verify_selected(
    bytes: &[u8],
    trust: &TrustPolicy,
    limits: &ReadLimits,
    select: &(dyn Fn(&Manifest, &Artifact) -> Extract + Sync),
) -> Result<VerifiedBundle, BundleError> {
    let framing = parse_framing(bytes)?;
    let signed_by = check_signatures(&framing, trust)?;
    open_checked(
        bytes,
        &framing,
        signed_by,
        limits,
        select,
        ContentDigest::FromStored,
    )
}

/// Threads verifying one bundle at most (the file's digest and the
/// artifacts share them); fewer when the machine has fewer CPUs.
pub const MAX_VERIFY_THREADS: usize = 4;

/// One piece of a bundle's verification.
#[derive(Clone, Copy)]
enum Task {
    /// SHA-256 of the whole file (its identity for downloads).
    FileDigest,
    /// An artifact's stored digest, then what [`Extract`] says.
    Artifact(usize, Extract),
}

/// What a task produced.
enum Done {
    FileDigest(String),
    /// The content (`Extract::Now`), or the stored bytes (`OnDemand`).
    Artifact(Option<Vec<u8>>),
}

/// The steps after the signatures: manifest, sizes, runtime version, then
/// the file's digest and every artifact's digests and bounded decompression,
/// spread over up to [`MAX_VERIFY_THREADS`] threads (largest work first).
/// Errors are reported in manifest order, whichever thread found them.
fn open_checked(
    bytes: &[u8],
    framing: &Framing<'_>,
    signed_by: Vec<KeyId>,
    limits: &ReadLimits,
    select: &(dyn Fn(&Manifest, &Artifact) -> Extract + Sync),
    content_digest: ContentDigest,
) -> Result<VerifiedBundle, BundleError> {
    let manifest = parse_manifest(framing, limits)?;
    check_runtime_version(&manifest.min_runtime)?;
    let extracts: Vec<Extract> = manifest
        .artifacts
        .iter()
        .map(|a| select(&manifest, a))
        .collect();
    let mut tasks = vec![(bytes.len() as u64 / 2, Task::FileDigest)];
    for (i, (a, &extract)) in manifest.artifacts.iter().zip(&extracts).enumerate() {
        // Rough cost: hashing is cheaper per byte than decompressing.
        let cost = a.compressed_size / 2
            + match extract {
                Extract::Now => a.size,
                Extract::OnDemand | Extract::CheckOnly => 0,
            };
        tasks.push((cost, Task::Artifact(i, extract)));
    }
    tasks.sort_by_key(|(cost, _)| std::cmp::Reverse(*cost));
    let run = |task: Task| -> Result<Done, BundleError> {
        match task {
            Task::FileDigest => Ok(Done::FileDigest(sha256_hex(bytes))),
            Task::Artifact(i, extract) => {
                let a = &manifest.artifacts[i];
                let stored = check_stored(framing, a)?;
                Ok(Done::Artifact(match extract {
                    Extract::Now => Some(decode(stored, a, content_digest)?),
                    Extract::OnDemand => Some(stored.to_vec()),
                    Extract::CheckOnly => None,
                }))
            }
        }
    };
    let results: Vec<(Task, Result<Done, BundleError>)> =
        parallel_map(&tasks, MAX_VERIFY_THREADS, |&(_, task)| (task, run(task)));
    let mut digest = String::new();
    let mut held: Vec<Option<Result<Option<Vec<u8>>, BundleError>>> =
        (0..manifest.artifacts.len()).map(|_| None).collect();
    for (task, result) in results {
        match (task, result) {
            (Task::FileDigest, Ok(Done::FileDigest(d))) => digest = d,
            (Task::Artifact(i, _), Ok(Done::Artifact(c))) => held[i] = Some(Ok(c)),
            (Task::Artifact(i, _), Err(e)) => held[i] = Some(Err(e)),
            (_, r) => unreachable!("a task's result matches it: {}", r.is_ok()),
        }
    }
    let mut contents = Vec::with_capacity(held.len());
    let mut on_demand = Vec::with_capacity(held.len());
    for (h, extract) in held.into_iter().zip(extracts) {
        let bytes = h.expect("every artifact was checked")?;
        let (content, stored) = match extract {
            Extract::Now => (bytes, None),
            Extract::OnDemand | Extract::CheckOnly => (None, bytes),
        };
        contents.push(content);
        on_demand.push(stored);
    }
    Ok(VerifiedBundle {
        digest,
        release_id: release_id(framing),
        signed_by,
        manifest,
        contents,
        on_demand,
        content_digest,
    })
}

/// Checks a bundle's framing, sizes and digests but *not* its signatures:
/// integrity without authenticity. For local analysis tools only (`ferry
/// drift` without `--pub`); never for running a model from an untrusted source.
pub fn verify_integrity_only(
    bytes: &[u8],
    limits: &ReadLimits,
) -> Result<VerifiedBundle, BundleError> {
    let framing = parse_framing(bytes)?;
    let all = |_: &Manifest, _: &Artifact| Extract::Now;
    open_checked(
        bytes,
        &framing,
        Vec::new(),
        limits,
        &all,
        ContentDigest::Check,
    )
}

/// Reads the manifest of a bundle *without* checking signatures, for
/// inspection tools. Framing and sizes are still checked.
pub fn inspect_unverified(
    bytes: &[u8],
    limits: &ReadLimits,
) -> Result<(Manifest, Vec<KeyId>), BundleError> {
    let framing = parse_framing(bytes)?;
    let manifest = parse_manifest(&framing, limits)?;
    Ok((
        manifest,
        framing.signatures.iter().map(|(id, _)| *id).collect(),
    ))
}

/// This runtime's version.
pub const RUNTIME_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `MAJOR[.MINOR[.PATCH]]` in decimal, missing parts 0 (the rule written in
/// `docs/bundle-format.md`). Anything else, a pre-release or build suffix
/// included, is not a version.
fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let parts: Vec<&str> = v.split('.').collect();
    if parts.len() > 3 {
        return None;
    }
    let mut numbers = [0u64; 3];
    for (slot, part) in numbers.iter_mut().zip(&parts) {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = part.parse().ok()?;
    }
    Some((numbers[0], numbers[1], numbers[2]))
}

fn check_runtime_version(required: &str) -> Result<(), BundleError> {
    let need = parse_version(required).ok_or_else(|| {
        BundleError::BadManifest(format!("min_runtime `{required}` is not a version"))
    })?;
    let core = RUNTIME_VERSION.split(['-', '+']).next().unwrap_or_default();
    let have = parse_version(core).expect("the crate version is MAJOR.MINOR.PATCH");
    if need > have {
        return Err(BundleError::RuntimeTooOld {
            required: required.to_string(),
            current: RUNTIME_VERSION.to_string(),
        });
    }
    Ok(())
}

/// Free-form training metadata as the JSON text stored in [`Lineage`].
pub fn lineage_training(map: &BTreeMap<String, serde_json::Value>) -> Option<String> {
    (!map.is_empty()).then(|| serde_json::to_string(map).expect("JSON values serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Content that compresses a little, like weights or machine code.
    fn content(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_u32;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 3 == 0 {
                    (x >> 24) as u8
                } else {
                    (i / 7) as u8
                }
            })
            .collect()
    }

    fn artifact_for(c: &[u8], encoding: Encoding, stored: &[u8]) -> Artifact {
        Artifact {
            role: role::MODEL.into(),
            media_type: "application/onnx".into(),
            encoding,
            offset: 0,
            size: c.len() as u64,
            compressed_size: stored.len() as u64,
            sha256: sha256_hex(c),
            compressed_sha256: sha256_hex(stored),
            target: None,
        }
    }

    /// A large artifact is stored as frames of equal size; the reader
    /// decodes them in parallel to the same content, with and without
    /// shuffling; the streaming decoder (every older reader) decodes the
    /// same stream; small artifacts stay one frame, byte for byte what a
    /// plain zstd call writes.
    #[test]
    fn large_artifacts_are_frames_any_reader_decodes() {
        for len in [2 * FRAME_BYTES, 5 * FRAME_BYTES + 3, 40 * FRAME_BYTES] {
            let c = content(len);
            let stored = zstd_frames(&c, 3);
            let frames = frames_of(&stored).expect("several frames");
            assert_eq!(
                frames.len(),
                (len / FRAME_BYTES).clamp(1, MAX_FRAMES),
                "{len}"
            );
            assert_eq!(frames.iter().map(|(_, n)| n).sum::<usize>(), len);
            for (encoding, stored) in [
                (Encoding::Zstd, stored.clone()),
                (Encoding::Shuffle4Zstd, zstd_frames(&shuffle4(&c), 3)),
            ] {
                let a = artifact_for(&c, encoding, &stored);
                assert_eq!(
                    decode(&stored, &a, ContentDigest::Check).unwrap(),
                    c,
                    "{len}"
                );
                let streamed = decompress_bounded(&stored, &a).unwrap();
                let streamed = match encoding {
                    Encoding::Shuffle4Zstd => unshuffle4(&streamed),
                    Encoding::Zstd => streamed,
                };
                assert_eq!(streamed, c, "{len}");
            }
        }
        let small = content(FRAME_BYTES + 5);
        assert_eq!(
            zstd_frames(&small, 3),
            zstd::bulk::compress(&small, 3).unwrap()
        );
        assert!(frames_of(&zstd_frames(&small, 3)).is_none());
    }

    /// Frames whose declared sizes do not add up to the signed size, or a
    /// frame that holds more than its header says, are not decoded in
    /// parallel: the one-call and streaming paths judge them, with the
    /// usual errors.
    #[test]
    fn frames_that_disagree_with_the_manifest_are_refused() {
        let c = content(3 * FRAME_BYTES);
        let stored = zstd_frames(&c, 3);
        let mut a = artifact_for(&c, Encoding::Zstd, &stored);
        a.size -= 1;
        let err = decode(&stored, &a, ContentDigest::FromStored).unwrap_err();
        assert_eq!(err.code(), "size_mismatch", "{err}");
        a.size += 2;
        let err = decode(&stored, &a, ContentDigest::FromStored).unwrap_err();
        assert_eq!(err.code(), "size_mismatch", "{err}");
        // A frame claiming less content than it holds (its header rewritten:
        // the last frame's 4-byte content size field lowered by one).
        let frames = frames_of(&stored).unwrap();
        let (last, size) = *frames.last().unwrap();
        let at = stored.len() - last.len();
        let mut forged = stored.clone();
        // Frame header: magic (4), descriptor (1), window descriptor (1,
        // unless single-segment), dictionary id (none here), content size.
        let descriptor = forged[at + 4];
        assert_eq!(
            (descriptor >> 6, descriptor & 3),
            (2, 0),
            "a 4-byte content size, no dictionary"
        );
        let fcs_at = at + 5 + usize::from(descriptor & 0x20 == 0);
        let field = &mut forged[fcs_at..fcs_at + 4];
        let fcs = u32::from_le_bytes(field.try_into().unwrap());
        assert_eq!(fcs as usize, size);
        field.copy_from_slice(&(fcs - 1).to_le_bytes());
        let a = artifact_for(&c, Encoding::Zstd, &forged);
        assert!(decompress_frames(&frames_of(&forged).unwrap(), c.len() - 1).is_none());
        assert!(decode(&forged, &a, ContentDigest::FromStored).is_err());
    }

    #[test]
    fn shuffle_round_trips_every_length() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            assert_eq!(unshuffle4(&shuffle4(&data)), data, "len {len}");
        }
    }

    #[test]
    fn versions_compare() {
        assert!(check_runtime_version("0.0.1").is_ok());
        assert!(check_runtime_version(RUNTIME_VERSION).is_ok());
        assert!(matches!(
            check_runtime_version("99.0"),
            Err(BundleError::RuntimeTooOld { .. })
        ));
        assert!(matches!(
            check_runtime_version("x"),
            Err(BundleError::BadManifest(_))
        ));
    }

    #[test]
    fn min_runtime_is_major_minor_patch_in_decimal_as_documented() {
        // docs/bundle-format.md: `MAJOR[.MINOR[.PATCH]]`, missing parts 0;
        // a pre-release or build suffix does not parse (`bad_manifest`).
        assert!(check_runtime_version("0").is_ok());
        assert!(check_runtime_version("0.1").is_ok());
        for bad in [
            "0.1.0-beta.1",
            "0.0.1+abc",
            "0.1.0.0",
            "0..1",
            "",
            " ",
            "-1",
            "0.1.x",
        ] {
            let e = check_runtime_version(bad).unwrap_err();
            assert_eq!(e.code(), "bad_manifest", "{bad:?}: {e}");
        }
    }
}
