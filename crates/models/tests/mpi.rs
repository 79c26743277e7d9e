//! The MPI transport against its definition, on real processes: CI runs this binary under
//! `mpirun -np 3` (`.ci/run`). Under plain `cargo test` it is ignored (it needs `mpirun`), so it
//! reports as ignored, not passed.
#![cfg(feature = "distributed")]

use std::time::Duration;

use models::distributed::{Collective, MpiCollective};

/// Rank `r`'s buffer of length `n`: signs and exponents spread widely (a hash of rank and
/// position), so that float sums depend on the order of addition.
fn buffer(r: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = ((r * 0x9E37 + i) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
            let frac = 1.0 + (h & 0xffff) as f32 / 65536.0;
            let exp = ((h >> 16) % 41) as i32 - 20;
            let sign = if h >> 63 == 0 && (h >> 20) & 1 == 1 {
                -1.0
            } else {
                1.0
            };
            sign * frac * 2f32.powi(exp)
        })
        .collect()
}

#[test]
#[ignore = "needs mpirun: mpirun -np 3 target/release/deps/mpi-* --ignored"]
fn mpi_all_reduce_is_the_rank_order_sum_on_every_length() {
    let c = MpiCollective::init(Duration::from_secs(60)).expect("MPI");
    let (p, rank) = (c.size(), c.rank());
    assert!(p >= 2, "run under mpirun -np 2 or more (got {p} rank)");
    // Lengths below, at and above multiples of the rank count: empty, tail only, body + tail.
    for n in [0, 1, p - 1, p, p + 1, 3 * p + 2, 1000, 4099] {
        let mut buf = buffer(rank, n);
        c.all_reduce_sum(&mut buf).expect("all-reduce");
        let mut want = buffer(0, n);
        for r in 1..p {
            want.iter_mut().zip(buffer(r, n)).for_each(|(w, x)| *w += x);
        }
        let same_bits = buf
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same_bits, "rank {rank}, length {n}: not the rank-order sum");
    }
    let mut b = buffer(rank, 33);
    c.broadcast(&mut b, p - 1).expect("broadcast");
    assert_eq!(b, buffer(p - 1, 33));
    let all = c
        .all_gather_u64(u64::MAX - rank as u64)
        .expect("all-gather");
    assert_eq!(all, (0..p as u64).map(|r| u64::MAX - r).collect::<Vec<_>>());
}
