//! Runtime CPU-feature dispatch. Wheels are built for baseline x86-64 (SSE2) so they run
//! anywhere; the hot per-task loops are compiled twice — plain, and with AVX2+FMA — and the
//! second is chosen when the CPU has it. `Madd` picks `a·b + c` or a fused multiply-add, so
//! one generic body serves both.

use crate::scalar::Real;

pub trait Madd {
    fn madd<T: Real>(a: T, b: T, c: T) -> T;
}

/// a·b + c, two roundings (baseline CPUs, where `mul_add` would be a slow libm call).
pub struct Plain;
/// fma(a, b, c), one rounding, one instruction under the "fma" target feature.
pub struct Fused;

impl Madd for Plain {
    #[inline(always)]
    fn madd<T: Real>(a: T, b: T, c: T) -> T {
        a * b + c
    }
}

impl Madd for Fused {
    #[inline(always)]
    fn madd<T: Real>(a: T, b: T, c: T) -> T {
        a.mul_add(b, c)
    }
}

/// Whether the AVX2+FMA variants may run here (checked once; std caches the answer).
#[cfg(target_arch = "x86_64")]
pub fn avx2_fma() -> bool {
    std::env::var_os("HLORA_NO_SIMD").is_none()
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
}

/// Defines `$name` calling `$body::<Fused, ..>` compiled with AVX2+FMA when the CPU has them,
/// else `$body::<Plain, ..>`. `$body` must be `#[inline(always)]` so it is compiled inside
/// each variant with that variant's features.
macro_rules! multiversion {
    (fn $name:ident<$($g:ident: $bound:path),*>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident) => {
        #[allow(clippy::too_many_arguments)]
        fn $name<$($g: $bound),*>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn with_avx2<$($g: $bound),*>($($arg: $ty),*) $(-> $ret)? {
                    $body::<$crate::simd::Fused, $($g),*>($($arg),*)
                }
                if $crate::simd::avx2_fma() {
                    // SAFETY: the CPU reports AVX2 and FMA.
                    return unsafe { with_avx2::<$($g),*>($($arg),*) };
                }
            }
            $body::<$crate::simd::Plain, $($g),*>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_variants_agree_on_exact_values() {
        assert_eq!(Plain::madd(2.0f32, 3.0, 1.0), 7.0);
        assert_eq!(Fused::madd(2.0f64, 3.0, 1.0), 7.0);
    }
}
