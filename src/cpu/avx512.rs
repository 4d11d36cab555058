//! The float32 kernels' steady state written out in AVX-512 intrinsics, eight rows of the
//! (out, in) matrix at a time. The generic kernels take four (`lowrank::ROW_BLOCK`): given eight,
//! LLVM vectorized across the rows instead of the columns (gathers and scatters, 10× slower,
//! measured), so these groups are spelled out by hand. Eight rows give the low-rank
//! micro-kernel 16 independent FMA chains and let every vector loaded feed eight FMAs.
//!
//! The maths and the order of each tile's operations are the generic kernels'. A kernel here is
//! built only where the CPU runs AVX-512 and the maths is float32 (`None` otherwise); the
//! penalty's reads Ω stored as float32, bfloat16 or float16 (`Rows`). The rows it does not take
//! (a task's last rows, fewer than eight) go to the generic kernels. The groups themselves are in
//! `omega_avx512` and `penalty_avx512`; this module holds what both use.

use crate::cpu::lowrank::LowRank;
use crate::scalar::{Real, Storage};
use half::{bf16, f16};
use std::any::TypeId;

/// Rows of the matrix per group.
pub const ROWS: usize = 8;
/// float32 lanes per 512-bit register.
pub const LANES: usize = 16;

/// `xs` as W values, when S is W.
pub fn cast<S: Storage, W: Storage>(xs: &[S]) -> Option<&[W]> {
    // SAFETY: S is W (same type, so same size, alignment and validity).
    (TypeId::of::<S>() == TypeId::of::<W>()).then(|| unsafe { &*(xs as *const [S] as *const [W]) })
}

/// `xs` as f32 values, when S is f32.
pub fn as_f32_mut<S: Storage>(xs: &mut [S]) -> Option<&mut [f32]> {
    if TypeId::of::<S>() == TypeId::of::<f32>() {
        // SAFETY: as in `cast`; the borrow is moved into the result.
        Some(unsafe { &mut *(xs as *mut [S] as *mut [f32]) })
    } else {
        None
    }
}

/// A stored matrix whose elements the kernels load as 16 float32 lanes at a time.
pub enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Rows<'a> {
    /// `xs` when S is one of the three (float64 storage runs float64 maths: the generic kernels).
    pub fn of<S: Storage>(xs: &'a [S]) -> Option<Self> {
        (cast(xs).map(Rows::F32))
            .or_else(|| cast(xs).map(Rows::Bf16))
            .or_else(|| cast(xs).map(Rows::F16))
    }

    pub fn len(&self) -> usize {
        match self {
            Rows::F32(x) => x.len(),
            Rows::Bf16(x) => x.len(),
            Rows::F16(x) => x.len(),
        }
    }
}

/// Whether the AVX-512 kernels run here.
pub fn available() -> bool {
    crate::cpu::simd::level() == crate::cpu::simd::Level::Avx512
}

/// A float32 `LowRank` L·R in the layout the micro-kernel reads.
pub struct Factors<'a> {
    k: usize,
    /// Lᵀ (k rows of `left_stride`): a group's eight coefficients per term are adjacent.
    left_t: &'a [f32],
    left_stride: usize,
    /// R (k rows of `right_stride`, zeros beyond the last column).
    right: &'a [f32],
    right_stride: usize,
}

impl<'a> Factors<'a> {
    pub fn new<T: Real>(m: &'a LowRank<T>) -> Option<Self> {
        let (left_t, left_stride, right, right_stride) = m.factors();
        Some(Factors {
            k: m.k,
            left_t: cast(left_t)?,
            left_stride,
            right: cast(right)?,
            right_stride,
        })
    }

    /// Asserts what the micro-kernel's unchecked loads rely on: rows row0..row0 + ROWS exist
    /// and R's rows hold `cols` rounded up to whole registers.
    pub fn check(&self, row0: usize, cols: usize) {
        let k = self.k;
        assert!(self.right_stride >= cols.div_ceil(LANES) * LANES);
        assert!(self.right.len() >= k * self.right_stride);
        assert!(k == 0 || self.left_t.len() >= (k - 1) * self.left_stride + row0 + ROWS);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{Factors, LANES, ROWS};
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// Storage the kernels load as float32 lanes.
    pub trait Load: Copy {
        /// 16 values from `p` as float32, lanes outside `m` zero (and not read).
        ///
        /// Safety: AVX-512 F/BW/VL; the lanes in `m` are readable.
        unsafe fn load16(p: *const Self, m: __mmask16) -> __m512;
    }

    impl Load for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const Self, m: __mmask16) -> __m512 {
            _mm512_maskz_loadu_ps(m, p)
        }
    }

    impl Load for bf16 {
        /// The 16 bits of each value become the top half of a float32 (exact).
        #[inline(always)]
        unsafe fn load16(p: *const Self, m: __mmask16) -> __m512 {
            let bits = _mm256_maskz_loadu_epi16(m, p as *const i16);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
        }
    }

    impl Load for f16 {
        #[inline(always)]
        unsafe fn load16(p: *const Self, m: __mmask16) -> __m512 {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
        }
    }

    /// Lanes 0..n set (all 16 from n = 16 on).
    #[inline(always)]
    pub fn first(n: usize) -> __mmask16 {
        if n >= LANES {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    /// (L·R)[row0 + rr, col + 16h ..][..16] for the group's rows rr and `C` registers of
    /// columns h: ROWS·C accumulators, each vector of R loaded feeding ROWS FMAs. The terms are
    /// added in order, as in the generic micro-kernel, so the values are the same bit for bit.
    ///
    /// Safety: AVX-512 F/BW/VL; `f.check(row0, cols)` passed and col + 16·C ≤ cols rounded up to 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn product<const C: usize>(
        f: &Factors,
        row0: usize,
        col: usize,
    ) -> [[__m512; C]; ROWS] {
        let mut acc = [[_mm512_setzero_ps(); C]; ROWS];
        for q in 0..f.k {
            let rp = f.right.as_ptr().add(q * f.right_stride + col);
            let lp = f.left_t.as_ptr().add(q * f.left_stride + row0);
            let mut rv = [_mm512_setzero_ps(); C];
            for (h, v) in rv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(rp.add(h * LANES));
            }
            for (rr, acc_r) in acc.iter_mut().enumerate() {
                let coef = _mm512_set1_ps(*lp.add(rr));
                for h in 0..C {
                    acc_r[h] = _mm512_fmadd_ps(coef, rv[h], acc_r[h]);
                }
            }
        }
        acc
    }
}
