//! The one place that decides where an op runs. CPU tensors go to the fused rayon kernels;
//! every other device (CUDA) goes through tch ops, algebraically fused (rank-2r GEMMs,
//! in-place updates). Fused CUDA kernels will slot in here. Tests can route CPU tensors
//! through the tch path too, so it is checked without a GPU.

use std::sync::atomic::{AtomicBool, Ordering};
use tch::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Fused loops over raw memory (CPU).
    Fused,
    /// tch (libtorch) ops on the tensors' device.
    Tch,
}

static TCH_ON_CPU: AtomicBool = AtomicBool::new(false);

pub fn path_for(device: Device) -> Path {
    match device {
        Device::Cpu if !TCH_ON_CPU.load(Ordering::Relaxed) => Path::Fused,
        _ => Path::Tch,
    }
}

/// Routes CPU tensors through the tch path ("tch") or the fused kernels ("fused").
pub fn set_cpu_path(tch_path: bool) {
    TCH_ON_CPU.store(tch_path, Ordering::Relaxed);
}

pub fn cpu_path_name() -> &'static str {
    if TCH_ON_CPU.load(Ordering::Relaxed) {
        "tch"
    } else {
        "fused"
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
