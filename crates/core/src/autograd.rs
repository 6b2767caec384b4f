//! Ops with exactly the backward that parameter-efficient training needs.
//!
//! Candle's autograd has two gaps on a LoRA training path:
//! - its fused kernels (`rms_norm`, `rope_i`, `softmax_last_dim`) record no backward, so a graph
//!   built from them silently stops propagating gradients;
//! - its matmul backward always computes the gradient of *both* operands, so a frozen weight
//!   costs a full-size gradient (as much compute and memory as the weight) on every step.
//!
//! [`with_backward`] closes both gaps: it runs any forward on detached inputs (so the fast fused
//! kernels are used and nothing is recorded) and attaches a hand-written backward that returns only
//! the input gradient. Every op below is built on it and is device-generic.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

type BackwardFn = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// The custom op behind [`with_backward`]: its forward hands back a precomputed output, its
/// backward calls a closure with the output gradient.
struct GradFn {
    name: &'static str,
    output: Mutex<Option<Tensor>>,
    backward: BackwardFn,
}

/// Hands over a custom op's precomputed output (exactly once: candle runs the forward once).
fn take_output(name: &str, slot: &Mutex<Option<Tensor>>) -> Result<Tensor> {
    slot.lock()
        .map_err(|_| candle_core::Error::Msg(format!("{name}: poisoned output slot")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: forward ran twice")))
}

impl CustomOp1 for GradFn {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _input: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_copy(self.name, take_output(self.name, &self.output)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _input: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(self.name, take_output(self.name, &self.output)?)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(grad_res).map(Some)
    }
}

/// The precomputed output as a fresh CPU storage (custom ops must return owned storage).
fn cpu_copy(name: &str, out: Tensor) -> Result<(CpuStorage, Shape)> {
    let shape = out.shape().clone();
    let flat = out.flatten_all()?;
    let storage = match out.dtype() {
        DType::F32 => CpuStorage::F32(flat.to_vec1::<f32>()?),
        DType::F64 => CpuStorage::F64(flat.to_vec1::<f64>()?),
        DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
        DType::F16 => CpuStorage::F16(flat.to_vec1()?),
        dtype => candle_core::bail!("{name}: unsupported dtype {dtype:?}"),
    };
    Ok((storage, shape))
}

/// The precomputed output as a fresh CUDA storage.
#[cfg(feature = "cuda")]
fn cuda_copy(name: &str, out: Tensor) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    // A contiguous buffer starting at offset 0, cloned out of the lock (the clone copies the
    // whole backing buffer; a view elsewhere in its buffer is first made its own, exactly).
    let in_place = out.is_contiguous() && out.layout().start_offset() == 0;
    let out = if in_place {
        out
    } else {
        out.force_contiguous()?
    };
    let shape = out.shape().clone();
    let (storage, layout) = out.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, shape)),
        _ => candle_core::bail!("{name}: output is not on the CUDA device"),
    }
}

/// Returns `output` (computed from `input.detach()`) recorded in the graph as a function of `input`
/// whose input gradient is `backward(output_grad)`. When `input` is not tracked, `output` is
/// returned as it is and no graph node is made.
pub fn with_backward(
    name: &'static str,
    input: &Tensor,
    output: Tensor,
    backward: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !input.track_op() {
        return Ok(output);
    }
    let op = GradFn {
        name,
        output: Mutex::new(Some(output)),
        backward: Box::new(backward),
    };
    input.apply_op1_arc(Arc::new(Box::new(op)))
}

type Backward3Fn =
    Box<dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> + Send + Sync>;

/// [`GradFn`] for ops of three inputs.
struct GradFn3 {
    name: &'static str,
    output: Mutex<Option<Tensor>>,
    backward: Backward3Fn,
}

impl CustomOp3 for GradFn3 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_copy(self.name, take_output(self.name, &self.output)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(self.name, take_output(self.name, &self.output)?)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.backward)(grad)
    }
}

/// [`with_backward`] for three inputs; `backward` returns the three input gradients.
pub fn with_backward3(
    name: &'static str,
    inputs: (&Tensor, &Tensor, &Tensor),
    output: Tensor,
    backward: impl Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    let (a, b, c) = inputs;
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(output);
    }
    let op = GradFn3 {
        name,
        output: Mutex::new(Some(output)),
        backward: Box::new(backward),
    };
    a.apply_op3_arc(b, c, Arc::new(Box::new(op)))
}

/// [`with_backward`] for two inputs: a three-input op whose third input is the second again
/// (and never gets a gradient of its own).
pub fn with_backward2(
    name: &'static str,
    inputs: (&Tensor, &Tensor),
    output: Tensor,
    backward: impl Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync + 'static,
) -> Result<Tensor> {
    let (a, b) = inputs;
    with_backward3(name, (a, b, b), output, move |grad| {
        let (da, db) = backward(grad)?;
        Ok((da, db, None))
    })
}

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
/// and [`rope_interleaved`], the rotated q and k, the contiguous v and the re-laid-out output
/// would each stay alive until the backward as well.
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

/// Gradients of trainable tensors produced inside a custom op's backward (activation
/// checkpointing reruns a layer there), keyed by the variable's id until the training loop
/// collects them with [`param_grad`].
fn side_grads() -> &'static Mutex<std::collections::HashMap<candle_core::TensorId, Tensor>> {
    static SIDE: std::sync::OnceLock<
        Mutex<std::collections::HashMap<candle_core::TensorId, Tensor>>,
    > = std::sync::OnceLock::new();
    SIDE.get_or_init(|| Mutex::new(std::collections::HashMap::new()))
}

/// Adds `grad` to the side gradient of `var` (see [`param_grad`]).
pub fn accumulate_side_grad(var: &candle_core::Var, grad: &Tensor) -> Result<()> {
    let mut side = side_grads()
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned side gradients".into()))?;
    let id = var.as_tensor().id();
    let sum = match side.remove(&id) {
        Some(prev) => (prev + grad)?,
        None => grad.clone(),
    };
    side.insert(id, sum);
    Ok(())
}

/// The full gradient of a trainable tensor after `loss.backward()`: what the graph delivered plus
/// what custom ops handed over on the side. Taking it clears the side entry.
pub fn param_grad(
    store: &candle_core::backprop::GradStore,
    var: &candle_core::Var,
) -> Result<Option<Tensor>> {
    let side = side_grads()
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned side gradients".into()))?
        .remove(&var.as_tensor().id());
    Ok(match (store.get(var.as_tensor()), side) {
        (Some(g), Some(s)) => Some((g + s)?),
        (Some(g), None) => Some(g.clone()),
        (None, s) => s,
    })
}

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

/// The interleaved rotation as torchtune computes it: in fp32 (tables and arithmetic) whatever
/// `x`'s dtype, rounded once to that dtype. In bf16, candle's kernel would round the tables and
/// each product.
fn rope_fp32(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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

/// Labels [rows] prepared for a cross-entropy op: each row's label as a gather index [rows, 1]
/// (0 for ignored rows), a [rows, 1] mask of 1 for counted rows, and how many rows count.
struct LabelRows {
    index: Tensor,
    valid: Tensor,
    counted: usize,
}

impl LabelRows {
    fn new(
        labels: &Tensor,
        ignore_index: i64,
        vocab: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let labels: Vec<i64> = labels.to_dtype(DType::I64)?.to_vec1()?;
        if let Some(bad) = labels
            .iter()
            .find(|&&l| l != ignore_index && (l < 0 || l as usize >= vocab))
        {
            candle_core::bail!("label {bad} is outside the vocabulary (size {vocab})");
        }
        let rows = labels.len();
        let index: Vec<u32> = labels
            .iter()
            .map(|&l| if l == ignore_index { 0 } else { l as u32 })
            .collect();
        let valid: Vec<f32> = labels
            .iter()
            .map(|&l| if l == ignore_index { 0.0 } else { 1.0 })
            .collect();
        Ok(LabelRows {
            counted: valid.iter().filter(|v| **v > 0.0).count(),
            index: Tensor::from_vec(index, (rows, 1), device)?,
            valid: Tensor::from_vec(valid, (rows, 1), device)?,
        })
    }
}

/// Sum over rows of `-log softmax(logits)[label]` for `logits` [rows, vocab] and `labels` [rows]
/// (i64), skipping rows whose label is `ignore_index`. Computed in fp32. Backward:
/// `(softmax - onehot) * valid * dy`. Returns (sum, number of counted rows).
pub fn cross_entropy_sum(
    logits: &Tensor,
    labels: &Tensor,
    ignore_index: i64,
) -> Result<(Tensor, usize)> {
    let (_, vocab) = logits.dims2()?;
    let LabelRows {
        index: safe,
        valid,
        counted,
    } = LabelRows::new(labels, ignore_index, vocab, logits.device())?;

    let x = logits.detach().to_dtype(DType::F32)?;
    let log_probs = candle_nn::ops::log_softmax(&x, D::Minus1)?;
    let picked = log_probs.gather(&safe, 1)?; // [rows, 1]
    let loss = (picked * &valid)?.sum_all()?.neg()?;

    let logits_dtype = logits.dtype();
    // The backward recomputes the softmax from the logits (which the graph keeps anyway) rather
    // than holding a second [rows, vocab] matrix for the whole step.
    drop(log_probs);
    with_backward("cross_entropy", logits, loss, move |grad| {
        // d loss / d logits = (softmax - onehot) * valid * dy, built as softmax * c with c
        // subtracted at each row's label (no dense one-hot: this runs on [rows, vocab]).
        let c = valid.broadcast_mul(&grad.to_dtype(DType::F32)?)?; // [rows, 1]
        let scaled = candle_nn::ops::softmax_last_dim(&x)?.broadcast_mul(&c)?;
        scaled
            .scatter_add(&safe, &c.neg()?, 1)?
            .to_dtype(logits_dtype)
    })
    .map(|loss| (loss, counted))
}

/// Per-row `-log softmax(logits)[label]` for `logits` [rows, vocab] and `labels` [rows], 0 for
/// rows whose label is `ignore_index`, as fp32 [rows] (what sequence log-probabilities are
/// summed from, e.g. for DPO). Backward: `(softmax - onehot) * valid * dy_row`.
pub fn cross_entropy_rows(logits: &Tensor, labels: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let (_, vocab) = logits.dims2()?;
    let LabelRows {
        index: safe, valid, ..
    } = LabelRows::new(labels, ignore_index, vocab, logits.device())?;
    let x = logits.detach().to_dtype(DType::F32)?;
    let picked = candle_nn::ops::log_softmax(&x, D::Minus1)?.gather(&safe, 1)?;
    let losses = (picked * &valid)?.neg()?.squeeze(1)?;
    let logits_dtype = logits.dtype();
    with_backward("cross_entropy_rows", logits, losses, move |grad| {
        let c = valid.broadcast_mul(&grad.to_dtype(DType::F32)?.unsqueeze(1)?)?; // [rows, 1]
        let scaled = candle_nn::ops::softmax_last_dim(&x)?.broadcast_mul(&c)?;
        scaled
            .scatter_add(&safe, &c.neg()?, 1)?
            .to_dtype(logits_dtype)
    })
}

/// Sum over rows of the cross-entropy of `hidden @ weight.T` ([rows, dim] x [vocab, dim], weight
/// frozen) without ever materialising the [rows, vocab] logits: the forward and the backward each
/// compute them `chunk_rows` rows at a time (fp32 softmax, as torchtune's chunked loss), so the
/// step holds O(chunk x vocab) instead of O(rows x vocab). Returns (sum, counted rows).
pub fn linear_cross_entropy_sum(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    ignore_index: i64,
    chunk_rows: usize,
) -> Result<(Tensor, usize)> {
    let (rows, _) = hidden.dims2()?;
    let vocab = weight.dim(0)?;
    let device = hidden.device().clone();
    let LabelRows {
        index: safe,
        valid,
        counted,
    } = LabelRows::new(labels, ignore_index, vocab, &device)?;
    let chunks = chunk_ranges(rows, chunk_rows);

    let h = hidden.detach();
    let logits_of = |h: &Tensor, start: usize, len: usize| -> Result<Tensor> {
        h.narrow(0, start, len)?
            .matmul(&weight.t()?)?
            .to_dtype(DType::F32)
    };
    let mut total = Tensor::zeros((), DType::F32, &device)?;
    for &(start, len) in &chunks {
        let log_probs = candle_nn::ops::log_softmax(&logits_of(&h, start, len)?, D::Minus1)?;
        let picked = log_probs.gather(&safe.narrow(0, start, len)?, 1)?;
        total = (total - (picked * valid.narrow(0, start, len)?)?.sum_all()?)?;
    }
    let weight = weight.clone();
    with_backward("linear_cross_entropy", hidden, total, move |grad| {
        let g = grad.to_dtype(DType::F32)?;
        linear_ce_hidden_grad(&h, &weight, (&safe, &valid), &chunks, |_, _| Ok(g.clone()))
    })
    .map(|loss| (loss, counted))
}

/// Per-row cross-entropy of `hidden @ weight.T` ([rows] fp32, 0 for ignored rows), computed
/// `chunk_rows` rows at a time like [`linear_cross_entropy_sum`], so the [rows, vocab] logits
/// never exist at once (sequence log-probabilities for DPO are sums of these).
pub fn linear_cross_entropy_rows(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    ignore_index: i64,
    chunk_rows: usize,
) -> Result<Tensor> {
    let (rows, _) = hidden.dims2()?;
    let vocab = weight.dim(0)?;
    let LabelRows {
        index: safe, valid, ..
    } = LabelRows::new(labels, ignore_index, vocab, hidden.device())?;
    let chunks = chunk_ranges(rows, chunk_rows);
    let h = hidden.detach();
    let mut pieces = Vec::with_capacity(chunks.len());
    for &(start, len) in &chunks {
        let logits = h
            .narrow(0, start, len)?
            .matmul(&weight.t()?)?
            .to_dtype(DType::F32)?;
        let picked = candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .gather(&safe.narrow(0, start, len)?, 1)?;
        pieces.push((picked * valid.narrow(0, start, len)?)?.neg()?);
    }
    let losses = Tensor::cat(&pieces, 0)?.squeeze(1)?;
    let weight = weight.clone();
    with_backward("linear_cross_entropy_rows", hidden, losses, move |grad| {
        let g = grad.to_dtype(DType::F32)?.unsqueeze(1)?;
        linear_ce_hidden_grad(&h, &weight, (&safe, &valid), &chunks, |start, len| {
            g.narrow(0, start, len)
        })
    })
}

/// `(start, len)` of consecutive chunks of at most `chunk_rows` rows.
fn chunk_ranges(rows: usize, chunk_rows: usize) -> Vec<(usize, usize)> {
    let chunk_rows = chunk_rows.max(1);
    (0..rows)
        .step_by(chunk_rows)
        .map(|start| (start, chunk_rows.min(rows - start)))
        .collect()
}

/// The gradient of `hidden` for a chunked linear cross-entropy: per chunk, the logits are
/// recomputed and `(softmax - onehot) * valid * coef` goes back through `weight`, where `coef`
/// gives the chunk's output gradient (a scalar for a sum, [len, 1] for per-row losses).
fn linear_ce_hidden_grad(
    h: &Tensor,
    weight: &Tensor,
    (index, valid): (&Tensor, &Tensor),
    chunks: &[(usize, usize)],
    coef: impl Fn(usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(chunks.len());
    for &(start, len) in chunks {
        let logits = h
            .narrow(0, start, len)?
            .matmul(&weight.t()?)?
            .to_dtype(DType::F32)?;
        let c = valid
            .narrow(0, start, len)?
            .broadcast_mul(&coef(start, len)?)?;
        let d_logits = candle_nn::ops::softmax_last_dim(&logits)?.broadcast_mul(&c)?;
        let d_logits = d_logits.scatter_add(&index.narrow(0, start, len)?, &c.neg()?, 1)?;
        parts.push(d_logits.to_dtype(weight.dtype())?.matmul(weight)?);
    }
    Tensor::cat(&parts, 0)?.to_dtype(h.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        crate::compare::max_abs_diff(a, b).unwrap() as f32
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // Small deterministic pseudo-random values without pulling in an RNG.
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Gradient of sum(f(x) * probe) wrt x: once through our op, once through plain candle ops.
    fn grads(
        f_ours: impl Fn(&Tensor) -> Tensor,
        f_ref: impl Fn(&Tensor) -> Tensor,
        x: &Tensor,
    ) -> (Tensor, Tensor, f32) {
        let probe = rand(f_ref(x).dims(), 99);
        let v1 = Var::from_tensor(x).unwrap();
        let y1 = f_ours(v1.as_tensor());
        let g1 = (y1.clone() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let v2 = Var::from_tensor(x).unwrap();
        let y2 = f_ref(v2.as_tensor());
        let g2 = (y2.clone() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let fwd = max_abs(&y1, &y2);
        (
            g1.get(v1.as_tensor()).unwrap().clone(),
            g2.get(v2.as_tensor()).unwrap().clone(),
            fwd,
        )
    }

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

    #[test]
    fn cross_entropy_backward_matches_composed_ops() {
        let logits = rand(&[4, 6], 9);
        let labels = Tensor::new(&[1i64, -100, 5, 0], &Device::Cpu).unwrap();
        let v = Var::from_tensor(&logits).unwrap();
        let (loss, n) = cross_entropy_sum(v.as_tensor(), &labels, -100).unwrap();
        assert_eq!(n, 3);
        let g = loss.backward().unwrap().get(v.as_tensor()).unwrap().clone();
        let v2 = Var::from_tensor(&logits).unwrap();
        let lp = candle_nn::ops::log_softmax(v2.as_tensor(), D::Minus1).unwrap();
        let idx = Tensor::new(&[1u32, 0, 5, 0], &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let mask = Tensor::new(&[[1f32], [0.], [1.], [1.]], &Device::Cpu).unwrap();
        let ref_loss = (lp.gather(&idx, 1).unwrap() * mask)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let gr = ref_loss
            .backward()
            .unwrap()
            .get(v2.as_tensor())
            .unwrap()
            .clone();
        assert!(max_abs(&loss, &ref_loss) < 1e-6);
        assert!(max_abs(&g, &gr) < 1e-6);
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

    #[test]
    fn linear_cross_entropy_matches_logits_then_cross_entropy() {
        let h = rand(&[7, 5], 21);
        let w = rand(&[11, 5], 22);
        let labels = Tensor::new(&[3i64, -100, 10, 0, 4, 4, -100], &Device::Cpu).unwrap();
        let v1 = Var::from_tensor(&h).unwrap();
        let (l1, n1) = linear_cross_entropy_sum(v1.as_tensor(), &w, &labels, -100, 3).unwrap();
        let g1 = l1.backward().unwrap().get(v1.as_tensor()).unwrap().clone();
        let v2 = Var::from_tensor(&h).unwrap();
        let (l2, n2) =
            cross_entropy_sum(&frozen_linear(v2.as_tensor(), &w).unwrap(), &labels, -100).unwrap();
        let g2 = l2.backward().unwrap().get(v2.as_tensor()).unwrap().clone();
        assert_eq!((n1, n2), (5, 5));
        assert!(max_abs(&l1, &l2) < 1e-5);
        assert!(max_abs(&g1, &g2) < 1e-6);
    }

    /// Per-row losses in chunks against the logits-first op, with a per-row output gradient.
    #[test]
    fn linear_cross_entropy_rows_matches_logits_then_cross_entropy_rows() {
        let h = rand(&[7, 5], 31);
        let w = rand(&[11, 5], 32);
        let labels = Tensor::new(&[3i64, -100, 10, 0, 4, 4, -100], &Device::Cpu).unwrap();
        let probe = rand(&[7], 33);
        let run = |chunked: bool| {
            let v = Var::from_tensor(&h).unwrap();
            let rows = if chunked {
                linear_cross_entropy_rows(v.as_tensor(), &w, &labels, -100, 3).unwrap()
            } else {
                let logits = frozen_linear(v.as_tensor(), &w).unwrap();
                cross_entropy_rows(&logits, &labels, -100).unwrap()
            };
            let store = (&rows * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (rows, store.get(v.as_tensor()).unwrap().clone())
        };
        let ((r1, g1), (r2, g2)) = (run(true), run(false));
        assert!(max_abs(&r1, &r2) < 1e-5);
        assert_eq!(r1.to_vec1::<f32>().unwrap()[1], 0.0, "ignored rows are 0");
        assert!(max_abs(&g1, &g2) < 1e-6);
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
