//! Mask-aware optimizers: SGD (momentum, Nesterov, weight decay) and AdamW.
//!
//! candle-nn's `SGD` has no momentum, Nesterov or weight decay, and neither of its optimizers
//! knows about masks. Here every weight registered with a mask ([`MaskAware::set_mask`]) has
//! its gradient masked before the update, and after every step both the weight and its
//! optimizer state (momentum buffer; Adam's first and second moments) are multiplied by the
//! mask, so inactive weights and their state stay exactly zero and a weight grown at a mask
//! update starts from zero state (docs/algorithms.md §4.2 — the SRigL reference
//! resets only SGD momentum, not Adam's moments).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// An optimizer that keeps masked weights and their state at zero.
pub trait MaskAware {
    /// Sets (or replaces) the 0/1 mask of `var` (same shape) and zeroes its state where the mask
    /// is 0.
    fn set_mask(&mut self, var: &Var, mask: &Tensor) -> Result<()>;
    /// The optimizer state tensors of `var` (for checks and checkpoints).
    fn state(&self, var: &Var) -> Vec<Tensor>;
    /// Current learning rate.
    fn learning_rate(&self) -> f64;
    /// Changes the learning rate (schedules).
    fn set_learning_rate(&mut self, lr: f64);
    /// One update from the gradients of a backward pass.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// Replaces the state tensors of `var` (a checkpoint's [`MaskAware::state`]); their number
    /// and shapes must match. The mask, if any, is applied to them.
    fn set_state(&mut self, var: &Var, state: Vec<Tensor>) -> Result<()>;
    /// Optimizer steps taken so far (AdamW's bias correction depends on it).
    fn steps(&self) -> u64;
    /// Sets the step counter (when resuming from a checkpoint).
    fn set_steps(&mut self, steps: u64);
    /// Replaces the managed variable `old` by `new` (another shape allowed) with the given
    /// state (for a sparse-storage engine whose stored values are re-laid out at a mask
    /// update); `new` starts without a mask.
    fn replace_var(&mut self, old: &Var, new: Var, state: Vec<Tensor>) -> Result<()>;
    /// Whether [`MaskAware::set_mask`] for `var` has any effect (a wrapper that leaves some
    /// variables to another mechanism says no, and the caller can skip building their mask).
    fn manages(&self, var: &Var) -> bool {
        let _ = var;
        true
    }
    /// The weights of `var` at its mask's active entries in position order, where this
    /// optimizer trains them so (a sparse-storage engine's stored values), else `None` (the
    /// default). A mask update reads them instead of scanning the dense weight
    /// ([`UpdateInput::active_weights`](crate::UpdateInput::active_weights)), and leaves the
    /// dense weight alone when it changes the mask: an optimizer that says `Some` lays its
    /// values out for the new mask itself (kept entries keep theirs, new ones start at 0) and
    /// refreshes the dense weight from them before anyone reads it.
    fn active_weights(&self, var: &Var) -> Option<Tensor> {
        let _ = var;
        None
    }
}

struct Slot {
    var: Var,
    mask: Option<Tensor>,
    state: Vec<Tensor>,
}

fn slots(vars: Vec<Var>, n_state: usize) -> Result<Vec<Slot>> {
    vars.into_iter()
        .map(|var| {
            let state = (0..n_state)
                .map(|_| var.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Slot {
                var,
                mask: None,
                state,
            })
        })
        .collect()
}

fn find(slots: &mut [Slot], id: TensorId) -> Option<&mut Slot> {
    slots.iter_mut().find(|s| s.var.as_tensor().id() == id)
}

fn state_of(slots: &[Slot], var: &Var) -> Vec<Tensor> {
    slots
        .iter()
        .find(|s| s.var.as_tensor().id() == var.as_tensor().id())
        // Copies: the SGD step updates its buffers in place.
        .map(|s| {
            s.state
                .iter()
                .map(|t| t.copy())
                .collect::<candle_core::Result<_>>()
        })
        .transpose()
        .ok()
        .flatten()
        .unwrap_or_default()
}

fn set_state_in(slots: &mut [Slot], var: &Var, state: Vec<Tensor>) -> Result<()> {
    let Some(slot) = find(slots, var.as_tensor().id()) else {
        return Err(crate::error::DstError::Config {
            field: "state",
            reason: "the variable is not managed by this optimizer".into(),
        });
    };
    if state.len() != slot.state.len() || state.iter().any(|t| t.dims() != var.dims()) {
        return Err(crate::error::DstError::Config {
            field: "state",
            reason: format!(
                "expected {} tensors of shape {:?}, got {:?}",
                slot.state.len(),
                var.dims(),
                state.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>()
            ),
        });
    }
    slot.state = state
        .into_iter()
        .map(|t| {
            // A copy: the SGD step updates its buffers in place, never the caller's tensor.
            let t = t.to_dtype(var.dtype())?.detach().copy()?;
            match &slot.mask {
                Some(m) => t * m,
                None => Ok(t),
            }
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(())
}

fn replace_in(slots: &mut [Slot], old: &Var, new: Var, state: Vec<Tensor>) -> Result<()> {
    let Some(slot) = find(slots, old.as_tensor().id()) else {
        return Err(crate::error::DstError::Config {
            field: "replace_var",
            reason: "the variable is not managed by this optimizer".into(),
        });
    };
    if state.len() != slot.state.len() || state.iter().any(|t| t.dims() != new.dims()) {
        return Err(crate::error::DstError::Config {
            field: "replace_var",
            reason: format!(
                "expected {} state tensors of shape {:?}",
                slot.state.len(),
                new.dims()
            ),
        });
    }
    *slot = Slot {
        var: new,
        mask: None,
        // Copies: the SGD step updates its buffers in place, never the caller's tensors.
        state: state
            .into_iter()
            .map(|t| t.detach().copy())
            .collect::<candle_core::Result<_>>()?,
    };
    Ok(())
}

fn set_mask_in(slots: &mut [Slot], var: &Var, mask: &Tensor) -> Result<()> {
    let Some(slot) = find(slots, var.as_tensor().id()) else {
        return Err(crate::error::DstError::Config {
            field: "mask",
            reason: "the variable is not managed by this optimizer".into(),
        });
    };
    let mask = mask.to_dtype(var.dtype())?.reshape(var.shape())?;
    for s in &mut slot.state {
        *s = (&*s * &mask)?;
    }
    slot.mask = Some(mask);
    Ok(())
}

/// Settings of [`MaskedSgd`] (PyTorch semantics: coupled weight decay, dampening 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum μ (0 = plain SGD).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-4,
        }
    }
}

/// Mask-aware SGD with momentum, Nesterov and weight decay.
///
/// Per step, for each variable with a gradient `g` and mask `M` (all ones if none):
/// `d = g⊙M + λ·w`; `b = μ·b + d`; `d = d + μ·b` (Nesterov) or `d = b`; `w = (w − lr·d)⊙M`;
/// `b = b⊙M`.
pub struct MaskedSgd {
    slots: Vec<Slot>,
    cfg: SgdConfig,
    t: u64,
}

impl MaskedSgd {
    /// An optimizer over `vars` (weights, biases, ...). Masks are added with
    /// [`MaskAware::set_mask`].
    pub fn new(vars: Vec<Var>, cfg: SgdConfig) -> Result<Self> {
        let n_state = usize::from(cfg.momentum != 0.0);
        Ok(MaskedSgd {
            slots: slots(vars, n_state)?,
            cfg,
            t: 0,
        })
    }
}

impl MaskAware for MaskedSgd {
    fn set_mask(&mut self, var: &Var, mask: &Tensor) -> Result<()> {
        set_mask_in(&mut self.slots, var, mask)
    }

    fn state(&self, var: &Var) -> Vec<Tensor> {
        state_of(&self.slots, var)
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    fn set_state(&mut self, var: &Var, state: Vec<Tensor>) -> Result<()> {
        set_state_in(&mut self.slots, var, state)
    }

    fn steps(&self) -> u64 {
        self.t
    }

    fn set_steps(&mut self, steps: u64) {
        self.t = steps;
    }

    fn replace_var(&mut self, old: &Var, new: Var, state: Vec<Tensor>) -> Result<()> {
        replace_in(&mut self.slots, old, new, state)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.var) else {
                continue;
            };
            if !fused::sgd_step(slot, g, c)? {
                tensor_sgd_step(slot, g, c)?;
            }
        }
        Ok(())
    }
}

/// One SGD step of one variable with candle tensor operations (any device and dtype).
fn tensor_sgd_step(slot: &mut Slot, g: &Tensor, c: SgdConfig) -> Result<()> {
    // candle may hand back gradients that still record how they were computed.
    let g = g.detach();
    // Detached: arithmetic with the Var itself would record graph nodes, and the momentum
    // buffers built from them would chain every past step's tensors (a leak of ~6 MB a step on
    // LeNet-300-100, measured).
    let w = slot.var.as_tensor().detach();
    let mut d = match &slot.mask {
        Some(m) => (&g * m)?,
        None => g.clone(),
    };
    if c.weight_decay != 0.0 {
        d = (d + (&w * c.weight_decay)?)?;
    }
    if c.momentum != 0.0 {
        let b = ((&slot.state[0] * c.momentum)? + &d)?;
        d = if c.nesterov {
            (d + (&b * c.momentum)?)?
        } else {
            b.clone()
        };
        slot.state[0] = b;
    }
    let mut new_w = (&w - (d * c.lr)?)?;
    if let Some(m) = &slot.mask {
        new_w = (new_w * m)?;
        for s in &mut slot.state {
            *s = (&*s * m)?;
        }
    }
    slot.var.set(&new_w)?;
    Ok(())
}

/// The SGD step as one in-place pass over contiguous CPU `f32` storage (momentum buffer and
/// weight together; the weight alone without momentum) instead of ~8 tensor operations that
/// each allocate and fill a fresh tensor (a dense or dense-mask training step on the wide MLP
/// ~11–13% faster, and one pass instead of two another ~5–20% on the dense-mask step,
/// docs/benchmarks.md). Every element goes through exactly the operations, in the
/// order and the rounding, of the tensor path above (candle's scalar multiply is
/// `v · (s as f32) + 0`), so both paths give bit-identical weights and state
/// (`fused_step_equals_the_tensor_path`).
mod fused {
    use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};

    use super::{SgdConfig, Slot};
    use crate::error::Result;
    use sparse_kernels::storage::{with_slice, write_in_place};

    /// `v · s` as candle's affine computes it.
    #[inline(always)]
    fn scale(v: f32, s: f32) -> f32 {
        v * s + 0.0
    }

    fn slice_mut<'a>(st: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
        match (st, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
            _ => candle_core::bail!("fused sgd: not contiguous f32 storage"),
        }
    }

    /// The direction before momentum: `g ⊙ m + λ·w` (`MASK`, `WD` say which terms exist).
    #[inline(always)]
    fn direction<const MASK: bool, const WD: bool>(g: f32, m: f32, w: f32, wd: f32) -> f32 {
        let d = if MASK { g * m } else { g };
        if WD {
            d + scale(w, wd)
        } else {
            d
        }
    }

    /// Momentum and weight in one pass: `b ← (μ·b + d) ⊙ m`, then `w ← (w − lr·d') ⊙ m` with
    /// `d'` the Nesterov (`d + μ·b`) or heavy-ball (`b`) direction of the new `b` — per element
    /// the operations of a momentum pass followed by [`weight_loop`]'s, so one read of `w`,
    /// `g`, `m` and `b` instead of two. Slices of equal length (checked by the caller), loops
    /// free of per-element branches so that they vectorise.
    fn both_loop<const MASK: bool, const WD: bool, const NEST: bool>(
        w: &mut [f32],
        b: &mut [f32],
        g: &[f32],
        m: &[f32],
        c: &SgdConfig,
    ) {
        let (mu, wd, lr) = (c.momentum as f32, c.weight_decay as f32, c.lr as f32);
        let n = w.len();
        let (b, g) = (&mut b[..n], &g[..n]);
        let m = if MASK { &m[..n] } else { m };
        for i in 0..n {
            let mi = if MASK { m[i] } else { 1.0 };
            let d = direction::<MASK, WD>(g[i], mi, w[i], wd);
            let nb = scale(b[i], mu) + d;
            let nb = if MASK { nb * mi } else { nb };
            b[i] = nb;
            let d = if NEST { d + scale(nb, mu) } else { nb };
            let nw = w[i] - scale(d, lr);
            w[i] = if MASK { nw * mi } else { nw };
        }
    }

    /// `w ← (w − lr·d') ⊙ m` with `d'` the Nesterov / heavy-ball / plain direction.
    fn weight_loop<const MASK: bool, const WD: bool, const MOM: bool, const NEST: bool>(
        w: &mut [f32],
        g: &[f32],
        m: &[f32],
        b: &[f32],
        c: &SgdConfig,
    ) {
        let (mu, wd, lr) = (c.momentum as f32, c.weight_decay as f32, c.lr as f32);
        let n = w.len();
        let g = &g[..n];
        let m = if MASK { &m[..n] } else { m };
        let b = if MOM { &b[..n] } else { b };
        for i in 0..n {
            let mi = if MASK { m[i] } else { 1.0 };
            let d = direction::<MASK, WD>(g[i], mi, w[i], wd);
            let d = if !MOM {
                d
            } else if NEST {
                d + scale(b[i], mu)
            } else {
                b[i]
            };
            let nw = w[i] - scale(d, lr);
            w[i] = if MASK { nw * mi } else { nw };
        }
    }

    /// Elements per parallel task of a pass (the passes are element-wise, so the result does
    /// not depend on the split).
    const PAR_CHUNK: usize = 1 << 16;

    /// Runs `f(offset, chunk)` over `out` in chunks of [`PAR_CHUNK`], on the current rayon
    /// pool when there is more than one chunk and more than one thread.
    fn for_chunks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync + Send) {
        use rayon::prelude::*;
        if out.len() > PAR_CHUNK && rayon::current_num_threads() > 1 {
            out.par_chunks_mut(PAR_CHUNK)
                .enumerate()
                .for_each(|(i, c)| f(i * PAR_CHUNK, c));
        } else {
            f(0, out);
        }
    }

    /// `s[off..]`, or `s` itself when it is the empty placeholder of an absent operand.
    fn tail(s: &[f32], off: usize) -> &[f32] {
        if s.is_empty() {
            s
        } else {
            &s[off..]
        }
    }

    /// [`for_chunks`] over two buffers of equal length, split at the same places.
    fn for_chunks2(
        w: &mut [f32],
        b: &mut [f32],
        f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
    ) {
        use rayon::prelude::*;
        if w.len() > PAR_CHUNK && rayon::current_num_threads() > 1 {
            w.par_chunks_mut(PAR_CHUNK)
                .zip(b.par_chunks_mut(PAR_CHUNK))
                .enumerate()
                .for_each(|(i, (w, b))| f(i * PAR_CHUNK, w, b));
        } else {
            f(0, w, b);
        }
    }

    /// The step with momentum as one pass over both buffers ([`both_loop`]).
    fn both_pass(w: &mut [f32], b: &mut [f32], g: &[f32], m: Option<&[f32]>, c: &SgdConfig) {
        let mask = m.unwrap_or(&[]);
        for_chunks2(w, b, |o, w, b| {
            let (g, m) = (&g[o..], tail(mask, o));
            macro_rules! go {
                ($mask:literal, $wd:literal) => {
                    if c.nesterov {
                        both_loop::<$mask, $wd, true>(w, b, g, m, c)
                    } else {
                        both_loop::<$mask, $wd, false>(w, b, g, m, c)
                    }
                };
            }
            match (m.is_empty(), c.weight_decay != 0.0) {
                (false, true) => go!(true, true),
                (false, false) => go!(true, false),
                (true, true) => go!(false, true),
                (true, false) => go!(false, false),
            }
        });
    }

    struct WeightPass<'a> {
        g: &'a [f32],
        m: Option<&'a [f32]>,
        /// The new momentum (masked: where the mask is 0 the weight is zeroed anyway).
        b: Option<&'a [f32]>,
        c: SgdConfig,
    }

    impl InplaceOp1 for WeightPass<'_> {
        fn name(&self) -> &'static str {
            "fused-sgd-weights"
        }
        fn cpu_fwd(&self, st: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
            let w = slice_mut(st, l)?;
            let (g, c) = (self.g, &self.c);
            let (m, b) = (self.m.unwrap_or(&[]), self.b.unwrap_or(&[]));
            for_chunks(w, |o, w| {
                let (g, m, b) = (&g[o..], tail(m, o), tail(b, o));
                macro_rules! go {
                    ($mask:literal, $wd:literal) => {
                        match (self.b.is_some(), c.nesterov) {
                            (true, true) => weight_loop::<$mask, $wd, true, true>(w, g, m, b, c),
                            (true, false) => weight_loop::<$mask, $wd, true, false>(w, g, m, b, c),
                            (false, _) => weight_loop::<$mask, $wd, false, false>(w, g, m, b, c),
                        }
                    };
                }
                match (self.m.is_some(), c.weight_decay != 0.0) {
                    (true, true) => go!(true, true),
                    (true, false) => go!(true, false),
                    (false, true) => go!(false, true),
                    (false, false) => go!(false, false),
                }
            });
            Ok(())
        }
    }

    /// Runs the fused step when every tensor is contiguous `f32` on the CPU with the weight's
    /// length; `Ok(false)` (nothing done) otherwise.
    pub(super) fn sgd_step(slot: &mut Slot, g: &Tensor, c: SgdConfig) -> Result<bool> {
        let w = slot.var.as_tensor();
        let n = w.elem_count();
        let fits = |t: &Tensor| with_slice(t, |s| s.len() == n).unwrap_or(false);
        if !fits(w)
            || !fits(g)
            || slot.mask.as_ref().is_some_and(|m| !fits(m))
            || slot.state.iter().any(|s| !fits(s))
            || slot.state.len() != usize::from(c.momentum != 0.0)
        {
            return Ok(false);
        }
        // Guards are taken per pass on the tensors that are only read; the written one is
        // borrowed mutably by candle (distinct storages: a gradient, a mask, a buffer, a weight).
        with_slice(g, |g| -> Result<()> {
            let run = |m: Option<&[f32]>| -> Result<()> {
                if let Some(b) = slot.state.first() {
                    // The buffer's storage and the weight's, each borrowed mutably by candle
                    // for one in-place op, the weight's inside the buffer's (distinct
                    // storages, so the two write locks do not meet).
                    let mut inner = Ok(false);
                    let outer = write_in_place(b, |bs| {
                        inner = write_in_place(w, |ws| both_pass(ws, bs, g, m, &c));
                    })?;
                    if !(outer && inner?) {
                        return Err(candle_core::Error::Msg(
                            "fused sgd: not contiguous f32 storage".into(),
                        )
                        .into());
                    }
                } else {
                    w.inplace_op1(&WeightPass { g, m, b: None, c })?;
                }
                Ok(())
            };
            match &slot.mask {
                Some(mask) => with_slice(mask, |m| run(Some(m))).expect("checked"),
                None => run(None),
            }
        })
        .expect("checked")?;
        Ok(true)
    }
}

/// Settings of [`MaskedAdamW`] (decoupled weight decay, as candle-nn's and PyTorch's AdamW).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Mask-aware AdamW: first and second moments are zeroed wherever the mask is 0.
pub struct MaskedAdamW {
    slots: Vec<Slot>,
    cfg: AdamWConfig,
    t: u64,
}

impl MaskedAdamW {
    /// An optimizer over `vars`.
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        Ok(MaskedAdamW {
            slots: slots(vars, 2)?,
            cfg,
            t: 0,
        })
    }
}

impl MaskAware for MaskedAdamW {
    fn set_mask(&mut self, var: &Var, mask: &Tensor) -> Result<()> {
        set_mask_in(&mut self.slots, var, mask)
    }

    fn state(&self, var: &Var) -> Vec<Tensor> {
        state_of(&self.slots, var)
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    fn set_state(&mut self, var: &Var, state: Vec<Tensor>) -> Result<()> {
        set_state_in(&mut self.slots, var, state)
    }

    fn steps(&self) -> u64 {
        self.t
    }

    fn set_steps(&mut self, steps: u64) {
        self.t = steps;
    }

    fn replace_var(&mut self, old: &Var, new: Var, state: Vec<Tensor>) -> Result<()> {
        replace_in(&mut self.slots, old, new, state)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powf(self.t as f64);
        let bc2 = 1.0 - c.beta2.powf(self.t as f64);
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.var) else {
                continue;
            };
            // candle may hand back gradients that still record how they were computed.
            let g = g.detach();
            let g = match &slot.mask {
                Some(m) => (&g * m)?,
                None => g,
            };
            // Detached: arithmetic with the Var itself would record graph nodes, and the momentum
            // buffers built from them would chain every past step's tensors (a leak of ~6 MB a
            // step on LeNet-300-100, measured).
            let w = slot.var.as_tensor().detach();
            let m1 = ((&slot.state[0] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let m2 = ((&slot.state[1] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m1 / bc1)? / ((&m2 / bc2)?.sqrt()? + c.eps)?)?;
            let mut new_w = ((&w * (1.0 - c.lr * c.weight_decay))? - (update * c.lr)?)?;
            slot.state[0] = m1;
            slot.state[1] = m2;
            if let Some(m) = &slot.mask {
                new_w = (new_w * m)?;
                for s in &mut slot.state {
                    *s = (&*s * m)?;
                }
            }
            slot.var.set(&new_w)?;
        }
        Ok(())
    }
}

/// Which optimizer, with its settings (for configs). In a config file it is one table with a
/// `kind` (`"sgd"` or `"adam-w"`, default `"sgd"`) and that kind's settings, every one optional
/// (defaults: [`SgdConfig::default`], [`AdamWConfig::default`]); a key that is not a setting of
/// that kind is an error naming it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", try_from = "OptimizerTable")]
pub enum OptimizerConfig {
    /// [`MaskedSgd`].
    Sgd(SgdConfig),
    /// [`MaskedAdamW`].
    AdamW(AdamWConfig),
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::Sgd(SgdConfig::default())
    }
}

/// The optimizer kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with momentum, Nesterov and weight decay.
    Sgd,
    /// AdamW.
    AdamW,
}

/// An optimizer table as written in a config file (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptimizerTable {
    kind: Option<OptimizerKind>,
    lr: Option<f64>,
    momentum: Option<f64>,
    nesterov: Option<bool>,
    weight_decay: Option<f64>,
    beta1: Option<f64>,
    beta2: Option<f64>,
    eps: Option<f64>,
}

impl TryFrom<OptimizerTable> for OptimizerConfig {
    type Error = String;
    fn try_from(t: OptimizerTable) -> std::result::Result<Self, String> {
        let foreign = |kind: &str, keys: &[(&str, bool)]| match keys.iter().find(|(_, set)| *set) {
            Some((k, _)) => Err(format!("`{k}` is not a setting of the `{kind}` optimizer")),
            None => Ok(()),
        };
        Ok(match t.kind.unwrap_or(OptimizerKind::Sgd) {
            OptimizerKind::Sgd => {
                foreign(
                    "sgd",
                    &[
                        ("beta1", t.beta1.is_some()),
                        ("beta2", t.beta2.is_some()),
                        ("eps", t.eps.is_some()),
                    ],
                )?;
                let d = SgdConfig::default();
                OptimizerConfig::Sgd(SgdConfig {
                    lr: t.lr.unwrap_or(d.lr),
                    momentum: t.momentum.unwrap_or(d.momentum),
                    nesterov: t.nesterov.unwrap_or(d.nesterov),
                    weight_decay: t.weight_decay.unwrap_or(d.weight_decay),
                })
            }
            OptimizerKind::AdamW => {
                foreign(
                    "adam-w",
                    &[
                        ("momentum", t.momentum.is_some()),
                        ("nesterov", t.nesterov.is_some()),
                    ],
                )?;
                let d = AdamWConfig::default();
                OptimizerConfig::AdamW(AdamWConfig {
                    lr: t.lr.unwrap_or(d.lr),
                    beta1: t.beta1.unwrap_or(d.beta1),
                    beta2: t.beta2.unwrap_or(d.beta2),
                    eps: t.eps.unwrap_or(d.eps),
                    weight_decay: t.weight_decay.unwrap_or(d.weight_decay),
                })
            }
        })
    }
}

impl OptimizerConfig {
    /// Builds the optimizer over `vars`.
    pub fn build(&self, vars: Vec<Var>) -> Result<Box<dyn MaskAware + Send>> {
        Ok(match *self {
            OptimizerConfig::Sgd(c) => Box::new(MaskedSgd::new(vars, c)?),
            OptimizerConfig::AdamW(c) => Box::new(MaskedAdamW::new(vars, c)?),
        })
    }

    /// The kind.
    pub fn kind(&self) -> OptimizerKind {
        match self {
            OptimizerConfig::Sgd(_) => OptimizerKind::Sgd,
            OptimizerConfig::AdamW(_) => OptimizerKind::AdamW,
        }
    }

    /// The defaults of `kind`.
    pub fn default_of(kind: OptimizerKind) -> Self {
        match kind {
            OptimizerKind::Sgd => OptimizerConfig::Sgd(SgdConfig::default()),
            OptimizerKind::AdamW => OptimizerConfig::AdamW(AdamWConfig::default()),
        }
    }

    /// The (peak) learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerConfig::Sgd(c) => c.lr,
            OptimizerConfig::AdamW(c) => c.lr,
        }
    }

    /// Checks every setting; the error names it (`lr`, `momentum`, ...) and its valid range.
    pub fn validate(&self) -> Result<()> {
        let check = |field: &'static str, v: f64, ok: bool, range: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(crate::error::DstError::Config {
                    field,
                    reason: format!("{v} is outside {range}"),
                })
            }
        };
        match *self {
            OptimizerConfig::Sgd(c) => {
                check("lr", c.lr, c.lr > 0.0, "(0, ∞)")?;
                check(
                    "momentum",
                    c.momentum,
                    (0.0..1.0).contains(&c.momentum),
                    "[0, 1)",
                )?;
                check(
                    "weight_decay",
                    c.weight_decay,
                    c.weight_decay >= 0.0,
                    "[0, ∞)",
                )
            }
            OptimizerConfig::AdamW(c) => {
                check("lr", c.lr, c.lr > 0.0, "(0, ∞)")?;
                check("beta1", c.beta1, (0.0..1.0).contains(&c.beta1), "[0, 1)")?;
                check("beta2", c.beta2, (0.0..1.0).contains(&c.beta2), "[0, 1)")?;
                check("eps", c.eps, c.eps > 0.0, "(0, ∞)")?;
                check(
                    "weight_decay",
                    c.weight_decay,
                    c.weight_decay >= 0.0,
                    "[0, ∞)",
                )
            }
        }
    }
}

/// Lets a `&mut Box<dyn MaskAware>` be passed where `&mut impl MaskAware` is expected.
impl<T: MaskAware + ?Sized> MaskAware for Box<T> {
    fn set_mask(&mut self, var: &Var, mask: &Tensor) -> Result<()> {
        (**self).set_mask(var, mask)
    }
    fn state(&self, var: &Var) -> Vec<Tensor> {
        (**self).state(var)
    }
    fn learning_rate(&self) -> f64 {
        (**self).learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f64) {
        (**self).set_learning_rate(lr)
    }
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        (**self).step(grads)
    }
    fn set_state(&mut self, var: &Var, state: Vec<Tensor>) -> Result<()> {
        (**self).set_state(var, state)
    }
    fn steps(&self) -> u64 {
        (**self).steps()
    }
    fn set_steps(&mut self, steps: u64) {
        (**self).set_steps(steps)
    }
    fn replace_var(&mut self, old: &Var, new: Var, state: Vec<Tensor>) -> Result<()> {
        (**self).replace_var(old, new, state)
    }
    fn manages(&self, var: &Var) -> bool {
        (**self).manages(var)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused in-place SGD step gives bit-identical weights and momentum to the tensor path
    /// over several steps, for every combination of momentum, Nesterov, weight decay and mask.
    #[test]
    fn fused_step_equals_the_tensor_path() {
        let dev = Device::Cpu;
        // 7×13 runs in one piece; 300×500 (150 k values) in three parallel chunks.
        let mut seed = 0x1234_5678u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 20_000) as f32 / 10_000.0 - 1.0
        };
        let mut rand = |n: usize| (0..n).map(|_| next()).collect::<Vec<f32>>();
        for (rows, cols) in [(7, 13), (300, 500)] {
            for momentum in [0.0, 0.9] {
                for nesterov in [false, true] {
                    for weight_decay in [0.0, 1e-4, 0.3] {
                        for masked in [false, true] {
                            let c = SgdConfig {
                                lr: 0.07,
                                momentum,
                                nesterov,
                                weight_decay,
                            };
                            let w0 = rand(rows * cols);
                            let m: Vec<f32> = rand(rows * cols)
                                .iter()
                                .map(|v| f32::from(u8::from(*v > 0.0)))
                                .collect();
                            let make = || {
                                let w: Vec<f32> = if masked {
                                    w0.iter().zip(&m).map(|(a, b)| a * b).collect()
                                } else {
                                    w0.clone()
                                };
                                let var = Var::from_vec(w, (rows, cols), &dev).unwrap();
                                let mut s = slots(vec![var], usize::from(momentum != 0.0)).unwrap();
                                if masked {
                                    s[0].mask = Some(
                                        Tensor::from_vec(m.clone(), (rows, cols), &dev).unwrap(),
                                    );
                                }
                                s.remove(0)
                            };
                            let (mut fused_slot, mut tensor_slot) = (make(), make());
                            for _ in 0..4 {
                                let g = Tensor::from_vec(rand(rows * cols), (rows, cols), &dev)
                                    .unwrap();
                                assert!(fused::sgd_step(&mut fused_slot, &g, c).unwrap());
                                tensor_sgd_step(&mut tensor_slot, &g, c).unwrap();
                                let flat =
                                    |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                                let bits =
                                    |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                                assert_eq!(
                                    bits(flat(fused_slot.var.as_tensor())),
                                    bits(flat(tensor_slot.var.as_tensor())),
                                    "weights, {c:?} masked={masked}"
                                );
                                for (a, b) in fused_slot.state.iter().zip(&tensor_slot.state) {
                                    assert_eq!(bits(flat(a)), bits(flat(b)), "momentum, {c:?}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn setup() -> (Var, Tensor) {
        let w = Var::new(&[[1.0f32, 2.0], [3.0, 0.0]], &Device::Cpu).unwrap();
        let m = Tensor::new(&[[1.0f32, 1.0], [1.0, 0.0]], &Device::Cpu).unwrap();
        (w, m)
    }

    /// Hand-computed SGD with momentum 0.5 and Nesterov on a loss whose gradient is all ones.
    #[test]
    fn sgd_matches_hand_computation_and_keeps_inactive_zero() {
        let (w, m) = setup();
        let cfg = SgdConfig {
            lr: 0.1,
            momentum: 0.5,
            nesterov: true,
            weight_decay: 0.0,
        };
        let mut opt = MaskedSgd::new(vec![w.clone()], cfg).unwrap();
        opt.set_mask(&w, &m).unwrap();
        for _ in 0..2 {
            let grads = w.as_tensor().sum_all().unwrap().backward().unwrap();
            opt.step(&grads).unwrap();
        }
        // Step 1: b = 1, d = 1 + 0.5 = 1.5, w -= 0.15. Step 2: b = 1.5, d = 1 + 0.75 = 1.75,
        // w -= 0.175. Total -0.325 on active weights; the inactive one stays 0.
        let got = w.as_tensor().to_vec2::<f32>().unwrap();
        let want = [[0.675f32, 1.675], [2.675, 0.0]];
        for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
        let b = opt.state(&w)[0].to_vec2::<f32>().unwrap();
        assert_eq!(b, vec![vec![1.5, 1.5], vec![1.5, 0.0]]);
    }

    #[test]
    fn set_mask_zeroes_state_of_dropped_weights() {
        let (w, m) = setup();
        let mut opt = MaskedAdamW::new(vec![w.clone()], AdamWConfig::default()).unwrap();
        opt.set_mask(&w, &m).unwrap();
        let grads = (w.as_tensor() * 2.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads).unwrap();
        assert!(opt.state(&w).iter().all(|s| {
            let v = s.to_vec2::<f32>().unwrap();
            v[1][1] == 0.0 && v[0][0] != 0.0
        }));
        let new_mask = Tensor::new(&[[0.0f32, 1.0], [1.0, 1.0]], &Device::Cpu).unwrap();
        opt.set_mask(&w, &new_mask).unwrap();
        for s in opt.state(&w) {
            let v = s.to_vec2::<f32>().unwrap();
            assert_eq!(v[0][0], 0.0, "dropped weight's state reset");
            assert_eq!(v[1][1], 0.0, "grown weight starts with zero state");
        }
    }

    /// Optimizer state must not record graph nodes: momentum built from a tracked expression
    /// chains every past step's tensors and leaks memory without bound.
    #[test]
    fn state_is_detached_from_the_graph() {
        let (w, m) = setup();
        let cfg = SgdConfig {
            weight_decay: 0.1,
            ..SgdConfig::default()
        };
        let mut sgd = MaskedSgd::new(vec![w.clone()], cfg).unwrap();
        let mut adam = MaskedAdamW::new(vec![w.clone()], AdamWConfig::default()).unwrap();
        sgd.set_mask(&w, &m).unwrap();
        for _ in 0..2 {
            let grads = w
                .as_tensor()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            sgd.step(&grads).unwrap();
            adam.step(&grads).unwrap();
        }
        for (i, s) in sgd.state(&w).into_iter().chain(adam.state(&w)).enumerate() {
            assert!(!s.track_op(), "optimizer state {i} records a graph");
        }
    }

    /// Restoring a state and the step counter continues exactly as the uninterrupted optimizer.
    #[test]
    fn restored_state_continues_identically() {
        let loss = |w: &Var| {
            w.as_tensor()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (w, m) = setup();
        let mut a = MaskedAdamW::new(vec![w.clone()], AdamWConfig::default()).unwrap();
        a.set_mask(&w, &m).unwrap();
        for _ in 0..3 {
            a.step(&loss(&w)).unwrap();
        }
        let w2 = Var::from_tensor(&w.as_tensor().copy().unwrap()).unwrap();
        let mut b = MaskedAdamW::new(vec![w2.clone()], AdamWConfig::default()).unwrap();
        b.set_mask(&w2, &m).unwrap();
        b.set_state(&w2, a.state(&w)).unwrap();
        b.set_steps(a.steps());
        a.step(&loss(&w)).unwrap();
        b.step(&loss(&w2)).unwrap();
        assert_eq!(
            w.as_tensor().to_vec2::<f32>().unwrap(),
            w2.as_tensor().to_vec2::<f32>().unwrap()
        );
        assert!(b.set_state(&w2, vec![]).is_err(), "wrong number of tensors");
    }

    #[test]
    fn unknown_var_is_an_error() {
        let (w, m) = setup();
        let mut opt = MaskedSgd::new(vec![], SgdConfig::default()).unwrap();
        assert!(opt.set_mask(&w, &m).is_err());
    }
}
