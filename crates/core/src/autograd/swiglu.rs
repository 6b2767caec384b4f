//! SwiGLU's `silu(gate) * up`, keeping only its two inputs for the backward.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

use super::graph::with_backward2;

/// SwiGLU's `silu(gate) * up` that keeps only `gate` and `up` for its backward. Recorded op by op,
/// `silu(gate)` (as wide as the MLP) would also stay alive until the backward.
///
/// The forward rounds as torch does in any dtype: `silu` computed in fp32 and rounded once, then
/// the product rounded (candle's CPU bf16 `silu` would round each of its steps).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (gate_saved, up_saved) = (gate.detach(), up.detach());
    let silu = match gate.dtype() {
        DType::F32 | DType::F64 => gate_saved.silu()?,
        dtype => gate_saved.to_dtype(DType::F32)?.silu()?.to_dtype(dtype)?,
    };
    let y = (silu * &up_saved)?;
    with_backward2("swiglu", (gate, up), y, move |grad| {
        let (d_gate, d_up) = swiglu_grads(&gate_saved, &up_saved, grad)?;
        Ok((Some(d_gate), Some(d_up)))
    })
}

/// With `s = sigmoid(g)`: `d_gate = dy * up * s * (1 + g * (1 - s))`, `d_up = dy * g * s`, in
/// fp32 and rounded once to the inputs' dtype. Off the CPU fast path the fp32 temporaries (about
/// nine as wide as the MLP) are made a block of rows at a time, so the backward's peak stays near
/// the two gradients themselves.
fn swiglu_grads(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    if let Some(grads) = swiglu_grads_cpu(gate, up, grad)? {
        return Ok(grads);
    }
    let shape = gate.shape().clone();
    let width = *shape.dims().last().unwrap_or(&1);
    let rows = shape.elem_count() / width.max(1);
    let flat = |t: &Tensor| t.reshape((rows, width));
    let (gate, up, grad) = (flat(gate)?, flat(up)?, flat(grad)?);
    const BLOCK_ELEMENTS: usize = 1 << 22;
    let block_rows = (BLOCK_ELEMENTS / width.max(1)).max(1);
    let (mut d_gates, mut d_ups) = (Vec::new(), Vec::new());
    for start in (0..rows).step_by(block_rows) {
        let len = block_rows.min(rows - start);
        let f32 = |t: &Tensor| t.narrow(0, start, len)?.to_dtype(DType::F32);
        let (g, u, dy) = (f32(&gate)?, f32(&up)?, f32(&grad)?);
        let s = (g.neg()?.exp()? + 1.0)?.recip()?;
        let silu = (&g * &s)?;
        d_ups.push((&dy * &silu)?.to_dtype(up.dtype())?);
        // s * (1 + g * (1 - s)) = s + silu - silu * s
        let d_silu = ((&s + &silu)? - (&silu * &s)?)?;
        d_gates.push(((dy * u)? * d_silu)?.to_dtype(gate.dtype())?);
    }
    let whole = |parts: Vec<Tensor>| match parts.len() {
        1 => parts[0].reshape(shape.clone()),
        _ => Tensor::cat(&parts, 0)?.reshape(shape.clone()),
    };
    Ok((whole(d_gates)?, whole(d_ups)?))
}

/// The elements of a contiguous fp32 CPU tensor's storage.
fn cpu_f32_slice<'a>(storage: &'a candle_core::Storage, layout: &Layout) -> Option<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => Some(&v[start..end]),
        _ => None,
    }
}

/// [`swiglu_grads`] in one pass over contiguous fp32 CPU tensors (the generic version makes about
/// eight); `None` for any other device, dtype or layout.
fn swiglu_grads_cpu(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    use rayon::prelude::*;
    if !gate.device().is_cpu() || gate.dtype() != DType::F32 {
        return Ok(None);
    }
    let grad = grad.contiguous()?;
    let (gs, gl) = gate.storage_and_layout();
    let (us, ul) = up.storage_and_layout();
    let (dys, dyl) = grad.storage_and_layout();
    let (Some(g), Some(u), Some(dy)) = (
        cpu_f32_slice(&gs, gl),
        cpu_f32_slice(&us, ul),
        cpu_f32_slice(&dys, dyl),
    ) else {
        return Ok(None);
    };
    if g.len() != u.len() || g.len() != dy.len() {
        return Ok(None);
    }
    let mut d_gate = vec![0f32; g.len()];
    let mut d_up = vec![0f32; g.len()];
    const CHUNK: usize = 1 << 14;
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(chunk, (d_gate, d_up))| {
            let start = chunk * CHUNK;
            for i in 0..d_gate.len() {
                let (x, up, dy) = (g[start + i], u[start + i], dy[start + i]);
                let s = 1.0 / (1.0 + (-x).exp());
                let silu = x * s;
                d_up[i] = dy * silu;
                d_gate[i] = dy * up * (s + silu - silu * s);
            }
        });
    let shape = gate.shape().clone();
    let device = gate.device();
    Ok(Some((
        Tensor::from_vec(d_gate, shape.clone(), device)?,
        Tensor::from_vec(d_up, shape, device)?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::test_util::*;

    use candle_core::{Device, Var};

    /// SwiGLU's two gradients against candle's own ops, through the one-pass CPU kernel (fp32,
    /// contiguous), the generic path (a transposed, non-contiguous gate) and in bf16.
    #[test]
    fn swiglu_matches_silu_times_up() {
        // Values wide enough to reach both tails of the sigmoid.
        let gate = (rand(&[4, 6, 40], 3) * 16.0).unwrap();
        let up = rand(&[4, 6, 40], 4);
        let probe = rand(&[4, 6, 40], 5);
        let run = |gate: &Tensor, up: &Tensor, fused: bool| -> (Tensor, Tensor, Tensor) {
            let (gv, uv) = (
                Var::from_tensor(gate).unwrap(),
                Var::from_tensor(up).unwrap(),
            );
            let y = match fused {
                true => swiglu(gv.as_tensor(), uv.as_tensor()).unwrap(),
                false => (gv.as_tensor().silu().unwrap() * uv.as_tensor()).unwrap(),
            };
            let probe = probe.to_dtype(y.dtype()).unwrap();
            let store = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |v: &Var| {
                store
                    .get(v.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            (y.to_dtype(DType::F32).unwrap(), grad(&gv), grad(&uv))
        };
        let (y_ref, dg_ref, du_ref) = run(&gate, &up, false);
        let (y, dg, du) = run(&gate, &up, true);
        assert_eq!(max_abs(&y, &y_ref), 0.0);
        assert!(max_abs(&dg, &dg_ref) < 1e-5, "{}", max_abs(&dg, &dg_ref));
        assert!(max_abs(&du, &du_ref) < 1e-5, "{}", max_abs(&du, &du_ref));

        // The generic path: transposed copies, so the fast one declines.
        let t = |x: &Tensor| x.transpose(1, 2).unwrap();
        let (gate_t, up_t) = (t(&gate), t(&up));
        assert!(!gate_t.is_contiguous());
        let grad_t = t(&probe).contiguous().unwrap();
        assert!(swiglu_grads_cpu(&gate_t, &up_t, &grad_t).unwrap().is_none());
        let (dg_t, du_t) = swiglu_grads(&gate_t, &up_t, &grad_t).unwrap();
        assert!(max_abs(&t(&dg_t), &dg_ref) < 1e-5);
        assert!(max_abs(&t(&du_t), &du_ref) < 1e-5);

        // The generic path over several blocks of rows gives the same gradients.
        let wide_gate = (rand(&[3, 1 << 21], 6) * 16.0).unwrap();
        let wide_up = rand(&[3, 1 << 21], 7);
        let wide_dy = rand(&[3, 1 << 21], 8);
        let f64 = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
        let (dg_64, du_64) =
            swiglu_grads(&f64(&wide_gate), &f64(&wide_up), &f64(&wide_dy)).unwrap();
        let (dg_32, du_32) = swiglu_grads(&wide_gate, &wide_up, &wide_dy).unwrap();
        assert!(max_abs(&dg_64.to_dtype(DType::F32).unwrap(), &dg_32) < 1e-5);
        assert!(max_abs(&du_64.to_dtype(DType::F32).unwrap(), &du_32) < 1e-5);

        // bf16 forward as torch rounds it: silu once (here from an f64 reference), then the
        // product. candle's CPU bf16 silu, rounding each of its steps, misses on many elements.
        let bf16 = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        let (g16, u16) = (bf16(&gate), bf16(&up));
        let g64: Vec<f64> = g16
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let silu64: Vec<f64> = g64.iter().map(|x| x / (1.0 + (-x).exp())).collect();
        let silu_once = bf16(&Tensor::from_vec(silu64, g16.shape(), &Device::Cpu).unwrap());
        let reference = (silu_once * &u16).unwrap();
        let values = |y: &Tensor| -> Vec<f32> {
            let y = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            y.to_vec1().unwrap()
        };
        let misses = |y: &Tensor| -> usize {
            let (y, r) = (values(y), values(&reference));
            y.iter().zip(&r).filter(|(a, b)| a != b).count()
        };
        let ours = misses(&swiglu(&g16, &u16).unwrap());
        let stepwise = misses(&(g16.silu().unwrap() * &u16).unwrap());
        // fp32 then bf16 can round differently from f64 then bf16 only on exact ties.
        assert!(ours <= 2, "{ours} of 960 differ from torch's rounding");
        assert!(stepwise > 10 * ours.max(1), "{stepwise} vs {ours}");

        // bf16: computed in fp32 and rounded once, so within bf16's rounding of the fp32 result.
        let (_, dg_16, du_16) = run(&g16, &u16, true);
        let tolerance = |r: &Tensor| {
            r.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                / 64.0
        };
        assert!(max_abs(&dg_16, &dg_ref) < tolerance(&dg_ref));
        assert!(max_abs(&du_16, &du_ref) < tolerance(&du_ref));
    }
}
