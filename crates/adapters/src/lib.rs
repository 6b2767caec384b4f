//! tune-adapters: the built-in adapters, each one file that registers itself.
//!
//! - [`lora`]: LoRALinear (Hu et al. 2021), torchtune's semantics: `W x + (alpha/r) B A dropout(x)`.
//!
//! Each adapter registers a component of kind `Adapter` whose build returns an
//! `Arc<dyn AdapterFactory>`; the model asks the registry for it by name, so adding an adapter never
//! touches the model code.

pub mod lora;

use std::sync::Arc;

use tune_core::AdapterFactory;

/// Looks up an adapter factory by registry name (`lora`, `dora`, a plugin's name, ...).
pub fn factory(name: &str) -> anyhow::Result<Arc<dyn AdapterFactory>> {
    let component = tune_core::registry::lookup(name)?;
    if component.kind != tune_core::ComponentKind::Adapter {
        anyhow::bail!("`{name}` is a {} component, not an adapter", component.kind);
    }
    let built = component.build_from(&serde_yaml::Value::Null)?;
    built
        .downcast::<Arc<dyn AdapterFactory>>()
        .map(|b| *b)
        .map_err(|_| anyhow::anyhow!("component `{name}` did not build an adapter factory"))
}
