//! Helpers shared by the ops' tests.

use candle_core::{Device, Tensor, Var};

pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    crate::compare::max_abs_diff(a, b).unwrap() as f32
}

pub fn rand(shape: &[usize], seed: u64) -> Tensor {
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
pub fn grads(
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
