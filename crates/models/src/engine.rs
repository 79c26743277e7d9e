//! The sparse training engine: a linear layer whose weight lives in a sparse layout (condensed
//! when every active row has the same fan-in, as SRigL's; CSR otherwise) between mask updates,
//! so forward, input gradient and value gradient run on the sparse-kernels kernels and the
//! dense weight gradient is never formed — except at the steps that need it (mask updates),
//! where the backward pass adds the one dense product `gyᵀ·x` for the dense variable.
//!
//! The dense variable (the dst-core `SparseParam`) stays the layer's identity: the sparsifier
//! reads and writes it at mask updates, checkpoints store it, and it is refreshed from the
//! stored values whenever it is read ([`EngineLayer::scatter`]). The optimizer manages the
//! stored values instead, with its state re-laid out at every mask update (kept weights keep
//! their state, grown weights start at zero — the same as the dense-mask engine's masking).

use std::sync::{Arc, RwLock};

use candle_core::{Module, Tensor, Var};
use dst_core::SparseParam;
use sparse_formats::{Condensed, Csr, Mask};
use sparse_kernels::ops::{sparse_linear, sparse_linear_dense_grad, SparseStructure};

struct Sparse {
    values: Var,
    structure: SparseStructure,
    /// Flat `r · fan_in + c` position of each stored value.
    positions: Vec<usize>,
}

struct Inner {
    sparse: Option<Sparse>,
    /// Run the next forward passes densely (a mask-update step).
    dense_step: bool,
}

/// A linear layer trained in sparse storage (see the module documentation).
#[derive(Clone)]
pub struct EngineLayer {
    param: SparseParam,
    bias: Option<Var>,
    inner: Arc<RwLock<Inner>>,
}

/// A dense row-major vector of `len` entries holding `values` at `positions`, 0 elsewhere.
fn scatter_vec(positions: &[usize], values: Vec<f32>, len: usize) -> Vec<f32> {
    let mut dense = vec![0.0f32; len];
    for (&p, v) in positions.iter().zip(values) {
        dense[p] = v;
    }
    dense
}

fn positions_of(mask: &Mask) -> Vec<usize> {
    let f = mask.fan_in();
    (0..mask.rows())
        .flat_map(|r| mask.row_indices(r).map(move |c| r * f + c))
        .collect()
}

impl EngineLayer {
    /// Wraps a dst-core linear weight; it runs densely until [`EngineLayer::compress`].
    pub fn new(param: SparseParam, bias: Option<Var>) -> Self {
        EngineLayer {
            param,
            bias,
            inner: Arc::new(RwLock::new(Inner {
                sparse: None,
                dense_step: false,
            })),
        }
    }

    /// The dense weight (the sparsifier's handle).
    pub fn param(&self) -> &SparseParam {
        &self.param
    }

    /// The stored values the optimizer trains, once compressed.
    pub fn values(&self) -> Option<Var> {
        self.read().sparse.as_ref().map(|s| s.values.clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().expect("engine lock")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().expect("engine lock")
    }

    /// Lays the dense weight's active entries (its current mask) out in sparse storage and
    /// returns the new values variable; `old_state` (the optimizer state of the previous values,
    /// if any) is re-laid out alongside: entries still active keep theirs, new ones start at 0.
    pub fn compress(&self, old_state: &[Tensor]) -> candle_core::Result<(Var, Vec<Tensor>)> {
        let mask = self.param.mask();
        let (rows, fan_in) = (mask.rows(), mask.fan_in());
        let w = self.param.weights().map_err(candle_core::Error::wrap)?;
        let structure = match Condensed::from_dense(rows, fan_in, &w, &mask, None) {
            Ok(c) => SparseStructure::from(c),
            Err(_) => SparseStructure::from(
                Csr::from_dense(rows, fan_in, &w, &mask).map_err(candle_core::Error::wrap)?,
            ),
        };
        let positions = positions_of(&mask);
        let dev = self.param.var().device().clone();
        let vals: Vec<f32> = positions.iter().map(|&p| w[p]).collect();
        let values = Var::from_tensor(&Tensor::from_vec(vals, positions.len(), &dev)?)?;
        let mut inner = self.write();
        let new_state = old_state
            .iter()
            .map(|s| {
                let old = inner.sparse.as_ref().map_or(&[][..], |o| &o.positions[..]);
                let dense = scatter_vec(old, s.to_vec1::<f32>()?, rows * fan_in);
                let v: Vec<f32> = positions.iter().map(|&p| dense[p]).collect();
                Tensor::from_vec(v, positions.len(), &dev)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        inner.sparse = Some(Sparse {
            values: values.clone(),
            structure,
            positions,
        });
        Ok((values, new_state))
    }

    /// Writes the stored values into the dense weight (inactive entries 0).
    pub fn scatter(&self) -> candle_core::Result<()> {
        let inner = self.read();
        let Some(s) = &inner.sparse else {
            return Ok(());
        };
        let shape = self.param.var().shape().clone();
        let values = s.values.as_tensor().to_vec1::<f32>()?;
        let dense = scatter_vec(&s.positions, values, shape.elem_count());
        self.param
            .var()
            .set(&Tensor::from_vec(dense, shape, self.param.var().device())?)
    }

    /// Optimizer state laid out densely (for checkpoints), from the values' state.
    pub fn dense_state(&self, state: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
        let inner = self.read();
        let Some(s) = &inner.sparse else {
            return Ok(Vec::new());
        };
        let shape = self.param.var().shape().clone();
        state
            .iter()
            .map(|t| {
                let dense = scatter_vec(&s.positions, t.to_vec1::<f32>()?, shape.elem_count());
                Tensor::from_vec(dense, shape.clone(), self.param.var().device())
            })
            .collect()
    }

    /// The values' optimizer state from a dense one (when resuming).
    pub fn gather_state(&self, dense: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
        let inner = self.read();
        let Some(s) = &inner.sparse else {
            return Ok(Vec::new());
        };
        dense
            .iter()
            .map(|t| {
                let d = t.flatten_all()?.to_vec1::<f32>()?;
                let v: Vec<f32> = s.positions.iter().map(|&p| d[p]).collect();
                Tensor::from_vec(v, s.positions.len(), t.device())
            })
            .collect()
    }

    /// Makes the next forward passes also hand the dense weight gradient `gyᵀ·x` to the dense
    /// variable in their backward pass (a mask-update step); forward, input gradient and value
    /// gradient stay sparse.
    pub fn begin_dense_step(&self) {
        self.write().dense_step = true;
    }

    /// After the backward pass of a dense-gradient step: back to plain sparse passes. The dense
    /// gradient stays in the gradient store for the mask update.
    pub fn end_dense_step(&self) {
        self.write().dense_step = false;
    }
}

impl Module for EngineLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let inner = self.read();
        let bias = self.bias.as_ref().map(|b| b.as_tensor());
        match (&inner.sparse, inner.dense_step) {
            (Some(s), false) => sparse_linear(x, s.values.as_tensor(), &s.structure, bias),
            (Some(s), true) => sparse_linear_dense_grad(
                x,
                s.values.as_tensor(),
                self.param.var().as_tensor(),
                &s.structure,
                bias,
            ),
            (None, _) => {
                let y = x.broadcast_matmul(&self.param.var().as_tensor().t()?)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}
