//! `lora_dpo_single_device`: torchtune 0.6.1's LoRA DPO recipe (Direct Preference Optimization,
//! Rafailov et al. 2023) on one device.
//!
//! Each example is a prompt with a chosen and a rejected response. A micro-batch runs the chosen
//! and the rejected sequences through the model as one batch twice: with the adapters (the
//! policy) and without them (the reference, i.e. the frozen base model, so no second model is
//! held). Each sequence's log-probability is the sum over its response tokens; the DPO loss is
//! `-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))` (with optional label smoothing;
//! `RSOLoss`'s hinge `relu(1 - gamma * ...)` also works; both in [`crate::rlhf_loss`]), averaged
//! over the micro-batch. As in torchtune, micro-batches count equally in a gradient
//! accumulation window, and the step logs the rewards `beta * (pi - ref)` of its last
//! micro-batch.
//!
//! The rest — model, optimizer, schedule, checkpoints, resume, Ctrl-C — is the LoRA loop
//! ([`train_objective`]) with this [`Preference`] objective.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use tune_core::recipe::{Recipe, RecipeEntry, RunOptions};
use tune_core::{ComponentKind, Config};
use tune_data::preference::padded_collate_dpo;
use tune_data::{BatchSampler, PreferencePair, PreferenceSpec};
use tune_models::decoder::Forward;
use tune_models::{ModelSpec, TransformerDecoder};

use crate::data::{build_sampler, build_tokenizer};
use crate::distributed::ProcessGroup;
use crate::loss::IGNORE_INDEX;
use crate::rlhf_loss::PreferenceLoss;
use crate::settings::TopLevel;
use crate::training_loop::{train_objective, DataSettings, MicroBatch, Objective, RunSummary};

pub struct LoraDpoSingleDevice;

tune_core::inventory::submit! { RecipeEntry(&LoraDpoSingleDevice) }

impl Recipe for LoraDpoSingleDevice {
    fn name(&self) -> &'static str {
        "lora_dpo_single_device"
    }

    fn configs(&self) -> &'static [&'static str] {
        &[
            "llama2/7B_lora_dpo_single_device",
            "stories260K/lora_dpo_single_device",
        ]
    }

    fn top_level_keys(&self) -> &'static [&'static str] {
        crate::settings::DPO_KEYS
    }

    fn keys_without_effect(&self) -> &'static [&'static str] {
        crate::settings::TRAINING_KEYS_WITHOUT_EFFECT
    }

    fn run(&self, config: Config, options: &RunOptions) -> Result<()> {
        if options.is_distributed() {
            bail!("lora_dpo_single_device runs on one device; use lora_dpo_distributed with --nproc_per_node");
        }
        train(config, options).map(|_| ())
    }
}

/// Runs DPO on one device.
pub fn train(config: Config, options: &RunOptions) -> Result<RunSummary> {
    train_objective(
        config,
        options,
        &mut ProcessGroup::single(),
        Preference::build,
    )
}

/// Each sequence's summed log-probability of its labels: `logits` [batch, seq, vocab] against
/// the labels shifted by one, ignored labels skipped -> [batch] (torchtune's
/// `get_batch_log_probs`).
pub fn sequence_log_probs(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (batch, seq, vocab) = logits.dims3()?;
    let shifted = crate::loss::shift_labels(labels)?.reshape(batch * seq)?;
    let nll = tune_core::autograd::cross_entropy_rows(
        &logits.reshape((batch * seq, vocab))?,
        &shifted,
        IGNORE_INDEX,
    )?;
    Ok(nll.reshape((batch, seq))?.sum(D::Minus1)?.neg()?)
}

/// Each sequence's summed label log-probability ([2 * pairs]) and the mean logit of the chosen
/// and of the rejected half (torchtune's `logits/*`, padding included). When the output layer
/// has no adapter the [rows, vocab] logits are never materialised: the log-probabilities come
/// from the hidden states a chunk of rows at a time, and the mean logit of rows `r` is
/// `(sum_r h_r) . (sum_v w_v) / (rows * vocab)`.
pub fn log_probs_and_logit_means(
    model: &TransformerDecoder,
    tokens: &Tensor,
    labels: &Tensor,
    pairs: usize,
    opts: Forward,
) -> Result<(Tensor, (f64, f64))> {
    let (batch, seq) = tokens.dims2()?;
    if !model.output.trainable().is_empty() {
        let logits = model.forward_with(tokens, opts)?.logits;
        let mean = |start: usize| -> Result<f64> {
            Ok(logits
                .narrow(0, start, pairs)?
                .mean_all()?
                .to_scalar::<f32>()? as f64)
        };
        let means = (mean(0)?, mean(pairs)?);
        return Ok((sequence_log_probs(&logits, labels)?, means));
    }
    let (normed, _) = model.final_hidden(tokens, opts)?;
    let dim = normed.dim(2)?;
    let weight = model.output.base_weight()?;
    let shifted = crate::loss::shift_labels(labels)?.reshape(batch * seq)?;
    let nll = tune_core::autograd::linear_cross_entropy_rows(
        &normed.reshape((batch * seq, dim))?,
        &weight,
        &shifted,
        IGNORE_INDEX,
        crate::loss::output_chunk_rows(normed.device()),
    )?;
    let log_probs = nll.reshape((batch, seq))?.sum(D::Minus1)?.neg()?;
    let weight_sum = weight.to_dtype(DType::F32)?.sum(0)?;
    let vocab = weight.dim(0)?;
    let mean = |start: usize| -> Result<f64> {
        let hidden_sum = normed
            .detach()
            .narrow(0, start, pairs)?
            .to_dtype(DType::F32)?
            .reshape((pairs * seq, dim))?
            .sum(0)?;
        let total: f32 = (hidden_sum * &weight_sum)?.sum_all()?.to_scalar()?;
        Ok(total as f64 / (pairs * seq * vocab) as f64)
    };
    Ok((log_probs, (mean(0)?, mean(pairs)?)))
}

/// The DPO objective: preference pairs, the DPO loss, and what torchtune logs with it.
pub struct Preference {
    pairs: Vec<PreferencePair>,
    sampler: BatchSampler,
    padding_idx: u32,
    loss: PreferenceLoss,
}

impl Preference {
    pub fn build(
        cfg: &TopLevel,
        spec: &ModelSpec,
        settings: &DataSettings,
    ) -> Result<Box<dyn Objective>> {
        let loss: PreferenceLoss = cfg.build_expecting(
            "loss",
            ComponentKind::Loss,
            "; DPO needs `loss: {_component_: torchtune.rlhf.loss.DPOLoss}` (or RSOLoss)",
        )?;
        if cfg.opt::<f64>("clip_grad_norm")?.is_some() {
            tracing::warn!(
                "clip_grad_norm is applied to this DPO run; torchtune's DPO recipes ignore it, so \
                 their numbers would differ"
            );
        }
        let tokenizer = build_tokenizer(cfg, spec.transformer.vocab_size)?;
        // One dataset, or a list of them trained as one (torchtune's ConcatDataset).
        let datasets: Vec<PreferenceSpec> = cfg.build_each(
            "dataset",
            ComponentKind::Dataset,
            "; DPO trains on preference pairs: use torchtune.datasets.preference_dataset or \
             stack_exchange_paired_dataset",
        )?;
        let mut pairs = Vec::new();
        for dataset in &datasets {
            pairs.extend(dataset.load(&tokenizer).context("loading `dataset`")?);
        }
        let learnable = |p: &tune_data::preference::PreferencePair| {
            tune_data::sft::has_a_label_to_predict(&p.chosen.labels)
                || tune_data::sft::has_a_label_to_predict(&p.rejected.labels)
        };
        if !pairs.is_empty() && !pairs.iter().any(learnable) {
            // Only assistant messages are scored: without one, truncation is not the cause.
            let truncation = match tokenizer.max_seq_len() {
                Some(n) => format!(
                    "if the prompts are long, raise tokenizer.max_seq_len (now {n}); otherwise "
                ),
                None => String::new(),
            };
            bail!(
                "no preference pair keeps a response token to score (after the prompt, from the \
                 second token on), so DPO has nothing to compare; {truncation}check that each \
                 chosen and rejected conversation ends with an assistant message (only those are \
                 scored)"
            );
        }
        // A pair whose two sides are the same sequence has no preference to learn: its loss
        // gradient is zero (up to rounding, which AdamW would scale up into full-size steps).
        let identical = pairs.iter().filter(|p| p.chosen == p.rejected).count();
        if identical == pairs.len() && identical > 0 {
            bail!(
                "every preference pair has the same chosen and rejected tokens, so DPO has \
                 nothing to learn; check the dataset's column_map (are both sides read from one \
                 column?), or raise tokenizer.max_seq_len if truncation cut both sides to the \
                 same prompt-only tokens"
            );
        }
        if identical > 0 {
            tracing::warn!(
                "{identical} of {} preference pairs have the same chosen and rejected tokens \
                 (identical responses, or both cut off by tokenizer.max_seq_len); they teach \
                 nothing",
                pairs.len()
            );
        }
        let longest = pairs
            .iter()
            .map(|p| p.chosen.len().max(p.rejected.len()))
            .max()
            .unwrap_or(0);
        if longest > spec.transformer.max_seq_len {
            bail!(
                "a preference example has {longest} tokens, more than the model's max_seq_len {}; \
                 set tokenizer.max_seq_len to truncate",
                spec.transformer.max_seq_len
            );
        }
        let sampler = build_sampler(
            (pairs.len(), "preference pairs"),
            settings.batch_size,
            settings.shuffle,
            settings.replicas,
        )?;
        Ok(Box::new(Preference {
            pairs,
            sampler,
            padding_idx: tokenizer.pad_id(),
            loss,
        }))
    }
}

impl Objective for Preference {
    fn sampler(&self) -> &BatchSampler {
        &self.sampler
    }

    fn num_examples(&self) -> usize {
        self.pairs.len()
    }

    fn micro_batch(
        &self,
        model: &TransformerDecoder,
        indices: &[usize],
        device: &Device,
    ) -> Result<MicroBatch> {
        // Chosen rows first, then the rejected ones, padded together.
        let batch = padded_collate_dpo(indices.iter().map(|&i| &self.pairs[i]), self.padding_idx);
        let shape = batch.shape();
        let tokens = Tensor::from_vec(batch.tokens_flat(), shape, device)?;
        let labels = Tensor::from_vec(batch.labels_flat(), shape, device)?;
        let pairs = indices.len();
        let chosen = |t: &Tensor| t.narrow(0, 0, pairs);
        let rejected = |t: &Tensor| t.narrow(0, pairs, pairs);

        let train = Forward {
            train: true,
            ..Default::default()
        };
        let (policy, (logits_chosen, logits_rejected)) =
            log_probs_and_logit_means(model, &tokens, &labels, pairs, train)?;
        // The reference model is the base model: the same weights with the adapters off.
        let base = Forward {
            adapters_disabled: true,
            ..Default::default()
        };
        let reference = log_probs_and_logit_means(model, &tokens, &labels, pairs, base)?
            .0
            .detach();

        let out = self.loss.forward(
            (&chosen(&policy)?, &rejected(&policy)?),
            (&chosen(&reference)?, &rejected(&reference)?),
        )?;
        let mean = |xs: &[f32]| xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len().max(1) as f64;
        let margins: Vec<f32> = out
            .chosen_rewards
            .iter()
            .zip(&out.rejected_rewards)
            .map(|(c, r)| c - r)
            .collect();
        let accuracy: Vec<f32> = margins.iter().map(|&m| (m > 0.0) as u8 as f32).collect();
        let policy_mean = |t: candle_core::Result<Tensor>| -> Result<f64> {
            Ok(t?.detach().mean_all()?.to_scalar::<f32>()? as f64)
        };
        let metrics = vec![
            ("rewards/chosen".into(), mean(&out.chosen_rewards)),
            ("rewards/rejected".into(), mean(&out.rejected_rewards)),
            ("rewards/accuracies".into(), mean(&accuracy)),
            ("rewards/margins".into(), mean(&margins)),
            ("log_probs/rejected".into(), policy_mean(rejected(&policy))?),
            ("log_probs/chosen".into(), policy_mean(chosen(&policy))?),
            ("logits/rejected".into(), logits_rejected),
            ("logits/chosen".into(), logits_chosen),
        ];
        Ok(MicroBatch {
            weighted_loss: out.loss,
            weight: 1.0,
            // torchtune counts every position of the concatenated batch, padding included.
            tokens: shape.0 * shape.1,
            metrics,
        })
    }

    fn divides_by_accumulation_steps(&self) -> bool {
        true
    }
}
