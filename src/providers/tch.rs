//! The tch provider (cargo feature `tch`): tensors read through pyo3-tch and made with libtorch,
//! for the torch this module was built against (tch binds exactly one libtorch release). It also
//! brings the tch path — the ops as libtorch calls on the tensors' device — which runs CUDA
//! tensors when the fused CUDA kernels cannot load, and CPU tensors in tests.

use super::{not_a_tensor, Arg, Handle, Made, Provider};
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, TensorRef};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{Kind, Tensor};

pub struct Tch;

pub static TCH: Tch = Tch;

/// The libtorch version tch 0.24 links against.
pub const TORCH_VERSION: &str = "2.11.0";

pub fn kind(dtype: DType) -> Result<Kind> {
    match dtype {
        DType::F64 => Ok(Kind::Double),
        DType::F32 => Ok(Kind::Float),
        DType::BF16 => Ok(Kind::BFloat16),
        DType::F16 => Ok(Kind::Half),
        DType::Other(name) => Err(Error::type_(format!("internal: no tch kind for {name}"))),
    }
}

fn dtype(kind: Kind) -> DType {
    match kind {
        Kind::Double => DType::F64,
        Kind::Float => DType::F32,
        Kind::BFloat16 => DType::BF16,
        Kind::Half => DType::F16,
        Kind::Int64 => DType::Other("int64"),
        Kind::Int => DType::Other("int32"),
        Kind::Int16 => DType::Other("int16"),
        Kind::Int8 => DType::Other("int8"),
        Kind::Uint8 => DType::Other("uint8"),
        Kind::Bool => DType::Other("bool"),
        Kind::ComplexFloat => DType::Other("complex64"),
        Kind::ComplexDouble => DType::Other("complex128"),
        _ => DType::Other("an unsupported dtype"),
    }
}

pub fn device(device: Device) -> Result<tch::Device> {
    match device {
        Device::Cpu => Ok(tch::Device::Cpu),
        Device::Cuda(index) => Ok(tch::Device::Cuda(index as usize)),
        other => Err(Error::value(format!(
            "internal: tch makes no tensors on {}",
            other.name()
        ))),
    }
}

/// The view of a tch tensor. tch reports every device but the CPU and CUDA as one code (a meta
/// tensor's included): `python_device` names those.
fn view_of(t: &Tensor, python_device: impl FnOnce() -> Result<Device>) -> Result<TensorRef> {
    let device = match t.device() {
        tch::Device::Cpu => Device::Cpu,
        tch::Device::Cuda(index) => Device::Cuda(index as i32),
        _ => python_device()?,
    };
    Ok(TensorRef {
        ptr: t.data_ptr() as usize,
        sizes: t.size().iter().map(|&n| n as usize).collect(),
        strides: t.stride().iter().map(|&s| s as isize).collect(),
        dtype: t
            .f_kind()
            .map_or(DType::Other("an unsupported dtype"), dtype),
        device,
    })
}

pub fn made(t: Tensor) -> Result<Made> {
    let view = view_of(&t, || {
        Err(Error::value(
            "internal: tch makes results on the cpu and cuda only",
        ))
    })?;
    Ok(Made {
        view,
        handle: Handle::Tch(t),
    })
}

fn python_device(obj: &Bound<'_, PyAny>, name: &str) -> Result<Device> {
    let kind: String = obj
        .getattr(intern!(obj.py(), "device"))
        .and_then(|d| d.getattr("type"))
        .and_then(|t| t.extract())
        .map_err(|e| Error::type_(format!("{name}: cannot read its device ({e})")))?;
    Ok(match kind.as_str() {
        "meta" => Device::Meta,
        "mps" => Device::Other("mps"),
        "xpu" => Device::Other("xpu"),
        _ => Device::Other("an unsupported device"),
    })
}

impl Tch {
    /// An argument's tch tensor: the one read from Python, or a view of a NumPy array's memory.
    pub fn tensor_of(arg: &Arg) -> Result<Tensor> {
        if let Some(t) = &arg.tch {
            return Ok(t.shallow_clone());
        }
        let v = &arg.view;
        let sizes: Vec<i64> = v.sizes.iter().map(|&n| n as i64).collect();
        let strides: Vec<i64> = v.strides.iter().map(|&s| s as i64).collect();
        // SAFETY: the view describes the memory of the NumPy array `arg` keeps borrowed and alive
        // for as long as `arg` lives, which outlives the call that uses this tensor.
        Ok(unsafe {
            Tensor::f_from_blob(
                v.ptr as *const u8,
                &sizes,
                &strides,
                kind(v.dtype)?,
                device(v.device)?,
            )?
        })
    }
}

impl Provider for Tch {
    fn name(&self) -> &'static str {
        "tch"
    }

    fn read<'py>(&self, obj: &Bound<'py, PyAny>, name: &str) -> Result<Arg<'py>> {
        super::view::check_plain(obj, name)?;
        let t = match obj.extract::<PyTensor>() {
            Ok(t) => t.0,
            Err(_) => return Err(not_a_tensor(obj, name)),
        };
        if t.is_neg() {
            return Err(Error::value(format!(
                "{name} has torch's negation bit set (its memory holds the values' negatives); \
                 pass {name}.resolve_neg()"
            )));
        }
        let view = view_of(&t, || python_device(obj, name))?;
        if let DType::Other(_) = view.dtype {
            if t.is_conj() {
                return Err(Error::type_(format!(
                    "{name} is a conjugate view of a complex tensor; hlora takes real float tensors"
                )));
            }
        }
        Ok(Arg {
            name: name.to_string(),
            view,
            object: obj.clone(),
            borrow: None,
            tch: Some(t),
        })
    }

    fn empty(&self, _: Python<'_>, sizes: &[usize], dt: DType, dev: Device) -> Result<Made> {
        let sizes: Vec<i64> = sizes.iter().map(|&n| n as i64).collect();
        made(Tensor::f_empty(&sizes, (kind(dt)?, device(dev)?))?)
    }

    fn zeros(&self, _: Python<'_>, sizes: &[usize], dt: DType, dev: Device) -> Result<Made> {
        let sizes: Vec<i64> = sizes.iter().map(|&n| n as i64).collect();
        made(Tensor::f_zeros(&sizes, (kind(dt)?, device(dev)?))?)
    }

    fn tensor_of_f64s(
        &self,
        _: Python<'_>,
        values: &[f64],
        sizes: &[usize],
        dt: DType,
        dev: Device,
    ) -> Result<Made> {
        let sizes: Vec<i64> = sizes.iter().map(|&n| n as i64).collect();
        let t = Tensor::f_from_slice(values)?
            .f_reshape(&sizes)?
            .f_to_kind(kind(dt)?)?
            .f_to_device(device(dev)?)?;
        made(t)
    }

    fn converted(&self, _: Python<'_>, src: &Arg, dt: DType) -> Result<Made> {
        let t = Tch::tensor_of(src)?;
        made(t.f_detach()?.f_to_kind(kind(dt)?)?.f_contiguous()?)
    }

    fn copy_into(&self, _: Python<'_>, dst: &Arg, src: &Made) -> Result<()> {
        let mut t = Tch::tensor_of(dst)?;
        tch::no_grad(|| t.f_copy_(src.tch()?).map_err(Error::from))
    }

    fn cast(&self, _: Python<'_>, t: Made, dt: DType) -> Result<Made> {
        if t.view.dtype == dt {
            return Ok(t);
        }
        made(t.tch()?.f_to_kind(kind(dt)?)?)
    }

    fn add(&self, _: Python<'_>, a: &Made, b: &Made) -> Result<Made> {
        made(a.tch()?.f_add(b.tch()?)?)
    }

    fn select(&self, _: Python<'_>, t: &Made, index: usize) -> Result<Made> {
        made(t.tch()?.f_select(0, index as i64)?)
    }

    fn index_copy(&self, _: Python<'_>, dst: &Made, index: &[i64], src: &Made) -> Result<()> {
        let target = dst.tch()?;
        let n = index.len() as i64;
        let index = Tensor::f_from_slice(index)?.f_to_device(target.device())?;
        let src = src.tch()?.f_narrow(0, 0, n)?;
        let _ = target.shallow_clone().f_index_copy_(0, &index, &src)?;
        Ok(())
    }
}
