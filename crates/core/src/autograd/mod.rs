//! Ops with exactly the backward that parameter-efficient training needs.
//!
//! Candle's autograd has two gaps on a LoRA training path:
//! - its fused kernels (`rms_norm`, `rope_i`, `softmax_last_dim`) record no backward, so a graph
//!   built from them silently stops propagating gradients;
//! - its matmul backward always computes the gradient of *both* operands, so a frozen weight
//!   costs a full-size gradient (as much compute and memory as the weight) on every step.
//!
//! [`with_backward`] closes both gaps: it runs any forward on detached inputs (so the fast fused
//! kernels are used and nothing is recorded) and attaches a hand-written backward that returns only
//! the input gradient. Every op below is built on it and is device-generic.
//!
//! - `graph`: attaching a backward to a forward computed off the graph ([`with_backward`]),
//!   and gradients handed over beside the graph ([`param_grad`]).
//! - `linear`: `x @ W.T` for a frozen `W`.
//! - `norm`: RMSNorm in fp32.
//! - `rope`: the interleaved rotary embedding.
//! - `attention`: causal attention and the fused RoPE-attention block.
//! - `swiglu`: the MLP's gated activation.
//! - `cross_entropy`: the loss, whole or a chunk of rows at a time.

mod attention;
mod cross_entropy;
mod graph;
mod linear;
mod norm;
mod rope;
mod swiglu;
#[cfg(test)]
mod test_util;

pub use attention::{attention, masked_softmax, rope_attention, AttentionMask, MaskBlock};
pub use cross_entropy::{
    cross_entropy_rows, cross_entropy_sum, linear_cross_entropy_rows, linear_cross_entropy_sum,
};
pub use graph::{accumulate_side_grad, param_grad, with_backward, with_backward2, with_backward3};
pub use linear::{frozen_linear, matmul_t, plain_frozen_matmul, set_plain_frozen_matmul};
pub use norm::rms_norm;
pub use rope::rope_interleaved;
pub use swiglu::swiglu;
