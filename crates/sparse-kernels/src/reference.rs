//! Scalar reference implementations on dense row-major weights: the ground truth every kernel
//! is tested against. Plain loops, no SIMD, no threads, f64 accumulation.

/// `y [batch, rows] = x · Wᵀ + bias` for `w [rows, fan_in]`, `x [batch, fan_in]`.
pub fn forward(
    w: &[f32],
    rows: usize,
    fan_in: usize,
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
) -> Vec<f32> {
    let mut y = vec![0.0; batch * rows];
    for b in 0..batch {
        for r in 0..rows {
            let mut s = bias.map_or(0.0, |bi| bi[r] as f64);
            for c in 0..fan_in {
                s += w[r * fan_in + c] as f64 * x[b * fan_in + c] as f64;
            }
            y[b * rows + r] = s as f32;
        }
    }
    y
}

/// `grad_x [batch, fan_in] = grad_y · W`.
pub fn input_grad(w: &[f32], rows: usize, fan_in: usize, grad_y: &[f32], batch: usize) -> Vec<f32> {
    let mut gx = vec![0.0; batch * fan_in];
    for b in 0..batch {
        for c in 0..fan_in {
            let mut s = 0.0f64;
            for r in 0..rows {
                s += grad_y[b * rows + r] as f64 * w[r * fan_in + c] as f64;
            }
            gx[b * fan_in + c] = s as f32;
        }
    }
    gx
}

/// The dense weight gradient `grad_w [rows, fan_in] = grad_yᵀ · x`.
pub fn weight_grad(
    rows: usize,
    fan_in: usize,
    x: &[f32],
    grad_y: &[f32],
    batch: usize,
) -> Vec<f32> {
    let mut gw = vec![0.0; rows * fan_in];
    for r in 0..rows {
        for c in 0..fan_in {
            let mut s = 0.0f64;
            for b in 0..batch {
                s += grad_y[b * rows + r] as f64 * x[b * fan_in + c] as f64;
            }
            gw[r * fan_in + c] = s as f32;
        }
    }
    gw
}
