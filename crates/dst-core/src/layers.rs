//! Sparse layers for candle models: [`SparseLinear`] and [`SparseConv2d`], built from a
//! `VarBuilder` like `candle_nn::linear` / `conv2d`, each holding a [`SparseParam`].
//!
//! The weight is stored **already masked** (zeros at inactive positions) and used directly in
//! the forward pass, so the gradient candle returns for it is the dense gradient RigL needs
//! (docs/algorithms.md §4.1); the mask-aware optimizer keeps inactive entries at zero.

use std::sync::{Arc, RwLock};

use candle_core::{DType, Module, Tensor, Var};
use candle_nn::{Conv2dConfig, Init, VarBuilder};
use sparse_formats::{Condensed, Mask};

use crate::error::{DstError, Result};
use crate::rng::Rng;
use crate::update::apply_update;
use sparse_kernels::storage::write_in_place;

/// A sparsifiable weight: the candle `Var` and its mask, shared (cheap clones) between the layer
/// that uses the weight and the [`crate::Sparsifier`] that changes the mask.
#[derive(Clone)]
pub struct SparseParam {
    name: String,
    var: Var,
    mask: Arc<RwLock<Mask>>,
}

impl std::fmt::Debug for SparseParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SparseParam({}, {:?})", self.name, self.var.shape())
    }
}

/// FNV-1a, to derive a per-layer RNG stream from its name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl SparseParam {
    /// Wraps a weight variable of rank ≥ 2 (dense mask).
    pub fn new(name: impl Into<String>, var: Var) -> Result<Self> {
        let name = name.into();
        let dims = var.dims();
        if dims.len() < 2 {
            return Err(DstError::layer(
                &name,
                format!("weight of shape {dims:?} has no fan-in"),
            ));
        }
        let (rows, fan_in) = (dims[0], dims[1..].iter().product());
        Ok(SparseParam {
            name,
            var,
            mask: Arc::new(RwLock::new(Mask::ones(rows, fan_in))),
        })
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weight variable.
    pub fn var(&self) -> &Var {
        &self.var
    }

    /// The weight's shape (PyTorch layout).
    pub fn shape(&self) -> Vec<usize> {
        self.var.dims().to_vec()
    }

    /// Rows of the `[rows, fan_in]` view.
    pub fn rows(&self) -> usize {
        self.var.dims()[0]
    }

    /// Fan-in of the `[rows, fan_in]` view.
    pub fn fan_in(&self) -> usize {
        self.var.dims()[1..].iter().product()
    }

    /// A copy of the current mask.
    pub fn mask(&self) -> Mask {
        self.mask.read().expect("mask lock poisoned").clone()
    }

    /// The flat positions (`row · fan_in + column`) of the current mask's active entries,
    /// ascending ([`Mask::positions`] without copying the mask).
    pub fn positions(&self) -> Vec<usize> {
        self.mask.read().expect("mask lock poisoned").positions()
    }

    /// The weights as a row-major `[rows, fan_in]` vector.
    pub fn weights(&self) -> Result<Vec<f32>> {
        Ok(self
            .var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    }

    /// Replaces mask and weights together; weights outside the mask are zeroed.
    pub fn set(&self, mask: Mask, mut weights: Vec<f32>) -> Result<()> {
        self.check_mask(&mask)?;
        mask.apply(&mut weights)?;
        let t = Tensor::from_vec(weights, self.var.shape(), self.var.device())?
            .to_dtype(self.var.dtype())?;
        self.var.set(&t)?;
        *self.mask.write().expect("mask lock poisoned") = mask;
        Ok(())
    }

    fn check_mask(&self, mask: &Mask) -> Result<()> {
        if (mask.rows(), mask.fan_in()) != (self.rows(), self.fan_in()) {
            return Err(DstError::layer(
                &self.name,
                format!(
                    "mask [{}, {}] does not fit the weight {:?}",
                    mask.rows(),
                    mask.fan_in(),
                    self.shape()
                ),
            ));
        }
        Ok(())
    }

    /// `f` on the current mask, borrowed (a mask update reads it without a copy: a 3072×3072
    /// mask is 9.4 MB). Holds the mask's read lock while `f` runs: `f` must not change it.
    pub(crate) fn with_mask<R>(&self, f: impl FnOnce(&Mask) -> R) -> R {
        f(&self.mask.read().expect("mask lock poisoned"))
    }

    /// Replaces the current mask by `new` and applies the change to the weights where they are
    /// stored ([`apply_update`]: entries outside `new` and grown ones become 0), without copying
    /// them where the variable allows it (contiguous `f32` on the CPU).
    pub(crate) fn change_mask(&self, new: Mask) -> Result<()> {
        self.check_mask(&new)?;
        let mut mask = self.mask.write().expect("mask lock poisoned");
        let old = &*mask;
        let written = write_in_place(self.var.as_tensor(), |w| apply_update(w, old, &new))?;
        if !written {
            let mut w = self.weights()?;
            apply_update(&mut w, old, &new);
            let t = Tensor::from_vec(w, self.var.shape(), self.var.device())?
                .to_dtype(self.var.dtype())?;
            self.var.set(&t)?;
        }
        *mask = new;
        Ok(())
    }

    /// Replaces the mask by `new` and leaves the dense weight as it is: for a weight whose
    /// optimizer holds the trained values elsewhere and refreshes the dense weight from them
    /// before anyone reads it (a sparse-storage engine, [`MaskAware::active_weights`]).
    ///
    /// [`MaskAware::active_weights`]: crate::MaskAware::active_weights
    pub(crate) fn replace_mask(&self, new: Mask) -> Result<()> {
        self.check_mask(&new)?;
        *self.mask.write().expect("mask lock poisoned") = new;
        Ok(())
    }

    /// The mask as a 0/1 tensor of the weight's shape and dtype.
    pub fn mask_tensor(&self) -> Result<Tensor> {
        Ok(self
            .mask()
            .to_tensor_dtype(self.var.dtype(), self.var.device())?
            .reshape(self.var.shape())?)
    }

    /// The trained layer in the constant fan-in layout (fails if the rows' fan-ins differ).
    /// Ablated rows are dropped; their bias stays (see `Condensed`).
    pub fn to_condensed(&self, bias: Option<&Tensor>) -> Result<Condensed> {
        let b = match bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Condensed::from_dense(
            self.rows(),
            self.fan_in(),
            &self.weights()?,
            &self.mask(),
            b.as_deref(),
        )?)
    }
}

/// Creates the weight through the `VarBuilder` (with a `VarMap` builder the variable is the
/// map's own) and fills it from the project's seeded RNG with PyTorch's default
/// `U(−1/√fan_in, 1/√fan_in)`: candle's CPU RNG cannot be seeded.
///
/// Returns the variable and its full name (`prefix.name`), which also seeds its RNG stream.
/// Shared by every layer of the workspace that needs a reproducible weight (dst-core's and
/// lbc's).
pub fn seeded_weight(
    vb: &VarBuilder,
    shape: &[usize],
    name: &str,
    seed: u64,
) -> Result<(Var, String)> {
    let t = vb.get_with_hints(shape, name, Init::Const(0.0))?;
    let full = if vb.prefix().is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", vb.prefix())
    };
    let var = Var::from_tensor(&t)?;
    let fan_in: usize = shape[1..].iter().product();
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut rng = Rng::derive(seed, &[name_hash(&full)]);
    let n: usize = shape.iter().product();
    let vals: Vec<f32> = (0..n)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
        .collect();
    var.set(&Tensor::from_vec(vals, shape, vb.device())?.to_dtype(vb.dtype())?)?;
    Ok((var, full))
}

/// A bias of `n` entries drawn from `U(−1/√fan_in, 1/√fan_in)`, on its own stream derived
/// from the weight's full name and `seed` (same rule as [`seeded_weight`]).
pub fn seeded_bias(
    vb: &VarBuilder,
    n: usize,
    fan_in: usize,
    full_weight: &str,
    seed: u64,
) -> Result<Var> {
    let t = vb.get_with_hints(n, "bias", Init::Const(0.0))?;
    let var = Var::from_tensor(&t)?;
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut rng = Rng::derive(seed, &[name_hash(full_weight), 1]);
    let vals: Vec<f32> = (0..n)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
        .collect();
    var.set(&Tensor::from_vec(vals, n, vb.device())?.to_dtype(vb.dtype())?)?;
    Ok(var)
}

/// A linear layer `y = x · Wᵀ + b` whose weight is a [`SparseParam`].
#[derive(Clone, Debug)]
pub struct SparseLinear {
    weight: SparseParam,
    bias: Option<Var>,
}

/// `SparseLinear` with a bias, like `candle_nn::linear(in, out, vb)`; weights seeded by `seed`.
pub fn sparse_linear(
    in_dim: usize,
    out_dim: usize,
    seed: u64,
    vb: VarBuilder,
) -> Result<SparseLinear> {
    let (w, full) = seeded_weight(&vb, &[out_dim, in_dim], "weight", seed)?;
    let bias = seeded_bias(&vb, out_dim, in_dim, &full, seed)?;
    Ok(SparseLinear {
        weight: SparseParam::new(full, w)?,
        bias: Some(bias),
    })
}

/// `SparseLinear` without a bias.
pub fn sparse_linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    seed: u64,
    vb: VarBuilder,
) -> Result<SparseLinear> {
    let (w, full) = seeded_weight(&vb, &[out_dim, in_dim], "weight", seed)?;
    Ok(SparseLinear {
        weight: SparseParam::new(full, w)?,
        bias: None,
    })
}

impl SparseLinear {
    /// The sparsifiable weight (hand a clone to the [`crate::Sparsifier`]).
    pub fn weight(&self) -> &SparseParam {
        &self.weight
    }

    /// The bias variable.
    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }

    /// The trained layer as a [`Condensed`] layout with its bias.
    pub fn to_condensed(&self) -> Result<Condensed> {
        self.weight
            .to_condensed(self.bias.as_ref().map(|b| b.as_tensor()))
    }
}

impl Module for SparseLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        sparse_kernels::dense::linear(
            x,
            self.weight.var.as_tensor(),
            self.bias.as_ref().map(Var::as_tensor),
        )
    }
}

/// A 2-D convolution whose weight `[out, in/groups, kh, kw]` is a [`SparseParam`] viewed as
/// `[out, in/groups·kh·kw]`.
#[derive(Clone, Debug)]
pub struct SparseConv2d {
    weight: SparseParam,
    bias: Option<Var>,
    cfg: Conv2dConfig,
}

/// `SparseConv2d` with a bias, like `candle_nn::conv2d(in, out, k, cfg, vb)`.
pub fn sparse_conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    seed: u64,
    vb: VarBuilder,
) -> Result<SparseConv2d> {
    conv(in_channels, out_channels, kernel, cfg, seed, vb, true)
}

/// `SparseConv2d` without a bias (the usual choice before a BatchNorm).
pub fn sparse_conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    seed: u64,
    vb: VarBuilder,
) -> Result<SparseConv2d> {
    conv(in_channels, out_channels, kernel, cfg, seed, vb, false)
}

fn conv(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    seed: u64,
    vb: VarBuilder,
    with_bias: bool,
) -> Result<SparseConv2d> {
    let c = in_channels / cfg.groups.max(1);
    let (w, full) = seeded_weight(&vb, &[out_channels, c, kernel, kernel], "weight", seed)?;
    let bias = if with_bias {
        Some(seeded_bias(
            &vb,
            out_channels,
            c * kernel * kernel,
            &full,
            seed,
        )?)
    } else {
        None
    };
    Ok(SparseConv2d {
        weight: SparseParam::new(full, w)?,
        bias,
        cfg,
    })
}

impl SparseConv2d {
    /// The sparsifiable weight.
    pub fn weight(&self) -> &SparseParam {
        &self.weight
    }

    /// The bias variable.
    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }
}

impl Module for SparseConv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        sparse_kernels::conv::conv2d(
            x,
            self.weight.var.as_tensor(),
            self.bias.as_ref().map(Var::as_tensor),
            conv_spec(&self.cfg),
        )
    }
}

/// candle's conv settings as those of the GEMM convolution (`sparse_kernels::conv::conv2d`)
/// that the conv layers of this crate and of lbc run.
pub fn conv_spec(c: &Conv2dConfig) -> sparse_kernels::conv::ConvSpec {
    sparse_kernels::conv::ConvSpec {
        padding: c.padding,
        stride: c.stride,
        dilation: c.dilation,
        groups: c.groups,
    }
}

/// Folds the constant outputs of ablated neurons into the next linear layer, so they can be
/// dropped at inference (docs/algorithms.md §6.4: an ablated neuron outputs `act(bias)`, not 0).
///
/// `layer` is the trained layer whose rows `layer.rows()` feed the next layer's inputs;
/// `activation` is applied to each ablated row's bias; `next_weights` is the next layer's dense
/// `[next_rows, layer.rows()]` weight and `next_bias` its bias, updated in place:
/// `next_bias[j] += Σ_{i ablated} next_weights[j, i] · act(bias_i)` and column `i` is zeroed.
/// Returns the ablated rows.
pub fn fold_ablated_into_next(
    layer: &Condensed,
    activation: impl Fn(f32) -> f32,
    next_weights: &mut [f32],
    next_bias: &mut [f32],
) -> Result<Vec<usize>> {
    let n = layer.rows();
    if n == 0 || !next_weights.len().is_multiple_of(n) || next_weights.len() / n != next_bias.len()
    {
        return Err(DstError::Config {
            field: "next_weights",
            reason: format!(
                "{} weights and {} biases do not form a [next_rows, {n}] layer",
                next_weights.len(),
                next_bias.len()
            ),
        });
    }
    let active = layer.active_rows();
    let ablated: Vec<usize> = (0..n)
        .filter(|r| active.binary_search(&(*r as u32)).is_err())
        .collect();
    for &i in &ablated {
        let c = activation(layer.bias().map_or(0.0, |b| b[i]));
        for (j, nb) in next_bias.iter_mut().enumerate() {
            *nb += next_weights[j * n + i] * c;
            next_weights[j * n + i] = 0.0;
        }
    }
    Ok(ablated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn seeded_layers_are_reproducible_and_registered() {
        let build = || {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let l = sparse_linear(6, 4, 9, vb.pp("fc1")).unwrap();
            (vm, l)
        };
        let (vm, a) = build();
        let (_, b) = build();
        assert_eq!(a.weight().weights().unwrap(), b.weight().weights().unwrap());
        assert_eq!(a.weight().name(), "fc1.weight");
        // The VarMap holds the same storage as the layer.
        let data = vm.data().lock().unwrap();
        let w = data.get("fc1.weight").unwrap();
        assert_eq!(
            w.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            a.weight().weights().unwrap()
        );
        assert!(a
            .weight()
            .weights()
            .unwrap()
            .iter()
            .all(|v| v.abs() <= 1.0 / 6f32.sqrt()));
    }

    #[test]
    fn masked_forward_and_condensed_export_agree() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let l = sparse_linear(4, 3, 1, vb).unwrap();
        let mask = Mask::parse("#.#.\n....\n.##.").unwrap();
        l.weight()
            .set(mask.clone(), l.weight().weights().unwrap())
            .unwrap();
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
        let y = l.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let c = l.to_condensed().unwrap();
        assert_eq!(c.active_rows(), &[0, 2]);
        let y2 = sparse_kernels::forward(
            &c,
            c.values(),
            c.bias(),
            &[1.0, 2.0, 3.0, 4.0],
            1,
            Default::default(),
        )
        .unwrap();
        for (a, b) in y[0].iter().zip(&y2) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn folding_ablated_rows_preserves_the_two_layer_function() {
        // Layer 1: 3 rows, row 1 ablated with bias 0.5; layer 2: 2 × 3.
        let mask = Mask::parse("#.\n..\n.#").unwrap();
        let w1 = [1.0, 0.0, 0.0, 0.0, 0.0, -2.0];
        let l1 = Condensed::from_dense(3, 2, &w1, &mask, Some(&[0.1, 0.5, -0.3])).unwrap();
        let mut w2 = vec![1.0, 2.0, 3.0, -1.0, 4.0, 0.5];
        let mut b2 = vec![0.0, 1.0];
        let relu = |v: f32| v.max(0.0);
        let two_layer = |w2: &[f32], b2: &[f32], x: [f32; 2]| -> Vec<f32> {
            let h: Vec<f32> = (0..3)
                .map(|r| {
                    relu(l1.bias().unwrap()[r] + (0..2).map(|c| w1[r * 2 + c] * x[c]).sum::<f32>())
                })
                .collect();
            (0..2)
                .map(|j| b2[j] + (0..3).map(|i| w2[j * 3 + i] * h[i]).sum::<f32>())
                .collect()
        };
        let before = two_layer(&w2, &b2, [0.7, -0.4]);
        let ablated = fold_ablated_into_next(&l1, relu, &mut w2, &mut b2).unwrap();
        assert_eq!(ablated, vec![1]);
        assert_eq!((w2[1], w2[4]), (0.0, 0.0));
        let after = two_layer(&w2, &b2, [0.7, -0.4]);
        for (a, b) in before.iter().zip(&after) {
            assert!((a - b).abs() < 1e-6, "{before:?} vs {after:?}");
        }
        assert!(fold_ablated_into_next(&l1, relu, &mut [0.0; 5], &mut [0.0; 2]).is_err());
    }

    #[test]
    fn conv_view_and_forward_shape() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let c = sparse_conv2d(
            3,
            8,
            3,
            Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
            2,
            vb.pp("c1"),
        )
        .unwrap();
        assert_eq!((c.weight().rows(), c.weight().fan_in()), (8, 27));
        let x = Tensor::zeros((2, 3, 5, 5), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(c.forward(&x).unwrap().dims(), &[2, 8, 5, 5]);
    }
}
