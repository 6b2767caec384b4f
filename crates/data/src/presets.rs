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
//! | `wikitext_dataset` | `EleutherAI/wikitext_document_level`, config `subset` (`wikitext-103-v1`): `page` | `text_completion_dataset` |
//! | `cnn_dailymail_articles_dataset` | `ccdv/cnn_dailymail`, config `3.0.0`: `article` | `text_completion_dataset` |

use anyhow::{bail, Result};
use serde_yaml::Value;
use tune_core::{ArgSpec, ArgType, Args};

use crate::chat::build_sharegpt;
use crate::dataset::DatasetSpec;
use crate::instruct::build_input_output;
use crate::preference::build_chosen_rejected;
use crate::text_completion::build_text_completion;

/// A text-completion preset: the text of `column` in the dataset config `config` (a Hub
/// dataset's subset, as `load_dataset(source, name)`). Like torchtune's, the preset fixes the
/// column and the config, so passing either again is an error.
/// `config_arg` is the preset's own argument for the config, if it has one (wikitext's `subset`).
fn build_text_preset(
    args: &Args,
    component: &'static str,
    column: &str,
    config: Value,
    config_arg: Option<&str>,
) -> Result<DatasetSpec> {
    for fixed in ["column", "name"] {
        if args.is_null(fixed) {
            continue;
        }
        match (fixed, config_arg) {
            ("name", Some(own)) => {
                bail!("{component} names its config with `{own}`; set `{own}` instead of `name`")
            }
            _ => bail!(
                "{component} sets `{fixed}` itself; to read another, use \
                 torchtune.datasets.text_completion_dataset with `source`, `column` and `name`"
            ),
        }
    }
    if !args.is_null("max_seq_len") {
        bail!(
            "{component}: samples are cut at the tokenizer's length; set \
             `tokenizer.max_seq_len` instead of `dataset.max_seq_len`"
        );
    }
    let mut args = args.clone();
    args.remove("max_seq_len");
    args.set("column", Value::String(column.to_string()));
    // Local files through a packaged builder (`source: json`) have no configs.
    if !config.is_null() && !crate::dataset::is_packaged(&args.get::<String>("source")?) {
        args.set("name", config);
    }
    build_text_completion(&args, component)
}

/// The arguments of torchtune's text-completion presets after `source`.
macro_rules! text_preset_args {
    ($source:expr $(, $extra:expr)*) => {
        &[
            ArgSpec::optional("source", ArgType::Str, $source),
            $($extra,)*
            ArgSpec::nullable("max_seq_len", ArgType::Int),
            ArgSpec::optional("packed", ArgType::Bool, "false"),
            ArgSpec::nullable("filter_fn", ArgType::Any),
            ArgSpec::optional("split", ArgType::Str, "train"),
            ArgSpec::nullable("data_files", ArgType::Any),
        ]
    };
}

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

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.wikitext_dataset",
        aliases: &["wikitext_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: text_preset_args!(
            "EleutherAI/wikitext_document_level",
            // null: the card's default config.
            ArgSpec {
                name: "subset",
                ty: ArgType::Str,
                default: Some("wikitext-103-v1"),
                nullable: true,
            }
        ),
        extra_args: true,
        about: "Wikipedia articles (the `page` column) for continued pre-training, text_completion_dataset over EleutherAI/wikitext_document_level",
        origin: "built-in",
        build: |args| {
            let mut args = args.clone();
            let subset = args.remove("subset").unwrap_or(Value::Null);
            Ok(Box::new(build_text_preset(&args, "wikitext_dataset", "page", subset, Some("subset"))?))
        },
    }
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.cnn_dailymail_articles_dataset",
        aliases: &["cnn_dailymail_articles_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: text_preset_args!("ccdv/cnn_dailymail"),
        extra_args: true,
        about: "News articles (the `article` column, not the highlights), text_completion_dataset over ccdv/cnn_dailymail 3.0.0",
        origin: "built-in",
        build: |args| {
            let config = Value::String("3.0.0".into());
            Ok(Box::new(build_text_preset(args, "cnn_dailymail_articles_dataset", "article", config, None)?))
        },
    }
}
