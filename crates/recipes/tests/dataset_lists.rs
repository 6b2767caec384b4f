//! `dataset: [{...}, {...}]` trains on the datasets one after another, as torchtune's
//! ConcatDataset: two halves of a split give the run one dataset of the whole split gives.

mod common;

use tune_core::recipe::RunOptions;
use tune_recipes::lora_finetune_single_device::train;

fn losses(config: tune_core::Config) -> Vec<f64> {
    tune_recipes::link();
    train(config, &RunOptions::default())
        .unwrap()
        .steps
        .iter()
        .map(|s| s.loss)
        .collect()
}

fn set_dataset(config: &mut tune_core::Config, yaml: &str) {
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    config.root["dataset"] = value;
}

#[test]
fn a_list_of_datasets_is_their_concatenation() {
    let data = common::root().join("assets/data/gsm8k_first_512.json");
    let node = |split: &str, packed: bool| {
        format!(
            "{{_component_: torchtune.datasets.alpaca_dataset, source: json, data_files: {:?}, split: '{split}', packed: {packed}}}",
            data.display()
        )
    };
    let overrides = [
        "shuffle=False",
        "max_steps_per_epoch=4",
        "tokenizer.max_seq_len=96",
    ];

    let whole_dir = tempfile::tempdir().unwrap();
    let mut whole = common::stories_config(whole_dir.path(), &overrides);
    set_dataset(&mut whole, &node("train[:16]", false));
    let halves_dir = tempfile::tempdir().unwrap();
    let mut halves = common::stories_config(halves_dir.path(), &overrides);
    set_dataset(
        &mut halves,
        &format!(
            "[{}, {}]",
            node("train[:8]", false),
            node("train[8:16]", false)
        ),
    );
    assert_eq!(losses(whole), losses(halves));

    let mixed_dir = tempfile::tempdir().unwrap();
    let mut mixed = common::stories_config(mixed_dir.path(), &overrides);
    set_dataset(
        &mut mixed,
        &format!(
            "[{}, {}]",
            node("train[:8]", false),
            node("train[8:16]", true)
        ),
    );
    let err = train(mixed, &RunOptions::default()).unwrap_err();
    assert!(
        format!("{err:#}").contains("mixes packed and unpacked"),
        "{err:#}"
    );
}
