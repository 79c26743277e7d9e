//! `dst train`: a config file (TOML or JSON) and flags overriding it → a run folder.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dst_core::optim::{OptimizerConfig, OptimizerKind};
use dst_core::Distribution;
use indicatif::{ProgressBar, ProgressStyle};
use models::{
    Control, DatasetName, Datasets, EngineKind, Event, InitKind, LrKind, MethodName, ModelConfig,
    TrainConfig, Trainer,
};
use sparse_formats::io::SparseLayer;

/// Flags of `dst train`; each overrides the same field of `--config`.
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// Config file (TOML, or JSON if it ends in .json); flags override its fields.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its last checkpoint, or from its start if it stopped
    /// before the first one (other flags are ignored).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Run folder (default runs/<method>-s<seed>); must not hold another run.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Model preset: lenet-300-100, mlp-1000x3, lenet5, resnet18, vit-small.
    #[arg(long)]
    model: Option<String>,
    /// Method: dense, static, set, rigl, srigl, lbc, srste, nm-magnitude.
    #[arg(long)]
    method: Option<String>,
    /// Global sparsity in [0, 1) (dst methods).
    #[arg(long)]
    sparsity: Option<f64>,
    /// How the sparsity is spread over layers.
    #[arg(long, value_enum)]
    distribution: Option<DistributionArg>,
    /// Mask-update period ΔT in steps.
    #[arg(long)]
    delta_t: Option<usize>,
    /// RigL/SRigL: grow by the mean dense gradient of the last N steps before an update
    /// (1 ≤ N ≤ ΔT; default 1, the update step's alone).
    #[arg(long, value_name = "N")]
    grad_accumulation: Option<usize>,
    /// Initial drop fraction α.
    #[arg(long)]
    alpha: Option<f64>,
    /// Mask updates stop at this fraction of the run.
    #[arg(long)]
    t_end_fraction: Option<f64>,
    /// SRigL's γ_sal (≥ 0; 0 turns neuron ablation off, as in the reference).
    #[arg(long)]
    gamma_sal: Option<f64>,
    /// Turn SRigL's dynamic neuron ablation off.
    #[arg(long)]
    no_ablation: bool,
    /// Initialisation of the kept weights (dst methods): sparse-he (N(0, 2/k), k the row's
    /// active fan-in) or dense (the layer's dense init, masked). Default: sparse-he for srigl,
    /// dense for rigl, set and static, as their references do.
    #[arg(long, value_enum)]
    init: Option<InitArg>,
    /// Keep this weight dense (repeatable), e.g. --dense-layer fc1.weight.
    #[arg(long = "dense-layer", value_name = "WEIGHT")]
    dense_layers: Vec<String>,
    /// N of N:M (lbc, srste, nm-magnitude).
    #[arg(long)]
    n: Option<usize>,
    /// M of N:M.
    #[arg(long)]
    m: Option<usize>,
    /// LBC: epoch (0-based) from which one combination is left, 0 ≤ t_f ≤ epochs − 1
    /// (default: half the epochs, as the reference's README command: 60 of 120).
    #[arg(long)]
    lbc_t_f: Option<usize>,
    /// nm-magnitude (ASP): epochs of dense training before the one-shot prune, then
    /// fine-tuning with the mask fixed, a fresh optimizer and the LR schedule restarted;
    /// 0 ≤ E ≤ epochs − 1, 0 prunes the initialisation (default: half the epochs).
    #[arg(long, value_name = "E")]
    nm_prune_epoch: Option<usize>,
    /// Epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Mini-batch size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Optimizer.
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerArg>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// SGD momentum.
    #[arg(long)]
    momentum: Option<f64>,
    /// Weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Learning-rate schedule.
    #[arg(long, value_enum)]
    lr_schedule: Option<LrArg>,
    /// Linear warm-up in epochs.
    #[arg(long)]
    warmup_epochs: Option<f64>,
    /// Step-schedule milestones (epochs), comma-separated.
    #[arg(long, value_delimiter = ',')]
    milestones: Option<Vec<usize>>,
    /// Label smoothing ε.
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads (results do not depend on it).
    #[arg(long)]
    threads: Option<usize>,
    /// Data set: fashion-mnist, mnist, cifar-10.
    #[arg(long)]
    data: Option<String>,
    /// Folder holding the data set.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Train on the first N examples only.
    #[arg(long)]
    limit: Option<usize>,
    /// Fraction of the training set held out for validation.
    #[arg(long)]
    validation_fraction: Option<f64>,
    /// Training engine of sparse layers: dense-mask (dense weights × mask), sparse (linear and
    /// conv weights of density ≤ 0.3 in sparse storage between mask updates; dst methods, and
    /// lbc / nm-magnitude once their N:M masks are final), or
    /// auto (default: sparse for static / set / rigl / srigl and for lbc / nm-magnitude at N:M
    /// density ≤ 0.3, on an MLP, LeNet-5 or ResNet-18, where it is measured the faster;
    /// dense-mask otherwise).
    #[arg(long, value_enum)]
    engine: Option<EngineArg>,
    /// Checkpoint every N epochs (0: only at the end).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Print nothing but errors and the final line.
    #[arg(long, conflicts_with = "json")]
    quiet: bool,
    /// Print every epoch and the summary as JSON lines instead of text.
    #[arg(long)]
    json: bool,
    /// Data-parallel training: run under `mpirun -np N`, each process one rank (a build with
    /// the `distributed` feature); rank 0 writes the run folder and prints.
    #[arg(long)]
    distributed: bool,
    /// With --distributed: a rank that waits longer than this in one collective operation (a
    /// gradient all-reduce, a mask-hash check) exits with an error naming it, and mpirun ends
    /// the job — a hung rank cannot hang the others. Seconds, 1 to 86400.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86400))]
    collective_timeout: u64,
}

/// The ranks of this run: MPI's with `--distributed`, else none (a single process).
fn collective(a: &TrainArgs) -> Result<Option<Box<dyn models::distributed::Collective>>> {
    if !a.distributed {
        return Ok(None);
    }
    #[cfg(feature = "distributed")]
    {
        let timeout = std::time::Duration::from_secs(a.collective_timeout);
        let c = models::distributed::MpiCollective::init(timeout).context("--distributed")?;
        Ok(Some(Box::new(c)))
    }
    #[cfg(not(feature = "distributed"))]
    bail!(
        "--distributed: this dst was built without MPI; build it with `cargo build --release -p \
         cli --features distributed` (Debian: apt-get install libopenmpi-dev openmpi-bin \
         libclang-dev) and start it with `mpirun -np N`"
    )
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DistributionArg {
    Uniform,
    Er,
    Erk,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum InitArg {
    SparseHe,
    Dense,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineArg {
    Auto,
    DenseMask,
    Sparse,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OptimizerArg {
    Sgd,
    Adamw,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LrArg {
    Constant,
    Step,
    Cosine,
}

/// Reads a config file: TOML, or JSON for `.json`.
pub fn read_config(path: &Path) -> Result<TrainConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let cfg = if path.extension().is_some_and(|e| e == "json") {
        TrainConfig::from_json(&text)
    } else {
        TrainConfig::from_toml(&text)
    };
    cfg.map_err(|e| anyhow::anyhow!("{}: malformed config: {e}", path.display()))
}

fn apply(a: &TrainArgs, cfg: &mut TrainConfig) -> Result<()> {
    if let Some(m) = &a.model {
        cfg.model = ModelConfig::preset(m).with_context(|| {
            format!(
                "--model: unknown model `{m}` (one of: {})",
                ModelConfig::PRESETS.join(", ")
            )
        })?;
    }
    let me = &mut cfg.method;
    if let Some(m) = &a.method {
        me.name = m
            .parse::<MethodName>()
            .map_err(|e| anyhow::anyhow!("--method: {e}"))?;
    }
    if let Some(s) = a.sparsity {
        me.sparsity = s;
    }
    if let Some(d) = a.distribution {
        me.distribution = match d {
            DistributionArg::Uniform => Distribution::Uniform,
            DistributionArg::Er => Distribution::ErdosRenyi,
            DistributionArg::Erk => Distribution::Erk { power_scale: 1.0 },
        };
    }
    macro_rules! set {
        ($($flag:ident => $field:expr),* $(,)?) => {
            $(if let Some(v) = a.$flag.clone() { $field = v; })*
        };
    }
    set!(delta_t => me.delta_t, grad_accumulation => me.grad_accumulation, alpha => me.alpha, t_end_fraction => me.t_end_fraction,
         gamma_sal => me.gamma_sal, n => me.n, m => me.m);
    if let Some(t) = a.lbc_t_f {
        me.lbc_t_f = Some(t);
    }
    if let Some(p) = a.nm_prune_epoch {
        me.nm_prune_epoch = Some(p);
    }
    if a.no_ablation {
        me.ablation = false;
    }
    if let Some(i) = a.init {
        me.init = Some(match i {
            InitArg::SparseHe => InitKind::SparseHe,
            InitArg::Dense => InitKind::Dense,
        });
    }
    if !a.dense_layers.is_empty() {
        me.dense_layers = a.dense_layers.clone();
    }
    set!(epochs => cfg.epochs, batch_size => cfg.batch_size, label_smoothing => cfg.label_smoothing,
         seed => cfg.seed, checkpoint_every => cfg.checkpoint_every);
    if let Some(t) = a.threads {
        cfg.threads = Some(t);
    }
    if let Some(e) = a.engine {
        cfg.engine = match e {
            EngineArg::Auto => EngineKind::Auto,
            EngineArg::DenseMask => EngineKind::DenseMask,
            EngineArg::Sparse => EngineKind::Sparse,
        };
    }
    if let Some(o) = a.optimizer {
        let kind = match o {
            OptimizerArg::Sgd => OptimizerKind::Sgd,
            OptimizerArg::Adamw => OptimizerKind::AdamW,
        };
        // Switching the kind starts from that kind's defaults; naming the kind the config
        // already has changes nothing.
        if cfg.optimizer.kind() != kind {
            cfg.optimizer = OptimizerConfig::default_of(kind);
        }
    }
    match &mut cfg.optimizer {
        OptimizerConfig::Sgd(c) => {
            set!(lr => c.lr, momentum => c.momentum, weight_decay => c.weight_decay);
        }
        OptimizerConfig::AdamW(c) => {
            if a.momentum.is_some() {
                bail!("--momentum: AdamW has no momentum setting (use --optimizer sgd)");
            }
            set!(lr => c.lr, weight_decay => c.weight_decay);
        }
    }
    if let Some(k) = a.lr_schedule {
        cfg.lr_schedule.kind = match k {
            LrArg::Constant => LrKind::Constant,
            LrArg::Step => LrKind::Step,
            LrArg::Cosine => LrKind::Cosine,
        };
    }
    set!(warmup_epochs => cfg.lr_schedule.warmup_epochs, milestones => cfg.lr_schedule.milestones);
    if let Some(d) = &a.data {
        cfg.data.name = d
            .parse::<DatasetName>()
            .map_err(|e| anyhow::anyhow!("--data: {e}"))?;
    }
    if let Some(d) = &a.data_dir {
        cfg.data.dir = Some(d.clone());
    }
    if let Some(l) = a.limit {
        cfg.data.limit = Some(l);
    }
    set!(validation_fraction => cfg.data.validation_fraction);
    Ok(())
}

/// The flag that set the config field `field`, when one did (so that a validation error names
/// what the user typed).
fn flag_of(a: &TrainArgs, field: &str) -> Option<&'static str> {
    let given = |set: bool, flag| set.then_some(flag);
    match field {
        "method.sparsity" => given(a.sparsity.is_some(), "--sparsity"),
        "method.n" => given(a.n.is_some() || a.m.is_some(), "--n/--m"),
        "method.delta_t" => given(a.delta_t.is_some(), "--delta-t"),
        "method.alpha" => given(a.alpha.is_some(), "--alpha"),
        "method.t_end_fraction" => given(a.t_end_fraction.is_some(), "--t-end-fraction"),
        "method.gamma_sal" => given(a.gamma_sal.is_some(), "--gamma-sal"),
        "epochs" => given(a.epochs.is_some(), "--epochs"),
        "batch_size" => given(a.batch_size.is_some(), "--batch-size"),
        "label_smoothing" => given(a.label_smoothing.is_some(), "--label-smoothing"),
        "threads" => given(a.threads.is_some(), "--threads"),
        "engine" => given(a.engine.is_some(), "--engine"),
        "optimizer.lr" => given(a.lr.is_some(), "--lr"),
        "optimizer.momentum" => given(a.momentum.is_some(), "--momentum"),
        "optimizer.weight_decay" => given(a.weight_decay.is_some(), "--weight-decay"),
        "lr_schedule.warmup_epochs" => given(a.warmup_epochs.is_some(), "--warmup-epochs"),
        "data.validation_fraction" => {
            given(a.validation_fraction.is_some(), "--validation-fraction")
        }
        _ => None,
    }
}

/// Writes the final masks of every weight layer to `dir/masks.safetensors`.
pub fn write_masks(trainer: &Trainer, dir: &Path) -> Result<()> {
    let layers: Vec<(String, SparseLayer)> = trainer
        .masks()
        .into_iter()
        .map(|(n, m)| (n, SparseLayer::Mask(m)))
        .collect();
    let path = dir.join("masks.safetensors");
    sparse_formats::io::save(&path, &layers).with_context(|| format!("{}", path.display()))
}

/// A new run's `--out` folder must be new or empty (temporary files a killed write left behind
/// are removed first): a run is never written over another run's files, or into a folder of
/// other files. A folder holding a run (its `config.json`) points to `--resume`.
fn check_new_run_folder(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if dir.join("config.json").exists() {
        bail!(
            "--out {}: the folder already holds a run; continue it with --resume {} or choose \
             another --out",
            dir.display(),
            dir.display()
        );
    }
    models::checkpoint::remove_temporaries(dir);
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("--out {}: cannot read the folder", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !names.is_empty() {
        names.sort();
        let shown = names.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
        let more = if names.len() > 3 { ", ..." } else { "" };
        bail!(
            "--out {}: the folder is not empty and holds no run ({shown}{more}); choose a new or \
             empty folder",
            dir.display()
        );
    }
    Ok(())
}

/// `dst train`.
pub fn run(a: TrainArgs) -> Result<ExitCode> {
    let comm = collective(&a)?;
    // Rank 0 (or the only process) writes the run folder, checkpoints and reports, and prints.
    let writer = comm.as_ref().is_none_or(|c| c.rank() == 0);
    let (trainer, dir) = match &a.resume {
        Some(run_dir) => {
            models::checkpoint::remove_temporaries(run_dir);
            let ck = run_dir.join("checkpoint");
            let started = run_dir.join("config.json");
            if !ck.join("checkpoint.json").exists() && started.exists() {
                // Started but stopped before its first checkpoint (a crash, a kill or a
                // divergence in the first epoch): the run is a pure function of its config,
                // so it starts again from step 0.
                let cfg = read_config(&started)?;
                cfg.validate().map_err(|(field, reason)| {
                    anyhow::anyhow!("{}: field `{field}`: {reason}", started.display())
                })?;
                eprintln!(
                    "--resume {}: no checkpoint yet; starting the run again from step 0",
                    run_dir.display()
                );
                let data = Datasets::load(&cfg)?;
                let t = Trainer::new(cfg, data)?;
                let t = if writer {
                    t.with_resumed_output(run_dir)?
                } else {
                    t
                };
                (t, run_dir.clone())
            } else {
                let cfg = Trainer::checkpoint_config(&ck)
                    .with_context(|| format!("--resume {}", run_dir.display()))?;
                let data = Datasets::load(&cfg)?;
                let t = Trainer::resume(&ck, data)?;
                let t = if writer {
                    t.with_resumed_output(run_dir)?
                } else {
                    t
                };
                (t, run_dir.clone())
            }
        }
        None => {
            let mut cfg = match &a.config {
                Some(p) => read_config(p)?,
                None => TrainConfig::default(),
            };
            apply(&a, &mut cfg)?;
            cfg.validate()
                .map_err(|(field, reason)| match flag_of(&a, field) {
                    Some(flag) => anyhow::anyhow!("{flag}: {reason}"),
                    None => anyhow::anyhow!("config field `{field}`: {reason}"),
                })?;
            let dir = a.out.clone().unwrap_or_else(|| {
                PathBuf::from(format!("runs/{}-s{}", cfg.method.name.as_str(), cfg.seed))
            });
            if writer {
                check_new_run_folder(&dir)?;
            }
            let data = Datasets::load(&cfg)?;
            let toml = toml::to_string(&cfg).context("config to TOML")?;
            let t = Trainer::new(cfg, data)?;
            let t = if writer {
                // The error names the folder.
                let t = t.with_output(&dir).context("--out")?;
                models::checkpoint::write_atomic(&dir.join("config.toml"), toml.as_bytes())?;
                t
            } else {
                t
            };
            (t, dir)
        }
    };
    let mut trainer = match comm {
        Some(c) => trainer.with_collective(c)?,
        None => trainer,
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second handler cannot be installed in one process; that only matters in tests.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let (quiet, json) = (a.quiet || !writer, a.json && writer);
    let bar = if quiet || json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(trainer.total_steps() as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  epoch {msg}  [{elapsed_precise} < {eta}]",
            )
            .expect("valid template"),
        );
        b
    };
    let mut progress = |e: &Event| {
        match e {
            Event::Start { done, .. } => bar.set_position(*done as u64),
            Event::Step {
                step, epoch, loss, ..
            } => {
                bar.set_position(*step as u64);
                if step % 10 == 0 {
                    bar.set_message(format!("{epoch}  loss {loss:.4}"));
                }
            }
            Event::Epoch(m) => {
                if json {
                    println!("{}", serde_json::to_string(m).expect("metrics serialise"));
                } else if !quiet {
                    bar.println(format!(
                        "epoch {:>3}  train loss {:.4}  acc {:.4}  test loss {:.4}  acc {:.4}  sparsity {:.4}  ablated {}  lr {:.4}  {:.0}s",
                        m.epoch, m.train_loss, m.train_accuracy, m.test_loss, m.test_accuracy,
                        m.sparsity, m.ablated_neurons, m.lr, m.wall_s
                    ));
                }
            }
            _ => {}
        }
        if stop.load(Ordering::SeqCst) {
            Control::Stop
        } else {
            Control::Continue
        }
    };
    let summary = trainer.run(&mut progress)?;
    bar.finish_and_clear();
    if !writer {
        return Ok(if summary.stopped {
            ExitCode::from(130)
        } else {
            ExitCode::SUCCESS
        });
    }
    write_masks(&trainer, &dir)?;
    if summary.stopped {
        eprintln!(
            "stopped at step {}; checkpoint in {}; continue with: dst train --resume {}",
            summary.steps,
            dir.join("checkpoint").display(),
            dir.display()
        );
        return Ok(ExitCode::from(130));
    }
    crate::report::write(std::slice::from_ref(&dir), &dir.join("report.html"))?;
    // Which engine ran: how many weights were in sparse storage (0 for dense-mask).
    let sparse_layers = trainer.engine().sparse_layers();
    let engine = match sparse_layers {
        0 => "dense-mask".to_string(),
        n => format!("sparse engine ({n} layers in sparse storage)"),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "kind": "summary",
                "run_dir": dir,
                "test_accuracy": summary.test_accuracy,
                "test_loss": summary.test_loss,
                "sparsity": summary.sparsity,
                "sparse_storage_layers": sparse_layers,
                "wall_s": summary.wall_s,
                "step_profile": trainer.step_profile(),
            })
        );
    } else {
        println!(
            "test accuracy {:.4}  sparsity {:.4}  {engine}  {:.0}s  → {}",
            summary.test_accuracy,
            summary.sparsity,
            summary.wall_s,
            dir.display()
        );
        // Where this process's steps went (a resumed run: the steps since the resume).
        println!("steps: {}", trainer.step_profile().per_step_line());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dst_core::optim::{AdamWConfig, SgdConfig};

    fn args(optimizer: Option<OptimizerArg>, lr: Option<f64>) -> TrainArgs {
        TrainArgs {
            optimizer,
            lr,
            ..TrainArgs::default()
        }
    }

    /// `--optimizer sgd` on a run that already uses SGD changes nothing (it used to rebuild the
    /// optimizer from `SgdConfig::default()`, losing the file's momentum, Nesterov and weight
    /// decay); switching the kind starts from that kind's defaults, and `--lr` still applies.
    #[test]
    fn optimizer_flag_only_overrides_what_it_names() {
        let file = "[optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.5\nnesterov = false\n\
                    weight_decay = 1e-3\n";
        let mut cfg = TrainConfig::from_toml(file).unwrap();
        let before = cfg.clone();
        apply(&args(Some(OptimizerArg::Sgd), None), &mut cfg).unwrap();
        assert_eq!(cfg, before);
        let mut d = TrainConfig::default();
        apply(&args(Some(OptimizerArg::Sgd), None), &mut d).unwrap();
        assert_eq!(d, TrainConfig::default(), "default weight decay kept");
        apply(&args(Some(OptimizerArg::Adamw), Some(0.01)), &mut cfg).unwrap();
        let adam = AdamWConfig {
            lr: 0.01,
            ..AdamWConfig::default()
        };
        assert_eq!(cfg.optimizer, OptimizerConfig::AdamW(adam));
        apply(&args(Some(OptimizerArg::Sgd), None), &mut cfg).unwrap();
        assert_eq!(cfg.optimizer, OptimizerConfig::Sgd(SgdConfig::default()));
    }
}
