//! 2:4 sparse training with LBC in a candle loop, export to the N:M layout (and the NVIDIA 2:4
//! format), and inference with the sparse-kernels N:M kernels. Synthetic data, runs in seconds.
//! Swap `NmMethod::Lbc` for `NmMethod::SrSte { lambda_w: 2e-4 }` or
//! `NmMethod::OneShot { prune_epoch }` (ASP: dense until `prune_epoch`, then pruned once), and
//! `NmPattern::new(2, 4)` for any N:M.
//!
//! Run: `cargo run --release -p examples --example lbc_nm`

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{loss, VarBuilder, VarMap};
use dst_core::optim::{MaskAware, MaskedSgd, SgdConfig};
use dst_core::Rng;
use lbc::lbc::{ScoreOpt, ScoreSgd};
use lbc::schedule::RemovalSchedule;
use lbc::training::{nm_linear, NmMethod, NmSparsifier};
use sparse_formats::NmPattern;

fn main() -> Result<()> {
    let (dim, hidden, classes, epochs, steps) = (64, 256, 8, 12, 40);
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let fc1 = nm_linear(dim, hidden, 0, vb.pp("fc1"))?;
    let fc2 = nm_linear(hidden, classes, 0, vb.pp("fc2"))?;
    let method = NmMethod::Lbc {
        schedule: RemovalSchedule {
            t_i: 0,
            t_f: 8,
            power: 3.0,
        },
        scores: ScoreOpt::Sgd(ScoreSgd {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-4,
            nesterov: false,
        }),
        freeze_scores: true,
        max_scores: 1 << 24,
    };
    let mut sp = NmSparsifier::new(vec![fc1.clone(), fc2.clone()], NmPattern::new(2, 4), method)?;
    let mut opt = MaskedSgd::new(
        vm.all_vars(),
        SgdConfig {
            lr: 0.05,
            nesterov: false,
            weight_decay: 5e-4, // as before the default became 1e-4
            ..SgdConfig::default()
        },
    )?;
    let mut rng = Rng::new(1);
    let proj: Vec<f32> = (0..classes * dim).map(|_| rng.normal() as f32).collect();
    for epoch in 0..epochs {
        let mut total = 0.0;
        for _ in 0..steps {
            sp.before_forward(epoch)?;
            let x: Vec<f32> = (0..64 * dim).map(|_| rng.normal() as f32).collect();
            let y: Vec<u32> = (0..64)
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
            let x = Tensor::from_vec(x, (64, dim), &dev)?;
            let y = Tensor::from_vec(y, 64, &dev)?;
            let l = loss::cross_entropy(&fc2.forward(&fc1.forward(&x)?.relu()?)?, &y)?;
            total += l.to_scalar::<f32>()?;
            let mut g = l.backward()?;
            sp.after_backward(&mut g)?;
            opt.step(&g)?;
        }
        let density: Vec<String> = sp
            .masks()
            .iter()
            .map(|(n, m)| format!("{n} {:.3}", m.density()))
            .collect();
        println!(
            "epoch {epoch:>2}  loss {:.4}  density {}",
            total / steps as f32,
            density.join(", ")
        );
    }
    sp.before_forward(epochs)?;
    let exported = sp.export()?;
    for (name, nm) in &exported {
        let nvidia = nm.to_nvidia_2to4()?;
        println!(
            "{name}: {}×{} 2:4, {} kept values, {} NVIDIA metadata words",
            nm.rows(),
            nm.fan_in(),
            nm.values().len(),
            nvidia.metadata.len()
        );
    }

    // Inference with the N:M kernels gives the candle model's output.
    let x: Vec<f32> = (0..4 * dim).map(|_| rng.normal() as f32).collect();
    let xt = Tensor::from_vec(x.clone(), (4, dim), &dev)?;
    let want = fc1.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?;
    let bias = vm
        .data()
        .lock()
        .expect("varmap")
        .get("fc1.bias")
        .expect("bias")
        .as_tensor()
        .to_vec1::<f32>()?;
    let nm1 = &exported[0].1;
    let got = sparse_kernels::forward(
        nm1,
        nm1.values(),
        Some(&bias),
        &x,
        4,
        sparse_kernels::Exec::default(),
    )?;
    let err = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!(
        "fc1 through the sparse-kernels 2:4 kernel: y[0] = {:.5} (candle {:.5}), max difference {err:.2e}",
        got[0], want[0]
    );
    anyhow::ensure!(err < 1e-4, "kernel and candle disagree");
    Ok(())
}
