//! tune-core: what every other tune-rs crate shares.
//!
//! - [`registry`] — the `_component_` registry. Every model builder, adapter, tokenizer, dataset,
//!   checkpointer, optimizer, scheduler, loss, metric logger and recipe registers itself here
//!   (with `inventory`) under torchtune's dotted name, with its argument schema.
//! - [`args`] — typed access to a config node's arguments, checked against that schema.
//! - [`config`] — YAML configs, torchtune's command-line override grammar and `${key}` interpolation.
//! - [`validate`] — checks a whole config against the registry and reports every problem at once.
//! - [`adapter`] — the `Adapter` trait that LoRA, QLoRA, DoRA and plugin adapters implement.
//! - [`recipe`] — the `Recipe` trait that `tune run` dispatches to.
//! - [`autograd`] — ops whose backward is exactly what training needs (no gradients for frozen
//!   weights, backward for the fused kernels candle ships without one).
//! - [`compare`] — how far two tensors are apart (parity checks, tests).
//! - [`params`] — named parameter shapes, so models can be counted without allocating them.

pub mod adapter;
pub mod args;
pub mod autograd;
pub mod compare;
pub mod config;
pub mod params;
pub mod recipe;
pub mod registry;
pub mod validate;

pub use adapter::{Adapter, AdapterFactory, AdapterSpec, FrozenLinear, PeftTarget};
pub use args::Args;
pub use config::Config;
pub use recipe::{Recipe, RecipeEntry};
pub use registry::{ArgSpec, ArgType, Component, ComponentKind, Unavailable};

/// Re-exported so that components can register themselves with `tune_core::inventory::submit!`.
pub use inventory;
