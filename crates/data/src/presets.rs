//! torchtune's named datasets: presets of the generic builders with a Hugging Face Hub source
//! and its columns. With network access the Hub files (JSON or Parquet) are downloaded; offline,
//! point `source: json`/`parquet` and `data_files` at a local copy with the same columns.
//!
//! | component | rows | builder |
//! |---|---|---|
//! | `samsum_dataset` | `Samsung/samsum`: `dialogue` -> `summary` | `instruct_dataset` |
//! | `grammar_dataset` | `liweili/c4_200m`: `input` -> `output` | `instruct_dataset` |
//! | `slimorca_dataset` | `Open-Orca/SlimOrca-Dedup`: ShareGPT `conversations` | `chat_dataset` |
//! | `hh_rlhf_helpful_dataset` | `RLHFlow/HH-RLHF-Helpful-standard`: `chosen`/`rejected` conversations | `preference_dataset` |

use tune_core::{ArgSpec, ArgType};

use crate::chat::build_sharegpt;
use crate::instruct::build_input_output;
use crate::preference::build_chosen_rejected;

/// The arguments of torchtune's instruct-style presets, with `source` defaulting to `source`.
macro_rules! sft_args {
    ($source:expr) => {
        &[
            ArgSpec::optional("source", ArgType::Str, $source),
            ArgSpec::nullable("column_map", ArgType::Any),
            ArgSpec::optional("train_on_input", ArgType::Bool, "false"),
            ArgSpec::nullable("new_system_prompt", ArgType::Str),
            ArgSpec::optional("packed", ArgType::Bool, "false"),
            ArgSpec::nullable("filter_fn", ArgType::Any),
            ArgSpec::optional("split", ArgType::Str, "train"),
            ArgSpec::nullable("data_files", ArgType::Any),
        ]
    };
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.samsum_dataset",
        aliases: &["samsum_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: sft_args!("Samsung/samsum"),
        extra_args: true,
        about: "Dialogue summarisation (dialogue -> summary), instruct_dataset over Samsung/samsum",
        origin: "built-in",
        build: |args| Ok(Box::new(build_input_output(args, "samsum_dataset", Some(("dialogue", "summary")))?)),
    }
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.grammar_dataset",
        aliases: &["grammar_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: sft_args!("liweili/c4_200m"),
        extra_args: true,
        about: "Grammar correction (input -> output), instruct_dataset over liweili/c4_200m",
        origin: "built-in",
        build: |args| Ok(Box::new(build_input_output(args, "grammar_dataset", None)?)),
    }
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.slimorca_dataset",
        aliases: &["slimorca_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: sft_args!("Open-Orca/SlimOrca-Dedup"),
        extra_args: true,
        about: "ShareGPT conversations, chat_dataset over Open-Orca/SlimOrca-Dedup",
        origin: "built-in",
        build: |args| Ok(Box::new(build_sharegpt(args, "slimorca_dataset")?)),
    }
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.hh_rlhf_helpful_dataset",
        aliases: &["hh_rlhf_helpful_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: &[
            ArgSpec::optional("source", ArgType::Str, "RLHFlow/HH-RLHF-Helpful-standard"),
            ArgSpec::nullable("column_map", ArgType::Any),
            ArgSpec::optional("train_on_input", ArgType::Bool, "false"),
            ArgSpec::nullable("new_system_prompt", ArgType::Str),
            ArgSpec::nullable("filter_fn", ArgType::Any),
            ArgSpec::optional("split", ArgType::Str, "train"),
            ArgSpec::nullable("data_files", ArgType::Any),
        ],
        extra_args: true,
        about: "Anthropic HH helpfulness pairs (chosen/rejected conversations) for DPO",
        origin: "built-in",
        build: |args| Ok(Box::new(build_chosen_rejected(args, "hh_rlhf_helpful_dataset")?)),
    }
}
