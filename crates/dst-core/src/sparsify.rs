//! [`Sparsify`]: the one protocol a training loop drives, whatever the method. The loop calls
//! the hooks in this order for every optimizer step `t` (1-based):
//!
//! 1. [`Sparsify::before_forward`] — N:M methods set the masks of the coming forward pass;
//! 2. forward and backward passes;
//! 3. [`Sparsify::after_backward`] — N:M methods rewrite the weight gradients;
//! 4. the optimizer step;
//! 5. [`Sparsify::after_step`] — dynamic sparse training updates masks on schedule from the
//!    post-step weights and that step's dense gradients (docs/algorithms.md, "One training
//!    step").
//!
//! [`Sparsify::needs_dense_grad`] tells a storage engine that keeps weights sparse whether step
//! `t` must also form the dense weight gradient. [`Sparsify::save`] / [`Sparsify::restore`]
//! carry the method's state through a checkpoint as named tensors.
//!
//! Implemented by the [`Sparsifier`](crate::Sparsifier) (Static, SET, RigL, SRigL), by lbc's
//! N:M sparsifier, and by [`NoSparsity`] (dense training).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use sparse_formats::Mask;

use crate::error::Result;
use crate::optim::MaskAware;
use crate::sparsifier::UpdateReport;

/// The hooks of a sparsification method in a training step (see the module documentation).
pub trait Sparsify: Send {
    /// Hands the masks to a freshly built optimizer.
    fn register(&self, opt: &mut dyn MaskAware) -> Result<()> {
        let _ = opt;
        Ok(())
    }

    /// Before the forward pass of step `step` (1-based) in `epoch` (0-based), at learning
    /// rate `lr`.
    fn before_forward(&mut self, step: usize, epoch: usize, lr: f64) -> Result<()> {
        let _ = (step, epoch, lr);
        Ok(())
    }

    /// Whether [`Sparsify::after_step`] of step `step` (1-based) reads dense weight gradients.
    fn needs_dense_grad(&self, step: usize) -> bool {
        let _ = step;
        false
    }

    /// Whether the masks are final: they will not change again in this run, and all that
    /// [`Sparsify::after_backward`] still does to a weight's gradient is zero it outside the
    /// mask (so a training engine may move the weights to sparse storage, where that gradient
    /// never exists). Methods that move masks say `false` (the default); N:M methods say `true`
    /// once their mask is fixed.
    fn masks_final(&self) -> bool {
        false
    }

    /// After the backward pass, before the optimizer step: rewrites weight gradients.
    fn after_backward(&mut self, grads: &mut GradStore) -> Result<()> {
        let _ = grads;
        Ok(())
    }

    /// After optimizer step `step` (1-based), with that step's gradients; returns a report when
    /// masks changed.
    fn after_step(
        &mut self,
        step: usize,
        grads: &GradStore,
        opt: &mut dyn MaskAware,
    ) -> Result<Option<UpdateReport>> {
        let _ = (step, grads, opt);
        Ok(None)
    }

    /// The current mask of every managed weight, by weight name, in build order.
    fn masks(&self) -> Vec<(String, Mask)>;

    /// In-time over-parameterisation (fraction of the managed weights ever active), for
    /// methods that move masks.
    fn itop(&self) -> Option<f64> {
        None
    }

    /// The method's state as named tensors (masks, unions, scores...), so that
    /// [`Sparsify::restore`] continues exactly.
    fn save(&self) -> Result<Vec<(String, Tensor)>>;

    /// Restores what [`Sparsify::save`] wrote, after the weights have been loaded, and hands the
    /// masks to `opt`. Fails naming a missing or ill-fitting tensor.
    fn restore(&mut self, saved: &HashMap<String, Tensor>, opt: &mut dyn MaskAware) -> Result<()>;
}

/// Dense training: manages no weight and does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSparsity;

impl Sparsify for NoSparsity {
    fn masks(&self) -> Vec<(String, Mask)> {
        Vec::new()
    }

    fn save(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    fn restore(&mut self, _: &HashMap<String, Tensor>, _: &mut dyn MaskAware) -> Result<()> {
        Ok(())
    }
}

/// The tensor `name` of a saved state, or an error naming it.
pub fn saved<'a>(saved: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    saved.get(name).ok_or_else(|| crate::DstError::Config {
        field: "checkpoint",
        reason: format!("missing tensor `{name}`"),
    })
}
