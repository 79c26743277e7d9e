//! [`Sparsifier`]: owns the layers' masks, the schedule and the method; a training loop calls
//! [`Sparsifier::step`] after every optimiser step.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sparse_formats::{LayerStats, Mask};

use crate::distribution::{allocate, Distribution, LayerBudget, LayerSpec};
use crate::error::{DstError, Result};
use crate::layers::SparseParam;
use crate::optim::MaskAware;
use crate::rng::Rng;
use crate::schedule::UpdateSchedule;
use crate::sparsify::{saved, Sparsify};
use crate::update::{
    initial_mask, layer_mask_update, sparse_init, Method, SriglParams, UpdateInput, UpdateParams,
    UpdateStats,
};
use sparse_kernels::storage::with_f32;

/// Everything the sparsifier needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparsifierConfig {
    /// The method.
    pub method: Method,
    /// Global target sparsity in `[0, 1)`.
    pub sparsity: f64,
    /// How it is spread over layers.
    pub distribution: Distribution,
    /// When masks change.
    pub schedule: UpdateSchedule,
    /// Seed of every random choice (initial masks, sparse init, SET growth, tie noise).
    pub seed: u64,
    /// Layers kept dense (by weight name, e.g. `fc1.weight`).
    pub dense_layers: Vec<String>,
    /// Layers never ablated (SRigL). `None` protects the last layer (the output layer), which
    /// the reference intends but never does (docs/algorithms.md §6).
    pub protected_layers: Option<Vec<String>>,
    /// SRigL settings.
    pub srigl: SriglParams,
    /// Std of seeded noise on drop scores (0 = deterministic index tie-break only).
    pub tie_noise: f32,
    /// Re-initialise the active weights with sparse He init `N(0, 2/k)` when the masks are
    /// first set (otherwise the layers' dense initialisation is kept, masked). Default: as the
    /// method's reference does ([`Method::reference_sparse_init`]: SRigL only).
    pub sparse_init: bool,
}

impl SparsifierConfig {
    /// Defaults of the SRigL paper (ERK, ΔT = 100, α = 0.3 cosine, γ_sal = 0.3; the
    /// initialisation of `method`'s reference) for a run of
    /// `total_steps` optimiser steps (T_end at [`T_END_FRACTION`](crate::schedule::T_END_FRACTION)).
    pub fn new(method: Method, sparsity: f64, total_steps: usize) -> Self {
        SparsifierConfig {
            method,
            sparsity,
            distribution: Distribution::default(),
            schedule: UpdateSchedule::for_run(total_steps),
            seed: 0,
            dense_layers: Vec::new(),
            protected_layers: None,
            srigl: SriglParams::default(),
            tie_noise: 0.0,
            sparse_init: method.reference_sparse_init(),
        }
    }
}

impl SparsifierConfig {
    /// Checks every setting (finite, in range) before anything is built; the error names the
    /// setting (`sparsity`, `delta_t`, `alpha`, `gamma_sal`, `tie_noise`,
    /// `distribution.power_scale`) and its valid range. The one validation of these settings:
    /// [`Sparsifier::new`] and the trainer's config call it.
    pub fn validate(&self) -> Result<()> {
        let check = |field: &'static str, v: f64, ok: bool, range: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(DstError::Config {
                    field,
                    reason: format!("{v} is outside {range}"),
                })
            }
        };
        let s = self.sparsity;
        check("sparsity", s, (0.0..1.0).contains(&s), "[0, 1)")?;
        self.schedule.validate()?;
        let g = self.srigl.gamma_sal;
        check("gamma_sal", g, g >= 0.0, "[0, ∞)")?;
        let t = f64::from(self.tie_noise);
        check("tie_noise", t, t >= 0.0, "[0, ∞)")?;
        if let Distribution::Erk { power_scale: p } = self.distribution {
            check("distribution.power_scale", p, p >= 0.0, "[0, ∞)")?;
        }
        Ok(())
    }
}

/// What one layer did at one update.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerReport {
    /// Weight name.
    pub name: String,
    /// Counts.
    #[serde(flatten)]
    pub stats: UpdateStats,
}

/// What one update did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpdateReport {
    /// Optimiser step.
    pub step: usize,
    /// α_t.
    pub drop_fraction: f64,
    /// Per sparse layer.
    pub layers: Vec<LayerReport>,
    /// In-time over-parameterisation: fraction of the sparse layers' weights ever active.
    pub itop: f64,
}

struct Layer {
    param: SparseParam,
    budget: LayerBudget,
    protected: bool,
    ever_active: Mask,
    /// Sum of the dense gradients of the accumulation window so far (empty outside one).
    grad_sum: Vec<f32>,
}

/// Owns the masks of a model's sparse layers and updates them on schedule.
pub struct Sparsifier {
    cfg: SparsifierConfig,
    layers: Vec<Layer>,
}

impl Sparsifier {
    /// Allocates the budgets, draws the initial masks (seeded) and applies them to the weights.
    pub fn new(params: Vec<SparseParam>, cfg: SparsifierConfig) -> Result<Self> {
        cfg.validate()?;
        let names: Vec<&str> = params.iter().map(|p| p.name()).collect();
        let lists = [
            ("dense_layers", Some(&cfg.dense_layers)),
            ("protected_layers", cfg.protected_layers.as_ref()),
        ];
        for (field, list) in lists {
            for n in list.into_iter().flatten() {
                if !names.contains(&n.as_str()) {
                    return Err(DstError::Config {
                        field,
                        reason: format!("unknown layer `{n}` (layers: {})", names.join(", ")),
                    });
                }
            }
        }
        let specs: Vec<LayerSpec> = params
            .iter()
            .map(|p| LayerSpec {
                name: p.name().to_string(),
                shape: p.shape(),
                dense: cfg.dense_layers.iter().any(|d| d == p.name()),
            })
            .collect();
        let budgets = allocate(&specs, cfg.sparsity, cfg.distribution)?;
        let last = params.len().saturating_sub(1);
        let mut layers = Vec::with_capacity(params.len());
        for (i, (param, budget)) in params.into_iter().zip(budgets).enumerate() {
            let protected = match &cfg.protected_layers {
                None => i == last,
                Some(list) => list.iter().any(|n| n == param.name()),
            };
            let (rows, fan_in) = (param.rows(), param.fan_in());
            let mask = if budget.dense {
                Mask::ones(rows, fan_in)
            } else {
                let mut rng = Rng::derive(cfg.seed, &[i as u64, 0x1417]);
                initial_mask(
                    cfg.method,
                    param.name(),
                    rows,
                    fan_in,
                    budget.budget,
                    &mut rng,
                )?
            };
            let weights = if cfg.sparse_init && !budget.dense {
                sparse_init(&mask, &mut Rng::derive(cfg.seed, &[i as u64, 0x1e17]))
            } else {
                param.weights()?
            };
            param.set(mask.clone(), weights)?;
            layers.push(Layer {
                param,
                budget,
                protected,
                ever_active: mask,
                grad_sum: Vec::new(),
            });
        }
        Ok(Sparsifier { cfg, layers })
    }

    /// The configuration.
    pub fn config(&self) -> &SparsifierConfig {
        &self.cfg
    }

    /// The budgets chosen by the distribution.
    pub fn budgets(&self) -> Vec<LayerBudget> {
        self.layers.iter().map(|l| l.budget.clone()).collect()
    }

    /// The managed weights.
    pub fn params(&self) -> Vec<SparseParam> {
        self.layers.iter().map(|l| l.param.clone()).collect()
    }

    /// Hands every sparse layer's mask to the optimizer (call once after building it).
    pub fn register(&self, opt: &mut (impl MaskAware + ?Sized)) -> Result<()> {
        for l in self.layers.iter().filter(|l| !l.budget.dense) {
            opt.set_mask(l.param.var(), &l.param.mask_tensor()?)?;
        }
        Ok(())
    }

    /// Call after optimiser step number `step` (1-based) with that step's gradients. On an
    /// update step, computes every sparse layer's new mask from the post-step weights and the
    /// dense gradients, applies it to weights and optimizer state, and returns a report.
    pub fn step(
        &mut self,
        step: usize,
        grads: &GradStore,
        opt: &mut (impl MaskAware + ?Sized),
    ) -> Result<Option<UpdateReport>> {
        if self.cfg.method == Method::Static {
            return Ok(None);
        }
        let accumulates = self.accumulates();
        if !self.cfg.schedule.is_update_step(step) {
            if accumulates && self.cfg.schedule.in_accumulation_window(step) {
                self.accumulate(grads)?;
            }
            return Ok(None);
        }
        let n_acc = self.cfg.schedule.grad_accumulation;
        let drop_fraction = self.cfg.schedule.drop_fraction(step);
        let (method, cfg) = (self.cfg.method, &self.cfg);
        // Layers are independent: their new masks are computed and applied to their weights in
        // parallel (each from its own seed-derived streams, so the result does not depend on the
        // thread count); the optimizer then takes the new masks in layer order.
        // Where the optimizer holds a layer's active weights in position order (a sparse
        // engine), the update reads them there rather than scanning the dense weight.
        let stored: Vec<Option<Tensor>> = self
            .layers
            .iter()
            .map(|l| opt.active_weights(l.param.var()))
            .collect();
        let stats: Vec<Option<UpdateStats>> = self
            .layers
            .par_iter_mut()
            .zip(&stored)
            .enumerate()
            .map(|(i, (l, stored))| -> Result<_> {
                if l.budget.dense {
                    // `update_layer` leaves it alone too; this skips reading its tensors.
                    return Ok(None);
                }
                let name = l.param.name();
                let params = UpdateParams {
                    drop_fraction,
                    seed: cfg.seed,
                    step: step as u64,
                    layer_index: i as u64,
                    tie_noise: cfg.tie_noise,
                    srigl: cfg.srigl,
                };
                // Mask, weights and gradient are read where they are stored (no copies of the
                // dense arrays); the guards are released before the weights are written.
                let update = l.param.with_mask(|old| {
                    let run = |weights: &[f32], grad: Option<&[f32]>| {
                        let select = |active_weights: Option<&[f32]>| {
                            let input = UpdateInput {
                                name,
                                weights,
                                grad,
                                mask: old,
                                budget: l.budget.budget,
                                protected: l.protected,
                                active_weights,
                            };
                            layer_mask_update(method, &input, &params)
                        };
                        match stored {
                            Some(t) => with_f32(t, |v| select(Some(v)))?,
                            None => select(None),
                        }
                    };
                    let selected = with_f32(l.param.var().as_tensor(), |weights| {
                        match grads.get(l.param.var()) {
                            // The mean over the window: the earlier steps' sum plus this step's.
                            Some(g) if accumulates => with_f32(g, |g| {
                                let mut mean = std::mem::take(&mut l.grad_sum);
                                if mean.is_empty() {
                                    mean = vec![0.0; g.len()];
                                }
                                let inv = 1.0 / n_acc as f32;
                                for (m, &g) in mean.iter_mut().zip(g) {
                                    *m = (*m + g) * inv;
                                }
                                run(weights, Some(&mean))
                            })?,
                            Some(g) => with_f32(g, |g| run(weights, Some(g)))?,
                            None if matches!(method, Method::Rigl | Method::Srigl) => {
                                Err(DstError::layer(
                                    name,
                                    "no gradient for this weight in the gradient store",
                                ))
                            }
                            None => run(weights, None),
                        }
                    })??;
                    Ok::<_, DstError>(selected)
                })?;
                let Some(update) = update else {
                    return Ok(None);
                };
                l.ever_active.union_with(&update.mask)?;
                if stored.is_some() {
                    // The optimizer holds the weights (sparse storage) and lays them out for
                    // the new mask itself; the dense weight is its mirror, refreshed before it
                    // is read, so the change is not applied to it here.
                    l.param.replace_mask(update.mask)?;
                } else {
                    l.param.change_mask(update.mask)?;
                }
                Ok(Some(update.stats))
            })
            .collect::<Result<_>>()?;
        let mut reports = Vec::new();
        for (l, st) in self.layers.iter().zip(stats) {
            let Some(st) = st else {
                continue;
            };
            if opt.manages(l.param.var()) {
                opt.set_mask(l.param.var(), &l.param.mask_tensor()?)?;
            }
            reports.push(LayerReport {
                name: l.param.name().to_string(),
                stats: st,
            });
        }
        Ok(Some(UpdateReport {
            step,
            drop_fraction,
            layers: reports,
            itop: self.itop(),
        }))
    }

    /// Whether updates average dense gradients over a window of more than one step (RigL and
    /// SRigL grow by gradients; SET and Static read none).
    fn accumulates(&self) -> bool {
        self.cfg.schedule.grad_accumulation > 1
            && matches!(self.cfg.method, Method::Rigl | Method::Srigl)
    }

    /// Adds a window step's dense gradients to the layers' sums.
    fn accumulate(&mut self, grads: &GradStore) -> Result<()> {
        self.layers
            .par_iter_mut()
            .filter(|l| !l.budget.dense)
            .try_for_each(|l| -> Result<()> {
                let g = grads.get(l.param.var()).ok_or_else(|| {
                    DstError::layer(
                        l.param.name(),
                        "no gradient for this weight in the gradient store",
                    )
                })?;
                with_f32(g, |g| {
                    if l.grad_sum.is_empty() {
                        l.grad_sum = g.to_vec();
                    } else {
                        l.grad_sum.iter_mut().zip(g).for_each(|(s, &g)| *s += g);
                    }
                })?;
                Ok(())
            })
    }

    /// Per managed layer, the union of every mask it has had (what [`Sparsifier::itop`] counts);
    /// saved in checkpoints.
    pub fn ever_active(&self) -> Vec<Mask> {
        self.layers.iter().map(|l| l.ever_active.clone()).collect()
    }

    /// Restores the masks and ITOP unions of a checkpoint (one of each per managed layer, in
    /// order) after the weights themselves have been loaded, and hands the masks to `opt`.
    /// Fails naming the layer whose mask does not fit.
    pub fn restore(
        &mut self,
        masks: Vec<Mask>,
        ever_active: Vec<Mask>,
        opt: &mut (impl MaskAware + ?Sized),
    ) -> Result<()> {
        if masks.len() != self.layers.len() || ever_active.len() != self.layers.len() {
            return Err(DstError::Config {
                field: "masks",
                reason: format!(
                    "{} masks and {} ITOP masks for {} layers",
                    masks.len(),
                    ever_active.len(),
                    self.layers.len()
                ),
            });
        }
        for ((l, mask), ever) in self.layers.iter_mut().zip(masks).zip(ever_active) {
            let (rows, fan_in) = (l.param.rows(), l.param.fan_in());
            for m in [&mask, &ever] {
                if (m.rows(), m.fan_in()) != (rows, fan_in) {
                    return Err(DstError::layer(
                        l.param.name(),
                        format!(
                            "checkpoint mask is {}x{}, the layer is {rows}x{fan_in}",
                            m.rows(),
                            m.fan_in()
                        ),
                    ));
                }
            }
            let weights = l.param.weights()?;
            l.param.set(mask, weights)?;
            l.ever_active = ever;
            if !l.budget.dense {
                opt.set_mask(l.param.var(), &l.param.mask_tensor()?)?;
            }
        }
        Ok(())
    }

    /// Fraction of the sparse layers' weights that have ever been active (ITOP).
    pub fn itop(&self) -> f64 {
        let (ever, total) = self
            .layers
            .iter()
            .filter(|l| !l.budget.dense)
            .fold((0, 0), |(e, t), l| {
                (e + l.ever_active.nnz(), t + l.ever_active.len())
            });
        if total == 0 {
            0.0
        } else {
            ever as f64 / total as f64
        }
    }

    /// Current per-layer statistics (which layers are dense: [`Sparsifier::budgets`]).
    pub fn summary(&self) -> Vec<LayerStats> {
        self.layers
            .iter()
            .map(|l| LayerStats::of(l.param.name(), &l.param.mask()))
            .collect()
    }

    /// Global sparsity over all managed layers (dense ones included).
    pub fn global_sparsity(&self) -> f64 {
        let (nnz, total) = self.layers.iter().fold((0, 0), |(n, t), l| {
            let m = l.param.mask();
            (n + m.nnz(), t + m.len())
        });
        1.0 - nnz as f64 / total.max(1) as f64
    }
}

/// Checkpoint tensors: `mask.<weight>` (the mask) and `ever.<weight>` (its ITOP union), `u8`;
/// inside a dense-gradient accumulation window also `gradsum.<weight>` (`f32`).
impl Sparsify for Sparsifier {
    fn register(&self, opt: &mut dyn MaskAware) -> Result<()> {
        Sparsifier::register(self, opt)
    }

    fn needs_dense_grad(&self, step: usize) -> bool {
        match self.cfg.method {
            Method::Static => false,
            _ if self.accumulates() => self.cfg.schedule.in_accumulation_window(step),
            _ => self.cfg.schedule.is_update_step(step),
        }
    }

    fn after_step(
        &mut self,
        step: usize,
        grads: &GradStore,
        opt: &mut dyn MaskAware,
    ) -> Result<Option<UpdateReport>> {
        self.step(step, grads, opt)
    }

    fn masks(&self) -> Vec<(String, Mask)> {
        self.layers
            .iter()
            .map(|l| (l.param.name().to_string(), l.param.mask()))
            .collect()
    }

    fn itop(&self) -> Option<f64> {
        Some(Sparsifier::itop(self))
    }

    fn save(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.layers.len());
        for l in &self.layers {
            let name = l.param.name();
            let mask = l.param.mask().to_tensor_dtype(DType::U8, &Device::Cpu)?;
            let ever = l.ever_active.to_tensor_dtype(DType::U8, &Device::Cpu)?;
            out.push((format!("mask.{name}"), mask));
            out.push((format!("ever.{name}"), ever));
            if !l.grad_sum.is_empty() {
                // Mid-window: the gradients summed so far.
                let sum = Tensor::from_slice(&l.grad_sum, l.grad_sum.len(), &Device::Cpu)?;
                out.push((format!("gradsum.{name}"), sum));
            }
        }
        Ok(out)
    }

    fn restore(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        opt: &mut dyn MaskAware,
    ) -> Result<()> {
        let mut masks = Vec::with_capacity(self.layers.len());
        let mut ever = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let name = l.param.name();
            masks.push(Mask::from_tensor(saved(tensors, &format!("mask.{name}"))?)?);
            ever.push(Mask::from_tensor(saved(tensors, &format!("ever.{name}"))?)?);
        }
        Sparsifier::restore(self, masks, ever, opt)?;
        for l in &mut self.layers {
            l.grad_sum = match tensors.get(&format!("gradsum.{}", l.param.name())) {
                Some(t) => {
                    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    if v.len() != l.param.rows() * l.param.fan_in() {
                        return Err(DstError::layer(
                            l.param.name(),
                            format!("checkpoint gradient sum has {} values", v.len()),
                        ));
                    }
                    v
                }
                None => Vec::new(),
            };
        }
        Ok(())
    }
}
