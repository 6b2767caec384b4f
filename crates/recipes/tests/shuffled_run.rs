//! With `shuffle: True` the batches are torchtune's: `tests/fixtures/shuffled_run` holds the loss
//! torchtune 0.6.1 logged at each of 20 steps over two epochs of stories260K at learning rate 0
//! (so each loss depends only on the samples its step got). The same run here logs the same.

mod common;

use tune_core::recipe::RunOptions;
use tune_recipes::lora_finetune_single_device::train;

#[test]
fn shuffled_epochs_give_the_losses_torchtune_logged() {
    tune_recipes::link();
    let path = common::root().join("tests/fixtures/shuffled_run/meta.json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let overrides: Vec<String> = meta["overrides"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, value)| format!("{key}={}", value.as_str().unwrap()))
        .collect();
    let want: Vec<f64> = meta["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(want.len(), 20);

    let work = tempfile::tempdir().unwrap();
    let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
    let run = train(
        common::stories_config(work.path(), &refs),
        &RunOptions::default(),
    )
    .unwrap();
    let got: Vec<f64> = run.steps.iter().map(|s| s.loss).collect();
    assert_eq!(got.len(), want.len());
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs(),
            "step {}: {g} here, {w} in torchtune",
            step + 1
        );
    }
    // Unshuffled, the same steps see other samples: the fixture pins the order down.
    let work = tempfile::tempdir().unwrap();
    let mut unshuffled = refs.clone();
    unshuffled.push("shuffle=False");
    let run = train(
        common::stories_config(work.path(), &unshuffled),
        &RunOptions::default(),
    )
    .unwrap();
    assert!(run
        .steps
        .iter()
        .zip(&want)
        .any(|(s, w)| (s.loss - w).abs() > 1e-3 * w.abs()));
}
