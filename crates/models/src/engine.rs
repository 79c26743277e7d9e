//! Storage engines: how the weights of a run are stored and trained, behind one type,
//! [`Engine`], which owns the optimizer, the sparse storage, its re-layout at mask updates, the
//! dense sync, and the optimizer state's re-layout.
//!
//! - **dense-mask**: every weight is a dense variable multiplied by its mask (as every public
//!   implementation does); the engine then holds no [`EngineLayer`] and only forwards to the
//!   optimizer.
//! - **sparse**: a linear or conv layer's weight lives in a sparse layout (condensed when every
//!   active row has the same fan-in, as SRigL's; CSR otherwise) between mask updates, so forward,
//!   input gradient and value gradient run on the sparse-kernels kernels
//!   (`sparse_kernels::ops::sparse_linear`, `sparse_kernels::sparse_conv::sparse_conv2d`: a conv
//!   weight's rows are its filters, its fan-in `in · kh · kw`) and the dense weight gradient is
//!   never formed — except at the steps that need it (mask updates), where the backward pass
//!   adds the one dense weight-gradient product for the dense variable.
//!
//! The dense variable (the dst-core `SparseParam`) stays the layer's identity: the sparsifier
//! reads and writes it at mask updates, checkpoints store it, and it is refreshed from the
//! stored values whenever it is read ([`Engine::sync_dense`]). The optimizer manages the stored
//! values instead, with its state re-laid out at every mask update (kept weights keep their
//! state, grown weights start at zero — the same as the dense-mask engine's masking).

use std::sync::{Arc, RwLock};

use candle_core::backprop::GradStore;
use candle_core::{Module, Tensor, TensorId, Var};
use dst_core::optim::{MaskAware, OptimizerConfig};
use dst_core::{SparseParam, Sparsify};
use rayon::prelude::*;
use sparse_formats::{Condensed, Csr};
use sparse_kernels::conv::ConvSpec;
use sparse_kernels::ops::{sparse_linear, sparse_linear_dense_grad, SparseStructure};
use sparse_kernels::sparse_conv::{sparse_conv2d, sparse_conv2d_dense_grad};
use sparse_kernels::storage::{with_f32, write_in_place};

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

/// The shape of a conv layer's kernel and its settings (`groups` is 1).
#[derive(Debug, Clone, Copy)]
struct Conv {
    kernel: (usize, usize),
    spec: ConvSpec,
}

/// A linear or conv layer trained in sparse storage (see the module documentation).
#[derive(Clone)]
pub struct EngineLayer {
    param: SparseParam,
    bias: Option<Var>,
    /// `None` for a linear layer.
    conv: Option<Conv>,
    inner: Arc<RwLock<Inner>>,
}

/// A dense row-major vector of `len` entries holding `values` at `positions`, 0 elsewhere.
fn scatter_vec(positions: &[usize], values: &[f32], len: usize) -> Vec<f32> {
    let mut dense = vec![0.0f32; len];
    scatter_into(&mut dense, positions, values);
    dense
}

/// Writes `values` at `positions` of `dense` and 0 everywhere else.
fn scatter_into(dense: &mut [f32], positions: &[usize], values: &[f32]) {
    dense.fill(0.0);
    for (&p, &v) in positions.iter().zip(values) {
        dense[p] = v;
    }
}

/// For each of the ascending positions `new`, its index in the ascending positions `old`, or
/// [`NEW_ENTRY`]: one merge of the two lists — O(stored values), not O(dense size).
///
/// Each step of the merge advances past the smaller head (both when equal) by adding the
/// comparisons, and stores the current new entry's answer unconditionally (the last store for
/// an entry is made in the step that leaves it): no branch on the comparisons, which an
/// update's scattered drops and growths would mispredict.
fn relayout_map(old: &[usize], new: &[usize]) -> Vec<u32> {
    let mut out = vec![NEW_ENTRY; new.len()];
    let (mut i, mut j) = (0, 0);
    while i < new.len() && j < old.len() {
        let (p, q) = (new[i], old[j]);
        out[i] = if p == q { j as u32 } else { NEW_ENTRY };
        i += (p <= q) as usize;
        j += (q <= p) as usize;
    }
    out
}

/// An entry of [`relayout_map`] that was not in the old layout.
const NEW_ENTRY: u32 = u32::MAX;

/// Values laid out at the old positions, re-laid out by a [`relayout_map`]: an entry in both
/// layouts keeps its value, a new one gets 0.
fn relayout_values(map: &[u32], values: &[f32]) -> Vec<f32> {
    let Some(last) = values.len().checked_sub(1) else {
        return vec![0.0; map.len()];
    };
    // A clamped read and a select rather than a branch per entry.
    map.iter()
        .map(|&j| {
            let v = values[(j as usize).min(last)];
            if j == NEW_ENTRY {
                0.0
            } else {
                v
            }
        })
        .collect()
}

impl EngineLayer {
    /// Wraps a dst-core linear weight `[rows, fan_in]`; it runs densely until
    /// [`EngineLayer::compress`].
    pub fn new(param: SparseParam, bias: Option<Var>) -> Self {
        EngineLayer {
            param,
            bias,
            conv: None,
            inner: Arc::new(RwLock::new(Inner {
                sparse: None,
                dense_step: false,
            })),
        }
    }

    /// Wraps a dst-core conv weight `[out, in, kh, kw]` with its settings; it runs densely (the
    /// GEMM convolution) until [`EngineLayer::compress`]. Fails for grouped convolutions, which
    /// the sparse convolution does not cover (build those as dst-core conv layers).
    pub fn conv(param: SparseParam, bias: Option<Var>, spec: ConvSpec) -> dst_core::Result<Self> {
        let shape = param.shape();
        let [_, _, kh, kw] = shape[..] else {
            return Err(dst_core::DstError::Config {
                field: "conv weight",
                reason: format!(
                    "`{}` has shape {shape:?}, expected [out, in, kh, kw]",
                    param.name()
                ),
            });
        };
        if spec.groups != 1 {
            return Err(dst_core::DstError::Config {
                field: "conv groups",
                reason: format!(
                    "`{}`: the sparse engine runs convolutions with groups = 1, got {}",
                    param.name(),
                    spec.groups
                ),
            });
        }
        let mut layer = EngineLayer::new(param, bias);
        layer.conv = Some(Conv {
            kernel: (kh, kw),
            spec,
        });
        Ok(layer)
    }

    /// The dense weight (the sparsifier's handle).
    pub fn param(&self) -> &SparseParam {
        &self.param
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
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
        self.lay_out(old_state, false)
    }

    /// [`EngineLayer::compress`] right after a mask update ([`Engine::relayout`]), with the
    /// values taken from the old layout by the same merge as the state — kept entries keep
    /// theirs, new ones start at 0, which is what the update did to the dense weight — instead
    /// of reading the dense weight. The stored values must be the current weights (they are
    /// between the optimizer step and the next update; after a checkpoint restore, which writes
    /// the dense weight, [`Engine::reload`] lays out with `compress`).
    pub fn relayout(&self, old_state: &[Tensor]) -> candle_core::Result<(Var, Vec<Tensor>)> {
        self.lay_out(old_state, true)
    }

    fn lay_out(
        &self,
        old_state: &[Tensor],
        values_from_old: bool,
    ) -> candle_core::Result<(Var, Vec<Tensor>)> {
        let (rows, fan_in) = (self.param.rows(), self.param.fan_in());
        let positions = self.param.positions();
        let mut inner = self.write();
        let old = inner.sparse.as_ref().map_or(&[][..], |o| &o.positions[..]);
        let map = relayout_map(old, &positions);
        let vals = match &inner.sparse {
            Some(o) if values_from_old => {
                with_f32(o.values.as_tensor(), |v| relayout_values(&map, v))?
            }
            // The dense weight is read in place at the positions, O(stored values), not from
            // another scan of the mask.
            _ => with_f32(self.param.var().as_tensor(), |w| {
                positions.iter().map(|&p| w[p]).collect::<Vec<f32>>()
            })?,
        };
        let structure =
            match Condensed::from_positions(rows, fan_in, &positions, vals.clone(), None) {
                Ok(c) => SparseStructure::from(c),
                Err(_) => SparseStructure::from(
                    Csr::from_positions(rows, fan_in, &positions, vals.clone())
                        .map_err(candle_core::Error::wrap)?,
                ),
            };
        let dev = self.param.var().device().clone();
        let values = Var::from_vec(vals, positions.len(), &dev)?;
        let new_state = old_state
            .iter()
            .map(|s| {
                let v = with_f32(s, |s| relayout_values(&map, s))?;
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

    /// Puts a given sparse layout in place (inference from a model file: the layout the file
    /// stores, N:M included): `values` in the structure's storage order, the dense weight and
    /// its mask already set to the same weights. Forward passes then run on the sparse kernels.
    pub fn install(&self, structure: SparseStructure, values: Vec<f32>) -> candle_core::Result<()> {
        let positions = self.param.positions();
        if positions.len() != values.len() {
            candle_core::bail!(
                "layer `{}`: {} stored values for a mask of {} active entries",
                self.param.name(),
                values.len(),
                positions.len()
            );
        }
        let dev = self.param.var().device().clone();
        let n = values.len();
        let values = Var::from_vec(values, n, &dev)?;
        self.write().sparse = Some(Sparse {
            values,
            structure,
            positions,
        });
        Ok(())
    }

    /// Writes the stored values into the dense weight (inactive entries 0).
    pub fn scatter(&self) -> candle_core::Result<()> {
        let inner = self.read();
        let Some(s) = &inner.sparse else {
            return Ok(());
        };
        let var = self.param.var();
        let values = s.values.as_tensor();
        // In place where the variable allows it (contiguous f32 on the CPU): no dense
        // temporary, no copy.
        let mut result = Ok(());
        let written = write_in_place(var.as_tensor(), |dense| {
            result = with_f32(values, |v| scatter_into(dense, &s.positions, v));
        })?;
        if written {
            return result;
        }
        let dense = scatter_vec(&s.positions, &values.to_vec1::<f32>()?, var.elem_count());
        var.set(&Tensor::from_vec(dense, var.shape(), var.device())?)
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
                let dense = scatter_vec(&s.positions, &t.to_vec1::<f32>()?, shape.elem_count());
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
        let dense = self.param.var().as_tensor();
        match (&inner.sparse, inner.dense_step, self.conv) {
            (Some(s), false, None) => sparse_linear(x, s.values.as_tensor(), &s.structure, bias),
            (Some(s), true, None) => {
                sparse_linear_dense_grad(x, s.values.as_tensor(), dense, &s.structure, bias)
            }
            (None, _, None) => sparse_kernels::dense::linear(x, dense, bias),
            (Some(s), false, Some(c)) => sparse_conv2d(
                x,
                s.values.as_tensor(),
                &s.structure,
                c.kernel,
                bias,
                c.spec,
            ),
            (Some(s), true, Some(c)) => sparse_conv2d_dense_grad(
                x,
                s.values.as_tensor(),
                dense,
                &s.structure,
                c.kernel,
                bias,
                c.spec,
            ),
            (None, _, Some(c)) => sparse_kernels::conv::conv2d(x, dense, bias, c.spec),
        }
    }
}

/// The densest a layer's mask may be for the sparse engine to keep the layer in sparse storage;
/// denser layers of a sparse-engine run stay dense weights with their masks applied (the
/// dense-mask path, GEMM products). Measured on the development machine (docs/benchmarks.md,
/// "Sparse engine on conv nets", the kernel bench's `--op sparse-conv`): a 3×3 conv's forward
/// and backward on the sparse kernels against the GEMM conv on `gemm`'s AVX-512 kernels (an
/// AVX-512 CPU) is 3.0–3.2× faster at density 0.1, 1.2–1.6× at 0.3, 0.96–1.22× at 0.4 and
/// 0.81–1.09× at 0.5 on one thread, 1.7–2.6× / 1.1–1.3× / 0.88–1.07× / 0.77–0.90× on two: 0.3
/// keeps every sparse layer on the winning side; a linear layer's batched kernels beat the
/// GEMM below density ≈ 0.4 ("Reading the targets"). SRigL and RigL keep each layer's density
/// fixed, so the choice made when the run starts holds for the whole run.
pub const MAX_SPARSE_DENSITY: f64 = 0.3;

/// Whether a weight with `nnz` of `len` entries active goes to sparse storage: density at most
/// [`MAX_SPARSE_DENSITY`] (the rule of the sparse engine and of `SparseModel` inference).
pub fn stored_sparse(nnz: usize, len: usize) -> bool {
    nnz as f64 <= MAX_SPARSE_DENSITY * len as f64
}

/// The storage engine of a run (see the module documentation): the optimizer, and the layers
/// kept in sparse storage (none for the dense-mask engine). As a [`MaskAware`] it is the
/// optimizer the method sees: masks of sparse-storage layers are not handed on (their stored
/// values hold exactly the active weights).
pub struct Engine {
    opt: Box<dyn MaskAware + Send>,
    layers: Vec<EngineLayer>,
    /// Layers that go to sparse storage once the method's masks are final (N:M layers).
    deferred: Vec<EngineLayer>,
    /// The dense variables of `layers`, which the optimizer does not manage.
    skip: Vec<TensorId>,
    /// The current step forms the dense weight gradient.
    dense_step: bool,
}

impl Engine {
    /// Builds the engine of a run: of `candidates` (sparse-engine layers; none for the
    /// dense-mask engine), those whose mask under `method` has density at most
    /// [`MAX_SPARSE_DENSITY`] are laid out in sparse storage; the optimizer is built over `vars` (every variable of the model) with those
    /// layers' stored values in place of their dense variables, and is handed the method's masks.
    pub fn new(
        candidates: Vec<EngineLayer>,
        method: &dyn Sparsify,
        vars: Vec<Var>,
        optimizer: &OptimizerConfig,
    ) -> dst_core::Result<Engine> {
        let masks = method.masks();
        let mut layers = Vec::new();
        for e in candidates {
            let sparse = masks
                .iter()
                .any(|(n, m)| n == e.param().name() && stored_sparse(m.nnz(), m.len()));
            if sparse {
                e.compress(&[])?;
                layers.push(e);
            }
        }
        let skip: Vec<TensorId> = layers
            .iter()
            .map(|e| e.param().var().as_tensor().id())
            .collect();
        let mut vars: Vec<Var> = vars
            .into_iter()
            .filter(|v| !skip.contains(&v.as_tensor().id()))
            .collect();
        vars.extend(layers.iter().filter_map(|e| e.values()));
        let mut engine = Engine {
            opt: optimizer.build(vars)?,
            layers,
            deferred: Vec::new(),
            skip,
            dense_step: false,
        };
        method.register(&mut engine)?;
        Ok(engine)
    }

    /// Layers (N:M twins, `LayerFactory::nm_engine`) to lay out in sparse storage once the
    /// method's masks are final ([`Engine::adopt_final_masks`]); until then they train densely
    /// through the method's own layers.
    pub fn defer(&mut self, layers: Vec<EngineLayer>) {
        self.deferred.extend(layers);
    }

    /// Once `method`'s masks are final (`Sparsify::masks_final`), moves the deferred layers
    /// whose mask has density at most [`MAX_SPARSE_DENSITY`] to sparse storage — the stored
    /// values take the optimizer state of the active entries — and drops the rest (they stay
    /// dense with their masks). Returns how many layers moved; a no-op before that, or once
    /// done. Called before every forward pass, so a run resumed after the switch makes it again
    /// at its first step.
    pub fn adopt_final_masks(&mut self, method: &dyn Sparsify) -> dst_core::Result<usize> {
        if self.deferred.is_empty() || !method.masks_final() {
            return Ok(0);
        }
        let masks = method.masks();
        let mut moved = 0;
        for e in std::mem::take(&mut self.deferred) {
            let Some((_, mask)) = masks.iter().find(|(n, _)| n == e.param().name()) else {
                continue;
            };
            if !stored_sparse(mask.nnz(), mask.len()) {
                continue;
            }
            let dense = e.param().var().clone();
            // The twin takes the method's final mask; the weights outside it are zeroed, as
            // every later refresh of the dense weight from the stored values does (the N:M
            // layer that read them is not run again).
            e.param().set(mask.clone(), e.param().weights()?)?;
            let dense_state = self.opt.state(&dense);
            let (values, _) = e.compress(&[])?;
            let state = e.gather_state(&dense_state)?;
            self.opt.replace_var(&dense, values, state)?;
            self.skip.push(dense.as_tensor().id());
            self.layers.push(e);
            moved += 1;
        }
        Ok(moved)
    }

    /// Zeroes the optimizer state of every variable of `vars` it manages and its step count:
    /// the optimizer as freshly built (ASP's fine-tuning phase starts so).
    pub fn reset_state(&mut self, vars: &[Var]) -> dst_core::Result<()> {
        for v in vars {
            if !self.opt.manages(v) {
                continue;
            }
            let zeros = self
                .opt
                .state(v)
                .iter()
                .map(|t| t.zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()?;
            self.opt.set_state(v, zeros)?;
        }
        self.opt.set_steps(0);
        Ok(())
    }

    /// The variables holding the stored values of the sparse-storage layers, in layer order.
    pub fn stored_values(&self) -> Vec<Var> {
        self.layers.iter().filter_map(|e| e.values()).collect()
    }

    /// Layers in sparse storage (0 for the dense-mask engine).
    pub fn sparse_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer_of(&self, var: &Var) -> Option<&EngineLayer> {
        let id = var.as_tensor().id();
        self.layers
            .iter()
            .find(|e| e.param().var().as_tensor().id() == id)
    }

    /// Before the forward pass: `dense_grad` makes this step's backward pass also form the
    /// dense weight gradient of sparse-storage layers (a mask-update step).
    pub fn begin_step(&mut self, dense_grad: bool) {
        self.dense_step = dense_grad && !self.layers.is_empty();
        if self.dense_step {
            for e in &self.layers {
                e.begin_dense_step();
            }
        }
    }

    /// After the backward pass: plain sparse passes again (the dense gradient stays in the
    /// gradient store for the mask update).
    pub fn end_backward(&self) {
        if self.dense_step {
            for e in &self.layers {
                e.end_dense_step();
            }
        }
    }

    /// After the optimizer step of a dense-gradient step: the dense variables take the
    /// post-step weights, which the mask update reads.
    pub fn after_optimizer_step(&self) -> candle_core::Result<()> {
        if self.dense_step {
            self.sync_dense()?;
        }
        Ok(())
    }

    /// Refreshes the dense variables of sparse-storage layers from their stored values.
    pub fn sync_dense(&self) -> candle_core::Result<()> {
        self.layers.par_iter().try_for_each(|e| e.scatter())
    }

    /// After a mask update: lays every sparse-storage layer out for its new mask, moving the
    /// optimizer state along and taking the values from the old layout
    /// ([`EngineLayer::relayout`]: the dense weights are not read).
    pub fn relayout(&mut self) -> dst_core::Result<()> {
        self.lay_out_all(true)
    }

    /// After the dense weights were written (a checkpoint restore): lays every sparse-storage
    /// layer out again from its dense weight and mask ([`EngineLayer::compress`]), moving the
    /// optimizer state along.
    pub fn reload(&mut self) -> dst_core::Result<()> {
        self.lay_out_all(false)
    }

    fn lay_out_all(&mut self, values_from_old: bool) -> dst_core::Result<()> {
        let olds: Vec<(Var, Vec<Tensor>)> = self
            .layers
            .iter()
            .map(|e| {
                let old = e.values().expect("engine layers are compressed");
                let state = self.opt.state(&old);
                (old, state)
            })
            .collect();
        // Layers re-lay out independently (in parallel); the optimizer takes them in order.
        let news = self
            .layers
            .par_iter()
            .zip(&olds)
            .map(|(e, (_, state))| e.lay_out(state, values_from_old))
            .collect::<candle_core::Result<Vec<_>>>()?;
        for ((old, _), (new, new_state)) in olds.iter().zip(news) {
            self.opt.replace_var(old, new, new_state)?;
        }
        Ok(())
    }

    /// The optimizer state of the model variable `var`, laid out like `var` (dense) whichever
    /// engine trains it (for checkpoints).
    pub fn dense_state(&self, var: &Var) -> candle_core::Result<Vec<Tensor>> {
        match self.layer_of(var) {
            Some(e) => e.dense_state(&self.opt.state(&e.values().expect("compressed"))),
            None => Ok(self.opt.state(var)),
        }
    }

    /// How many state tensors the optimizer keeps for the model variable `var`.
    pub fn state_len(&self, var: &Var) -> usize {
        match self.layer_of(var) {
            Some(e) => self.opt.state(&e.values().expect("compressed")).len(),
            None => self.opt.state(var).len(),
        }
    }

    /// Sets the optimizer state of the model variable `var` from a dense layout
    /// ([`Engine::dense_state`]).
    pub fn set_dense_state(&mut self, var: &Var, state: Vec<Tensor>) -> dst_core::Result<()> {
        match self.layer_of(var) {
            Some(e) => {
                let values = e.values().expect("compressed");
                let st = e.gather_state(&state)?;
                self.opt.set_state(&values, st)
            }
            None => self.opt.set_state(var, state),
        }
    }
}

/// The optimizer as the method sees it: masks of sparse-storage layers are not handed on.
impl MaskAware for Engine {
    fn set_mask(&mut self, var: &Var, mask: &Tensor) -> dst_core::Result<()> {
        if self.skip.contains(&var.as_tensor().id()) {
            Ok(())
        } else {
            self.opt.set_mask(var, mask)
        }
    }
    fn state(&self, var: &Var) -> Vec<Tensor> {
        self.opt.state(var)
    }
    fn learning_rate(&self) -> f64 {
        self.opt.learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.opt.set_learning_rate(lr)
    }
    fn step(&mut self, grads: &GradStore) -> dst_core::Result<()> {
        self.opt.step(grads)
    }
    fn set_state(&mut self, var: &Var, state: Vec<Tensor>) -> dst_core::Result<()> {
        self.opt.set_state(var, state)
    }
    fn steps(&self) -> u64 {
        self.opt.steps()
    }
    fn set_steps(&mut self, steps: u64) {
        self.opt.set_steps(steps)
    }
    fn replace_var(&mut self, old: &Var, new: Var, state: Vec<Tensor>) -> dst_core::Result<()> {
        self.opt.replace_var(old, new, state)
    }
    fn manages(&self, var: &Var) -> bool {
        !self.skip.contains(&var.as_tensor().id()) && self.opt.manages(var)
    }
    /// A sparse-storage layer's stored values: the post-step weights at its mask's active
    /// entries in position order ([`EngineLayer::compress`] lays them out from the mask's
    /// positions; the mask changes only at an update, after which the layer is laid out again).
    fn active_weights(&self, var: &Var) -> Option<Tensor> {
        self.layer_of(var)
            .and_then(|e| e.values())
            .map(|v| v.as_tensor().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The merge against a binary search of every new position in the old list, on random
    /// ascending lists with few and many shared entries, and empty ones.
    #[test]
    fn relayout_map_finds_each_kept_position() {
        let mut state = 7u64;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        };
        for case in 0..200 {
            let len = [0u64, 1, 5, 64, 1000][case % 5];
            let density = 1 + next(100);
            let mut list = |d: u64| -> Vec<usize> {
                (0..len)
                    .filter(|_| next(100) < d)
                    .map(|p| p as usize)
                    .collect()
            };
            let (old, new) = (list(density), list(density));
            let want: Vec<u32> = new
                .iter()
                .map(|p| old.binary_search(p).map_or(NEW_ENTRY, |j| j as u32))
                .collect();
            assert_eq!(relayout_map(&old, &new), want, "case {case}");
        }
    }
}
