//! Who may do what on the console: roles, API tokens (stored hashed) and
//! dashboard sessions. No HTTP here: `http::auth` maps requests to these
//! checks, and the CLI's `token` commands call them on a state directory.
//!
//! # Roles
//! Ordered, each including the ones before it: [`Role::Viewer`] (the
//! dashboard and every read route) < [`Role::Operator`] (start rollouts)
//! < [`Role::Approver`] (an operator who may also approve releases: the
//! two-person rule is kept by requiring two *different* people, the
//! builder and the approver, not by taking rights away from approvers)
//! < [`Role::Admin`] (tokens, enrolment).
//!
//! # Tokens
//! `ferry_` followed by 64 hex digits: 256 random bits from the operating
//! system. Only the SHA-256 of a token is stored (a copy of the state
//! directory does not hold usable credentials), with its holder's name, its
//! role and who made it; the token is shown once, when it is made. Names
//! are unique among tokens that are not revoked, and they are what the
//! audit log records. A revoked token keeps its record (`revoked_ms`) and
//! stops working at once, and so do the sessions opened with it.
//!
//! # The first admin
//! The first time a console opens a state directory it makes an `admin`
//! token and writes it to `<state>/admin.token` (mode 0600, created new);
//! the log names the file, never the token. This happens once per state
//! directory (`Store::auth_bootstrapped`): an admin who revoked every admin
//! token makes a new one offline with `ferry-fleet token create --state`.
//!
//! # Sessions
//! A dashboard login trades a token for a session: a random 256-bit id in
//! a cookie and a random CSRF token the page sends back in a header. Both
//! are kept in memory only (hashed), so a restart logs browsers out; a
//! session lasts [`SESSION_TTL_MS`], and at most [`MAX_SESSIONS`] are kept
//! (the oldest go first).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

/// How long a dashboard session lasts after its login.
pub const SESSION_TTL_MS: u64 = 12 * 3_600_000;
/// Sessions kept at most: logins beyond it end the oldest sessions.
pub const MAX_SESSIONS: usize = 10_000;
/// The first admin token's file in the state directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The first admin token's holder.
pub const FIRST_ADMIN: &str = "admin";
/// What every token starts with (so secret scanners and people recognise it).
pub const TOKEN_PREFIX: &str = "ferry_";
/// Longest token holder name.
pub const MAX_NAME: usize = 64;

/// What a credential allows; ordered (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Approver,
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Approver, Role::Admin];

    /// Its name (`viewer`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Role, AuthError> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                AuthError::Invalid(format!(
                    "unknown role {s:?} (viewer, operator, approver, admin)"
                ))
            })
    }
}

/// Who is asking: the holder of a valid token or session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// The token's holder (what the audit log records).
    pub name: String,
    pub role: Role,
}

/// A token as stored (never the token itself). Do not rename or remove
/// fields; add new ones at the end with defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// SHA-256 of the token, hex.
    pub hash: String,
    pub name: String,
    pub role: Role,
    pub created_ms: u64,
    /// Who made it (a token holder's name, or `state directory` for the
    /// offline command and the first admin).
    pub created_by: String,
    #[serde(default)]
    pub revoked_ms: Option<u64>,
}

/// A token as listed: its record without the hash, and a short id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub name: String,
    pub role: Role,
    /// The first 8 hex digits of the token's hash (tells tokens apart in
    /// logs without revealing anything usable).
    pub id: String,
    pub created_ms: u64,
    pub created_by: String,
    pub revoked_ms: Option<u64>,
}

/// A token just made: the only time the token is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewToken {
    pub name: String,
    pub role: Role,
    pub token: String,
}

/// Why a token could not be made, revoked or used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A name or role that is not valid.
    #[error("{0}")]
    Invalid(String),
    /// A token that is not revoked already has this name.
    #[error("a token named {0:?} exists (revoke it first)")]
    NameTaken(String),
    /// No token (that is not revoked) has this name, or no such device
    /// is enrolled.
    #[error("no token or enrolled device named {0:?}")]
    NotFound(String),
    /// The operating system gave no random bytes.
    #[error("no random bytes: {0}")]
    Random(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The first admin token's file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AuthError {
    /// A stable code for logs and API answers.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Invalid(_) => "invalid",
            AuthError::NameTaken(_) => "name_taken",
            AuthError::NotFound(_) => "not_found",
            AuthError::Random(_) => "random",
            AuthError::Store(e) => e.code(),
            AuthError::Io { .. } => "io",
        }
    }
}

/// 32 random bytes from the operating system, hex.
fn random_hex() -> Result<String, AuthError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

/// SHA-256 of `secret`, hex.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Checks a token holder's name: 1 to [`MAX_NAME`] of `A-Z a-z 0-9 . _ @ -`.
pub fn validate_name(name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!(
            "token name {name:?}: 1 to {MAX_NAME} of A-Z a-z 0-9 . _ @ -"
        )))
    }
}

struct Session {
    principal: Principal,
    /// The hash of the token the session was opened with (revoking it ends
    /// the session).
    token_hash: String,
    /// The CSRF token, hashed.
    csrf_hash: String,
    csrf: String,
    expires_ms: u64,
}

/// The console's credentials: tokens in the store, sessions in memory.
pub struct Auth {
    store: Arc<Store>,
    /// By the hash of the session id.
    sessions: Mutex<HashMap<String, Session>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

/// A session just opened: the cookie's value and the page's CSRF token.
#[derive(Debug, Clone)]
pub struct Login {
    pub session: String,
    pub csrf: String,
    pub principal: Principal,
}

impl Auth {
    pub fn new(store: Arc<Store>) -> Auth {
        Auth {
            store,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Makes the first admin token once per state directory (see the
    /// module header) and returns the file it was written to.
    pub fn bootstrap(&self, state: &Path, now_ms: u64) -> Result<Option<PathBuf>, AuthError> {
        if self.store.auth_bootstrapped()? {
            return Ok(None);
        }
        let path = state.join(ADMIN_TOKEN_FILE);
        let new = self.create(FIRST_ADMIN, Role::Admin, "state directory", now_ms)?;
        write_secret(&path, &new.token).map_err(|source| AuthError::Io {
            path: path.clone(),
            source,
        })?;
        self.store.set_auth_bootstrapped()?;
        Ok(Some(path))
    }

    /// Makes a token for `name` with `role`; `by` names who asked.
    pub fn create(
        &self,
        name: &str,
        role: Role,
        by: &str,
        now_ms: u64,
    ) -> Result<NewToken, AuthError> {
        validate_name(name)?;
        if self.active(name)?.is_some() {
            return Err(AuthError::NameTaken(name.to_string()));
        }
        let token = format!("{TOKEN_PREFIX}{}", random_hex()?);
        let record = TokenRecord {
            hash: hash(&token),
            name: name.to_string(),
            role,
            created_ms: now_ms,
            created_by: by.to_string(),
            revoked_ms: None,
        };
        self.store.save_token(&record.hash, &record)?;
        Ok(NewToken {
            name: name.to_string(),
            role,
            token,
        })
    }

    /// The record of `name`'s token that is not revoked.
    fn active(&self, name: &str) -> Result<Option<TokenRecord>, AuthError> {
        Ok(self
            .store
            .tokens::<TokenRecord>()?
            .into_iter()
            .find(|t| t.name == name && t.revoked_ms.is_none()))
    }

    /// Revokes `name`'s token: it and its sessions stop working at once.
    pub fn revoke(&self, name: &str, now_ms: u64) -> Result<TokenView, AuthError> {
        let mut record = self
            .active(name)?
            .ok_or_else(|| AuthError::NotFound(name.to_string()))?;
        record.revoked_ms = Some(now_ms);
        self.store.save_token(&record.hash, &record)?;
        self.sessions
            .lock()
            .unwrap()
            .retain(|_, s| s.token_hash != record.hash);
        Ok(view(record))
    }

    /// Every token (revoked ones too), oldest first.
    pub fn list(&self) -> Result<Vec<TokenView>, AuthError> {
        let mut all: Vec<TokenRecord> = self.store.tokens()?;
        all.sort_by(|a, b| (a.created_ms, &a.name).cmp(&(b.created_ms, &b.name)));
        Ok(all.into_iter().map(view).collect())
    }

    /// Who holds `token`, when it is valid (not revoked).
    pub fn check_token(&self, token: &str) -> Option<Principal> {
        if !token.starts_with(TOKEN_PREFIX) {
            return None;
        }
        let record: TokenRecord = self.store.token(&hash(token)).ok()??;
        record.revoked_ms.is_none().then_some(Principal {
            name: record.name,
            role: record.role,
        })
    }

    /// Opens a dashboard session with `token`, when it is valid.
    pub fn login(&self, token: &str, now_ms: u64) -> Result<Option<Login>, AuthError> {
        let Some(principal) = self.check_token(token) else {
            return Ok(None);
        };
        let session = random_hex()?;
        let csrf = random_hex()?;
        let mut sessions = self.sessions.lock().unwrap();
        sessions.retain(|_, s| s.expires_ms > now_ms);
        while sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires_ms)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => sessions.remove(&k),
                None => break,
            };
        }
        sessions.insert(
            hash(&session),
            Session {
                principal: principal.clone(),
                token_hash: hash(token),
                csrf_hash: hash(&csrf),
                csrf: csrf.clone(),
                expires_ms: now_ms + SESSION_TTL_MS,
            },
        );
        Ok(Some(Login {
            session,
            csrf,
            principal,
        }))
    }

    /// The holder of session `id` and its CSRF token, when the session is
    /// open and its token not revoked.
    pub fn session(&self, id: &str, now_ms: u64) -> Option<(Principal, String)> {
        let key = hash(id);
        let (principal, token_hash, csrf) = {
            let sessions = self.sessions.lock().unwrap();
            let s = sessions.get(&key).filter(|s| s.expires_ms > now_ms)?;
            (s.principal.clone(), s.token_hash.clone(), s.csrf.clone())
        };
        // A token revoked by another process (`token revoke --state` while
        // the console was stopped is the only other writer) ends it too.
        let record: TokenRecord = self.store.token(&token_hash).ok()??;
        if record.revoked_ms.is_some() {
            self.sessions.lock().unwrap().remove(&key);
            return None;
        }
        Some((principal, csrf))
    }

    /// Whether `csrf` is session `id`'s CSRF token.
    pub fn check_csrf(&self, id: &str, csrf: &str) -> bool {
        let sessions = self.sessions.lock().unwrap();
        // Compared as hashes: the time taken says nothing about the token.
        sessions
            .get(&hash(id))
            .is_some_and(|s| s.csrf_hash == hash(csrf))
    }

    /// Ends session `id`.
    pub fn logout(&self, id: &str) {
        self.sessions.lock().unwrap().remove(&hash(id));
    }
}

/// An enrolled device. Do not rename or remove fields; add new ones at
/// the end with defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub device: String,
    pub enrolled_ms: u64,
    /// The admin who enrolled it.
    pub by: String,
}

/// What `GET /api/enrolment` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    /// Whether only enrolled devices are followed (`serve` unless
    /// `--follow-unenrolled`).
    pub required: bool,
    pub devices: Vec<Enrolled>,
    /// Messages refused since the console started, per device id that is
    /// not enrolled.
    pub not_enrolled: std::collections::BTreeMap<String, u64>,
}

impl Auth {
    /// Enrols `device` (an admin, `by`, asked).
    pub fn enrol(&self, device: &str, by: &str, now_ms: u64) -> Result<Enrolled, AuthError> {
        ferry_protocol::validate_name("device id", device)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let record = Enrolled {
            device: device.to_string(),
            enrolled_ms: now_ms,
            by: by.to_string(),
        };
        self.store.save_enrolment(device, &record)?;
        Ok(record)
    }

    /// Removes `device`'s enrolment.
    pub fn unenrol(&self, device: &str) -> Result<(), AuthError> {
        if self.store.remove_enrolment(device)? {
            Ok(())
        } else {
            Err(AuthError::NotFound(device.to_string()))
        }
    }

    /// The enrolment list and what was refused.
    pub fn enrolment(&self) -> Result<Enrolment, AuthError> {
        Ok(Enrolment {
            required: self.store.requires_enrolment(),
            devices: self.store.enrolments()?,
            not_enrolled: self.store.unenrolled(),
        })
    }
}

fn view(r: TokenRecord) -> TokenView {
    TokenView {
        id: r.hash[..8].to_string(),
        name: r.name,
        role: r.role,
        created_ms: r.created_ms,
        created_by: r.created_by,
        revoked_ms: r.revoked_ms,
    }
}

/// Writes `secret` to a new file only its owner can read (0600 on Unix),
/// synced to disk. Refuses to replace an existing file.
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = options.open(path)?;
    f.write_all(format!("{secret}\n").as_bytes())?;
    f.sync_all()?;
    ferry_host::sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
        (dir, Auth::new(store))
    }

    #[test]
    fn roles_are_ordered_and_parsed() {
        assert!(Role::Viewer < Role::Operator);
        assert!(Role::Operator < Role::Approver);
        assert!(Role::Approver < Role::Admin);
        for r in Role::ALL {
            assert_eq!(r.name().parse::<Role>().unwrap(), r);
        }
        assert_eq!("root".parse::<Role>().unwrap_err().code(), "invalid");
    }

    #[test]
    fn tokens_are_stored_hashed_checked_and_revoked() {
        let (_dir, auth) = auth();
        let t = auth.create("ci", Role::Operator, "admin", 1).unwrap();
        assert!(t.token.starts_with(TOKEN_PREFIX) && t.token.len() == 6 + 64);
        let stored: Vec<TokenRecord> = auth.store().tokens().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].hash, hash(&t.token));
        assert!(!serde_json::to_string(&stored).unwrap().contains(&t.token));
        let p = auth.check_token(&t.token).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("ci", Role::Operator));
        assert_eq!(auth.check_token("ferry_00").as_ref(), None);
        assert_eq!(auth.check_token(&t.token[1..]).as_ref(), None);
        let e = auth.create("ci", Role::Admin, "admin", 2).unwrap_err();
        assert_eq!(e.code(), "name_taken");
        for bad in ["", "a b", "x/y", &"n".repeat(65)] {
            assert_eq!(
                auth.create(bad, Role::Viewer, "a", 3).unwrap_err().code(),
                "invalid"
            );
        }

        let login = auth.login(&t.token, 10).unwrap().unwrap();
        assert!(auth.session(&login.session, 11).is_some());
        assert!(auth.check_csrf(&login.session, &login.csrf));
        assert!(!auth.check_csrf(&login.session, "x"));
        assert!(auth.session(&login.session, 11 + SESSION_TTL_MS).is_none());

        let revoked = auth.revoke("ci", 20).unwrap();
        assert_eq!(revoked.revoked_ms, Some(20));
        assert_eq!(auth.check_token(&t.token), None);
        assert!(auth.session(&login.session, 21).is_none());
        assert_eq!(auth.revoke("ci", 21).unwrap_err().code(), "not_found");
        // The name is free again; the old record stays listed.
        auth.create("ci", Role::Viewer, "admin", 30).unwrap();
        assert_eq!(auth.list().unwrap().len(), 2);
    }

    #[test]
    fn the_first_admin_is_written_once_and_private() {
        let (dir, auth) = auth();
        let path = auth.bootstrap(dir.path(), 1).unwrap().unwrap();
        let token = std::fs::read_to_string(&path).unwrap();
        let p = auth.check_token(token.trim()).unwrap();
        assert_eq!((p.name.as_str(), p.role), (FIRST_ADMIN, Role::Admin));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(auth.bootstrap(dir.path(), 2).unwrap(), None);
        assert!(!path.exists());
    }
}
