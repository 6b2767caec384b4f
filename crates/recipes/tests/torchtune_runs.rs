//! Recipes against torchtune 0.6.1 itself (`tests/fixtures/torchtune_runs`): from the adapters
//! torchtune initialised, 8-12 shuffled steps of 2 accumulated micro-batches log every metric
//! torchtune logged and end with the adapters it ended with, for LoRA DPO (loss, lr, rewards,
//! log-probabilities, logits), DoRA, QLoRA, two-epoch LoRA (also with micro-batches left over
//! at an epoch's end, for DPO too) and packed text completion with clipped gradients (loss, lr,
//! grad_norm).

mod common;

use std::collections::HashMap;

use tune_core::recipe::RunOptions;
use tune_core::Config;
use tune_recipes::training_loop::RunSummary;

type Train = fn(Config, &RunOptions) -> anyhow::Result<RunSummary>;

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

/// Runs `run` of the fixture with `train` from torchtune's initial adapters and compares;
/// returns the run's folder (its output in `output/`) and its overrides.
fn matches_torchtune(run: &str, train: Train) -> (tempfile::TempDir, Vec<String>) {
    tune_recipes::link();
    let fixture = |name: &str| {
        common::root()
            .join("tests/fixtures/torchtune_runs")
            .join(run)
            .join(name)
    };
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("meta.json")).unwrap()).unwrap();
    let mut overrides: Vec<String> = meta["overrides"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, value)| {
            // Repository paths, from wherever the test runs.
            let value = value.as_str().unwrap();
            match value.starts_with("tests/") {
                true => format!("{key}={}", common::root().join(value).display()),
                false => format!("{key}={value}"),
            }
        })
        .collect();
    overrides.push(format!(
        "checkpointer.adapter_checkpoint={}",
        fixture("adapter_init.safetensors").display()
    ));
    let work = tempfile::tempdir().unwrap();
    let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
    let config = common::builtin_config(meta["config"].as_str().unwrap(), work.path(), &refs);
    train(config, &RunOptions::default()).unwrap();

    let output = work.path().join("output");
    let ours = logged_steps(&output);
    let theirs = meta["steps"].as_array().unwrap();
    assert!(ours.len() >= 8);
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
                "{run} step {} {key}: {got} here, {want} in torchtune",
                step + 1
            );
        }
    }

    let load = |path: std::path::PathBuf| {
        candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
    };
    // torchtune's names and layout, as in the fixture.
    let last_epoch = meta["overrides"]["epochs"]
        .as_str()
        .map_or(0, |e| e.parse::<usize>().unwrap() - 1);
    let ours = load(output.join(format!(
        "epoch_{last_epoch}/recipe_state/adapter_torchtune.safetensors"
    )));
    let theirs = load(fixture("adapter_final.safetensors"));
    let init = load(fixture("adapter_init.safetensors"));
    assert_eq!(ours.len(), theirs.len());
    for (name, want) in &theirs {
        let diff = tune_recipes::selfcheck::max_abs_diff(&ours[name], want).unwrap();
        let moved = tune_recipes::selfcheck::max_abs_diff(&init[name], want).unwrap();
        assert!(
            diff <= 1e-5 && diff < moved / 100.0,
            "{run} {name}: {diff} (moved {moved})"
        );
    }
    (work, overrides)
}

#[test]
fn twelve_dpo_steps_log_and_learn_what_torchtune_did() {
    matches_torchtune("dpo", tune_recipes::lora_dpo_single_device::train);
}

#[test]
fn twelve_dora_steps_log_and_learn_what_torchtune_did() {
    matches_torchtune("dora", tune_recipes::lora_finetune_single_device::train);
}

#[test]
fn twelve_qlora_steps_log_and_learn_what_torchtune_did() {
    matches_torchtune("qlora", tune_recipes::lora_finetune_single_device::train);
}

#[test]
fn two_lora_epochs_log_and_learn_what_torchtune_did() {
    matches_torchtune(
        "lora_two_epochs",
        tune_recipes::lora_finetune_single_device::train,
    );
}

/// Each epoch's 25 batches leave one micro-batch past the last window of 3: torchtune adds it
/// to the next epoch's first step. Resumed from the first epoch's end, the run computes it
/// again and ends as the uninterrupted one.
#[test]
fn left_over_micro_batches_go_into_the_next_epoch_as_in_torchtune() {
    let train = tune_recipes::lora_finetune_single_device::train;
    let (work, mut overrides) = matches_torchtune("leftover_micro_batches", train);
    let output = work.path().join("output");
    let straight =
        std::fs::read(output.join("epoch_1/recipe_state/adapter_torchtune.safetensors")).unwrap();
    overrides.push("resume_from_checkpoint=True".into());
    overrides.push("checkpointer.recipe_checkpoint=epoch_0".into());
    let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
    let config = common::builtin_config("stories260K/lora_single_device", work.path(), &refs);
    let resumed = train(config, &RunOptions::default()).unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            common::root().join("tests/fixtures/torchtune_runs/leftover_micro_batches/meta.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let theirs = &meta["steps"].as_array().unwrap()[8..];
    assert_eq!(resumed.steps.len(), theirs.len());
    for (got, want) in resumed.steps.iter().zip(theirs) {
        let want = want["loss"].as_f64().unwrap();
        assert!(
            (got.loss - want).abs() <= 1e-4 * want,
            "resumed step {}: {} here, {want} in torchtune",
            got.step,
            got.loss
        );
    }
    let again =
        std::fs::read(output.join("epoch_1/recipe_state/adapter_torchtune.safetensors")).unwrap();
    assert!(
        straight == again,
        "the resumed run ends with another adapter"
    );
}

/// DPO divides each micro-batch's loss by gradient_accumulation_steps: the step that takes the
/// first epoch's left-over micro-batch weighs three halves (loss 1.07 at step 7).
#[test]
fn dpo_steps_with_left_over_micro_batches_weigh_as_in_torchtune() {
    matches_torchtune(
        "dpo_leftover_micro_batches",
        tune_recipes::lora_dpo_single_device::train,
    );
}

#[test]
fn packed_text_with_clipped_gradients_logs_and_learns_what_torchtune_did() {
    matches_torchtune(
        "packed_text",
        tune_recipes::lora_finetune_single_device::train,
    );
}
