//! A linear layer's frozen weight: the backward returns only the input gradient.

use candle_core::{Result, Tensor};

use super::graph::with_backward;

static PLAIN_FROZEN_MATMUL: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Benchmarks only: make [`frozen_linear`] a plain candle matmul, whose backward also computes the
/// (discarded) full-size gradient of the frozen weight, to measure what avoiding that saves.
pub fn set_plain_frozen_matmul(on: bool) {
    PLAIN_FROZEN_MATMUL.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`set_plain_frozen_matmul`] is on (fused ops then fall back to plain candle ops too).
pub fn plain_frozen_matmul() -> bool {
    PLAIN_FROZEN_MATMUL.load(std::sync::atomic::Ordering::Relaxed)
}

/// `x @ weight.T` for a frozen `weight` [out, in]: the backward returns only `grad @ weight`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if PLAIN_FROZEN_MATMUL.load(std::sync::atomic::Ordering::Relaxed) {
        return matmul_t(x, weight);
    }
    let y = matmul_t(&x.detach(), weight)?;
    let weight = weight.clone();
    with_backward("frozen_linear", x, y, move |grad| {
        let dims = grad.dims().to_vec();
        let out = *dims.last().expect("non-scalar grad");
        let rows = grad.elem_count() / out;
        let gx = grad.reshape((rows, out))?.matmul(&weight)?;
        let mut shape = dims;
        *shape.last_mut().expect("non-scalar") = weight.dim(1)?;
        gx.reshape(shape)
    })
}

/// `x @ weight.T` over the last dimension of `x` (any rank), recorded normally.
pub fn matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("non-scalar input");
    let rows = x.elem_count() / inner;
    let y = x.reshape((rows, inner))?.matmul(&weight.t()?)?;
    let mut shape = dims;
    *shape.last_mut().expect("non-scalar") = weight.dim(0)?;
    y.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::test_util::*;

    use candle_core::Var;

    #[test]
    fn frozen_linear_matches_matmul_and_skips_weight_grad() {
        let x = rand(&[2, 3, 8], 1);
        let w = rand(&[5, 8], 2);
        let wv = Var::from_tensor(&w).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let y = frozen_linear(xv.as_tensor(), wv.as_tensor()).unwrap();
        let store = y.sum_all().unwrap().backward().unwrap();
        assert!(
            store.get(wv.as_tensor()).is_none(),
            "frozen weight must get no gradient"
        );
        let (g, gr, fwd) = grads(
            |x| frozen_linear(x, &w).unwrap(),
            |x| x.broadcast_matmul(&w.t().unwrap()).unwrap(),
            &x,
        );
        assert!(fwd < 1e-6);
        assert!(max_abs(&g, &gr) < 1e-5);
    }
}
