//! tune-recipes: the recipes `tune run` dispatches to, and the training pieces they share.
//!
//! - [`optim`]: AdamW with torch's semantics.
//! - [`lr_schedule`]: torchtune's cosine schedule with warmup.
//! - [`loss`]: `CEWithChunkedOutputLoss`.

pub mod loss;
pub mod lr_schedule;
pub mod optim;

/// Referencing this from the binary links the recipes crate (and, through it, every crate whose
/// components register themselves), so the `_component_` registry is complete.
pub fn link() {}
