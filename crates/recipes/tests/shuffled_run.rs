//! With `shuffle: True` the batches are torchtune's: `tests/fixtures/shuffled_run` holds the loss
//! torchtune 0.6.1 logged at each step of two epochs on stories260K at learning rate 0 (so each
//! loss depends only on the samples its step got), for GSM8K samples and for tiny-shakespeare
//! packed into rows. The same runs here log the same.

mod common;

use tune_core::recipe::RunOptions;
use tune_recipes::lora_finetune_single_device::{train, RunSummary};

fn fixture_runs() -> Vec<(String, Vec<String>, Vec<f64>)> {
    let path = common::root().join("tests/fixtures/shuffled_run/meta.json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    meta["runs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(config, run)| {
            let overrides = run["overrides"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(key, value)| format!("{key}={}", value.as_str().unwrap()))
                .collect();
            let losses = run["losses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            (config.clone(), overrides, losses)
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
    assert_eq!(runs.len(), 2);
    for (config, overrides, want) in runs {
        assert!(want.len() >= 12, "{config}");
        let got: Vec<f64> = train_stories(&config, &overrides)
            .steps
            .iter()
            .map(|s| s.loss)
            .collect();
        assert_eq!(got.len(), want.len(), "{config}");
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs(),
                "{config} step {}: {g} here, {w} in torchtune",
                step + 1
            );
        }
        // Unshuffled, the same steps see other samples: the fixture pins the order down.
        let mut unshuffled = overrides.clone();
        unshuffled.push("shuffle=False".into());
        let other = train_stories(&config, &unshuffled);
        assert!(
            other
                .steps
                .iter()
                .zip(&want)
                .any(|(s, w)| (s.loss - w).abs() > 1e-3 * w.abs()),
            "{config}"
        );
    }
}
