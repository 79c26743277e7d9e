//! Why LBC trails SR-STE at 1:16 on LeNet-300-100 (docs/results.md): trains LBC, SR-STE and
//! one-shot magnitude at N:M on Fashion-MNIST epoch by epoch and reports, for the sparse layer
//! `fc1`, how its mask evolves — density, the share of positions that changed during each epoch
//! (mask churn), and at the end the overlap between the methods' final masks.
//!
//! LBC only removes: a weight outside the union of surviving combinations gets no gradient and
//! can never come back, and after `t_f` the mask is frozen. SR-STE keeps every weight trained
//! (straight-through) and re-selects the top N by magnitude at every step. The churn column shows
//! how much of SR-STE's mask is still moving after LBC's mask is fixed.
//!
//! Run: `cargo run --release -p examples --example nm_mask_study -- [--n 1 --m 16] [--epochs 5]
//! [--seed 1] [--lbc-t-f E] [--methods lbc,srste,nm-magnitude] [--data-dir DIR]`

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use models::{Control, Datasets, Event, MethodName, TrainConfig, Trainer};
use sparse_formats::Mask;

/// The layer studied: LeNet-300-100's first layer (784 inputs, groups of up to 16).
const LAYER: &str = "fc1.weight";

fn fc1_mask(trainer: &Trainer) -> Result<Mask> {
    trainer
        .masks()
        .into_iter()
        .find(|(name, _)| name == LAYER)
        .map(|(_, m)| m)
        .with_context(|| format!("no layer {LAYER}"))
}

/// Share of positions of `b` that differ from `a`, over the active positions of `b`.
fn changed(a: &Mask, b: &Mask) -> Result<f64> {
    Ok(b.difference(a)?.nnz() as f64 / b.nnz().max(1) as f64)
}

fn main() -> Result<()> {
    let mut cfg = TrainConfig {
        epochs: 5,
        ..TrainConfig::default()
    };
    cfg.method.n = 1;
    cfg.method.m = 16;
    // As `cargo xtask accuracy`: fc3 (output) and fc2 (fan-in 300) stay dense.
    cfg.method.dense_layers = vec!["fc2.weight".into(), "fc3.weight".into()];
    let mut methods = vec![MethodName::Lbc, MethodName::Srste, MethodName::NmMagnitude];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--n" => cfg.method.n = value()?.parse().context("--n: not a whole number")?,
            "--m" => cfg.method.m = value()?.parse().context("--m: not a whole number")?,
            "--epochs" => cfg.epochs = value()?.parse().context("--epochs: not a whole number")?,
            "--seed" => cfg.seed = value()?.parse().context("--seed: not a whole number")?,
            "--lbc-t-f" => {
                cfg.method.lbc_t_f = Some(value()?.parse().context("--lbc-t-f: not a number")?)
            }
            "--methods" => {
                methods = value()?
                    .split(',')
                    .map(|s| s.parse::<MethodName>())
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| anyhow::anyhow!("--methods: {e}"))?
            }
            "--data-dir" => cfg.data.dir = Some(PathBuf::from(value()?)),
            other => bail!("unknown flag `{other}`"),
        }
    }
    let data = Datasets::load(&cfg)?;
    let steps_per_epoch = data.train.len().div_ceil(cfg.batch_size);
    let mut finals: Vec<(MethodName, Mask, f32)> = Vec::new();
    for &method in &methods {
        let mut c = cfg.clone();
        c.method.name = method;
        let mut trainer = Trainer::new(c, data.clone())?;
        println!(
            "\n{} {}:{} on {LAYER}, seed {}",
            method.as_str(),
            cfg.method.n,
            cfg.method.m,
            cfg.seed
        );
        println!("epoch  density  changed during epoch  changed since epoch 1  test acc");
        let accuracy = std::sync::Mutex::new(0.0f32);
        let mut record = |e: &Event| {
            if let Event::Epoch(m) = e {
                *accuracy.lock().unwrap() = m.test_accuracy;
            }
            Control::Continue
        };
        let mut history: Vec<Mask> = Vec::new();
        for epoch in 1..=cfg.epochs {
            trainer.run_until(epoch * steps_per_epoch, &mut record)?;
            let mask = fc1_mask(&trainer)?;
            let during = match history.last() {
                Some(prev) => format!("{:>6.2}%", 100.0 * changed(prev, &mask)?),
                None => "     -".to_string(),
            };
            let since = match history.first() {
                Some(first) => format!("{:>6.2}%", 100.0 * changed(first, &mask)?),
                None => "     -".to_string(),
            };
            println!(
                "{epoch:>5}  {:>7.4}  {during:>20}  {since:>21}  {:.4}",
                mask.density(),
                *accuracy.lock().unwrap()
            );
            history.push(mask);
        }
        finals.push((
            method,
            history.pop().context("no epochs")?,
            *accuracy.lock().unwrap(),
        ));
    }
    println!("\nfinal masks: share of positions two methods agree on");
    for (i, (a, ma, _)) in finals.iter().enumerate() {
        for (b, mb, _) in &finals[i + 1..] {
            let agree = ma.intersection(mb)?.nnz() as f64 / ma.nnz().max(1) as f64;
            println!("  {} vs {}: {:.2}%", a.as_str(), b.as_str(), 100.0 * agree);
        }
    }
    for (method, _, acc) in &finals {
        println!("{:>13}: test accuracy {acc:.4}", method.as_str());
    }
    Ok(())
}
