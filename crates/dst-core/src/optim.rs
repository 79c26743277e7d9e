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
        .map(|s| s.state.clone())
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
            let t = t.to_dtype(var.dtype())?.detach();
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
        state: state.into_iter().map(|t| t.detach()).collect(),
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
            // candle may hand back gradients that still record how they were computed.
            let g = g.detach();
            // Detached: arithmetic with the Var itself would record graph nodes, and the momentum
            // buffers built from them would chain every past step's tensors (a leak of ~6 MB a
            // step on LeNet-300-100, measured).
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
        }
        Ok(())
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
