//! A matrix of shape (out, in) held as a product `L·R` of thin factors, `L: (out, k)` and
//! `R: (k, in)`. Every quantity of DESIGN §1 that is (out, in)-sized — g~, dθ, Δ, D — is of
//! this form with k = r or 2r, so the kernels never materialize it: they evaluate one tile of
//! one row at a time into a small buffer that stays in L1.

use crate::scalar::Real;

/// Columns per tile: 2 factors × 2r=16 rows × 256 × 4 B = 32 KiB of right factors in L1.
pub const TILE_COLS: usize = 256;

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
        Dense::new(self.rows, self.cols, self.data.iter().map(|&x| f(x)).collect())
    }

    pub fn zip(&self, other: &Self, f: impl Fn(T, T) -> T) -> Self {
        debug_assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        let data = self.data.iter().zip(&other.data).map(|(&x, &y)| f(x, y)).collect();
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

    /// `buf[j - j0] = Σ_q L[i,q]·R[q,j]` for j in j0..j0+buf.len(): k axpys over contiguous
    /// slices of R, which the compiler vectorizes.
    #[inline]
    pub fn row_tile_into(&self, i: usize, j0: usize, buf: &mut [T]) {
        let n = buf.len();
        buf.fill(T::zero());
        let left = &self.left[i * self.k..(i + 1) * self.k];
        for (q, &c) in left.iter().enumerate() {
            let start = q * self.cols + j0;
            axpy(c, &self.right[start..start + n], buf);
        }
    }

    /// The dense matrix (tests only: kernels never call this).
    #[cfg(test)]
    pub fn to_dense(&self) -> Dense<T> {
        let mut data = vec![T::zero(); self.rows * self.cols];
        for i in 0..self.rows {
            self.row_tile_into(i, 0, &mut data[i * self.cols..(i + 1) * self.cols]);
        }
        Dense::new(self.rows, self.cols, data)
    }
}

/// Rows per parallel task: enough work per task to amortize scheduling, and a fixed function
/// of the shape only, so reductions over tasks are deterministic whatever the thread count.
pub fn rows_per_task(rows: usize, cols: usize) -> usize {
    let target_elems = 1 << 16;
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
        let mut tile = [0.0f64; 2];
        lr.row_tile_into(2, 1, &mut tile);
        assert_eq!(tile, [6.0, 28.0]);
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
        assert!(rows_per_task(3072, 3072) >= 16);
    }
}

/// Σ x·y with eight independent partial sums, so the loop vectorizes; the order of the
/// additions is fixed, so the result is deterministic.
#[inline]
pub fn dot<T: Real>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let xs = x.chunks_exact(8);
    let ys = y.chunks_exact(8);
    let (xr, yr) = (xs.remainder(), ys.remainder());
    for (cx, cy) in xs.zip(ys) {
        for l in 0..8 {
            acc[l] = acc[l] + cx[l] * cy[l];
        }
    }
    let mut tail = T::zero();
    for (&a, &b) in xr.iter().zip(yr) {
        tail = tail + a * b;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// y += c·x
#[inline]
pub fn axpy<T: Real>(c: T, x: &[T], y: &mut [T]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv = *yv + c * xv;
    }
}

#[cfg(test)]
mod vector_tests {
    use super::*;

    #[test]
    fn dot_and_axpy_match_plain_loops() {
        let x: Vec<f64> = (0..19).map(|i| i as f64 * 0.5 - 3.0).collect();
        let y: Vec<f64> = (0..19).map(|i| 1.0 / (i as f64 + 1.0)).collect();
        let want: f64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot(&x, &y) - want).abs() < 1e-12);
        let mut z = y.clone();
        axpy(2.0, &x, &mut z);
        for i in 0..19 {
            assert_eq!(z[i], y[i] + 2.0 * x[i]);
        }
    }
}
