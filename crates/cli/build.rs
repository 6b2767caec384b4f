//! Embeds the built-in configs (`configs/**/*.yaml`) and the recipes' sources
//! (`crates/recipes/src/**/*.rs`, for `tune cp <recipe>`) in the binary, so that `tune cp`,
//! `tune cat` and `tune run --config <name>` work from any directory.
//!
//! Generates `$OUT_DIR/builtin.rs` with two sorted tables of `(name, include_str!(path))`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let configs_dir = manifest.join("../../configs");
    let recipes_dir = manifest.join("../recipes/src");
    println!("cargo:rerun-if-changed={}", configs_dir.display());
    println!("cargo:rerun-if-changed={}", recipes_dir.display());

    let mut out = String::new();
    out.push_str("/// Built-in configs: (name without `.yaml`, YAML text), sorted by name.\n");
    out.push_str("pub static CONFIGS: &[(&str, &str)] = &[\n");
    for (name, path) in files(&configs_dir, "yaml") {
        let name = name.trim_end_matches(".yaml");
        writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    out.push_str(
        "];\n\n/// Recipe sources: (path under crates/recipes/src, Rust text), sorted by path.\n",
    );
    out.push_str("pub static RECIPE_SOURCES: &[(&str, &str)] = &[\n");
    for (name, path) in files(&recipes_dir, "rs") {
        writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n");

    let dest = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("builtin.rs");
    std::fs::write(dest, out).unwrap();
}

/// Every file under `root` with extension `ext`: (path relative to root with `/`, absolute path).
fn files(root: &Path, ext: &str) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    walk(root, root, ext, &mut found);
    found.sort();
    found
}

fn walk(root: &Path, dir: &Path, ext: &str, found: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, ext, found);
        } else if path.extension().is_some_and(|e| e == ext) {
            let rel = path.strip_prefix(root).unwrap();
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let abs = path.canonicalize().unwrap_or(path.clone());
            found.push((name, abs));
        }
    }
}
