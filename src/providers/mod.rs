//! Arguments and results: Python objects in, checked views (`Arg`) for the kernels, and the
//! tensors the ops return (`Made`), made by a provider.
//!
//! Two providers fill the same views. `view` reads a torch tensor's attributes through pyo3 and
//! makes tensors by calling torch from Python: no libtorch linkage, so it works with any torch.
//! `tch` (the cargo feature of that name) reads tensors through pyo3-tch for the torch the module
//! was built against, and brings the tch path (libtorch ops on the device) for CUDA tensors when
//! the fused kernels cannot run. NumPy arrays are read the same way under both (`numpy`).
//! The checks every op applies to its arguments live here too, so both providers refuse the same
//! inputs with the same messages.

mod numpy;
#[cfg(feature = "tch")]
pub mod tch;
pub mod view;

use crate::error::{Error, Result};
use crate::tensor::{dtype_list, DType, Device, TensorRef, FACTOR_DTYPES};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

/// A validated argument: its name for messages, the view the kernels read, and what keeps the
/// memory alive (and unaliased, for a NumPy array) while the view is in use.
pub struct Arg<'py> {
    pub name: String,
    pub view: TensorRef,
    pub object: Bound<'py, PyAny>,
    #[allow(dead_code)] // held only for its Drop: the NumPy borrow
    borrow: Option<numpy::Borrow<'py>>,
    /// The tch provider's handle of a torch tensor (the tch path computes on it).
    #[cfg(feature = "tch")]
    pub tch: Option<::tch::Tensor>,
}

/// A tensor a provider made: the view the kernels write, and the object Python gets back.
pub struct Made {
    pub view: TensorRef,
    handle: Handle,
}

enum Handle {
    Py(Py<PyAny>),
    #[cfg(feature = "tch")]
    Tch(::tch::Tensor),
}

impl Made {
    pub fn into_py(self, py: Python<'_>) -> PyResult<PyObject> {
        match self.handle {
            Handle::Py(obj) => Ok(obj),
            #[cfg(feature = "tch")]
            Handle::Tch(t) => Ok(pyo3_tch::PyTensor(t).into_pyobject(py)?.unbind()),
        }
        .inspect(|_| {
            let _ = py; // (used by the tch handle only)
        })
    }

    /// The Python object behind a view-provider tensor.
    fn object<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyAny>> {
        match &self.handle {
            Handle::Py(obj) => Ok(obj.bind(py).clone()),
            #[cfg(feature = "tch")]
            Handle::Tch(_) => Err(Error::value(
                "internal: a tch tensor given to the view provider",
            )),
        }
    }

    #[cfg(feature = "tch")]
    pub fn tch(&self) -> Result<&::tch::Tensor> {
        match &self.handle {
            Handle::Tch(t) => Ok(t),
            Handle::Py(_) => Err(Error::value(
                "internal: a view-provider tensor given to tch",
            )),
        }
    }
}

/// What a provider does besides reading arguments: make the tensors the ops return, and the few
/// tensor operations the CUDA path needs around its kernels (on the tensors' device, on torch's
/// current stream). Called with the GIL held.
pub trait Provider: Sync {
    fn name(&self) -> &'static str;
    /// A torch tensor as an argument (NumPy arrays are read by [`arg`] for every provider).
    fn read<'py>(&self, obj: &Bound<'py, PyAny>, name: &str) -> Result<Arg<'py>>;
    fn empty(&self, py: Python<'_>, sizes: &[usize], dtype: DType, device: Device) -> Result<Made>;
    fn zeros(&self, py: Python<'_>, sizes: &[usize], dtype: DType, device: Device) -> Result<Made>;
    /// One uninitialized tensor of each template's shape, in `dtype` on `device` (the penalty's
    /// gradients: a provider may carve them out of one allocation).
    fn empty_like_each(
        &self,
        py: Python<'_>,
        templates: &[&Arg],
        dtype: DType,
        device: Device,
    ) -> Result<Vec<Made>> {
        templates
            .iter()
            .map(|t| self.empty(py, &t.view.sizes, dtype, device))
            .collect()
    }
    /// `values` (row-major) as a tensor of `dtype` on `device`.
    fn tensor_of_f64s(
        &self,
        py: Python<'_>,
        values: &[f64],
        sizes: &[usize],
        dtype: DType,
        device: Device,
    ) -> Result<Made>;
    /// A detached, contiguous copy of `src` in `dtype`, on its device.
    fn converted(&self, py: Python<'_>, src: &Arg, dtype: DType) -> Result<Made>;
    /// `dst` ← `src` (the copy back of a strided ω updated through a contiguous one).
    fn copy_into(&self, py: Python<'_>, dst: &Arg, src: &Made) -> Result<()>;
    fn cast(&self, py: Python<'_>, t: Made, dtype: DType) -> Result<Made>;
    fn add(&self, py: Python<'_>, a: &Made, b: &Made) -> Result<Made>;
    /// Element `index` of a 1-D tensor, as a 0-d tensor.
    fn select(&self, py: Python<'_>, t: &Made, index: usize) -> Result<Made>;
    /// `dst[index[i]] = src[i]` for 1-D tensors, from the first `index.len()` elements of `src`.
    fn index_copy(&self, py: Python<'_>, dst: &Made, index: &[i64], src: &Made) -> Result<()>;
}

const VIEW: u8 = 0;
const TCH: u8 = 1;
static ACTIVE: AtomicU8 = AtomicU8::new(VIEW);

/// The providers this build has, the first being the one it starts with when it runs against
/// the torch it was built for.
pub fn compiled() -> Vec<&'static str> {
    if cfg!(feature = "tch") {
        vec!["tch", "view"]
    } else {
        vec!["view"]
    }
}

pub fn active() -> &'static dyn Provider {
    match ACTIVE.load(Ordering::Relaxed) {
        #[cfg(feature = "tch")]
        TCH => &tch::TCH,
        _ => &view::VIEW,
    }
}

/// Makes `name` ("view" or "tch") the provider of every later call.
pub fn set_active(name: &str) -> Result<()> {
    let code = match name {
        "view" => VIEW,
        "tch" if cfg!(feature = "tch") => TCH,
        "tch" => {
            return Err(Error::value(
                "provider \"tch\" is not in this build (built without the tch feature: no torch 2.11.0 \
                 at build time); the view provider works with any torch",
            ))
        }
        other => {
            return Err(Error::value(format!(
                "provider must be \"view\" or \"tch\", got {other:?}"
            )))
        }
    };
    ACTIVE.store(code, Ordering::Relaxed);
    Ok(())
}

/// Extracts a torch tensor or a NumPy array (float32/float64, CPU) named `name`; one that is
/// `writable` must not have elements sharing memory.
pub fn arg<'py>(obj: &Bound<'py, PyAny>, name: &str, writable: bool) -> Result<Arg<'py>> {
    let arg = match numpy::read(obj, name, writable)? {
        Some(arg) => arg,
        None => active().read(obj, name)?,
    };
    if writable && arg.view.overlaps_itself() {
        // Caught here: the kernels would update such an ω through a contiguous copy, and writing
        // it back would fail, or lose updates, with a message naming no argument.
        return Err(Error::value(format!(
            "{name} is updated in place, but some of its elements share memory (an expand()ed \
             or as_strided view?); pass {name}.clone()"
        )));
    }
    Ok(arg)
}

/// Like [`arg`] for optional arguments (`None` → `None`).
pub fn opt_arg<'py>(obj: Option<&Bound<'py, PyAny>>, name: &str) -> Result<Option<Arg<'py>>> {
    match obj {
        Some(o) if !o.is_none() => Ok(Some(arg(o, name, false)?)),
        _ => Ok(None),
    }
}

/// "x must be a torch.Tensor or numpy.ndarray, got list".
fn not_a_tensor(obj: &Bound<'_, PyAny>, name: &str) -> Error {
    let type_name = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "an unknown type".into());
    Error::type_(format!(
        "{name} must be a torch.Tensor or numpy.ndarray, got {type_name}"
    ))
}

impl Arg<'_> {
    pub fn dtype(&self, allowed: &[DType]) -> Result<DType> {
        let dtype = self.view.dtype;
        if allowed.contains(&dtype) {
            Ok(dtype)
        } else {
            Err(Error::type_(format!(
                "{} must have dtype {}, got {}",
                self.name,
                dtype_list(allowed),
                dtype.name()
            )))
        }
    }

    /// (rows, cols) of a 2-D tensor.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        self.view.dims2().ok_or_else(|| {
            Error::value(format!(
                "{} must be a 2-D matrix, got shape {:?}",
                self.name, self.view.sizes
            ))
        })
    }

    pub fn expect_shape(&self, rows: usize, cols: usize, why: &str) -> Result<()> {
        let got = self.dims2()?;
        if got != (rows, cols) {
            return Err(Error::value(format!(
                "{} must have shape ({rows}, {cols}) {why}, got ({}, {})",
                self.name, got.0, got.1
            )));
        }
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.view.device
    }

    pub fn named(&self) -> Named<'_> {
        (&self.name, &self.view)
    }
}

/// Every argument on one device.
pub fn same_device(args: &[&Arg]) -> Result<Device> {
    let first = args
        .first()
        .ok_or_else(|| Error::value("no tensors given"))?;
    let device = first.device();
    for a in args {
        if a.device() != device {
            return Err(Error::value(format!(
                "{} is on {} but {} is on {}; all tensors must be on one device",
                a.name,
                a.device().name(),
                first.name,
                device.name()
            )));
        }
    }
    if let Device::Other(name) = device {
        return Err(Error::value(format!(
            "{} is on {name}: hlora runs on cpu and cuda tensors",
            first.name
        )));
    }
    Ok(device)
}

/// A view with its argument name, for [`disjoint`].
pub type Named<'a> = (&'a str, &'a TensorRef);

/// Refuses in-place targets that share memory with each other or with an input: the kernels
/// read the inputs while writing the targets (and a written slice may alias nothing). Like
/// torch's own in-place ops, it reports only overlaps that are certain: a shared first element,
/// or two contiguous tensors whose byte ranges intersect.
pub fn disjoint(written: &[Named], read: &[Named]) -> Result<()> {
    struct Span<'a> {
        lo: usize,
        hi: usize,
        name: &'a str,
        written: bool,
    }
    let clash = |target: &str, other: &str| {
        Error::value(format!(
            "{target} shares memory with {other}, and {target} is written in place; \
             pass separate tensors (e.g. {other}.clone())"
        ))
    };
    let mut spans = Vec::with_capacity(written.len() + read.len());
    let tagged = written.iter().map(|a| (a, true));
    for (&(name, t), is_written) in tagged.chain(read.iter().map(|a| (a, false))) {
        let lo = t.ptr;
        if t.numel() == 0 || lo == 0 {
            continue; // (no memory: empty, or a meta tensor)
        }
        // A non-contiguous tensor is represented by its first element alone: a shared first
        // element is still certain (spans of one byte meet only when both start there).
        let hi = if t.is_contiguous() {
            lo + t.numel() * t.dtype.size().max(1)
        } else {
            lo + 1
        };
        spans.push(Span {
            lo,
            hi,
            name,
            written: is_written,
        });
    }
    // In address order (one space: CUDA's unified addressing keeps device memory apart from
    // host memory), each span against the furthest-reaching written span before it, and a
    // written span against the furthest-reaching span of any kind before it.
    spans.sort_by_key(|s| (s.lo, !s.written));
    let mut reach_written: Option<&Span> = None;
    let mut reach_any: Option<&Span> = None;
    for s in &spans {
        if let Some(w) = reach_written.filter(|w| s.lo < w.hi) {
            return Err(clash(w.name, s.name));
        }
        if let Some(o) = reach_any.filter(|o| s.written && s.lo < o.hi) {
            return Err(clash(s.name, o.name));
        }
        if s.written && reach_written.is_none_or(|w| s.hi > w.hi) {
            reach_written = Some(s);
        }
        if reach_any.is_none_or(|o| s.hi > o.hi) {
            reach_any = Some(s);
        }
    }
    Ok(())
}

/// Checks Ω or ω `(out, in)` against factors `A (r, in)`, `B (out, r)` and an optional second
/// pair of the same shapes (start or reference factors): dtypes, shapes, one device. Returns
/// whether the maths runs in float64.
pub fn check_factor_set(
    omega: &Arg,
    omega_dtypes: &[DType],
    a: &Arg,
    b: &Arg,
    pair: Option<(&Arg, &Arg)>,
) -> Result<bool> {
    let mut dtypes = vec![
        omega.dtype(omega_dtypes)?,
        a.dtype(FACTOR_DTYPES)?,
        b.dtype(FACTOR_DTYPES)?,
    ];
    let (out, inn) = omega.dims2()?;
    let (rank, a_in) = a.dims2()?;
    if a_in != inn || rank == 0 {
        return Err(Error::value(format!(
            "{} must have shape (r, {inn}) with r >= 1 for {} (out, {inn}), got ({rank}, {a_in})",
            a.name, omega.name
        )));
    }
    b.expect_shape(
        out,
        rank,
        &format!("(out, r) for {} (out, in) and A (r, in)", omega.name),
    )?;
    let mut all = vec![omega, a, b];
    if let Some((a2, b2)) = pair {
        dtypes.push(a2.dtype(FACTOR_DTYPES)?);
        dtypes.push(b2.dtype(FACTOR_DTYPES)?);
        a2.expect_shape(rank, inn, "like a")?;
        b2.expect_shape(out, rank, "like b")?;
        all.push(a2);
        all.push(b2);
    }
    same_device(&all)?;
    Ok(wants_f64(&dtypes))
}

/// Whether the maths runs in float64: when any input is float64 (DESIGN §1).
pub fn wants_f64(dtypes: &[DType]) -> bool {
    dtypes.contains(&DType::F64)
}

/// Checks a Python float argument.
pub fn finite(x: f64, name: &str) -> Result<f64> {
    if x.is_finite() {
        Ok(x)
    } else {
        Err(Error::value(format!(
            "{name} must be a finite number, got {x}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(ptr: usize, sizes: [usize; 2], strides: [isize; 2]) -> TensorRef {
        TensorRef {
            ptr,
            sizes: sizes.to_vec(),
            strides: strides.to_vec(),
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }

    fn clash(written: &[Named], read: &[Named]) -> Option<String> {
        disjoint(written, read)
            .err()
            .map(|e| e.message().to_string())
    }

    #[test]
    fn disjoint_reports_only_certain_overlaps() {
        // 40 floats from address 4096: ω is elements 0..25 as 5 × 5, "tail" 25..40 as 5 × 3,
        // "overlapping" 22..37.
        let at = |i: usize| 4096 + 4 * i;
        let omega = view(at(0), [5, 5], [5, 1]);
        let tail = view(at(25), [5, 3], [3, 1]);
        let overlapping = view(at(22), [5, 3], [3, 1]);
        assert_eq!(clash(&[("omega", &omega)], &[("b", &tail)]), None);
        let msg = clash(&[("omega", &omega)], &[("b", &tail), ("a", &overlapping)]);
        let msg = msg.unwrap_or_default();
        assert!(msg.starts_with("omega shares memory with a"), "{msg}");
        // Two inputs may share memory; two targets may not.
        let inputs = [("a", &tail), ("b", &tail)];
        assert_eq!(clash(&[("omega", &omega)], &inputs), None);
        assert!(clash(&[("omega[0]", &omega), ("omega[1]", &omega)], &[]).is_some());
        // Side-by-side column blocks of a 4 × 12 matrix interleave without sharing an element:
        // not reported. A strided view starting on a contiguous target's element is.
        let (left, right) = (view(at(0), [4, 6], [12, 1]), view(at(6), [4, 6], [12, 1]));
        assert_eq!(
            clash(&[("omega[0]", &left), ("omega[1]", &right)], &[]),
            None
        );
        let strided = view(at(10), [4, 2], [5, 1]);
        assert!(clash(&[("omega", &omega)], &[("a", &strided)]).is_some());
        // Meta tensors (no memory) never clash.
        assert_eq!(
            clash(
                &[("omega", &view(0, [5, 5], [5, 1]))],
                &[("a", &view(0, [5, 5], [5, 1]))]
            ),
            None
        );
    }
}
