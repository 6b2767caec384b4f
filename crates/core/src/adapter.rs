//! The `Adapter` trait: a linear layer of the model, possibly carrying trainable parameters.
//!
//! The model code only ever sees `Box<dyn Adapter>` for its projections, so LoRA, QLoRA, DoRA and
//! plugin adapters slot in without touching it. An [`AdapterFactory`] (registered as a component
//! of kind `Adapter`) decides what wraps each frozen base weight.

use candle_core::{Result, Tensor, Var};

/// A (possibly adapted) linear layer `y = f(x)` with a frozen base weight `[out, in]`.
pub trait Adapter: Send + Sync {
    /// The layer's output. `train` enables training-only behaviour such as dropout.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// The output with the adapter disabled (the frozen base layer alone).
    fn forward_base(&self, x: &Tensor) -> Result<Tensor>;

    /// Trainable tensors, named relative to the layer (`lora_a.weight`, `magnitude`, ...).
    fn trainable(&self) -> Vec<(String, Var)>;

    /// The dense weight `[out, in]` with the adapter merged in (for export/merged checkpoints).
    fn merged_weight(&self) -> Result<Tensor>;

    /// The frozen base weight, dense, in the run's dtype.
    fn base_weight(&self) -> Result<Tensor>;

    /// Called once base weights and adapter weights are final before training (DoRA initialises
    /// its magnitude here). The default does nothing.
    fn on_weights_loaded(&self) -> Result<()> {
        Ok(())
    }
}

/// How an adapter is configured on a model (resolved from the model builder's arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// Registry name of the factory, e.g. `lora`, `qlora`, `dora`, or a plugin's adapter.
    pub kind: String,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
}

/// Builds adapter layers around frozen base weights.
pub trait AdapterFactory: Send + Sync {
    /// Names and shapes of the trainable tensors for a base weight `[out_dim, in_dim]`.
    fn param_shapes(&self, spec: &AdapterSpec, in_dim: usize, out_dim: usize) -> Vec<(String, Vec<usize>)>;

    /// Wraps `base_weight` ([out, in]). `seed` makes initialisation reproducible per layer.
    fn build(&self, spec: &AdapterSpec, base_weight: Tensor, seed: u64) -> Result<Box<dyn Adapter>>;
}

/// A frozen linear layer with no adapter: forward only, no weight gradient.
pub struct FrozenLinear {
    pub weight: Tensor,
}

impl Adapter for FrozenLinear {
    fn forward(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        crate::autograd::frozen_linear(x, &self.weight)
    }
    fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        crate::autograd::frozen_linear(x, &self.weight)
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    fn merged_weight(&self) -> Result<Tensor> {
        Ok(self.weight.clone())
    }
    fn base_weight(&self) -> Result<Tensor> {
        Ok(self.weight.clone())
    }
}
