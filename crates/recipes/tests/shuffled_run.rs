//! With `shuffle: True` the batches are torchtune's: `tests/fixtures/shuffled_run` holds the loss
//! torchtune 0.6.1 logged at each step of two epochs on stories260K at learning rate 0 (so each
//! loss depends only on the samples its step got and their masks), for GSM8K samples, for
//! tiny-shakespeare packed into rows, for multi-turn ShareGPT and OpenAI conversations
//! (chat_dataset) and for instruct_dataset with a new system prompt. The same runs here log the
//! same.

mod common;

use tune_core::recipe::RunOptions;
use tune_recipes::lora_finetune_single_device::train;
use tune_recipes::training_loop::RunSummary;

/// (run name, built-in config, overrides, torchtune's losses) for each run of the fixture.
fn fixture_runs() -> Vec<(String, String, Vec<String>, Vec<f64>)> {
    let path = common::root().join("tests/fixtures/shuffled_run/meta.json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    meta["runs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, run)| {
            let overrides = run["overrides"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(key, value)| {
                    // Repository paths, from wherever the test runs.
                    let value = value.as_str().unwrap();
                    match value.starts_with("assets/") || value.starts_with("tests/") {
                        true => format!("{key}={}", common::root().join(value).display()),
                        false => format!("{key}={value}"),
                    }
                })
                .collect();
            let losses = run["losses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let config = run["config"].as_str().unwrap().to_string();
            (name.clone(), config, overrides, losses)
        })
        .collect()
}

fn train_stories(config: &str, overrides: &[String]) -> RunSummary {
    let work = tempfile::tempdir().unwrap();
    let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
    let name = format!("stories260K/{config}");
    train(
        common::builtin_config(&name, work.path(), &refs),
        &RunOptions::default(),
    )
    .unwrap()
}

#[test]
fn shuffled_epochs_give_the_losses_torchtune_logged() {
    tune_recipes::link();
    let runs = fixture_runs();
    assert_eq!(runs.len(), 5);
    for (name, config, overrides, want) in runs {
        assert!(want.len() >= 10, "{name}");
        let got: Vec<f64> = train_stories(&config, &overrides)
            .steps
            .iter()
            .map(|s| s.loss)
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs(),
                "{name} step {}: {g} here, {w} in torchtune",
                step + 1
            );
        }
        // Unshuffled, the same steps see other samples: the fixture pins the order down.
        if name != "lora_single_device" {
            continue;
        }
        let mut unshuffled = overrides.clone();
        unshuffled.push("shuffle=False".into());
        let other = train_stories(&config, &unshuffled);
        assert!(
            other
                .steps
                .iter()
                .zip(&want)
                .any(|(s, w)| (s.loss - w).abs() > 1e-3 * w.abs()),
            "{name}"
        );
    }
}
