//! N:M training inside a candle loop: [`NmLinear`] layers and the [`NmSparsifier`] that turns
//! the dense gradient of the masked weight into each method's weight update.
//!
//! The layer keeps the **dense** weight and multiplies it by the current mask with a
//! straight-through form, `W̃ = W − ((1 − B) ⊙ W).detach()`, so candle's gradient for `W` is the
//! dense `∂L/∂W̃` at every position. [`NmSparsifier::after_backward`] then rewrites it:
//! - LBC: scores step on `W ⊙ ∂L/∂W̃` (straight-through for the scores), weight gradient
//!   `B ⊙ ∂L/∂W̃` (no straight-through for weights, docs/algorithms.md §7.3);
//! - SR-STE: `∂L/∂W̃ + λ_W (1 − E) ⊙ W` to every weight, mask recomputed before every forward;
//! - one-shot magnitude (ASP): dense training until the prune epoch, then the mask chosen once
//!   from the trained `|W|` and kept, gradient `B ⊙ ∂L/∂W̃` (the optimizer reset and the
//!   learning-rate restart of ASP's fine-tuning are the training loop's: models' trainer does
//!   both).
//!
//! Call [`NmSparsifier::before_forward`] with the epoch before each step, `after_backward` on
//! the gradients, then the optimizer (any: a plain momentum SGD reproduces the references).

use std::sync::{Arc, RwLock};

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder};
use dst_core::layers::{seeded_bias, seeded_weight};
use dst_core::optim::MaskAware;
use dst_core::sparsify::{saved, Sparsify};
use dst_core::DstError;
use sparse_formats::{Mask, NmPattern, NmSparse};

use crate::baselines::{magnitude_mask, srste_grad};
use crate::combinations::binomial;
use crate::lbc::{lbc_state, LbcState, ScoreOpt};
use crate::schedule::RemovalSchedule;
use crate::LbcError;

/// A linear or conv layer whose weight is trained under an N:M mask. For a conv weight
/// `[out, in, kh, kw]` the groups are M consecutive input channels at one kernel position (the
/// hardware axis, docs/algorithms.md §1.3), i.e. `group_stride = kh·kw` on the `[out, in·kh·kw]` view.
#[derive(Clone)]
pub struct NmLayer {
    name: String,
    weight: Var,
    bias: Option<Var>,
    mask: Arc<RwLock<Tensor>>,
    conv: Option<Conv2dConfig>,
}

/// The linear flavour of [`NmLayer`] (the same type).
pub type NmLinear = NmLayer;

fn seeded_layer(
    shape: &[usize],
    seed: u64,
    vb: &VarBuilder,
    conv: Option<Conv2dConfig>,
    with_bias: bool,
) -> candle_core::Result<NmLayer> {
    // The same seeded initialisation as dst-core's sparse layers.
    let fan_in: usize = shape[1..].iter().product();
    let (w, name) = seeded_weight(vb, shape, "weight", seed).map_err(candle_core::Error::wrap)?;
    let bias = if with_bias {
        Some(seeded_bias(vb, shape[0], fan_in, &name, seed).map_err(candle_core::Error::wrap)?)
    } else {
        None
    };
    Ok(NmLayer {
        name,
        mask: Arc::new(RwLock::new(w.ones_like()?)),
        weight: w,
        bias,
        conv,
    })
}

/// An N:M conv layer with a bias, like `candle_nn::conv2d`; seeded like [`nm_linear`].
pub fn nm_conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    seed: u64,
    vb: VarBuilder,
) -> candle_core::Result<NmLayer> {
    let c = in_channels / cfg.groups.max(1);
    seeded_layer(
        &[out_channels, c, kernel, kernel],
        seed,
        &vb,
        Some(cfg),
        true,
    )
}

/// [`nm_conv2d`] without a bias (the usual choice before a BatchNorm).
pub fn nm_conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    seed: u64,
    vb: VarBuilder,
) -> candle_core::Result<NmLayer> {
    let c = in_channels / cfg.groups.max(1);
    seeded_layer(
        &[out_channels, c, kernel, kernel],
        seed,
        &vb,
        Some(cfg),
        false,
    )
}

/// [`nm_linear`] without a bias.
pub fn nm_linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    seed: u64,
    vb: VarBuilder,
) -> candle_core::Result<NmLinear> {
    seeded_layer(&[out_dim, in_dim], seed, &vb, None, false)
}

/// `NmLinear` with a bias, like `candle_nn::linear`; the weight starts dense (mask of ones),
/// weight and bias drawn from PyTorch's `U(−1/√in, 1/√in)` with the project's seeded RNG
/// (candle's CPU RNG cannot be seeded).
pub fn nm_linear(
    in_dim: usize,
    out_dim: usize,
    seed: u64,
    vb: VarBuilder,
) -> candle_core::Result<NmLinear> {
    seeded_layer(&[out_dim, in_dim], seed, &vb, None, true)
}

impl NmLayer {
    /// Weight name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dense weight variable.
    pub fn weight(&self) -> &Var {
        &self.weight
    }

    /// The bias variable, if any.
    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }

    /// The current 0/1 mask.
    pub fn mask(&self) -> Tensor {
        self.mask.read().expect("mask lock").clone()
    }

    /// `[rows, fan_in]` of the weight view and the N:M group stride (`kh·kw` for a conv).
    fn view(&self) -> (usize, usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1..].iter().product(), d[2..].iter().product())
    }

    fn set_mask(&self, m: &Mask) -> Result<(), LbcError> {
        let t = m
            .to_tensor_dtype(self.weight.dtype(), self.weight.device())?
            .reshape(self.weight.shape())
            .map_err(LbcError::Candle)?;
        *self.mask.write().expect("mask lock") = t;
        Ok(())
    }
}

impl Module for NmLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.as_tensor();
        let m = self.mask();
        // Straight-through: value W ⊙ B, gradient to W the dense ∂L/∂W̃.
        let w_eff = (w - (w * (1.0 - &m)?)?.detach())?;
        match (&self.conv, &self.bias) {
            (Some(c), b) => {
                let spec = dst_core::layers::conv_spec(c);
                sparse_kernels::conv::conv2d(x, &w_eff, b.as_ref().map(|b| b.as_tensor()), spec)
            }
            (None, b) => {
                sparse_kernels::dense::linear(x, &w_eff, b.as_ref().map(|b| b.as_tensor()))
            }
        }
    }
}

/// Which N:M method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NmMethod {
    /// LBC with its removal schedule and the scores' optimizer (the reference trains them with
    /// the weights' optimizer: SGD in its ResNet runs, freezing them once one combination is
    /// left; AdamW in its DeiT runs, never freezing), at the weights' learning rate; direct
    /// score tables above `max_scores` entries switch to the accumulated formulation (SGD only).
    Lbc {
        /// K(e).
        schedule: RemovalSchedule,
        /// Score optimizer.
        scores: ScoreOpt,
        /// Stop stepping the scores once one combination is left per group.
        freeze_scores: bool,
        /// Largest direct table.
        max_scores: usize,
    },
    /// SR-STE with `λ_W` (reference 2e-4).
    SrSte {
        /// Decay on pruned weights.
        lambda_w: f32,
    },
    /// One-shot magnitude N:M as NVIDIA's ASP runs it: dense training for `prune_epoch`
    /// epochs, then the trained weights pruned once to N:M by magnitude and the survivors
    /// fine-tuned with the mask fixed. `prune_epoch = 0` prunes the initialisation (magnitude
    /// pruning at init, not ASP). Default: [`crate::baselines::default_prune_epoch`].
    OneShot {
        /// The epoch (0-based) before whose first forward pass the weights are pruned.
        prune_epoch: usize,
    },
}

/// A checkpointable snapshot of an [`NmSparsifier`].
#[derive(Debug, Clone, PartialEq)]
pub struct NmState {
    /// Whether the masks have been chosen: the first forward pass happened (LBC, SR-STE), or
    /// the one-shot prune did.
    pub started: bool,
    /// Per managed layer, in order.
    pub layers: Vec<NmLayerState>,
}

/// One layer of an [`NmState`].
#[derive(Debug, Clone, PartialEq)]
pub struct NmLayerState {
    /// Weight name.
    pub name: String,
    /// Its current mask.
    pub mask: Mask,
    /// Its LBC state (empty for SR-STE and one-shot).
    pub lbc: Vec<(String, Vec<f64>)>,
}

struct Managed {
    layer: NmLayer,
    pattern: NmPattern,
    lbc: Option<Box<dyn LbcState + Send>>,
    mask: Mask,
}

/// Owns the N:M state of a model's layers.
pub struct NmSparsifier {
    pattern: NmPattern,
    method: NmMethod,
    layers: Vec<Managed>,
    started: bool,
    /// The epoch whose LBC masks are in place (removal depends on the epoch only, so the
    /// masks are recomputed once per epoch, not every step).
    lbc_epoch: Option<usize>,
}

fn weights_of(v: &Var) -> Result<Vec<f32>, LbcError> {
    v.as_tensor()
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1())
        .map_err(LbcError::Candle)
}

impl NmSparsifier {
    /// Manages `layers` under `pattern` (its N and M; each conv layer's group stride is set
    /// from its kernel size) with `method`.
    pub fn new(
        layers: Vec<NmLayer>,
        pattern: NmPattern,
        method: NmMethod,
    ) -> Result<Self, LbcError> {
        let mut managed = Vec::with_capacity(layers.len());
        for layer in layers {
            let (rows, fan_in, group_stride) = layer.view();
            let pattern = NmPattern {
                group_stride,
                ..pattern
            };
            pattern.validate(fan_in).map_err(|e| {
                LbcError::Shape(format!(
                    "layer `{}`: {e} (keep it dense: `--dense-layer {}`, config \
                         `method.dense_layers`)",
                    layer.name, layer.name
                ))
            })?;
            let lbc = match method {
                NmMethod::Lbc {
                    max_scores, scores, ..
                } => Some(lbc_state(rows, fan_in, pattern, max_scores, scores)?),
                _ => None,
            };
            managed.push(Managed {
                layer,
                pattern,
                lbc,
                mask: Mask::ones(rows, fan_in),
            });
        }
        Ok(NmSparsifier {
            pattern,
            method,
            layers: managed,
            started: false,
            lbc_epoch: None,
        })
    }

    /// Sets the scores' learning rate (LBC follows the weights' schedule; no-op otherwise).
    pub fn set_score_lr(&mut self, lr: f32) {
        if let NmMethod::Lbc { scores, .. } = &mut self.method {
            scores.set_lr(lr);
        }
    }

    /// Updates the masks for the coming forward pass at `epoch` (0-based).
    pub fn before_forward(&mut self, epoch: usize) -> Result<(), LbcError> {
        if matches!(self.method, NmMethod::Lbc { .. }) {
            if self.lbc_epoch == Some(epoch) {
                return Ok(());
            }
            self.lbc_epoch = Some(epoch);
        }
        let c = binomial(self.pattern.m, self.pattern.n) as usize;
        for l in &mut self.layers {
            let (rows, fan_in) = (l.mask.rows(), l.mask.fan_in());
            let new = match (self.method, l.lbc.as_mut()) {
                (NmMethod::Lbc { schedule, .. }, Some(state)) => {
                    state.remove_to(schedule.kept(c, epoch));
                    state.mask()
                }
                (NmMethod::SrSte { .. }, _) => {
                    magnitude_mask(&weights_of(&l.layer.weight)?, rows, fan_in, l.pattern)?
                }
                (NmMethod::OneShot { prune_epoch }, _) if !self.started && epoch >= prune_epoch => {
                    magnitude_mask(&weights_of(&l.layer.weight)?, rows, fan_in, l.pattern)?
                }
                _ => continue,
            };
            l.layer.set_mask(&new)?;
            l.mask = new;
        }
        self.started = match self.method {
            NmMethod::OneShot { prune_epoch } => self.started || epoch >= prune_epoch,
            _ => true,
        };
        Ok(())
    }

    /// Rewrites each layer's weight gradient in `grads` for its method (and steps LBC's scores).
    pub fn after_backward(&mut self, grads: &mut GradStore) -> Result<(), LbcError> {
        for l in &mut self.layers {
            let var = l.layer.weight.clone();
            let Some(g) = grads.get(&var) else { continue };
            let shape = g.shape().clone();
            let g = g
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(LbcError::Candle)?;
            let w = weights_of(&var)?;
            let new: Vec<f32> = match self.method {
                NmMethod::Lbc {
                    scores,
                    freeze_scores,
                    ..
                } => {
                    if let Some(state) = l.lbc.as_mut() {
                        state.step(&w, &g, scores, freeze_scores)?;
                    }
                    g.iter()
                        .zip(l.mask.as_slice())
                        .map(|(&g, &b)| if b { g } else { 0.0 })
                        .collect()
                }
                NmMethod::SrSte { lambda_w } => srste_grad(&w, &g, &l.mask, lambda_w)?,
                NmMethod::OneShot { .. } => g
                    .iter()
                    .zip(l.mask.as_slice())
                    .map(|(&g, &b)| if b { g } else { 0.0 })
                    .collect(),
            };
            let t = Tensor::from_vec(new, shape, var.device()).map_err(LbcError::Candle)?;
            grads.insert(&var, t);
        }
        Ok(())
    }

    /// Whether the masks are fixed for the rest of the run: one-shot N:M once it has pruned
    /// (the fine-tuning phase), LBC from the epoch where one combination is left per group
    /// (`t_f`; from then its masks cannot change, and its scores no longer matter — a sparse
    /// engine stops stepping them, as the reference's SGD runs freeze them), never SR-STE
    /// (its mask follows the weights every step).
    pub fn masks_final(&self) -> bool {
        match self.method {
            NmMethod::OneShot { .. } => self.started,
            NmMethod::Lbc { schedule, .. } => {
                let c = binomial(self.pattern.m, self.pattern.n) as usize;
                self.lbc_epoch.is_some_and(|e| schedule.kept(c, e) == 1)
            }
            NmMethod::SrSte { .. } => false,
        }
    }

    /// Everything a checkpoint needs to resume exactly: per layer its mask and LBC state.
    pub fn state(&self) -> NmState {
        NmState {
            started: self.started,
            layers: self
                .layers
                .iter()
                .map(|l| NmLayerState {
                    name: l.layer.name.clone(),
                    mask: l.mask.clone(),
                    lbc: l.lbc.as_ref().map(|s| s.export_state()).unwrap_or_default(),
                })
                .collect(),
        }
    }

    /// Restores a [`NmSparsifier::state`] (same layers, same order) after the weights have been
    /// loaded; fails naming the layer that does not fit.
    pub fn restore(&mut self, state: &NmState) -> Result<(), LbcError> {
        if state.layers.len() != self.layers.len() {
            return Err(LbcError::Shape(format!(
                "N:M state has {} layers, the model {}",
                state.layers.len(),
                self.layers.len()
            )));
        }
        for (l, s) in self.layers.iter_mut().zip(&state.layers) {
            if s.name != l.layer.name
                || (s.mask.rows(), s.mask.fan_in()) != (l.mask.rows(), l.mask.fan_in())
            {
                return Err(LbcError::Shape(format!(
                    "N:M state layer `{}` does not fit layer `{}`",
                    s.name, l.layer.name
                )));
            }
            if let Some(lbc) = l.lbc.as_mut() {
                lbc.import_state(&s.lbc)
                    .map_err(|e| LbcError::Shape(format!("layer `{}`: {e}", s.name)))?;
            }
            l.layer.set_mask(&s.mask)?;
            l.mask = s.mask.clone();
        }
        self.started = state.started;
        self.lbc_epoch = None;
        Ok(())
    }

    /// The current masks.
    pub fn masks(&self) -> Vec<(String, Mask)> {
        self.layers
            .iter()
            .map(|l| (l.layer.name.clone(), l.mask.clone()))
            .collect()
    }

    /// Exports every layer (`W ⊙ B`) to [`NmSparse`]; fails unless every mask is exactly N:M
    /// (LBC before `t_f` is not).
    pub fn export(&self) -> Result<Vec<(String, NmSparse)>, LbcError> {
        self.layers
            .iter()
            .map(|l| {
                let (rows, fan_in) = (l.mask.rows(), l.mask.fan_in());
                let w = weights_of(&l.layer.weight)?;
                Ok((
                    l.layer.name.clone(),
                    NmSparse::from_dense(rows, fan_in, l.pattern, &w, &l.mask)?,
                ))
            })
            .collect()
    }
}

fn method_err(e: LbcError) -> DstError {
    DstError::Method(Box::new(e))
}

/// The training-loop protocol: masks set before the forward pass (with the scores' learning
/// rate following the weights'), gradients rewritten after the backward pass. Checkpoint
/// tensors: `nm.<weight>` (mask, `u8`), `lbc.<weight>.<field>` (LBC state, `f64`) and
/// `nm.started` (`u8`, whether the first masks were chosen).
impl Sparsify for NmSparsifier {
    fn before_forward(&mut self, _step: usize, epoch: usize, lr: f64) -> dst_core::Result<()> {
        self.set_score_lr(lr as f32);
        NmSparsifier::before_forward(self, epoch).map_err(method_err)
    }

    fn after_backward(&mut self, grads: &mut GradStore) -> dst_core::Result<()> {
        NmSparsifier::after_backward(self, grads).map_err(method_err)
    }

    fn masks(&self) -> Vec<(String, Mask)> {
        NmSparsifier::masks(self)
    }

    fn masks_final(&self) -> bool {
        NmSparsifier::masks_final(self)
    }

    fn save(&self) -> dst_core::Result<Vec<(String, Tensor)>> {
        let st = self.state();
        let cpu = &Device::Cpu;
        let mut out = vec![(
            "nm.started".to_string(),
            Tensor::new(&[u8::from(st.started)], cpu)?,
        )];
        for l in &st.layers {
            out.push((
                format!("nm.{}", l.name),
                l.mask.to_tensor_dtype(DType::U8, cpu)?,
            ));
            for (field, v) in &l.lbc {
                let t = Tensor::from_vec(v.clone(), v.len(), cpu)?;
                out.push((format!("lbc.{}.{field}", l.name), t));
            }
        }
        Ok(out)
    }

    fn restore(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        _opt: &mut dyn MaskAware,
    ) -> dst_core::Result<()> {
        let started = saved(tensors, "nm.started")?.to_vec1::<u8>()?;
        let cur = self.state();
        let mut layers = Vec::with_capacity(cur.layers.len());
        for l in &cur.layers {
            let mut lbc = Vec::with_capacity(l.lbc.len());
            for (field, _) in &l.lbc {
                let t = saved(tensors, &format!("lbc.{}.{field}", l.name))?;
                lbc.push((field.clone(), t.to_dtype(DType::F64)?.to_vec1::<f64>()?));
            }
            // Fields a fresh state does not have yet (AdamW's moments appear with its first
            // step), in name order.
            let prefix = format!("lbc.{}.", l.name);
            let mut extra: Vec<(&String, &Tensor)> = tensors
                .iter()
                .filter(|(k, _)| {
                    k.strip_prefix(&prefix)
                        .is_some_and(|f| !l.lbc.iter().any(|(n, _)| n == f))
                })
                .collect();
            extra.sort_by_key(|(k, _)| k.as_str());
            for (k, t) in extra {
                let field = k[prefix.len()..].to_string();
                lbc.push((field, t.to_dtype(DType::F64)?.to_vec1::<f64>()?));
            }
            let mask = Mask::from_tensor(saved(tensors, &format!("nm.{}", l.name))?)?;
            layers.push(NmLayerState {
                name: l.name.clone(),
                mask,
                lbc,
            });
        }
        let state = NmState {
            started: started.first() == Some(&1),
            layers,
        };
        NmSparsifier::restore(self, &state).map_err(method_err)
    }
}
