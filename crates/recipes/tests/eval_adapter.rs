//! An adapter on top of the base model gives the model its merged weights give: for a PEFT folder
//! made elsewhere (merged here in Hugging Face layout, independently of tune-rs), and for the
//! `epoch_N` folder our LoRA recipe writes (adapter folder, torchtune-named adapter file, and the
//! merged weights next to them).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use tune_core::recipe::RunOptions;
use tune_recipes::eleuther_eval::{evaluate, EvalReport};
use tune_recipes::inference::{load_for_inference, InferenceModel};
use tune_recipes::settings::TopLevel;

const RANK: usize = 4;
const ALPHA: f64 = 8.0;

fn base_dir() -> PathBuf {
    common::root().join("assets/stories260K")
}

/// A bundled config (`configs/stories260K/<name>.yaml`), paths absolute, with overrides.
fn config(name: &str, work: &Path, overrides: &[String]) -> tune_core::Config {
    let root = common::root();
    let text = std::fs::read_to_string(root.join(format!("configs/stories260K/{name}.yaml")))
        .unwrap()
        .replace("assets/", &format!("{}/assets/", root.display()));
    let mut config = tune_core::Config::from_yaml_str(&text).unwrap();
    let mut all = vec![format!("output_dir={}", work.join("out").display())];
    all.extend(overrides.iter().cloned());
    config.apply_overrides(&all).unwrap();
    config.resolve_interpolations().unwrap();
    config
}

fn load(work: &Path, overrides: &[String]) -> anyhow::Result<InferenceModel> {
    tune_recipes::link();
    let config = config("generation", work, overrides);
    load_for_inference(&TopLevel(&config), DType::F32, &Device::Cpu, 0)
}

fn logits(model: &InferenceModel) -> Tensor {
    let ids: Vec<u32> = (0..64u32).map(|i| (i * 37 + 11) % 512).collect();
    let tokens = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.model.forward(&tokens, false).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    tune_core::compare::max_abs_diff(a, b).unwrap() as f32
}

fn random(shape: (usize, usize), rng: &mut rand::rngs::StdRng) -> Tensor {
    let values: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.gen_range(-0.2f32..0.2))
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// HF module names of a Llama layer and the weights they adapt.
const LAYER_TARGETS: [(&str, &str); 7] = [
    ("q_proj", "self_attn.q_proj"),
    ("k_proj", "self_attn.k_proj"),
    ("v_proj", "self_attn.v_proj"),
    ("o_proj", "self_attn.o_proj"),
    ("gate_proj", "mlp.gate_proj"),
    ("up_proj", "mlp.up_proj"),
    ("down_proj", "mlp.down_proj"),
];

/// Writes a PEFT adapter (as `peft` saves one) for `targets` into `adapter`, and the base model
/// with that adapter merged (`W + scale * B @ A`, all in Hugging Face layout) into `merged`.
fn peft_adapter_and_merged_model(
    adapter: &Path,
    merged: &Path,
    targets: &[&str],
    extra_config: serde_json::Value,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut base: HashMap<String, Tensor> =
        candle_core::safetensors::load(base_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    base.insert(
        "lm_head.weight".into(),
        base["model.embed_tokens.weight"].clone(),
    );
    let rslora = extra_config
        .get("use_rslora")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let scale = if rslora {
        ALPHA / (RANK as f64).sqrt()
    } else {
        ALPHA / RANK as f64
    };
    let mut modules: Vec<String> = Vec::new();
    for layer in 0..5 {
        for (short, module) in LAYER_TARGETS {
            if targets.contains(&short) {
                modules.push(format!("model.layers.{layer}.{module}"));
            }
        }
    }
    if targets.contains(&"lm_head") {
        modules.push("lm_head".into());
    }
    let mut tensors = HashMap::new();
    // PEFT (save_embedding_layers="auto") saves a copy of a targeted lm_head's base weight.
    if targets.contains(&"lm_head") {
        tensors.insert(
            "base_model.model.lm_head.base_layer.weight".to_string(),
            base["lm_head.weight"].clone(),
        );
    }
    for module in &modules {
        let weight = base[&format!("{module}.weight")].clone();
        let (out, inp) = weight.dims2().unwrap();
        let a = random((RANK, inp), &mut rng);
        let b = random((out, RANK), &mut rng);
        let delta = (b.matmul(&a).unwrap() * scale).unwrap();
        base.insert(format!("{module}.weight"), (weight + delta).unwrap());
        tensors.insert(format!("base_model.model.{module}.lora_A.weight"), a);
        tensors.insert(format!("base_model.model.{module}.lora_B.weight"), b);
    }
    std::fs::create_dir_all(adapter).unwrap();
    candle_core::safetensors::save(&tensors, adapter.join("adapter_model.safetensors")).unwrap();
    let mut adapter_config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.05,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": false, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": null, "layers_to_transform": null, "base_model_name_or_path": "karpathy/stories260K",
    });
    for (k, v) in extra_config.as_object().unwrap() {
        adapter_config[k] = v.clone();
    }
    std::fs::write(
        adapter.join("adapter_config.json"),
        serde_json::to_string_pretty(&adapter_config).unwrap(),
    )
    .unwrap();

    std::fs::create_dir_all(merged).unwrap();
    candle_core::safetensors::save(&base, merged.join("model.safetensors")).unwrap();
    let mut hf_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base_dir().join("config.json")).unwrap())
            .unwrap();
    hf_config["tie_word_embeddings"] = serde_json::Value::Bool(false);
    std::fs::write(merged.join("config.json"), hf_config.to_string()).unwrap();
}

fn check_peft_adapter(targets: &[&str], extra_config: serde_json::Value) {
    let work = tempfile::tempdir().unwrap();
    let (adapter, merged) = (work.path().join("peft"), work.path().join("merged"));
    peft_adapter_and_merged_model(&adapter, &merged, targets, extra_config);

    let with_adapter = load(work.path(), &[format!("adapter_dir={}", adapter.display())]).unwrap();
    let lora = with_adapter.spec.lora.as_ref().unwrap();
    assert_eq!(lora.adapter.rank, RANK);
    assert!(with_adapter
        .adapter
        .as_ref()
        .unwrap()
        .ends_with("adapter_model.safetensors"));
    let merged_model = load(
        work.path(),
        &[format!("checkpointer.checkpoint_dir={}", merged.display())],
    )
    .unwrap();
    let base = load(work.path(), &[]).unwrap();
    let (a, m, b) = (logits(&with_adapter), logits(&merged_model), logits(&base));
    let diff = max_abs_diff(&a, &m);
    assert!(
        diff < 1e-4,
        "{targets:?}: base + adapter vs merged logits differ by {diff}"
    );
    assert!(max_abs_diff(&a, &b) > 0.1, "the adapter changes the model");
}

#[test]
fn peft_adapter_on_every_projection_equals_its_merged_model() {
    check_peft_adapter(
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
        ],
        serde_json::json!({}),
    );
}

#[test]
fn peft_adapter_on_q_v_equals_its_merged_model() {
    check_peft_adapter(&["q_proj", "v_proj"], serde_json::json!({}));
}

#[test]
fn rslora_adapter_scales_by_alpha_over_sqrt_rank() {
    check_peft_adapter(
        &["k_proj", "o_proj"],
        serde_json::json!({"use_rslora": true}),
    );
}

#[test]
fn all_linear_target_means_attention_and_mlp() {
    let work = tempfile::tempdir().unwrap();
    let (adapter, merged) = (work.path().join("peft"), work.path().join("merged"));
    peft_adapter_and_merged_model(
        &adapter,
        &merged,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        serde_json::json!({"target_modules": "all-linear"}),
    );
    let m = load(work.path(), &[format!("adapter_dir={}", adapter.display())]).unwrap();
    let lora = m.spec.lora.unwrap();
    assert_eq!(
        lora.lora_attn_modules,
        ["q_proj", "k_proj", "v_proj", "output_proj"]
    );
    assert!(lora.apply_lora_to_mlp && !lora.apply_lora_to_output);
}

fn eval(work: &Path, overrides: &[String]) -> EvalReport {
    tune_recipes::link();
    let mut all = vec!["limit=3".to_string(), "tasks=[truthfulqa_mc2]".to_string()];
    all.extend(overrides.iter().cloned());
    evaluate(config("eval", work, &all), &RunOptions::default())
        .unwrap()
        .unwrap()
}

fn lls(report: &EvalReport) -> Vec<f64> {
    report.tasks[0]
        .questions
        .iter()
        .flat_map(|q| q.choices.iter().map(|c| c.ll))
        .collect()
}

#[test]
fn our_lora_output_evaluates_the_same_as_adapter_or_merged() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let train_config =
        common::stories_config(work.path(), &["max_steps_per_epoch=3", "optimizer.lr=3e-2"]);
    tune_recipes::lora_finetune_single_device::train(train_config, &RunOptions::default()).unwrap();
    let epoch = work.path().join("output/epoch_0");

    let base = lls(&eval(work.path(), &[]));
    let adapter = eval(work.path(), &[format!("adapter_dir={}", epoch.display())]);
    let merged = eval(
        work.path(),
        &[
            format!("checkpointer.checkpoint_dir={}", epoch.display()),
            "checkpointer.checkpoint_files=[model.safetensors.index.json]".into(),
        ],
    );
    // torchtune's after-training layout, `checkpoint_dir: ${output_dir}/epoch_0`: evaluation
    // saves nothing, so reading from inside output_dir is fine.
    let in_place = eval(
        work.path(),
        &[
            format!("output_dir={}", work.path().join("output").display()),
            format!("checkpointer.checkpoint_dir={}", epoch.display()),
            "checkpointer.checkpoint_files=[model.safetensors.index.json]".into(),
        ],
    );
    assert_eq!(lls(&in_place), lls(&merged));
    // The torchtune-named adapter file, with the LoRA settings from the model node.
    let torchtune_names = eval(
        work.path(),
        &[
            "model._component_=torchtune.models.llama2.lora_llama2".into(),
            "model.lora_attn_modules=[q_proj,v_proj]".into(),
            "model.lora_rank=4".into(),
            "model.lora_alpha=8".into(),
            format!(
                "checkpointer.adapter_checkpoint={}",
                epoch
                    .join("recipe_state/adapter_torchtune.safetensors")
                    .display()
            ),
        ],
    );
    let (a, m, t) = (lls(&adapter), lls(&merged), lls(&torchtune_names));
    assert_eq!(a.len(), base.len());
    let max_diff = |x: &[f64], y: &[f64]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max)
    };
    assert!(
        max_diff(&a, &m) < 1e-4,
        "adapter vs merged: {}",
        max_diff(&a, &m)
    );
    assert!(
        max_diff(&a, &t) < 1e-6,
        "PEFT folder vs torchtune-named file: {}",
        max_diff(&a, &t)
    );
    assert!(max_diff(&a, &base) > 1e-3, "training changed the model");
    assert!((adapter.tasks[0].acc - merged.tasks[0].acc).abs() < 1e-5);

    // An adapter-only folder given as the model: the error says where it goes instead.
    let adapter_only = work.path().join("adapter_only");
    std::fs::create_dir_all(adapter_only.join("adapter")).unwrap();
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(
            epoch.join("adapter").join(file),
            adapter_only.join("adapter").join(file),
        )
        .unwrap();
    }
    let e = load_err(
        work.path(),
        &[
            format!("checkpointer.checkpoint_dir={}", adapter_only.display()),
            "checkpointer.checkpoint_files=[model.safetensors.index.json]".into(),
        ],
    );
    assert!(
        e.contains("holds an adapter but no model weights") && e.contains("adapter_dir="),
        "{e}"
    );

    // The run's output_dir itself: the error names a checkpoint inside it.
    let e = load_err(
        work.path(),
        &[format!(
            "adapter_dir={}",
            work.path().join("output").display()
        )],
    );
    assert!(
        e.contains("a training run's output_dir") && e.contains("epoch_0"),
        "{e}"
    );
}

/// PEFT's copy of lm_head's base weight must be the base model's own; `bias` (which Llama's
/// projections do not have) is accepted, `lora_bias` refused.
#[test]
fn peft_extras_are_checked() {
    let work = tempfile::tempdir().unwrap();
    let (adapter, merged) = (work.path().join("peft"), work.path().join("merged"));
    peft_adapter_and_merged_model(
        &adapter,
        &merged,
        &["q_proj", "v_proj", "lm_head"],
        serde_json::json!({"bias": "lora_only"}),
    );
    let dir = format!("adapter_dir={}", adapter.display());
    load(work.path(), std::slice::from_ref(&dir)).unwrap();

    let config_path = adapter.join("adapter_config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let mut with_lora_bias: serde_json::Value = serde_json::from_str(&config).unwrap();
    with_lora_bias["lora_bias"] = true.into();
    std::fs::write(&config_path, with_lora_bias.to_string()).unwrap();
    let e = load_err(work.path(), std::slice::from_ref(&dir));
    assert!(e.contains("lora_bias: true"), "{e}");
    std::fs::write(&config_path, &config).unwrap();

    let weights_path = adapter.join("adapter_model.safetensors");
    let mut weights = candle_core::safetensors::load(&weights_path, &Device::Cpu).unwrap();
    let copy = "base_model.model.lm_head.base_layer.weight";
    let changed = (&weights[copy] + 0.5).unwrap();
    weights.insert(copy.to_string(), changed);
    candle_core::safetensors::save(&weights, &weights_path).unwrap();
    let e = load_err(work.path(), std::slice::from_ref(&dir));
    assert!(
        e.contains("its own copy of `output`'s base weight") && e.contains("another base model"),
        "{e}"
    );
}

fn load_err(work: &Path, overrides: &[String]) -> String {
    match load(work, overrides) {
        Ok(_) => panic!("expected an error for {overrides:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn adapter_problems_name_the_fix() {
    let work = tempfile::tempdir().unwrap();
    let (adapter, merged) = (work.path().join("peft"), work.path().join("merged"));
    peft_adapter_and_merged_model(
        &adapter,
        &merged,
        &["q_proj", "v_proj"],
        serde_json::json!({}),
    );
    let dir = format!("adapter_dir={}", adapter.display());
    let rewrite = |patch: serde_json::Value| {
        let path = adapter.join("adapter_config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        std::fs::write(&path, c.to_string()).unwrap();
    };

    rewrite(serde_json::json!({"target_modules": ["q_proj", "k_proj", "v_proj"]}));
    let e = load_err(work.path(), std::slice::from_ref(&dir));
    assert!(
        e.contains("does not fit the model") && e.contains("k_proj"),
        "{e}"
    );

    rewrite(serde_json::json!({"target_modules": ["q_proj", "v_proj"], "r": 8}));
    let e = load_err(work.path(), std::slice::from_ref(&dir));
    assert!(
        e.contains("do not fit the settings of the adapter_config.json beside it (r=8"),
        "{e}"
    );
    rewrite(serde_json::json!({ "r": RANK }));

    let e = load_err(
        work.path(),
        &["checkpointer.adapter_checkpoint=/nonexistent/adapter_model.safetensors".into()],
    );
    assert!(
        e.contains("/nonexistent/adapter_model.safetensors not found"),
        "{e}"
    );

    rewrite(serde_json::json!({"target_modules": ["q_proj", "gate_proj"]}));
    let e = load_err(work.path(), std::slice::from_ref(&dir));
    assert!(
        e.contains("not all of gate_proj, up_proj, down_proj"),
        "{e}"
    );

    rewrite(
        serde_json::json!({"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 8}}),
    );
    let e = load_err(work.path(), std::slice::from_ref(&dir));
    assert!(e.contains("`rank_pattern`"), "{e}");

    rewrite(serde_json::json!({"rank_pattern": {}, "peft_type": "IA3"}));
    let e = load_err(work.path(), std::slice::from_ref(&dir));
    assert!(e.contains("peft_type is IA3"), "{e}");

    let e = load_err(
        work.path(),
        &[
            dir.clone(),
            format!(
                "checkpointer.adapter_checkpoint={}",
                adapter.join("adapter_model.safetensors").display()
            ),
        ],
    );
    assert!(
        e.contains("both adapter_dir and checkpointer.adapter_checkpoint"),
        "{e}"
    );

    let e = load_err(
        work.path(),
        &[format!("adapter_dir={}", work.path().display())],
    );
    assert!(e.contains("has no adapter_config.json"), "{e}");

    std::fs::remove_file(adapter.join("adapter_config.json")).unwrap();
    let e = load_err(
        work.path(),
        &[format!(
            "checkpointer.adapter_checkpoint={}",
            adapter.join("adapter_model.safetensors").display()
        )],
    );
    assert!(
        e.contains("no adapter_config.json next to it") && e.contains("lora_* model"),
        "{e}"
    );

    std::fs::write(adapter.join("adapter_config.json"), "{}").unwrap();
    std::fs::rename(
        adapter.join("adapter_model.safetensors"),
        adapter.join("adapter_model.bin"),
    )
    .unwrap();
    let e = load_err(work.path(), &[dir]);
    assert!(e.contains("only adapter_model.bin is there"), "{e}");
}
