//! Inference from an exported file: [`SparseModel`] runs a trained network whose weight layers
//! are stored in the file's sparse formats (condensed, N:M, CSR) on the sparse kernels, without
//! the run folder or the training machinery.
//!
//! A model file is a sparse-formats safetensors file (`dst export` writes it) whose metadata
//! also holds, under [`MODEL_KEY`], a [`ModelDescription`]: the architecture, the image shape,
//! the classes and the per-channel input normalisation. Every variable of the network is in
//! the file: weight layers in a sparse format (or dense when the method kept them dense),
//! biases, BatchNorm and LayerNorm parameters and statistics, position embeddings as dense
//! tensors (a condensed layer carries its bias).
//!
//! Linear and conv layers run on the sparse kernels in the format they were exported in
//! (`sparse_kernels::sparse_conv` for convolutions), except layers denser than
//! [`crate::engine::MAX_SPARSE_DENSITY`], which run dense with their zeros (the sparse kernels are slower
//! there, as in training; e.g. LeNet-5's conv1 and output layer under ERK). An MLP runs as a
//! plan of kernel calls on slices ([`SparseModel::forward`]): at batch 1 candle's per-op cost
//! (five ops a layer) outweighs a sparse layer's arithmetic, so the plan calls the kernels
//! directly — the same values as the network's forward (bias added after the sparse product,
//! dense layers as candle's dense linear, ReLU as `max(x, 0)`) up to float summation order.
//! Below 8 examples its N:M layers run packed (`sparse_kernels::PackedNm`) and its other sparse
//! layers, where that is faster, as 8-column row blocks (`sparse_kernels::RowBlocks`); both are
//! built at load time ([`SparseModel::small_batch_layers`]).
//!
//! ```no_run
//! use models::inference::SparseModel;
//! let model = SparseModel::load("model.safetensors".as_ref()).unwrap();
//! let data = models::Datasets::load(&models::TrainConfig::default()).unwrap();
//! let (loss, accuracy) = model.evaluate(&data.test).unwrap();
//! println!("{accuracy} {loss}");
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use sparse_formats::{Condensed, Csr, DenseTensor, Mask, NmPattern, NmSparse, SparseLayer};
use sparse_kernels::ops::SparseStructure;

use crate::config::TrainConfig;
use crate::data::{DatasetName, ImageSet};
use crate::engine::stored_sparse;
use crate::error::{file_err, Result, TrainError};
use crate::nets::{LayerKind, ModelConfig, Network};
use crate::trainer::Trainer;

/// Metadata key of the [`ModelDescription`] (JSON) in a model file.
pub const MODEL_KEY: &str = "dst.model";

/// Version of [`ModelDescription`] this build writes and reads.
pub const MODEL_VERSION: u32 = 1;

/// What a loader needs beside the layers to run a model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDescription {
    /// [`MODEL_VERSION`] of the writer.
    pub version: u32,
    /// The architecture.
    pub model: ModelConfig,
    /// Input images `[channels, rows, cols]`.
    pub image: [usize; 3],
    /// Number of classes.
    pub classes: usize,
    /// The data set the model was trained on (where `dst eval FILE` finds its test set).
    pub dataset: DatasetName,
    /// Per-channel `(mean, std)` of the training pixels: inputs are `(p − mean) / std`.
    pub normalization: Vec<(f32, f32)>,
}

impl ModelDescription {
    /// The metadata entry holding this description.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let json = serde_json::to_string(self).expect("descriptions serialise");
        [(MODEL_KEY.to_string(), json)].into()
    }

    /// The description in a file's metadata; `path` names the file in errors.
    pub fn from_metadata(path: &Path, meta: &BTreeMap<String, String>) -> Result<Self> {
        let json = meta.get(MODEL_KEY).ok_or_else(|| {
            file_err(
                path,
                format!(
                    "no model description (`{MODEL_KEY}`): not written by `dst export`, or by \
                     a version before model files; export the run again"
                ),
            )
        })?;
        let d: ModelDescription = serde_json::from_str(json)
            .map_err(|e| file_err(path, format!("`{MODEL_KEY}`: {e}")))?;
        if d.version != MODEL_VERSION {
            return Err(file_err(
                path,
                format!(
                    "`{MODEL_KEY}`: version {} is not supported (this build reads {MODEL_VERSION})",
                    d.version
                ),
            ));
        }
        // The same bounds as a training config's model.
        crate::config::check_model(&d.model).map_err(|(field, reason)| {
            file_err(path, format!("`{MODEL_KEY}` {field}: {reason}"))
        })?;
        let [c, h, w] = d.image;
        let sizes_ok = (1..=4096).contains(&c)
            && (1..=4096).contains(&h)
            && (1..=4096).contains(&w)
            && (1..=65536).contains(&d.classes);
        if !sizes_ok {
            return Err(file_err(
                path,
                format!(
                    "`{MODEL_KEY}`: image {:?} / classes {} out of range (1..=4096 per side, \
                     1..=65536 classes)",
                    d.image, d.classes
                ),
            ));
        }
        let norm_ok = d.normalization.len() == c
            && d.normalization
                .iter()
                .all(|&(m, s)| m.is_finite() && s.is_finite() && s > 0.0);
        if !norm_ok {
            return Err(file_err(
                path,
                format!(
                    "`{MODEL_KEY}`: normalization must hold one (mean, std > 0) pair of finite \
                     numbers per channel ({c})"
                ),
            ));
        }
        Ok(d)
    }
}

impl ModelDescription {
    /// The description of a model trained with `cfg`, whose inputs were normalised with
    /// `normalization` ([`Trainer::normalization`], or the checkpoint's).
    pub fn of(cfg: &TrainConfig, normalization: Vec<(f32, f32)>) -> ModelDescription {
        let [c, s, _] = cfg.data.name.image_shape();
        ModelDescription {
            version: MODEL_VERSION,
            model: cfg.model.clone(),
            image: [c, s, s],
            classes: 10,
            dataset: cfg.data.name,
            normalization,
        }
    }
}

/// The layout a model file stores its sparse weight layers in (dense layers stay dense).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// Constant fan-in (SRigL's masks; fails for unequal rows).
    Condensed,
    /// N:M with the run's `n` and `m` (fails where a mask is not N:M).
    Nm,
    /// Compressed sparse rows (any mask).
    Csr,
}

/// The layers of a model file for `t`'s network: every weight layer with a sparse mask in
/// `format` (a condensed layer carries its bias), every other variable dense — what
/// [`SparseModel::from_layers`] loads and `dst export` writes (with
/// [`ModelDescription::to_metadata`]). Fails naming the layer a format cannot hold.
pub fn export_layers(t: &Trainer, format: ExportFormat) -> Result<Vec<(String, SparseLayer)>> {
    let cfg = t.config();
    let bad = |reason: String| TrainError::Config {
        field: "format",
        reason,
    };
    let masks = t.masks();
    if format == ExportFormat::Nm && masks.iter().all(|(_, m)| m.nnz() == m.len()) {
        return Err(bad(format!(
            "no N:M layer to export (every mask is dense; trained with {}): an N:M method \
             writes N:M masks once its schedule has pruned them",
            cfg.method.name.as_str()
        )));
    }
    let mut vars: BTreeMap<String, Tensor> = t.variables()?.into_iter().collect();
    let dense =
        |shape: Vec<usize>, values: Vec<f32>| SparseLayer::Dense(DenseTensor { shape, values });
    let mut out: Vec<(String, SparseLayer)> = Vec::new();
    for (name, mask) in masks {
        let w = vars
            .remove(&name)
            .ok_or_else(|| bad(format!("weight `{name}` is not a variable")))?;
        let stride: usize = w.dims()[2..].iter().product();
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let bias_name = format!("{}.bias", name.strip_suffix(".weight").unwrap_or(&name));
        let bias = match vars.remove(&bias_name) {
            Some(b) => Some(b.to_vec1::<f32>()?),
            None => None,
        };
        let (rows, fan_in) = (mask.rows(), mask.fan_in());
        let method = cfg.method.name.as_str();
        let layer = if mask.nnz() == mask.len() {
            dense(w.dims().to_vec(), values)
        } else {
            match format {
                ExportFormat::Condensed => {
                    let c = Condensed::from_dense(rows, fan_in, &values, &mask, bias.as_deref())
                        .map_err(|e| {
                            bad(format!(
                                "layer `{name}`: cannot export to condensed (trained with \
                                 {method}; use CSR for unstructured masks): {e}"
                            ))
                        })?;
                    out.push((name, SparseLayer::Condensed(c)));
                    continue;
                }
                ExportFormat::Nm => {
                    let pattern = NmPattern {
                        group_stride: stride.max(1),
                        ..NmPattern::new(cfg.method.n, cfg.method.m)
                    };
                    SparseLayer::Nm(
                        NmSparse::from_dense(rows, fan_in, pattern, &values, &mask).map_err(
                            |e| {
                                bad(format!(
                                    "layer `{name}`: the mask is not {}:{} (trained with \
                                     {method}): {e}",
                                    cfg.method.n, cfg.method.m
                                ))
                            },
                        )?,
                    )
                }
                ExportFormat::Csr => {
                    SparseLayer::Csr(Csr::from_dense(rows, fan_in, &values, &mask)?)
                }
            }
        };
        out.push((name, layer));
        if let Some(b) = bias {
            out.push((bias_name, dense(vec![b.len()], b)));
        }
    }
    // Every other variable (BatchNorm, LayerNorm, position embeddings...), so that the file
    // runs on its own.
    for (name, v) in vars {
        let values = v.flatten_all()?.to_vec1::<f32>()?;
        out.push((name, dense(v.dims().to_vec(), values)));
    }
    Ok(out)
}

/// A normalised batch `[b, c, h, w]` of `set`'s images `idx` and their labels: `(p − mean) /
/// std` per channel with `norm`'s statistics (the one place the trainer and [`SparseModel`]
/// prepare inputs).
pub(crate) fn normalized_batch(
    set: &ImageSet,
    idx: &[usize],
    norm: &[(f32, f32)],
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let d = set.image_len();
    let hw = set.rows * set.cols;
    if norm.len() != set.channels {
        candle_core::bail!(
            "input normalisation has {} channels, the images {}",
            norm.len(),
            set.channels
        );
    }
    let mut x = vec![0f32; idx.len() * d];
    // One image per task when there are threads (the values do not depend on the split).
    let fill = |(dst, &i): (&mut [f32], &usize)| {
        let img = &set.images[i * d..(i + 1) * d];
        for (c, &(mean, std)) in norm.iter().enumerate() {
            let (src, out) = (&img[c * hw..(c + 1) * hw], &mut dst[c * hw..(c + 1) * hw]);
            for (o, p) in out.iter_mut().zip(src) {
                *o = (p - mean) / std;
            }
        }
    };
    if d > 0 && sparse_kernels::candle_threads() > 1 && x.len() >= 1 << 16 {
        use rayon::prelude::*;
        x.par_chunks_mut(d).zip(idx.par_iter()).for_each(fill);
    } else if d > 0 {
        x.chunks_mut(d).zip(idx).for_each(fill);
    }
    let y: Vec<u32> = idx.iter().map(|&i| set.labels[i] as u32).collect();
    Ok((
        Tensor::from_vec(x, (idx.len(), set.channels, set.rows, set.cols), dev)?,
        Tensor::from_vec(y, idx.len(), dev)?,
    ))
}

/// Mean cross-entropy and accuracy of `net` on `set` (inference mode, batches of 1000).
pub(crate) fn evaluate_network(
    net: &Network,
    set: &ImageSet,
    norm: &[(f32, f32)],
    dev: &Device,
) -> Result<(f32, f32)> {
    evaluate_with(|x| Ok(net.forward_t(x, false)?), set, norm, dev)
}

/// Mean cross-entropy and accuracy of the logits `forward` gives on `set`'s normalised images.
fn evaluate_with(
    forward: impl Fn(&Tensor) -> Result<Tensor>,
    set: &ImageSet,
    norm: &[(f32, f32)],
    dev: &Device,
) -> Result<(f32, f32)> {
    if set.is_empty() {
        return Err(TrainError::Config {
            field: "data",
            reason: "the set to evaluate holds no images".into(),
        });
    }
    let (mut loss_sum, mut correct) = (0.0f64, 0.0f64);
    let all: Vec<usize> = (0..set.len()).collect();
    for chunk in all.chunks(1000) {
        let (x, y) = normalized_batch(set, chunk, norm, dev)?;
        let logits = forward(&x)?;
        let l = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
        loss_sum += l as f64 * chunk.len() as f64;
        correct += crate::metrics::correct_count(&logits, &y)? as f64;
    }
    let n = set.len() as f64;
    Ok(((loss_sum / n) as f32, (correct / n) as f32))
}

/// Batches below this run the plan's sparse layers on a small-batch layout where one pays
/// ([`SmallBatch`]); larger ones on the batched kernels, which reuse each loaded weight across a
/// tile of examples.
const SMALL_BATCH: usize = 8;

/// A sparse layer's layout for batches below [`SMALL_BATCH`], built at load time.
enum SmallBatch {
    /// N:M with consecutive groups and `m` dividing 16: `sparse_kernels::PackedNm` (16 rows per
    /// block, one in-register permute per 16 products, no gathers).
    Packed(sparse_kernels::PackedNm),
    /// 8-column row blocks (`sparse_kernels::RowBlocks`: a contiguous load of 8 inputs per
    /// block instead of a gathered load per stored weight), where [`blocks_pay`].
    Blocks(sparse_kernels::RowBlocks),
}

impl SmallBatch {
    /// The layout for a layer stored as `structure` with dense row-major weights `w`, if one
    /// beats the format's own batch-1 product.
    fn choose(structure: &SparseStructure, rows: usize, fan_in: usize, w: &[f32]) -> Option<Self> {
        if let SparseStructure::Nm(nm) = structure {
            if let Ok(p) = sparse_kernels::PackedNm::new(nm) {
                return Some(SmallBatch::Packed(p));
            }
        }
        let blocks = sparse_kernels::RowBlocks::from_dense(rows, fan_in, w).ok()?;
        blocks_pay(blocks.blocks(), structure.weight().nnz()).then_some(SmallBatch::Blocks(blocks))
    }

    /// The layout's name, as `SparseModel::small_batch_layers` reports it.
    fn name(&self) -> &'static str {
        match self {
            SmallBatch::Packed(_) => "packed N:M",
            SmallBatch::Blocks(_) => "row blocks",
        }
    }

    /// `y [batch, rows] = x · Wᵀ + bias`.
    fn forward(
        &self,
        x: &[f32],
        batch: usize,
        bias: Option<&[f32]>,
        exec: sparse_kernels::Exec,
    ) -> std::result::Result<Vec<f32>, sparse_kernels::KernelError> {
        match self {
            SmallBatch::Blocks(b) => b.forward(x, batch, bias, exec),
            SmallBatch::Packed(p) => {
                let mut y = Vec::with_capacity(batch * p.rows());
                for xb in x.chunks_exact(p.fan_in().max(1)).take(batch) {
                    y.extend(p.forward_one(xb, bias, exec)?);
                }
                Ok(y)
            }
        }
    }
}

/// Whether a layer's row blocks beat its gathered batch-1 product: a block (32 bytes of values
/// and its start) costs ~1.8 times a gathered stored weight at batch 1 (measured on the
/// development VM, LeNet-300-100 SRigL 90%: fc1 at 8% density, 0.63 blocks per stored weight,
/// 12.4 µs as blocks vs 10.7 µs gathered; fc2 at 23%, 0.39 blocks per weight, 2.9 vs 4.5 µs;
/// docs/benchmarks.md "End-to-end inference"), so blocks run a layer when there are fewer than
/// 0.55 of them per stored weight — denser layers, whose stored weights cluster in blocks.
fn blocks_pay(blocks: usize, nnz: usize) -> bool {
    blocks * 20 < nnz * 11
}

/// One layer of an [`MlpPlan`].
enum PlanLayer {
    /// On the sparse kernels: batched through `structure`, small batches through `small`
    /// where one pays ([`SmallBatch::choose`]).
    Sparse {
        structure: SparseStructure,
        values: Vec<f32>,
        small: Option<SmallBatch>,
    },
    /// Dense, row-major `[rows, fan_in]`.
    Dense { weight: Vec<f32> },
}

/// An MLP as kernel calls on slices (see the module documentation).
struct MlpPlan {
    /// (layer, rows, fan_in, bias), input layer first.
    layers: Vec<(PlanLayer, usize, usize, Option<Vec<f32>>)>,
}

impl MlpPlan {
    /// Logits `[batch, classes]` of flattened normalised images `x`.
    fn run(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        let exec = sparse_kernels::Exec::default();
        let mut h: Vec<f32> = Vec::new();
        for (i, (layer, rows, fan_in, bias)) in self.layers.iter().enumerate() {
            let input: &[f32] = if i == 0 { x } else { &h };
            let mut y = match layer {
                PlanLayer::Sparse {
                    small: Some(small), ..
                } if batch < SMALL_BATCH => small
                    .forward(input, batch, bias.as_deref(), exec)
                    .map_err(candle_core::Error::wrap)?,
                PlanLayer::Sparse {
                    structure, values, ..
                } => sparse_kernels::forward(
                    structure.weight(),
                    values,
                    bias.as_deref(),
                    input,
                    batch,
                    exec,
                )
                .map_err(candle_core::Error::wrap)?,
                PlanLayer::Dense { weight } => sparse_kernels::dense::linear_forward(
                    input,
                    weight,
                    bias.as_deref(),
                    (batch, *rows, *fan_in),
                    exec,
                ),
            };
            if i + 1 < self.layers.len() {
                // ReLU; on the kernels' threads when the batch is large.
                let relu = |c: &mut [f32]| c.iter_mut().for_each(|v| *v = v.max(0.0));
                if exec.threads_for(y.len() * 16) > 1 {
                    use rayon::prelude::*;
                    y.par_chunks_mut(1 << 14).for_each(relu);
                } else {
                    relu(&mut y);
                }
            }
            h = y;
        }
        Ok(h)
    }
}

/// A trained model loaded from a model file (see the module documentation).
pub struct SparseModel {
    desc: ModelDescription,
    net: Network,
    /// The MLP as a plan of kernel calls (MLPs only).
    plan: Option<MlpPlan>,
    dev: Device,
    /// Layers running on the sparse kernels, by weight name, with their format.
    sparse: Vec<(String, &'static str)>,
    /// Sparse layers of the MLP plan that run small batches on another layout, and its name.
    small_batch: Vec<(String, &'static str)>,
}

impl SparseModel {
    /// Loads a model file; weight layers stored sparse run on the sparse kernels, except those
    /// denser than [`crate::engine::MAX_SPARSE_DENSITY`], which run dense (faster there).
    pub fn load(path: &Path) -> Result<SparseModel> {
        Self::load_as(path, false)
    }

    /// Loads a model file with every layer dense (the same model on dense kernels, to compare
    /// speed with).
    pub fn load_dense(path: &Path) -> Result<SparseModel> {
        Self::load_as(path, true)
    }

    fn load_as(path: &Path, dense: bool) -> Result<SparseModel> {
        let (layers, meta) = sparse_formats::io::load_with_metadata(path)?;
        let desc = ModelDescription::from_metadata(path, &meta)?;
        Self::from_layers(desc, layers, dense).map_err(|e| match e {
            TrainError::Config { field, reason } => file_err(path, format!("{field}: {reason}")),
            other => other,
        })
    }

    /// Builds the model from a description and the named layers of a model file; `dense`
    /// runs every layer densely (otherwise layers stored sparse with density at most
    /// [`crate::engine::MAX_SPARSE_DENSITY`] run on the sparse kernels).
    pub fn from_layers(
        desc: ModelDescription,
        layers: Vec<(String, SparseLayer)>,
        dense: bool,
    ) -> Result<SparseModel> {
        // Every variable the description asks for must come from the file. A description that
        // needs far more numbers than the file holds is refused before the network is allocated
        // (a mutated description could otherwise ask for gigabytes); smaller mismatches are left
        // to the checks below, which name the missing or mis-shaped tensor.
        let wanted = desc.model.variable_count(desc.image, desc.classes);
        let held: u128 = layers.iter().map(|(_, l)| dense_numbers(l)).sum();
        if wanted > 2 * held + (1 << 20) {
            return Err(TrainError::Config {
                field: "model",
                reason: format!(
                    "the description (`{}`, image {:?}, {} classes) needs {wanted} numbers, \
                     the file holds {held}",
                    model_name(&desc.model),
                    desc.image,
                    desc.classes
                ),
            });
        }
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let (net, built) = Network::build(
            &desc.model,
            desc.image,
            desc.classes,
            vb,
            LayerKind::Engine,
            0,
        )
        .map_err(|e| TrainError::Config {
            field: "model",
            reason: e.to_string(),
        })?;
        let mut file: HashMap<String, SparseLayer> = layers.into_iter().collect();
        // Biases carried by condensed layers become tensors of their own.
        let carried: Vec<(String, Vec<f32>)> = file
            .iter()
            .filter_map(|(name, l)| match l {
                SparseLayer::Condensed(c) => c.bias().map(|b| {
                    let base = name.strip_suffix(".weight").unwrap_or(name);
                    (format!("{base}.bias"), b.to_vec())
                }),
                _ => None,
            })
            .collect();
        for (name, b) in carried {
            let t = SparseLayer::Dense(DenseTensor {
                shape: vec![b.len()],
                values: b,
            });
            if file.insert(name.clone(), t).is_some() {
                return Err(TrainError::Config {
                    field: "layers",
                    reason: format!(
                        "`{name}` is stored twice (as a tensor and in a condensed layer)"
                    ),
                });
            }
        }
        let mut masks: HashMap<String, Mask> = HashMap::new();
        let mut structures: HashMap<String, (SparseStructure, Vec<f32>, &'static str)> =
            HashMap::new();
        for (name, var) in crate::checkpoint::named_vars(&varmap) {
            let layer = file.remove(&name).ok_or_else(|| TrainError::Config {
                field: "layers",
                reason: format!("`{name}` of model `{}` is missing", model_name(&desc.model)),
            })?;
            let shape = var.as_tensor().dims().to_vec();
            let n: usize = shape.iter().product();
            let wrong = |found: String| TrainError::Config {
                field: "layers",
                reason: format!("`{name}` has {found}, the model needs shape {shape:?}"),
            };
            let values = match &layer {
                SparseLayer::Dense(t) => {
                    if t.values.len() != n {
                        return Err(wrong(format!("shape {:?}", t.shape)));
                    }
                    t.values.clone()
                }
                SparseLayer::Mask(_) => {
                    return Err(wrong("a mask and no values".into()));
                }
                sparse => {
                    // The three formats answer the same questions under different types.
                    macro_rules! parts {
                        ($l:expr) => {
                            (
                                $l.rows(),
                                $l.fan_in(),
                                $l.to_dense(),
                                $l.to_mask(),
                                SparseStructure::from($l.clone()),
                                $l.values().to_vec(),
                            )
                        };
                    }
                    let (rows, fan_in, dense_values, mask, structure, vals) = match sparse {
                        SparseLayer::Condensed(c) => parts!(c),
                        SparseLayer::Csr(c) => parts!(c),
                        SparseLayer::Nm(m) => parts!(m),
                        SparseLayer::Dense(_) | SparseLayer::Mask(_) => unreachable!("above"),
                    };
                    if rows * fan_in != n || shape.first() != Some(&rows) {
                        return Err(wrong(format!(
                            "[{rows}, {fan_in}] in {}",
                            sparse.format_name()
                        )));
                    }
                    structures.insert(name.clone(), (structure, vals, sparse.format_name()));
                    masks.insert(name.clone(), mask);
                    dense_values
                }
            };
            var.set(&Tensor::from_vec(values, shape.as_slice(), &dev)?)?;
        }
        if let Some(stray) = file.keys().min() {
            return Err(TrainError::Config {
                field: "layers",
                reason: format!(
                    "`{stray}` is not a variable of model `{}`",
                    model_name(&desc.model)
                ),
            });
        }
        // Masks of the weight layers (their weights are already zero outside them).
        for p in &built.sparse {
            if let Some(mask) = masks.remove(p.name()) {
                let w = p.weights()?;
                p.set(mask, w)?;
            }
        }
        let mut sparse = Vec::new();
        let mut plan = Vec::new();
        let mut small_batch = Vec::new();
        for e in &built.engine {
            let name = e.param().name().to_string();
            let var = e.param().var().as_tensor();
            let (rows, fan_in) = (e.param().rows(), e.param().fan_in());
            let bias = match e.bias() {
                Some(b) => Some(b.as_tensor().to_vec1::<f32>()?),
                None => None,
            };
            let layer = match structures.remove(&name) {
                Some((structure, values, format))
                    if !dense && {
                        let w = structure.weight();
                        stored_sparse(w.nnz(), w.rows() * w.fan_in())
                    } =>
                {
                    e.install(structure.clone(), values.clone())?;
                    sparse.push((name.clone(), format));
                    let small = if matches!(desc.model, ModelConfig::Mlp { .. }) {
                        let w = var.flatten_all()?.to_vec1::<f32>()?;
                        SmallBatch::choose(&structure, rows, fan_in, &w)
                    } else {
                        None
                    };
                    if let Some(l) = &small {
                        small_batch.push((name, l.name()));
                    }
                    PlanLayer::Sparse {
                        structure,
                        values,
                        small,
                    }
                }
                _ => PlanLayer::Dense {
                    weight: var.flatten_all()?.to_vec1::<f32>()?,
                },
            };
            plan.push((layer, rows, fan_in, bias));
        }
        let plan =
            matches!(desc.model, ModelConfig::Mlp { .. }).then_some(MlpPlan { layers: plan });
        Ok(SparseModel {
            desc,
            net,
            plan,
            dev,
            sparse,
            small_batch,
        })
    }

    /// The model's description.
    pub fn description(&self) -> &ModelDescription {
        &self.desc
    }

    /// The layers that run on the sparse kernels (weight name, format), in build order.
    pub fn sparse_layers(&self) -> &[(String, &'static str)] {
        &self.sparse
    }

    /// The sparse layers of an MLP that run batches below 8 on a layout faster there than the
    /// format's own product (weight name, layout): `"packed N:M"` (`sparse_kernels::PackedNm`)
    /// for N:M layers whose M divides 16, `"row blocks"` (`sparse_kernels::RowBlocks`) for
    /// other layers dense enough that their stored weights cluster. The others run the
    /// format's own kernels at every batch.
    pub fn small_batch_layers(&self) -> &[(String, &'static str)] {
        &self.small_batch
    }

    fn check_set(&self, set: &ImageSet) -> Result<()> {
        let [c, h, w] = self.desc.image;
        if (set.channels, set.rows, set.cols) != (c, h, w) {
            return Err(TrainError::Config {
                field: "data",
                reason: format!(
                    "images are {}×{}×{}, the model takes {c}×{h}×{w}",
                    set.channels, set.rows, set.cols
                ),
            });
        }
        if let Some(&bad) = set
            .labels
            .iter()
            .find(|&&l| l as usize >= self.desc.classes)
        {
            return Err(TrainError::Config {
                field: "data",
                reason: format!(
                    "label {bad} outside the model's {} classes",
                    self.desc.classes
                ),
            });
        }
        Ok(())
    }

    /// Mean cross-entropy and accuracy on `set`.
    pub fn evaluate(&self, set: &ImageSet) -> Result<(f32, f32)> {
        self.check_set(set)?;
        evaluate_with(
            |x| self.forward(x),
            set,
            &self.desc.normalization,
            &self.dev,
        )
    }

    /// Logits `[batch, classes]` of normalised images `x` `[batch, channels, rows, cols]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.plan {
            Some(plan) => {
                let batch = x.dim(0)?;
                // The input read in place (a contiguous f32 tensor; else one converted copy).
                let logits = sparse_kernels::storage::with_f32(x, |x| plan.run(x, batch))??;
                Ok(Tensor::from_vec(
                    logits,
                    (batch, self.desc.classes),
                    &self.dev,
                )?)
            }
            None => Ok(self.net.forward_t(x, false)?),
        }
    }

    /// Logits of the network's own forward pass (candle ops; what [`SparseModel::forward`]
    /// equals, to rounding, for an MLP).
    pub fn network_forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.net.forward_t(x, false)?)
    }

    /// The model's input `[idx.len(), channels, rows, cols]` for `set`'s images `idx`:
    /// normalised with the description's statistics.
    pub fn inputs(&self, set: &ImageSet, idx: &[usize]) -> Result<Tensor> {
        self.check_set(set)?;
        Ok(normalized_batch(set, idx, &self.desc.normalization, &self.dev)?.0)
    }

    /// Logits `[idx.len(), classes]` of `set`'s images `idx`.
    pub fn logits(&self, set: &ImageSet, idx: &[usize]) -> Result<Tensor> {
        self.forward(&self.inputs(set, idx)?)
    }

    /// The predicted class of every image of `set` (labels are ignored).
    pub fn predict(&self, set: &ImageSet) -> Result<Vec<usize>> {
        let mut out = Vec::with_capacity(set.len());
        let all: Vec<usize> = (0..set.len()).collect();
        for chunk in all.chunks(1000) {
            let classes = self.logits(set, chunk)?.argmax(candle_core::D::Minus1)?;
            out.extend(classes.to_vec1::<u32>()?.into_iter().map(|c| c as usize));
        }
        Ok(out)
    }
}

/// How many numbers a file's layer stands for in the network: its dense size (a condensed
/// layer's carried bias included).
fn dense_numbers(l: &SparseLayer) -> u128 {
    let area = |r: usize, f: usize| r as u128 * f as u128;
    match l {
        SparseLayer::Dense(t) => t.values.len() as u128,
        SparseLayer::Mask(m) => area(m.rows(), m.fan_in()),
        SparseLayer::Condensed(c) => {
            area(c.rows(), c.fan_in()) + c.bias().map_or(0, |b| b.len() as u128)
        }
        SparseLayer::Nm(n) => area(n.rows(), n.fan_in()),
        SparseLayer::Csr(c) => area(c.rows(), c.fan_in()),
    }
}

fn model_name(m: &ModelConfig) -> &'static str {
    match m {
        ModelConfig::Mlp { .. } => "mlp",
        ModelConfig::Lenet5 => "lenet5",
        ModelConfig::Resnet18 { .. } => "resnet18",
        ModelConfig::Vit { .. } => "vit",
    }
}
