//! tune-adapters: the built-in adapters, each one file that registers itself.
//!
//! - [`lora`] — LoRALinear (Hu et al. 2021), torchtune's semantics: `W x + (alpha/r) B A dropout(x)`.
//! - [`nf4`] — torchao's NF4 format, bit for bit, and `linear_nf4`.
//! - [`qlora`] — QLoRA: LoRA over an NF4 base (`qlora`) and the frozen NF4 linear.
//! - [`dora`] — DoRALinear (Liu et al. 2024), dense (`dora`) or over an NF4 base (`qdora`).
//! - [`plugin`] — loads third-party adapter plugins (`tune-plugin-api` libraries) and registers
//!   their adapters.
//!
//! Each adapter registers a component of kind `Adapter` whose build returns an
//! `Arc<dyn AdapterFactory>`; the model asks the registry for it by name, so adding an adapter never
//! touches the model code.

pub mod dora;
pub mod lora;
pub mod nf4;
pub mod plugin;
pub mod qlora;

use std::sync::Arc;

use tune_core::{Adapter, AdapterFactory};

/// Looks up an adapter factory by registry name (`lora`, `dora`, a plugin's name, ...).
pub fn factory(name: &str) -> anyhow::Result<Arc<dyn AdapterFactory>> {
    let kind = tune_core::ComponentKind::Adapter;
    tune_core::registry::build_as(name, kind, &serde_yaml::Value::Null).map_err(|e| {
        if e.is::<tune_core::registry::RegistryError>() {
            anyhow::anyhow!(
                "{e}. `tune ls --adapters` lists the adapters; a plugin's adapter needs the plugin \
                 loaded (`--plugin PATH` on tune run or tune bench, `plugins: [PATH]` in the config, or \
                 TUNE_PLUGIN_PATH)"
            )
        } else {
            e
        }
    })
}

/// The factory that puts adapter `kind` over an NF4 base (`quantize_base: True`): by convention
/// registered as `q{kind}` (`qlora`, `qdora`; a plugin may register its own).
pub fn quantized_factory(kind: &str) -> anyhow::Result<Arc<dyn AdapterFactory>> {
    let name = format!("q{kind}");
    if tune_core::registry::lookup(&name).is_err() {
        anyhow::bail!(
            "adapter `{kind}` cannot be used with quantize_base: True (no `{name}` adapter is registered); \
             set quantize_base: False or use lora/dora"
        );
    }
    factory(&name)
}

/// torchtune's `FrozenNF4Linear` around a dense weight: what a projection without an adapter
/// becomes with `quantize_base: True`.
pub fn frozen_nf4_linear(weight: &candle_core::Tensor) -> candle_core::Result<Box<dyn Adapter>> {
    Ok(Box::new(qlora::FrozenNF4Linear::new(weight)?))
}
