//! tune-data: tokenizers, datasets and batching for tune-rs, matching torchtune 0.6.1.
//!
//! Tokenizers
//! - [`sentencepiece`] — SentencePiece `tokenizer.model` files (protobuf `ModelProto`,
//!   normalizer, BPE with byte fallback, decode), id-for-id with the `sentencepiece` library.
//! - [`hf_tokenizer`] — Llama-style Hugging Face `tokenizer.json` files (BPE, byte fallback,
//!   Metaspace), id-for-id with the `tokenizers` library.
//! - [`tokenizer`] — [`Tokenizer`], one type over both formats, chosen by file name.
//! - [`llama2_tokenizer`]: torchtune's `llama2_tokenizer` (BOS/EOS, whitespace trimming,
//!   `tokenize_messages` with truncation and loss masks).
//! - [`messages`] — chat messages and prompt templates (`Llama2ChatTemplate`).
//!
//! Data
//! - [`json_source`] — local JSON / JSON Lines / text / Parquet data files and `train[:10%]`-style
//!   splits.
//! - [`dataset`] — what every dataset builder shares ([`DatasetSpec`]: source, split, packing).
//! - [`dataset_card`] — the `configs` of a Hugging Face dataset card (`name`: a dataset's subsets).
//! - [`alpaca`] — `alpaca_dataset` / `alpaca_cleaned_dataset`.
//! - [`instruct`] — `instruct_dataset` (prompt/response columns).
//! - [`chat`] — `chat_dataset` (ShareGPT / OpenAI conversations).
//! - [`text_completion`] — `text_completion_dataset` (free text).
//! - [`preference`] — chosen/rejected pairs for DPO (`preference_dataset`,
//!   `stack_exchange_paired_dataset`) and `padded_collate_dpo`.
//! - [`presets`] — torchtune's named Hub datasets (`samsum_dataset`, `grammar_dataset`,
//!   `slimorca_dataset`, `hh_rlhf_helpful_dataset`, `wikitext_dataset`,
//!   `cnn_dailymail_articles_dataset`) as presets of the builders above.
//! - [`sft`] — the tokenized training [`Sample`] (tokens, labels, mask).
//! - [`packed`] — `packed: True`: samples packed into fixed-length [`Pack`]s.
//!
//! Batching
//! - [`collate`] — `padded_collate_sft` into a [`Batch`].
//! - [`loader`] — a seeded, resumable batch sampler and data loader.
//!
//! Components registered in tune-core's registry: `torchtune.models.llama2.llama2_tokenizer`
//! (builds a [`Llama2Tokenizer`]), the `torchtune.datasets.*` builders above (each builds a
//! [`DatasetSpec`]; call [`DatasetSpec::load_examples`] with the tokenizer), and
//! `torchtune.data.padded_collate_sft` (builds a [`CollateSft`]).

pub mod alpaca;
mod bpe;
mod charsmap;
pub mod chat;
pub mod collate;
pub mod dataset;
pub mod dataset_card;
pub mod hf_tokenizer;
pub mod instruct;
pub mod json_source;
pub mod llama2_tokenizer;
pub mod loader;
pub mod messages;
pub mod packed;
pub mod preference;
pub mod presets;
mod protobuf;
pub mod sentencepiece;
pub mod sft;
pub mod text_completion;
pub mod tokenizer;

pub use collate::{padded_collate_sft, Batch, CollateSft, PackedLayout};
pub use dataset::DatasetSpec;
pub use llama2_tokenizer::Llama2Tokenizer;
pub use loader::{BatchSampler, DataLoader, LoaderPosition};
pub use messages::{Message, PromptTemplate, Role};
pub use packed::{Examples, Pack};
pub use preference::{PreferencePair, PreferenceSpec};
pub use sft::{Sample, CROSS_ENTROPY_IGNORE_IDX};
pub use tokenizer::Tokenizer;
