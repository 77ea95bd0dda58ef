//! The tidy check over the whole workspace: every crate's manifest and
//! `src/` keep each engine in its room, and only ferry-format parses bundle
//! bytes. On a
//! failure the message lists `path:line: what` for every violation.

use std::path::{Path, PathBuf};

/// Read at run time: a binary reused from a shared target directory may have
/// been compiled from a checkout at another path.
fn workspace_root() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `src/` directory of every workspace member (a `Cargo.toml` next to
/// a `src/`, outside `target/` and hidden directories).
fn source_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !path.is_dir() || name.starts_with('.') || name == "target" || name == "src" {
                continue;
            }
            if path.join("Cargo.toml").is_file() && path.join("src").is_dir() {
                dirs.push(path.join("src"));
            }
            stack.push(path);
        }
    }
    dirs
}

#[test]
fn every_engine_stays_in_its_room_and_only_the_format_crate_parses_bundles() {
    let root = workspace_root().canonicalize().unwrap();
    let dirs = source_dirs(&root);
    assert!(
        dirs.len() >= 10,
        "found only {} crates under {}: {dirs:?}",
        dirs.len(),
        root.display()
    );
    let mut files = Vec::new();
    for d in &dirs {
        rust_files(d, &mut files);
    }
    let mut violations = Vec::new();
    for src in &dirs {
        let crate_dir = src.parent().unwrap();
        let rel = crate_dir
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if rel == "tidy" {
            continue;
        }
        let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
        violations.extend(ferry_tidy::check_manifest(&rel, &manifest));
    }
    for file in &files {
        let rel = file
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if rel.starts_with("tidy/") {
            // The checker's own tests plant violations on purpose.
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        violations.extend(ferry_tidy::check_file(&rel, &text));
    }
    assert!(
        violations.is_empty(),
        "{} tidy violation(s):\n{}",
        violations.len(),
        violations
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
