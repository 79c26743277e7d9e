//! The host side of the CUDA kernels: NVRTC compilation, module loading, device buffers and
//! launches through cudarc (dynamic loading), plus cuBLAS dense GEMM for comparisons.
//!
//! ```no_run
//! # use sparse_kernels::cuda::{gpu::Gpu, Ell};
//! # use sparse_kernels::SparseWeight;
//! # fn demo(c: &sparse_formats::Condensed, x: &[f32]) -> Result<(), sparse_kernels::KernelError> {
//! let gpu = Gpu::new(0)?; // compiles the kernels for this device
//! let w = gpu.upload(&Ell::new(SparseWeight::Condensed(c))?, c.values())?;
//! let y = gpu.forward_host(&w, None, x, 1)?; // batch 1: the warp-per-row kernel
//! # Ok(()) }
//! ```

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use super::{Ell, Packed24, KERNEL_SOURCE};
use crate::KernelError;

fn err(what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda(format!("{what}: {e:?}"))
}

/// Whether the CUDA driver and NVRTC libraries can be loaded here (never panics).
pub fn libraries_present() -> (bool, bool) {
    // SAFETY: these only try to open the shared libraries.
    unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    }
}

/// Compiles [`KERNEL_SOURCE`] to PTX for a virtual architecture (`"compute_80"`,
/// `"compute_90"`, …) with NVRTC; needs only the NVRTC library, no GPU.
pub fn compile_ptx(arch: &'static str) -> Result<Ptx, KernelError> {
    compile_source(KERNEL_SOURCE, arch)
}

/// Compiles any CUDA C source with the options the kernels use (tests feed it broken sources).
pub fn compile_source(src: &str, arch: &'static str) -> Result<Ptx, KernelError> {
    if !libraries_present().1 {
        return Err(KernelError::Cuda(
            "the NVRTC library (libnvrtc.so) cannot be loaded: install the CUDA toolkit or the \
             PyPI package nvidia-cuda-nvrtc and put its lib folder on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    compile_ptx_with_opts(
        src,
        CompileOptions {
            arch: Some(arch),
            name: Some("sparse_kernels.cu".into()),
            options: vec!["--std=c++17".into()],
            ..Default::default()
        },
    )
    .map_err(|e| {
        KernelError::Cuda(format!(
            "NVRTC could not compile the kernels for {arch}: {e}"
        ))
    })
}

/// One GPU with the kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    fwd_b1: CudaFunction,
    fwd_fm: CudaFunction,
    nm24_b1: CudaFunction,
    igrad: CudaFunction,
    vgrad: CudaFunction,
    transpose: CudaFunction,
    max_shared: usize,
}

/// A sparse weight on the GPU: the [`Ell`] structure and the values.
pub struct GpuEll {
    /// The structure (host copy).
    pub ell: Ell,
    /// The values, in the layout's order.
    pub values: CudaSlice<f32>,
    slot_of: CudaSlice<i32>,
    row_of: CudaSlice<i32>,
    cols: CudaSlice<u32>,
    col_start: CudaSlice<u32>,
    perm: CudaSlice<u32>,
    csc_row: CudaSlice<u32>,
}

/// A packed 2:4 weight on the GPU.
pub struct GpuPacked24 {
    /// Output rows.
    pub rows: usize,
    /// Groups of four per row.
    pub groups: usize,
    values: CudaSlice<f32>,
    positions: CudaSlice<u8>,
    slot_of: CudaSlice<i32>,
}

const WARPS_PER_BLOCK: u32 = 8;

/// A null device pointer (the kernels' "no bias").
const NULL: u64 = 0;

fn push_bias<'a>(b: &mut LaunchArgs<'a>, bias: Option<&'a CudaSlice<f32>>) {
    match bias {
        Some(bias) => b.arg(bias),
        None => b.arg(&NULL),
    };
}

impl Gpu {
    /// Opens device `ordinal` and compiles the kernels for its compute capability.
    pub fn new(ordinal: usize) -> Result<Gpu, KernelError> {
        let (driver, nvrtc) = libraries_present();
        if !driver {
            return Err(KernelError::Cuda(
                "the CUDA driver library (libcuda.so) cannot be loaded: no NVIDIA driver here"
                    .into(),
            ));
        }
        if !nvrtc {
            return Err(compile_ptx("compute_80").unwrap_err());
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| err("opening the GPU", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| err("reading the compute capability", e))?;
        // cudarc's CompileOptions takes a `&'static str`: one short string per opened GPU.
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let module = ctx
            .load_module(compile_ptx(arch)?)
            .map_err(|e| err("loading the kernels", e))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| err(&format!("kernel {name}"), e))
        };
        let max_shared = 48 * 1024;
        Ok(Gpu {
            stream: ctx.default_stream(),
            fwd_b1: f("ell_fwd_b1")?,
            fwd_fm: f("ell_fwd_fm")?,
            nm24_b1: f("nm24_fwd_b1")?,
            igrad: f("ell_igrad")?,
            vgrad: f("ell_vgrad")?,
            transpose: f("transpose")?,
            max_shared,
            ctx,
        })
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context (for events).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Copies a host slice to the device.
    pub fn to_device<T: cudarc::driver::DeviceRepr>(
        &self,
        host: &[T],
    ) -> Result<CudaSlice<T>, KernelError> {
        self.stream
            .clone_htod(host)
            .map_err(|e| err("copying to the GPU", e))
    }

    /// Copies a device buffer back.
    pub fn to_host<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
    ) -> Result<Vec<T>, KernelError> {
        self.stream
            .clone_dtoh(dev)
            .map_err(|e| err("copying from the GPU", e))
    }

    /// A device buffer of `n` f32 filled with NaN (poisoned: a kernel that skips an element
    /// leaves a NaN behind).
    pub fn poisoned(&self, n: usize) -> Result<CudaSlice<f32>, KernelError> {
        self.to_device(&vec![f32::NAN; n.max(1)])
    }

    /// Uploads a structure and its values.
    pub fn upload(&self, ell: &Ell, values: &[f32]) -> Result<GpuEll, KernelError> {
        if values.len() != ell.cols.len() {
            return Err(KernelError::Shape {
                what: "values",
                expected: ell.cols.len(),
                found: values.len(),
            });
        }
        let nz = |v: &[u32]| if v.is_empty() { vec![0u32] } else { v.to_vec() };
        Ok(GpuEll {
            values: self.to_device(if values.is_empty() {
                &[0.0][..]
            } else {
                values
            })?,
            slot_of: self.to_device(&ell.slot_of)?,
            row_of: self.to_device(if ell.row_of.is_empty() {
                &[0][..]
            } else {
                &ell.row_of
            })?,
            cols: self.to_device(&nz(&ell.cols))?,
            col_start: self.to_device(&ell.col_start)?,
            perm: self.to_device(&nz(&ell.perm))?,
            csc_row: self.to_device(&nz(&ell.csc_row))?,
            ell: ell.clone(),
        })
    }

    /// Uploads a packed 2:4 weight.
    pub fn upload_24(&self, p: &Packed24) -> Result<GpuPacked24, KernelError> {
        let slot_of: Vec<i32> = (0..p.rows as i32).collect();
        Ok(GpuPacked24 {
            rows: p.rows,
            groups: p.groups,
            values: self.to_device(&p.values)?,
            positions: self.to_device(&p.positions)?,
            slot_of: self.to_device(&slot_of)?,
        })
    }

    fn b1_config(&self, rows: usize, fan_in: usize) -> (LaunchConfig, i32) {
        let in_shared = fan_in * 4 <= self.max_shared;
        (
            LaunchConfig {
                grid_dim: ((rows as u32).div_ceil(WARPS_PER_BLOCK).max(1), 1, 1),
                block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
                shared_mem_bytes: if in_shared { (fan_in * 4) as u32 } else { 0 },
            },
            in_shared as i32,
        )
    }

    /// `y[batch, rows] = x[batch, fan_in]·Wᵀ (+ bias)` on device buffers. Batch 1 runs the
    /// warp-per-row kernel; larger batches transpose `x` into `xt` (feature-major, `[fan_in ·
    /// batch]`, a scratch buffer) and run the tiled kernel.
    pub fn forward(
        &self,
        w: &GpuEll,
        bias: Option<&CudaSlice<f32>>,
        x: &CudaSlice<f32>,
        xt: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        batch: usize,
    ) -> Result<(), KernelError> {
        let e = &w.ell;
        let (rows, fan_in, k) = (e.rows as i32, e.fan_in as i32, e.k as i32);
        if batch == 1 {
            let (cfg, in_shared) = self.b1_config(e.rows, e.fan_in);
            let mut b = self.stream.launch_builder(&self.fwd_b1);
            b.arg(&w.values).arg(&w.cols).arg(&w.slot_of);
            push_bias(&mut b, bias);
            b.arg(x)
                .arg(y)
                .arg(&rows)
                .arg(&k)
                .arg(&fan_in)
                .arg(&in_shared);
            // SAFETY: argument lists match the kernels' signatures in kernels.cu; buffer sizes
            // are those of the structure and the batch.
            unsafe { b.launch(cfg) }.map_err(|e| err("ell_fwd_b1", e))?;
            return Ok(());
        }
        let batch_i = batch as i32;
        let tcfg = LaunchConfig {
            grid_dim: (
                (e.fan_in as u32).div_ceil(32),
                (batch as u32).div_ceil(32),
                1,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let mut t = self.stream.launch_builder(&self.transpose);
        t.arg(x).arg(&mut *xt).arg(&batch_i).arg(&fan_in);
        // SAFETY: x is [batch, fan_in], xt holds fan_in · batch floats.
        unsafe { t.launch(tcfg) }.map_err(|e| err("transpose", e))?;
        let cfg = LaunchConfig {
            grid_dim: (
                (batch as u32).div_ceil(32),
                (e.rows as u32).div_ceil(8).max(1),
                1,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.fwd_fm);
        b.arg(&w.values).arg(&w.cols).arg(&w.slot_of);
        push_bias(&mut b, bias);
        b.arg(&*xt).arg(y).arg(&rows).arg(&k).arg(&batch_i);
        // SAFETY: as above.
        unsafe { b.launch(cfg) }.map_err(|e| err("ell_fwd_fm", e))?;
        Ok(())
    }

    /// 2:4 forward for batch 1 on the packed form.
    pub fn forward_24_b1(
        &self,
        w: &GpuPacked24,
        bias: Option<&CudaSlice<f32>>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let (cfg, in_shared) = self.b1_config(w.rows, w.groups * 4);
        let (rows, groups) = (w.rows as i32, w.groups as i32);
        let mut b = self.stream.launch_builder(&self.nm24_b1);
        b.arg(&w.values).arg(&w.positions).arg(&w.slot_of);
        push_bias(&mut b, bias);
        b.arg(x).arg(y).arg(&rows).arg(&groups).arg(&in_shared);
        // SAFETY: as in `forward`.
        unsafe { b.launch(cfg) }.map_err(|e| err("nm24_fwd_b1", e))?;
        Ok(())
    }

    /// `gx[batch, fan_in] = gy[batch, rows]·W`.
    pub fn input_grad(
        &self,
        w: &GpuEll,
        gy: &CudaSlice<f32>,
        gx: &mut CudaSlice<f32>,
        batch: usize,
    ) -> Result<(), KernelError> {
        let e = &w.ell;
        let n = (batch * e.fan_in) as u32;
        let cfg = LaunchConfig::for_num_elems(n.max(1));
        let (rows, fan_in, batch) = (e.rows as i32, e.fan_in as i32, batch as i32);
        let mut b = self.stream.launch_builder(&self.igrad);
        b.arg(&w.values)
            .arg(&w.col_start)
            .arg(&w.perm)
            .arg(&w.csc_row)
            .arg(gy)
            .arg(gx)
            .arg(&rows)
            .arg(&fan_in)
            .arg(&batch);
        // SAFETY: as in `forward`.
        unsafe { b.launch(cfg) }.map_err(|e| err("ell_igrad", e))?;
        Ok(())
    }

    /// `gv[nnz]`: the gradient of every stored value, from `x[batch, fan_in]` and
    /// `gy[batch, rows]`.
    pub fn value_grad(
        &self,
        w: &GpuEll,
        x: &CudaSlice<f32>,
        gy: &CudaSlice<f32>,
        gv: &mut CudaSlice<f32>,
        batch: usize,
    ) -> Result<(), KernelError> {
        let e = &w.ell;
        let nnz = e.cols.len() as u32;
        let cfg = LaunchConfig {
            grid_dim: (nnz.div_ceil(WARPS_PER_BLOCK).max(1), 1, 1),
            block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_slots, k, rows, fan_in, batch) = (
            e.n_slots() as i32,
            e.k as i32,
            e.rows as i32,
            e.fan_in as i32,
            batch as i32,
        );
        let mut b = self.stream.launch_builder(&self.vgrad);
        b.arg(&w.cols)
            .arg(&w.row_of)
            .arg(x)
            .arg(gy)
            .arg(gv)
            .arg(&n_slots)
            .arg(&k)
            .arg(&rows)
            .arg(&fan_in)
            .arg(&batch);
        // SAFETY: as in `forward`.
        unsafe { b.launch(cfg) }.map_err(|e| err("ell_vgrad", e))?;
        Ok(())
    }

    /// Host-to-host forward (uploads `x`, runs [`Gpu::forward`], downloads `y`).
    pub fn forward_host(
        &self,
        w: &GpuEll,
        bias: Option<&[f32]>,
        x: &[f32],
        batch: usize,
    ) -> Result<Vec<f32>, KernelError> {
        let xd = self.to_device(x)?;
        let bd = bias.map(|b| self.to_device(b)).transpose()?;
        let mut xt = self.poisoned(x.len())?;
        let mut y = self.poisoned(batch * w.ell.rows)?;
        self.forward(w, bd.as_ref(), &xd, &mut xt, &mut y, batch)?;
        let mut out = self.to_host(&y)?;
        out.truncate(batch * w.ell.rows);
        Ok(out)
    }

    /// A cuBLAS handle on this GPU's stream (dense baselines).
    pub fn blas(&self) -> Result<CudaBlas, KernelError> {
        CudaBlas::new(self.stream.clone()).map_err(|e| err("cuBLAS", e))
    }

    /// Dense `y[batch, rows] = x[batch, fan_in]·Wᵀ` with cuBLAS (row-major `W[rows, fan_in]`), the
    /// baseline of the GPU benchmark.
    #[allow(clippy::too_many_arguments)]
    pub fn dense_forward(
        &self,
        blas: &CudaBlas,
        w: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        fan_in: usize,
        batch: usize,
    ) -> Result<(), KernelError> {
        // Column-major view: Yᵀ[rows, batch] = W[rows, fan_in] · Xᵀ[fan_in, batch], with the
        // row-major W read as Wᵀ column-major (so op T).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: rows as i32,
            n: batch as i32,
            k: fan_in as i32,
            alpha: 1.0f32,
            lda: fan_in as i32,
            ldb: fan_in as i32,
            beta: 0.0f32,
            ldc: rows as i32,
        };
        // SAFETY: buffer sizes are rows·fan_in, batch·fan_in and batch·rows.
        unsafe { blas.gemm(cfg, w, x, y) }.map_err(|e| err("cuBLAS sgemm", e))
    }
}
