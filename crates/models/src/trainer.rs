//! The [`Trainer`]: builds the network and the method's sparsifier from a [`TrainConfig`], runs
//! the training loop with per-epoch evaluation, reports through a [`Progress`] callback (the
//! library prints nothing), writes metrics as JSON lines and checkpoints when given an output
//! folder, and resumes exactly from a checkpoint.
//!
//! Order of one step (dst methods, srigl-rigl.md §1.6): forward, backward, optimizer step, then
//! the sparsifier's mask update on update steps, with that step's dense gradients. N:M methods:
//! the masks for the epoch are set before the forward pass, the gradients rewritten after the
//! backward pass (lbc-nm.md §1.5), then the optimizer step.
//!
//! Determinism: initialisation, masks, the validation split and the shuffle of every epoch are
//! drawn from streams derived from `(seed, ...)`, not from a running generator, so a run resumed
//! from a checkpoint (even one written mid-epoch) continues exactly as the uninterrupted run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, TensorId, Var, D};
use candle_nn::{VarBuilder, VarMap};
use dst_core::optim::MaskAware;
use dst_core::{Rng, SparseParam, Sparsifier, SparsifierConfig, UpdateReport};
use lbc::lbc::ScoreSgd;
use lbc::schedule::RemovalSchedule;
use lbc::training::{NmLayer, NmLayerState, NmMethod, NmSparsifier, NmState};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sparse_formats::{Mask, NmPattern};

use crate::checkpoint::{self, CheckpointState};
use crate::config::{EngineKind, MethodName, TrainConfig};
use crate::data::{find_dataset, load_cifar10, load_mnist_like, DataError, ImageSet, Split};
use crate::engine::EngineLayer;
use crate::nets::{LayerFactory, LayerKind, Network};

/// Errors of training; each names the setting, file or step at fault.
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
    /// The loss became NaN or infinite.
    #[error(
        "training diverged at step {step} (epoch {epoch}): loss is {loss}; {}",
        match checkpoint {
            Some(p) => format!("the last good checkpoint is kept in {}", p.display()),
            None => "no checkpoint was written".to_string(),
        }
    )]
    Diverged {
        /// Optimizer step (1-based) whose loss was not finite.
        step: usize,
        /// Epoch (1-based).
        epoch: usize,
        /// The loss.
        loss: f32,
        /// The last good checkpoint's folder, if any.
        checkpoint: Option<PathBuf>,
    },
    /// A checkpoint could not be written or read.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// From the data readers.
    #[error(transparent)]
    Data(#[from] DataError),
    /// From dst-core.
    #[error(transparent)]
    Dst(#[from] dst_core::DstError),
    /// From lbc.
    #[error(transparent)]
    Lbc(#[from] lbc::LbcError),
    /// From sparse-formats.
    #[error(transparent)]
    Format(#[from] sparse_formats::FormatError),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of training.
pub type Result<T> = std::result::Result<T, TrainError>;

/// The three splits a run uses.
#[derive(Debug, Clone)]
pub struct Datasets {
    /// Training examples (after the validation split and `limit`).
    pub train: ImageSet,
    /// Validation examples (empty when `validation_fraction` is 0).
    pub validation: ImageSet,
    /// Test examples.
    pub test: ImageSet,
}

impl Datasets {
    /// Finds and loads the data set named by `cfg.data` (see [`find_dataset`]), then applies
    /// the validation split and `limit`.
    pub fn load(cfg: &TrainConfig) -> Result<Datasets> {
        let d = &cfg.data;
        let dir = find_dataset(&d.name, d.dir.as_deref())?;
        let (train, test) = match d.name.as_str() {
            "fashion-mnist" | "mnist" => (
                load_mnist_like(&dir, Split::Train)?,
                load_mnist_like(&dir, Split::Test)?,
            ),
            "cifar-10" => (
                load_cifar10(&dir, Split::Train)?,
                load_cifar10(&dir, Split::Test)?,
            ),
            other => {
                return Err(TrainError::Config {
                    field: "data.name",
                    reason: format!("unknown data set `{other}` (fashion-mnist, mnist, cifar-10)"),
                })
            }
        };
        Ok(Datasets::split(train, test, cfg))
    }

    /// Applies `cfg.data`'s validation split and `limit` to loaded sets.
    pub fn split(train: ImageSet, test: ImageSet, cfg: &TrainConfig) -> Datasets {
        let (train, validation) = train.split_validation(cfg.data.validation_fraction, cfg.seed);
        let train = match cfg.data.limit {
            Some(l) => train.limit(l),
            None => train,
        };
        Datasets {
            train,
            validation,
            test,
        }
    }
}

/// One layer's mask statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Weight name.
    pub name: String,
    /// `[rows, fan_in]`.
    pub shape: [usize; 2],
    /// Fraction of zero weights.
    pub sparsity: f64,
    /// Smallest fan-in of an active row.
    pub min_fan_in: usize,
    /// Largest fan-in.
    pub max_fan_in: usize,
    /// Rows with no active weight (ablated neurons).
    pub ablated_rows: usize,
}

impl LayerStats {
    fn of(name: &str, mask: &Mask) -> LayerStats {
        let s = mask.stats();
        LayerStats {
            name: name.to_string(),
            shape: s.shape,
            sparsity: 1.0 - s.nnz as f64 / mask.len().max(1) as f64,
            min_fan_in: s.min_fan_in,
            max_fan_in: s.max_fan_in,
            ablated_rows: s.empty_rows,
        }
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

/// What the trainer reports while it runs.
#[derive(Debug)]
pub enum Event<'a> {
    /// The run (or the resumed run) starts.
    Start {
        /// Steps in the whole run.
        total_steps: usize,
        /// Steps per epoch.
        steps_per_epoch: usize,
        /// Steps already done (resumed runs).
        done: usize,
    },
    /// An optimizer step finished.
    Step {
        /// Steps so far.
        step: usize,
        /// 1-based epoch.
        epoch: usize,
        /// The batch's loss.
        loss: f32,
        /// Learning rate used.
        lr: f64,
    },
    /// A mask update happened (dst methods).
    MaskUpdate(&'a UpdateReport),
    /// An epoch finished and was evaluated.
    Epoch(&'a EpochMetrics),
    /// A checkpoint was written to this folder.
    Checkpoint(&'a Path),
}

/// What a front end tells the trainer after each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep going.
    Continue,
    /// Stop after this step (a checkpoint is written first when there is an output folder).
    Stop,
}

/// Receives the trainer's events (progress bars, logs, Ctrl-C handling). `Send`, because a
/// run with `threads` set executes inside its own thread pool.
pub trait Progress {
    /// Called for every event; return [`Control::Stop`] to end the run early.
    fn on_event(&mut self, event: &Event<'_>) -> Control;
}

impl<F: FnMut(&Event<'_>) -> Control> Progress for F {
    fn on_event(&mut self, event: &Event<'_>) -> Control {
        self(event)
    }
}

/// A [`Progress`] that ignores everything.
pub struct Silent;

impl Progress for Silent {
    fn on_event(&mut self, _: &Event<'_>) -> Control {
        Control::Continue
    }
}

/// The outcome of [`Trainer::run`].
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
    /// True if a [`Control::Stop`] ended the run early.
    pub stopped: bool,
    /// Seconds of training (across resumes).
    pub wall_s: f64,
    /// Every epoch's metrics.
    pub history: Vec<EpochMetrics>,
}

/// The method's mask machinery.
enum Engine {
    Dense,
    Dst(Box<Sparsifier>),
    Nm(Box<NmSparsifier>),
}

/// Hands mask changes to the optimizer except for sparse-engine weights, whose dense variable
/// the optimizer does not manage (their stored values are re-laid out instead).
struct EngineShim<'a> {
    opt: &'a mut (dyn MaskAware + Send),
    skip: &'a [TensorId],
}

impl MaskAware for EngineShim<'_> {
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
    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> dst_core::Result<()> {
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
}

/// A training run in progress: network, optimizer, sparsifier, data and counters.
pub struct Trainer {
    cfg: TrainConfig,
    data: Datasets,
    dev: Device,
    varmap: VarMap,
    net: Network,
    params: Vec<SparseParam>,
    nm_layers: Vec<NmLayer>,
    engine: Engine,
    /// Linear layers trained in sparse storage (sparse engine only).
    engine_layers: Vec<EngineLayer>,
    opt: Box<dyn MaskAware + Send>,
    norm: Vec<(f32, f32)>,
    steps_per_epoch: usize,
    total_steps: usize,
    /// Steps done.
    step: usize,
    /// Sums over the current epoch so far: loss, correct, examples.
    epoch_acc: (f64, f64, usize),
    history: Vec<EpochMetrics>,
    wall_before: f64,
    out: Option<PathBuf>,
    last_checkpoint: Option<PathBuf>,
}

/// Examples whose arg-max logit is the label.
fn correct_count(logits: &Tensor, y: &Tensor) -> candle_core::Result<f32> {
    logits
        .argmax(D::Minus1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()
}

fn config_err(field: &'static str, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Config {
        field,
        reason: reason.to_string(),
    }
}

impl Trainer {
    /// Builds the network, optimizer and sparsifier for `cfg` on `data` (seeded: the same
    /// config always builds the same starting point).
    pub fn new(cfg: TrainConfig, data: Datasets) -> Result<Trainer> {
        cfg.validate().map_err(|(f, r)| config_err(f, r))?;
        if data.train.is_empty() {
            return Err(config_err("data", "the training set is empty"));
        }
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let kind = if cfg.method.name.is_nm() {
            LayerKind::Nm
        } else if cfg.engine_for_run() == EngineKind::Sparse {
            LayerKind::Engine
        } else {
            LayerKind::Dst
        };
        let t = &data.train;
        let factory = LayerFactory::new(vb, kind, cfg.seed).keep_dense(&cfg.method.dense_layers);
        let (net, built) =
            Network::build_with(&cfg.model, [t.channels, t.rows, t.cols], t.classes, factory)
                .map_err(|e| config_err("model", e))?;
        if kind == LayerKind::Nm {
            let names: Vec<&str> = built
                .sparse
                .iter()
                .map(|p| p.name())
                .chain(built.nm.iter().map(|l| l.name()))
                .collect();
            if let Some(n) = cfg
                .method
                .dense_layers
                .iter()
                .find(|n| !names.contains(&n.as_str()))
            {
                return Err(config_err(
                    "method.dense_layers",
                    format!("unknown layer `{n}` (layers: {})", names.join(", ")),
                ));
            }
        }
        let steps_per_epoch = t.len().div_ceil(cfg.batch_size);
        let total_steps = steps_per_epoch * cfg.epochs;
        let m = &cfg.method;
        let engine = if let Some(method) = m.name.dst() {
            let mut sc = SparsifierConfig::new(method, m.sparsity, total_steps);
            sc.distribution = m.distribution;
            sc.schedule.delta_t = m.delta_t;
            sc.schedule.alpha = m.alpha;
            sc.schedule.t_end = (m.t_end_fraction * total_steps as f64) as usize;
            sc.seed = cfg.seed;
            sc.dense_layers = m.dense_layers.clone();
            sc.protected_layers = m.protected_layers.clone();
            sc.srigl.gamma_sal = m.gamma_sal;
            sc.srigl.ablation = m.ablation;
            Engine::Dst(Box::new(Sparsifier::new(built.sparse.clone(), sc)?))
        } else if m.name.is_nm() {
            let pattern = NmPattern::new(m.n, m.m);
            let method = match m.name {
                MethodName::Lbc => NmMethod::Lbc {
                    schedule: RemovalSchedule {
                        t_i: m.lbc_t_i,
                        t_f: m.lbc_t_f.unwrap_or((cfg.epochs * 3 / 4).max(1)),
                        power: m.lbc_power,
                    },
                    score_sgd: ScoreSgd {
                        lr: cfg.peak_lr() as f32,
                        momentum: 0.9,
                        weight_decay: 1e-4,
                    },
                    max_scores: 1 << 24,
                },
                MethodName::Srste => NmMethod::SrSte {
                    lambda_w: m.srste_lambda,
                },
                _ => NmMethod::OneShot,
            };
            Engine::Nm(Box::new(
                NmSparsifier::new(built.nm.clone(), pattern, method)
                    .map_err(|e| config_err("method.m", e))?,
            ))
        } else {
            Engine::Dense
        };
        // Sparse engine: compress the linear layers the sparsifier made sparse; the optimizer
        // trains their stored values instead of their dense variables.
        let mut engine_layers = Vec::new();
        if let Engine::Dst(s) = &engine {
            for e in &built.engine {
                let dense = s
                    .budgets()
                    .iter()
                    .any(|b| b.name == e.param().name() && b.dense);
                if !dense {
                    e.compress(&[])?;
                    engine_layers.push(e.clone());
                }
            }
        }
        let skip: Vec<TensorId> = engine_layers
            .iter()
            .map(|e| e.param().var().as_tensor().id())
            .collect();
        let mut vars: Vec<Var> = varmap
            .all_vars()
            .into_iter()
            .filter(|v| !skip.contains(&v.as_tensor().id()))
            .collect();
        vars.extend(engine_layers.iter().filter_map(|e| e.values()));
        let mut opt = cfg.optimizer.build(vars)?;
        if let Engine::Dst(s) = &engine {
            s.register(&mut EngineShim {
                opt: &mut opt,
                skip: &skip,
            })?;
        }
        let norm = data.train.channel_stats();
        Ok(Trainer {
            cfg,
            data,
            dev,
            varmap,
            net,
            params: built.sparse,
            nm_layers: built.nm,
            engine,
            engine_layers,
            opt,
            norm,
            steps_per_epoch,
            total_steps,
            step: 0,
            epoch_acc: (0.0, 0.0, 0),
            history: Vec::new(),
            wall_before: 0.0,
            out: None,
            last_checkpoint: None,
        })
    }

    /// Writes `config.json`, appends to `metrics.jsonl` and keeps checkpoints in `dir`
    /// (created if missing).
    pub fn with_output(mut self, dir: &Path) -> Result<Trainer> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!("cannot create the output folder: {e}"),
        })?;
        let json = serde_json::to_vec_pretty(&self.cfg).expect("config serialises");
        checkpoint::write_atomic(&dir.join("config.json"), &json)?;
        self.out = Some(dir.to_path_buf());
        Ok(self)
    }

    /// The sparse-engine layer whose dense variable is `var`.
    fn engine_of(&self, var: &Var) -> Option<&EngineLayer> {
        self.engine_layers
            .iter()
            .find(|e| e.param().var().as_tensor().id() == var.as_tensor().id())
    }

    fn engine_skip(&self) -> Vec<TensorId> {
        self.engine_layers
            .iter()
            .map(|e| e.param().var().as_tensor().id())
            .collect()
    }

    /// Re-lays every sparse-engine layer out for its new mask, moving the optimizer state.
    fn recompress(&mut self) -> Result<()> {
        let olds: Vec<(Var, Vec<Tensor>)> = self
            .engine_layers
            .iter()
            .map(|e| {
                let old = e.values().expect("engine layers are compressed");
                let state = self.opt.state(&old);
                (old, state)
            })
            .collect();
        // Layers re-lay out independently (in parallel); the optimizer takes them in order.
        let news = self
            .engine_layers
            .par_iter()
            .zip(&olds)
            .map(|(e, (_, state))| e.compress(state))
            .collect::<candle_core::Result<Vec<_>>>()?;
        for ((old, _), (new, new_state)) in olds.iter().zip(news) {
            self.opt.replace_var(old, new, new_state)?;
        }
        Ok(())
    }

    /// Refreshes the dense variables of sparse-engine layers from their stored values.
    fn sync_dense(&self) -> Result<()> {
        self.engine_layers
            .par_iter()
            .try_for_each(|e| e.scatter())?;
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Optimizer steps done.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Steps in the whole run.
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.net
    }

    /// The data.
    pub fn data(&self) -> &Datasets {
        &self.data
    }

    /// The dst-core weights (every linear/conv weight for dense and dst methods).
    pub fn sparse_params(&self) -> &[SparseParam] {
        &self.params
    }

    /// The N:M layers (N:M methods).
    pub fn nm_layers(&self) -> &[NmLayer] {
        &self.nm_layers
    }

    /// The N:M sparsifier (N:M methods).
    pub fn nm_sparsifier(&self) -> Option<&NmSparsifier> {
        match &self.engine {
            Engine::Nm(s) => Some(s),
            _ => None,
        }
    }

    /// Every variable by name (weights, biases, BatchNorm statistics...).
    pub fn variables(&self) -> Vec<(String, Tensor)> {
        // Scatter only fails on a candle error, which the next training step would report.
        let _ = self.sync_dense();
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut v: Vec<(String, Tensor)> = data
            .iter()
            .map(|(k, var)| (k.clone(), var.as_tensor().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The current mask of every weight layer, by weight name, in build order.
    pub fn masks(&self) -> Vec<(String, Mask)> {
        match &self.engine {
            // Layers kept dense (built as dst-core layers) first, then the N:M ones.
            Engine::Nm(s) => self
                .params
                .iter()
                .map(|p| (p.name().to_string(), p.mask()))
                .chain(s.masks())
                .collect(),
            _ => self
                .params
                .iter()
                .map(|p| (p.name().to_string(), p.mask()))
                .collect(),
        }
    }

    /// Per-layer mask statistics.
    pub fn layer_stats(&self) -> Vec<LayerStats> {
        self.masks()
            .iter()
            .map(|(n, m)| LayerStats::of(n, m))
            .collect()
    }

    fn global_sparsity(&self) -> f64 {
        let (nnz, total) = self
            .masks()
            .iter()
            .fold((0, 0), |(n, t), (_, m)| (n + m.nnz(), t + m.len()));
        1.0 - nnz as f64 / total.max(1) as f64
    }

    /// A normalised batch `[b, c, h, w]` and its labels.
    fn batch(&self, set: &ImageSet, idx: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let d = set.image_len();
        let hw = set.rows * set.cols;
        let mut x = Vec::with_capacity(idx.len() * d);
        for &i in idx {
            let img = &set.images[i * d..(i + 1) * d];
            for (c, &(mean, std)) in self.norm.iter().enumerate() {
                x.extend(img[c * hw..(c + 1) * hw].iter().map(|p| (p - mean) / std));
            }
        }
        let y: Vec<u32> = idx.iter().map(|&i| set.labels[i] as u32).collect();
        Ok((
            Tensor::from_vec(x, (idx.len(), set.channels, set.rows, set.cols), &self.dev)?,
            Tensor::from_vec(y, idx.len(), &self.dev)?,
        ))
    }

    /// Cross-entropy with label smoothing ε: `(1−ε)·NLL + ε·mean_c(−log p_c)`.
    fn loss(&self, logits: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let nll = candle_nn::loss::nll(&logp, y)?;
        let eps = self.cfg.label_smoothing;
        if eps == 0.0 {
            return Ok(nll);
        }
        let smooth = logp.mean(D::Minus1)?.mean_all()?.neg()?;
        (nll * (1.0 - eps))? + (smooth * eps)?
    }

    /// Loss (plain cross-entropy) and accuracy on `set`, in eval mode.
    pub fn evaluate(&self, set: &ImageSet) -> Result<(f32, f32)> {
        let (mut loss_sum, mut correct) = (0.0f64, 0.0f64);
        let all: Vec<usize> = (0..set.len()).collect();
        for chunk in all.chunks(1000) {
            let (x, y) = self.batch(set, chunk)?;
            let logits = self.net.forward_t(&x, false)?;
            let l = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
            loss_sum += l as f64 * chunk.len() as f64;
            correct += correct_count(&logits, &y)? as f64;
        }
        let n = set.len().max(1) as f64;
        Ok(((loss_sum / n) as f32, (correct / n) as f32))
    }

    /// The shuffled order of epoch `epoch` (0-based), from its own derived stream.
    fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.train.len()).collect();
        let mut rng = Rng::derive(self.cfg.seed, &[0x5ef1, epoch as u64]);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        order
    }

    /// Trains to the end of the configured epochs.
    pub fn run(&mut self, progress: &mut (dyn Progress + Send)) -> Result<Summary> {
        self.run_until(self.total_steps, progress)
    }

    /// Trains until `steps` optimizer steps are done in total (possibly mid-epoch), or to the
    /// end, or until `progress` asks to stop. With `threads` set, runs in a pool of that size.
    pub fn run_until(
        &mut self,
        steps: usize,
        progress: &mut (dyn Progress + Send),
    ) -> Result<Summary> {
        match self.cfg.threads {
            Some(n) => {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| config_err("threads", e))?;
                pool.install(|| self.run_inner(steps, progress))
            }
            None => self.run_inner(steps, progress),
        }
    }

    fn run_inner(&mut self, steps: usize, progress: &mut (dyn Progress + Send)) -> Result<Summary> {
        let target = steps.min(self.total_steps);
        let start = Instant::now();
        let wall = |t: &Trainer| t.wall_before + start.elapsed().as_secs_f64();
        progress.on_event(&Event::Start {
            total_steps: self.total_steps,
            steps_per_epoch: self.steps_per_epoch,
            done: self.step,
        });
        let mut stopped = false;
        while self.step < target && !stopped {
            let epoch = self.step / self.steps_per_epoch; // 0-based
            let order = self.order(epoch);
            let first = self.step % self.steps_per_epoch;
            for idx in order.chunks(self.cfg.batch_size).skip(first) {
                let (loss, lr, report) = self.train_step(idx, epoch)?;
                if !loss.is_finite() {
                    return Err(TrainError::Diverged {
                        step: self.step,
                        epoch: epoch + 1,
                        loss,
                        checkpoint: self.last_checkpoint.clone(),
                    });
                }
                let mut control = progress.on_event(&Event::Step {
                    step: self.step,
                    epoch: epoch + 1,
                    loss,
                    lr,
                });
                if let Some(r) = &report {
                    self.log_json("mask-update", r)?;
                    if progress.on_event(&Event::MaskUpdate(r)) == Control::Stop {
                        control = Control::Stop;
                    }
                }
                if self.step.is_multiple_of(self.steps_per_epoch) {
                    let m = self.end_epoch(epoch + 1, lr, wall(self))?;
                    if progress.on_event(&Event::Epoch(&m)) == Control::Stop {
                        control = Control::Stop;
                    }
                    let every = self.cfg.checkpoint_every;
                    let last = self.step == self.total_steps;
                    if self.out.is_some()
                        && (last || (every > 0 && (epoch + 1).is_multiple_of(every)))
                    {
                        self.checkpoint_now(wall(self), progress)?;
                    }
                }
                if control == Control::Stop {
                    stopped = true;
                }
                if self.step >= target || stopped {
                    break;
                }
            }
        }
        if stopped && self.out.is_some() && !self.step.is_multiple_of(self.steps_per_epoch) {
            self.checkpoint_now(wall(self), progress)?;
        }
        self.wall_before = wall(self);
        let (test_loss, test_accuracy) = match self.history.last() {
            Some(m) if m.step == self.step => (m.test_loss, m.test_accuracy),
            _ => self.evaluate(&self.data.test)?,
        };
        let summary = Summary {
            test_accuracy,
            test_loss,
            sparsity: self.global_sparsity(),
            layers: self.layer_stats(),
            steps: self.step,
            epochs: self.step / self.steps_per_epoch,
            stopped,
            wall_s: self.wall_before,
            history: self.history.clone(),
        };
        if let Some(out) = &self.out {
            if self.step == self.total_steps {
                let json = serde_json::to_vec_pretty(&summary).expect("summary serialises");
                checkpoint::write_atomic(&out.join("summary.json"), &json)?;
            }
        }
        Ok(summary)
    }

    fn checkpoint_now(&mut self, wall_s: f64, progress: &mut (dyn Progress + Send)) -> Result<()> {
        let dir = self.out.clone().expect("output folder").join("checkpoint");
        self.save_checkpoint_at(&dir, wall_s)?;
        self.last_checkpoint = Some(dir.clone());
        progress.on_event(&Event::Checkpoint(&dir));
        Ok(())
    }

    /// Writes a checkpoint of the current state into `dir` (see [`crate::checkpoint`]).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.save_checkpoint_at(dir, self.wall_before)
    }

    fn save_checkpoint_at(&self, dir: &Path, wall_s: f64) -> Result<()> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        let vars: Vec<(String, candle_core::Var)> = {
            let data = self.varmap.data().lock().expect("varmap lock");
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        // Sparse-engine layers are saved densely (weights and optimizer state), so a checkpoint
        // reads the same whichever engine wrote it.
        self.sync_dense()?;
        for (name, var) in &vars {
            t.insert(format!("var.{name}"), var.as_tensor().copy()?);
            let state = match self.engine_of(var) {
                Some(e) => e.dense_state(&self.opt.state(&e.values().expect("compressed")))?,
                None => self.opt.state(var),
            };
            for (i, s) in state.into_iter().enumerate() {
                t.insert(format!("opt.{name}.{i}"), s);
            }
        }
        let mask_tensor = |m: &Mask| m.to_tensor_dtype(DType::U8, &Device::Cpu);
        let mut nm_started = false;
        match &self.engine {
            Engine::Dense => {}
            Engine::Dst(s) => {
                for (p, ever) in s.params().iter().zip(s.ever_active()) {
                    t.insert(format!("mask.{}", p.name()), mask_tensor(&p.mask())?);
                    t.insert(format!("ever.{}", p.name()), mask_tensor(&ever)?);
                }
            }
            Engine::Nm(s) => {
                let st = s.state();
                nm_started = st.started;
                for l in &st.layers {
                    t.insert(format!("nm.{}", l.name), mask_tensor(&l.mask)?);
                    for (field, v) in &l.lbc {
                        let n = v.len();
                        t.insert(
                            format!("lbc.{}.{field}", l.name),
                            Tensor::from_vec(v.clone(), n, &Device::Cpu)?,
                        );
                    }
                }
            }
        }
        let state = CheckpointState {
            format_version: checkpoint::FORMAT_VERSION,
            step: self.step,
            epoch_acc: self.epoch_acc,
            optimizer_steps: self.opt.steps(),
            nm_started,
            wall_s,
            tensors: String::new(),
            config: self.cfg.clone(),
            history: self.history.clone(),
        };
        checkpoint::save(dir, state, &t)?;
        Ok(())
    }

    /// The configuration stored in the checkpoint folder `dir` (to load its data set before
    /// [`Trainer::resume`]).
    pub fn checkpoint_config(dir: &Path) -> Result<TrainConfig> {
        Ok(checkpoint::load(dir)?.0.config)
    }

    /// Rebuilds the run saved in the checkpoint folder `dir` on `data` (the same data set the
    /// run used) so that [`Trainer::run`] continues exactly where it stopped.
    pub fn resume(dir: &Path, data: Datasets) -> Result<Trainer> {
        let (state, tensors) = checkpoint::load(dir)?;
        let mut tr = Trainer::new(state.config.clone(), data)?;
        let missing = |name: &str| TrainError::Checkpoint {
            path: dir.join(&state.tensors),
            reason: format!("missing tensor `{name}`"),
        };
        let get = |name: String| tensors.get(&name).cloned().ok_or_else(|| missing(&name));
        let vars: Vec<(String, candle_core::Var)> = {
            let data = tr.varmap.data().lock().expect("varmap lock");
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        for (name, var) in &vars {
            let v = get(format!("var.{name}"))?;
            if v.dims() != var.dims() {
                return Err(TrainError::Checkpoint {
                    path: dir.join(&state.tensors),
                    reason: format!(
                        "`var.{name}` has shape {:?}, the model {:?}",
                        v.dims(),
                        var.dims()
                    ),
                });
            }
            var.set(&v.to_dtype(var.dtype())?)?;
        }
        let mask_of = |name: String| -> Result<Mask> {
            Ok(Mask::from_tensor(&get(name)?).map_err(dst_core::DstError::from)?)
        };
        let skip = tr.engine_skip();
        match &mut tr.engine {
            Engine::Dense => {}
            Engine::Dst(s) => {
                let names: Vec<String> = s.params().iter().map(|p| p.name().to_string()).collect();
                let masks = names
                    .iter()
                    .map(|n| mask_of(format!("mask.{n}")))
                    .collect::<Result<Vec<_>>>()?;
                let ever = names
                    .iter()
                    .map(|n| mask_of(format!("ever.{n}")))
                    .collect::<Result<Vec<_>>>()?;
                s.restore(
                    masks,
                    ever,
                    &mut EngineShim {
                        opt: &mut tr.opt,
                        skip: &skip,
                    },
                )?;
            }
            Engine::Nm(s) => {
                let cur = s.state();
                let mut layers = Vec::with_capacity(cur.layers.len());
                for l in &cur.layers {
                    let lbc = l
                        .lbc
                        .iter()
                        .map(|(field, _)| {
                            let v = get(format!("lbc.{}.{field}", l.name))?;
                            Ok((field.clone(), v.to_vec1::<f64>()?))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    layers.push(NmLayerState {
                        name: l.name.clone(),
                        mask: mask_of(format!("nm.{}", l.name))?,
                        lbc,
                    });
                }
                s.restore(&NmState {
                    started: state.nm_started,
                    layers,
                })?;
            }
        }
        // Sparse engine: lay the restored weights out again (fresh state, replaced below).
        tr.recompress()?;
        for (name, var) in &vars {
            let target = match tr.engine_of(var) {
                Some(e) => e.values().expect("compressed"),
                None => var.clone(),
            };
            let n = tr.opt.state(&target).len();
            if n > 0 {
                let st = (0..n)
                    .map(|i| get(format!("opt.{name}.{i}")))
                    .collect::<Result<Vec<_>>>()?;
                let st = match tr.engine_of(var) {
                    Some(e) => e.gather_state(&st)?,
                    None => st,
                };
                tr.opt.set_state(&target, st)?;
            }
        }
        tr.opt.set_steps(state.optimizer_steps);
        tr.step = state.step;
        tr.epoch_acc = state.epoch_acc;
        tr.history = state.history;
        tr.wall_before = state.wall_s;
        tr.last_checkpoint = Some(dir.to_path_buf());
        Ok(tr)
    }

    /// Continues writing into the run folder `dir` of a resumed run: metrics recorded after the
    /// checkpoint's step are dropped from `metrics.jsonl`, so the file reads as one run.
    pub fn with_resumed_output(mut self, dir: &Path) -> Result<Trainer> {
        let path = dir.join("metrics.jsonl");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s as usize <= self.step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            checkpoint::write_atomic(&path, kept.as_bytes())?;
        }
        self = self.with_output(dir)?;
        Ok(self)
    }

    /// One optimizer step on the examples `idx`; returns the loss, the learning rate and the
    /// mask-update report if this step updated masks.
    fn train_step(
        &mut self,
        idx: &[usize],
        epoch: usize,
    ) -> Result<(f32, f64, Option<UpdateReport>)> {
        let lr = self.cfg.lr_schedule.lr(
            self.cfg.peak_lr(),
            self.step,
            self.steps_per_epoch,
            self.total_steps,
        );
        self.opt.set_learning_rate(lr);
        if let Engine::Nm(s) = &mut self.engine {
            s.set_score_lr(lr as f32);
            s.before_forward(epoch)?;
        }
        // Sparse engine: a mask-update step runs densely to get the dense gradient.
        let update_next = match &self.engine {
            Engine::Dst(s) if !self.engine_layers.is_empty() => {
                s.config().method != dst_core::Method::Static
                    && s.config().schedule.is_update_step(self.step + 1)
            }
            _ => false,
        };
        if update_next {
            for e in &self.engine_layers {
                e.begin_dense_step();
            }
        }
        let (x, y) = self.batch(&self.data.train, idx)?;
        let logits = self.net.forward_t(&x, true)?;
        let loss = self.loss(&logits, &y)?;
        let loss_v = loss.to_scalar::<f32>()?;
        if !loss_v.is_finite() {
            return Ok((loss_v, lr, None));
        }
        let correct = correct_count(&logits, &y)?;
        let mut grads = loss.backward()?;
        if let Engine::Nm(s) = &mut self.engine {
            s.after_backward(&mut grads)?;
        }
        if update_next {
            for e in &self.engine_layers {
                e.end_dense_step();
            }
        }
        self.opt.step(&grads)?;
        self.step += 1;
        self.epoch_acc.0 += loss_v as f64;
        self.epoch_acc.1 += correct as f64;
        self.epoch_acc.2 += idx.len();
        if update_next {
            self.sync_dense()?; // the post-step weights, for the update
        }
        let skip = self.engine_skip();
        let report = match &mut self.engine {
            Engine::Dst(s) if self.engine_layers.is_empty() => {
                s.step(self.step, &grads, &mut self.opt)?
            }
            Engine::Dst(s) => s.step(
                self.step,
                &grads,
                &mut EngineShim {
                    opt: &mut self.opt,
                    skip: &skip,
                },
            )?,
            _ => None,
        };
        if report.is_some() && !self.engine_layers.is_empty() {
            self.recompress()?;
        }
        Ok((loss_v, lr, report))
    }

    fn end_epoch(&mut self, epoch: usize, lr: f64, wall_s: f64) -> Result<EpochMetrics> {
        let (loss_sum, correct, seen) = std::mem::take(&mut self.epoch_acc);
        let validation = if self.data.validation.is_empty() {
            None
        } else {
            Some(self.evaluate(&self.data.validation)?)
        };
        let (test_loss, test_accuracy) = self.evaluate(&self.data.test)?;
        let layers = self.layer_stats();
        let m = EpochMetrics {
            epoch,
            step: self.step,
            train_loss: (loss_sum / self.steps_per_epoch as f64) as f32,
            train_accuracy: (correct / seen.max(1) as f64) as f32,
            validation,
            test_loss,
            test_accuracy,
            lr,
            sparsity: self.global_sparsity(),
            ablated_neurons: layers.iter().map(|l| l.ablated_rows).sum(),
            itop: match &self.engine {
                Engine::Dst(s) => Some(s.itop()),
                _ => None,
            },
            layers,
            wall_s,
        };
        self.log_json("epoch", &m)?;
        self.history.push(m.clone());
        Ok(m)
    }

    /// Appends `{"kind": kind, ...record}` to `metrics.jsonl` when there is an output folder.
    fn log_json(&self, kind: &str, record: &impl Serialize) -> Result<()> {
        let Some(out) = &self.out else {
            return Ok(());
        };
        let mut v = serde_json::to_value(record).expect("metrics serialise");
        if let serde_json::Value::Object(map) = &mut v {
            map.insert("kind".into(), kind.into());
        }
        let path = out.join("metrics.jsonl");
        let mut line = serde_json::to_string(&v).expect("metrics serialise");
        line.push('\n');
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| TrainError::Checkpoint {
                path,
                reason: format!("cannot append metrics: {e}"),
            })
    }
}
