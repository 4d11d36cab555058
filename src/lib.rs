//! hlora's native kernels: PyO3 bindings only. Each function checks its arguments (view),
//! builds a job that owns shallow handles to the caller's tensors, and runs it with the GIL
//! released. The maths lives in one module per kernel family: omega, importance, penalty.

mod dispatch;
mod error;
mod forms;
mod importance;
mod lowrank;
mod omega;
mod penalty;
mod pool;
mod scalar;
mod simd;
mod view;

use error::Error;
use importance::FinalizeJob;
use omega::{OmegaArgs, OmegaJob};
use penalty::PenaltyJob;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use pyo3_tch::PyTensor;
use view::{arg, opt_arg, Arg};

/// The libtorch version tch 0.24 links against; Python refuses any other torch.
const TORCH_VERSION: &str = "2.11.0";

/// A Python list or tuple (a tensor is iterable too, so it must not pass for a list).
fn items<'py>(obj: &Bound<'py, PyAny>, name: &str) -> Result<Vec<Bound<'py, PyAny>>, Error> {
    if let Ok(list) = obj.downcast::<PyList>() {
        return Ok(list.iter().collect());
    }
    if let Ok(tuple) = obj.downcast::<PyTuple>() {
        return Ok(tuple.iter().collect());
    }
    Err(Error::type_(format!(
        "{name} must be a list or tuple of tensors"
    )))
}

fn args_of<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    writable: bool,
    len: Option<usize>,
) -> Result<Vec<Arg<'py>>, Error> {
    let list = items(obj, name)?;
    if let Some(n) = len {
        if list.len() != n {
            return Err(Error::value(format!(
                "{name} has {} entries, expected {n} (one per matrix)",
                list.len()
            )));
        }
    }
    list.iter()
        .enumerate()
        .map(|(i, o)| arg(o, &format!("{name}[{i}]"), writable))
        .collect()
}

fn per_matrix(values: Vec<f64>, name: &str, n: usize) -> Result<Vec<f64>, Error> {
    match values.len() {
        len if len == n => Ok(values),
        1 => Ok(vec![values[0]; n]),
        len => Err(Error::value(format!(
            "{name} has {len} values, expected 1 or {n} (one per matrix)"
        ))),
    }
}

#[pyfunction]
#[pyo3(signature = (omega, a_prev, b_prev, grad_a, grad_b, a_next, b_next, *, lr, scaling, clamp_negative=false))]
#[allow(clippy::too_many_arguments)]
fn accumulate_omega_(
    py: Python<'_>,
    omega: &Bound<'_, PyAny>,
    a_prev: &Bound<'_, PyAny>,
    b_prev: &Bound<'_, PyAny>,
    grad_a: &Bound<'_, PyAny>,
    grad_b: &Bound<'_, PyAny>,
    a_next: &Bound<'_, PyAny>,
    b_next: &Bound<'_, PyAny>,
    lr: f64,
    scaling: f64,
    clamp_negative: bool,
) -> PyResult<()> {
    let (o, ap, bp) = (
        arg(omega, "omega", true)?,
        arg(a_prev, "a_prev", false)?,
        arg(b_prev, "b_prev", false)?,
    );
    let (ga, gb) = (arg(grad_a, "grad_a", false)?, arg(grad_b, "grad_b", false)?);
    let (an, bn) = (arg(a_next, "a_next", false)?, arg(b_next, "b_next", false)?);
    let args = OmegaArgs {
        omega: &o,
        a_prev: &ap,
        b_prev: &bp,
        grad_a: &ga,
        grad_b: &gb,
        a_next: &an,
        b_next: &bn,
    };
    let job = OmegaJob::new(args, lr, scaling, clamp_negative)?;
    py.allow_threads(move || job.run())?;
    Ok(())
}

#[pyfunction]
#[pyo3(signature = (omega, a_prev, b_prev, grad_a, grad_b, a_next, b_next, *, lr, scaling, clamp_negative=false))]
#[allow(clippy::too_many_arguments)]
fn accumulate_omega_many_(
    py: Python<'_>,
    omega: &Bound<'_, PyAny>,
    a_prev: &Bound<'_, PyAny>,
    b_prev: &Bound<'_, PyAny>,
    grad_a: &Bound<'_, PyAny>,
    grad_b: &Bound<'_, PyAny>,
    a_next: &Bound<'_, PyAny>,
    b_next: &Bound<'_, PyAny>,
    lr: f64,
    scaling: Vec<f64>,
    clamp_negative: bool,
) -> PyResult<()> {
    let o = args_of(omega, "omega", true, None)?;
    let n = Some(o.len());
    let ap = args_of(a_prev, "a_prev", false, n)?;
    let bp = args_of(b_prev, "b_prev", false, n)?;
    let ga = args_of(grad_a, "grad_a", false, n)?;
    let gb = args_of(grad_b, "grad_b", false, n)?;
    let an = args_of(a_next, "a_next", false, n)?;
    let bn = args_of(b_next, "b_next", false, n)?;
    let scaling = per_matrix(scaling, "scaling", o.len())?;
    let jobs = (0..o.len())
        .map(|i| {
            let args = OmegaArgs {
                omega: &o[i],
                a_prev: &ap[i],
                b_prev: &bp[i],
                grad_a: &ga[i],
                grad_b: &gb[i],
                a_next: &an[i],
                b_next: &bn[i],
            };
            OmegaJob::new(args, lr, scaling[i], clamp_negative)
        })
        .collect::<Result<Vec<_>, Error>>()?;
    py.allow_threads(move || jobs.iter().try_for_each(OmegaJob::run))?;
    Ok(())
}

#[pyfunction]
#[pyo3(signature = (omega, a, b, *, scaling, xi, clamp_negative=true, a_start=None, b_start=None))]
#[allow(clippy::too_many_arguments)]
fn finalize_importance(
    py: Python<'_>,
    omega: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    scaling: f64,
    xi: f64,
    clamp_negative: bool,
    a_start: Option<&Bound<'_, PyAny>>,
    b_start: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyTensor> {
    let (o, a, b) = (
        arg(omega, "omega", false)?,
        arg(a, "a", false)?,
        arg(b, "b", false)?,
    );
    let (a0, b0) = (opt_arg(a_start, "a_start")?, opt_arg(b_start, "b_start")?);
    let start = match (&a0, &b0) {
        (Some(x), Some(y)) => Some((x, y)),
        (None, None) => None,
        _ => {
            return Err(Error::value(
                "a_start and b_start must be given together (or neither, for a fresh adapter)",
            )
            .into())
        }
    };
    let job = FinalizeJob::new(&o, &a, &b, start, scaling, xi, clamp_negative)?;
    Ok(PyTensor(py.allow_threads(move || job.run())?))
}

#[pyfunction]
#[pyo3(signature = (norms, *, mode="softmax", temperature=1.0))]
fn layer_coefficients(
    norms: &Bound<'_, PyAny>,
    mode: &str,
    temperature: f64,
) -> PyResult<PyTensor> {
    let n = arg(norms, "norms", false)?;
    Ok(PyTensor(importance::layer_coefficients(
        &n,
        mode,
        temperature,
    )?))
}

type PenaltyResult = (PyTensor, Option<PyTensor>, Option<PyTensor>);

fn reference_pair<'a, 'py>(
    a_ref: &'a Option<Arg<'py>>,
    b_ref: &'a Option<Arg<'py>>,
) -> Result<Option<(&'a Arg<'py>, &'a Arg<'py>)>, Error> {
    match (a_ref, b_ref) {
        (Some(x), Some(y)) => Ok(Some((x, y))),
        (None, None) => Ok(None),
        _ => Err(Error::value(
            "a_ref and b_ref must be given together (or neither, for a fresh adapter)",
        )),
    }
}

#[pyfunction]
#[pyo3(signature = (omega, a, b, a_ref=None, b_ref=None, *, scaling, scaling_ref=None, weight=1.0, compute_grads=true))]
#[allow(clippy::too_many_arguments)]
fn importance_penalty(
    py: Python<'_>,
    omega: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    a_ref: Option<&Bound<'_, PyAny>>,
    b_ref: Option<&Bound<'_, PyAny>>,
    scaling: f64,
    scaling_ref: Option<f64>,
    weight: f64,
    compute_grads: bool,
) -> PyResult<PenaltyResult> {
    let (o, a, b) = (
        arg(omega, "Omega", false)?,
        arg(a, "a", false)?,
        arg(b, "b", false)?,
    );
    let (ar, br) = (opt_arg(a_ref, "a_ref")?, opt_arg(b_ref, "b_ref")?);
    let job = PenaltyJob::new(&o, &a, &b, reference_pair(&ar, &br)?, scaling, scaling_ref)?;
    let weight = view::finite(weight, "weight")?;
    let out = py.allow_threads(move || job.run(weight, compute_grads))?;
    let (ga, gb) = out.grads.map_or((None, None), |(x, y)| {
        (Some(PyTensor(x)), Some(PyTensor(y)))
    });
    Ok((PyTensor(out.value), ga, gb))
}

type PenaltyManyResult = (PyTensor, Vec<Option<PyTensor>>, Vec<Option<PyTensor>>);

#[pyfunction]
#[pyo3(signature = (omega, a, b, a_ref=None, b_ref=None, *, scaling, scaling_ref=None, weights=None, compute_grads=true))]
#[allow(clippy::too_many_arguments)]
fn importance_penalty_many(
    py: Python<'_>,
    omega: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    a_ref: Option<&Bound<'_, PyAny>>,
    b_ref: Option<&Bound<'_, PyAny>>,
    scaling: Vec<f64>,
    scaling_ref: Option<Vec<f64>>,
    weights: Option<Vec<f64>>,
    compute_grads: bool,
) -> PyResult<PenaltyManyResult> {
    let o = args_of(omega, "Omega", false, None)?;
    let n = o.len();
    if n == 0 {
        return Err(Error::value("Omega must hold at least one matrix").into());
    }
    let av = args_of(a, "a", false, Some(n))?;
    let bv = args_of(b, "b", false, Some(n))?;
    let ar = a_ref
        .filter(|v| !v.is_none())
        .map(|x| args_of(x, "a_ref", false, Some(n)))
        .transpose()?;
    let br = b_ref
        .filter(|v| !v.is_none())
        .map(|x| args_of(x, "b_ref", false, Some(n)))
        .transpose()?;
    if ar.is_some() != br.is_some() {
        return Err(Error::value(
            "a_ref and b_ref must be given together (or neither, for fresh adapters)",
        )
        .into());
    }
    let scaling = per_matrix(scaling, "scaling", n)?;
    let scaling_ref = scaling_ref
        .map(|s| per_matrix(s, "scaling_ref", n))
        .transpose()?;
    let weights = per_matrix(weights.unwrap_or_else(|| vec![1.0]), "weights", n)?;
    let mut jobs = Vec::with_capacity(n);
    for i in 0..n {
        let reference = match (&ar, &br) {
            (Some(x), Some(y)) => Some((&x[i], &y[i])),
            _ => None,
        };
        let s_ref = scaling_ref.as_ref().map(|s| s[i]);
        let w = view::finite(weights[i], &format!("weights[{i}]"))?;
        jobs.push((
            PenaltyJob::new(&o[i], &av[i], &bv[i], reference, scaling[i], s_ref)?,
            w,
        ));
    }
    let outs = py.allow_threads(move || {
        jobs.iter()
            .map(|(job, w)| job.run(*w, compute_grads))
            .collect::<Result<Vec<_>, Error>>()
    })?;
    let mut total: Option<tch::Tensor> = None;
    let (mut grads_a, mut grads_b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for out in outs {
        total = Some(match total {
            None => out.value,
            Some(t) => t.f_add(&out.value).map_err(Error::from)?,
        });
        let (ga, gb) = out.grads.map_or((None, None), |(x, y)| {
            (Some(PyTensor(x)), Some(PyTensor(y)))
        });
        grads_a.push(ga);
        grads_b.push(gb);
    }
    let total = total.ok_or_else(|| Error::value("Omega must hold at least one matrix"))?;
    Ok((PyTensor(total), grads_a, grads_b))
}

/// Routes CPU tensors through the fused kernels ("fused", the default) or the tch path
/// ("tch", the one CUDA tensors take) — for tests of the device path without a GPU.
#[pyfunction]
fn set_cpu_path(path: &str) -> PyResult<()> {
    match path {
        "fused" => dispatch::set_cpu_path(false),
        "tch" => dispatch::set_cpu_path(true),
        other => {
            return Err(
                Error::value(format!("path must be \"fused\" or \"tch\", got {other:?}")).into(),
            )
        }
    }
    Ok(())
}

#[pyfunction]
fn cpu_path() -> &'static str {
    dispatch::cpu_path_name()
}

#[pyfunction]
fn torch_version() -> &'static str {
    TORCH_VERSION
}

/// Threads the CPU kernels use now (torch's setting, or HLORA_NUM_THREADS).
#[pyfunction]
fn num_threads() -> PyResult<usize> {
    Ok(pool::pool()?.current_num_threads())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(accumulate_omega_, m)?)?;
    m.add_function(wrap_pyfunction!(accumulate_omega_many_, m)?)?;
    m.add_function(wrap_pyfunction!(finalize_importance, m)?)?;
    m.add_function(wrap_pyfunction!(layer_coefficients, m)?)?;
    m.add_function(wrap_pyfunction!(importance_penalty, m)?)?;
    m.add_function(wrap_pyfunction!(importance_penalty_many, m)?)?;
    m.add_function(wrap_pyfunction!(set_cpu_path, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_path, m)?)?;
    m.add_function(wrap_pyfunction!(torch_version, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    Ok(())
}
