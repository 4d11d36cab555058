//! The three op families as jobs: their arguments checked, then run where `crate::dispatch`
//! sends them — the CPU kernels (`crate::cpu`), the CUDA kernels (`crate::cuda`) or the tch
//! path, whose rank-2r GEMMs live here beside each job.

pub mod importance;
pub mod omega;
pub mod penalty;
