//! LoRA DPO against torchtune 0.6.1 itself (`tests/fixtures/dpo_run`): from the adapters
//! torchtune initialised, 12 shuffled steps of 2 accumulated micro-batches on stories260K log
//! every metric torchtune logged (loss, lr, rewards, log-probabilities, logits) and end with the
//! adapters it ended with.

mod common;

use std::collections::HashMap;

use tune_core::recipe::RunOptions;
use tune_recipes::lora_dpo_single_device::train;

fn fixture(name: &str) -> std::path::PathBuf {
    common::root().join("tests/fixtures/dpo_run").join(name)
}

/// Each `Step N | key:value ...` line of the run's DiskLogger file.
fn logged_steps(output: &std::path::Path) -> Vec<HashMap<String, f64>> {
    let logs = output.join("logs");
    let file = std::fs::read_dir(&logs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once(" | "))
        .map(|(_, metrics)| {
            metrics
                .split_whitespace()
                .map(|kv| {
                    let (k, v) = kv.split_once(':').unwrap();
                    (k.to_string(), v.parse().unwrap())
                })
                .collect()
        })
        .collect()
}

#[test]
fn twelve_dpo_steps_log_and_learn_what_torchtune_did() {
    tune_recipes::link();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("meta.json")).unwrap()).unwrap();
    let mut overrides: Vec<String> = meta["overrides"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, value)| format!("{key}={}", value.as_str().unwrap()))
        .collect();
    overrides.push(format!(
        "checkpointer.adapter_checkpoint={}",
        fixture("adapter_init.safetensors").display()
    ));
    let work = tempfile::tempdir().unwrap();
    let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
    let config = common::builtin_config("stories260K/lora_dpo_single_device", work.path(), &refs);
    train(config, &RunOptions::default()).unwrap();

    let output = work.path().join("output");
    let ours = logged_steps(&output);
    let theirs = meta["steps"].as_array().unwrap();
    assert_eq!(ours.len(), 12);
    assert_eq!(ours.len(), theirs.len());
    for (step, (got, want)) in ours.iter().zip(theirs).enumerate() {
        for (key, value) in want.as_object().unwrap() {
            if key == "step" {
                continue;
            }
            let want = value.as_f64().unwrap();
            let got = got[key.as_str()];
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "step {} {key}: {got} here, {want} in torchtune",
                step + 1
            );
        }
    }
    // The numbers moved: the policy left the reference.
    let last = &theirs[11];
    assert!(last["rewards/margins"].as_f64().unwrap().abs() > 0.1);

    let load = |path: std::path::PathBuf| {
        candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
    };
    let ours = load(output.join("epoch_0/adapter/adapter_model.safetensors"));
    let theirs = load(fixture("adapter_final.safetensors"));
    let init = load(fixture("adapter_init.safetensors"));
    assert_eq!(ours.len(), theirs.len());
    for (name, want) in &theirs {
        let diff = tune_recipes::selfcheck::max_abs_diff(&ours[name], want).unwrap();
        let moved = tune_recipes::selfcheck::max_abs_diff(&init[name], want).unwrap();
        assert!(
            diff <= 1e-5 && diff < moved / 100.0,
            "{name}: {diff} (moved {moved})"
        );
    }
}
