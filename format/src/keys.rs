//! Signing keys, public keys, key ids and the trust policy.
//!
//! Private keys are ed25519 in PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`);
//! public keys are SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`),
//! the forms OpenSSL and most KMSes read and write. A *key id* is the first
//! 8 bytes of the SHA-256 of the raw 32-byte public key, shown in hex.

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::spki::{DecodePublicKey, EncodePublicKey};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::KeyError;

/// Length of a key id in bytes.
pub const KEY_ID_LEN: usize = 8;

/// Identifies a public key inside a bundle's signature block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// The id of a public key.
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        KeyId(id)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A private signing key.
pub struct SecretKey(SigningKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.key_id())
    }
}

impl SecretKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Result<SecretKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    /// Parses a PKCS#8 PEM private key.
    pub fn from_pem(pem: &str) -> Result<SecretKey, KeyError> {
        SigningKey::from_pkcs8_pem(pem.trim())
            .map(SecretKey)
            .map_err(|e| KeyError::BadPrivateKey(e.to_string()))
    }

    /// The key as PKCS#8 v1 PEM (RFC 8410: the seed only, no public key
    /// field), the form OpenSSL writes and reads (`openssl pkey`); v2 keys
    /// (with the public key, as older Ferry versions wrote) still parse.
    pub fn to_pem(&self) -> String {
        let v1 = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.0.to_bytes(),
            public_key: None,
        };
        v1.to_pkcs8_pem(LineEnding::LF)
            .expect("ed25519 keys always encode")
            .to_string()
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The id of the matching public key.
    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.0.verifying_key())
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// Signs a message that is not a bundle (an operator command). The
    /// caller's message must start with its own context string, distinct from
    /// the bundle's [`SIGNING_CONTEXT`](crate::SIGNING_CONTEXT), so a signature
    /// can never be replayed as another kind of object.
    pub fn sign_detached(&self, message: &[u8]) -> [u8; 64] {
        assert!(
            !message.starts_with(crate::bundle::SIGNING_CONTEXT),
            "detached signatures must not use the bundle signing context"
        );
        self.sign(message)
    }
}

/// A public key a bundle may be signed with.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(pub(crate) VerifyingKey);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo PEM public key.
    pub fn from_pem(pem: &str) -> Result<PublicKey, KeyError> {
        VerifyingKey::from_public_key_pem(pem.trim())
            .map(PublicKey)
            .map_err(|e| KeyError::BadPublicKey(e.to_string()))
    }

    /// The key as SubjectPublicKeyInfo PEM.
    pub fn to_pem(&self) -> String {
        self.0
            .to_public_key_pem(LineEnding::LF)
            .expect("ed25519 keys always encode")
    }

    /// Parses every PEM public key in a text (a key file may hold several).
    pub fn all_from_pem(text: &str) -> Result<Vec<PublicKey>, KeyError> {
        const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
        const END: &str = "-----END PUBLIC KEY-----";
        let mut keys = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find(BEGIN) {
            let after = &rest[start..];
            let end = after
                .find(END)
                .ok_or_else(|| KeyError::BadPublicKey("PEM block is not terminated".into()))?;
            keys.push(PublicKey::from_pem(&after[..end + END.len()])?);
            rest = &after[end + END.len()..];
        }
        if keys.is_empty() {
            return Err(KeyError::BadPublicKey(format!("no `{BEGIN}` block found")));
        }
        Ok(keys)
    }

    /// This key's id.
    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.0)
    }
}

/// One role of a [`TrustPolicy`]: its keys and how many of them must sign.
#[derive(Debug, Clone)]
pub struct RolePolicy {
    name: String,
    keys: Vec<PublicKey>,
    threshold: usize,
}

impl RolePolicy {
    /// A role named `name` (for messages: `builder`, `approver`, `operator`...)
    /// requiring `threshold` valid signatures by distinct keys of `keys`.
    pub fn new(
        name: impl Into<String>,
        mut keys: Vec<PublicKey>,
        threshold: usize,
    ) -> Result<RolePolicy, KeyError> {
        keys.sort_by_key(|k| k.key_id());
        keys.dedup_by_key(|k| k.key_id());
        if keys.is_empty() {
            return Err(KeyError::NoTrustedKeys);
        }
        if threshold == 0 || threshold > keys.len() {
            return Err(KeyError::BadThreshold {
                threshold,
                keys: keys.len(),
            });
        }
        Ok(RolePolicy {
            name: name.into(),
            keys,
            threshold,
        })
    }

    /// The role's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The role's keys, sorted by key id.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Valid signatures by distinct keys of this role that are required.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    fn holds(&self, id: &KeyId) -> bool {
        self.keys.iter().any(|k| &k.key_id() == id)
    }
}

/// Which signatures a reader accepts: for *every* role of the policy, at
/// least its threshold of valid signatures by distinct keys of that role.
/// A key belongs to at most one role of a policy, so one signature never
/// counts twice (a release that needs a builder and an approver needs two
/// people).
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    roles: Vec<RolePolicy>,
}

impl TrustPolicy {
    /// Trust these keys; one valid signature by any of them suffices.
    pub fn new(keys: Vec<PublicKey>) -> Result<TrustPolicy, KeyError> {
        TrustPolicy::with_threshold(keys, 1)
    }

    /// Trust these keys, requiring `threshold` valid signatures by distinct ones
    /// (one role, named `release`).
    pub fn with_threshold(keys: Vec<PublicKey>, threshold: usize) -> Result<TrustPolicy, KeyError> {
        TrustPolicy::all_of(vec![RolePolicy::new("release", keys, threshold)?])
    }

    /// Requires every role's threshold. Refuses a key that is in two roles.
    pub fn all_of(roles: Vec<RolePolicy>) -> Result<TrustPolicy, KeyError> {
        if roles.is_empty() {
            return Err(KeyError::NoTrustedKeys);
        }
        for (i, a) in roles.iter().enumerate() {
            for b in &roles[i + 1..] {
                if let Some(shared) = a.keys.iter().find(|k| b.holds(&k.key_id())) {
                    return Err(KeyError::SharedKey {
                        key: shared.key_id(),
                        first: a.name.clone(),
                        second: b.name.clone(),
                    });
                }
            }
        }
        Ok(TrustPolicy { roles })
    }

    /// The roles, each of which must be satisfied.
    pub fn roles(&self) -> &[RolePolicy] {
        &self.roles
    }

    /// Every trusted key, of every role.
    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.roles.iter().flat_map(|r| r.keys.iter())
    }

    pub(crate) fn find(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys().find(|k| &k.key_id() == id)
    }

    fn find_hex(&self, key_id: &str) -> Option<&PublicKey> {
        self.keys()
            .find(|k| k.key_id().to_string().eq_ignore_ascii_case(key_id.trim()))
    }

    /// Checks that distinct valid signers `valid` meet every role's
    /// threshold; the first role that falls short is the error.
    pub fn check_threshold(&self, valid: &[KeyId]) -> Result<(), Shortfall> {
        for role in &self.roles {
            let mut by_role: Vec<&KeyId> = valid.iter().filter(|id| role.holds(id)).collect();
            by_role.sort();
            by_role.dedup();
            if by_role.len() < role.threshold {
                return Err(Shortfall {
                    role: role.name.clone(),
                    valid: by_role.len(),
                    required: role.threshold,
                });
            }
        }
        Ok(())
    }

    /// Checks a detached signature (see [`SecretKey::sign_detached`]) by the
    /// trusted key whose id prints as `key_id` (hex). Returns that key's id.
    /// One signature: thresholds are [`TrustPolicy::verify_detached_all`]'s.
    pub fn verify_detached(
        &self,
        key_id: &str,
        message: &[u8],
        signature: &[u8],
    ) -> Result<KeyId, KeyError> {
        let key = self
            .find_hex(key_id)
            .ok_or_else(|| KeyError::BadSignature(format!("key {key_id} is not trusted")))?;
        let signature = ed25519_dalek::Signature::from_slice(signature)
            .map_err(|e| KeyError::BadSignature(e.to_string()))?;
        key.0.verify_strict(message, &signature).map_err(|_| {
            KeyError::BadSignature(format!("signature by {key_id} does not verify"))
        })?;
        Ok(key.key_id())
    }

    /// Checks detached signatures `(key id in hex, signature)` over one
    /// message against the whole policy: signatures by keys the policy does
    /// not hold are skipped, a signature by a trusted key that does not
    /// verify is an error (the message was altered), and every role's
    /// threshold must be met. Returns the distinct keys that verified.
    pub fn verify_detached_all(
        &self,
        message: &[u8],
        signatures: &[(&str, &[u8])],
    ) -> Result<Vec<KeyId>, KeyError> {
        let mut valid = Vec::new();
        for (key_id, signature) in signatures {
            if self.find_hex(key_id).is_none() {
                continue;
            }
            let id = self.verify_detached(key_id, message, signature)?;
            if !valid.contains(&id) {
                valid.push(id);
            }
        }
        self.check_threshold(&valid)
            .map_err(|s| KeyError::BadSignature(s.to_string()))?;
        Ok(valid)
    }
}

/// A role whose threshold was not met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub role: String,
    pub valid: usize,
    pub required: usize,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} valid signature(s) by {} keys, {} required",
            self.valid, self.role, self.required
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_written_as_pkcs8_v1_and_both_versions_read_back() {
        let key = SecretKey::generate().unwrap();
        let pem = key.to_pem();
        // PKCS#8 v1 of an ed25519 key (RFC 8410) is 48 bytes of DER:
        // version 0, the algorithm, the 32-byte seed; v2 adds the public key.
        let der = pem_body(&pem);
        assert_eq!(der.len(), 48, "{pem}");
        assert_eq!(&der[2..5], &[0x02, 0x01, 0x00], "version 0 (v1)");
        let back = SecretKey::from_pem(&pem).unwrap();
        assert_eq!(back.key_id(), key.key_id());
        // The v2 form older Ferry versions wrote still parses.
        let v2 = key.0.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
        assert!(pem_body(&v2).len() > 48);
        assert_eq!(SecretKey::from_pem(&v2).unwrap().key_id(), key.key_id());
    }

    fn pem_body(pem: &str) -> Vec<u8> {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        decode_base64(&b64)
    }

    fn decode_base64(s: &str) -> Vec<u8> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let mut acc = 0u32;
        let mut bits = 0;
        for c in s.bytes().filter(|c| *c != b'=') {
            let v = ALPHABET.iter().position(|a| *a == c).unwrap() as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }
}
