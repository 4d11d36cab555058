//! hlora's native kernels: PyO3 bindings only. Each function checks its arguments (view),
//! builds a job that owns shallow handles to the caller's tensors, and runs it with the GIL
//! released. The maths lives in one module per kernel family: omega, importance, penalty.

mod args;
mod cancellation;
mod cpu;
mod cuda;
mod dispatch;
mod error;
mod forms;
mod ops;
// Links against the interpreter's symbols: not in the `cargo test` executable (tested from Python).
#[cfg(not(test))]
mod pycompat;
mod scalar;
mod view;

use args::{args_of, given_pair, per_matrix, FactorLists};
use error::Error;
use ops::importance::{self, FinalizeJob};
use ops::omega::{OmegaArgs, OmegaJob};
use ops::penalty::{self, PenaltyJob};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use std::sync::Arc;
use tch::Device;
use view::{arg, opt_arg, Arg};

/// The fused CUDA kernels when every tensor of a call is on one CUDA device that can run them.
fn cuda_route(
    py: Python<'_>,
    devices: impl IntoIterator<Item = Device>,
) -> PyResult<Option<(Arc<cuda::Kernels>, u64)>> {
    let devices: Vec<Device> = devices.into_iter().collect();
    match devices.first() {
        Some(&d) if devices.iter().all(|&x| x == d) => dispatch::cuda_route(py, d),
        _ => Ok(None),
    }
}

/// The libtorch version tch 0.24 links against; Python refuses any other torch.
const TORCH_VERSION: &str = "2.11.0";

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
    let read = [&ap, &bp, &ga, &gb, &an, &bn].map(Arg::named);
    view::disjoint(&[o.named()], &read)?;
    match cuda_route(py, [job.device()])? {
        Some((k, stream)) => py.allow_threads(move || {
            cuda::omega_many(&k, stream, &[job.cuda_mat()], clamp_negative)
        })?,
        None => py.allow_threads(move || job.run())?,
    }
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
    let written: Vec<_> = o.iter().map(Arg::named).collect();
    let read: Vec<_> = [&ap, &bp, &ga, &gb, &an, &bn]
        .into_iter()
        .flatten()
        .map(Arg::named)
        .collect();
    view::disjoint(&written, &read)?;
    match cuda_route(py, jobs.iter().map(OmegaJob::device))? {
        Some((k, stream)) => py.allow_threads(move || {
            let mats: Vec<_> = jobs.iter().map(OmegaJob::cuda_mat).collect();
            cuda::omega_many(&k, stream, &mats, clamp_negative)
        })?,
        None => py.allow_threads(move || jobs.iter().try_for_each(OmegaJob::run))?,
    }
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
    let start = given_pair(&a0, &b0, "a_start and b_start")?;
    let job = FinalizeJob::new(&o, &a, &b, start, scaling, xi, clamp_negative)?;
    let result = match cuda_route(py, [job.device()])? {
        Some((k, stream)) => py.allow_threads(move || {
            let out = cuda::finalize_many(&k, stream, &[job.cuda_mat()], clamp_negative)?;
            out.omegas
                .into_iter()
                .next()
                .ok_or_else(|| Error::value("no result"))
        })?,
        None => py.allow_threads(move || job.run())?,
    };
    Ok(PyTensor(result))
}

type FinalizeManyResult = (Vec<PyTensor>, PyTensor);

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
    let jobs = scaling
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let (o, a, b) = (&lists.omega[i], &lists.a[i], &lists.b[i]);
            FinalizeJob::new(o, a, b, lists.pair(i), s, xi, clamp_negative)
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let out = match cuda_route(py, jobs.iter().map(FinalizeJob::device))? {
        Some((k, stream)) => py.allow_threads(move || {
            let mats: Vec<_> = jobs.iter().map(FinalizeJob::cuda_mat).collect();
            cuda::finalize_many(&k, stream, &mats, clamp_negative)
        })?,
        None => py.allow_threads(move || -> Result<cuda::FinalizeOut, Error> {
            let omegas = jobs
                .iter()
                .map(FinalizeJob::run)
                .collect::<Result<Vec<_>, Error>>()?;
            let sq: Vec<f64> = omegas
                .iter()
                .map(|t| {
                    Ok(t.f_to_kind(tch::Kind::Double)?
                        .f_square()?
                        .f_sum(tch::Kind::Double)?
                        .f_double_value(&[])?)
                })
                .collect::<Result<_, Error>>()?;
            Ok(cuda::FinalizeOut {
                omegas,
                sq_norms: tch::Tensor::f_from_slice(&sq)?,
            })
        })?,
    };
    Ok((
        out.omegas.into_iter().map(PyTensor).collect(),
        PyTensor(out.sq_norms),
    ))
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
    let job = PenaltyJob::new(
        &o,
        &a,
        &b,
        given_pair(&ar, &br, "a_ref and b_ref")?,
        scaling,
        scaling_ref,
    )?;
    let weight = view::finite(weight, "weight")?;
    let out = match cuda_route(py, [job.device()])? {
        Some((k, stream)) => py.allow_threads(move || {
            let out = cuda::penalty_many(&k, stream, &[job.cuda_mat(weight)], compute_grads)?;
            let out = penalty::from_cuda(&[(job, weight)], out)?;
            Ok::<_, Error>(penalty::PenaltyOut {
                value: out.total,
                grads: out.grads.and_then(|g| g.into_iter().next()),
                summed: None,
            })
        })?,
        None => py.allow_threads(move || {
            let mut job = job;
            penalty::exact_on_device([&mut job], false)?;
            let mut out = job.run(weight, compute_grads)?;
            out.value = scalar::in_kind(out.value, job.result_kind())?;
            Ok::<_, Error>(out)
        })?,
    };
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
    let lists = FactorLists::new((omega, "Omega"), a, b, (a_ref, b_ref), ("a_ref", "b_ref"))?;
    let n = lists.len();
    let scaling = per_matrix(scaling, "scaling", n)?;
    let scaling_ref = scaling_ref
        .map(|s| per_matrix(s, "scaling_ref", n))
        .transpose()?;
    let weights = per_matrix(weights.unwrap_or_else(|| vec![1.0]), "weights", n)?;
    let mut jobs = Vec::with_capacity(n);
    for i in 0..n {
        let s_ref = scaling_ref.as_ref().map(|s| s[i]);
        let w = view::finite(weights[i], &format!("weights[{i}]"))?;
        let (o, a, b) = (&lists.omega[i], &lists.a[i], &lists.b[i]);
        jobs.push((
            PenaltyJob::new(o, a, b, lists.pair(i), scaling[i], s_ref)?,
            w,
        ));
    }
    if let Some((k, stream)) = cuda_route(py, jobs.iter().map(|(j, _)| j.device()))? {
        let out = py.allow_threads(move || {
            let mats: Vec<_> = jobs.iter().map(|(j, w)| j.cuda_mat(*w)).collect();
            let out = cuda::penalty_many(&k, stream, &mats, compute_grads)?;
            penalty::from_cuda(&jobs, out)
        })?;
        let (grads_a, grads_b) = match out.grads {
            Some(g) => g
                .into_iter()
                .map(|(ga, gb)| (Some(PyTensor(ga)), Some(PyTensor(gb))))
                .unzip(),
            None => (
                (0..n).map(|_| None).collect(),
                (0..n).map(|_| None).collect(),
            ),
        };
        return Ok((PyTensor(out.total), grads_a, grads_b));
    }
    let (total, outs) = py.allow_threads(move || {
        let mut jobs = jobs;
        penalty::exact_on_device(
            jobs.iter_mut().map(|(job, _)| job),
            cancellation::mixed_signs(&weights),
        )?;
        let outs = jobs
            .iter()
            .map(|(job, w)| job.run(*w, compute_grads))
            .collect::<Result<Vec<_>, Error>>()?;
        Ok::<_, Error>((penalty::total(&jobs, &outs)?, outs))
    })?;
    let (grads_a, grads_b) = outs
        .into_iter()
        .map(|out| {
            out.grads.map_or((None, None), |(x, y)| {
                (Some(PyTensor(x)), Some(PyTensor(y)))
            })
        })
        .unzip();
    Ok((PyTensor(total), grads_a, grads_b))
}

/// Routes CPU tensors through the fused kernels ("fused", the default), the tch path ("tch",
/// the CUDA fallback) or the CUDA kernels on their CPU emulator ("cuda-emulator", with the
/// emulator library built from src/cuda/emulator.cpp) — tests of the device paths without a GPU.
#[pyfunction]
#[pyo3(signature = (path, emulator=None))]
fn set_cpu_path(path: &str, emulator: Option<&str>) -> PyResult<()> {
    match (path, emulator) {
        ("fused", None) => dispatch::set_cpu_path(false, None),
        ("tch", None) => dispatch::set_cpu_path(true, None),
        ("cuda-emulator", Some(lib)) => {
            let kernels = cuda::Kernels::emulator(lib)?;
            dispatch::set_cpu_path(false, Some(Arc::new(kernels)));
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
        "fused" => dispatch::set_cuda_path(false),
        "tch" => dispatch::set_cuda_path(true),
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

#[pyfunction]
fn torch_version() -> &'static str {
    TORCH_VERSION
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
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_threading, m)?)?;
    Ok(())
}
