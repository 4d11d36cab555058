//! Turning Python objects into checked tensors: torch tensors (through pyo3-tch) and NumPy
//! arrays (wrapped zero-copy with `from_blob` while a borrow guard keeps them alive), plus the
//! dtype, shape and device checks every op shares and the raw slices the CPU kernels read.

use crate::cpu::dense::Dense;
use crate::error::{Error, Result};
use crate::scalar::Real;
use numpy::{PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use numpy::{PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3_tch::PyTensor;
use tch::{Device, Kind, Tensor};

/// Factor dtypes the ops take (DESIGN §2).
pub const FACTOR_KINDS: &[Kind] = &[Kind::Double, Kind::Float, Kind::BFloat16, Kind::Half];
/// dtypes an ω accumulator or an Ω finalization input may have.
pub const OMEGA_KINDS: &[Kind] = &[Kind::Double, Kind::Float];
/// dtypes a stored Ω may have when read by the penalty (bfloat16/float16 storage halves bytes).
pub const STORED_OMEGA_KINDS: &[Kind] = FACTOR_KINDS;

/// Keeps a NumPy array borrowed (and so alive and unaliased) while a tensor views its memory.
#[allow(dead_code)] // held only for its Drop
enum Guard<'py> {
    Torch,
    ReadF32(PyReadonlyArrayDyn<'py, f32>),
    ReadF64(PyReadonlyArrayDyn<'py, f64>),
    WriteF32(PyReadwriteArrayDyn<'py, f32>),
    WriteF64(PyReadwriteArrayDyn<'py, f64>),
}

/// A validated argument: its name for messages and a tensor over the caller's memory.
pub struct Arg<'py> {
    pub name: String,
    pub tensor: Tensor,
    _guard: Guard<'py>,
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Double => "float64",
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Int64 => "int64",
        Kind::Int => "int32",
        Kind::Int16 => "int16",
        Kind::Int8 => "int8",
        Kind::Uint8 => "uint8",
        Kind::Bool => "bool",
        Kind::ComplexFloat => "complex64",
        Kind::ComplexDouble => "complex128",
        _ => "an unsupported dtype",
    }
}

fn kinds_list(kinds: &[Kind]) -> String {
    kinds
        .iter()
        .map(|&k| kind_name(k))
        .collect::<Vec<_>>()
        .join(", ")
}

fn numpy_view<'py>(
    array: &Bound<'py, PyUntypedArray>,
    name: &str,
    writable: bool,
) -> Result<Arg<'py>> {
    let dtype = array.dtype();
    let py = array.py();
    let (kind, itemsize) = if dtype.is_equiv_to(&numpy::dtype::<f32>(py)) {
        (Kind::Float, 4)
    } else if dtype.is_equiv_to(&numpy::dtype::<f64>(py)) {
        (Kind::Double, 8)
    } else {
        return Err(Error::type_(format!(
            "{name} must be a float32 or float64 numpy array, got dtype {dtype}"
        )));
    };
    let shape: Vec<i64> = array.shape().iter().map(|&d| d as i64).collect();
    let mut strides = Vec::with_capacity(shape.len());
    for &s in array.strides() {
        if s < 0 || s % itemsize != 0 {
            return Err(Error::value(format!(
                "{name} has negative or unaligned strides; pass numpy.ascontiguousarray({name})"
            )));
        }
        strides.push((s / itemsize) as i64);
    }
    let busy = |e: numpy::BorrowError| {
        Error::value(format!(
            "{name}: numpy array cannot be borrowed ({e}); is it read-only or used twice?"
        ))
    };
    let any = array.as_any();
    let (guard, ptr) = match (kind, writable) {
        (Kind::Float, false) => {
            let ro = any
                .extract::<PyReadonlyArrayDyn<f32>>()
                .map_err(|e| Error::type_(format!("{name}: {e}")))?;
            let p = ro.data() as *const u8;
            (Guard::ReadF32(ro), p)
        }
        (Kind::Double, false) => {
            let ro = any
                .extract::<PyReadonlyArrayDyn<f64>>()
                .map_err(|e| Error::type_(format!("{name}: {e}")))?;
            let p = ro.data() as *const u8;
            (Guard::ReadF64(ro), p)
        }
        (Kind::Float, true) => {
            let arr = any
                .downcast::<numpy::PyArrayDyn<f32>>()
                .map_err(|e| Error::type_(format!("{name}: {e}")))?;
            let rw = arr.try_readwrite().map_err(busy)?;
            let p = rw.data() as *const u8;
            (Guard::WriteF32(rw), p)
        }
        _ => {
            let arr = any
                .downcast::<numpy::PyArrayDyn<f64>>()
                .map_err(|e| Error::type_(format!("{name}: {e}")))?;
            let rw = arr.try_readwrite().map_err(busy)?;
            let p = rw.data() as *const u8;
            (Guard::WriteF64(rw), p)
        }
    };
    // SAFETY: the guard keeps the array alive and borrowed for as long as `Arg` lives, and the
    // shape/strides describe exactly the memory numpy owns.
    let tensor = unsafe { Tensor::f_from_blob(ptr, &shape, &strides, kind, Device::Cpu)? };
    Ok(Arg {
        name: name.to_string(),
        tensor,
        _guard: guard,
    })
}

/// Extracts a torch tensor or a NumPy array (float32/float64, CPU) named `name`; one that is
/// `writable` must not have elements sharing memory.
pub fn arg<'py>(obj: &Bound<'py, PyAny>, name: &str, writable: bool) -> Result<Arg<'py>> {
    let arg = extract(obj, name, writable)?;
    if writable && overlaps_itself(&arg.tensor.size(), &arg.tensor.stride()) {
        // Caught here: the kernels would update such an ω through a contiguous copy, and only
        // writing it back would fail, with libtorch's message naming no argument.
        return Err(Error::value(format!(
            "{name} is updated in place, but some of its elements share memory (an expand()ed \
             or as_strided view?); pass {name}.clone()"
        )));
    }
    Ok(arg)
}

/// Whether two indices of a matrix of this size and these strides address one element: a stride
/// of 0 along more than one element, or steps di·s₀ = dj·s₁ within the matrix (the smallest
/// being s₁/g rows against s₀/g columns, g = gcd). Other ranks are refused later, by shape.
fn overlaps_itself(size: &[i64], stride: &[i64]) -> bool {
    let ([n0, n1], [s0, s1]) = (size, stride) else {
        return false;
    };
    let (s0, s1) = (s0.abs(), s1.abs());
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

fn gcd(mut a: i64, mut b: i64) -> i64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn extract<'py>(obj: &Bound<'py, PyAny>, name: &str, writable: bool) -> Result<Arg<'py>> {
    if let Ok(array) = obj.downcast::<PyUntypedArray>() {
        return numpy_view(array, name, writable);
    }
    match obj.extract::<PyTensor>() {
        Ok(t) => {
            dense_layout(obj, name)?;
            Ok(Arg {
                name: name.to_string(),
                tensor: t.0,
                _guard: Guard::Torch,
            })
        }
        Err(_) => {
            let type_name = obj
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "an unknown type".into());
            Err(Error::type_(format!(
                "{name} must be a torch.Tensor or numpy.ndarray, got {type_name}"
            )))
        }
    }
}

/// Refuses sparse, MKL-DNN and other non-strided tensors by name: the kernels read raw memory
/// with strides, which those layouts do not have (and libtorch's own errors name no argument).
fn dense_layout(obj: &Bound<'_, PyAny>, name: &str) -> Result<()> {
    static STRIDED: GILOnceCell<PyObject> = GILOnceCell::new();
    let py = obj.py();
    let unreadable = |e: PyErr| Error::type_(format!("{name}: cannot read its layout ({e})"));
    let strided = STRIDED
        .get_or_try_init(py, || -> PyResult<PyObject> {
            Ok(py.import("torch")?.getattr("strided")?.unbind())
        })
        .map_err(unreadable)?;
    let layout = obj.getattr(intern!(py, "layout")).map_err(unreadable)?;
    if layout.is(strided) {
        return Ok(());
    }
    Err(Error::type_(format!(
        "{name} must be a dense (strided) tensor, got layout {layout}; pass {name}.to_dense()"
    )))
}

/// Like [`arg`] for optional arguments (`None` → `None`).
pub fn opt_arg<'py>(obj: Option<&Bound<'py, PyAny>>, name: &str) -> Result<Option<Arg<'py>>> {
    match obj {
        Some(o) if !o.is_none() => Ok(Some(arg(o, name, false)?)),
        _ => Ok(None),
    }
}

impl Arg<'_> {
    pub fn kind(&self, allowed: &[Kind]) -> Result<Kind> {
        let kind = self
            .tensor
            .f_kind()
            .map_err(|_| Error::type_(format!("{} has an unsupported dtype", self.name)))?;
        if allowed.contains(&kind) {
            Ok(kind)
        } else {
            Err(Error::type_(format!(
                "{} must have dtype {}, got {}",
                self.name,
                kinds_list(allowed),
                kind_name(kind)
            )))
        }
    }

    /// (rows, cols) of a 2-D tensor.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        let size = self.tensor.size();
        if size.len() != 2 {
            return Err(Error::value(format!(
                "{} must be a 2-D matrix, got shape {:?}",
                self.name, size
            )));
        }
        Ok((size[0] as usize, size[1] as usize))
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
        self.tensor.device()
    }

    pub fn named(&self) -> Named<'_> {
        (&self.name, &self.tensor)
    }

    /// A handle for moving into a GIL-free closure (same storage).
    pub fn share(&self) -> Tensor {
        self.tensor.shallow_clone()
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
                device_name(a.device()),
                first.name,
                device_name(device)
            )));
        }
    }
    Ok(device)
}

/// A device as torch prints it. tch reports every device but the CPU and CUDA as `Mps` (its
/// `at_device` maps them all to one code), a meta tensor's included.
fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(index) => format!("cuda:{index}"),
        _ => "a device other than cpu and cuda (meta?)".into(),
    }
}

/// A tensor with its argument name, for [`disjoint`].
pub type Named<'a> = (&'a str, &'a Tensor);

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
        let lo = t.data_ptr() as usize;
        if t.numel() == 0 || lo == 0 {
            continue; // (no memory: empty, or a meta tensor)
        }
        let bytes = t.numel() * t.f_kind()?.elt_size_in_bytes();
        // A non-contiguous tensor is represented by its first element alone: a shared first
        // element is still certain (spans of one byte meet only when both start there).
        let hi = if t.is_contiguous() {
            lo + bytes
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
    omega_kinds: &[Kind],
    a: &Arg,
    b: &Arg,
    pair: Option<(&Arg, &Arg)>,
) -> Result<bool> {
    let mut kinds = vec![
        omega.kind(omega_kinds)?,
        a.kind(FACTOR_KINDS)?,
        b.kind(FACTOR_KINDS)?,
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
        kinds.push(a2.kind(FACTOR_KINDS)?);
        kinds.push(b2.kind(FACTOR_KINDS)?);
        a2.expect_shape(rank, inn, "like a")?;
        b2.expect_shape(out, rank, "like b")?;
        all.push(a2);
        all.push(b2);
    }
    same_device(&all)?;
    Ok(wants_f64(&kinds))
}

/// Whether the maths runs in float64: when any input is float64 (DESIGN §1).
pub fn wants_f64(kinds: &[Kind]) -> bool {
    kinds.contains(&Kind::Double)
}

/// A thin factor as a row-major `Dense` in compute precision (a small copy; never (out, in)).
pub fn dense<T: Real>(t: &Tensor) -> Result<Dense<T>> {
    Ok(match factor_rows::<T>(t)? {
        FactorRows::Borrowed(rows, cols, data) => Dense::new(rows, cols, data.to_vec()),
        FactorRows::Owned(d) => d,
    })
}

/// A thin factor's values in compute precision, row-major: the tensor's own memory when it is a
/// contiguous CPU tensor of that dtype (the usual case), else a converted copy.
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

/// `t`'s values as [`FactorRows`]. `t` must not be written while they are borrowed: the ω
/// update's threads copy them while the others write ω, so the two must not overlap (`disjoint`
/// refuses any overlap of two contiguous tensors; a strided ω is updated through a copy).
pub fn factor_rows<T: Real>(t: &Tensor) -> Result<FactorRows<'_, T>> {
    let size = t.size();
    let (rows, cols) = (size[0] as usize, size[1] as usize);
    if t.device() == Device::Cpu && t.f_kind()? == T::KIND && t.is_contiguous() {
        // Read in place: the conversions below cost ~5 µs per factor in dispatch alone, a sixth
        // of a whole kernel call at SmolLM2's shapes.
        // SAFETY: contiguous CPU tensor of element type T; only read, and not written while
        // borrowed (above).
        return Ok(FactorRows::Borrowed(rows, cols, unsafe { slice::<T>(t) }));
    }
    let c = t
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(T::KIND)?
        .f_contiguous()?;
    let mut data = vec![T::zero(); rows * cols];
    c.f_copy_data(&mut data, rows * cols)?;
    Ok(FactorRows::Owned(Dense::new(rows, cols, data)))
}

/// The elements of a contiguous CPU tensor of element type `S`.
///
/// # Safety
/// `t` must be contiguous, on the CPU, of dtype `S`, and not written elsewhere meanwhile.
pub unsafe fn slice<S>(t: &Tensor) -> &[S] {
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    std::slice::from_raw_parts(t.data_ptr() as *const S, n)
}

/// Mutable variant of [`slice`].
///
/// # Safety
/// As [`slice`], and no other reference to the memory may exist.
#[allow(clippy::mut_from_ref)]
pub unsafe fn slice_mut<S>(t: &Tensor) -> &mut [S] {
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut S, n)
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

    fn clash(written: &[Named], read: &[Named]) -> Option<String> {
        disjoint(written, read)
            .err()
            .map(|e| e.message().to_string())
    }

    #[test]
    fn self_overlap_is_told_from_size_and_strides() {
        assert!(!overlaps_itself(&[5, 6], &[6, 1]));
        assert!(!overlaps_itself(&[6, 5], &[1, 6])); // a transpose
        assert!(!overlaps_itself(&[4, 6], &[12, 2])); // every other column
        assert!(!overlaps_itself(&[1, 6], &[0, 1])); // stride 0 over one row
        assert!(!overlaps_itself(&[0, 6], &[0, 0]));
        assert!(overlaps_itself(&[5, 6], &[0, 1])); // expand()ed rows
        assert!(overlaps_itself(&[5, 6], &[3, 1])); // rows overlapping by three elements
        assert!(overlaps_itself(&[3, 4], &[1, 2])); // (2, 0) and (0, 1) are one element
        assert!(!overlaps_itself(&[2, 3], &[3, 2])); // interleaved, yet no element shared
        assert!(!overlaps_itself(&[1, 5, 6], &[0, 0, 1])); // not a matrix: refused by shape
    }

    #[test]
    fn disjoint_reports_only_certain_overlaps() {
        let flat = Tensor::zeros([40], (Kind::Float, Device::Cpu));
        let omega = flat.narrow(0, 0, 25).view([5, 5]);
        let tail = flat.narrow(0, 25, 15).view([5, 3]);
        let overlapping = flat.narrow(0, 22, 15).view([5, 3]);
        assert_eq!(clash(&[("omega", &omega)], &[("b", &tail)]), None);
        let msg = clash(&[("omega", &omega)], &[("b", &tail), ("a", &overlapping)]);
        let msg = msg.unwrap_or_default();
        assert!(msg.starts_with("omega shares memory with a"), "{msg}");
        // Two inputs may share memory; two targets may not.
        let inputs = [("a", &tail), ("b", &tail)];
        assert_eq!(clash(&[("omega", &omega)], &inputs), None);
        assert!(clash(&[("omega[0]", &omega), ("omega[1]", &omega)], &[]).is_some());
        // Side-by-side column blocks interleave without sharing an element: not reported. A
        // strided view starting on a contiguous target's element is.
        let wide = Tensor::zeros([4, 12], (Kind::Float, Device::Cpu));
        let (left, right) = (wide.narrow(1, 0, 6), wide.narrow(1, 6, 6));
        assert_eq!(
            clash(&[("omega[0]", &left), ("omega[1]", &right)], &[]),
            None
        );
        let strided = flat.narrow(0, 10, 20).view([4, 5]).narrow(1, 0, 2);
        assert!(clash(&[("omega", &omega)], &[("a", &strided)]).is_some());
    }
}
