//! `lora_finetune_single_device`: torchtune 0.6.1's LoRA recipe on one device.
//!
//! The recipe is the [`training_loop`](crate::training_loop) with torchtune's SFT objective,
//! [`NextToken`]: next-token cross-entropy, each micro-batch weighted by its label tokens.

use anyhow::{bail, Result};
use candle_core::Device;
use tune_core::recipe::{Recipe, RecipeEntry, RunOptions};
use tune_core::{ComponentKind, Config};
use tune_data::BatchSampler;
use tune_models::{ModelSpec, TransformerDecoder};

use crate::data::{self, TrainData};
use crate::distributed::ProcessGroup;
use crate::loss::model_ce_sum;
use crate::settings::TopLevel;
use crate::training_loop::{train_objective, DataSettings, MicroBatch, Objective, RunSummary};

pub struct LoraFinetuneSingleDevice;

tune_core::inventory::submit! { RecipeEntry(&LoraFinetuneSingleDevice) }

impl Recipe for LoraFinetuneSingleDevice {
    fn name(&self) -> &'static str {
        "lora_finetune_single_device"
    }

    fn configs(&self) -> &'static [&'static str] {
        &[
            "llama2/7B_lora_single_device",
            "llama2/7B_qlora_single_device",
            "llama2/13B_qlora_single_device",
            "stories260K/lora_single_device",
            "stories260K/qlora_single_device",
            "stories260K/lora_text_completion",
        ]
    }

    fn top_level_keys(&self) -> &'static [&'static str] {
        crate::settings::SFT_KEYS
    }

    fn keys_without_effect(&self) -> &'static [&'static str] {
        crate::settings::TRAINING_KEYS_WITHOUT_EFFECT
    }

    fn run(&self, config: Config, options: &RunOptions) -> Result<()> {
        if options.is_distributed() {
            bail!("lora_finetune_single_device runs on one device; use lora_finetune_distributed with --nproc_per_node");
        }
        train(config, options).map(|_| ())
    }
}

/// torchtune's SFT objective: next-token cross-entropy (`CEWithChunkedOutputLoss`), each
/// micro-batch's mean loss weighted by its label tokens.
pub struct NextToken {
    pub data: TrainData,
}

impl NextToken {
    pub fn build(
        cfg: &TopLevel,
        spec: &ModelSpec,
        settings: &DataSettings,
    ) -> Result<Box<dyn Objective>> {
        let _loss: crate::loss::ChunkedCrossEntropy = cfg.build_expecting(
            "loss",
            ComponentKind::Loss,
            "; it trains with torchtune.modules.loss.CEWithChunkedOutputLoss (DPOLoss belongs to \
             lora_dpo_single_device / lora_dpo_distributed)",
        )?;
        let data = data::build(
            cfg,
            (spec.transformer.vocab_size, spec.transformer.max_seq_len),
            settings.batch_size,
            settings.shuffle,
            settings.replicas,
        )?;
        Ok(Box::new(NextToken { data }))
    }
}

impl Objective for NextToken {
    fn sampler(&self) -> &BatchSampler {
        &self.data.sampler
    }

    fn num_examples(&self) -> usize {
        self.data.num_examples()
    }

    fn micro_batch(
        &self,
        model: &TransformerDecoder,
        indices: &[usize],
        device: &Device,
    ) -> Result<MicroBatch> {
        let batch = self.data.collate(indices, device, model.dtype())?;
        let tokens = batch.num_label_tokens;
        let (ce_sum, shifted) = model_ce_sum(
            model,
            &batch.tokens,
            &batch.labels,
            batch.packed.as_ref(),
            true,
        )?;
        // torchtune weights each micro-batch's mean loss by its (unshifted) label count. With
        // no label left after the shift there is nothing to learn (torchtune's mean is 0/0):
        // weight 0, as a micro-batch without labels.
        let weighted_loss = ((ce_sum / shifted.max(1) as f64)? * tokens as f64)?;
        Ok(MicroBatch {
            weighted_loss,
            weight: if shifted == 0 { 0.0 } else { tokens as f64 },
            tokens,
            metrics: Vec::new(),
        })
    }
}

pub fn train(config: Config, options: &RunOptions) -> Result<RunSummary> {
    train_data_parallel(config, options, &mut ProcessGroup::single())
}

/// The SFT loop, run by every rank of `group` (a group of one for the single-device recipe).
pub fn train_data_parallel(
    config: Config,
    options: &RunOptions,
    group: &mut ProcessGroup,
) -> Result<RunSummary> {
    train_objective(config, options, group, NextToken::build)
}
