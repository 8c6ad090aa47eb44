//! Replays the committed fuzz seed corpus (`fuzz/corpus/<target>/`) through
//! the same checks the cargo-fuzz targets run, so CI exercises every seed on
//! stable Rust. Fuzzing itself is described in fuzz/README.md.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

/// A fuzz target's check: panics when an invariant breaks.
type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 6] = [
    ("route", checks::route),
    ("www_authenticate", checks::www_authenticate),
    ("range", checks::range),
    ("manifest", checks::manifest),
    ("digest", checks::digest),
    ("authorization", checks::authorization),
];

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn replay(target: &str) {
    let (_, check) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let dir = corpus_dir().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: seeds failed: {failed:#?}");
}

#[test]
fn route_seeds() {
    replay("route");
}

#[test]
fn www_authenticate_seeds() {
    replay("www_authenticate");
}

#[test]
fn range_seeds() {
    replay("range");
}

#[test]
fn manifest_seeds() {
    replay("manifest");
}

#[test]
fn digest_seeds() {
    replay("digest");
}

#[test]
fn authorization_seeds() {
    replay("authorization");
}

/// A corpus directory without a replaying test would go unchecked.
#[test]
fn every_corpus_dir_is_replayed() {
    for entry in std::fs::read_dir(corpus_dir()).expect("fuzz/corpus exists") {
        let name = entry.expect("readable directory entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            TARGETS.iter().any(|(target, _)| *target == name),
            "fuzz/corpus/{name} has no test here"
        );
    }
}
