//! tune-models: Llama2 as torchtune structures it, on candle.
//!
//! - [`spec`] — what a model is before it has weights: dimensions, which projections carry an
//!   adapter, and every parameter's name and shape (so `--dry-run` counts 7B without allocating it).
//! - [`builders`] — torchtune's builders (`llama2_7b`, `lora_llama2_7b`, `lora_llama2`, ...),
//!   registered under torchtune's dotted names.
//! - [`decoder`] — the TransformerDecoder (tok_embeddings, layers, norm, output) and its forward.
//! - [`convert`] — Hugging Face <-> torchtune names, the q/k row permutation, PEFT adapter names.
//! - [`checkpoint`] — reading HF safetensors (single or sharded) and PyTorch `.bin` files, with
//!   torchtune's missing/unexpected-key validation.

pub mod builders;
pub mod checkpoint;
pub mod convert;
pub mod decoder;
pub mod spec;

pub use decoder::TransformerDecoder;
pub use spec::{LoraSettings, ModelSpec, TransformerConfig};
