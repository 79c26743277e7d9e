//! Dense 2-D convolution as GEMMs, with its own backward pass: [`conv2d`].
//!
//! candle's CPU `conv2d` forward is already im2col + GEMM, but its backward computes the input
//! gradient with a direct `conv_transpose2d` loop and the kernel gradient as another
//! convolution, and it computes the input gradient even for a network's first layer
//! (`../shared` notes, and docs/benchmarks.md "Convolutions"). Here all three products are
//! GEMMs on the `gemm` crate candle itself uses:
//!
//! - forward: `y_s [out, L] = W [out, K] · cols(x_s) [K, L]`;
//! - input gradient: `cols(∂x_s) = Wᵀ · ∂y_s`, scattered back by col2im;
//! - weight gradient: `∂W = Σ_s ∂y_s · cols(x_s)ᵀ`;
//! - with a bias, its gradient `Σ_s Σ_l ∂y_s`;
//!
//! with `K = in·kh·kw`, `L = oh·ow`, over chunks of samples so that each GEMM has at least
//! [`CHUNK_COLUMNS`] columns and the im2col buffer stays small (one chunk per worker; `cols` is
//! recomputed in the backward pass instead of kept). The input gradient is skipped when `x`
//! needs none (a first layer). Chunks depend only on the shapes, and the weight gradient sums
//! the chunks' partial products in chunk order, so results are bit-identical for any thread
//! count.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use sparse_kernels::conv::{conv2d, ConvSpec};
//! let x = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 1, 4, 4))?;
//! let w = Var::new(&[[[[1f32, 0.0], [0.0, -1.0]]]], &Device::Cpu)?;
//! let y = conv2d(&x, w.as_tensor(), None, ConvSpec::default())?;
//! assert_eq!(y.dims(), [1, 1, 3, 3]);
//! assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![-5.0; 9]);
//! let g = y.sum_all()?.backward()?;
//! // ∂/∂W[i,j] = sum of the 3×3 window of x starting at (i, j).
//! assert_eq!(g.get(&w).unwrap().flatten_all()?.to_vec1::<f32>()?, vec![45.0, 54.0, 81.0, 90.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::dense::{gemm, gemm_raw};
use crate::scratch;
use crate::Exec;

/// Each GEMM of a chunk covers at least this many output positions (`samples · L`), so the
/// products stay efficient when the feature maps are small (a 4×4 map has L = 16).
pub const CHUNK_COLUMNS: usize = 256;

/// Padding, stride and dilation of a convolution (square, as `candle_nn::Conv2dConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    /// Zero padding on every side.
    pub padding: usize,
    /// Stride.
    pub stride: usize,
    /// Dilation.
    pub dilation: usize,
    /// Groups; only `1` runs on the GEMM path, others use candle's `conv2d`.
    pub groups: usize,
}

impl Default for ConvSpec {
    fn default() -> Self {
        ConvSpec {
            padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
        }
    }
}

/// `y = conv2d(x, w) + bias` for `x [batch, in, h, w]`, `w [out, in, kh, kw]` and an optional
/// `bias [out]`, with autograd for all three.
///
/// f32 CPU tensors with `groups == 1` run the GEMM op of this module; anything else (another
/// dtype or device, grouped convolutions) is handed to candle's `Tensor::conv2d` plus a
/// broadcast bias, so this is a drop-in replacement.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, spec: ConvSpec) -> Result<Tensor> {
    conv2d_with(x, w, bias, spec, Exec::default())
}

/// [`conv2d`] with an explicit thread count.
pub fn conv2d_with(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    spec: ConvSpec,
    exec: Exec,
) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let fast = spec.groups == 1
        && f32_cpu(x)
        && f32_cpu(w)
        && bias.is_none_or(|b| f32_cpu(b) && b.rank() == 1)
        && x.rank() == 4
        && w.rank() == 4;
    if !fast {
        let y = x.conv2d(w, spec.padding, spec.stride, spec.dilation, spec.groups)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
            None => Ok(y),
        };
    }
    let g = Geometry::new(x.dims(), w.dims(), spec)?;
    let op = ConvForward { g, exec };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        None => x.apply_op2(&w, op),
        Some(b) => {
            if b.elem_count() != g.out {
                candle_core::bail!(
                    "conv2d: the bias has {} values, the kernel has {} output channels",
                    b.elem_count(),
                    g.out
                );
            }
            x.apply_op3(&w, &b.contiguous()?, ConvForwardBias(op))
        }
    }
}

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) batch: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) out: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    pub(crate) spec: ConvSpec,
}

impl Geometry {
    pub(crate) fn new(x: &[usize], w: &[usize], spec: ConvSpec) -> Result<Self> {
        let (batch, c, h, wd) = (x[0], x[1], x[2], x[3]);
        let (out, wc, kh, kw) = (w[0], w[1], w[2], w[3]);
        if wc != c {
            candle_core::bail!("conv2d: x has {c} channels, the kernel expects {wc}");
        }
        if spec.stride == 0 || spec.dilation == 0 {
            candle_core::bail!("conv2d: stride and dilation must be ≥ 1, got {spec:?}");
        }
        let span = |k: usize| spec.dilation * (k.max(1) - 1) + 1;
        let (ph, pw) = (h + 2 * spec.padding, wd + 2 * spec.padding);
        if kh == 0 || kw == 0 || ph < span(kh) || pw < span(kw) {
            candle_core::bail!(
                "conv2d: a {kh}×{kw} kernel (dilation {}) does not fit the padded {ph}×{pw} input",
                spec.dilation
            );
        }
        Ok(Geometry {
            batch,
            c,
            h,
            w: wd,
            out,
            kh,
            kw,
            oh: (ph - span(kh)) / spec.stride + 1,
            ow: (pw - span(kw)) / spec.stride + 1,
            spec,
        })
    }

    /// `in · kh · kw`.
    pub(crate) fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// `oh · ow`.
    pub(crate) fn l(&self) -> usize {
        self.oh * self.ow
    }

    /// Samples per chunk: enough for [`CHUNK_COLUMNS`] columns, from the shapes alone.
    fn chunk(&self) -> usize {
        CHUNK_COLUMNS
            .div_ceil(self.l().max(1))
            .clamp(1, self.batch.max(1))
    }

    /// The sample ranges of the chunks.
    pub(crate) fn chunks(&self) -> Vec<std::ops::Range<usize>> {
        let n = self.chunk();
        (0..self.batch)
            .step_by(n)
            .map(|s| s..(s + n).min(self.batch))
            .collect()
    }

    /// For kernel offset `k` (in rows or columns) and output position `o`, the input
    /// position, or `None` in the padding.
    #[inline]
    fn src(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        let p = (o * self.spec.stride + k * self.spec.dilation).checked_sub(self.spec.padding)?;
        (p < size).then_some(p)
    }

    /// The output columns `[lo, hi)` whose input column for kernel column `kj` is inside the
    /// image (the rest read padding).
    fn valid_cols(&self, kj: usize) -> (usize, usize) {
        let (s, d, p) = (self.spec.stride, self.spec.dilation, self.spec.padding);
        let off = kj * d;
        // ox·s + off ≥ p  and  ox·s + off − p < w
        let lo = if off >= p { 0 } else { (p - off).div_ceil(s) };
        let hi = if self.w + p > off {
            ((self.w + p - off).div_ceil(s)).min(self.ow)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// The samples `r` of a batch-major `[batch, out, L]` tensor as `[out, n·L]` (what the
    /// chunk's GEMMs take); borrowed when the chunk is one sample.
    fn channel_major<'t>(&self, t: &'t [f32], r: &std::ops::Range<usize>) -> Cow<'t, [f32]> {
        let (out, l, n) = (self.out, self.l(), r.len());
        let src = &t[r.start * out * l..][..n * out * l];
        if n == 1 {
            return src.into();
        }
        let mut dst = vec![0f32; out * n * l];
        for si in 0..n {
            for o in 0..out {
                dst[o * n * l + si * l..][..l].copy_from_slice(&src[(si * out + o) * l..][..l]);
            }
        }
        dst.into()
    }

    /// im2col of samples `samples` of `x` into `cols [K, n·L]` (column `(s − s0)·L + l`), one
    /// run of `ow` positions of one row `r = (ci·kh + ki)·kw + kj` at a time.
    pub(crate) fn im2col(&self, x: &[f32], samples: std::ops::Range<usize>, cols: &mut [f32]) {
        self.im2col_strided(x, samples.clone(), cols, samples.len() * self.l());
    }

    /// [`Self::im2col`] with rows `width` floats apart (`width ≥ n·L`; the gap is not written).
    pub(crate) fn im2col_strided(
        &self,
        x: &[f32],
        samples: std::ops::Range<usize>,
        cols: &mut [f32],
        width: usize,
    ) {
        let l = self.l();
        let plane = self.h * self.w;
        let (stride, dilation, padding) = (self.spec.stride, self.spec.dilation, self.spec.padding);
        for ci in 0..self.c {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let r = (ci * self.kh + ki) * self.kw + kj;
                    let (lo, hi) = self.valid_cols(kj);
                    for (si, s) in samples.clone().enumerate() {
                        let img = &x[(s * self.c + ci) * plane..][..plane];
                        if stride == 1 && self.ow == self.w {
                            let dst = &mut cols[r * width + si * l..][..l];
                            self.im2col_plane(img, ki, kj, (lo, hi), dst);
                            continue;
                        }
                        for oy in 0..self.oh {
                            let dst = &mut cols[r * width + si * l + oy * self.ow..][..self.ow];
                            match self.src(oy, ki, self.h) {
                                None => zero_run(dst),
                                Some(iy) => {
                                    let src = &img[iy * self.w..][..self.w];
                                    zero_run(&mut dst[..lo]);
                                    zero_run(&mut dst[hi..]);
                                    if lo < hi {
                                        let ix0 = lo * stride + kj * dilation - padding;
                                        if stride == 1 {
                                            copy_run(&mut dst[lo..hi], &src[ix0..ix0 + (hi - lo)]);
                                        } else {
                                            for (j, d) in dst[lo..hi].iter_mut().enumerate() {
                                                *d = src[ix0 + j * stride];
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// One row `(ki, kj)` of one sample's im2col when the output rows are as wide as the input
    /// rows (stride 1, `ow == w`: "same" padding): output position `j` reads input position
    /// `j + shift` of the flattened plane, so the valid rows are one contiguous copy, after
    /// which the columns that fell into the padding (`[0, lo)` and `[hi, w)` of each row, where
    /// the copy wrapped into the neighbouring input row) and the rows that did are zeroed.
    /// One copy per plane instead of one per output row: LeNet-5's conv1 has 28 rows of 28.
    fn im2col_plane(
        &self,
        img: &[f32],
        ki: usize,
        kj: usize,
        (lo, hi): (usize, usize),
        dst: &mut [f32],
    ) {
        let (w, d, p) = (self.w, self.spec.dilation, self.spec.padding);
        // Output rows whose input row `oy + ki·d − p` is inside the image.
        let y0 = p.saturating_sub(ki * d).min(self.oh);
        let y1 = (self.h + p).saturating_sub(ki * d).min(self.oh).max(y0);
        dst[..y0 * w].fill(0.0);
        dst[y1 * w..].fill(0.0);
        if y0 == y1 {
            return;
        }
        if lo >= hi {
            dst[y0 * w..y1 * w].fill(0.0);
            return;
        }
        // Positions j0 .. j1 (first valid entry of the first valid row to the last of the
        // last) read input j + (ki·d − p)·w + kj·d − p, inside the plane for every j.
        let (j0, j1) = (y0 * w + lo, (y1 - 1) * w + hi);
        let src0 = (y0 + ki * d - p) * w + lo + kj * d - p;
        dst[j0..j1].copy_from_slice(&img[src0..src0 + (j1 - j0)]);
        for row in dst[y0 * w..y1 * w].chunks_exact_mut(w) {
            zero_run(&mut row[..lo]);
            zero_run(&mut row[hi..]);
        }
    }

    /// col2im: adds `cols [K, n·L]` into `gx` (the chunk's samples, `[n, c, h, w]`), one run
    /// of `ow` positions of one row at a time.
    pub(crate) fn col2im(&self, cols: &[f32], n: usize, gx: &mut [f32]) {
        let l = self.l();
        let width = n * l;
        let plane = self.h * self.w;
        let (stride, dilation, padding) = (self.spec.stride, self.spec.dilation, self.spec.padding);
        for ci in 0..self.c {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let r = (ci * self.kh + ki) * self.kw + kj;
                    let (lo, hi) = self.valid_cols(kj);
                    if lo == hi {
                        continue;
                    }
                    let ix0 = lo * stride + kj * dilation - padding;
                    for si in 0..n {
                        let img = &mut gx[(si * self.c + ci) * plane..][..plane];
                        for oy in 0..self.oh {
                            let Some(iy) = self.src(oy, ki, self.h) else {
                                continue;
                            };
                            let src = &cols[r * width + si * l + oy * self.ow..][lo..hi];
                            let dst = &mut img[iy * self.w..][..self.w];
                            if stride == 1 {
                                // Unit stride: a contiguous add the compiler vectorizes.
                                for (d, v) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                                    *d += v;
                                }
                            } else {
                                for (j, v) in src.iter().enumerate() {
                                    dst[ix0 + j * stride] += v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dst = src` for the short runs of im2col (one output row, often under 32 floats) without a
/// call into `memcpy`: fixed-size (possibly overlapping) block copies the compiler inlines.
#[inline(always)]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    assert_eq!(n, src.len(), "copy_run: lengths differ");
    macro_rules! two_blocks {
        ($b:literal) => {{
            dst[..$b].copy_from_slice(&src[..$b]);
            dst[n - $b..].copy_from_slice(&src[n - $b..]);
        }};
    }
    match n {
        0 => {}
        1 => dst[0] = src[0],
        2..=3 => two_blocks!(2),
        4..=7 => two_blocks!(4),
        8..=15 => two_blocks!(8),
        16..=31 => two_blocks!(16),
        32..=63 => two_blocks!(32),
        _ => dst.copy_from_slice(src),
    }
}

/// `dst = 0` for short runs, as [`copy_run`].
#[inline(always)]
fn zero_run(dst: &mut [f32]) {
    let n = dst.len();
    macro_rules! two_blocks {
        ($b:literal) => {{
            dst[..$b].copy_from_slice(&[0f32; $b]);
            dst[n - $b..].copy_from_slice(&[0f32; $b]);
        }};
    }
    match n {
        0 => {}
        1 => dst[0] = 0.0,
        2..=3 => two_blocks!(2),
        4..=7 => two_blocks!(4),
        8..=15 => two_blocks!(8),
        16..=31 => two_blocks!(16),
        32..=63 => two_blocks!(32),
        _ => dst.fill(0.0),
    }
}

/// Runs `job(chunk index, sample range)` over the chunks, in parallel when there are enough,
/// handing each the number of threads its GEMMs may use.
fn for_chunks<T: Send>(
    g: &Geometry,
    exec: Exec,
    parts: Vec<T>,
    job: impl Fn(T, std::ops::Range<usize>, usize) + Sync + Send,
) {
    let work = g.batch * g.out * g.k() * g.l();
    run_chunks(g.chunks(), exec.threads_for(work), parts, job);
}

/// Runs `job(part, chunk, threads)` for each chunk with its part of the output: chunks in
/// parallel when there are several and `threads > 1`, each chunk then getting the threads left
/// over for its own products (shared by the dense and the sparse convolution).
pub(crate) fn run_chunks<T: Send>(
    chunks: Vec<std::ops::Range<usize>>,
    threads: usize,
    parts: Vec<T>,
    job: impl Fn(T, std::ops::Range<usize>, usize) + Sync + Send,
) {
    let inner = (threads / chunks.len().max(1)).max(1);
    let items: Vec<_> = parts.into_iter().zip(chunks).collect();
    if threads > 1 && items.len() > 1 {
        items.into_par_iter().for_each(|(p, r)| job(p, r, inner));
    } else {
        items.into_iter().for_each(|(p, r)| job(p, r, inner));
    }
}

/// Splits `buf` (batch-major, `per_sample` values a sample) at the chunks' boundaries.
fn split_chunks<'b, T>(g: &Geometry, mut buf: &'b mut [T], per_sample: usize) -> Vec<&'b mut [T]> {
    let mut out = Vec::new();
    for r in g.chunks() {
        let (head, tail) = buf.split_at_mut(r.len() * per_sample);
        out.push(head);
        buf = tail;
    }
    out
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    crate::contiguous_f32(s, l, "conv2d", what)
}

/// `y = conv(x, w) (+ bias)`; the bias is added while each chunk's output is still in cache.
/// `y` is not zero-filled first: each chunk's GEMM (not accumulating) or copy writes all of its
/// part.
pub(crate) fn forward(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    exec: Exec,
) -> Vec<f32> {
    let (k, l, out) = (g.k(), g.l(), g.out);
    let total = g.batch * out * l;
    let mut y: Vec<f32> = Vec::with_capacity(total);
    let parts = split_chunks(g, &mut y.spare_capacity_mut()[..total], out * l);
    for_chunks(g, exec, parts, |ys, r, threads| {
        let n = r.len();
        // Both temporaries are written in full before they are read (im2col fills every
        // column; the GEMM does not accumulate).
        scratch::with(k * n * l, |cols| {
            g.im2col(x, r, cols);
            if n == 1 {
                // SAFETY: `ys` is this chunk's part of `y`'s spare capacity, `out·l` floats,
                // which the GEMM (not accumulating) writes in full without reading; it does
                // not alias `w` or `cols`.
                unsafe {
                    gemm_raw(
                        (out, l, k),
                        (ys.as_mut_ptr().cast::<f32>(), ys.len()),
                        l,
                        false,
                        w,
                        (1, k),
                        cols,
                        (1, l),
                        threads,
                    )
                };
            } else {
                scratch::with(out * n * l, |yc| {
                    gemm(
                        (out, n * l, k),
                        yc,
                        n * l,
                        false,
                        w,
                        (1, k),
                        cols,
                        (1, n * l),
                        threads,
                    );
                    for si in 0..n {
                        for o in 0..out {
                            let src = &yc[o * n * l + si * l..][..l];
                            let dst = &mut ys[(si * out + o) * l..][..l];
                            dst.iter_mut().zip(src).for_each(|(d, &v)| _ = d.write(v));
                        }
                    }
                });
            }
        });
        // SAFETY: every entry of the part was written above.
        let ys = unsafe { &mut *(ys as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
        if let Some(b) = bias {
            for (i, row) in ys.chunks_mut(l.max(1)).enumerate() {
                let v = b[i % out];
                row.iter_mut().for_each(|e| *e += v);
            }
        }
    });
    // SAFETY: the chunks' parts cover `0..total` and each was written in full.
    unsafe { y.set_len(total) };
    y
}

pub(crate) fn input_grad(g: &Geometry, gy: &[f32], w: &[f32], exec: Exec) -> Vec<f32> {
    let (k, l, out) = (g.k(), g.l(), g.out);
    let mut gx = vec![0f32; g.batch * g.c * g.h * g.w];
    let parts = split_chunks(g, &mut gx, g.c * g.h * g.w);
    for_chunks(g, exec, parts, |gxs, r, threads| {
        let n = r.len();
        let gyc = g.channel_major(gy, &r);
        // cols [K, nL] = Wᵀ [K, out] · gy [out, nL] (written in full: no accumulation)
        scratch::with(k * n * l, |cols| {
            gemm(
                (k, n * l, out),
                cols,
                n * l,
                false,
                w,
                (k, 1),
                &gyc,
                (1, n * l),
                threads,
            );
            g.col2im(cols, n, gxs);
        });
    });
    gx
}

pub(crate) fn weight_grad(g: &Geometry, x: &[f32], gy: &[f32], exec: Exec) -> Vec<f32> {
    let (k, l, out) = (g.k(), g.l(), g.out);
    let chunks = g.chunks().len();
    if chunks == 0 {
        return vec![0f32; out * k];
    }
    let mut partials = vec![0f32; chunks * out * k];
    let parts: Vec<&mut [f32]> = partials.chunks_mut(out * k).collect();
    for_chunks(g, exec, parts, |gw, r, threads| {
        let n = r.len();
        let gyc = g.channel_major(gy, &r);
        let ld = unaliased_stride(n * l);
        scratch::with(k * ld, |cols| {
            g.im2col_strided(x, r, cols, ld);
            // gw [out, K] = gy [out, nL] · colsᵀ [nL, K]
            gemm(
                (out, k, n * l),
                gw,
                k,
                false,
                &gyc,
                (1, n * l),
                cols,
                (ld, 1),
                threads,
            );
        });
    });
    // Sum the chunks in order (the same order for every thread count).
    let (first, rest) = partials.split_at_mut(out * k);
    for p in rest.chunks(out * k) {
        for (a, b) in first.iter_mut().zip(p) {
            *a += b;
        }
    }
    partials.truncate(out * k);
    partials
}

/// A row stride of at least `width` floats that is not a multiple of 64 (256 bytes). The
/// weight gradient's GEMM packs `cols` across its rows (`cols` is the operand whose contiguous
/// dimension is the one summed over), gathering one float from each of 64 consecutive rows; at
/// a stride of 1024 floats (a 32×32 map) those rows are 4 KiB apart and fall into one set of
/// the L1 cache, which holds 8–12 of them. 16 floats more moves each row to the next set.
fn unaliased_stride(width: usize) -> usize {
    if width.is_multiple_of(64) {
        width + 16
    } else {
        width
    }
}

/// `(x, w) → y`.
struct ConvForward {
    g: Geometry,
    exec: Exec,
}

impl CustomOp2 for ConvForward {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        let y = forward(g, slice(xs, xl, "x")?, slice(ws, wl, "w")?, None, self.exec);
        Ok((
            CpuStorage::F32(y),
            Shape::from((g.batch, g.out, g.oh, g.ow)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                w,
                &ConvInputGrad {
                    g: self.g,
                    exec: self.exec,
                },
            )?)
        } else {
            None
        };
        let gw = x.apply_op2_no_bwd(
            &grad,
            &ConvWeightGrad {
                g: self.g,
                exec: self.exec,
            },
        )?;
        Ok((gx, Some(gw)))
    }
}

/// `(x, w, bias) → y`: [`ConvForward`] plus the bias, whose gradient is `∂y` summed over
/// samples and positions.
struct ConvForwardBias(ConvForward);

impl CustomOp3 for ConvForwardBias {
    fn name(&self) -> &'static str {
        "conv2d-gemm-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0.g;
        let b = slice(bs, bl, "bias")?;
        if b.len() != g.out {
            candle_core::bail!(
                "conv2d: bias has {} entries for {} channels",
                b.len(),
                g.out
            );
        }
        let (x, w) = (slice(xs, xl, "x")?, slice(ws, wl, "w")?);
        let y = forward(g, x, w, Some(b), self.0.exec);
        Ok((
            CpuStorage::F32(y),
            Shape::from((g.batch, g.out, g.oh, g.ow)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = self.0.bwd(x, w, res, grad)?;
        let gb = grad
            .contiguous()?
            .apply_op1_no_bwd(&crate::dense::BiasGrad)?;
        Ok((gx, gw, Some(gb)))
    }
}

/// `(∂y, w) → ∂x`.
struct ConvInputGrad {
    g: Geometry,
    exec: Exec,
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        let gx = input_grad(g, slice(gs, gl, "grad")?, slice(ws, wl, "w")?, self.exec);
        Ok((CpuStorage::F32(gx), Shape::from((g.batch, g.c, g.h, g.w))))
    }
}

/// `(x, ∂y) → ∂w`.
struct ConvWeightGrad {
    g: Geometry,
    exec: Exec,
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        let gw = weight_grad(g, slice(xs, xl, "x")?, slice(gs, gl, "grad")?, self.exec);
        Ok((CpuStorage::F32(gw), Shape::from((g.out, g.c, g.kh, g.kw))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random;
    use candle_core::{Device, Var};

    fn close(a: &[f32], b: &[f32], what: &str) {
        crate::testutil::close(a, b, 1e-4, what)
    }

    /// Direct loops: the reference for every product.
    fn reference(x: &[f32], w: &[f32], gy: &[f32], g: &Geometry) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (sp, st, di) = (
            g.spec.padding as isize,
            g.spec.stride as isize,
            g.spec.dilation as isize,
        );
        let mut y = vec![0f64; g.batch * g.out * g.l()];
        let mut gx = vec![0f64; x.len()];
        let mut gw = vec![0f64; w.len()];
        for s in 0..g.batch {
            for o in 0..g.out {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let yi = ((s * g.out + o) * g.oh + oy) * g.ow + ox;
                        for ci in 0..g.c {
                            for ki in 0..g.kh {
                                for kj in 0..g.kw {
                                    let iy = oy as isize * st + ki as isize * di - sp;
                                    let ix = ox as isize * st + kj as isize * di - sp;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xi =
                                        ((s * g.c + ci) * g.h + iy as usize) * g.w + ix as usize;
                                    let wi = ((o * g.c + ci) * g.kh + ki) * g.kw + kj;
                                    y[yi] += x[xi] as f64 * w[wi] as f64;
                                    gx[xi] += gy[yi] as f64 * w[wi] as f64;
                                    gw[wi] += gy[yi] as f64 * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect();
        (f(y), f(gx), f(gw))
    }

    #[test]
    fn all_three_products_match_direct_loops_on_random_shapes() {
        let mut seed = 0x5EED_u64;
        // (batch, c, h, w, out, k, padding, stride, dilation)
        let shapes = [
            (2, 3, 7, 5, 4, 3, 1, 1, 1),
            (3, 2, 8, 8, 5, 3, 0, 2, 1),
            (1, 1, 6, 9, 2, 2, 2, 3, 1),
            (4, 3, 9, 9, 3, 3, 2, 1, 2),
            (5, 2, 4, 4, 6, 1, 0, 1, 1),
            (33, 2, 3, 3, 2, 3, 1, 1, 1), // L = 9: many samples per chunk
            (2, 4, 5, 5, 3, 5, 2, 2, 1),
            // L = 64, one chunk of 3 samples: `cols` rows of 192 floats, 208 apart in the
            // weight gradient (`unaliased_stride`).
            (3, 2, 8, 8, 4, 3, 1, 1, 1),
            // One input channel (an image net's first layer): LeNet-5's, and 20 samples of
            // 40×40 (chunks of one sample).
            (3, 1, 28, 28, 6, 5, 2, 1, 1),
            (2, 1, 7, 5, 3, 3, 0, 1, 1),
            (20, 1, 40, 40, 2, 3, 1, 1, 1),
        ];
        assert_eq!(unaliased_stride(192), 208);
        assert_eq!(unaliased_stride(784), 784);
        for &(b, c, h, wd, out, k, padding, stride, dilation) in &shapes {
            let spec = ConvSpec {
                padding,
                stride,
                dilation,
                groups: 1,
            };
            let g = Geometry::new(&[b, c, h, wd], &[out, c, k, k], spec).unwrap();
            let x = random(b * c * h * wd, &mut seed);
            let w = random(out * c * k * k, &mut seed);
            let gy = random(b * out * g.l(), &mut seed);
            let (ry, rgx, rgw) = reference(&x, &w, &gy, &g);
            for threads in [1, 2, 3] {
                let exec = Exec::default().with_threads(threads);
                let what = format!("{:?} threads {threads}", (b, c, h, wd, out, k, spec));
                // NaN in this thread's scratch buffers: a product that reads a scratch float
                // it did not write fails (on one thread the chunks run here).
                crate::scratch::poison();
                close(&forward(&g, &x, &w, None, exec), &ry, &format!("y {what}"));
                close(&input_grad(&g, &gy, &w, exec), &rgx, &format!("gx {what}"));
                close(&weight_grad(&g, &x, &gy, exec), &rgw, &format!("gw {what}"));
            }
        }
    }

    #[test]
    fn short_run_copies_and_fills_touch_exactly_their_run() {
        // Every length around the block sizes, at offsets that leave guard entries either side.
        for n in 0..=80 {
            let src: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
            let mut buf = vec![-1f32; n + 6];
            copy_run(&mut buf[3..3 + n], &src);
            assert_eq!(&buf[3..3 + n], &src[..], "copy of {n}");
            assert!(buf[..3].iter().chain(&buf[3 + n..]).all(|&v| v == -1.0));
            zero_run(&mut buf[3..3 + n]);
            assert!(buf[3..3 + n].iter().all(|&v| v == 0.0), "zero of {n}");
            assert!(buf[..3].iter().chain(&buf[3 + n..]).all(|&v| v == -1.0));
        }
    }

    #[test]
    fn bit_identical_for_any_thread_count() {
        let mut seed = 7u64;
        let spec = ConvSpec {
            padding: 1,
            ..ConvSpec::default()
        };
        // 40 samples of 6×6: five chunks run in parallel; 1 sample of 40×40 (one chunk): the
        // threads go to the GEMMs.
        for (b, side, c, out) in [(40, 6, 3, 8), (1, 40, 16, 64)] {
            let g = Geometry::new(&[b, c, side, side], &[out, c, 3, 3], spec).unwrap();
            let x = random(b * c * side * side, &mut seed);
            let w = random(out * c * 9, &mut seed);
            let gy = random(b * out * g.l(), &mut seed);
            let run = |t: usize| {
                let e = Exec::default().with_threads(t);
                (
                    forward(&g, &x, &w, None, e),
                    input_grad(&g, &gy, &w, e),
                    weight_grad(&g, &x, &gy, e),
                )
            };
            let one = run(1);
            for t in [2, 4] {
                assert!(run(t) == one, "batch {b}: {t} threads differ from 1");
            }
        }
    }

    #[test]
    fn autograd_matches_candles_conv2d_and_skips_a_constant_input() -> Result<()> {
        let dev = Device::Cpu;
        let mut seed = 11u64;
        let spec = ConvSpec {
            padding: 1,
            stride: 2,
            ..ConvSpec::default()
        };
        let xv = Var::from_vec(random(2 * 3 * 9 * 9, &mut seed), (2, 3, 9, 9), &dev)?;
        let wv = Var::from_vec(random(4 * 3 * 3 * 3, &mut seed), (4, 3, 3, 3), &dev)?;
        let bv = Var::from_vec(random(4, &mut seed), 4, &dev)?;
        let ours = conv2d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), spec)?;
        let theirs = xv
            .as_tensor()
            .conv2d(wv.as_tensor(), 1, 2, 1, 1)?
            .broadcast_add(&bv.as_tensor().reshape((1, 4, 1, 1))?)?;
        close(
            &ours.flatten_all()?.to_vec1()?,
            &theirs.flatten_all()?.to_vec1()?,
            "y",
        );
        let weights = Tensor::from_vec(random(ours.elem_count(), &mut seed), ours.shape(), &dev)?;
        let go = (ours * &weights)?.sum_all()?.backward()?;
        let gt = (theirs * &weights)?.sum_all()?.backward()?;
        for (name, v) in [("x", &xv), ("w", &wv), ("bias", &bv)] {
            close(
                &go.get(v).unwrap().flatten_all()?.to_vec1()?,
                &gt.get(v).unwrap().flatten_all()?.to_vec1()?,
                name,
            );
        }
        // A plain input tensor (a first layer's data) gets no gradient computed.
        let x = xv.as_tensor().detach();
        let g = conv2d(&x, wv.as_tensor(), None, spec)?
            .sum_all()?
            .backward()?;
        assert!(g.get(&x).is_none());
        assert!(g.get(&wv).is_some());
        Ok(())
    }

    #[test]
    fn grouped_convolutions_fall_back_to_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::ones((1, 4, 5, 5), DType::F32, &dev)?;
        let w = Tensor::ones((2, 2, 3, 3), DType::F32, &dev)?;
        let spec = ConvSpec {
            groups: 2,
            ..ConvSpec::default()
        };
        let b = Tensor::new(&[1f32, 2.0], &dev)?;
        let y = conv2d(&x, &w, Some(&b), spec)?;
        assert_eq!(y.dims(), [1, 2, 3, 3]);
        let want: Vec<f32> = [19.0; 9].into_iter().chain([20.0; 9]).collect();
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, want);
        Ok(())
    }

    #[test]
    fn a_kernel_larger_than_the_padded_input_is_an_error() {
        let spec = ConvSpec::default();
        let e = Geometry::new(&[1, 1, 2, 2], &[1, 1, 3, 3], spec).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        let e = Geometry::new(&[1, 2, 4, 4], &[1, 1, 3, 3], spec).unwrap_err();
        assert!(e.to_string().contains("channels"), "{e}");
    }
}
