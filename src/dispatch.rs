//! The one place that decides where an op runs. CPU tensors go to the fused rayon kernels;
//! CUDA tensors to the fused CUDA kernels (`crate::cuda`, one launch for all matrices) when
//! they load, else — after one warning — through tch ops, algebraically fused (rank-2r GEMMs,
//! in-place updates). Tests can route CPU tensors through the tch path too, so it is checked
//! without a GPU.

use crate::cuda::Kernels;
use pyo3::exceptions::PyUserWarning;
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tch::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Fused loops over raw memory (CPU).
    Fused,
    /// tch (libtorch) ops on the tensors' device.
    Tch,
}

static TCH_ON_CPU: AtomicBool = AtomicBool::new(false);
/// When set, CPU tensors run the CUDA kernels' code on the CPU emulator (tests).
static EMULATOR: Mutex<Option<Arc<Kernels>>> = Mutex::new(None);

pub fn path_for(device: Device) -> Path {
    match device {
        Device::Cpu if !TCH_ON_CPU.load(Ordering::Relaxed) => Path::Fused,
        _ => Path::Tch,
    }
}

/// Routes CPU tensors through the tch path ("tch"), the fused kernels ("fused"), or the
/// CUDA kernels on their CPU emulator (`emulator` given).
pub fn set_cpu_path(tch_path: bool, emulator: Option<Arc<Kernels>>) {
    TCH_ON_CPU.store(tch_path, Ordering::Relaxed);
    if let Ok(mut slot) = EMULATOR.lock() {
        *slot = emulator;
    }
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
static CUDA_WARNED: AtomicBool = AtomicBool::new(false);

/// Routes CUDA tensors through the tch path ("tch") or the fused kernels ("fused").
pub fn set_cuda_path(tch_path: bool) {
    CUDA_VIA_TCH.store(tch_path, Ordering::Relaxed);
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

/// The fused CUDA kernels and torch's current stream for tensors on `device`, or `None`
/// for the tch path: a CPU device, `set_cuda_path("tch")`, or kernels that cannot load
/// (no driver, no NVRTC, an old GPU) — the last said once, as a warning with the reason.
/// Called with the GIL held: it asks torch for the current stream.
pub fn cuda_route(py: Python<'_>, device: Device) -> PyResult<Option<(Arc<Kernels>, u64)>> {
    let Device::Cuda(index) = device else {
        return Ok(emulator().map(|k| (k, 0)));
    };
    if CUDA_VIA_TCH.load(Ordering::Relaxed) {
        return Ok(None);
    }
    preload_nvrtc(py)?;
    match crate::cuda::kernels(index as i32) {
        Ok(k) => {
            let stream: u64 = py
                .import("torch.cuda")?
                .call_method1("current_stream", (index,))?
                .getattr("cuda_stream")?
                .extract()?;
            Ok(Some((k, stream)))
        }
        Err(reason) => {
            if !CUDA_WARNED.swap(true, Ordering::Relaxed) {
                let msg = std::ffi::CString::new(format!(
                    "hlora: fused CUDA kernels unavailable ({reason}); using the tch path"
                ))
                .unwrap_or_default();
                PyErr::warn(py, &py.get_type::<PyUserWarning>(), &msg, 1)?;
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_always_takes_the_tch_path() {
        assert_eq!(path_for(Device::Cuda(0)), Path::Tch);
    }
}
