//! Causal attention that keeps only q, k and v for its backward, and the fused RoPE-attention
//! block of a training step.

use std::sync::Arc;

use candle_core::{Result, Tensor, D};

use super::graph::{with_backward, with_backward3};
use super::rope::rope_fp32;

/// Causal scaled-dot-product attention `softmax(q k^T * scale + mask) v` for q/k/v
/// [batch, heads, seq, head_dim] that stores nothing but its inputs: the backward recomputes the
/// attention probabilities (as flash attention does) instead of keeping [seq, seq] matrices per
/// layer alive for the whole step.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let limit = max_scores(q.device());
    let out = dense_attend(&qd, &kd, &vd, mask, scale, limit)?;
    let mask = mask.cloned();
    with_backward3("attention", (&q, &k, &v), out, move |grad| {
        let (dq, dk, dv) = dense_attend_grads(
            &qd,
            &kd,
            &vd,
            &grad.contiguous()?,
            mask.as_ref(),
            scale,
            limit,
        )?;
        Ok((Some(dq), Some(dk), Some(dv)))
    })
}

/// The most scores one softmax may see on `device`. candle's CUDA softmax indexes its input
/// with 32-bit integers, so 2^31 or more scores would be read out of bounds; the CPU has no
/// such limit.
fn max_scores(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        usize::MAX
    } else {
        i32::MAX as usize
    }
}

/// Runs `f` on groups of heads (dim 1 of q/k/v/grad [batch, heads, seq, head_dim]) small enough
/// that a group's scores [batch, heads, q_seq, k_seq] hold at most `limit` elements, and joins
/// each of its outputs along the heads. One group (no copies) when everything fits.
fn in_head_groups(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    grad: Option<&Tensor>,
    limit: usize,
    f: impl Fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let (batch, heads, q_seq, _) = q.dims4()?;
    let scores_per_head = batch * q_seq * k.dim(2)?;
    let group = (limit / scores_per_head.max(1)).min(heads);
    if group == heads {
        return f(q, k, v, grad);
    }
    if group == 0 {
        candle_core::bail!(
            "attention over {batch} x {q_seq} x {} scores for a single head is more than this \
             device's softmax takes ({limit}); lower batch_size or the sequence length",
            k.dim(2)?
        );
    }
    let mut joined: Vec<Vec<Tensor>> = Vec::new();
    for start in (0..heads).step_by(group) {
        let part = |t: &Tensor| t.narrow(1, start, group.min(heads - start))?.contiguous();
        let g = grad.map(part).transpose()?;
        let outs = f(&part(q)?, &part(k)?, &part(v)?, g.as_ref())?;
        joined.resize(outs.len(), Vec::new());
        for (all, out) in joined.iter_mut().zip(outs) {
            all.push(out);
        }
    }
    joined.iter().map(|parts| Tensor::cat(parts, 1)).collect()
}

/// `softmax(q k^T * scale + mask) v` for q/k/v [batch, heads, seq, head_dim] under a mask that
/// broadcasts over the heads, `limit` scores per softmax at most.
fn dense_attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    limit: usize,
) -> Result<Tensor> {
    let mut out = in_head_groups((q, k, v), None, limit, |q, k, v, _| {
        Ok(vec![attention_probs(q, k, mask, scale)?.matmul(v)?])
    })?;
    Ok(out.remove(0))
}

/// The gradients of q, k and v of [`dense_attend`] from the output's gradient `grad`.
fn dense_attend_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    limit: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let grads = in_head_groups((q, k, v), Some(grad), limit, |q, k, v, grad| {
        let p = attention_probs(q, k, mask, scale)?;
        let grad = grad.expect("the backward passes the output gradient");
        let (dq, dk, dv) = attention_grads(q, k, v, &p, grad, scale)?;
        Ok(vec![dq, dk, dv])
    })?;
    let [dq, dk, dv]: [Tensor; 3] = grads.try_into().expect("three gradients");
    Ok((dq, dk, dv))
}

/// `softmax(q k^T * scale + mask)` over the last dimension, for q/k [.., seq, head_dim].
fn attention_probs(q: &Tensor, k: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    // The scores are scaled, not q: scaling q first rounds differently for one query row (a
    // KV-cache step) than for many, and cached and uncached generation would part ways.
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)
}

/// The gradients of q, k and v of `p v`, where `p = attention_probs(q, k, ..)`, from the
/// output's gradient `grad` (contiguous).
fn attention_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &Tensor,
    grad: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    // Transposes go to the matmuls as strided views: CPU and cuBLAS matmuls take them as they
    // are, so no [.., seq, seq] copies are made.
    let dv = p.t()?.matmul(grad)?;
    let dp = grad.matmul(&v.t()?)?;
    let ds = p.mul(&dp.broadcast_sub(&(&dp * p)?.sum_keepdim(D::Minus1)?)?)?;
    let dq = (ds.matmul(k)? * scale)?;
    let dk = (ds.t()?.matmul(q)? * scale)?;
    Ok((dq, dk, dv))
}

/// Which keys each query may attend to in [`rope_attention`].
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// An additive mask (0 or -inf) broadcast over the scores [batch, heads, seq, seq]: the
    /// causal [seq, seq] mask, or a per-row [batch, 1, seq, seq] one.
    Dense(Tensor),
    /// Per row, consecutive blocks that cover it: a query attends only to keys of its own block,
    /// under that block's additive [len, len] mask. For packed rows whose samples are short this
    /// computes only the scores that can be non-zero, instead of the whole row by row.
    Blocks(Arc<Vec<Vec<MaskBlock>>>),
}

/// One block of a row for [`AttentionMask::Blocks`].
#[derive(Debug, Clone)]
pub struct MaskBlock {
    pub start: usize,
    pub len: usize,
    /// Additive [len, len] mask within the block.
    pub mask: Tensor,
}

/// `softmax(q k^T * scale + mask) v` for q/k/v [batch, heads, seq, head_dim].
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    limit: usize,
) -> Result<Tensor> {
    match mask {
        AttentionMask::Dense(m) => dense_attend(q, k, v, Some(m), scale, limit),
        AttentionMask::Blocks(rows) => per_block(q, k, v, None, rows, |q, k, v, _, block| {
            Ok(vec![dense_attend(
                q,
                k,
                v,
                Some(&block.mask),
                scale,
                limit,
            )?])
        })
        .map(|mut outs| outs.remove(0)),
    }
}

/// The gradients of q, k and v of [`attend`] from the output's gradient `grad`.
fn attend_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    limit: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    match mask {
        AttentionMask::Dense(m) => dense_attend_grads(q, k, v, grad, Some(m), scale, limit),
        AttentionMask::Blocks(rows) => {
            let grads = per_block(q, k, v, Some(grad), rows, |q, k, v, grad, block| {
                let grad = grad.expect("the backward passes the output gradient");
                let (dq, dk, dv) =
                    dense_attend_grads(q, k, v, grad, Some(&block.mask), scale, limit)?;
                Ok(vec![dq, dk, dv])
            })?;
            let [dq, dk, dv]: [Tensor; 3] = grads.try_into().expect("three gradients");
            Ok((dq, dk, dv))
        }
    }
}

/// Runs `f` on every block's slice of q, k, v (and `grad`) [batch, heads, seq, head_dim], and
/// puts each of its outputs back together along the rows and the sequence.
fn per_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: Option<&Tensor>,
    rows: &[Vec<MaskBlock>],
    f: impl Fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>, &MaskBlock) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let slice = |t: &Tensor, row: usize, block: &MaskBlock| -> Result<Tensor> {
        t.narrow(0, row, 1)?
            .narrow(2, block.start, block.len)?
            .contiguous()
    };
    let mut per_row: Vec<Vec<Tensor>> = Vec::new();
    for (row, blocks) in rows.iter().enumerate() {
        let mut pieces: Vec<Vec<Tensor>> = Vec::new();
        for block in blocks {
            let g = grad.map(|g| slice(g, row, block)).transpose()?;
            let outs = f(
                &slice(q, row, block)?,
                &slice(k, row, block)?,
                &slice(v, row, block)?,
                g.as_ref(),
                block,
            )?;
            pieces.resize(outs.len(), Vec::new());
            for (piece, out) in pieces.iter_mut().zip(outs) {
                piece.push(out);
            }
        }
        per_row.resize(pieces.len(), Vec::new());
        for (all, piece) in per_row.iter_mut().zip(pieces) {
            all.push(Tensor::cat(&piece, 2)?);
        }
    }
    per_row.iter().map(|rows| Tensor::cat(rows, 0)).collect()
}

/// The middle of a causal self-attention block as one graph node, for training: `q`, `k`, `v`
/// come straight from their projections ([batch, seq, heads * head_dim]; `num_kv_heads` heads
/// for k and v), RoPE (interleaved pairs) is applied to q and k, each kv head serves
/// `num_heads / num_kv_heads` consecutive query heads, and the result comes back as
/// [batch, seq, num_heads * head_dim], ready for the output projection.
///
/// Only the three inputs (which their projections produce anyway) are kept for the backward;
/// RoPE, the head layouts and the probabilities are recomputed there. Built from [`attention`]
/// and [`rope_interleaved`](super::rope_interleaved), the rotated q and k, the contiguous v and
/// the re-laid-out output would each stay alive until the backward as well.
#[allow(clippy::too_many_arguments)]
pub fn rope_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    num_heads: usize,
    num_kv_heads: usize,
    (cos, sin): (&Tensor, &Tensor),
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    let (b, s, width) = q.dims3()?;
    let head_dim = width / num_heads;
    let times = num_heads / num_kv_heads;
    let (cos, sin, neg_sin) = (cos.clone(), sin.clone(), sin.neg()?);
    // [b, s, n * d] -> [b, n, s, d] and back.
    let split = move |t: &Tensor, n: usize| {
        t.reshape((b, s, n, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let merge = move |t: &Tensor, n: usize| t.transpose(1, 2)?.reshape((b, s, n * head_dim));
    // [b, kv, s, d] -> [b, kv * times, s, d]: each kv head repeated for its query heads.
    let repeat = move |t: &Tensor| -> Result<Tensor> {
        if times == 1 {
            return Ok(t.clone());
        }
        t.unsqueeze(2)?
            .expand((b, num_kv_heads, times, s, head_dim))?
            .reshape((b, num_heads, s, head_dim))
    };
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    // Rotated q, repeated rotated k and repeated v, from the kept inputs.
    let recompute = {
        let (cos, sin) = (cos.clone(), sin.clone());
        move |qd: &Tensor, kd: &Tensor, vd: &Tensor| -> Result<[Tensor; 3]> {
            let qr = rope_fp32(&split(qd, num_heads)?, &cos, &sin)?;
            let kr = repeat(&rope_fp32(&split(kd, num_kv_heads)?, &cos, &sin)?)?;
            let vr = repeat(&split(vd, num_kv_heads)?)?;
            Ok([qr, kr, vr])
        }
    };
    let [qr, kr, vr] = recompute(&qd, &kd, &vd)?;
    let limit = max_scores(q.device());
    let out = merge(&attend(&qr, &kr, &vr, mask, scale, limit)?, num_heads)?;
    // Freed before the op copies `out` into its own storage.
    drop((qr, kr, vr));
    let mask = mask.clone();
    // Per kv head, the sum of the gradients of the query heads it served.
    let sum_groups = move |t: Tensor| -> Result<Tensor> {
        if times == 1 {
            return Ok(t);
        }
        t.reshape((b, num_kv_heads, times, s, head_dim))?.sum(2)
    };
    with_backward3("rope_attention", (q, k, v), out, move |grad| {
        let [qr, kr, vr] = recompute(&qd, &kd, &vd)?;
        let grad = split(grad, num_heads)?;
        let (dq, dk, dv) = attend_grads(&qr, &kr, &vr, &grad, &mask, scale, limit)?;
        // RoPE's backward is the rotation by the opposite angle.
        let unrotate = |t: &Tensor| rope_fp32(&t.contiguous()?, &cos, &neg_sin);
        let dq = merge(&unrotate(&dq)?, num_heads)?;
        let dk = merge(&unrotate(&sum_groups(dk)?)?, num_kv_heads)?;
        let dv = merge(&sum_groups(dv)?, num_kv_heads)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    })
}

/// Softmax over the last dimension of `scores + mask` (the additive mask holds 0 or -inf and is
/// constant). Backward: `y * (dy - sum(dy * y))`.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let s = scores.detach();
    let s = match mask {
        Some(m) => s.broadcast_add(m)?,
        None => s,
    };
    let y = candle_nn::ops::softmax_last_dim(&s.contiguous()?)?;
    let y_saved = y.clone();
    with_backward("softmax", scores, y, move |grad| {
        let dot = (grad * &y_saved)?.sum_keepdim(D::Minus1)?;
        y_saved.mul(&grad.broadcast_sub(&dot)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::test_util::*;
    use crate::autograd::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_backward_matches_composed_ops() {
        let x = rand(&[2, 5, 7], 8);
        let reference = |x: &Tensor| {
            let e = x.exp().unwrap();
            e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
        };
        let (g, gr, fwd) = grads(|x| masked_softmax(x, None).unwrap(), reference, &x);
        assert!(fwd < 1e-6);
        assert!(max_abs(&g, &gr) < 1e-5);
    }

    /// The fused block against the ops it replaces (RoPE, head split, kv repeat, attention,
    /// merge), with grouped-query heads: outputs and the gradients of q, k and v.
    #[test]
    fn rope_attention_matches_the_ops_it_fuses() {
        let (b, s, heads, kv_heads, d) = (2, 5, 4, 2, 4);
        let q = rand(&[b, s, heads * d], 21);
        let k = rand(&[b, s, kv_heads * d], 22);
        let v = rand(&[b, s, kv_heads * d], 23);
        let (cos, sin) = (rand(&[s, d / 2], 24), rand(&[s, d / 2], 25));
        let mask = causal(s);
        let probe = rand(&[b, s, heads * d], 26);
        let run = |fused: bool| {
            let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
            let [qv, kv, vv] = [0, 1, 2].map(|i| vars[i].as_tensor().clone());
            let out = if fused {
                rope_attention(
                    &qv,
                    &kv,
                    &vv,
                    heads,
                    kv_heads,
                    (&cos, &sin),
                    &AttentionMask::Dense(mask.clone()),
                    0.5,
                )
                .unwrap()
            } else {
                let split = |t: &Tensor, n: usize| {
                    t.reshape((b, s, n, d)).unwrap().transpose(1, 2).unwrap()
                };
                let repeat = |t: Tensor| {
                    t.unsqueeze(2)
                        .unwrap()
                        .expand((b, kv_heads, heads / kv_heads, s, d))
                        .unwrap()
                        .reshape((b, heads, s, d))
                        .unwrap()
                };
                let qr = rope_interleaved(&split(&qv, heads), &cos, &sin).unwrap();
                let kr = repeat(rope_interleaved(&split(&kv, kv_heads), &cos, &sin).unwrap());
                let vr = repeat(split(&vv, kv_heads).contiguous().unwrap());
                attention(&qr, &kr, &vr, Some(&mask), 0.5)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, s, heads * d))
                    .unwrap()
            };
            let g = (out.clone() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads: Vec<Tensor> = vars
                .iter()
                .map(|v| g.get(v.as_tensor()).unwrap().clone())
                .collect();
            (out, grads)
        };
        let (out, grads) = run(true);
        let (ref_out, ref_grads) = run(false);
        assert!(max_abs(&out, &ref_out) < 1e-6);
        for (g, r) in grads.iter().zip(&ref_grads) {
            assert_eq!(g.dims(), r.dims());
            assert!(max_abs(g, r) < 1e-6, "{}", max_abs(g, r));
        }
    }

    /// Additive mask [s, s] letting each token see the earlier tokens of its own sample, for
    /// samples of `lens` laid end to end.
    fn block_causal(lens: &[usize]) -> Tensor {
        let s: usize = lens.iter().sum();
        let sample: Vec<usize> = lens
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n(i, n))
            .collect();
        let values = (0..s * s)
            .map(|i| {
                let (row, col) = (i / s, i % s);
                if col <= row && sample[col] == sample[row] {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        Tensor::from_vec(values, (s, s), &Device::Cpu).unwrap()
    }

    /// Attention in blocks (a row cut where no query looks across) equals attention under the
    /// whole rows' mask: outputs and the gradients of q, k and v, with grouped-query heads.
    #[test]
    fn attention_in_blocks_matches_the_dense_mask() {
        let (b, s, heads, kv_heads, d) = (2, 7, 4, 2, 4);
        let q = rand(&[b, s, heads * d], 31);
        let k = rand(&[b, s, kv_heads * d], 32);
        let v = rand(&[b, s, kv_heads * d], 33);
        let (cos, sin) = (rand(&[b, s, d / 2], 34), rand(&[b, s, d / 2], 35));
        let probe = rand(&[b, s, heads * d], 36);
        // Row 0: samples of 2, 3 and 2 tokens; row 1: 4 and 3.
        let dense = Tensor::stack(&[block_causal(&[2, 3, 2]), block_causal(&[4, 3])], 0)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let block = |start: usize, lens: &[usize]| MaskBlock {
            start,
            len: lens.iter().sum(),
            mask: block_causal(lens),
        };
        // Row 0 as one block of two samples and one of the last sample; row 1 per sample.
        let blocks = AttentionMask::Blocks(Arc::new(vec![
            vec![block(0, &[2, 3]), block(5, &[2])],
            vec![block(0, &[4]), block(4, &[3])],
        ]));
        let run = |mask: &AttentionMask| {
            let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
            let [qv, kv, vv] = [0, 1, 2].map(|i| vars[i].as_tensor().clone());
            let out =
                rope_attention(&qv, &kv, &vv, heads, kv_heads, (&cos, &sin), mask, 0.5).unwrap();
            let store = (&out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads = [qv, kv, vv].map(|t| store.get(&t).unwrap().clone());
            (out, grads)
        };
        let (out_dense, grads_dense) = run(&AttentionMask::Dense(dense));
        let (out_blocks, grads_blocks) = run(&blocks);
        assert!(max_abs(&out_dense, &out_blocks) < 1e-6);
        for (a, b) in grads_dense.iter().zip(&grads_blocks) {
            assert!(max_abs(a, b) < 1e-6);
        }
    }

    fn causal(s: usize) -> Tensor {
        Tensor::from_vec(
            (0..s * s)
                .map(|i| {
                    if i % s > i / s {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect::<Vec<f32>>(),
            (s, s),
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn attention_backward_matches_composed_ops() {
        let (q, k, v) = (
            rand(&[1, 2, 5, 4], 11),
            rand(&[1, 2, 5, 4], 12),
            rand(&[1, 2, 5, 4], 13),
        );
        let mask = Tensor::from_vec(
            (0..25)
                .map(|i| {
                    if i % 5 > i / 5 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect::<Vec<f32>>(),
            (5, 5),
            &Device::Cpu,
        )
        .unwrap();
        let probe = rand(&[1, 2, 5, 4], 14);
        let run = |fused: bool| {
            let (qv, kv, vv) = (
                Var::from_tensor(&q).unwrap(),
                Var::from_tensor(&k).unwrap(),
                Var::from_tensor(&v).unwrap(),
            );
            let out = if fused {
                attention(
                    qv.as_tensor(),
                    kv.as_tensor(),
                    vv.as_tensor(),
                    Some(&mask),
                    0.5,
                )
                .unwrap()
            } else {
                let s =
                    (qv.as_tensor().matmul(&kv.as_tensor().t().unwrap()).unwrap() * 0.5).unwrap();
                let s = s.broadcast_add(&mask).unwrap();
                let e = s.exp().unwrap();
                let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
                p.matmul(vv.as_tensor()).unwrap()
            };
            let g = (out.clone() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads: Vec<Tensor> = [&qv, &kv, &vv]
                .iter()
                .map(|v| g.get(v.as_tensor()).unwrap().clone())
                .collect();
            (out, grads)
        };
        let (o1, g1) = run(true);
        let (o2, g2) = run(false);
        assert!(max_abs(&o1, &o2) < 1e-6);
        for (a, b) in g1.iter().zip(&g2) {
            assert!(max_abs(a, b) < 1e-5, "{}", max_abs(a, b));
        }
    }

    /// Attention too big for one softmax (CUDA's 2^31 scores) runs over groups of heads, with
    /// the same outputs and gradients, for dense and per-block masks alike.
    #[test]
    fn attention_in_head_groups_equals_attention_at_once() {
        let (b, h, s, d) = (2, 5, 6, 4);
        let (q, k, v) = (
            rand(&[b, h, s, d], 21),
            rand(&[b, h, s, d], 22),
            rand(&[b, h, s, d], 23),
        );
        let grad = rand(&[b, h, s, d], 24);
        let blocks: Vec<Vec<MaskBlock>> = (0..b)
            .map(|_| {
                vec![
                    MaskBlock {
                        start: 0,
                        len: 2,
                        mask: causal(2),
                    },
                    MaskBlock {
                        start: 2,
                        len: 4,
                        mask: causal(4),
                    },
                ]
            })
            .collect();
        for mask in [
            AttentionMask::Dense(causal(s)),
            AttentionMask::Blocks(Arc::new(blocks)),
        ] {
            let whole = attend(&q, &k, &v, &mask, 0.5, usize::MAX).unwrap();
            let whole_grads = attend_grads(&q, &k, &v, &grad, &mask, 0.5, usize::MAX).unwrap();
            // 1, 2 and 3 heads per group (the last group of 5 heads is shorter); a dense row
            // has b * s * s scores per head, a block fewer.
            for heads_per_group in [1, 2, 3] {
                let limit = heads_per_group * b * s * s;
                let out = attend(&q, &k, &v, &mask, 0.5, limit).unwrap();
                assert!(max_abs(&out, &whole) < 1e-6, "{mask:?} {heads_per_group}");
                let (dq, dk, dv) = attend_grads(&q, &k, &v, &grad, &mask, 0.5, limit).unwrap();
                assert!(max_abs(&dq, &whole_grads.0) < 1e-6);
                assert!(max_abs(&dk, &whole_grads.1) < 1e-6);
                assert!(max_abs(&dv, &whole_grads.2) < 1e-6);
            }
        }
        // Not even one head fits: an error that says what to lower.
        let mask = AttentionMask::Dense(causal(s));
        let err = attend(&q, &k, &v, &mask, 0.5, b * s * s - 1).unwrap_err();
        assert!(err.to_string().contains("lower batch_size"), "{err}");
    }
}
