//! Signed metadata (the root of trust, channel metadata) in a DSSE envelope
//! (<https://github.com/secure-systems-lab/dsse>, the form in-toto and
//! Sigstore use):
//!
//! ```json
//! {"payloadType": "application/vnd.ferry.root+json",
//!  "payload": "<base64 of the JSON document>",
//!  "signatures": [{"keyid": "<key id hex>", "sig": "<base64 ed25519>"}]}
//! ```
//!
//! Each signature covers `PAE(payloadType, payload)` =
//! `"DSSEv1" SP len(type) SP type SP len(body) SP body` (lengths in ASCII
//! decimal): the exact payload bytes, so no canonical JSON is needed, and the
//! type, so a channel signature can never pass for a root signature. The
//! prefix `DSSEv1` differs from the bundle's and the command's signing
//! contexts: no signature of one kind verifies as another.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::error::MetadataError;
use crate::keys::{KeyId, SecretKey, TrustPolicy};

/// Largest envelope a reader parses (bytes of JSON).
pub const MAX_ENVELOPE_BYTES: usize = 256 * 1024;
/// Most signatures an envelope may carry.
pub const MAX_ENVELOPE_SIGNATURES: usize = 32;

/// One signature of an [`Envelope`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// Key id in hex.
    pub keyid: String,
    /// Base64 of the 64-byte ed25519 signature over the PAE.
    pub sig: String,
}

/// A signed document: its type, its exact bytes and signatures over both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Base64 of the document's bytes.
    pub payload: String,
    pub signatures: Vec<EnvelopeSignature>,
}

impl Envelope {
    /// An unsigned envelope around `payload`.
    pub fn new(payload_type: &str, payload: &[u8]) -> Envelope {
        Envelope {
            payload_type: payload_type.to_string(),
            payload: B64.encode(payload),
            signatures: Vec::new(),
        }
    }

    /// Parses an envelope from JSON, bounded in size and signatures.
    pub fn from_json(bytes: &[u8]) -> Result<Envelope, MetadataError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(MetadataError::Malformed(format!(
                "{} bytes, at most {MAX_ENVELOPE_BYTES}",
                bytes.len()
            )));
        }
        let envelope: Envelope = serde_json::from_slice(bytes)
            .map_err(|e| MetadataError::Malformed(format!("not a signed envelope: {e}")))?;
        if envelope.signatures.len() > MAX_ENVELOPE_SIGNATURES {
            return Err(MetadataError::Malformed(format!(
                "{} signatures, at most {MAX_ENVELOPE_SIGNATURES}",
                envelope.signatures.len()
            )));
        }
        Ok(envelope)
    }

    /// The envelope as pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("envelopes serialise");
        out.push(b'\n');
        out
    }

    /// The document's bytes, *not* verified: for display and for finding
    /// which policy verifies it (a root names its own keys).
    pub fn payload_unverified(&self) -> Result<Vec<u8>, MetadataError> {
        B64.decode(self.payload.trim())
            .map_err(|e| MetadataError::Malformed(format!("payload is not base64: {e}")))
    }

    /// Adds (or replaces) `key`'s signature.
    pub fn sign(&mut self, key: &SecretKey) -> Result<(), MetadataError> {
        let body = self.payload_unverified()?;
        let sig = key.sign(&pae(&self.payload_type, &body));
        let keyid = key.key_id().to_string();
        self.signatures.retain(|s| s.keyid != keyid);
        self.signatures.push(EnvelopeSignature {
            keyid,
            sig: B64.encode(sig),
        });
        Ok(())
    }

    /// Checks the type and the signatures against `trust` (every role's
    /// threshold); returns the document's bytes and who signed.
    pub fn verify(
        &self,
        payload_type: &str,
        trust: &TrustPolicy,
    ) -> Result<(Vec<u8>, Vec<KeyId>), MetadataError> {
        if self.payload_type != payload_type {
            return Err(MetadataError::WrongType {
                expected: payload_type.to_string(),
                found: self.payload_type.chars().take(100).collect(),
            });
        }
        let body = self.payload_unverified()?;
        let message = pae(&self.payload_type, &body);
        let decoded: Vec<(String, Vec<u8>)> = self
            .signatures
            .iter()
            .map(|s| {
                B64.decode(s.sig.trim())
                    .map(|b| (s.keyid.clone(), b))
                    .map_err(|e| MetadataError::Malformed(format!("signature is not base64: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let pairs: Vec<(&str, &[u8])> = decoded
            .iter()
            .map(|(id, sig)| (id.as_str(), sig.as_slice()))
            .collect();
        let signed_by = trust
            .verify_detached_all(&message, &pairs)
            .map_err(MetadataError::Signature)?;
        Ok((body, signed_by))
    }
}

/// DSSE's pre-authentication encoding.
fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_specification() {
        // The example of the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn envelopes_verify_only_with_their_type_keys_and_bytes() {
        let a = SecretKey::generate().unwrap();
        let b = SecretKey::generate().unwrap();
        let trust = TrustPolicy::with_threshold(vec![a.public(), b.public()], 2).unwrap();
        let mut e = Envelope::new("t", b"{\"x\":1}");
        e.sign(&a).unwrap();
        let err = e.verify("t", &trust).unwrap_err();
        assert_eq!(err.code(), "metadata_signature", "{err}");
        e.sign(&b).unwrap();
        // Signing twice with one key replaces, never double counts.
        e.sign(&b).unwrap();
        assert_eq!(e.signatures.len(), 2);
        let (body, by) = e.verify("t", &trust).unwrap();
        assert_eq!(body, b"{\"x\":1}");
        assert_eq!(by.len(), 2);
        assert_eq!(e.verify("u", &trust).unwrap_err().code(), "wrong_type");
        let mut changed = e.clone();
        changed.payload = B64.encode(b"{\"x\":2}");
        assert_eq!(
            changed.verify("t", &trust).unwrap_err().code(),
            "metadata_signature"
        );
        let mut retyped = e.clone();
        retyped.payload_type = "u".into();
        assert_eq!(
            retyped.verify("u", &trust).unwrap_err().code(),
            "metadata_signature"
        );
        let back = Envelope::from_json(&e.to_json()).unwrap();
        assert_eq!(back, e);
    }
}
