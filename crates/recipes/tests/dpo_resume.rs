//! A DPO run stopped mid-epoch and resumed ends with the adapter of an uninterrupted run: the
//! preference objective keeps no state of its own, so the loop's checkpoint is enough.
//! Its own test binary: the stop request is process-global.

mod common;

use candle_core::Device;
use tune_core::recipe::{clear_stop, request_stop, RunOptions};
use tune_recipes::lora_dpo_single_device::train;
use tune_recipes::selfcheck::max_abs_diff;

const OVERRIDES: &[&str] = &[
    "dataset.split=train[:16]",
    "batch_size=2",
    "gradient_accumulation_steps=2",
    "max_steps_per_epoch=3",
    "seed=3",
    "optimizer.lr=5e-3",
    "save_adapter_weights_only=True",
    "tokenizer.max_seq_len=96",
];

fn config(work: &std::path::Path, extra: &[&str]) -> tune_core::Config {
    let all: Vec<&str> = OVERRIDES.iter().chain(extra).copied().collect();
    common::builtin_config("stories260K/lora_dpo_single_device", work, &all)
}

#[test]
fn interrupted_and_resumed_dpo_equals_uninterrupted() {
    tune_recipes::link();
    let straight = tempfile::tempdir().unwrap();
    let full = train(config(straight.path(), &[]), &RunOptions::default()).unwrap();
    assert_eq!(full.steps.len(), 3);

    let interrupted = tempfile::tempdir().unwrap();
    request_stop();
    let first = train(config(interrupted.path(), &[]), &RunOptions::default()).unwrap();
    clear_stop();
    assert_eq!(first.steps.len(), 1);
    let rest = train(
        config(interrupted.path(), &["resume_from_checkpoint=True"]),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(rest.steps.len(), 2);
    for (a, b) in full.steps[1..].iter().zip(&rest.steps) {
        assert_eq!(a.step, b.step);
        assert!(
            (a.loss - b.loss).abs() <= 1e-6,
            "step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    let load = |dir: &std::path::Path| {
        candle_core::safetensors::load(
            dir.join("output/epoch_0/recipe_state/adapter_torchtune.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
    };
    let (want, got) = (load(straight.path()), load(interrupted.path()));
    for (name, t) in &want {
        assert!(max_abs_diff(t, &got[name]).unwrap() <= 1e-7, "{name}");
    }
}
