//! torchtune's interleaved rotary embedding, rotated in fp32.

use candle_core::{DType, Result, Tensor};

use super::graph::with_backward;

/// The interleaved rotation as torchtune computes it: in fp32 (tables and arithmetic) whatever
/// `x`'s dtype, rounded once to that dtype. In bf16, candle's kernel would round the tables and
/// each product.
pub(super) fn rope_fp32(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let y = candle_nn::rotary_emb::rope_i(&f32(x)?.contiguous()?, &f32(cos)?, &f32(sin)?)?;
    y.to_dtype(x.dtype())
}

/// torchtune's interleaved rotary embedding (pairs `x[2i], x[2i+1]`) on `x` [batch, heads, seq,
/// head_dim] with `cos`/`sin` [seq, head_dim/2]. A rotation's backward is the inverse rotation.
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x_detached = x.detach().contiguous()?;
    let y = rope_fp32(&x_detached, cos, sin)?;
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    with_backward("rope", x, y, move |grad| {
        rope_fp32(&grad.contiguous()?, &cos, &neg_sin)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::test_util::*;

    #[test]
    fn rope_backward_matches_composed_ops() {
        let x = rand(&[1, 2, 4, 8], 5);
        let cos = rand(&[4, 4], 6);
        let sin = rand(&[4, 4], 7);
        let reference = |x: &Tensor| {
            let (b, h, t, d) = x.dims4().unwrap();
            let pairs = x.reshape((b, h, t, d / 2, 2)).unwrap();
            let x0 = pairs.narrow(4, 0, 1).unwrap().squeeze(4).unwrap();
            let x1 = pairs.narrow(4, 1, 1).unwrap().squeeze(4).unwrap();
            let y0 = (x0.broadcast_mul(&cos).unwrap() - x1.broadcast_mul(&sin).unwrap()).unwrap();
            let y1 = (x0.broadcast_mul(&sin).unwrap() + x1.broadcast_mul(&cos).unwrap()).unwrap();
            Tensor::stack(&[y0, y1], 4)
                .unwrap()
                .reshape((b, h, t, d))
                .unwrap()
        };
        let (g, gr, fwd) = grads(|x| rope_interleaved(x, &cos, &sin).unwrap(), reference, &x);
        assert!(fwd < 1e-6);
        assert!(max_abs(&g, &gr) < 1e-5);
    }

    #[test]
    fn bf16_rope_rotates_in_fp32_and_rounds_once_as_torchtune() {
        let x = rand(&[1, 2, 16, 8], 8).to_dtype(DType::BF16).unwrap();
        let angles = rand(&[16, 4], 9).affine(20.0, 0.0).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let got = rope_interleaved(&x, &cos, &sin).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = candle_nn::rotary_emb::rope_i(&x.to_dtype(DType::F32).unwrap(), &cos, &sin)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(max_abs(&got, &want), 0.0);
        // Rotating in bf16 (tables and products rounded) lands elsewhere.
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let in_bf16 = candle_nn::rotary_emb::rope_i(&x, &bf(&cos), &bf(&sin)).unwrap();
        assert!(max_abs(&in_bf16, &want) > 0.0);
    }
}
