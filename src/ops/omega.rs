//! ω accumulation (Eq. 12): ω ← ω − g~ ⊙ dθ, once per optimizer step, in place.

use crate::cpu::lowrank::LowRank;
use crate::cpu::omega::update_rows;
use crate::dispatch::{path_for, Path};
use crate::error::{Error, Result};
use crate::forms::{assemble, d_theta, g_tilde};
use crate::scalar::{math_kind, Real, Storage, TINY_MATRIX};
use crate::view::{
    factor_rows, finite, same_device, slice_mut, wants_f64, Arg, FactorRows, FACTOR_KINDS,
    OMEGA_KINDS,
};
use tch::{Kind, Tensor};

/// One matrix's update, validated and detached from Python (safe to run without the GIL).
pub struct OmegaJob {
    omega: Tensor,
    a_prev: Tensor,
    b_prev: Tensor,
    grad_a: Tensor,
    grad_b: Tensor,
    a_next: Tensor,
    b_next: Tensor,
    lr: f64,
    scaling: f64,
    clamp_negative: bool,
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

impl OmegaJob {
    pub fn new(args: OmegaArgs, lr: f64, scaling: f64, clamp_negative: bool) -> Result<Self> {
        let omega_kind = args.omega.kind(OMEGA_KINDS)?;
        let factors = [
            args.a_prev,
            args.b_prev,
            args.grad_a,
            args.grad_b,
            args.a_next,
            args.b_next,
        ];
        let mut kinds = vec![omega_kind];
        for f in factors {
            kinds.push(f.kind(FACTOR_KINDS)?);
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
        Ok(OmegaJob {
            omega: args.omega.share(),
            a_prev: args.a_prev.share(),
            b_prev: args.b_prev.share(),
            grad_a: args.grad_a.share(),
            grad_b: args.grad_b.share(),
            a_next: args.a_next.share(),
            b_next: args.b_next.share(),
            lr: finite(lr, "lr")?,
            scaling: finite(scaling, "scaling")?,
            clamp_negative,
            f64_math: wants_f64(&kinds),
        })
    }

    pub fn device(&self) -> tch::Device {
        self.omega.device()
    }

    /// A0, B0, gA, gB, A1, B1, in this order.
    fn factors(&self) -> [&Tensor; 6] {
        [
            &self.a_prev,
            &self.b_prev,
            &self.grad_a,
            &self.grad_b,
            &self.a_next,
            &self.b_next,
        ]
    }

    /// The same update for the fused CUDA kernels.
    pub fn cuda_mat(&self) -> crate::cuda::OmegaMat<'_> {
        crate::cuda::OmegaMat {
            omega: &self.omega,
            factors: self.factors(),
            lr: self.lr,
            scaling: self.scaling,
            f64_math: self.maths_in_f64(),
        }
    }

    /// Whether the maths runs in float64: float64 inputs, or a matrix of a few elements
    /// (`TINY_MATRIX`: here the float32 rounding of the folded factor A0 − η·gA, magnified
    /// where gB·A0 ≈ −B0·gA).
    fn maths_in_f64(&self) -> bool {
        self.f64_math || self.omega.numel() <= TINY_MATRIX
    }

    pub fn run(&self) -> Result<()> {
        tch::no_grad(|| match path_for(self.omega.device()) {
            Path::Tch => self.run_tch(),
            Path::Fused => match (self.omega.f_kind()?, self.maths_in_f64()) {
                (Kind::Double, _) => self.run_fused::<f64, f64>(),
                (_, true) => self.run_fused::<f32, f64>(),
                _ => self.run_fused::<f32, f32>(),
            },
        })
    }

    fn run_fused<S: Storage, T: Real>(&self) -> Result<()> {
        let [a0, b0, ga, gb, a1, b1] = self.factors().map(factor_rows::<T>);
        let (a0, b0, ga, gb, a1, b1) = (a0?, b0?, ga?, gb?, a1?, b1?);
        let (lr, s) = (self.lr, self.scaling);
        let layouts = || {
            let [a0, b0, ga, gb, a1, b1] = [&a0, &b0, &ga, &gb, &a1, &b1].map(FactorRows::to_dense);
            let g = LowRank::from_terms(&g_tilde(&a0, &b0, &ga, &gb, lr, s)?);
            let d = LowRank::from_terms(&d_theta(&a0, &b0, &a1, &b1, s)?);
            Ok((g, d))
        };
        // A strided ω is updated through a contiguous copy, then written back.
        let contiguous = self.omega.is_contiguous();
        let mut target = if contiguous {
            self.omega.shallow_clone()
        } else {
            self.omega.f_contiguous()?
        };
        // SAFETY: contiguous CPU tensor of dtype S (checked in `new`), exclusively ours here.
        let omega = unsafe { slice_mut::<S>(&target) };
        let size = self.omega.size();
        let (rows, cols) = (size[0] as usize, size[1] as usize);
        update_rows(omega, rows, cols, layouts, self.clamp_negative)?;
        if !contiguous {
            let mut dst = self.omega.shallow_clone();
            dst.f_copy_(&target)?;
            target = dst;
        }
        drop(target);
        Ok(())
    }

    fn run_tch(&self) -> Result<()> {
        let kind = math_kind(self.maths_in_f64());
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_kind(kind)?) };
        let (a0, b0, ga, gb) = (
            c(&self.a_prev)?,
            c(&self.b_prev)?,
            c(&self.grad_a)?,
            c(&self.grad_b)?,
        );
        let (a1, b1) = (c(&self.a_next)?, c(&self.b_next)?);
        let (gl, gr) = assemble(&g_tilde(&a0, &b0, &ga, &gb, self.lr, self.scaling)?)?;
        let (dl, dr) = assemble(&d_theta(&a0, &b0, &a1, &b1, self.scaling)?)?;
        // ω += (−g~)·dθ: two rank-2r GEMMs and one in-place addcmul.
        let neg_g = gl.f_neg()?.f_mm(&gr)?;
        let d = dl.f_mm(&dr)?;
        let mut omega = self.omega.shallow_clone();
        if omega.f_kind()? == kind {
            let _ = omega.f_addcmul_(&neg_g, &d)?;
        } else {
            let updated = omega.f_to_kind(kind)?.f_addcmul(&neg_g, &d)?;
            omega.f_copy_(&updated)?;
        }
        if self.clamp_negative {
            let _ = omega.f_clamp_min_(0.0)?;
        }
        Ok(())
    }
}
