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

    /// Called once base and adapter weights are final, before training, for adapters that derive
    /// state from both. The default does nothing (DoRA sets its magnitude when it is built, as
    /// torchtune does, so that a magnitude loaded from a checkpoint is kept).
    fn on_weights_loaded(&self) -> Result<()> {
        Ok(())
    }

    /// Whether a training forward draws random numbers (dropout), so that running it again does
    /// not reproduce it; recomputing layers in the backward needs `false`.
    fn is_random_in_training(&self) -> bool {
        false
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

/// One adapted projection as PEFT's `adapter_config.json` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeftTarget {
    /// torchtune's module name: `k_proj`, `w2`, `output`.
    pub module: String,
    /// Hugging Face's: `k_proj`, `down_proj`, `lm_head`.
    pub hf_module: String,
}

/// Builds adapter layers around frozen base weights.
///
/// The `*_for` methods and the PEFT hooks have LoRA's behaviour by default; an adapter that
/// treats projections differently (IA3 scales the output of k_proj but the input of w2) or saves
/// another PEFT format overrides them. `slot` is the projection's torchtune prefix
/// (`layers.0.attn.k_proj`, `layers.3.mlp.w2`, `output`).
pub trait AdapterFactory: Send + Sync {
    /// Names and shapes of the trainable tensors for a base weight `[out_dim, in_dim]`.
    fn param_shapes(
        &self,
        spec: &AdapterSpec,
        in_dim: usize,
        out_dim: usize,
    ) -> Vec<(String, Vec<usize>)>;

    /// Wraps `base_weight` ([out, in]). `seed` makes initialisation reproducible per layer.
    fn build(&self, spec: &AdapterSpec, base_weight: Tensor, seed: u64)
        -> Result<Box<dyn Adapter>>;

    /// [`Self::param_shapes`] for the projection `slot`; empty if the adapter leaves it frozen.
    fn param_shapes_for(
        &self,
        _slot: &str,
        spec: &AdapterSpec,
        in_dim: usize,
        out_dim: usize,
    ) -> Vec<(String, Vec<usize>)> {
        self.param_shapes(spec, in_dim, out_dim)
    }

    /// [`Self::build`] for the projection `slot`; may return a [`FrozenLinear`] for a projection
    /// the config selected but this adapter does not adapt.
    fn build_for(
        &self,
        _slot: &str,
        spec: &AdapterSpec,
        base_weight: Tensor,
        seed: u64,
    ) -> Result<Box<dyn Adapter>> {
        self.build(spec, base_weight, seed)
    }

    /// PEFT's `adapter_config.json` for this adapter on `targets` (the adapted projections, each
    /// once, in model order); the checkpointer adds `base_model_name_or_path`. Default: LoRA's
    /// ([`lora_peft_config`]).
    fn peft_config(&self, spec: &AdapterSpec, targets: &[PeftTarget]) -> serde_json::Value {
        lora_peft_config(spec, targets)
    }

    /// Whether the trainable tensor `leaf` of `slot` has one row per output feature of the base
    /// weight. Such rows follow the layout of the weight's rows, which for q_proj/k_proj differs
    /// between torchtune and Hugging Face (RoPE), so the checkpointer permutes them. Default:
    /// LoRA's B and DoRA's magnitude.
    fn rows_are_outputs(&self, _slot: &str, leaf: &str) -> bool {
        matches!(leaf, "lora_b.weight" | "magnitude")
    }
}

/// PEFT's `adapter_config.json` for a LoRA adapter of `spec` on `targets`.
pub fn lora_peft_config(spec: &AdapterSpec, targets: &[PeftTarget]) -> serde_json::Value {
    serde_json::json!({
        "r": spec.rank,
        "lora_alpha": json_number(spec.alpha),
        "target_modules": targets.iter().map(|t| t.hf_module.as_str()).collect::<Vec<_>>(),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "lora_dropout": spec.dropout,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
    })
}

/// An integral value as a JSON integer (as PEFT/torchtune write `lora_alpha`), otherwise a float.
fn json_number(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        serde_json::json!(x as i64)
    } else {
        serde_json::json!(x)
    }
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
