//! A matrix of shape (out, in) held as a product `L·R` of thin factors, `L: (out, k)` and
//! `R: (k, in)`. Every quantity of DESIGN §1 that is (out, in)-sized — g~, dθ, Δ, D — is of
//! this form with k = r or 2r, so the kernels never materialize it: they evaluate one tile of a
//! few rows at a time into small buffers that stay in L1.

use crate::cpu::dense::Dense;
use crate::cpu::simd::Madd;
#[cfg(test)]
use crate::cpu::simd::Plain;
use crate::forms::Term;
use crate::scalar::Real;

/// Columns per tile: 2 factors × 2r=16 rows × 128 × 4 B = 16 KiB of right factors in L1.
pub const TILE_COLS: usize = 128;

#[derive(Debug, Clone)]
pub struct LowRank<T> {
    pub rows: usize,
    pub cols: usize,
    pub k: usize,
    /// Lᵀ: (k, rows) with row stride `left_stride` — so the RB coefficients a row block needs
    /// for one term q are contiguous (one bounds check per term in the micro-kernel).
    left_t: Vec<T>,
    left_stride: usize,
    /// R: (k, cols) with row stride `right_stride`.
    right: Vec<T>,
    right_stride: usize,
}

/// A row stride of at least `n` elements spanning an odd number of 64-byte lines, so the k rows
/// a micro-kernel walks fall in k different L1 sets. (A width like 1024 or 3072 floats is a
/// multiple of 4 KiB: all k rows would then compete for one 8-way set and miss every time.)
pub fn conflict_free_stride<T>(n: usize) -> usize {
    let size = std::mem::size_of::<T>().max(1);
    let per_line = (64 / size).max(1);
    let lines = n.div_ceil(per_line);
    (lines | 1) * per_line
}

impl<T: Real> LowRank<T> {
    /// `L·R` from its two factors.
    #[cfg(test)]
    pub fn new(left: Dense<T>, right: Dense<T>) -> Self {
        use crate::forms::Part::Made;
        Self::from_terms(&[Term {
            left: Made(left),
            scale: 1.0,
            right: Made(right),
        }])
    }

    /// `Σ c_t·L_t·R_t` (a form of `crate::forms`), written straight into the kernels' layout:
    /// each term's scaled, transposed left factor and its right factor land in their strided
    /// rows, with no concatenated copies in between (those cost ~20 µs per call at 576 × 576).
    pub fn from_terms(terms: &[Term<'_, Dense<T>>]) -> Self {
        let rows = terms.first().map_or(0, |t| t.left.rows);
        let cols = terms.first().map_or(0, |t| t.right.cols);
        let k = terms.iter().map(|t| t.left.cols).sum();
        let left_stride = conflict_free_stride::<T>(rows);
        let right_stride = conflict_free_stride::<T>(cols);
        let mut left_t = vec![T::zero(); k * left_stride];
        // R is written once per element, its padding included (zeroing it all first and then
        // copying over it wrote most of it twice).
        let mut right = Vec::with_capacity(k * right_stride);
        let mut q0 = 0;
        for t in terms {
            let (l, r, c) = (&*t.left, &*t.right, T::from_f64_lossy(t.scale));
            let kt = l.cols;
            debug_assert_eq!((l.rows, r.rows, r.cols), (rows, kt, cols));
            if kt > 0 {
                // Row by row of Lᵀ: its writes in order (writing L's rows across k rows of Lᵀ
                // took 2.5 µs for 192 × 16, this 1.6).
                let dst = left_t[q0 * left_stride..].chunks_exact_mut(left_stride);
                for (q, dst) in dst.take(kt).enumerate() {
                    for (d, lrow) in dst.iter_mut().zip(l.data.chunks_exact(kt)) {
                        *d = c * lrow[q];
                    }
                }
            }
            for q in 0..kt {
                right.extend_from_slice(&r.data[q * cols..(q + 1) * cols]);
                right.resize((q0 + q + 1) * right_stride, T::zero());
            }
            q0 += kt;
        }
        debug_assert_eq!(right.len(), k * right_stride);
        LowRank {
            rows,
            cols,
            k,
            left_t,
            left_stride,
            right,
            right_stride,
        }
    }

    /// (Lᵀ, its row stride, R, its row stride): the layout the micro-kernels read.
    pub fn factors(&self) -> (&[T], usize, &[T], usize) {
        (
            &self.left_t,
            self.left_stride,
            &self.right,
            self.right_stride,
        )
    }

    /// L[i, q].
    pub fn left(&self, i: usize, q: usize) -> T {
        self.left_t[q * self.left_stride + i]
    }

    /// R[q, j].
    pub fn right(&self, q: usize, j: usize) -> T {
        self.right[q * self.right_stride + j]
    }

    /// For `RB` consecutive rows i0.., `bufs[rr][j] = Σ_q L[i0+rr,q]·R[q,j0+j]` for j < n.
    ///
    /// Register-blocked micro-kernel: for each block of columns, the RB rows' sums live in
    /// registers across the k terms, so each value of R loaded from L1 feeds RB FMAs (the
    /// kernel would otherwise be bound by cache bandwidth for R, not by arithmetic).
    #[inline(always)]
    pub fn rows_tile_into<M: Madd, const RB: usize>(
        &self,
        i0: usize,
        j0: usize,
        n: usize,
        bufs: &mut [[T; TILE_COLS]; RB],
    ) {
        self.rows_tile_finish::<M, RB, _>(i0, j0, n, bufs, &mut Copied);
    }

    /// [`Self::rows_tile_into`], handing each finished block of a row's values to `finish`
    /// (still in registers) instead of storing them as they are.
    #[inline(always)]
    pub fn rows_tile_finish<M: Madd, const RB: usize, F: Finish<T>>(
        &self,
        i0: usize,
        j0: usize,
        n: usize,
        bufs: &mut [[T; TILE_COLS]; RB],
        finish: &mut F,
    ) {
        let n = n.min(TILE_COLS);
        // Two vector registers of columns per row: 2·RB independent FMA chains, enough to keep
        // both FMA units busy, whose accumulators fit in the 16 AVX2 registers (16 f32 or 8 f64;
        // 16 f64 columns would spill them) or the 32 AVX-512 ones (32 f32 or 16 f64, then the
        // narrower blocks for what is left of the tile).
        let f64 = std::mem::size_of::<T>() == 8;
        let jb = match (M::WIDE, f64) {
            (false, true) => self.column_blocks::<M, RB, 8, F>(i0, j0, 0, n, bufs, finish),
            (false, false) => self.column_blocks::<M, RB, 16, F>(i0, j0, 0, n, bufs, finish),
            (true, true) => {
                let jb = self.column_block_pairs::<M, RB, 8, F>(i0, j0, n, bufs, finish);
                self.column_blocks::<M, RB, 8, F>(i0, j0, jb, n, bufs, finish)
            }
            (true, false) => {
                let jb = self.column_block_pairs::<M, RB, 16, F>(i0, j0, n, bufs, finish);
                self.column_blocks::<M, RB, 16, F>(i0, j0, jb, n, bufs, finish)
            }
        };
        // Remainder columns: j indexes R and every row's buffer.
        #[allow(clippy::needless_range_loop)]
        for j in jb..n {
            for rr in 0..RB {
                let mut acc = T::zero();
                for q in 0..self.k {
                    acc = M::madd(self.left(i0 + rr, q), self.right(q, j0 + j), acc);
                }
                let dst: &mut [T; 1] = (&mut bufs[rr][j..j + 1]).try_into().expect("one element");
                finish.finish::<M, 1>(rr, j, &[acc], dst);
            }
        }
    }

    /// [`Self::rows_tile_finish`]'s whole blocks of `W` columns from tile column `jb`; returns
    /// the columns done.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn column_blocks<M: Madd, const RB: usize, const W: usize, F: Finish<T>>(
        &self,
        i0: usize,
        j0: usize,
        mut jb: usize,
        n: usize,
        bufs: &mut [[T; TILE_COLS]; RB],
        finish: &mut F,
    ) -> usize {
        while jb + W <= n {
            let mut acc = [[T::zero(); W]; RB];
            let terms = (self.left_t.chunks_exact(self.left_stride))
                .zip(self.right.chunks_exact(self.right_stride));
            for (lrow, rrow) in terms {
                let c = &lrow[i0..i0 + RB];
                let r = &rrow[j0 + jb..j0 + jb + W];
                for rr in 0..RB {
                    for l in 0..W {
                        acc[rr][l] = M::madd(c[rr], r[l], acc[rr][l]);
                    }
                }
            }
            for (rr, (acc_r, buf)) in acc.iter().zip(bufs.iter_mut()).enumerate() {
                let dst: &mut [T; W] = (&mut buf[jb..jb + W]).try_into().expect("W elements");
                finish.finish::<M, W>(rr, jb, acc_r, dst);
            }
            jb += W;
        }
        jb
    }

    /// [`Self::column_blocks`] two blocks at a time (2·RB accumulators of `W` columns, one
    /// 512-bit register each in the AVX-512 variant) from the tile's first column. Written as two
    /// separate nests of the one-block shape: a single nest of 2·W columns was left scalar by
    /// the compiler (10× slower, measured).
    #[inline(always)]
    fn column_block_pairs<M: Madd, const RB: usize, const W: usize, F: Finish<T>>(
        &self,
        i0: usize,
        j0: usize,
        n: usize,
        bufs: &mut [[T; TILE_COLS]; RB],
        finish: &mut F,
    ) -> usize {
        let mut jb = 0;
        while jb + 2 * W <= n {
            let mut lo = [[T::zero(); W]; RB];
            let mut hi = [[T::zero(); W]; RB];
            let terms = (self.left_t.chunks_exact(self.left_stride))
                .zip(self.right.chunks_exact(self.right_stride));
            for (lrow, rrow) in terms {
                let c = &lrow[i0..i0 + RB];
                let r_lo = &rrow[j0 + jb..j0 + jb + W];
                let r_hi = &rrow[j0 + jb + W..j0 + jb + 2 * W];
                for rr in 0..RB {
                    for l in 0..W {
                        lo[rr][l] = M::madd(c[rr], r_lo[l], lo[rr][l]);
                    }
                }
                for rr in 0..RB {
                    for l in 0..W {
                        hi[rr][l] = M::madd(c[rr], r_hi[l], hi[rr][l]);
                    }
                }
            }
            for (rr, buf) in bufs.iter_mut().enumerate() {
                for (h, acc) in [(0, &lo[rr]), (W, &hi[rr])] {
                    let dst: &mut [T; W] = (&mut buf[jb + h..jb + h + W])
                        .try_into()
                        .expect("W elements");
                    finish.finish::<M, W>(rr, jb + h, acc, dst);
                }
            }
            jb += 2 * W;
        }
        jb
    }

    /// The dense matrix (tests only: kernels never call this).
    #[cfg(test)]
    pub fn to_dense(&self) -> Dense<T> {
        let mut data = vec![T::zero(); self.rows * self.cols];
        let mut buf = [[T::zero(); TILE_COLS]; 1];
        for i in 0..self.rows {
            for j0 in (0..self.cols).step_by(TILE_COLS) {
                let n = TILE_COLS.min(self.cols - j0);
                self.rows_tile_into::<Plain, 1>(i, j0, n, &mut buf);
                data[i * self.cols + j0..i * self.cols + j0 + n].copy_from_slice(&buf[0][..n]);
            }
        }
        Dense::new(self.rows, self.cols, data)
    }
}

/// What the micro-kernel does with a finished block of one row's values: `vals` are row `rr` of
/// the tile at tile columns `j..j + W`, `dst` the same places of that row's buffer. Methods are
/// `#[inline(always)]` so they compile inside the caller's AVX2+FMA variant (as `Madd`'s do).
///
/// Write only to `dst`: an implementation that stored through a `&mut` slice kept in its own
/// struct (ω, updated in the ω kernel's last step) left the whole micro-kernel scalar, 10×
/// slower (measured; presumably the compiler could no longer prove those stores miss its
/// accumulators, as it can for a `&mut` parameter).
pub trait Finish<T> {
    fn finish<M: Madd, const W: usize>(
        &mut self,
        rr: usize,
        j: usize,
        vals: &[T; W],
        dst: &mut [T; W],
    );
}

/// Stores the values as they are.
pub struct Copied;

impl<T: Copy> Finish<T> for Copied {
    #[inline(always)]
    fn finish<M: Madd, const W: usize>(
        &mut self,
        _: usize,
        _: usize,
        vals: &[T; W],
        dst: &mut [T; W],
    ) {
        *dst = *vals;
    }
}

/// Rows evaluated together by the register-blocked micro-kernel.
pub const ROW_BLOCK: usize = 4;

/// Visits rows `row0..row0 + nrows` of the low-rank matrix `x` (and of `y`, same shape, when
/// it is `Some`) tile by tile, running `body` with `li` (row within the task), `j0` (first
/// column) and the tile's values `xv`, `yv` — the (out, in) matrices never exist beyond one tile
/// of `ROW_BLOCK` rows. A macro, not a closure: the body must be compiled inside the caller's
/// AVX2+FMA variant (a closure is a function of its own, compiled without those features).
macro_rules! for_each_tile {
    ($m:ty, $x:expr, $y:expr, $row0:expr, $nrows:expr, |$li:ident, $j0:ident, $xv:ident, $yv:ident| $body:block) => {{
        use $crate::cpu::lowrank::{ROW_BLOCK, TILE_COLS};
        let (x, y, row0, nrows) = ($x, $y, $row0, $nrows);
        let cols = x.cols;
        let mut bx = [[num_traits::Zero::zero(); TILE_COLS]; ROW_BLOCK];
        let mut by = bx;
        let mut li = 0;
        while li < nrows {
            let rb = if nrows - li >= ROW_BLOCK {
                ROW_BLOCK
            } else {
                1
            };
            for j0 in (0..cols).step_by(TILE_COLS) {
                let n = TILE_COLS.min(cols - j0);
                if rb == ROW_BLOCK {
                    x.rows_tile_into::<$m, ROW_BLOCK>(row0 + li, j0, n, &mut bx);
                    if let Some(y) = y {
                        y.rows_tile_into::<$m, ROW_BLOCK>(row0 + li, j0, n, &mut by);
                    }
                } else {
                    x.rows_tile_into::<$m, 1>(row0 + li, j0, n, std::array::from_mut(&mut bx[0]));
                    if let Some(y) = y {
                        y.rows_tile_into::<$m, 1>(
                            row0 + li,
                            j0,
                            n,
                            std::array::from_mut(&mut by[0]),
                        );
                    }
                }
                for rr in 0..rb {
                    let ($li, $j0, $xv, $yv) = (li + rr, j0, &bx[rr][..n], &by[rr][..n]);
                    $body
                }
            }
            li += rb;
        }
    }};
}
pub(crate) use for_each_tile;

/// Rows per parallel task: about 16k elements (enough work to amortize scheduling), at least
/// `min_rows` before the evening out below, in whole `ROW_BLOCK`s (rows left over in a task take
/// the one-row micro-kernel, ~4× slower per element: at 3072 columns, 5 rows per task put a
/// fifth of all rows there). A function of the shape only, so reductions over tasks are
/// deterministic whatever the thread count. The task count is then evened out (to a multiple of 2, or of 4 from 8 tasks on) so
/// 2 or 4 threads get equal shares: 32 × 576 as tasks of 28 and 4 rows ran mostly on one of 2
/// threads (penalty 50 µs); as 4 tasks of 8 rows, 40 µs.
pub fn rows_per_task(rows: usize, cols: usize, min_rows: usize) -> usize {
    let rows = rows.max(1);
    let target = ((1 << 14) / cols.max(1)).max(min_rows).max(1);
    let rpt = target.next_multiple_of(ROW_BLOCK).min(rows);
    let tasks = rows.div_ceil(rpt);
    if tasks < 2 {
        return rpt;
    }
    let even = tasks.next_multiple_of(if tasks < 8 { 2 } else { 4 });
    rows.div_ceil(even).next_multiple_of(ROW_BLOCK).min(rpt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_tiles_match_the_dense_product() {
        // L = [[1,2],[3,4],[5,6]], R = [[1,0,2],[0,1,3]]
        let l = Dense::new(3, 2, vec![1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let r = Dense::new(2, 3, vec![1.0f64, 0.0, 2.0, 0.0, 1.0, 3.0]);
        let lr = LowRank::new(l, r);
        let d = lr.to_dense();
        assert_eq!(d.data, vec![1.0, 2.0, 8.0, 3.0, 4.0, 18.0, 5.0, 6.0, 28.0]);
        let mut tiles = [[0.0f64; TILE_COLS]; 2];
        lr.rows_tile_into::<Plain, 2>(1, 1, 2, &mut tiles);
        assert_eq!(tiles[0][..2], [4.0, 18.0]);
        assert_eq!(tiles[1][..2], [6.0, 28.0]);
    }

    /// Whole column blocks (8 in f64, 16 in f32; in the AVX-512 variant pairs of them first) and
    /// the remainder, in both precisions, against sums written out: 45 columns from column 3 =
    /// blocks of 8 or 16 (a pair of 16 or 32, then a block) plus a tail.
    #[test]
    fn row_tiles_cover_whole_blocks_and_tails_in_both_precisions() {
        fn check<T: Real + std::fmt::Debug, M: Madd>() {
            let (rows, k, cols) = (5, 3, 48);
            let v = |i: usize| T::from_f64_lossy(((i * 7 + 3) % 11) as f64 - 5.0);
            let l = Dense::new(rows, k, (0..rows * k).map(v).collect());
            let r = Dense::new(k, cols, (0..k * cols).map(|i| v(i + 1)).collect());
            let lr = LowRank::new(l.clone(), r.clone());
            let mut tiles = [[T::zero(); TILE_COLS]; 4];
            lr.rows_tile_into::<M, 4>(1, 3, cols - 3, &mut tiles);
            for (rr, tile) in tiles.iter().enumerate() {
                for (j, &got) in tile[..cols - 3].iter().enumerate() {
                    let want = (0..k).fold(T::zero(), |acc, q| {
                        acc + l.data[(1 + rr) * k + q] * r.data[q * cols + 3 + j]
                    });
                    assert_eq!(got, want, "row {rr}, column {j}");
                }
            }
        }
        // Small integers: every order of summation and fused or not give the same exact sums.
        check::<f32, Plain>();
        check::<f64, Plain>();
        check::<f32, crate::cpu::simd::FusedWide>();
        check::<f64, crate::cpu::simd::FusedWide>();
    }

    #[test]
    fn strides_cover_the_row_and_span_an_odd_number_of_lines() {
        for n in [0usize, 1, 15, 16, 17, 576, 1024, 3072] {
            let s32 = conflict_free_stride::<f32>(n);
            let s64 = conflict_free_stride::<f64>(n);
            assert!(s32 >= n && s64 >= n);
            assert_eq!((s32 / 16) % 2, 1);
            assert_eq!((s64 / 8) % 2, 1);
        }
        assert_eq!(conflict_free_stride::<f32>(1024), 1040);
    }

    #[test]
    fn concatenations_keep_order() {
        let a = Dense::new(2, 1, vec![1.0f32, 2.0]);
        let b = Dense::new(2, 1, vec![3.0f32, 4.0]);
        assert_eq!(a.hcat(&b).data, vec![1.0, 3.0, 2.0, 4.0]);
        assert_eq!(a.vcat(&b).data, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn tasks_cover_rows() {
        // Whole row blocks, even for the widest rows; never more than there are rows.
        assert_eq!(rows_per_task(10, 1 << 20, 1), ROW_BLOCK);
        assert_eq!(rows_per_task(3, 1 << 20, 1), 3);
        assert_eq!(rows_per_task(4, 4, 1), 4);
        // Wide matrices still get a few rows per task; narrow ones many.
        assert_eq!(rows_per_task(3072, 3072, 1), 8);
        assert_eq!(rows_per_task(192, 64, 1), 192);
        // An even task count, all tasks the same size: 24 of 24 rows, 8 of 24, 32 of 96.
        assert_eq!(rows_per_task(576, 576, 1), 24);
        assert_eq!(rows_per_task(192, 576, 1), 24);
        assert_eq!(rows_per_task(3072, 3072, 97), 96);
        for (rows, cols, min_rows) in [(577, 576, 1), (100, 1000, 1), (1000, 7, 1), (33, 576, 2)] {
            let rpt = rows_per_task(rows, cols, min_rows);
            assert!(
                (1..=rows).contains(&rpt) && (rpt.is_multiple_of(ROW_BLOCK) || rpt == rows),
                "{rows}x{cols}: {rpt}"
            );
        }
    }
}

#[cfg(test)]
/// Σ x·y with independent partial sums, so the loop vectorizes; the order of the additions
/// is fixed, so the result is deterministic.
#[inline(always)]
pub fn dot<M: Madd, T: Real>(x: &[T], y: &[T]) -> T {
    // 32 lanes: four independent AVX2 FMA chains for f32.
    let mut wide = [T::zero(); 32];
    let xs = x.chunks_exact(32);
    let ys = y.chunks_exact(32);
    let (xr, yr) = (xs.remainder(), ys.remainder());
    for (cx, cy) in xs.zip(ys) {
        for l in 0..32 {
            wide[l] = M::madd(cx[l], cy[l], wide[l]);
        }
    }
    let mut acc = [T::zero(); 8];
    for l in 0..32 {
        acc[l % 8] = acc[l % 8] + wide[l];
    }
    let mut tail = T::zero();
    for (&a, &b) in xr.iter().zip(yr) {
        tail = M::madd(a, b, tail);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[cfg(test)]
mod vector_tests {
    use super::*;
    use crate::cpu::simd::Plain;

    #[test]
    fn dot_matches_a_plain_loop() {
        let x: Vec<f64> = (0..19).map(|i| i as f64 * 0.5 - 3.0).collect();
        let y: Vec<f64> = (0..19).map(|i| 1.0 / (i as f64 + 1.0)).collect();
        let want: f64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot::<Plain, _>(&x, &y) - want).abs() < 1e-12);
    }
}
