//! A step whose batches have no label token to learn from (a prompt cut off by
//! tokenizer.max_seq_len with train_on_input False) passes without an update, where torchtune's
//! 0/0 loss would make every weight NaN; the run goes on and learns from the other steps.

mod common;

use std::path::Path;

use tune_core::recipe::RunOptions;
use tune_recipes::lora_finetune_single_device::train;

/// Alpaca rows: one whose instruction alone outlasts 128 tokens, then two that fit.
fn rows(dir: &Path, with_long_prompt: bool) -> std::path::PathBuf {
    let mut rows = vec![
        serde_json::json!({"instruction": "Add two and three.", "input": "", "output": "Five."}),
        serde_json::json!({"instruction": "Name a pet.", "input": "", "output": "A cat."}),
    ];
    if with_long_prompt {
        let long = "Tell me about the little dog and the big cat in the garden. ".repeat(12);
        rows.insert(
            0,
            serde_json::json!({"instruction": long, "input": "", "output": "They played."}),
        );
    }
    let path = dir.join(if with_long_prompt {
        "with_long.json"
    } else {
        "plain.json"
    });
    std::fs::write(&path, serde_json::to_string(&rows).unwrap()).unwrap();
    path
}

fn run(
    work: &Path,
    data: &Path,
) -> (
    Vec<f64>,
    std::collections::HashMap<String, candle_core::Tensor>,
) {
    tune_recipes::link();
    let files = format!("dataset.data_files={}", data.display());
    let config = common::stories_config(
        work,
        &[
            &files,
            "dataset.train_on_input=False",
            "tokenizer.max_seq_len=128",
            "shuffle=False",
            "batch_size=1",
            "~lr_scheduler",
            "save_adapter_weights_only=True",
        ],
    );
    let summary = train(config, &RunOptions::default()).unwrap();
    let adapter = candle_core::safetensors::load(
        work.join("output/epoch_0/recipe_state/adapter_torchtune.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    (summary.steps.iter().map(|s| s.loss).collect(), adapter)
}

#[test]
fn a_step_without_labels_is_skipped_and_the_run_goes_on() {
    let work = tempfile::tempdir().unwrap();
    let (with_long, adapter_with) = run(&work.path().join("a"), &rows(work.path(), true));
    let (plain, adapter_plain) = run(&work.path().join("b"), &rows(work.path(), false));
    // The label-less step logs 0/0 as torchtune does; the others train as without it.
    assert_eq!(with_long.len(), 3);
    assert!(with_long[0].is_nan(), "{with_long:?}");
    assert_eq!(&with_long[1..], &plain[..]);
    // The skipped step changed nothing: the same two updates (constant lr, Adam step 1 and 2).
    for (name, t) in &adapter_plain {
        let d = tune_core::compare::max_abs_diff(t, &adapter_with[name]).unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
}
