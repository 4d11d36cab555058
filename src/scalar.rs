//! Element types. `Storage` is what lives in memory (the dtypes torch hands us); `Real` is
//! what the maths runs in (f32, or f64 when any input is f64). Conversions inline to nothing
//! or to a single instruction, so the kernels stay generic without a cost.

use crate::tensor::Element;
use half::{bf16, f16};
use num_traits::Float;

/// Matrices of at most this many elements get float64 maths (on every path) whatever the
/// factors' dtype. There one element's cancellation (in D, or in the ω update's g~) is the whole
/// norm, and float32 rounding shows past the contract's 1e-5 — e.g. a (1, 1) penalty with
/// r = 64 erred by 1e-3 in one random case of 300. At that size float64 costs nothing.
pub const TINY_MATRIX: usize = 64;

pub trait Storage: Copy + Send + Sync + Element + 'static {
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    fn from_f32(x: f32) -> Self;
    fn from_f64(x: f64) -> Self;
}

macro_rules! storage_float {
    ($t:ty) => {
        impl Storage for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                x as $t
            }
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
        }
    };
}
storage_float!(f32);
storage_float!(f64);

/// bf16 → f32: the bits moved into place (exact; a NaN stays a NaN, unquieted). half's own
/// conversion quiets NaNs behind a branch, and f16's picks F16C at run time per element: either
/// kept the penalty's loops over a bf16 or f16 Ω from vectorizing (4–7× slower than over float32,
/// measured). These two compile to selects, so LLVM vectorizes them inside the kernels.
#[inline(always)]
fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

/// f16 → f32, exact for every value: exponent and mantissa moved into f32's places and the bias
/// rebased; infinities and NaNs get f32's all-ones exponent, and subnormals are formed as
/// 2⁻¹⁴·(1 + m/1024) − 2⁻¹⁴ = m·2⁻²⁴ — from normal floats only, so flushing denormals
/// (`torch.set_flush_denormal`) cannot zero them.
#[inline(always)]
fn f16_to_f32(x: f16) -> f32 {
    let h = x.to_bits() as u32;
    let shifted = (h & 0x7fff) << 13;
    let exponent = shifted & 0x0f80_0000;
    let rebased = shifted + ((127 - 15) << 23);
    let magnitude = if exponent == 0x0f80_0000 {
        rebased + ((128 - 16) << 23)
    } else if exponent == 0 {
        (f32::from_bits(rebased + (1 << 23)) - f32::from_bits(113 << 23)).to_bits()
    } else {
        rebased
    };
    f32::from_bits(magnitude | (h & 0x8000) << 16)
}

macro_rules! storage_half {
    ($t:ty, $to_f32:ident) => {
        impl Storage for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $to_f32(self)
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                $to_f32(self) as f64
            }
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                <$t>::from_f64(x)
            }
        }
    };
}
storage_half!(bf16, bf16_to_f32);
storage_half!(f16, f16_to_f32);

/// The precision the maths runs in.
pub trait Real: Float + Storage + std::iter::Sum + Default {
    fn load<S: Storage>(x: S) -> Self;
    fn store<S: Storage>(self) -> S;
    fn from_f64_lossy(x: f64) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn load<S: Storage>(x: S) -> Self {
        x.to_f32()
    }
    #[inline(always)]
    fn store<S: Storage>(self) -> S {
        S::from_f32(self)
    }
    #[inline(always)]
    fn from_f64_lossy(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    #[inline(always)]
    fn load<S: Storage>(x: S) -> Self {
        x.to_f64()
    }
    #[inline(always)]
    fn store<S: Storage>(self) -> S {
        S::from_f64(self)
    }
    #[inline(always)]
    fn from_f64_lossy(x: f64) -> Self {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip() {
        assert_eq!(f32::load(bf16::from_f32(1.5)), 1.5);
        assert_eq!(f64::load(f16::from_f32(-0.25)), -0.25);
        let stored: f32 = 2.0f64.store();
        assert_eq!(stored, 2.0);
        assert_eq!(<f64 as Real>::from_f64_lossy(0.1), 0.1);
    }

    #[test]
    fn half_conversions_are_exact_for_every_bit_pattern() {
        // Ours (the trait's) against half's (the inherent methods): the same bits, except that a
        // NaN may stay signalling.
        for bits in 0..=u16::MAX {
            let (b, h) = (bf16::from_bits(bits), f16::from_bits(bits));
            for (ours, theirs) in [
                (Storage::to_f32(b), b.to_f32()),
                (Storage::to_f32(h), h.to_f32()),
            ] {
                if theirs.is_nan() {
                    assert!(ours.is_nan(), "{bits:#06x}");
                } else {
                    assert_eq!(ours.to_bits(), theirs.to_bits(), "{bits:#06x}");
                }
            }
        }
        assert_eq!(Storage::to_f64(f16::from_f32(-0.5)), -0.5);
    }
}
