//! ferry-fleet's integration tests, with a real mosquitto and real
//! `ferry-agent` processes.
//!
//! - `auth`: the console's authentication attacked against the real
//!   binary: no credential, wrong roles, `operator=`, cross-origin and
//!   CSRF with a session cookie, revocation.
//! - `embedded`: `serve --embedded-broker` (rumqttd, no mosquitto) with
//!   real agents: statuses, counts, retained statuses, a persistent
//!   session, the last will.
//! - `retrain`: the retraining loop against real agents: the hook fires
//!   once per episode (also across a console restart) with the drifted
//!   samples; the export CLI; a webhook retried.
//! - `limits`: the real binary against 1,000 half-open connections, a
//!   stalled upload, too many event streams, deep JSON.
//! - `demo`: `scripts/fleet-demo.sh` runs to the end.
//! - `rollouts`: canary rollouts against real agents: promote, abort on
//!   drift with rollback, resume after a console restart.
//! - `state`: the store fed by the MQTT ingest from mosquitto and real
//!   agents; `ferry-fleet serve` and `status`.
//!
//! The harnesses (mosquitto, bundles, agent processes) are ferry-testkit's
//! `broker`, `fixtures` and `device`, imported here so the modules name
//! them `crate::broker` and so on.

use ferry_testkit::{broker, device, fixtures};

mod auth;
mod dashboard;
mod demo;
mod embedded;
mod limits;
mod retrain;
mod rollouts;
mod state;
