//! The fused penalty on the CPU (Eq. 14, 16): one pass over Ω gives P and, when asked for,
//! ∂P/∂A and ∂P/∂B.
//!
//! Longer than most files here on purpose: the tile loop, P's sums and both gradient
//! contractions share one task's buffers and registers, and read best together (about 500
//! lines of code and 270 of tests).

use crate::cancellation::Sums;
use crate::cpu::avx512;
use crate::cpu::dense::Dense;
use crate::cpu::lowrank::{
    conflict_free_stride, rows_per_task, Finish, LowRank, ROW_BLOCK, TILE_COLS,
};
use crate::cpu::penalty_avx512 as wide;
use crate::cpu::pool;
use crate::cpu::simd::{multiversion, Madd};
use crate::error::Result;
use crate::scalar::{Real, Storage};
#[cfg(test)]
use half::{bf16, f16};

/// Where [`penalty_rows`] writes the gradients, each multiplied by `scale`: Bᵀ·G into `ga`
/// (r × in) and G·Aᵀ into `gb` (out × r), both row-major.
pub struct GradOut<'a, T> {
    pub ga: &'a mut [T],
    pub gb: &'a mut [T],
    pub scale: T,
}

/// Whether any stored value is below zero, as T sees it (NaN is not). Eight running minima,
/// so the loop vectorizes.
#[inline(always)]
fn has_negative<S: Storage, T: Real>(xs: &[S]) -> bool {
    let min = |m: T, x: S| {
        let v = T::load(x);
        if v < m {
            v
        } else {
            m
        }
    };
    let mut lanes = [T::zero(); 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(T::zero(), |m, &x| min(m, x));
    for chunk in chunks {
        for l in 0..8 {
            lanes[l] = min(lanes[l], chunk[l]);
        }
    }
    tail < T::zero() || lanes.iter().any(|&m| m < T::zero())
}

/// One pass over Ω: per tile of `ROW_BLOCK` rows, D is formed in L1 buffers, G = Ω⊙D, and P,
/// G·Aᵀ (per row) and Bᵀ·G (per task, reduced in task order — deterministic) are accumulated.
/// Returns P's sums; the gradients (without the 2s factor, times `out.scale`) go to `out`.
/// `d` lays out D = L·R (called once by each thread).
pub fn penalty_rows<S: Storage, T: Real>(
    omega: &[S],
    d: impl Fn() -> Result<LowRank<T>> + Sync,
    a: &Dense<T>,
    b: &Dense<T>,
    out: Option<GradOut<'_, T>>,
) -> Result<Sums> {
    let (rows, cols, r) = (b.rows, a.cols, a.rows);
    let grads = out.is_some();
    let (ga, gb, scale) = match out {
        Some(GradOut { ga, gb, scale }) => (ga, gb, scale),
        None => (&mut [][..], &mut [][..], T::one()),
    };
    debug_assert!(!grads || (ga.len() == r * cols && gb.len() == rows * r));
    if rows == 0 || cols == 0 {
        ga.fill(T::zero());
        gb.fill(T::zero());
        return Ok(Sums::default());
    }
    let layout = GradLayout::new::<T>(r, cols);
    // Each thread lays out D and packs A for itself, as the ω update does (`crate::omega`):
    // 192 × 576 on two threads, 98.9 → 84.1 µs (10th percentile).
    let layouts = || -> Result<_> { Ok((d()?, layout.pack(a), wide::PaddedA::new(a))) };
    // Each task owns an (r, in) partial of Bᵀ·G, added up serially below: ~4 tasks per thread
    // keeps them few (at most 32 tasks before: 576 × 576 on two threads 190 → 166 µs, 1024 × 3072
    // on one 4.25 → 2.50 ms, 10th percentiles). So ∂P/∂A's last bits depend on the thread count.
    let rpt = rows_per_task(rows, cols, rows.div_ceil(4 * pool::wanted_threads()));
    let tasks: Vec<_> = if grads {
        let gb_chunks = gb.chunks_mut(rpt * r).map(Some);
        omega.chunks(rpt * cols).zip(gb_chunks).collect()
    } else {
        omega.chunks(rpt * cols).map(|om| (om, None)).collect()
    };
    let partials = pool::run_items_with(tasks, layouts, |layouts, task, (om, gb_rows)| {
        let (d, a_packed, padded) = layouts.as_ref().map_err(Clone::clone)?;
        // Float32 maths on an AVX-512 CPU: groups of 8 rows take the hand-written kernel.
        let fast = padded.as_ref().and_then(|a| wide::Kernel::new(d, a));
        let gb_rows = gb_rows.map(|rows| (rows, scale));
        Ok(penalty_task(
            task * rpt,
            om,
            gb_rows,
            d,
            b,
            &layout,
            a_packed,
            fast.as_ref(),
        ))
    })?
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let mut total = Sums::default();
    let mut parts = Vec::with_capacity(partials.len());
    for (sums, part) in partials {
        total.add(sums);
        parts.push(part);
    }
    if grads {
        sum_partials(ga, cols, &parts, layout.ga_stride, scale);
    }
    Ok(total)
}

multiversion!(fn sum_partials<T: Real>(ga: &mut [T], cols: usize, parts: &[Vec<T>], stride: usize, scale: T) = sum_partials_body);

/// ∂P/∂A = `scale`·Σ of the tasks' Bᵀ·G partials (r rows of `stride`), added in task order —
/// so the bits do not depend on which thread ran which task — one row of `ga` at a time, in L1.
#[inline(always)]
fn sum_partials_body<M: Madd, T: Real>(
    ga: &mut [T],
    cols: usize,
    parts: &[Vec<T>],
    stride: usize,
    scale: T,
) {
    for (q, row) in ga.chunks_exact_mut(cols).enumerate() {
        row.fill(T::zero());
        for part in parts {
            for (acc, &x) in row.iter_mut().zip(&part[q * stride..q * stride + cols]) {
                *acc = *acc + x;
            }
        }
        for x in row.iter_mut() {
            *x = *x * scale;
        }
    }
}

/// The micro-kernel's last step in the penalty: each value d of D leaves the registers as
/// G = Ω⊙d, and Ω·d² is summed into per-lane partials of P (no separate pass over the tile).
/// With `MIXED` (a tile whose Ω has negative entries) |Ω|·d² is summed too; otherwise it
/// equals Ω·d². Registers are short here: that sum for every tile cost 10–20 %, and even a
/// running min of Ω (to find mixed tiles) 15–35 %, against 0–5 % for a pass over the tile's Ω
/// in L1 after it (`has_negative`).
struct Weighted<'a, S, T, const RB: usize, const MIXED: bool> {
    /// The tile's rows of Ω.
    omega: [&'a [S]; RB],
    /// Per row of the tile in the AVX-512 variant, whose two blocks per row would otherwise
    /// chain twice the FMAs on one set of lanes; row 0 only in the others (their order kept).
    lanes: [[T; 16]; RB],
    magnitude: [[T; 16]; RB],
}

impl<S: Storage, T: Real, const RB: usize, const MIXED: bool> Finish<T>
    for Weighted<'_, S, T, RB, MIXED>
{
    #[inline(always)]
    fn finish<M: Madd, const W: usize>(
        &mut self,
        rr: usize,
        j: usize,
        vals: &[T; W],
        dst: &mut [T; W],
    ) {
        let w: &[S; W] = self.omega[rr][j..j + W].try_into().expect("W weights");
        let row = if M::WIDE { rr } else { 0 };
        let (lanes, magnitude) = (&mut self.lanes[row], &mut self.magnitude[row]);
        for l in 0..W {
            let g = T::load(w[l]) * vals[l];
            lanes[l % 16] = M::madd(g, vals[l], lanes[l % 16]);
            if MIXED {
                magnitude[l % 16] = M::madd(g.abs(), vals[l].abs(), magnitude[l % 16]);
            }
            dst[l] = g;
        }
    }
}

/// The sum of a tile's lanes in log₂ steps: the rows added lane by lane, then the 16 lanes
/// halved four times. Folded one by one, the AVX-512 variant's 4 × 16 lanes were a chain of 64
/// dependent adds per tile (10–15 % of the penalty's time in `perf`).
#[inline(always)]
fn pairwise_sum<T: Real, const RB: usize>(lanes: &[[T; 16]; RB]) -> T {
    let mut v = lanes[0];
    for row in &lanes[1..] {
        for l in 0..16 {
            v[l] = v[l] + row[l];
        }
    }
    for half in [8, 4, 2, 1] {
        for l in 0..half {
            v[l] = v[l] + v[l + half];
        }
    }
    v[0]
}

/// Memory layouts of the gradient pass, chosen so its inner loops are unit-stride, free of
/// bounds checks and of cache-set conflicts.
struct GradLayout {
    r: usize,
    /// r rounded up to even: the row-gradient loop takes the rank terms two at a time.
    r_pad: usize,
    /// Row stride of a task's Bᵀ·G partial (≥ cols rounded up to 16; odd number of lines).
    ga_stride: usize,
}

/// Columns of G are processed in blocks of this many (G's tile buffers are zeroed up to it).
const GRAD_BLOCK: usize = 16;

impl GradLayout {
    fn new<T>(r: usize, cols: usize) -> Self {
        GradLayout {
            r,
            r_pad: r.div_ceil(2) * 2,
            ga_stride: conflict_free_stride::<T>(cols.div_ceil(GRAD_BLOCK) * GRAD_BLOCK),
        }
    }

    /// A packed by blocks of 8 columns: block c holds A[q, 8c..8c+8] for q < r_pad, one after
    /// the other (zeros beyond r and beyond the last column, up to a whole `GRAD_BLOCK`).
    fn pack<T: Real>(&self, a: &Dense<T>) -> Vec<T> {
        let blocks = a.cols.div_ceil(GRAD_BLOCK) * GRAD_BLOCK / 8;
        let mut packed = vec![T::zero(); blocks * self.r_pad * 8];
        // Block by block, 8 contiguous values per rank term (element-wise scattering took 3 % of
        // the penalty at 192 × 576).
        for (block, j0) in packed
            .chunks_exact_mut(self.r_pad * 8)
            .zip((0..a.cols).step_by(8))
        {
            let n = 8.min(a.cols - j0);
            for (q, dst) in block.chunks_exact_mut(8).take(self.r).enumerate() {
                dst[..n].copy_from_slice(&a.row(q)[j0..j0 + n]);
            }
        }
        packed
    }
}

multiversion!(fn penalty_task<S: Storage, T: Real>(row0: usize, om: &[S], gb_rows: Option<(&mut [T], T)>, d: &LowRank<T>, b: &Dense<T>, layout: &GradLayout, a_packed: &[T], fast: Option<&wide::Kernel>) -> (Sums, Vec<T>) = penalty_task_body);

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn penalty_task_body<M: Madd, S: Storage, T: Real>(
    row0: usize,
    om: &[S],
    gb_rows: Option<(&mut [T], T)>,
    d: &LowRank<T>,
    b: &Dense<T>,
    layout: &GradLayout,
    a_packed: &[T],
    fast: Option<&wide::Kernel>,
) -> (Sums, Vec<T>) {
    let nrows = om.len() / d.cols;
    let grads = gb_rows.is_some();
    let (gb_rows, gb_scale) = gb_rows.unwrap_or((&mut [], T::one()));
    let mut task = PenaltyTask {
        row0,
        om,
        gb_rows,
        gb_scale,
        d,
        b,
        layout,
        a_packed,
        gb_lanes: vec![[T::zero(); 8]; ROW_BLOCK * layout.r_pad],
        coefs: vec![[T::zero(); ROW_BLOCK]; layout.r],
        ga: if grads {
            vec![T::zero(); layout.r * layout.ga_stride]
        } else {
            Vec::new()
        },
        sums: Sums::default(),
    };
    let mut lanes = fast.map(|k| k.lanes()).unwrap_or_default();
    let mut li = 0;
    while li < nrows {
        if let Some(kernel) = fast.filter(|_| nrows - li >= avx512::ROWS) {
            if task.group_wide(kernel, li, grads, &mut lanes) {
                li += avx512::ROWS;
                continue;
            }
        }
        if nrows - li >= ROW_BLOCK {
            task.group::<M, ROW_BLOCK>(li, grads);
            li += ROW_BLOCK;
        } else {
            task.group::<M, 1>(li, grads);
            li += 1;
        }
    }
    (task.sums, task.ga)
}

struct PenaltyTask<'a, S, T> {
    row0: usize,
    om: &'a [S],
    /// This task's rows of G·Aᵀ, written once each (times `gb_scale`) as its group ends.
    gb_rows: &'a mut [T],
    gb_scale: T,
    d: &'a LowRank<T>,
    b: &'a Dense<T>,
    layout: &'a GradLayout,
    /// A in `GradLayout::pack`'s layout.
    a_packed: &'a [T],
    /// Row-gradient lanes of the current group: (ROW_BLOCK × r_pad) × 8.
    gb_lanes: Vec<[T; 8]>,
    /// B[row, q] of the current group's rows, by q.
    coefs: Vec<[T; ROW_BLOCK]>,
    /// This task's Bᵀ·G partial: r rows of `ga_stride`.
    ga: Vec<T>,
    sums: Sums,
}

impl<S: Storage, T: Real> PenaltyTask<'_, S, T> {
    /// Rows li..li+RB (task-local), tile by tile: G = Ω⊙D and P's terms as D leaves the
    /// micro-kernel's registers, then the RB×r row gradients and the r×tile column gradients.
    #[inline(always)]
    fn group<M: Madd, const RB: usize>(&mut self, li: usize, grads: bool) {
        let cols = self.d.cols;
        let mut g = [[T::zero(); TILE_COLS]; RB];
        if grads {
            for (q, c) in self.coefs.iter_mut().enumerate() {
                for (rr, x) in c.iter_mut().take(RB).enumerate() {
                    *x = self.b.row(self.row0 + li + rr)[q];
                }
            }
        }
        for j0 in (0..cols).step_by(TILE_COLS) {
            let n = TILE_COLS.min(cols - j0);
            let omega: [&[S]; RB] = std::array::from_fn(|rr| {
                &self.om[(li + rr) * cols + j0..(li + rr) * cols + j0 + n]
            });
            let mut sums = self.tile::<M, RB, false>(omega, li, j0, &mut g);
            // Ω ≥ 0 is the rule: its check runs on the tile's Ω while it is in L1, and only a
            // tile with a negative entry is formed again, with the magnitude summed.
            if omega.iter().any(|w| has_negative::<S, T>(w)) {
                sums = self.tile::<M, RB, true>(omega, li, j0, &mut g);
            }
            self.sums.add(sums);
            if grads {
                // Whole blocks of columns: G's last tile is padded with zeros (A's packing too).
                let n16 = n.div_ceil(GRAD_BLOCK) * GRAD_BLOCK;
                for g_row in g.iter_mut() {
                    g_row[n..n16].fill(T::zero());
                }
                self.row_gradients::<M, RB>(&g, j0, n16);
                self.column_gradients::<M, RB>(&g, j0, n16);
            }
        }
        if grads {
            // Fold the row-gradient lanes into G·Aᵀ and clear them for the next group.
            let (r, r_pad) = (self.layout.r, self.layout.r_pad);
            for rr in 0..RB {
                for q in 0..r {
                    let lanes = &mut self.gb_lanes[rr * r_pad + q];
                    let sum = lanes.iter().fold(T::zero(), |acc, &x| acc + x);
                    self.gb_rows[(li + rr) * r + q] = sum * self.gb_scale;
                    *lanes = [T::zero(); 8];
                }
            }
        }
    }

    /// Rows li..li + `avx512::ROWS` by the AVX-512 kernel; false (nothing done) when Ω is
    /// float64 or there is no AVX-512 code (not x86-64).
    fn group_wide(
        &mut self,
        kernel: &wide::Kernel,
        li: usize,
        grads: bool,
        lanes: &mut [[f32; avx512::LANES]],
    ) -> bool {
        let (cols, r, rows) = (self.d.cols, self.layout.r, avx512::ROWS);
        let Some(om) = avx512::Rows::of(&self.om[li * cols..(li + rows) * cols]) else {
            return false;
        };
        let out = if grads {
            let b_rows = &self.b.data[(self.row0 + li) * r..(self.row0 + li + rows) * r];
            let (Some(b_rows), Some(ga), Some(gb)) = (
                avx512::cast(b_rows),
                avx512::as_f32_mut(&mut self.ga),
                avx512::as_f32_mut(&mut self.gb_rows[li * r..(li + rows) * r]),
            ) else {
                return false;
            };
            Some(wide::GroupGrads {
                b_rows,
                ga,
                ga_stride: self.layout.ga_stride,
                gb,
                scale: self.gb_scale.to_f32(),
            })
        } else {
            None
        };
        match kernel.group(self.row0 + li, om, out, lanes) {
            Some(sums) => {
                self.sums.add(sums);
                true
            }
            None => false,
        }
    }

    /// G = Ω⊙D over the tile of rows li..li+RB and columns j0.. into `g`; returns P's sums.
    #[inline(always)]
    fn tile<M: Madd, const RB: usize, const MIXED: bool>(
        &self,
        omega: [&[S]; RB],
        li: usize,
        j0: usize,
        g: &mut [[T; TILE_COLS]; RB],
    ) -> Sums {
        let mut weigh = Weighted::<S, T, RB, MIXED> {
            omega,
            lanes: [[T::zero(); 16]; RB],
            magnitude: [[T::zero(); 16]; RB],
        };
        let n = omega[0].len();
        self.d
            .rows_tile_finish::<M, RB, _>(self.row0 + li, j0, n, g, &mut weigh);
        let total = |lanes: &[[T; 16]; RB]| {
            if M::WIDE {
                pairwise_sum(lanes).to_f64()
            } else {
                (lanes.iter().flatten())
                    .fold(T::zero(), |s, &x| s + x)
                    .to_f64()
            }
        };
        let p = total(&weigh.lanes);
        Sums {
            p,
            magnitude: if MIXED { total(&weigh.magnitude) } else { p },
        }
    }

    /// (G·Aᵀ)[row, q] partial sums over one tile, kept as 8 lanes per (row, q) until the group
    /// ends. Two rank terms at a time for all RB rows: each 8 columns of G and of two rows of A
    /// loaded feed 2·RB independent FMA chains (in the AVX-512 variant LLVM puts the two terms'
    /// 8 lanes in one 512-bit register; a 16-lane layout of A measured no faster).
    #[inline(always)]
    fn row_gradients<M: Madd, const RB: usize>(
        &mut self,
        g: &[[T; TILE_COLS]; RB],
        j0: usize,
        n16: usize,
    ) {
        let r_pad = self.layout.r_pad;
        let block = 8 * r_pad;
        let a_tile = &self.a_packed[j0 * r_pad..(j0 + n16) * r_pad];
        for qp in (0..r_pad).step_by(2) {
            let mut acc = [[[T::zero(); 8]; 2]; RB];
            for (rr, acc_r) in acc.iter_mut().enumerate() {
                acc_r[0] = self.gb_lanes[rr * r_pad + qp];
                acc_r[1] = self.gb_lanes[rr * r_pad + qp + 1];
            }
            for (c, a_block) in a_tile.chunks_exact(block).enumerate() {
                let av = &a_block[qp * 8..qp * 8 + 16];
                for (acc_r, g_row) in acc.iter_mut().zip(g) {
                    let gv = &g_row[(c * 8) % TILE_COLS..][..8];
                    for l in 0..8 {
                        acc_r[0][l] = M::madd(gv[l], av[l], acc_r[0][l]);
                        acc_r[1][l] = M::madd(gv[l], av[8 + l], acc_r[1][l]);
                    }
                }
            }
            for (rr, acc_r) in acc.iter().enumerate() {
                self.gb_lanes[rr * r_pad + qp] = acc_r[0];
                self.gb_lanes[rr * r_pad + qp + 1] = acc_r[1];
            }
        }
    }

    /// (Bᵀ·G)[q, tile] += Σ_rows B[row, q]·G[row, tile]: per 16 columns, the RB rows of G stay
    /// in registers while every rank term's partial is loaded, updated and stored once.
    #[inline(always)]
    fn column_gradients<M: Madd, const RB: usize>(
        &mut self,
        g: &[[T; TILE_COLS]; RB],
        j0: usize,
        n16: usize,
    ) {
        let stride = self.layout.ga_stride;
        for c in (0..n16).step_by(GRAD_BLOCK) {
            let mut gv = [[T::zero(); GRAD_BLOCK]; RB];
            for (dst, g_row) in gv.iter_mut().zip(g) {
                dst.copy_from_slice(&g_row[c % TILE_COLS..][..GRAD_BLOCK]);
            }
            for (ga_row, coef) in self.ga.chunks_exact_mut(stride).zip(&self.coefs) {
                let dst = &mut ga_row[j0 + c..j0 + c + GRAD_BLOCK];
                let mut v = [T::zero(); GRAD_BLOCK];
                v.copy_from_slice(dst);
                for (rr, g_row) in gv.iter().enumerate() {
                    for l in 0..GRAD_BLOCK {
                        v[l] = M::madd(coef[rr], g_row[l], v[l]);
                    }
                }
                dst.copy_from_slice(&v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1), never all equal.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }

    #[test]
    fn penalty_and_gradients_match_dense_maths() {
        // 7 rows: one block of ROW_BLOCK and three single rows; 300 columns: two whole tiles and
        // a tail that is not a whole GRAD_BLOCK; odd rank (padded to even in the row pass).
        let (rows, cols, r) = (7, 300, 3);
        let a = Dense::new(r, cols, values(r * cols, 1));
        let b = Dense::new(rows, r, values(rows * r, 2));
        let d = LowRank::new(b.clone(), a.clone());
        let omega: Vec<f64> = values(rows * cols, 3).iter().map(|x| x.abs()).collect();
        let (mut ga, mut gb) = (vec![f64::NAN; r * cols], vec![f64::NAN; rows * r]);
        let out = GradOut {
            ga: &mut ga,
            gb: &mut gb,
            scale: 2.0,
        };
        let sums = penalty_rows(&omega, || Ok(d.clone()), &a, &b, Some(out)).unwrap();
        // The buffers start as NaN: every element must be written, none accumulated into.
        let ga = Dense::new(r, cols, ga.iter().map(|x| x / 2.0).collect());
        let gb = Dense::new(rows, r, gb.iter().map(|x| x / 2.0).collect());
        let dd = d.to_dense();
        let g: Vec<f64> = omega.iter().zip(&dd.data).map(|(o, x)| o * x).collect();
        let want_p: f64 = g.iter().zip(&dd.data).map(|(g, x)| g * x).sum();
        assert!((sums.p - want_p).abs() < 1e-12 * want_p.abs().max(1.0));
        assert_eq!(
            sums.magnitude, sums.p,
            "Ω ≥ 0: the terms are their magnitudes"
        );
        // (Bᵀ·G)[q, j] = Σ_i B[i, q]·G[i, j]; (G·Aᵀ)[i, q] = Σ_j G[i, j]·A[q, j]
        for q in 0..r {
            for j in 0..cols {
                let want: f64 = (0..rows).map(|i| b.data[i * r + q] * g[i * cols + j]).sum();
                assert!((ga.data[q * cols + j] - want).abs() < 1e-12);
            }
        }
        for i in 0..rows {
            for q in 0..r {
                let want: f64 = (0..cols)
                    .map(|j| g[i * cols + j] * a.data[q * cols + j])
                    .sum();
                assert!((gb.data[i * r + q] - want).abs() < 1e-11);
            }
        }
        let p_only = penalty_rows(&omega, || Ok(d.clone()), &a, &b, None).unwrap();
        assert_eq!(p_only.p, sums.p);
    }

    /// Float32 A (r × cols), B (rows × r), D = B·A and Ω ≥ 0 (rows × cols) from `seed`, with Ω
    /// negated over columns 100..140 of the two `negative` rows.
    fn float32_case(
        rows: usize,
        cols: usize,
        r: usize,
        seed: u64,
        negative: [usize; 2],
    ) -> (Dense<f32>, Dense<f32>, LowRank<f32>, Vec<f32>) {
        let f32s = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect::<Vec<_>>();
        let a = Dense::new(r, cols, f32s(values(r * cols, seed)));
        let b = Dense::new(rows, r, f32s(values(rows * r, seed + 1)));
        let d = LowRank::new(b.clone(), a.clone());
        let mut omega: Vec<f32> = f32s(values(rows * cols, seed + 2))
            .iter()
            .map(|x| x.abs())
            .collect();
        for row in negative {
            for x in &mut omega[row * cols + 100..row * cols + 140] {
                *x = -*x;
            }
        }
        (a, b, d, omega)
    }

    #[test]
    fn float32_groups_match_dense_maths() {
        // 21 rows: two groups of 8 (the AVX-512 kernel, where the CPU has it), one of 4 and a
        // single row (the generic kernel); 300 columns: a last tile of 44, three chunks of 16 with
        // the last one masked; odd rank (one term left over in the column pass). Ω < 0 in two
        // tiles of the second group: those are summed again with the magnitude.
        let (rows, cols, r) = (21, 300, 3);
        let (a, b, d, omega) = float32_case(rows, cols, r, 7, [9, 10]);
        let padded = wide::PaddedA::new(&a);
        assert_eq!(
            padded
                .as_ref()
                .and_then(|p| wide::Kernel::new(&d, p))
                .is_some(),
            crate::cpu::simd::level() == crate::cpu::simd::Level::Avx512
        );
        let (mut ga, mut gb) = (vec![f32::NAN; r * cols], vec![f32::NAN; rows * r]);
        let out = GradOut {
            ga: &mut ga,
            gb: &mut gb,
            scale: 0.5,
        };
        let sums = penalty_rows(&omega, || Ok(d.clone()), &a, &b, Some(out)).unwrap();
        // The same sums in float64 (D from the float32 factors).
        let up =
            |m: &Dense<f32>| Dense::new(m.rows, m.cols, m.data.iter().map(|&x| x as f64).collect());
        let (a64, b64) = (up(&a), up(&b));
        let dd = LowRank::new(b64.clone(), a64.clone()).to_dense();
        let g: Vec<f64> = omega
            .iter()
            .zip(&dd.data)
            .map(|(&o, x)| o as f64 * x)
            .collect();
        let want_p: f64 = g.iter().zip(&dd.data).map(|(g, x)| g * x).sum();
        let want_magnitude: f64 = g.iter().zip(&dd.data).map(|(g, x)| (g * x).abs()).sum();
        assert!(
            want_magnitude > want_p * 1.01,
            "the case must have negative terms"
        );
        assert!((sums.p - want_p).abs() < 1e-5 * want_magnitude);
        assert!((sums.magnitude - want_magnitude).abs() < 1e-5 * want_magnitude);
        let close = |got: f32, want: f64, norm: f64| (got as f64 - 0.5 * want).abs() < 1e-5 * norm;
        for q in 0..r {
            let col = |j: usize| {
                (0..rows)
                    .map(|i| b64.data[i * r + q] * g[i * cols + j])
                    .sum::<f64>()
            };
            let norm = (0..cols).map(|j| col(j).abs()).fold(0.0, f64::max);
            for j in 0..cols {
                assert!(close(ga[q * cols + j], col(j), norm), "Bᵀ·G [{q}, {j}]");
            }
        }
        for i in 0..rows {
            let row = |q: usize| {
                (0..cols)
                    .map(|j| g[i * cols + j] * a64.data[q * cols + j])
                    .sum::<f64>()
            };
            let norm = (0..r).map(|q| row(q).abs()).fold(0.0, f64::max);
            for q in 0..r {
                assert!(close(gb[i * r + q], row(q), norm), "G·Aᵀ [{i}, {q}]");
            }
        }
        let p_only = penalty_rows(&omega, || Ok(d.clone()), &a, &b, None).unwrap();
        assert_eq!((p_only.p, p_only.magnitude), (sums.p, sums.magnitude));
    }

    /// P's sums and the gradients' bits from `penalty_rows` over Ω = `om`.
    fn sums_and_bits<S: Storage>(
        om: &[S],
        d: &LowRank<f32>,
        a: &Dense<f32>,
        b: &Dense<f32>,
    ) -> (f64, f64, Vec<u32>, Vec<u32>) {
        let (mut ga, mut gb) = (vec![0.0f32; a.rows * a.cols], vec![0.0f32; b.rows * b.cols]);
        let out = GradOut {
            ga: &mut ga,
            gb: &mut gb,
            scale: 1.0,
        };
        let sums = penalty_rows(om, || Ok(d.clone()), a, b, Some(out)).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        (sums.p, sums.magnitude, bits(&ga), bits(&gb))
    }

    #[test]
    fn half_precision_omega_gives_the_float32_results_of_its_values() {
        // Ω stored as bfloat16 or float16 is read exactly, in the AVX-512 groups (widened 16
        // values at a time) and in the generic kernel (the last 5 rows) alike: the same bits as a
        // float32 Ω holding the same values. Negative entries in a group and in the last row.
        let (rows, cols, r) = (21, 300, 3);
        let (a, b, d, omega) = float32_case(rows, cols, r, 10, [9, 20]);
        let as_bf16: Vec<bf16> = omega.iter().map(|&x| bf16::from_f32(x)).collect();
        let as_f16: Vec<f16> = omega.iter().map(|&x| f16::from_f32(x)).collect();
        let widened_bf16: Vec<f32> = as_bf16.iter().map(|x| x.to_f32()).collect();
        let widened_f16: Vec<f32> = as_f16.iter().map(|x| x.to_f32()).collect();
        let from_bf16 = sums_and_bits(&as_bf16, &d, &a, &b);
        assert!(
            from_bf16.1 > from_bf16.0,
            "the case must have negative terms"
        );
        assert_eq!(from_bf16, sums_and_bits(&widened_bf16, &d, &a, &b));
        assert_eq!(
            sums_and_bits(&as_f16, &d, &a, &b),
            sums_and_bits(&widened_f16, &d, &a, &b)
        );
    }

    #[test]
    fn partials_are_summed_per_row_scaled_and_their_padding_ignored() {
        // Three tasks' (r = 2, cols = 5) partials in rows of stride 8, the padding NaN.
        let (r, cols, stride) = (2, 5, 8);
        let parts: Vec<Vec<f32>> = (0..3)
            .map(|t| {
                (0..r * stride)
                    .map(|i| {
                        if i % stride < cols {
                            (t * 100 + i) as f32
                        } else {
                            f32::NAN
                        }
                    })
                    .collect()
            })
            .collect();
        let mut ga = vec![f32::NAN; r * cols];
        sum_partials(&mut ga, cols, &parts, stride, 0.5);
        for q in 0..r {
            for j in 0..cols {
                let i = (q * stride + j) as f32;
                assert_eq!(ga[q * cols + j], 0.5 * (3.0 * i + 300.0), "[{q}, {j}]");
            }
        }
    }

    #[test]
    fn pairwise_sum_adds_every_lane_of_every_row() {
        // Integers: exact in any order, so a lane left out or added twice shows.
        let mut lanes = [[0.0f32; 16]; ROW_BLOCK];
        for (i, x) in lanes.iter_mut().flatten().enumerate() {
            *x = (i + 1) as f32;
        }
        let n = 16 * ROW_BLOCK;
        assert_eq!(pairwise_sum(&lanes), (n * (n + 1) / 2) as f32);
        assert_eq!(pairwise_sum(&[[1.0f64; 16]; 1]), 16.0);
    }

    #[test]
    fn mixed_sign_omega_sums_the_magnitude_of_the_terms() {
        // Negative Ω in some tiles only (rows 2 and 5 of 9): those tiles sum Σ|Ω|·D² as well.
        let (rows, cols, r) = (9, 270, 2);
        let a = Dense::new(r, cols, values(r * cols, 4));
        let b = Dense::new(rows, r, values(rows * r, 5));
        let d = LowRank::new(b.clone(), a.clone());
        let mut omega: Vec<f64> = values(rows * cols, 6).iter().map(|x| x.abs()).collect();
        for row in [2, 5] {
            for x in &mut omega[row * cols..row * cols + 40] {
                *x = -*x;
            }
        }
        let dd = d.to_dense();
        let want_p: f64 = omega.iter().zip(&dd.data).map(|(o, x)| o * x * x).sum();
        let want_magnitude: f64 = omega
            .iter()
            .zip(&dd.data)
            .map(|(o, x)| o.abs() * x * x)
            .sum();
        let sums = penalty_rows(&omega, || Ok(d.clone()), &a, &b, None).unwrap();
        assert!((sums.p - want_p).abs() < 1e-12 * want_magnitude);
        assert!((sums.magnitude - want_magnitude).abs() < 1e-12 * want_magnitude);
        assert!(sums.magnitude > sums.p);
        assert!(!sums.cancelled());
        let cancelling = Sums {
            p: 0.2 * sums.magnitude,
            magnitude: sums.magnitude,
        };
        assert!(cancelling.cancelled());
    }
}
