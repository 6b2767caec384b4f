//! tune-recipes: the recipes `tune run` dispatches to, and the training pieces they share.
//!
//! Recipes (each registers itself):
//! - [`lora_finetune_single_device`] — torchtune's LoRA/QLoRA/DoRA fine-tune on one device.
//! - [`lora_finetune_distributed`] — the same loop data-parallel over processes/GPUs.
//! - [`lora_dpo_single_device`] / [`lora_dpo_distributed`] — LoRA DPO (preference pairs,
//!   reference = the base model with the adapters off) in the same loop.
//! - [`eleuther_eval`] — TruthfulQA mc1/mc2 computed as lm-evaluation-harness does.
//! - [`generate`] — text generation with a KV cache (greedy or sampled), with an optional adapter.
//!
//! Pieces:
//! - [`training_loop`] — the loop every training recipe runs (its [`Objective`](training_loop::Objective)
//!   gives each micro-batch's loss).
//! - [`settings`] — device, dtype and top-level keys.
//! - [`data`] — tokenizer + dataset + sampler + collate from the config.
//! - [`inference`] — a model, and optionally an adapter, loaded for generation and eval.
//! - [`loss`] — `CEWithChunkedOutputLoss`.
//! - [`rlhf_loss`] — `DPOLoss` and `RSOLoss`.
//! - [`optim`] — AdamW with torch's semantics.
//! - [`lr_schedule`] — torchtune's cosine schedule with warmup.
//! - [`checkpointer`] — `FullModelHFCheckpointer` (load; save merged weights, PEFT adapter, state).
//! - [`metric_logging`] — DiskLogger, StdoutLogger, TensorBoardLogger.
//! - [`progress`] — the terminal's progress bar, and printing around it.
//! - [`atomic`] — crash-safe file and folder writes.
//! - [`memory`] — the weights' size and fit, out-of-memory advice, peak RSS.
//! - [`device_memory`] — the GPU memory pool's peaks, logged as torchtune logs them.
//! - [`distributed`] — the process group (rendezvous and all-reduce over TCP) ranks train in.
//! - [`selfcheck`] and [`bench`]: fixture parity and speed on any device (`tune selfcheck`, `tune bench`).

pub mod atomic;
pub mod bench;
pub mod checkpointer;
pub mod data;
pub mod device_memory;
pub mod distributed;
pub mod eleuther_eval;
pub mod generate;
pub mod inference;
pub mod lora_dpo_distributed;
pub mod lora_dpo_single_device;
pub mod lora_finetune_distributed;
pub mod lora_finetune_single_device;
pub mod loss;
pub mod lr_schedule;
pub mod memory;
pub mod metric_logging;
pub mod optim;
pub mod progress;
pub mod rlhf_loss;
pub mod selfcheck;
pub mod settings;
pub mod training_loop;

/// Referencing this from the binary links the recipes crate (and, through it, every crate whose
/// components register themselves), so the `_component_` registry is complete.
pub fn link() {}
