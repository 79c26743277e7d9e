//! A tensor's CPU data in place: read without copying, written without a new tensor. The
//! optimizer's fused passes, the mask update and the sparse engine's re-layouts use these on
//! weights and gradients (a 3072×3072 layer is 37.7 MB per copy).

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};

/// Runs `f` on the contiguous `f32` CPU data of `t` (row-major, its layout's offset applied)
/// while candle's storage guard lives; `None` when `t` is not contiguous `f32` on the CPU.
/// `f` must not write to `t` (the guard is a read lock; a write would wait for it forever).
pub fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (st, l) = t.storage_and_layout();
    match (&*st, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(f(&v[a..b])),
        _ => None,
    }
}

/// Runs `f` on the data of `t` in row-major order as `f32`: borrowed where [`with_slice`] can,
/// else a converted copy (another dtype, another device, a strided view).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let mut f = Some(f);
    if let Some(r) = with_slice(t, |s| (f.take().expect("called once"))(s)) {
        return Ok(r);
    }
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok((f.take().expect("not called yet"))(&v))
}

/// Runs `f` on the contiguous `f32` CPU data of `t` for writing, in place (no new tensor, no
/// copy). Returns `false` without calling `f` when `t` is not contiguous `f32` on the CPU.
/// Tensors sharing `t`'s storage see the change; `f` must not read `t` through another handle.
pub fn write_in_place(t: &Tensor, f: impl FnOnce(&mut [f32])) -> candle_core::Result<bool> {
    let fits = {
        let (st, l) = t.storage_and_layout();
        matches!(&*st, Storage::Cpu(CpuStorage::F32(_))) && l.is_contiguous()
    };
    if !fits {
        return Ok(false);
    }
    t.inplace_op1(&Write(Mutex::new(Some(f))))?;
    Ok(true)
}

/// The in-place op behind [`write_in_place`]: candle hands it the storage mutably.
struct Write<F>(Mutex<Option<F>>);

impl<F: FnOnce(&mut [f32])> InplaceOp1 for Write<F> {
    fn name(&self) -> &'static str {
        "write-in-place"
    }

    fn cpu_fwd(&self, st: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let f = self.0.lock().expect("write op lock").take();
        match (st, l.contiguous_offsets(), f) {
            (CpuStorage::F32(v), Some((a, b)), Some(f)) => {
                f(&mut v[a..b]);
                Ok(())
            }
            _ => candle_core::bail!("write-in-place: not contiguous f32 storage"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn borrowed_copied_and_written_data_agree() {
        let t = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let want: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(with_slice(&t, |s| s.to_vec()), Some(want.clone()));
        assert_eq!(with_f32(&t, |s| s.to_vec()).unwrap(), want);
        // A transposed view is not contiguous: copied, in the view's row-major order, and not
        // written in place.
        let tt = t.t().unwrap();
        assert!(with_slice(&tt, |_| ()).is_none());
        let got = with_f32(&tt, |s| s.to_vec()).unwrap();
        assert_eq!(&got[..4], &[0.0, 4.0, 8.0, 1.0]);
        assert!(!write_in_place(&tt, |_| panic!("not called")).unwrap());
        // Another dtype is converted.
        let h = t.to_dtype(DType::F64).unwrap();
        assert_eq!(with_f32(&h, |s| s.to_vec()).unwrap(), want);
        assert!(!write_in_place(&h, |_| panic!("not called")).unwrap());
        // A row of a contiguous tensor is written at its offset only.
        let row = t.narrow(0, 1, 1).unwrap();
        assert!(write_in_place(&row, |s| s.fill(-1.0)).unwrap());
        let all = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&all[..4], &want[..4]);
        assert_eq!(&all[4..8], &[-1.0; 4]);
        assert_eq!(&all[8..], &want[8..]);
    }
}
