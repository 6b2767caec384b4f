//! How far two tensors are apart, as parity checks and tests measure it (in fp32, on the host).

use candle_core::{DType, Device, Result, Tensor};

fn host_f32(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.to_device(&Device::Cpu)
}

/// max |a - b| over all elements; NaN when any difference is NaN (candle's `max` skips NaNs, so
/// a NaN gradient would otherwise pass a parity check).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let diff = (host_f32(a)? - host_f32(b)?)?.abs()?.flatten_all()?;
    if diff.to_vec1::<f32>()?.iter().any(|d| d.is_nan()) {
        return Ok(f64::NAN);
    }
    Ok(diff.max(0)?.to_scalar::<f32>()? as f64)
}

/// max |a - b| / max |b| (the denominator at least 1e-6): how far `a` is from `b` on the scale of
/// `b`'s largest entry, for gradients whose sizes vary by orders of magnitude.
pub fn max_abs_diff_scaled(a: &Tensor, b: &Tensor) -> Result<f64> {
    let scale = host_f32(b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()? as f64;
    Ok(max_abs_diff(a, b)? / scale.max(1e-6))
}

/// ||a - b|| / ||b|| (Frobenius norms).
pub fn rel_norm_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (host_f32(a)?, host_f32(b)?);
    let num = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    let den = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    Ok(num / den.max(1e-30))
}

/// Whether `a` and `b` hold the same values once both are rounded to the coarser of their two
/// dtypes (a bf16 copy of an fp16 or fp32 weight is the same weight). Compared where `b` lives,
/// a byte per element, without an fp32 copy of either.
pub fn same_values(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() {
        return Ok(false);
    }
    let coarser = |x: DType, y: DType| {
        if x == DType::BF16 || y == DType::BF16 {
            DType::BF16
        } else if x == DType::F16 || y == DType::F16 {
            DType::F16
        } else {
            DType::F32
        }
    };
    let dtype = coarser(a.dtype(), b.dtype());
    let a = a.to_device(b.device())?.to_dtype(dtype)?;
    let b = b.to_dtype(dtype)?;
    if a.elem_count() == 0 {
        return Ok(true);
    }
    let differs = a.ne(&b)?.flatten_all()?.max(0)?.to_scalar::<u8>()?;
    Ok(differs == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_values_rounds_to_the_coarser_dtype() {
        let w = Tensor::new(&[1.0f32, 0.1, -3.3], &Device::Cpu).unwrap();
        let bf16 = w.to_dtype(DType::BF16).unwrap();
        assert!(same_values(&bf16, &w).unwrap());
        assert!(same_values(&w, &w.to_dtype(DType::F16).unwrap()).unwrap());
        let other = Tensor::new(&[1.0f32, 0.1, -3.4], &Device::Cpu).unwrap();
        assert!(!same_values(&bf16, &other).unwrap());
        let shorter = Tensor::new(&[1.0f32, 0.1], &Device::Cpu).unwrap();
        assert!(!same_values(&w, &shorter).unwrap());
    }

    #[test]
    fn a_nan_anywhere_is_a_nan_difference() {
        let a = Tensor::new(&[0f32, f32::NAN, 1.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0f32, 0.0, 1.0], &Device::Cpu).unwrap();
        assert!(max_abs_diff(&a, &b).unwrap().is_nan());
        assert!(max_abs_diff_scaled(&a, &b).unwrap().is_nan());
        assert_eq!(max_abs_diff(&b, &b).unwrap(), 0.0);
    }
}
