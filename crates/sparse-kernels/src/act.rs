//! ReLU as one op with its own backward: forward `max(x, 0)` in one pass, backward
//! `∂y · [x ≥ 0]` in one pass. candle 0.11's backward of `relu` builds a zeros tensor, a
//! comparison, a dtype conversion and a product (four passes and four allocations per
//! activation per step). Values and gradients are candle's exactly (`x.max(0)`; the gradient
//! passes where `x ≥ 0`, as candle's `ge`), so seeded runs do not change. Other dtypes and
//! devices fall back to candle's `relu`.
//!
//! [`add_relu`] is `relu(a + b)` (a residual block's output) as one op: without the sum's
//! tensor and its gradient, and in one pass each way.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

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

/// `relu(a + b)` as one op (see the module documentation): the same values as [`relu`] of
/// candle's sum, and the same gradient `∂y · [a + b ≥ 0]` for both `a` and `b`. Tensors of
/// different shapes, dtypes other than f32 and other devices run the two ops.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if f32_cpu(a) && f32_cpu(b) && a.shape() == b.shape() {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        relu(&(a + b)?)
    }
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::contiguous_f32(s, l, "relu", "x")?;
        let y = crate::fill_new(CHUNK, true, x.len(), |i0, y| {
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
        let out = crate::fill_new(CHUNK, true, g.len(), |i0, o| {
            for ((o, &g), &x) in o.iter_mut().zip(&g[i0..]).zip(&x[i0..]) {
                o.write(g * if x >= 0.0 { 1.0 } else { 0.0 });
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = crate::contiguous_f32(s1, l1, "add_relu", "a")?;
        let b = crate::contiguous_f32(s2, l2, "add_relu", "b")?;
        if a.len() != b.len() {
            candle_core::bail!("add_relu: a has {} entries, b {}", a.len(), b.len());
        }
        let y = crate::fill_new(CHUNK, true, a.len(), |i0, y| {
            for ((y, &a), &b) in y.iter_mut().zip(&a[i0..]).zip(&b[i0..]) {
                y.write((a + b).max(0.0));
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?.apply_op3_no_bwd(a, b, &AddReluGrad)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// `(∂y, a, b) → ∂y · [a + b ≥ 0]` (the sum formed as the forward formed it).
struct AddReluGrad;

impl candle_core::CustomOp3 for AddReluGrad {
    fn name(&self) -> &'static str {
        "add-relu-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = crate::contiguous_f32(gs, gl, "add_relu backward", "grad")?;
        let a = crate::contiguous_f32(s1, l1, "add_relu backward", "a")?;
        let b = crate::contiguous_f32(s2, l2, "add_relu backward", "b")?;
        if a.len() != g.len() || b.len() != g.len() {
            candle_core::bail!(
                "add_relu backward: grad has {} entries, a {}",
                g.len(),
                a.len()
            );
        }
        let out = crate::fill_new(CHUNK, true, g.len(), |i0, o| {
            let terms = o.iter_mut().zip(&g[i0..]).zip(&a[i0..]).zip(&b[i0..]);
            for (((o, &g), &a), &b) in terms {
                o.write(g * if a + b >= 0.0 { 1.0 } else { 0.0 });
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
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

    #[test]
    fn add_relu_equals_relu_of_the_sum_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for n in [9usize, 100_000] {
            // Sums that are exactly zero, of both signs, negative and positive; a NaN.
            let av: Vec<f32> = (0..n).map(|i| ((i * 7919) % 9) as f32 - 4.0).collect();
            let mut bv: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 7) as f32 - 3.0).collect();
            bv[3] = f32::NAN;
            let a = Var::from_vec(av, n, &dev)?;
            let b = Var::from_vec(bv, n, &dev)?;
            let w: Vec<f32> = (0..n).map(|i| ((i * 31) % 17) as f32 - 8.0).collect();
            let w = Tensor::from_vec(w, n, &dev)?;
            let fused = add_relu(a.as_tensor(), b.as_tensor())?;
            let composed = relu(&(a.as_tensor() + b.as_tensor())?)?;
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
            };
            assert_eq!(bits(&fused)?, bits(&composed)?, "forward, n = {n}");
            let gf = (fused * &w)?.sum_all()?.backward()?;
            let gc = (composed * &w)?.sum_all()?.backward()?;
            for v in [&a, &b] {
                let (f, c) = (
                    gf.get(v.as_tensor()).unwrap(),
                    gc.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(bits(f)?, bits(c)?, "gradient, n = {n}");
            }
            let g = gf.get(a.as_tensor()).unwrap().to_vec1::<f32>()?;
            assert!(g.iter().any(|&v| v != 0.0) && g.contains(&0.0));
        }
        Ok(())
    }
}
