//! The three op families as jobs: their arguments checked, then run where `crate::dispatch`
//! sends them — the CPU kernels (`crate::cpu`), the CUDA kernels (`crate::cuda`) or the tch
//! path, whose rank-2r GEMMs live here beside each job.

pub mod importance;
pub mod omega;
pub mod penalty;

use crate::error::{Error, Result};
use crate::tensor::Device;

/// The one device of a call's matrices (the routes run a call in one place).
pub fn one_device<'a>(devices: impl IntoIterator<Item = (Device, &'a str)>) -> Result<Device> {
    let mut it = devices.into_iter();
    let (first, first_name) = it.next().ok_or_else(|| Error::value("no tensors given"))?;
    for (device, name) in it {
        if device != first {
            return Err(Error::value(format!(
                "{name} is on {} but {first_name} is on {}; all matrices of one call must be on one device",
                device.name(),
                first.name()
            )));
        }
    }
    Ok(first)
}
