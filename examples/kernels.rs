//! A trained sparse layer as fast kernels: the slice API for inference, and the candle custom
//! op inside autograd for training the stored values.
//!
//! Run: `cargo run --release -p examples --example kernels`

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use sparse_formats::{Condensed, Mask};
use sparse_kernels::ops::{sparse_linear, SparseStructure};
use sparse_kernels::{forward, Exec};

fn main() -> Result<()> {
    // A 90%-sparse 3072 → 768 layer with constant fan-in k = 307 (SRigL's benchmark layer).
    let (fan_in, rows, k) = (3072, 768, 307);
    let mut mask = Mask::zeros(rows, fan_in);
    let mut w = vec![0.0f32; rows * fan_in];
    for r in 0..rows {
        for j in 0..k {
            let c = (r * 131 + j * 10) % fan_in; // distinct columns per row (10·j < fan_in)
            mask.set(r, c, true);
            w[r * fan_in + c] = ((r + j) % 7) as f32 / 7.0 - 0.5;
        }
    }
    let layer = Condensed::from_dense(rows, fan_in, &w, &mask, None)?;

    // Inference on slices: batch 1 and batch 256.
    for batch in [1usize, 256] {
        let x: Vec<f32> = (0..batch * fan_in)
            .map(|i| (i % 13) as f32 / 13.0)
            .collect();
        // Best of a few calls: the first one also pays for page faults and warm-up.
        let mut best = f64::MAX;
        let mut y = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            y = forward(&layer, layer.values(), None, &x, batch, Exec::default())?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "forward batch {batch:>3}: {:>8.1} µs, y[0] = {:.4}",
            best * 1e6,
            y[0]
        );
    }

    // Training the stored values with candle autograd: one SGD step on a squared loss.
    let dev = Device::Cpu;
    let structure = SparseStructure::from(layer.clone());
    let values = Var::new(layer.values(), &dev)?;
    let x = Tensor::rand(0f32, 1.0, (32, fan_in), &dev)?;
    let target = Tensor::zeros((32, rows), candle_core::DType::F32, &dev)?;
    let loss = |v: &Var| -> Result<f32> {
        let y = sparse_linear(&x, v.as_tensor(), &structure, None)?;
        Ok(((y - &target)?.sqr()?.mean_all()?).to_scalar::<f32>()?)
    };
    let before = loss(&values)?;
    let y = sparse_linear(&x, values.as_tensor(), &structure, None)?;
    let grads = (y - &target)?.sqr()?.mean_all()?.backward()?;
    let g = grads.get(&values).expect("values take part in the graph");
    values.set(&(values.as_tensor() - (g * 0.5)?)?)?;
    let after = loss(&values)?;
    println!("one SGD step on the stored values: loss {before:.4} → {after:.4}");
    anyhow::ensure!(after < before, "the step should reduce the loss");
    Ok(())
}
