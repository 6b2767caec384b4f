//! Shared helpers for recipe tests: paths and a trajectory-fixture config on temp dirs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Writes the first `rows` GSM8K rows (alpaca format) to `dir/data.json`.
pub fn gsm8k_rows(dir: &Path, rows: usize) -> PathBuf {
    let all: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("assets/data/gsm8k_first_512.json")).unwrap(),
    )
    .unwrap();
    let rows: Vec<serde_json::Value> = all.as_array().unwrap().iter().take(rows).cloned().collect();
    let path = dir.join("data.json");
    std::fs::write(&path, serde_json::to_string(&rows).unwrap()).unwrap();
    path
}

/// The bundled stories260K LoRA config with `output_dir` in `work`, the given overrides applied
/// and interpolations resolved. Paths are made absolute so tests run from any directory.
pub fn stories_config(work: &Path, overrides: &[&str]) -> tune_core::Config {
    builtin_config("stories260K/lora_single_device", work, overrides)
}

/// The built-in config `name` (e.g. `stories260K/lora_dpo_single_device`), prepared as
/// [`stories_config`] prepares its own.
pub fn builtin_config(name: &str, work: &Path, overrides: &[&str]) -> tune_core::Config {
    let root = root();
    let text = std::fs::read_to_string(root.join(format!("configs/{name}.yaml")))
        .unwrap()
        .replace("assets/", &format!("{}/assets/", root.display()));
    let mut config = tune_core::Config::from_yaml_str(&text).unwrap();
    let mut all: Vec<String> = vec![format!("output_dir={}", work.join("output").display())];
    all.extend(overrides.iter().map(|s| s.to_string()));
    config.apply_overrides(&all).unwrap();
    config.resolve_interpolations().unwrap();
    config
}

/// The real stories260K with LoRA on q/v (rank 4, alpha 8) and `extra` builder arguments
/// (YAML, e.g. `"lora_dropout: 0.1"`), its weights loaded; `seed` initialises the adapters.
pub fn stories_lora_model(extra: &str, seed: u64) -> tune_models::TransformerDecoder {
    tune_recipes::link();
    let node: serde_yaml::Value = serde_yaml::from_str(&format!(
        "{{_component_: torchtune.models.llama2.lora_llama2, lora_attn_modules: [q_proj, v_proj],
          vocab_size: 512, num_layers: 5, num_heads: 8, num_kv_heads: 4, embed_dim: 64,
          max_seq_len: 512, intermediate_dim: 172, lora_rank: 4, lora_alpha: 8.0, {extra}}}"
    ))
    .unwrap();
    let spec = tune_models::builders::model_spec_from_node(&node).unwrap();
    let (model, _) = tune_models::checkpoint::load_model(
        &spec,
        &root().join("assets/stories260K"),
        &["model.safetensors".into()],
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        seed,
    )
    .unwrap();
    model
}

/// A copy of the bundled stories260K checkpoint folder (in a temp dir), without the file
/// `left_out` ("" for none).
pub fn stories_copy_without(left_out: &str) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(root().join("assets/stories260K")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != left_out {
            std::fs::copy(&path, copy.path().join(name)).unwrap();
        }
    }
    copy
}
