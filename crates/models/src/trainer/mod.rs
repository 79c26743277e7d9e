//! The [`Trainer`]: builds the network, the method and the storage engine from a
//! [`TrainConfig`], runs the training loop with per-epoch evaluation, reports through a
//! [`Progress`] callback (the library prints nothing), writes metrics and checkpoints when given
//! an output folder, and resumes exactly from a checkpoint.
//!
//! The trainer orchestrates and owns nothing else: the method is a [`Sparsify`] (the order of
//! its hooks in a step is documented there and in docs/algorithms.md), the storage engine an
//! [`Engine`] (which owns the optimizer), checkpoints map state ⇄ tensors
//! ([`crate::checkpoint`]), metrics own their statistics ([`crate::metrics`]).
//!
//! Determinism: initialisation, masks, the validation split and the shuffle of every epoch are
//! drawn from streams derived from `(seed, ...)`, not from a running generator, so a run resumed
//! from a checkpoint (even one written mid-epoch) continues exactly as the uninterrupted run.

mod progress;

pub use progress::{Control, Event, Progress, Silent};

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use dst_core::optim::MaskAware;
use dst_core::{Rng, SparseParam, Sparsify, UpdateReport};
use sparse_formats::Mask;

use crate::checkpoint::{self, CheckpointState};
use crate::config::{EngineKind, TrainConfig};
use crate::data::{Datasets, ImageSet};
use crate::distributed::{self, Collective, CommStats, Metered, SingleProcess};
use crate::engine::Engine;
use crate::error::{config_err, Result, TrainError};
use crate::metrics::{
    self, correct_count, EpochMetrics, LayerStats, MetricsLog, StepProfile, Summary,
};
use crate::nets::{LayerFactory, Network};

/// A training run in progress: network, method, engine (with the optimizer), data, counters.
pub struct Trainer {
    cfg: TrainConfig,
    data: Datasets,
    dev: Device,
    varmap: VarMap,
    net: Network,
    /// The method's hooks.
    method: Box<dyn Sparsify>,
    /// Weights the method leaves dense (reported with all-ones masks).
    unmanaged: Vec<SparseParam>,
    engine: Engine,
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
    log: Option<MetricsLog>,
    last_checkpoint: Option<PathBuf>,
    /// The ranks of a data-parallel run ([`SingleProcess`] by default).
    comm: Metered,
    /// Ranks of the run whose checkpoint this trainer resumed.
    checkpoint_ranks: Option<usize>,
    /// Where the steps' time went ([`Trainer::step_profile`]).
    profile: StepProfile,
}

impl Trainer {
    /// Builds the network, method and engine for `cfg` on `data` (seeded: the same config
    /// always builds the same starting point).
    pub fn new(cfg: TrainConfig, data: Datasets) -> Result<Trainer> {
        cfg.validate().map_err(|(f, r)| config_err(f, r))?;
        if data.train.is_empty() {
            return Err(config_err("data", "the training set is empty"));
        }
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let t = &data.train;
        let factory = LayerFactory::new(vb, cfg.layer_kind(), cfg.seed)
            .keep_dense(&cfg.method.dense_layers)
            .nm_engine(cfg.method.name.is_nm() && cfg.engine_for_run() == EngineKind::Sparse);
        let (net, built) =
            Network::build_with(&cfg.model, [t.channels, t.rows, t.cols], t.classes, factory)
                .map_err(|e| config_err("model", e))?;
        let steps_per_epoch = t.len().div_ceil(cfg.batch_size);
        let total_steps = steps_per_epoch * cfg.epochs;
        let (method, unmanaged) = cfg.build_method(&built, total_steps)?;
        let mut engine = Engine::new(
            built.engine,
            method.as_ref(),
            varmap.all_vars(),
            &cfg.optimizer,
        )?;
        engine.defer(built.nm_engine);
        let norm = data.train.channel_stats();
        Ok(Trainer {
            cfg,
            data,
            dev,
            varmap,
            net,
            method,
            unmanaged,
            engine,
            norm,
            steps_per_epoch,
            total_steps,
            step: 0,
            epoch_acc: (0.0, 0.0, 0),
            history: Vec::new(),
            wall_before: 0.0,
            out: None,
            log: None,
            last_checkpoint: None,
            comm: Metered::new(Box::new(SingleProcess)),
            checkpoint_ranks: None,
            profile: StepProfile::default(),
        })
    }

    /// Makes this trainer one rank of a data-parallel run over `comm` (see
    /// [`crate::distributed`]): every rank must build its trainer from the same config and data
    /// (or resume the same checkpoint) and call this. Rank 0's variables are broadcast, the
    /// masks are checked equal, and each step trains on this rank's shard of the global batch
    /// with gradients summed across ranks. Only rank 0 should be given an output folder.
    /// Every batch (the last of an epoch included) needs at least one example per rank.
    pub fn with_collective(mut self, comm: Box<dyn Collective>) -> Result<Trainer> {
        let size = comm.size();
        let (n, b) = (self.data.train.len(), self.cfg.batch_size);
        let last = if n.is_multiple_of(b) { b } else { n % b };
        if last < size {
            return Err(config_err(
                "batch_size",
                format!(
                    "{size} ranks need at least {size} examples in every batch; the last batch of \
                     an epoch has {last} ({n} examples, batch {b})"
                ),
            ));
        }
        if let Some(r) = self.checkpoint_ranks.filter(|&r| r != size) {
            return Err(config_err(
                "ranks",
                format!(
                    "the checkpoint was written by a run on {r} rank(s); resume it on {r} (got {size})"
                ),
            ));
        }
        self.comm = Metered::new(comm);
        let vars = self.trained_vars();
        let mut buf = Vec::new();
        for v in &vars {
            buf.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        self.comm.broadcast(&mut buf, 0)?;
        let mut at = 0;
        for v in &vars {
            let len = v.as_tensor().elem_count();
            let t = Tensor::from_slice(&buf[at..at + len], v.as_tensor().shape(), &self.dev)?;
            v.set(&t)?;
            at += len;
        }
        distributed::masks_agree(&self.comm, &self.masks(), self.step)?;
        Ok(self)
    }

    /// Time, volume and count of the collective operations so far (all zero in a single
    /// process): what data-parallel training spends communicating and waiting for other ranks.
    pub fn communication(&self) -> CommStats {
        self.comm.stats()
    }

    /// Wall time of the parts of this trainer's steps so far (see [`StepProfile`]); read it
    /// before and after some steps and take [`StepProfile::since`] for those steps alone.
    pub fn step_profile(&self) -> StepProfile {
        self.profile
    }

    /// Ends this trainer and hands back its collective (a [`SingleProcess`] unless
    /// [`Trainer::with_collective`] gave it one), e.g. to train another model on the same ranks:
    /// an MPI library is initialised once per process.
    pub fn into_collective(self) -> Box<dyn Collective> {
        self.comm.into_inner()
    }

    /// Every variable the optimizer or a mask update reads a gradient of, in an order every
    /// rank agrees on: the model's variables by name, then the sparse engine's stored values.
    fn trained_vars(&self) -> Vec<candle_core::Var> {
        let data = self.varmap.data().lock().expect("varmap");
        let mut named: Vec<(&String, &candle_core::Var)> = data.iter().collect();
        named.sort_by_key(|(n, _)| n.as_str());
        let mut vars: Vec<candle_core::Var> = named.into_iter().map(|(_, v)| v.clone()).collect();
        vars.extend(self.engine.stored_values());
        vars
    }

    /// Sums the gradients of `vars` across ranks, this rank's weighted by `weight` (its share of
    /// the global batch): every rank then holds the global batch's mean gradient.
    fn all_reduce_grads(
        &self,
        grads: &mut candle_core::backprop::GradStore,
        weight: f32,
    ) -> Result<()> {
        let vars = self.trained_vars();
        // Handles (not copies) of the gradients, so the store can take the sums back below.
        let present: Vec<(&candle_core::Var, Tensor)> = vars
            .iter()
            .filter_map(|v| grads.get(v).map(|g| (v, g.clone())))
            .collect();
        // One pass over each gradient: read in place, scaled into the send buffer.
        let mut buf = Vec::with_capacity(present.iter().map(|(_, g)| g.elem_count()).sum());
        for (_, g) in &present {
            sparse_kernels::storage::with_f32(g, |s| buf.extend(s.iter().map(|x| x * weight)))?;
        }
        self.comm.all_reduce_sum(&mut buf)?;
        let mut at = 0;
        for (v, g) in present {
            let len = g.elem_count();
            let t = Tensor::from_slice(&buf[at..at + len], g.shape(), &self.dev)?;
            grads.insert(v.as_tensor(), t);
            at += len;
        }
        Ok(())
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
        self.log = Some(MetricsLog::in_dir(dir));
        Ok(self)
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

    /// The method's hooks (downcast-free access to its masks and state).
    pub fn method(&self) -> &dyn Sparsify {
        self.method.as_ref()
    }

    /// The storage engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Every variable by name (weights, biases, BatchNorm statistics...), sorted by name.
    pub fn variables(&self) -> Result<Vec<(String, Tensor)>> {
        self.engine.sync_dense()?;
        Ok(checkpoint::named_vars(&self.varmap)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect())
    }

    /// The current mask of every weight layer, by weight name, in build order (the weights
    /// the method leaves dense first, as all-ones masks).
    pub fn masks(&self) -> Vec<(String, Mask)> {
        self.unmanaged
            .iter()
            .map(|p| (p.name().to_string(), p.mask()))
            .chain(self.method.masks())
            .collect()
    }

    /// Per-channel `(mean, std)` of the training pixels, with which inputs are normalised.
    pub fn normalization(&self) -> &[(f32, f32)] {
        &self.norm
    }

    /// Per-layer mask statistics.
    pub fn layer_stats(&self) -> Vec<LayerStats> {
        metrics::layer_stats(&self.masks())
    }

    /// A normalised batch `[b, c, h, w]` and its labels.
    fn batch(&self, set: &ImageSet, idx: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        crate::inference::normalized_batch(set, idx, &self.norm, &self.dev)
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
    /// A set without images is an error (an accuracy over nothing would read as 0).
    pub fn evaluate(&self, set: &ImageSet) -> Result<(f32, f32)> {
        crate::inference::evaluate_network(&self.net, set, &self.norm, &self.dev)
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
    /// end, or until `progress` asks to stop. Runs on a worker of a pool of `threads` threads,
    /// or of rayon's global pool (`RAYON_NUM_THREADS`, all cores) when `threads` is unset.
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
            // On a worker of the global pool, not on the calling thread: every parallel
            // kernel of a step then forks from inside the pool (its other workers steal the
            // halves) instead of waking the pool and putting the caller to sleep until the
            // kernel ends, a futex round trip per kernel; and the step runs on as many threads
            // as the pool has, not one more (docs/benchmarks.md, "The step on a pool worker").
            None => rayon::scope(|_| self.run_inner(steps, progress)),
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
                    if let Some(log) = &self.log {
                        log.append("mask-update", r)?;
                    }
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
                if self.comm.size() > 1 {
                    // A stop request (e.g. Ctrl-C) reaches ranks at different steps: stop where
                    // any rank asked, all together.
                    let asked = self.comm.all_gather_u64(u64::from(stopped))?;
                    stopped = asked.iter().any(|&a| a != 0);
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
        let masks = self.masks();
        let summary = Summary {
            test_accuracy,
            test_loss,
            sparsity: metrics::global_sparsity(&masks),
            layers: metrics::layer_stats(&masks),
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

    /// One optimizer step on the examples `idx`; returns the loss, the learning rate and the
    /// mask-update report if this step updated masks.
    fn train_step(
        &mut self,
        idx: &[usize],
        epoch: usize,
    ) -> Result<(f32, f64, Option<UpdateReport>)> {
        let lr = self
            .cfg
            .lr_at(self.step, self.steps_per_epoch, self.total_steps);
        let (phase_start, _) = self
            .cfg
            .phase(self.step, self.steps_per_epoch, self.total_steps);
        if phase_start > 0 && phase_start == self.step {
            // ASP's fine-tuning starts from a fresh optimizer (its recipe resets the state).
            let vars = self.varmap.all_vars();
            self.engine.reset_state(&vars)?;
        }
        let step = self.step + 1;
        self.engine.set_learning_rate(lr);
        self.method.before_forward(step, epoch, lr)?;
        // N:M layers of a sparse-engine run go to sparse storage once their masks are final.
        self.engine.adopt_final_masks(self.method.as_ref())?;
        self.engine.begin_step(self.method.needs_dense_grad(step));
        let size = self.comm.size();
        let local = distributed::shard(idx, self.comm.rank(), size);
        let t0 = Instant::now();
        let (x, y) = self.batch(&self.data.train, local)?;
        let t1 = Instant::now();
        let logits = self.net.forward_t(&x, true)?;
        let loss = self.loss(&logits, &y)?;
        let mut loss_v = loss.to_scalar::<f32>()?;
        let mut correct = correct_count(&logits, &y)?;
        if size > 1 {
            // The global batch's loss and correct count, so every rank takes the same path.
            let share = local.len() as f32 / idx.len() as f32;
            let mut m = [loss_v * share, correct];
            self.comm.all_reduce_sum(&mut m)?;
            loss_v = m[0];
            correct = m[1];
        }
        if !loss_v.is_finite() {
            return Ok((loss_v, lr, None));
        }
        let t2 = Instant::now();
        let mut grads = loss.backward()?;
        if size > 1 {
            self.all_reduce_grads(&mut grads, local.len() as f32 / idx.len() as f32)?;
        }
        self.method.after_backward(&mut grads)?;
        self.engine.end_backward();
        let t3 = Instant::now();
        self.engine.step(&grads)?;
        self.step = step;
        self.epoch_acc.0 += loss_v as f64;
        self.epoch_acc.1 += correct as f64;
        self.epoch_acc.2 += idx.len();
        self.engine.after_optimizer_step()?;
        let t4 = Instant::now();
        let report = self.method.after_step(step, &grads, &mut self.engine)?;
        if report.is_some() {
            self.engine.relayout()?;
            if size > 1 {
                distributed::masks_agree(&self.comm, &self.masks(), step)?;
            }
        }
        let p = &mut self.profile;
        p.steps += 1;
        p.update_steps += report.is_some() as u64;
        p.batch_s += (t1 - t0).as_secs_f64();
        p.forward_s += (t2 - t1).as_secs_f64();
        p.backward_s += (t3 - t2).as_secs_f64();
        p.optimizer_s += (t4 - t3).as_secs_f64();
        p.mask_update_s += t4.elapsed().as_secs_f64();
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
        let masks = self.masks();
        let layers = metrics::layer_stats(&masks);
        let m = EpochMetrics {
            epoch,
            step: self.step,
            train_loss: (loss_sum / self.steps_per_epoch as f64) as f32,
            train_accuracy: (correct / seen.max(1) as f64) as f32,
            validation,
            test_loss,
            test_accuracy,
            lr,
            sparsity: metrics::global_sparsity(&masks),
            ablated_neurons: layers.iter().map(|l| l.ablated_rows).sum(),
            itop: self.method.itop(),
            layers,
            wall_s,
        };
        if let Some(log) = &self.log {
            log.append("epoch", &m)?;
        }
        self.history.push(m.clone());
        Ok(m)
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
        let tensors = checkpoint::capture(&self.varmap, &self.engine, self.method.as_ref())?;
        let state = CheckpointState {
            format_version: checkpoint::FORMAT_VERSION,
            step: self.step,
            epoch_acc: self.epoch_acc,
            optimizer_steps: self.engine.steps(),
            wall_s,
            tensors: String::new(),
            config: self.cfg.clone(),
            history: self.history.clone(),
            normalization: Some(self.norm.clone()),
            ranks: self.comm.size(),
        };
        checkpoint::save(dir, state, &tensors)?;
        Ok(())
    }

    /// The configuration stored in the checkpoint folder `dir` (to load its data set before
    /// [`Trainer::resume`]).
    pub fn checkpoint_config(dir: &Path) -> Result<TrainConfig> {
        Ok(checkpoint::load(dir)?.0.config)
    }

    /// The input normalisation stored in the checkpoint folder `dir` (`None` for checkpoints
    /// written before it was stored: then it comes from the training set,
    /// [`ImageSet::channel_stats`]).
    pub fn checkpoint_normalization(dir: &Path) -> Result<Option<Vec<(f32, f32)>>> {
        Ok(checkpoint::load(dir)?.0.normalization)
    }

    /// Rebuilds the run saved in the checkpoint folder `dir` on `data` (the same data set the
    /// run used) so that [`Trainer::run`] continues exactly where it stopped.
    pub fn resume(dir: &Path, data: Datasets) -> Result<Trainer> {
        let (state, tensors) = checkpoint::load(dir)?;
        let mut tr = Trainer::new(state.config.clone(), data)?;
        checkpoint::restore(
            &tensors,
            &dir.join(&state.tensors),
            &tr.varmap,
            &mut tr.engine,
            tr.method.as_mut(),
        )?;
        tr.engine.set_steps(state.optimizer_steps);
        tr.step = state.step;
        tr.epoch_acc = state.epoch_acc;
        tr.history = state.history;
        tr.wall_before = state.wall_s;
        tr.last_checkpoint = Some(dir.to_path_buf());
        tr.checkpoint_ranks = Some(state.ranks);
        Ok(tr)
    }

    /// Continues writing into the run folder `dir` of a resumed run: metrics recorded after the
    /// checkpoint's step are dropped from `metrics.jsonl`, so the file reads as one run.
    pub fn with_resumed_output(self, dir: &Path) -> Result<Trainer> {
        MetricsLog::in_dir(dir).truncate_after(self.step)?;
        self.with_output(dir)
    }
}
