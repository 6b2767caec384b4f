//! `lora_finetune_distributed`: torchtune 0.6.1's multi-device LoRA recipe, as data parallelism.
//!
//! `tune run --nproc_per_node N lora_finetune_distributed ...` starts N worker processes (one per
//! GPU, or N CPU processes sharing the cores) with torchrun's environment; each joins the
//! [`ProcessGroup`] and runs the single-device loop on its share of every batch
//! ([`train_data_parallel`]). Numbers match torchtune's recipe: gradients are the sum over all
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

use crate::distributed::ProcessGroup;
use crate::lora_finetune_single_device::train_data_parallel;

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

    /// Runs as one rank of the group the environment describes (`tune run`'s launcher sets it);
    /// without one, as a group of one.
    fn top_level_keys(&self) -> &'static [&'static str] {
        crate::settings::SFT_KEYS
    }

    fn keys_without_effect(&self) -> &'static [&'static str] {
        crate::settings::TRAINING_KEYS_WITHOUT_EFFECT
    }

    fn run(&self, config: Config, options: &RunOptions) -> Result<()> {
        let mut group = if options.dry_run {
            ProcessGroup::single()
        } else {
            ProcessGroup::from_env()?
        };
        // torchtune's FSDP option (`fsdp_cpu_offload`; its 70B config spells it `fsdp.cpu_offload`,
        // which its recipe does not read): every rank here holds the whole model.
        for key in ["fsdp_cpu_offload", "fsdp.cpu_offload"] {
            if config.get(key).and_then(|v| v.as_bool()) == Some(true) {
                tracing::warn!(
                    "{key}=True has no effect: tune-rs does not shard or offload the frozen base \
                     model; each rank keeps it on its device"
                );
            }
        }
        if group.world_size() > 1 {
            tracing::info!(
                "rank {} of {} (local rank {})",
                group.rank(),
                group.world_size(),
                group.local_rank()
            );
        }
        train_data_parallel(config, options, &mut group).map(|_| ())
    }
}
