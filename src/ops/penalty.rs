//! The importance penalty (Eq. 14, 16): P = Σ Ω ⊙ D², D = s·B·A − s_ref·B_ref·A_ref, with its
//! analytic gradients ∂P/∂B = 2s·(Ω⊙D)·Aᵀ and ∂P/∂A = 2s·Bᵀ·(Ω⊙D), in one pass over Ω.

use crate::cancellation::Sums;
use crate::cpu::lowrank::LowRank;
use crate::cpu::penalty::{penalty_rows, GradOut};
use crate::cuda::PenaltyManyOut;
use crate::dispatch::{path_for, Path};
use crate::error::{Error, Result};
use crate::forms::{assemble, Converted};
use crate::scalar::{in_kind, math_kind, Real, Storage, TINY_MATRIX};
use crate::view::{check_factor_set, dense, finite, slice, slice_mut, Arg, STORED_OMEGA_KINDS};
use half::{bf16, f16};
use tch::{Kind, Tensor};

pub struct PenaltyJob {
    omega: Tensor,
    a: Tensor,
    b: Tensor,
    reference: Option<(Tensor, Tensor)>,
    scaling: f64,
    scaling_ref: f64,
    f64_math: bool,
    /// The tch path sums the value from D formed in float64 (see [`exact_on_device`]).
    exact_value: bool,
}

/// P as a 0-d tensor and, when asked for, (∂P/∂A, ∂P/∂B) in compute precision.
pub struct PenaltyOut {
    pub value: Tensor,
    pub grads: Option<(Tensor, Tensor)>,
    /// The fused CPU kernel's sums behind `value`, times the weight, before rounding; the
    /// magnitude is 0 once summed with float64 maths (its rounding negligible here). None on
    /// the tch path.
    pub summed: Option<Sums>,
}

/// The CUDA kernels' results for `jobs` in each job's result dtype (a tiny matrix ran its
/// maths in float64): the total in float64 if any job's results are, each pair of gradients
/// in its own job's.
pub fn from_cuda(jobs: &[(PenaltyJob, f64)], out: PenaltyManyOut) -> Result<PenaltyManyOut> {
    let kinds: Vec<Kind> = jobs.iter().map(|(job, _)| job.result_kind()).collect();
    let total_kind = math_kind(kinds.contains(&Kind::Double));
    let grads = match out.grads {
        Some(grads) => Some(
            grads
                .into_iter()
                .zip(&kinds)
                .map(|((ga, gb), &kind)| Ok((in_kind(ga, kind)?, in_kind(gb, kind)?)))
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    Ok(PenaltyManyOut {
        total: in_kind(out.total, total_kind)?,
        grads,
    })
}

/// Σ_l w_l·P_l over `jobs` (each with its weight) and their `outs`, as a 0-d tensor. From the
/// fused CPU kernels' sums: added in float64 and rounded once, with float64 maths where the
/// matrices' values cancel (negative Ω or weights). The tch path's are added in float64.
pub fn total(jobs: &[(PenaltyJob, f64)], outs: &[PenaltyOut]) -> Result<Tensor> {
    if outs.is_empty() {
        return Err(Error::value("Omega must hold at least one matrix"));
    }
    let kind = math_kind(
        jobs.iter()
            .any(|(job, _)| job.result_kind() == Kind::Double),
    );
    let summed: Option<Vec<Sums>> = outs.iter().map(|o| o.summed).collect();
    let Some(mut summed) = summed else {
        // The tch path: values on the device, in float64 where they may cancel.
        let first = outs[0].value.f_to_kind(Kind::Double)?;
        let total = outs[1..]
            .iter()
            .try_fold(first, |t, o| Ok::<_, Error>(t.f_add(&o.value)?))?;
        return Ok(total.f_to_kind(kind)?);
    };
    let sum = |s: &[Sums]| {
        s.iter().fold(Sums::default(), |mut acc, &x| {
            acc.add(x);
            acc
        })
    };
    if sum(&summed).cancelled() {
        for (s, (job, weight)) in summed.iter_mut().zip(jobs) {
            if s.magnitude > 0.0 {
                *s = Sums {
                    p: job.resum_f64(*weight)?,
                    magnitude: 0.0,
                };
            }
        }
    }
    Ok(Tensor::f_scalar_tensor(
        sum(&summed).p,
        (kind, tch::Device::Cpu),
    )?)
}

impl PenaltyJob {
    pub fn new(
        omega: &Arg,
        a: &Arg,
        b: &Arg,
        reference: Option<(&Arg, &Arg)>,
        scaling: f64,
        scaling_ref: Option<f64>,
    ) -> Result<Self> {
        let f64_math = check_factor_set(omega, STORED_OMEGA_KINDS, a, b, reference)?;
        let scaling = finite(scaling, "scaling")?;
        let scaling_ref = finite(scaling_ref.unwrap_or(scaling), "scaling_ref")?;
        Ok(PenaltyJob {
            omega: omega.share(),
            a: a.share(),
            b: b.share(),
            reference: reference.map(|(a0, b0)| (a0.share(), b0.share())),
            scaling,
            scaling_ref,
            f64_math,
            exact_value: false,
        })
    }

    pub fn device(&self) -> tch::Device {
        self.omega.device()
    }

    /// The same term, weighted by `weight`, for the fused CUDA kernels.
    pub fn cuda_mat(&self, weight: f64) -> crate::cuda::PenaltyMat<'_> {
        crate::cuda::PenaltyMat {
            omega: &self.omega,
            a: &self.a,
            b: &self.b,
            reference: self.reference.as_ref().map(|(a0, b0)| (a0, b0)),
            scaling: self.scaling,
            scaling_ref: self.scaling_ref,
            weight,
            f64_math: self.maths_in_f64(),
        }
    }

    /// `weight` multiplies the value and the gradients (the layer coefficient times φ). The
    /// gradients come in [`Self::result_kind`]; the value in the precision it was summed in
    /// (float64 where the maths needed it), for the caller to round once.
    pub fn run(&self, weight: f64, grads: bool) -> Result<PenaltyOut> {
        let out = tch::no_grad(|| match path_for(self.omega.device()) {
            Path::Tch => self.run_tch(weight, grads),
            Path::Fused => match (self.omega.f_kind()?, self.maths_in_f64()) {
                (Kind::Double, _) => self.run_fused::<f64, f64>(weight, grads),
                (Kind::Float, true) => self.run_fused::<f32, f64>(weight, grads),
                (Kind::Float, false) => self.run_fused::<f32, f32>(weight, grads),
                (Kind::BFloat16, true) => self.run_fused::<bf16, f64>(weight, grads),
                (Kind::BFloat16, false) => self.run_fused::<bf16, f32>(weight, grads),
                (_, true) => self.run_fused::<f16, f64>(weight, grads),
                (_, false) => self.run_fused::<f16, f32>(weight, grads),
            },
        })?;
        let kind = self.result_kind();
        Ok(PenaltyOut {
            grads: match out.grads {
                Some((ga, gb)) => Some((in_kind(ga, kind)?, in_kind(gb, kind)?)),
                None => None,
            },
            ..out
        })
    }

    /// The dtype of the value and gradients: float64 with float64 inputs, else float32.
    pub fn result_kind(&self) -> Kind {
        math_kind(self.f64_math)
    }

    /// Whether the maths runs in float64: float64 inputs, or a matrix of a few elements
    /// (`TINY_MATRIX`: here one element's D, whose terms can cancel).
    fn maths_in_f64(&self) -> bool {
        self.f64_math || self.omega.numel() <= TINY_MATRIX
    }

    fn run_fused<S: Storage, T: Real>(&self, weight: f64, grads: bool) -> Result<PenaltyOut> {
        // The kernel writes the gradients, scaled, straight into the tensors it returns (no
        // staging buffers, scaled copies and tensors copied from them).
        let grads = if grads {
            let out = |like: &Tensor| Tensor::f_empty(like.size(), (T::KIND, tch::Device::Cpu));
            Some((out(&self.a)?, out(&self.b)?))
        } else {
            None
        };
        let mut sums = self.sums::<S, T>(grads.as_ref(), 2.0 * self.scaling * weight)?;
        if T::KIND == Kind::Double {
            sums.magnitude = 0.0;
        } else if sums.cancelled() {
            sums = self.sums::<S, f64>(None, 0.0)?;
            sums.magnitude = 0.0;
        }
        let summed = Sums {
            p: sums.p * weight,
            magnitude: sums.magnitude * weight.abs(),
        };
        // One dispatcher op (0-d, rounded to T as `from_f64_lossy` would).
        let value = Tensor::f_scalar_tensor(summed.p, (T::KIND, tch::Device::Cpu))?;
        Ok(PenaltyOut {
            value,
            grads,
            summed: Some(summed),
        })
    }

    /// P's sums from the fused kernel with maths in `T`; with `grads`, ∂P/∂A and ∂P/∂B times
    /// `grad_scale` are written into those (fresh, contiguous, dtype T) tensors.
    fn sums<S: Storage, T: Real>(
        &self,
        grads: Option<&(Tensor, Tensor)>,
        grad_scale: f64,
    ) -> Result<Sums> {
        let anchor = self
            .reference
            .as_ref()
            .map(|(a0, b0)| (a0, b0, self.scaling_ref));
        let factors = Converted::new(&self.a, &self.b, anchor, dense::<T>)?;
        let s = self.scaling;
        let d = || Ok(LowRank::from_terms(&factors.delta(s)?));
        let (a, b) = (&factors.a, &factors.b);
        let omega = self.omega.f_contiguous()?;
        // SAFETY: contiguous CPU tensor of dtype S, only read.
        let om = unsafe { slice::<S>(&omega) };
        match grads {
            Some((ga, gb)) => {
                let scale = T::from_f64_lossy(grad_scale);
                // SAFETY: fresh contiguous CPU tensors of dtype T, referenced nowhere else.
                let (ga, gb) = unsafe { (slice_mut::<T>(ga), slice_mut::<T>(gb)) };
                penalty_rows(om, d, a, b, Some(GradOut { ga, gb, scale }))
            }
            None => penalty_rows(om, d, a, b, None),
        }
    }

    /// P·weight summed again with float64 maths (value only): for a sum over several matrices
    /// whose values cancel across them.
    fn resum_f64(&self, weight: f64) -> Result<f64> {
        let sums = match self.omega.f_kind()? {
            Kind::Double => self.sums::<f64, f64>(None, 0.0)?,
            Kind::Float => self.sums::<f32, f64>(None, 0.0)?,
            Kind::BFloat16 => self.sums::<bf16, f64>(None, 0.0)?,
            _ => self.sums::<f16, f64>(None, 0.0)?,
        };
        Ok(sums.p * weight)
    }

    /// D in `kind` on the tensors' device, with the factors it was formed from.
    fn delta_tch(&self, kind: Kind) -> Result<(Tensor, Converted<Tensor>)> {
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_kind(kind)?) };
        let anchor = self
            .reference
            .as_ref()
            .map(|(a0, b0)| (a0, b0, self.scaling_ref));
        let factors = Converted::new(&self.a, &self.b, anchor, c)?;
        let (l, r) = assemble(&factors.delta(self.scaling)?)?;
        Ok((l.f_mm(&r)?, factors))
    }

    fn run_tch(&self, weight: f64, grads: bool) -> Result<PenaltyOut> {
        let kind = math_kind(self.maths_in_f64());
        let (d, factors) = self.delta_tch(kind)?;
        let exact = self.exact_value && kind != Kind::Double;
        // G = Ω ⊙ D, for the gradients and (unless the value needs float64 D) the value.
        let g = if grads || !exact {
            Some(self.omega.f_to_kind(kind)?.f_mul(&d)?)
        } else {
            None
        };
        let value = match &g {
            Some(g) if !exact => g.f_mul(&d)?.f_sum(kind)?,
            // The terms can cancel: float32 D would err relative to Σ|Ω|·D², not to P.
            _ => {
                let (d64, _) = self.delta_tch(Kind::Double)?;
                let omega = self.omega.f_to_kind(Kind::Double)?;
                omega.f_mul(&d64.f_square()?)?.f_sum(Kind::Double)?
            }
        };
        let value = value.f_mul_scalar(weight)?;
        let grads = if let Some(g) = g.filter(|_| grads) {
            let s2 = 2.0 * self.scaling * weight;
            let grad_b = g.f_mm(&factors.a.f_tr()?)?.f_mul_scalar(s2)?;
            let grad_a = factors.b.f_tr()?.f_mm(&g)?.f_mul_scalar(s2)?;
            Some((grad_a, grad_b))
        } else {
            None
        };
        Ok(PenaltyOut {
            value,
            grads,
            summed: None,
        })
    }
}

/// Decides, for jobs on the tch path, whether their values are summed from D in float64: when
/// some Ω has a negative entry (its terms can cancel, which float32 D cannot afford, and its
/// value can be negative, cancelling against the other matrices') or `weights_mixed` (weights
/// of both signs). The fused kernels find this out while they run, the CUDA kernels per block
/// and in the kernel adding up the blocks; here the Ω are scanned first, one transfer for all.
pub fn exact_on_device<'a>(
    jobs: impl IntoIterator<Item = &'a mut PenaltyJob>,
    weights_mixed: bool,
) -> Result<()> {
    let on_tch: Vec<&mut PenaltyJob> = jobs
        .into_iter()
        // (A meta tensor, for shape inference, has no values to scan: no data pointer.)
        .filter(|job| {
            path_for(job.device()) == Path::Tch
                && job.omega.numel() > 0
                && !job.omega.data_ptr().is_null()
        })
        .collect();
    if on_tch.is_empty() {
        return Ok(());
    }
    let exact = weights_mixed || {
        let minima = on_tch
            .iter()
            .map(|job| Ok(job.omega.f_min()?.f_to_kind(Kind::Double)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::f_stack(&minima, 0)?.f_min()?.f_double_value(&[])? < 0.0
    };
    for job in on_tch {
        job.exact_value = exact;
    }
    Ok(())
}
