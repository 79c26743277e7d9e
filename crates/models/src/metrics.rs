//! Metrics of a run: per-layer mask statistics ([`LayerStats`], the workspace's one per-layer
//! statistics type), one [`EpochMetrics`] per epoch, the [`Summary`] of a run, and the
//! `metrics.jsonl` writer ([`MetricsLog`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use sparse_formats::Mask;

pub use sparse_formats::LayerStats;

use crate::error::{file_err, Result};

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
