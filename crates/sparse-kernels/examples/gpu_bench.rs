//! The GPU suite of `cargo xtask bench --gpu`: condensed and N:M forward kernels against cuBLAS
//! dense SGEMM at 3072→768 and 4096→4096, batch 1/16/256/2048, 80–99% sparsity; CUDA-event
//! times, median of 50 launches after 10 warm-up launches. Prints a markdown table (and JSON
//! with `--json FILE`). Without a usable GPU it says why and exits with status 0.
//!
//! Built on the development machine and run on the GPU machine (which has no Rust):
//! `cargo build --release -p sparse-kernels --features cuda --example gpu_bench`, then run
//! `target/release/examples/gpu_bench` there.

use sparse_formats::{Condensed, Mask, NmPattern, NmSparse};
use sparse_kernels::cuda::gpu::Gpu;
use sparse_kernels::cuda::{Ell, Packed24};
use sparse_kernels::SparseWeight;

/// One sparse layout of the suite.
struct Case {
    label: String,
    sparsity: f64,
    ell: Ell,
    values: Vec<f32>,
    packed: Option<Packed24>,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Median milliseconds of `run` over 50 launches (10 warm-up), each timed with CUDA events.
fn time(gpu: &Gpu, mut run: impl FnMut()) -> f64 {
    for _ in 0..10 {
        run();
    }
    let mut ms = Vec::new();
    for _ in 0..50 {
        let start = gpu
            .stream()
            .record_event(Some(cudarc_flags()))
            .expect("event");
        run();
        let end = gpu
            .stream()
            .record_event(Some(cudarc_flags()))
            .expect("event");
        ms.push(start.elapsed_ms(&end).expect("elapsed") as f64);
    }
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

fn cudarc_flags() -> cudarc::driver::sys::CUevent_flags {
    cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json_out = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("GPU suite skipped: {e}");
            return;
        }
    };
    let mut rng = Rng(1);
    let mut records = Vec::new();
    println!(
        "| shape (in→out) | format | sparsity | batch | dense cuBLAS ms | sparse ms | speed-up |"
    );
    println!("|---|---|---|---|---|---|---|");
    let blas = gpu.blas().expect("cuBLAS");
    for (fan_in, rows) in [(3072usize, 768usize), (4096, 4096)] {
        let w_dense: Vec<f32> = (0..rows * fan_in).map(|_| rng.f()).collect();
        let wd = gpu.to_device(&w_dense).expect("upload");
        let mut layouts: Vec<Case> = Vec::new();
        for s in [0.8, 0.9, 0.95, 0.99] {
            let k = ((1.0 - s) * fan_in as f64).round().max(1.0) as usize;
            let mut mask = Mask::zeros(rows, fan_in);
            for r in 0..rows {
                for j in 0..k {
                    mask.set(
                        r,
                        (j * fan_in / k + (rng.next() as usize % (fan_in / k))) % fan_in,
                        true,
                    );
                }
            }
            let w: Vec<f32> = (0..rows * fan_in)
                .map(|i| if mask.as_slice()[i] { w_dense[i] } else { 0.0 })
                .collect();
            let Ok(c) = Condensed::from_dense(rows, fan_in, &w, &mask, None) else {
                continue;
            };
            let ell = Ell::new(SparseWeight::Condensed(&c)).expect("ell");
            layouts.push(Case {
                label: "condensed".into(),
                sparsity: s,
                ell,
                values: c.values().to_vec(),
                packed: None,
            });
        }
        for (n, m) in [(2usize, 4usize), (1, 4), (1, 16)] {
            let mut mask = Mask::zeros(rows, fan_in);
            for r in 0..rows {
                for g in 0..fan_in / m {
                    let first = rng.next() as usize % (m - n + 1);
                    for t in 0..n {
                        mask.set(r, g * m + first + t, true);
                    }
                }
            }
            let w: Vec<f32> = (0..rows * fan_in)
                .map(|i| if mask.as_slice()[i] { w_dense[i] } else { 0.0 })
                .collect();
            let nm =
                NmSparse::from_dense(rows, fan_in, NmPattern::new(n, m), &w, &mask).expect("nm");
            let ell = Ell::new(SparseWeight::Nm(&nm)).expect("ell");
            let packed = ((n, m) == (2, 4)).then(|| Packed24::new(&nm).expect("packed"));
            layouts.push(Case {
                label: format!("{n}:{m}"),
                sparsity: 1.0 - n as f64 / m as f64,
                ell,
                values: nm.values().to_vec(),
                packed,
            });
        }
        for batch in [1usize, 16, 256, 2048] {
            let x: Vec<f32> = (0..batch * fan_in).map(|_| rng.f()).collect();
            let xd = gpu.to_device(&x).expect("upload");
            let mut xt = gpu.poisoned(batch * fan_in).expect("alloc");
            let mut y = gpu.poisoned(batch * rows).expect("alloc");
            let dense = time(&gpu, || {
                gpu.dense_forward(&blas, &wd, &xd, &mut y, rows, fan_in, batch)
                    .expect("sgemm")
            });
            for Case {
                label: format,
                sparsity: s,
                ell,
                values,
                packed,
            } in &layouts
            {
                let gw = gpu.upload(ell, values).expect("upload");
                let sparse = time(&gpu, || {
                    gpu.forward(&gw, None, &xd, &mut xt, &mut y, batch)
                        .expect("forward")
                });
                let mut rows_out = vec![(format.clone(), sparse)];
                if let (Some(p), 1) = (packed, batch) {
                    let gp = gpu.upload_24(p).expect("upload");
                    let t = time(&gpu, || {
                        gpu.forward_24_b1(&gp, None, &xd, &mut y).expect("2:4")
                    });
                    rows_out.push(("2:4 packed".into(), t));
                }
                for (label, t) in rows_out {
                    println!(
                        "| {fan_in}→{rows} | {label} | {:.0}% | {batch} | {dense:.4} | {t:.4} | {:.2}× |",
                        s * 100.0,
                        dense / t
                    );
                    records.push(format!(
                        "{{\"suite\":\"gpu\",\"fan_in\":{fan_in},\"rows\":{rows},\"format\":\"{label}\",\"sparsity\":{s},\"batch\":{batch},\"dense_ms\":{dense},\"sparse_ms\":{t}}}"
                    ));
                }
            }
        }
    }
    if let Some(path) = json_out {
        std::fs::write(&path, format!("[{}]\n", records.join(",\n"))).expect("write json");
    }
}
