//! NF4 ("4-bit NormalFloat", the QLoRA format), bit for bit as torchao 0.15's `to_nf4`.
//!
//! The algorithm and its exact arithmetic are specified in `tests/fixtures/nf4/spec.md`; in short:
//! the flattened weight is cut into blocks of 64 values, each scaled by its absmax and replaced by
//! the index of the nearest of 16 levels (two 4-bit codes per byte, the even element in the high
//! nibble). The per-block absmax values are themselves quantised ("double quantisation"): centred
//! on their tensor-wide mean and stored as int8 with one factor per group of 256 blocks. Storage is
//! 4 bits per value + 8 bits per 64 values + one float per 16384 values: about 4.13 bits.
//!
//! Bit-exactness comes from rounding like torch does: every step is one f32 operation followed by
//! a rounding to the working format (bf16 for a bf16 tensor), so we do the same ([`Precision`]).
//! Two formats are involved and they can differ:
//! - quantisation runs in the format of the checkpoint's tensor: bf16 for a bf16 checkpoint, also
//!   when the run is fp32 (torchtune's `dtype: fp32` quantises the bf16 checkpoint tensor), fp16
//!   for an fp16 one ([`quantizing_source`] hands the model builder's quantiser that tensor);
//! - dequantisation runs in the NF4 tensor's own dtype, the run's dtype: with `dtype: fp32` the
//!   bf16-valued fields are combined in f32 arithmetic (spec section 7), which is a different
//!   number from "dequantise in bf16 and widen" for ~90% of the values.
//!
//! Where torchao refuses a tensor (numel not a multiple of 64 * 256, e.g. every stories260K
//! weight) we quantise it anyway, with this rule for the remainder: the last block may hold fewer
//! than 64 values (its absmax is over the values it has; its padding codes are 7, the level 0.0,
//! and are never read back) and the last scaler group may hold fewer than 256 blocks (its factor
//! comes from the blocks it has). The mean is over all blocks, as always. For every tensor torchao
//! accepts, nothing is padded and the result is torchao's. Any rank is accepted (flattened
//! row-major, as torchao flattens its 1-D and 2-D inputs).
//!
//! On the CPU the codes live in host memory and dequantisation is one fused pass; on other devices
//! they live on the device and dequantisation is composed from candle ops that round the same way.

use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;
use tune_core::autograd::{matmul_t, with_backward};

/// Values per quantisation block (torchao's `block_size`).
pub const BLOCK_SIZE: usize = 64;
/// Blocks per group of double-quantised scalers (torchao's `scaler_block_size`).
pub const SCALER_BLOCK_SIZE: usize = 256;

/// The code book as torchao writes it (decimal literals); code `k` means level `k`.
const LEVEL_LITERALS: [f64; 16] = [
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
    0.3379, 0.4407, 0.5626, 0.7230, 1.0,
];

/// Code of the level 0.0, used for the padding of a short last block.
const ZERO_CODE: u8 = 7;

/// The format every intermediate of the NF4 arithmetic is rounded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Bf16,
    /// Only for quantising an fp16 checkpoint's tensors; NF4 tensors dequantise in bf16 or fp32.
    F16,
    F32,
}

impl Precision {
    /// The arithmetic of a tensor of `dtype`. NF4 is defined for bf16 and fp32 runs.
    pub fn of(dtype: DType) -> Result<Self> {
        match dtype {
            DType::BF16 => Ok(Precision::Bf16),
            DType::F32 => Ok(Precision::F32),
            other => bail!("NF4 quantisation supports bf16 and fp32 weights, not {other:?}"),
        }
    }

    /// The arithmetic torchao quantises a tensor of `dtype` in: its own.
    pub fn of_source(dtype: DType) -> Result<Self> {
        match dtype {
            DType::F16 => Ok(Precision::F16),
            other => Self::of(other),
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
            Precision::F32 => DType::F32,
        }
    }

    /// Rounds an f32 result to this format (round to nearest, ties to even).
    #[inline]
    pub fn round(self, v: f32) -> f32 {
        match self {
            Precision::Bf16 => bf16::from_f32(v).to_f32(),
            Precision::F16 => half::f16::from_f32(v).to_f32(),
            Precision::F32 => v,
        }
    }

    /// The 16 levels in this format (torch converts the literals to the tensor's dtype).
    pub fn levels(self) -> [f32; 16] {
        LEVEL_LITERALS.map(|l| self.round(l as f32))
    }
}

/// The arithmetic a weight is quantised in: bf16 when its values are bf16 numbers (a bf16
/// checkpoint, possibly widened to fp32 for the run, as torchtune quantises the bf16 tensor it
/// loads), otherwise the weight's own format.
pub fn quantisation_precision(dtype: DType, values: &[f32]) -> Result<Precision> {
    let p = Precision::of(dtype)?;
    let bf16_valued = values.par_iter().all(|v| v.to_bits() & 0xffff == 0);
    Ok(if bf16_valued { Precision::Bf16 } else { p })
}

/// Where the codes and int8 scalers are kept.
enum Codes {
    /// CPU: plain memory, dequantised by [`Nf4Tensor::dequantize_host`].
    Host { codes: Vec<u8>, scalers: Vec<i8> },
    /// Accelerators: u8 tensors (scalers offset by 128: candle has no int8 type), and the
    /// per-block scales and the level table in the tensor's dtype, made on first use.
    Device {
        codes: Tensor,
        scalers: Tensor,
        tables: std::sync::OnceLock<(Tensor, Tensor)>,
    },
}

/// A weight stored in NF4 (torchao's `NF4Tensor`).
pub struct Nf4Tensor {
    shape: Shape,
    /// What dequantisation computes in and returns (torchao: the NF4 tensor's own dtype).
    dtype: DType,
    device: Device,
    quantised_in: Precision,
    store: Codes,
    /// One per group of 256 blocks, values of `quantised_in`.
    factors: Vec<f32>,
    /// The mean of all block absmax values, a value of `quantised_in`.
    mean: f32,
    /// The code book in `quantised_in` (torchtune copies these bf16 values into fp32 tensors).
    levels: [f32; 16],
}

impl std::fmt::Debug for Nf4Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Nf4Tensor({:?}, {:?}, quantised in {:?})",
            self.shape, self.dtype, self.quantised_in
        )
    }
}

thread_local! {
    static SOURCE: std::cell::RefCell<Option<Tensor>> = const { std::cell::RefCell::new(None) };
}

/// Runs `build` so that the weight it quantises with [`Nf4Tensor::quantize`] (one of `source`'s
/// shape) is quantised from `source`: the checkpoint's own tensor, in its dtype, rather than the
/// copy converted to the run's dtype. torchao quantises the tensor it is handed in that
/// tensor's arithmetic (an fp16 checkpoint in fp16), then casts the fields to the NF4
/// parameter's dtype.
/// Returns what `build` returned and whether the source was used (quantised).
pub fn quantizing_source<R>(source: Option<Tensor>, build: impl FnOnce() -> R) -> (R, bool) {
    let given = source.is_some();
    let previous = SOURCE.with(|s| s.replace(source));
    let out = build();
    let left = SOURCE.with(|s| std::mem::replace(&mut *s.borrow_mut(), previous));
    (out, given && left.is_none())
}

impl Nf4Tensor {
    /// Quantises `weight`; the result lives on the weight's device and dequantises to its dtype.
    /// Inside [`quantizing_source`], the source tensor is quantised instead.
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let source = SOURCE.with(|s| s.borrow_mut().take_if(|s| s.shape() == weight.shape()));
        if let Some(source) = source {
            return Self::quantize_source(&source, weight.dtype(), weight.device());
        }
        let values: Vec<f32> = weight.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let precision = quantisation_precision(weight.dtype(), &values)?;
        Self::from_values(
            &values,
            weight.shape().clone(),
            precision,
            weight.dtype(),
            weight.device(),
        )
    }

    /// Quantises `source` in its own dtype's arithmetic (torchao's `NF4Tensor.from_tensor`) for
    /// an NF4 tensor that lives on `device` and dequantises in `dtype` (the fields, kept in the
    /// quantisation format, are rounded to `dtype` where they are used, as torchao's `copy_`
    /// casts them).
    pub fn quantize_source(source: &Tensor, dtype: DType, device: &Device) -> Result<Self> {
        let values: Vec<f32> = source.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let precision = Precision::of_source(source.dtype())?;
        Self::from_values(&values, source.shape().clone(), precision, dtype, device)
    }

    /// Quantises `values` (flattened `shape`, numbers of `precision`) in `precision` arithmetic;
    /// the result dequantises in `dtype` arithmetic.
    pub fn from_values(
        values: &[f32],
        shape: Shape,
        precision: Precision,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Precision::of(dtype)?;
        if values.is_empty() || values.len() != shape.elem_count() {
            bail!("cannot quantise {} values as shape {shape:?}", values.len());
        }
        let (codes, scalers, factors, mean) = quantize_values(values, precision);
        let store = if device.is_cpu() {
            Codes::Host { codes, scalers }
        } else {
            let offset: Vec<u8> = scalers.iter().map(|&q| (q as i16 + 128) as u8).collect();
            let n = codes.len();
            Codes::Device {
                codes: Tensor::from_vec(codes, n, device)?,
                scalers: Tensor::from_vec(offset, scalers.len(), device)?,
                tables: std::sync::OnceLock::new(),
            }
        };
        Ok(Nf4Tensor {
            shape,
            dtype,
            device: device.clone(),
            quantised_in: precision,
            store,
            factors,
            mean,
            levels: precision.levels(),
        })
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn quantised_in(&self) -> Precision {
        self.quantised_in
    }

    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }

    pub fn n_blocks(&self) -> usize {
        self.elem_count().div_ceil(BLOCK_SIZE)
    }

    pub fn n_groups(&self) -> usize {
        self.n_blocks().div_ceil(SCALER_BLOCK_SIZE)
    }

    /// torchao's `quantized_data`: two codes per byte, `ceil(numel / 2)` bytes.
    pub fn packed_codes(&self) -> Result<Vec<u8>> {
        let mut codes = match &self.store {
            Codes::Host { codes, .. } => codes.clone(),
            Codes::Device { codes, .. } => codes.to_vec1()?,
        };
        codes.truncate(self.elem_count().div_ceil(2));
        Ok(codes)
    }

    /// torchao's `quantized_scalers`: the int8 double-quantised scale of each block.
    pub fn quantized_scalers(&self) -> Result<Vec<i8>> {
        match &self.store {
            Codes::Host { scalers, .. } => Ok(scalers.clone()),
            Codes::Device { scalers, .. } => Ok(scalers
                .to_vec1::<u8>()?
                .into_iter()
                .map(|q| (q as i16 - 128) as i8)
                .collect()),
        }
    }

    /// torchao's `quantization_factor`, one per group of 256 blocks.
    pub fn quantization_factors(&self) -> &[f32] {
        &self.factors
    }

    /// torchao's `scaler_mean`.
    pub fn scaler_mean(&self) -> f32 {
        self.mean
    }

    /// torchao's `nf4` table.
    pub fn levels(&self) -> [f32; 16] {
        self.levels
    }

    /// Bytes held: codes, scalers, factors, mean and levels (factors/mean/levels as torchao's
    /// fields in the quantisation format).
    pub fn storage_bytes(&self) -> usize {
        let float = match self.quantised_in {
            Precision::Bf16 | Precision::F16 => 2,
            Precision::F32 => 4,
        };
        self.n_blocks() * BLOCK_SIZE / 2 + self.n_blocks() + (self.factors.len() + 1 + 16) * float
    }

    /// The scale each block is dequantised with (torchao's `dequantize_scalers`), in the NF4
    /// tensor's dtype arithmetic: `S = round(round(q / f) + mean)`.
    pub fn block_scales(&self) -> Result<Vec<f32>> {
        let p = Precision::of(self.dtype)?;
        let scalers = self.quantized_scalers()?;
        Ok(scalers
            .iter()
            .enumerate()
            .map(|(b, &q)| {
                block_scale(
                    p,
                    q,
                    p.round(self.factors[b / SCALER_BLOCK_SIZE]),
                    p.round(self.mean),
                )
            })
            .collect())
    }

    /// The dense weight in the NF4 tensor's dtype (torchao's `get_original_weight`).
    pub fn dequantize(&self) -> Result<Tensor> {
        match &self.store {
            Codes::Host { codes, scalers } => self.dequantize_host(codes, scalers),
            Codes::Device {
                codes,
                scalers,
                tables,
            } => {
                let (scales, levels) = match tables.get() {
                    Some(t) => t.clone(),
                    None => {
                        let made = self.device_tables(scalers)?;
                        let _ = tables.set(made.clone());
                        made
                    }
                };
                self.dequantize_ops(codes, &scales, &levels)
            }
        }
    }

    /// The dense weight converted to `dtype` after dequantising in the NF4 tensor's own dtype
    /// (torchao's `.to(dtype)`, what `linear_nf4` multiplies by).
    pub fn dequantize_as(&self, dtype: DType) -> Result<Tensor> {
        self.dequantize()?.to_dtype(dtype)
    }

    /// Dequantisation composed from candle ops (what accelerators run). Public so tests can
    /// check on the CPU that it gives the same bits as the fused host path.
    pub fn dequantize_with_tensor_ops(&self) -> Result<Tensor> {
        match &self.store {
            Codes::Device { .. } => self.dequantize(),
            Codes::Host { codes, scalers } => {
                let offset: Vec<u8> = scalers.iter().map(|&q| (q as i16 + 128) as u8).collect();
                let codes = Tensor::from_slice(codes, codes.len(), &self.device)?;
                let scalers = Tensor::from_vec(offset, scalers.len(), &self.device)?;
                let (scales, levels) = self.device_tables(&scalers)?;
                self.dequantize_ops(&codes, &scales, &levels)
            }
        }
    }

    /// One pass over the codes: `w = round(level[code] * S[block])` in the tensor's dtype.
    fn dequantize_host(&self, codes: &[u8], scalers: &[i8]) -> Result<Tensor> {
        let p = Precision::of(self.dtype)?;
        let levels = self.levels.map(|l| p.round(l));
        let mean = p.round(self.mean);
        let numel = self.elem_count();
        let fill = |b: usize, out: &mut [f32]| {
            let s = block_scale(
                p,
                scalers[b],
                p.round(self.factors[b / SCALER_BLOCK_SIZE]),
                mean,
            );
            let bytes = &codes[b * BLOCK_SIZE / 2..(b + 1) * BLOCK_SIZE / 2];
            for (i, v) in out.iter_mut().enumerate() {
                let byte = bytes[i / 2];
                let code = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                *v = p.round(levels[code as usize] * s);
            }
        };
        match p {
            // `of` only gives the two formats NF4 tensors dequantise in.
            Precision::F32 | Precision::F16 => {
                let mut out = vec![0f32; numel];
                out.par_chunks_mut(BLOCK_SIZE)
                    .enumerate()
                    .for_each(|(b, chunk)| fill(b, chunk));
                Tensor::from_vec(out, self.shape.clone(), &self.device)
            }
            Precision::Bf16 => {
                let mut out = vec![bf16::ZERO; numel];
                out.par_chunks_mut(BLOCK_SIZE)
                    .enumerate()
                    .for_each(|(b, chunk)| {
                        let mut block = [0f32; BLOCK_SIZE];
                        fill(b, &mut block[..chunk.len()]);
                        // Values are already bf16 numbers: the conversion is exact.
                        for (o, v) in chunk.iter_mut().zip(block) {
                            *o = bf16::from_f32(v);
                        }
                    });
                Tensor::from_vec(out, self.shape.clone(), &self.device)
            }
        }
    }

    /// The per-block scales `[n_blocks, 1]` and the level table `[16]` in the tensor's dtype,
    /// from `scalers` (u8 holding `q + 128`): constant for the tensor, so made once.
    fn device_tables(&self, scalers: &Tensor) -> Result<(Tensor, Tensor)> {
        let (dt, dev) = (self.dtype, scalers.device());
        let p = Precision::of(dt)?;
        let (n_blocks, n_groups) = (self.n_blocks(), self.n_groups());
        // int8 scalers, exact in any float format; padded to whole groups for the division.
        let q = (scalers.to_dtype(DType::F32)? - 128.0)?.to_dtype(dt)?;
        let padded = n_groups * SCALER_BLOCK_SIZE;
        let q = if padded > n_blocks {
            Tensor::cat(&[&q, &Tensor::zeros(padded - n_blocks, dt, dev)?], 0)?
        } else {
            q
        };
        let factors: Vec<f32> = self.factors.iter().map(|&f| p.round(f)).collect();
        let factors = Tensor::from_vec(factors, (n_groups, 1), dev)?.to_dtype(dt)?;
        let mean = Tensor::new(&[p.round(self.mean)], dev)?.to_dtype(dt)?;
        let scales = q
            .reshape((n_groups, SCALER_BLOCK_SIZE))?
            .broadcast_div(&factors)?
            .flatten_all()?
            .narrow(0, 0, n_blocks)?
            .broadcast_add(&mean)?
            .reshape((n_blocks, 1))?;
        let levels = Tensor::new(&self.levels.map(|l| p.round(l))[..], dev)?.to_dtype(dt)?;
        Ok((scales, levels))
    }

    /// The same arithmetic as [`Self::dequantize_host`] from device tensors: `codes` u8
    /// [n_blocks * 32], and the tables of [`Self::device_tables`].
    fn dequantize_ops(&self, codes: &Tensor, scales: &Tensor, levels: &Tensor) -> Result<Tensor> {
        let dev = codes.device();
        let n_blocks = self.n_blocks();
        // Unpack: high nibble first. u8 ops: hi = byte / 16, lo = byte - 16 * hi; the u8 codes
        // index the level table directly.
        let sixteen = Tensor::new(&[16u8], dev)?;
        let hi = codes.broadcast_div(&sixteen)?;
        let lo = (codes - hi.broadcast_mul(&sixteen)?)?;
        let index = Tensor::stack(&[&hi, &lo], 1)?.flatten_all()?;
        let values = levels
            .index_select(&index, 0)?
            .reshape((n_blocks, BLOCK_SIZE))?;
        let w = values.broadcast_mul(scales)?;
        w.flatten_all()?
            .narrow(0, 0, self.elem_count())?
            .reshape(self.shape.clone())
    }
}

/// `S = round(round(q / f) + mean)`: a block's dequantised scale (spec 4.1 / 7.2.1).
#[inline]
fn block_scale(p: Precision, q: i8, factor: f32, mean: f32) -> f32 {
    p.round(p.round(q as f32 / factor) + mean)
}

/// torchao's quantisation (spec section 3) of `w` in `p` arithmetic, with the remainder rule of
/// the module docs. Returns (packed codes padded to whole blocks, int8 scalers, factors, mean).
fn quantize_values(w: &[f32], p: Precision) -> (Vec<u8>, Vec<i8>, Vec<f32>, f32) {
    let n_blocks = w.len().div_ceil(BLOCK_SIZE);
    // 1. Block absmax, exact.
    let absmax: Vec<f32> = w
        .par_chunks(BLOCK_SIZE)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    // 2. One mean over all blocks; torch accumulates wide and rounds the quotient once.
    let sum: f64 = absmax.iter().map(|&a| a as f64).sum();
    let mean = p.round((sum / n_blocks as f64) as f32);
    // 3-5. Centre, one factor per group (`256 / (2 M)` evaluated as `reciprocal(2 M) * 256`),
    // int8 scalers rounded half-to-even after a rounding of the product.
    let centred: Vec<f32> = absmax.iter().map(|&a| p.round(a - mean)).collect();
    let mut factors = Vec::with_capacity(n_blocks.div_ceil(SCALER_BLOCK_SIZE));
    let mut scalers = Vec::with_capacity(n_blocks);
    for group in centred.chunks(SCALER_BLOCK_SIZE) {
        let max = group.iter().fold(0f32, |m, c| m.max(c.abs()));
        let factor = p.round(p.round(1.0 / p.round(2.0 * max)) * 256.0);
        factors.push(factor);
        // NaN (all absmax equal: 0 * inf) casts to 0, as torch's int8 cast does on CPU.
        scalers.extend(
            group
                .iter()
                .map(|&c| p.round(c * factor).round_ties_even().clamp(-128.0, 127.0) as i8),
        );
    }
    // 6-8. Normalise by the exact absmax, take the nearest level, pack two codes per byte.
    let levels = p.levels();
    let mut codes = vec![0u8; n_blocks * BLOCK_SIZE / 2];
    codes
        .par_chunks_mut(BLOCK_SIZE / 2)
        .zip(w.par_chunks(BLOCK_SIZE))
        .zip(absmax.par_iter())
        .for_each(|((out, block), &a)| {
            let code = |i: usize| {
                block
                    .get(i)
                    .map_or(ZERO_CODE, |&v| nearest_level(&levels, p.round(v / a), p))
            };
            for (j, byte) in out.iter_mut().enumerate() {
                *byte = (code(2 * j) << 4) | code(2 * j + 1);
            }
        });
    (codes, scalers, factors, mean)
}

/// `argmin_k |round(s - level[k])|`, the first index on ties (distances are rounded, so ties
/// happen). A NaN input (an all-zero block) gives code 0, as torch's argmin does.
#[inline]
fn nearest_level(levels: &[f32; 16], s: f32, p: Precision) -> u8 {
    if s.is_nan() {
        return 0;
    }
    let mut best = (0u8, p.round(s - levels[0]).abs());
    for (k, &l) in levels.iter().enumerate().skip(1) {
        let d = p.round(s - l).abs();
        if d < best.1 {
            best = (k as u8, d);
        }
    }
    best.0
}

/// torchao's `linear_nf4`: `x @ W'^T` with `W'` the weight dequantised in its own dtype and
/// converted to x's. The backward returns only the input gradient, `grad @ W'`, dequantising
/// again instead of keeping `W'`: no dense weight stays alive between forward and backward.
pub fn linear_nf4(x: &Tensor, weight: &Arc<Nf4Tensor>) -> Result<Tensor> {
    let y = matmul_t(&x.detach(), &weight.dequantize_as(x.dtype())?)?;
    let weight = weight.clone();
    with_backward("linear_nf4", x, y, move |grad| {
        let w = weight.dequantize_as(grad.dtype())?;
        let dims = grad.dims();
        let (rows, out) = (grad.elem_count() / w.dim(0)?, w.dim(0)?);
        let mut shape = dims.to_vec();
        *shape
            .last_mut()
            .expect("a linear's gradient has a feature dimension") = w.dim(1)?;
        grad.reshape((rows, out))?.matmul(&w)?.reshape(shape)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_levels_are_torchaos_bit_patterns() {
        let want: [u16; 16] = [
            0xbf80, 0xbf32, 0xbf06, 0xbeca, 0xbe92, 0xbe3d, 0xbdbb, 0x0000, 0x3da3, 0x3e25, 0x3e7c,
            0x3ead, 0x3ee2, 0x3f10, 0x3f39, 0x3f80,
        ];
        let got = Precision::Bf16
            .levels()
            .map(|l| bf16::from_f32(l).to_bits());
        assert_eq!(got, want);
    }

    #[test]
    fn rounded_distance_ties_pick_the_first_level() {
        // Over every bf16 value in [-1, 1]: the code is the first index of the smallest rounded
        // distance (torch's argmin). Some values have tied rounded distances; `<=` instead of `<`
        // in the search would pick the later level there.
        let p = Precision::Bf16;
        let levels = p.levels();
        let mut ties = 0;
        for bits in 0..=u16::MAX {
            let s = bf16::from_bits(bits).to_f32();
            if !(-1.0..=1.0).contains(&s) {
                continue;
            }
            let d: Vec<f32> = levels.iter().map(|&l| p.round(s - l).abs()).collect();
            let min = d.iter().copied().fold(f32::INFINITY, f32::min);
            ties += (d.iter().filter(|&&x| x == min).count() > 1) as usize;
            let first = d.iter().position(|&x| x == min).unwrap();
            assert_eq!(nearest_level(&levels, s, p) as usize, first, "s = {s}");
        }
        assert!(ties > 0);
    }

    #[test]
    fn short_last_block_and_group_round_trip() {
        // 3 * 64 + 10 values: a short last block, one short group (torchao would refuse this).
        let values: Vec<f32> = (0..202).map(|i| (i as f32 * 0.37).sin() * 0.05).collect();
        let t = Nf4Tensor::from_values(
            &values,
            Shape::from(202),
            Precision::F32,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!((t.n_blocks(), t.n_groups()), (4, 1));
        assert_eq!(t.packed_codes().unwrap().len(), 101);
        let w: Vec<f32> = t.dequantize().unwrap().to_vec1().unwrap();
        for (a, b) in w.iter().zip(&values) {
            // Half the widest gap between levels (-1 to -0.6953) times the block absmax (<= 0.05),
            // plus the scale's double-quantisation error.
            assert!((a - b).abs() <= 0.1524 * 0.05 + 1e-3, "{a} vs {b}");
        }
        let ops: Vec<f32> = t.dequantize_with_tensor_ops().unwrap().to_vec1().unwrap();
        assert_eq!(w, ops);
    }
}
