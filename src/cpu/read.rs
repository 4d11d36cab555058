//! The thin factors as the CPU kernels read them: row-major values in compute precision, the
//! caller's own memory when it already is that (the usual case), else a converted copy.

use crate::cpu::dense::Dense;
use crate::error::{Error, Result};
use crate::scalar::{Real, Storage};
use crate::tensor::{DType, Device, TensorRef};
use half::{bf16, f16};

/// A thin factor's values in compute precision, row-major.
pub enum FactorRows<'t, T> {
    Borrowed(usize, usize, &'t [T]),
    Owned(Dense<T>),
}

impl<T: Real> FactorRows<'_, T> {
    /// A copy of one's own (each thread of a kernel lays out its factors from these).
    pub fn to_dense(&self) -> Dense<T> {
        match self {
            FactorRows::Borrowed(rows, cols, data) => Dense::new(*rows, *cols, data.to_vec()),
            FactorRows::Owned(d) => d.clone(),
        }
    }
}

/// The matrix's elements converted to `T`, row-major.
///
/// # Safety
/// `v` must describe live CPU memory of its dtype.
unsafe fn converted<S: Storage, T: Real>(v: &TensorRef) -> Vec<T> {
    v.gather::<S>().into_iter().map(T::load).collect()
}

/// `v`'s values as [`FactorRows`]. `v` must not be written while they are borrowed: the ω
/// update's threads copy them while the others write ω, so the two must not overlap (`disjoint`
/// refuses any overlap of two contiguous tensors; a strided ω is updated through a copy).
pub fn factor_rows<T: Real>(v: &TensorRef) -> Result<FactorRows<'_, T>> {
    let (rows, cols) = v
        .dims2()
        .filter(|_| v.device == Device::Cpu)
        .ok_or_else(|| Error::value("internal: the CPU kernels read CPU matrices"))?;
    if v.dtype == T::DTYPE && v.is_contiguous() {
        // Read in place: a conversion costs ~5 µs per factor, a sixth of a whole kernel call at
        // SmolLM2's shapes.
        // SAFETY: contiguous CPU matrix of element type T; only read, and not written while
        // borrowed (above).
        return Ok(FactorRows::Borrowed(rows, cols, unsafe { v.slice::<T>() }));
    }
    // SAFETY: a CPU matrix of the dtype matched, kept alive by its argument for the call.
    let data = unsafe {
        match v.dtype {
            DType::F64 => converted::<f64, T>(v),
            DType::F32 => converted::<f32, T>(v),
            DType::BF16 => converted::<bf16, T>(v),
            DType::F16 => converted::<f16, T>(v),
            DType::Other(name) => {
                return Err(Error::type_(format!("internal: cannot read {name}")))
            }
        }
    };
    Ok(FactorRows::Owned(Dense::new(rows, cols, data)))
}

/// A thin factor as a row-major `Dense` in compute precision (a small copy; never (out, in)).
pub fn dense<T: Real>(v: &TensorRef) -> Result<Dense<T>> {
    Ok(match factor_rows::<T>(v)? {
        FactorRows::Borrowed(rows, cols, data) => Dense::new(rows, cols, data.to_vec()),
        FactorRows::Owned(d) => d,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_and_converted_factors_read_as_the_contiguous_ones() {
        let values: Vec<f32> = (0..6).map(|x| x as f32 * 0.5).collect();
        let plain =
            TensorRef::contiguous(values.as_ptr() as usize, &[2, 3], DType::F32, Device::Cpu);
        match factor_rows::<f32>(&plain).unwrap() {
            FactorRows::Borrowed(2, 3, data) => assert_eq!(data, &values[..]),
            _ => panic!("a contiguous float32 factor is read in place"),
        }
        // The transpose of a 3 × 2 matrix holding the same values column by column.
        let columns: Vec<f16> = [0, 3, 1, 4, 2, 5]
            .iter()
            .map(|&i| f16::from_f32(values[i]))
            .collect();
        let transposed = TensorRef {
            ptr: columns.as_ptr() as usize,
            sizes: vec![2, 3],
            strides: vec![1, 2],
            dtype: DType::F16,
            device: Device::Cpu,
        };
        assert_eq!(
            dense::<f64>(&transposed).unwrap().data,
            values.iter().map(|&x| x as f64).collect::<Vec<_>>()
        );
    }
}
