//! The penalty's group of eight rows (see `crate::cpu::avx512`): per tile of 128 columns, D in
//! registers, G = Ω⊙D stored to an L1 buffer with P's terms summed as it leaves, then G·Aᵀ (per
//! row, kept as 16 lanes until the group ends) and Bᵀ·G (added into the task's partial); a tile
//! whose Ω has a negative entry is formed again with Σ |Ω|·D² summed beside P.

use crate::cancellation::Sums;
use crate::cpu::avx512::{available, cast, Factors, Rows, LANES, ROWS};
use crate::cpu::dense::Dense;
use crate::cpu::lowrank::{conflict_free_stride, LowRank};
use crate::scalar::Real;

/// A zero-padded so whole registers of columns can be loaded up to the last column, for the
/// gradient passes (each thread of a call packs its own).
pub struct PaddedA {
    cols: usize,
    r: usize,
    /// r rounded up to even: the gradient passes take the rank terms two at a time.
    r_pad: usize,
    /// A (r_pad rows of `stride`, zeros beyond r and beyond its columns).
    rows: Vec<f32>,
    stride: usize,
}

impl PaddedA {
    /// `a` padded, when the CPU runs AVX-512 and the maths is float32.
    pub fn new<T: Real>(a: &Dense<T>) -> Option<Self> {
        if !available() {
            return None;
        }
        let data: &[f32] = cast(&a.data)?;
        let (r, cols) = (a.rows, a.cols);
        let r_pad = r.div_ceil(2) * 2;
        let stride = conflict_free_stride::<f32>(cols);
        let mut rows = vec![0.0f32; r_pad * stride];
        for (dst, src) in rows.chunks_exact_mut(stride).zip(data.chunks_exact(cols)) {
            dst[..cols].copy_from_slice(src);
        }
        Some(PaddedA {
            cols,
            r,
            r_pad,
            rows,
            stride,
        })
    }
}

/// What every group of one call reads: D = L·R, and A padded.
pub struct Kernel<'a> {
    cols: usize,
    d: Factors<'a>,
    r: usize,
    r_pad: usize,
    a_rows: &'a [f32],
    a_stride: usize,
}

/// The group's gradient outputs.
pub struct GroupGrads<'a> {
    /// B's rows of the group (ROWS × r, row-major).
    pub b_rows: &'a [f32],
    /// The task's Bᵀ·G partial (r rows of `ga_stride`): the group's share is added.
    pub ga: &'a mut [f32],
    pub ga_stride: usize,
    /// The group's rows of G·Aᵀ (ROWS × r): written, times `scale`.
    pub gb: &'a mut [f32],
    pub scale: f32,
}

impl<'a> Kernel<'a> {
    /// The kernel for D = `d` and A = `a` (float32 maths: `PaddedA::new` said so).
    pub fn new<T: Real>(d: &'a LowRank<T>, a: &'a PaddedA) -> Option<Self> {
        assert_eq!(a.cols, d.cols, "A and D have the same columns");
        Some(Kernel {
            cols: d.cols,
            d: Factors::new(d)?,
            r: a.r,
            r_pad: a.r_pad,
            a_rows: &a.rows,
            a_stride: a.stride,
        })
    }

    /// Scratch for [`Self::group`]'s row-gradient lanes.
    pub fn lanes(&self) -> Vec<[f32; LANES]> {
        vec![[0.0; LANES]; ROWS * self.r_pad]
    }

    /// P's sums over rows row0..row0 + ROWS of D (`om`: those rows of Ω, float32, bfloat16 or
    /// float16), with the gradients when asked for (None only where there is no AVX-512 code:
    /// not x86-64).
    pub fn group(
        &self,
        row0: usize,
        om: Rows<'_>,
        grads: Option<GroupGrads<'_>>,
        lanes: &mut [[f32; LANES]],
    ) -> Option<Sums> {
        let (cols, r) = (self.cols, self.r);
        let whole = cols.div_ceil(LANES) * LANES;
        // Every access below is within these bounds (the loads run to `whole` columns).
        assert!(om.len() == ROWS * cols && lanes.len() == ROWS * self.r_pad);
        self.d.check(row0, cols);
        assert!(self.a_stride >= whole && self.a_rows.len() == self.r_pad * self.a_stride);
        if let Some(g) = &grads {
            assert!(g.b_rows.len() == ROWS * r && g.gb.len() == ROWS * r);
            assert!(g.ga_stride >= whole && g.ga.len() >= r * g.ga_stride);
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::new` found AVX-512 on this CPU; the bounds were asserted above.
        unsafe {
            Some(match om {
                Rows::F32(om) => x86::group(self, row0, om, grads, lanes),
                Rows::Bf16(om) => x86::group(self, row0, om, grads, lanes),
                Rows::F16(om) => x86::group(self, row0, om, grads, lanes),
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GroupGrads, Kernel, Sums, LANES, ROWS};
    use crate::cpu::avx512::x86::{first, product, Load};
    use crate::cpu::lowrank::TILE_COLS;
    use std::arch::x86_64::*;

    /// G of one tile: ROWS rows of TILE_COLS, 64-byte aligned for whole-vector loads.
    #[repr(C, align(64))]
    struct Tile([[f32; TILE_COLS]; ROWS]);

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn group<W: Load>(
        kn: &Kernel,
        row0: usize,
        om: &[W],
        mut grads: Option<GroupGrads<'_>>,
        lanes: &mut [[f32; LANES]],
    ) -> Sums {
        let cols = kn.cols;
        let om = om.as_ptr();
        for x in lanes.iter_mut() {
            *x = [0.0; LANES];
        }
        let lanes = lanes.as_mut_ptr() as *mut f32;
        let mut g = Tile([[0.0; TILE_COLS]; ROWS]);
        let mut total = Sums::default();
        for j0 in (0..cols).step_by(TILE_COLS) {
            let n = TILE_COLS.min(cols - j0);
            let mut tile = TileSums::new();
            tile.pass::<W, false>(kn, row0, om, j0, n, &mut g);
            // Ω ≥ 0 is the rule: a tile with a negative entry is formed again, its terms'
            // magnitude summed beside them (G comes out the same).
            if tile.negative != 0 {
                tile = TileSums::new();
                tile.pass::<W, true>(kn, row0, om, j0, n, &mut g);
            }
            total.add(tile.sums());
            if let Some(gr) = grads.as_mut() {
                row_gradients(kn, &g, j0, n.div_ceil(LANES), lanes);
                column_gradients(kn, &g, j0, n.div_ceil(LANES), gr);
            }
        }
        if let Some(gr) = grads {
            for rr in 0..ROWS {
                for q in 0..kn.r {
                    let v = _mm512_loadu_ps(lanes.add((rr * kn.r_pad + q) * LANES));
                    gr.gb[rr * kn.r + q] = _mm512_reduce_add_ps(v) * gr.scale;
                }
            }
        }
        total
    }

    /// P's terms over one tile, per lane, and Σ |Ω|·D² beside them in a `MIXED` pass.
    struct TileSums {
        p: [__m512; 4],
        magnitude: [__m512; 4],
        /// Lanes where Ω < 0 was seen.
        negative: __mmask16,
    }

    impl TileSums {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn new() -> Self {
            let zero = _mm512_setzero_ps();
            TileSums {
                p: [zero; 4],
                magnitude: [zero; 4],
                negative: 0,
            }
        }

        /// D, G and the sums over the tile of `n` columns from `j0`, two chunks of 16 columns at
        /// a time.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn pass<W: Load, const MIXED: bool>(
            &mut self,
            kn: &Kernel,
            row0: usize,
            om: *const W,
            j0: usize,
            n: usize,
            g: &mut Tile,
        ) {
            let chunks = n.div_ceil(LANES);
            let mut c = 0;
            while c + 2 <= chunks {
                d_chunks::<W, 2, MIXED>(kn, row0, om, j0, c, n, g, self);
                c += 2;
            }
            if c < chunks {
                d_chunks::<W, 1, MIXED>(kn, row0, om, j0, c, n, g, self);
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn sums(&self) -> Sums {
            let total = |v: &[__m512; 4]| {
                let s = _mm512_add_ps(_mm512_add_ps(v[0], v[1]), _mm512_add_ps(v[2], v[3]));
                _mm512_reduce_add_ps(s) as f64
            };
            let p = total(&self.p);
            Sums {
                p,
                magnitude: if self.negative != 0 {
                    total(&self.magnitude)
                } else {
                    p
                },
            }
        }
    }

    /// D over `C` chunks of 16 columns from tile chunk `c` for the group's rows (2·ROWS or
    /// ROWS accumulators), then G = Ω⊙D into `g` and Ω·D² into `sums`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn d_chunks<W: Load, const C: usize, const MIXED: bool>(
        kn: &Kernel,
        row0: usize,
        om: *const W,
        j0: usize,
        c: usize,
        n: usize,
        g: &mut Tile,
        sums: &mut TileSums,
    ) {
        let acc = product::<C>(&kn.d, row0, j0 + c * LANES);
        for (rr, acc_r) in acc.iter().enumerate() {
            for (h, &d) in acc_r.iter().enumerate() {
                let col = (c + h) * LANES;
                // Columns past the last are masked off: Ω reads as 0 there (and D is 0, R being
                // zero-padded), so G's padding is 0 for the gradient passes.
                let w = W::load16(om.add(rr * kn.cols + j0 + col), first(n - col));
                let gv = _mm512_mul_ps(w, d);
                let s = (rr * C + h) % 4;
                sums.p[s] = _mm512_fmadd_ps(gv, d, sums.p[s]);
                sums.negative |= _mm512_cmp_ps_mask::<_CMP_LT_OQ>(w, _mm512_setzero_ps());
                if MIXED {
                    let (ga, da) = (_mm512_abs_ps(gv), _mm512_abs_ps(d));
                    sums.magnitude[s] = _mm512_fmadd_ps(ga, da, sums.magnitude[s]);
                }
                _mm512_store_ps(g.0[rr].as_mut_ptr().add(col), gv);
            }
        }
    }

    /// (G·Aᵀ)[row, q] partials over the tile, two rank terms at a time: 2·ROWS accumulators,
    /// each vector of G loaded feeding two FMAs and each of A eight.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn row_gradients(kn: &Kernel, g: &Tile, j0: usize, chunks: usize, lanes: *mut f32) {
        for q0 in (0..kn.r_pad).step_by(2) {
            let at = |rr: usize, t: usize| lanes.add((rr * kn.r_pad + q0 + t) * LANES);
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            for (rr, acc_r) in acc.iter_mut().enumerate() {
                acc_r[0] = _mm512_loadu_ps(at(rr, 0));
                acc_r[1] = _mm512_loadu_ps(at(rr, 1));
            }
            let a0 = kn.a_rows.as_ptr().add(q0 * kn.a_stride + j0);
            let a1 = a0.add(kn.a_stride);
            for c in 0..chunks {
                let (x0, x1) = (
                    _mm512_loadu_ps(a0.add(c * LANES)),
                    _mm512_loadu_ps(a1.add(c * LANES)),
                );
                for (rr, acc_r) in acc.iter_mut().enumerate() {
                    let gv = _mm512_load_ps(g.0[rr].as_ptr().add(c * LANES));
                    acc_r[0] = _mm512_fmadd_ps(gv, x0, acc_r[0]);
                    acc_r[1] = _mm512_fmadd_ps(gv, x1, acc_r[1]);
                }
            }
            for (rr, acc_r) in acc.iter().enumerate() {
                _mm512_storeu_ps(at(rr, 0), acc_r[0]);
                _mm512_storeu_ps(at(rr, 1), acc_r[1]);
            }
        }
    }

    /// (Bᵀ·G)[q, tile] += Σ_rows B[row, q]·G[row, tile], two rank terms at a time: their 2·ROWS
    /// coefficients stay in registers while the tile's chunks pass; each term's sum is split in
    /// two chains of four rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn column_gradients(
        kn: &Kernel,
        g: &Tile,
        j0: usize,
        chunks: usize,
        out: &mut GroupGrads<'_>,
    ) {
        let r = kn.r;
        for q0 in (0..r).step_by(2) {
            let terms = if q0 + 1 < r { 2 } else { 1 };
            let mut coef = [[_mm512_setzero_ps(); ROWS]; 2];
            for (t, coef_t) in coef.iter_mut().enumerate().take(terms) {
                for (rr, x) in coef_t.iter_mut().enumerate() {
                    *x = _mm512_set1_ps(out.b_rows[rr * r + q0 + t]);
                }
            }
            for c in 0..chunks {
                let mut gv = [_mm512_setzero_ps(); ROWS];
                for (rr, v) in gv.iter_mut().enumerate() {
                    *v = _mm512_load_ps(g.0[rr].as_ptr().add(c * LANES));
                }
                for (t, coef_t) in coef.iter().enumerate().take(terms) {
                    let dst = out
                        .ga
                        .as_mut_ptr()
                        .add((q0 + t) * out.ga_stride + j0 + c * LANES);
                    let mut lo = _mm512_loadu_ps(dst);
                    let mut hi = _mm512_mul_ps(coef_t[ROWS / 2], gv[ROWS / 2]);
                    for rr in 0..ROWS / 2 {
                        lo = _mm512_fmadd_ps(coef_t[rr], gv[rr], lo);
                    }
                    for rr in ROWS / 2 + 1..ROWS {
                        hi = _mm512_fmadd_ps(coef_t[rr], gv[rr], hi);
                    }
                    _mm512_storeu_ps(dst, _mm512_add_ps(lo, hi));
                }
            }
        }
    }
}
