//! The ω update's group of eight rows (see `crate::cpu::avx512`): per two registers of columns,
//! g~ formed and set aside in L1, dθ formed, and ω ← ω − g~·dθ (clamped at 0 when asked) read
//! and written once — the generic kernel's arithmetic, so the same values bit for bit.

use crate::cpu::avx512::{available, Factors, ROWS};
use crate::cpu::lowrank::LowRank;
use crate::scalar::Real;

/// What every group of one call reads: g~ and dθ as low-rank products.
pub struct Kernel<'a> {
    cols: usize,
    g: Factors<'a>,
    d: Factors<'a>,
    clamp: bool,
}

impl<'a> Kernel<'a> {
    /// The kernel for g~ = `g` and dθ = `d`, when the CPU runs AVX-512 and the maths is float32.
    pub fn new<T: Real>(g: &'a LowRank<T>, d: &'a LowRank<T>, clamp: bool) -> Option<Self> {
        if !available() {
            return None;
        }
        Some(Kernel {
            cols: g.cols,
            g: Factors::new(g)?,
            d: Factors::new(d)?,
            clamp,
        })
    }

    /// Updates rows row0..row0 + ROWS (`omega`: those rows of ω); false (nothing done) where
    /// there is no AVX-512 code (not x86-64).
    pub fn group(&self, row0: usize, omega: &mut [f32]) -> bool {
        // Every access below is within these bounds.
        assert!(omega.len() == ROWS * self.cols);
        self.g.check(row0, self.cols);
        self.d.check(row0, self.cols);
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `Kernel::new` found AVX-512 on this CPU; the bounds were asserted above.
            unsafe { x86::group(self, row0, omega) };
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Kernel, ROWS};
    use crate::cpu::avx512::x86::{first, product, Load};
    use crate::cpu::avx512::LANES;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn group(kn: &Kernel, row0: usize, omega: &mut [f32]) {
        let chunks = kn.cols.div_ceil(LANES);
        let mut c = 0;
        while c + 2 <= chunks {
            update::<2>(kn, row0, omega, c);
            c += 2;
        }
        if c < chunks {
            update::<1>(kn, row0, omega, c);
        }
    }

    /// `C` registers of columns from chunk `c`, for the group's rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn update<const C: usize>(kn: &Kernel, row0: usize, omega: &mut [f32], c: usize) {
        let col = c * LANES;
        // g~ set aside (its 2·ROWS registers and dθ's would not fit in 32 together).
        let g = product::<C>(&kn.g, row0, col);
        let mut g_set = [[[0.0f32; LANES]; C]; ROWS];
        for (dst, acc) in g_set.iter_mut().zip(&g) {
            for (d, &v) in dst.iter_mut().zip(acc) {
                _mm512_storeu_ps(d.as_mut_ptr(), v);
            }
        }
        let d = product::<C>(&kn.d, row0, col);
        let zero = _mm512_setzero_ps();
        let w = omega.as_mut_ptr();
        for (rr, (d_r, g_r)) in d.iter().zip(&g_set).enumerate() {
            for (h, (&dv, gv)) in d_r.iter().zip(g_r).enumerate() {
                // Columns past the last are masked off.
                let m = first(kn.cols - col - h * LANES);
                let at = w.add(rr * kn.cols + col + h * LANES);
                let gv = _mm512_loadu_ps(gv.as_ptr());
                let v = _mm512_sub_ps(f32::load16(at, m), _mm512_mul_ps(gv, dv));
                // max(0, v) returns its second operand for NaN and for −0, as `v < 0` does.
                let v = if kn.clamp { _mm512_max_ps(zero, v) } else { v };
                _mm512_mask_storeu_ps(at, m, v);
            }
        }
    }
}
