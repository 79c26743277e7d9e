//! Trains LeNet-300-100 on Fashion-MNIST with SRigL at 90% sparsity (ERK) and reports the test
//! accuracy each epoch. The data set comes from `--data-dir DIR`, `$DST_DATA_DIR`,
//! `./data/fashion-mnist` or Debian's package (`apt-get install -y dataset-fashion-mnist`).
//!
//! Run: `cargo run --release -p examples --example train_fashion_mnist -- [--method dense|static|set|rigl|srigl] [--sparsity 0.9] [--epochs 20] [--seed 1] [--data-dir DIR]`

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dst_core::Method;
use models::data::{find_dataset, load_mnist_like, Split};
use models::train::{train_mlp, MlpConfig};

fn main() -> Result<()> {
    let mut cfg = MlpConfig::lenet_300_100_srigl();
    let mut data_dir: Option<PathBuf> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--method" => {
                cfg.method = match value()?.as_str() {
                    "dense" => None,
                    "static" => Some(Method::Static),
                    "set" => Some(Method::Set),
                    "rigl" => Some(Method::Rigl),
                    "srigl" => Some(Method::Srigl),
                    other => bail!(
                        "--method: unknown method `{other}` (dense, static, set, rigl, srigl)"
                    ),
                }
            }
            "--sparsity" => {
                cfg.sparsity = value()?.parse().context("--sparsity: not a number")?;
                if !(0.0..1.0).contains(&cfg.sparsity) {
                    bail!("--sparsity: {} is outside [0, 1)", cfg.sparsity);
                }
            }
            "--epochs" => cfg.epochs = value()?.parse().context("--epochs: not a whole number")?,
            "--seed" => cfg.seed = value()?.parse().context("--seed: not a whole number")?,
            "--data-dir" => data_dir = Some(PathBuf::from(value()?)),
            other => bail!("unknown flag `{other}`"),
        }
    }
    let dir = find_dataset("fashion-mnist", data_dir.as_deref())?;
    let train = load_mnist_like(&dir, Split::Train)?;
    let test = load_mnist_like(&dir, Split::Test)?;
    println!(
        "Fashion-MNIST from {}: {} train / {} test; LeNet-300-100, {}, seed {}",
        dir.display(),
        train.len(),
        test.len(),
        match cfg.method {
            Some(m) => format!("{m:?} at {:.0}% sparsity (ERK)", cfg.sparsity * 100.0),
            None => "dense".into(),
        },
        cfg.seed
    );
    let history = train_mlp(&train, &test, &cfg, |m| {
        println!(
            "epoch {:>2}  train loss {:.4}  test loss {:.4}  test acc {:.4}  sparsity {:.4}  ablated {}  {:.0}s",
            m.epoch, m.train_loss, m.test_loss, m.test_accuracy, m.sparsity, m.ablated_neurons, m.wall_s
        );
    })?;
    let last = history.last().context("no epoch ran")?;
    println!("test accuracy {:.4}", last.test_accuracy);
    Ok(())
}
