//! `lora_finetune_distributed`: torchtune 0.6.1's multi-device LoRA recipe, as data parallelism.
//!
//! `tune run --nproc_per_node N lora_finetune_distributed ...` starts N worker processes (one per
//! GPU, or N CPU processes sharing the cores) with torchrun's environment; each joins the
//! [`ProcessGroup`](crate::distributed::ProcessGroup) and runs the single-device loop on its share of every batch
//! ([`run_distributed`]). Numbers match torchtune's recipe: gradients are the sum over all
//! ranks' tokens divided by the global token count, the logged loss is the global token-weighted
//! mean, `tokens_per_second_per_gpu` is all tokens over the step time per rank, and rank 0 logs
//! and writes the same checkpoint files as the single-device recipe.
//!
//! Unlike torchtune's FSDP, every rank holds the whole frozen base model: LoRA's trainable state
//! is tiny, so sharding would only save the base weights' memory, at the cost of gathering them
//! for every layer's forward and backward. A model whose weights do not fit one device (70B in
//! bf16) is refused before loading, with the numbers; its QLoRA config fits.
//!
//! Several nodes: every rank reads `output_dir` when resuming, so it must be a shared
//! filesystem (only rank 0 writes).

use anyhow::Result;
use tune_core::recipe::{Recipe, RecipeEntry, RunOptions};
use tune_core::Config;

use crate::lora_finetune_single_device::NextToken;
use crate::training_loop::run_distributed;

pub struct LoraFinetuneDistributed;

tune_core::inventory::submit! { RecipeEntry(&LoraFinetuneDistributed) }

impl Recipe for LoraFinetuneDistributed {
    fn name(&self) -> &'static str {
        "lora_finetune_distributed"
    }

    fn configs(&self) -> &'static [&'static str] {
        &[
            "llama2/7B_lora",
            "llama2/13B_lora",
            "llama2/70B_lora",
            "llama2/7B_qlora",
            "llama2/70B_qlora",
            "stories260K/lora_distributed",
        ]
    }

    fn supports_distributed(&self) -> bool {
        true
    }

    fn top_level_keys(&self) -> &'static [&'static str] {
        crate::settings::SFT_KEYS
    }

    fn keys_without_effect(&self) -> &'static [&'static str] {
        crate::settings::TRAINING_KEYS_WITHOUT_EFFECT
    }

    /// Runs as one rank of the group the environment describes (`tune run`'s launcher sets it);
    /// without one, as a group of one.
    fn run(&self, config: Config, options: &RunOptions) -> Result<()> {
        run_distributed(config, options, NextToken::build).map(|_| ())
    }
}
