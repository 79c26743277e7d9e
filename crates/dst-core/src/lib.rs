//! Dynamic sparse training on candle (layer L2): networks that are sparse from the first step
//! to the last.
//!
//! - [`distribution`]: uniform, Erdős–Rényi and ERK sparsity per layer, exact integer budgets;
//! - [`schedule`]: when masks change (ΔT, T_end) and the drop fraction α_t;
//! - [`update`]: Static, SET, RigL and SRigL (constant fan-in + dynamic neuron ablation) as pure,
//!   deterministic functions, with the reference implementations' bugs fixed and documented;
//! - [`layers`]: [`SparseLinear`] and [`SparseConv2d`], candle `Module`s built from a
//!   `VarBuilder` with seeded initialisation;
//! - [`optim`]: mask-aware SGD (momentum, Nesterov, weight decay) and AdamW;
//! - [`Sparsifier`]: owns the masks and calls the method on schedule from your training loop;
//! - [`sparsify`]: the [`Sparsify`] protocol every method implements for a training loop.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use dst_core::{layers::sparse_linear, optim::{MaskAware, MaskedSgd, SgdConfig}};
//! use dst_core::{Method, Sparsifier, SparsifierConfig};
//!
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
//! let fc1 = sparse_linear(20, 32, 0, vb.pp("fc1"))?;
//! let fc2 = sparse_linear(32, 4, 0, vb.pp("fc2"))?;
//! let mut cfg = SparsifierConfig::new(Method::Srigl, 0.8, 100);
//! cfg.schedule.delta_t = 10;
//! let mut sparsifier = Sparsifier::new(vec![fc1.weight().clone(), fc2.weight().clone()], cfg)?;
//! let mut opt = MaskedSgd::new(vm.all_vars(), SgdConfig::default())?;
//! sparsifier.register(&mut opt)?;
//! let x = Tensor::ones((8, 20), DType::F32, &Device::Cpu)?;
//! for step in 1..=20 {
//!     let loss = fc2.forward(&fc1.forward(&x)?.relu()?)?.sqr()?.mean_all()?;
//!     let grads = loss.backward()?;
//!     opt.step(&grads)?;
//!     sparsifier.step(step, &grads, &mut opt)?;
//! }
//! // Every active neuron of fc1 has the same fan-in.
//! let s = &sparsifier.summary()[0];
//! assert_eq!(s.min_fan_in, s.max_fan_in);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod distribution;
mod error;
mod fused;
pub mod layers;
pub mod optim;
pub mod rng;
pub mod schedule;
mod select;
mod simd;
mod sparsifier;
pub mod sparsify;
pub mod update;

pub use distribution::{Distribution, LayerBudget, LayerSpec};
pub use error::{DstError, Result};
pub use layers::{fold_ablated_into_next, SparseConv2d, SparseLinear, SparseParam};
pub use rng::Rng;
pub use schedule::{Anneal, UpdateSchedule};
pub use sparsifier::{LayerReport, Sparsifier, SparsifierConfig, UpdateReport};
pub use sparsify::{NoSparsity, Sparsify};
pub use update::{Method, SriglParams};
