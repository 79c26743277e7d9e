//! Every rule that loading checks has a file here that breaks it; the error must name the
//! tensor (or metadata key) and the rule. Random truncations and corruptions must never panic.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, View};
use sparse_formats::{io, Condensed, Csr, FormatError, Mask, NmPattern, NmSparse, SparseLayer};

/// A file taken apart, to be broken on purpose and put back together.
#[derive(Clone)]
struct Raw {
    meta: HashMap<String, String>,
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
}

struct T<'a>(&'a (Dtype, Vec<usize>, Vec<u8>));
impl View for T<'_> {
    fn dtype(&self) -> Dtype {
        self.0 .0
    }
    fn shape(&self) -> &[usize] {
        &self.0 .1
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0 .2)
    }
    fn data_len(&self) -> usize {
        self.0 .2.len()
    }
}

impl Raw {
    fn of(name: &str, layer: SparseLayer) -> Raw {
        let bytes = io::to_bytes(&[(name.to_string(), layer)]).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        Raw {
            meta: meta.metadata().clone().unwrap(),
            tensors: st
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
                .collect(),
        }
    }
    fn bytes(&self) -> Vec<u8> {
        safetensors::serialize(
            self.tensors.iter().map(|(k, v)| (k.as_str(), T(v))),
            Some(self.meta.clone()),
        )
        .unwrap()
    }
    fn set_u32(&mut self, tensor: &str, i: usize, v: u32) -> &mut Self {
        let t = self.tensors.get_mut(tensor).unwrap();
        assert_eq!(t.0, Dtype::U32);
        t.2[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn set_u16(&mut self, tensor: &str, i: usize, v: u16) -> &mut Self {
        let t = self.tensors.get_mut(tensor).unwrap();
        assert_eq!(t.0, Dtype::U16);
        t.2[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn set_u8(&mut self, tensor: &str, i: usize, v: u8) -> &mut Self {
        self.tensors.get_mut(tensor).unwrap().2[i] = v;
        self
    }
    fn set_u64(&mut self, tensor: &str, i: usize, v: u64) -> &mut Self {
        let t = self.tensors.get_mut(tensor).unwrap();
        t.2[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn header(&mut self, layer: &str, edit: impl FnOnce(&mut serde_json::Value)) -> &mut Self {
        let key = format!("layer.{layer}");
        let mut v: serde_json::Value = serde_json::from_str(&self.meta[&key]).unwrap();
        edit(&mut v);
        self.meta.insert(key, v.to_string());
        self
    }
}

/// Loads a broken file and checks the error names `tensor` and mentions `rule`.
#[track_caller]
fn expect_invalid(raw: &Raw, tensor: &str, rule: &str) {
    match io::from_bytes(&raw.bytes()) {
        Err(FormatError::Invalid { tensor: t, rule: r }) => {
            assert_eq!(t, tensor, "wrong tensor named (rule: {r})");
            assert!(r.contains(rule), "rule {r:?} does not mention {rule:?}");
        }
        other => panic!("expected an error on `{tensor}` ({rule}), got {other:?}"),
    }
}

#[track_caller]
fn expect_metadata(raw: &Raw, field: &str, reason: &str) {
    match io::from_bytes(&raw.bytes()) {
        Err(FormatError::Metadata {
            field: f,
            reason: r,
        }) => {
            assert_eq!(f, field);
            assert!(
                r.contains(reason),
                "reason {r:?} does not mention {reason:?}"
            );
        }
        other => panic!("expected a metadata error on `{field}`, got {other:?}"),
    }
}

fn condensed() -> Raw {
    // 4 rows, fan-in 6, k = 2, row 1 ablated, with bias.
    let mask = Mask::parse("#.#...\n......\n.#...#\n...##.").unwrap();
    let w: Vec<f32> = mask
        .as_slice()
        .iter()
        .map(|&b| if b { 1.5 } else { 0.0 })
        .collect();
    let c = Condensed::from_dense(4, 6, &w, &mask, Some(&[0.0, 1.0, 2.0, 3.0])).unwrap();
    Raw::of("fc", SparseLayer::Condensed(c))
}

fn nm() -> Raw {
    let mask = Mask::parse("#.#.##..\n.##.#..#").unwrap();
    let nm = NmSparse::from_dense(2, 8, NmPattern::new(2, 4), &[1.0; 16], &mask).unwrap();
    Raw::of("fc", SparseLayer::Nm(nm))
}

fn csr() -> Raw {
    let mask = Mask::parse("#.#\n...\n.##").unwrap();
    Raw::of(
        "fc",
        SparseLayer::Csr(Csr::from_dense(3, 3, &[1.0; 9], &mask).unwrap()),
    )
}

fn mask() -> Raw {
    Raw::of("fc", SparseLayer::Mask(Mask::parse("#.\n.#").unwrap()))
}

#[test]
fn valid_fixtures_load() {
    for raw in [condensed(), nm(), csr(), mask()] {
        io::from_bytes(&raw.bytes()).unwrap();
    }
}

#[test]
fn container_rules() {
    let bytes = condensed().bytes();
    for cut in [0, 7, 8, 20, bytes.len() - 1] {
        assert!(
            matches!(
                io::from_bytes(&bytes[..cut]),
                Err(FormatError::Container(_))
            ),
            "truncated at {cut}"
        );
    }
    let mut huge_header = bytes.clone();
    huge_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        io::from_bytes(&huge_header),
        Err(FormatError::Container(_))
    ));
    let mut extra = bytes.clone();
    extra.push(0);
    assert!(matches!(
        io::from_bytes(&extra),
        Err(FormatError::Container(_))
    ));
}

#[test]
fn metadata_rules() {
    let mut r = condensed();
    r.meta.remove(io::VERSION_KEY);
    expect_metadata(&r, io::VERSION_KEY, "missing");

    let mut r = condensed();
    r.meta.insert(io::VERSION_KEY.into(), "99".into());
    expect_metadata(&r, io::VERSION_KEY, "not supported");

    let mut r = condensed();
    r.meta.insert("layer.fc".into(), "{not json".into());
    expect_metadata(&r, "layer.fc", "bad layer header");

    let mut r = condensed();
    r.header("fc", |h| h["format"] = "coo".into());
    expect_metadata(&r, "layer.fc", "bad layer header");

    let mut r = condensed();
    r.header("fc", |h| {
        h.as_object_mut().unwrap().remove("k");
    });
    expect_metadata(&r, "layer.fc", "bad layer header");
}

#[test]
fn tensor_presence_dtype_and_shape_rules() {
    let mut r = condensed();
    r.tensors.remove("fc.indices");
    expect_invalid(&r, "fc.indices", "missing");

    let mut r = condensed();
    r.tensors.get_mut("fc.values").unwrap().0 = Dtype::I32;
    expect_invalid(&r, "fc.values", "dtype");

    let mut r = condensed();
    r.header("fc", |h| h["k"] = 3.into());
    expect_invalid(&r, "fc.values", "shape");

    let mut r = condensed();
    r.tensors
        .insert("other.weight".into(), (Dtype::F32, vec![1], vec![0; 4]));
    expect_invalid(&r, "other.weight", "belongs to no layer");

    let mut r = condensed();
    r.header("fc", |h| h["rows"] = (u64::from(u32::MAX) + 1).into());
    expect_invalid(&r, "fc.header", "exceeds");
}

#[test]
fn mask_rules() {
    let mut r = mask();
    r.set_u8("fc.mask", 1, 2);
    expect_invalid(&r, "fc.mask", "only 0 and 1");
}

#[test]
fn condensed_rules() {
    let mut r = condensed();
    r.set_u32("fc.active_rows", 1, 0);
    expect_invalid(&r, "fc.active_rows", "strictly increasing");

    let mut r = condensed();
    r.set_u32("fc.active_rows", 2, 4);
    expect_invalid(&r, "fc.active_rows", "out of range");

    let mut r = condensed();
    r.header("fc", |h| h["rows"] = 2.into());
    expect_invalid(&r, "fc.active_rows", "active rows but the layer has 2 rows");

    let mut r = condensed();
    r.set_u16("fc.indices", 3, 6);
    expect_invalid(&r, "fc.indices", "out of range");

    let mut r = condensed();
    r.set_u16("fc.indices", 0, 2); // row 0 becomes [2, 2]
    expect_invalid(&r, "fc.indices", "strictly increasing");

    let mut r = condensed();
    r.set_u16("fc.indices", 0, 5); // row 0 becomes [5, 2]
    expect_invalid(&r, "fc.indices", "strictly increasing");

    let mut r = condensed();
    r.header("fc", |h| h["index_type"] = "u32".into());
    expect_invalid(&r, "fc.indices", "header says");

    let mut r = condensed();
    let t = r.tensors.get_mut("fc.indices").unwrap();
    t.0 = Dtype::U32;
    t.2 = t.2.chunks(2).flat_map(|c| [c[0], c[1], 0, 0]).collect();
    r.header("fc", |h| h["index_type"] = "u32".into());
    expect_invalid(&r, "fc.indices", "narrowest");

    let mut r = condensed();
    r.tensors.get_mut("fc.bias").unwrap().1 = vec![2, 2];
    expect_invalid(&r, "fc.bias", "shape");

    let mut r = condensed();
    r.header("fc", |h| h["bias"] = false.into());
    expect_invalid(&r, "fc.bias", "belongs to no layer");

    let mut r = condensed();
    r.header("fc", |h| h["fan_in"] = 1.into());
    expect_invalid(&r, "fc.k", "exceeds the fan-in");
}

#[test]
fn nm_rules() {
    let mut r = nm();
    r.header("fc", |h| h["m"] = 3.into());
    expect_invalid(&r, "fc.pattern", "groups of 3");

    let mut r = nm();
    r.header("fc", |h| h["n"] = 0.into());
    expect_invalid(&r, "fc.pattern", "1 ≤ N ≤ M");

    let mut r = nm();
    r.set_u8("fc.positions", 1, 4);
    expect_invalid(&r, "fc.positions", "out of range");

    // Two slots on the same position: the group no longer keeps N distinct weights.
    let mut r = nm();
    r.set_u8("fc.positions", 1, 0);
    expect_invalid(&r, "fc.positions", "strictly increasing");
}

#[test]
fn csr_rules() {
    let mut r = csr();
    r.set_u64("fc.row_ptr", 0, 1);
    expect_invalid(&r, "fc.row_ptr", "start at 0");

    let mut r = csr();
    r.set_u64("fc.row_ptr", 3, 3);
    expect_invalid(&r, "fc.row_ptr", "end at nnz");

    let mut r = csr();
    r.set_u64("fc.row_ptr", 1, 4);
    expect_invalid(&r, "fc.row_ptr", "decreasing");

    let mut r = csr();
    r.set_u32("fc.col_indices", 0, 3);
    expect_invalid(&r, "fc.col_indices", "out of range");

    let mut r = csr();
    r.set_u32("fc.col_indices", 0, 2);
    expect_invalid(&r, "fc.col_indices", "strictly increasing");

    let mut r = csr();
    r.header("fc", |h| h["nnz"] = 5.into());
    expect_invalid(&r, "fc.col_indices", "shape");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Truncations, bit flips and byte overwrites anywhere in a valid file give errors or a
    /// valid result, never a panic.
    #[test]
    fn corrupted_files_never_panic(which in 0usize..4, pos in any::<prop::sample::Index>(), byte: u8, cut: bool) {
        let bytes = [condensed(), nm(), csr(), mask()][which].bytes();
        let i = pos.index(bytes.len());
        let mut bad = bytes.clone();
        if cut {
            bad.truncate(i);
        } else {
            bad[i] = byte;
        }
        let _ = io::from_bytes(&bad);
    }
}
