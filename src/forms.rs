//! The cancellation-free low-rank forms of DESIGN §1, written once over a small `Factor`
//! trait so the CPU kernels (on `Dense` factors, evaluated row by row) and the device path
//! (the tch path, on libtorch tensors multiplied out by one GEMM) share the algebra.
//!
//! Each form returns its terms `c·L·R` (whose sum is the (out, in) quantity), the inputs among
//! their factors borrowed: the CPU kernels lay them out directly (`LowRank::from_terms`), the
//! device path concatenates them into one product (`assemble`).

use crate::cpu::dense::Dense;
use crate::error::Result;
use crate::scalar::Real;

pub trait Factor: Sized {
    #[cfg(any(feature = "tch", test))]
    fn hcat(&self, other: &Self) -> Result<Self>;
    #[cfg(any(feature = "tch", test))]
    fn vcat(&self, other: &Self) -> Result<Self>;
    /// `self − c·other`
    fn sub_scaled(&self, other: &Self, c: f64) -> Result<Self>;
    /// `c·self − d·other`, formed in float64 as `c·(self − other) + (c − d)·other` and rounded
    /// once to the factor's precision: when c ≈ d and self ≈ other both differences are exact
    /// (Sterbenz), so nothing cancels — `c·self − d·other` as written would lose the two products'
    /// roundings relative to their small difference (float64 factors: ~1e-10 at 1e-6 apart).
    fn scaled_difference(&self, c: f64, other: &Self, d: f64) -> Result<Self>;
    #[cfg(any(feature = "tch", test))]
    fn scale(&self, c: f64) -> Result<Self>;
}

impl<T: Real> Factor for Dense<T> {
    #[cfg(any(feature = "tch", test))]
    fn hcat(&self, other: &Self) -> Result<Self> {
        Ok(Dense::hcat(self, other))
    }
    #[cfg(any(feature = "tch", test))]
    fn vcat(&self, other: &Self) -> Result<Self> {
        Ok(Dense::vcat(self, other))
    }
    fn sub_scaled(&self, other: &Self, c: f64) -> Result<Self> {
        let c = T::from_f64_lossy(c);
        Ok(self.zip(other, |x, y| x - c * y))
    }
    fn scaled_difference(&self, c: f64, other: &Self, d: f64) -> Result<Self> {
        let c_minus_d = c - d;
        Ok(self.zip(other, |x, y| {
            let (x, y) = (x.to_f64(), y.to_f64());
            T::from_f64_lossy(c * (x - y) + c_minus_d * y)
        }))
    }
    #[cfg(any(feature = "tch", test))]
    fn scale(&self, c: f64) -> Result<Self> {
        Ok(self.scaled(T::from_f64_lossy(c)))
    }
}

/// A factor a term uses: one of the caller's (not copied) or one computed by the form.
pub enum Part<'a, M> {
    Input(&'a M),
    Made(M),
}

impl<M> std::ops::Deref for Part<'_, M> {
    type Target = M;
    fn deref(&self) -> &M {
        match self {
            Part::Input(m) => m,
            Part::Made(m) => m,
        }
    }
}

/// One term `scale · L · R` of a low-rank sum.
pub struct Term<'a, M> {
    pub left: Part<'a, M>,
    pub scale: f64,
    pub right: Part<'a, M>,
}

fn term<'a, M>(left: Part<'a, M>, scale: f64, right: Part<'a, M>) -> Term<'a, M> {
    Term { left, scale, right }
}

#[cfg(any(feature = "tch", test))]
/// The terms as one product `L·R`: L = [c₁·L₁ | c₂·L₂ | …], R = [R₁ ; R₂ ; …] (the device path's
/// GEMM operands; the CPU kernels build their layout from the terms directly, `LowRank::from_terms`).
pub fn assemble<M: Factor>(terms: &[Term<'_, M>]) -> Result<(M, M)> {
    let mut it = terms.iter();
    let first = it
        .next()
        .ok_or_else(|| crate::error::Error::value("a low-rank form needs at least one term"))?;
    let (mut left, mut right) = (first.left.scale(first.scale)?, first.right.scale(1.0)?);
    for t in it {
        left = left.hcat(&t.left.scale(t.scale)?)?;
        right = right.vcat(&t.right)?;
    }
    Ok((left, right))
}

use Part::{Input, Made};

/// Eq. 11: g~ = s·(gB·A0 + B0·gA − η·gB·gA) = s·gB·(A0 − η·gA) + s·B0·gA.
pub fn g_tilde<'a, M: Factor>(
    a0: &'a M,
    b0: &'a M,
    ga: &'a M,
    gb: &'a M,
    lr: f64,
    s: f64,
) -> Result<Vec<Term<'a, M>>> {
    Ok(vec![
        term(Input(gb), s, Made(a0.sub_scaled(ga, lr)?)),
        term(Input(b0), s, Input(ga)),
    ])
}

/// The change of one step: dθ = s·((B1 − B0)·A1 + B0·(A1 − A0)).
pub fn d_theta<'a, M: Factor>(
    a0: &'a M,
    b0: &'a M,
    a1: &'a M,
    b1: &'a M,
    s: f64,
) -> Result<Vec<Term<'a, M>>> {
    Ok(vec![
        term(Made(b1.sub_scaled(b0, 1.0)?), s, Input(a1)),
        term(Input(b0), s, Made(a1.sub_scaled(a0, 1.0)?)),
    ])
}

/// Reference factors a difference is measured from.
pub struct Anchor<'a, M> {
    pub a: &'a M,
    pub b: &'a M,
    pub scaling: f64,
}

/// s·B·A − s_ref·B_ref·A_ref (Δ of Eq. 13, D of Eq. 14) without cancellation:
/// equal scalings: s·(B − B_ref)·A + s·B_ref·(A − A_ref); different:
/// (s·B − s_ref·B_ref)·A + s_ref·B_ref·(A − A_ref), the first factor formed in float64 without
/// cancellation (`scaled_difference`: as it stands, the difference of products loses everything
/// when s ≈ s_ref and B ≈ B_ref);
/// no anchor: s·B·A.
pub fn delta<'a, M: Factor>(
    a: &'a M,
    b: &'a M,
    s: f64,
    anchor: Option<Anchor<'a, M>>,
) -> Result<Vec<Term<'a, M>>> {
    Ok(match anchor {
        None => vec![term(Input(b), s, Input(a))],
        Some(r) if r.scaling == s => vec![
            term(Made(b.sub_scaled(r.b, 1.0)?), s, Input(a)),
            term(Input(r.b), s, Made(a.sub_scaled(r.a, 1.0)?)),
        ],
        Some(r) => vec![
            term(Made(b.scaled_difference(s, r.b, r.scaling)?), 1.0, Input(a)),
            term(Input(r.b), r.scaling, Made(a.sub_scaled(r.a, 1.0)?)),
        ],
    })
}

/// The current factors and the start or reference pair (with its scaling), converted (to `Dense`
/// for the CPU kernels, to a compute-kind tensor for the device path).
pub struct Converted<M> {
    pub a: M,
    pub b: M,
    anchor: Option<(M, M, f64)>,
}

impl<M: Factor> Converted<M> {
    pub fn new<I>(
        a: &I,
        b: &I,
        anchor: Option<(&I, &I, f64)>,
        convert: impl Fn(&I) -> Result<M>,
    ) -> Result<Self> {
        let anchor = match anchor {
            Some((a0, b0, s0)) => Some((convert(a0)?, convert(b0)?, s0)),
            None => None,
        };
        Ok(Converted {
            a: convert(a)?,
            b: convert(b)?,
            anchor,
        })
    }

    /// `delta` of these factors at scaling `s`.
    pub fn delta(&self, s: f64) -> Result<Vec<Term<'_, M>>> {
        let anchor = self.anchor.as_ref().map(|(a0, b0, s0)| Anchor {
            a: a0,
            b: b0,
            scaling: *s0,
        });
        delta(&self.a, &self.b, s, anchor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::lowrank::LowRank;

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

    /// The dense matrix of the terms, built the CPU kernels' way (`from_terms`) and checked
    /// against the device path's (`assemble`, then one product).
    fn both_layouts(terms: &[Term<'_, Dense<f64>>]) -> Dense<f64> {
        let direct = LowRank::from_terms(terms).to_dense();
        let (l, r) = assemble(terms).unwrap();
        assert_close(&direct, &matmul(&l, &r));
        direct
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
        let got = both_layouts(&g_tilde(&a0, &b0, &ga, &gb, lr, s).unwrap());
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
        let got = both_layouts(&d_theta(&a0, &b0, &a1, &b1, 0.5).unwrap());
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
    fn scaled_difference_keeps_what_the_products_would_round_away() {
        // c·x − d·y = 2^-30 + 2^-40 + 2^-70, a float64; c·x alone needs 71 bits, so the products
        // as written round the 2^-70 away (1e-12 of the result).
        let (c, d) = (1.0 + 2f64.powi(-40), 1.0);
        let x = Dense::new(1, 1, vec![1.0 + 2f64.powi(-30)]);
        let y = Dense::new(1, 1, vec![1.0f64]);
        let got = x.scaled_difference(c, &y, d).unwrap();
        assert_eq!(
            got.data[0],
            2f64.powi(-30) + 2f64.powi(-40) + 2f64.powi(-70)
        );
        assert_ne!(
            c * x.data[0] - d * y.data[0],
            got.data[0],
            "the case is a hard one"
        );
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
            let got = both_layouts(&delta(&a, &b, s, Some(anchor)).unwrap());
            let want = Dense::new(
                5,
                4,
                (0..20)
                    .map(|i| s * p.data[i] - s_ref * pr.data[i])
                    .collect(),
            );
            assert_close(&got, &want);
        }
        let got = both_layouts(&delta(&a, &b, 3.0, None).unwrap());
        assert_close(&got, &p.scaled(3.0));
    }
}
