//! The CPU kernels: one module per kernel family (omega, importance, penalty), each with its
//! AVX-512 twin beside it (`*_avx512`: float32 maths, eight rows at a time in intrinsics), and
//! what they share — thin factors (`dense`), low-rank tiles (`lowrank`), the SIMD levels
//! (`simd`, `avx512`) and where tasks run (`pool` on torch's OpenMP team (`omp`) or rayon).

pub mod avx512;
pub mod dense;
pub mod importance;
pub mod lowrank;
pub mod omega;
pub mod omega_avx512;
pub mod omp;
pub mod penalty;
pub mod penalty_avx512;
pub mod pool;
pub mod read;
pub mod simd;
