//! ferry-tidy: the architecture's invariants as a test, in the spirit of
//! rust-analyzer's tidy checks. `cargo test` runs `tests/tidy.rs`, which
//! reads every crate's manifest and `src/`, and fails, naming file and line,
//! when
//!
//! - a crate depends on an engine it has no room for (its `Cargo.toml`
//!   names `wasmtime`, `tract-*`, `ort`, `sled`, `rumqttc`, `rumqttd` or `axum`
//!   outside [`DEPENDENCY_ROOMS`]);
//! - a source file outside its room names an engine in code (`sled::`,
//!   `sled :: Db`, `::sled`, `use sled`, any `tract_*` crate...): each
//!   engine has the few files listed in [`ROOMS`];
//! - a crate other than `ferry-format` parses bundle bytes: names the
//!   framing primitives ([`FRAMING_NAMES`]) or spells the bundle magic.
//!
//! Comments, doc comments and the contents of string and character
//! literals may name anything; only code is checked. Tests, benches and
//! the test kit may name engines (to corrupt a sled file, to drive a
//! broker): the rooms are about the code that ships. The checker is a
//! plain function over (path, text) so its own tests plant violations and
//! see them reported.

#![forbid(unsafe_code)]

/// Where each engine may be named in `src/`: path prefixes relative to the
/// workspace root. A prefix ending in `/` is a directory. An engine whose
/// name ends in `_` covers every crate starting so (`tract_` = `tract_onnx`,
/// `tract_core`, `tract_hir`, ...).
pub const ROOMS: &[(&str, &[&str])] = &[
    ("wasmtime", &["runtime/src/sandbox.rs"]),
    ("wasmtime_", &["runtime/src/sandbox.rs"]),
    ("cranelift_", &["runtime/src/sandbox.rs"]),
    ("tract_", &["runtime/src/model.rs"]),
    ("ort", &["runtime/src/onnxruntime.rs"]),
    ("ort_sys", &["runtime/src/onnxruntime.rs"]),
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

/// Which crates (directories) may depend on each engine in their
/// `Cargo.toml` (any dependency table). `-` stands for a name prefix, as
/// in [`ROOMS`].
pub const DEPENDENCY_ROOMS: &[(&str, &[&str])] = &[
    ("wasmtime", &["runtime"]),
    ("wasmtime-", &["runtime"]),
    ("cranelift-", &["packager"]),
    ("tract-", &["runtime"]),
    ("ort", &["runtime"]),
    ("ort-", &["runtime"]),
    ("sled", &["host", "edge-agent", "fleet"]),
    ("rumqttc", &["link"]),
    ("rumqttd", &["fleet"]),
    ("axum", &["edge-agent", "fleet"]),
];

/// Names of the bundle format's framing primitives: only `format/` uses
/// them. (`MAGIC` is checked with its crate path, since the tensor-set
/// format has a `MAGIC` of its own.)
pub const FRAMING_NAMES: &[&str] = &[
    "parse_framing",
    "Framing",
    "extract_artifact",
    "check_signatures",
    "parse_manifest",
    "from_cbor",
    "SIGNATURE_ENTRY_LEN",
    "MAX_MANIFEST_LEN",
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
    let mut state = LexState::default();
    for (i, raw) in text.lines().enumerate() {
        let (code, strings) = strip(raw, &mut state);
        let mut report = |what: String| {
            found.push(Violation {
                path: path.to_string(),
                line: i + 1,
                what,
            })
        };
        if !code.trim().is_empty() {
            for (engine, rooms) in ROOMS {
                if names_crate(&code, engine) && !rooms.iter().any(|r| in_room(path, r)) {
                    report(format!(
                        "names `{engine}` outside its room ({})",
                        rooms.join(", ")
                    ));
                }
            }
        }
        if path.starts_with(FORMAT_CRATE) {
            continue;
        }
        for name in FRAMING_NAMES {
            if has_word(&code, name) {
                report(format!(
                    "uses the bundle framing primitive `{name}`: only ferry-format parses bundle bytes"
                ));
            }
        }
        let squeezed: String = code.chars().filter(|c| !c.is_whitespace()).collect();
        if ["ferry_format::MAGIC", "ferry_runtime::MAGIC", "rt::MAGIC"]
            .iter()
            .any(|p| squeezed.contains(p))
            || (has_word(&code, "MAGIC")
                && (squeezed.contains("ferry_format::{") || squeezed.contains("ferry_runtime::{")))
            || strings.contains("FERRY\\0")
        {
            report("uses the bundle magic: only ferry-format parses bundle bytes".into());
        }
    }
    found
}

/// Checks a crate's `Cargo.toml` (`crate_dir` relative to the workspace
/// root, e.g. `fleet`): engines it depends on without a room for them.
pub fn check_manifest(crate_dir: &str, manifest: &str) -> Vec<Violation> {
    let mut found = Vec::new();
    let mut in_deps = false;
    for (i, line) in manifest.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_deps = t.contains("dependencies");
            continue;
        }
        if !in_deps || t.starts_with('#') || t.is_empty() {
            continue;
        }
        let key = t.split(['=', '.', ' ']).next().unwrap_or_default();
        let package = t
            .split("package")
            .nth(1)
            .and_then(|rest| rest.split('"').nth(1))
            .unwrap_or(key);
        for name in [key, package] {
            for (engine, crates) in DEPENDENCY_ROOMS {
                let hit = if let Some(prefix) = engine.strip_suffix('-') {
                    name.starts_with(&format!("{prefix}-"))
                } else {
                    name == *engine
                };
                if hit && !crates.contains(&crate_dir) {
                    found.push(Violation {
                        path: format!("{crate_dir}/Cargo.toml"),
                        line: i + 1,
                        what: format!("depends on `{name}`, which only {} may", crates.join(", ")),
                    });
                }
            }
        }
    }
    found.dedup();
    found
}

fn in_room(path: &str, room: &str) -> bool {
    if room.ends_with('/') {
        path.starts_with(room)
    } else {
        path == room
    }
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `code` names the crate `name` (or, for a name ending in `_`, a
/// crate starting with it) as a path (`name::`, `name :: x`, `::name`) or
/// in a `use`/`extern crate` item.
fn names_crate(code: &str, name: &str) -> bool {
    let prefix = name.ends_with('_');
    let mut rest = code;
    while let Some(pos) = rest.find(name) {
        let before = rest[..pos].chars().next_back();
        let mut end = pos + name.len();
        if prefix {
            end += rest[end..]
                .find(|c: char| !is_ident(c))
                .unwrap_or(rest.len() - end);
        }
        let after = &rest[end..];
        let word_start = before.is_none_or(|c| !is_ident(c));
        let word_end = after.chars().next().is_none_or(|c| !is_ident(c));
        if word_start && word_end {
            let head = rest[..pos].trim_end();
            if after.trim_start().starts_with("::")
                || head.ends_with("::")
                || head.ends_with("use")
                || head.ends_with("extern crate")
            {
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
        if !before.is_some_and(is_ident) && !after.is_some_and(is_ident) {
            return true;
        }
        rest = &rest[pos + word.len()..];
    }
    false
}

/// What the lexer carries from one line to the next.
#[derive(Debug, Default)]
struct LexState {
    /// Nesting depth of `/* */` comments.
    block: usize,
    /// Inside a (multi-line) string literal; `Some(n)` for a raw string
    /// closed by `"` and `n` hashes.
    string: Option<Option<usize>>,
}

/// Splits a line into its code, with comments removed and the contents of
/// string and character literals blanked, and the text of its string
/// literals (for the magic check).
fn strip(line: &str, st: &mut LexState) -> (String, String) {
    let chars: Vec<char> = line.chars().collect();
    let mut code = String::new();
    let mut strings = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if let Some(raw) = st.string {
            match raw {
                None if c == '\\' => {
                    strings.push(c);
                    if let Some(n) = next {
                        strings.push(n);
                    }
                    i += 2;
                    continue;
                }
                None if c == '"' => {
                    st.string = None;
                    code.push('"');
                }
                Some(hashes)
                    if c == '"'
                        && chars[i + 1..].iter().take_while(|h| **h == '#').count() >= hashes =>
                {
                    st.string = None;
                    code.push('"');
                    i += 1 + hashes;
                    continue;
                }
                _ => strings.push(c),
            }
            i += 1;
            continue;
        }
        if st.block > 0 {
            if c == '*' && next == Some('/') {
                st.block -= 1;
                i += 2;
            } else if c == '/' && next == Some('*') {
                st.block += 1;
                i += 2;
            } else {
                i += 1;
            }
            continue;
        }
        match c {
            '/' if next == Some('/') => break,
            '/' if next == Some('*') => {
                st.block += 1;
                i += 2;
            }
            '"' => {
                st.string = Some(None);
                code.push('"');
                i += 1;
            }
            'r' if !code.chars().next_back().is_some_and(is_ident)
                && matches!(next, Some('"') | Some('#')) =>
            {
                let hashes = chars[i + 1..].iter().take_while(|h| **h == '#').count();
                if chars.get(i + 1 + hashes) == Some(&'"') {
                    st.string = Some(Some(hashes));
                    code.push('"');
                    i += 2 + hashes;
                } else {
                    code.push(c);
                    i += 1;
                }
            }
            '\'' => {
                // A character literal ('x', '\n', '\'', '"') or a lifetime.
                if next == Some('\\') {
                    let close = chars[i + 2..].iter().position(|c| *c == '\'');
                    code.push_str("' '");
                    i += close.map_or(chars.len(), |p| i + 3 + p) - i;
                } else if chars.get(i + 2) == Some(&'\'') {
                    code.push_str("' '");
                    i += 3;
                } else {
                    code.push(c);
                    i += 1;
                }
            }
            _ => {
                code.push(c);
                i += 1;
            }
        }
    }
    (code, strings)
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
    fn spaced_rooted_and_prefixed_paths_are_caught() {
        for planted in [
            "let d: sled :: Db = todo!();",
            "pub use ::sled;",
            "use sled;",
            "extern crate sled;",
            "let t = tract_hir::prelude::Tensor::default();",
            "tract_data::prelude::f16::from_f32(1.0)",
            "use rumqttc as mqtt;",
        ] {
            assert_eq!(
                check_file("edge-agent/src/agent.rs", planted).len(),
                1,
                "{planted}"
            );
        }
    }

    #[test]
    fn onnxruntime_stays_in_its_module() {
        for planted in [
            "use ort::session::Session;",
            "let env = ort::init_from(path)?;",
            "let api = ort_sys::OrtApi::default();",
        ] {
            let v = check_file("runtime/src/session.rs", planted);
            assert_eq!(v.len(), 1, "{planted}: {v:?}");
            assert!(v[0].what.contains("runtime/src/onnxruntime.rs"), "{}", v[0]);
            assert!(check_file("runtime/src/onnxruntime.rs", planted).is_empty());
        }
        // Words that merely contain the name are not the crate.
        assert!(check_file("runtime/src/engine.rs", "let sort = port::x; short();\n").is_empty());
        let m = "[dependencies]\nort.workspace = true\nort-sys = \"2\"\n";
        assert_eq!(check_manifest("edge-agent", m).len(), 2);
        assert!(check_manifest("runtime", m).is_empty());
    }

    #[test]
    fn the_same_code_inside_its_room_is_fine() {
        assert!(check_file("fleet/src/store.rs", "use sled::Db;\n").is_empty());
        assert!(check_file("host/src/kv.rs", "let c = sled::Config::new();\n").is_empty());
        assert!(check_file("link/src/driver.rs", "use rumqttc::{AsyncClient};\n").is_empty());
        assert!(check_file("fleet/src/http/routes.rs", "axum::Router::new()\n").is_empty());
        assert!(check_file("runtime/src/model.rs", "use tract_onnx::prelude::*;\n").is_empty());
    }

    #[test]
    fn comments_strings_and_lookalike_names_are_not_code() {
        let text = "//! Only this module names sled::Db.\n\
                    /* wasmtime::Engine\n /* nested */ still a comment */\n\
                    let ferry_sled = 1; let my_axum::x = 2;\n\
                    let msg = \"axum::Router is not here\"; let q = '\"'; // sled::Db\n\
                    let raw = r#\"sled::Db \"quoted\" \"#;\n\
                    let multi = \"first line\n sled::Db in a string\";\n\
                    fn f<'a>(x: &'a str) -> &'a str { x }\n";
        let v = check_file("edge-agent/src/agent.rs", text);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn parsing_bundle_bytes_outside_the_format_crate_is_reported() {
        // What edge-agent/src/updates/store.rs did before the format crate
        // had a header reader.
        let planted = "use ferry_runtime::{HEADER_LEN, MAGIC, MAX_MANIFEST_LEN, Manifest, from_cbor};\n\
                       if header[..MAGIC.len()] != MAGIC { }\n\
                       let f = ferry_format::parse_framing(&bytes)?;\n\
                       if bytes[..8] == *b\"FERRY\\0\\x01\\n\" {}\n";
        let v = check_file("edge-agent/src/updates/store.rs", planted);
        let lines: Vec<usize> = v.iter().map(|v| v.line).collect();
        assert!(
            lines.contains(&1) && lines.contains(&3) && lines.contains(&4),
            "{v:?}"
        );
        assert!(v.iter().any(|v| v.what.contains("from_cbor")), "{v:?}");
        assert!(v.iter().any(|v| v.what.contains("magic")), "{v:?}");
        assert!(check_file("format/src/bundle.rs", planted).is_empty());
        // The tensor-set format's own magic is not the bundle's.
        assert!(
            check_file(
                "guest-abi/src/lib.rs",
                "pub const MAGIC: &[u8; 4] = b\"FTS1\";\n"
            )
            .is_empty()
        );
    }

    #[test]
    fn manifests_depend_on_engines_only_in_their_rooms() {
        let m = "[package]\nname = \"x\"\n\n[dependencies]\nsled.workspace = true\n\
                 kv = { package = \"sled\", version = \"0.34\" }\n\
                 tract-hir = \"0.23\"\n# rumqttc = \"1\"\n\n[dev-dependencies]\naxum = \"0.8\"\n";
        let v = check_manifest("packager", m);
        let what: Vec<&str> = v.iter().map(|v| v.what.as_str()).collect();
        assert_eq!(v.len(), 4, "{what:?}");
        assert!(
            check_manifest(
                "host",
                "[dependencies]\nsled = { workspace = true, optional = true }\n"
            )
            .is_empty()
        );
        assert!(check_manifest("link", "[dependencies]\nrumqttc.workspace = true\n").is_empty());
    }
}
