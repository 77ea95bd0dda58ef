//! ferry-tidy: the architecture's invariants as a test, in the spirit of
//! rust-analyzer's tidy checks. `cargo test` runs `tests/tidy.rs`, which
//! scans every crate's `src/` and fails, naming file and line, when
//!
//! - a file outside its room names an engine in code (`wasmtime::`,
//!   `tract_onnx::`, `sled::`, `rumqttc::`, `rumqttd::`, `axum::`, or a
//!   `use` of one): each engine has the few files listed in [`ROOMS`];
//! - a crate other than `ferry-format` parses bundle bytes: names the
//!   framing primitives ([`FRAMING_NAMES`]) or the bundle magic.
//!
//! Comments and doc comments may name anything; only code is checked.
//! The checker is a plain function over (path, text) so its own tests can
//! plant violations and see them reported.

/// Where each engine may be named: path prefixes relative to the
/// workspace root. A prefix ending in `/` is a directory.
pub const ROOMS: &[(&str, &[&str])] = &[
    ("wasmtime", &["runtime/src/sandbox.rs"]),
    ("wasmtime_wasi", &["runtime/src/sandbox.rs"]),
    ("tract_onnx", &["runtime/src/model.rs"]),
    ("tract_core", &["runtime/src/model.rs"]),
    (
        "sled",
        &[
            "host/src/kv.rs",
            "edge-agent/src/buffer.rs",
            "fleet/src/store.rs",
            "fleet/src/store/",
        ],
    ),
    ("rumqttc", &["link/src/"]),
    ("rumqttd", &["fleet/src/broker.rs"]),
    (
        "axum",
        &[
            "edge-agent/src/server.rs",
            "fleet/src/http/",
            "fleet/src/http.rs",
        ],
    ),
];

/// Names of the bundle format's framing primitives: only `format/` uses them.
pub const FRAMING_NAMES: &[&str] = &[
    "parse_framing",
    "Framing",
    "extract_artifact",
    "check_signatures",
    "SIGNATURE_ENTRY_LEN",
];

/// The crate allowed to parse bundle bytes.
pub const FORMAT_CRATE: &str = "format/";

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Path relative to the workspace root.
    pub path: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path, self.line, self.what)
    }
}

/// Checks one source file (`path` relative to the workspace root, `/`
/// separators) and returns what it breaks.
pub fn check_file(path: &str, text: &str) -> Vec<Violation> {
    let mut found = Vec::new();
    let mut in_block_comment = false;
    for (i, raw) in text.lines().enumerate() {
        let code = strip_comments(raw, &mut in_block_comment);
        if code.trim().is_empty() {
            continue;
        }
        for (engine, rooms) in ROOMS {
            if names_crate(&code, engine) && !rooms.iter().any(|r| in_room(path, r)) {
                found.push(Violation {
                    path: path.to_string(),
                    line: i + 1,
                    what: format!("names `{engine}` outside its room ({})", rooms.join(", ")),
                });
            }
        }
        if !path.starts_with(FORMAT_CRATE) {
            for name in FRAMING_NAMES {
                if has_word(&code, name) {
                    found.push(Violation {
                        path: path.to_string(),
                        line: i + 1,
                        what: format!(
                            "uses the bundle framing primitive `{name}`: only ferry-format parses bundle bytes"
                        ),
                    });
                }
            }
            if code.contains("b\"FERRY\\0") || code.contains("*b\"FERRY") {
                found.push(Violation {
                    path: path.to_string(),
                    line: i + 1,
                    what: "spells the bundle magic: only ferry-format parses bundle bytes".into(),
                });
            }
        }
    }
    found
}

fn in_room(path: &str, room: &str) -> bool {
    if room.ends_with('/') {
        path.starts_with(room)
    } else {
        path == room
    }
}

/// Whether `code` names the crate `name` as a path (`name::`) or in a
/// `use`/`extern crate` item.
fn names_crate(code: &str, name: &str) -> bool {
    let mut rest = code;
    while let Some(pos) = rest.find(name) {
        let before = rest[..pos].chars().next_back();
        let after = &rest[pos + name.len()..];
        let boundary_before = before.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if boundary_before && after.starts_with("::") {
            return true;
        }
        if boundary_before {
            let head = rest[..pos].trim_end();
            let next = after.chars().next();
            let ends_word = next.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
            if ends_word && (head.ends_with("use") || head.ends_with("extern crate")) {
                return true;
            }
        }
        rest = &rest[pos + name.len()..];
    }
    false
}

fn has_word(code: &str, word: &str) -> bool {
    let mut rest = code;
    while let Some(pos) = rest.find(word) {
        let before = rest[..pos].chars().next_back();
        let after = rest[pos + word.len()..].chars().next();
        let is_ident = |c: char| c.is_alphanumeric() || c == '_';
        if !before.is_some_and(is_ident) && !after.is_some_and(is_ident) {
            return true;
        }
        rest = &rest[pos + word.len()..];
    }
    false
}

/// The line without comments and string contents that could confuse the
/// check (`//`, `/* */` across lines); strings are kept, since the magic
/// check looks for a byte-string literal.
fn strip_comments(line: &str, in_block: &mut bool) -> String {
    let mut out = String::new();
    let mut chars = line.char_indices().peekable();
    let mut in_str = false;
    while let Some((_, c)) = chars.next() {
        if *in_block {
            if c == '*' && chars.peek().is_some_and(|(_, n)| *n == '/') {
                chars.next();
                *in_block = false;
            }
            continue;
        }
        if in_str {
            out.push(c);
            if c == '\\' {
                if let Some((_, n)) = chars.next() {
                    out.push(n);
                }
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push(c);
            }
            '/' if chars.peek().is_some_and(|(_, n)| *n == '/') => break,
            '/' if chars.peek().is_some_and(|(_, n)| *n == '*') => {
                chars.next();
                *in_block = true;
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_outside_its_room_is_reported_with_its_line() {
        let planted = "fn main() {}\nuse sled::Db;\nfn f(_: axum::Router) {}\n";
        let v = check_file("fleet/src/rollouts.rs", planted);
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!((v[0].line, v[1].line), (2, 3));
        assert!(v[0].what.contains("`sled`"), "{}", v[0]);
        assert!(v[1].what.contains("`axum`"), "{}", v[1]);
    }

    #[test]
    fn the_same_code_inside_its_room_is_fine() {
        assert!(check_file("fleet/src/store.rs", "use sled::Db;\n").is_empty());
        assert!(check_file("host/src/kv.rs", "let c = sled::Config::new();\n").is_empty());
        assert!(check_file("link/src/driver.rs", "use rumqttc::{AsyncClient};\n").is_empty());
        assert!(check_file("fleet/src/http/routes.rs", "axum::Router::new()\n").is_empty());
    }

    #[test]
    fn comments_and_lookalike_names_are_not_code() {
        let text = "//! Only this module names sled::Db.\n/* wasmtime::Engine\n still a comment */\nlet ferry_sled = 1; let my_axum::x = 2;\n";
        assert!(check_file("edge-agent/src/agent.rs", text).is_empty());
    }

    #[test]
    fn parsing_bundle_bytes_outside_the_format_crate_is_reported() {
        let planted = "let f = ferry_format::parse_framing(&bytes)?;\nif bytes[..8] == *b\"FERRY\\0\\x01\\n\" {}\n";
        let v = check_file("edge-agent/src/updates/store.rs", planted);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].what.contains("parse_framing"));
        assert!(v[1].what.contains("magic"));
        assert!(check_file("format/src/bundle.rs", planted).is_empty());
    }
}
