//! [`PackedNm`]: an N:M weight re-laid out once for fast batch-1 inference.
//!
//! Rows are taken 16 at a time and stored **group-major**: for row block `b`, group `g` and
//! slot `t < n`, 16 values (one per row) and their 16 positions are contiguous. A batch-1
//! forward then keeps one register of 16 inputs, picks each row's input with one in-register
//! permute (`vpermps`) and accumulates 16 rows at once: no gathers, one permute per 16 products,
//! the input read contiguously. This is what makes sparse N:M patterns with few kept weights
//! (1:16, 1:8) fast at batch 1, where the per-row kernels are bound by gather throughput.
//! Build it once per trained layer, like any inference layout.

use sparse_formats::NmSparse;

use crate::cpu::check;
use crate::{Exec, Isa, KernelError};

/// Rows per block (one AVX-512 register of f32).
const RB: usize = 16;

/// An N:M weight in the row-blocked, group-major layout; see the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedNm {
    rows: usize,
    fan_in: usize,
    n: usize,
    m: usize,
    /// `[blocks][groups][n][16]`, zero for padding rows.
    values: Vec<f32>,
    /// The position (`< m`) of each value in its group, same order as `values`: one byte per
    /// value, or for `m ≤ 4` two bits per value (16 lanes in one little-endian `u32`), which
    /// takes a 2:4 weight from 5 to 4.25 bytes per kept value — it is memory-bound at batch 1.
    positions: Vec<u8>,
    /// 2 or 8.
    pos_bits: u8,
}

impl PackedNm {
    /// Re-lays out an N:M weight with consecutive groups (`group_stride = 1`) and `m`
    /// dividing 16.
    pub fn new(w: &NmSparse) -> Result<Self, KernelError> {
        let p = w.pattern();
        if p.group_stride != 1 || 16 % p.m != 0 {
            return Err(KernelError::Unsupported(format!(
                "packed N:M needs consecutive groups and M dividing 16, got {}:{} with group stride {}",
                p.n, p.m, p.group_stride
            )));
        }
        let (rows, fan_in, n) = (w.rows(), w.fan_in(), p.n);
        let groups = fan_in / p.m;
        let blocks = rows.div_ceil(RB);
        let kpr = w.kept_per_row();
        let pos_bits: u8 = if p.m <= 4 { 2 } else { 8 };
        let mut values = vec![0.0f32; blocks * groups * n * RB];
        let mut positions = vec![0u8; values.len() * pos_bits as usize / 8];
        for r in 0..rows {
            let (b, lane) = (r / RB, r % RB);
            for g in 0..groups {
                for t in 0..n {
                    let src = r * kpr + g * n + t;
                    let slot = (b * groups + g) * n + t;
                    values[slot * RB + lane] = w.values()[src];
                    let pos = w.positions()[src];
                    if pos_bits == 8 {
                        positions[slot * RB + lane] = pos;
                    } else {
                        positions[slot * 4 + lane / 4] |= pos << (2 * (lane % 4));
                    }
                }
            }
        }
        Ok(PackedNm {
            rows,
            fan_in,
            n,
            m: p.m,
            values,
            positions,
            pos_bits,
        })
    }

    /// Position of `lane` in packed slot `slot`.
    #[inline]
    fn position(&self, slot: usize, lane: usize) -> usize {
        if self.pos_bits == 8 {
            self.positions[slot * RB + lane] as usize
        } else {
            ((self.positions[slot * 4 + lane / 4] >> (2 * (lane % 4))) & 3) as usize
        }
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Dense fan-in.
    pub fn fan_in(&self) -> usize {
        self.fan_in
    }

    /// Bytes of the packed weight (values and positions, padding included).
    pub fn bytes(&self) -> usize {
        self.values.len() * 4 + self.positions.len()
    }

    /// `y [rows] = W · x + bias` for one input `x [fan_in]`.
    pub fn forward_one(
        &self,
        x: &[f32],
        bias: Option<&[f32]>,
        exec: Exec,
    ) -> Result<Vec<f32>, KernelError> {
        check("x", x.len(), self.fan_in)?;
        if let Some(b) = bias {
            check("bias", b.len(), self.rows)?;
        }
        let blocks = self.rows.div_ceil(RB);
        let mut y = vec![0.0f32; blocks * RB];
        #[cfg(target_arch = "x86_64")]
        if exec.isa() == Isa::Avx512 {
            // SAFETY: the ISA was checked by `Exec`; `x` has `fan_in = groups · m` entries and
            // every position is < m (checked by `NmSparse`), so every load and permute index is
            // in range; `values`/`positions` hold `blocks · groups · n · 16` entries and `y`
            // `blocks · 16`.
            unsafe { self.forward_avx512(x, &mut y) };
            return Ok(self.finish(y, bias));
        }
        let _ = exec;
        let groups = self.fan_in / self.m;
        for b in 0..blocks {
            for g in 0..groups {
                let xg = &x[g * self.m..(g + 1) * self.m];
                for t in 0..self.n {
                    let slot = (b * groups + g) * self.n + t;
                    for lane in 0..RB {
                        y[b * RB + lane] +=
                            self.values[slot * RB + lane] * xg[self.position(slot, lane)];
                    }
                }
            }
        }
        Ok(self.finish(y, bias))
    }

    fn finish(&self, mut y: Vec<f32>, bias: Option<&[f32]>) -> Vec<f32> {
        y.truncate(self.rows);
        if let Some(b) = bias {
            for (v, bb) in y.iter_mut().zip(b) {
                *v += bb;
            }
        }
        y
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
    unsafe fn forward_avx512(&self, x: &[f32], y: &mut [f32]) {
        use std::arch::x86_64::*;
        let (n, m) = (self.n, self.m);
        let groups = self.fan_in / m;
        let per_reg = 16 / m; // groups per register of 16 inputs
        let (vp, pp, xp) = (self.values.as_ptr(), self.positions.as_ptr(), x.as_ptr());
        let two_bit = self.pos_bits == 2;
        let shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let three = _mm512_set1_epi32(3);
        // Registers of 16 inputs, each serving `per_reg` groups: nested loops, so that no
        // division by the run-time `per_reg` sits in the inner loop (it took ~5× the time of the
        // products themselves).
        let regs = groups.div_ceil(per_reg);
        for b in 0..y.len() / RB {
            let mut a0 = _mm512_setzero_ps();
            let mut a1 = _mm512_setzero_ps();
            let mut odd = false;
            for r in 0..regs {
                let xr = if (r + 1) * 16 <= x.len() {
                    _mm512_loadu_ps(xp.add(r * 16))
                } else {
                    // Fewer than 16 inputs left (fan_in not a multiple of 16).
                    let left = x.len() - r * 16;
                    _mm512_maskz_loadu_ps(((1u32 << left) - 1) as __mmask16, xp.add(r * 16))
                };
                for q in 0..per_reg.min(groups - r * per_reg) {
                    let g = r * per_reg + q;
                    let off = _mm512_set1_epi32((q * m) as i32);
                    for t in 0..n {
                        let slot = (b * groups + g) * n + t;
                        let base = slot * RB;
                        let pos = if two_bit {
                            let word = (pp.add(slot * 4) as *const i32).read_unaligned();
                            _mm512_and_si512(
                                _mm512_srlv_epi32(_mm512_set1_epi32(word), shifts),
                                three,
                            )
                        } else {
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(pp.add(base) as *const __m128i))
                        };
                        let sel = _mm512_permutexvar_ps(_mm512_add_epi32(pos, off), xr);
                        let v = _mm512_loadu_ps(vp.add(base));
                        if odd {
                            a1 = _mm512_fmadd_ps(v, sel, a1);
                        } else {
                            a0 = _mm512_fmadd_ps(v, sel, a0);
                        }
                        odd = !odd;
                    }
                }
            }
            _mm512_storeu_ps(y.as_mut_ptr().add(b * RB), _mm512_add_ps(a0, a1));
        }
    }
}
