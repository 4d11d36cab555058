//! hlora's native kernels: PyO3 bindings only. Each function reads its arguments through the
//! active provider (`providers`: checked views of the caller's tensors), builds one job per
//! matrix (`ops`), and runs them where `dispatch` sends them — the CPU kernels with the GIL
//! released, the CUDA kernels in one launch per op. The maths lives in `cpu/` and `cuda/`.

mod args;
mod cancellation;
mod cpu;
mod cuda;
mod dispatch;
mod error;
mod forms;
mod ops;
mod providers;
// Links against the interpreter's symbols: not in the `cargo test` executable (tested from
// Python). Only the tch provider's glue (torch-sys's pybind11) needs it.
#[cfg(all(feature = "tch", not(test)))]
mod pycompat;
mod scalar;
#[cfg(feature = "tch")]
mod tch_path;
mod tensor;

use args::{args_of, given_pair, per_matrix, FactorLists};
use error::Error;
use ops::importance::{self, FinalizeArgs, FinalizeJob};
use ops::omega::{OmegaArgs, OmegaJob};
use ops::penalty::{self, PenaltyArgs, PenaltyJob};
use providers::{arg, disjoint, opt_arg, Arg};
use pyo3::prelude::*;
use std::sync::Arc;

type Grads = (Option<PyObject>, Option<PyObject>);

fn grads_py(py: Python<'_>, grads: Option<(providers::Made, providers::Made)>) -> PyResult<Grads> {
    Ok(match grads {
        Some((a, b)) => (Some(a.into_py(py)?), Some(b.into_py(py)?)),
        None => (None, None),
    })
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
    let job = OmegaJob::new(&args, lr, scaling, clamp_negative)?;
    let read = [&ap, &bp, &ga, &gb, &an, &bn].map(Arg::named);
    disjoint(&[o.named()], &read)?;
    ops::omega::run(py, &[args], vec![job], clamp_negative)
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
    let args: Vec<OmegaArgs> = (0..o.len())
        .map(|i| OmegaArgs {
            omega: &o[i],
            a_prev: &ap[i],
            b_prev: &bp[i],
            grad_a: &ga[i],
            grad_b: &gb[i],
            a_next: &an[i],
            b_next: &bn[i],
        })
        .collect();
    let jobs = args
        .iter()
        .zip(&scaling)
        .map(|(a, &s)| OmegaJob::new(a, lr, s, clamp_negative))
        .collect::<Result<Vec<_>, Error>>()?;
    let written: Vec<_> = o.iter().map(Arg::named).collect();
    let read: Vec<_> = [&ap, &bp, &ga, &gb, &an, &bn]
        .into_iter()
        .flatten()
        .map(Arg::named)
        .collect();
    disjoint(&written, &read)?;
    if o.is_empty() {
        return Ok(());
    }
    ops::omega::run(py, &args, jobs, clamp_negative)
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
) -> PyResult<PyObject> {
    let (o, a, b) = (
        arg(omega, "omega", false)?,
        arg(a, "a", false)?,
        arg(b, "b", false)?,
    );
    let (a0, b0) = (opt_arg(a_start, "a_start")?, opt_arg(b_start, "b_start")?);
    let args = FinalizeArgs {
        omega: &o,
        a: &a,
        b: &b,
        start: given_pair(&a0, &b0, "a_start and b_start")?,
    };
    let job = FinalizeJob::new(&args, scaling, xi, clamp_negative)?;
    let (results, _) = importance::run(py, &[args], vec![job], clamp_negative, false)?;
    results
        .into_iter()
        .next()
        .ok_or_else(|| Error::value("internal: no result"))?
        .into_py(py)
}

type FinalizeManyResult = (Vec<PyObject>, PyObject);

/// Ω for every matrix, plus ‖Ω_l‖² per matrix (float64) from the same pass on CUDA.
#[pyfunction]
#[pyo3(signature = (omega, a, b, a_start=None, b_start=None, *, scaling, xi, clamp_negative=true))]
#[allow(clippy::too_many_arguments)]
fn finalize_importance_many(
    py: Python<'_>,
    omega: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    a_start: Option<&Bound<'_, PyAny>>,
    b_start: Option<&Bound<'_, PyAny>>,
    scaling: Vec<f64>,
    xi: f64,
    clamp_negative: bool,
) -> PyResult<FinalizeManyResult> {
    let lists = FactorLists::new(
        (omega, "omega"),
        a,
        b,
        (a_start, b_start),
        ("a_start", "b_start"),
    )?;
    let scaling = per_matrix(scaling, "scaling", lists.len())?;
    let args: Vec<FinalizeArgs> = (0..lists.len())
        .map(|i| FinalizeArgs {
            omega: &lists.omega[i],
            a: &lists.a[i],
            b: &lists.b[i],
            start: lists.pair(i),
        })
        .collect();
    let jobs = args
        .iter()
        .zip(&scaling)
        .map(|(a, &s)| FinalizeJob::new(a, s, xi, clamp_negative))
        .collect::<Result<Vec<_>, Error>>()?;
    let (results, sq) = importance::run(py, &args, jobs, clamp_negative, true)?;
    let sq = sq.ok_or_else(|| Error::value("internal: no norms"))?;
    Ok((
        results
            .into_iter()
            .map(|r| r.into_py(py))
            .collect::<PyResult<Vec<_>>>()?,
        sq.into_py(py)?,
    ))
}

#[pyfunction]
#[pyo3(signature = (norms, *, mode="softmax", temperature=1.0))]
fn layer_coefficients(
    py: Python<'_>,
    norms: &Bound<'_, PyAny>,
    mode: &str,
    temperature: f64,
) -> PyResult<PyObject> {
    let n = arg(norms, "norms", false)?;
    let (values, dtype) = importance::layer_coefficients(&n, mode, temperature)?;
    providers::active()
        .tensor_of_f64s(py, &values, &[values.len()], dtype, tensor::Device::Cpu)?
        .into_py(py)
}

type PenaltyResult = (PyObject, Option<PyObject>, Option<PyObject>);

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
    let args = PenaltyArgs {
        omega: &o,
        a: &a,
        b: &b,
        reference: given_pair(&ar, &br, "a_ref and b_ref")?,
    };
    let job = PenaltyJob::new(&args, scaling, scaling_ref)?;
    let weight = providers::finite(weight, "weight")?;
    let out = penalty::run(py, &[args], vec![(job, weight)], compute_grads)?;
    let (ga, gb) = grads_py(py, out.grads.into_iter().next().flatten())?;
    Ok((out.total.into_py(py)?, ga, gb))
}

type PenaltyManyResult = (PyObject, Vec<Option<PyObject>>, Vec<Option<PyObject>>);

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
    let lists = FactorLists::new((omega, "Omega"), a, b, (a_ref, b_ref), ("a_ref", "b_ref"))?;
    let n = lists.len();
    let scaling = per_matrix(scaling, "scaling", n)?;
    let scaling_ref = scaling_ref
        .map(|s| per_matrix(s, "scaling_ref", n))
        .transpose()?;
    let weights = per_matrix(weights.unwrap_or_else(|| vec![1.0]), "weights", n)?;
    let args: Vec<PenaltyArgs> = (0..n)
        .map(|i| PenaltyArgs {
            omega: &lists.omega[i],
            a: &lists.a[i],
            b: &lists.b[i],
            reference: lists.pair(i),
        })
        .collect();
    let mut jobs = Vec::with_capacity(n);
    for (i, a) in args.iter().enumerate() {
        let s_ref = scaling_ref.as_ref().map(|s| s[i]);
        let w = providers::finite(weights[i], &format!("weights[{i}]"))?;
        jobs.push((PenaltyJob::new(a, scaling[i], s_ref)?, w));
    }
    let out = penalty::run(py, &args, jobs, compute_grads)?;
    let mut grads_a = Vec::with_capacity(n);
    let mut grads_b = Vec::with_capacity(n);
    for g in out.grads {
        let (ga, gb) = grads_py(py, g)?;
        grads_a.push(ga);
        grads_b.push(gb);
    }
    Ok((out.total.into_py(py)?, grads_a, grads_b))
}

/// Routes CPU tensors through the fused kernels ("fused", the default), the tch path ("tch",
/// the CUDA fallback) or the CUDA kernels on their CPU emulator ("cuda-emulator", with the
/// emulator library built from src/cuda/emulator.cpp) — tests of the device paths without a GPU.
#[pyfunction]
#[pyo3(signature = (path, emulator=None))]
fn set_cpu_path(path: &str, emulator: Option<&str>) -> PyResult<()> {
    match (path, emulator) {
        ("fused", None) => dispatch::set_cpu_path(false, None)?,
        ("tch", None) => dispatch::set_cpu_path(true, None)?,
        ("cuda-emulator", Some(lib)) => {
            let kernels = cuda::Kernels::emulator(lib)?;
            dispatch::set_cpu_path(false, Some(Arc::new(kernels)))?;
        }
        ("cuda-emulator", None) => {
            return Err(Error::value("path \"cuda-emulator\" needs emulator=<library path>").into())
        }
        ("fused" | "tch", Some(_)) => {
            return Err(Error::value("emulator is only used with path \"cuda-emulator\"").into())
        }
        (other, _) => {
            return Err(Error::value(format!(
                "path must be \"fused\", \"tch\" or \"cuda-emulator\", got {other:?}"
            ))
            .into())
        }
    }
    Ok(())
}

/// The `-D` options with the host's table sizes (for building the emulator).
#[pyfunction]
fn cuda_size_defines() -> Vec<String> {
    cuda::size_defines()
}

#[pyfunction]
fn cpu_path() -> &'static str {
    dispatch::cpu_path_name()
}

/// The instruction set the CPU kernels use: "avx512", "avx2" or "plain" (the best the CPU has;
/// `HLORA_SIMD=avx2` or `HLORA_SIMD=plain` caps it).
#[pyfunction]
fn simd_level() -> &'static str {
    cpu::simd::level().name()
}

/// Routes CUDA tensors through the fused CUDA kernels ("fused", the default) or the tch
/// path ("tch") — to compare the two on a GPU.
#[pyfunction]
fn set_cuda_path(path: &str) -> PyResult<()> {
    match path {
        "fused" => dispatch::set_cuda_path(false)?,
        "tch" => dispatch::set_cuda_path(true)?,
        other => {
            return Err(
                Error::value(format!("path must be \"fused\" or \"tch\", got {other:?}")).into(),
            )
        }
    }
    Ok(())
}

#[pyfunction]
fn cuda_path() -> &'static str {
    dispatch::cuda_path_name()
}

/// Compiles the CUDA kernels for `arch` with NVRTC and returns the cubin's size in bytes.
/// Needs NVRTC only (no GPU): the check CI runs on CPU-only machines.
#[pyfunction]
fn cuda_compile(py: Python<'_>, arch: &str) -> PyResult<usize> {
    dispatch::preload_nvrtc(py)?;
    let arch = arch.to_string();
    Ok(py.allow_threads(move || cuda::compile(&arch))?.len())
}

/// The kernels' cubin for `arch` through the disk cache: (size, "disk" or "compiled", the
/// cache file or None when the cache is off or could not be written). Needs NVRTC, no GPU.
#[pyfunction]
fn cuda_cubin(py: Python<'_>, arch: &str) -> PyResult<(usize, &'static str, Option<String>)> {
    dispatch::preload_nvrtc(py)?;
    let arch = arch.to_string();
    let (cubin, origin, file) = py.allow_threads(move || cuda::cubin(&arch))?;
    Ok((cubin.len(), origin, file.map(|f| f.display().to_string())))
}

/// Whether the fused CUDA kernels run on CUDA device `device`, or why not.
#[pyfunction]
fn cuda_status(py: Python<'_>, device: i32) -> PyResult<String> {
    dispatch::preload_nvrtc(py)?;
    Ok(match cuda::kernels(device) {
        Ok(k) => format!("fused ({} on device {})", k.arch, k.device),
        Err(reason) => format!("unavailable: {reason}"),
    })
}

/// The torch version the tch provider was built against, or None (a view-only build).
#[pyfunction]
fn torch_version() -> Option<&'static str> {
    #[cfg(feature = "tch")]
    return Some(providers::tch::TORCH_VERSION);
    #[cfg(not(feature = "tch"))]
    None
}

/// The providers this build has ("tch" first when it has it) and the one in use.
#[pyfunction(name = "providers")]
fn provider_names() -> (Vec<&'static str>, &'static str) {
    (providers::compiled(), providers::active().name())
}

/// Makes "view" or "tch" the provider of every later call.
#[pyfunction]
fn set_provider(name: &str) -> PyResult<()> {
    Ok(providers::set_active(name)?)
}

/// Whether CUDA tensors on device `device` run natively (fused kernels, or the tch provider's
/// path): None, or why not.
#[pyfunction]
fn cuda_unavailable(py: Python<'_>, device: i32) -> PyResult<Option<String>> {
    Ok(dispatch::cuda_runs(py, device)?.err())
}

/// Threads the CPU kernels use now (torch's setting, or HLORA_NUM_THREADS).
#[pyfunction]
fn num_threads() -> usize {
    cpu::pool::wanted_threads()
}

/// Which threads the CPU kernels run on: "openmp" (torch's own team) or "rayon".
#[pyfunction]
fn cpu_threading() -> &'static str {
    cpu::pool::threading()
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
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(finalize_importance_many, m)?)?;
    m.add_function(wrap_pyfunction!(set_cuda_path, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_path, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_cubin, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_status, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_size_defines, m)?)?;
    m.add_function(wrap_pyfunction!(torch_version, m)?)?;
    m.add_function(wrap_pyfunction!(provider_names, m)?)?;
    m.add_function(wrap_pyfunction!(set_provider, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unavailable, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_threading, m)?)?;
    Ok(())
}
