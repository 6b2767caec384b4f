//! DoRA (Liu et al. 2024) with torchtune 0.6.1's `DoRALinear` semantics.
//!
//! The adapted weight `W + s B A` (s = alpha/rank) is split into a direction and a trainable
//! per-output-row `magnitude` m:
//!
//! ```text
//! out = (m / ||W + s B A||) (W x + s B A x)      (row norms, detached: no gradient through them)
//! ```
//!
//! computed as torchtune does, `(k - 1) * base + k * lora * s + base` with `k = m / norm`, so fp32
//! results agree to rounding. Merging gives `(W + s B A) * (m / ||W + s B A||)` per row.
//!
//! The magnitude starts as torchtune's `initialize_dora_magnitude` leaves it: the recipe calls it
//! right after loading the base weights, while `lora_b` is still zero, so it is `||W||` per row.
//! Our factory receives the loaded base weight and `lora_b` is zero then, so the layer is built
//! with that value. `on_weights_loaded` deliberately leaves the magnitude alone: after an adapter
//! checkpoint is loaded (or a run resumed) torchtune keeps the magnitude from the file, it does not
//! recompute it from the loaded A and B (tests/fixtures/dora_step/meta.json, `magnitude_init`).
//!
//! `qdora` is the same over an NF4 base (`use_dora` with `quantize_base`).

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, Var};
use tune_core::{
    Adapter, AdapterFactory, AdapterSpec, ArgSpec, Component, ComponentKind, PeftTarget,
};

use crate::lora::{FrozenWeight, LoRALinear, LoraFactory};
use crate::nf4::Nf4Tensor;

pub struct DoRALinear {
    /// Base weight, A, B and the LoRA hyper-parameters.
    pub lora: LoRALinear,
    /// `[out]`, in the run's dtype.
    pub magnitude: Var,
}

impl DoRALinear {
    pub fn new(weight: FrozenWeight, spec: &AdapterSpec, seed: u64) -> Result<Self> {
        let lora = LoRALinear::new(weight, spec, seed)?;
        // B is zero here: this is ||W|| per row, torchtune's initial magnitude.
        let magnitude = Var::from_tensor(&row_norms(&adapted_weight(&lora)?)?)?;
        Ok(DoRALinear { lora, magnitude })
    }

    /// `||W + s B A||` per output row, as a constant.
    pub fn weight_norm(&self) -> Result<Tensor> {
        row_norms(&adapted_weight(&self.lora)?)
    }
}

/// `W + s B A`, dense, without gradient.
fn adapted_weight(lora: &LoRALinear) -> Result<Tensor> {
    lora.weight.dense()?.add(&lora.delta_weight()?)
}

/// Euclidean norm of each row, accumulated in fp32 (torch.linalg.norm), in the matrix's dtype.
fn row_norms(w: &Tensor) -> Result<Tensor> {
    w.to_dtype(DType::F32)?
        .sqr()?
        .sum(1)?
        .sqrt()?
        .to_dtype(w.dtype())
}

impl Adapter for DoRALinear {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let base = self.lora.weight.linear(x)?;
        let lora = self.lora.lora_out(x, train)?;
        let scale = self
            .magnitude
            .as_tensor()
            .broadcast_div(&self.weight_norm()?)?;
        let dora = (base.broadcast_mul(&(&scale - 1.0)?)?
            + (lora.broadcast_mul(&scale)? * self.lora.scale())?)?;
        dora + base
    }

    fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        self.lora.weight.linear(x)
    }

    fn is_random_in_training(&self) -> bool {
        self.lora.is_random_in_training()
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut params = vec![("magnitude".to_string(), self.magnitude.clone())];
        params.extend(self.lora.trainable());
        params
    }

    fn merged_weight(&self) -> Result<Tensor> {
        let w = adapted_weight(&self.lora)?;
        let scale = self.magnitude.as_tensor().detach().div(&row_norms(&w)?)?;
        w.broadcast_mul(&scale.unsqueeze(1)?)
    }

    fn base_weight(&self) -> Result<Tensor> {
        self.lora.weight.dense()
    }
}

/// Builds [`DoRALinear`]s, over a dense or (for `qdora`) an NF4 base.
pub struct DoraFactory {
    pub quantize_base: bool,
}

impl AdapterFactory for DoraFactory {
    fn param_shapes(
        &self,
        spec: &AdapterSpec,
        in_dim: usize,
        out_dim: usize,
    ) -> Vec<(String, Vec<usize>)> {
        let mut shapes = vec![("magnitude".to_string(), vec![out_dim])];
        shapes.extend(LoraFactory.param_shapes(spec, in_dim, out_dim));
        shapes
    }

    fn build(
        &self,
        spec: &AdapterSpec,
        base_weight: Tensor,
        seed: u64,
    ) -> Result<Box<dyn Adapter>> {
        let weight = if self.quantize_base {
            FrozenWeight::Nf4(Arc::new(Nf4Tensor::quantize(&base_weight)?))
        } else {
            FrozenWeight::Dense(base_weight)
        };
        Ok(Box::new(DoRALinear::new(weight, spec, seed)?))
    }

    /// LoRA's, with `use_dora`: PEFT's spelling of DoRA.
    fn peft_config(&self, spec: &AdapterSpec, targets: &[PeftTarget]) -> serde_json::Value {
        let mut config = tune_core::adapter::lora_peft_config(spec, targets);
        config["use_dora"] = serde_json::Value::Bool(true);
        config
    }
}

tune_core::inventory::submit! {
    Component {
        path: "dora",
        aliases: &["torchtune.modules.peft.DoRALinear"],
        kind: ComponentKind::Adapter,
        args: &[] as &[ArgSpec],
        extra_args: false,
        about: "DoRA: LoRA plus a trainable per-row magnitude (use_dora: True)",
        origin: "built-in",
        build: |_| Ok(Box::new(Arc::new(DoraFactory { quantize_base: false }) as Arc<dyn AdapterFactory>)),
    }
}

tune_core::inventory::submit! {
    Component {
        path: "qdora",
        aliases: &[],
        kind: ComponentKind::Adapter,
        args: &[] as &[ArgSpec],
        extra_args: false,
        about: "DoRA with the frozen base weight in NF4 (use_dora with quantize_base)",
        origin: "built-in",
        build: |_| Ok(Box::new(Arc::new(DoraFactory { quantize_base: true }) as Arc<dyn AdapterFactory>)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        tune_core::compare::max_abs_diff(a, b).unwrap() as f32
    }

    fn spec() -> AdapterSpec {
        AdapterSpec {
            kind: "dora".into(),
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
        }
    }

    /// A layer with non-zero B and a magnitude that is not the row norm.
    fn trained_layer() -> DoRALinear {
        let w = Tensor::randn(0f32, 0.1, (6, 5), &Device::Cpu).unwrap();
        let l = DoRALinear::new(FrozenWeight::Dense(w), &spec(), 3).unwrap();
        l.lora
            .lora_b
            .set(&Tensor::randn(0f32, 0.3, (6, 2), &Device::Cpu).unwrap())
            .unwrap();
        l.magnitude
            .set(&Tensor::new(&[1.0f32, 0.5, 2.0, 0.1, 3.0, 1.0], &Device::Cpu).unwrap())
            .unwrap();
        l
    }

    #[test]
    fn starts_as_the_base_layer_with_row_norm_magnitude() {
        let w = Tensor::randn(0f32, 0.1, (6, 5), &Device::Cpu).unwrap();
        let l = DoraFactory {
            quantize_base: false,
        }
        .build(&spec(), w.clone(), 3)
        .unwrap();
        let names: Vec<String> = l.trainable().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["magnitude", "lora_a.weight", "lora_b.weight"]);
        let norms = w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        assert_eq!(max_abs(l.trainable()[0].1.as_tensor(), &norms), 0.0);
        let x = Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu).unwrap();
        assert!(max_abs(&l.forward(&x, true).unwrap(), &l.forward_base(&x).unwrap()) < 1e-6);
        // Loading weights keeps the magnitude (torchtune keeps a loaded one).
        l.trainable()[2]
            .1
            .set(&Tensor::ones((6, 2), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        l.on_weights_loaded().unwrap();
        assert_eq!(max_abs(l.trainable()[0].1.as_tensor(), &norms), 0.0);
    }

    #[test]
    fn merged_weight_reproduces_the_forward() {
        let l = trained_layer();
        let x = Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu).unwrap();
        let merged = l.merged_weight().unwrap();
        let via_merge = x.matmul(&merged.t().unwrap()).unwrap();
        assert!(max_abs(&via_merge, &l.forward(&x, false).unwrap()) < 1e-5);
        // Each merged row has the magnitude as its norm.
        let norms = merged.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        assert!(max_abs(&norms, l.magnitude.as_tensor()) < 1e-5);
    }

    #[test]
    fn no_gradient_flows_through_the_norm() {
        // With the norm detached, d sum(out) / d m = sum over rows of ((W + sBA) x) / norm; a
        // norm that carried gradient would add a term (and give B a different gradient).
        let l = trained_layer();
        let x = Tensor::randn(0f32, 1.0, (4, 5), &Device::Cpu).unwrap();
        let grads = l
            .forward(&x, true)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let full = adapted_weight(&l.lora).unwrap();
        let want = x
            .matmul(&full.t().unwrap())
            .unwrap()
            .sum(0)
            .unwrap()
            .div(&l.weight_norm().unwrap())
            .unwrap();
        assert!(max_abs(grads.get(l.magnitude.as_tensor()).unwrap(), &want) < 1e-5);
        // dB = s * k_row * (sum_x x^T A^T): the detached norm contributes nothing.
        let k = l
            .magnitude
            .as_tensor()
            .div(&l.weight_norm().unwrap())
            .unwrap();
        let ax = x
            .matmul(&l.lora.lora_a.as_tensor().t().unwrap())
            .unwrap()
            .sum(0)
            .unwrap();
        let want_b = (k
            .unsqueeze(1)
            .unwrap()
            .broadcast_mul(&ax.unsqueeze(0).unwrap())
            .unwrap()
            * l.lora.scale())
        .unwrap();
        assert!(max_abs(grads.get(l.lora.lora_b.as_tensor()).unwrap(), &want_b) < 1e-5);
    }
}
