//! The CUDA kernels against the CPU reference on random shapes (feature `cuda`, needs a GPU).
//! The kernel tests are ignored by default, so that a run without a GPU reports them as ignored
//! rather than passed (the one on `available()`'s message runs everywhere);
//! on a GPU machine: `cargo test --release -p sparse-kernels --features cuda --test gpu --
//! --ignored` (they fail if the GPU cannot be used). Outputs are poisoned with NaN before
//! every launch, so an element a kernel forgets to write fails the comparison; fp32 relative
//! error ≤ 1e-5 of the largest reference magnitude.
#![cfg(feature = "cuda")]

mod common;

use common::Rng;
use sparse_formats::NmPattern;
use sparse_kernels::cuda::gpu::Gpu;
use sparse_kernels::cuda::{Ell, Packed24};
use sparse_kernels::{reference, SparseWeight};

/// Not ignored: runs in the `cuda` build everywhere. Without a usable GPU `available()` says
/// which part is missing (driver library, NVRTC, device); with one it is Ok.
#[test]
fn reports_why_cuda_is_unavailable() {
    if let Err(e) = sparse_kernels::cuda::available() {
        let msg = e.to_string();
        assert!(
            msg.contains("libcuda") || msg.contains("NVRTC") || msg.contains("CUDA"),
            "{msg}"
        );
    }
}

fn gpu() -> Gpu {
    Gpu::new(0).unwrap_or_else(|e| panic!("the GPU cannot be used: {e}"))
}

fn check(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let rel = (a - b).abs() / scale;
        assert!(
            rel <= 1e-5,
            "{what}: element {i} is {a}, expected {b} (relative error {rel:e})"
        );
    }
}

/// Forward (batch 1 and tiled), input gradient and value gradient of one weight.
fn check_weight(gpu: &Gpu, rng: &mut Rng, w: SparseWeight<'_>, dense: &[f32], label: &str) {
    let (rows, fan_in) = (w.rows(), w.fan_in());
    let ell = Ell::new(w).unwrap();
    let gw = gpu.upload(&ell, w.values()).unwrap();
    let bias = rng.vec(rows);
    for batch in [1usize, 7, 64, 300] {
        let x = rng.vec(batch * fan_in);
        let want = reference::forward(dense, rows, fan_in, Some(&bias), &x, batch);
        let got = gpu.forward_host(&gw, Some(&bias), &x, batch).unwrap();
        check(&format!("{label} forward, batch {batch}"), &got, &want);

        let gy = rng.vec(batch * rows);
        let gyd = gpu.to_device(&gy).unwrap();
        let mut gx = gpu.poisoned(batch * fan_in).unwrap();
        gpu.input_grad(&gw, &gyd, &mut gx, batch).unwrap();
        let mut got = gpu.to_host(&gx).unwrap();
        got.truncate(batch * fan_in);
        let want = reference::input_grad(dense, rows, fan_in, &gy, batch);
        check(&format!("{label} input grad, batch {batch}"), &got, &want);

        let xd = gpu.to_device(&x).unwrap();
        let nnz = ell.cols.len();
        let mut gv = gpu.poisoned(nnz).unwrap();
        gpu.value_grad(&gw, &xd, &gyd, &mut gv, batch).unwrap();
        let mut got = gpu.to_host(&gv).unwrap();
        got.truncate(nnz);
        let full = reference::weight_grad(rows, fan_in, &x, &gy, batch);
        let want: Vec<f32> = w
            .columns()
            .iter()
            .map(|&(r, c)| full[r * fan_in + c])
            .collect();
        check(&format!("{label} value grad, batch {batch}"), &got, &want);
    }
}

#[test]
#[ignore = "needs a CUDA GPU (see the module documentation)"]
fn kernels_match_the_cpu_reference() {
    let gpu = gpu();
    let mut rng = Rng(99);
    for case in 0..10 {
        let rows = 1 + rng.below(300);
        // Fan-ins on both sides of the 48 KiB shared-memory limit for x (12,288 floats).
        let fan_in = if case == 9 {
            13_000
        } else {
            4 * (1 + rng.below(400))
        };
        let k = 1 + rng.below(fan_in.min(200));
        let ablate = rng.below(rows);
        let (c, dense) = common::condensed(&mut rng, rows, fan_in, k, ablate, false);
        check_weight(
            &gpu,
            &mut rng,
            SparseWeight::Condensed(&c),
            &dense,
            &format!("condensed {rows}x{fan_in} k={k}"),
        );
        for (n, m) in [(2, 4), (1, 4), (2, 8)] {
            if fan_in % m != 0 {
                continue;
            }
            let (nm, dense) = common::nm(&mut rng, rows, fan_in, NmPattern::new(n, m));
            check_weight(
                &gpu,
                &mut rng,
                SparseWeight::Nm(&nm),
                &dense,
                &format!("{n}:{m} {rows}x{fan_in}"),
            );
            if (n, m) == (2, 4) {
                let packed = gpu.upload_24(&Packed24::new(&nm).unwrap()).unwrap();
                let bias = rng.vec(rows);
                let x = rng.vec(fan_in);
                let want = reference::forward(&nm.to_dense(), rows, fan_in, Some(&bias), &x, 1);
                let (xd, bd) = (gpu.to_device(&x).unwrap(), gpu.to_device(&bias).unwrap());
                let mut y = gpu.poisoned(rows).unwrap();
                gpu.forward_24_b1(&packed, Some(&bd), &xd, &mut y).unwrap();
                let mut got = gpu.to_host(&y).unwrap();
                got.truncate(rows);
                check(&format!("2:4 packed forward {rows}x{fan_in}"), &got, &want);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (see the module documentation)"]
fn repeated_runs_are_bit_identical() {
    let gpu = gpu();
    let mut rng = Rng(5);
    let (c, _) = common::condensed(&mut rng, 500, 1024, 100, 20, false);
    let gw = gpu
        .upload(&Ell::new(SparseWeight::Condensed(&c)).unwrap(), c.values())
        .unwrap();
    let x = rng.vec(128 * 1024);
    let a = gpu.forward_host(&gw, None, &x, 128).unwrap();
    let b = gpu.forward_host(&gw, None, &x, 128).unwrap();
    assert_eq!(a, b);
}
