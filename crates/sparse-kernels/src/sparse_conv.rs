//! Sparse 2-D convolution: a conv weight `[out, in, kh, kw]` held in a sparse layout whose
//! rows are the output channels and whose fan-in is a whole filter, `in · kh · kw` (so the
//! constant fan-in of a condensed conv weight counts the kept weights of a filter, as SRigL's
//! does), with autograd for the input, the stored values and the bias: [`sparse_conv2d`].
//!
//! A sparse convolution is an im2col followed by the sparse product, with the im2col left
//! implicit: per chunk of up to 64 samples, `x` is transposed once into a padded layout with
//! the samples as SIMD lanes, in which every entry of the im2col matrix `cols [K, L]`
//! (`K = in·kh·kw`, `L = oh·ow`) is a cell at a fixed offset from its output position's (see
//! `conv_lanes.rs`: no `K`-fold copy of the input is written). Then
//!
//! - forward: `y_s [out, L] = W · cols(x_s)`, one multiply-add over the chunk's samples per
//!   stored weight and position;
//! - input gradient: `cols(∂x_s) = Wᵀ · ∂y_s` back onto `[batch, in, h, w]` — gathered per
//!   input cell as the transposed convolution of `∂y` for stride 1 when the input has at most
//!   1.5× the output's positions ("same" convolutions), otherwise scattered into the padded
//!   layout's cells (skipped when `x` needs no gradient, a first layer);
//! - value gradient: `∂v[slot] = Σ_s Σ_l ∂y_s[row, l] · cols(x_s)[col, l]` at the stored
//!   positions only, the dense weight gradient never formed.
//!
//! Chunks depend only on the batch size. They run in parallel when there are several (each
//! writes its own samples of `y` or `∂x`; the value gradient keeps one partial sum per chunk and
//! adds them in chunk order); within a chunk the forward and value gradient split the stored
//! rows over the threads, each output summed by one thread in a fixed order. So results are
//! bit-identical for any thread count. Grouped convolutions are not supported (the error says
//! so); f32 on the CPU.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use sparse_formats::{Condensed, Mask};
//! use sparse_kernels::conv::ConvSpec;
//! use sparse_kernels::ops::SparseStructure;
//! use sparse_kernels::sparse_conv::sparse_conv2d;
//!
//! // One 2×2 filter [[1, 0], [0, -1]] stored with its two non-zero weights.
//! let w = [1.0f32, 0.0, 0.0, -1.0];
//! let c = Condensed::from_dense(1, 4, &w, &Mask::from_dense(1, 4, &w)?, None)?;
//! let values = Var::new(c.values(), &Device::Cpu)?;
//! let s = SparseStructure::from(c);
//! let x = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 1, 4, 4))?;
//! let y = sparse_conv2d(&x, values.as_tensor(), &s, (2, 2), None, ConvSpec::default())?;
//! assert_eq!(y.dims(), [1, 1, 3, 3]);
//! assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![-5.0; 9]);
//! let g = y.sum_all()?.backward()?;
//! // ∂/∂W[0,0] = sum of x's top-left 3×3 window, ∂/∂W[1,1] = of its bottom-right one.
//! assert_eq!(g.get(&values).unwrap().to_vec1::<f32>()?, vec![45.0, 90.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::conv::{ConvSpec, Geometry};
use crate::conv_lanes;
use crate::cpu::check;
use crate::ops::SparseStructure;
use crate::rows::{Rows, RowsVisitor};
use crate::{Exec, KernelError, SparseWeight};

/// The shape of one sparse convolution: the input `[batch, in, h, w]`, the kernel size and the
/// convolution's settings. The weight's rows are its output channels, its fan-in `in · kh · kw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseConvShape {
    /// `[batch, in, h, w]`.
    pub x: [usize; 4],
    /// `(kh, kw)`.
    pub kernel: (usize, usize),
    /// Padding, stride, dilation; `groups` must be 1.
    pub spec: ConvSpec,
}

impl SparseConvShape {
    /// The checked geometry for weight `w` (its fan-in must be `in · kh · kw`).
    fn geometry(&self, w: &SparseWeight<'_>) -> std::result::Result<Geometry, KernelError> {
        let bad = |reason: String| KernelError::Conv(reason);
        if self.spec.groups != 1 {
            return Err(bad(format!(
                "grouped convolutions (groups = {}) are not supported; use groups = 1",
                self.spec.groups
            )));
        }
        let (kh, kw) = self.kernel;
        let k = self.x[1] * kh * kw;
        if w.fan_in() != k {
            return Err(bad(format!(
                "the weight's fan-in is {}, a {kh}×{kw} kernel over {} input channels needs {k}",
                w.fan_in(),
                self.x[1]
            )));
        }
        Geometry::new(&self.x, &[w.rows(), self.x[1], kh, kw], self.spec)
            .map_err(|e| bad(e.to_string()))
    }

    /// The output's shape `[batch, out, oh, ow]` for weight `w`.
    pub fn output(&self, w: &SparseWeight<'_>) -> std::result::Result<[usize; 4], KernelError> {
        let g = self.geometry(w)?;
        Ok([g.batch, g.out, g.oh, g.ow])
    }
}

/// `y = conv2d(x, W) + bias` on slices: `x [batch, in, h, w]`, `values` in the layout's slot
/// order, `bias [out]`; returns `y [batch, out, oh, ow]`. Rows the layout does not store
/// (ablated filters) output their bias.
pub fn conv_forward<'a>(
    w: impl Into<SparseWeight<'a>>,
    values: &[f32],
    bias: Option<&[f32]>,
    x: &[f32],
    shape: SparseConvShape,
    exec: Exec,
) -> std::result::Result<Vec<f32>, KernelError> {
    let w = w.into();
    let g = shape.geometry(&w)?;
    check("values", values.len(), w.nnz())?;
    check("x", x.len(), g.batch * g.c * g.h * g.w)?;
    if let Some(b) = bias {
        check("bias", b.len(), g.out)?;
    }
    Ok(w.with_rows(Forward {
        g: &g,
        values,
        bias,
        x,
        exec,
    }))
}

/// `∂x` of [`conv_forward`] for `∂y [batch, out, oh, ow]`; returns `∂x [batch, in, h, w]`.
pub fn conv_input_grad<'a>(
    w: impl Into<SparseWeight<'a>>,
    values: &[f32],
    grad_y: &[f32],
    shape: SparseConvShape,
    exec: Exec,
) -> std::result::Result<Vec<f32>, KernelError> {
    let w = w.into();
    let g = shape.geometry(&w)?;
    check("values", values.len(), w.nnz())?;
    check("grad_y", grad_y.len(), g.batch * g.out * g.l())?;
    Ok(w.with_rows(InputGrad {
        g: &g,
        values,
        grad_y,
        exec,
    }))
}

/// The gradient of the stored values of [`conv_forward`]: one entry per stored value (slot
/// order), `Σ_samples Σ_positions ∂y[row] · x[window entry of col]`.
pub fn conv_value_grad<'a>(
    w: impl Into<SparseWeight<'a>>,
    x: &[f32],
    grad_y: &[f32],
    shape: SparseConvShape,
    exec: Exec,
) -> std::result::Result<Vec<f32>, KernelError> {
    let w = w.into();
    let g = shape.geometry(&w)?;
    check("x", x.len(), g.batch * g.c * g.h * g.w)?;
    check("grad_y", grad_y.len(), g.batch * g.out * g.l())?;
    let mut gv = vec![0f32; w.nnz()];
    w.with_rows(ValueGrad {
        g: &g,
        x,
        grad_y,
        gv: &mut gv,
        exec,
    });
    Ok(gv)
}

struct Forward<'a> {
    g: &'a Geometry,
    values: &'a [f32],
    bias: Option<&'a [f32]>,
    x: &'a [f32],
    exec: Exec,
}

impl RowsVisitor for Forward<'_> {
    type Out = Vec<f32>;
    fn visit<R: Rows>(self, r: &R) -> Vec<f32> {
        let Forward {
            g,
            values,
            bias,
            x,
            exec,
        } = self;
        let (l, out) = (g.l(), g.out);
        // The bias (or zeros) written once, with no zero-fill before it.
        let mut y = Vec::with_capacity(g.batch * out * l);
        match bias {
            Some(b) => {
                (0..g.batch * out).for_each(|i| y.extend(std::iter::repeat_n(b[i % out], l)))
            }
            None => y.resize(g.batch * out * l, 0.0),
        }
        if l > 0 && out > 0 {
            conv_lanes::forward(g, r, values, x, &mut y, exec);
        }
        y
    }
}

struct InputGrad<'a> {
    g: &'a Geometry,
    values: &'a [f32],
    grad_y: &'a [f32],
    exec: Exec,
}

impl RowsVisitor for InputGrad<'_> {
    type Out = Vec<f32>;
    fn visit<R: Rows>(self, r: &R) -> Vec<f32> {
        let InputGrad {
            g,
            values,
            grad_y,
            exec,
        } = self;
        if g.l() == 0 || g.out == 0 || g.k() == 0 {
            return vec![0f32; g.batch * g.c * g.h * g.w];
        }
        conv_lanes::input_grad(g, r, values, grad_y, exec)
    }
}

struct ValueGrad<'a> {
    g: &'a Geometry,
    x: &'a [f32],
    grad_y: &'a [f32],
    gv: &'a mut [f32],
    exec: Exec,
}

impl RowsVisitor for ValueGrad<'_> {
    type Out = ();
    fn visit<R: Rows>(self, r: &R) {
        let ValueGrad {
            g,
            x,
            grad_y,
            gv,
            exec,
        } = self;
        if g.l() > 0 && !gv.is_empty() {
            conv_lanes::value_grad(g, r, x, grad_y, gv, exec);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// candle ops

/// `y = conv2d(x, W) + bias` for `x [batch, in, h, w]`, `W` the sparse weight given by
/// `structure` (rows = output channels, fan-in = `in · kh · kw`) with stored `values`, and an
/// optional `bias [out]`; autograd for `x`, `values` and `bias`. f32 on the CPU.
pub fn sparse_conv2d(
    x: &Tensor,
    values: &Tensor,
    structure: &SparseStructure,
    kernel: (usize, usize),
    bias: Option<&Tensor>,
    spec: ConvSpec,
) -> Result<Tensor> {
    sparse_conv2d_with(x, values, structure, kernel, bias, spec, Exec::default())
}

/// [`sparse_conv2d`] with an explicit thread count / instruction set.
pub fn sparse_conv2d_with(
    x: &Tensor,
    values: &Tensor,
    structure: &SparseStructure,
    kernel: (usize, usize),
    bias: Option<&Tensor>,
    spec: ConvSpec,
    exec: Exec,
) -> Result<Tensor> {
    let op = op(x, structure, kernel, spec, exec)?;
    let (x, values) = (x.contiguous()?, values.contiguous()?);
    match bias {
        None => x.apply_op2(&values, op),
        Some(b) => {
            if b.dims() != [op.g.out] {
                candle_core::bail!(
                    "sparse_conv2d: the bias has shape {:?}, the weight has {} output channels",
                    b.dims(),
                    op.g.out
                );
            }
            x.apply_op3(&values, &b.contiguous()?, ForwardBias(op))
        }
    }
}

/// [`sparse_conv2d`] that also hands the dense weight gradient `∂L/∂W` to `dense`, a
/// `[out, in, kh, kw]` tensor (typically a `Var`) whose values the forward pass does not read:
/// for the steps of sparse training that need it (a RigL/SRigL mask update), the products stay
/// sparse and the backward pass adds the one dense weight-gradient product.
pub fn sparse_conv2d_dense_grad(
    x: &Tensor,
    values: &Tensor,
    dense: &Tensor,
    structure: &SparseStructure,
    kernel: (usize, usize),
    bias: Option<&Tensor>,
    spec: ConvSpec,
) -> Result<Tensor> {
    let op = op(x, structure, kernel, spec, Exec::default())?;
    let g = op.g;
    if dense.dims() != [g.out, g.c, g.kh, g.kw] {
        candle_core::bail!(
            "sparse_conv2d_dense_grad: the dense weight has shape {:?}, expected [{}, {}, {}, {}]",
            dense.dims(),
            g.out,
            g.c,
            g.kh,
            g.kw
        );
    }
    let y = x
        .contiguous()?
        .apply_op3(&values.contiguous()?, dense, ForwardDenseGrad(op))?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, g.out, 1, 1))?),
        None => Ok(y),
    }
}

/// The forward op for `x`'s shape, checked.
fn op(
    x: &Tensor,
    structure: &SparseStructure,
    kernel: (usize, usize),
    spec: ConvSpec,
    exec: Exec,
) -> Result<Forward2> {
    let Ok::<[usize; 4], _>(dims) = x.dims().try_into() else {
        candle_core::bail!(
            "sparse_conv2d: x must be [batch, channels, h, w], got {:?}",
            x.dims()
        );
    };
    let shape = SparseConvShape {
        x: dims,
        kernel,
        spec,
    };
    let g = shape
        .geometry(&structure.weight())
        .map_err(candle_core::Error::wrap)?;
    Ok(Forward2 {
        structure: structure.clone(),
        shape,
        g,
        exec,
    })
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    crate::contiguous_f32(s, l, "sparse_conv2d", what)
}

/// `(x, values) → y`.
#[derive(Clone)]
struct Forward2 {
    structure: SparseStructure,
    shape: SparseConvShape,
    g: Geometry,
    exec: Exec,
}

impl Forward2 {
    fn out_shape(&self) -> Shape {
        Shape::from((self.g.batch, self.g.out, self.g.oh, self.g.ow))
    }

    fn run(&self, x: &[f32], v: &[f32], bias: Option<&[f32]>) -> Result<Vec<f32>> {
        conv_forward(self.structure.weight(), v, bias, x, self.shape, self.exec)
            .map_err(candle_core::Error::wrap)
    }

    fn grads(
        &self,
        x: &Tensor,
        values: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // No input gradient for data (a first layer): nothing would read it.
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(values, &InputGradOp(self.clone()))?)
        } else {
            None
        };
        let gv = x
            .apply_op2_no_bwd(&grad, &ValueGradOp(self.clone()))?
            .reshape(values.shape())?;
        Ok((gx, Some(gv)))
    }
}

impl CustomOp2 for Forward2 {
    fn name(&self) -> &'static str {
        "sparse-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = self.run(slice(xs, xl, "x")?, slice(vs, vl, "values")?, None)?;
        Ok((CpuStorage::F32(y), self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        values: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(x, values, grad)
    }
}

/// `(x, values, bias) → y`, the bias folded into the forward and its gradient `∂y` summed over
/// samples and positions.
struct ForwardBias(Forward2);

impl CustomOp3 for ForwardBias {
    fn name(&self) -> &'static str {
        "sparse-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = self.0.run(
            slice(xs, xl, "x")?,
            slice(vs, vl, "values")?,
            Some(slice(bs, bl, "bias")?),
        )?;
        Ok((CpuStorage::F32(y), self.0.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        values: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gv) = self.0.grads(x, values, grad)?;
        let gb = grad
            .contiguous()?
            .apply_op1_no_bwd(&crate::dense::BiasGrad)?;
        Ok((gx, gv, Some(gb)))
    }
}

/// `(x, values, dense) → y`: the dense weight only receives the dense weight gradient.
struct ForwardDenseGrad(Forward2);

impl CustomOp3 for ForwardDenseGrad {
    fn name(&self) -> &'static str {
        "sparse-conv2d-dense-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
        _ds: &CpuStorage,
        _dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.cpu_fwd(xs, xl, vs, vl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        values: &Tensor,
        dense: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gv) = self.0.grads(x, values, grad)?;
        let grad = grad.contiguous()?;
        let gd = x
            .apply_op2_no_bwd(&grad, &DenseGradOp(self.0.clone()))?
            .reshape(dense.shape())?;
        Ok((gx, gv, Some(gd)))
    }
}

/// `(∂y, values) → ∂x`.
struct InputGradOp(Forward2);

impl CustomOp2 for InputGradOp {
    fn name(&self) -> &'static str {
        "sparse-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let f = &self.0;
        let gx = conv_input_grad(
            f.structure.weight(),
            slice(vs, vl, "values")?,
            slice(gs, gl, "grad")?,
            f.shape,
            f.exec,
        )
        .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(gx), Shape::from(f.shape.x.to_vec())))
    }
}

/// `(x, ∂y) → ∂values`.
struct ValueGradOp(Forward2);

impl CustomOp2 for ValueGradOp {
    fn name(&self) -> &'static str {
        "sparse-conv2d-value-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let f = &self.0;
        let gv = conv_value_grad(
            f.structure.weight(),
            slice(xs, xl, "x")?,
            slice(gs, gl, "grad")?,
            f.shape,
            f.exec,
        )
        .map_err(candle_core::Error::wrap)?;
        let n = gv.len();
        Ok((CpuStorage::F32(gv), Shape::from(n)))
    }
}

/// `(x, ∂y) → ∂W` dense, `[out, in·kh·kw]` (the GEMM weight gradient of [`crate::conv`]).
struct DenseGradOp(Forward2);

impl CustomOp2 for DenseGradOp {
    fn name(&self) -> &'static str {
        "sparse-conv2d-dense-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0.g;
        let gw = crate::conv::weight_grad(
            g,
            slice(xs, xl, "x")?,
            slice(gs, gl, "grad")?,
            Exec::default(),
        );
        Ok((CpuStorage::F32(gw), Shape::from((g.out, g.k()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random;
    use candle_core::{Device, Var};
    use sparse_formats::{Condensed, Csr, NmPattern, NmSparse};

    fn close(a: &[f32], b: &[f32], what: &str) {
        crate::testutil::close(a, b, 1e-4, what)
    }

    /// A random layout of each format for a `[rows, fan_in]` weight, with its dense
    /// (zero-filled) equivalent and its stored positions: condensed with `k` kept per filter and
    /// every third filter ablated (empty), CSR with about a quarter kept, 2:4 when the fan-in
    /// splits into groups of 4, and 2:4 across input channels (groups of 4 channels at one
    /// kernel position, `group_stride = kh·kw = area`, as lbc's conv layers) when the channels
    /// do.
    fn layouts(
        rows: usize,
        fan_in: usize,
        k: usize,
        area: usize,
        seed: &mut u64,
    ) -> Vec<(&'static str, SparseStructure, Vec<f32>, Vec<usize>)> {
        let mut next = |n: usize| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed % n as u64) as usize
        };
        let mut out = Vec::new();
        // condensed
        let mut pos = Vec::new();
        for r in (0..rows).filter(|r| r % 3 != 1) {
            let mut cols: Vec<usize> = (0..fan_in).collect();
            for i in 0..k {
                let j = i + next(fan_in - i);
                cols.swap(i, j);
            }
            let mut kept = cols[..k].to_vec();
            kept.sort();
            pos.extend(kept.iter().map(|c| r * fan_in + c));
        }
        let mut csr_pos: Vec<usize> = (0..rows * fan_in).filter(|_| next(4) == 0).collect();
        if csr_pos.is_empty() {
            csr_pos.push(0);
        }
        let mut nm_pos = Vec::new();
        if fan_in.is_multiple_of(4) {
            for g in 0..rows * fan_in / 4 {
                let a = next(4);
                let b = (a + 1 + next(3)) % 4;
                let (a, b) = (a.min(b), a.max(b));
                nm_pos.extend([g * 4 + a, g * 4 + b]);
            }
        }
        let mut strided_pos = Vec::new();
        if fan_in.is_multiple_of(4 * area) {
            for r in 0..rows {
                for b in 0..fan_in / (4 * area) {
                    for t in 0..area {
                        let a = next(4);
                        let c = (a + 1 + next(3)) % 4;
                        for p in [a.min(c), a.max(c)] {
                            strided_pos.push(r * fan_in + (b * 4 + p) * area + t);
                        }
                    }
                }
            }
            strided_pos.sort();
        }
        for (name, p) in [
            ("condensed", pos),
            ("csr", csr_pos),
            ("2:4", nm_pos),
            ("2:4 across channels", strided_pos),
        ] {
            if p.is_empty() {
                continue;
            }
            let vals = random(p.len(), seed);
            let mut dense = vec![0f32; rows * fan_in];
            for (&q, &v) in p.iter().zip(&vals) {
                dense[q] = v;
            }
            let s = match name {
                "condensed" => SparseStructure::from(
                    Condensed::from_positions(rows, fan_in, &p, vals, None).unwrap(),
                ),
                "csr" => {
                    SparseStructure::from(Csr::from_positions(rows, fan_in, &p, vals).unwrap())
                }
                _ => {
                    let mask = sparse_formats::Mask::from_dense(rows, fan_in, &dense).unwrap();
                    let pattern = NmPattern {
                        group_stride: if name == "2:4" { 1 } else { area },
                        ..NmPattern::new(2, 4)
                    };
                    SparseStructure::from(
                        NmSparse::from_dense(rows, fan_in, pattern, &dense, &mask).unwrap(),
                    )
                }
            };
            out.push((name, s, dense, p));
        }
        out
    }

    /// The stored values of `s` in slot order.
    fn values_of(s: &SparseStructure) -> Vec<f32> {
        match s {
            SparseStructure::Condensed(c) => c.values().to_vec(),
            SparseStructure::Csr(c) => c.values().to_vec(),
            SparseStructure::Nm(c) => c.values().to_vec(),
        }
    }

    /// The dense position of each stored value, in slot order.
    fn slot_positions(s: &SparseStructure) -> Vec<usize> {
        let w = s.weight();
        let mut marked = vec![0f32; w.nnz()];
        for (i, m) in marked.iter_mut().enumerate() {
            *m = i as f32 + 1.0;
        }
        let dense = match s {
            SparseStructure::Condensed(c) => {
                let mut c = (**c).clone();
                c.values_mut().copy_from_slice(&marked);
                c.to_dense()
            }
            SparseStructure::Csr(c) => {
                let mut c = (**c).clone();
                c.values_mut().copy_from_slice(&marked);
                c.to_dense()
            }
            SparseStructure::Nm(c) => {
                let mut c = (**c).clone();
                c.values_mut().copy_from_slice(&marked);
                c.to_dense()
            }
        };
        let mut pos = vec![0; w.nnz()];
        for (p, &v) in dense.iter().enumerate() {
            if v != 0.0 {
                pos[v as usize - 1] = p;
            }
        }
        pos
    }

    #[test]
    fn every_product_equals_the_dense_conv_of_the_masked_weight_on_random_shapes() {
        let mut seed = 0xC0_u64;
        // (batch, c, h, w, out, k, padding, stride, dilation, kept per filter); the batches
        // cover every lane width of a chunk (8, 16, 32, 64) and several chunks (> 64 samples).
        let shapes = [
            (2, 4, 7, 5, 5, 3, 1, 1, 1, 7),
            (3, 2, 8, 8, 6, 2, 0, 2, 1, 3),
            (1, 1, 6, 9, 3, 2, 2, 3, 1, 1),
            (4, 4, 9, 9, 3, 3, 2, 1, 2, 9),
            (5, 4, 4, 4, 7, 1, 0, 1, 1, 2),
            (40, 2, 3, 3, 4, 2, 1, 1, 1, 2), // L = 16: several samples per chunk
            (3, 4, 21, 20, 8, 5, 2, 1, 1, 20), // L = 420: chunks of 3 samples
            (1, 1, 2, 2, 2, 1, 0, 1, 1, 1),  // one output position per sample
            (12, 3, 5, 5, 4, 3, 1, 1, 1, 5), // 16 lanes
            (20, 2, 6, 7, 3, 3, 1, 2, 1, 4), // 32 lanes, stride 2
            (70, 2, 4, 4, 4, 2, 1, 1, 1, 3), // two chunks, 64 + 6 samples
            (6, 3, 5, 4, 4, 2, 2, 1, 1, 5),  // padding beyond the kernel's reach
            (9, 2, 7, 6, 3, 3, 3, 1, 2, 6),  // the same with dilation 2
            (66, 3, 12, 12, 5, 5, 0, 1, 1, 8), // unpadded 5×5, stride 1: scattered
        ];
        for &(b, c, h, wd, out, k, padding, stride, dilation, keep) in &shapes {
            let spec = ConvSpec {
                padding,
                stride,
                dilation,
                groups: 1,
            };
            let fan_in = c * k * k;
            let shape = SparseConvShape {
                x: [b, c, h, wd],
                kernel: (k, k),
                spec,
            };
            let g = Geometry::new(&shape.x, &[out, c, k, k], spec).unwrap();
            let x = random(b * c * h * wd, &mut seed);
            let gy = random(b * out * g.l(), &mut seed);
            let bias = random(out, &mut seed);
            for (name, s, dense, _) in layouts(out, fan_in, keep.min(fan_in), k * k, &mut seed) {
                let e1 = Exec::default().with_threads(1);
                let mut ry = crate::conv::forward(&g, &x, &dense, None, e1);
                for (i, plane) in ry.chunks_mut(g.l()).enumerate() {
                    plane.iter_mut().for_each(|v| *v += bias[i % out]);
                }
                let rgx = crate::conv::input_grad(&g, &gy, &dense, e1);
                let rgw = crate::conv::weight_grad(&g, &x, &gy, e1);
                let rgv: Vec<f32> = slot_positions(&s).iter().map(|&p| rgw[p]).collect();
                let v = values_of(&s);
                let w = s.weight();
                let runs = crate::Isa::available()
                    .into_iter()
                    .flat_map(|isa| [1, 2, 3].map(|t| (isa, t)));
                let mut first = None;
                for (isa, threads) in runs {
                    let exec = Exec::default().with_threads(threads).with_isa(isa);
                    let what = format!(
                        "{name} {:?} {} threads {threads}",
                        (b, c, h, wd, out, k, spec),
                        isa.name()
                    );
                    // Stale scratch buffers (the 1-thread runs use this thread's) must not
                    // leak into the results.
                    crate::scratch::poison();
                    let y = conv_forward(w, &v, Some(&bias), &x, shape, exec).unwrap();
                    crate::scratch::poison();
                    let gx = conv_input_grad(w, &v, &gy, shape, exec).unwrap();
                    crate::scratch::poison();
                    let gv = conv_value_grad(w, &x, &gy, shape, exec).unwrap();
                    close(&y, &ry, &format!("y {what}"));
                    close(&gx, &rgx, &format!("gx {what}"));
                    close(&gv, &rgv, &format!("gv {what}"));
                    // Same bits for every thread count (per instruction set).
                    match &first {
                        Some((i, f)) if *i == isa => {
                            assert!(*f == (y, gx, gv), "{what}: differs from 1 thread")
                        }
                        _ => first = Some((isa, (y, gx, gv))),
                    }
                }
            }
        }
    }

    #[test]
    fn autograd_matches_the_dense_conv_and_hands_the_dense_gradient_when_asked() -> Result<()> {
        let dev = Device::Cpu;
        let mut seed = 23u64;
        let spec = ConvSpec {
            padding: 1,
            stride: 2,
            ..ConvSpec::default()
        };
        let (c, out, k) = (3, 5, 3);
        for (name, s, dense, _) in layouts(out, c * k * k, 4, k * k, &mut seed) {
            let xv = Var::from_vec(random(2 * c * 9 * 9, &mut seed), (2, c, 9, 9), &dev)?;
            let values = Var::from_vec(values_of(&s), s.weight().nnz(), &dev)?;
            let wv = Var::from_vec(dense.clone(), (out, c, k, k), &dev)?;
            let bv = Var::from_vec(random(out, &mut seed), out, &dev)?;
            let ours = sparse_conv2d(
                xv.as_tensor(),
                values.as_tensor(),
                &s,
                (k, k),
                Some(bv.as_tensor()),
                spec,
            )?;
            let theirs =
                crate::conv::conv2d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), spec)?;
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            close(&flat(&ours), &flat(&theirs), &format!("{name} y"));
            let weights =
                Tensor::from_vec(random(ours.elem_count(), &mut seed), ours.shape(), &dev)?;
            let go = (&ours * &weights)?.sum_all()?.backward()?;
            let gt = (&theirs * &weights)?.sum_all()?.backward()?;
            for (what, v) in [("x", &xv), ("bias", &bv)] {
                close(
                    &flat(go.get(v).unwrap()),
                    &flat(gt.get(v).unwrap()),
                    &format!("{name} {what}"),
                );
            }
            let gw = flat(gt.get(&wv).unwrap());
            let want: Vec<f32> = slot_positions(&s).iter().map(|&p| gw[p]).collect();
            close(
                &flat(go.get(&values).unwrap()),
                &want,
                &format!("{name} values"),
            );
            // The dense-gradient variant: the same output and value gradient, plus ∂W dense.
            let d = Var::zeros((out, c, k, k), candle_core::DType::F32, &dev)?;
            let yd = sparse_conv2d_dense_grad(
                xv.as_tensor(),
                values.as_tensor(),
                d.as_tensor(),
                &s,
                (k, k),
                Some(bv.as_tensor()),
                spec,
            )?;
            close(
                &flat(&yd),
                &flat(&theirs),
                &format!("{name} y (dense grad)"),
            );
            let gd = (&yd * &weights)?.sum_all()?.backward()?;
            close(&flat(gd.get(&d).unwrap()), &gw, &format!("{name} dense ∂W"));
            close(
                &flat(gd.get(&values).unwrap()),
                &want,
                &format!("{name} values (dense grad)"),
            );
            // A first layer's data gets no gradient computed.
            let x = xv.as_tensor().detach();
            let g = sparse_conv2d(&x, values.as_tensor(), &s, (k, k), None, spec)?
                .sum_all()?
                .backward()?;
            assert!(g.get(&x).is_none());
            assert!(g.get(&values).is_some());
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors_naming_what_is_wrong() {
        let mut seed = 5u64;
        let (_, s, _, _) = layouts(4, 18, 3, 9, &mut seed).remove(0);
        let v = values_of(&s);
        let x = vec![0f32; 2 * 5 * 5];
        let grouped = SparseConvShape {
            x: [1, 2, 5, 5],
            kernel: (3, 3),
            spec: ConvSpec {
                groups: 2,
                ..ConvSpec::default()
            },
        };
        let e = conv_forward(s.weight(), &v, None, &x, grouped, Exec::default()).unwrap_err();
        assert!(e.to_string().contains("groups = 2"), "{e}");
        let wrong_fan_in = SparseConvShape {
            x: [1, 2, 5, 5],
            kernel: (2, 2),
            spec: ConvSpec::default(),
        };
        let e = conv_forward(s.weight(), &v, None, &x, wrong_fan_in, Exec::default()).unwrap_err();
        assert!(e.to_string().contains("fan-in is 18"), "{e}");
        let ok = SparseConvShape {
            x: [1, 2, 5, 5],
            kernel: (3, 3),
            spec: ConvSpec::default(),
        };
        let e = conv_forward(s.weight(), &v, None, &x[1..], ok, Exec::default()).unwrap_err();
        assert!(e.to_string().contains("`x`"), "{e}");
        assert_eq!(ok.output(&s.weight()).unwrap(), [1, 4, 3, 3]);
    }
}
