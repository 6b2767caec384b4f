//! Where the test fixtures live, relative to this crate.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The workspace root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

pub fn tokenizer_fixture(name: &str) -> serde_json::Value {
    let path = fixtures().join("tokenizer").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn tok512_path() -> PathBuf {
    fixtures().join("stories260K/tokenizer.model")
}

/// Meta's Llama-2 tokenizer is not shipped in this repo (its licence): it is read from the shared
/// assets beside the repo, and tests that need it are skipped with a message when it is absent.
pub fn llama2_path() -> Option<PathBuf> {
    let path = repo_root().join("../shared/assets/llama2-tokenizer/tokenizer.model");
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: Meta's Llama-2 tokenizer.model not found at {} (it is not shipped in this repo)",
            path.display()
        );
        None
    }
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("a list of ids")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

pub fn i64s(value: &serde_json::Value) -> Vec<i64> {
    value
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v.as_i64().expect("an int"))
        .collect()
}

pub fn bools(value: &serde_json::Value) -> Vec<bool> {
    value
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v.as_bool().expect("a bool"))
        .collect()
}
