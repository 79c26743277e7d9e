//! A first training loop: an MLP of [`dst_core`] sparse layers on an [`ImageSet`], dense or with
//! any dst-core method, seeded shuffling, SGD with momentum and a cosine learning rate, and
//! per-epoch evaluation reported through a callback (the library prints nothing).
//!
//! This is the slice of the models issue that trains LeNet-300-100 on Fashion-MNIST; the
//! general `Trainer` (other architectures, LBC, checkpoints, resume, metrics files) is to come.

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{loss, VarBuilder, VarMap};
use dst_core::layers::{sparse_linear, SparseLinear};
use dst_core::optim::{MaskAware, MaskedSgd, SgdConfig};
use dst_core::{Method, Rng, Sparsifier, SparsifierConfig};
use serde::{Deserialize, Serialize};

use crate::data::ImageSet;

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting is unusable.
    #[error("invalid setting `{field}`: {reason}")]
    Config {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// From dst-core.
    #[error(transparent)]
    Dst(#[from] dst_core::DstError),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Settings of an MLP run (serde, so that configs can be files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// Layer widths, input first (LeNet-300-100: 784, 300, 100, 10).
    pub widths: Vec<usize>,
    /// Dynamic-sparse-training method; `None` trains dense.
    pub method: Option<Method>,
    /// Global sparsity (ERK) when a method is set.
    pub sparsity: f64,
    /// Epochs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Peak learning rate (cosine decay to 0 over the run).
    pub lr: f64,
    /// SGD momentum (Nesterov).
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Mask update period ΔT (optimiser steps).
    pub delta_t: usize,
    /// Seed of initialisation, masks and shuffling.
    pub seed: u64,
    /// Train on the first `limit` examples only.
    pub limit: Option<usize>,
}

impl MlpConfig {
    /// LeNet-300-100 with SRigL at 90% (ERK), 20 epochs of batch 128, lr 0.1.
    pub fn lenet_300_100_srigl() -> Self {
        MlpConfig {
            widths: vec![784, 300, 100, 10],
            method: Some(Method::Srigl),
            sparsity: 0.9,
            epochs: 20,
            batch_size: 128,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            delta_t: 100,
            seed: 1,
            limit: None,
        }
    }
}

/// What one epoch did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Optimiser steps so far.
    pub step: usize,
    /// Mean training loss of the epoch.
    pub train_loss: f32,
    /// Test loss.
    pub test_loss: f32,
    /// Test accuracy.
    pub test_accuracy: f32,
    /// Global sparsity of the sparsified layers (0 when dense).
    pub sparsity: f64,
    /// Ablated neurons over all layers.
    pub ablated_neurons: usize,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Seconds since the start.
    pub wall_s: f64,
}

/// Fashion-MNIST's pixel mean and standard deviation (on [0, 1] pixels).
const MEAN: f32 = 0.2860;
const STD: f32 = 0.3530;

fn batch(set: &ImageSet, idx: &[usize], dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let d = set.rows * set.cols;
    let mut x = Vec::with_capacity(idx.len() * d);
    for &i in idx {
        x.extend(
            set.images[i * d..(i + 1) * d]
                .iter()
                .map(|p| (p - MEAN) / STD),
        );
    }
    let y: Vec<u32> = idx.iter().map(|&i| set.labels[i] as u32).collect();
    Ok((
        Tensor::from_vec(x, (idx.len(), d), dev)?,
        Tensor::from_vec(y, idx.len(), dev)?,
    ))
}

fn forward(layers: &[SparseLinear], x: &Tensor) -> candle_core::Result<Tensor> {
    let mut h = x.clone();
    for (i, l) in layers.iter().enumerate() {
        h = l.forward(&h)?;
        if i + 1 < layers.len() {
            h = h.relu()?;
        }
    }
    Ok(h)
}

fn evaluate(
    layers: &[SparseLinear],
    set: &ImageSet,
    dev: &Device,
) -> candle_core::Result<(f32, f32)> {
    let (mut loss_sum, mut correct) = (0.0f64, 0.0f64);
    let all: Vec<usize> = (0..set.len()).collect();
    for chunk in all.chunks(1000) {
        let (x, y) = batch(set, chunk, dev)?;
        let logits = forward(layers, &x)?;
        loss_sum +=
            loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        correct += logits
            .argmax(D::Minus1)?
            .eq(&y)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let n = set.len().max(1) as f64;
    Ok(((loss_sum / n) as f32, (correct / n) as f32))
}

/// Trains an MLP on `train`, evaluating on `test` after every epoch; `on_epoch` receives each
/// epoch's metrics. Same seed, same result, whatever the thread count.
pub fn train_mlp(
    train: &ImageSet,
    test: &ImageSet,
    cfg: &MlpConfig,
    mut on_epoch: impl FnMut(&EpochMetrics),
) -> Result<Vec<EpochMetrics>, TrainError> {
    let d = train.rows * train.cols;
    if cfg.widths.len() < 2 || cfg.widths[0] != d || *cfg.widths.last().unwrap() != train.classes {
        return Err(TrainError::Config {
            field: "widths",
            reason: format!(
                "{:?} must start at {d} inputs and end at {} classes",
                cfg.widths, train.classes
            ),
        });
    }
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(TrainError::Config {
            field: "batch_size/epochs",
            reason: "must be at least 1".into(),
        });
    }
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let layers: Vec<SparseLinear> = cfg
        .widths
        .windows(2)
        .enumerate()
        .map(|(i, w)| sparse_linear(w[0], w[1], cfg.seed, vb.pp(format!("fc{}", i + 1))))
        .collect::<Result<_, _>>()?;
    let n_train = cfg.limit.map_or(train.len(), |l| l.min(train.len()));
    let steps_per_epoch = n_train.div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * cfg.epochs;
    let mut sparsifier = match cfg.method {
        Some(m) => {
            let mut sc = SparsifierConfig::new(m, cfg.sparsity, total_steps);
            sc.schedule.delta_t = cfg.delta_t;
            sc.seed = cfg.seed;
            Some(Sparsifier::new(
                layers.iter().map(|l| l.weight().clone()).collect(),
                sc,
            )?)
        }
        None => None,
    };
    let sgd = SgdConfig {
        lr: cfg.lr,
        momentum: cfg.momentum,
        nesterov: true,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = MaskedSgd::new(vm.all_vars(), sgd)?;
    if let Some(s) = &sparsifier {
        s.register(&mut opt)?;
    }
    let mut rng = Rng::derive(cfg.seed, &[0x5ef1]);
    let start = Instant::now();
    let mut step = 0;
    let mut history = Vec::with_capacity(cfg.epochs);
    for epoch in 1..=cfg.epochs {
        let mut order: Vec<usize> = (0..n_train).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut loss_sum = 0.0f64;
        for idx in order.chunks(cfg.batch_size) {
            let lr = cfg.lr
                * 0.5
                * (1.0 + (std::f64::consts::PI * step as f64 / total_steps as f64).cos());
            opt.set_learning_rate(lr);
            let (x, y) = batch(train, idx, &dev)?;
            let l = loss::cross_entropy(&forward(&layers, &x)?, &y)?;
            loss_sum += l.to_scalar::<f32>()? as f64;
            let grads = l.backward()?;
            opt.step(&grads)?;
            step += 1;
            if let Some(s) = sparsifier.as_mut() {
                s.step(step, &grads, &mut opt)?;
            }
        }
        let (test_loss, test_accuracy) = evaluate(&layers, test, &dev)?;
        let (sparsity, ablated_neurons) = match &sparsifier {
            Some(s) => (
                s.global_sparsity(),
                s.summary().iter().map(|l| l.ablated_rows).sum(),
            ),
            None => (0.0, 0),
        };
        let m = EpochMetrics {
            epoch,
            step,
            train_loss: (loss_sum / steps_per_epoch as f64) as f32,
            test_loss,
            test_accuracy,
            sparsity,
            ablated_neurons,
            lr: opt.learning_rate(),
            wall_s: start.elapsed().as_secs_f64(),
        };
        on_epoch(&m);
        history.push(m);
    }
    Ok(history)
}
