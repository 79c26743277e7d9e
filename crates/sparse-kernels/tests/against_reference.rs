//! Every kernel, every instruction-set variant and several thread counts against the scalar
//! reference on random shapes: fan-ins that are not multiples of the SIMD width, k = 1, one
//! row, ablated rows, N:M with kept zeros, batches across tile boundaries.

mod common;

use common::Rng;
use proptest::prelude::*;
use sparse_formats::NmPattern;
use sparse_kernels::{reference, Exec, Isa, SparseWeight, Transposed};

/// Relative tolerance for f32 sums of up to a few thousand terms against an f64 reference.
fn close(a: &[f32], b: &[f32], what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), b.len(), "{} length", what);
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        prop_assert!(
            (x - y).abs() <= 1e-5 * scale * 8.0,
            "{}[{}]: kernel {} vs reference {} (scale {})",
            what,
            i,
            x,
            y,
            scale
        );
    }
    Ok(())
}

/// Runs all three kernels of `w` (dense twin `dense`) and checks them.
fn check_all(
    rng: &mut Rng,
    w: SparseWeight<'_>,
    dense: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
) -> Result<(), TestCaseError> {
    let (rows, fan_in) = (w.rows(), w.fan_in());
    let x = rng.vec(batch * fan_in);
    let gy = rng.vec(batch * rows);
    let y_ref = reference::forward(dense, rows, fan_in, bias, &x, batch);
    let gx_ref = reference::input_grad(dense, rows, fan_in, &gy, batch);
    let gw = reference::weight_grad(rows, fan_in, &x, &gy, batch);
    let gv_ref: Vec<f32> = w
        .columns()
        .iter()
        .map(|&(r, c)| gw[r * fan_in + c])
        .collect();
    let mut first: Option<(Vec<f32>, Vec<f32>, Vec<f32>)> = None;
    for isa in Isa::available() {
        for threads in [1, 2, 5] {
            let exec = Exec::default().with_isa(isa).with_threads(threads);
            let tag = format!(
                "{} {isa:?} threads={threads} batch={batch}",
                w.format_name()
            );
            let y = sparse_kernels::forward(w, w.values(), bias, &x, batch, exec).unwrap();
            let gx = sparse_kernels::input_grad(w, w.values(), &gy, batch, exec).unwrap();
            let gv = sparse_kernels::value_grad(w, &x, &gy, batch, exec).unwrap();
            close(&y, &y_ref, &format!("forward {tag}"))?;
            close(&gx, &gx_ref, &format!("input_grad {tag}"))?;
            close(&gv, &gv_ref, &format!("value_grad {tag}"))?;
            // Same variant, any thread count: bit-identical.
            match &first {
                Some(f) if threads > 1 => {
                    prop_assert_eq!(&f.0, &y, "forward differs across threads ({})", tag);
                    prop_assert_eq!(&f.1, &gx, "input_grad differs across threads ({})", tag);
                    prop_assert_eq!(&f.2, &gv, "value_grad differs across threads ({})", tag);
                }
                _ => first = Some((y, gx, gv)),
            }
        }
        first = None;
    }
    Ok(())
}

const BATCHES: [usize; 8] = [1, 2, 7, 8, 9, 17, 33, 70];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn condensed_matches_reference(seed: u64, rows in 1usize..40, fan_in in 1usize..90, bias: bool, bi in 0usize..8) {
        let mut rng = Rng(seed);
        // k = 1 comes up often; half the cases take any k, so that rows span several of the
        // 16-weight chunks of the AVX-512 value-gradient kernel.
        let k = if rng.below(2) == 0 { 1 + rng.below(fan_in.min(12)) } else { 1 + rng.below(fan_in) };
        let ablate = rng.below(rows.min(4) + 1).min(rows);
        let (c, dense) = common::condensed(&mut rng, rows, fan_in, k, ablate, bias);
        check_all(&mut rng, (&c).into(), &dense, c.bias(), BATCHES[bi])?;
    }

    #[test]
    fn nm_matches_reference(seed: u64, rows in 1usize..24, groups in 1usize..12, which in 0usize..7, stride in 1usize..4, bi in 0usize..8) {
        let mut rng = Rng(seed);
        let (n, m) = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 16), (4, 16), (3, 5)][which];
        let stride = if which == 0 && rng.below(2) == 0 { 1 } else { stride };
        let pattern = NmPattern { n, m, group_stride: stride };
        let (w, dense) = common::nm(&mut rng, rows, groups * m * stride, pattern);
        check_all(&mut rng, (&w).into(), &dense, None, BATCHES[bi])?;
    }

    #[test]
    fn csr_matches_reference(seed: u64, rows in 1usize..40, fan_in in 1usize..90, density in 0.0f64..0.6, bi in 0usize..8) {
        let mut rng = Rng(seed);
        let (w, dense) = common::csr(&mut rng, rows, fan_in, density);
        check_all(&mut rng, (&w).into(), &dense, None, BATCHES[bi])?;
    }
}

#[test]
fn edge_shapes() {
    let mut rng = Rng(7);
    // Rows of exactly one, two and a bit more than one 16-weight chunk (the AVX-512
    // value-gradient kernel reduces 16 at a time), at every tile width.
    for k in [15, 16, 17, 32, 33] {
        let (c, d) = common::condensed(&mut rng, 5, 40, k, 1, true);
        for batch in [9, 17, 33, 65, 130] {
            check_all(&mut rng, (&c).into(), &d, c.bias(), batch).unwrap();
        }
    }
    // One row, k = 1, batch 1 and a large batch.
    let (c, d) = common::condensed(&mut rng, 1, 1, 1, 0, true);
    for batch in [1, 65] {
        check_all(&mut rng, (&c).into(), &d, c.bias(), batch).unwrap();
    }
    // Every row ablated: outputs are the bias, gradients are zero.
    let (c, d) = common::condensed(&mut rng, 5, 9, 3, 5, true);
    assert_eq!(c.nnz(), 0);
    check_all(&mut rng, (&c).into(), &d, c.bias(), 4).unwrap();
    // A fan-in beyond the u16 range (u32 indices).
    let (c, d) = common::condensed(&mut rng, 3, 70_000, 17, 1, false);
    check_all(&mut rng, (&c).into(), &d, None, 3).unwrap();
    // Batch 0.
    let (c, _) = common::condensed(&mut rng, 3, 8, 2, 0, false);
    assert!(
        sparse_kernels::forward(&c, c.values(), None, &[], 0, Exec::default())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn wrong_lengths_are_errors() {
    let mut rng = Rng(1);
    let (c, _) = common::condensed(&mut rng, 4, 8, 2, 0, false);
    let e = Exec::default();
    assert!(sparse_kernels::forward(&c, c.values(), None, &[0.0; 7], 1, e).is_err());
    assert!(sparse_kernels::forward(&c, &[0.0; 3], None, &[0.0; 8], 1, e).is_err());
    assert!(sparse_kernels::forward(&c, c.values(), Some(&[0.0; 3]), &[0.0; 8], 1, e).is_err());
    assert!(sparse_kernels::input_grad(&c, c.values(), &[0.0; 5], 1, e).is_err());
    let err = sparse_kernels::value_grad(&c, &[0.0; 8], &[0.0; 3], 1, e).unwrap_err();
    assert_eq!(err.to_string(), "`grad_y` has 3 elements, expected 4");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The packed batch-1 N:M layout against the reference, every ISA, rows not a multiple of
    /// 16 and fan-ins not a multiple of 16.
    #[test]
    fn packed_nm_matches_reference(seed: u64, rows in 1usize..40, groups in 1usize..20, which in 0usize..8, bias: bool) {
        let mut rng = Rng(seed);
        let (n, m) = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 16), (4, 16), (1, 2), (3, 4)][which];
        let (w, dense) = common::nm(&mut rng, rows, groups * m, NmPattern::new(n, m));
        let b = bias.then(|| rng.vec(rows));
        let x = rng.vec(w.fan_in());
        let want = reference::forward(&dense, rows, w.fan_in(), b.as_deref(), &x, 1);
        let packed = sparse_kernels::PackedNm::new(&w).unwrap();
        for isa in Isa::available() {
            let got = packed.forward_one(&x, b.as_deref(), Exec::default().with_isa(isa)).unwrap();
            close(&got, &want, &format!("packed {n}:{m} {isa:?}"))?;
        }
    }
}

#[test]
fn packed_nm_refuses_what_it_cannot_do() {
    let mut rng = Rng(2);
    let (w, _) = common::nm(
        &mut rng,
        3,
        12,
        NmPattern {
            n: 1,
            m: 2,
            group_stride: 2,
        },
    );
    assert!(sparse_kernels::PackedNm::new(&w).is_err());
    let (w, _) = common::nm(&mut rng, 3, 15, NmPattern::new(1, 5));
    assert!(sparse_kernels::PackedNm::new(&w).is_err());
    let (w, _) = common::nm(&mut rng, 3, 8, NmPattern::new(2, 4));
    let p = sparse_kernels::PackedNm::new(&w).unwrap();
    assert!(p.forward_one(&[0.0; 7], None, Exec::default()).is_err());
}

/// The batched input gradient gathers over the weight's transpose where `gathers` says so; it
/// sums each element in the order the row walk (batch 1) does, so every example's gradient is
/// bit-equal to its own batch-1 product, on every format, ISA and thread count. A transpose of
/// another weight is an error.
#[test]
fn gathered_input_gradient_equals_the_row_walk_bit_for_bit() {
    let mut rng = Rng(11);
    let (rows, fan_in, batch) = (24, 64, 70);
    assert!(sparse_kernels::cpu::gathers(batch, rows, fan_in));
    let (c, _) = common::condensed(&mut rng, rows, fan_in, 9, 3, false);
    let (nm, _) = common::nm(&mut rng, rows, fan_in, NmPattern::new(2, 4));
    let (csr, _) = common::csr(&mut rng, rows, fan_in, 0.2);
    for w in [SparseWeight::from(&c), (&nm).into(), (&csr).into()] {
        let gy = rng.vec(batch * rows);
        let t = Transposed::of(w);
        assert_eq!(t.dims(), (rows, fan_in, w.nnz()));
        for isa in Isa::available() {
            for threads in [1, 2] {
                let exec = Exec::default().with_isa(isa).with_threads(threads);
                let gx = sparse_kernels::input_grad_with(w, Some(&t), w.values(), &gy, batch, exec)
                    .unwrap();
                assert_eq!(
                    gx,
                    sparse_kernels::input_grad(w, w.values(), &gy, batch, exec).unwrap()
                );
                for b in 0..batch {
                    let one = &gy[b * rows..(b + 1) * rows];
                    let want = sparse_kernels::input_grad(w, w.values(), one, 1, exec).unwrap();
                    assert_eq!(
                        &gx[b * fan_in..(b + 1) * fan_in],
                        want.as_slice(),
                        "{} {isa:?} threads={threads} example {b}",
                        w.format_name()
                    );
                }
            }
        }
    }
    let other = Transposed::of(&csr);
    let err = sparse_kernels::input_grad_with(
        (&c).into(),
        Some(&other),
        c.values(),
        &[0.0; 70 * 24],
        70,
        Exec::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("transpose was built from a 24x64 weight"),
        "{err}"
    );
}
