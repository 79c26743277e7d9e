//! SRigL in your own candle training loop: wrap the linear layers, build a `Sparsifier`, call
//! it after every optimiser step. Synthetic data, so it runs anywhere in seconds.
//!
//! Run: `cargo run --release -p examples --example srigl_custom_loop`

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{loss, VarBuilder, VarMap};
use dst_core::layers::sparse_linear;
use dst_core::optim::{MaskAware, MaskedSgd, SgdConfig};
use dst_core::{Method, Rng, Sparsifier, SparsifierConfig};

fn main() -> Result<()> {
    let (dim, hidden, classes, steps) = (64, 512, 8, 600);
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let fc1 = sparse_linear(dim, hidden, 0, vb.pp("fc1"))?;
    let fc2 = sparse_linear(hidden, hidden, 0, vb.pp("fc2"))?;
    let fc3 = sparse_linear(hidden, classes, 0, vb.pp("fc3"))?;
    let forward = |x: &Tensor| -> candle_core::Result<Tensor> {
        fc3.forward(&fc2.forward(&fc1.forward(x)?.relu()?)?.relu()?)
    };

    // SRigL at 90% with the paper's defaults (ERK, ΔT = 100, α = 0.3 cosine, γ_sal = 0.3,
    // T_end = 75% of training); the output layer is protected from ablation by default.
    let mut cfg = SparsifierConfig::new(Method::Srigl, 0.9, steps);
    cfg.schedule.delta_t = 50;
    let mut sparsifier = Sparsifier::new(
        vec![
            fc1.weight().clone(),
            fc2.weight().clone(),
            fc3.weight().clone(),
        ],
        cfg,
    )?;
    let mut opt = MaskedSgd::new(
        vm.all_vars(),
        SgdConfig {
            lr: 0.05,
            weight_decay: 5e-4, // as before the default became 1e-4
            ..SgdConfig::default()
        },
    )?;
    sparsifier.register(&mut opt)?;
    for b in sparsifier.budgets() {
        println!(
            "{:<12} sparsity {:.3} budget {:>6}{}",
            b.name,
            b.sparsity,
            b.budget,
            if b.dense { " (dense)" } else { "" }
        );
    }

    let mut rng = Rng::new(1);
    let proj: Vec<f32> = (0..classes * dim).map(|_| rng.normal() as f32).collect();
    let batch = |rng: &mut Rng, n: usize| -> Result<(Tensor, Tensor)> {
        let x: Vec<f32> = (0..n * dim).map(|_| rng.normal() as f32).collect();
        let y: Vec<u32> = (0..n)
            .map(|i| {
                (0..classes)
                    .map(|c| {
                        (0..dim)
                            .map(|d| x[i * dim + d] * proj[c * dim + d])
                            .sum::<f32>()
                    })
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(c, _)| c as u32)
                    .unwrap_or(0)
            })
            .collect();
        Ok((
            Tensor::from_vec(x, (n, dim), &dev)?,
            Tensor::from_vec(y, n, &dev)?,
        ))
    };

    for step in 1..=steps {
        let (x, y) = batch(&mut rng, 128)?;
        let loss = loss::cross_entropy(&forward(&x)?, &y)?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        if let Some(report) = sparsifier.step(step, &grads, &mut opt)? {
            let l = &report.layers[1];
            println!(
                "step {step:>4}  loss {:.4}  α {:.3}  fc2: dropped {} grown {} k {:?} ablated {}  ITOP {:.3}",
                loss.to_scalar::<f32>()?,
                report.drop_fraction,
                l.stats.dropped,
                l.stats.grown,
                l.stats.fan_in,
                l.stats.ablated_rows,
                report.itop
            );
        }
    }
    let (x, y) = batch(&mut rng, 2048)?;
    let acc = forward(&x)?
        .argmax(D::Minus1)?
        .eq(&y)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    println!(
        "held-out accuracy {acc:.3}, global sparsity {:.4}",
        sparsifier.global_sparsity()
    );
    for s in sparsifier.summary() {
        println!(
            "{:<12} fan-in {}..{}  ablated {}",
            s.name, s.min_fan_in, s.max_fan_in, s.ablated_rows
        );
    }
    // The trained first layer as a constant fan-in layout for fast inference.
    let c = fc1.to_condensed()?;
    println!(
        "fc1 condensed: {} active rows × k = {}",
        c.n_active(),
        c.k()
    );
    Ok(())
}
