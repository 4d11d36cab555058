//! The importance penalty (Eq. 14, 16): P = Σ Ω ⊙ D², D = s·B·A − s_ref·B_ref·A_ref, with its
//! analytic gradients ∂P/∂B = 2s·(Ω⊙D)·Aᵀ and ∂P/∂A = 2s·Bᵀ·(Ω⊙D), in one pass over Ω.

use crate::cancellation::Sums;
use crate::cpu::lowrank::LowRank;
use crate::cpu::penalty::{penalty_rows, GradOut};
use crate::cpu::read::dense;
use crate::dispatch::{self, Route};
use crate::error::{Error, Result};
use crate::forms::Converted;
use crate::providers::{self, check_factor_set, finite, Arg, Made, Provider};
use crate::scalar::{Real, Storage, TINY_MATRIX};
use crate::tensor::{expect_cpu, math_dtype, DType, Device, TensorRef, STORED_OMEGA_DTYPES};
use half::{bf16, f16};
use pyo3::prelude::*;

/// One penalty term, validated, its tensors as views (safe to run without the GIL while the
/// arguments they came from stay alive).
pub struct PenaltyJob {
    omega: TensorRef,
    a: TensorRef,
    b: TensorRef,
    reference: Option<(TensorRef, TensorRef)>,
    pub scaling: f64,
    pub scaling_ref: f64,
    f64_math: bool,
}

/// The arguments of one term (Ω, A, B and the optional reference pair).
pub struct PenaltyArgs<'a, 'py> {
    pub omega: &'a Arg<'py>,
    pub a: &'a Arg<'py>,
    pub b: &'a Arg<'py>,
    pub reference: Option<(&'a Arg<'py>, &'a Arg<'py>)>,
}

/// Σ_l w_l·P_l from the fused CPU kernels' sums (each times its weight): added in float64, with
/// float64 maths again for the terms that cancel when the matrices' values cancel each other
/// (negative Ω or weights).
pub fn total_cpu(jobs: &[(PenaltyJob, f64)], mut summed: Vec<Sums>) -> Result<f64> {
    if summed.is_empty() {
        return Err(Error::value("Omega must hold at least one matrix"));
    }
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
    Ok(sum(&summed).p)
}

/// The dtype of a sum over jobs: float64 if any job's results are.
pub fn total_dtype(jobs: &[(PenaltyJob, f64)]) -> DType {
    math_dtype(jobs.iter().any(|(job, _)| job.result_dtype() == DType::F64))
}

impl PenaltyJob {
    pub fn new(args: &PenaltyArgs, scaling: f64, scaling_ref: Option<f64>) -> Result<Self> {
        let f64_math = check_factor_set(
            args.omega,
            STORED_OMEGA_DTYPES,
            args.a,
            args.b,
            args.reference,
        )?;
        let scaling = finite(scaling, "scaling")?;
        let scaling_ref = finite(scaling_ref.unwrap_or(scaling), "scaling_ref")?;
        Ok(PenaltyJob {
            omega: args.omega.view.clone(),
            a: args.a.view.clone(),
            b: args.b.view.clone(),
            reference: args
                .reference
                .map(|(a0, b0)| (a0.view.clone(), b0.view.clone())),
            scaling,
            scaling_ref,
            f64_math,
        })
    }

    pub fn device(&self) -> Device {
        self.omega.device
    }

    /// The same term, weighted by `weight`, for the fused CUDA kernels, on its arguments.
    pub fn cuda_mat<'a, 'py>(
        &self,
        args: &PenaltyArgs<'a, 'py>,
        weight: f64,
    ) -> crate::cuda::PenaltyMat<'a, 'py> {
        crate::cuda::PenaltyMat {
            omega: args.omega,
            a: args.a,
            b: args.b,
            reference: args.reference,
            scaling: self.scaling,
            scaling_ref: self.scaling_ref,
            weight,
            f64_math: self.maths_in_f64(),
            result: self.result_dtype(),
        }
    }

    /// The dtype of the value and gradients: float64 with float64 inputs, else float32.
    pub fn result_dtype(&self) -> DType {
        math_dtype(self.f64_math)
    }

    /// Whether the maths runs in float64: float64 inputs, or a matrix of a few elements
    /// (`TINY_MATRIX`: here one element's D, whose terms can cancel).
    pub fn maths_in_f64(&self) -> bool {
        self.f64_math || self.omega.numel() <= TINY_MATRIX
    }

    /// The fused CPU kernel. `weight` multiplies the value and the gradients (the layer
    /// coefficient times φ); with `grads`, (∂P/∂A, ∂P/∂B) are written into those fresh contiguous
    /// CPU tensors of [`Self::result_dtype`]. Returns P's sums times the weight, in the precision
    /// they were summed in (float64 where the maths needed it), for the caller to round once.
    pub fn run_cpu(&self, weight: f64, grads: Option<(&TensorRef, &TensorRef)>) -> Result<Sums> {
        match (self.omega.dtype, self.maths_in_f64()) {
            (DType::F64, _) => self.run_fused::<f64, f64>(weight, grads),
            (DType::F32, true) => self.run_fused::<f32, f64>(weight, grads),
            (DType::F32, false) => self.run_fused::<f32, f32>(weight, grads),
            (DType::BF16, true) => self.run_fused::<bf16, f64>(weight, grads),
            (DType::BF16, false) => self.run_fused::<bf16, f32>(weight, grads),
            (_, true) => self.run_fused::<f16, f64>(weight, grads),
            (_, false) => self.run_fused::<f16, f32>(weight, grads),
        }
    }

    fn run_fused<S: Storage, T: Real>(
        &self,
        weight: f64,
        grads: Option<(&TensorRef, &TensorRef)>,
    ) -> Result<Sums> {
        let scale = 2.0 * self.scaling * weight;
        let mut sums = match grads {
            None => self.sums::<S, T>(None, scale)?,
            Some((ga, gb)) if ga.dtype == T::DTYPE => {
                // The kernel writes the gradients, scaled, straight into the tensors returned.
                expect_cpu(ga, T::DTYPE)?;
                expect_cpu(gb, T::DTYPE)?;
                // SAFETY: fresh contiguous CPU tensors of dtype T, referenced nowhere else.
                let (ga, gb) = unsafe { (ga.slice_mut::<T>(), gb.slice_mut::<T>()) };
                self.sums::<S, T>(Some((ga, gb)), scale)?
            }
            Some((ga, gb)) => {
                // A tiny matrix (float64 maths) with float32 results: through a float64 copy.
                let (mut ga64, mut gb64) =
                    (vec![T::zero(); ga.numel()], vec![T::zero(); gb.numel()]);
                let sums = self.sums::<S, T>(Some((&mut ga64, &mut gb64)), scale)?;
                for (out, values) in [(ga, &ga64), (gb, &gb64)] {
                    expect_cpu(out, DType::F32)?;
                    // SAFETY: a fresh contiguous CPU float32 tensor, referenced nowhere else.
                    let dst = unsafe { out.slice_mut::<f32>() };
                    for (d, &v) in dst.iter_mut().zip(values.iter()) {
                        *d = v.to_f32();
                    }
                }
                sums
            }
        };
        if T::DTYPE == DType::F64 {
            sums.magnitude = 0.0;
        } else if sums.cancelled() {
            sums = self.sums::<S, f64>(None, 0.0)?;
            sums.magnitude = 0.0;
        }
        Ok(Sums {
            p: sums.p * weight,
            magnitude: sums.magnitude * weight.abs(),
        })
    }

    /// P's sums from the fused kernel with maths in `T`; with `grads`, ∂P/∂A and ∂P/∂B times
    /// `grad_scale` are written into those (row-major) slices.
    fn sums<S: Storage, T: Real>(
        &self,
        grads: Option<(&mut [T], &mut [T])>,
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
        expect_cpu(&self.omega, S::DTYPE)?;
        let gathered;
        let om: &[S] = if self.omega.is_contiguous() {
            // SAFETY: a contiguous CPU matrix of dtype S (checked), only read.
            unsafe { self.omega.slice::<S>() }
        } else {
            // SAFETY: a CPU matrix of dtype S (checked), kept alive by its argument.
            gathered = unsafe { self.omega.gather::<S>() };
            &gathered
        };
        match grads {
            Some((ga, gb)) => {
                let scale = T::from_f64_lossy(grad_scale);
                penalty_rows(om, d, a, b, Some(GradOut { ga, gb, scale }))
            }
            None => penalty_rows(om, d, a, b, None),
        }
    }

    /// P·weight summed again with float64 maths (value only): for a sum over several matrices
    /// whose values cancel across them.
    fn resum_f64(&self, weight: f64) -> Result<f64> {
        let sums = match self.omega.dtype {
            DType::F64 => self.sums::<f64, f64>(None, 0.0)?,
            DType::F32 => self.sums::<f32, f64>(None, 0.0)?,
            DType::BF16 => self.sums::<bf16, f64>(None, 0.0)?,
            _ => self.sums::<f16, f64>(None, 0.0)?,
        };
        Ok(sums.p * weight)
    }
}

/// The result of a call: Σ_l w_l·P_l (0-d) and, when asked for, each term's (∂/∂A, ∂/∂B).
pub struct PenaltyResult {
    pub total: Made,
    pub grads: Vec<Option<(Made, Made)>>,
}

/// Σ_l w_l·P_l over one call's terms (each job with its weight), where `dispatch` sends them.
pub fn run(
    py: Python<'_>,
    args: &[PenaltyArgs],
    jobs: Vec<(PenaltyJob, f64)>,
    grads: bool,
) -> PyResult<PenaltyResult> {
    let p = providers::active();
    let device = super::one_device(
        jobs.iter()
            .zip(args)
            .map(|((j, _), a)| (j.device(), a.omega.name.as_str())),
    )?;
    let total_dtype = total_dtype(&jobs);
    // Meta results are made by torch through Python whatever the provider (tch has no meta device).
    let maker = |device: Device| -> &dyn Provider {
        if device == Device::Meta {
            &providers::view::VIEW
        } else {
            p
        }
    };
    let outputs = |device: Device| -> Result<Vec<Option<(Made, Made)>>> {
        let p = maker(device);
        if !grads {
            return Ok(jobs.iter().map(|_| None).collect());
        }
        // Per result dtype (one, unless float64 and float32 factors mix), ∂/∂A then ∂/∂B of each.
        let mut out: Vec<Option<(Made, Made)>> = jobs.iter().map(|_| None).collect();
        for dtype in [DType::F32, DType::F64] {
            let idx: Vec<usize> = (0..jobs.len())
                .filter(|&i| jobs[i].0.result_dtype() == dtype)
                .collect();
            let templates: Vec<&Arg> = idx.iter().flat_map(|&i| [args[i].a, args[i].b]).collect();
            let mut made = p
                .empty_like_each(py, &templates, dtype, device)?
                .into_iter();
            for &i in &idx {
                if let (Some(ga), Some(gb)) = (made.next(), made.next()) {
                    out[i] = Some((ga, gb));
                }
            }
        }
        Ok(out)
    };
    match dispatch::route(py, device)? {
        Route::Cpu => {
            let grads = outputs(Device::Cpu)?;
            let views: Vec<Option<(TensorRef, TensorRef)>> = grads
                .iter()
                .map(|g| g.as_ref().map(|(a, b)| (a.view.clone(), b.view.clone())))
                .collect();
            let total = py.allow_threads(move || -> Result<f64> {
                let summed = jobs
                    .iter()
                    .zip(&views)
                    .map(|((job, w), g)| job.run_cpu(*w, g.as_ref().map(|(a, b)| (a, b))))
                    .collect::<Result<Vec<_>>>()?;
                total_cpu(&jobs, summed)
            })?;
            Ok(PenaltyResult {
                total: p.tensor_of_f64s(py, &[total], &[], total_dtype, Device::Cpu)?,
                grads,
            })
        }
        Route::Cuda(k, stream) => {
            let mats: Vec<_> = jobs
                .iter()
                .zip(args)
                .map(|((j, w), a)| j.cuda_mat(a, *w))
                .collect();
            let out = crate::cuda::penalty_many(py, p, &k, stream, &mats, grads)?;
            let grads = match out.grads {
                Some(g) => g.into_iter().map(Some).collect(),
                None => jobs.iter().map(|_| None).collect(),
            };
            Ok(PenaltyResult {
                total: out.total,
                grads,
            })
        }
        #[cfg(feature = "tch")]
        Route::Tch => {
            use crate::tch_path::{exact_values, PenaltyTch};
            let mut terms = jobs
                .iter()
                .zip(args)
                .map(|((j, _), a)| {
                    PenaltyTch::new(
                        a.omega,
                        a.a,
                        a.b,
                        a.reference,
                        (j.scaling, j.scaling_ref),
                        j.maths_in_f64(),
                        j.result_dtype(),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let weights: Vec<f64> = jobs.iter().map(|(_, w)| *w).collect();
            exact_values(&mut terms, crate::cancellation::mixed_signs(&weights))?;
            let outs = py.allow_threads(move || {
                terms
                    .iter()
                    .zip(&weights)
                    .map(|(t, &w)| t.run(w, grads))
                    .collect::<Result<Vec<_>>>()
            })?;
            let mut values = Vec::with_capacity(outs.len());
            let mut grads = Vec::with_capacity(outs.len());
            for out in outs {
                values.push(out.value);
                grads.push(match out.grads {
                    Some((ga, gb)) => Some((
                        crate::providers::tch::made(ga)?,
                        crate::providers::tch::made(gb)?,
                    )),
                    None => None,
                });
            }
            Ok(PenaltyResult {
                total: crate::tch_path::total(values, total_dtype)?,
                grads,
            })
        }
        Route::Meta => Ok(PenaltyResult {
            total: maker(Device::Meta).empty(py, &[], total_dtype, Device::Meta)?,
            grads: outputs(Device::Meta)?,
        }),
    }
}
