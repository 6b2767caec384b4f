//! LoRALinear: a frozen linear layer plus a trainable low-rank update.
//!
//! `out = W x + (alpha / rank) * B (A (dropout(x)))` with `A` [rank, in] initialised
//! kaiming-uniform (a = sqrt 5, i.e. U(-1/sqrt(in), 1/sqrt(in))) and `B` [out, rank] zeros, so
//! training starts from the base model. Dropout applies to the LoRA path only, in training only.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use tune_core::autograd::{frozen_linear, matmul_t};
use tune_core::{Adapter, AdapterFactory, AdapterSpec, ArgSpec, Component, ComponentKind};

pub struct LoRALinear {
    pub weight: Tensor,
    pub lora_a: Var,
    pub lora_b: Var,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
}

impl LoRALinear {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// `(alpha/r) * B A (dropout(x))`: the low-rank update's contribution to the output.
    pub fn lora_delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = if train && self.dropout > 0.0 {
            candle_nn::ops::dropout(x, self.dropout as f32)?
        } else {
            x.clone()
        };
        let hidden = matmul_t(&x, self.lora_a.as_tensor())?;
        matmul_t(&hidden, self.lora_b.as_tensor())? * self.scale()
    }
}

impl Adapter for LoRALinear {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        frozen_linear(x, &self.weight)? + self.lora_delta(x, train)?
    }

    fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        frozen_linear(x, &self.weight)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_a.weight".to_string(), self.lora_a.clone()),
            ("lora_b.weight".to_string(), self.lora_b.clone()),
        ]
    }

    fn merged_weight(&self) -> Result<Tensor> {
        let delta = (self.lora_b.as_tensor().matmul(self.lora_a.as_tensor())? * self.scale())?;
        self.weight.add(&delta.to_dtype(self.weight.dtype())?)
    }

    fn base_weight(&self) -> Result<Tensor> {
        Ok(self.weight.clone())
    }
}

/// Kaiming-uniform with a = sqrt(5) for a `[rows, fan_in]` matrix: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub fn kaiming_uniform(rows: usize, fan_in: usize, seed: u64, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..rows * fan_in).map(|_| rng.gen_range(-bound..bound) as f32).collect();
    Tensor::from_vec(values, (rows, fan_in), device)?.to_dtype(dtype)
}

pub struct LoraFactory;

impl AdapterFactory for LoraFactory {
    fn param_shapes(&self, spec: &AdapterSpec, in_dim: usize, out_dim: usize) -> Vec<(String, Vec<usize>)> {
        vec![
            ("lora_a.weight".to_string(), vec![spec.rank, in_dim]),
            ("lora_b.weight".to_string(), vec![out_dim, spec.rank]),
        ]
    }

    fn build(&self, spec: &AdapterSpec, base_weight: Tensor, seed: u64) -> Result<Box<dyn Adapter>> {
        let (out_dim, in_dim) = base_weight.dims2()?;
        let (dtype, device) = (base_weight.dtype(), base_weight.device().clone());
        let lora_a = Var::from_tensor(&kaiming_uniform(spec.rank, in_dim, seed, dtype, &device)?)?;
        let lora_b = Var::from_tensor(&Tensor::zeros((out_dim, spec.rank), dtype, &device)?)?;
        Ok(Box::new(LoRALinear {
            weight: base_weight,
            lora_a,
            lora_b,
            rank: spec.rank,
            alpha: spec.alpha,
            dropout: spec.dropout,
        }))
    }
}

tune_core::inventory::submit! {
    Component {
        path: "lora",
        aliases: &["torchtune.modules.peft.LoRALinear"],
        kind: ComponentKind::Adapter,
        args: &[] as &[ArgSpec],
        extra_args: false,
        about: "LoRA: frozen W plus (alpha/r) B A on the selected projections",
        origin: "built-in",
        build: |_| Ok(Box::new(Arc::new(LoraFactory) as Arc<dyn AdapterFactory>)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn starts_as_the_base_layer_and_merges() {
        let w = Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let spec = AdapterSpec { kind: "lora".into(), rank: 2, alpha: 4.0, dropout: 0.0 };
        let layer = LoraFactory.build(&spec, w.clone(), 0).unwrap();
        let x = Tensor::ones((1, 4), DType::F32, &Device::Cpu).unwrap();
        let y = layer.forward(&x, true).unwrap();
        let y0 = layer.forward_base(&x).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), y0.to_vec2::<f32>().unwrap());
        // After giving B a value the merged weight reproduces the adapted output.
        let (_, b) = &layer.trainable()[1];
        b.set(&Tensor::ones((3, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let merged = layer.merged_weight().unwrap();
        let via_merge = x.matmul(&merged.t().unwrap()).unwrap();
        let via_forward = layer.forward(&x, false).unwrap();
        let diff: f32 = (via_merge - via_forward).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(diff < 1e-4);
    }

    #[test]
    fn lora_a_is_bounded_by_one_over_sqrt_fan_in() {
        let a = kaiming_uniform(8, 100, 3, DType::F32, &Device::Cpu).unwrap();
        let max: f32 = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(max <= 0.1 && max > 0.05);
    }
}
