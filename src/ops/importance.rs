//! Ω finalization (Eq. 13) and the layer coefficients (Eq. 15).

use crate::cpu::importance::finalize_rows;
use crate::cpu::lowrank::LowRank;
use crate::dispatch::{path_for, Path};
use crate::error::{Error, Result};
use crate::forms::{assemble, Converted};
use crate::scalar::Real;
use crate::view::{check_factor_set, dense, finite, slice, slice_mut, Arg, OMEGA_KINDS};
use tch::{Kind, Tensor};

/// Ω = ω / (Δ² + ξ), Δ = s·B·A − s·B_start·A_start (or s·B·A for a fresh adapter).
///
/// Δ is formed in float64 whatever the factors: Ω magnifies Δ's rounding where Δ² ≲ ξ, and
/// with a small ξ (the authors' code uses 1e-9) those entries dominate ‖Ω‖ — Δ summed in
/// float32 erred there by ~3e-4 of it. Rounded to ω's precision, Δ is then as good as exact,
/// and the division runs in that precision (the CPU kernels; the tch and CUDA paths divide in
/// float64). Finalization runs once per general task, so the float64 lanes cost little.
pub struct FinalizeJob {
    omega: Tensor,
    a: Tensor,
    b: Tensor,
    start: Option<(Tensor, Tensor)>,
    scaling: f64,
    xi: f64,
    clamp_negative: bool,
}

impl FinalizeJob {
    pub fn new(
        omega: &Arg,
        a: &Arg,
        b: &Arg,
        start: Option<(&Arg, &Arg)>,
        scaling: f64,
        xi: f64,
        clamp_negative: bool,
    ) -> Result<Self> {
        check_factor_set(omega, OMEGA_KINDS, a, b, start)?;
        let xi = finite(xi, "xi")?;
        if xi <= 0.0 {
            return Err(Error::value(format!(
                "xi must be a positive number, got {xi}"
            )));
        }
        Ok(FinalizeJob {
            omega: omega.share(),
            a: a.share(),
            b: b.share(),
            start: start.map(|(a0, b0)| (a0.share(), b0.share())),
            scaling: finite(scaling, "scaling")?,
            xi,
            clamp_negative,
        })
    }

    pub fn device(&self) -> tch::Device {
        self.omega.device()
    }

    /// The same finalization for the fused CUDA kernels.
    pub fn cuda_mat(&self) -> crate::cuda::FinalizeMat<'_> {
        crate::cuda::FinalizeMat {
            omega: &self.omega,
            a: &self.a,
            b: &self.b,
            start: self.start.as_ref().map(|(a0, b0)| (a0, b0)),
            scaling: self.scaling,
            xi: self.xi,
            f64_math: true,
        }
    }

    pub fn run(&self) -> Result<Tensor> {
        tch::no_grad(|| match path_for(self.omega.device()) {
            Path::Tch => self.run_tch(),
            Path::Fused => match self.omega.f_kind()? {
                Kind::Double => self.run_fused::<f64>(),
                _ => self.run_fused::<f32>(),
            },
        })
    }

    /// Δ in float64; the division in ω's own precision `S` (Δ is then exact to its rounding).
    fn run_fused<S: Real>(&self) -> Result<Tensor> {
        let anchor = self.start.as_ref().map(|(a0, b0)| (a0, b0, self.scaling));
        let factors = Converted::new(&self.a, &self.b, anchor, dense::<f64>)?;
        let delta = LowRank::from_terms(&factors.delta(self.scaling)?);
        let omega = self.omega.f_contiguous()?;
        let out = Tensor::f_empty(omega.size(), (omega.f_kind()?, omega.device()))?;
        // SAFETY: both contiguous CPU tensors of dtype S; `out` is fresh and unshared.
        let (src, dst) = unsafe { (slice::<S>(&omega), slice_mut::<S>(&out)) };
        let (xi, clamp) = (S::from_f64_lossy(self.xi), self.clamp_negative);
        finalize_rows(src, dst, &delta, xi, clamp)?;
        Ok(out)
    }

    fn run_tch(&self) -> Result<Tensor> {
        let kind = Kind::Double;
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_kind(kind)?) };
        let anchor = self.start.as_ref().map(|(a0, b0)| (a0, b0, self.scaling));
        let factors = Converted::new(&self.a, &self.b, anchor, c)?;
        let (l, r) = assemble(&factors.delta(self.scaling)?)?;
        let d = l.f_mm(&r)?;
        let denom = d.f_square()?.f_add_scalar(self.xi)?;
        let mut omega = self.omega.f_detach()?.f_to_kind(kind)?.f_div(&denom)?;
        if self.clamp_negative {
            omega = omega.f_clamp_min(0.0)?;
        }
        Ok(omega.f_to_kind(self.omega.f_kind()?)?.f_contiguous()?)
    }
}

/// c_l = softmax(‖Ω_l‖ / T) or 1/L. Tiny; torch's softmax is already max-shifted (stable).
pub fn layer_coefficients(norms: &Arg, mode: &str, temperature: f64) -> Result<Tensor> {
    let kind = norms.kind(&[Kind::Double, Kind::Float, Kind::BFloat16, Kind::Half])?;
    let size = norms.tensor.size();
    if size.len() != 1 || size[0] == 0 {
        return Err(Error::value(format!(
            "{} must be a non-empty 1-D tensor of per-matrix norms, got shape {:?}",
            norms.name, size
        )));
    }
    tch::no_grad(|| {
        let x = norms.tensor.f_detach()?.f_to_kind(Kind::Double)?;
        let finite_count = x.f_isfinite()?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        if finite_count != size[0] {
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
                x.f_div_scalar(t)?.f_softmax(0, Kind::Double)?
            }
            "uniform" => x.f_ones_like()?.f_div_scalar(size[0] as f64)?,
            other => {
                return Err(Error::value(format!(
                    "mode must be \"softmax\" or \"uniform\", got {other:?}"
                )))
            }
        };
        let out_kind = if kind == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        Ok(out.f_to_kind(out_kind)?)
    })
}
