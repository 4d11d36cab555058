//! Runtime CPU-feature dispatch. Wheels are built for baseline x86-64 (SSE2) so they run
//! anywhere; the hot per-task loops are compiled three times — plain, with AVX2+FMA, and with
//! AVX-512 — and the best the CPU has is chosen. `Madd` picks `a·b + c` or a fused multiply-add
//! (and, through `WIDE`, how many columns the micro-kernels take per row), so one generic body
//! serves all three. On an Intel Xeon (Emerald Rapids) VM, one thread, AVX-512 against AVX2:
//! ω update −22–30 %, finalize −15 %, penalty −4–10 % at SmolLM2's shapes and unchanged at
//! 1024 × 3072 (its gradient loops were 512 bits wide already: LLVM packs two 8-lane rank terms
//! per register). Zen 4, whose 512-bit FMAs run as two halves, measured no faster with an
//! earlier, one-register-per-row AVX-512 variant. Float32 ω updates and penalties on an AVX-512
//! CPU run most of their rows in `crate::cpu::avx512`'s hand-written eight-row groups instead.

use crate::scalar::Real;

pub trait Madd {
    /// 512-bit registers (32 of them): the micro-kernels take twice the columns per row.
    const WIDE: bool = false;
    fn madd<T: Real>(a: T, b: T, c: T) -> T;
}

/// a·b + c, two roundings (baseline CPUs, where `mul_add` would be a slow libm call).
pub struct Plain;
/// fma(a, b, c), one rounding, one instruction under the "fma" target feature.
pub struct Fused;
/// [`Fused`] in the AVX-512 variant.
pub struct FusedWide;

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

impl Madd for FusedWide {
    const WIDE: bool = true;
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
    /// AVX-512 (F, VL, BW, DQ) + FMA: 512-bit vectors.
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Plain => "plain",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

/// The best level this CPU runs, capped by `HLORA_SIMD=plain|avx2` (read once; tests run the
/// capped variants in subprocesses, and benchmarks compare them in one build).
pub fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = detected();
        match std::env::var("HLORA_SIMD").as_deref() {
            Ok("plain") => Level::Plain,
            Ok("avx2") if best == Level::Avx512 => Level::Avx2,
            _ => best,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detected() -> Level {
    use std::is_x86_feature_detected as has;
    let avx2 = has!("avx2") && has!("fma");
    if avx2 && has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") {
        Level::Avx512
    } else if avx2 {
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
                    $body::<$crate::cpu::simd::Fused, $($g),*>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn with_avx512<$($g: $bound),*>($($arg: $ty),*) $(-> $ret)? {
                    $body::<$crate::cpu::simd::FusedWide, $($g),*>($($arg),*)
                }
                match $crate::cpu::simd::level() {
                    // SAFETY: the CPU reports these features (`simd::level`).
                    $crate::cpu::simd::Level::Avx512 => return unsafe { with_avx512::<$($g),*>($($arg),*) },
                    // SAFETY: as above.
                    $crate::cpu::simd::Level::Avx2 => return unsafe { with_avx2::<$($g),*>($($arg),*) },
                    $crate::cpu::simd::Level::Plain => {}
                }
            }
            $body::<$crate::cpu::simd::Plain, $($g),*>($($arg),*)
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
