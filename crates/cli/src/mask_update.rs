//! `dst mask-update`: exactly one SET/RigL/SRigL mask update on the layers of a state file, so
//! a mask decision can be inspected or compared with another implementation. Each layer goes
//! through `dst_core::update::update_layer`, the same per-layer function the trainer's
//! sparsifier calls: a dense layer (an all-ones mask, or one the distribution makes dense under
//! `--sparsity`) is written back unchanged.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use dst_core::distribution::{allocate, LayerSpec};
use dst_core::update::{update_layer, UpdateInput, UpdateParams};
use dst_core::{Distribution, Method, SriglParams};
use sparse_formats::Mask;

/// `dst mask-update` flags.
#[derive(Args, Debug)]
pub struct MaskUpdateArgs {
    /// The update rule.
    #[arg(long, value_enum)]
    method: UpdateMethod,
    /// Input: per layer `<layer>.weight`, `<layer>.grad` (rigl, srigl) and `<layer>.mask`.
    #[arg(long, value_name = "IN.safetensors")]
    state: PathBuf,
    /// Output: the updated `<layer>.weight` and `<layer>.mask` (written atomically).
    #[arg(long, value_name = "OUT.safetensors")]
    out: PathBuf,
    /// Drop fraction α_t of this update.
    #[arg(long, default_value_t = 0.3)]
    drop_fraction: f64,
    /// SRigL's γ_sal.
    #[arg(long, default_value_t = 0.3)]
    gamma_sal: f64,
    /// Turn SRigL's neuron ablation off.
    #[arg(long)]
    no_ablation: bool,
    /// Re-budget the layers to this global sparsity (srigl only: SET and RigL keep each
    /// layer's active count; default: keep each layer's current nnz).
    #[arg(long)]
    sparsity: Option<f64>,
    /// Distribution used with --sparsity.
    #[arg(long, value_enum, default_value = "erk")]
    distribution: DistArg,
    /// Layers never ablated (repeatable; e.g. the output layer).
    #[arg(long = "protect", value_name = "LAYER")]
    protect: Vec<String>,
    /// Seed (SET's random growth, tie-break noise streams).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Step number of the update (a stream id for SET).
    #[arg(long, default_value_t = 1)]
    step: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum UpdateMethod {
    Set,
    Rigl,
    Srigl,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DistArg {
    Uniform,
    Er,
    Erk,
}

struct LayerIn {
    shape: Vec<usize>,
    weight: Vec<f32>,
    grad: Option<Vec<f32>>,
    mask: Mask,
}

/// `dst mask-update`.
pub fn run(a: MaskUpdateArgs) -> Result<ExitCode> {
    if !(0.0..=1.0).contains(&a.drop_fraction) {
        bail!("--drop-fraction: {} is outside [0, 1]", a.drop_fraction);
    }
    if !(a.gamma_sal.is_finite() && a.gamma_sal >= 0.0) {
        bail!("--gamma-sal: {} is outside [0, ∞)", a.gamma_sal);
    }
    let file = a.state.display().to_string();
    let tensors = candle_core::safetensors::load(&a.state, &Device::Cpu)
        .with_context(|| format!("--state {file}"))?;
    let mut names: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".weight").map(str::to_string))
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("--state {file}: no `<layer>.weight` tensor");
    }
    for p in &a.protect {
        if !names.contains(p) {
            bail!(
                "--protect: unknown layer `{p}` (layers: {})",
                names.join(", ")
            );
        }
    }
    let method = match a.method {
        UpdateMethod::Set => Method::Set,
        UpdateMethod::Rigl => Method::Rigl,
        UpdateMethod::Srigl => Method::Srigl,
    };
    if a.sparsity.is_some() && method != Method::Srigl {
        bail!(
            "--sparsity: only srigl re-budgets layers at an update; set and rigl keep each \
             layer's active count (drop the flag)"
        );
    }
    let mut layers = BTreeMap::new();
    for n in &names {
        let w = &tensors[&format!("{n}.weight")];
        let shape = w.dims().to_vec();
        if shape.len() < 2 {
            bail!("--state {file}: `{n}.weight` has shape {shape:?}; a weight needs 2+ dimensions");
        }
        let rows = shape[0];
        let fan_in: usize = shape[1..].iter().product();
        let flat = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        };
        let mask_t = tensors
            .get(&format!("{n}.mask"))
            .with_context(|| format!("--state {file}: missing `{n}.mask`"))?;
        if mask_t.dims() != shape.as_slice() {
            bail!(
                "--state {file}: `{n}.mask` shape {:?} differs from `{n}.weight` {shape:?}",
                mask_t.dims()
            );
        }
        let mask_v = flat(mask_t)?;
        if let Some((i, v)) = mask_v
            .iter()
            .enumerate()
            .find(|(_, &v)| v != 0.0 && v != 1.0)
        {
            bail!(
                "--state {file}: `{n}.mask` holds {v} at flat index {i}; a mask holds only 0 and 1"
            );
        }
        let mask = Mask::new(rows, fan_in, mask_v.iter().map(|&v| v != 0.0).collect())?;
        // Every number that enters is finite (a NaN would silently rank last or first).
        let finite = |what: &str, v: Vec<f32>| -> Result<Vec<f32>> {
            match v.iter().position(|x| !x.is_finite()) {
                Some(i) => bail!(
                    "--state {file}: `{n}.{what}` holds {} at flat index {i}; values must be finite",
                    v[i]
                ),
                None => Ok(v),
            }
        };
        let grad = match tensors.get(&format!("{n}.grad")) {
            Some(g) if g.dims() == shape.as_slice() => Some(finite("grad", flat(g)?)?),
            Some(g) => bail!(
                "--state {file}: `{n}.grad` shape {:?} differs from `{n}.weight` {shape:?}",
                g.dims()
            ),
            None if matches!(method, Method::Rigl | Method::Srigl) => {
                bail!("--state {file}: missing `{n}.grad` (rigl and srigl grow by gradient)")
            }
            None => None,
        };
        layers.insert(
            n.clone(),
            LayerIn {
                weight: finite("weight", flat(w)?)?,
                shape,
                grad,
                mask,
            },
        );
    }
    let budgets: Vec<usize> = match a.sparsity {
        None => layers.values().map(|l| l.mask.nnz()).collect(),
        Some(s) => {
            let specs: Vec<LayerSpec> = layers
                .iter()
                .map(|(n, l)| LayerSpec {
                    name: n.clone(),
                    shape: l.shape.clone(),
                    dense: false,
                })
                .collect();
            let dist = match a.distribution {
                DistArg::Uniform => Distribution::Uniform,
                DistArg::Er => Distribution::ErdosRenyi,
                DistArg::Erk => Distribution::Erk { power_scale: 1.0 },
            };
            allocate(&specs, s, dist)
                .context("--sparsity")?
                .into_iter()
                .map(|b| b.budget)
                .collect()
        }
    };
    let mut out = std::collections::HashMap::new();
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "layer", "dropped", "grown", "active", "fan-in", "ablated"
    );
    for (i, ((name, l), budget)) in layers.iter().zip(budgets).enumerate() {
        let input = UpdateInput {
            name,
            weights: &l.weight,
            grad: l.grad.as_deref(),
            mask: &l.mask,
            budget,
            protected: a.protect.contains(name),
            active_weights: None,
        };
        let params = UpdateParams {
            drop_fraction: a.drop_fraction,
            seed: a.seed,
            step: a.step,
            layer_index: i as u64,
            tie_noise: 0.0,
            srigl: SriglParams {
                gamma_sal: a.gamma_sal,
                ablation: !a.no_ablation,
            },
        };
        let (mask, w) = match update_layer(method, &input, &params)? {
            Some(u) => {
                let s = &u.update.stats;
                println!(
                    "{:<24} {:>8} {:>8} {:>8} {:>8} {:>7}",
                    name,
                    s.dropped,
                    s.grown,
                    s.active,
                    s.fan_in.map_or("-".into(), |f| f.to_string()),
                    s.ablated_rows
                );
                (u.update.mask, u.weights)
            }
            None => {
                println!("{name:<24} dense: left unchanged");
                (l.mask.clone(), l.weight.clone())
            }
        };
        let m: Vec<f32> = mask
            .as_slice()
            .iter()
            .map(|&b| f32::from(u8::from(b)))
            .collect();
        out.insert(
            format!("{name}.weight"),
            Tensor::from_vec(w, l.shape.as_slice(), &Device::Cpu)?,
        );
        out.insert(
            format!("{name}.mask"),
            Tensor::from_vec(m, l.shape.as_slice(), &Device::Cpu)?,
        );
    }
    models::checkpoint::save_tensors_atomic(&a.out, &out)
        .with_context(|| format!("--out {}", a.out.display()))?;
    Ok(ExitCode::SUCCESS)
}
