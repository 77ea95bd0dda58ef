//! ferry-format: the bundle format and the keys that sign it. Bytes in,
//! typed values or typed errors out: no file or network I/O, no WASM engine,
//! no model engine. Everything that must read a bundle's bytes (the runtime,
//! the agent's bundle store, the console, the CLI) reads them through this
//! crate.
//!
//! # Layout
//! - `bundle`: the bundle format v1: [`Header`] (the first bytes of a
//!   file), framing, [`verify`] (signatures, sizes, digests, bounded
//!   decompression), [`write_bundle`], the [`Manifest`], and the
//!   [`PrecompiledGuest`] token that only a signed [`VerifiedBundle`] hands
//!   out.
//! - `keys`: ed25519 keys in PEM, key ids, the [`TrustPolicy`] (keys and a
//!   threshold), detached signatures for operator commands.
//! - `envelope`: signed metadata in a DSSE [`Envelope`] (roots, channel
//!   metadata): exact bytes, a type, signatures checked against a policy.
//! - `root`: the [`Root`] of trust: keys and thresholds per role (root,
//!   builder, approver, operator, channel), rotation by version.
//! - `error`: [`BundleError`], [`KeyError`] and [`MetadataError`], each
//!   variant with a stable `code()`.
//!
//! # Invariants
//! - Nothing in a bundle is decompressed or parsed past its manifest before
//!   its signatures and declared sizes are checked (the order is written at
//!   the top of `bundle.rs`).
//! - Precompiled guest code (native code) leaves this crate only as a
//!   [`PrecompiledGuest`], which only [`VerifiedBundle::precompiled_guests`]
//!   makes, and only for a bundle whose signatures verified.

#![forbid(unsafe_code)]

mod bundle;
mod envelope;
mod error;
mod keys;
mod root;

pub use bundle::{
    Artifact, ArtifactInput, Encoding, EngineReport, EngineSupport, Extract, FORMAT_VERSION,
    Framing, GoldenExample, GuestLimits, HEADER_LEN, Header, Lineage, MAGIC, MAX_ARTIFACTS,
    MAX_MANIFEST_LEN, MAX_SIGNATURES, MAX_UPFRONT_RESERVE, MAX_VERIFY_THREADS, Manifest, ModelInfo,
    Pipeline, PrecompiledGuest, RUNTIME_VERSION, ReadLimits, Release, SIGNATURE_ENTRY_LEN,
    SIGNING_CONTEXT, TensorSpec, VerifiedBundle, add_signatures, check_signatures, compress,
    extract_artifact, frame, from_cbor, inspect_unverified, lineage_training, manifest_unverified,
    parse_framing, parse_manifest, release_id, release_id_of, role, shuffle4, to_cbor, unshuffle4,
    verify, verify_integrity_only, verify_selected, write_bundle,
};
pub use envelope::{Envelope, EnvelopeSignature, MAX_ENVELOPE_BYTES, MAX_ENVELOPE_SIGNATURES};
pub use error::{BundleError, KeyError, MetadataError};
pub use keys::{KEY_ID_LEN, KeyId, PublicKey, RolePolicy, SecretKey, Shortfall, TrustPolicy};
pub use root::{
    ROOT_PAYLOAD_TYPE, ROOT_SCHEMA, RoleSpec, Root, RootDocument, parse_document, roles,
};
