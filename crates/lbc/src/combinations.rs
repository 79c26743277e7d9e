//! The N-of-M combinations LBC scores (docs/algorithms.md §7.1).

/// `C(n, k)`, saturating at `u64::MAX`.
pub fn binomial(n: usize, k: usize) -> u64 {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    let mut r: u128 = 1;
    for i in 0..k {
        r = r * (n - i) as u128 / (i + 1) as u128;
        if r > u64::MAX as u128 {
            return u64::MAX;
        }
    }
    r as u64
}

/// Every N-subset of `0..m` in lexicographic order (Python's `itertools.combinations` order,
/// as the reference's table `P`).
pub fn combinations(m: usize, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur: Vec<u8> = (0..n as u8).collect();
    if n > m {
        return out;
    }
    loop {
        out.push(cur.clone());
        // Advance the rightmost position that can move.
        let mut i = n;
        loop {
            if i == 0 {
                return out;
            }
            i -= 1;
            if (cur[i] as usize) < m - n + i {
                break;
            }
            if i == 0 {
                return out;
            }
        }
        cur[i] += 1;
        for j in i + 1..n {
            cur[j] = cur[j - 1] + 1;
        }
    }
}

/// The initial score `1 / C(M−1, N−1)`: with it every position's pre-mask sum is exactly 1, so
/// the network starts dense.
pub fn initial_score(m: usize, n: usize) -> f32 {
    1.0 / binomial(m - 1, n - 1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_order_and_init_values() {
        assert_eq!(
            combinations(4, 2),
            vec![
                vec![0, 1],
                vec![0, 2],
                vec![0, 3],
                vec![1, 2],
                vec![1, 3],
                vec![2, 3]
            ]
        );
        for (m, n, c, init) in [
            (4, 1, 4, 1.0),
            (4, 2, 6, 1.0 / 3.0),
            (8, 2, 28, 1.0 / 7.0),
            (8, 4, 70, 1.0 / 35.0),
            (16, 1, 16, 1.0),
            (16, 2, 120, 1.0 / 15.0),
            (16, 4, 1820, 1.0 / 455.0),
            (16, 8, 12870, 1.0 / 6435.0),
        ] {
            let combos = combinations(m, n);
            assert_eq!(combos.len() as u64, binomial(m, n));
            assert_eq!(combos.len(), c, "{n}:{m}");
            assert!((initial_score(m, n) - init as f32).abs() < 1e-9);
            assert!(combos.windows(2).all(|w| w[0] < w[1]), "lexicographic");
            // Each position in C(M−1, N−1) combinations: the initial pre-mask is 1 everywhere.
            for p in 0..m as u8 {
                let r = combos.iter().filter(|c| c.contains(&p)).count() as f32;
                assert!((r * initial_score(m, n) - 1.0).abs() < 1e-5);
            }
        }
        assert_eq!(binomial(3, 5), 0);
        assert_eq!(combinations(4, 4), vec![vec![0, 1, 2, 3]]);
    }
}
