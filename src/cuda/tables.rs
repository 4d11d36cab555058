//! Host mirrors of the kernel parameter tables in `kernels.cu` (same field order, `repr(C)`).
//! `size_defines` hands their sizes to NVRTC, where static_asserts compare them with the
//! device structs, so a drift between the two files fails compilation.

use std::ffi::c_void;

pub const MAX_MATS: usize = 64;
pub const THREADS: u32 = 256;
/// Tile columns (HL_TN) and rows (TM) per kernel, as in kernels.cu.
pub const TILE_COLS: usize = 128;
pub const OMEGA_ROWS: usize = 16;
pub const FINALIZE_ROWS: usize = 16;
pub fn penalty_rows(f64_math: bool) -> usize {
    if f64_math {
        32
    } else {
        64
    }
}

pub type Ptr = *const c_void;
pub type PtrMut = *mut c_void;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct OmegaEntry {
    pub omega: PtrMut,
    pub a0: Ptr,
    pub b0: Ptr,
    pub ga: Ptr,
    pub gb: Ptr,
    pub a1: Ptr,
    pub b1: Ptr,
    pub out: i32,
    pub inn: i32,
    pub r: i32,
    pub tiles_col: i32,
    pub first_block: i32,
    pub pad: i32,
    pub lr: f64,
    pub scaling: f64,
}

#[repr(C)]
pub struct OmegaTable {
    pub m: [OmegaEntry; MAX_MATS],
    pub count: i32,
    pub clamp_negative: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FinalizeEntry {
    pub omega: Ptr,
    pub result: PtrMut,
    pub a: Ptr,
    pub b: Ptr,
    pub a_start: Ptr,
    pub b_start: Ptr,
    pub sq_partial: *mut f64,
    pub out: i32,
    pub inn: i32,
    pub r: i32,
    pub tiles_col: i32,
    pub first_block: i32,
    pub pad: i32,
    pub scaling: f64,
    pub xi: f64,
}

#[repr(C)]
pub struct FinalizeTable {
    pub m: [FinalizeEntry; MAX_MATS],
    pub count: i32,
    pub clamp_negative: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PenaltyEntry {
    pub omega: Ptr,
    pub a: Ptr,
    pub b: Ptr,
    pub a_ref: Ptr,
    pub b_ref: Ptr,
    pub gb_part: PtrMut,
    pub ga_part: PtrMut,
    pub value_part: *mut f64,
    pub block_exact: *mut i32,
    pub out: i32,
    pub inn: i32,
    pub r: i32,
    pub tiles_col: i32,
    pub first_block: i32,
    pub mode: i32,
    pub scaling: f64,
    pub scaling_ref: f64,
}

#[repr(C)]
pub struct PenaltyTable {
    pub m: [PenaltyEntry; MAX_MATS],
    pub count: i32,
    pub grads: i32,
    pub exact: i32,
    pub pad: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct GradEntry {
    pub gb_part: Ptr,
    pub ga_part: Ptr,
    pub grad_b: PtrMut,
    pub grad_a: PtrMut,
    pub out: i32,
    pub inn: i32,
    pub r: i32,
    pub tiles_row: i32,
    pub tiles_col: i32,
    pub first_block: i32,
    pub scale: f64,
}

#[repr(C)]
pub struct GradTable {
    pub m: [GradEntry; MAX_MATS],
    pub count: i32,
    pub pad: i32,
}

#[repr(C)]
pub struct SumTable {
    pub first: [i32; MAX_MATS + 1],
    pub weight: [f64; MAX_MATS],
    pub count: i32,
    pub pad: i32,
}

/// A table with every slot zeroed (null pointers, zero sizes): filled entry by entry.
pub fn zeroed<T>() -> Box<T> {
    // SAFETY: every table is plain old data (integers, floats, raw pointers) for which the
    // all-zero bit pattern is valid.
    unsafe { Box::new(std::mem::zeroed()) }
}

/// `-D` options giving NVRTC the host's table sizes.
pub fn size_defines() -> Vec<String> {
    use std::mem::size_of;
    vec![
        format!("-DHL_OMEGA_TABLE_BYTES={}", size_of::<OmegaTable>()),
        format!("-DHL_FINALIZE_TABLE_BYTES={}", size_of::<FinalizeTable>()),
        format!("-DHL_PENALTY_TABLE_BYTES={}", size_of::<PenaltyTable>()),
        format!("-DHL_GRAD_TABLE_BYTES={}", size_of::<GradTable>()),
        format!("-DHL_SUM_TABLE_BYTES={}", size_of::<SumTable>()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_the_kernel_parameter_limit() {
        // 32764 bytes: CUDA 12.1+ on compute capability 7.0+.
        for size in [
            std::mem::size_of::<OmegaTable>(),
            std::mem::size_of::<FinalizeTable>(),
            std::mem::size_of::<PenaltyTable>(),
            std::mem::size_of::<GradTable>(),
            std::mem::size_of::<SumTable>() + 16,
            std::mem::size_of::<PenaltyTable>() + std::mem::size_of::<SumTable>() + 16,
        ] {
            assert!(size <= 32764, "{size}");
        }
        assert_eq!(std::mem::size_of::<OmegaEntry>(), 96);
    }
}
