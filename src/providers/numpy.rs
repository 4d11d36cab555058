//! NumPy arrays as arguments (CPU, float32/float64), for every provider: read in place, zero-copy,
//! borrowed through the numpy crate so an array written in place is not aliased meanwhile.

use super::Arg;
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, TensorRef};
use numpy::{PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use numpy::{PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;

/// Keeps a NumPy array borrowed (and so alive and unaliased) while a view reads its memory.
#[allow(dead_code)] // held only for its Drop
pub enum Borrow<'py> {
    ReadF32(PyReadonlyArrayDyn<'py, f32>),
    ReadF64(PyReadonlyArrayDyn<'py, f64>),
    WriteF32(PyReadwriteArrayDyn<'py, f32>),
    WriteF64(PyReadwriteArrayDyn<'py, f64>),
}

/// `obj` as an argument if it is a NumPy array; `None` for anything else.
pub fn read<'py>(obj: &Bound<'py, PyAny>, name: &str, writable: bool) -> Result<Option<Arg<'py>>> {
    let Ok(array) = obj.downcast::<PyUntypedArray>() else {
        return Ok(None);
    };
    let dtype = array.dtype();
    let py = array.py();
    let (dt, itemsize) = if dtype.is_equiv_to(&numpy::dtype::<f32>(py)) {
        (DType::F32, 4)
    } else if dtype.is_equiv_to(&numpy::dtype::<f64>(py)) {
        (DType::F64, 8)
    } else {
        return Err(Error::type_(format!(
            "{name} must be a float32 or float64 numpy array, got dtype {dtype}"
        )));
    };
    let sizes: Vec<usize> = array.shape().to_vec();
    let mut strides = Vec::with_capacity(sizes.len());
    for &s in array.strides() {
        if s < 0 || s % itemsize != 0 {
            return Err(Error::value(format!(
                "{name} has negative or unaligned strides; pass numpy.ascontiguousarray({name})"
            )));
        }
        strides.push(s / itemsize);
    }
    let busy = |e: numpy::BorrowError| {
        Error::value(format!(
            "{name}: numpy array cannot be borrowed ({e}); is it read-only or used twice?"
        ))
    };
    let any = array.as_any();
    let not_read = |e: pyo3::DowncastError| Error::type_(format!("{name}: {e}"));
    let (borrow, ptr) = match (dt, writable) {
        (DType::F32, false) => {
            let ro = any
                .extract::<PyReadonlyArrayDyn<f32>>()
                .map_err(|e| Error::type_(format!("{name}: {e}")))?;
            let p = ro.data() as usize;
            (Borrow::ReadF32(ro), p)
        }
        (DType::F64, false) => {
            let ro = any
                .extract::<PyReadonlyArrayDyn<f64>>()
                .map_err(|e| Error::type_(format!("{name}: {e}")))?;
            let p = ro.data() as usize;
            (Borrow::ReadF64(ro), p)
        }
        (DType::F32, true) => {
            let arr = any.downcast::<numpy::PyArrayDyn<f32>>().map_err(not_read)?;
            let rw = arr.try_readwrite().map_err(busy)?;
            let p = rw.data() as usize;
            (Borrow::WriteF32(rw), p)
        }
        _ => {
            let arr = any.downcast::<numpy::PyArrayDyn<f64>>().map_err(not_read)?;
            let rw = arr.try_readwrite().map_err(busy)?;
            let p = rw.data() as usize;
            (Borrow::WriteF64(rw), p)
        }
    };
    Ok(Some(Arg {
        name: name.to_string(),
        view: TensorRef {
            ptr,
            sizes,
            strides,
            dtype: dt,
            device: Device::Cpu,
        },
        object: obj.clone(),
        borrow: Some(borrow),
        #[cfg(feature = "tch")]
        tch: None,
    }))
}
