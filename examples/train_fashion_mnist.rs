//! Trains LeNet-300-100 on Fashion-MNIST with SRigL at 90% sparsity (ERK) and reports the test
//! accuracy each epoch. The same code trains any other method by changing one config field
//! (`cfg.method.name`): `--method dense|static|set|rigl|srigl|lbc|srste|nm-magnitude`.
//!
//! The data set comes from `--data-dir DIR`, `$DST_DATA_DIR`, `./data/fashion-mnist` or Debian's
//! package (`apt-get install -y dataset-fashion-mnist`).
//!
//! Run: `cargo run --release -p examples --example train_fashion_mnist -- [--method srigl]
//! [--sparsity 0.9] [--n 2 --m 4] [--epochs 20] [--seed 1] [--engine auto|dense-mask|sparse]
//! [--data-dir DIR] [--out RUN_DIR]` (the default engine, `auto`, trains SRigL at 90% in the
//! sparse engine).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use models::{Control, Datasets, EngineKind, Event, MethodName, TrainConfig, Trainer};

/// The allocator a training binary should use (see `crates/cli/src/main.rs`: glibc's malloc
/// unmaps and re-faults every large tensor, a third of a step on wide layers).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    models::process::init();
    // LeNet-300-100, SRigL 90% ERK, 20 epochs, batch 128, Nesterov SGD 0.1 with cosine decay.
    let mut cfg = TrainConfig::default();
    let mut out: Option<PathBuf> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--method" => {
                cfg.method.name = value()?
                    .parse::<MethodName>()
                    .map_err(|e| anyhow::anyhow!("--method: {e}"))?
            }
            "--sparsity" => {
                cfg.method.sparsity = value()?.parse().context("--sparsity: not a number")?
            }
            "--n" => cfg.method.n = value()?.parse().context("--n: not a whole number")?,
            "--m" => cfg.method.m = value()?.parse().context("--m: not a whole number")?,
            "--epochs" => cfg.epochs = value()?.parse().context("--epochs: not a whole number")?,
            "--seed" => cfg.seed = value()?.parse().context("--seed: not a whole number")?,
            "--engine" => {
                cfg.engine = match value()?.as_str() {
                    "auto" => EngineKind::Auto,
                    "dense-mask" => EngineKind::DenseMask,
                    "sparse" => EngineKind::Sparse,
                    other => bail!("--engine: unknown engine `{other}` (auto, dense-mask, sparse)"),
                }
            }
            "--data-dir" => cfg.data.dir = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            other => bail!("unknown flag `{other}`"),
        }
    }
    let data = Datasets::load(&cfg)?;
    let m = &cfg.method;
    println!(
        "Fashion-MNIST: {} train / {} test; LeNet-300-100, {}, {:?} engine, seed {}",
        data.train.len(),
        data.test.len(),
        match m.name {
            MethodName::Dense => "dense".to_string(),
            n if n.is_nm() => format!("{} {}:{}", n.as_str(), m.n, m.m),
            n => format!(
                "{} at {:.0}% sparsity (ERK)",
                n.as_str(),
                m.sparsity * 100.0
            ),
        },
        cfg.engine_for_run(),
        cfg.seed
    );
    let mut trainer = Trainer::new(cfg, data)?;
    if let Some(dir) = &out {
        trainer = trainer.with_output(dir)?;
    }
    let summary = trainer.run(&mut |e: &Event| {
        if let Event::Epoch(m) = e {
            println!(
                "epoch {:>2}  train loss {:.4}  test loss {:.4}  test acc {:.4}  sparsity {:.4}  ablated {}  {:.0}s",
                m.epoch, m.train_loss, m.test_loss, m.test_accuracy, m.sparsity, m.ablated_neurons, m.wall_s
            );
        }
        Control::Continue
    })?;
    println!("test accuracy {:.4}", summary.test_accuracy);
    Ok(())
}
