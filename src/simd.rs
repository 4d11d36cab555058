//! Runtime CPU-feature dispatch. Wheels are built for baseline x86-64 (SSE2) so they run
//! anywhere; the hot per-task loops are compiled twice — plain, and with AVX2+FMA — and the
//! second is chosen when the CPU has it. `Madd` picks `a·b + c` or a fused multiply-add, so
//! one generic body serves both. (An AVX-512 variant measured no faster on this project's
//! Zen 4 machines, whose 512-bit FMAs run as two 256-bit halves, so there is none.)

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

/// The instruction set a kernel variant uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Baseline x86-64 (or any other architecture): `a·b + c`.
    Plain,
    /// AVX2 + FMA: 256-bit vectors, fused multiply-adds.
    Avx2,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Plain => "plain",
            Level::Avx2 => "avx2",
        }
    }
}

/// The best level this CPU runs, or `plain` with `HLORA_SIMD=plain` (read once; tests run the
/// plain variant in a subprocess with it).
pub fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let plain = std::env::var("HLORA_SIMD").is_ok_and(|v| v == "plain");
        if plain {
            Level::Plain
        } else {
            detected()
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detected() -> Level {
    use std::is_x86_feature_detected as has;
    if has!("avx2") && has!("fma") {
        Level::Avx2
    } else {
        Level::Plain
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Level {
    Level::Plain
}

/// Defines `$name` calling `$body::<Fused, ..>` compiled with AVX2+FMA when the CPU has them
/// (see [`level`]), else `$body::<Plain, ..>`. `$body` must be `#[inline(always)]` so it is
/// compiled inside each variant with that variant's features.
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
                if $crate::simd::level() == $crate::simd::Level::Avx2 {
                    // SAFETY: the CPU reports AVX2 and FMA (`simd::level`).
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
