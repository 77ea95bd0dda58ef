//! The root of trust: which keys may sign what, with thresholds, and how the
//! root itself is replaced (TUF's root role, for a device that pulls).
//!
//! A root is a JSON document in a signed [`Envelope`] of type
//! [`ROOT_PAYLOAD_TYPE`]:
//!
//! ```json
//! {"schema": 1, "version": 1,
//!  "keys": {"<key id>": "-----BEGIN PUBLIC KEY-----...", ...},
//!  "roles": {
//!    "root":     {"keys": ["<id>", ...], "threshold": 2},
//!    "builder":  {"keys": ["<id>"], "threshold": 1},
//!    "approver": {"keys": ["<id>", "<id>"], "threshold": 1},
//!    "operator": {"keys": ["<id>"], "threshold": 1},
//!    "channel":  {"keys": ["<id>"], "threshold": 1}}}
//! ```
//!
//! - `root` signs roots; `builder` (CI's `ferry pack`) and, when present,
//!   `approver` (a second person, `ferry approve`) sign releases: a bundle
//!   needs both thresholds, and no key may be in both roles; `operator`
//!   signs commands; `channel` (an online key) signs channel metadata, and
//!   when the role is absent the device accepts unsigned channel indexes
//!   (documented as weaker).
//! - A device starts from a root installed at provisioning, self-signed by
//!   its own root threshold ([`Root::from_envelope`]). Version `n + 1`
//!   replaces version `n` only if signed by the threshold of `n`'s root role
//!   *and* of its own ([`Root::update`]), so a rotation needs the old keys
//!   and proves the new ones; a device offline through several rotations
//!   applies them in order.
//! - Unknown fields and unknown roles are refused: a root is a security
//!   policy, and an older agent must not silently drop a constraint a newer
//!   one would enforce.
//! - [`Root::legacy`] derives a root from an agent's `trusted_keys` and
//!   `key_threshold` (version 0): those keys sign releases, commands and roots,
//!   as before roots existed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::error::MetadataError;
use crate::keys::{PublicKey, RolePolicy, TrustPolicy};

/// The envelope type of a root.
pub const ROOT_PAYLOAD_TYPE: &str = "application/vnd.ferry.root+json";
/// The root document's schema.
pub const ROOT_SCHEMA: u32 = 1;

/// Role names a root may define.
pub mod roles {
    pub const ROOT: &str = "root";
    pub const BUILDER: &str = "builder";
    pub const APPROVER: &str = "approver";
    pub const OPERATOR: &str = "operator";
    pub const CHANNEL: &str = "channel";
    /// Every role a root may define.
    pub const ALL: [&str; 5] = [ROOT, BUILDER, APPROVER, OPERATOR, CHANNEL];
    /// Roles every root must define.
    pub const REQUIRED: [&str; 3] = [ROOT, BUILDER, OPERATOR];
}

/// One role in a root document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    /// Key ids (hex), each present in the document's `keys`.
    pub keys: Vec<String>,
    pub threshold: usize,
}

/// The root document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootDocument {
    pub schema: u32,
    /// Starts at 1 and grows by exactly one per rotation.
    pub version: u64,
    /// Key id (hex) → SubjectPublicKeyInfo PEM.
    pub keys: BTreeMap<String, String>,
    pub roles: BTreeMap<String, RoleSpec>,
}

/// A checked root: its document and the policies it defines.
#[derive(Debug, Clone)]
pub struct Root {
    document: RootDocument,
    envelope: Option<Envelope>,
    root: TrustPolicy,
    release: TrustPolicy,
    operator: TrustPolicy,
    channel: Option<TrustPolicy>,
}

impl Root {
    /// Checks a document's consistency (keys parse and match their ids,
    /// required roles present, thresholds possible, builder and approver
    /// disjoint) and builds its policies. Says nothing about signatures.
    pub fn from_document(document: RootDocument) -> Result<Root, MetadataError> {
        let bad = |m: String| MetadataError::BadRoot(m);
        if document.schema != ROOT_SCHEMA {
            return Err(bad(format!(
                "schema {} is not supported (this agent reads {ROOT_SCHEMA})",
                document.schema
            )));
        }
        if document.version == 0 {
            return Err(bad("version must be at least 1".into()));
        }
        let mut keys = BTreeMap::new();
        for (id, pem) in &document.keys {
            let key = PublicKey::from_pem(pem).map_err(|e| bad(format!("key {id}: {e}")))?;
            if !key.key_id().to_string().eq_ignore_ascii_case(id) {
                return Err(bad(format!("key listed as {id} has id {}", key.key_id())));
            }
            keys.insert(id.to_ascii_lowercase(), key);
        }
        for name in document.roles.keys() {
            if !roles::ALL.contains(&name.as_str()) {
                return Err(bad(format!(
                    "unknown role {name:?} (roles: {})",
                    roles::ALL.join(", ")
                )));
            }
        }
        for name in roles::REQUIRED {
            if !document.roles.contains_key(name) {
                return Err(bad(format!("the {name} role is missing")));
            }
        }
        let role = |name: &str| -> Result<Option<RolePolicy>, MetadataError> {
            let Some(spec) = document.roles.get(name) else {
                return Ok(None);
            };
            let members = spec
                .keys
                .iter()
                .map(|id| {
                    keys.get(&id.to_ascii_lowercase())
                        .cloned()
                        .ok_or_else(|| bad(format!("role {name} names unknown key {id}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if members.len() != spec.keys.len()
                || spec
                    .keys
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
                    != spec.keys.len()
            {
                return Err(bad(format!("role {name} lists a key twice")));
            }
            RolePolicy::new(name, members, spec.threshold)
                .map(Some)
                .map_err(|e| bad(format!("role {name}: {e}")))
        };
        let single = |p: Option<RolePolicy>| -> Result<Option<TrustPolicy>, MetadataError> {
            p.map(|p| TrustPolicy::all_of(vec![p]).map_err(|e| bad(e.to_string())))
                .transpose()
        };
        let mut release_roles = vec![role(roles::BUILDER)?.expect("required")];
        release_roles.extend(role(roles::APPROVER)?);
        let release = TrustPolicy::all_of(release_roles).map_err(|e| bad(e.to_string()))?;
        Ok(Root {
            root: single(role(roles::ROOT)?)?.expect("required"),
            operator: single(role(roles::OPERATOR)?)?.expect("required"),
            channel: single(role(roles::CHANNEL)?)?,
            release,
            envelope: None,
            document,
        })
    }

    /// Reads a root from its envelope and checks that it is signed by its
    /// own root threshold: how a device takes the root installed at
    /// provisioning (trusted because it was put there, checked so a damaged
    /// or half-made file is caught).
    pub fn from_envelope(bytes: &[u8]) -> Result<Root, MetadataError> {
        let envelope = Envelope::from_json(bytes)?;
        let mut root = Root::from_document(parse_document(&envelope.payload_unverified()?)?)?;
        envelope.verify(ROOT_PAYLOAD_TYPE, &root.root)?;
        root.envelope = Some(envelope);
        Ok(root)
    }

    /// The next root, `version + 1`, checked against this one: signed by
    /// this root's root threshold and by the new root's own.
    pub fn update(&self, bytes: &[u8]) -> Result<Root, MetadataError> {
        let envelope = Envelope::from_json(bytes)?;
        let document = parse_document(&envelope.payload_unverified()?)?;
        let expected = self.version() + 1;
        if document.version != expected {
            return Err(MetadataError::RootVersion {
                expected,
                found: document.version,
            });
        }
        // The old keys first: a document nobody trusted is not parsed further.
        envelope.verify(ROOT_PAYLOAD_TYPE, &self.root)?;
        let mut next = Root::from_document(document)?;
        envelope.verify(ROOT_PAYLOAD_TYPE, &next.root)?;
        next.envelope = Some(envelope);
        Ok(next)
    }

    /// A root derived from an agent's `trusted_keys` and `key_threshold`
    /// (version 0): those keys build releases, sign commands and roots; no
    /// approver, no channel key.
    pub fn legacy(keys: Vec<PublicKey>, threshold: usize) -> Result<Root, MetadataError> {
        let policy = |name: &str| {
            RolePolicy::new(name, keys.clone(), threshold)
                .and_then(|r| TrustPolicy::all_of(vec![r]))
                .map_err(|e| MetadataError::BadRoot(e.to_string()))
        };
        let spec = RoleSpec {
            keys: keys.iter().map(|k| k.key_id().to_string()).collect(),
            threshold,
        };
        let document = RootDocument {
            schema: ROOT_SCHEMA,
            version: 0,
            keys: keys
                .iter()
                .map(|k| (k.key_id().to_string(), k.to_pem()))
                .collect(),
            roles: [roles::ROOT, roles::BUILDER, roles::OPERATOR]
                .into_iter()
                .map(|r| (r.to_string(), spec.clone()))
                .collect(),
        };
        Ok(Root {
            root: policy(roles::ROOT)?,
            release: policy(roles::BUILDER)?,
            operator: policy(roles::OPERATOR)?,
            channel: None,
            envelope: None,
            document,
        })
    }

    /// The document.
    pub fn document(&self) -> &RootDocument {
        &self.document
    }

    /// The signed envelope this root was read from (`None` for a legacy root).
    pub fn envelope(&self) -> Option<&Envelope> {
        self.envelope.as_ref()
    }

    /// The version (0 for a legacy root).
    pub fn version(&self) -> u64 {
        self.document.version
    }

    /// A root derived from `trusted_keys` rather than read from a file.
    pub fn is_legacy(&self) -> bool {
        self.document.version == 0
    }

    /// Who signs roots.
    pub fn root_policy(&self) -> &TrustPolicy {
        &self.root
    }

    /// Who signs releases (builder, and approver when the role exists).
    pub fn release_policy(&self) -> &TrustPolicy {
        &self.release
    }

    /// Who signs operator commands.
    pub fn operator_policy(&self) -> &TrustPolicy {
        &self.operator
    }

    /// Who signs channel metadata, if anyone.
    pub fn channel_policy(&self) -> Option<&TrustPolicy> {
        self.channel.as_ref()
    }
}

/// Parses a root document's JSON.
pub fn parse_document(bytes: &[u8]) -> Result<RootDocument, MetadataError> {
    serde_json::from_slice(bytes)
        .map_err(|e| MetadataError::BadRoot(format!("not a root document: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    fn key() -> SecretKey {
        SecretKey::generate().unwrap()
    }

    fn document(version: u64, roles: &[(&str, &[&SecretKey], usize)]) -> RootDocument {
        let mut keys = BTreeMap::new();
        let mut specs = BTreeMap::new();
        for (name, members, threshold) in roles {
            for k in *members {
                keys.insert(k.key_id().to_string(), k.public().to_pem());
            }
            specs.insert(
                name.to_string(),
                RoleSpec {
                    keys: members.iter().map(|k| k.key_id().to_string()).collect(),
                    threshold: *threshold,
                },
            );
        }
        RootDocument {
            schema: ROOT_SCHEMA,
            version,
            keys,
            roles: specs,
        }
    }

    fn sealed(doc: &RootDocument, signers: &[&SecretKey]) -> Vec<u8> {
        let mut e = Envelope::new(ROOT_PAYLOAD_TYPE, &serde_json::to_vec(doc).unwrap());
        for k in signers {
            e.sign(k).unwrap();
        }
        e.to_json()
    }

    #[test]
    fn a_rotation_needs_the_old_and_the_new_root_thresholds() {
        let (r1, r2, r3, b, o) = (key(), key(), key(), key(), key());
        let v1 = document(
            1,
            &[
                ("root", &[&r1, &r2], 2),
                ("builder", &[&b], 1),
                ("operator", &[&o], 1),
            ],
        );
        // Below its own threshold: refused even at provisioning.
        let err = Root::from_envelope(&sealed(&v1, &[&r1])).unwrap_err();
        assert_eq!(err.code(), "metadata_signature", "{err}");
        let root1 = Root::from_envelope(&sealed(&v1, &[&r1, &r2])).unwrap();
        // v2 replaces r2 by r3.
        let v2 = document(
            2,
            &[
                ("root", &[&r1, &r3], 2),
                ("builder", &[&b], 1),
                ("operator", &[&o], 1),
            ],
        );
        // The new keys alone (a thief of r3 cannot make itself root).
        let err = root1.update(&sealed(&v2, &[&r1, &r3])).unwrap_err();
        assert_eq!(err.code(), "metadata_signature", "{err}");
        // The old keys alone: the new root does not prove its own keys.
        let err = root1.update(&sealed(&v2, &[&r1, &r2])).unwrap_err();
        assert_eq!(err.code(), "metadata_signature", "{err}");
        let root2 = root1.update(&sealed(&v2, &[&r1, &r2, &r3])).unwrap();
        assert_eq!(root2.version(), 2);
        // Skipping or repeating a version is refused.
        let err = root1
            .update(&sealed(
                &document(
                    3,
                    &[
                        ("root", &[&r1, &r2], 2),
                        ("builder", &[&b], 1),
                        ("operator", &[&o], 1),
                    ],
                ),
                &[&r1, &r2],
            ))
            .unwrap_err();
        assert_eq!(err.code(), "root_version");
        let err = root2.update(&sealed(&v2, &[&r1, &r2, &r3])).unwrap_err();
        assert_eq!(err.code(), "root_version");
    }

    #[test]
    fn a_release_needs_a_builder_and_an_approver_and_no_key_holds_both() {
        let (r, b, a, o) = (key(), key(), key(), key());
        let doc = document(
            1,
            &[
                ("root", &[&r], 1),
                ("builder", &[&b], 1),
                ("approver", &[&a], 1),
                ("operator", &[&o], 1),
            ],
        );
        let root = Root::from_envelope(&sealed(&doc, &[&r])).unwrap();
        let release = root.release_policy();
        assert_eq!(release.roles().len(), 2);
        assert!(release.check_threshold(&[b.key_id()]).is_err());
        assert!(release.check_threshold(&[a.key_id()]).is_err());
        assert!(release.check_threshold(&[b.key_id(), a.key_id()]).is_ok());
        // The operator's key is not a release key, nor the reverse.
        assert!(release.check_threshold(&[o.key_id(), a.key_id()]).is_err());
        assert!(
            root.operator_policy()
                .check_threshold(&[b.key_id()])
                .is_err()
        );

        let shared = document(
            1,
            &[
                ("root", &[&r], 1),
                ("builder", &[&b], 1),
                ("approver", &[&b], 1),
                ("operator", &[&o], 1),
            ],
        );
        let err = Root::from_envelope(&sealed(&shared, &[&r])).unwrap_err();
        assert_eq!(err.code(), "bad_root");
        assert!(err.to_string().contains("both"), "{err}");
    }

    #[test]
    fn malformed_roots_are_refused_with_reasons() {
        let (r, b, o) = (key(), key(), key());
        let good = document(
            1,
            &[
                ("root", &[&r], 1),
                ("builder", &[&b], 1),
                ("operator", &[&o], 1),
            ],
        );
        let mut missing = good.clone();
        missing.roles.remove("operator");
        let mut unknown = good.clone();
        unknown.roles.insert(
            "superuser".into(),
            RoleSpec {
                keys: vec![r.key_id().to_string()],
                threshold: 1,
            },
        );
        let mut threshold = good.clone();
        threshold.roles.get_mut("builder").unwrap().threshold = 2;
        let mut mislabelled = good.clone();
        let pem = mislabelled.keys.remove(&b.key_id().to_string()).unwrap();
        mislabelled.keys.insert(o.key_id().to_string(), pem);
        let mut zero = good.clone();
        zero.version = 0;
        for (what, doc) in [
            ("missing", missing),
            ("unknown", unknown),
            ("threshold", threshold),
            ("mislabelled", mislabelled),
            ("zero", zero),
        ] {
            let err = Root::from_envelope(&sealed(&doc, &[&r])).unwrap_err();
            assert_eq!(err.code(), "bad_root", "{what}: {err}");
        }
        let mut extra = serde_json::to_value(&good).unwrap();
        extra["expires"] = serde_json::json!(1);
        let mut e = Envelope::new(ROOT_PAYLOAD_TYPE, &serde_json::to_vec(&extra).unwrap());
        e.sign(&r).unwrap();
        assert_eq!(
            Root::from_envelope(&e.to_json()).unwrap_err().code(),
            "bad_root"
        );
        assert_eq!(
            Root::from_envelope(b"{not json").unwrap_err().code(),
            "bad_metadata"
        );
    }
}
