//! Metrics of a run: per-layer mask statistics ([`LayerStats`], the workspace's one per-layer
//! statistics type), one [`EpochMetrics`] per epoch, the [`Summary`] of a run, and the
//! `metrics.jsonl` writer ([`MetricsLog`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use sparse_formats::Mask;

pub use sparse_formats::LayerStats;

use crate::error::{file_err, Result};

/// Wall seconds a trainer's steps spent in each part of a step, summed over the steps so far
/// ([`crate::Trainer::step_profile`]); the difference of two readings
/// ([`StepProfile::since`]) covers the steps between them. Where a step's time goes without a
/// profiler: the forward and backward passes hold the layer kernels, the backward pass of a
/// mask-update step also the dense gradients RigL and SRigL read, and `mask_update` the
/// update itself (drop, growth, new layouts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepProfile {
    /// Steps counted.
    pub steps: u64,
    /// Of those, steps that updated masks.
    pub update_steps: u64,
    /// Gathering and normalising the batch.
    pub batch_s: f64,
    /// Forward pass and loss.
    pub forward_s: f64,
    /// Backward pass (and the gradients' all-reduce in a data-parallel run).
    pub backward_s: f64,
    /// Optimizer step (and, on a mask-update step, refreshing the dense weights of
    /// sparse-storage layers that the update reads).
    pub optimizer_s: f64,
    /// The method's mask update and the new sparse layouts (0 on other steps).
    pub mask_update_s: f64,
}

impl StepProfile {
    /// The steps counted in `self` but not in the earlier reading `before` (counts saturate at
    /// 0 if `before` is in fact the later one).
    pub fn since(&self, before: &StepProfile) -> StepProfile {
        StepProfile {
            steps: self.steps.saturating_sub(before.steps),
            update_steps: self.update_steps.saturating_sub(before.update_steps),
            batch_s: self.batch_s - before.batch_s,
            forward_s: self.forward_s - before.forward_s,
            backward_s: self.backward_s - before.backward_s,
            optimizer_s: self.optimizer_s - before.optimizer_s,
            mask_update_s: self.mask_update_s - before.mask_update_s,
        }
    }

    /// Total seconds of the counted steps.
    pub fn total_s(&self) -> f64 {
        self.batch_s + self.forward_s + self.backward_s + self.optimizer_s + self.mask_update_s
    }

    /// One line, milliseconds per step for each part (`mask update` also per update step).
    pub fn per_step_line(&self) -> String {
        let ms = |s: f64| 1e3 * s / self.steps.max(1) as f64;
        format!(
            "batch {:.2} · forward {:.2} · backward {:.2} · optimizer {:.2} · mask update {:.2} ms/step ({:.1} ms per update, {} updates) · total {:.2} ms/step",
            ms(self.batch_s),
            ms(self.forward_s),
            ms(self.backward_s),
            ms(self.optimizer_s),
            ms(self.mask_update_s),
            1e3 * self.mask_update_s / self.update_steps.max(1) as f64,
            self.update_steps,
            ms(self.total_s()),
        )
    }
}

/// What one epoch did (one line of `metrics.jsonl`, `"kind": "epoch"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Optimizer steps so far.
    pub step: usize,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f32,
    /// Training accuracy over the epoch's batches (as seen during training).
    pub train_accuracy: f32,
    /// Validation loss and accuracy (when there is a validation set).
    pub validation: Option<(f32, f32)>,
    /// Test loss.
    pub test_loss: f32,
    /// Test accuracy.
    pub test_accuracy: f32,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Global sparsity of the weight layers.
    pub sparsity: f64,
    /// Ablated neurons over all layers.
    pub ablated_neurons: usize,
    /// In-time over-parameterisation: fraction of weights ever active (dst methods).
    pub itop: Option<f64>,
    /// Per weight layer.
    pub layers: Vec<LayerStats>,
    /// Seconds of training so far (across resumes).
    pub wall_s: f64,
}

/// The outcome of a run ([`crate::Trainer::run`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Final test accuracy.
    pub test_accuracy: f32,
    /// Final test loss.
    pub test_loss: f32,
    /// Global sparsity of the weight layers.
    pub sparsity: f64,
    /// Per weight layer.
    pub layers: Vec<LayerStats>,
    /// Optimizer steps done.
    pub steps: usize,
    /// Epochs completed.
    pub epochs: usize,
    /// True if a [`crate::Control::Stop`] ended the run early.
    pub stopped: bool,
    /// Seconds of training (across resumes).
    pub wall_s: f64,
    /// Every epoch's metrics.
    pub history: Vec<EpochMetrics>,
}

/// Per-layer statistics of named masks.
pub fn layer_stats(masks: &[(String, Mask)]) -> Vec<LayerStats> {
    masks.iter().map(|(n, m)| LayerStats::of(n, m)).collect()
}

/// Fraction of inactive weights over all `masks` together.
pub fn global_sparsity(masks: &[(String, Mask)]) -> f64 {
    let (nnz, total) = masks
        .iter()
        .fold((0, 0), |(n, t), (_, m)| (n + m.nnz(), t + m.len()));
    1.0 - nnz as f64 / total.max(1) as f64
}

/// Examples whose arg-max logit is the label.
pub fn correct_count(logits: &Tensor, y: &Tensor) -> candle_core::Result<f32> {
    logits
        .argmax(D::Minus1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()
}

/// Appends records to a run's `metrics.jsonl`: one JSON object per line with a `"kind"` field
/// (`"epoch"`, `"mask-update"`).
#[derive(Debug, Clone)]
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// The log of the run folder `dir`.
    pub fn in_dir(dir: &Path) -> MetricsLog {
        MetricsLog {
            path: dir.join("metrics.jsonl"),
        }
    }

    /// Appends `{"kind": kind, ...record}`.
    pub fn append(&self, kind: &str, record: &impl Serialize) -> Result<()> {
        let mut v = serde_json::to_value(record).expect("metrics serialise");
        if let serde_json::Value::Object(map) = &mut v {
            map.insert("kind".into(), kind.into());
        }
        let mut line = serde_json::to_string(&v).expect("metrics serialise");
        line.push('\n');
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| file_err(&self.path, format!("cannot append metrics: {e}")))
    }

    /// Drops the records after step `step` (a resumed run continues from there), atomically.
    pub fn truncate_after(&self, step: usize) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::checkpoint::write_atomic(&self.path, kept.as_bytes())
    }
}
