//! Test components for the config tests. The real ones are registered by other crates (models,
//! data, recipes), which tune-core's tests do not link, so these stand in with the same names and
//! torchtune's signatures.

// Each test binary uses only some of these helpers.
#![allow(dead_code)]

use tune_core::registry::{ArgSpec, ArgType, Component, ComponentKind};
use tune_core::Config;

fn build_nothing(_: &tune_core::Args) -> anyhow::Result<tune_core::registry::Built> {
    Ok(Box::new(()))
}

const LORA_ARGS: &[ArgSpec] = &[
    ArgSpec::required("lora_attn_modules", ArgType::StrList),
    ArgSpec::optional("apply_lora_to_mlp", ArgType::Bool, "false"),
    ArgSpec::optional("apply_lora_to_output", ArgType::Bool, "false"),
    ArgSpec::optional("lora_rank", ArgType::Int, "8"),
    ArgSpec::optional("lora_alpha", ArgType::Float, "16"),
    ArgSpec::optional("lora_dropout", ArgType::Float, "0.0"),
];

tune_core::inventory::submit! {
    Component {
        path: "torchtune.models.llama2.lora_llama2_7b",
        aliases: &["lora_llama2_7b"],
        kind: ComponentKind::Model,
        args: LORA_ARGS,
        extra_args: false,
        about: "test stand-in",
        origin: "test",
        build: build_nothing,
    }
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.models.llama2.lora_llama2_13b",
        aliases: &["lora_llama2_13b"],
        kind: ComponentKind::Model,
        args: LORA_ARGS,
        extra_args: false,
        about: "test stand-in",
        origin: "test",
        build: build_nothing,
    }
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.training.FullModelHFCheckpointer",
        aliases: &["FullModelHFCheckpointer"],
        kind: ComponentKind::Checkpointer,
        args: &[
            ArgSpec::required("checkpoint_dir", ArgType::Str),
            ArgSpec::required("checkpoint_files", ArgType::StrOrList),
            ArgSpec::required("model_type", ArgType::Str),
            ArgSpec::required("output_dir", ArgType::Str),
            ArgSpec::nullable("adapter_checkpoint", ArgType::Str),
            ArgSpec::nullable("recipe_checkpoint", ArgType::Str),
        ],
        extra_args: false,
        about: "test stand-in",
        origin: "test",
        build: build_nothing,
    }
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.datasets.alpaca_dataset",
        aliases: &["alpaca_dataset"],
        kind: ComponentKind::Dataset,
        args: &[
            ArgSpec::optional("source", ArgType::Str, "tatsu-lab/alpaca"),
            ArgSpec::optional("packed", ArgType::Bool, "false"),
            ArgSpec::optional("train_on_input", ArgType::Bool, "true"),
            ArgSpec::optional("split", ArgType::Str, "train"),
        ],
        // load_dataset kwargs such as data_files
        extra_args: true,
        about: "test stand-in",
        origin: "test",
        build: build_nothing,
    }
}

/// torchtune 0.6.1's `llama2/7B_lora_single_device.yaml`, as shipped in `configs/`.
pub const LORA_7B: &str = include_str!("../../../../configs/llama2/7B_lora_single_device.yaml");

pub fn lora_7b() -> Config {
    Config::from_yaml_str(LORA_7B).expect("the built-in config parses")
}

/// `Config::apply_overrides` on string slices.
pub fn apply(config: &mut Config, overrides: &[&str]) -> anyhow::Result<()> {
    let owned: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    config.apply_overrides(&owned)
}

/// The error text of a failing `apply`.
pub fn apply_err(config: &mut Config, overrides: &[&str]) -> String {
    match apply(config, overrides) {
        Ok(()) => panic!("overrides {overrides:?} should have failed"),
        Err(e) => format!("{e:#}"),
    }
}

/// Parses a YAML literal, for comparisons.
pub fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).unwrap()
}
