//! Property tests: dense → format → dense is exact, directly and through a safetensors file,
//! on random shapes and sparsities (0%, all-but-one, 1×1 and everything between).

use proptest::prelude::*;
use sparse_formats::{io, Condensed, Csr, IndexType, Mask, NmPattern, NmSparse, SparseLayer};

/// A deterministic pseudo-random stream for building test data from a proptest seed.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// A value that is sometimes exactly 0 (kept zeros must survive every round trip).
    fn value(&mut self) -> f32 {
        if self.below(8) == 0 {
            0.0
        } else {
            (self.next() % 2001) as f32 / 100.0 - 10.0
        }
    }
    /// `count` distinct sorted picks from `0..n`.
    fn choose(&mut self, n: usize, count: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..count {
            let j = i + self.below(n - i);
            idx.swap(i, j);
        }
        let mut out = idx[..count].to_vec();
        out.sort_unstable();
        out
    }
}

/// A masked weight: values at active positions (possibly 0), exact zeros elsewhere.
fn masked_weight(rng: &mut SplitMix, mask: &Mask) -> Vec<f32> {
    mask.as_slice()
        .iter()
        .map(|&b| if b { rng.value() } else { 0.0 })
        .collect()
}

/// An unstructured mask with exactly `nnz` active entries.
fn unstructured(rng: &mut SplitMix, rows: usize, fan_in: usize, nnz: usize) -> Mask {
    let mut m = Mask::zeros(rows, fan_in);
    for i in rng.choose(rows * fan_in, nnz) {
        m.set(i / fan_in, i % fan_in, true);
    }
    m
}

/// A constant fan-in mask: `k` entries per active row, the rows in `ablated` empty.
fn constant_fan_in(
    rng: &mut SplitMix,
    rows: usize,
    fan_in: usize,
    k: usize,
    ablate: usize,
) -> Mask {
    let mut m = Mask::zeros(rows, fan_in);
    let ablated = rng.choose(rows, ablate);
    for r in 0..rows {
        if !ablated.contains(&r) {
            for c in rng.choose(fan_in, k) {
                m.set(r, c, true);
            }
        }
    }
    m
}

fn through_file(layer: SparseLayer) -> SparseLayer {
    let bytes = io::to_bytes(&[("layer".to_string(), layer)]).unwrap();
    io::from_bytes(&bytes).unwrap().remove(0).1
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn csr_and_mask_round_trip(seed: u64, rows in 1usize..24, fan_in in 1usize..70, frac in 0.0f64..=1.0) {
        let mut rng = SplitMix(seed);
        let total = rows * fan_in;
        // frac = 1 gives the dense mask, and the range covers 0% and all-but-one.
        let nnz = match rng.below(4) { 0 => 0, 1 => total - 1, _ => (frac * total as f64) as usize };
        let mask = unstructured(&mut rng, rows, fan_in, nnz);
        let w = masked_weight(&mut rng, &mask);
        prop_assert_eq!(Mask::from_dense(rows, fan_in, &w).unwrap().is_subset_of(&mask).unwrap(), true);

        let csr = Csr::from_dense(rows, fan_in, &w, &mask).unwrap();
        prop_assert_eq!(csr.nnz(), nnz);
        prop_assert_eq!(&csr.to_dense(), &w);
        prop_assert_eq!(&csr.to_mask(), &mask);
        prop_assert_eq!(through_file(SparseLayer::Csr(csr.clone())), SparseLayer::Csr(csr));
        prop_assert_eq!(through_file(SparseLayer::Mask(mask.clone())), SparseLayer::Mask(mask));
    }

    #[test]
    fn condensed_round_trip(seed: u64, rows in 1usize..24, fan_in in 1usize..70, with_bias: bool) {
        let mut rng = SplitMix(seed);
        let k = 1 + rng.below(fan_in);
        let ablate = rng.below(rows + 1); // up to every row ablated
        let mask = constant_fan_in(&mut rng, rows, fan_in, k, ablate);
        let w = masked_weight(&mut rng, &mask);
        let bias: Option<Vec<f32>> = with_bias.then(|| (0..rows).map(|_| rng.value()).collect());
        let c = Condensed::from_dense(rows, fan_in, &w, &mask, bias.as_deref()).unwrap();
        prop_assert_eq!(c.n_active(), rows - ablate);
        prop_assert_eq!(c.k(), if ablate == rows { 0 } else { k });
        prop_assert_eq!(c.indices().index_type(), IndexType::U16);
        prop_assert_eq!(&c.to_dense(), &w);
        prop_assert_eq!(&c.to_mask(), &mask);
        prop_assert_eq!(c.bias(), bias.as_deref());
        prop_assert_eq!(through_file(SparseLayer::Condensed(c.clone())), SparseLayer::Condensed(c));
    }

    #[test]
    fn nm_round_trip(seed: u64, rows in 1usize..12, groups in 1usize..10, nm_choice in 0usize..7, stride in 1usize..4) {
        let mut rng = SplitMix(seed);
        let (n, m) = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 16), (4, 16), (1, 1)][nm_choice];
        let pattern = NmPattern { n, m, group_stride: stride };
        let fan_in = groups * m * stride;
        let mut mask = Mask::zeros(rows, fan_in);
        for r in 0..rows {
            for g in 0..pattern.groups(fan_in) {
                for p in rng.choose(m, n) {
                    mask.set(r, pattern.column(g, p), true);
                }
            }
        }
        let w = masked_weight(&mut rng, &mask);
        let nm = NmSparse::from_dense(rows, fan_in, pattern, &w, &mask).unwrap();
        prop_assert_eq!(nm.values().len(), rows * fan_in * n / m);
        prop_assert_eq!(&nm.to_dense(), &w);
        prop_assert_eq!(&nm.to_mask(), &mask);
        if pattern == NmPattern::new(2, 4) && fan_in % 16 == 0 {
            let nv = nm.to_nvidia_2to4().unwrap();
            prop_assert_eq!(nv.metadata.len(), rows * fan_in / 16);
            prop_assert_eq!(&nv.to_nm().unwrap(), &nm);
        }
        prop_assert_eq!(through_file(SparseLayer::Nm(nm.clone())), SparseLayer::Nm(nm));
    }
}

#[test]
fn one_by_one() {
    for w in [[0.0f32], [1.5]] {
        let mask = Mask::from_dense(1, 1, &w).unwrap();
        assert_eq!(Csr::from_dense(1, 1, &w, &mask).unwrap().to_dense(), w);
        assert_eq!(
            Condensed::from_dense(1, 1, &w, &mask, None)
                .unwrap()
                .to_dense(),
            w
        );
    }
    let nm = NmSparse::from_dense(1, 1, NmPattern::new(1, 1), &[2.0], &Mask::ones(1, 1)).unwrap();
    assert_eq!(nm.to_dense(), vec![2.0]);
}

/// The index type switches exactly at the u16 boundary, and both sides round-trip, including
/// the last column.
#[test]
fn fan_in_at_the_u16_boundary() {
    for (fan_in, expected) in [(65_536, IndexType::U16), (65_537, IndexType::U32)] {
        let mut rng = SplitMix(fan_in as u64);
        let mut mask = constant_fan_in(&mut rng, 3, fan_in, 5, 1);
        // Make sure the last column is used by every active row.
        for r in mask.active_rows() {
            let first = mask.row_indices(r).next().unwrap();
            if !mask.get(r, fan_in - 1) {
                mask.set(r, first, false);
                mask.set(r, fan_in - 1, true);
            }
        }
        let w = masked_weight(&mut rng, &mask);
        let c = Condensed::from_dense(3, fan_in, &w, &mask, None).unwrap();
        assert_eq!(c.indices().index_type(), expected, "fan-in {fan_in}");
        assert_eq!(c.indices().get(c.k() - 1), fan_in - 1);
        assert_eq!(c.to_dense(), w);
        assert_eq!(
            through_file(SparseLayer::Condensed(c.clone())),
            SparseLayer::Condensed(c)
        );
        let csr = Csr::from_dense(3, fan_in, &w, &mask).unwrap();
        assert_eq!(
            through_file(SparseLayer::Csr(csr.clone())),
            SparseLayer::Csr(csr)
        );
    }
}

#[test]
fn several_layers_in_one_file_come_back_sorted_by_name() {
    let a = Mask::parse("#.\n.#").unwrap();
    let d = io::DenseTensor {
        shape: vec![2, 1, 2],
        values: vec![1.0, 2.0, 3.0, 4.0],
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    io::save(
        &path,
        &[
            ("z.mask".to_string(), SparseLayer::Mask(a.clone())),
            ("a.dense".to_string(), SparseLayer::Dense(d.clone())),
        ],
    )
    .unwrap();
    let back = io::load(&path).unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!(back[0], ("a.dense".to_string(), SparseLayer::Dense(d)));
    assert_eq!(back[1], ("z.mask".to_string(), SparseLayer::Mask(a)));
    // Only the final file is left in the folder: the temporary one was renamed.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// The same layers always give the same bytes (safetensors writes its metadata in hash order;
/// `io` sorts the header), and the file still loads.
#[test]
fn saving_is_byte_deterministic() {
    let layers: Vec<(String, SparseLayer)> = (0..8)
        .map(|i| {
            let mask = Mask::parse(if i % 2 == 0 {
                "#.#.\n.##."
            } else {
                "##..\n..##"
            })
            .unwrap();
            (format!("layer{i}.weight"), SparseLayer::Mask(mask))
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..6)
        .map(|k| {
            let p = dir.path().join(format!("m{k}.safetensors"));
            io::save(&p, &layers).unwrap();
            std::fs::read(&p).unwrap()
        })
        .collect();
    assert!(
        files.windows(2).all(|w| w[0] == w[1]),
        "bytes differ between saves"
    );
    let n = u64::from_le_bytes(files[0][..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&files[0][8..8 + n]).unwrap();
    let first = |key: &str| header.find(key).unwrap();
    assert!(
        first("layer.layer0.weight") < first("layer.layer7.weight"),
        "{header}"
    );
    let loaded = io::load(dir.path().join("m0.safetensors")).unwrap();
    assert_eq!(loaded.len(), 8);
}

#[test]
fn extra_metadata_round_trips_and_reserved_keys_are_refused() {
    use std::collections::BTreeMap;
    let layers = vec![(
        "b".to_string(),
        SparseLayer::Dense(sparse_formats::DenseTensor {
            shape: vec![2],
            values: vec![1.0, 2.0],
        }),
    )];
    let extra: BTreeMap<String, String> =
        [("dst.model".to_string(), "{\"v\":1}".to_string())].into();
    let bytes = io::to_bytes_with_metadata(&layers, &extra).unwrap();
    let (back, meta) = io::from_bytes_with_metadata(&bytes).unwrap();
    assert_eq!((back, meta), (layers.clone(), extra));
    // A plain file has none.
    let plain = io::to_bytes(&layers).unwrap();
    assert!(io::from_bytes_with_metadata(&plain).unwrap().1.is_empty());
    for key in [io::VERSION_KEY, "layer.b"] {
        let extra: BTreeMap<String, String> = [(key.to_string(), "x".to_string())].into();
        let e = io::to_bytes_with_metadata(&layers, &extra).unwrap_err();
        assert!(e.to_string().contains(key), "{e}");
    }
}
