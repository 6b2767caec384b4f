//! What other loaders need of the files a run writes: safetensors headers with torch's
//! `format: pt` metadata (older transformers fail without it), an adapter config that names its
//! base model, and an untied config.json once the output layer is adapted, even when the input
//! config said tied while its weights held their own `lm_head`.

mod common;

use std::path::Path;

use candle_core::Device;
use tune_core::recipe::RunOptions;
use tune_recipes::lora_finetune_single_device::train;

/// The metadata of a safetensors file's header.
fn header_metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header["__metadata__"].clone()
}

#[test]
fn a_tied_config_with_its_own_lm_head_is_untied_once_the_output_is_adapted() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    // stories260K says tie_word_embeddings: true; give its weights an explicit lm_head anyway.
    let model_dir = work.path().join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let source = common::root().join("assets/stories260K");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model_dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut weights =
        candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu).unwrap();
    let embedding = weights["model.embed_tokens.weight"].clone();
    weights.insert("lm_head.weight".to_string(), embedding);
    candle_core::safetensors::save(&weights, model_dir.join("model.safetensors")).unwrap();

    let checkpoint_dir = format!("checkpointer.checkpoint_dir={}", model_dir.display());
    let config = common::stories_config(
        work.path(),
        &[
            &checkpoint_dir,
            "model.apply_lora_to_output=True",
            "max_steps_per_epoch=2",
            "tokenizer.max_seq_len=64",
        ],
    );
    let summary = train(config, &RunOptions::default()).unwrap();
    let epoch = summary.last_checkpoint.unwrap();

    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(epoch.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["tie_word_embeddings"], serde_json::json!(false));

    let adapter_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(epoch.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        adapter_config["base_model_name_or_path"],
        serde_json::json!(std::path::absolute(&model_dir)
            .unwrap()
            .display()
            .to_string())
    );

    let pt = serde_json::json!({"format": "pt"});
    assert_eq!(
        header_metadata(&epoch.join("adapter/adapter_model.safetensors")),
        pt
    );
    assert_eq!(
        header_metadata(&epoch.join("model-00001-of-00001.safetensors")),
        pt
    );
}
