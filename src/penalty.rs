//! The importance penalty (Eq. 14, 16): P = Σ Ω ⊙ D², D = s·B·A − s_ref·B_ref·A_ref, with its
//! analytic gradients ∂P/∂B = 2s·(Ω⊙D)·Aᵀ and ∂P/∂A = 2s·Bᵀ·(Ω⊙D), in one pass over Ω.

use crate::dispatch::{path_for, Path};
use crate::error::{Error, Result};
use crate::forms::{delta, Anchor};
use crate::lowrank::{axpy, dot, rows_per_task, Dense, LowRank, TILE_COLS};
use crate::pool;
use crate::scalar::{Real, Storage};
use crate::view::{dense, finite, same_device, slice, wants_f64, Arg, FACTOR_KINDS, STORED_OMEGA_KINDS};
use half::{bf16, f16};
use rayon::prelude::*;
use tch::{Kind, Tensor};

pub struct PenaltyJob {
    omega: Tensor,
    a: Tensor,
    b: Tensor,
    reference: Option<(Tensor, Tensor)>,
    scaling: f64,
    scaling_ref: f64,
    f64_math: bool,
}

/// P as a 0-d tensor and, when asked for, (∂P/∂A, ∂P/∂B) in compute precision.
pub struct PenaltyOut {
    pub value: Tensor,
    pub grads: Option<(Tensor, Tensor)>,
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
        let mut kinds = vec![omega.kind(STORED_OMEGA_KINDS)?, a.kind(FACTOR_KINDS)?, b.kind(FACTOR_KINDS)?];
        let (out, inn) = omega.dims2()?;
        let (rank, a_in) = a.dims2()?;
        if a_in != inn || rank == 0 {
            return Err(Error::value(format!(
                "{} must have shape (r, {inn}) with r >= 1 for Omega (out, {inn}), got ({rank}, {a_in})",
                a.name
            )));
        }
        b.expect_shape(out, rank, "(out, r) for Omega (out, in) and A (r, in)")?;
        let mut all = vec![omega, a, b];
        if let Some((a_ref, b_ref)) = reference {
            kinds.push(a_ref.kind(FACTOR_KINDS)?);
            kinds.push(b_ref.kind(FACTOR_KINDS)?);
            a_ref.expect_shape(rank, inn, "like a")?;
            b_ref.expect_shape(out, rank, "like b")?;
            all.push(a_ref);
            all.push(b_ref);
        }
        same_device(&all)?;
        let scaling = finite(scaling, "scaling")?;
        let scaling_ref = finite(scaling_ref.unwrap_or(scaling), "scaling_ref")?;
        Ok(PenaltyJob {
            omega: omega.share(),
            a: a.share(),
            b: b.share(),
            reference: reference.map(|(a0, b0)| (a0.share(), b0.share())),
            scaling,
            scaling_ref,
            f64_math: wants_f64(&kinds),
        })
    }

    /// `weight` multiplies the value and the gradients (the layer coefficient times φ).
    pub fn run(&self, weight: f64, grads: bool) -> Result<PenaltyOut> {
        tch::no_grad(|| match path_for(self.omega.device()) {
            Path::Tch => self.run_tch(weight, grads),
            Path::Fused => match (self.omega.f_kind()?, self.f64_math) {
                (Kind::Double, _) => self.run_fused::<f64, f64>(weight, grads),
                (Kind::Float, true) => self.run_fused::<f32, f64>(weight, grads),
                (Kind::Float, false) => self.run_fused::<f32, f32>(weight, grads),
                (Kind::BFloat16, true) => self.run_fused::<bf16, f64>(weight, grads),
                (Kind::BFloat16, false) => self.run_fused::<bf16, f32>(weight, grads),
                (_, true) => self.run_fused::<f16, f64>(weight, grads),
                (_, false) => self.run_fused::<f16, f32>(weight, grads),
            },
        })
    }

    fn compute_kind(&self) -> Kind {
        if self.f64_math {
            Kind::Double
        } else {
            Kind::Float
        }
    }

    fn run_fused<S: Storage, T: Real>(&self, weight: f64, grads: bool) -> Result<PenaltyOut> {
        let (a, b) = (dense::<T>(&self.a)?, dense::<T>(&self.b)?);
        let reference = match &self.reference {
            Some((a0, b0)) => Some((dense::<T>(a0)?, dense::<T>(b0)?)),
            None => None,
        };
        let anchor = reference.as_ref().map(|(a0, b0)| Anchor { a: a0, b: b0, scaling: self.scaling_ref });
        let (l, r) = delta(&a, &b, self.scaling, anchor)?;
        let d = LowRank::new(l, r);
        let omega = self.omega.f_contiguous()?;
        // SAFETY: contiguous CPU tensor of dtype S, only read.
        let om = unsafe { slice::<S>(&omega) };
        let (p, ga, gb) = pool::install(|| penalty_rows(om, &d, &a, &b, grads))?;
        let value = Tensor::f_from_slice(&[T::from_f64_lossy(p * weight)])?.f_reshape([0i64; 0])?;
        let grads = if grads {
            let g = 2.0 * self.scaling * weight;
            let ga = Tensor::f_from_slice(&ga.scaled(T::from_f64_lossy(g)).data)?.f_view([a.rows as i64, a.cols as i64])?;
            let gb = Tensor::f_from_slice(&gb.scaled(T::from_f64_lossy(g)).data)?.f_view([b.rows as i64, b.cols as i64])?;
            Some((ga, gb))
        } else {
            None
        };
        Ok(PenaltyOut { value, grads })
    }

    fn run_tch(&self, weight: f64, grads: bool) -> Result<PenaltyOut> {
        let kind = self.compute_kind();
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_kind(kind)?) };
        let (a, b) = (c(&self.a)?, c(&self.b)?);
        let reference = match &self.reference {
            Some((a0, b0)) => Some((c(a0)?, c(b0)?)),
            None => None,
        };
        let anchor = reference.as_ref().map(|(a0, b0)| Anchor { a: a0, b: b0, scaling: self.scaling_ref });
        let (l, r) = delta(&a, &b, self.scaling, anchor)?;
        let d = l.f_mm(&r)?;
        let g = c(&self.omega)?.f_mul(&d)?;
        let value = g.f_mul(&d)?.f_sum(kind)?.f_mul_scalar(weight)?;
        let grads = if grads {
            let s2 = 2.0 * self.scaling * weight;
            let grad_b = g.f_mm(&a.f_tr()?)?.f_mul_scalar(s2)?;
            let grad_a = b.f_tr()?.f_mm(&g)?.f_mul_scalar(s2)?;
            Some((grad_a, grad_b))
        } else {
            None
        };
        Ok(PenaltyOut { value, grads })
    }
}

/// One pass over Ω: per row tile, D is formed in an L1 buffer, G = Ω⊙D, and P, G·Aᵀ (per row)
/// and Bᵀ·G (per task, reduced in task order — deterministic) are accumulated. Returns
/// (P, Bᵀ·G, G·Aᵀ) without the 2s factor.
fn penalty_rows<S: Storage, T: Real>(
    omega: &[S],
    d: &LowRank<T>,
    a: &Dense<T>,
    b: &Dense<T>,
    grads: bool,
) -> (f64, Dense<T>, Dense<T>) {
    let (rows, cols, r) = (d.rows, d.cols, a.rows);
    let mut gb = vec![T::zero(); rows * r];
    if rows == 0 || cols == 0 {
        return (0.0, Dense::new(r, cols, vec![T::zero(); r * cols]), Dense::new(rows, r, gb));
    }
    let rpt = rows_per_task(rows, cols);
    let partials: Vec<(f64, Vec<T>)> = omega
        .par_chunks(rpt * cols)
        .zip(gb.par_chunks_mut(rpt * r))
        .enumerate()
        .map(|(task, (om, gb_rows))| {
            let nrows = om.len() / cols;
            let mut ga = if grads { vec![T::zero(); r * cols] } else { Vec::new() };
            let mut dbuf = vec![T::zero(); TILE_COLS];
            let mut gbuf = vec![T::zero(); TILE_COLS];
            let mut p = 0.0f64;
            for j0 in (0..cols).step_by(TILE_COLS) {
                let n = TILE_COLS.min(cols - j0);
                for li in 0..nrows {
                    let i = task * rpt + li;
                    d.row_tile_into(i, j0, &mut dbuf[..n]);
                    let orow = &om[li * cols + j0..li * cols + j0 + n];
                    for ((g, &o), &dv) in gbuf[..n].iter_mut().zip(orow).zip(&dbuf[..n]) {
                        *g = T::load(o) * dv;
                    }
                    p += dot(&gbuf[..n], &dbuf[..n]).to_f64();
                    if grads {
                        let brow = b.row(i);
                        for q in 0..r {
                            let arow = &a.row(q)[j0..j0 + n];
                            gb_rows[li * r + q] = gb_rows[li * r + q] + dot(&gbuf[..n], arow);
                            axpy(brow[q], &gbuf[..n], &mut ga[q * cols + j0..q * cols + j0 + n]);
                        }
                    }
                }
            }
            (p, ga)
        })
        .collect();
    let mut total = 0.0f64;
    let mut ga = vec![T::zero(); r * cols];
    for (p, part) in partials {
        total += p;
        if grads {
            axpy(T::one(), &part, &mut ga);
        }
    }
    (total, Dense::new(r, cols, ga), Dense::new(rows, r, gb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalty_and_gradients_match_dense_maths() {
        // D = B·A with B (2×1), A (1×3); Ω all 2.
        let a = Dense::new(1, 3, vec![1.0f64, -2.0, 0.5]);
        let b = Dense::new(2, 1, vec![3.0f64, -1.0]);
        let d = LowRank::new(b.clone(), a.clone());
        let omega = vec![2.0f64; 6];
        let (p, ga, gb) = pool::install(|| penalty_rows(&omega, &d, &a, &b, true)).unwrap();
        let dd = d.to_dense();
        let want_p: f64 = dd.data.iter().map(|x| 2.0 * x * x).sum();
        assert!((p - want_p).abs() < 1e-12);
        // (Bᵀ·G)[0, j] = Σ_i B[i]·2·D[i,j]; (G·Aᵀ)[i] = Σ_j 2·D[i,j]·A[j]
        for j in 0..3 {
            let want: f64 = (0..2).map(|i| b.data[i] * 2.0 * dd.data[i * 3 + j]).sum();
            assert!((ga.data[j] - want).abs() < 1e-12);
        }
        for i in 0..2 {
            let want: f64 = (0..3).map(|j| 2.0 * dd.data[i * 3 + j] * a.data[j]).sum();
            assert!((gb.data[i] - want).abs() < 1e-12);
        }
    }
}
