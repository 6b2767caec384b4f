//! DoRA parity with torchtune 0.6.1's DoRALinear on the real stories260K model
//! (tests/fixtures/dora_step, see its meta.json), through the public builder
//! (`torchtune.models.llama2.lora_llama2` with `use_dora: True`): logits, hidden states, loss,
//! every gradient (magnitude included), 5 AdamW steps, the merged weights, and the PEFT export.
//!
//! As in the fixture, the adapter (lora_a, lora_b and magnitude) comes from adapter_init: the
//! magnitude is the file's (the base row norms), not recomputed from the loaded A and B.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tune_models::convert::permute_hf_to_tune;
use tune_models::decoder::Forward;
use tune_models::{builders, ModelSpec, TransformerDecoder};
use tune_recipes::checkpointer::{HfCheckpointer, RecipeState, SourceLayout};
use tune_recipes::loss::chunked_ce_sum;
use tune_recipes::optim::{AdamW, AdamWConfig};
use tune_recipes::selfcheck::{max_abs_diff, rel_norm_diff};

fn fx() -> PathBuf {
    common::root().join("tests/fixtures/dora_step")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn fixture(name: &str) -> HashMap<String, Tensor> {
    load(&fx().join(name))
}

fn checkpointer(output_dir: &Path) -> HfCheckpointer {
    HfCheckpointer {
        checkpoint_dir: common::root().join("assets/stories260K"),
        checkpoint_files: vec!["model.safetensors".into()],
        adapter_checkpoint: None,
        recipe_checkpoint: None,
        resume_from_checkpoint: false,
        output_dir: output_dir.to_path_buf(),
        model_type: "LLAMA2".into(),
    }
}

/// meta.json's model through the registry, stories260K base weights, the fixture's adapter.
fn build(output_dir: &Path) -> (TransformerDecoder, ModelSpec, SourceLayout, HfCheckpointer) {
    tune_recipes::link();
    let node: serde_yaml::Value = serde_yaml::from_str(
        "{_component_: torchtune.models.llama2.lora_llama2, lora_attn_modules: [q_proj, v_proj],
          apply_lora_to_mlp: False, apply_lora_to_output: False, vocab_size: 512, num_layers: 5,
          num_heads: 8, num_kv_heads: 4, embed_dim: 64, max_seq_len: 512, intermediate_dim: 172,
          norm_eps: 1e-5, lora_rank: 4, lora_alpha: 8.0, lora_dropout: 0.0, use_dora: True}",
    )
    .unwrap();
    let spec = builders::model_spec_from_node(&node).unwrap();
    assert_eq!(spec.lora.as_ref().unwrap().adapter.kind, "dora");
    let ckpt = checkpointer(output_dir);
    let (model, spec, layout) = ckpt.load_base(&spec, DType::F32, &Device::Cpu, 0).unwrap();
    model
        .load_adapter(&fixture("adapter_init.safetensors"))
        .unwrap();
    (model, spec, layout, ckpt)
}

fn loss_of(model: &TransformerDecoder, batch: &HashMap<String, Tensor>) -> Tensor {
    let logits = model.forward(&batch["tokens"], true).unwrap();
    let (sum, n) = chunked_ce_sum(&logits, &batch["labels"]).unwrap();
    assert_eq!(n, 83, "meta.json num_shifted_labels_not_ignored");
    (sum / n as f64).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn forward_gradients_adamw_steps_and_merge_match_torchtune() {
    let work = tempfile::tempdir().unwrap();
    let (model, _, _, _) = build(work.path());
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx().join("meta.json")).unwrap()).unwrap();
    let batch = fixture("batch.safetensors");

    // Parameter names and order: torchtune's get_adapter_params.
    let params = model.adapter_params();
    let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    let want_names: Vec<&str> = meta["adapter_param_order_get_adapter_params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(names, want_names);

    // Forward at init, with and without the adapter.
    let out = model
        .forward_with(
            &batch["tokens"],
            Forward {
                train: true,
                capture_hidden: true,
                ..Default::default()
            },
        )
        .unwrap();
    let logits = fixture("logits.safetensors");
    let d = max_abs_diff(&out.logits, &logits["logits"]).unwrap();
    eprintln!("logits max abs diff {d:.3e}");
    assert!(d <= 1e-4, "logits {d}");
    let hidden = fixture("hidden_states.safetensors");
    for (name, t) in &out.hidden {
        let d = max_abs_diff(t, &hidden[name]).unwrap();
        assert!(d <= 1e-4, "hidden state {name}: {d}");
    }
    let base = model
        .forward_with(
            &batch["tokens"],
            Forward {
                adapters_disabled: true,
                ..Default::default()
            },
        )
        .unwrap();
    let d = max_abs_diff(&base.logits, &logits["base_logits_adapter_disabled"]).unwrap();
    assert!(d <= 1e-4, "adapter-disabled logits {d}");

    // Merged weights at init.
    let merged_init = fixture("merged_init.safetensors");
    for (prefix, layer) in model.linears() {
        if let Some(want) = merged_init.get(&format!("{prefix}.weight")) {
            let d = max_abs_diff(&layer.merged_weight().unwrap(), want).unwrap();
            assert!(d <= 1e-6, "{prefix} merged at init: {d}");
        }
    }

    // Five AdamW steps on the same batch, as the fixture took them.
    let want_losses: Vec<f64> =
        serde_json::from_value(meta["losses_before_each_step"].clone()).unwrap();
    let want_grads = fixture("grads.safetensors");
    let per_step = fixture("adapter_per_step.safetensors");
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 1e-2,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        },
        params.clone(),
    )
    .unwrap();
    let (mut adapter_max, mut beyond_1e5, mut total, mut grad_rel) = (0f64, 0usize, 0usize, 0f64);
    for (step, want_loss) in want_losses.iter().enumerate() {
        let loss = loss_of(&model, &batch);
        let rel = (scalar(&loss) - want_loss).abs() / want_loss;
        eprintln!(
            "step {step}: loss {:.7} (torchtune {want_loss:.7}, rel {rel:.2e})",
            scalar(&loss)
        );
        assert!(
            rel <= 1e-5,
            "step {step}: loss {} vs {want_loss}",
            scalar(&loss)
        );
        let store = loss.backward().unwrap();
        let grads: Vec<Tensor> = params
            .iter()
            .map(|(_, v)| store.get(v.as_tensor()).unwrap().clone())
            .collect();
        if step == 0 {
            for ((name, _), g) in params.iter().zip(&grads) {
                let r = rel_norm_diff(g, &want_grads[name]).unwrap();
                grad_rel = grad_rel.max(r);
                assert!(r <= 1e-4, "gradient of {name}: relative difference {r}");
            }
        }
        opt.step(&grads, 1e-2).unwrap();
        for (name, var) in &params {
            let want = &per_step[&format!("step{}.{name}", step + 1)];
            adapter_max = adapter_max.max(max_abs_diff(var.as_tensor(), want).unwrap());
            let diff: Vec<f32> = (var.as_tensor() - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            beyond_1e5 += diff.iter().filter(|x| **x > 1e-5).count();
            total += diff.len();
        }
    }
    eprintln!("grad max rel norm diff {grad_rel:.2e}; adapter after 5 steps max abs diff {adapter_max:.2e}, {beyond_1e5}/{total} beyond 1e-5");
    // Same AdamW tolerance as lora_step (see its comment): Adam amplifies fp32 noise in tiny gradients.
    assert!(
        adapter_max <= 5e-5,
        "adapter after 5 steps: max abs diff {adapter_max}"
    );
    assert!(
        beyond_1e5 * 1000 <= total,
        "{beyond_1e5} of {total} adapter entries beyond 1e-5"
    );
    let final_loss = scalar(&loss_of(&model, &batch));
    let want_final = meta["loss_after_all_steps"].as_f64().unwrap();
    assert!(
        (final_loss - want_final).abs() / want_final <= 1e-5,
        "final loss {final_loss} vs {want_final}"
    );
    let d = max_abs_diff(
        &model.forward(&batch["tokens"], true).unwrap(),
        &fixture("logits_final.safetensors")["logits"],
    )
    .unwrap();
    assert!(d <= 1e-3, "final logits {d}");
    let merged_final = fixture("merged_final.safetensors");
    for (prefix, layer) in model.linears() {
        if let Some(want) = merged_final.get(&format!("{prefix}.weight")) {
            let d = max_abs_diff(&layer.merged_weight().unwrap(), want).unwrap();
            assert!(d <= 1e-4, "{prefix} merged after 5 steps: {d}");
        }
    }
}

/// The checkpointer's DoRA export: PEFT names, q/k `lora_magnitude_vector` rows permuted to HF
/// layout (what makes PEFT reproduce torchtune's logits; torchtune itself forgets to), `use_dora`
/// in adapter_config.json, merged weights `(W + sBA) m / ||W + sBA||` in HF layout.
#[test]
fn save_writes_peft_dora_with_hf_layout_magnitude() {
    let work = tempfile::tempdir().unwrap();
    let (model, spec, layout, ckpt) = build(work.path());
    let opt = AdamW::new(
        AdamWConfig {
            lr: 1e-2,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        },
        model.adapter_params(),
    )
    .unwrap();
    let state = RecipeState {
        epochs_run: 1,
        global_step: 0,
        batches_in_epoch: 0,
        seed: 0,
        total_epochs: 1,
        max_steps_per_epoch: None,
        gradient_accumulation_steps: 1,
        optimizer_step: 0,
        world_size: 1,
        batch_size: None,
        steps_per_epoch: None,
        data_order: None,
        quantize_base: None,
    };
    let dir = ckpt
        .save("epoch_0", &model, &spec, &layout, true, &state, &opt)
        .unwrap();

    let ours = load(&dir.join("adapter/adapter_model.safetensors"));
    let want = fixture("adapter_init_peft_magnitude_hf_layout.safetensors");
    assert_eq!(ours.len(), want.len());
    for (name, t) in &want {
        let got = ours
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from the PEFT adapter"));
        assert_eq!(max_abs_diff(got, t).unwrap(), 0.0, "{name}");
    }
    // torchtune's own export leaves the q magnitude in its layout: ours must differ there.
    let torchtune_as_is = fixture("adapter_init_peft.safetensors");
    let q_mag = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    assert!(max_abs_diff(&ours[q_mag], &torchtune_as_is[q_mag]).unwrap() > 0.0);

    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["use_dora"], serde_json::Value::Bool(true));
    assert_eq!(config["peft_type"], "LORA");

    // Merged q_proj, back from HF layout, is torchtune's merged DoRA weight.
    let merged = load(&dir.join("model-00001-of-00001.safetensors"));
    let q = permute_hf_to_tune(&merged["model.layers.2.self_attn.q_proj.weight"], 8).unwrap();
    let d = max_abs_diff(
        &q,
        &fixture("merged_init.safetensors")["layers.2.attn.q_proj.weight"],
    )
    .unwrap();
    assert!(d <= 1e-6, "merged q_proj {d}");
}

/// torchtune's own PEFT export of a DoRA adapter (an adapter_config.json without `use_dora`, q/k
/// magnitudes left in torchtune's row order) reads back as exactly the adapter torchtune
/// trained, as PEFT's export of it does (`use_dora: true`, every row in HF layout). Generation
/// and eval load the torchtune folder as DoRA from the folder alone and give torchtune's logits.
#[test]
fn torchtune_and_peft_dora_exports_read_back_as_torchtunes_adapter() {
    let work = tempfile::tempdir().unwrap();
    let (_, spec, _, _) = build(work.path());
    let want = fixture("adapter_final.safetensors");
    let torchtune_config = serde_json::json!({
        "r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA",
    });
    let mut peft_config = torchtune_config.clone();
    peft_config["use_dora"] = serde_json::Value::Bool(true);
    let folder = |name: &str, weights: &str, config: &serde_json::Value| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(fx().join(weights), dir.join("adapter_model.safetensors")).unwrap();
        std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
        dir
    };
    let torchtune_dir = folder(
        "torchtune",
        "adapter_final_peft.safetensors",
        &torchtune_config,
    );
    let peft_dir = folder(
        "peft",
        "adapter_final_peft_magnitude_hf_layout.safetensors",
        &peft_config,
    );
    for dir in [&torchtune_dir, &peft_dir] {
        let got = HfCheckpointer::read_adapter(dir, &spec).unwrap();
        assert_eq!(got.len(), want.len());
        for (name, t) in &want {
            assert_eq!(max_abs_diff(&got[name], t).unwrap(), 0.0, "{dir:?}: {name}");
        }
    }
    // Read for a plain LoRA model, it says what it is.
    let lora_node: serde_yaml::Value = serde_yaml::from_str(
        "{_component_: torchtune.models.llama2.lora_llama2, lora_attn_modules: [q_proj, v_proj],
          vocab_size: 512, num_layers: 5, num_heads: 8, num_kv_heads: 4, embed_dim: 64,
          max_seq_len: 512, intermediate_dim: 172, lora_rank: 4, lora_alpha: 8.0}",
    )
    .unwrap();
    let lora_spec = builders::model_spec_from_node(&lora_node).unwrap();
    let e = HfCheckpointer::read_adapter(&torchtune_dir, &lora_spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("set model.use_dora=True"), "{e}");
    // DoRA by its torchtune alias reads it the same way.
    let alias_node: serde_yaml::Value = serde_yaml::from_str(
        "{_component_: torchtune.models.llama2.lora_llama2, lora_attn_modules: [q_proj, v_proj],
          vocab_size: 512, num_layers: 5, num_heads: 8, num_kv_heads: 4, embed_dim: 64,
          max_seq_len: 512, intermediate_dim: 172, lora_rank: 4, lora_alpha: 8.0,
          adapter: torchtune.modules.peft.DoRALinear}",
    )
    .unwrap();
    let alias_spec = builders::model_spec_from_node(&alias_node).unwrap();
    let got = HfCheckpointer::read_adapter(&torchtune_dir, &alias_spec).unwrap();
    assert_eq!(
        max_abs_diff(
            &got["layers.0.attn.q_proj.magnitude"],
            &want["layers.0.attn.q_proj.magnitude"]
        )
        .unwrap(),
        0.0
    );
    // A config with PEFT's task_type but no use_dora is not torchtune's: read in PEFT's layout.
    let mut peft_without_use_dora = torchtune_config.clone();
    peft_without_use_dora["task_type"] = serde_json::json!("CAUSAL_LM");
    let not_torchtune = folder(
        "not_torchtune",
        "adapter_final_peft_magnitude_hf_layout.safetensors",
        &peft_without_use_dora,
    );
    let got = HfCheckpointer::read_adapter(&not_torchtune, &spec).unwrap();
    for (name, t) in &want {
        assert_eq!(max_abs_diff(&got[name], t).unwrap(), 0.0, "{name}");
    }
    // The same torchtune file said to be PEFT's would move its q magnitudes.
    let mislabelled = folder(
        "mislabelled",
        "adapter_final_peft.safetensors",
        &peft_config,
    );
    let got = HfCheckpointer::read_adapter(&mislabelled, &spec).unwrap();
    let q_mag = "layers.0.attn.q_proj.magnitude";
    assert!(max_abs_diff(&got[q_mag], &want[q_mag]).unwrap() > 0.0);

    let config = common::builtin_config(
        "stories260K/generation",
        work.path(),
        &[&format!("adapter_dir={}", torchtune_dir.display())],
    );
    let loaded = tune_recipes::inference::load_for_inference(
        &tune_recipes::settings::TopLevel(&config),
        DType::F32,
        &Device::Cpu,
        0,
    )
    .unwrap();
    assert_eq!(loaded.spec.lora.as_ref().unwrap().adapter.kind, "dora");
    let batch = fixture("batch.safetensors");
    let d = max_abs_diff(
        &loaded.model.forward(&batch["tokens"], false).unwrap(),
        &fixture("logits_final.safetensors")["logits"],
    )
    .unwrap();
    assert!(
        d <= 1e-3,
        "logits of torchtune's exported DoRA adapter: {d}"
    );
}
