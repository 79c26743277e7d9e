//! 2-D max pooling with its own backward pass: [`max_pool2d`], and ReLU followed by max pooling
//! as one op: [`relu_max_pool2d`].
//!
//! candle's `max_pool2d` backward is a chain of generic ops (upsample the result, compare with
//! the input, convert the mask, average-pool it, divide, upsample the gradient, multiply), each
//! a pass over the input plus gradient accumulation: a quarter of a LeNet-5 training step
//! under `perf`. Here the forward remembers the position of each window's maximum and the
//! backward adds each output gradient to that one input, as PyTorch does (on ties the first
//! position in row-major order takes it).
//!
//! candle 0.11's own backward is also wrong: it multiplies the gradient by the *fraction* of
//! the window that holds the maximum instead of dividing by the number of maxima, so without
//! ties every input gradient is `k²` times too small (a quarter for 2×2 windows; a network's
//! layers below two poolings learned at 1/16 of their rate). The test below checks the
//! gradient against a direct loop.
//!
//! [`relu_max_pool2d`] is `max_pool2d(relu(x))` (this crate's [`crate::act::relu`]) in one op:
//! the same values, the same maxima and the same gradients, without the ReLU's output tensor,
//! its two passes and the zeros-plus-add that candle's backward spends on every intermediate
//! tensor's gradient. A conv net's largest activation is the conv output before its pooling
//! (LeNet-5's conv1: 128 × 6 × 28 × 28 floats at batch 128).
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use sparse_kernels::pool::max_pool2d;
//! let x = Var::new(&[[[[1f32, 5.0], [3.0, 2.0]]]], &Device::Cpu)?; // [1, 1, 2, 2]
//! let y = max_pool2d(x.as_tensor(), 2)?;
//! assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![5.0]);
//! let g = y.sum_all()?.backward()?;
//! assert_eq!(g.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?, vec![0.0, 1.0, 0.0, 0.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Max pooling of `x [batch, channels, h, w]` over `k × k` windows with stride `k` (no
/// padding; trailing rows and columns that do not fill a window are dropped, as in candle),
/// with autograd. f32 CPU tensors run this op; others use candle's `max_pool2d`.
pub fn max_pool2d(x: &Tensor, k: usize) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 4 {
        return x.max_pool2d(k);
    }
    pool_op(x, k, false, "max_pool2d")
}

/// `max_pool2d(relu(x), k)` as one op (see the module documentation): each window's maximum
/// of `max(x, 0)`, ties to the first position in row-major order; the gradient goes to that
/// position where `x ≥ 0` there (ReLU's gradient), exactly as the two ops give it. f32 CPU
/// tensors run this op; others run [`crate::act::relu`] then [`max_pool2d`].
pub fn relu_max_pool2d(x: &Tensor, k: usize) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 4 {
        return max_pool2d(&crate::act::relu(x)?, k);
    }
    pool_op(x, k, true, "relu_max_pool2d")
}

/// The [`MaxPool`] op on a rank-4 f32 CPU tensor, after checking that the window fits.
fn pool_op(x: &Tensor, k: usize, relu: bool, name: &str) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if k == 0 || k > h || k > w {
        candle_core::bail!("{name}: a {k}×{k} window does not fit a {h}×{w} input");
    }
    x.contiguous()?.apply_op1(MaxPool {
        k,
        relu,
        argmax: Arc::new(OnceLock::new()),
    })
}

struct MaxPool {
    k: usize,
    /// Pool `max(x, 0)` instead of `x` ([`relu_max_pool2d`]).
    relu: bool,
    /// For every output, the flat index of its maximum in the input; set by the forward.
    argmax: Arc<OnceLock<Vec<u32>>>,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    crate::contiguous_f32(s, l, "max_pool2d", "input")
}

/// `better(a, b)`: whether `a` replaces the current maximum `b` — larger, or a NaN over a
/// number (so that a NaN propagates); equal values keep the earlier position.
#[inline(always)]
fn better(a: f32, b: f32) -> bool {
    a > b || (a.is_nan() && !b.is_nan())
}

/// `max(v, 0)` when `RELU` (`f32::max`: a NaN becomes 0, as in [`crate::act::relu`]), else `v`.
#[inline(always)]
fn act<const RELU: bool>(v: f32) -> f32 {
    if RELU {
        v.max(0.0)
    } else {
        v
    }
}

/// 2×2 windows of one `[h, w]` plane (`plane`, whose first value has flat index `base`): the
/// common case, two input rows at a time and no inner window loops. Pools `act::<RELU>` of the
/// inputs; writes every entry of `ys` and `args` (`oh·ow` each).
fn pool2<const RELU: bool>(
    plane: &[f32],
    w: usize,
    base: usize,
    oh: usize,
    ow: usize,
    ys: &mut [MaybeUninit<f32>],
    args: &mut [MaybeUninit<u32>],
) {
    for oy in 0..oh {
        let r0 = &plane[2 * oy * w..2 * oy * w + 2 * ow];
        let r1 = &plane[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow];
        let (yrow, arow) = (
            &mut ys[oy * ow..(oy + 1) * ow],
            &mut args[oy * ow..(oy + 1) * ow],
        );
        let row0 = (base + 2 * oy * w) as u32;
        for ox in 0..ow {
            // Row-major order inside the window: (0,0), (0,1), (1,0), (1,1); selects, not
            // branches (the comparisons are unpredictable on real activations).
            let (a, b) = (act::<RELU>(r0[2 * ox]), act::<RELU>(r0[2 * ox + 1]));
            let (c, d) = (act::<RELU>(r1[2 * ox]), act::<RELU>(r1[2 * ox + 1]));
            let first = row0 + 2 * ox as u32;
            let tb = better(b, a);
            let (v, i) = (if tb { b } else { a }, if tb { first + 1 } else { first });
            let tc = better(c, v);
            let (v, i) = (
                if tc { c } else { v },
                if tc { first + w as u32 } else { i },
            );
            let td = better(d, v);
            let (v, i) = (
                if td { d } else { v },
                if td { first + w as u32 + 1 } else { i },
            );
            yrow[ox].write(v);
            arow[ox].write(i);
        }
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let &[b, c, h, w] = l.dims() else {
            candle_core::bail!("max_pool2d: expected a rank-4 input");
        };
        if x.len() > u32::MAX as usize {
            candle_core::bail!("max_pool2d: inputs above 2³² values are not supported");
        }
        let (k, relu) = (self.k, self.relu);
        let (oh, ow) = (h / k, w / k);
        // Not zero-filled: every plane's job writes each of its outputs once.
        let n = b * c * oh * ow;
        let mut y: Vec<f32> = Vec::with_capacity(n);
        let mut arg: Vec<u32> = Vec::with_capacity(n);
        let (ycells, acells) = (
            &mut y.spare_capacity_mut()[..n],
            &mut arg.spare_capacity_mut()[..n],
        );
        type Cells<'a> = (&'a mut [MaybeUninit<f32>], &'a mut [MaybeUninit<u32>]);
        let job = |(p, (ys, args)): (usize, Cells<'_>)| {
            let base = p * h * w;
            let plane = &x[base..base + h * w];
            match (k, relu) {
                (2, false) => return pool2::<false>(plane, w, base, oh, ow, ys, args),
                (2, true) => return pool2::<true>(plane, w, base, oh, ow, ys, args),
                _ => {}
            }
            let v = |i: usize| if relu { x[i].max(0.0) } else { x[i] };
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best = base + oy * k * w + ox * k;
                    for dy in 0..k {
                        let row = base + (oy * k + dy) * w + ox * k;
                        for i in row..row + k {
                            if better(v(i), v(best)) {
                                best = i;
                            }
                        }
                    }
                    ys[oy * ow + ox].write(v(best));
                    args[oy * ow + ox].write(best as u32);
                }
            }
        };
        let plane = (oh * ow).max(1);
        if crate::candle_threads() > 1 && x.len() >= crate::MIN_WORK_PER_THREAD {
            // Several planes per task: one LeNet-5 plane is ~200 outputs.
            ycells
                .par_chunks_mut(plane)
                .zip(acells.par_chunks_mut(plane))
                .enumerate()
                .with_min_len((1 << 14) / plane + 1)
                .for_each(job);
        } else {
            ycells
                .chunks_mut(plane)
                .zip(acells.chunks_mut(plane))
                .enumerate()
                .for_each(job);
        }
        // SAFETY: the planes cover `0..n` and each job wrote all `oh·ow` outputs and maxima of
        // its plane (`pool2`, or the loops over every `(oy, ox)` above).
        unsafe {
            y.set_len(n);
            arg.set_len(n);
        }
        if self.argmax.set(arg).is_err() {
            candle_core::bail!("max_pool2d: the op ran twice");
        }
        Ok((CpuStorage::F32(y), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let argmax = self
            .argmax
            .get()
            .ok_or_else(|| candle_core::Error::Msg("max_pool2d: backward before forward".into()))?;
        let gx = grad.contiguous()?.apply_op2_no_bwd(
            x,
            &Scatter {
                argmax,
                relu: self.relu,
            },
        )?;
        Ok(Some(gx))
    }
}

/// `(∂y, x) → ∂x`: each output gradient added at its window's maximum (`x` gives the shape),
/// times ReLU's gradient `[x ≥ 0]` there when `relu`.
struct Scatter<'a> {
    argmax: &'a [u32],
    relu: bool,
}

impl CustomOp2 for Scatter<'_> {
    fn name(&self) -> &'static str {
        "max-pool2d-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gy = slice(gs, gl)?;
        let x = slice(xs, xl)?;
        let (&[.., h, w], &[.., oh, ow]) = (xl.dims(), gl.dims()) else {
            candle_core::bail!("max_pool2d backward: expected rank-4 tensors");
        };
        let (plane, out_plane) = ((h * w).max(1), (oh * ow).max(1));
        if gy.len() != self.argmax.len() || x.len() / plane != gy.len() / out_plane {
            candle_core::bail!("max_pool2d backward: gradient and input shapes do not match");
        }
        let relu = self.relu;
        // One plane of ∂x per task: its windows' maxima lie in the same plane of x, and every
        // entry is written (zero, then the plane's terms), so no zero-filled allocation first.
        let job = |(p, gxp): (usize, &mut [MaybeUninit<f32>])| {
            gxp.fill(MaybeUninit::new(0.0));
            // SAFETY: every entry was just initialised.
            let gxp = unsafe { &mut *(gxp as *mut [MaybeUninit<f32>] as *mut [f32]) };
            let (base, o) = (p * plane, p * out_plane);
            let terms = gy[o..o + out_plane]
                .iter()
                .zip(&self.argmax[o..o + out_plane]);
            // Windows do not overlap (stride = window), so every input gets at most one term.
            for (g, &i) in terms {
                let i = i as usize - base;
                if relu {
                    // The product, as `act::ReluGrad` forms it (a NaN or infinite ∂y stays so).
                    gxp[i] += g * if x[base + i] >= 0.0 { 1.0 } else { 0.0 };
                } else {
                    gxp[i] += g;
                }
            }
        };
        let mut gx: Vec<f32> = Vec::with_capacity(x.len());
        let cells = &mut gx.spare_capacity_mut()[..x.len()];
        if crate::candle_threads() > 1 && x.len() >= crate::MIN_WORK_PER_THREAD {
            cells
                .par_chunks_mut(plane)
                .enumerate()
                .with_min_len((1 << 14) / plane + 1)
                .for_each(job);
        } else {
            cells.chunks_mut(plane).enumerate().for_each(job);
        }
        // SAFETY: the planes cover `0..x.len()` and each task initialised its plane.
        unsafe { gx.set_len(x.len()) };
        Ok((CpuStorage::F32(gx), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_matches_candle_and_the_gradient_goes_to_each_maximum_unscaled() -> Result<()> {
        let dev = Device::Cpu;
        for ((b, c, h, w), k) in [((2, 3, 6, 8), 2), ((1, 2, 7, 5), 2), ((3, 1, 9, 9), 3)] {
            let n = b * c * h * w;
            // A permutation of 0..n: no ties.
            let vals: Vec<f32> = (0..n).map(|i| ((i * 7919) % n) as f32).collect();
            let x = Var::from_vec(vals.clone(), (b, c, h, w), &dev)?;
            let ours = max_pool2d(x.as_tensor(), k)?;
            let theirs = x.as_tensor().max_pool2d(k)?;
            assert_eq!(
                ours.flatten_all()?.to_vec1::<f32>()?,
                theirs.flatten_all()?.to_vec1::<f32>()?,
                "{:?}",
                (b, c, h, w)
            );
            // ∂(Σ y·u)/∂x = u at each window's maximum, 0 elsewhere (a direct loop).
            let u: Vec<f32> = (0..ours.elem_count()).map(|i| i as f32 + 1.0).collect();
            let mut want = vec![0f32; n];
            let (oh, ow) = (h / k, w / k);
            for p in 0..b * c {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let at = |dy: usize, dx: usize| p * h * w + (oy * k + dy) * w + ox * k + dx;
                        let best = (0..k * k)
                            .map(|j| at(j / k, j % k))
                            .max_by(|&i, &j| vals[i].total_cmp(&vals[j]))
                            .unwrap();
                        want[best] = u[(p * oh + oy) * ow + ox];
                    }
                }
            }
            let ut = Tensor::from_vec(u, ours.shape(), &dev)?;
            let g = (ours * ut)?.sum_all()?.backward()?;
            assert_eq!(g.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?, want);
        }
        Ok(())
    }

    #[test]
    fn ties_go_to_the_first_maximum_and_bad_windows_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[[[[2f32, 2.0], [2.0, 1.0]]]], &dev)?;
        let g = max_pool2d(x.as_tensor(), 2)?.sum_all()?.backward()?;
        assert_eq!(
            g.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?,
            vec![1.0, 0.0, 0.0, 0.0]
        );
        // A NaN in a window propagates (as in PyTorch), on the 2×2 path and the general one.
        for k in [2, 3] {
            let mut v = vec![1f32; 9];
            v[4] = f32::NAN;
            let y = max_pool2d(&Tensor::from_vec(v, (1, 1, 3, 3), &dev)?, k)?;
            assert!(y.flatten_all()?.to_vec1::<f32>()?[0].is_nan(), "k = {k}");
        }
        let e = max_pool2d(x.as_tensor(), 3).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        Ok(())
    }

    #[test]
    fn fused_relu_pool_equals_relu_then_pool_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for ((b, c, h, w), k) in [((2, 3, 6, 8), 2), ((1, 2, 7, 5), 2), ((3, 1, 9, 10), 3)] {
            let n = b * c * h * w;
            // Small integers around 0: ties, exact zeros of both signs, all-negative windows.
            let mut vals: Vec<f32> = (0..n).map(|i| ((i * 7919) % 7) as f32 - 4.0).collect();
            vals[1] = -0.0;
            vals[n / 2] = f32::NAN;
            let x = Var::from_vec(vals, (b, c, h, w), &dev)?;
            let fused = relu_max_pool2d(x.as_tensor(), k)?;
            let composed = max_pool2d(&crate::act::relu(x.as_tensor())?, k)?;
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            };
            assert_eq!(bits(&fused)?, bits(&composed)?, "{:?}", (b, c, h, w));
            // Weights with both signs; compare gradients up to the sign of zero (candle's
            // `0 + g` accumulation turns -0.0 into 0.0 on the composed path).
            let u: Vec<f32> = (0..fused.elem_count()).map(|i| i as f32 - 3.5).collect();
            let ut = Tensor::from_vec(u, fused.shape(), &dev)?;
            let gf = (fused * &ut)?.sum_all()?.backward()?;
            let gc = (composed * &ut)?.sum_all()?.backward()?;
            let (gf, gc) = (gf.get(&x).unwrap(), gc.get(&x).unwrap());
            let (gf, gc) = (
                gf.flatten_all()?.to_vec1::<f32>()?,
                gc.flatten_all()?.to_vec1::<f32>()?,
            );
            assert_eq!(gf, gc, "{:?}", (b, c, h, w));
            assert!(gf.iter().any(|&g| g != 0.0), "a gradient reaches x");
        }
        // Windows whose ReLU maximum is 0: the first position takes it, and the gradient passes
        // only where x ≥ 0 there (an exact zero), as ReLU then pooling gives it.
        let x = Var::new(
            &[[[[0f32, -1.0], [-2.0, -3.0]], [[-1.0, 0.0], [-2.0, -3.0]]]],
            &dev,
        )?;
        let y = relu_max_pool2d(x.as_tensor(), 2)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![0.0, 0.0]);
        let g = y.sum_all()?.backward()?;
        assert_eq!(
            g.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?,
            vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
        let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &dev)?;
        let e = relu_max_pool2d(&x, 3).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        Ok(())
    }
}
