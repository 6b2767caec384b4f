//! What other loaders need of the files a run writes: safetensors headers with torch's
//! `format: pt` metadata (older transformers fail without it), an adapter config that names its
//! base model, and an untied config.json once the output layer is adapted, even when the input
//! config said tied while its weights held their own `lm_head`.

mod common;

use std::path::Path;

use candle_core::Device;
use tune_core::recipe::RunOptions;
use tune_recipes::checkpointer::serving_limits;
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
    let model_copy = common::stories_copy_without("");
    let model_dir = model_copy.path().to_path_buf();
    let source = common::root().join("assets/stories260K");
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
    // mistral.rs refuses lm_head adapters: the save says so.
    let limits = serving_limits(&adapter_config);
    assert_eq!(limits.len(), 1, "{limits:?}");
    assert!(limits[0].contains("lm_head") && limits[0].contains("mistral.rs"));
    assert_eq!(
        adapter_config["base_model_name_or_path"],
        serde_json::json!(std::path::absolute(&model_dir)
            .unwrap()
            .display()
            .to_string())
    );

    // Checkpoint files are as readable as any file the process creates (the umask decides):
    // a serving process running as another user can read them.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let config_mode = mode(&epoch.join("adapter/adapter_config.json"));
        for file in [
            "adapter/adapter_model.safetensors",
            "model-00001-of-00001.safetensors",
            "recipe_state/optimizer.safetensors",
        ] {
            assert_eq!(mode(&epoch.join(file)), config_mode, "{file}");
        }
    }

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

/// What vLLM (0.33, `vllm/lora/peft_helper.py`, `lora/utils.py`, `lora/lora_model.py`) and
/// mistral.rs (0.9.2, `mistralrs-quant/src/lora`) require of a LoRA adapter folder, checked on
/// one trained with LoRA on every attention and MLP projection: `r`, `lora_alpha` and
/// `target_modules` set, no DoRA/bias/modules_to_save, every tensor named
/// `base_model.model.<HF module path>.lora_A|lora_B.weight` for a module listed in
/// `target_modules`, A as [r, in] and B as [out, r] of the base weight, in pairs.
#[test]
fn lora_adapters_are_what_vllm_and_mistral_rs_load() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let config = common::stories_config(
        work.path(),
        &[
            "model.lora_attn_modules=[q_proj,k_proj,v_proj,output_proj]",
            "model.apply_lora_to_mlp=True",
            "max_steps_per_epoch=1",
            "tokenizer.max_seq_len=64",
        ],
    );
    let summary = train(config, &RunOptions::default()).unwrap();
    let adapter_dir = summary.last_checkpoint.unwrap().join("adapter");
    let adapter_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();

    let rank = adapter_config["r"].as_u64().unwrap() as usize;
    assert!(rank > 0 && rank <= 16, "vLLM's default max_lora_rank is 16");
    assert!(adapter_config["lora_alpha"].as_f64().is_some());
    assert_eq!(adapter_config["peft_type"], "LORA");
    for refused_when_set in ["use_dora", "modules_to_save", "layer_replication"] {
        let value = &adapter_config[refused_when_set];
        assert!(
            value.is_null() || value == false,
            "{refused_when_set}: {value}"
        );
    }
    assert!(adapter_config["bias"].is_null() || adapter_config["bias"] == "none");
    let targets: Vec<&str> = adapter_config["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let mut sorted = targets.clone();
    sorted.sort();
    let mut llama_projections = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    llama_projections.sort();
    assert_eq!(sorted, llama_projections);
    assert!(serving_limits(&adapter_config).is_empty());

    let base = candle_core::safetensors::load(
        common::root().join("assets/stories260K/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let adapter =
        candle_core::safetensors::load(adapter_dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let layers = 5;
    assert_eq!(adapter.len(), layers * targets.len() * 2);
    for (name, tensor) in &adapter {
        let module_path = name
            .strip_prefix("base_model.model.")
            .unwrap_or_else(|| panic!("{name}: vLLM and mistral.rs want base_model.model."));
        let (site, which) = module_path
            .strip_suffix(".weight")
            .and_then(|n| n.rsplit_once('.'))
            .unwrap_or_else(|| panic!("{name}: not <module>.lora_A/B.weight"));
        let leaf = site.rsplit('.').next().unwrap();
        assert!(
            targets.contains(&leaf),
            "{name}: {leaf} not in target_modules"
        );
        // The same module path as the base weight (mistral.rs matches sites by it).
        let (out_features, in_features) = base[&format!("{site}.weight")].dims2().unwrap();
        match which {
            "lora_A" => assert_eq!(tensor.dims(), [rank, in_features], "{name}"),
            "lora_B" => assert_eq!(tensor.dims(), [out_features, rank], "{name}"),
            other => panic!("{name}: {other} is neither lora_A nor lora_B"),
        }
        let partner = if which == "lora_A" {
            "lora_B"
        } else {
            "lora_A"
        };
        assert!(adapter.contains_key(&format!("base_model.model.{site}.{partner}.weight")));
    }
}

#[test]
fn serving_limits_name_dora() {
    let dora = serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true,
        "target_modules": ["q_proj", "v_proj"],
    });
    let limits = serving_limits(&dora);
    assert_eq!(limits.len(), 1);
    assert!(limits[0].contains("DoRA") && limits[0].contains("vLLM"));
    let ia3 = serde_json::json!({"peft_type": "IA3", "target_modules": ["k_proj", "lm_head"]});
    let limits = serving_limits(&ia3);
    assert_eq!(limits.len(), 1, "{limits:?}");
    assert!(limits[0].contains("IA3 adapter loads in Hugging Face PEFT only"));
}

/// A bf16 run over fp32 weights holds a bf16-rounded copy of the base; the merged weights it
/// writes (fp32, as the input) are the checkpoint's own: untouched tensors bit for bit, adapted
/// ones the original plus the saved adapter's update, each rounded once in fp32. The adapter on
/// all linears and the tied output covers every path, DoRA too.
#[test]
fn a_bf16_run_merges_over_the_checkpoints_own_weights() {
    tune_recipes::link();
    // LoRA, DoRA, and QLoRA (whose NF4 projections merge over their dequantised base, the
    // rest over the checkpoint's own tensors).
    for (dora, qlora) in [("False", "False"), ("True", "False"), ("False", "True")] {
        let work = tempfile::tempdir().unwrap();
        let use_dora = format!("model.use_dora={dora}");
        let quantize_base = format!("model.quantize_base={qlora}");
        let overrides = [
            &quantize_base,
            "dtype=bf16",
            "max_steps_per_epoch=2",
            "lr_scheduler.num_warmup_steps=0",
            "optimizer.lr=1e-2",
            "model.lora_attn_modules=[q_proj,k_proj,v_proj,output_proj]",
            "model.apply_lora_to_mlp=True",
            "model.apply_lora_to_output=True",
            &use_dora,
        ];
        train(
            common::stories_config(work.path(), &overrides),
            &RunOptions::default(),
        )
        .unwrap();
        let load = |p: std::path::PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
        let original = load(common::root().join("assets/stories260K/model.safetensors"));
        let epoch = work.path().join("output/epoch_0");
        let merged = load(epoch.join("model-00001-of-00001.safetensors"));
        let max_diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
            tune_core::compare::max_abs_diff(a, b).unwrap()
        };
        for (name, before) in &original {
            let after = &merged[name];
            assert_eq!(after.dtype(), candle_core::DType::F32, "{name}");
            let moved = max_diff(after, before);
            if name.ends_with("proj.weight") {
                // Every projection is adapted and trained: it moved.
                assert!(
                    moved > 0.0,
                    "dora {dora} qlora {qlora}: {name} did not change"
                );
            } else {
                let label = format!("dora {dora} qlora {qlora}: {name}");
                assert_eq!(moved, 0.0, "{label} is not the checkpoint's own");
            }
        }
        if dora == "False" && qlora == "False" {
            // LoRA: exactly W + (alpha / rank) B A with the saved adapter, in fp32.
            let peft = load(epoch.join("adapter/adapter_model.safetensors"));
            for name in [
                "model.layers.0.self_attn.q_proj",
                "model.layers.3.mlp.down_proj",
            ] {
                let f32 = |leaf: &str| {
                    peft[&format!("base_model.model.{name}.{leaf}.weight")]
                        .to_dtype(candle_core::DType::F32)
                        .unwrap()
                };
                let update = (f32("lora_B").matmul(&f32("lora_A")).unwrap() * 2.0).unwrap();
                let expected = (&original[&format!("{name}.weight")] + update).unwrap();
                let d = max_diff(&merged[&format!("{name}.weight")], &expected);
                assert!(d <= 1e-6, "{name}: merged is off W + dW by {d}");
            }
            let update =
                (&merged["lm_head.weight"] - &original["model.embed_tokens.weight"]).unwrap();
            assert!(max_diff(&update, &update.zeros_like().unwrap()) > 0.0);
        }
    }
}

/// torchtune's own adapter names (its adapter_model.pt; our recipe_state) include the output
/// layer's `output.lora_a.weight`: a warm start reads them all back.
#[test]
fn torchtune_named_adapters_with_an_output_adapter_read_back() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let settings = [
        "max_steps_per_epoch=1",
        "model.apply_lora_to_output=True",
        "save_adapter_weights_only=True",
    ];
    train(
        common::stories_config(work.path(), &settings),
        &RunOptions::default(),
    )
    .unwrap();
    let saved = work
        .path()
        .join("output/epoch_0/recipe_state/adapter_torchtune.safetensors");
    let names = candle_core::safetensors::load(&saved, &Device::Cpu).unwrap();
    assert!(names.contains_key("output.lora_a.weight"));
    // At learning rate 0 the warm-started adapter is saved unchanged.
    let again = tempfile::tempdir().unwrap();
    let warm_start = format!("checkpointer.adapter_checkpoint={}", saved.display());
    let mut overrides = settings.to_vec();
    overrides.extend(["optimizer.lr=0.0", &warm_start]);
    train(
        common::stories_config(again.path(), &overrides),
        &RunOptions::default(),
    )
    .unwrap();
    let resaved = again
        .path()
        .join("output/epoch_0/recipe_state/adapter_torchtune.safetensors");
    let reread = candle_core::safetensors::load(&resaved, &Device::Cpu).unwrap();
    for (name, tensor) in &names {
        let diff = tune_core::compare::max_abs_diff(tensor, &reread[name]).unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
}

/// A checkpoint of mixed dtypes (bf16 weights, fp32 norms) trained in bf16: every tensor comes
/// back in its own dtype, the untouched ones bit for bit.
#[test]
fn mixed_dtype_checkpoints_keep_each_tensors_dtype() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let model_copy = common::stories_copy_without("");
    let model_dir = model_copy.path().to_path_buf();
    let source = common::root().join("assets/stories260K");
    let weights = candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let dtype = if name.ends_with("norm.weight") {
                candle_core::DType::F32
            } else {
                candle_core::DType::BF16
            };
            (name, t.to_dtype(dtype).unwrap())
        })
        .collect::<std::collections::HashMap<_, _>>();
    candle_core::safetensors::save(&weights, model_dir.join("model.safetensors")).unwrap();
    let checkpoint_dir = format!("checkpointer.checkpoint_dir={}", model_dir.display());
    train(
        common::stories_config(
            work.path(),
            &[&checkpoint_dir, "dtype=bf16", "max_steps_per_epoch=1"],
        ),
        &RunOptions::default(),
    )
    .unwrap();
    let merged = candle_core::safetensors::load(
        work.path()
            .join("output/epoch_0/model-00001-of-00001.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (name, before) in &weights {
        let after = &merged[name];
        assert_eq!(after.dtype(), before.dtype(), "{name}");
        if !name.contains("q_proj") && !name.contains("v_proj") {
            let diff = tune_core::compare::max_abs_diff(after, before).unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
    }
}
