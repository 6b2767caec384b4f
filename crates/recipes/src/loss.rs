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

/// Rows of logits computed at a time by [`model_ce_sum`] (torchtune splits into 8 chunks): 256
/// on the CPU, where they fit its caches; 1024 on a GPU, where 256-row GEMMs and a softmax of
/// one warp per row would leave most of it idle (1024 x 32000 fp32 logits are 131 MB).
pub fn output_chunk_rows(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        256
    } else {
        1024
    }
}

/// The training loss of `model` on a batch: (sum of token losses, counted tokens). The
/// [tokens, vocab] logits are never materialised: the output projection and the loss run
/// together a chunk of rows at a time (with an adapter on the output layer, each chunk is
/// recomputed in the backward, as activation checkpointing does). Only an output adapter with
/// dropout in training falls back to `chunked_ce_sum(forward)`. `packed` describes rows that
/// hold several samples (`packed: True` datasets). As in torchtune, the labels are shifted along
/// the whole row.
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
    let adapted = !model.output.trainable().is_empty();
    if adapted && train && model.output.is_random_in_training() {
        let logits = model.forward_packed(tokens, packed, opts)?.logits;
        return chunked_ce_sum(&logits, labels);
    }
    let (normed, _) = model.final_hidden_packed(tokens, packed, opts)?;
    let (b, s, d) = normed.dims3()?;
    let shifted = shift_labels(labels)?.reshape(b * s)?;
    let hidden = normed.reshape((b * s, d))?;
    if adapted {
        return adapted_output_ce_sum(model.output.clone(), &hidden, &shifted, train);
    }
    let weight = model.output.base_weight()?;
    Ok(linear_cross_entropy_sum(
        &hidden,
        &weight,
        &shifted,
        IGNORE_INDEX,
        output_chunk_rows(hidden.device()),
    )?)
}

/// The summed loss of an output layer with its own adapter over `hidden` [rows, dim] against
/// `shifted` labels, [`output_chunk_rows`] rows at a time: each chunk's logits live only while its
/// loss is computed, and the backward recomputes them chunk by chunk (the output layer's
/// activation checkpointing). The adapter's gradients reach the training loop through
/// `tune_core::autograd::param_grad`, as a checkpointed layer's do.
fn adapted_output_ce_sum(
    output: std::sync::Arc<dyn tune_core::Adapter>,
    hidden: &Tensor,
    shifted: &Tensor,
    train: bool,
) -> Result<(Tensor, usize)> {
    let rows = hidden.dim(0)?;
    let chunk_rows = output_chunk_rows(hidden.device());
    let h = hidden.detach();
    let chunks: Vec<(usize, usize)> = (0..rows)
        .step_by(chunk_rows)
        .map(|start| (start, chunk_rows.min(rows - start)))
        .collect();
    let chunk_loss = {
        let (output, shifted) = (output.clone(), shifted.clone());
        move |h: &Tensor, start: usize, len: usize| -> candle_core::Result<(Tensor, usize)> {
            let logits = output.forward(h, train)?.to_dtype(DType::F32)?;
            cross_entropy_sum(&logits, &shifted.narrow(0, start, len)?, IGNORE_INDEX)
        }
    };
    let mut total = Tensor::zeros((), DType::F32, hidden.device())?;
    let mut counted = 0;
    for &(start, len) in &chunks {
        let (sum, n) = chunk_loss(&h.narrow(0, start, len)?.detach(), start, len)?;
        total = (total + sum.detach())?;
        counted += n;
    }
    let loss = tune_core::autograd::with_backward(
        "adapted_output_cross_entropy",
        hidden,
        total,
        move |grad| {
            let mut parts = Vec::with_capacity(chunks.len());
            for &(start, len) in &chunks {
                let hv = candle_core::Var::from_tensor(&h.narrow(0, start, len)?)?;
                let (sum, _) = chunk_loss(hv.as_tensor(), start, len)?;
                let store = sum.broadcast_mul(grad)?.backward()?;
                for (_, var) in output.trainable() {
                    if let Some(g) = store.get(var.as_tensor()) {
                        tune_core::autograd::accumulate_side_grad(&var, g)?;
                    }
                }
                parts.push(store.get(hv.as_tensor()).cloned().ok_or_else(|| {
                    candle_core::Error::Msg("output loss: no gradient for the hidden states".into())
                })?);
            }
            Tensor::cat(&parts, 0)?.to_dtype(h.dtype())
        },
    )?;
    Ok((loss, counted))
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
        build: |args| {
            let ignore_index: i64 = args.get("ignore_index")?;
            if ignore_index != IGNORE_INDEX {
                anyhow::bail!(
                    "CEWithChunkedOutputLoss.ignore_index must be {IGNORE_INDEX}, the label the \
                     datasets mask with (got {ignore_index})"
                );
            }
            Ok(Box::new(ChunkedCrossEntropy { num_output_chunks: args.get("num_output_chunks")? }))
        },
    }
}

// Older torchtune configs name torch's own loss; with its defaults it is the same mean over
// non-ignored tokens, computed here in chunks and in fp32 all the same (torch's own returns bf16
// in a bf16 run).
tune_core::inventory::submit! {
    Component {
        path: "torch.nn.CrossEntropyLoss",
        aliases: &["CrossEntropyLoss", "torch.nn.modules.loss.CrossEntropyLoss"],
        kind: ComponentKind::Loss,
        args: &[
            ArgSpec::nullable("weight", ArgType::Any),
            ArgSpec::optional("ignore_index", ArgType::Int, "-100"),
            ArgSpec::optional("reduction", ArgType::Str, "mean"),
            ArgSpec::optional("label_smoothing", ArgType::Float, "0.0"),
        ],
        extra_args: false,
        about: "torch's cross-entropy with its defaults, computed as CEWithChunkedOutputLoss (in fp32; torch's rounds to bf16 in bf16 runs)",
        origin: "built-in",
        build: |args| {
            let supported = args.is_null("weight")
                && args.get::<i64>("ignore_index")? == -100
                && args.get::<String>("reduction")? == "mean"
                && args.get::<f64>("label_smoothing")? == 0.0;
            if !supported {
                anyhow::bail!(
                    "torch.nn.CrossEntropyLoss: only its defaults (weight=None, ignore_index=-100, \
                     reduction='mean', label_smoothing=0.0) are supported, which is the loss \
                     torchtune's recipes train with"
                );
            }
            Ok(Box::new(ChunkedCrossEntropy { num_output_chunks: 8 }))
        },
    }
}

tune_core::inventory::submit! {
    tune_core::Unavailable {
        path: "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss",
        aliases: &["ForwardKLWithChunkedOutputLoss", "torchtune.modules.loss.ForwardKLLoss"],
        why: "it is the knowledge-distillation loss, and tune-rs has no distillation recipe",
    }
}
