//! `collate_fn` as torchtune reads it: a dotted path (`collate_fn: torchtune.data.padded_collate_sft`,
//! the form its recipes default to) or a `_component_` node; both batch as the default does.

mod common;

use tune_core::recipe::RunOptions;
use tune_recipes::lora_finetune_single_device::train;

fn run(overrides: &[&str]) -> anyhow::Result<Vec<f64>> {
    tune_recipes::link();
    let work = tempfile::tempdir().unwrap();
    let mut all = vec!["shuffle=False", "max_steps_per_epoch=3", "batch_size=4"];
    all.extend_from_slice(overrides);
    let summary = train(
        common::stories_config(work.path(), &all),
        &RunOptions::default(),
    )?;
    Ok(summary.steps.iter().map(|s| s.loss).collect())
}

#[test]
fn a_dotted_path_or_a_component_node_collates_as_the_default() {
    let default = run(&[]).unwrap();
    assert_eq!(default.len(), 3);
    let path = run(&["collate_fn=torchtune.data.padded_collate_sft"]).unwrap();
    assert_eq!(path, default);
    let node = run(&["collate_fn._component_=torchtune.data.padded_collate_sft"]).unwrap();
    assert_eq!(node, default);
    let e = format!(
        "{:#}",
        run(&["collate_fn=torchtune.data.padded_collate_nothing"]).unwrap_err()
    );
    assert!(e.contains("padded_collate_nothing"), "{e}");
}
