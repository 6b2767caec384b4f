//! A run interrupted mid-epoch and resumed ends with exactly the adapter of an uninterrupted run
//! (optimizer moments, step counters, schedule and the data-loader position all restored).
//! Its own test binary: the stop request is process-global.

mod common;

use candle_core::Device;
use tune_core::recipe::{clear_stop, request_stop, RunOptions};
use tune_recipes::lora_finetune_single_device::train;

const OVERRIDES: &[&str] = &[
    "batch_size=2",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "max_steps_per_epoch=4",
    "shuffle=True",
    "seed=7",
    "save_adapter_weights_only=True",
    "tokenizer.max_seq_len=64",
];

fn final_adapter(work: &std::path::Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(
        work.join("output/epoch_1/recipe_state/adapter_torchtune.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn interrupted_and_resumed_equals_uninterrupted() {
    tune_recipes::link();
    let straight = tempfile::tempdir().unwrap();
    let full = train(
        common::stories_config(straight.path(), OVERRIDES),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(full.steps.len(), 8);

    let interrupted = tempfile::tempdir().unwrap();
    request_stop();
    let first = train(
        common::stories_config(interrupted.path(), OVERRIDES),
        &RunOptions::default(),
    )
    .unwrap();
    clear_stop();
    assert_eq!(
        first.steps.len(),
        1,
        "the stop request is honoured after the first step"
    );
    assert!(interrupted
        .path()
        .join("output/step_1/recipe_state/recipe_state.json")
        .is_file());
    assert!(!interrupted.path().join("output/epoch_0").exists());

    let mut resume_overrides = OVERRIDES.to_vec();
    resume_overrides.push("resume_from_checkpoint=True");
    let rest = train(
        common::stories_config(interrupted.path(), &resume_overrides),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(rest.steps.len(), 7);
    for (a, b) in full.steps[1..].iter().zip(&rest.steps) {
        assert_eq!(a.step, b.step);
        assert!(
            (a.loss - b.loss).abs() <= 1e-6 * a.loss.abs(),
            "step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
        assert_eq!(a.lr, b.lr);
    }
    let (want, got) = (
        final_adapter(straight.path()),
        final_adapter(interrupted.path()),
    );
    for (name, t) in &want {
        let d: f32 = (t - &got[name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d <= 1e-6, "{name} differs by {d} after resuming");
    }
}
