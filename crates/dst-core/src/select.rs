//! Top-k selections, the one ranking rule of every mask update: the `k` largest scores, ties
//! broken by the smaller index, NaN below every number (docs/algorithms.md §5).
//!
//! Scores are compared as `u32` *keys* ([`key`]) whose unsigned order is that rule's order of
//! the scores, so every selection is a threshold on integers: find the k-th largest key `t`,
//! take every key above it and the lowest-index entries equal to it. No sort anywhere.
//!
//! Key `0` ([`EXCLUDED`]) is below every score's key (the smallest, NaN's, is `0x007F_FFFF`):
//! callers use it for entries that are not candidates.

use rayon::prelude::*;

/// Key of an entry that is not a candidate: below the key of every score.
pub(crate) const EXCLUDED: u32 = 0;

/// NaN ranks below every number.
pub(crate) fn rank_key(s: f32) -> f32 {
    if s.is_nan() {
        f32::NEG_INFINITY
    } else {
        s
    }
}

/// Maps an `f32` to a `u32` whose unsigned order is `f32::total_cmp`'s order.
fn order_key(v: f32) -> u32 {
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The key of score `s`: larger score, larger key; NaN ranks as −∞; never [`EXCLUDED`].
#[inline]
pub(crate) fn key(s: f32) -> u32 {
    order_key(rank_key(s))
}

/// [`key`]`(v.abs())` without branches (vectorisable): a NaN's key is −∞'s, `0x007F_FFFF`;
/// any other magnitude's is its bits with the top bit set.
#[inline]
pub(crate) fn abs_key(v: f32) -> u32 {
    let b = v.to_bits() & 0x7FFF_FFFF;
    if b > 0x7F80_0000 {
        0x007F_FFFF
    } else {
        b | 0x8000_0000
    }
}

/// The `k` candidates with the largest scores, ties broken by smaller index; NaN ranks last.
/// Returned in ascending index order.
///
/// The scores are gathered once into a contiguous key vector and selected with
/// [`top_k_keys`] — the same set a full sort by (score descending, index ascending) would give.
pub(crate) fn top_k(mut cands: Vec<usize>, k: usize, score: impl Fn(usize) -> f32) -> Vec<usize> {
    if !cands.is_sorted() {
        cands.sort_unstable();
    }
    if k >= cands.len() {
        return cands;
    }
    if k == 0 {
        return Vec::new();
    }
    let keys: Vec<u32> = cands.iter().map(|&i| key(score(i))).collect();
    top_k_keys(&keys, k).into_iter().map(|p| cands[p]).collect()
}

/// Positions of the `k` largest `keys`, ties broken by smaller position, ascending.
///
/// Small inputs select on a copy (`select_nth_unstable`, linear time); large ones use a radix
/// selection: one pass counts the top 16 bits, a second selects inside the one bucket that
/// holds the k-th largest, a third collects — streaming passes, no large temporary.
pub(crate) fn top_k_keys(keys: &[u32], k: usize) -> Vec<usize> {
    if k >= keys.len() {
        return (0..keys.len()).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    if keys.len() < 1 << 18 {
        // A selection on a copy beats zeroing 65,536 counters.
        let mut ordered = keys.to_vec();
        let (_, &mut t, _) = ordered.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        let above = keys.iter().filter(|&&o| o > t).count();
        return collect_top(keys, k, t, above);
    }
    let mut hist = vec![0usize; 1 << 16];
    for &o in keys {
        hist[(o >> 16) as usize] += 1;
    }
    // The bucket holding the k-th largest, and how many keys lie in higher buckets.
    let (mut bucket, mut higher) = (hist.len() - 1, 0usize);
    while higher + hist[bucket] < k {
        higher += hist[bucket];
        bucket -= 1;
    }
    let mut inside: Vec<u32> = keys
        .iter()
        .copied()
        .filter(|&o| (o >> 16) as usize == bucket)
        .collect();
    let need = k - higher;
    let (_, &mut t, _) = inside.select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
    let above = higher + inside.iter().filter(|&&o| o > t).count();
    collect_top(keys, k, t, above)
}

/// Everything above the threshold key `t` (`above` of them) and the first `k − above` keys
/// equal to it, in position order.
fn collect_top(keys: &[u32], k: usize, t: u32, above: usize) -> Vec<usize> {
    let mut ties = k - above;
    let mut out = Vec::with_capacity(k);
    for (p, &o) in keys.iter().enumerate() {
        if o > t {
            out.push(p);
        } else if o == t && ties > 0 {
            ties -= 1;
            out.push(p);
        }
    }
    out
}

/// Positions of the `k` largest `keys` (ties by smaller position), ascending, for one row of a
/// layer (sequential): for a few of many (`k` ≤ 16, `n` ≥ 16 k) one scan that keeps the best `k`
/// so far in a small sorted buffer — an entry is inserted only when it beats the buffer's last,
/// about `k · ln(n / k)` times for random keys; for more of many (`n` ≥ 8 k) a strided sample's
/// bound and one branch-free collecting scan, as [`top_k_sampled`] does for a whole layer; else
/// [`top_k_keys`].
pub(crate) fn top_k_row(keys: &[u32], k: usize) -> Vec<usize> {
    let n = keys.len();
    if k >= n {
        return (0..n).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    if k > 16 || n < 16 * k {
        if n >= 1024 && n >= 8 * k {
            if let Some(top) = row_sampled(keys, k) {
                return top;
            }
        }
        return top_k_keys(keys, k);
    }
    // (key, position), best first: key descending, then position ascending. Positions arrive
    // in ascending order, so a newcomer equal to the last is worse than it and stays out.
    let mut best: Vec<(u32, usize)> = Vec::with_capacity(k + 1);
    for (i, &o) in keys.iter().enumerate() {
        if best.len() == k && o <= best[k - 1].0 {
            continue;
        }
        let at = best.partition_point(|&(b, _)| b >= o);
        best.insert(at, (o, i));
        best.truncate(k);
    }
    let mut out: Vec<usize> = best.into_iter().map(|(_, i)| i).collect();
    out.sort_unstable();
    out
}

/// The number of keys a row's sample holds ([`row_bound`]).
const ROW_SAMPLE: usize = 256;

/// A lower bound for the `k`-th largest of a row's `n` keys (`key_at`), `n` ≥ [`ROW_SAMPLE`]:
/// a strided sample's `k/n`-quantile with a margin of 50% and 4 standard deviations of a
/// binomial count (plus 8), so that a sample misses the `k`-th largest only for keys made to
/// mislead it; callers check that at least `k` keys pass.
fn row_bound(n: usize, k: usize, key_at: impl Fn(usize) -> u32) -> u32 {
    const M: usize = ROW_SAMPLE;
    let stride = n / M;
    let mut sample: Vec<u32> = (0..M).map(|j| key_at(j * stride)).collect();
    let expected = k as f64 * M as f64 / n as f64;
    let rank = (expected * 1.5 + 4.0 * expected.sqrt() + 8.0).min((M - 1) as f64) as usize;
    let (_, &mut t_lo, _) = sample.select_nth_unstable_by(rank, |a, b| b.cmp(a));
    t_lo
}

/// [`top_k_row`]'s sampled path: `None` when the sample's bound let fewer than `k` through
/// (then the caller selects on all keys), else the exact top `k` (see [`top_k_sampled`]).
fn row_sampled(keys: &[u32], k: usize) -> Option<Vec<usize>> {
    let n = keys.len();
    let t_lo = row_bound(n, k, |i| keys[i]);
    // Branch-free compaction: every position is written, the length advances when it passes.
    let mut pos = vec![0u32; n + 1];
    let mut len = 0;
    for (i, &o) in keys.iter().enumerate() {
        pos[len] = i as u32;
        len += (o >= t_lo) as usize;
    }
    if len < k {
        return None;
    }
    let passed: Vec<u32> = pos[..len].iter().map(|&i| keys[i as usize]).collect();
    Some(
        top_k_keys(&passed, k)
            .into_iter()
            .map(|p| pos[p] as usize)
            .collect(),
    )
}

/// The growth of one row: positions of the `need` largest `|g|` among the entries not `taken`
/// (ties by smaller position, NaN last), ascending, where `taken` holds `k − need` entries —
/// the same set as [`top_k_row`] on the keys with the taken entries [`EXCLUDED`].
///
/// The maxima of blocks of 16 over the untaken entries bound the growth set: the `need`
/// blocks with the largest such maxima each hold a distinct untaken entry at least the
/// `need`-th largest maximum `b`, so the `need`-th largest untaken entry `t` is ≥ `b`, and
/// every entry of the growth set (≥ `t`) lies in a block whose maximum is ≥ `b`. Blocks whose
/// maximum is above `b` are all taken in; of those whose maximum *equals* `b` only the first
/// `need` (in position order): each holds an untaken entry equal to `b`, so if `t = b` the
/// lowest-position ties the growth takes are among them or in the blocks above `b` (a row of
/// equal gradients — a dead neuron's zeros — looks at `need` blocks, not all of them). The
/// maxima come from one branch-free pass over the row (vectorised); only the entries of the
/// chosen blocks are keyed again. When `k` is not small against the row (`32 k > n`) it is
/// [`growth_sampled`], or [`top_k_row`] on keys with the taken entries [`EXCLUDED`].
pub(crate) fn top_k_growth(g: &[f32], taken: &[bool], k: usize, need: usize) -> Vec<usize> {
    const B: usize = 16;
    let n = g.len();
    debug_assert_eq!(taken.len(), n);
    debug_assert!(need <= k);
    if need == 0 {
        return Vec::new();
    }
    if n < 32 * k || n < 4 * B {
        return growth_sampled(g, taken, need).unwrap_or_else(|| excluding_scan(g, taken, need));
    }
    // Each block's largest untaken key (`simd`: vectorised for the CPU).
    let maxima = crate::simd::untaken_block_maxima(g, taken);
    let mut ordered = maxima.clone();
    let (_, &mut bound, _) = ordered.select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
    if bound == EXCLUDED {
        // Fewer than `need` blocks hold an untaken entry (not for `taken` of at most `k` ≤
        // n / 32 entries; kept for any caller).
        return excluding_scan(g, taken, need);
    }
    // The growth set's keys are at least `bound` (the `need`-th largest untaken key is), so
    // only the chosen blocks' untaken entries at or above it are candidates: about `need` of
    // them, ranked by a small sort (key descending, then position ascending).
    let mut cands: Vec<(u32, u32)> = Vec::with_capacity(2 * need + 8);
    let mut ties = need;
    for (b, &m) in maxima.iter().enumerate() {
        let take = m > bound || (m == bound && ties > 0);
        if !take {
            continue;
        }
        ties -= (m == bound) as usize;
        for i in b * B..((b + 1) * B).min(n) {
            let o = abs_key(g[i]);
            if !taken[i] && o >= bound {
                cands.push((!o, i as u32));
            }
        }
    }
    cands.sort_unstable();
    let mut out: Vec<usize> = cands[..need].iter().map(|&(_, i)| i as usize).collect();
    out.sort_unstable();
    out
}

/// The growth by definition: [`top_k_row`] on every key of the row, the taken entries
/// [`EXCLUDED`].
fn excluding_scan(g: &[f32], taken: &[bool], need: usize) -> Vec<usize> {
    let keys: Vec<u32> = g
        .iter()
        .zip(taken)
        .map(|(&v, &on)| if on { EXCLUDED } else { abs_key(v) })
        .collect();
    top_k_row(&keys, need)
}

/// [`top_k_growth`] where the growth is not small against the row (`32 k > n`): the same set
/// as [`top_k_row`]'s sampled path on the keys with the taken entries [`EXCLUDED`], without
/// materialising those keys — the sample's bound ([`row_bound`]) and one vectorised pass that
/// collects the entries not taken above it and the first `need` equal to it
/// (`simd::collect_growth`). If at least `need` pass, the `need`-th largest untaken key is at
/// or above the bound, so the selection among them is exact. `None` for a short row, a growth large against the row, a bound that would
/// let taken entries through, or fewer than `need` passing (the caller then selects on every
/// key).
fn growth_sampled(g: &[f32], taken: &[bool], need: usize) -> Option<Vec<usize>> {
    let n = g.len();
    if n < 1024 || n < 8 * need {
        return None;
    }
    let t_lo = row_bound(n, need, |i| if taken[i] { EXCLUDED } else { abs_key(g[i]) });
    if t_lo == EXCLUDED {
        return None;
    }
    // Every untaken entry above the bound, and of those equal to it only the first `need`:
    // if the `need`-th largest untaken key is the bound itself, the growth takes the
    // lowest-position ties, which are among those (a row of equal gradients — a dead neuron's
    // zeros — collects `need` entries, not the whole row).
    let pos = crate::simd::collect_growth(g, taken, t_lo, need);
    if pos.len() < need {
        return None;
    }
    let keys: Vec<u32> = pos.iter().map(|&i| abs_key(g[i as usize])).collect();
    Some(
        top_k_keys(&keys, need)
            .into_iter()
            .map(|p| pos[p] as usize)
            .collect(),
    )
}

/// Positions of the `k` largest of `n` keys given by `key_at` (ties by smaller position),
/// ascending, without materialising the `n` keys when `k` is small against `n`.
///
/// A strided sample of the keys gives a lower bound `t_lo` a little below the sample's
/// `k/n`-quantile; one parallel pass collects every entry whose key is ≥ `t_lo`. If at least
/// `k` were collected, the k-th largest key is ≥ `t_lo`, so every entry above it and every
/// tie with it is among them, and the selection among the collected is exact. Otherwise (an
/// unlucky sample: many equal keys) the keys are materialised and selected by [`top_k_keys`].
/// Either way the result is the exact top-k; the sample only decides how fast.
pub(crate) fn top_k_sampled(
    n: usize,
    k: usize,
    key_at: impl Fn(usize) -> u32 + Sync,
) -> Vec<usize> {
    if k >= n {
        return (0..n).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    // Below this a full selection is cheap, and above this fraction the pass collects most
    // entries anyway.
    if n < 1 << 16 || k > n / 8 {
        return top_k_keys(&all_keys(n, &key_at), k);
    }
    let stride = n / (1 << 14);
    let mut sample: Vec<u32> = (0..n / stride).map(|j| key_at(j * stride)).collect();
    let m = sample.len();
    // Expected rank of the k-th largest in the sample, with a margin of 50% and 8 standard
    // deviations of a binomial count, so that a sample misses it only for adversarial keys.
    let expected = k as f64 * m as f64 / n as f64;
    let rank = (expected * 1.5 + 8.0 * expected.sqrt() + 16.0).min((m - 1) as f64) as usize;
    let (_, &mut t_lo, _) = sample.select_nth_unstable_by(rank, |a, b| b.cmp(a));
    let parts: Vec<Vec<(usize, u32)>> = chunks(n)
        .map_init(Vec::new, |buf: &mut Vec<u32>, range| {
            // Branch-free compaction: every offset is written, the length advances when its key
            // passes.
            buf.resize(range.len() + 1, 0);
            let mut len = 0;
            for i in range.clone() {
                buf[len] = (i - range.start) as u32;
                len += (key_at(i) >= t_lo) as usize;
            }
            buf[..len]
                .iter()
                .map(|&j| {
                    let i = range.start + j as usize;
                    (i, key_at(i))
                })
                .collect()
        })
        .collect();
    let collected: Vec<(usize, u32)> = parts.concat();
    if collected.len() < k {
        return top_k_keys(&all_keys(n, &key_at), k);
    }
    let keys: Vec<u32> = collected.iter().map(|&(_, o)| o).collect();
    top_k_keys(&keys, k)
        .into_iter()
        .map(|p| collected[p].0)
        .collect()
}

/// Positions of the `k` largest `|g|` (ties by smaller position, NaN last), ascending: the
/// same set as [`top_k_sampled`] with the keys `key(|g|)`, for a slice. The collecting pass
/// packs the comparisons with the sample's bound of 64 magnitudes into a word at a time
/// (vectorised) and walks its set bits: one step per collected entry, no branch per entry.
pub(crate) fn top_k_abs(g: &[f32], k: usize) -> Vec<usize> {
    let n = g.len();
    if k >= n || k == 0 || n < 1 << 16 || k > n / 8 {
        return top_k_sampled(n, k, |i| abs_key(g[i]));
    }
    let stride = n / (1 << 14);
    let mut sample: Vec<u32> = (0..n / stride).map(|j| abs_key(g[j * stride])).collect();
    let m = sample.len();
    // As top_k_sampled: the sample's k/n-quantile with a margin.
    let expected = k as f64 * m as f64 / n as f64;
    let rank = (expected * 1.5 + 8.0 * expected.sqrt() + 16.0).min((m - 1) as f64) as usize;
    let (_, &mut t_lo, _) = sample.select_nth_unstable_by(rank, |a, b| b.cmp(a));
    const CHUNK: usize = 1 << 15;
    let parts: Vec<Vec<(usize, u32)>> = g
        .par_chunks(CHUNK)
        .enumerate()
        .map(|(c, gc)| crate::simd::collect_abs(gc, t_lo, c * CHUNK))
        .collect();
    let collected: Vec<(usize, u32)> = parts.concat();
    if collected.len() < k {
        return top_k_keys(&all_keys(n, &|i| abs_key(g[i])), k);
    }
    let keys: Vec<u32> = collected.iter().map(|&(_, o)| o).collect();
    top_k_keys(&keys, k)
        .into_iter()
        .map(|p| collected[p].0)
        .collect()
}

/// `0..n` in parallel chunks (each a plain loop, which the compiler inlines and vectorises).
fn chunks(n: usize) -> impl IndexedParallelIterator<Item = std::ops::Range<usize>> {
    const CHUNK: usize = 1 << 15;
    (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(move |c| c * CHUNK..((c + 1) * CHUNK).min(n))
}

/// The `n` keys, materialised.
fn all_keys(n: usize, key_at: &(impl Fn(usize) -> u32 + Sync)) -> Vec<u32> {
    let mut keys = vec![0u32; n];
    keys.par_chunks_mut(1 << 15)
        .enumerate()
        .for_each(|(c, out)| {
            for (j, o) in out.iter_mut().enumerate() {
                *o = key_at((c << 15) + j);
            }
        });
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The defining order: score descending (NaN last), index ascending.
    fn by_sort(scores: &[f32], k: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| {
            rank_key(scores[b])
                .total_cmp(&rank_key(scores[a]))
                .then(a.cmp(&b))
        });
        let mut want = order[..k].to_vec();
        want.sort_unstable();
        want
    }

    fn random_scores(rng: &mut Rng, n: usize, distinct: usize) -> Vec<f32> {
        (0..n)
            .map(|_| match rng.below(8) {
                0 => 0.0,
                1 => -0.0,
                2 => f32::NAN,
                3 => (rng.below(distinct) as f32) - 2.0,
                _ => rng.normal() as f32,
            })
            .collect()
    }

    #[test]
    fn top_k_breaks_ties_by_index_and_ranks_nan_last() {
        let s = [1.0, 3.0, 3.0, f32::NAN, 2.0, 3.0];
        assert_eq!(top_k((0..6).collect(), 3, |i| s[i]), vec![1, 2, 5]);
        assert_eq!(top_k((0..6).collect(), 2, |i| s[i]), vec![1, 2]);
        assert_eq!(top_k((0..6).collect(), 5, |i| s[i]), vec![0, 1, 2, 4, 5]);
        assert!(top_k(vec![1, 2], 0, |_| 0.0).is_empty());
        // Unsorted candidates come back sorted.
        assert_eq!(top_k(vec![5, 0, 1], 2, |i| s[i]), vec![1, 5]);
    }

    #[test]
    fn every_selection_matches_a_full_sort() {
        let mut rng = Rng::new(7);
        for &n in &[1usize, 2, 17, 1000, 3072, 70_000, 300_000] {
            let scores = random_scores(&mut rng, n, 5);
            let keys: Vec<u32> = scores.iter().map(|&s| key(s)).collect();
            for &k in &[
                0,
                1,
                7,
                64,
                65,
                n / 100,
                n / 30,
                n / 9,
                n / 3,
                n.saturating_sub(1),
                n,
            ] {
                let k = k.min(n);
                let want = by_sort(&scores, k);
                assert_eq!(top_k_keys(&keys, k), want, "keys n = {n}, k = {k}");
                assert_eq!(
                    top_k((0..n).collect(), k, |i| scores[i]),
                    want,
                    "n = {n}, k = {k}"
                );
                assert_eq!(
                    top_k_sampled(n, k, |i| keys[i]),
                    want,
                    "sampled n = {n}, k = {k}"
                );
                assert_eq!(top_k_row(&keys, k), want, "row n = {n}, k = {k}");
                let mags: Vec<f32> = scores.iter().map(|v| v.abs()).collect();
                assert_eq!(
                    top_k_abs(&scores, k),
                    by_sort(&mags, k),
                    "abs n = {n}, k = {k}"
                );
            }
        }
    }

    #[test]
    fn the_growth_bound_gives_the_excluding_scan() {
        let mut rng = Rng::new(19);
        for case in 0..400 {
            let n = [17usize, 64, 500, 784, 1000, 3072][case % 6];
            let distinct = 1 + rng.below(6);
            let g = random_scores(&mut rng, n, distinct);
            let k = 1 + rng.below((n / 8).max(1));
            let taken_n = rng.below(k + 1);
            let mut taken = vec![false; n];
            for c in rng.choose(n, taken_n) {
                taken[c] = true;
            }
            // A row all of one value, or of NaN, now and then.
            let g: Vec<f32> = match case % 25 {
                0 => vec![1.5; n],
                1 => vec![f32::NAN; n],
                _ => g,
            };
            let keys: Vec<u32> = g
                .iter()
                .zip(&taken)
                .map(|(&v, &on)| if on { EXCLUDED } else { key(v.abs()) })
                .collect();
            let need = k - taken_n;
            assert_eq!(
                top_k_growth(&g, &taken, k, need),
                top_k_row(&keys, need),
                "case {case}: n = {n}, k = {k}, need = {need}"
            );
        }
    }

    #[test]
    fn the_sampled_selection_is_exact_when_its_sample_misleads() {
        // Every sampled position (multiples of the stride) holds a large key, the rest ties at
        // a smaller one: the sample's bound is too high, and the selection must fall back.
        let n = 1 << 18;
        let stride = n / (1 << 14);
        let scores: Vec<f32> = (0..n)
            .map(|i| if i % stride == 0 { 5.0 } else { 1.0 })
            .collect();
        let keys: Vec<u32> = scores.iter().map(|&s| key(s)).collect();
        for k in [100, (n / stride) + 50, 20_000] {
            assert_eq!(
                top_k_sampled(n, k, |i| keys[i]),
                by_sort(&scores, k),
                "k = {k}"
            );
        }
        // The same for one row: a stride of 3072 / 256 = 12.
        let n = 3072;
        let scores: Vec<f32> = (0..n)
            .map(|i| if i % 12 == 0 { 5.0 } else { 1.0 })
            .collect();
        let keys: Vec<u32> = scores.iter().map(|&s| key(s)).collect();
        for k in [65, 200, 300, 383] {
            assert_eq!(top_k_row(&keys, k), by_sort(&scores, k), "row k = {k}");
        }
    }

    #[test]
    fn the_sampled_growth_is_exact_when_its_sample_misleads() {
        // A 3072 row samples every 12th entry. (a) The sampled entries are large, the rest
        // tie below: the bound lets too few through. (b) Every sampled entry is taken: the
        // bound is EXCLUDED. (c) A random row with most of a large growth. Each must be the
        // excluding scan's set.
        let n = 3072;
        let mut rng = Rng::new(23);
        for case in 0..3 {
            let g: Vec<f32> = match case {
                0 | 1 => (0..n)
                    .map(|i| if i % 12 == 0 { 5.0 } else { 1.0 })
                    .collect(),
                _ => random_scores(&mut rng, n, 4),
            };
            let mut taken = vec![false; n];
            let k = 380;
            let taken_n = if case == 1 { n / 12 } else { 40 };
            if case == 1 {
                (0..n).step_by(12).for_each(|i| taken[i] = true);
            } else {
                rng.choose(n, taken_n)
                    .into_iter()
                    .for_each(|c| taken[c] = true);
            }
            let need = if case == 1 { 300 } else { k - taken_n };
            let keys: Vec<u32> = g
                .iter()
                .zip(&taken)
                .map(|(&v, &on)| if on { EXCLUDED } else { key(v.abs()) })
                .collect();
            assert_eq!(
                top_k_growth(&g, &taken, k.max(taken_n + need), need),
                top_k_row(&keys, need),
                "case {case}"
            );
        }
    }

    #[test]
    fn excluded_ranks_below_every_score() {
        for s in [
            f32::NAN,
            f32::NEG_INFINITY,
            -1e30,
            -0.0,
            0.0,
            1.0,
            f32::INFINITY,
        ] {
            assert!(key(s) > EXCLUDED, "{s}");
        }
        assert!(key(f32::NAN) == key(f32::NEG_INFINITY));
        for v in [
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFFC0_1234),
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            f32::MIN_POSITIVE,
            -1e-40,
            3.5,
            -7.25,
            f32::MAX,
        ] {
            assert_eq!(abs_key(v), key(v.abs()), "{v}");
        }
        assert!(key(-0.0) < key(0.0) && key(1.0) < key(2.0) && key(-2.0) < key(-1.0));
    }
}
