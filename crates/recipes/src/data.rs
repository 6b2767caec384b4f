//! The recipe's data pipeline from its config: tokenizer, dataset, sampler and collate.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use tune_core::ComponentKind;
use tune_data::{
    BatchSampler, CollateSft, DatasetSpec, Examples, Llama2Tokenizer, CROSS_ENTROPY_IGNORE_IDX,
};
use tune_models::decoder::PackedRows;

use crate::settings::TopLevel;

/// Tokenized samples (or packs of them) plus how to batch them.
pub struct TrainData {
    pub tokenizer: Llama2Tokenizer,
    pub examples: Examples,
    pub sampler: BatchSampler,
    pub collate: CollateSft,
}

/// A batch on the device.
pub struct DeviceBatch {
    pub tokens: Tensor,
    pub labels: Tensor,
    /// Labels that count in the loss, before the shift (torchtune's token count).
    pub num_label_tokens: usize,
    /// Where each row's samples start, for a batch of packs.
    pub packed: Option<PackedRows>,
}

/// Builds the config's `tokenizer` and checks that it belongs to a model of `model_vocab` tokens.
pub fn build_tokenizer(cfg: &TopLevel, model_vocab: usize) -> Result<Llama2Tokenizer> {
    let tokenizer: Llama2Tokenizer = cfg.build("tokenizer", ComponentKind::Tokenizer)?;
    check_vocab(&tokenizer, model_vocab)?;
    Ok(tokenizer)
}

/// The tokenizer's ids must all be rows of the model's embedding.
pub fn check_vocab(tokenizer: &Llama2Tokenizer, model_vocab: usize) -> Result<()> {
    if tokenizer.vocab_size() > model_vocab {
        bail!(
            "tokenizer {} has {} tokens but the model's vocab_size is {model_vocab}: they do not belong \
             together. Point tokenizer.path at the model's tokenizer.model, or fix model.vocab_size",
            tokenizer.path().display(),
            tokenizer.vocab_size()
        );
    }
    Ok(())
}

/// Builds the tokenizer and dataset named by the config and checks them against the model.
pub fn build(
    cfg: &TopLevel,
    (model_vocab, model_max_seq_len): (usize, usize),
    batch_size: usize,
    shuffle: bool,
    (num_replicas, rank): (usize, usize),
) -> Result<TrainData> {
    let tokenizer = build_tokenizer(cfg, model_vocab)?;
    // One dataset, or a list of them trained as one (torchtune's ConcatDataset).
    let datasets: Vec<DatasetSpec> = cfg.build_each(
        "dataset",
        ComponentKind::Dataset,
        "; preference datasets (chosen/rejected pairs) train with lora_dpo_single_device",
    )?;
    let packed = datasets.iter().filter(|d| d.packing.is_some()).count();
    if packed > 0 && packed < datasets.len() {
        bail!("`dataset` mixes packed and unpacked datasets; set `packed` the same on all of them");
    }
    if packed > 0 {
        let pack_length = datasets[0].pack_length(&tokenizer)?;
        if pack_length > model_max_seq_len {
            bail!(
                "tokenizer.max_seq_len {pack_length} (the length of every pack) exceeds the model's \
                 max_seq_len {model_max_seq_len}; lower tokenizer.max_seq_len"
            );
        }
        if cfg.node("collate_fn").is_ok() {
            tracing::warn!(
                "dataset.packed=True: packs are batched as they are; `collate_fn` is not used"
            );
        }
    }
    let mut examples = match packed {
        0 => Examples::Samples(Vec::new()),
        _ => Examples::Packs(Vec::new()),
    };
    for (i, dataset) in datasets.iter().enumerate() {
        let loaded = dataset
            .load_examples(&tokenizer)
            .with_context(|| match datasets.len() {
                1 => "loading `dataset`".to_string(),
                _ => format!("loading `dataset.{i}`"),
            })?;
        match (&mut examples, loaded) {
            (Examples::Samples(all), Examples::Samples(more)) => all.extend(more),
            (Examples::Packs(all), Examples::Packs(more)) => all.extend(more),
            _ => unreachable!("packing was checked to be the same for every dataset"),
        }
    }
    if let Examples::Packs(packs) = &examples {
        tracing::info!(
            "packed the dataset into {} packs of {} tokens",
            packs.len(),
            packs.first().map_or(0, |p| p.tokens.len())
        );
    }
    if examples.is_empty() {
        bail!("the dataset is empty; check dataset.data_files and dataset.split");
    }
    let max_seq_len = tokenizer
        .max_seq_len()
        .map_or("null".to_string(), |n| n.to_string());
    // Said before training (torchtune fails at the first batch that holds such a sample).
    if let Examples::Samples(samples) = &examples {
        if let Some((index, longest)) = samples
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.tokens.len()))
            .max_by_key(|&(_, len)| len)
            .filter(|&(_, len)| len > model_max_seq_len)
        {
            bail!(
                "sample {index} has {longest} tokens, more than the model's max_seq_len \
                 {model_max_seq_len}; set tokenizer.max_seq_len to at most {model_max_seq_len} \
                 (now {max_seq_len}) so that longer samples are truncated"
            );
        }
    }
    let label_less = examples.without_a_label_to_predict();
    if label_less == examples.len() {
        // Each token is learnt from the ones before it: a sample cut to one token has none.
        bail!(
            "no sample has a labelled token after its first, so there is nothing to learn (the \
             loss would be 0/0); raise tokenizer.max_seq_len (now {max_seq_len}), set \
             train_on_input, or check the data"
        );
    }
    if label_less > 0 {
        // Said now, not first at the step that meets them (which trains on nothing).
        tracing::warn!(
            "{label_less} of {} examples have no labelled token after their first (every \
             response masked or cut off by tokenizer.max_seq_len = {max_seq_len}); a step made \
             only of such examples is skipped without an update",
            examples.len()
        );
    }
    let collate: CollateSft = match cfg.node("collate_fn") {
        // torchtune reads collate_fn as a dotted path (its default is the string
        // `torchtune.data.padded_collate_sft`); a `_component_` node works here too.
        Ok(serde_yaml::Value::String(path)) => {
            let mut node = serde_yaml::Mapping::new();
            node.insert("_component_".into(), path.as_str().into());
            crate::settings::build_node(
                "collate_fn",
                &serde_yaml::Value::Mapping(node),
                ComponentKind::Collator,
                "",
            )?
        }
        Ok(_) => cfg.build("collate_fn", ComponentKind::Collator)?,
        Err(_) => CollateSft::default(),
    };
    let ignore = tune_data::CROSS_ENTROPY_IGNORE_IDX;
    if collate.ignore_idx != ignore {
        // The loss ignores -100 only: any other value would train on the padding.
        bail!(
            "collate_fn.ignore_idx must be {ignore}, the label the datasets mask with and the \
             loss ignores (got {})",
            collate.ignore_idx
        );
    }
    let unit = match examples {
        Examples::Samples(_) => "samples",
        Examples::Packs(_) => "packs",
    };
    let sampler = build_sampler(
        (examples.len(), unit),
        batch_size,
        shuffle,
        (num_replicas, rank),
    )?;
    Ok(TrainData {
        tokenizer,
        examples,
        sampler,
        collate,
    })
}

/// torchtune's recipes give their `DistributedSampler` this seed whatever the config's `seed`
/// (which seeds the adapters' initialisation and dropout), so every run sees the same order.
const SAMPLER_SEED: u64 = 0;

/// The batch sampler of `num_examples` examples (`unit` names them in messages), with
/// the last partial batch dropped and, with several ranks, this rank's share.
pub fn build_sampler(
    (num_examples, unit): (usize, &str),
    batch_size: usize,
    shuffle: bool,
    (num_replicas, rank): (usize, usize),
) -> Result<BatchSampler> {
    // torchtune's recipe always drops the last partial batch; with several ranks each takes
    // every `num_replicas`-th sample of the (padded) order, as DistributedSampler does.
    let sampler = BatchSampler::new(num_examples, batch_size)?
        .with_shuffle(shuffle, SAMPLER_SEED)
        .with_drop_last(true)
        .with_replicas(num_replicas, rank)?;
    if sampler.num_batches() == 0 {
        let share = if num_replicas == 1 {
            format!("the dataset ({} {unit})", num_examples)
        } else {
            format!(
                "each rank's share of the dataset ({} {unit} over {num_replicas} ranks)",
                num_examples
            )
        };
        bail!(
            "batch_size {batch_size} is larger than {share} and the last partial batch is dropped; \
             lower batch_size"
        );
    }
    Ok(sampler)
}

impl TrainData {
    /// Samples, or packs with `packed: True`.
    pub fn num_examples(&self) -> usize {
        self.examples.len()
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.sampler.num_batches()
    }

    /// Sample indices of every batch of `epoch` (the same in every run).
    pub fn epoch_batches(&self, epoch: usize) -> Result<Vec<Vec<usize>>> {
        Ok(self.sampler.batches_for_epoch(epoch as u64))
    }

    /// The batch of examples `indices` on `device`, for a model running in `dtype`.
    pub fn collate(&self, indices: &[usize], device: &Device, dtype: DType) -> Result<DeviceBatch> {
        let batch = self.examples.collate(indices, &self.collate);
        let shape = batch.shape();
        let packed = match &batch.packed {
            Some(layout) => Some(PackedRows::new(
                &layout.input_pos,
                &layout.seq_lens,
                device,
                dtype,
            )?),
            None => None,
        };
        Ok(DeviceBatch {
            tokens: Tensor::from_vec(batch.tokens_flat(), shape, device)?,
            labels: Tensor::from_vec(batch.labels_flat(), shape, device)?,
            num_label_tokens: batch.num_label_tokens(CROSS_ENTROPY_IGNORE_IDX),
            packed,
        })
    }
}
