//! The cancellation-free low-rank forms of DESIGN §1, written once over a small `Factor`
//! trait so the CPU kernels (on `Dense` factors, evaluated row by row) and the device path
//! (on tch tensors, multiplied out by one GEMM) share the algebra.
//!
//! Each form returns `(L, R)` with the (out, in) quantity equal to `L·R`.

use crate::error::Result;
use crate::lowrank::Dense;
use crate::scalar::Real;
use tch::Tensor;

pub trait Factor: Sized {
    fn hcat(&self, other: &Self) -> Result<Self>;
    fn vcat(&self, other: &Self) -> Result<Self>;
    /// `self − c·other`
    fn sub_scaled(&self, other: &Self, c: f64) -> Result<Self>;
    fn scale(&self, c: f64) -> Result<Self>;
}

impl<T: Real> Factor for Dense<T> {
    fn hcat(&self, other: &Self) -> Result<Self> {
        Ok(Dense::hcat(self, other))
    }
    fn vcat(&self, other: &Self) -> Result<Self> {
        Ok(Dense::vcat(self, other))
    }
    fn sub_scaled(&self, other: &Self, c: f64) -> Result<Self> {
        let c = T::from_f64_lossy(c);
        Ok(self.zip(other, |x, y| x - c * y))
    }
    fn scale(&self, c: f64) -> Result<Self> {
        Ok(self.scaled(T::from_f64_lossy(c)))
    }
}

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
    fn scale(&self, c: f64) -> Result<Self> {
        Ok(self.f_mul_scalar(c)?)
    }
}

/// Eq. 11: g~ = s·(gB·A0 + B0·gA − η·gB·gA) = s·[gB | B0] · [A0 − η·gA ; gA].
pub fn g_tilde<M: Factor>(a0: &M, b0: &M, ga: &M, gb: &M, lr: f64, s: f64) -> Result<(M, M)> {
    let left = gb.hcat(b0)?.scale(s)?;
    let right = a0.sub_scaled(ga, lr)?.vcat(ga)?;
    Ok((left, right))
}

/// The change of one step: dθ = s·((B1 − B0)·A1 + B0·(A1 − A0)) = s·[B1 − B0 | B0] · [A1 ; A1 − A0].
pub fn d_theta<M: Factor>(a0: &M, b0: &M, a1: &M, b1: &M, s: f64) -> Result<(M, M)> {
    let left = b1.sub_scaled(b0, 1.0)?.hcat(b0)?.scale(s)?;
    let right = a1.vcat(&a1.sub_scaled(a0, 1.0)?)?;
    Ok((left, right))
}

/// Reference factors a difference is measured from.
pub struct Anchor<'a, M> {
    pub a: &'a M,
    pub b: &'a M,
    pub scaling: f64,
}

/// s·B·A − s_ref·B_ref·A_ref (Δ of Eq. 13, D of Eq. 14) without cancellation:
/// equal scalings: s·[B − B_ref | B_ref] · [A ; A − A_ref]; different: [s·B | −s_ref·B_ref] · [A ; A_ref];
/// no anchor: s·B · A.
pub fn delta<M: Factor>(a: &M, b: &M, s: f64, anchor: Option<Anchor<'_, M>>) -> Result<(M, M)> {
    match anchor {
        None => Ok((b.scale(s)?, a.scale(1.0)?)),
        Some(r) if r.scaling == s => {
            let left = b.sub_scaled(r.b, 1.0)?.hcat(r.b)?.scale(s)?;
            let right = a.vcat(&a.sub_scaled(r.a, 1.0)?)?;
            Ok((left, right))
        }
        Some(r) => {
            let left = b.scale(s)?.hcat(&r.b.scale(-r.scaling)?)?;
            let right = a.vcat(r.a)?;
            Ok((left, right))
        }
    }
}

/// The current factors and `delta` from them, after converting every tensor with `convert`
/// (to `Dense` for the CPU kernels, to a compute-kind tensor for the device path). `anchor` is the
/// start or reference pair with its scaling.
pub fn converted_delta<M: Factor>(
    a: &Tensor,
    b: &Tensor,
    s: f64,
    anchor: Option<(&Tensor, &Tensor, f64)>,
    convert: impl Fn(&Tensor) -> Result<M>,
) -> Result<(M, M, (M, M))> {
    let (a, b) = (convert(a)?, convert(b)?);
    let anchor = match anchor {
        Some((a0, b0, s0)) => Some((convert(a0)?, convert(b0)?, s0)),
        None => None,
    };
    let lr = delta(
        &a,
        &b,
        s,
        anchor.as_ref().map(|(a0, b0, s0)| Anchor {
            a: a0,
            b: b0,
            scaling: *s0,
        }),
    )?;
    Ok((a, b, lr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lowrank::LowRank;

    fn m(rows: usize, cols: usize, seed: u64) -> Dense<f64> {
        // Small deterministic pseudo-random values in (-1, 1), never all zero.
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data = (0..rows * cols)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Dense::new(rows, cols, data)
    }

    fn matmul(l: &Dense<f64>, r: &Dense<f64>) -> Dense<f64> {
        let mut out = vec![0.0; l.rows * r.cols];
        for i in 0..l.rows {
            for k in 0..l.cols {
                for j in 0..r.cols {
                    out[i * r.cols + j] += l.data[i * l.cols + k] * r.data[k * r.cols + j];
                }
            }
        }
        Dense::new(l.rows, r.cols, out)
    }

    fn assert_close(x: &Dense<f64>, y: &Dense<f64>) {
        for (a, b) in x.data.iter().zip(&y.data) {
            assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn g_tilde_matches_eq_11() {
        let (a0, b0, ga, gb) = (m(3, 5, 1), m(4, 3, 2), m(3, 5, 3), m(4, 3, 4));
        let (lr, s) = (0.1, 2.0);
        let (l, r) = g_tilde(&a0, &b0, &ga, &gb, lr, s).unwrap();
        let got = LowRank::new(l, r).to_dense();
        let t1 = matmul(&gb, &a0);
        let t2 = matmul(&b0, &ga);
        let t3 = matmul(&gb, &ga);
        let want = Dense::new(
            4,
            5,
            (0..20)
                .map(|i| s * (t1.data[i] + t2.data[i] - lr * t3.data[i]))
                .collect(),
        );
        assert_close(&got, &want);
    }

    #[test]
    fn d_theta_is_the_difference_of_products() {
        let (a0, b0, a1, b1) = (m(2, 6, 5), m(3, 2, 6), m(2, 6, 7), m(3, 2, 8));
        let (l, r) = d_theta(&a0, &b0, &a1, &b1, 0.5).unwrap();
        let got = LowRank::new(l, r).to_dense();
        let p1 = matmul(&b1, &a1);
        let p0 = matmul(&b0, &a0);
        let want = Dense::new(
            3,
            6,
            (0..18).map(|i| 0.5 * (p1.data[i] - p0.data[i])).collect(),
        );
        assert_close(&got, &want);
    }

    #[test]
    fn delta_covers_all_three_cases() {
        let (a, b, ar, br) = (m(2, 4, 9), m(5, 2, 10), m(2, 4, 11), m(5, 2, 12));
        let p = matmul(&b, &a);
        let pr = matmul(&br, &ar);
        for (s, s_ref) in [(1.5, 1.5), (1.5, 0.25)] {
            let anchor = Anchor {
                a: &ar,
                b: &br,
                scaling: s_ref,
            };
            let (l, r) = delta(&a, &b, s, Some(anchor)).unwrap();
            let want = Dense::new(
                5,
                4,
                (0..20)
                    .map(|i| s * p.data[i] - s_ref * pr.data[i])
                    .collect(),
            );
            assert_close(&LowRank::new(l, r).to_dense(), &want);
        }
        let (l, r) = delta(&a, &b, 3.0, None).unwrap();
        assert_close(&LowRank::new(l, r).to_dense(), &p.scaled(3.0));
    }
}
