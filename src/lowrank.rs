//! A matrix of shape (out, in) held as a product `L·R` of thin factors, `L: (out, k)` and
//! `R: (k, in)`. Every quantity of DESIGN §1 that is (out, in)-sized — g~, dθ, Δ, D — is of
//! this form with k = r or 2r, so the kernels never materialize it: they evaluate one tile of
//! one tile of a few rows at a time into small buffers that stay in L1.

use crate::scalar::Real;
use crate::simd::Madd;
#[cfg(test)]
use crate::simd::Plain;

/// Columns per tile: 2 factors × 2r=16 rows × 128 × 4 B = 16 KiB of right factors in L1.
pub const TILE_COLS: usize = 128;

#[derive(Debug, Clone)]
pub struct LowRank<T> {
    pub rows: usize,
    pub cols: usize,
    pub k: usize,
    /// (rows, k), row-major.
    pub left: Vec<T>,
    /// (k, cols), row-major.
    pub right: Vec<T>,
}

/// A dense row-major matrix of compute-precision values (the thin factors).
#[derive(Debug, Clone)]
pub struct Dense<T> {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<T>,
}

impl<T: Real> Dense<T> {
    pub fn new(rows: usize, cols: usize, data: Vec<T>) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Dense { rows, cols, data }
    }

    pub fn map(&self, f: impl Fn(T) -> T) -> Self {
        Dense::new(
            self.rows,
            self.cols,
            self.data.iter().map(|&x| f(x)).collect(),
        )
    }

    pub fn zip(&self, other: &Self, f: impl Fn(T, T) -> T) -> Self {
        debug_assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        let data = self
            .data
            .iter()
            .zip(&other.data)
            .map(|(&x, &y)| f(x, y))
            .collect();
        Dense::new(self.rows, self.cols, data)
    }

    pub fn scaled(&self, s: T) -> Self {
        self.map(|x| x * s)
    }

    pub fn row(&self, i: usize) -> &[T] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// [self | other] side by side (same row count).
    pub fn hcat(&self, other: &Self) -> Self {
        debug_assert_eq!(self.rows, other.rows);
        let cols = self.cols + other.cols;
        let mut data = Vec::with_capacity(self.rows * cols);
        for i in 0..self.rows {
            data.extend_from_slice(self.row(i));
            data.extend_from_slice(other.row(i));
        }
        Dense::new(self.rows, cols, data)
    }

    /// [self ; other] stacked (same column count).
    pub fn vcat(&self, other: &Self) -> Self {
        debug_assert_eq!(self.cols, other.cols);
        let mut data = Vec::with_capacity((self.rows + other.rows) * self.cols);
        data.extend_from_slice(&self.data);
        data.extend_from_slice(&other.data);
        Dense::new(self.rows + other.rows, self.cols, data)
    }
}

impl<T: Real> LowRank<T> {
    pub fn new(left: Dense<T>, right: Dense<T>) -> Self {
        debug_assert_eq!(left.cols, right.rows);
        LowRank {
            rows: left.rows,
            cols: right.cols,
            k: left.cols,
            left: left.data,
            right: right.data,
        }
    }

    /// For `RB` consecutive rows i0.., `bufs[rr][j] = Σ_q L[i0+rr,q]·R[q,j0+j]` for j < n.
    ///
    /// Register-blocked micro-kernel: for each block of 16 columns, RB×16 sums live in
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
        const W: usize = 16;
        let k = self.k;
        let left = &self.left[i0 * k..(i0 + RB) * k];
        let mut jb = 0;
        while jb + W <= n {
            let mut acc = [[T::zero(); W]; RB];
            for q in 0..k {
                let start = q * self.cols + j0 + jb;
                let r = &self.right[start..start + W];
                for rr in 0..RB {
                    let c = left[rr * k + q];
                    for l in 0..W {
                        acc[rr][l] = M::madd(c, r[l], acc[rr][l]);
                    }
                }
            }
            for rr in 0..RB {
                bufs[rr][jb..jb + W].copy_from_slice(&acc[rr]);
            }
            jb += W;
        }
        // Remainder columns: j indexes R and every row's buffer.
        #[allow(clippy::needless_range_loop)]
        for j in jb..n {
            for rr in 0..RB {
                let mut acc = T::zero();
                for q in 0..k {
                    acc = M::madd(left[rr * k + q], self.right[q * self.cols + j0 + j], acc);
                }
                bufs[rr][j] = acc;
            }
        }
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

/// Rows evaluated together by the register-blocked micro-kernel.
pub const ROW_BLOCK: usize = 4;

/// Visits rows `row0..row0 + nrows` of the low-rank matrix `x` (and of `y`, same shape, when
/// it is `Some`) tile by tile, running `body` with `li` (row within the task), `j0` (first
/// column) and the tile's values `xv`, `yv` — the (out, in) matrices never exist beyond one tile
/// of `ROW_BLOCK` rows. A macro, not a closure: the body must be compiled inside the caller's
/// AVX2+FMA variant (a closure is a function of its own, compiled without those features).
macro_rules! for_each_tile {
    ($m:ty, $x:expr, $y:expr, $row0:expr, $nrows:expr, |$li:ident, $j0:ident, $xv:ident, $yv:ident| $body:block) => {{
        use $crate::lowrank::{ROW_BLOCK, TILE_COLS};
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

/// Rows per parallel task: enough work per task to amortize scheduling, and a fixed function
/// of the shape only, so reductions over tasks are deterministic whatever the thread count.
pub fn rows_per_task(rows: usize, cols: usize) -> usize {
    let target_elems = 1 << 14;
    (target_elems / cols.max(1)).clamp(1, rows.max(1))
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

    #[test]
    fn concatenations_keep_order() {
        let a = Dense::new(2, 1, vec![1.0f32, 2.0]);
        let b = Dense::new(2, 1, vec![3.0f32, 4.0]);
        assert_eq!(a.hcat(&b).data, vec![1.0, 3.0, 2.0, 4.0]);
        assert_eq!(a.vcat(&b).data, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn tasks_cover_rows() {
        assert_eq!(rows_per_task(10, 1 << 20), 1);
        assert_eq!(rows_per_task(4, 4), 4);
        // Wide matrices still get a few rows per task; narrow ones many.
        assert_eq!(rows_per_task(3072, 3072), 5);
        assert_eq!(rows_per_task(192, 64), 192);
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
    use crate::simd::Plain;

    #[test]
    fn dot_matches_a_plain_loop() {
        let x: Vec<f64> = (0..19).map(|i| i as f64 * 0.5 - 3.0).collect();
        let y: Vec<f64> = (0..19).map(|i| 1.0 / (i as f64 + 1.0)).collect();
        let want: f64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot::<Plain, _>(&x, &y) - want).abs() < 1e-12);
    }
}
