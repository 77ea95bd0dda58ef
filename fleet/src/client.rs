//! A typed client of a running console's HTTP API (blocking, over ureq):
//! what `ferry-fleet rollout`, `rollouts` and `retrain` use, and what the
//! tests drive a console with. The answers are the types the console
//! serialises (`Rollout`, `AuditEntry`, `DeviceState`, `FleetDriftView`,
//! `Overview`, `Request`, `TokenView`), so both sides change together.
//!
//! Every call sends `Authorization: Bearer <token>` when the client has a
//! token ([`Client::with_token`]); the console answers 401 without one.

use std::time::Duration;

use crate::auth::{Enrolled, Enrolment, NewToken, Principal, TokenView};
use crate::model::DeviceState;
use crate::releases::{ReleaseDetail, ReleaseRecord};
use crate::retrain::{FleetDriftView, Overview, ROWS_HEADER, Request};
use crate::rollout::Rollout;
use crate::rollouts::{AuditEntry, NewRollout};

/// How long one call may take in all (an upload of a large bundle, which
/// the console verifies before it answers, included).
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Why a call did not get the answer it wanted.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No HTTP answer (connection refused, timeout, DNS).
    #[error("cannot reach the console at {base}: {source}")]
    Unreachable {
        base: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// The console answered with an error status; `message` is its
    /// `error` field (or the body).
    #[error("{status} {message}")]
    Refused { status: u16, message: String },
    /// An answer that is not what the route promises.
    #[error("unexpected answer to {path}: {message}")]
    BadAnswer { path: String, message: String },
}

impl ClientError {
    /// A stable code for logs.
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::Unreachable { .. } => "unreachable",
            ClientError::Refused { .. } => "refused",
            ClientError::BadAnswer { .. } => "bad_answer",
        }
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A console at a base URL (`http://127.0.0.1:8080`).
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

type Answer = ureq::http::Response<ureq::Body>;

impl Client {
    /// A client of the console at `base`.
    pub fn new(base: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(TIMEOUT))
                .build()
                .into(),
            token: None,
        }
    }

    /// The same client, sending `token` with every call.
    pub fn with_token(mut self, token: &str) -> Client {
        self.token = Some(token.trim().to_string());
        self
    }

    fn authorize<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    fn get_req(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.authorize(self.agent.get(self.url(path)))
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn unreachable(&self) -> impl FnOnce(ureq::Error) -> ClientError + '_ {
        |source| ClientError::Unreachable {
            base: self.base.clone(),
            source: Box::new(source),
        }
    }

    /// The body of a successful answer, or the console's error.
    fn text(path: &str, mut r: Answer) -> Result<String, ClientError> {
        let status = r.status().as_u16();
        let text = r
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_string()
            .map_err(|e| ClientError::BadAnswer {
                path: path.to_string(),
                message: e.to_string(),
            })?;
        if status >= 400 {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(ClientError::Refused { status, message });
        }
        Ok(text)
    }

    fn json<T: serde::de::DeserializeOwned>(path: &str, r: Answer) -> Result<T, ClientError> {
        let text = Self::text(path, r)?;
        serde_json::from_str(&text).map_err(|e| ClientError::BadAnswer {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let r = self.get_req(path).call().map_err(self.unreachable())?;
        Self::json(path, r)
    }

    /// `POST /api/rollouts`: starts a rollout of `bundle` (its bytes).
    pub fn create_rollout(
        &self,
        bundle: &[u8],
        params: &NewRollout,
    ) -> Result<Rollout, ClientError> {
        let mut req = self
            .authorize(self.agent.post(self.url("/api/rollouts")))
            .query("canary", &params.canary)
            .query("bake", &params.bake)
            .query("abort_if", &params.abort_if)
            .query("shadow", params.shadow.to_string())
            .header("Content-Type", "application/octet-stream");
        if let Some(w) = &params.waves {
            req = req.query("waves", w);
        }
        if let Some(t) = &params.install_timeout {
            req = req.query("install_timeout", t);
        }
        if let Some(id) = &params.release {
            req = req.query("release", id);
        }
        if params.allow_downgrade {
            req = req.query("allow_downgrade", "true");
        }
        let r = req.send(bundle).map_err(self.unreachable())?;
        Self::json("/api/rollouts", r)
    }

    fn post_bytes<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        bytes: &[u8],
    ) -> Result<T, ClientError> {
        let r = self
            .authorize(self.agent.post(self.url(path)))
            .header("Content-Type", "application/octet-stream")
            .send(bytes)
            .map_err(self.unreachable())?;
        Self::json(path, r)
    }

    /// `POST /api/releases`: submits a bundle to the release registry.
    pub fn submit_release(&self, bundle: &[u8]) -> Result<ReleaseRecord, ClientError> {
        self.post_bytes("/api/releases", bundle)
    }

    /// `GET /api/releases/{id}`: one release with its review and diff.
    pub fn release(&self, id: &str) -> Result<ReleaseDetail, ClientError> {
        self.get(&format!("/api/releases/{id}"))
    }

    /// `POST /api/releases/{id}/approve` with the approver-signed bundle.
    pub fn approve_release(&self, id: &str, bundle: &[u8]) -> Result<ReleaseRecord, ClientError> {
        self.post_bytes(&format!("/api/releases/{id}/approve"), bundle)
    }

    /// `POST /api/releases/{id}/reject` with the reason.
    pub fn reject_release(&self, id: &str, reason: &str) -> Result<ReleaseRecord, ClientError> {
        self.post_reason(&format!("/api/releases/{id}/reject"), reason)
    }

    /// POSTs `{"reason": reason}` to `path`.
    fn post_reason<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        reason: &str,
    ) -> Result<T, ClientError> {
        let r = self
            .authorize(self.agent.post(self.url(path)))
            .header("Content-Type", "application/json")
            .send(serde_json::json!({ "reason": reason }).to_string())
            .map_err(self.unreachable())?;
        Self::json(path, r)
    }

    /// `GET /bundles/{digest}.ferry`: a bundle's bytes (what devices and
    /// approvers download).
    pub fn bundle(&self, digest: &str) -> Result<Vec<u8>, ClientError> {
        let path = format!("/bundles/{digest}.ferry");
        let mut r = self.get_req(&path).call().map_err(self.unreachable())?;
        let status = r.status().as_u16();
        if status >= 400 {
            return Err(ClientError::Refused {
                status,
                message: format!("no bundle {digest}"),
            });
        }
        r.body_mut()
            .with_config()
            .limit(crate::rollouts::MAX_BUNDLE_BYTES as u64)
            .read_to_vec()
            .map_err(|e| ClientError::BadAnswer {
                path,
                message: e.to_string(),
            })
    }

    /// `GET /api/rollouts`: every rollout, oldest first.
    pub fn rollouts(&self) -> Result<Vec<Rollout>, ClientError> {
        self.get("/api/rollouts")
    }

    /// `POST /api/rollouts/{id}/pause|resume|abort`.
    pub fn control_rollout(
        &self,
        id: &str,
        control: &crate::rollouts::Control,
    ) -> Result<Rollout, ClientError> {
        let reason = match control {
            crate::rollouts::Control::Abort { reason } => reason.as_str(),
            _ => "",
        };
        self.post_reason(&format!("/api/rollouts/{id}/{}", control.name()), reason)
    }

    /// `GET /api/rollouts/{id}`.
    pub fn rollout(&self, id: &str) -> Result<Rollout, ClientError> {
        self.get(&format!("/api/rollouts/{id}"))
    }

    /// `GET /api/releases`: the release registry, newest sequence first.
    pub fn releases(&self) -> Result<Vec<crate::releases::ReleaseView>, ClientError> {
        self.get("/api/releases")
    }

    /// `GET /api/releases/next-sequence?channel=C`: the sequence the next
    /// release of `channel` should carry.
    pub fn next_sequence(&self, channel: &str) -> Result<u64, ClientError> {
        let path = format!("/api/releases/next-sequence?channel={channel}");
        let v: serde_json::Value = self.get(&path)?;
        v["next_sequence"]
            .as_u64()
            .ok_or_else(|| ClientError::BadAnswer {
                path,
                message: format!("no next_sequence in {v}"),
            })
    }

    /// `GET /api/audit`: the audit log, oldest first.
    pub fn audit(&self) -> Result<Vec<AuditEntry>, ClientError> {
        self.get("/api/audit")
    }

    /// `GET /api/devices/{id}`: the device's stored state; `None` when the
    /// console does not know it.
    pub fn device(&self, id: &str) -> Result<Option<DeviceState>, ClientError> {
        match self.get(&format!("/api/devices/{id}")) {
            Ok(d) => Ok(Some(d)),
            Err(ClientError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /api/devices`: the fleet as the dashboard shows it.
    pub fn devices(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/api/devices")
    }

    /// `GET /api/fleet-drift`.
    pub fn fleet_drift(&self) -> Result<FleetDriftView, ClientError> {
        self.get("/api/fleet-drift")
    }

    /// `GET /api/retrain`: the rule, the episodes and the log.
    pub fn retrain(&self) -> Result<Overview, ClientError> {
        self.get("/api/retrain")
    }

    /// `GET /api/retrain/request`: a retraining request for `devices`
    /// (comma-separated), or the drifting devices.
    pub fn retrain_request(&self, devices: Option<&str>) -> Result<Request, ClientError> {
        let path = "/api/retrain/request";
        let mut req = self.get_req(path);
        if let Some(d) = devices {
            req = req.query("devices", d);
        }
        let r = req.call().map_err(self.unreachable())?;
        Self::json(path, r)
    }

    /// `GET /api/retrain/export`: the samples of `devices` (comma-separated)
    /// as CSV, and its number of data rows.
    pub fn retrain_export(&self, devices: &str) -> Result<(u64, String), ClientError> {
        let path = "/api/retrain/export";
        let r = self
            .get_req(path)
            .query("devices", devices)
            .call()
            .map_err(self.unreachable())?;
        let rows = r
            .headers()
            .get(ROWS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let csv = Self::text(path, r)?;
        let rows = rows.ok_or_else(|| ClientError::BadAnswer {
            path: path.to_string(),
            message: "no row count".into(),
        })?;
        Ok((rows, csv))
    }

    /// `GET /api/session`: who the token belongs to.
    pub fn whoami(&self) -> Result<Principal, ClientError> {
        let v: serde_json::Value = self.get("/api/session")?;
        serde_json::from_value(v).map_err(|e| ClientError::BadAnswer {
            path: "/api/session".into(),
            message: e.to_string(),
        })
    }

    /// `GET /api/tokens` (admin): every token, revoked ones too.
    pub fn tokens(&self) -> Result<Vec<TokenView>, ClientError> {
        self.get("/api/tokens")
    }

    /// `POST /api/tokens` (admin): a new token for `name` with `role`; the
    /// answer is the only time the token is shown.
    pub fn create_token(&self, name: &str, role: &str) -> Result<NewToken, ClientError> {
        let path = "/api/tokens";
        let r = self
            .authorize(self.agent.post(self.url(path)))
            .header("Content-Type", "application/json")
            .send(serde_json::json!({ "name": name, "role": role }).to_string())
            .map_err(self.unreachable())?;
        Self::json(path, r)
    }

    /// `DELETE /api/tokens/{name}` (admin): revokes `name`'s token.
    pub fn revoke_token(&self, name: &str) -> Result<TokenView, ClientError> {
        let path = format!("/api/tokens/{name}");
        let r = self
            .authorize(self.agent.delete(self.url(&path)))
            .call()
            .map_err(self.unreachable())?;
        Self::json(&path, r)
    }

    /// `GET /api/enrolment` (admin).
    pub fn enrolment(&self) -> Result<Enrolment, ClientError> {
        self.get("/api/enrolment")
    }

    /// `POST /api/enrolment` (admin): enrols `device`.
    pub fn enrol(&self, device: &str) -> Result<Enrolled, ClientError> {
        let path = "/api/enrolment";
        let r = self
            .authorize(self.agent.post(self.url(path)))
            .header("Content-Type", "application/json")
            .send(serde_json::json!({ "device": device }).to_string())
            .map_err(self.unreachable())?;
        Self::json(path, r)
    }

    /// `DELETE /api/enrolment/{device}` (admin).
    pub fn unenrol(&self, device: &str) -> Result<(), ClientError> {
        let path = format!("/api/enrolment/{device}");
        let r = self
            .authorize(self.agent.delete(self.url(&path)))
            .call()
            .map_err(self.unreachable())?;
        Self::text(&path, r).map(|_| ())
    }
}
