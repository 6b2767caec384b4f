//! RMSNorm in fp32, as torchtune computes it.

use candle_core::{DType, Result, Tensor, D};

use super::graph::with_backward;

/// RMSNorm as torchtune computes it: in fp32, `x * rsqrt(mean(x^2) + eps)`, cast back to the input
/// dtype, then times the frozen `scale`. The backward returns only the input gradient.
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.detach().to_dtype(DType::F32)?;
    let rms = x32
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .affine(1.0, eps)?
        .sqrt()?;
    let normed = x32.broadcast_div(&rms)?.to_dtype(dtype)?;
    let y = normed.broadcast_mul(scale)?;
    let (scale, x_saved) = (scale.clone(), x.detach());
    with_backward("rms_norm", x, y, move |grad| {
        // y = x * r * g with r = (mean(x^2) + eps)^-1/2:
        // dx = r * (g*dy) - x * r^3 * mean(x * g*dy)
        let x32 = x_saved.to_dtype(DType::F32)?;
        let r = x32
            .sqr()?
            .mean_keepdim(D::Minus1)?
            .affine(1.0, eps)?
            .sqrt()?
            .recip()?;
        let gdy = grad
            .to_dtype(DType::F32)?
            .broadcast_mul(&scale.to_dtype(DType::F32)?)?;
        let dot = (&x32 * &gdy)?.mean_keepdim(D::Minus1)?;
        let dx = (gdy.broadcast_mul(&r)? - x32.broadcast_mul(&(r.powf(3.0)? * dot)?)?)?;
        dx.to_dtype(grad.dtype())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::test_util::*;

    #[test]
    fn rms_norm_backward_matches_composed_ops() {
        let x = rand(&[2, 3, 16], 3);
        let scale = (rand(&[16], 4) + 1.0).unwrap();
        let reference = |x: &Tensor| {
            let r = x
                .sqr()
                .unwrap()
                .mean_keepdim(D::Minus1)
                .unwrap()
                .affine(1.0, 1e-5)
                .unwrap()
                .sqrt()
                .unwrap();
            x.broadcast_div(&r).unwrap().broadcast_mul(&scale).unwrap()
        };
        let (g, gr, fwd) = grads(|x| rms_norm(x, &scale, 1e-5).unwrap(), reference, &x);
        assert!(fwd < 1e-5, "forward {fwd}");
        assert!(max_abs(&g, &gr) < 1e-4, "grad {}", max_abs(&g, &gr));
    }
}
