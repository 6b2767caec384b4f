//! The whole recipe against torchtune 0.6.1's real run (tests/fixtures/trajectory): every logged
//! loss and lr, the final adapter, the PEFT files, the merged weights and the log format.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use tune_core::recipe::RunOptions;
use tune_core::Config;

fn load(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    tune_core::compare::max_abs_diff(a, b).unwrap() as f32
}

#[test]
fn recipe_reproduces_torchtune_trajectory() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let config = Config::from_yaml_str(
        &tune_recipes::selfcheck::trajectory_config(&common::root(), work.path()).unwrap(),
    )
    .unwrap();
    let mut config = config;
    config.resolve_interpolations().unwrap();
    let summary =
        tune_recipes::lora_finetune_single_device::train(config, &RunOptions::default()).unwrap();

    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("tests/fixtures/trajectory/meta.json"))
            .unwrap(),
    )
    .unwrap();
    let losses: Vec<f64> = serde_json::from_value(meta["losses_logged"].clone()).unwrap();
    let lrs: Vec<f64> = serde_json::from_value(meta["lrs_logged"].clone()).unwrap();
    assert_eq!(summary.steps.len(), 10);
    for (i, step) in summary.steps.iter().enumerate() {
        let rel = ((step.loss - losses[i]) / losses[i]).abs();
        assert!(
            rel <= 1e-5,
            "step {}: loss {} vs torchtune {} (rel {rel:e})",
            i + 1,
            step.loss,
            losses[i]
        );
        assert!(
            (step.lr - lrs[i]).abs() <= 1e-5 * lrs[i].abs().max(1e-12),
            "step {}: lr {} vs {}",
            i + 1,
            step.lr,
            lrs[i]
        );
    }

    let out = work.path().join("output/epoch_0");
    // Final adapter (torchtune names) and the PEFT file against torchtune's.
    let ours = load(&out.join("recipe_state/adapter_torchtune.safetensors"));
    let theirs = load(&common::root().join("tests/fixtures/trajectory/adapter_final.safetensors"));
    assert_eq!(ours.len(), theirs.len());
    for (name, t) in &theirs {
        let d = max_abs_diff(&ours[name], t);
        assert!(d <= 1e-4, "final adapter {name} differs by {d}");
    }
    let peft_ours = load(&out.join("adapter/adapter_model.safetensors"));
    let peft_theirs =
        load(&common::root().join("tests/fixtures/trajectory/adapter_model.safetensors"));
    let mut names_ours: Vec<&String> = peft_ours.keys().collect();
    let mut names_theirs: Vec<&String> = peft_theirs.keys().collect();
    names_ours.sort();
    names_theirs.sort();
    assert_eq!(names_ours, names_theirs);
    for (name, t) in &peft_theirs {
        assert_eq!(peft_ours[name].dims(), t.dims(), "{name}");
        let d = max_abs_diff(&peft_ours[name], t);
        assert!(d <= 1e-4, "PEFT tensor {name} differs by {d}");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert!(
        !out.join("adapter_config.json").exists(),
        "adapter_config.json next to config.json would be applied twice by transformers"
    );

    // Merged weights: W + (alpha/r) B A in HF layout for adapted layers, everything else unchanged.
    let merged = load(&out.join("model-00001-of-00001.safetensors"));
    let original = load(&common::root().join("assets/stories260K/model.safetensors"));
    for (name, w) in &original {
        let m = &merged[name];
        let module = name.strip_suffix(".weight").unwrap();
        let a_name = format!("base_model.model.{module}.lora_A.weight");
        if let Some(a) = peft_ours.get(&a_name) {
            let b = &peft_ours[&format!("base_model.model.{module}.lora_B.weight")];
            let expected = (w + (b.matmul(a).unwrap() * 2.0).unwrap()).unwrap();
            assert!(max_abs_diff(m, &expected) <= 1e-6, "merged {name}");
        } else {
            assert_eq!(max_abs_diff(m, w), 0.0, "{name} must be unchanged");
        }
    }
    for f in [
        "config.json",
        "tokenizer.model",
        "model.safetensors.index.json",
    ] {
        assert!(out.join(f).is_file(), "epoch_0/{f} missing");
    }

    // torchtune's DiskLogger line format.
    let logs: Vec<_> = std::fs::read_dir(work.path().join("output/logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(logs.len(), 1);
    let text = std::fs::read_to_string(&logs[0]).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 10);
    assert!(lines[0].starts_with("Step 1 | loss:4.5993"), "{}", lines[0]);
    assert!(
        lines[9].contains(" lr:0.0 tokens_per_second_per_gpu:"),
        "{}",
        lines[9]
    );
    assert!(work.path().join("output/torchtune_config.yaml").is_file());
}
