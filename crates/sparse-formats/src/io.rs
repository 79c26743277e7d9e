//! Save and load layers of any format to safetensors, with validation.
//!
//! File layout: one safetensors file holds any number of named layers. For a layer `NAME`:
//!
//! | format      | tensors (`NAME.<part>`)                                               |
//! |-------------|------------------------------------------------------------------------|
//! | `dense`     | `weight` F32 (any shape)                                               |
//! | `mask`      | `mask` U8 `[rows, fan_in]`, values 0/1                                 |
//! | `condensed` | `values` F32 `[n_active, k]`, `indices` U16/U32 `[n_active, k]`, `active_rows` U32 `[n_active]`, optional `bias` F32 `[rows]` |
//! | `nm`        | `values` F32 `[rows, fan_in·n/m]`, `positions` U8 `[rows, fan_in·n/m]` |
//! | `csr`       | `row_ptr` U64 `[rows + 1]`, `col_indices` U32 `[nnz]`, `values` F32 `[nnz]` |
//!
//! The safetensors metadata holds `sparse_formats.version` (= [`FORMAT_VERSION`]) and, per layer,
//! the key `layer.NAME` with a JSON header naming the format and its parameters, e.g.
//! `{"format":"condensed","rows":768,"fan_in":3072,"k":307,"index_type":"u16","bias":true}`.
//!
//! Loading validates the container, the headers, every tensor's dtype and shape against its
//! header, and then every structural invariant of the format (through the checked
//! constructors). Errors name the tensor (`NAME.part`) or metadata key and the broken rule. A
//! truncated, corrupted or adversarial file yields an error, never a panic, and nothing is
//! allocated beyond the size of the file. Saving writes a temporary file beside the target and
//! renames it, so a crash never leaves a half-written file.
//!
//! ```
//! use sparse_formats::{io, Mask, SparseLayer};
//! let mask = Mask::parse("#.#\n.#.").unwrap();
//! let bytes = io::to_bytes(&[("fc1".to_string(), SparseLayer::Mask(mask.clone()))]).unwrap();
//! let layers = io::from_bytes(&bytes).unwrap();
//! assert_eq!(layers[0].0, "fc1");
//! assert!(matches!(&layers[0].1, SparseLayer::Mask(m) if *m == mask));
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};
use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result};
use crate::{Condensed, Csr, IndexType, IndexVec, Mask, NmPattern, NmSparse};

/// Version of the on-disk layout written by this crate; files with another version are refused.
pub const FORMAT_VERSION: u32 = 1;

/// Metadata key holding [`FORMAT_VERSION`].
pub const VERSION_KEY: &str = "sparse_formats.version";

/// Prefix of the metadata key holding each layer's header.
pub const LAYER_KEY_PREFIX: &str = "layer.";

/// A dense f32 tensor of any shape, for layers that stay dense in an export.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseTensor {
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Values, `shape.iter().product()` of them.
    pub values: Vec<f32>,
}

/// One layer in any of the formats of this crate.
#[derive(Debug, Clone, PartialEq)]
pub enum SparseLayer {
    /// A dense tensor.
    Dense(DenseTensor),
    /// A binary mask.
    Mask(Mask),
    /// Constant fan-in layout.
    Condensed(Condensed),
    /// N:M layout.
    Nm(NmSparse),
    /// Compressed sparse rows.
    Csr(Csr),
}

impl SparseLayer {
    /// The format's name as written in the file header.
    pub fn format_name(&self) -> &'static str {
        match self {
            SparseLayer::Dense(_) => "dense",
            SparseLayer::Mask(_) => "mask",
            SparseLayer::Condensed(_) => "condensed",
            SparseLayer::Nm(_) => "nm",
            SparseLayer::Csr(_) => "csr",
        }
    }
}

/// The JSON header stored in the metadata for each layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "lowercase", deny_unknown_fields)]
enum LayerHeader {
    Dense {
        shape: Vec<usize>,
    },
    Mask {
        rows: usize,
        fan_in: usize,
    },
    Condensed {
        rows: usize,
        fan_in: usize,
        k: usize,
        index_type: IndexType,
        bias: bool,
    },
    Nm {
        rows: usize,
        fan_in: usize,
        n: usize,
        m: usize,
        group_stride: usize,
    },
    Csr {
        rows: usize,
        fan_in: usize,
        nnz: usize,
    },
}

/// An owned tensor to serialise.
struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn owned_f32(shape: Vec<usize>, v: &[f32]) -> Owned {
    Owned {
        dtype: Dtype::F32,
        shape,
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn owned_u32(shape: Vec<usize>, v: impl Iterator<Item = u32>) -> Owned {
    Owned {
        dtype: Dtype::U32,
        shape,
        bytes: v.flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn encode(layer: &SparseLayer) -> (LayerHeader, Vec<(&'static str, Owned)>) {
    match layer {
        SparseLayer::Dense(d) => (
            LayerHeader::Dense {
                shape: d.shape.clone(),
            },
            vec![("weight", owned_f32(d.shape.clone(), &d.values))],
        ),
        SparseLayer::Mask(m) => (
            LayerHeader::Mask {
                rows: m.rows(),
                fan_in: m.fan_in(),
            },
            vec![(
                "mask",
                Owned {
                    dtype: Dtype::U8,
                    shape: vec![m.rows(), m.fan_in()],
                    bytes: m.as_slice().iter().map(|&b| b as u8).collect(),
                },
            )],
        ),
        SparseLayer::Condensed(c) => {
            let shape = vec![c.n_active(), c.k()];
            let indices = match c.indices() {
                IndexVec::U16(v) => Owned {
                    dtype: Dtype::U16,
                    shape: shape.clone(),
                    bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                },
                IndexVec::U32(v) => owned_u32(shape.clone(), v.iter().copied()),
            };
            let mut t = vec![
                ("values", owned_f32(shape, c.values())),
                ("indices", indices),
                (
                    "active_rows",
                    owned_u32(vec![c.n_active()], c.active_rows().iter().copied()),
                ),
            ];
            if let Some(b) = c.bias() {
                t.push(("bias", owned_f32(vec![c.rows()], b)));
            }
            (
                LayerHeader::Condensed {
                    rows: c.rows(),
                    fan_in: c.fan_in(),
                    k: c.k(),
                    index_type: c.indices().index_type(),
                    bias: c.bias().is_some(),
                },
                t,
            )
        }
        SparseLayer::Nm(nm) => {
            let p = nm.pattern();
            let shape = vec![nm.rows(), nm.kept_per_row()];
            (
                LayerHeader::Nm {
                    rows: nm.rows(),
                    fan_in: nm.fan_in(),
                    n: p.n,
                    m: p.m,
                    group_stride: p.group_stride,
                },
                vec![
                    ("values", owned_f32(shape.clone(), nm.values())),
                    (
                        "positions",
                        Owned {
                            dtype: Dtype::U8,
                            shape,
                            bytes: nm.positions().to_vec(),
                        },
                    ),
                ],
            )
        }
        SparseLayer::Csr(c) => (
            LayerHeader::Csr {
                rows: c.rows(),
                fan_in: c.fan_in(),
                nnz: c.nnz(),
            },
            vec![
                (
                    "row_ptr",
                    Owned {
                        dtype: Dtype::U64,
                        shape: vec![c.rows() + 1],
                        bytes: c
                            .row_ptr()
                            .iter()
                            .flat_map(|&x| (x as u64).to_le_bytes())
                            .collect(),
                    },
                ),
                (
                    "col_indices",
                    owned_u32(vec![c.nnz()], c.col_indices().iter().copied()),
                ),
                ("values", owned_f32(vec![c.nnz()], c.values())),
            ],
        ),
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(FormatError::Metadata {
            field: format!("{LAYER_KEY_PREFIX}{name}"),
            reason: "a layer name must be non-empty and contain no whitespace".into(),
        });
    }
    Ok(())
}

/// Serialises named layers into safetensors bytes. Names must be unique, non-empty and
/// whitespace-free; one layer's tensor names must not collide with another's.
pub fn to_bytes(layers: &[(String, SparseLayer)]) -> Result<Vec<u8>> {
    to_bytes_with_metadata(layers, &BTreeMap::new())
}

/// [`to_bytes`] with extra metadata entries (e.g. a model description a loader needs beside
/// the layers). Their keys must not be [`VERSION_KEY`] or start with [`LAYER_KEY_PREFIX`].
pub fn to_bytes_with_metadata(
    layers: &[(String, SparseLayer)],
    extra: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut meta = HashMap::new();
    for (key, value) in extra {
        if key == VERSION_KEY || key.starts_with(LAYER_KEY_PREFIX) {
            return Err(FormatError::Metadata {
                field: key.clone(),
                reason: format!(
                    "reserved key (`{VERSION_KEY}` and `{LAYER_KEY_PREFIX}*` belong to the layers)"
                ),
            });
        }
        meta.insert(key.clone(), value.clone());
    }
    meta.insert(VERSION_KEY.to_string(), FORMAT_VERSION.to_string());
    let mut tensors: BTreeMap<String, Owned> = BTreeMap::new();
    for (name, layer) in layers {
        check_name(name)?;
        let (header, parts) = encode(layer);
        let key = format!("{LAYER_KEY_PREFIX}{name}");
        let json = serde_json::to_string(&header).expect("headers always serialise");
        if meta.insert(key.clone(), json).is_some() {
            return Err(FormatError::Metadata {
                field: key,
                reason: "duplicate layer name".into(),
            });
        }
        for (part, t) in parts {
            let tname = format!("{name}.{part}");
            if tensors.insert(tname.clone(), t).is_some() {
                return Err(FormatError::invalid(
                    tname,
                    "two layers write the same tensor name",
                ));
            }
        }
    }
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| FormatError::Container(e.to_string()))?;
    Ok(sorted_header(bytes))
}

/// The same file with its JSON header's keys in sorted order. safetensors writes its metadata
/// map in hash order, which differs from process to process; sorted, the same layers always
/// give the same bytes. The header keeps its length (the same JSON, reordered, and the same
/// space padding), so nothing else moves; anything unexpected leaves the bytes as they were.
fn sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(n) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8 + n) else {
        return bytes;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(header) else {
        return bytes;
    };
    let Ok(sorted) = serde_json::to_vec(&value) else {
        return bytes;
    };
    if sorted.len() > n {
        return bytes;
    }
    bytes[8..8 + sorted.len()].copy_from_slice(&sorted);
    bytes[8 + sorted.len()..8 + n].fill(b' ');
    bytes
}

/// Writes named layers to `path` atomically (see [`write_atomic`]).
pub fn save(path: impl AsRef<Path>, layers: &[(String, SparseLayer)]) -> Result<()> {
    write_atomic(path.as_ref(), &to_bytes(layers)?)
}

/// [`save`] with extra metadata entries (see [`to_bytes_with_metadata`]).
pub fn save_with_metadata(
    path: impl AsRef<Path>,
    layers: &[(String, SparseLayer)],
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    write_atomic(path.as_ref(), &to_bytes_with_metadata(layers, extra)?)
}

/// Writes `bytes` to a temporary file in the target's folder, flushes it to disk and renames it
/// over `path`, so readers see either the old file or the complete new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io_err = |error| FormatError::Io {
        path: path.to_path_buf(),
        error,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // tempfile appends the temporary file's name to its errors; the target's path says more.
    let plain = |e: std::io::Error| {
        let text = e.to_string();
        match text.find(" at path \"") {
            Some(i) => std::io::Error::new(e.kind(), text[..i].to_string()),
            None => e,
        }
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| io_err(plain(e)))?;
    tmp.write_all(bytes).map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(path).map_err(|e| io_err(plain(e.error)))?;
    Ok(())
}

/// Reads and validates every layer of a file written by [`save`], sorted by name.
pub fn load(path: impl AsRef<Path>) -> Result<Vec<(String, SparseLayer)>> {
    Ok(load_with_metadata(path)?.0)
}

/// Layers and extra metadata entries of a file, as a file holds them.
pub type LayersWithMetadata = (Vec<(String, SparseLayer)>, BTreeMap<String, String>);

/// [`load`], also returning the extra metadata entries (every key but [`VERSION_KEY`] and the
/// layer headers).
pub fn load_with_metadata(path: impl AsRef<Path>) -> Result<LayersWithMetadata> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|error| FormatError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    from_bytes_with_metadata(&bytes).map_err(|e| FormatError::InFile {
        path: path.to_path_buf(),
        error: Box::new(e),
    })
}

/// Parses and validates safetensors bytes written by [`to_bytes`]; layers sorted by name.
pub fn from_bytes(bytes: &[u8]) -> Result<Vec<(String, SparseLayer)>> {
    Ok(from_bytes_with_metadata(bytes)?.0)
}

/// [`from_bytes`], also returning the extra metadata entries.
pub fn from_bytes_with_metadata(bytes: &[u8]) -> Result<LayersWithMetadata> {
    let (_, metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| FormatError::Container(e.to_string()))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| FormatError::Container(e.to_string()))?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    match meta.get(VERSION_KEY) {
        None => {
            return Err(FormatError::Metadata {
                field: VERSION_KEY.into(),
                reason: "missing: not a file written by sparse-formats".into(),
            })
        }
        Some(v) if v.trim() != FORMAT_VERSION.to_string() => {
            return Err(FormatError::Metadata {
                field: VERSION_KEY.into(),
                reason: format!("version {v} is not supported (this build reads {FORMAT_VERSION})"),
            })
        }
        Some(_) => {}
    }
    let mut headers: BTreeMap<&str, LayerHeader> = BTreeMap::new();
    for (key, value) in &meta {
        let Some(name) = key.strip_prefix(LAYER_KEY_PREFIX) else {
            continue;
        };
        check_name(name)?;
        let header = serde_json::from_str(value).map_err(|e| FormatError::Metadata {
            field: key.clone(),
            reason: format!("bad layer header: {e}"),
        })?;
        headers.insert(name, header);
    }
    let mut tensors: BTreeMap<String, TensorView<'_>> = st
        .tensors()
        .into_iter()
        .collect::<BTreeMap<String, TensorView<'_>>>();
    let mut out = Vec::with_capacity(headers.len());
    for (name, header) in headers {
        let mut r = Reader {
            layer: name,
            tensors: &mut tensors,
        };
        let layer = r.decode(header).map_err(|e| e.in_layer(name))?;
        out.push((name.to_string(), layer));
    }
    if let Some(stray) = tensors.keys().next() {
        return Err(FormatError::invalid(
            stray.clone(),
            "tensor belongs to no layer listed in the metadata",
        ));
    }
    let extra = meta
        .into_iter()
        .filter(|(k, _)| k != VERSION_KEY && !k.starts_with(LAYER_KEY_PREFIX))
        .collect();
    Ok((out, extra))
}

/// Takes one layer's tensors out of the file, checking dtype and shape.
struct Reader<'a, 'd> {
    layer: &'a str,
    tensors: &'a mut BTreeMap<String, TensorView<'d>>,
}

/// Dimension limit for headers read from a file: every format indexes rows and columns with
/// 32-bit integers on disk, and this bound keeps loops over a hostile header's dimensions short.
const MAX_DIM: usize = u32::MAX as usize;

fn dims_ok(part: &str, dims: &[usize]) -> Result<()> {
    if dims.iter().any(|&d| d > MAX_DIM) {
        return Err(FormatError::invalid(
            part,
            format!("dimension in {dims:?} exceeds {MAX_DIM}"),
        ));
    }
    Ok(())
}

impl<'d> Reader<'_, 'd> {
    fn take(&mut self, part: &str, dtypes: &[Dtype], shape: &[usize]) -> Result<TensorView<'d>> {
        let name = format!("{}.{part}", self.layer);
        let t = self
            .tensors
            .remove(&name)
            .ok_or_else(|| FormatError::invalid(part, "missing from the file"))?;
        if !dtypes.contains(&t.dtype()) {
            return Err(FormatError::invalid(
                part,
                format!("dtype {:?}, expected one of {dtypes:?}", t.dtype()),
            ));
        }
        if t.shape() != shape {
            return Err(FormatError::invalid(
                part,
                format!("shape {:?}, the header says {shape:?}", t.shape()),
            ));
        }
        Ok(t)
    }

    fn f32s(&mut self, part: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.take(part, &[Dtype::F32], shape)?;
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn u32s(&mut self, part: &str, shape: &[usize]) -> Result<Vec<u32>> {
        let t = self.take(part, &[Dtype::U32], shape)?;
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn u8s(&mut self, part: &str, shape: &[usize]) -> Result<Vec<u8>> {
        Ok(self.take(part, &[Dtype::U8], shape)?.data().to_vec())
    }

    fn decode(&mut self, header: LayerHeader) -> Result<SparseLayer> {
        match header {
            LayerHeader::Dense { shape } => {
                dims_ok("weight", &shape)?;
                let values = self.f32s("weight", &shape)?;
                Ok(SparseLayer::Dense(DenseTensor { shape, values }))
            }
            LayerHeader::Mask { rows, fan_in } => {
                dims_ok("mask", &[rows, fan_in])?;
                let raw = self.u8s("mask", &[rows, fan_in])?;
                if let Some(i) = raw.iter().position(|&b| b > 1) {
                    return Err(FormatError::invalid(
                        "mask",
                        format!("entry {i} is {}, a mask holds only 0 and 1", raw[i]),
                    ));
                }
                Ok(SparseLayer::Mask(Mask::new(
                    rows,
                    fan_in,
                    raw.into_iter().map(|b| b == 1).collect(),
                )?))
            }
            LayerHeader::Condensed {
                rows,
                fan_in,
                k,
                index_type,
                bias,
            } => {
                dims_ok("header", &[rows, fan_in, k])?;
                let n_active = self
                    .tensors
                    .get(&format!("{}.active_rows", self.layer))
                    .and_then(|t| t.shape().first().copied())
                    .unwrap_or(0);
                if n_active > rows {
                    return Err(FormatError::invalid(
                        "active_rows",
                        format!("{n_active} active rows but the layer has {rows} rows"),
                    ));
                }
                let active_rows = self.u32s("active_rows", &[n_active])?;
                let values = self.f32s("values", &[n_active, k])?;
                let t = self.take("indices", &[Dtype::U16, Dtype::U32], &[n_active, k])?;
                let indices = match (t.dtype(), index_type) {
                    (Dtype::U16, IndexType::U16) => IndexVec::U16(
                        t.data()
                            .chunks_exact(2)
                            .map(|c| u16::from_le_bytes([c[0], c[1]]))
                            .collect(),
                    ),
                    (Dtype::U32, IndexType::U32) => IndexVec::U32(
                        t.data()
                            .chunks_exact(4)
                            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                    ),
                    (found, _) => {
                        return Err(FormatError::invalid(
                            "indices",
                            format!("dtype {found:?} but the header says {index_type:?}"),
                        ))
                    }
                };
                if indices.index_type() != IndexType::for_fan_in(fan_in) {
                    return Err(FormatError::invalid(
                        "indices",
                        format!(
                            "{:?} is not the narrowest index type for fan-in {fan_in}",
                            indices.index_type()
                        ),
                    ));
                }
                let bias = if bias {
                    Some(self.f32s("bias", &[rows])?)
                } else {
                    None
                };
                Ok(SparseLayer::Condensed(Condensed::from_parts(
                    rows,
                    fan_in,
                    k,
                    active_rows,
                    values,
                    indices,
                    bias,
                )?))
            }
            LayerHeader::Nm {
                rows,
                fan_in,
                n,
                m,
                group_stride,
            } => {
                dims_ok("header", &[rows, fan_in])?;
                let pattern = NmPattern { n, m, group_stride };
                pattern.validate(fan_in)?;
                let kept = pattern.groups(fan_in) * n;
                let values = self.f32s("values", &[rows, kept])?;
                let positions = self.u8s("positions", &[rows, kept])?;
                Ok(SparseLayer::Nm(NmSparse::from_parts(
                    rows, fan_in, pattern, values, positions,
                )?))
            }
            LayerHeader::Csr { rows, fan_in, nnz } => {
                dims_ok("header", &[rows, fan_in])?;
                let t = self.take("row_ptr", &[Dtype::U64], &[rows + 1])?;
                let mut row_ptr = Vec::with_capacity(rows + 1);
                for c in t.data().chunks_exact(8) {
                    let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                    row_ptr.push(usize::try_from(v).map_err(|_| {
                        FormatError::invalid("row_ptr", format!("value {v} does not fit in memory"))
                    })?);
                }
                let col_indices = self.u32s("col_indices", &[nnz])?;
                let values = self.f32s("values", &[nnz])?;
                Ok(SparseLayer::Csr(Csr::from_parts(
                    rows,
                    fan_in,
                    row_ptr,
                    col_indices,
                    values,
                )?))
            }
        }
    }
}
