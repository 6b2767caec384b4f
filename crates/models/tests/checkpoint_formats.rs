//! Checkpoint reading: safetensors (single and via an index), PyTorch `.bin` shards, and
//! torchtune's validation errors (missing/unexpected keys, wrong shapes, truncated files).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tune_models::builders::model_spec_from_node;
use tune_models::{checkpoint, ModelSpec};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stories_spec() -> ModelSpec {
    let node: serde_yaml::Value = serde_yaml::from_str(
        "{_component_: torchtune.models.llama2.llama2, vocab_size: 512, num_layers: 5, num_heads: 8,
          num_kv_heads: 4, embed_dim: 64, max_seq_len: 512, intermediate_dim: 172}",
    )
    .unwrap();
    model_spec_from_node(&node).unwrap()
}

fn logits(dir: &Path, files: &[&str]) -> Tensor {
    let files: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    let (model, _) =
        checkpoint::load_model(&stories_spec(), dir, &files, DType::F32, &Device::Cpu, 0).unwrap();
    let tokens = Tensor::new(&[[1u32, 50, 300, 7, 2, 480]], &Device::Cpu).unwrap();
    model.forward(&tokens, false).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    tune_core::compare::max_abs_diff(a, b).unwrap() as f32
}

fn load_err(dir: &Path, files: &[&str], spec: &ModelSpec) -> String {
    let files: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    match checkpoint::load_model(spec, dir, &files, DType::F32, &Device::Cpu, 0) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn pytorch_bin_shards_load_like_safetensors() {
    let reference = logits(&root().join("assets/stories260K"), &["model.safetensors"]);
    let from_bin = logits(
        &root().join("tests/fixtures/torch_bin"),
        &[
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
        ],
    );
    assert_eq!(max_abs_diff(&reference, &from_bin), 0.0);
}

#[test]
fn sharded_safetensors_via_index() {
    // torchtune's merged output of the trajectory run: one shard plus its index, lm_head included.
    let dir = tempfile::tempdir().unwrap();
    let fx = root().join("tests/fixtures/trajectory");
    for f in [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ] {
        std::fs::copy(fx.join(f), dir.path().join(f)).unwrap();
    }
    let via_index = logits(dir.path(), &["model.safetensors.index.json"]);
    let direct = logits(dir.path(), &["model-00001-of-00001.safetensors"]);
    assert_eq!(max_abs_diff(&via_index, &direct), 0.0);
}

#[test]
fn missing_and_unexpected_keys_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(
        root().join("assets/stories260K/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    tensors.remove("model.layers.3.mlp.up_proj.weight");
    tensors.insert(
        "model.layers.9.self_attn.q_proj.weight".into(),
        Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path(), &["model.safetensors"], &stories_spec());
    assert!(
        e.contains("missing base keys [layers.3.mlp.w3.weight"),
        "{e}"
    );
    assert!(
        e.contains("unexpected keys [layers.9.attn.q_proj.weight]"),
        "{e}"
    );
}

#[test]
fn wrong_shapes_name_the_tensor() {
    let mut spec = stories_spec();
    spec.transformer.intermediate_dim = 176;
    let stories = root().join("assets/stories260K");
    // config.json names the mismatch first.
    let e = load_err(&stories, &["model.safetensors"], &spec);
    assert!(
        e.contains("intermediate_size is 172 where model.intermediate_dim is 176"),
        "{e}"
    );
    // A config.json that agrees with the node while the weights do not: the shapes say which.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        stories.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stories.join("config.json")).unwrap())
            .unwrap();
    config["intermediate_size"] = 176.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = load_err(dir.path(), &["model.safetensors"], &spec);
    assert!(
        e.contains(
            "tensor `layers.0.mlp.w1.weight` has shape [172, 64], the model expects [176, 64]"
        ),
        "{e}"
    );
    assert!(
        e.contains(
            "tensor `layers.4.mlp.w2.weight` has shape [64, 172], the model expects [64, 176]"
        ),
        "{e}"
    );
}

#[test]
fn non_llama_names_are_unexpected() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(
        root().join("assets/stories260K/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    tensors.insert(
        "vision_tower.proj.weight".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path(), &["model.safetensors"], &stories_spec());
    assert!(e.contains("vision_tower.proj.weight"), "{e}");
}

#[test]
fn qlora_quantises_an_fp16_checkpoint_in_fp16_as_torchao() {
    let dir = tempfile::tempdir().unwrap();
    let source = root().join("assets/stories260K");
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).unwrap();
    let weights: HashMap<String, Tensor> =
        candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
            .collect();
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    let node: serde_yaml::Value = serde_yaml::from_str(
        "{_component_: torchtune.models.llama2.lora_llama2, lora_attn_modules: [q_proj, v_proj],
          vocab_size: 512, num_layers: 5, num_heads: 8, num_kv_heads: 4, embed_dim: 64,
          max_seq_len: 512, intermediate_dim: 172, lora_rank: 4, lora_alpha: 8, quantize_base: True}",
    )
    .unwrap();
    let spec = model_spec_from_node(&node).unwrap();
    let files = ["model.safetensors".to_string()];
    let (model, _) =
        checkpoint::load_model(&spec, dir.path(), &files, DType::F32, &Device::Cpu, 0).unwrap();
    // mlp.w1 (gate_proj) is frozen NF4: quantised from the fp16 tensor in fp16 arithmetic.
    let gate = &weights["model.layers.0.mlp.gate_proj.weight"];
    let want = tune_adapters::nf4::Nf4Tensor::quantize_source(gate, DType::F32, &Device::Cpu)
        .unwrap()
        .dequantize()
        .unwrap();
    let got = model.layers[0].mlp.w1.base_weight().unwrap();
    assert_eq!(tune_core::compare::max_abs_diff(&got, &want).unwrap(), 0.0);
    // The fp32 copy's own arithmetic would give other codes.
    let widened = gate.to_dtype(DType::F32).unwrap();
    let in_fp32 = tune_adapters::nf4::Nf4Tensor::quantize(&widened)
        .unwrap()
        .dequantize()
        .unwrap();
    assert!(tune_core::compare::max_abs_diff(&in_fp32, &want).unwrap() > 0.0);
}

/// Head counts do not show in the weights' shapes (8 heads of 8 and 4 of 16 give the same
/// q_proj): the model node must agree with config.json.
#[test]
fn head_counts_must_agree_with_config_json() {
    let mut spec = stories_spec();
    spec.transformer.num_heads = 4;
    spec.transformer.num_kv_heads = 2;
    let e = load_err(
        &root().join("assets/stories260K"),
        &["model.safetensors"],
        &spec,
    );
    assert!(
        e.contains("num_attention_heads is 8 where model.num_heads is 4")
            && e.contains("num_key_value_heads is 4 where model.num_kv_heads is 2"),
        "{e}"
    );
}

/// The error of loading stories260K's config.json with a safetensors file of this header and
/// data, written byte by byte.
fn load_raw_safetensors(header: &[u8], data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(data);
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    std::fs::copy(
        root().join("assets/stories260K/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    load_err(dir.path(), &["model.safetensors"], &stories_spec())
}

/// A safetensors file with a dtype candle does not load (an int8 export) is not called
/// truncated: the error says what to use instead.
#[test]
fn an_unsupported_dtype_is_not_called_truncated() {
    let header = br#"{"model.norm.weight":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}"#;
    let e = load_raw_safetensors(header, &[0, 0, 0, 0]);
    assert!(
        e.contains("holds tensors of a type tune-rs does not load") && !e.contains("truncated"),
        "{e}"
    );
}

/// A weight file with no named tensors (torch.save of a list or a whole module reads that way)
/// is named as such, rather than as every base key missing.
#[test]
fn a_file_without_named_tensors_is_named() {
    let e = load_raw_safetensors(b"{}", &[]);
    assert!(
        e.contains("holds no named tensors") && !e.contains("missing base keys"),
        "{e}"
    );
}

/// config.json says tie_word_embeddings but the checkpoint holds its own, different lm_head:
/// the output layer is that lm_head (as transformers loads it), not the embedding.
#[test]
fn a_distinct_lm_head_is_used_even_when_config_json_says_tied() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(
            root().join("assets/stories260K").join(name),
            dir.path().join(name),
        )
        .unwrap();
    }
    let path = dir.path().join("model.safetensors");
    let mut weights = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let embedding = &weights["model.embed_tokens.weight"];
    let lm_head = embedding.zeros_like().unwrap();
    weights.insert("lm_head.weight".to_string(), lm_head);
    candle_core::safetensors::save(&weights, &path).unwrap();
    let out = logits(dir.path(), &["model.safetensors"]);
    let largest = out.abs().unwrap().max_all().unwrap();
    assert_eq!(largest.to_scalar::<f32>().unwrap(), 0.0);
}
