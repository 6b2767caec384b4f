//! LoRALinear: a frozen linear layer plus a trainable low-rank update.
//!
//! `out = W x + (alpha / rank) * B (A (dropout(x)))` with `A` [rank, in] initialised
//! kaiming-uniform (a = sqrt 5, i.e. U(-1/sqrt(in), 1/sqrt(in))) and `B` [out, rank] zeros, so
//! training starts from the base model. Dropout applies to the LoRA path only, in training only.
//! The frozen `W` is dense, or NF4 for QLoRA ([`FrozenWeight`]).
//!
//! Without dropout the whole layer is one graph node ([`LoRALinear::fused_forward`]) that keeps
//! only `x` and the rank-wide `A x` for the backward: recorded op by op, the base output, the
//! low-rank output and its scaled copy (each as wide as the output) would all stay alive until
//! the backward, which is most of a LoRA model's activation memory in the MLP.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use tune_core::autograd::{frozen_linear, matmul_t};
use tune_core::{Adapter, AdapterFactory, AdapterSpec, ArgSpec, Component, ComponentKind};

use crate::nf4::{linear_nf4, Nf4Tensor};

/// The frozen base weight `[out, in]` of an adapted layer.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    /// QLoRA: stored in NF4, dequantised for each use and dropped right after.
    Nf4(Arc<Nf4Tensor>),
}

impl FrozenWeight {
    /// `x @ W^T`; the backward gives only the input gradient.
    pub fn linear(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => frozen_linear(x, w),
            FrozenWeight::Nf4(w) => linear_nf4(x, w),
        }
    }

    /// The weight as a dense tensor of the run's dtype (dequantised for NF4).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => Ok(w.clone()),
            FrozenWeight::Nf4(w) => w.dequantize(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            FrozenWeight::Dense(w) => w.dtype(),
            FrozenWeight::Nf4(w) => w.dtype(),
        }
    }

    pub fn device(&self) -> &candle_core::Device {
        match self {
            FrozenWeight::Dense(w) => w.device(),
            FrozenWeight::Nf4(w) => w.device(),
        }
    }

    /// `grad @ W` for `grad` [rows, out]: the input gradient of [`linear`](Self::linear).
    pub fn input_grad(&self, grad: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => grad.matmul(w),
            FrozenWeight::Nf4(w) => grad.matmul(&w.dequantize_as(grad.dtype())?),
        }
    }

    /// `(out, in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(w) => w.dims2(),
            FrozenWeight::Nf4(w) => w.shape().dims2(),
        }
    }
}

pub struct LoRALinear {
    pub weight: FrozenWeight,
    pub lora_a: Var,
    pub lora_b: Var,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
}

impl LoRALinear {
    /// torchtune's initialisation around `weight`: A kaiming-uniform (from `seed`), B zeros.
    pub fn new(weight: FrozenWeight, spec: &AdapterSpec, seed: u64) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let (dtype, device) = (weight.dtype(), weight.device().clone());
        let lora_a = Var::from_tensor(&kaiming_uniform(spec.rank, in_dim, seed, dtype, &device)?)?;
        let lora_b = Var::from_tensor(&Tensor::zeros((out_dim, spec.rank), dtype, &device)?)?;
        Ok(LoRALinear {
            weight,
            lora_a,
            lora_b,
            rank: spec.rank,
            alpha: spec.alpha,
            dropout: spec.dropout,
        })
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// `B A (dropout(x))`, not yet scaled.
    pub fn lora_out(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = if train && self.dropout > 0.0 {
            candle_nn::ops::dropout(x, self.dropout as f32)?
        } else {
            x.clone()
        };
        let hidden = matmul_t(&x, self.lora_a.as_tensor())?;
        matmul_t(&hidden, self.lora_b.as_tensor())
    }

    /// `(alpha/r) * B A (dropout(x))`: the low-rank update's contribution to the output.
    pub fn lora_delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.lora_out(x, train)? * self.scale()
    }

    /// `W x + (alpha/r) B A x` as one recorded op whose backward gives the gradients of `x`, `A`
    /// and `B` from `x` and `(alpha/r) A x` alone (no dropout: the low-rank path sees `x` itself).
    pub fn fused_forward(&self, x: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.lora_a.as_tensor(), self.lora_b.as_tensor());
        let (xd, ad, bd) = (x.detach(), a.detach(), b.detach());
        let scale = self.scale();
        // Scaled while rank-wide, not once as wide as the output: the same numbers when the
        // scale is a power of two (alpha / rank = 2 in torchtune's configs), one pass less.
        let xa = (matmul_t(&xd, &ad)? * scale)?;
        let y = (self.weight.linear(&xd)? + matmul_t(&xa, &bd)?)?;
        let weight = self.weight.clone();
        // The first layer's input is not tracked: skip its (full-size) input gradient.
        let x_tracked = x.track_op();
        tune_core::autograd::with_backward3("lora_linear", (x, a, b), y, move |grad| {
            let dims = xd.dims().to_vec();
            let in_dim = *dims
                .last()
                .expect("a linear's input has a feature dimension");
            let rows = xd.elem_count() / in_dim;
            let out_dim = grad.elem_count() / rows;
            let grad = grad.reshape((rows, out_dim))?;
            let x2 = xd.reshape((rows, in_dim))?;
            let xa2 = xa.reshape((rows, ad.dim(0)?))?;
            let grad_b = grad.t()?.matmul(&xa2)?;
            let grad_xa = (grad.matmul(&bd)? * scale)?;
            let grad_a = grad_xa.t()?.matmul(&x2)?;
            let grad_x = if x_tracked {
                Some((weight.input_grad(&grad)? + grad_xa.matmul(&ad)?)?.reshape(dims)?)
            } else {
                None
            };
            Ok((grad_x, Some(grad_a), Some(grad_b)))
        })
    }

    /// `(alpha/r) * B A` as a constant `[out, in]` matrix (no gradient), in the weight's dtype.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let ba = self
            .lora_b
            .as_tensor()
            .detach()
            .matmul(&self.lora_a.as_tensor().detach())?;
        (ba * self.scale())?.to_dtype(self.weight.dtype())
    }
}

impl Adapter for LoRALinear {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dropout_active = train && self.dropout > 0.0;
        if dropout_active || tune_core::autograd::plain_frozen_matmul() {
            return self.weight.linear(x)? + self.lora_delta(x, train)?;
        }
        self.fused_forward(x)
    }

    fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.linear(x)
    }

    fn is_random_in_training(&self) -> bool {
        self.dropout > 0.0
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_a.weight".to_string(), self.lora_a.clone()),
            ("lora_b.weight".to_string(), self.lora_b.clone()),
        ]
    }

    fn merged_weight(&self) -> Result<Tensor> {
        self.weight.dense()?.add(&self.delta_weight()?)
    }

    fn base_weight(&self) -> Result<Tensor> {
        self.weight.dense()
    }
}

/// Kaiming-uniform with a = sqrt(5) for a `[rows, fan_in]` matrix: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub fn kaiming_uniform(
    rows: usize,
    fan_in: usize,
    seed: u64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..rows * fan_in)
        .map(|_| rng.gen_range(-bound..bound) as f32)
        .collect();
    Tensor::from_vec(values, (rows, fan_in), device)?.to_dtype(dtype)
}

pub struct LoraFactory;

impl AdapterFactory for LoraFactory {
    fn param_shapes(
        &self,
        spec: &AdapterSpec,
        in_dim: usize,
        out_dim: usize,
    ) -> Vec<(String, Vec<usize>)> {
        vec![
            ("lora_a.weight".to_string(), vec![spec.rank, in_dim]),
            ("lora_b.weight".to_string(), vec![out_dim, spec.rank]),
        ]
    }

    fn build(
        &self,
        spec: &AdapterSpec,
        base_weight: Tensor,
        seed: u64,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(LoRALinear::new(
            FrozenWeight::Dense(base_weight),
            spec,
            seed,
        )?))
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

    /// The fused layer and the op-by-op layer give the same output and the same gradients for the
    /// input, A and B, for dense and NF4 bases.
    #[test]
    fn fused_forward_matches_the_recorded_ops() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.5, (6, 128), &device).unwrap();
        let bases = [
            FrozenWeight::Dense(weight.clone()),
            FrozenWeight::Nf4(Arc::new(Nf4Tensor::quantize(&weight).unwrap())),
        ];
        for base in bases {
            let layer = LoRALinear {
                weight: base,
                lora_a: Var::from_tensor(&Tensor::randn(0f32, 0.3, (3, 128), &device).unwrap())
                    .unwrap(),
                lora_b: Var::from_tensor(&Tensor::randn(0f32, 0.3, (6, 3), &device).unwrap())
                    .unwrap(),
                rank: 3,
                alpha: 6.0,
                dropout: 0.0,
            };
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 128), &device).unwrap()).unwrap();
            // A loss that weighs every output differently.
            let weights = Tensor::randn(0f32, 1.0, (2, 5, 6), &device).unwrap();
            let run = |y: Tensor| {
                let grads = (y.clone() * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let get = |t: &Tensor| grads.get(t).unwrap().clone();
                (
                    y,
                    get(x.as_tensor()),
                    get(layer.lora_a.as_tensor()),
                    get(layer.lora_b.as_tensor()),
                )
            };
            let fused = run(layer.fused_forward(x.as_tensor()).unwrap());
            let recorded = run((layer.weight.linear(x.as_tensor()).unwrap()
                + layer.lora_delta(x.as_tensor(), true).unwrap())
            .unwrap());
            for (what, f, r) in [
                ("output", &fused.0, &recorded.0),
                ("grad x", &fused.1, &recorded.1),
                ("grad A", &fused.2, &recorded.2),
                ("grad B", &fused.3, &recorded.3),
            ] {
                let rel = tune_core::compare::rel_norm_diff(f, r).unwrap();
                assert!(rel < 1e-5, "{what}: relative difference {rel}");
            }
        }
    }

    #[test]
    fn starts_as_the_base_layer_and_merges() {
        let w = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let spec = AdapterSpec {
            kind: "lora".into(),
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
        };
        let layer = LoraFactory.build(&spec, w.clone(), 0).unwrap();
        let x = Tensor::ones((1, 4), DType::F32, &Device::Cpu).unwrap();
        let y = layer.forward(&x, true).unwrap();
        let y0 = layer.forward_base(&x).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), y0.to_vec2::<f32>().unwrap());
        // After giving B a value the merged weight reproduces the adapted output.
        let (_, b) = &layer.trainable()[1];
        b.set(&Tensor::ones((3, 2), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let merged = layer.merged_weight().unwrap();
        let via_merge = x.matmul(&merged.t().unwrap()).unwrap();
        let via_forward = layer.forward(&x, false).unwrap();
        let diff: f32 = (via_merge - via_forward)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-4);
    }

    #[test]
    fn lora_a_is_bounded_by_one_over_sqrt_fan_in() {
        let a = kaiming_uniform(8, 100, 3, DType::F32, &Device::Cpu).unwrap();
        let max: f32 = a
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(max <= 0.1 && max > 0.05);
    }
}
