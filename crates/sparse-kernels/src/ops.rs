//! The kernels as candle custom ops, part of candle's autograd.
//!
//! [`sparse_linear`] computes `y = x · Wᵀ + b` where `W`'s structure is fixed (a
//! [`SparseStructure`]) and its stored values are a tensor (normally a `Var` being trained).
//! The backward pass returns `∂L/∂x` through [`crate::input_grad`] and `∂L/∂values` through
//! [`crate::value_grad`]; the dense weight gradient is never formed.
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::{Device, Tensor, Var};
//! use sparse_formats::{Condensed, Mask};
//! use sparse_kernels::ops::{sparse_linear, SparseStructure};
//!
//! let w = [1.0f32, 0.0, 2.0,
//!          0.0, 3.0, 4.0];
//! let c = Condensed::from_dense(2, 3, &w, &Mask::from_dense(2, 3, &w)?, None)?;
//! let values = Var::new(c.values(), &Device::Cpu)?;
//! let s = SparseStructure::from(c);
//! let x = Tensor::new(&[[1f32, 1.0, 1.0]], &Device::Cpu)?;
//! let y = sparse_linear(&x, values.as_tensor(), &s, None)?;
//! assert_eq!(y.to_vec2::<f32>()?, vec![vec![3.0, 7.0]]);
//! let grads = y.sum_all()?.backward()?;
//! assert_eq!(grads.get(&values).unwrap().to_vec1::<f32>()?, vec![1.0, 1.0, 1.0, 1.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::{Arc, Mutex, Weak};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use sparse_formats::{Condensed, Csr, NmSparse};

use crate::rows::Transposed;
use crate::{Exec, SparseWeight};

/// The fixed structure of a sparse weight (its values are passed separately as a tensor),
/// cheap to clone.
#[derive(Debug, Clone)]
pub enum SparseStructure {
    /// Constant fan-in layout.
    Condensed(Arc<Condensed>),
    /// N:M layout.
    Nm(Arc<NmSparse>),
    /// CSR layout.
    Csr(Arc<Csr>),
}

impl From<Condensed> for SparseStructure {
    fn from(w: Condensed) -> Self {
        SparseStructure::Condensed(Arc::new(w))
    }
}
impl From<NmSparse> for SparseStructure {
    fn from(w: NmSparse) -> Self {
        SparseStructure::Nm(Arc::new(w))
    }
}
impl From<Csr> for SparseStructure {
    fn from(w: Csr) -> Self {
        SparseStructure::Csr(Arc::new(w))
    }
}

impl SparseStructure {
    /// The structure's transpose for the batched input gradient, built on first use and kept
    /// while the structure lives (a sparse-engine layer keeps one structure from one mask
    /// update to the next, so a training step does not rebuild it).
    fn transposed(&self) -> Arc<Transposed> {
        static CACHE: Mutex<Vec<(WeakStructure, Arc<Transposed>)>> = Mutex::new(Vec::new());
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(w, _)| w.alive());
        if let Some((_, t)) = cache.iter().find(|(w, _)| w.is(self)) {
            return t.clone();
        }
        let t = Arc::new(Transposed::of(self.weight()));
        cache.push((self.downgrade(), t.clone()));
        t
    }

    fn downgrade(&self) -> WeakStructure {
        match self {
            SparseStructure::Condensed(w) => WeakStructure::Condensed(Arc::downgrade(w)),
            SparseStructure::Nm(w) => WeakStructure::Nm(Arc::downgrade(w)),
            SparseStructure::Csr(w) => WeakStructure::Csr(Arc::downgrade(w)),
        }
    }

    /// A borrowed view for the slice kernels.
    pub fn weight(&self) -> SparseWeight<'_> {
        match self {
            SparseStructure::Condensed(w) => SparseWeight::Condensed(w),
            SparseStructure::Nm(w) => SparseWeight::Nm(w),
            SparseStructure::Csr(w) => SparseWeight::Csr(w),
        }
    }
}

/// A cache key: the structure's allocation, kept from being reused while the key exists (a
/// `Weak` holds the allocation), so equal pointers mean the same structure.
enum WeakStructure {
    Condensed(Weak<Condensed>),
    Nm(Weak<NmSparse>),
    Csr(Weak<Csr>),
}

impl WeakStructure {
    fn alive(&self) -> bool {
        match self {
            WeakStructure::Condensed(w) => w.strong_count() > 0,
            WeakStructure::Nm(w) => w.strong_count() > 0,
            WeakStructure::Csr(w) => w.strong_count() > 0,
        }
    }

    fn is(&self, s: &SparseStructure) -> bool {
        match (self, s) {
            (WeakStructure::Condensed(w), SparseStructure::Condensed(a)) => {
                std::ptr::eq(w.as_ptr(), Arc::as_ptr(a))
            }
            (WeakStructure::Nm(w), SparseStructure::Nm(a)) => {
                std::ptr::eq(w.as_ptr(), Arc::as_ptr(a))
            }
            (WeakStructure::Csr(w), SparseStructure::Csr(a)) => {
                std::ptr::eq(w.as_ptr(), Arc::as_ptr(a))
            }
            _ => false,
        }
    }
}

/// `y = x · Wᵀ + bias` with autograd for `x`, `values` and `bias`.
///
/// `x` has shape `[..., fan_in]` (any number of leading dimensions), `values` holds the
/// structure's `nnz` stored values (any shape), `bias` has shape `[rows]`. f32 on the CPU.
pub fn sparse_linear(
    x: &Tensor,
    values: &Tensor,
    structure: &SparseStructure,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    sparse_linear_with(x, values, structure, bias, Exec::default())
}

/// [`sparse_linear`] with an explicit thread count / instruction set.
pub fn sparse_linear_with(
    x: &Tensor,
    values: &Tensor,
    structure: &SparseStructure,
    bias: Option<&Tensor>,
    exec: Exec,
) -> Result<Tensor> {
    let op = Forward {
        structure: structure.clone(),
        exec,
    };
    match bias {
        // A `[rows]` f32 CPU bias goes into the op: the forward starts each output row from
        // it, and the backward sums its gradient in one pass over `∂y` (candle's
        // `broadcast_add` took a pass and a tensor forward and a strided reduction backward).
        Some(b)
            if b.dims() == [structure.weight().rows()]
                && b.dtype() == candle_core::DType::F32
                && b.device().is_cpu() =>
        {
            let b = b.contiguous()?;
            linear_shape(x, structure, None, |x2| {
                x2.apply_op3(values, &b, ForwardBias(op))
            })
        }
        _ => linear_shape(x, structure, bias, |x2| x2.apply_op2(values, op)),
    }
}

/// [`sparse_linear`] that also hands the dense weight gradient `∂L/∂W = gyᵀ·x` to `dense`, a
/// `[rows, fan_in]` tensor (typically a `Var`) whose values the forward pass does not read.
///
/// For the steps of sparse training that need the dense gradient (a RigL/SRigL mask update):
/// forward, input gradient and value gradient stay on the sparse kernels, and the backward
/// pass adds one dense product, instead of running the whole step densely.
pub fn sparse_linear_dense_grad(
    x: &Tensor,
    values: &Tensor,
    dense: &Tensor,
    structure: &SparseStructure,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let w = structure.weight();
    if dense.dims() != [w.rows(), w.fan_in()] {
        candle_core::bail!(
            "sparse_linear_dense_grad: the dense weight has shape {:?}, expected [{}, {}]",
            dense.dims(),
            w.rows(),
            w.fan_in()
        );
    }
    let op = ForwardDenseGrad(Forward {
        structure: structure.clone(),
        exec: Exec::default(),
    });
    linear_shape(x, structure, bias, |x2| x2.apply_op3(values, dense, op))
}

/// Checks `x [..., fan_in]`, runs `op` on it flattened to `[batch, fan_in]`, restores the
/// leading dimensions and adds the bias.
fn linear_shape(
    x: &Tensor,
    structure: &SparseStructure,
    bias: Option<&Tensor>,
    op: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let w = structure.weight();
    let dims = x.dims();
    let Some((&fan_in, lead)) = dims.split_last() else {
        candle_core::bail!("sparse_linear: x must have rank ≥ 1, got a scalar");
    };
    if fan_in != w.fan_in() {
        candle_core::bail!(
            "sparse_linear: x has {fan_in} features, the weight's fan-in is {}",
            w.fan_in()
        );
    }
    let batch: usize = lead.iter().product();
    let y = op(&x.reshape((batch, fan_in))?)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(w.rows());
    let y = y.reshape(out_dims)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    crate::contiguous_f32(s, l, "sparse_linear", what)
}

/// The forward op: `(x [batch, fan_in], values) → y [batch, rows]`.
struct Forward {
    structure: SparseStructure,
    exec: Exec,
}

impl Forward {
    /// `y = x · Wᵀ (+ bias)` on the ops' storages.
    fn run(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let w = self.structure.weight();
        let batch = xl.dims()[0];
        let x = f32_slice(xs, xl, "x")?;
        let v = f32_slice(vs, vl, "values")?;
        let y =
            crate::forward(w, v, bias, x, batch, self.exec).map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(y), Shape::from((batch, w.rows()))))
    }
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "sparse-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, vs, vl, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        values: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // No input gradient for data (a first layer): nothing would read it.
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                values,
                &InputGrad {
                    structure: self.structure.clone(),
                    exec: self.exec,
                },
            )?)
        } else {
            None
        };
        let gv = x
            .apply_op2_no_bwd(
                &grad,
                &ValueGrad {
                    structure: self.structure.clone(),
                    exec: self.exec,
                },
            )?
            .reshape(values.shape())?;
        Ok((gx, Some(gv)))
    }
}

/// The forward op with the bias as a third input.
struct ForwardBias(Forward);

impl CustomOp3 for ForwardBias {
    fn name(&self) -> &'static str {
        "sparse-linear-bias"
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
        self.0.run(xs, xl, vs, vl, Some(f32_slice(bs, bl, "bias")?))
    }

    fn bwd(
        &self,
        x: &Tensor,
        values: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gv) = self.0.bwd(x, values, res, grad)?;
        let gb = grad
            .contiguous()?
            .apply_op1_no_bwd(&crate::dense::BiasGrad)?;
        Ok((gx, gv, Some(gb)))
    }
}

/// The forward op with a third input, the dense weight, which only receives a gradient.
struct ForwardDenseGrad(Forward);

impl CustomOp3 for ForwardDenseGrad {
    fn name(&self) -> &'static str {
        "sparse-linear-dense-grad"
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
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gv) = self.0.bwd(x, values, res, grad)?;
        let gd = crate::dense::weight_grad(grad, x, Exec::default())?.reshape(dense.shape())?;
        Ok((gx, gv, Some(gd)))
    }
}

/// `(grad_y [batch, rows], values) → grad_x [batch, fan_in]`.
struct InputGrad {
    structure: SparseStructure,
    exec: Exec,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "sparse-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let w = self.structure.weight();
        let batch = gl.dims()[0];
        let gy = f32_slice(gs, gl, "grad_y")?;
        let v = f32_slice(vs, vl, "values")?;
        // Where the product gathers, over the structure's kept transpose.
        let t =
            crate::cpu::gathers(batch, w.rows(), w.fan_in()).then(|| self.structure.transposed());
        let gx = crate::cpu::input_grad_with(w, t.as_deref(), v, gy, batch, self.exec)
            .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(gx), Shape::from((batch, w.fan_in()))))
    }
}

/// `(x [batch, fan_in], grad_y [batch, rows]) → grad_values [nnz]`.
struct ValueGrad {
    structure: SparseStructure,
    exec: Exec,
}

impl CustomOp2 for ValueGrad {
    fn name(&self) -> &'static str {
        "sparse-linear-value-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let w = self.structure.weight();
        let batch = xl.dims()[0];
        let x = f32_slice(xs, xl, "x")?;
        let gy = f32_slice(gs, gl, "grad_y")?;
        let gv = crate::value_grad(w, x, gy, batch, self.exec).map_err(candle_core::Error::wrap)?;
        let n = gv.len();
        Ok((CpuStorage::F32(gv), Shape::from(n)))
    }
}
