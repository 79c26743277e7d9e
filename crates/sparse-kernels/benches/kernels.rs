//! The kernel benchmark suite: every sparse kernel against candle's dense matmul on the same
//! shapes, interleaved in the same run. Normally run through `cargo xtask bench`, which runs it
//! once with one thread and once with all threads and writes the tables.
//!
//! `cargo bench -p sparse-kernels --bench kernels -- [--quick] [--json FILE] [--op OP] [--isa ISA]`
//! (thread count: `RAYON_NUM_THREADS`, as for candle).

/// The allocator the `dst` binary uses (see `crates/cli/src/main.rs`): outputs and tiles are
/// allocated per call, and glibc would page-fault large ones anew every time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::time::Instant;

use candle_core::{Device, Tensor};
use sparse_formats::{Condensed, Csr, Mask, NmPattern, NmSparse};
use sparse_kernels::{candle_threads, Exec, Isa, SparseWeight, Transposed};

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
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    /// `count` distinct sorted picks from `0..n` (partial Fisher–Yates).
    fn choose(&mut self, n: usize, count: usize, scratch: &mut Vec<usize>) -> Vec<usize> {
        scratch.clear();
        scratch.extend(0..n);
        for i in 0..count {
            let j = i + (self.next() % (n - i) as u64) as usize;
            scratch.swap(i, j);
        }
        let mut out = scratch[..count].to_vec();
        out.sort_unstable();
        out
    }
}

/// A measured closure.
type Job<'a> = Box<dyn FnMut() + 'a>;

enum Weight {
    Condensed(Condensed),
    Nm(NmSparse),
    Csr(Csr),
}

impl Weight {
    fn as_ref(&self) -> SparseWeight<'_> {
        match self {
            Weight::Condensed(w) => w.into(),
            Weight::Nm(w) => w.into(),
            Weight::Csr(w) => w.into(),
        }
    }
    /// Bytes of the stored weight: values plus indices plus per-row metadata.
    fn weight_bytes(&self) -> usize {
        match self {
            Weight::Condensed(w) => {
                let ib = match w.indices().index_type() {
                    sparse_formats::IndexType::U16 => 2,
                    sparse_formats::IndexType::U32 => 4,
                };
                w.nnz() * (4 + ib) + 4 * w.n_active()
            }
            Weight::Nm(w) => w.values().len() * 5,
            Weight::Csr(w) => w.nnz() * 8 + 8 * (w.rows() + 1),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Condensed(f64),
    Csr(f64),
    Nm(usize, usize),
}

fn build(kind: Kind, rows: usize, fan_in: usize, rng: &mut Rng) -> Weight {
    let mut mask = Mask::zeros(rows, fan_in);
    let mut scratch = Vec::new();
    match kind {
        Kind::Condensed(s) => {
            let k = (((1.0 - s) * fan_in as f64).round() as usize).max(1);
            for r in 0..rows {
                for c in rng.choose(fan_in, k, &mut scratch) {
                    mask.set(r, c, true);
                }
            }
        }
        Kind::Csr(s) => {
            let nnz = (((1.0 - s) * (rows * fan_in) as f64).round() as usize).max(1);
            for i in rng.choose(rows * fan_in, nnz, &mut scratch) {
                mask.set(i / fan_in, i % fan_in, true);
            }
        }
        Kind::Nm(n, m) => {
            let p = NmPattern::new(n, m);
            for r in 0..rows {
                for g in 0..p.groups(fan_in) {
                    for q in rng.choose(m, n, &mut scratch) {
                        mask.set(r, p.column(g, q), true);
                    }
                }
            }
        }
    }
    let w: Vec<f32> = mask
        .as_slice()
        .iter()
        .map(|&b| if b { rng.f() } else { 0.0 })
        .collect();
    match kind {
        Kind::Condensed(_) => {
            Weight::Condensed(Condensed::from_dense(rows, fan_in, &w, &mask, None).unwrap())
        }
        Kind::Csr(_) => Weight::Csr(Csr::from_dense(rows, fan_in, &w, &mask).unwrap()),
        Kind::Nm(n, m) => {
            Weight::Nm(NmSparse::from_dense(rows, fan_in, NmPattern::new(n, m), &w, &mask).unwrap())
        }
    }
}

/// Runs `f` `iters` times and returns ns per call.
fn time(iters: usize, f: &mut dyn FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Interleaved measurement: each side is warmed up for `warm_ms` (its fastest warm call sets
/// how many calls make one sample of ~`sample_ms`), then `reps` samples of each are taken,
/// alternating sparse and dense. Returns the (sparse, dense) medians in ns per call.
fn measure(
    reps: usize,
    warm_ms: f64,
    sample_ms: f64,
    sparse: &mut dyn FnMut(),
    dense: &mut dyn FnMut(),
) -> (f64, f64) {
    let warm = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        let mut best = f64::MAX;
        while start.elapsed().as_secs_f64() * 1e3 < warm_ms {
            best = best.min(time(1, f));
        }
        best
    };
    let iters = |t: f64| ((sample_ms * 1e6 / t).ceil() as usize).clamp(1, 1_000_000);
    let (is, id) = (iters(warm(sparse)), iters(warm(dense)));
    let (mut s, mut d) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps {
        s.push(time(is, sparse));
        d.push(time(id, dense));
    }
    (median(&mut s), median(&mut d))
}

/// [`measure`] of two ops that each produce a tensor: forward alone, or forward and the
/// backward pass of `y.sum_all()` (every gradient the op computes).
fn measure_pass(
    backward: bool,
    (reps, warm_ms, sample_ms): (usize, f64, f64),
    ours: &dyn Fn() -> Tensor,
    theirs: &dyn Fn() -> Tensor,
) -> (f64, f64) {
    let run = |y: Tensor| {
        if backward {
            black_box(y.sum_all().unwrap().backward().unwrap());
        } else {
            black_box(y);
        }
    };
    measure(reps, warm_ms, sample_ms, &mut || run(ours()), &mut || {
        run(theirs())
    })
}

/// `sparse_kernels::norm::batch_norm_relu_train` (a ResNet's `relu(bn(conv(x)))`) against
/// candle-nn's `BatchNorm::forward_train` followed by candle's `relu`, on ResNet-18's CIFAR
/// activation shapes, batch 32: forward alone and forward + backward (the gradients of the
/// input, the scale and the shift). GB/s counts the passes over the activation each makes
/// (forward: two reads, one write; backward: two reads of `x` and `∂y`, one write).
fn norms(
    quick: bool,
    rng: &mut Rng,
    threads: usize,
    (reps, warm_ms, sample_ms): (usize, f64, f64),
) -> Vec<serde_json::Value> {
    use candle_core::{DType, Var};
    use sparse_kernels::norm::batch_norm_relu_train;
    let dev = Device::Cpu;
    let all: &[(usize, usize)] = &[(64, 32), (128, 16), (256, 8), (512, 4)];
    let shapes = if quick { &all[..1] } else { all };
    let batch = 32;
    let mut out = Vec::new();
    for &(c, side) in shapes {
        let n = batch * c * side * side;
        let x = Var::from_vec(rng.vec(n), (batch, c, side, side), &dev).unwrap();
        let g = Var::from_vec(rng.vec(c), c, &dev).unwrap();
        let b = Var::from_vec(rng.vec(c), c, &dev).unwrap();
        let bn = candle_nn::BatchNorm::new(
            c,
            Tensor::zeros(c, DType::F32, &dev).unwrap(),
            Tensor::ones(c, DType::F32, &dev).unwrap(),
            g.as_tensor().clone(),
            b.as_tensor().clone(),
            1e-5,
        )
        .unwrap();
        let ours = || {
            batch_norm_relu_train(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5)
                .unwrap()
                .0
        };
        let candle = || bn.forward_train(x.as_tensor()).unwrap().relu().unwrap();
        for (op, passes) in [("forward", 3.0), ("forward+backward", 6.0)] {
            let timing = (reps, warm_ms, sample_ms);
            let (o, cn) = measure_pass(passes > 3.0, timing, &ours, &candle);
            let shape = format!("{c}×{side}×{side}");
            let bytes = passes * 4.0 * n as f64;
            eprintln!(
                "   batch-norm+relu {op:<16} {shape:<12} b={batch}  ours {:>8.3} ms  candle-nn {:>8.3} ms  x{:.2}  {:.1} GB/s",
                o / 1e6,
                cn / 1e6,
                cn / o,
                bytes / o
            );
            out.push(serde_json::json!({
                "suite": "norm", "op": op, "shape": shape, "batch": batch, "threads": threads,
                "median_ns": o.round(), "candle_median_ns": cn.round(),
                "speedup_vs_candle": cn / o, "effective_gb_per_s": bytes / o,
            }));
        }
    }
    out
}

/// `sparse_kernels::conv::conv2d` against candle's `conv2d` (plus a broadcast bias) on the
/// conv shapes of the train suite's nets, batch 32: forward alone and forward + backward (the
/// gradient of the input, the kernel and the bias).
fn convs(
    quick: bool,
    rng: &mut Rng,
    threads: usize,
    (reps, warm_ms, sample_ms): (usize, f64, f64),
) -> Vec<serde_json::Value> {
    use candle_core::Var;
    use sparse_kernels::conv::{conv2d, ConvSpec};
    let dev = Device::Cpu;
    // (in, out, side, kernel, padding, stride): LeNet-5's conv1 and conv2, ResNet-18's stage
    // convs.
    let all: &[(usize, usize, usize, usize, usize, usize)] = &[
        (1, 6, 28, 5, 2, 1),
        (6, 16, 14, 5, 0, 1),
        (64, 64, 32, 3, 1, 1),
        (128, 128, 16, 3, 1, 1),
        (256, 256, 8, 3, 1, 1),
        (128, 256, 16, 3, 1, 2),
    ];
    let shapes = if quick { &all[2..3] } else { all };
    let batch = 32;
    let mut out = Vec::new();
    for &(cin, cout, side, k, padding, stride) in shapes {
        let x = Var::from_vec(
            rng.vec(batch * cin * side * side),
            (batch, cin, side, side),
            &dev,
        )
        .unwrap();
        let w = Var::from_vec(rng.vec(cout * cin * k * k), (cout, cin, k, k), &dev).unwrap();
        let b = Var::from_vec(rng.vec(cout), cout, &dev).unwrap();
        let spec = ConvSpec {
            padding,
            stride,
            ..ConvSpec::default()
        };
        let ours = || conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), spec).unwrap();
        let candle = || {
            x.as_tensor()
                .conv2d(w.as_tensor(), padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.as_tensor().reshape((1, cout, 1, 1)).unwrap())
                .unwrap()
        };
        let oh = (side + 2 * padding - k) / stride + 1;
        let flop = 2.0 * (batch * cout * cin * k * k * oh * oh) as f64;
        for (op, passes) in [("forward", 1.0), ("forward+backward", 3.0)] {
            let timing = (reps, warm_ms, sample_ms);
            let (o, c) = measure_pass(passes > 1.0, timing, &ours, &candle);
            let shape = format!("{cin}→{cout} {side}×{side} {k}×{k} s{stride}");
            eprintln!(
                "   conv {op:<16} {shape:<24} b={batch}  ours {:>9.2} ms  candle {:>9.2} ms  x{:.2}  {:.1} GFLOP/s",
                o / 1e6,
                c / 1e6,
                c / o,
                passes * flop / o
            );
            out.push(serde_json::json!({
                "suite": "conv", "op": op, "shape": shape, "batch": batch, "threads": threads,
                "median_ns": o.round(), "candle_median_ns": c.round(),
                "speedup_vs_candle": c / o, "gflop_per_s": passes * flop / o,
            }));
        }
    }
    out
}

/// `sparse_kernels::sparse_conv::sparse_conv2d` (a condensed conv weight, constant fan-in per
/// filter) against the GEMM `conv2d` of the same shape, forward + backward (input gradient and
/// the stored values' or the kernel's gradient), batch 32, ResNet-18's stage convs at densities
/// 0.1 to 0.5: where the sparse conv stops paying, which `models::engine::MAX_SPARSE_DENSITY`
/// is set from.
fn sparse_convs(
    quick: bool,
    rng: &mut Rng,
    threads: usize,
    (reps, warm_ms, sample_ms): (usize, f64, f64),
) -> Vec<serde_json::Value> {
    use candle_core::Var;
    use sparse_kernels::conv::{conv2d, ConvSpec};
    use sparse_kernels::ops::SparseStructure;
    use sparse_kernels::sparse_conv::sparse_conv2d;
    let dev = Device::Cpu;
    let all: &[(usize, usize)] = &[(64, 32), (128, 16), (256, 8)];
    let shapes = if quick { &all[1..2] } else { all };
    let densities: &[f64] = if quick {
        &[0.1, 0.3, 0.5]
    } else {
        &[0.1, 0.2, 0.3, 0.4, 0.5]
    };
    let batch = 32;
    let spec = ConvSpec {
        padding: 1,
        ..ConvSpec::default()
    };
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    for &(c, side) in shapes {
        let fan_in = c * 9;
        let x = Var::from_vec(
            rng.vec(batch * c * side * side),
            (batch, c, side, side),
            &dev,
        )
        .unwrap();
        let w = Var::from_vec(rng.vec(c * fan_in), (c, c, 3, 3), &dev).unwrap();
        for &density in densities {
            let k = ((fan_in as f64 * density).round() as usize).max(1);
            let mut positions = Vec::with_capacity(c * k);
            for r in 0..c {
                let cols = rng.choose(fan_in, k, &mut scratch);
                positions.extend(cols.iter().map(|&col| r * fan_in + col));
            }
            let vals = rng.vec(positions.len());
            let cd = Condensed::from_positions(c, fan_in, &positions, vals.clone(), None).unwrap();
            let structure = SparseStructure::from(cd);
            let values = Var::from_vec(vals, positions.len(), &dev).unwrap();
            let run = |y: Tensor| {
                black_box(y.sum_all().unwrap().backward().unwrap());
            };
            let (s, d) = measure(
                reps,
                warm_ms,
                sample_ms,
                &mut || {
                    run(sparse_conv2d(
                        x.as_tensor(),
                        values.as_tensor(),
                        &structure,
                        (3, 3),
                        None,
                        spec,
                    )
                    .unwrap())
                },
                &mut || run(conv2d(x.as_tensor(), w.as_tensor(), None, spec).unwrap()),
            );
            let shape = format!("{c}→{c} {side}×{side} 3×3");
            eprintln!(
                "   sparse conv fwd+bwd {shape:<20} density {density:.1} b={batch}  sparse {:>8.2} ms  GEMM conv {:>8.2} ms  x{:.2}",
                s / 1e6,
                d / 1e6,
                d / s
            );
            out.push(serde_json::json!({
                "suite": "sparse-conv", "op": "forward+backward", "shape": shape,
                "batch": batch, "density": density, "threads": threads,
                "median_ns": s.round(), "dense_median_ns": d.round(), "speedup_vs_dense": d / s,
            }));
        }
    }
    out
}

/// The two rates that bound a batch-1 sparse forward on this machine, measured here so that
/// `docs/benchmarks.md` can show them next to the kernels: random reads of an L1-resident input
/// (what every stored weight costs) and streaming reads of a dense weight that does not fit in
/// L2 (what every dense weight costs). Their ratio over the density bounds the speed-up.
fn ceilings(rng: &mut Rng, threads: usize, isa: Isa) -> Vec<serde_json::Value> {
    let x = rng.vec(3072);
    let idx: Vec<u32> = (0..768 * 307).map(|_| (rng.next() % 3072) as u32).collect();
    let w = rng.vec(768 * 3072);
    let mut gather = || {
        let mut acc = [0.0f32; 8];
        for c in idx.chunks_exact(8) {
            for l in 0..8 {
                acc[l] += x[c[l] as usize];
            }
        }
        black_box(acc);
    };
    let mut stream = || {
        let mut acc = [0.0f32; 16];
        for c in w.chunks_exact(16) {
            for l in 0..16 {
                acc[l] += c[l];
            }
        }
        black_box(acc);
    };
    let (g, s) = measure(7, 40.0, 8.0, &mut gather, &mut stream);
    let (g_rate, s_rate) = (idx.len() as f64 / g, w.len() as f64 / s);
    let bound = g_rate / s_rate;
    eprintln!("ceiling: random L1 reads {g_rate:.2}/ns, dense stream {s_rate:.2} floats/ns, batch-1 speed-up bound {bound:.3} / density");
    let mut rec = serde_json::json!({
        "suite": "ceiling",
        "threads": threads,
        "isa": isa.name(),
        "random_reads_per_ns": g_rate,
        "dense_stream_floats_per_ns": s_rate,
        "batch1_speedup_bound_times_density": bound,
    });
    if let Some(t) = tile_ceiling(rng) {
        let bound = t.dense_ns_per_64 / t.l2_ns;
        eprintln!(
            "ceiling (batched): a stored weight's 64-example tile column {:.2} ns from a 768 KiB tile (L2, {:.1} GB/s), {:.2} ns from a 32 KiB tile (L1, {:.1} GB/s); candle's dense GEMM {:.2} ns per 64 FMAs; batched speed-up bound {bound:.3} / density",
            t.l2_ns,
            256.0 / t.l2_ns,
            t.l1_ns,
            256.0 / t.l1_ns,
            t.dense_ns_per_64,
        );
        rec["tile_l2_ns_per_weight"] = t.l2_ns.into();
        rec["tile_l1_ns_per_weight"] = t.l1_ns.into();
        rec["dense_ns_per_64_fma"] = t.dense_ns_per_64.into();
        rec["batched_speedup_bound_times_density"] = bound.into();
    }
    vec![rec]
}

/// What the batched ceiling measured (see [`tile_ceiling`]).
struct TileCeiling {
    /// ns per stored weight, reading from a 768 KiB (L2-resident) tile.
    l2_ns: f64,
    /// The same from a 32 KiB (L1-resident) tile.
    l1_ns: f64,
    /// candle's dense GEMM (256×3072 by 3072×768, one thread's share of the run's threads):
    /// ns per 64 multiply-adds.
    dense_ns_per_64: f64,
}

/// The batched products' ceiling (single thread). Every batched sparse kernel does, per stored
/// weight and 64-example tile, what this loop does: read the 64 floats of the tile's column
/// the weight's index names and multiply-add them into 64 accumulators (here two sets of four
/// 16-lane registers, alternating, so that the adds' latency does not bound it). Over a tile of
/// 3072 columns (768 KiB, L2-resident, the wide MLP's case) it is bound by how fast L2 delivers
/// 256 bytes at random; over 128 columns (32 KiB, L1-resident) by the loads. AVX-512 only.
fn tile_ceiling(rng: &mut Rng) -> Option<TileCeiling> {
    #[cfg(target_arch = "x86_64")]
    {
        if !Isa::available().contains(&Isa::Avx512) {
            return None;
        }
        #[target_feature(enable = "avx512f")]
        fn walk(tile: &[f32], idx: &[u32], vals: &[f32]) -> [f32; 16] {
            use std::arch::x86_64::*;
            assert!(idx.iter().all(|&c| (c as usize + 1) * 64 <= tile.len()));
            // One weight: its column's four 16-lane slices into the four accumulators.
            let step = |a: &mut [__m512; 4], c: u32, v: f32| {
                let w = _mm512_set1_ps(v);
                for (j, a) in a.iter_mut().enumerate() {
                    // SAFETY: every column's 64 floats are inside `tile` (asserted above).
                    let x = unsafe { _mm512_loadu_ps(tile.as_ptr().add(c as usize * 64 + 16 * j)) };
                    *a = _mm512_fmadd_ps(w, x, *a);
                }
            };
            let (mut a, mut b) = ([_mm512_setzero_ps(); 4], [_mm512_setzero_ps(); 4]);
            for (c, v) in idx.chunks_exact(2).zip(vals.chunks_exact(2)) {
                step(&mut a, c[0], v[0]);
                step(&mut b, c[1], v[1]);
            }
            let mut sum = _mm512_setzero_ps();
            for r in a.iter().chain(&b) {
                sum = _mm512_add_ps(sum, *r);
            }
            let mut out = [0f32; 16];
            // SAFETY: `out` holds 16 floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), sum) };
            out
        }
        let n = 768 * 307;
        let vals = rng.vec(n);
        let time_for = |cols: usize, rng: &mut Rng| {
            let tile = rng.vec(cols * 64);
            let idx: Vec<u32> = (0..n).map(|_| (rng.next() % cols as u64) as u32).collect();
            // SAFETY: AVX-512F is available (checked above).
            let mut run = || {
                black_box(unsafe { walk(&tile, &idx, &vals) });
            };
            let mut none = || {};
            measure(7, 40.0, 8.0, &mut run, &mut none).0 / n as f64
        };
        let l2_ns = time_for(3072, rng);
        let l1_ns = time_for(128, rng);
        let a = Tensor::new(rng.vec(256 * 3072), &Device::Cpu)
            .unwrap()
            .reshape((256, 3072))
            .unwrap();
        let b = Tensor::new(rng.vec(768 * 3072), &Device::Cpu)
            .unwrap()
            .reshape((768, 3072))
            .unwrap();
        let mut gemm = || {
            black_box(a.matmul(&b.t().unwrap()).unwrap());
        };
        let mut none = || {};
        let d = measure(7, 40.0, 8.0, &mut gemm, &mut none).0;
        let threads = candle_threads() as f64;
        Some(TileCeiling {
            l2_ns,
            l1_ns,
            dense_ns_per_64: d * threads / (256.0 * 3072.0 * 768.0 / 64.0),
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = rng;
        None
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_out = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    // `--op forward|input_grad|value_grad|conv|norm|sparse-conv`: time one group only (for
    // kernel work).
    let only_op = args
        .iter()
        .position(|a| a == "--op")
        .and_then(|i| args.get(i + 1).cloned());
    let threads = candle_threads();
    // `--isa scalar|avx2|avx512`: run that variant (the best the CPU has by default).
    let isa = match args
        .iter()
        .position(|a| a == "--isa")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        None => Isa::detect(),
        Some(name) => Isa::available()
            .into_iter()
            .find(|i| i.name() == name)
            .unwrap_or_else(|| {
                panic!(
                    "--isa {name}: not one this CPU runs ({:?})",
                    Isa::available()
                )
            }),
    };
    let exec = Exec::default().with_isa(isa);
    let dev = Device::Cpu;

    let shapes: &[(usize, usize)] = if quick {
        &[(3072, 768)]
    } else {
        &[(3072, 768), (768, 3072), (4096, 4096)]
    };
    let batches: &[usize] = if quick { &[1, 256] } else { &[1, 16, 256] };
    let kinds: Vec<Kind> = if quick {
        vec![Kind::Condensed(0.9), Kind::Csr(0.9), Kind::Nm(2, 4)]
    } else {
        let mut k = Vec::new();
        for s in [0.8, 0.9, 0.95, 0.99] {
            k.push(Kind::Condensed(s));
        }
        for s in [0.8, 0.9, 0.95, 0.99] {
            k.push(Kind::Csr(s));
        }
        for (n, m) in [(2, 4), (1, 4), (2, 8), (1, 16)] {
            k.push(Kind::Nm(n, m));
        }
        k
    };
    let (reps, warm_ms, sample_ms) = if quick {
        (5, 30.0, 5.0)
    } else {
        (7, 40.0, 8.0)
    };

    let mut rng = Rng(42);
    let mut records = Vec::new();
    // Half a second of dense work first, so that the first record does not pay for clock
    // ramp-up and cold pages (it was systematically the slowest otherwise).
    {
        let a = Tensor::ones((512, 512), candle_core::DType::F32, &dev).unwrap();
        let start = Instant::now();
        while start.elapsed().as_millis() < 500 {
            black_box(a.matmul(&a).unwrap());
        }
    }
    eprintln!("kernels suite: {threads} thread(s), {isa:?}");
    for &(fan_in, rows) in shapes {
        let dense_w = Tensor::new(rng.vec(rows * fan_in).as_slice(), &dev)
            .unwrap()
            .reshape((rows, fan_in))
            .unwrap();
        for kind in &kinds {
            let w = build(*kind, rows, fan_in, &mut rng);
            let wr = w.as_ref();
            for &batch in batches {
                let x = rng.vec(batch * fan_in);
                let gy = rng.vec(batch * rows);
                let xt = Tensor::new(x.as_slice(), &dev)
                    .unwrap()
                    .reshape((batch, fan_in))
                    .unwrap();
                let gyt = Tensor::new(gy.as_slice(), &dev)
                    .unwrap()
                    .reshape((batch, rows))
                    .unwrap();
                let io_fwd = 4 * (batch * fan_in + batch * rows);
                // Built once per structure, as `sparse_linear`'s backward keeps it.
                let transposed = Transposed::of(wr);
                for op in ["forward", "input_grad", "value_grad"] {
                    if only_op.as_deref().is_some_and(|o| o != op) {
                        continue;
                    }
                    let (mut sparse, mut dense): (Job, Job) = match op {
                        "forward" => (
                            Box::new(|| {
                                black_box(
                                    sparse_kernels::forward(wr, wr.values(), None, &x, batch, exec)
                                        .unwrap(),
                                );
                            }),
                            Box::new(|| {
                                black_box(xt.matmul(&dense_w.t().unwrap()).unwrap());
                            }),
                        ),
                        "input_grad" => (
                            Box::new(|| {
                                black_box(
                                    sparse_kernels::input_grad_with(
                                        wr,
                                        Some(&transposed),
                                        wr.values(),
                                        &gy,
                                        batch,
                                        exec,
                                    )
                                    .unwrap(),
                                );
                            }),
                            Box::new(|| {
                                black_box(gyt.matmul(&dense_w).unwrap());
                            }),
                        ),
                        _ => (
                            Box::new(|| {
                                black_box(
                                    sparse_kernels::value_grad(wr, &x, &gy, batch, exec).unwrap(),
                                );
                            }),
                            Box::new(|| {
                                black_box(gyt.t().unwrap().matmul(&xt).unwrap());
                            }),
                        ),
                    };
                    let (s, d) = measure(reps, warm_ms, sample_ms, &mut sparse, &mut dense);
                    // Weights (+ indices) + input + output; the value gradient writes one value
                    // per stored weight instead of reading it.
                    let bytes = w.weight_bytes() + io_fwd;
                    let (format, sparsity, n, m) = match kind {
                        Kind::Condensed(s) => ("condensed", *s, None, None),
                        Kind::Csr(s) => ("csr", *s, None, None),
                        Kind::Nm(n, m) => ("nm", 1.0 - *n as f64 / *m as f64, Some(*n), Some(*m)),
                    };
                    let rec = serde_json::json!({
                        "suite": "kernels",
                        "op": op,
                        "format": format,
                        "in": fan_in,
                        "out": rows,
                        "batch": batch,
                        "sparsity": sparsity,
                        "n": n,
                        "m": m,
                        "threads": threads,
                        "isa": isa.name(),
                        "median_ns": s.round(),
                        "dense_median_ns": d.round(),
                        "speedup_vs_dense": d / s,
                        "bytes_moved": bytes,
                        "effective_gb_per_s": bytes as f64 / s,
                    });
                    eprintln!(
                        "{op:>10} {format:>9} {:>5} {fan_in:>4}->{rows:<4} b={batch:<4} sparse {:>10.1} us  dense {:>10.1} us  x{:.2}",
                        match kind {
                            Kind::Nm(n, m) => format!("{n}:{m}"),
                            Kind::Condensed(s) | Kind::Csr(s) => format!("{:.0}%", s * 100.0),
                        },
                        s / 1e3,
                        d / 1e3,
                        d / s
                    );
                    records.push(rec);
                }
                if let (Weight::Nm(nm), 1, Kind::Nm(n, m)) = (&w, batch, kind) {
                    // The packed batch-1 inference layout, built once outside the timing.
                    if let Ok(packed) = sparse_kernels::PackedNm::new(nm) {
                        let (s, d) = measure(
                            reps,
                            warm_ms,
                            sample_ms,
                            &mut || {
                                black_box(packed.forward_one(&x, None, exec).unwrap());
                            },
                            &mut || {
                                black_box(xt.matmul(&dense_w.t().unwrap()).unwrap());
                            },
                        );
                        let bytes = packed.bytes() + io_fwd;
                        eprintln!(
                            "   forward nm-packed {n}:{m} {fan_in:>4}->{rows:<4} b=1    sparse {:>10.1} us  dense {:>10.1} us  x{:.2}",
                            s / 1e3,
                            d / 1e3,
                            d / s
                        );
                        records.push(serde_json::json!({
                            "suite": "kernels", "op": "forward", "format": "nm-packed",
                            "in": fan_in, "out": rows, "batch": 1,
                            "sparsity": 1.0 - *n as f64 / *m as f64, "n": n, "m": m,
                            "threads": threads, "isa": isa.name(),
                            "median_ns": s.round(), "dense_median_ns": d.round(),
                            "speedup_vs_dense": d / s, "bytes_moved": bytes,
                            "effective_gb_per_s": bytes as f64 / s,
                        }));
                    }
                }
            }
        }
    }
    if only_op.is_none() || only_op.as_deref() == Some("conv") {
        records.extend(convs(quick, &mut rng, threads, (reps, warm_ms, sample_ms)));
    }
    if only_op.is_none() || only_op.as_deref() == Some("norm") {
        records.extend(norms(quick, &mut rng, threads, (reps, warm_ms, sample_ms)));
    }
    if only_op.is_none() || only_op.as_deref() == Some("sparse-conv") {
        records.extend(sparse_convs(
            quick,
            &mut rng,
            threads,
            (reps, warm_ms, sample_ms),
        ));
    }
    records.extend(ceilings(&mut rng, threads, isa));
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&records).unwrap())
            .unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
}
