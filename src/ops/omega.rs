//! ω accumulation (Eq. 12): ω ← ω − g~ ⊙ dθ, once per optimizer step, in place.

use crate::cpu::lowrank::LowRank;
use crate::cpu::omega::update_rows;
use crate::cpu::read::{factor_rows, FactorRows};
use crate::dispatch::{self, Route};
use crate::error::{Error, Result};
use crate::forms::{d_theta, g_tilde};
use crate::providers::{self, finite, same_device, wants_f64, Arg};
use crate::scalar::{Real, Storage, TINY_MATRIX};
use crate::tensor::{DType, Device, TensorRef, FACTOR_DTYPES, OMEGA_DTYPES};
use pyo3::prelude::*;

/// One matrix's update, validated, its tensors as views (safe to run without the GIL while
/// the arguments they came from stay alive).
pub struct OmegaJob {
    /// ω, then A0, B0, gA, gB, A1, B1.
    views: [TensorRef; 7],
    pub lr: f64,
    pub scaling: f64,
    pub clamp_negative: bool,
    f64_math: bool,
}

pub struct OmegaArgs<'a, 'py> {
    pub omega: &'a Arg<'py>,
    pub a_prev: &'a Arg<'py>,
    pub b_prev: &'a Arg<'py>,
    pub grad_a: &'a Arg<'py>,
    pub grad_b: &'a Arg<'py>,
    pub a_next: &'a Arg<'py>,
    pub b_next: &'a Arg<'py>,
}

impl<'a, 'py> OmegaArgs<'a, 'py> {
    /// A0, B0, gA, gB, A1, B1, in this order.
    pub fn factors(&self) -> [&'a Arg<'py>; 6] {
        [
            self.a_prev,
            self.b_prev,
            self.grad_a,
            self.grad_b,
            self.a_next,
            self.b_next,
        ]
    }
}

impl OmegaJob {
    pub fn new(args: &OmegaArgs, lr: f64, scaling: f64, clamp_negative: bool) -> Result<Self> {
        let mut dtypes = vec![args.omega.dtype(OMEGA_DTYPES)?];
        let factors = args.factors();
        for f in factors {
            dtypes.push(f.dtype(FACTOR_DTYPES)?);
        }
        let (out, inn) = args.omega.dims2()?;
        let (rank, a_in) = args.a_prev.dims2()?;
        if a_in != inn {
            return Err(Error::value(format!(
                "{} has {a_in} columns but {} has {inn}; A must be (r, in) for omega (out, in)",
                args.a_prev.name, args.omega.name
            )));
        }
        if rank == 0 {
            return Err(Error::value(format!(
                "{} must have rank r >= 1 rows",
                args.a_prev.name
            )));
        }
        let why_a = format!("like {} (r, in)", args.a_prev.name);
        let why_b = "(out, r) for omega (out, in) and A (r, in)";
        args.b_prev.expect_shape(out, rank, why_b)?;
        args.grad_a.expect_shape(rank, inn, &why_a)?;
        args.a_next.expect_shape(rank, inn, &why_a)?;
        args.grad_b.expect_shape(out, rank, why_b)?;
        args.b_next.expect_shape(out, rank, why_b)?;
        let mut all = vec![args.omega];
        all.extend(factors);
        same_device(&all)?;
        let [a0, b0, ga, gb, a1, b1] = factors.map(|f| f.view.clone());
        Ok(OmegaJob {
            views: [args.omega.view.clone(), a0, b0, ga, gb, a1, b1],
            lr: finite(lr, "lr")?,
            scaling: finite(scaling, "scaling")?,
            clamp_negative,
            f64_math: wants_f64(&dtypes),
        })
    }

    pub fn device(&self) -> Device {
        self.views[0].device
    }

    /// The same update for the fused CUDA kernels, on the arguments it was made from.
    pub fn cuda_mat<'a, 'py>(&self, args: &OmegaArgs<'a, 'py>) -> crate::cuda::OmegaMat<'a, 'py> {
        crate::cuda::OmegaMat {
            omega: args.omega,
            factors: args.factors(),
            lr: self.lr,
            scaling: self.scaling,
            f64_math: self.maths_in_f64(),
        }
    }

    /// Whether the maths runs in float64: float64 inputs, or a matrix of a few elements
    /// (`TINY_MATRIX`: here the float32 rounding of the folded factor A0 − η·gA, magnified
    /// where gB·A0 ≈ −B0·gA).
    pub fn maths_in_f64(&self) -> bool {
        self.f64_math || self.views[0].numel() <= TINY_MATRIX
    }

    /// The fused CPU kernel.
    pub fn run_cpu(&self) -> Result<()> {
        match (self.views[0].dtype, self.maths_in_f64()) {
            (DType::F64, _) => self.run_fused::<f64, f64>(),
            (_, true) => self.run_fused::<f32, f64>(),
            _ => self.run_fused::<f32, f32>(),
        }
    }

    fn run_fused<S: Storage, T: Real>(&self) -> Result<()> {
        let [_, a0, b0, ga, gb, a1, b1] = &self.views;
        let [a0, b0, ga, gb, a1, b1] = [a0, b0, ga, gb, a1, b1].map(factor_rows::<T>);
        let (a0, b0, ga, gb, a1, b1) = (a0?, b0?, ga?, gb?, a1?, b1?);
        let (lr, s) = (self.lr, self.scaling);
        let layouts = || {
            let [a0, b0, ga, gb, a1, b1] = [&a0, &b0, &ga, &gb, &a1, &b1].map(FactorRows::to_dense);
            let g = LowRank::from_terms(&g_tilde(&a0, &b0, &ga, &gb, lr, s)?);
            let d = LowRank::from_terms(&d_theta(&a0, &b0, &a1, &b1, s)?);
            Ok((g, d))
        };
        // A strided ω is updated through a contiguous copy, then written back.
        let omega = &self.views[0];
        crate::tensor::expect_cpu(omega, S::DTYPE)?;
        let (rows, cols) = omega.dims2().unwrap_or((0, 0));
        if omega.is_contiguous() {
            // SAFETY: a contiguous CPU matrix of dtype S (checked), written by this call alone:
            // `disjoint` refused any overlap with the inputs.
            let target = unsafe { omega.slice_mut::<S>() };
            return update_rows(target, rows, cols, layouts, self.clamp_negative);
        }
        // SAFETY: a CPU matrix of dtype S whose elements do not overlap (refused when written).
        let mut copy = unsafe { omega.gather::<S>() };
        update_rows(&mut copy, rows, cols, layouts, self.clamp_negative)?;
        unsafe { omega.scatter(&copy) };
        Ok(())
    }
}

/// Runs the updates of one call where `dispatch` sends them.
pub fn run(py: Python<'_>, args: &[OmegaArgs], jobs: Vec<OmegaJob>, clamp: bool) -> PyResult<()> {
    let device = super::one_device(
        jobs.iter()
            .zip(args)
            .map(|(j, a)| (j.device(), a.omega.name.as_str())),
    )?;
    match dispatch::route(py, device)? {
        Route::Cpu => py.allow_threads(move || jobs.iter().try_for_each(OmegaJob::run_cpu))?,
        Route::Cuda(k, stream) => {
            let mats: Vec<_> = jobs.iter().zip(args).map(|(j, a)| j.cuda_mat(a)).collect();
            crate::cuda::omega_many(py, providers::active(), &k, stream, &mats, clamp)?
        }
        #[cfg(feature = "tch")]
        Route::Tch => {
            let works = jobs
                .iter()
                .zip(args)
                .map(|(j, a)| {
                    crate::tch_path::OmegaTch::new(
                        a.omega,
                        a.factors(),
                        j.lr,
                        j.scaling,
                        clamp,
                        j.maths_in_f64(),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            py.allow_threads(move || works.iter().try_for_each(crate::tch_path::OmegaTch::run))?
        }
        Route::Meta => {}
    }
    Ok(())
}
