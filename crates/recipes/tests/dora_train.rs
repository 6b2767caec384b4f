//! stories260K DoRA runs through the recipe (`model.use_dora=True` on the bundled LoRA config):
//! the loss decreases, the export is a PEFT DoRA adapter, and resuming keeps the trained
//! magnitude (a magnitude recomputed from the loaded A and B on resume would change the run).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use tune_core::recipe::RunOptions;
use tune_recipes::lora_finetune_single_device::train;
use tune_recipes::selfcheck::max_abs_diff;

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn stories260k_dora_trains_and_exports_peft_dora() {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let overrides = [
        "model.use_dora=True",
        "max_steps_per_epoch=20",
        "tokenizer.max_seq_len=128",
    ];
    let summary = train(
        common::stories_config(work.path(), &overrides),
        &RunOptions::default(),
    )
    .unwrap();
    let losses: Vec<f64> = summary.steps.iter().map(|s| s.loss).collect();
    eprintln!("DoRA losses: {losses:?}");
    assert_eq!(losses.len(), 20);
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    assert!(
        mean(&losses[15..]) < mean(&losses[..5]) - 0.3,
        "DoRA loss did not decrease: {losses:?}"
    );

    let epoch = work.path().join("output/epoch_0");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(epoch.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["use_dora"], serde_json::Value::Bool(true));
    let peft = load(&epoch.join("adapter/adapter_model.safetensors"));
    assert_eq!(
        peft.keys()
            .filter(|k| k.ends_with(".lora_magnitude_vector"))
            .count(),
        10
    );
    // The magnitude trained (it started as the base row norms, which the merged base rows keep).
    let tune = load(&epoch.join("recipe_state/adapter_torchtune.safetensors"));
    let base = load(&common::root().join("assets/stories260K/model.safetensors"));
    let v = &base["model.layers.1.self_attn.v_proj.weight"];
    let row_norms = v.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
    let moved = max_abs_diff(&tune["layers.1.attn.v_proj.magnitude"], &row_norms).unwrap();
    assert!(moved > 1e-3, "magnitude did not train ({moved})");
}

#[test]
fn resumed_dora_run_equals_uninterrupted() {
    tune_recipes::link();
    // Constant lr so that a 1-epoch run extended to 2 epochs sees the same schedule.
    let overrides = |epochs: &str| {
        vec![
            "model.use_dora=True".to_string(),
            "~lr_scheduler".to_string(),
            format!("epochs={epochs}"),
            "max_steps_per_epoch=3".into(),
            "batch_size=2".into(),
            "seed=7".into(),
            "save_adapter_weights_only=True".into(),
            "tokenizer.max_seq_len=64".into(),
        ]
    };
    let straight = tempfile::tempdir().unwrap();
    train(
        common::stories_config(straight.path(), &as_refs(&overrides("2"))),
        &RunOptions::default(),
    )
    .unwrap();

    let split = tempfile::tempdir().unwrap();
    train(
        common::stories_config(split.path(), &as_refs(&overrides("1"))),
        &RunOptions::default(),
    )
    .unwrap();
    let mut resume = overrides("2");
    resume.push("resume_from_checkpoint=True".into());
    let rest = train(
        common::stories_config(split.path(), &as_refs(&resume)),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(
        rest.steps.len(),
        3,
        "the resumed run trains the second epoch only"
    );

    let want = load(
        &straight
            .path()
            .join("output/epoch_1/recipe_state/adapter_torchtune.safetensors"),
    );
    let got = load(
        &split
            .path()
            .join("output/epoch_1/recipe_state/adapter_torchtune.safetensors"),
    );
    assert_eq!(want.len(), 30);
    for (name, t) in &want {
        let d = max_abs_diff(t, &got[name]).unwrap();
        assert!(d <= 1e-6, "{name} differs by {d} after resuming");
    }
}
