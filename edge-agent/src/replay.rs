//! Which signed operator commands this device already obeyed, so a captured
//! one cannot be replayed: not within the process, not after a restart.
//!
//! A signed command is accepted once: its id goes into this record only
//! after its signature verified (an unsigned command can neither fill the
//! record nor claim a signed command's id), and the record is written
//! durably (`state_dir/commands.json`, through `ferry_host::write_durably`)
//! before the command acts. Ids are kept for `max_command_age_s` after the
//! command's `issued_ms`: an older replay is refused by its age anyway. A
//! command claiming to come from the future (more than [`MAX_CLOCK_SKEW_MS`]
//! ahead of the device's clock) is refused, so a command cannot be
//! pre-signed to outlive the age window.
//!
//! A damaged record does not stop the agent: it is moved aside
//! (`commands.json.damaged-<ms>`), and every signed command issued before
//! that moment is refused (`floor_ms`), since the ids that would tell a
//! replay from a new command are lost.
//!
//! Persisted format (schema 1):
//! `{"schema":1,"seen":{"<id>":<issued_ms>},"floor_ms":<ms>}`.
//! Add fields at the end with defaults; do not rename or remove.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// How far ahead of the device's clock a signed command's `issued_ms` may
/// be: devices without a battery-backed clock drift, NTP steps are seconds;
/// five minutes covers both without letting a command be signed for later.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// Most ids kept. A fleet sends a few signed commands a day; past this the
/// device refuses new signed commands (fails closed) until old ones age out.
pub const MAX_SEEN: usize = 4096;

/// The file under the state directory.
pub const FILE: &str = "commands.json";

const SCHEMA: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    schema: u32,
    seen: BTreeMap<String, u64>,
    /// Signed commands issued before this are refused (set when a damaged
    /// record was replaced).
    #[serde(default)]
    floor_ms: u64,
}

/// The persisted set of signed command ids already obeyed.
#[derive(Debug)]
pub struct ReplayGuard {
    path: PathBuf,
    max_age_ms: u64,
    floor_ms: u64,
    seen: Mutex<BTreeMap<String, u64>>,
}

impl ReplayGuard {
    /// Loads the record in `state_dir` (a missing file is an empty record).
    /// A damaged one is moved aside and replaced by an empty record whose
    /// floor is `now_ms`; the second value then says where it went.
    pub fn open(
        state_dir: &Path,
        max_age_s: u64,
        now_ms: u64,
    ) -> Result<(ReplayGuard, Option<PathBuf>), String> {
        let path = state_dir.join(FILE);
        let mut moved = None;
        let record = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Record>(&bytes) {
                Ok(r) if r.schema == SCHEMA => r,
                _ => {
                    let aside = state_dir.join(format!("{FILE}.damaged-{now_ms}"));
                    std::fs::rename(&path, &aside)
                        .map_err(|e| format!("cannot move {} aside: {e}", path.display()))?;
                    moved = Some(aside);
                    Record {
                        schema: SCHEMA,
                        seen: BTreeMap::new(),
                        floor_ms: now_ms,
                    }
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Record::default(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let guard = ReplayGuard {
            path,
            max_age_ms: max_age_s.saturating_mul(1000),
            floor_ms: record.floor_ms,
            seen: Mutex::new(record.seen),
        };
        if moved.is_some() {
            guard.save(&guard.seen.lock().unwrap())?;
        }
        Ok((guard, moved))
    }

    fn save(&self, seen: &BTreeMap<String, u64>) -> Result<(), String> {
        let record = Record {
            schema: SCHEMA,
            seen: seen.clone(),
            floor_ms: self.floor_ms,
        };
        let bytes = serde_json::to_vec(&record).expect("records serialise");
        ferry_host::write_durably(&self.path, &bytes).map_err(|e| e.to_string())
    }

    /// Accepts a signed command whose signature verified, once: refuses it
    /// if it is too old, from the future, or was seen before; otherwise
    /// records it durably. `Err` is the reason to report.
    pub fn accept(&self, id: &str, issued_ms: u64, now_ms: u64) -> Result<(), String> {
        if issued_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(format!(
                "signed command is issued {} s in the future (clock skew limit {} s)",
                (issued_ms - now_ms) / 1000,
                MAX_CLOCK_SKEW_MS / 1000
            ));
        }
        let age_ms = now_ms.saturating_sub(issued_ms);
        if age_ms > self.max_age_ms {
            return Err(format!(
                "signed command is {} s old (limit {} s)",
                age_ms / 1000,
                self.max_age_ms / 1000
            ));
        }
        if issued_ms < self.floor_ms {
            return Err(
                "signed command was issued before the command record was reset (it was damaged): refused"
                    .into(),
            );
        }
        let mut seen = self.seen.lock().unwrap();
        if seen.contains_key(id) {
            return Err(format!(
                "signed command {id} was already obeyed: a replay is refused"
            ));
        }
        let horizon = now_ms.saturating_sub(self.max_age_ms);
        seen.retain(|_, issued| *issued >= horizon);
        if seen.len() >= MAX_SEEN {
            return Err(format!(
                "more than {MAX_SEEN} signed commands within max_command_age_s: refused until older ones expire"
            ));
        }
        seen.insert(id.to_string(), issued_ms);
        if let Err(e) = self.save(&seen) {
            seen.remove(id);
            return Err(format!("cannot record the command, so it is not run: {e}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_S: u64 = 24 * 3600;
    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn a_signed_command_is_accepted_once_even_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (g, _) = ReplayGuard::open(dir.path(), DAY_S, NOW).unwrap();
        g.accept("c1", NOW - 1000, NOW).unwrap();
        let e = g.accept("c1", NOW - 1000, NOW + 5).unwrap_err();
        assert!(e.contains("replay"), "{e}");
        let (again, moved) = ReplayGuard::open(dir.path(), DAY_S, NOW + 10).unwrap();
        assert!(moved.is_none());
        assert!(
            again
                .accept("c1", NOW - 1000, NOW + 10)
                .unwrap_err()
                .contains("replay")
        );
        again.accept("c2", NOW, NOW + 10).unwrap();
    }

    #[test]
    fn old_and_future_commands_are_refused_and_old_ids_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (g, _) = ReplayGuard::open(dir.path(), 60, NOW).unwrap();
        assert!(
            g.accept("old", NOW - 61_000, NOW)
                .unwrap_err()
                .contains("old")
        );
        let future = g.accept("f", NOW + MAX_CLOCK_SKEW_MS + 1, NOW).unwrap_err();
        assert!(future.contains("future"), "{future}");
        g.accept("skewed", NOW + MAX_CLOCK_SKEW_MS, NOW).unwrap();
        g.accept("a", NOW, NOW).unwrap();
        // Two minutes later "a" is past the window: forgotten when the next
        // command is recorded (and refused by age if replayed).
        g.accept("b", NOW + 120_000, NOW + 120_000).unwrap();
        let r: Record =
            serde_json::from_slice(&std::fs::read(dir.path().join(FILE)).unwrap()).unwrap();
        assert!(!r.seen.contains_key("a"), "{:?}", r.seen);
        assert!(
            g.accept("a", NOW, NOW + 120_000)
                .unwrap_err()
                .contains("old")
        );
    }

    #[test]
    fn a_damaged_record_is_moved_aside_and_older_commands_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let (g, moved) = ReplayGuard::open(dir.path(), DAY_S, NOW).unwrap();
        let moved = moved.expect("moved aside");
        assert_eq!(std::fs::read(&moved).unwrap(), b"{not json");
        // What was issued before the reset may be a replay: refused.
        let e = g.accept("before", NOW - 1, NOW + 5).unwrap_err();
        assert!(e.contains("reset"), "{e}");
        g.accept("after", NOW + 1, NOW + 5).unwrap();
        // The floor survives a restart.
        let (again, _) = ReplayGuard::open(dir.path(), DAY_S, NOW + 10).unwrap();
        assert!(again.accept("before-2", NOW - 1, NOW + 10).is_err());
    }
}
