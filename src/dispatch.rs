//! The one place that decides where an op runs: CPU tensors on the fused CPU kernels, CUDA
//! tensors on the fused CUDA kernels (`crate::cuda`, one launch for all matrices). When those
//! cannot load, the tch provider runs CUDA tensors through libtorch ops (the tch path, after one
//! warning); the view provider has no such path, and hlora's Python layer sends those tensors to
//! the plain-PyTorch ops instead (`cuda_runs`). Meta tensors only get their results' shapes.
//! Tests can route CPU tensors through the tch path or the CUDA kernels' CPU emulator, so both
//! are checked without a GPU.

use crate::cuda::Kernels;
use crate::error::{Error, Result};
use crate::providers;
use crate::tensor::Device;
#[cfg(feature = "tch")]
use pyo3::exceptions::PyUserWarning;
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Where one call runs.
pub enum Route {
    /// The fused CPU kernels (the GIL released around them).
    Cpu,
    /// The fused CUDA kernels on this stream (or, on a CPU, their emulator: stream 0).
    Cuda(Arc<Kernels>, u64),
    /// libtorch ops on the tensors' device (tch provider only).
    #[cfg(feature = "tch")]
    Tch,
    /// No values: results of the right shapes on the meta device.
    Meta,
}

static TCH_ON_CPU: AtomicBool = AtomicBool::new(false);
/// When set, CPU tensors run the CUDA kernels' code on the CPU emulator (tests).
static EMULATOR: Mutex<Option<Arc<Kernels>>> = Mutex::new(None);

/// Routes CPU tensors through the tch path ("tch"), the fused kernels ("fused"), or the CUDA
/// kernels on their CPU emulator (`emulator` given).
pub fn set_cpu_path(tch_path: bool, emulator: Option<Arc<Kernels>>) -> Result<()> {
    if tch_path && !cfg!(feature = "tch") {
        return Err(Error::value(
            "the tch path needs the tch provider, which this build does not have",
        ));
    }
    TCH_ON_CPU.store(tch_path, Ordering::Relaxed);
    if let Ok(mut slot) = EMULATOR.lock() {
        *slot = emulator;
    }
    Ok(())
}

fn emulator() -> Option<Arc<Kernels>> {
    EMULATOR.lock().ok().and_then(|slot| slot.clone())
}

pub fn cpu_path_name() -> &'static str {
    if emulator().is_some() {
        "cuda-emulator"
    } else if TCH_ON_CPU.load(Ordering::Relaxed) {
        "tch"
    } else {
        "fused"
    }
}

static CUDA_VIA_TCH: AtomicBool = AtomicBool::new(false);
#[cfg(feature = "tch")]
static CUDA_WARNED: AtomicBool = AtomicBool::new(false);

/// Routes CUDA tensors through the tch path ("tch") or the fused kernels ("fused").
pub fn set_cuda_path(tch_path: bool) -> Result<()> {
    if tch_path && !cfg!(feature = "tch") {
        return Err(Error::value(
            "the tch path needs the tch provider, which this build does not have",
        ));
    }
    CUDA_VIA_TCH.store(tch_path, Ordering::Relaxed);
    Ok(())
}

pub fn cuda_path_name() -> &'static str {
    if CUDA_VIA_TCH.load(Ordering::Relaxed) {
        "tch"
    } else {
        "fused"
    }
}

/// NVRTC ships in torch's nvidia/cu13/lib, which is not on the loader path: `hlora._nvrtc`
/// preloads it. Done once per process, off the per-call path.
pub fn preload_nvrtc(py: Python<'_>) -> PyResult<()> {
    static PRELOADED: AtomicBool = AtomicBool::new(false);
    if !PRELOADED.load(Ordering::Relaxed) {
        py.import("hlora._nvrtc")?.call_method0("preload")?;
        PRELOADED.store(true, Ordering::Relaxed);
    }
    Ok(())
}

/// Whether the active provider uses the tch path now (tch provider only).
fn tch_active() -> bool {
    cfg!(feature = "tch") && providers::active().name() == "tch"
}

/// Whether CUDA tensors on `index` run natively: the fused kernels load there, or the tch
/// provider can take its path. `Err` carries why not (for the Python layer's one warning).
pub fn cuda_runs(py: Python<'_>, index: i32) -> PyResult<std::result::Result<(), String>> {
    if tch_active() {
        return Ok(Ok(()));
    }
    preload_nvrtc(py)?;
    Ok(crate::cuda::kernels(index).map(|_| ()))
}

/// Where tensors on `device` run. Called with the GIL held: it asks torch for the current stream.
pub fn route(py: Python<'_>, device: Device) -> PyResult<Route> {
    match device {
        Device::Cpu => {
            if let Some(k) = emulator() {
                return Ok(Route::Cuda(k, 0));
            }
            #[cfg(feature = "tch")]
            if TCH_ON_CPU.load(Ordering::Relaxed) && tch_active() {
                return Ok(Route::Tch);
            }
            Ok(Route::Cpu)
        }
        Device::Meta => Ok(Route::Meta),
        Device::Cuda(index) => cuda_route(py, index),
        Device::Other(name) => {
            Err(Error::value(format!("hlora runs on cpu and cuda tensors, not {name}")).into())
        }
    }
}

fn cuda_route(py: Python<'_>, index: i32) -> PyResult<Route> {
    #[cfg(feature = "tch")]
    if CUDA_VIA_TCH.load(Ordering::Relaxed) && tch_active() {
        return Ok(Route::Tch);
    }
    preload_nvrtc(py)?;
    match crate::cuda::kernels(index) {
        Ok(k) => {
            let stream: u64 = py
                .import("torch.cuda")?
                .call_method1("current_stream", (index,))?
                .getattr("cuda_stream")?
                .extract()?;
            Ok(Route::Cuda(k, stream))
        }
        Err(reason) => {
            #[cfg(feature = "tch")]
            if tch_active() {
                if !CUDA_WARNED.swap(true, Ordering::Relaxed) {
                    let msg = std::ffi::CString::new(format!(
                        "hlora: fused CUDA kernels unavailable ({reason}); using the tch path"
                    ))
                    .unwrap_or_default();
                    PyErr::warn(py, &py.get_type::<PyUserWarning>(), &msg, 1)?;
                }
                return Ok(Route::Tch);
            }
            Err(Error::value(format!(
                "the fused CUDA kernels cannot run on cuda:{index} ({reason}), and the view provider has \
                 no other CUDA path; hlora.ops sends such tensors to the plain-PyTorch ops"
            ))
            .into())
        }
    }
}
