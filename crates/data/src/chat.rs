//! torchtune's `chat_dataset`: multi-turn conversations, one list of turns per row, in ShareGPT
//! (`[{"from": "human", "value": ...}, ...]`) or OpenAI (`[{"role": "user", "content": ...}]`) style.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tune_core::{ArgSpec, ArgType, Args};

use crate::dataset::{check_column_map, DatasetSpec, RowToSample};
use crate::json_source::Row;
use crate::llama2_tokenizer::Llama2Tokenizer;
use crate::messages::{Message, Role};
use crate::sft::{tokenize_sft, Sample};

/// How the turns of a conversation are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationStyle {
    /// `{"from": "system" | "human" | "gpt", "value": text}`.
    ShareGpt,
    /// `{"role": "system" | "user" | "assistant" | "ipython", "content": text or [{"type": "text", "text": ...}]}`.
    OpenAi,
}

/// torchtune's `ShareGPTToMessages` / `OpenAIToMessages`: every turn becomes a message; all but
/// the assistant's are masked unless `train_on_input`; `new_system_prompt` replaces any system turn.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationRows {
    pub column: String,
    pub style: ConversationStyle,
    pub train_on_input: bool,
    pub new_system_prompt: Option<String>,
}

impl ConversationRows {
    pub fn messages(&self, row: &Row) -> Result<Vec<Message>> {
        self.messages_in(row, &self.column, "conversation_column")
    }

    /// The conversation in column `column` of `row`; `setting` names the option that picks the
    /// column, for the error when it is missing.
    pub fn messages_in(&self, row: &Row, column: &str, setting: &str) -> Result<Vec<Message>> {
        let turns = match row.columns.get(column) {
            Some(Value::Array(turns)) => turns,
            Some(_) => bail!("{}: `{column}` is not a list of turns", row.location()),
            None => bail!(
                "{}: no `{column}` column (columns: {}); set `{setting}` to the column that holds the turns",
                row.location(),
                row.columns.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        };
        let mut messages = Vec::with_capacity(turns.len() + 1);
        if let Some(system) = &self.new_system_prompt {
            messages.push(Message::new(Role::System, system.clone(), true));
        }
        for (i, turn) in turns.iter().enumerate() {
            let (role, content) = self
                .turn(turn)
                .with_context(|| format!("{}: turn {i}", row.location()))?;
            if role == Role::System && self.new_system_prompt.is_some() {
                continue;
            }
            let masked = role != Role::Assistant && !self.train_on_input;
            let mut message = Message::new(role, String::new(), masked);
            message.content = content;
            messages.push(message);
        }
        Ok(messages)
    }

    /// One turn's role and text items.
    fn turn(&self, turn: &Value) -> Result<(Role, Vec<String>)> {
        let field = |name: &str| {
            turn.get(name).ok_or_else(|| {
                let style = match self.style {
                    ConversationStyle::ShareGpt => "conversation_style sharegpt",
                    ConversationStyle::OpenAi => "conversation_style openai",
                };
                anyhow!("no `{name}` key, which every turn has with {style}")
            })
        };
        match self.style {
            ConversationStyle::ShareGpt => {
                let role = match field("from")?.as_str() {
                    Some("system") => Role::System,
                    Some("human") => Role::User,
                    Some("gpt") => Role::Assistant,
                    Some(other) => {
                        bail!("`from` is {other:?}; ShareGPT turns are from system, human or gpt")
                    }
                    None => {
                        bail!("`from` is not text; ShareGPT turns are from system, human or gpt")
                    }
                };
                let text = field("value")?
                    .as_str()
                    .ok_or_else(|| anyhow!("`value` is not text"))?;
                Ok((role, vec![text.to_string()]))
            }
            ConversationStyle::OpenAi => {
                let role = Role::parse(
                    field("role")?
                        .as_str()
                        .ok_or_else(|| anyhow!("`role` is not text"))?,
                )?;
                let content = match field("content")? {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(items) => items
                        .iter()
                        .map(|item| {
                            match (item.get("type").and_then(Value::as_str), item.get("text")) {
                                (Some("text"), Some(Value::String(s))) => Ok(s.clone()),
                                (Some(kind), _) if kind != "text" => {
                                    bail!("content of type {kind:?} is not supported (text only)")
                                }
                                _ => bail!(
                                    "content items must be {{\"type\": \"text\", \"text\": ...}}"
                                ),
                            }
                        })
                        .collect::<Result<_>>()?,
                    _ => bail!("`content` must be text or a list of text items"),
                };
                Ok((role, content))
            }
        }
    }
}

impl RowToSample for ConversationRows {
    fn sample(&self, row: &Row, tokenizer: &Llama2Tokenizer) -> Result<Sample> {
        tokenize_sft(&self.messages(row)?, tokenizer).with_context(|| row.location())
    }
}

/// A ShareGPT-conversation dataset `component` whose turns are in the column that `column_map`
/// maps `conversations` to (torchtune's `slimorca_dataset`).
pub fn build_sharegpt(args: &Args, component: &'static str) -> Result<DatasetSpec> {
    let column_map: BTreeMap<String, String> = args.get_opt("column_map")?.unwrap_or_default();
    check_column_map(component, &column_map, &["conversations"])?;
    let column = column_map
        .get("conversations")
        .cloned()
        .unwrap_or_else(|| "conversations".into());
    conversation_spec(
        args,
        component,
        (column, ConversationStyle::ShareGpt),
        &["column_map"],
    )
}

fn build(args: &Args) -> Result<DatasetSpec> {
    const COMPONENT: &str = "chat_dataset";
    let style = match args.get::<String>("conversation_style")?.as_str() {
        "sharegpt" => ConversationStyle::ShareGpt,
        "openai" => ConversationStyle::OpenAi,
        other => {
            bail!("{COMPONENT}: unsupported conversation_style {other:?}; use sharegpt or openai")
        }
    };
    conversation_spec(
        args,
        COMPONENT,
        (args.get("conversation_column")?, style),
        &["conversation_column", "conversation_style"],
    )
}

/// A conversation dataset reading `column` in `style`, with `train_on_input` and
/// `new_system_prompt` from `args`; `own` names the component's other arguments.
fn conversation_spec(
    args: &Args,
    component: &'static str,
    (column, style): (String, ConversationStyle),
    own: &[&str],
) -> Result<DatasetSpec> {
    let rows = ConversationRows {
        column,
        style,
        train_on_input: args.get_opt::<bool>("train_on_input")?.unwrap_or(false),
        new_system_prompt: args.get_opt("new_system_prompt")?,
    };
    let known: Vec<&str> = ["train_on_input", "new_system_prompt"]
        .into_iter()
        .chain(own.iter().copied())
        .collect();
    DatasetSpec::from_args(args, component, &known, false, Arc::new(rows))
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.chat_dataset",
        aliases: &["chat_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: &[
            ArgSpec::required("source", ArgType::Str),
            ArgSpec::required("conversation_column", ArgType::Str),
            ArgSpec::required("conversation_style", ArgType::Str),
            ArgSpec::optional("train_on_input", ArgType::Bool, "false"),
            ArgSpec::nullable("new_system_prompt", ArgType::Str),
            ArgSpec::optional("packed", ArgType::Bool, "false"),
            ArgSpec::nullable("filter_fn", ArgType::Any),
            ArgSpec::optional("split", ArgType::Str, "train"),
            ArgSpec::nullable("data_files", ArgType::Any),
        ],
        extra_args: true,
        about: "Multi-turn conversations (sharegpt or openai style) from local JSON: source: json, data_files: ...",
        origin: "built-in",
        build: |args| Ok(Box::new(build(args)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(json: &str) -> Row {
        Row {
            file: "chats.json".into(),
            index: 2,
            line: None,
            columns: serde_json::from_str(json).unwrap(),
        }
    }

    fn rows(style: ConversationStyle, column: &str, system: Option<&str>) -> ConversationRows {
        ConversationRows {
            column: column.into(),
            style,
            train_on_input: false,
            new_system_prompt: system.map(String::from),
        }
    }

    #[test]
    fn sharegpt_turns_and_system_replacement() {
        let r = row(
            r#"{"conversations": [{"from": "system", "value": "old"}, {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ciao"}]}"#,
        );
        let m = rows(ConversationStyle::ShareGpt, "conversations", Some("new"))
            .messages(&r)
            .unwrap();
        let got: Vec<(Role, String, bool)> =
            m.iter().map(|m| (m.role, m.text(), m.masked)).collect();
        assert_eq!(
            got,
            [
                (Role::System, "new".into(), true),
                (Role::User, "hi".into(), true),
                (Role::Assistant, "hello".into(), false),
                (Role::User, "bye".into(), true),
                (Role::Assistant, "ciao".into(), false),
            ]
        );
        let bad = row(r#"{"conversations": [{"from": "bot", "value": "x"}]}"#);
        let err = rows(ConversationStyle::ShareGpt, "conversations", None)
            .messages(&bad)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("chats.json row 2: turn 0"),
            "{err:#}"
        );
    }

    #[test]
    fn openai_text_items_stay_separate() {
        let r = row(
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "c"}]}"#,
        );
        let m = rows(ConversationStyle::OpenAi, "messages", None)
            .messages(&r)
            .unwrap();
        assert_eq!(m[0].content, ["a", "b"]);
        assert_eq!(m[1].content, ["c"]);
        let err = rows(ConversationStyle::OpenAi, "dialog", None)
            .messages(&r)
            .unwrap_err();
        assert!(err.to_string().contains("conversation_column"), "{err}");
    }
}
