//! torchtune's `alpaca_dataset` and `alpaca_cleaned_dataset`.
//!
//! Each row `{instruction, input, output}` becomes a user message (the Alpaca prompt, masked
//! unless `train_on_input`) and an assistant message (the output), tokenized by the tokenizer
//! (which also applies its prompt template, by default Llama-2's `[INST] ... [/INST]`).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use tune_core::{ArgSpec, ArgType, Args};

use crate::dataset::{check_column_map, text_column, DatasetSpec, RowToSample};
use crate::json_source::Row;
use crate::llama2_tokenizer::Llama2Tokenizer;
use crate::messages::{Message, Role};
use crate::sft::{tokenize_sft, Sample};

/// The Alpaca prompt for rows with a non-empty `input`.
pub const PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";

/// The Alpaca prompt for rows without `input`.
pub const PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// The columns an Alpaca row is read from.
pub const ALPACA_COLUMNS: [&str; 3] = ["instruction", "input", "output"];

/// The Alpaca prompt for one row.
pub fn alpaca_prompt(instruction: &str, input: Option<&str>) -> String {
    match input.filter(|s| !s.is_empty()) {
        Some(input) => fill(
            PROMPT_INPUT,
            &[("{instruction}", instruction), ("{input}", input)],
        ),
        None => fill(PROMPT_NO_INPUT, &[("{instruction}", instruction)]),
    }
}

/// Fills the template's placeholders in order, as Python's `str.format` does: braces inside a
/// filled-in value (an instruction about `{input}`) are left as they are.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut rest = template;
    for (placeholder, value) in values {
        let (head, tail) = rest
            .split_once(placeholder)
            .expect("the Alpaca templates hold each placeholder once");
        out.push_str(head);
        out.push_str(value);
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// torchtune's `AlpacaToMessages`: the user prompt (masked unless `train_on_input`) and the
/// assistant's output. `column_map` maps `instruction`/`input`/`output` to the row's column names.
pub fn alpaca_to_messages(
    row: &Row,
    train_on_input: bool,
    column_map: &BTreeMap<String, String>,
) -> Result<Vec<Message>> {
    let instruction = text_column(row, "instruction", column_map, true)?.unwrap_or_default();
    let input = text_column(row, "input", column_map, false)?;
    let output = text_column(row, "output", column_map, true)?.unwrap_or_default();
    let prompt = alpaca_prompt(&instruction, input.as_deref());
    Ok(vec![
        Message::new(Role::User, prompt, !train_on_input),
        Message::new(Role::Assistant, output, false),
    ])
}

/// The Alpaca rows of `alpaca_dataset` / `alpaca_cleaned_dataset`.
#[derive(Debug, Clone, PartialEq)]
pub struct AlpacaRows {
    pub train_on_input: bool,
    pub column_map: BTreeMap<String, String>,
}

impl RowToSample for AlpacaRows {
    fn sample(&self, row: &Row, tokenizer: &Llama2Tokenizer) -> Result<Sample> {
        let messages = alpaca_to_messages(row, self.train_on_input, &self.column_map)?;
        tokenize_sft(&messages, tokenizer).with_context(|| row.location())
    }
}

/// Builds `alpaca_dataset` / `alpaca_cleaned_dataset` from its arguments.
fn build(args: &Args, component: &'static str) -> Result<DatasetSpec> {
    let column_map: BTreeMap<String, String> = args.get_opt("column_map")?.unwrap_or_default();
    check_column_map(component, &column_map, &ALPACA_COLUMNS)?;
    let rows = AlpacaRows {
        train_on_input: args.get_opt::<bool>("train_on_input")?.unwrap_or(true),
        column_map,
    };
    DatasetSpec::from_args(
        args,
        component,
        &["column_map", "train_on_input"],
        false,
        Arc::new(rows),
    )
}

const DATASET_ARGS_ALPACA: &[ArgSpec] = &[
    ArgSpec::optional("source", ArgType::Str, "tatsu-lab/alpaca"),
    ArgSpec::nullable("column_map", ArgType::Any),
    ArgSpec::optional("train_on_input", ArgType::Bool, "true"),
    ArgSpec::optional("packed", ArgType::Bool, "false"),
    ArgSpec::nullable("filter_fn", ArgType::Any),
    ArgSpec::optional("split", ArgType::Str, "train"),
    ArgSpec::nullable("data_files", ArgType::Any),
];

const DATASET_ARGS_ALPACA_CLEANED: &[ArgSpec] = &[
    ArgSpec::optional("source", ArgType::Str, "yahma/alpaca-cleaned"),
    ArgSpec::nullable("column_map", ArgType::Any),
    ArgSpec::optional("train_on_input", ArgType::Bool, "true"),
    ArgSpec::optional("packed", ArgType::Bool, "false"),
    ArgSpec::nullable("filter_fn", ArgType::Any),
    ArgSpec::optional("split", ArgType::Str, "train"),
    ArgSpec::nullable("data_files", ArgType::Any),
];

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.alpaca_dataset",
        aliases: &["alpaca_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: DATASET_ARGS_ALPACA,
        extra_args: true,
        about: "Alpaca instruction data (instruction/input/output rows) from local JSON: source: json, data_files: ...",
        origin: "built-in",
        build: |args| Ok(Box::new(build(args, "alpaca_dataset")?)),
    }
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.alpaca_cleaned_dataset",
        aliases: &["alpaca_cleaned_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: DATASET_ARGS_ALPACA_CLEANED,
        extra_args: true,
        about: "alpaca_dataset with yahma/alpaca-cleaned as the default source (use source: json, data_files: ... offline)",
        origin: "built-in",
        build: |args| Ok(Box::new(build(args, "alpaca_cleaned_dataset")?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::path::PathBuf;

    fn row(json: &str) -> Row {
        let columns = match serde_json::from_str(json).unwrap() {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        Row {
            file: PathBuf::from("data.json"),
            index: 3,
            line: None,
            columns,
        }
    }

    #[test]
    fn prompts_with_and_without_input() {
        let m = alpaca_to_messages(
            &row(r#"{"instruction": "Add.", "input": "1 2", "output": "3"}"#),
            false,
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(m[0].text().contains("### Input:\n1 2\n\n### Response:\n"));
        assert!(m[0].masked && !m[1].masked);
        assert_eq!(m[1].text(), "3");
        for input in [r#""input": """#, r#""input": null"#, r#""other": 1"#] {
            let json = format!(r#"{{"instruction": "Add.", {input}, "output": "3"}}"#);
            let m = alpaca_to_messages(&row(&json), true, &BTreeMap::new()).unwrap();
            assert_eq!(
                m[0].text(),
                PROMPT_NO_INPUT.replace("{instruction}", "Add.")
            );
            assert!(!m[0].masked);
        }
    }

    #[test]
    fn braces_in_the_data_are_text_not_placeholders() {
        let prompt = alpaca_prompt("Explain {input} and {instruction}", Some("x"));
        assert!(prompt.contains("### Instruction:\nExplain {input} and {instruction}\n\n"));
        assert!(prompt.contains("### Input:\nx\n\n### Response:\n"));
    }

    #[test]
    fn missing_columns_name_the_row_and_the_fix() {
        let err = alpaca_to_messages(
            &row(r#"{"instruction": "x", "response": "y"}"#),
            true,
            &BTreeMap::new(),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("data.json row 3")
                && msg.contains("`output`")
                && msg.contains("column_map"),
            "{msg}"
        );
        assert!(msg.contains("instruction, response"), "{msg}");
        let map = BTreeMap::from([("output".to_string(), "response".to_string())]);
        let m = alpaca_to_messages(&row(r#"{"instruction": "x", "response": "y"}"#), true, &map)
            .unwrap();
        assert_eq!(m[1].text(), "y");
        let err = alpaca_to_messages(
            &row(r#"{"instruction": null, "output": "y"}"#),
            true,
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("null"));
    }
}
