//! ReLU as one op with its own backward: forward `max(x, 0)` in one pass, backward
//! `∂y · [x ≥ 0]` in one pass. candle 0.11's backward of `relu` builds a zeros tensor, a
//! comparison, a dtype conversion and a product (four passes and four allocations per
//! activation per step). Values and gradients are candle's exactly (`x.max(0)`; the gradient
//! passes where `x ≥ 0`, as candle's `ge`), so seeded runs do not change. Other dtypes and
//! devices fall back to candle's `relu`.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel chunk (elementwise work splits at fixed places, so the result does
/// not depend on the thread count).
const CHUNK: usize = 1 << 15;

/// `max(x, 0)` with its backward (see the module documentation).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.apply_op1(Relu)
    } else {
        x.relu()
    }
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::contiguous_f32(s, l, "relu", "x")?;
        let y = fill_new(x.len(), |i0, y| {
            for (y, &v) in y.iter_mut().zip(&x[i0..]) {
                y.write(v.max(0.0));
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op2_no_bwd(&arg.contiguous()?, &ReluGrad)?,
        ))
    }
}

/// `(∂y, x) → ∂y · [x ≥ 0]` (the mask as `1.0` / `0.0`, multiplied as candle does).
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = crate::contiguous_f32(gs, gl, "relu backward", "grad")?;
        let x = crate::contiguous_f32(xs, xl, "relu backward", "x")?;
        if x.len() != g.len() {
            candle_core::bail!("relu backward: grad has {} entries, x {}", g.len(), x.len());
        }
        let out = fill_new(g.len(), |i0, o| {
            for ((o, &g), &x) in o.iter_mut().zip(&g[i0..]).zip(&x[i0..]) {
                o.write(g * if x >= 0.0 { 1.0 } else { 0.0 });
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// A new vector of `n` floats, written by `fill(first index, chunk)` over chunks of [`CHUNK`]
/// in parallel; each chunk must write every entry. Not zero-filled first: an element-wise op's
/// output is written exactly once, and the zeroing pass cost as much as the op.
fn fill_new(n: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, c)| fill(i * CHUNK, c));
    // SAFETY: the chunks cover `0..n`, and `fill` writes every entry of its chunk (both callers
    // zip the chunk with inputs of length `n`).
    unsafe { v.set_len(n) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradients_are_candles_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        // Zeros of both signs, NaN and large tensors (several chunks).
        for n in [7usize, 100_000] {
            let mut v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 201) as f32 - 100.0).collect();
            v[0] = 0.0;
            v[1] = -0.0;
            v[2] = f32::NAN;
            let x = Var::from_tensor(&Tensor::from_vec(v, n, &dev)?)?;
            let w = Tensor::from_vec(
                (0..n)
                    .map(|i| ((i * 31) % 17) as f32 - 8.0)
                    .collect::<Vec<_>>(),
                n,
                &dev,
            )?;
            let ours = relu(x.as_tensor())?;
            let theirs = x.as_tensor().relu()?;
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
            };
            assert_eq!(bits(&ours)?, bits(&theirs)?, "forward, n = {n}");
            let go = (ours * &w)?.sum_all()?.backward()?;
            let gt = (theirs * &w)?.sum_all()?.backward()?;
            let (go, gt) = (
                go.get(x.as_tensor()).unwrap(),
                gt.get(x.as_tensor()).unwrap(),
            );
            assert_eq!(bits(go)?, bits(gt)?, "gradient, n = {n}");
        }
        Ok(())
    }
}
