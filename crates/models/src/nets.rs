//! Architectures: MLPs (LeNet-300-100, 784-1000-1000-1000-10), a LeNet-5-style CNN, a CIFAR
//! ResNet-18 and a small ViT.
//!
//! Every linear and conv layer is built by a [`LayerFactory`]: a dst-core sparse layer
//! ([`SparseLinear`] / [`SparseConv2d`], masks managed by a `Sparsifier`) or an lbc N:M layer
//! ([`NmLayer`], managed by an `NmSparsifier`), chosen by the training method. Which layers are
//! sparsified is decided later by the sparsifier (ERK, `dense_layers`); the factory only records
//! every weight in build order, so the last one is the output layer (protected from ablation by
//! default). Initialisation is seeded: same seed, same network.
//!
//! ResNet-18 and the ViT are GPU-sized; on CPU they are built small in tests (`width`, `dim`).

use candle_core::{Module, Tensor, Var, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use dst_core::layers::{
    sparse_conv2d, sparse_conv2d_no_bias, sparse_linear, sparse_linear_no_bias, SparseConv2d,
    SparseLinear, SparseParam,
};
use dst_core::Rng;
use lbc::training::{nm_conv2d, nm_conv2d_no_bias, nm_linear, nm_linear_no_bias, NmLayer};
use serde::{Deserialize, Serialize};
use sparse_kernels::act::relu;

use crate::engine::EngineLayer;

/// Which architecture (serde: `kind = "mlp"`, `hidden = [300, 100]`, ...). Every field is
/// optional (defaults: LeNet-300-100's widths, ResNet-18 width 64, [`ModelConfig::vit_small`]);
/// unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ModelConfig {
    /// A ReLU MLP; input and output sizes come from the data set.
    Mlp {
        /// Hidden widths (LeNet-300-100: `[300, 100]`).
        #[serde(default = "defaults::hidden")]
        hidden: Vec<usize>,
    },
    /// LeNet-5: conv 5×5 (6) → pool → conv 5×5 (16) → pool → 120 → 84 → classes.
    Lenet5,
    /// The CIFAR ResNet-18 (3×3 stem, four stages of two basic blocks, BatchNorm).
    Resnet18 {
        /// Channels of the first stage (64 in the paper).
        #[serde(default = "defaults::width")]
        width: usize,
    },
    /// A small Vision Transformer (patch embedding, pre-norm blocks, mean pooling).
    Vit {
        /// Patch side in pixels (must divide the image side).
        #[serde(default = "defaults::patch")]
        patch: usize,
        /// Embedding width.
        #[serde(default = "defaults::dim")]
        dim: usize,
        /// Transformer blocks.
        #[serde(default = "defaults::depth")]
        depth: usize,
        /// Attention heads (must divide `dim`).
        #[serde(default = "defaults::heads")]
        heads: usize,
        /// Hidden width of each block's MLP.
        #[serde(default = "defaults::mlp_dim")]
        mlp_dim: usize,
    },
}

/// The field defaults of [`ModelConfig`], taken from its presets.
mod defaults {
    use super::ModelConfig;

    pub fn hidden() -> Vec<usize> {
        match ModelConfig::lenet_300_100() {
            ModelConfig::Mlp { hidden } => hidden,
            _ => unreachable!("an MLP preset"),
        }
    }
    pub fn width() -> usize {
        match ModelConfig::resnet18() {
            ModelConfig::Resnet18 { width } => width,
            _ => unreachable!("a ResNet preset"),
        }
    }
    fn vit() -> [usize; 5] {
        match ModelConfig::vit_small() {
            ModelConfig::Vit {
                patch,
                dim,
                depth,
                heads,
                mlp_dim,
            } => [patch, dim, depth, heads, mlp_dim],
            _ => unreachable!("a ViT preset"),
        }
    }
    pub fn patch() -> usize {
        vit()[0]
    }
    pub fn dim() -> usize {
        vit()[1]
    }
    pub fn depth() -> usize {
        vit()[2]
    }
    pub fn heads() -> usize {
        vit()[3]
    }
    pub fn mlp_dim() -> usize {
        vit()[4]
    }
}

impl ModelConfig {
    /// LeNet-300-100.
    pub fn lenet_300_100() -> Self {
        ModelConfig::Mlp {
            hidden: vec![300, 100],
        }
    }

    /// The 784-1000-1000-1000-10 MLP of the SRigL paper.
    pub fn mlp_1000x3() -> Self {
        ModelConfig::Mlp {
            hidden: vec![1000, 1000, 1000],
        }
    }

    /// How many numbers the network's variables hold (weights, biases, BatchNorm parameters and
    /// running statistics, position embeddings) for `image` = `[channels, rows, cols]` and
    /// `classes`, computed from the description without building anything — what a model file
    /// must carry, so a loader can refuse a description that asks for more than its file holds
    /// before allocating (a test checks it against [`Network::build`] for every architecture).
    /// Saturates instead of overflowing.
    pub fn variable_count(&self, image: [usize; 3], classes: usize) -> u128 {
        let [c, h, w] = image.map(|v| v as u128);
        let classes = classes as u128;
        let linear = |i: u128, o: u128| i * o + o;
        let conv = |i: u128, o: u128, k: u128, bias: bool| o * i * k * k + if bias { o } else { 0 };
        let bn = |ch: u128| 4 * ch;
        match self {
            ModelConfig::Mlp { hidden } => {
                let mut widths = vec![c.saturating_mul(h).saturating_mul(w)];
                widths.extend(hidden.iter().map(|&v| v as u128));
                widths.push(classes);
                widths
                    .windows(2)
                    .fold(0u128, |acc, wd| acc.saturating_add(linear(wd[0], wd[1])))
            }
            ModelConfig::Lenet5 => {
                conv(c, 6, 5, true)
                    + conv(6, 16, 5, true)
                    + linear(16 * 5 * 5, 120)
                    + linear(120, 84)
                    + linear(84, classes)
            }
            ModelConfig::Resnet18 { width } => {
                let width = *width as u128;
                let mut n = conv(c, width, 3, false) + bn(width);
                let mut in_c = width;
                for (stage, mult) in [1u128, 2, 4, 8].into_iter().enumerate() {
                    let out_c = width * mult;
                    for b in 0..2 {
                        let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                        n += conv(in_c, out_c, 3, false) + bn(out_c);
                        n += conv(out_c, out_c, 3, false) + bn(out_c);
                        if stride != 1 || in_c != out_c {
                            n += conv(in_c, out_c, 1, false) + bn(out_c);
                        }
                        in_c = out_c;
                    }
                }
                n + linear(in_c, classes)
            }
            ModelConfig::Vit {
                patch,
                dim,
                depth,
                mlp_dim,
                ..
            } => {
                let (p, dim, mlp) = (*patch as u128, *dim as u128, *mlp_dim as u128);
                let tokens = h
                    .checked_div(p)
                    .zip(w.checked_div(p))
                    .map_or(0, |(a, b)| a * b);
                let block = 2 * dim
                    + linear(dim, 3 * dim)
                    + linear(dim, dim)
                    + 2 * dim
                    + linear(dim, mlp)
                    + linear(mlp, dim);
                linear(c * p * p, dim)
                    .saturating_add(tokens.saturating_mul(dim))
                    .saturating_add((*depth as u128).saturating_mul(block))
                    .saturating_add(2 * dim + linear(dim, classes))
            }
        }
    }

    /// ResNet-18 at the paper's width (64).
    pub fn resnet18() -> Self {
        ModelConfig::Resnet18 { width: 64 }
    }

    /// A ViT for 32×32 images: patch 4, width 192, 6 blocks of 3 heads, MLP 768.
    pub fn vit_small() -> Self {
        ModelConfig::Vit {
            patch: 4,
            dim: 192,
            depth: 6,
            heads: 3,
            mlp_dim: 768,
        }
    }

    /// The preset named on command lines: `lenet-300-100`, `mlp-1000x3`, `lenet5`, `resnet18`,
    /// `vit-small`.
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "lenet-300-100" => Self::lenet_300_100(),
            "mlp-1000x3" | "mlp-784-1000-1000-1000-10" => Self::mlp_1000x3(),
            "lenet5" | "lenet-5" => ModelConfig::Lenet5,
            "resnet18" | "resnet-18" => Self::resnet18(),
            "vit-small" | "vit" => Self::vit_small(),
            _ => return None,
        })
    }

    /// The names [`ModelConfig::preset`] accepts.
    pub const PRESETS: [&'static str; 5] = [
        "lenet-300-100",
        "mlp-1000x3",
        "lenet5",
        "resnet18",
        "vit-small",
    ];
}

/// What kind of layers a [`LayerFactory`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// dst-core layers (dense, or masks from a `Sparsifier`).
    Dst,
    /// lbc N:M layers (masks from an `NmSparsifier`).
    Nm,
    /// dst-core layers whose linear and conv weights can be trained in sparse storage
    /// ([`crate::engine::EngineLayer`]; grouped convs stay ordinary dst-core layers).
    Engine,
}

/// One linear or conv layer of either kind.
#[derive(Clone)]
pub enum Layer {
    /// A dst-core linear layer.
    Linear(SparseLinear),
    /// A dst-core conv layer.
    Conv(SparseConv2d),
    /// An lbc N:M layer (linear or conv), with its sparse-engine twin when the run trains N:M
    /// layers in sparse storage once their masks are final (it takes over from then on).
    Nm(NmLayer, Option<EngineLayer>),
    /// A linear or conv layer of the sparse training engine.
    Engine(EngineLayer),
}

impl Module for Layer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Layer::Linear(l) => l.forward(x),
            Layer::Conv(l) => l.forward(x),
            Layer::Nm(_, Some(e)) if e.values().is_some() => e.forward(x),
            Layer::Nm(l, _) => l.forward(x),
            Layer::Engine(l) => l.forward(x),
        }
    }
}

/// Builds every weight layer of a network and records it, in build order.
pub struct LayerFactory<'a> {
    vb: VarBuilder<'a>,
    kind: LayerKind,
    seed: u64,
    /// dst-core weights built so far.
    pub sparse: Vec<SparseParam>,
    /// N:M layers built so far.
    pub nm: Vec<NmLayer>,
    /// Sparse-engine linear and conv layers built so far (their weights are in `sparse` too).
    pub engine: Vec<EngineLayer>,
    /// Sparse-engine twins of the N:M layers built so far (with [`LayerFactory::nm_engine`]).
    pub nm_engine: Vec<EngineLayer>,
    /// Build those twins.
    with_nm_engine: bool,
    /// Weight names built as dst-core layers even when `kind` is N:M (they stay dense).
    keep_dense: Vec<String>,
}

impl<'a> LayerFactory<'a> {
    /// A factory over `vb` (use a `VarMap` builder so the variables can be trained).
    pub fn new(vb: VarBuilder<'a>, kind: LayerKind, seed: u64) -> Self {
        LayerFactory {
            vb,
            kind,
            seed,
            sparse: Vec::new(),
            nm: Vec::new(),
            engine: Vec::new(),
            nm_engine: Vec::new(),
            with_nm_engine: false,
            keep_dense: Vec::new(),
        }
    }

    /// Gives every N:M layer a sparse-engine twin over the same weight and bias (recorded in
    /// [`LayerFactory::nm_engine`]), which the engine lays out in sparse storage once the N:M
    /// masks are final (`dst_core::Sparsify::masks_final`); grouped convs get none.
    pub fn nm_engine(mut self, on: bool) -> Self {
        self.with_nm_engine = on;
        self
    }

    /// The sparse-engine twin of the N:M layer `l` (see [`LayerFactory::nm_engine`]).
    fn nm_twin(
        &mut self,
        l: &NmLayer,
        conv: Option<Conv2dConfig>,
    ) -> candle_core::Result<Option<EngineLayer>> {
        if !self.with_nm_engine || conv.is_some_and(|c| c.groups != 1) {
            return Ok(None);
        }
        let param =
            SparseParam::new(l.name(), l.weight().clone()).map_err(candle_core::Error::wrap)?;
        let bias = l.bias().cloned();
        let e = match conv {
            None => EngineLayer::new(param, bias),
            Some(c) => EngineLayer::conv(param, bias, dst_core::layers::conv_spec(&c))
                .map_err(candle_core::Error::wrap)?,
        };
        self.nm_engine.push(e.clone());
        Ok(Some(e))
    }

    /// Builds the weights named here (e.g. `conv1.weight`) as dst-core layers even for N:M
    /// methods, so they stay dense (the usual choice for a stem whose fan-in has no N:M
    /// groups, e.g. 3 input channels).
    pub fn keep_dense(mut self, names: &[String]) -> Self {
        self.keep_dense = names.to_vec();
        self
    }

    fn kind_for(&self, path: &str) -> LayerKind {
        if self
            .keep_dense
            .iter()
            .any(|n| n == &format!("{path}.weight"))
        {
            LayerKind::Dst
        } else {
            self.kind
        }
    }

    /// A linear layer at `path` (weight `path.weight`).
    pub fn linear(
        &mut self,
        path: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> candle_core::Result<Layer> {
        let vb = self.vb.pp(path);
        Ok(match (self.kind_for(path), bias) {
            (kind @ (LayerKind::Dst | LayerKind::Engine), b) => {
                let l = if b {
                    sparse_linear(in_dim, out_dim, self.seed, vb)
                } else {
                    sparse_linear_no_bias(in_dim, out_dim, self.seed, vb)
                }
                .map_err(candle_core::Error::wrap)?;
                self.sparse.push(l.weight().clone());
                if kind == LayerKind::Engine {
                    let e = EngineLayer::new(l.weight().clone(), l.bias().cloned());
                    self.engine.push(e.clone());
                    Layer::Engine(e)
                } else {
                    Layer::Linear(l)
                }
            }
            (LayerKind::Nm, b) => {
                let l = if b {
                    nm_linear(in_dim, out_dim, self.seed, vb)?
                } else {
                    nm_linear_no_bias(in_dim, out_dim, self.seed, vb)?
                };
                self.nm.push(l.clone());
                let twin = self.nm_twin(&l, None)?;
                Layer::Nm(l, twin)
            }
        })
    }

    /// A square-kernel conv layer at `path`.
    pub fn conv(
        &mut self,
        path: &str,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        cfg: Conv2dConfig,
        bias: bool,
    ) -> candle_core::Result<Layer> {
        let vb = self.vb.pp(path);
        Ok(match self.kind_for(path) {
            LayerKind::Dst | LayerKind::Engine => {
                let l = if bias {
                    sparse_conv2d(in_c, out_c, kernel, cfg, self.seed, vb)
                } else {
                    sparse_conv2d_no_bias(in_c, out_c, kernel, cfg, self.seed, vb)
                }
                .map_err(candle_core::Error::wrap)?;
                self.sparse.push(l.weight().clone());
                if self.kind_for(path) == LayerKind::Engine && cfg.groups == 1 {
                    let spec = dst_core::layers::conv_spec(&cfg);
                    let e = EngineLayer::conv(l.weight().clone(), l.bias().cloned(), spec)
                        .map_err(candle_core::Error::wrap)?;
                    self.engine.push(e.clone());
                    Layer::Engine(e)
                } else {
                    Layer::Conv(l)
                }
            }
            LayerKind::Nm => {
                let l = if bias {
                    nm_conv2d(in_c, out_c, kernel, cfg, self.seed, vb)?
                } else {
                    nm_conv2d_no_bias(in_c, out_c, kernel, cfg, self.seed, vb)?
                };
                self.nm.push(l.clone());
                let twin = self.nm_twin(&l, Some(cfg))?;
                Layer::Nm(l, twin)
            }
        })
    }

    fn batch_norm(&self, path: &str, c: usize) -> candle_core::Result<BatchNorm> {
        BatchNorm::new(c, self.vb.pp(path))
    }

    fn layer_norm(&self, path: &str, d: usize) -> candle_core::Result<LayerNorm> {
        let vb = self.vb.pp(path);
        Ok(LayerNorm {
            weight: vb.get_with_hints(d, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(d, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    /// A dense parameter drawn from `N(0, std²)` with the seeded RNG.
    fn normal(&self, path: &str, shape: &[usize], std: f64) -> candle_core::Result<Var> {
        let t = self
            .vb
            .get_with_hints(shape, path, candle_nn::Init::Const(0.0))?;
        let var = Var::from_tensor(&t)?;
        let mut rng = Rng::derive(self.seed, &[0x9e75, shape.iter().product::<usize>() as u64]);
        let vals: Vec<f32> = (0..t.elem_count())
            .map(|_| (rng.normal() * std) as f32)
            .collect();
        var.set(&Tensor::from_vec(vals, shape, t.device())?)?;
        Ok(var)
    }
}

/// LayerNorm over the last dimension from plain tensor ops: candle-nn's `LayerNorm` runs a
/// fused kernel without a backward pass on contiguous inputs, which stops every gradient below
/// it.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// BatchNorm over the channels of `[batch, channels, …]`, with the variables, defaults and
/// running-statistics rule of `candle_nn::batch_norm(c, 1e-5, vb)` (momentum 0.1; running
/// variance unbiased), so checkpoints are interchangeable; the training forward is
/// `sparse_kernels::norm::batch_norm_train`, one op with its own backward instead of
/// candle-nn's chain of ten generic ones.
struct BatchNorm {
    running_mean: Var,
    running_var: Var,
    weight: Tensor,
    bias: Tensor,
}

impl BatchNorm {
    const EPS: f64 = 1e-5;
    const MOMENTUM: f64 = 0.1;

    fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        use candle_nn::Init::Const;
        let running_mean = Var::from_tensor(&vb.get_with_hints(c, "running_mean", Const(0.0))?)?;
        let running_var = Var::from_tensor(&vb.get_with_hints(c, "running_var", Const(1.0))?)?;
        Ok(BatchNorm {
            running_mean,
            running_var,
            weight: vb.get_with_hints(c, "weight", Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Const(0.0))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_act(x, train, false)
    }

    /// `relu(self.forward_t(x, train))`; in training one op (`batch_norm_relu_train`: the same
    /// values and gradients without the normalised tensor).
    fn forward_relu_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_act(x, train, true)
    }

    fn forward_act(
        &self,
        x: &Tensor,
        train: bool,
        relu_after: bool,
    ) -> candle_core::Result<Tensor> {
        let m = Self::MOMENTUM;
        if train {
            let norm = if relu_after {
                sparse_kernels::norm::batch_norm_relu_train
            } else {
                sparse_kernels::norm::batch_norm_train
            };
            let (y, st) = norm(x, &self.weight, &self.bias, Self::EPS)?;
            let dev = x.device();
            let mean = Tensor::new(st.mean.as_slice(), dev)?;
            let var = Tensor::new(st.var.as_slice(), dev)?;
            let n = st.count as f64;
            let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
            let rv = ((self.running_var.as_tensor() * (1.0 - m))?
                + (var * (m * n / (n - 1.0).max(1.0)))?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
            Ok(y)
        } else {
            let mut shape = vec![1; x.rank()];
            shape[1] = self.weight.elem_count();
            let inv = (self.running_var.as_detached_tensor() + Self::EPS)?.sqrt()?;
            let scale = self.weight.broadcast_div(&inv)?;
            let shift = (&self.bias - (self.running_mean.as_detached_tensor() * &scale)?)?;
            let y = x
                .broadcast_mul(&scale.reshape(shape.as_slice())?)?
                .broadcast_add(&shift.reshape(shape.as_slice())?)?;
            if relu_after {
                relu(&y)
            } else {
                Ok(y)
            }
        }
    }
}

fn conv_cfg(padding: usize, stride: usize) -> Conv2dConfig {
    Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    }
}

struct BasicBlock {
    conv1: Layer,
    bn1: BatchNorm,
    conv2: Layer,
    bn2: BatchNorm,
    shortcut: Option<(Layer, BatchNorm)>,
}

impl BasicBlock {
    fn new(
        f: &mut LayerFactory,
        path: &str,
        in_c: usize,
        out_c: usize,
        stride: usize,
    ) -> candle_core::Result<Self> {
        let conv1 = f.conv(
            &format!("{path}.conv1"),
            in_c,
            out_c,
            3,
            conv_cfg(1, stride),
            false,
        )?;
        let bn1 = f.batch_norm(&format!("{path}.bn1"), out_c)?;
        let conv2 = f.conv(
            &format!("{path}.conv2"),
            out_c,
            out_c,
            3,
            conv_cfg(1, 1),
            false,
        )?;
        let bn2 = f.batch_norm(&format!("{path}.bn2"), out_c)?;
        let shortcut = if stride != 1 || in_c != out_c {
            Some((
                f.conv(
                    &format!("{path}.shortcut.0"),
                    in_c,
                    out_c,
                    1,
                    conv_cfg(0, stride),
                    false,
                )?,
                f.batch_norm(&format!("{path}.shortcut.1"), out_c)?,
            ))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1,
            bn1,
            conv2,
            bn2,
            shortcut,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let h = self.bn2.forward_t(&self.conv2.forward(&h)?, train)?;
        let s = match &self.shortcut {
            Some((c, bn)) => bn.forward_t(&c.forward(x)?, train)?,
            None => x.clone(),
        };
        // relu(h + s) as one op (same values and gradients).
        sparse_kernels::act::add_relu(&h, &s)
    }
}

/// Linear layers with ReLU between them (not after the last).
fn relu_chain(layers: &[Layer], mut h: Tensor) -> candle_core::Result<Tensor> {
    for (i, l) in layers.iter().enumerate() {
        h = l.forward(&h)?;
        if i + 1 < layers.len() {
            h = relu(&h)?;
        }
    }
    Ok(h)
}

/// A linear layer on `[b, n, d]` tokens, as one `[b·n, d]` matrix product (one GEMM instead of
/// a broadcast batch of them).
fn tokens(l: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    let y = l.forward(&x.reshape((b * n, d))?)?;
    let out = y.dim(1)?;
    y.reshape((b, n, out))
}

struct VitBlock {
    ln1: LayerNorm,
    qkv: Layer,
    proj: Layer,
    ln2: LayerNorm,
    fc1: Layer,
    fc2: Layer,
    heads: usize,
}

impl VitBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = tokens(&self.qkv, &self.ln1.forward(x)?)?
            .reshape((b, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?; // [3, b, heads, n, hd]
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, d))?;
        let x = (x + tokens(&self.proj, &y)?)?;
        let h = tokens(&self.fc1, &self.ln2.forward(&x)?)?.gelu_erf()?;
        &x + tokens(&self.fc2, &h)?
    }
}

enum Body {
    Mlp(Vec<Layer>),
    Lenet5 {
        conv1: Layer,
        conv2: Layer,
        fcs: Vec<Layer>,
    },
    Resnet {
        stem: (Layer, BatchNorm),
        blocks: Vec<BasicBlock>,
        fc: Layer,
    },
    Vit {
        embed: Layer,
        pos: Var,
        blocks: Vec<VitBlock>,
        ln: LayerNorm,
        head: Layer,
        patch: usize,
    },
}

/// A built network: `forward_t` takes images `[batch, channels, rows, cols]` and returns
/// logits `[batch, classes]`.
pub struct Network {
    body: Body,
}

/// The weight layers of a built network (what the sparsifiers manage).
pub struct BuiltLayers {
    /// dst-core weights, in build order (output layer last).
    pub sparse: Vec<SparseParam>,
    /// N:M layers, in build order.
    pub nm: Vec<NmLayer>,
    /// Sparse-engine linear and conv layers, in build order.
    pub engine: Vec<EngineLayer>,
    /// Sparse-engine twins of the N:M layers, in build order (empty unless requested).
    pub nm_engine: Vec<EngineLayer>,
}

/// Why a configuration cannot be built for a data set.
fn shape_error(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl Network {
    /// Builds `cfg` for images `[channels, side, side]` and `classes` classes.
    pub fn build(
        cfg: &ModelConfig,
        image: [usize; 3],
        classes: usize,
        vb: VarBuilder,
        kind: LayerKind,
        seed: u64,
    ) -> candle_core::Result<(Network, BuiltLayers)> {
        Self::build_with(cfg, image, classes, LayerFactory::new(vb, kind, seed))
    }

    /// [`Network::build`] with a configured factory (e.g. [`LayerFactory::keep_dense`]).
    pub fn build_with(
        cfg: &ModelConfig,
        image: [usize; 3],
        classes: usize,
        mut f: LayerFactory,
    ) -> candle_core::Result<(Network, BuiltLayers)> {
        let [c, h, w] = image;
        let body = match cfg {
            ModelConfig::Mlp { hidden } => {
                let mut widths = vec![c * h * w];
                widths.extend(hidden);
                widths.push(classes);
                let layers = widths
                    .windows(2)
                    .enumerate()
                    .map(|(i, wd)| f.linear(&format!("fc{}", i + 1), wd[0], wd[1], true))
                    .collect::<candle_core::Result<_>>()?;
                Body::Mlp(layers)
            }
            ModelConfig::Lenet5 => {
                // 28×28 inputs are padded by 2 (as LeNet-5's 32×32); both end at 16×5×5.
                let pad = if h == 28 { 2 } else { 0 };
                if (h + 2 * pad, w + 2 * pad) != (32, 32) {
                    return Err(shape_error(format!(
                        "model `lenet5` needs 28×28 or 32×32 images, the data set has {h}×{w}"
                    )));
                }
                let conv1 = f.conv("conv1", c, 6, 5, conv_cfg(pad, 1), true)?;
                let conv2 = f.conv("conv2", 6, 16, 5, conv_cfg(0, 1), true)?;
                let fcs = vec![
                    f.linear("fc1", 16 * 5 * 5, 120, true)?,
                    f.linear("fc2", 120, 84, true)?,
                    f.linear("fc3", 84, classes, true)?,
                ];
                Body::Lenet5 { conv1, conv2, fcs }
            }
            ModelConfig::Resnet18 { width } => {
                let width = *width;
                let stem = (
                    f.conv("conv1", c, width, 3, conv_cfg(1, 1), false)?,
                    f.batch_norm("bn1", width)?,
                );
                let mut blocks = Vec::new();
                let mut in_c = width;
                for (stage, mult) in [1, 2, 4, 8].into_iter().enumerate() {
                    let out_c = width * mult;
                    for b in 0..2 {
                        let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                        let path = format!("layer{}.{b}", stage + 1);
                        blocks.push(BasicBlock::new(&mut f, &path, in_c, out_c, stride)?);
                        in_c = out_c;
                    }
                }
                let fc = f.linear("fc", in_c, classes, true)?;
                Body::Resnet { stem, blocks, fc }
            }
            ModelConfig::Vit {
                patch,
                dim,
                depth,
                heads,
                mlp_dim,
            } => {
                let (patch, dim) = (*patch, *dim);
                if patch == 0 || h % patch != 0 || w % patch != 0 {
                    return Err(shape_error(format!(
                        "model `vit`: patch {patch} does not divide the {h}×{w} images"
                    )));
                }
                if *heads == 0 || dim % heads != 0 {
                    return Err(shape_error(format!(
                        "model `vit`: {heads} heads do not divide width {dim}"
                    )));
                }
                let n = (h / patch) * (w / patch);
                let embed = f.linear("embed", c * patch * patch, dim, true)?;
                let pos = f.normal("pos_embed", &[1, n, dim], 0.02)?;
                let blocks = (0..*depth)
                    .map(|i| {
                        let p = format!("blocks.{i}");
                        Ok(VitBlock {
                            ln1: f.layer_norm(&format!("{p}.ln1"), dim)?,
                            qkv: f.linear(&format!("{p}.attn.qkv"), dim, 3 * dim, true)?,
                            proj: f.linear(&format!("{p}.attn.proj"), dim, dim, true)?,
                            ln2: f.layer_norm(&format!("{p}.ln2"), dim)?,
                            fc1: f.linear(&format!("{p}.mlp.fc1"), dim, *mlp_dim, true)?,
                            fc2: f.linear(&format!("{p}.mlp.fc2"), *mlp_dim, dim, true)?,
                            heads: *heads,
                        })
                    })
                    .collect::<candle_core::Result<_>>()?;
                let ln = f.layer_norm("ln", dim)?;
                let head = f.linear("head", dim, classes, true)?;
                Body::Vit {
                    embed,
                    pos,
                    blocks,
                    ln,
                    head,
                    patch,
                }
            }
        };
        Ok((
            Network { body },
            BuiltLayers {
                sparse: f.sparse,
                nm: f.nm,
                engine: f.engine,
                nm_engine: f.nm_engine,
            },
        ))
    }

    /// Logits for images `x` `[batch, channels, rows, cols]`; `train` selects BatchNorm's batch
    /// statistics (and updates its running ones).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match &self.body {
            Body::Mlp(layers) => relu_chain(layers, x.flatten_from(1)?),
            Body::Lenet5 { conv1, conv2, fcs } => {
                // ReLU then 2×2 max pooling, as one op (same values and gradients).
                let relu_pool = sparse_kernels::pool::relu_max_pool2d;
                let h = relu_pool(&conv1.forward(x)?, 2)?;
                let h = relu_pool(&conv2.forward(&h)?, 2)?;
                relu_chain(fcs, h.flatten_from(1)?)
            }
            Body::Resnet { stem, blocks, fc } => {
                let mut h = stem.1.forward_relu_t(&stem.0.forward(x)?, train)?;
                for b in blocks {
                    h = b.forward_t(&h, train)?;
                }
                fc.forward(&h.mean(D::Minus1)?.mean(D::Minus1)?)
            }
            Body::Vit {
                embed,
                pos,
                blocks,
                ln,
                head,
                patch,
            } => {
                let (b, c, hh, ww) = x.dims4()?;
                let p = *patch;
                // [b, c, hh/p, p, ww/p, p] → [b, hh/p, ww/p, c, p, p] → [b, n, c·p·p]
                let patches = x
                    .reshape((b, c, hh / p, p, ww / p, p))?
                    .permute((0, 2, 4, 1, 3, 5))?
                    .contiguous()?
                    .reshape((b, (hh / p) * (ww / p), c * p * p))?;
                let mut h = tokens(embed, &patches)?.broadcast_add(pos.as_tensor())?;
                for blk in blocks {
                    h = blk.forward(&h)?;
                }
                head.forward(&ln.forward(&h)?.mean(1)?)
            }
        }
    }
}
