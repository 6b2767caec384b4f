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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_anywhere_is_a_nan_difference() {
        let a = Tensor::new(&[0f32, f32::NAN, 1.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0f32, 0.0, 1.0], &Device::Cpu).unwrap();
        assert!(max_abs_diff(&a, &b).unwrap().is_nan());
        assert!(max_abs_diff_scaled(&a, &b).unwrap().is_nan());
        assert_eq!(max_abs_diff(&b, &b).unwrap(), 0.0);
    }
}
