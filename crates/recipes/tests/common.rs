//! Shared helpers for recipe tests: paths and a trajectory-fixture config on temp dirs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Writes the first `rows` GSM8K rows (alpaca format) to `dir/data.json`.
pub fn gsm8k_rows(dir: &Path, rows: usize) -> PathBuf {
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("assets/data/gsm8k_first_512.json")).unwrap()).unwrap();
    let rows: Vec<serde_json::Value> = all.as_array().unwrap().iter().take(rows).cloned().collect();
    let path = dir.join("data.json");
    std::fs::write(&path, serde_json::to_string(&rows).unwrap()).unwrap();
    path
}

/// torchtune's trajectory config (tests/fixtures/trajectory/config.yaml) with its placeholders
/// pointed at a temp work dir, the bundled model and the fixture's initial adapter.
pub fn trajectory_config(work: &Path) -> String {
    let data = gsm8k_rows(work, 96);
    let text = std::fs::read_to_string(root().join("tests/fixtures/trajectory/config.yaml")).unwrap();
    let root = root();
    text.replace("<WORK>/output", &work.join("output").display().to_string())
        .replace("<WORK>/stories260K_ckpt", &root.join("assets/stories260K").display().to_string())
        .replace("<WORK>/gsm8k_first96.json", &data.display().to_string())
        .replace("<SHARED>/assets/stories260K/tokenizer.model", &root.join("assets/stories260K/tokenizer.model").display().to_string())
        .replace(
            "adapter_checkpoint: null",
            &format!("adapter_checkpoint: {}", root.join("tests/fixtures/lora_step/adapter_init.safetensors").display()),
        )
}

/// The bundled stories260K LoRA config with `output_dir` in `work`, the given overrides applied
/// and interpolations resolved. Paths are made absolute so tests run from any directory.
pub fn stories_config(work: &Path, overrides: &[&str]) -> tune_core::Config {
    let root = root();
    let text = std::fs::read_to_string(root.join("configs/stories260K/lora_single_device.yaml"))
        .unwrap()
        .replace("assets/", &format!("{}/assets/", root.display()));
    let mut config = tune_core::Config::from_yaml_str(&text).unwrap();
    let mut all: Vec<String> = vec![format!("output_dir={}", work.join("output").display())];
    all.extend(overrides.iter().map(|s| s.to_string()));
    config.apply_overrides(&all).unwrap();
    config.resolve_interpolations().unwrap();
    config
}
