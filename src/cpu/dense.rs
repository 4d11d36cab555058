//! Small dense row-major matrices: the thin LoRA factors in compute precision, as the CPU
//! kernels and the low-rank forms (`crate::forms`) read them.

use crate::scalar::Real;

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

    pub fn row(&self, i: usize) -> &[T] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// What only the tch path's one-GEMM form (`forms::assemble`) and the tests use.
#[cfg(any(feature = "tch", test))]
impl<T: Real> Dense<T> {
    pub fn map(&self, f: impl Fn(T) -> T) -> Self {
        Dense::new(
            self.rows,
            self.cols,
            self.data.iter().map(|&x| f(x)).collect(),
        )
    }

    pub fn scaled(&self, s: T) -> Self {
        self.map(|x| x * s)
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
