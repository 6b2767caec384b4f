//! Cross-entropy over logits, and over `hidden @ weight.T` a chunk of rows at a time without the
//! whole [rows, vocab] logits.

use candle_core::{DType, Result, Tensor, D};

use super::graph::with_backward;

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
    use crate::autograd::test_util::*;
    use crate::autograd::*;
    use candle_core::{Device, Var};

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
}
