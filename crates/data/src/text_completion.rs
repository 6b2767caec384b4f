//! torchtune's `text_completion_dataset`: free text (a column of JSON rows, or the lines of a text
//! file with `source: text`), trained on every token — continued pre-training.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use tune_core::{ArgSpec, ArgType, Args};

use crate::dataset::{DatasetSpec, RowToSample};
use crate::json_source::Row;
use crate::llama2_tokenizer::Llama2Tokenizer;
use crate::sft::Sample;

/// torchtune's `TextCompletionDataset._prepare_sample`: BOS + the text's tokens (+ EOS), cut to
/// `tokenizer.max_seq_len - 1` tokens when set (as torchtune 0.6.1 does, leaving the cut text
/// without EOS), every token a label.
#[derive(Debug, Clone, PartialEq)]
pub struct TextRows {
    pub column: String,
    pub add_eos: bool,
}

impl RowToSample for TextRows {
    fn sample(&self, row: &Row, tokenizer: &Llama2Tokenizer) -> Result<Sample> {
        let text = match row.columns.get(&self.column) {
            Some(Value::String(s)) => s,
            Some(_) => bail!("{}: `{}` is not text", row.location(), self.column),
            None => {
                return Err(anyhow!(
                "{}: no `{}` column (columns: {}); set `column` to the column that holds the text",
                row.location(),
                self.column,
                row.columns.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
            }
        };
        let mut tokens = tokenizer.encode(text, true, self.add_eos, false);
        if let Some(max_seq_len) = tokenizer.max_seq_len() {
            if max_seq_len < 2 {
                bail!(
                    "tokenizer.max_seq_len is {max_seq_len}: text completion keeps max_seq_len - 1 \
                     tokens per sample, so it must be at least 2"
                );
            }
            tokens.truncate(max_seq_len - 1);
        }
        let mask = vec![false; tokens.len()];
        Ok(Sample::from_tokens_and_mask(tokens, mask))
    }
}

/// `text_completion_dataset` (or a preset of it, named `component`) over `args`.
pub(crate) fn build_text_completion(args: &Args, component: &'static str) -> Result<DatasetSpec> {
    let rows = TextRows {
        column: args.get_opt("column")?.unwrap_or_else(|| "text".into()),
        add_eos: args.get_opt::<bool>("add_eos")?.unwrap_or(true),
    };
    let split_across_pack = args.get_opt::<bool>("split_across_pack")?.unwrap_or(true);
    DatasetSpec::from_args(
        args,
        component,
        &["column", "add_eos", "split_across_pack"],
        split_across_pack,
        Arc::new(rows),
    )
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.text_completion_dataset",
        aliases: &["text_completion_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: &[
            ArgSpec::required("source", ArgType::Str),
            ArgSpec::optional("column", ArgType::Str, "text"),
            ArgSpec::optional("add_eos", ArgType::Bool, "true"),
            ArgSpec::optional("packed", ArgType::Bool, "false"),
            ArgSpec::optional("split_across_pack", ArgType::Bool, "true"),
            ArgSpec::optional("split", ArgType::Str, "train"),
            ArgSpec::nullable("filter_fn", ArgType::Any),
            ArgSpec::nullable("data_files", ArgType::Any),
        ],
        extra_args: true,
        about: "Free text trained on every token: source: text (one sample per line) or json (column), with data_files",
        origin: "built-in",
        build: |args| Ok(Box::new(build_text_completion(args, "text_completion_dataset")?)),
    }
}
