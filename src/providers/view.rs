//! The torch-agnostic provider: a tensor's data pointer, sizes, strides, dtype and device read
//! through pyo3 (the methods every torch since 1.x has), tensors made by calling torch from
//! Python. The module links no libtorch, so one build serves every torch version.
//!
//! What `data_ptr()` does not say is checked here: a tensor must be a plain dense tensor — not
//! sparse or otherwise non-strided, not nested, without torch's lazy negation bit, and not a
//! subclass that reinterprets its memory (DTensor, FakeTensor: their `data_ptr()` is not what
//! their values are). The storage offset is already in `data_ptr()`.

use super::{not_a_tensor, Arg, Handle, Made, Provider};
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, TensorRef};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyList, PyTuple, PyType};

pub struct View;

pub static VIEW: View = View;

/// The torch objects the provider compares with or calls, looked up once.
struct Torch {
    module: Py<PyModule>,
    tensor: Py<PyType>,
    parameter: Py<PyType>,
    default_dispatch: PyObject,
    strided: PyObject,
    dtypes: Vec<(PyObject, DType)>,
}

static TORCH: GILOnceCell<Torch> = GILOnceCell::new();

/// torch's dtypes by their names (the floating ones the kernels read, the others for messages).
const DTYPES: &[(&str, DType)] = &[
    ("float32", DType::F32),
    ("float64", DType::F64),
    ("bfloat16", DType::BF16),
    ("float16", DType::F16),
    ("int64", DType::Other("int64")),
    ("int32", DType::Other("int32")),
    ("int16", DType::Other("int16")),
    ("int8", DType::Other("int8")),
    ("uint8", DType::Other("uint8")),
    ("bool", DType::Other("bool")),
    ("complex64", DType::Other("complex64")),
    ("complex128", DType::Other("complex128")),
];

fn torch(py: Python<'_>) -> Result<&Torch> {
    TORCH
        .get_or_try_init(py, || -> PyResult<Torch> {
            let module = py.import("torch")?;
            let tensor = module.getattr("Tensor")?.downcast_into::<PyType>()?;
            let parameter = module
                .getattr("nn")?
                .getattr("Parameter")?
                .downcast_into::<PyType>()?;
            let default_dispatch = tensor.getattr("__torch_dispatch__")?.unbind();
            let mut dtypes = Vec::new();
            for &(name, dtype) in DTYPES {
                dtypes.push((module.getattr(name)?.unbind(), dtype));
            }
            Ok(Torch {
                strided: module.getattr("strided")?.unbind(),
                module: module.unbind(),
                tensor: tensor.unbind(),
                parameter: parameter.unbind(),
                default_dispatch,
                dtypes,
            })
        })
        .map_err(|e| Error::type_(format!("hlora cannot use torch: {e}")))
}

fn py_err(what: &str) -> impl Fn(PyErr) -> Error + '_ {
    move |e| Error::value(format!("{what}: {e}"))
}

impl Torch {
    fn dtype_of(&self, obj: &Bound<'_, PyAny>) -> DType {
        self.dtypes
            .iter()
            .find(|(d, _)| obj.is(d))
            .map_or(DType::Other("an unsupported dtype"), |&(_, dt)| dt)
    }

    fn dtype_object<'py>(&self, py: Python<'py>, dtype: DType) -> Result<Bound<'py, PyAny>> {
        self.dtypes
            .iter()
            .find(|&&(_, dt)| dt == dtype)
            .map(|(d, _)| d.bind(py).clone())
            .ok_or_else(|| Error::value(format!("internal: no torch dtype for {}", dtype.name())))
    }
}

fn device_of(obj: &Bound<'_, PyAny>, name: &str) -> Result<Device> {
    let py = obj.py();
    let unreadable = |e: PyErr| Error::type_(format!("{name}: cannot read its device ({e})"));
    let flag = |attr: &Bound<'_, pyo3::types::PyString>| -> Result<bool> {
        obj.getattr(attr)
            .and_then(|v| v.extract::<bool>())
            .map_err(unreadable)
    };
    if flag(intern!(py, "is_cpu"))? {
        return Ok(Device::Cpu);
    }
    if flag(intern!(py, "is_cuda"))? {
        let index: i32 = obj
            .call_method0(intern!(py, "get_device"))
            .and_then(|v| v.extract())
            .map_err(unreadable)?;
        return Ok(Device::Cuda(index));
    }
    if flag(intern!(py, "is_meta"))? {
        return Ok(Device::Meta);
    }
    let kind: String = obj
        .getattr(intern!(py, "device"))
        .and_then(|d| d.getattr("type"))
        .and_then(|t| t.extract())
        .map_err(unreadable)?;
    Ok(Device::Other(match kind.as_str() {
        "mps" => "mps",
        "xpu" => "xpu",
        "hpu" => "hpu",
        "xla" => "xla",
        "privateuseone" => "privateuseone",
        _ => "an unsupported device",
    }))
}

/// The view of a tensor known to be a plain torch tensor (one of ours, or one checked by `read`).
fn view_of(t: &Torch, obj: &Bound<'_, PyAny>, name: &str) -> Result<TensorRef> {
    let py = obj.py();
    let dtype = t.dtype_of(&obj.getattr(intern!(py, "dtype")).map_err(py_err(name))?);
    let device = device_of(obj, name)?;
    let sizes: Vec<usize> = obj
        .getattr(intern!(py, "shape"))
        .and_then(|s| s.extract())
        .map_err(py_err(name))?;
    let strides: Vec<isize> = obj
        .call_method0(intern!(py, "stride"))
        .and_then(|s| s.extract())
        .map_err(py_err(name))?;
    let ptr: usize = obj
        .call_method0(intern!(py, "data_ptr"))
        .and_then(|p| p.extract())
        .map_err(|e| {
            Error::type_(format!(
                "{name}: cannot read its memory ({e}); pass a plain dense tensor"
            ))
        })?;
    Ok(TensorRef {
        ptr,
        sizes,
        strides,
        dtype,
        device,
    })
}

fn made(t: &Torch, obj: Bound<'_, PyAny>) -> Result<Made> {
    Ok(Made {
        view: view_of(t, &obj, "result")?,
        handle: Handle::Py(obj.unbind()),
    })
}

/// A torch.device for `device`: the CPU's made once (a device given as a string is parsed by
/// torch on every call, ~1 µs per tensor made).
fn device_object<'py>(py: Python<'py>, device: Device) -> Result<Bound<'py, PyAny>> {
    static CPU: GILOnceCell<PyObject> = GILOnceCell::new();
    let make = |name: String| -> PyResult<Bound<'py, PyAny>> {
        py.import("torch")?.getattr("device")?.call1((name,))
    };
    if device == Device::Cpu {
        return CPU
            .get_or_try_init(py, || make("cpu".into()).map(Bound::unbind))
            .map(|d| d.bind(py).clone())
            .map_err(py_err("device"));
    }
    make(device.name()).map_err(py_err("device"))
}

fn kwargs<'py>(
    py: Python<'py>,
    t: &Torch,
    dtype: DType,
    device: Device,
) -> Result<Bound<'py, PyDict>> {
    let kw = PyDict::new(py);
    kw.set_item(intern!(py, "dtype"), t.dtype_object(py, dtype)?)
        .and_then(|_| kw.set_item(intern!(py, "device"), device_object(py, device)?))
        .map_err(py_err("allocation"))?;
    Ok(kw)
}

/// The Python object of an argument as a torch tensor (a NumPy array through `torch.from_numpy`).
fn as_torch<'py>(t: &Torch, arg: &Arg<'py>) -> Result<Bound<'py, PyAny>> {
    let py = arg.object.py();
    if arg.object.is_instance(t.tensor.bind(py)).unwrap_or(false) {
        return Ok(arg.object.clone());
    }
    t.module
        .bind(py)
        .call_method1(intern!(py, "from_numpy"), (&arg.object,))
        .map_err(py_err(&arg.name))
}

/// A torch tensor whose memory holds its values: not a subclass that reinterprets it through
/// torch's dispatch (DTensor, FakeTensor, …). Plain tensors and parameters are the common case,
/// told by a pointer comparison.
fn check_class(t: &Torch, obj: &Bound<'_, PyAny>, name: &str) -> Result<()> {
    let py = obj.py();
    let tensor_type = t.tensor.bind(py);
    if !obj.is_instance(tensor_type).map_err(py_err(name))? {
        return Err(not_a_tensor(obj, name));
    }
    let class = obj.get_type();
    if !class.is(tensor_type) && !class.is(t.parameter.bind(py)) {
        let dispatch = class
            .getattr(intern!(py, "__torch_dispatch__"))
            .map_err(py_err(name))?;
        if !dispatch.eq(t.default_dispatch.bind(py)).unwrap_or(false) {
            let class_name = class.name().map(|n| n.to_string()).unwrap_or_default();
            return Err(Error::type_(format!(
                "{name} is a {class_name}, a tensor subclass whose memory does not hold its values; \
                 pass a plain tensor (a DTensor's .to_local(), say)"
            )));
        }
    }
    Ok(())
}

/// Why a tensor is not one dense matrix in memory: a layout other than strided (sparse, MKL-DNN),
/// or nested. None when it is.
fn not_dense(t: &Torch, obj: &Bound<'_, PyAny>, name: &str) -> Result<Option<Error>> {
    let py = obj.py();
    let layout = obj.getattr(intern!(py, "layout")).map_err(py_err(name))?;
    if !layout.is(t.strided.bind(py)) {
        return Ok(Some(Error::type_(format!(
            "{name} must be a dense (strided) tensor, got layout {layout}; pass {name}.to_dense()"
        ))));
    }
    if is_nested(obj, name)? {
        return Ok(Some(Error::type_(format!(
            "{name} is a nested tensor; pass one dense matrix"
        ))));
    }
    Ok(None)
}

/// What every provider checks before reading a tensor's memory (libtorch's own errors on these
/// name no argument; a nested tensor's sizes even abort tch): a plain, dense, unnested tensor.
/// (The view provider asks about layout and nesting only when a tensor's memory cannot be read:
/// every non-strided layout and nested tensor fails there, two attributes fewer per tensor.)
#[cfg(feature = "tch")]
pub fn check_plain(obj: &Bound<'_, PyAny>, name: &str) -> Result<()> {
    let t = torch(obj.py())?;
    check_class(t, obj, name)?;
    match not_dense(t, obj, name)? {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

fn is_nested(obj: &Bound<'_, PyAny>, name: &str) -> Result<bool> {
    obj.getattr(intern!(obj.py(), "is_nested"))
        .and_then(|v| v.extract::<bool>())
        .map_err(py_err(name))
}

impl Provider for View {
    fn name(&self) -> &'static str {
        "view"
    }

    fn read<'py>(&self, obj: &Bound<'py, PyAny>, name: &str) -> Result<Arg<'py>> {
        let py = obj.py();
        let t = torch(py)?;
        check_class(t, obj, name)?;
        let negated = obj
            .call_method0(intern!(py, "is_neg"))
            .and_then(|v| v.extract::<bool>())
            .map_err(py_err(name))?;
        if negated {
            return Err(Error::value(format!(
                "{name} has torch's negation bit set (its memory holds the values' negatives); \
                 pass {name}.resolve_neg()"
            )));
        }
        let view = match view_of(t, obj, name) {
            Ok(view) => view,
            Err(err) => return Err(not_dense(t, obj, name)?.unwrap_or(err)),
        };
        if let DType::Other(_) = view.dtype {
            let conj = obj
                .call_method0(intern!(py, "is_conj"))
                .and_then(|v| v.extract::<bool>())
                .unwrap_or(false);
            if conj {
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
            #[cfg(feature = "tch")]
            tch: None,
        })
    }

    fn empty(&self, py: Python<'_>, sizes: &[usize], dtype: DType, device: Device) -> Result<Made> {
        let t = torch(py)?;
        let shape = PyTuple::new(py, sizes).map_err(py_err("allocation"))?;
        let obj = t
            .module
            .bind(py)
            .getattr(intern!(py, "empty"))
            .and_then(|f| f.call((shape,), Some(&kwargs(py, t, dtype, device)?)))
            .map_err(py_err("allocation"))?;
        made(t, obj)
    }

    /// One allocation for all, cut into views by torch's own `_unflatten_dense_tensors` (one call
    /// for every tensor: ~2 µs per `torch.empty` through Python, times two per matrix, was most of
    /// the view provider's cost per penalty call over a model's matrices).
    fn empty_like_each(
        &self,
        py: Python<'_>,
        templates: &[&Arg],
        dtype: DType,
        device: Device,
    ) -> Result<Vec<Made>> {
        if templates.len() <= 2 {
            // One matrix's pair: two allocations cost less than one cut into two.
            return templates
                .iter()
                .map(|a| self.empty(py, &a.view.sizes, dtype, device))
                .collect();
        }
        static UNFLATTEN: GILOnceCell<PyObject> = GILOnceCell::new();
        let unflatten = UNFLATTEN
            .get_or_try_init(py, || -> PyResult<PyObject> {
                Ok(py
                    .import("torch._utils")?
                    .getattr("_unflatten_dense_tensors")?
                    .unbind())
            })
            .map_err(py_err("allocation"))?;
        let total: usize = templates.iter().map(|a| a.view.numel()).sum();
        let flat = self.empty(py, &[total.max(1)], dtype, device)?;
        let objects =
            PyList::new(py, templates.iter().map(|a| &a.object)).map_err(py_err("allocation"))?;
        let views = unflatten
            .bind(py)
            .call1((flat.object(py)?, objects))
            .and_then(|v| v.try_iter()?.collect::<PyResult<Vec<_>>>())
            .map_err(py_err("allocation"))?;
        let mut offset = 0;
        let mut out = Vec::with_capacity(templates.len());
        for (template, obj) in templates.iter().zip(views) {
            let ptr = flat.view.ptr + offset * dtype.size();
            offset += template.view.numel();
            out.push(Made {
                view: TensorRef::contiguous(ptr, &template.view.sizes, dtype, device),
                handle: Handle::Py(obj.unbind()),
            });
        }
        Ok(out)
    }

    fn zeros(&self, py: Python<'_>, sizes: &[usize], dtype: DType, device: Device) -> Result<Made> {
        let t = torch(py)?;
        let shape = PyTuple::new(py, sizes).map_err(py_err("allocation"))?;
        let obj = t
            .module
            .bind(py)
            .getattr(intern!(py, "zeros"))
            .and_then(|f| f.call((shape,), Some(&kwargs(py, t, dtype, device)?)))
            .map_err(py_err("allocation"))?;
        made(t, obj)
    }

    fn tensor_of_f64s(
        &self,
        py: Python<'_>,
        values: &[f64],
        sizes: &[usize],
        dtype: DType,
        device: Device,
    ) -> Result<Made> {
        let t = torch(py)?;
        if let ([], [value]) = (sizes, values) {
            // A 0-d result (the penalty's value): one call (torch.tensor takes 3x as long).
            let obj = t
                .module
                .bind(py)
                .getattr(intern!(py, "scalar_tensor"))
                .and_then(|f| f.call((*value,), Some(&kwargs(py, t, dtype, device)?)))
                .map_err(py_err("result"))?;
            return made(t, obj);
        }
        let list = PyList::new(py, values).map_err(py_err("result"))?;
        let shape = PyTuple::new(py, sizes).map_err(py_err("result"))?;
        let obj = t
            .module
            .bind(py)
            .getattr(intern!(py, "tensor"))
            .and_then(|f| f.call((list,), Some(&kwargs(py, t, DType::F64, Device::Cpu)?)))
            .and_then(|x| x.call_method1(intern!(py, "reshape"), (shape,)))
            .and_then(|x| x.call_method("to", (), Some(&kwargs(py, t, dtype, device)?)))
            .map_err(py_err("result"))?;
        made(t, obj)
    }

    fn converted(&self, py: Python<'_>, src: &Arg, dtype: DType) -> Result<Made> {
        let t = torch(py)?;
        let obj = as_torch(t, src)?
            .call_method0(intern!(py, "detach"))
            .and_then(|x| x.call_method1(intern!(py, "to"), (t.dtype_object(py, dtype)?,)))
            .and_then(|x| x.call_method0(intern!(py, "contiguous")))
            .map_err(py_err(&src.name))?;
        made(t, obj)
    }

    fn copy_into(&self, py: Python<'_>, dst: &Arg, src: &Made) -> Result<()> {
        let t = torch(py)?;
        as_torch(t, dst)?
            .call_method0(intern!(py, "detach"))
            .and_then(|x| x.call_method1(intern!(py, "copy_"), (src.object(py)?,)))
            .map_err(py_err(&dst.name))?;
        Ok(())
    }

    fn cast(&self, py: Python<'_>, x: Made, dtype: DType) -> Result<Made> {
        if x.view.dtype == dtype {
            return Ok(x);
        }
        let t = torch(py)?;
        let obj = x
            .object(py)?
            .call_method1(intern!(py, "to"), (t.dtype_object(py, dtype)?,))
            .map_err(py_err("result"))?;
        made(t, obj)
    }

    fn add(&self, py: Python<'_>, a: &Made, b: &Made) -> Result<Made> {
        let obj = a
            .object(py)?
            .call_method1(intern!(py, "add"), (b.object(py)?,))
            .map_err(py_err("result"))?;
        made(torch(py)?, obj)
    }

    fn select(&self, py: Python<'_>, x: &Made, index: usize) -> Result<Made> {
        let obj = x
            .object(py)?
            .call_method1(intern!(py, "select"), (0, index))
            .map_err(py_err("result"))?;
        made(torch(py)?, obj)
    }

    fn index_copy(&self, py: Python<'_>, dst: &Made, index: &[i64], src: &Made) -> Result<()> {
        let t = torch(py)?;
        let n = index.len();
        let kw = PyDict::new(py);
        kw.set_item(intern!(py, "device"), device_object(py, dst.view.device)?)
            .map_err(py_err("index"))?;
        let index = t
            .module
            .bind(py)
            .getattr(intern!(py, "tensor"))
            .and_then(|f| f.call((index.to_vec(),), Some(&kw)))
            .map_err(py_err("index"))?;
        let src = src
            .object(py)?
            .call_method1(intern!(py, "narrow"), (0, 0, n))
            .map_err(py_err("result"))?;
        dst.object(py)?
            .call_method1(intern!(py, "index_copy_"), (0, index, src))
            .map_err(py_err("result"))?;
        Ok(())
    }
}
