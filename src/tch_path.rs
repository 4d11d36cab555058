//! The tch path (tch provider only): the three op families as libtorch calls on the tensors'
//! device — rank-2r GEMMs built from the same cancellation-free forms (`crate::forms`), in-place
//! updates. It runs CUDA tensors when the fused CUDA kernels cannot load (no driver, no NVRTC),
//! and CPU tensors in tests (`set_cpu_path("tch")`), so it is checked without a GPU.

use crate::error::{Error, Result};
use crate::forms::{assemble, d_theta, g_tilde, Converted, Factor};
use crate::providers::tch::{kind, made, Tch};
use crate::providers::{Arg, Made};
use crate::tensor::{math_dtype, DType};
use tch::{Kind, Tensor};

impl Factor for Tensor {
    fn hcat(&self, other: &Self) -> Result<Self> {
        Ok(Tensor::f_cat(&[self, other], 1)?)
    }
    fn vcat(&self, other: &Self) -> Result<Self> {
        Ok(Tensor::f_cat(&[self, other], 0)?)
    }
    fn sub_scaled(&self, other: &Self, c: f64) -> Result<Self> {
        Ok(self.f_sub(&other.f_mul_scalar(c)?)?)
    }
    fn scaled_difference(&self, c: f64, other: &Self, d: f64) -> Result<Self> {
        let (x, y) = (
            self.f_to_kind(Kind::Double)?,
            other.f_to_kind(Kind::Double)?,
        );
        let diff = x
            .f_sub(&y)?
            .f_mul_scalar(c)?
            .f_add(&y.f_mul_scalar(c - d)?)?;
        Ok(diff.f_to_kind(self.f_kind()?)?)
    }
    fn scale(&self, c: f64) -> Result<Self> {
        Ok(self.f_mul_scalar(c)?)
    }
}

fn tensors<const N: usize>(args: [&Arg; N]) -> Result<[Tensor; N]> {
    let mut out = Vec::with_capacity(N);
    for a in args {
        out.push(Tch::tensor_of(a)?);
    }
    out.try_into()
        .map_err(|_| Error::value("internal: tensor count"))
}

/// One ω update on the tch path (tensors shared with the caller; safe to run without the GIL).
pub struct OmegaTch {
    omega: Tensor,
    factors: [Tensor; 6],
    lr: f64,
    scaling: f64,
    clamp: bool,
    f64_math: bool,
}

impl OmegaTch {
    pub fn new(
        omega: &Arg,
        factors: [&Arg; 6],
        lr: f64,
        scaling: f64,
        clamp: bool,
        f64_math: bool,
    ) -> Result<Self> {
        Ok(OmegaTch {
            omega: Tch::tensor_of(omega)?,
            factors: tensors(factors)?,
            lr,
            scaling,
            clamp,
            f64_math,
        })
    }

    pub fn run(&self) -> Result<()> {
        tch::no_grad(|| {
            let kind = kind(math_dtype(self.f64_math))?;
            let c = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_kind(kind)?) };
            let [a0, b0, ga, gb, a1, b1] = &self.factors;
            let (a0, b0, ga, gb, a1, b1) = (c(a0)?, c(b0)?, c(ga)?, c(gb)?, c(a1)?, c(b1)?);
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
            if self.clamp {
                let _ = omega.f_clamp_min_(0.0)?;
            }
            Ok(())
        })
    }
}

/// One finalization on the tch path: Ω = ω / (Δ² + ξ) with Δ and the division in float64.
pub struct FinalizeTch {
    omega: Tensor,
    a: Tensor,
    b: Tensor,
    start: Option<(Tensor, Tensor)>,
    scaling: f64,
    xi: f64,
    clamp: bool,
}

impl FinalizeTch {
    pub fn new(
        omega: &Arg,
        a: &Arg,
        b: &Arg,
        start: Option<(&Arg, &Arg)>,
        (scaling, xi, clamp): (f64, f64, bool),
    ) -> Result<Self> {
        Ok(FinalizeTch {
            omega: Tch::tensor_of(omega)?,
            a: Tch::tensor_of(a)?,
            b: Tch::tensor_of(b)?,
            start: match start {
                Some((a0, b0)) => Some((Tch::tensor_of(a0)?, Tch::tensor_of(b0)?)),
                None => None,
            },
            scaling,
            xi,
            clamp,
        })
    }

    pub fn run(&self) -> Result<Tensor> {
        tch::no_grad(|| {
            let c = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_kind(Kind::Double)?) };
            let anchor = self.start.as_ref().map(|(a0, b0)| (a0, b0, self.scaling));
            let factors = Converted::new(&self.a, &self.b, anchor, c)?;
            let (l, r) = assemble(&factors.delta(self.scaling)?)?;
            let d = l.f_mm(&r)?;
            let denom = d.f_square()?.f_add_scalar(self.xi)?;
            let mut omega = self
                .omega
                .f_detach()?
                .f_to_kind(Kind::Double)?
                .f_div(&denom)?;
            if self.clamp {
                omega = omega.f_clamp_min(0.0)?;
            }
            Ok(omega.f_to_kind(self.omega.f_kind()?)?.f_contiguous()?)
        })
    }

    /// ‖Ω‖² of a result (float64, on its device).
    pub fn squared_norm(omega: &Tensor) -> Result<Tensor> {
        Ok(omega
            .f_to_kind(Kind::Double)?
            .f_square()?
            .f_sum(Kind::Double)?)
    }
}

/// One penalty term on the tch path.
pub struct PenaltyTch {
    omega: Tensor,
    a: Tensor,
    b: Tensor,
    reference: Option<(Tensor, Tensor)>,
    scaling: f64,
    scaling_ref: f64,
    f64_math: bool,
    result: DType,
    /// Whether the value is summed from D formed in float64 (see [`exact_values`]).
    exact_value: bool,
}

/// The value (0-d, float64) and, when asked for, (∂P/∂A, ∂P/∂B) in the result dtype.
pub struct PenaltyTchOut {
    pub value: Tensor,
    pub grads: Option<(Tensor, Tensor)>,
}

impl PenaltyTch {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        omega: &Arg,
        a: &Arg,
        b: &Arg,
        reference: Option<(&Arg, &Arg)>,
        (scaling, scaling_ref): (f64, f64),
        f64_math: bool,
        result: DType,
    ) -> Result<Self> {
        Ok(PenaltyTch {
            omega: Tch::tensor_of(omega)?,
            a: Tch::tensor_of(a)?,
            b: Tch::tensor_of(b)?,
            reference: match reference {
                Some((a0, b0)) => Some((Tch::tensor_of(a0)?, Tch::tensor_of(b0)?)),
                None => None,
            },
            scaling,
            scaling_ref,
            f64_math,
            result,
            exact_value: false,
        })
    }

    /// D in `kind` on the tensors' device, with the factors it was formed from.
    fn delta(&self, kind: Kind) -> Result<(Tensor, Converted<Tensor>)> {
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_kind(kind)?) };
        let anchor = self
            .reference
            .as_ref()
            .map(|(a0, b0)| (a0, b0, self.scaling_ref));
        let factors = Converted::new(&self.a, &self.b, anchor, c)?;
        let (l, r) = assemble(&factors.delta(self.scaling)?)?;
        Ok((l.f_mm(&r)?, factors))
    }

    /// `weight` multiplies the value and the gradients.
    pub fn run(&self, weight: f64, grads: bool) -> Result<PenaltyTchOut> {
        tch::no_grad(|| {
            let kind = kind(math_dtype(self.f64_math))?;
            let (d, factors) = self.delta(kind)?;
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
                    let (d64, _) = self.delta(Kind::Double)?;
                    let omega = self.omega.f_to_kind(Kind::Double)?;
                    omega.f_mul(&d64.f_square()?)?.f_sum(Kind::Double)?
                }
            };
            let value = value.f_to_kind(Kind::Double)?.f_mul_scalar(weight)?;
            let result = self::kind(self.result)?;
            let grads = if let Some(g) = g.filter(|_| grads) {
                let s2 = 2.0 * self.scaling * weight;
                let grad_b = g.f_mm(&factors.a.f_tr()?)?.f_mul_scalar(s2)?;
                let grad_a = factors.b.f_tr()?.f_mm(&g)?.f_mul_scalar(s2)?;
                Some((grad_a.f_to_kind(result)?, grad_b.f_to_kind(result)?))
            } else {
                None
            };
            Ok(PenaltyTchOut { value, grads })
        })
    }
}

/// Decides whether the terms' values are summed from D in float64: when some Ω has a negative
/// entry (its terms can cancel, which float32 D cannot afford, and its value can be negative,
/// cancelling against the other matrices') or `weights_mixed` (weights of both signs). The fused
/// kernels find this out while they run, the CUDA kernels per block and in the kernel adding up
/// the blocks; here the Ω are scanned first, one transfer for all.
pub fn exact_values(terms: &mut [PenaltyTch], weights_mixed: bool) -> Result<()> {
    let scanned: Vec<&Tensor> = terms
        .iter()
        .map(|t| &t.omega)
        .filter(|om| om.numel() > 0)
        .collect();
    if scanned.is_empty() {
        return Ok(());
    }
    let exact = weights_mixed || {
        let minima = scanned
            .iter()
            .map(|om| Ok(om.f_min()?.f_to_kind(Kind::Double)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::f_stack(&minima, 0)?.f_min()?.f_double_value(&[])? < 0.0
    };
    for term in terms {
        term.exact_value = exact;
    }
    Ok(())
}

/// The terms' values (float64, on their device) added and rounded once to `dtype`.
pub fn total(values: Vec<Tensor>, dtype: DType) -> Result<Made> {
    let mut it = values.into_iter();
    let first = it
        .next()
        .ok_or_else(|| Error::value("Omega must hold at least one matrix"))?;
    let total = it.try_fold(first, |t, v| Ok::<_, Error>(t.f_add(&v)?))?;
    made(total.f_to_kind(kind(dtype)?)?)
}
