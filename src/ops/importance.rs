//! Ω finalization (Eq. 13) and the layer coefficients (Eq. 15).

use crate::cpu::importance::finalize_rows;
use crate::cpu::lowrank::LowRank;
use crate::cpu::read::dense;
use crate::dispatch::{self, Route};
use crate::error::{Error, Result};
use crate::forms::Converted;
use crate::providers::{self, check_factor_set, finite, Arg, Made, Provider};
use crate::scalar::Real;
use crate::tensor::{expect_cpu, DType, Device, TensorRef, FACTOR_DTYPES, OMEGA_DTYPES};
use pyo3::prelude::*;

/// Ω = ω / (Δ² + ξ), Δ = s·B·A − s·B_start·A_start (or s·B·A for a fresh adapter).
///
/// Δ is formed in float64 whatever the factors: Ω magnifies Δ's rounding where Δ² ≲ ξ, and
/// with a small ξ (the authors' code uses 1e-9) those entries dominate ‖Ω‖ — Δ summed in
/// float32 erred there by ~3e-4 of it. Rounded to ω's precision, Δ is then as good as exact,
/// and the division runs in that precision (the CPU kernels; the tch and CUDA paths divide in
/// float64). Finalization runs once per general task, so the float64 lanes cost little.
pub struct FinalizeJob {
    omega: TensorRef,
    a: TensorRef,
    b: TensorRef,
    start: Option<(TensorRef, TensorRef)>,
    pub scaling: f64,
    pub xi: f64,
    pub clamp_negative: bool,
}

/// The arguments of one finalization (ω, A, B and the optional start pair).
pub struct FinalizeArgs<'a, 'py> {
    pub omega: &'a Arg<'py>,
    pub a: &'a Arg<'py>,
    pub b: &'a Arg<'py>,
    pub start: Option<(&'a Arg<'py>, &'a Arg<'py>)>,
}

impl FinalizeJob {
    pub fn new(args: &FinalizeArgs, scaling: f64, xi: f64, clamp_negative: bool) -> Result<Self> {
        check_factor_set(args.omega, OMEGA_DTYPES, args.a, args.b, args.start)?;
        let xi = finite(xi, "xi")?;
        if xi <= 0.0 {
            return Err(Error::value(format!(
                "xi must be a positive number, got {xi}"
            )));
        }
        Ok(FinalizeJob {
            omega: args.omega.view.clone(),
            a: args.a.view.clone(),
            b: args.b.view.clone(),
            start: args
                .start
                .map(|(a0, b0)| (a0.view.clone(), b0.view.clone())),
            scaling: finite(scaling, "scaling")?,
            xi,
            clamp_negative,
        })
    }

    pub fn device(&self) -> Device {
        self.omega.device
    }

    /// Ω's shape and dtype: ω's.
    pub fn result(&self) -> (&[usize], DType) {
        (&self.omega.sizes, self.omega.dtype)
    }

    /// The same finalization for the fused CUDA kernels, on the arguments it was made from.
    pub fn cuda_mat<'a, 'py>(
        &self,
        args: &FinalizeArgs<'a, 'py>,
    ) -> crate::cuda::FinalizeMat<'a, 'py> {
        crate::cuda::FinalizeMat {
            omega: args.omega,
            a: args.a,
            b: args.b,
            start: args.start,
            scaling: self.scaling,
            xi: self.xi,
            f64_math: true,
        }
    }

    /// The fused CPU kernel, writing Ω into `out` (a fresh contiguous CPU tensor of ω's shape
    /// and dtype).
    pub fn run_cpu(&self, out: &TensorRef) -> Result<()> {
        match self.omega.dtype {
            DType::F64 => self.run_fused::<f64>(out),
            _ => self.run_fused::<f32>(out),
        }
    }

    /// Δ in float64; the division in ω's own precision `S` (Δ is then exact to its rounding).
    fn run_fused<S: Real>(&self, out: &TensorRef) -> Result<()> {
        let anchor = self.start.as_ref().map(|(a0, b0)| (a0, b0, self.scaling));
        let factors = Converted::new(&self.a, &self.b, anchor, dense::<f64>)?;
        let delta = LowRank::from_terms(&factors.delta(self.scaling)?);
        expect_cpu(&self.omega, S::DTYPE)?;
        expect_cpu(out, S::DTYPE)?;
        let gathered;
        let src: &[S] = if self.omega.is_contiguous() {
            // SAFETY: a contiguous CPU matrix of dtype S (checked), only read.
            unsafe { self.omega.slice::<S>() }
        } else {
            // SAFETY: a CPU matrix of dtype S (checked), kept alive by its argument.
            gathered = unsafe { self.omega.gather::<S>() };
            &gathered
        };
        // SAFETY: `out` is a fresh contiguous CPU tensor of dtype S, referenced nowhere else.
        let dst = unsafe { out.slice_mut::<S>() };
        let (xi, clamp) = (S::from_f64_lossy(self.xi), self.clamp_negative);
        finalize_rows(src, dst, &delta, xi, clamp)
    }
}

/// Σ Ω² of a finished CPU Ω, in float64 (the norms the layer coefficients take).
pub fn squared_norm(omega: &TensorRef) -> Result<f64> {
    // SAFETY: a fresh contiguous CPU tensor written by `run_cpu`, of the dtype matched.
    Ok(unsafe {
        match omega.dtype {
            DType::F64 => omega.slice::<f64>().iter().map(|&x| x * x).sum(),
            DType::F32 => omega
                .slice::<f32>()
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum(),
            other => {
                return Err(Error::value(format!(
                    "internal: Ω of dtype {}",
                    other.name()
                )))
            }
        }
    })
}

/// c_l = softmax(‖Ω_l‖ / T) (max-shifted, so stable) or 1/L, from CPU norms; float64 for float64
/// norms, else float32.
pub fn layer_coefficients(norms: &Arg, mode: &str, temperature: f64) -> Result<(Vec<f64>, DType)> {
    let dtype = norms.dtype(FACTOR_DTYPES)?;
    let v = &norms.view;
    let n = match v.sizes[..] {
        [n] if n > 0 => n,
        _ => {
            return Err(Error::value(format!(
                "{} must be a non-empty 1-D tensor of per-matrix norms, got shape {:?}",
                norms.name, v.sizes
            )))
        }
    };
    if v.device != Device::Cpu {
        return Err(Error::value(format!(
            "{} must be on the CPU here (hlora.ops moves it)",
            norms.name
        )));
    }
    // As a 1 × n matrix, read like a factor.
    let row = TensorRef {
        sizes: vec![1, n],
        strides: vec![0, v.strides[0]],
        ..v.clone()
    };
    let x = dense::<f64>(&row)?.data;
    if !x.iter().all(|v| v.is_finite()) {
        return Err(Error::value(format!("{} must be finite", norms.name)));
    }
    let out = match mode {
        "softmax" => {
            let t = finite(temperature, "temperature")?;
            if t <= 0.0 {
                return Err(Error::value(format!(
                    "temperature must be positive, got {t}"
                )));
            }
            let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v / t));
            let e: Vec<f64> = x.iter().map(|&v| (v / t - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect()
        }
        "uniform" => vec![1.0 / n as f64; n],
        other => {
            return Err(Error::value(format!(
                "mode must be \"softmax\" or \"uniform\", got {other:?}"
            )))
        }
    };
    let out_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    Ok((out, out_dtype))
}

/// Ω for every matrix of one call and, with `norms`, ‖Ω_l‖² per matrix (float64, on Ω's device),
/// where `dispatch` sends them.
pub fn run(
    py: Python<'_>,
    args: &[FinalizeArgs],
    jobs: Vec<FinalizeJob>,
    clamp: bool,
    norms: bool,
) -> PyResult<(Vec<Made>, Option<Made>)> {
    let p = providers::active();
    let device = super::one_device(
        jobs.iter()
            .zip(args)
            .map(|(j, a)| (j.device(), a.omega.name.as_str())),
    )?;
    let n = jobs.len();
    match dispatch::route(py, device)? {
        Route::Cpu => {
            let results = jobs
                .iter()
                .map(|j| {
                    let (sizes, dtype) = j.result();
                    p.empty(py, sizes, dtype, Device::Cpu)
                })
                .collect::<Result<Vec<_>>>()?;
            let outs: Vec<TensorRef> = results.iter().map(|m| m.view.clone()).collect();
            let squares = py.allow_threads(move || -> Result<Vec<f64>> {
                jobs.iter()
                    .zip(&outs)
                    .try_for_each(|(j, out)| j.run_cpu(out))?;
                if norms {
                    outs.iter().map(squared_norm).collect()
                } else {
                    Ok(Vec::new())
                }
            })?;
            let sq = if norms {
                Some(p.tensor_of_f64s(py, &squares, &[n], DType::F64, Device::Cpu)?)
            } else {
                None
            };
            Ok((results, sq))
        }
        Route::Cuda(k, stream) => {
            let mats: Vec<_> = jobs.iter().zip(args).map(|(j, a)| j.cuda_mat(a)).collect();
            let out = crate::cuda::finalize_many(py, p, &k, stream, &mats, clamp)?;
            Ok((out.omegas, norms.then_some(out.sq_norms)))
        }
        #[cfg(feature = "tch")]
        Route::Tch => {
            use crate::tch_path::FinalizeTch;
            let works = jobs
                .iter()
                .zip(args)
                .map(|(j, a)| {
                    FinalizeTch::new(a.omega, a.a, a.b, a.start, (j.scaling, j.xi, clamp))
                })
                .collect::<Result<Vec<_>>>()?;
            let (omegas, sq) = py.allow_threads(move || -> Result<_> {
                let omegas = works
                    .iter()
                    .map(FinalizeTch::run)
                    .collect::<Result<Vec<_>>>()?;
                let sq = if norms {
                    let each = omegas
                        .iter()
                        .map(FinalizeTch::squared_norm)
                        .collect::<Result<Vec<_>>>()?;
                    Some(::tch::Tensor::f_stack(&each, 0)?)
                } else {
                    None
                };
                Ok((omegas, sq))
            })?;
            let omegas = omegas
                .into_iter()
                .map(crate::providers::tch::made)
                .collect::<Result<Vec<_>>>()?;
            Ok((omegas, sq.map(crate::providers::tch::made).transpose()?))
        }
        Route::Meta => {
            // (Made by torch through Python whatever the provider: tch has no meta device.)
            let meta = &providers::view::VIEW;
            let results = jobs
                .iter()
                .map(|j| {
                    let (sizes, dtype) = j.result();
                    meta.empty(py, sizes, dtype, Device::Meta)
                })
                .collect::<Result<Vec<_>>>()?;
            let sq = if norms {
                Some(meta.empty(py, &[n], DType::F64, Device::Meta)?)
            } else {
                None
            };
            Ok((results, sq))
        }
    }
}
