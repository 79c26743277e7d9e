//! The dense linear layer `y = x · Wᵀ + b` as one op with its own backward: [`linear`].
//!
//! With candle's generic ops (`x.matmul(&w.t())` plus a broadcast bias) the weight gradient is
//! computed as `xᵀ · ∂y` — `[in, out]`, then transposed back through the `t()` — and added
//! into the gradient store with a stride: on a 3072×3072 layer that strided add over 37.7 MB
//! was most of a dense step's time outside the GEMMs (docs/benchmarks.md). Here the backward
//! computes `∂W = ∂yᵀ · x` directly in `W`'s `[out, in]` layout, `∂x = ∂y · W` only when `x`
//! needs a gradient, and `∂b` as column sums in one fixed order. All products run on the
//! `gemm` crate candle itself uses, which splits work over the output only, so results do not
//! depend on the thread count.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use sparse_kernels::dense::linear;
//! let w = Var::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu)?; // [out 3, in 2]
//! let b = Var::new(&[0f32, 1.0, 2.0], &Device::Cpu)?;
//! let x = Tensor::new(&[[1f32, 1.0]], &Device::Cpu)?;
//! let y = linear(&x, w.as_tensor(), Some(b.as_tensor()))?;
//! assert_eq!(y.to_vec2::<f32>()?, vec![vec![3.0, 8.0, 13.0]]);
//! let g = y.sum_all()?.backward()?;
//! assert_eq!(g.get(&w).unwrap().to_vec2::<f32>()?, vec![vec![1.0, 1.0]; 3]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::Exec;

/// `dst [m, n] (+)= lhs [m, k] · rhs [k, n]`; `dst` row-major with row stride `dst_rs`, each
/// input given by its (column stride, row stride); `threads > 1` lets the `gemm` crate split
/// the output over that many rayon threads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (usize, usize),
    threads: usize,
) {
    // SAFETY: `dst` is a writable slice of `dst.len()` initialised floats, borrowed mutably.
    unsafe {
        gemm_raw(
            (m, n, k),
            (dst.as_mut_ptr(), dst.len()),
            dst_rs,
            accumulate,
            lhs,
            (lhs_cs, lhs_rs),
            rhs,
            (rhs_cs, rhs_rs),
            threads,
        )
    }
}

/// [`gemm`] into a new row-major `[m, n]` buffer, overwritten: with `accumulate = false` the
/// `gemm` crate writes every element of `dst` and reads none (for `k = 0` it writes zeros), so
/// the buffer is not zero-filled first. For the 3072×3072 weight gradient of a wide layer
/// that fill was a 37.7 MB `memset` per layer and step (or, for memory fresh from the OS,
/// as many page clears).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_new(
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    threads: usize,
) -> Vec<f32> {
    let len = m * n;
    let mut dst: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: `dst` has capacity for `len` floats, which `gemm_raw` (not accumulating) writes
    // in full without reading them; only then is the length set.
    unsafe {
        gemm_raw(
            (m, n, k),
            (dst.as_mut_ptr(), len),
            n,
            false,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
            threads,
        );
        dst.set_len(len);
    }
    dst
}

/// [`gemm`] on a raw `dst` of `dst_len` floats.
///
/// # Safety
/// `dst` must be valid for writes of `dst_len` floats (and for reads of them, initialised,
/// when `accumulate`), and must not alias `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    (dst, dst_len): (*mut f32, usize),
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (usize, usize),
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |cs: usize, rs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(last(1, dst_rs, m, n) < dst_len, "gemm: dst too short");
    if k > 0 {
        assert!(
            last(lhs_cs, lhs_rs, m, k) < lhs.len(),
            "gemm: lhs too short"
        );
        assert!(
            last(rhs_cs, rhs_rs, k, n) < rhs.len(),
            "gemm: rhs too short"
        );
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every element the strides address inside its slice (and
    // `dst`'s inside the `dst_len` floats the caller vouches for); `dst` does not alias the
    // inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `y = x · Wᵀ + bias` for `x [..., in]`, `w [out, in]`, `bias [out]`, with autograd for all
/// three. f32 CPU tensors run the op of this module; others fall back to candle's
/// `broadcast_matmul` and `broadcast_add`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_with(x, w, bias, Exec::default())
}

/// [`linear`] with an explicit thread count.
pub fn linear_with(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, exec: Exec) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let fast = f32_cpu(x)
        && f32_cpu(w)
        && w.rank() == 2
        && x.rank() >= 1
        && bias.is_none_or(|b| f32_cpu(b) && b.rank() == 1);
    if !fast {
        let y = x.broadcast_matmul(&w.t()?)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let (out, fan_in) = w.dims2()?;
    let dims = x.dims();
    let (&xin, lead) = dims.split_last().expect("rank ≥ 1");
    if xin != fan_in {
        candle_core::bail!(
            "linear: x has {xin} features, the weight [{out}, {fan_in}] expects {fan_in}"
        );
    }
    if let Some(b) = bias {
        if b.elem_count() != out {
            candle_core::bail!(
                "linear: the bias has {} values, expected {out}",
                b.elem_count()
            );
        }
    }
    let batch: usize = lead.iter().product();
    let x2 = x.reshape((batch, fan_in))?.contiguous()?;
    let w = w.contiguous()?;
    let op = Linear { exec };
    let y = match bias {
        None => x2.apply_op2(&w, op)?,
        Some(b) => x2.apply_op3(&w, &b.contiguous()?, LinearBias(op))?,
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(out);
    y.reshape(out_dims)
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    crate::contiguous_f32(s, l, "linear", what)
}

/// `y [batch, out] = x [batch, fan_in] · wᵀ (+ bias)` on slices, `w` row-major `[out, fan_in]`:
/// the forward of [`linear`] without candle's tensors (the same values: the rows start at the
/// bias and the product accumulates onto them). Panics if a slice is shorter than its shape.
pub fn linear_forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (batch, out, fan_in): (usize, usize, usize),
    exec: Exec,
) -> Vec<f32> {
    let mut y = vec![0f32; batch * out];
    if let Some(b) = bias {
        for row in y.chunks_mut(out.max(1)) {
            row.copy_from_slice(b);
        }
    }
    let t = threads(exec, batch * out * fan_in);
    gemm(
        (batch, out, fan_in),
        &mut y,
        out,
        bias.is_some(),
        x,
        (1, fan_in),
        w,
        (fan_in, 1),
        t,
    );
    y
}

/// GEMM threads for `work` multiply-adds.
fn threads(exec: Exec, work: usize) -> usize {
    exec.threads_for(work)
}

/// `(x [batch, in], w [out, in]) → y [batch, out]`.
struct Linear {
    exec: Exec,
}

impl Linear {
    fn forward(&self, x: &[f32], w: &[f32], batch: usize, out: usize, fan_in: usize) -> Vec<f32> {
        linear_forward(x, w, None, (batch, out, fan_in), self.exec)
    }

    fn grads(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        let grad = grad.contiguous()?;
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &InputGrad { exec: self.exec })?)
        } else {
            None
        };
        let gw = weight_grad(&grad, x, self.exec)?;
        Ok((gx, gw))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "dense-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, fan_in) = xl.shape().dims2()?;
        let (out, _) = wl.shape().dims2()?;
        let y = self.forward(slice(xs, xl, "x")?, slice(ws, wl, "w")?, batch, out, fan_in);
        Ok((CpuStorage::F32(y), Shape::from((batch, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = self.grads(x, w, grad)?;
        Ok((gx, Some(gw)))
    }
}

/// [`Linear`] plus the bias, whose gradient is the column sums of `∂y`.
struct LinearBias(Linear);

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "dense-linear-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, fan_in) = xl.shape().dims2()?;
        let (out, _) = wl.shape().dims2()?;
        let b = slice(bs, bl, "bias")?;
        let (x, w) = (slice(xs, xl, "x")?, slice(ws, wl, "w")?);
        let y = linear_forward(x, w, Some(b), (batch, out, fan_in), self.0.exec);
        Ok((CpuStorage::F32(y), Shape::from((batch, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = self.0.grads(x, w, grad)?;
        let gb = grad.contiguous()?.apply_op1_no_bwd(&BiasGrad)?;
        Ok((gx, Some(gw), Some(gb)))
    }
}

/// `(∂y [batch, out], w [out, in]) → ∂x = ∂y · W [batch, in]`.
struct InputGrad {
    exec: Exec,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "dense-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, out) = gl.shape().dims2()?;
        let (_, fan_in) = wl.shape().dims2()?;
        let t = threads(self.exec, batch * out * fan_in);
        let (gy, w) = (slice(gs, gl, "grad")?, slice(ws, wl, "w")?);
        let gx = gemm_new((batch, fan_in, out), gy, (1, out), w, (1, fan_in), t);
        Ok((CpuStorage::F32(gx), Shape::from((batch, fan_in))))
    }
}

/// `∂W = ∂yᵀ · x [out, in]` for `∂y [batch, out]` and `x [batch, in]`, f32 on the CPU: one GEMM
/// written in W's layout (candle's `∂yᵀ.matmul(x)` on a transposed view is slower); other
/// devices and dtypes take candle's matmul.
pub(crate) fn weight_grad(grad: &Tensor, x: &Tensor, exec: Exec) -> Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !(cpu_f32(grad) && cpu_f32(x)) {
        return grad.t()?.matmul(x);
    }
    grad.contiguous()?
        .apply_op2_no_bwd(&x.contiguous()?, &WeightGrad { exec })
}

/// `(∂y [batch, out], x [batch, in]) → ∂W = ∂yᵀ · x [out, in]`.
struct WeightGrad {
    exec: Exec,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "dense-linear-weight-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, out) = gl.shape().dims2()?;
        let (_, fan_in) = xl.shape().dims2()?;
        let t = threads(self.exec, batch * out * fan_in);
        let (gy, x) = (slice(gs, gl, "grad")?, slice(xs, xl, "x")?);
        let gw = gemm_new((out, fan_in, batch), gy, (out, 1), x, (1, fan_in), t);
        Ok((CpuStorage::F32(gw), Shape::from((out, fan_in))))
    }
}

/// The gradient of a per-channel bias: `∂y [batch, out, …]` summed over every axis but the
/// channel axis 1 (`[batch, out]` for a linear layer, `[batch, out, oh, ow]` for a conv), in
/// one fixed order (samples, then positions).
pub(crate) struct BiasGrad;

impl candle_core::CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        if dims.len() < 2 {
            candle_core::bail!("bias gradient: expected [batch, out, …], got {dims:?}");
        }
        let (out, plane) = (dims[1], dims[2..].iter().product::<usize>());
        let gy = slice(s, l, "grad")?;
        Ok((CpuStorage::F32(bias_grad(gy, out, plane)), Shape::from(out)))
    }
}

/// `∂b[o] = Σ_{sample, position} ∂y[sample, o, position]` for `∂y [batch, out, plane]`. The
/// order of the additions depends on the shape only (16 running sums per plane, samples in
/// order), not on the thread count; channels are summed in parallel when there is enough work.
fn bias_grad(gy: &[f32], out: usize, plane: usize) -> Vec<f32> {
    let mut gb = vec![0f32; out];
    if out == 0 || plane == 0 {
        return gb;
    }
    let batch = gy.len() / (out * plane);
    if plane == 1 {
        // A linear layer's `[batch, out]`: whole rows at a time (vectorised over channels).
        for row in gy.chunks_exact(out) {
            for (b, &g) in gb.iter_mut().zip(row) {
                *b += g;
            }
        }
        return gb;
    }
    let channel = |(o, b): (usize, &mut f32)| {
        for si in 0..batch {
            *b += sum16(&gy[(si * out + o) * plane..][..plane]);
        }
    };
    if crate::candle_threads() > 1 && out > 1 && gy.len() >= crate::MIN_WORK_PER_THREAD {
        use rayon::prelude::*;
        gb.par_iter_mut().enumerate().for_each(channel);
    } else {
        gb.iter_mut().enumerate().for_each(channel);
    }
    gb
}

/// `Σ v` with 16 independent running sums (a single running sum is a chain of dependent adds
/// that the compiler may not reorder: ~4× slower).
fn sum16(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut blocks = v.chunks_exact(16);
    for b in &mut blocks {
        for (a, &x) in acc.iter_mut().zip(b) {
            *a += x;
        }
    }
    let tail: f32 = blocks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, what: &str) {
        crate::testutil::close_t(a, b, 1e-4, what)
    }

    #[test]
    fn values_and_gradients_match_candles_matmul_on_random_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let mut seed = 5u64;
        for (lead, fan_in, out) in [
            (vec![7], 5, 3),
            (vec![2, 3], 17, 9),
            (vec![1], 64, 1),
            (vec![33], 1, 40),
        ] {
            let mut xd = lead.clone();
            xd.push(fan_in);
            let n: usize = xd.iter().product();
            let x = Var::from_vec(random(n, &mut seed), xd.as_slice(), &dev)?;
            let w = Var::from_vec(random(out * fan_in, &mut seed), (out, fan_in), &dev)?;
            let b = Var::from_vec(random(out, &mut seed), out, &dev)?;
            for with_bias in [false, true] {
                let bias = with_bias.then(|| b.as_tensor());
                let ours = linear(x.as_tensor(), w.as_tensor(), bias)?;
                let mut theirs = x.as_tensor().broadcast_matmul(&w.as_tensor().t()?)?;
                if with_bias {
                    theirs = theirs.broadcast_add(b.as_tensor())?;
                }
                let what = format!("{xd:?}→{out} bias {with_bias}");
                close(&ours, &theirs, &format!("y {what}"));
                let u = Tensor::from_vec(random(ours.elem_count(), &mut seed), ours.shape(), &dev)?;
                let go = (ours * &u)?.sum_all()?.backward()?;
                let gt = (theirs * &u)?.sum_all()?.backward()?;
                close(
                    go.get(&x).unwrap(),
                    gt.get(&x).unwrap(),
                    &format!("∂x {what}"),
                );
                close(
                    go.get(&w).unwrap(),
                    gt.get(&w).unwrap(),
                    &format!("∂w {what}"),
                );
                assert_eq!(go.get(&b).is_some(), with_bias);
                if with_bias {
                    close(
                        go.get(&b).unwrap(),
                        gt.get(&b).unwrap(),
                        &format!("∂b {what}"),
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bit_identical_for_any_thread_count_and_no_input_gradient_for_data() -> Result<()> {
        let dev = Device::Cpu;
        let mut seed = 9u64;
        let x = Tensor::from_vec(random(128 * 300, &mut seed), (128, 300), &dev)?;
        let w = Var::from_vec(random(200 * 300, &mut seed), (200, 300), &dev)?;
        let run = |t: usize| -> Result<(Vec<f32>, Vec<f32>)> {
            let e = Exec::default().with_threads(t);
            let y = linear_with(&x, w.as_tensor(), None, e)?;
            let g = y.sqr()?.sum_all()?.backward()?;
            assert!(g.get(&x).is_none(), "data needs no gradient");
            Ok((
                y.flatten_all()?.to_vec1()?,
                g.get(&w).unwrap().flatten_all()?.to_vec1()?,
            ))
        };
        let one = run(1)?;
        for t in [2, 3] {
            assert!(run(t)? == one, "{t} threads differ from 1");
        }
        Ok(())
    }

    #[test]
    fn bias_gradient_is_the_sum_over_samples_and_positions() {
        let mut seed = 11u64;
        // Linear rows (plane 1), planes shorter and longer than 16 with tails, one large
        // enough for the parallel path.
        for (batch, out, plane) in [(3, 5, 1), (2, 4, 7), (5, 3, 33), (128, 6, 784)] {
            let gy = random(batch * out * plane, &mut seed);
            let got = bias_grad(&gy, out, plane);
            for (o, &g) in got.iter().enumerate() {
                let want: f64 = (0..batch)
                    .flat_map(|s| (0..plane).map(move |p| (s * out + o) * plane + p))
                    .map(|i| gy[i] as f64)
                    .sum();
                assert!(
                    (g as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{:?}[{o}]: {g} vs {want}",
                    (batch, out, plane)
                );
            }
        }
        assert_eq!(bias_grad(&[], 3, 4), vec![0.0; 3]);
    }

    /// The workspace builds on the patched candle-core (third_party/candle-core/PATCHED.md): a
    /// tensor's first gradient is stored as it is, so a `-0.0` keeps its sign (candle's `0 + g`
    /// made it `+0.0`), and tensors reached by several gradients still get their sum — an
    /// intermediate used twice, a variable used by this op twice and by a candle op.
    #[test]
    fn backward_stores_first_gradients_as_they_are_and_sums_the_rest() -> Result<()> {
        let dev = Device::Cpu;
        let c = Tensor::new(&[-0.0f32, 2.0, -3.0], &dev)?;
        let v = Var::from_tensor(&Tensor::new(&[1.0f32, 0.0, 5.0], &dev)?)?;
        let g = (v.as_tensor() * &c)?.sum_all()?.backward()?;
        let gv = g
            .get(v.as_tensor())
            .expect("gradient of v")
            .to_vec1::<f32>()?;
        assert_eq!(gv, [0.0, 2.0, -3.0]);
        assert!(
            gv[0].is_sign_negative(),
            "the -0.0 gradient became +0.0: stock candle-core?"
        );

        let mut seed = 17u64;
        let (batch, fan_in, out) = (5, 7, 3);
        let x = Tensor::from_vec(random(batch * fan_in, &mut seed), (batch, fan_in), &dev)?;
        let w = Var::from_tensor(&Tensor::from_vec(
            random(out * fan_in, &mut seed),
            (out, fan_in),
            &dev,
        )?)?;
        let b = Var::from_tensor(&Tensor::from_vec(random(out, &mut seed), out, &dev)?)?;
        // h feeds two candle ops, w this op twice and a candle op (an L2 term).
        let h = linear(&x, w.as_tensor(), Some(b.as_tensor()))?;
        let h2 = linear(&x, w.as_tensor(), None)?;
        let loss = ((h.sqr()?.sum_all()? + h.sum_all()?)? + h2.sum_all()?)?;
        let loss = (loss + w.as_tensor().sqr()?.sum_all()?)?;
        let g = loss.backward()?;
        // ∂L/∂h = 2h + 1, ∂L/∂h2 = 1: ∂L/∂W = (2h + 1)ᵀ·x + 1ᵀ·x + 2W, ∂L/∂b = Σ_batch (2h + 1).
        let dh = ((&h * 2.0)? + 1.0)?;
        let ones = Tensor::ones((batch, out), candle_core::DType::F32, &dev)?;
        let want_w = ((dh.t()?.matmul(&x)? + ones.t()?.matmul(&x)?)? + (w.as_tensor() * 2.0)?)?;
        close(
            g.get(w.as_tensor()).expect("gradient of w"),
            &want_w,
            "dL/dW",
        );
        close(
            g.get(b.as_tensor()).expect("gradient of b"),
            &dh.sum(0)?,
            "dL/db",
        );
        Ok(())
    }
}
