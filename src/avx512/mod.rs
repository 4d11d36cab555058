//! The float32 kernels' steady state written out in AVX-512 intrinsics, eight rows of the
//! (out, in) matrix at a time. The generic kernels take four (`lowrank::ROW_BLOCK`): given eight,
//! LLVM vectorized across the rows instead of the columns (gathers and scatters, 10× slower,
//! measured), so these groups are spelled out by hand. Eight rows give the low-rank
//! micro-kernel 16 independent FMA chains and let every vector loaded feed eight FMAs.
//!
//! The maths and the order of each tile's operations are the generic kernels'. A kernel here is
//! built only where the CPU runs AVX-512 and the maths is float32 (`None` otherwise); the rows
//! it does not take (a task's last rows, fewer than eight) go to the generic kernels.

pub mod omega;
pub mod penalty;

use crate::lowrank::LowRank;
use crate::scalar::{Real, Storage};
use std::any::TypeId;

/// Rows of the matrix per group.
pub const ROWS: usize = 8;
/// float32 lanes per 512-bit register.
pub const LANES: usize = 16;

/// `xs` as f32 values, when S is f32.
pub fn as_f32<S: Storage>(xs: &[S]) -> Option<&[f32]> {
    // SAFETY: S is f32 (same type, so same size, alignment and validity).
    (TypeId::of::<S>() == TypeId::of::<f32>())
        .then(|| unsafe { &*(xs as *const [S] as *const [f32]) })
}

/// `xs` as f32 values, when S is f32.
pub fn as_f32_mut<S: Storage>(xs: &mut [S]) -> Option<&mut [f32]> {
    if TypeId::of::<S>() == TypeId::of::<f32>() {
        // SAFETY: as in `as_f32`; the borrow is moved into the result.
        Some(unsafe { &mut *(xs as *mut [S] as *mut [f32]) })
    } else {
        None
    }
}

/// Whether the AVX-512 kernels run here.
fn available() -> bool {
    crate::simd::level() == crate::simd::Level::Avx512
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
    fn new<T: Real>(m: &'a LowRank<T>) -> Option<Self> {
        let (left_t, left_stride, right, right_stride) = m.factors();
        Some(Factors {
            k: m.k,
            left_t: as_f32(left_t)?,
            left_stride,
            right: as_f32(right)?,
            right_stride,
        })
    }

    /// Asserts what the micro-kernel's unchecked loads rely on: rows row0..row0 + ROWS exist
    /// and R's rows hold `cols` rounded up to whole registers.
    fn check(&self, row0: usize, cols: usize) {
        let k = self.k;
        assert!(self.right_stride >= cols.div_ceil(LANES) * LANES);
        assert!(self.right.len() >= k * self.right_stride);
        assert!(k == 0 || self.left_t.len() >= (k - 1) * self.left_stride + row0 + ROWS);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Factors, LANES, ROWS};
    use std::arch::x86_64::*;

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
    /// Safety: AVX-512F; `f.check(row0, cols)` passed and col + 16·C ≤ cols rounded up to 16.
    #[target_feature(enable = "avx512f")]
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
