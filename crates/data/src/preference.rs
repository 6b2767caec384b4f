//! Preference data for DPO: torchtune's `PreferenceDataset` with `preference_dataset` (chosen and
//! rejected conversations, OpenAI-style) and `stack_exchange_paired_dataset` (a question and two
//! answers), and `padded_collate_dpo`.
//!
//! Each row gives two tokenized samples, the chosen and the rejected conversation, tokenized
//! separately by the model tokenizer (prompt masked unless `train_on_input`).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Result};
use tune_core::{ArgSpec, ArgType, Args};

use crate::chat::{ConversationRows, ConversationStyle};
use crate::collate::Batch;
use crate::dataset::{check_column_map, text_column, RowSource};
use crate::json_source::Row;
use crate::llama2_tokenizer::Llama2Tokenizer;
use crate::messages::{Message, Role};
use crate::sft::{Sample, CROSS_ENTROPY_IGNORE_IDX};

/// One preference example: the same prompt answered well (`chosen`) and badly (`rejected`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    pub chosen: Sample,
    pub rejected: Sample,
}

/// Turns one row into its chosen and rejected conversations; errors name the row.
pub trait RowToConversations: std::fmt::Debug + Send + Sync {
    fn conversations(&self, row: &Row) -> Result<(Vec<Message>, Vec<Message>)>;
}

/// A preference dataset component's parsed arguments; [`PreferenceSpec::load`] tokenizes.
#[derive(Debug, Clone)]
pub struct PreferenceSpec {
    pub rows: RowSource,
    pub to_conversations: Arc<dyn RowToConversations>,
}

impl PreferenceSpec {
    /// torchtune's `PreferenceDataset._prepare_sample` for every selected row. Unlike SFT data,
    /// torchtune does not validate the conversations here; neither do we.
    pub fn load(&self, tokenizer: &Llama2Tokenizer) -> Result<Vec<PreferencePair>> {
        let tokenize = |messages: &[Message]| {
            let (tokens, mask) = tokenizer.tokenize_messages(messages, true);
            Sample::from_tokens_and_mask(tokens, mask)
        };
        use rayon::prelude::*;
        // Rows tokenize independently: on every core, in order.
        self.rows
            .rows()?
            .par_iter()
            .map(|row| {
                let (chosen, rejected) = self.to_conversations.conversations(row)?;
                Ok(PreferencePair {
                    chosen: tokenize(&chosen),
                    rejected: tokenize(&rejected),
                })
            })
            .collect()
    }
}

/// torchtune's `padded_collate_dpo`: the chosen samples, then the rejected ones, right-padded
/// together to the longest of all (tokens with `padding_idx`, labels ignored).
pub fn padded_collate_dpo<'a>(
    pairs: impl IntoIterator<Item = &'a PreferencePair>,
    padding_idx: u32,
) -> Batch {
    let pairs: Vec<&PreferencePair> = pairs.into_iter().collect();
    let samples: Vec<&Sample> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let longest = samples.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut batch = Batch::default();
    for s in samples {
        let mut tokens: Vec<i64> = s.tokens.iter().map(|&t| i64::from(t)).collect();
        tokens.resize(longest, i64::from(padding_idx));
        let mut labels = s.labels.clone();
        labels.resize(longest, CROSS_ENTROPY_IGNORE_IDX);
        batch.tokens.push(tokens);
        batch.labels.push(labels);
    }
    batch
}

/// torchtune's `ChosenRejectedToMessages`: `chosen` and `rejected` columns each hold an
/// OpenAI-style conversation (`[{"role": ..., "content": ...}]`).
#[derive(Debug, Clone)]
pub struct ChosenRejectedRows {
    pub chosen_column: String,
    pub rejected_column: String,
    pub conversation: ConversationRows,
}

impl RowToConversations for ChosenRejectedRows {
    fn conversations(&self, row: &Row) -> Result<(Vec<Message>, Vec<Message>)> {
        let setting = "column_map";
        Ok((
            self.conversation
                .messages_in(row, &self.chosen_column, setting)?,
            self.conversation
                .messages_in(row, &self.rejected_column, setting)?,
        ))
    }
}

/// torchtune's `StackExchangePairedToMessages`: a `prompt` column and two answers.
#[derive(Debug, Clone)]
pub struct PromptAnswersRows {
    pub train_on_input: bool,
    pub column_map: BTreeMap<String, String>,
}

impl RowToConversations for PromptAnswersRows {
    fn conversations(&self, row: &Row) -> Result<(Vec<Message>, Vec<Message>)> {
        let text = |key: &str| -> Result<String> {
            Ok(text_column(row, key, &self.column_map, true)?.unwrap_or_default())
        };
        let prompt = text("prompt")?;
        let answer = |key: &str| -> Result<Vec<Message>> {
            Ok(vec![
                Message::new(Role::User, prompt.clone(), !self.train_on_input),
                Message::new(Role::Assistant, text(key)?, false),
            ])
        };
        Ok((answer("chosen")?, answer("rejected")?))
    }
}

/// torchtune accepts `packed: False` on preference datasets and refuses `True`.
fn refuse_packing(args: &Args, component: &str) -> Result<()> {
    if args.get_opt::<bool>("packed")?.unwrap_or(false) {
        bail!(
            "{component}: packed=True is not supported for preference datasets (nor by torchtune); \
             set `packed: False`"
        );
    }
    Ok(())
}

fn build_preference(args: &Args) -> Result<PreferenceSpec> {
    build_chosen_rejected(args, "preference_dataset")
}

/// A `ChosenRejectedToMessages` preference dataset `component` (torchtune's
/// `preference_dataset`, `hh_rlhf_helpful_dataset`).
pub fn build_chosen_rejected(args: &Args, component: &'static str) -> Result<PreferenceSpec> {
    refuse_packing(args, component)?;
    let column_map: BTreeMap<String, String> = args.get_opt("column_map")?.unwrap_or_default();
    check_column_map(component, &column_map, &["chosen", "rejected"])?;
    if !column_map.is_empty() && column_map.len() != 2 {
        bail!("{component}.column_map must map both `chosen` and `rejected`");
    }
    let column = |key: &str| column_map.get(key).cloned().unwrap_or_else(|| key.into());
    let rows = ChosenRejectedRows {
        chosen_column: column("chosen"),
        rejected_column: column("rejected"),
        conversation: ConversationRows {
            column: String::new(),
            style: ConversationStyle::OpenAi,
            train_on_input: args.get_opt::<bool>("train_on_input")?.unwrap_or(false),
            new_system_prompt: args.get_opt("new_system_prompt")?,
        },
    };
    Ok(PreferenceSpec {
        rows: RowSource::from_args(
            args,
            component,
            &[
                "column_map",
                "train_on_input",
                "new_system_prompt",
                "packed",
            ],
            None,
        )?,
        to_conversations: Arc::new(rows),
    })
}

fn build_stack_exchange(args: &Args) -> Result<PreferenceSpec> {
    const COMPONENT: &str = "stack_exchange_paired_dataset";
    refuse_packing(args, COMPONENT)?;
    // As in torchtune, an empty map means the default one.
    let column_map: BTreeMap<String, String> = match args.get_opt("column_map")? {
        Some(map) if !BTreeMap::is_empty(&map) => map,
        _ => BTreeMap::from(
            [
                ("prompt", "question"),
                ("chosen", "response_j"),
                ("rejected", "response_k"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        ),
    };
    check_column_map(COMPONENT, &column_map, &["prompt", "chosen", "rejected"])?;
    let rows = PromptAnswersRows {
        train_on_input: args.get_opt::<bool>("train_on_input")?.unwrap_or(false),
        column_map,
    };
    Ok(PreferenceSpec {
        rows: RowSource::from_args(
            args,
            COMPONENT,
            &["column_map", "train_on_input", "packed"],
            // torchtune reads this dataset's RL split folder.
            Some("data/rl"),
        )?,
        to_conversations: Arc::new(rows),
    })
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.preference_dataset",
        aliases: &["preference_dataset"],
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
        about: "Chosen/rejected conversations (OpenAI-style message lists) for DPO, from local JSON: source: json, data_files: ...",
        origin: "built-in",
        build: |args| Ok(Box::new(build_preference(args)?)),
    }
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.datasets.stack_exchange_paired_dataset",
        aliases: &["stack_exchange_paired_dataset"],
        kind: tune_core::ComponentKind::Dataset,
        args: &[
            ArgSpec::optional("source", ArgType::Str, "lvwerra/stack-exchange-paired"),
            ArgSpec::nullable("column_map", ArgType::Any),
            ArgSpec::optional("train_on_input", ArgType::Bool, "false"),
            ArgSpec::optional("packed", ArgType::Bool, "false"),
            ArgSpec::nullable("filter_fn", ArgType::Any),
            ArgSpec::optional("split", ArgType::Str, "train"),
            ArgSpec::nullable("data_files", ArgType::Any),
        ],
        extra_args: true,
        about: "A question and a better and a worse answer per row (question/response_j/response_k) for DPO; offline: source: json, data_files: ...",
        origin: "built-in",
        build: |args| Ok(Box::new(build_stack_exchange(args)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(tokens: &[u32], masked: usize) -> Sample {
        let mask = (0..tokens.len()).map(|i| i < masked).collect();
        Sample::from_tokens_and_mask(tokens.to_vec(), mask)
    }

    #[test]
    fn dpo_batches_are_chosen_then_rejected_padded_together() {
        let a = PreferencePair {
            chosen: sample(&[1, 5, 6], 2),
            rejected: sample(&[1, 5, 7, 8, 9], 2),
        };
        let b = PreferencePair {
            chosen: sample(&[1, 4], 1),
            rejected: sample(&[1, 3], 1),
        };
        let batch = padded_collate_dpo([&a, &b], 0);
        assert_eq!(
            batch.tokens,
            [
                vec![1, 5, 6, 0, 0],
                vec![1, 4, 0, 0, 0],
                vec![1, 5, 7, 8, 9],
                vec![1, 3, 0, 0, 0]
            ]
        );
        assert_eq!(batch.labels[0], [-100, -100, 6, -100, -100]);
        assert_eq!(batch.labels[2], [-100, -100, 7, 8, 9]);
    }

    #[test]
    fn stack_exchange_rows_share_the_prompt() {
        let row = Row {
            file: "se.jsonl".into(),
            index: 0,
            line: Some(1),
            columns: serde_json::from_str(
                r#"{"question": "How?", "response_j": "Like this.", "response_k": "No idea."}"#,
            )
            .unwrap(),
        };
        let rows = PromptAnswersRows {
            train_on_input: false,
            column_map: BTreeMap::from(
                [
                    ("prompt", "question"),
                    ("chosen", "response_j"),
                    ("rejected", "response_k"),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string())),
            ),
        };
        let (chosen, rejected) = rows.conversations(&row).unwrap();
        assert_eq!(chosen[0], rejected[0]);
        assert!(chosen[0].masked && !chosen[1].masked);
        assert_eq!(
            (chosen[1].text(), rejected[1].text()),
            ("Like this.".into(), "No idea.".into())
        );
    }
}
