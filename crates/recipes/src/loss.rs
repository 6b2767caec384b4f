//! torchtune's `CEWithChunkedOutputLoss`: fp32 cross-entropy over shifted labels.
//!
//! Labels are shifted left by one (`labels[:, 1:]` plus an ignored last column) and the loss is the
//! sum over non-ignored positions divided by their count. torchtune splits the logits into chunks
//! only to save memory; the sum is the same, so we compute it in one pass with a fused backward.

use anyhow::Result;
use candle_core::{DType, Tensor};
use tune_core::autograd::{cross_entropy_sum, linear_cross_entropy_sum};
use tune_core::{ArgSpec, ArgType, Component, ComponentKind};
use tune_models::decoder::PackedRows;

pub const IGNORE_INDEX: i64 = -100;

/// Labels shifted for next-token prediction: `[b, s]` -> `[b, s]` with the last column ignored.
pub fn shift_labels(labels: &Tensor) -> Result<Tensor> {
    let (b, s) = labels.dims2()?;
    if s == 0 {
        anyhow::bail!("a batch of empty sequences has nothing to predict");
    }
    let labels = labels.to_dtype(DType::I64)?;
    let tail = Tensor::full(IGNORE_INDEX, (b, 1), labels.device())?;
    Ok(Tensor::cat(&[&labels.narrow(1, 1, s - 1)?, &tail], 1)?)
}

/// Returns (sum of token losses, number of counted tokens) for fp32 logits [b, s, v] and unshifted
/// labels [b, s].
pub fn chunked_ce_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, s, v) = logits.dims3()?;
    let shifted = shift_labels(labels)?.reshape(b * s)?;
    Ok(cross_entropy_sum(
        &logits.reshape((b * s, v))?,
        &shifted,
        IGNORE_INDEX,
    )?)
}

/// Rows of logits computed at a time by [`model_ce_sum`] (torchtune splits into 8 chunks).
pub const OUTPUT_CHUNK_ROWS: usize = 256;

/// The training loss of `model` on a batch: (sum of token losses, counted tokens). When the
/// output layer carries no adapter the logits are never materialised (the output projection and
/// the loss run together, a chunk of rows at a time); otherwise it is `chunked_ce_sum(forward)`.
/// `packed` describes rows that hold several samples (`packed: True` datasets). As in
/// torchtune, the labels are shifted along the whole row.
pub fn model_ce_sum(
    model: &tune_models::TransformerDecoder,
    tokens: &Tensor,
    labels: &Tensor,
    packed: Option<&PackedRows>,
    train: bool,
) -> Result<(Tensor, usize)> {
    let opts = tune_models::decoder::Forward {
        train,
        ..Default::default()
    };
    if !model.output.trainable().is_empty() {
        let logits = model.forward_packed(tokens, packed, opts)?.logits;
        return chunked_ce_sum(&logits, labels);
    }
    let (normed, _) = model.final_hidden_packed(tokens, packed, opts)?;
    let (b, s, d) = normed.dims3()?;
    let shifted = shift_labels(labels)?.reshape(b * s)?;
    let weight = model.output.base_weight()?;
    Ok(linear_cross_entropy_sum(
        &normed.reshape((b * s, d))?,
        &weight,
        &shifted,
        IGNORE_INDEX,
        OUTPUT_CHUNK_ROWS,
    )?)
}

/// Mean loss over counted tokens (what torchtune's loss module returns).
pub fn chunked_ce_mean(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (sum, n) = chunked_ce_sum(logits, labels)?;
    Ok((sum / n.max(1) as f64)?)
}

/// Marker for the registered loss.
#[derive(Debug, Clone)]
pub struct ChunkedCrossEntropy {
    pub num_output_chunks: usize,
}

tune_core::inventory::submit! {
    Component {
        path: "torchtune.modules.loss.CEWithChunkedOutputLoss",
        aliases: &["CEWithChunkedOutputLoss"],
        kind: ComponentKind::Loss,
        args: &[
            ArgSpec::optional("num_output_chunks", ArgType::Int, "8"),
            ArgSpec::optional("ignore_index", ArgType::Int, "-100"),
        ],
        extra_args: false,
        about: "fp32 cross-entropy over shifted labels, mean over non-ignored tokens",
        origin: "built-in",
        build: |args| Ok(Box::new(ChunkedCrossEntropy { num_output_chunks: args.get("num_output_chunks")? })),
    }
}
