//! QLoRA (Dettmers et al. 2023) as torchtune builds it: LoRA whose frozen base weight is NF4.
//!
//! With `quantize_base: True` every attention and MLP projection is stored in NF4: the adapted
//! ones as [`LoRALinear`] over an NF4 weight (registered as `qlora`), the others as
//! [`FrozenNF4Linear`] (torchtune's `FrozenNF4Linear`). Embeddings, norms and the output layer
//! stay dense; the model decides which projections to quantise.
//!
//! Weights are quantised in torchtune's layout (after the q/k row permutation of HF checkpoints):
//! blocks are consecutive elements, so quantising the HF layout would put different values in a
//! block whenever a scaler group is not closed under that permutation.

use std::sync::Arc;

use candle_core::{Result, Tensor, Var};
use tune_core::{Adapter, AdapterFactory, AdapterSpec, ArgSpec, Component, ComponentKind};

use crate::lora::{FrozenWeight, LoRALinear, LoraFactory};
use crate::nf4::{linear_nf4, Nf4Tensor};

/// A frozen linear layer stored in NF4: forward dequantises and multiplies; the backward
/// dequantises again and returns only the input gradient.
pub struct FrozenNF4Linear {
    pub weight: Arc<Nf4Tensor>,
}

impl FrozenNF4Linear {
    /// Quantises a dense `[out, in]` weight (in the arithmetic of its values, see `nf4`).
    pub fn new(weight: &Tensor) -> Result<Self> {
        Ok(FrozenNF4Linear {
            weight: Arc::new(Nf4Tensor::quantize(weight)?),
        })
    }
}

impl Adapter for FrozenNF4Linear {
    fn forward(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        linear_nf4(x, &self.weight)
    }

    fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        linear_nf4(x, &self.weight)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    fn merged_weight(&self) -> Result<Tensor> {
        self.weight.dequantize()
    }

    fn base_weight(&self) -> Result<Tensor> {
        self.weight.dequantize()
    }
}

/// LoRA over an NF4 base: the same parameters and initialisation as `lora`.
pub struct QLoraFactory;

impl AdapterFactory for QLoraFactory {
    fn param_shapes(
        &self,
        spec: &AdapterSpec,
        in_dim: usize,
        out_dim: usize,
    ) -> Vec<(String, Vec<usize>)> {
        LoraFactory.param_shapes(spec, in_dim, out_dim)
    }

    fn build(
        &self,
        spec: &AdapterSpec,
        base_weight: Tensor,
        seed: u64,
    ) -> Result<Box<dyn Adapter>> {
        let weight = FrozenWeight::Nf4(Arc::new(Nf4Tensor::quantize(&base_weight)?));
        drop(base_weight);
        Ok(Box::new(LoRALinear::new(weight, spec, seed)?))
    }
}

tune_core::inventory::submit! {
    Component {
        path: "qlora",
        aliases: &[],
        kind: ComponentKind::Adapter,
        args: &[] as &[ArgSpec],
        extra_args: false,
        about: "QLoRA: LoRA with the frozen base weight in NF4 (what `lora` becomes with quantize_base)",
        origin: "built-in",
        build: |_| Ok(Box::new(Arc::new(QLoraFactory) as Arc<dyn AdapterFactory>)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    fn weight() -> Tensor {
        let v: Vec<f32> = (0..64 * 256)
            .map(|i| (i as f32 * 0.731).sin() * 0.02)
            .collect();
        Tensor::from_vec(v, (64, 256), &Device::Cpu).unwrap()
    }

    #[test]
    fn frozen_nf4_linear_gives_only_the_input_gradient() {
        let layer = FrozenNF4Linear::new(&weight()).unwrap();
        let dense = layer.base_weight().unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 256), &Device::Cpu).unwrap())
            .unwrap();
        let y = layer.forward(x.as_tensor(), true).unwrap();
        let want = x.as_tensor().broadcast_matmul(&dense.t().unwrap()).unwrap();
        let diff: f32 = (&y - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(D::Minus1)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        let grads = y.sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap();
        // d sum(x W^T) / dx = column sums of W, for every row of x.
        let col_sums = dense.sum(0).unwrap();
        let diff: f32 = gx
            .broadcast_sub(&col_sums)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        assert!(layer.trainable().is_empty());
    }

    #[test]
    fn qlora_is_lora_over_the_dequantised_weight() {
        let spec = AdapterSpec {
            kind: "qlora".into(),
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
        };
        let w = weight();
        let q = QLoraFactory.build(&spec, w.clone(), 7).unwrap();
        let l = LoraFactory
            .build(&spec, q.base_weight().unwrap(), 7)
            .unwrap();
        // Same initialisation as LoRA for the same seed.
        for ((na, a), (nb, b)) in q.trainable().iter().zip(l.trainable()) {
            assert_eq!(na, &nb);
            assert_eq!(
                a.as_tensor()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                b.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            );
        }
        q.trainable()[1]
            .1
            .set(&Tensor::full(0.01f32, (64, 4), &Device::Cpu).unwrap())
            .unwrap();
        l.trainable()[1]
            .1
            .set(&Tensor::full(0.01f32, (64, 4), &Device::Cpu).unwrap())
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 256), &Device::Cpu).unwrap();
        let (yq, yl) = (q.forward(&x, true).unwrap(), l.forward(&x, true).unwrap());
        let diff: f32 = (yq - yl)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        // The quantisation error is real but small: NF4 is not the dense weight.
        let err: f32 = (q.base_weight().unwrap() - &w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err > 0.0 && err < 0.005, "{err}");
        let merged = (q.merged_weight().unwrap() - l.merged_weight().unwrap()).unwrap();
        assert_eq!(
            merged
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
