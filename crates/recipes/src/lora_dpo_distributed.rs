//! `lora_dpo_distributed`: LoRA DPO data-parallel over the ranks of a [`ProcessGroup`](crate::distributed::ProcessGroup) — the
//! [`Preference`] objective in the distributed loop (each rank takes its share of every batch;
//! gradients are averaged over all ranks' micro-batches before each step; rank 0 logs and saves).

use anyhow::Result;
use tune_core::recipe::{Recipe, RecipeEntry, RunOptions};
use tune_core::Config;

use crate::lora_dpo_single_device::Preference;
use crate::training_loop::run_distributed;

pub struct LoraDpoDistributed;

tune_core::inventory::submit! { RecipeEntry(&LoraDpoDistributed) }

impl Recipe for LoraDpoDistributed {
    fn name(&self) -> &'static str {
        "lora_dpo_distributed"
    }

    fn configs(&self) -> &'static [&'static str] {
        &["llama2/7B_lora_dpo"]
    }

    fn supports_distributed(&self) -> bool {
        true
    }

    fn top_level_keys(&self) -> &'static [&'static str] {
        crate::settings::DPO_KEYS
    }

    fn keys_without_effect(&self) -> &'static [&'static str] {
        crate::settings::TRAINING_KEYS_WITHOUT_EFFECT
    }

    fn run(&self, config: Config, options: &RunOptions) -> Result<()> {
        run_distributed(config, options, Preference::build).map(|_| ())
    }
}
