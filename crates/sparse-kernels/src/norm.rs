//! Training-mode batch normalisation of `[batch, channels, …]` tensors as one op with its own
//! backward pass: [`batch_norm_train`], and the same followed by ReLU as one op:
//! [`batch_norm_relu_train`] (a ResNet's `relu(bn(conv(x)))` without the normalised tensor, its
//! ReLU passes and its gradient).
//!
//! candle-nn's `BatchNorm::forward_train` is built from about ten generic tensor ops (a
//! transposed copy, two means, subtract, square, divide, scale, shift, and a transposed
//! result), each a pass over the activation plus its own backward pass and gradient
//! accumulation: most of a CIFAR ResNet-18 step outside its convolutions (docs/benchmarks.md,
//! "Convolutions"). Here the forward is two reading passes (mean, then variance, summed per
//! channel in `f64`) and one writing pass; the backward is one reading pass (the two sums per
//! channel) and one writing pass, returning the gradients of the input, the scale and the
//! shift together. Each channel's sums are spread over 16 `f64` lanes (value `j` of a plane into
//! lane `j mod 16`, independent chains the vector unit adds side by side) and folded in one
//! fixed order, so results are bit-identical for any thread count and instruction set; the
//! passes write their outputs once, without zeroing them first.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use sparse_kernels::norm::batch_norm_train;
//! let x = Var::new(&[[[[1f32, 3.0]], [[0.0, 4.0]]]], &Device::Cpu)?; // [1, 2, 1, 2]
//! let gamma = Var::new(&[1f32, 2.0], &Device::Cpu)?;
//! let beta = Var::new(&[0f32, 1.0], &Device::Cpu)?;
//! let (y, stats) = batch_norm_train(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 0.0)?;
//! assert_eq!(stats.mean, vec![2.0, 2.0]);
//! assert_eq!(stats.var, vec![1.0, 4.0]); // biased, as the normalisation uses
//! assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![-1.0, 1.0, -1.0, 3.0]);
//! let g = y.sum_all()?.backward()?;
//! assert_eq!(g.get(&beta).unwrap().to_vec1::<f32>()?, vec![2.0, 2.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The batch statistics of one call, per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Mean over the batch and positions.
    pub mean: Vec<f32>,
    /// Biased variance (divided by the count, as the normalisation uses; the running variance
    /// of `candle_nn::BatchNorm` takes the unbiased one, `var · n / (n − 1)`).
    pub var: Vec<f32>,
    /// Values per channel (`batch · positions`).
    pub count: usize,
}

/// `y = (x − mean) / √(var + eps) · gamma + beta` with the batch's per-channel statistics, for
/// `x [batch, channels, …]` (f32, CPU) and `gamma`, `beta` `[channels]`; autograd for all
/// three. Returns the statistics too, for the caller's running averages.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    batch_norm(x, gamma, beta, eps, false)
}

/// `relu(y)` of [`batch_norm_train`]'s `y`, as one op: the same values as
/// [`crate::act::relu`] of it, the same statistics, and the same gradients (ReLU's `[y ≥ 0]`,
/// with `y` recomputed in the backward pass exactly as the forward formed it).
pub fn batch_norm_relu_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    batch_norm(x, gamma, beta, eps, true)
}

fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    if x.rank() < 2 {
        candle_core::bail!(
            "batch_norm: x must be [batch, channels, …], got {:?}",
            x.dims()
        );
    }
    let c = x.dims()[1];
    for (name, t) in [("x", x), ("gamma", gamma), ("beta", beta)] {
        if !t.device().is_cpu() || t.dtype() != DType::F32 {
            candle_core::bail!("batch_norm: `{name}` must be an f32 CPU tensor");
        }
    }
    if gamma.elem_count() != c || beta.elem_count() != c {
        candle_core::bail!(
            "batch_norm: gamma and beta must have {c} values (one per channel), got {} and {}",
            gamma.elem_count(),
            beta.elem_count()
        );
    }
    if !(eps.is_finite() && eps >= 0.0) {
        candle_core::bail!("batch_norm: eps must be finite and ≥ 0, got {eps}");
    }
    let saved = Arc::new(OnceLock::new());
    let op = Forward {
        channels: c,
        eps,
        relu,
        stats: saved.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let stats = saved
        .get()
        .map(|s| s.stats.clone())
        .ok_or_else(|| candle_core::Error::Msg("batch_norm: no statistics computed".into()))?;
    Ok((y, stats))
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    crate::contiguous_f32(s, l, "batch_norm", what)
}

/// Lanes each channel's sums are spread over: value `j` of a plane goes to lane `j mod LANES`.
/// Independent chains a vector unit adds side by side; folded in one fixed order at the end
/// ([`fold`]), so a channel's sum is the same for any thread count and instruction set.
const LANES: usize = 16;

/// One channel's running sums, per lane.
type Lanes = [f64; LANES];

/// The sum of the lanes, pairwise in a fixed order.
fn fold(l: &Lanes) -> f64 {
    let mut w = *l;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            w[i] += w[i + n];
        }
    }
    w[0]
}

/// Adds `v(a[j], b[j])` into the lanes for every `j` of `a` (`b` at least as long).
#[inline(always)]
fn add_lanes<const K: usize>(
    acc: &mut [Lanes; K],
    a: &[f32],
    b: &[f32],
    v: impl Fn(f32, f32) -> [f64; K],
) {
    let b = &b[..a.len()];
    let (ac, at) = a.as_chunks::<LANES>();
    let (bc, bt) = b.as_chunks::<LANES>();
    for (ca, cb) in ac.iter().zip(bc) {
        for l in 0..LANES {
            let r = v(ca[l], cb[l]);
            for k in 0..K {
                acc[k][l] += r[k];
            }
        }
    }
    for (l, (&x, &y)) in at.iter().zip(bt).enumerate() {
        let r = v(x, y);
        for k in 0..K {
            acc[k][l] += r[k];
        }
    }
}

/// Runs `f` compiled for AVX-512 where the CPU has it ([`crate::isa::Isa::detect`]), so that
/// the loops of [`add_lanes`] and of the planes' writes run 16 lanes wide. They form no fused
/// multiply-add, so every instruction set gives the same values bit for bit.
#[inline(always)]
fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if crate::isa::Isa::detect() == crate::isa::Isa::Avx512 {
            // SAFETY: `detect` returns `Avx512` only on a CPU that supports it.
            return unsafe { avx512(f) };
        }
    }
    f()
}

/// Per-channel sums over `[batch, channels, plane]` data in `f64`: `f(channel, offset of one
/// of its planes, lanes)` adds that plane into the channel's lanes (with [`add_lanes`]);
/// samples in order, one channel per task, the lanes folded last.
fn per_channel<const K: usize>(
    channels: usize,
    plane: usize,
    batch: usize,
    f: impl Fn(usize, usize, &mut [Lanes; K]) + Sync,
) -> Vec<[f64; K]> {
    let one = |ch: usize| {
        let mut acc = [[0f64; LANES]; K];
        vectorised(|| {
            for s in 0..batch {
                f(ch, (s * channels + ch) * plane, &mut acc);
            }
        });
        acc.map(|l| fold(&l))
    };
    if crate::candle_threads() > 1 && batch * plane * channels >= crate::MIN_WORK_PER_THREAD {
        (0..channels).into_par_iter().map(one).collect()
    } else {
        (0..channels).map(one).collect()
    }
}

/// A new buffer of `n` values, written plane by plane: `f(channel, offset of the plane, its
/// outputs)` writes every output of the plane.
fn per_plane(
    channels: usize,
    plane: usize,
    n: usize,
    f: impl Fn(usize, usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let parallel = crate::candle_threads() > 1 && n >= crate::MIN_WORK_PER_THREAD;
    let plane = plane.max(1);
    crate::fill_new(plane, parallel, n, |o, dst| {
        vectorised(|| f((o / plane) % channels, o, dst))
    })
}

struct Saved {
    stats: BatchStats,
    /// `1 / √(var + eps)` per channel.
    inv_std: Vec<f32>,
    /// With a ReLU after the normalisation: `gamma · inv_std` and `beta` per channel, to form
    /// the pre-activation again in the backward pass.
    relu: Option<(Vec<f32>, Vec<f32>)>,
}

struct Forward {
    channels: usize,
    eps: f64,
    /// Apply ReLU to the output ([`batch_norm_relu_train`]).
    relu: bool,
    /// Filled by the forward pass; read by the caller and by the backward pass.
    stats: Arc<OnceLock<Saved>>,
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, "x")?;
        let gamma = slice(gs, gl, "gamma")?;
        let beta = slice(bs, bl, "beta")?;
        let dims = xl.dims();
        let (batch, c) = (dims[0], self.channels);
        let plane: usize = dims[2..].iter().product();
        let n = (batch * plane) as f64;
        let xp = |o: usize| &x[o..o + plane];
        let sums = per_channel(c, plane, batch, |_, o, acc| {
            add_lanes(acc, xp(o), xp(o), |v, _| [v as f64])
        });
        let mean: Vec<f64> = sums.iter().map(|s| s[0] / n.max(1.0)).collect();
        let sq = per_channel(c, plane, batch, |ch, o, acc| {
            let m = mean[ch];
            add_lanes(acc, xp(o), xp(o), |v, _| {
                let d = v as f64 - m;
                [d * d]
            })
        });
        let var: Vec<f64> = sq.iter().map(|s| s[0] / n.max(1.0)).collect();
        let inv_std: Vec<f32> = var
            .iter()
            .map(|v| (1.0 / (v + self.eps).sqrt()) as f32)
            .collect();
        let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        let scale: Vec<f32> = (0..c).map(|ch| inv_std[ch] * gamma[ch]).collect();
        let relu = self.relu;
        let y = per_plane(c, plane, x.len(), |ch, o, dst| {
            let (m, s, b) = (mean32[ch], scale[ch], beta[ch]);
            let xs = &x[o..o + dst.len()];
            if relu {
                for (d, &v) in dst.iter_mut().zip(xs) {
                    // `f32::max`, as `crate::act::relu` (a NaN becomes 0).
                    d.write(pre_activation(v, m, s, b).max(0.0));
                }
            } else {
                for (d, &v) in dst.iter_mut().zip(xs) {
                    d.write(pre_activation(v, m, s, b));
                }
            }
        });
        let saved = Saved {
            stats: BatchStats {
                mean: mean32,
                var: var.iter().map(|&v| v as f32).collect(),
                count: batch * plane,
            },
            inv_std,
            relu: relu.then(|| (scale, beta.to_vec())),
        };
        if self.stats.set(saved).is_err() {
            candle_core::bail!("batch_norm: the op ran twice");
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .stats
            .get()
            .ok_or_else(|| candle_core::Error::Msg("batch_norm: backward before forward".into()))?;
        let c = self.channels;
        let all = x.apply_op3_no_bwd(
            &grad.contiguous()?,
            gamma,
            &Backward {
                channels: c,
                mean: &saved.stats.mean,
                inv_std: &saved.inv_std,
                relu: saved
                    .relu
                    .as_ref()
                    .map(|(s, b)| (s.as_slice(), b.as_slice())),
            },
        )?;
        let n = x.elem_count();
        let gx = all.narrow(0, 0, n)?.reshape(x.shape())?;
        let gg = all.narrow(0, n, c)?;
        let gb = all.narrow(0, n + c, c)?;
        Ok((Some(gx), Some(gg), Some(gb)))
    }
}

/// The normalised, scaled and shifted value (before a ReLU): one expression, so that the
/// backward pass of [`batch_norm_relu_train`] forms the forward's value bit for bit.
#[inline(always)]
fn pre_activation(x: f32, mean: f32, scale: f32, beta: f32) -> f32 {
    (x - mean) * scale + beta
}

/// `(x, ∂y, gamma) → [∂x (flattened), ∂gamma, ∂beta]` in one buffer.
struct Backward<'a> {
    channels: usize,
    mean: &'a [f32],
    inv_std: &'a [f32],
    /// `(scale, beta)` when a ReLU followed: `∂y` is first multiplied by `[pre-activation ≥ 0]`.
    relu: Option<(&'a [f32], &'a [f32])>,
}

impl CustomOp3 for Backward<'_> {
    fn name(&self) -> &'static str {
        "batch-norm-train-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, "x")?;
        let gy = slice(gs, gl, "grad")?;
        let gamma = slice(ws, wl, "gamma")?;
        let plane: usize = xl.dims()[2..].iter().product();
        let (mean, inv_std) = (self.mean, self.inv_std);
        if gamma.len() != self.channels || gy.len() != x.len() {
            candle_core::bail!("batch_norm: backward got mismatched gradient or gamma");
        }
        let out = match self.relu {
            Some((scale, beta)) => {
                backward::<true>(x, gy, gamma, mean, inv_std, scale, beta, plane)
            }
            None => backward::<false>(x, gy, gamma, mean, inv_std, &[], &[], plane),
        };
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// [`Backward`]'s result `[∂x (flattened), ∂gamma, ∂beta]` for `x`, `∂y` `[batch, channels,
/// plane]`; with `RELU`, `∂y` is first multiplied by `[pre-activation ≥ 0]` (the product as
/// `crate::act::ReluGrad` forms it), the pre-activation formed from `scale` and `beta`.
#[allow(clippy::too_many_arguments)]
fn backward<const RELU: bool>(
    x: &[f32],
    gy: &[f32],
    gamma: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    scale: &[f32],
    beta: &[f32],
    plane: usize,
) -> Vec<f32> {
    let c = gamma.len();
    let batch = x.len() / (c * plane).max(1);
    let n = (batch * plane).max(1) as f32;
    // The per-channel constants of the ReLU's test (unused without one).
    let relu_at = |ch: usize| {
        if RELU {
            (scale[ch], beta[ch])
        } else {
            (0.0, 0.0)
        }
    };
    #[inline(always)]
    fn g_at<const RELU: bool>(x: f32, gy: f32, mean: f32, (scale, beta): (f32, f32)) -> f32 {
        if RELU {
            let v = pre_activation(x, mean, scale, beta);
            gy * if v >= 0.0 { 1.0 } else { 0.0 }
        } else {
            gy
        }
    }
    // Σ ∂y and Σ ∂y · x̂ per channel, x̂ = (x − mean) · inv_std.
    let sums = per_channel(c, plane, batch, |ch, o, acc| {
        let (m, is, r) = (mean[ch], inv_std[ch], relu_at(ch));
        add_lanes(acc, &x[o..o + plane], &gy[o..o + plane], |xv, g| {
            let g = g_at::<RELU>(xv, g, m, r) as f64;
            [g, g * ((xv - m) * is) as f64]
        })
    });
    let sgy: Vec<f32> = sums.iter().map(|s| s[0] as f32).collect();
    let sgx: Vec<f32> = sums.iter().map(|s| s[1] as f32).collect();
    // ∂x = gamma · inv_std · (∂y − Σ∂y / n − x̂ · Σ(∂y·x̂) / n)
    let k: Vec<f32> = (0..c).map(|ch| gamma[ch] * inv_std[ch]).collect();
    let mg: Vec<f32> = sgy.iter().map(|s| s / n).collect();
    let mx: Vec<f32> = sgx.iter().map(|s| s / n).collect();
    let mut out = per_plane(c, plane, x.len(), |ch, o, dst| {
        let (m, is, r) = (mean[ch], inv_std[ch], relu_at(ch));
        let (kc, mgc, mxc) = (k[ch], mg[ch], mx[ch]);
        let xs = &x[o..o + dst.len()];
        let gs = &gy[o..o + dst.len()];
        for ((d, &xv), &g) in dst.iter_mut().zip(xs).zip(gs) {
            let xh = (xv - m) * is;
            d.write(kc * (g_at::<RELU>(xv, g, m, r) - mgc - xh * mxc));
        }
    });
    out.reserve_exact(2 * c);
    out.extend_from_slice(&sgx);
    out.extend_from_slice(&sgy);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, what: &str) {
        crate::testutil::close_t(a, b, 2e-4, what)
    }

    #[test]
    fn matches_candle_nn_batch_norm_values_gradients_and_running_stats() -> Result<()> {
        let dev = Device::Cpu;
        let mut seed = 3u64;
        for dims in [vec![4, 3, 5, 6], vec![2, 5, 7], vec![9, 4]] {
            let c = dims[1];
            let n: usize = dims.iter().product();
            let x = Var::from_vec(random(n, &mut seed), dims.as_slice(), &dev)?;
            let g = Var::from_vec(random(c, &mut seed), c, &dev)?;
            let b = Var::from_vec(random(c, &mut seed), c, &dev)?;
            let (ours, stats) =
                batch_norm_train(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5)?;
            let bn = candle_nn::BatchNorm::new(
                c,
                Tensor::zeros(c, DType::F32, &dev)?,
                Tensor::ones(c, DType::F32, &dev)?,
                g.as_tensor().clone(),
                b.as_tensor().clone(),
                1e-5,
            )?;
            let theirs = bn.forward_train(x.as_tensor())?;
            close(&ours, &theirs, &format!("y {dims:?}"));
            // candle's running mean after one step from 0 at momentum 0.1 is 0.1 · mean.
            let rm = (Tensor::new(stats.mean.as_slice(), &dev)? * 0.1)?;
            close(&rm, bn.running_mean(), "running mean");
            let nn = stats.count as f64;
            let rv = ((Tensor::new(stats.var.as_slice(), &dev)? * (0.1 * nn / (nn - 1.0)))? + 0.9)?;
            close(&rv, bn.running_var(), "running var");
            let w = Tensor::from_vec(random(n, &mut seed), dims.as_slice(), &dev)?;
            let go = (ours * &w)?.sum_all()?.backward()?;
            let gt = (theirs * &w)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("gamma", &g), ("beta", &b)] {
                close(
                    go.get(v).unwrap(),
                    gt.get(v).unwrap(),
                    &format!("∂{name} {dims:?}"),
                );
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_mismatched_parameters_and_bad_eps() {
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 3, 4), DType::F32, &dev).unwrap();
        let p2 = Tensor::ones(2, DType::F32, &dev).unwrap();
        let p3 = Tensor::ones(3, DType::F32, &dev).unwrap();
        let e = batch_norm_train(&x, &p2, &p3, 1e-5).unwrap_err();
        assert!(e.to_string().contains("3 values"), "{e}");
        let e = batch_norm_train(&x, &p3, &p3, f64::NAN).unwrap_err();
        assert!(e.to_string().contains("eps"), "{e}");
    }

    #[test]
    fn fused_relu_equals_relu_after_the_batch_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut seed = 17u64;
        // Random data; and data whose channel 0 holds its mean exactly (x = 2 of 1, 2, 3 with
        // beta 0: a pre-activation of exactly 0, where ReLU's gradient passes).
        let exact: Vec<f32> = [1f32, 2.0, 3.0, 5.0, 6.0, 7.0].repeat(2);
        let cases = [
            (
                vec![4, 3, 5, 6],
                random(360, &mut seed),
                random(3, &mut seed),
            ),
            (vec![2, 2, 3], exact, vec![0.0, 0.5]),
        ];
        for (dims, xv, beta) in cases {
            let c = dims[1];
            let x = Var::from_vec(xv, dims.as_slice(), &dev)?;
            let g = Var::from_vec(random(c, &mut seed), c, &dev)?;
            let b = Var::from_vec(beta, c, &dev)?;
            let (fused, sf) =
                batch_norm_relu_train(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5)?;
            let (y, sc) = batch_norm_train(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5)?;
            let composed = crate::act::relu(&y)?;
            assert_eq!(sf, sc, "statistics {dims:?}");
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(v(&fused), v(&composed), "y {dims:?}");
            let n = fused.elem_count();
            let w = Tensor::from_vec(random(n, &mut seed), dims.as_slice(), &dev)?;
            let gf = (fused * &w)?.sum_all()?.backward()?;
            let gc = (composed * &w)?.sum_all()?.backward()?;
            for (name, t) in [("x", &x), ("gamma", &g), ("beta", &b)] {
                let (f, c) = (v(gf.get(t).unwrap()), v(gc.get(t).unwrap()));
                assert_eq!(f, c, "∂{name} {dims:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn values_and_gradients_do_not_depend_on_the_thread_count() -> Result<()> {
        // Above `MIN_WORK_PER_THREAD` (the parallel paths), planes of 9×9 (five full lanes
        // and a tail), with and without the ReLU.
        let dev = Device::Cpu;
        let mut seed = 29u64;
        let dims = [8usize, 12, 27, 27];
        let n: usize = dims.iter().product();
        assert!(n >= crate::MIN_WORK_PER_THREAD);
        let xv = random(n, &mut seed);
        let (gv, bv) = (random(12, &mut seed), random(12, &mut seed));
        let wv = random(n, &mut seed);
        let run = |threads: usize, relu: bool| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| -> Result<Vec<Vec<f32>>> {
                let x = Var::from_vec(xv.clone(), dims.as_slice(), &dev)?;
                let g = Var::from_vec(gv.clone(), 12, &dev)?;
                let b = Var::from_vec(bv.clone(), 12, &dev)?;
                let f = if relu {
                    batch_norm_relu_train
                } else {
                    batch_norm_train
                };
                let (y, stats) = f(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5)?;
                let w = Tensor::from_vec(wv.clone(), dims.as_slice(), &dev)?;
                let grads = (&y * &w)?.sum_all()?.backward()?;
                let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                Ok(vec![
                    v(&y),
                    stats.mean,
                    stats.var,
                    v(grads.get(&x).unwrap()),
                    v(grads.get(&g).unwrap()),
                    v(grads.get(&b).unwrap()),
                ])
            })
        };
        for relu in [false, true] {
            let one = run(1, relu)?;
            assert!(one[0].iter().all(|v| v.is_finite()));
            assert_eq!(one, run(3, relu)?, "relu {relu}");
        }
        Ok(())
    }
}
