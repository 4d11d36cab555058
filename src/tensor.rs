//! The tensor view every kernel reads: where the elements are, their sizes and strides, their
//! dtype and device — filled by a provider (`crate::providers`) from a torch tensor or a NumPy
//! array, and never tied to one torch version. A view does not own its memory: the argument it
//! came from (or the tensor a provider made) keeps that alive for the call.

use crate::error::{Error, Result};

/// Element types as torch names them. The kernels compute on the four floating ones; the others
/// exist so a refusal can name what it got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    BF16,
    F16,
    /// Any other dtype, by torch's name for it.
    Other(&'static str),
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::Other(name) => name,
        }
    }

    /// Bytes per element (0 for a dtype the kernels do not read).
    pub fn size(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::Other(_) => 0,
        }
    }
}

/// Factor dtypes the ops take (DESIGN §2).
pub const FACTOR_DTYPES: &[DType] = &[DType::F64, DType::F32, DType::BF16, DType::F16];
/// dtypes an ω accumulator or an Ω finalization input may have.
pub const OMEGA_DTYPES: &[DType] = &[DType::F64, DType::F32];
/// dtypes a stored Ω may have when read by the penalty (bfloat16/float16 storage halves bytes).
pub const STORED_OMEGA_DTYPES: &[DType] = FACTOR_DTYPES;

/// The dtype the maths (and its results) run in: float64, or float32.
pub fn math_dtype(f64_math: bool) -> DType {
    if f64_math {
        DType::F64
    } else {
        DType::F32
    }
}

pub fn dtype_list(dtypes: &[DType]) -> String {
    dtypes
        .iter()
        .map(|d| d.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
    /// Shape inference: no memory behind the tensor.
    Meta,
    /// A device the kernels do not run on (mps, xpu, …), by torch's name.
    Other(&'static str),
}

impl Device {
    /// As torch prints it: cpu, cuda:0, meta.
    pub fn name(self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(index) => format!("cuda:{index}"),
            Device::Meta => "meta".into(),
            Device::Other(name) => name.into(),
        }
    }
}

/// A strided view of elements in memory: `ptr` is the address of element (0, 0, …) — the
/// storage offset already applied — and `strides` count elements.
#[derive(Clone, Debug)]
pub struct TensorRef {
    pub ptr: usize,
    pub sizes: Vec<usize>,
    pub strides: Vec<isize>,
    pub dtype: DType,
    pub device: Device,
}

impl TensorRef {
    /// A view of contiguous memory of these sizes.
    pub fn contiguous(ptr: usize, sizes: &[usize], dtype: DType, device: Device) -> Self {
        let mut strides = vec![0isize; sizes.len()];
        let mut step = 1isize;
        for (s, &n) in strides.iter_mut().zip(sizes).rev() {
            *s = step;
            step *= n.max(1) as isize;
        }
        TensorRef {
            ptr,
            sizes: sizes.to_vec(),
            strides,
            dtype,
            device,
        }
    }

    pub fn numel(&self) -> usize {
        self.sizes.iter().product()
    }

    /// Row-major contiguous (sizes of 1 may have any stride, as torch reports them).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1isize;
        for (&n, &s) in self.sizes.iter().zip(&self.strides).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected *= n as isize;
        }
        true
    }

    /// (rows, cols) of a matrix.
    pub fn dims2(&self) -> Option<(usize, usize)> {
        match self.sizes[..] {
            [rows, cols] => Some((rows, cols)),
            _ => None,
        }
    }

    /// Whether two indices address one element: a stride of 0 along more than one element, or
    /// steps di·s₀ = dj·s₁ within the matrix (the smallest being s₁/g rows against s₀/g
    /// columns, g = gcd). Only matrices are judged (other ranks are refused by shape).
    pub fn overlaps_itself(&self) -> bool {
        let ([n0, n1], [s0, s1]) = (&self.sizes[..], &self.strides[..]) else {
            return false;
        };
        let (s0, s1) = (s0.unsigned_abs(), s1.unsigned_abs());
        if *n0 == 0 || *n1 == 0 {
            return false;
        }
        if (*n0 > 1 && s0 == 0) || (*n1 > 1 && s1 == 0) {
            return true;
        }
        if *n0 < 2 || *n1 < 2 {
            return false;
        }
        let g = gcd(s0, s1);
        s1 / g < *n0 && s0 / g < *n1
    }

    /// The elements of a contiguous CPU view of element type `S`.
    ///
    /// # Safety
    /// The view must be contiguous, on the CPU, of dtype `S`, over live memory not written
    /// elsewhere meanwhile.
    pub unsafe fn slice<S>(&self) -> &[S] {
        let n = self.numel();
        if n == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr as *const S, n)
    }

    /// Mutable variant of [`Self::slice`].
    ///
    /// # Safety
    /// As [`Self::slice`], and no other reference to the memory may exist.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut<S>(&self) -> &mut [S] {
        let n = self.numel();
        if n == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.ptr as *mut S, n)
    }

    /// Copies a strided CPU matrix of dtype `S` into a new row-major `Vec`.
    ///
    /// # Safety
    /// The view must describe live CPU memory of dtype `S`.
    pub unsafe fn gather<S: Copy>(&self) -> Vec<S> {
        let (rows, cols) = self.dims2().unwrap_or((0, 0));
        let (s0, s1) = (self.strides[0], self.strides[1]);
        let base = self.ptr as *const S;
        let mut out = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                out.push(*base.offset(i as isize * s0 + j as isize * s1));
            }
        }
        out
    }

    /// Writes row-major `values` back into a strided CPU matrix of dtype `S`.
    ///
    /// # Safety
    /// The view must describe live, writable CPU memory of dtype `S` whose elements do not
    /// overlap ([`Self::overlaps_itself`] is false), with `values.len()` elements.
    pub unsafe fn scatter<S: Copy>(&self, values: &[S]) {
        let (rows, cols) = self.dims2().unwrap_or((0, 0));
        let (s0, s1) = (self.strides[0], self.strides[1]);
        let base = self.ptr as *mut S;
        for i in 0..rows {
            for j in 0..cols {
                *base.offset(i as isize * s0 + j as isize * s1) = values[i * cols + j];
            }
        }
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The element type as a dtype (for the compile-time element types of the kernels).
pub trait Element {
    const DTYPE: DType;
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}

/// Refuses a view that is not a CPU matrix of `dtype` (what the unsafe readers rely on).
pub fn expect_cpu(view: &TensorRef, dtype: DType) -> Result<()> {
    if view.device != Device::Cpu || view.dtype != dtype || view.dims2().is_none() {
        return Err(Error::value(format!(
            "internal: expected a CPU {} matrix, got {} {} of shape {:?}",
            dtype.name(),
            view.device.name(),
            view.dtype.name(),
            view.sizes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(sizes: [usize; 2], strides: [isize; 2]) -> TensorRef {
        TensorRef {
            ptr: 64,
            sizes: sizes.to_vec(),
            strides: strides.to_vec(),
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }

    #[test]
    fn self_overlap_is_told_from_size_and_strides() {
        let overlaps = |s: [usize; 2], st: [isize; 2]| matrix(s, st).overlaps_itself();
        assert!(!overlaps([5, 6], [6, 1]));
        assert!(!overlaps([6, 5], [1, 6])); // a transpose
        assert!(!overlaps([4, 6], [12, 2])); // every other column
        assert!(!overlaps([1, 6], [0, 1])); // stride 0 over one row
        assert!(!overlaps([0, 6], [0, 0]));
        assert!(overlaps([5, 6], [0, 1])); // expand()ed rows
        assert!(overlaps([5, 6], [3, 1])); // rows overlapping by three elements
        assert!(overlaps([3, 4], [1, 2])); // (2, 0) and (0, 1) are one element
        assert!(!overlaps([2, 3], [3, 2])); // interleaved, yet no element shared
        let cube = TensorRef {
            sizes: vec![1, 5, 6],
            strides: vec![0, 0, 1],
            ..matrix([1, 1], [1, 1])
        };
        assert!(!cube.overlaps_itself()); // not a matrix: refused by shape
    }

    #[test]
    fn contiguity_ignores_the_strides_of_unit_sizes() {
        assert!(TensorRef::contiguous(0, &[3, 4], DType::F32, Device::Cpu).is_contiguous());
        assert!(matrix([1, 4], [99, 1]).is_contiguous());
        assert!(matrix([3, 1], [1, 7]).is_contiguous());
        assert!(!matrix([3, 4], [1, 3]).is_contiguous());
        assert!(!matrix([3, 4], [8, 1]).is_contiguous());
    }

    #[test]
    fn gather_and_scatter_follow_the_strides() {
        let mut memory: Vec<f32> = (0..12).map(|x| x as f32).collect();
        // The transpose of a 3 × 4 row-major matrix, as a 4 × 3 view.
        let view = TensorRef {
            ptr: memory.as_mut_ptr() as usize,
            sizes: vec![4, 3],
            strides: vec![1, 4],
            dtype: DType::F32,
            device: Device::Cpu,
        };
        let values = unsafe { view.gather::<f32>() };
        assert_eq!(values[..4], [0.0, 4.0, 8.0, 1.0]);
        let doubled: Vec<f32> = values.iter().map(|x| 2.0 * x).collect();
        unsafe { view.scatter(&doubled) };
        assert_eq!(memory[..5], [0.0, 2.0, 4.0, 6.0, 8.0]);
    }
}
