//! torchtune's `instruct_dataset`: rows with one prompt column and one response column
//! (`input` and `output`, renamed by `column_map`), optionally behind a new system prompt.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tune_core::{ArgSpec, ArgType, Args};

use crate::dataset::{check_column_map, text_column, DatasetSpec, RowToSample};
use crate::json_source::Row;
use crate::llama2_tokenizer::Llama2Tokenizer;
use crate::messages::{Message, Role};
use crate::sft::{tokenize_sft, Sample};

/// torchtune's `InputOutputToMessages`: a system message (when `new_system_prompt`), the user's
/// `input` (masked unless `train_on_input`) and the assistant's `output`.
#[derive(Debug, Clone, PartialEq)]
pub struct InputOutputRows {
    pub train_on_input: bool,
    pub column_map: BTreeMap<String, String>,
    pub new_system_prompt: Option<String>,
}

impl InputOutputRows {
    pub fn messages(&self, row: &Row) -> Result<Vec<Message>> {
        let input = text_column(row, "input", &self.column_map, true)?.unwrap_or_default();
        let output = text_column(row, "output", &self.column_map, true)?.unwrap_or_default();
        let mut messages = Vec::with_capacity(3);
        if let Some(system) = &self.new_system_prompt {
            messages.push(Message::new(Role::System, system.clone(), true));
        }
        messages.push(Message::new(Role::User, input, !self.train_on_input));
        messages.push(Message::new(Role::Assistant, output, false));
        Ok(messages)
    }
}

impl RowToSample for InputOutputRows {
    fn sample(&self, row: &Row, tokenizer: &Llama2Tokenizer) -> Result<Sample> {
        tokenize_sft(&self.messages(row)?, tokenizer).with_context(|| row.location())
    }
}

fn build(args: &Args) -> Result<DatasetSpec> {
    build_input_output(args, "instruct_dataset", None)
}

/// An `InputOutputToMessages` dataset `component`, with `default_columns` (input, output) when
/// `column_map` is empty (torchtune's `samsum_dataset` and the like).
pub fn build_input_output(
    args: &Args,
    component: &'static str,
    default_columns: Option<(&str, &str)>,
) -> Result<DatasetSpec> {
    let given: Option<BTreeMap<String, String>> = args.get_opt("column_map")?;
    let column_map = match (given.filter(|m| !m.is_empty()), default_columns) {
        (Some(map), _) => Some(map),
        (None, Some((input, output))) => Some(BTreeMap::from([
            ("input".to_string(), input.to_string()),
            ("output".to_string(), output.to_string()),
        ])),
        (None, None) => None,
    };
    if let Some(map) = &column_map {
        check_column_map(component, map, &["input", "output"])?;
        for key in ["input", "output"] {
            if !map.contains_key(key) {
                bail!(
                    "{component}.column_map must map both `input` and `output` (found {}); \
                     e.g. column_map: {{input: question, output: answer}}",
                    map.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
    let rows = InputOutputRows {
        train_on_input: args.get_opt::<bool>("train_on_input")?.unwrap_or(false),
        column_map: column_map.unwrap_or_default(),
        new_system_prompt: args.get_opt("new_system_prompt")?,
    };
    DatasetSpec::from_args(
        args,
        component,
        &["column_map", "train_on_input", "new_system_prompt"],
        false,
        Arc::new(rows),
    )
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.instruct_dataset",
        aliases: &["instruct_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: &[
            ArgSpec::required("source", ArgType::Str),
            ArgSpec::nullable("column_map", ArgType::Any),
            ArgSpec::optional("train_on_input", ArgType::Bool, "false"),
            ArgSpec::nullable("new_system_prompt", ArgType::Str),
            ArgSpec::optional("packed", ArgType::Bool, "false"),
            ArgSpec::nullable("filter_fn", ArgType::Any),
            ArgSpec::optional("split", ArgType::Str, "train"),
            ArgSpec::nullable("data_files", ArgType::Any),
        ],
        extra_args: true,
        about: "Prompt/response rows (input/output columns, renamed by column_map) from local JSON: source: json, data_files: ...",
        origin: "built-in",
        build: |args| Ok(Box::new(build(args)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(json: &str) -> Row {
        Row {
            file: "d.jsonl".into(),
            index: 0,
            line: Some(1),
            columns: serde_json::from_str(json).unwrap(),
        }
    }

    #[test]
    fn system_prompt_and_masks() {
        let rows = InputOutputRows {
            train_on_input: false,
            column_map: BTreeMap::from([
                ("input".to_string(), "question".to_string()),
                ("output".to_string(), "answer".to_string()),
            ]),
            new_system_prompt: Some("Be brief.".into()),
        };
        let m = rows
            .messages(&row(r#"{"question": "2+2?", "answer": "4"}"#))
            .unwrap();
        let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User, Role::Assistant]);
        assert_eq!((m[1].text(), m[2].text()), ("2+2?".into(), "4".into()));
        assert!(m[0].masked && m[1].masked && !m[2].masked);
        let err = rows.messages(&row(r#"{"input": "x"}"#)).unwrap_err();
        assert!(err.to_string().contains("no `question` column"), "{err}");
    }
}
