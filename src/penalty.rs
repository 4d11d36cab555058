//! The importance penalty (Eq. 14, 16): P = Σ Ω ⊙ D², D = s·B·A − s_ref·B_ref·A_ref, with its
//! analytic gradients ∂P/∂B = 2s·(Ω⊙D)·Aᵀ and ∂P/∂A = 2s·Bᵀ·(Ω⊙D), in one pass over Ω.

use crate::dispatch::{path_for, Path};
use crate::error::Result;
use crate::forms::converted_delta;
use crate::lowrank::{rows_per_task, Dense, LowRank, ROW_BLOCK, TILE_COLS};
use crate::pool;
use crate::scalar::{Real, Storage};
use crate::simd::{multiversion, Madd};
use crate::view::{check_factor_set, dense, finite, slice, Arg, STORED_OMEGA_KINDS};
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
            f64_math: self.f64_math,
        }
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
        let anchor = self
            .reference
            .as_ref()
            .map(|(a0, b0)| (a0, b0, self.scaling_ref));
        let (a, b, (l, r)) = converted_delta(&self.a, &self.b, self.scaling, anchor, dense::<T>)?;
        let d = LowRank::new(l, r);
        let omega = self.omega.f_contiguous()?;
        // SAFETY: contiguous CPU tensor of dtype S, only read.
        let om = unsafe { slice::<S>(&omega) };
        let (p, ga, gb) = pool::install(|| penalty_rows(om, &d, &a, &b, grads))?;
        let value = Tensor::f_from_slice(&[T::from_f64_lossy(p * weight)])?.f_reshape([0i64; 0])?;
        let grads = if grads {
            let g = 2.0 * self.scaling * weight;
            let ga = Tensor::f_from_slice(&ga.scaled(T::from_f64_lossy(g)).data)?
                .f_view([a.rows as i64, a.cols as i64])?;
            let gb = Tensor::f_from_slice(&gb.scaled(T::from_f64_lossy(g)).data)?
                .f_view([b.rows as i64, b.cols as i64])?;
            Some((ga, gb))
        } else {
            None
        };
        Ok(PenaltyOut { value, grads })
    }

    fn run_tch(&self, weight: f64, grads: bool) -> Result<PenaltyOut> {
        let kind = self.compute_kind();
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_kind(kind)?) };
        let anchor = self
            .reference
            .as_ref()
            .map(|(a0, b0)| (a0, b0, self.scaling_ref));
        let (a, b, (l, r)) = converted_delta(&self.a, &self.b, self.scaling, anchor, c)?;
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

/// One pass over Ω: per tile of `ROW_BLOCK` rows, D is formed in L1 buffers, G = Ω⊙D, and P,
/// G·Aᵀ (per row) and Bᵀ·G (per task, reduced in task order — deterministic) are accumulated.
/// Returns (P, Bᵀ·G, G·Aᵀ) without the 2s factor.
fn penalty_rows<S: Storage, T: Real>(
    omega: &[S],
    d: &LowRank<T>,
    a: &Dense<T>,
    b: &Dense<T>,
    grads: bool,
) -> (f64, Dense<T>, Dense<T>) {
    let (rows, cols, r) = (d.rows, d.cols, a.rows);
    let mut gb = vec![T::zero(); rows * r];
    let mut ga = vec![T::zero(); r * cols];
    if rows == 0 || cols == 0 {
        return (0.0, Dense::new(r, cols, ga), Dense::new(rows, r, gb));
    }
    let mut a_pad = a.data.clone();
    a_pad.resize(r.div_ceil(8) * 8 * cols, T::zero());
    // Each task owns an (r, in) partial of Bᵀ·G: at most ~32 tasks keeps those small.
    let rpt = rows_per_task(rows, cols).max(rows.div_ceil(32));
    let partials: Vec<(f64, Vec<T>)> = omega
        .par_chunks(rpt * cols)
        .zip(gb.par_chunks_mut(rpt * r))
        .enumerate()
        .map(|(task, (om, gb_rows))| penalty_task(task * rpt, om, gb_rows, d, a, &a_pad, b, grads))
        .collect();
    let mut total = 0.0f64;
    for (p, part) in partials {
        total += p;
        if grads {
            for (acc, &x) in ga.iter_mut().zip(&part) {
                *acc = *acc + x;
            }
        }
    }
    (total, Dense::new(r, cols, ga), Dense::new(rows, r, gb))
}

multiversion!(fn penalty_task<S: Storage, T: Real>(row0: usize, om: &[S], gb_rows: &mut [T], d: &LowRank<T>, a: &Dense<T>, a_pad: &[T], b: &Dense<T>, grads: bool) -> (f64, Vec<T>) = penalty_task_body);

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn penalty_task_body<M: Madd, S: Storage, T: Real>(
    row0: usize,
    om: &[S],
    gb_rows: &mut [T],
    d: &LowRank<T>,
    a: &Dense<T>,
    a_pad: &[T],
    b: &Dense<T>,
    grads: bool,
) -> (f64, Vec<T>) {
    let (cols, r) = (d.cols, a.rows);
    let nrows = om.len() / cols;
    let mut task = PenaltyTask {
        row0,
        om,
        gb_rows,
        d,
        a,
        b,
        a_pad,
        r_pad: a_pad.len() / cols,
        gb_lanes: vec![[T::zero(); 8]; ROW_BLOCK * (a_pad.len() / cols)],
        ga: if grads {
            vec![T::zero(); r * cols]
        } else {
            Vec::new()
        },
        p: 0.0,
    };
    let mut li = 0;
    while li < nrows {
        if nrows - li >= ROW_BLOCK {
            task.group::<M, ROW_BLOCK>(li, grads);
            li += ROW_BLOCK;
        } else {
            task.group::<M, 1>(li, grads);
            li += 1;
        }
    }
    (task.p, task.ga)
}

struct PenaltyTask<'a, S, T> {
    row0: usize,
    om: &'a [S],
    gb_rows: &'a mut [T],
    d: &'a LowRank<T>,
    a: &'a Dense<T>,
    b: &'a Dense<T>,
    /// A with its rows padded by zeros to a multiple of 8 (r_pad × in).
    a_pad: &'a [T],
    r_pad: usize,
    /// Row-gradient lanes of the current group: (ROW_BLOCK × r_pad) × 8.
    gb_lanes: Vec<[T; 8]>,
    ga: Vec<T>,
    p: f64,
}

impl<S: Storage, T: Real> PenaltyTask<'_, S, T> {
    /// Rows li..li+RB (task-local): D tile by tile, then G = Ω⊙D in place, then P, the RB×r
    /// row gradients (dots over the tile) and the r×tile column gradients (RB FMAs per load
    /// and store of the partial).
    #[inline(always)]
    fn group<M: Madd, const RB: usize>(&mut self, li: usize, grads: bool) {
        let (cols, r) = (self.d.cols, self.a.rows);
        let mut g = [[T::zero(); TILE_COLS]; RB];
        for j0 in (0..cols).step_by(TILE_COLS) {
            let n = TILE_COLS.min(cols - j0);
            self.d
                .rows_tile_into::<M, RB>(self.row0 + li, j0, n, &mut g);
            for (rr, g_row) in g.iter_mut().enumerate() {
                let orow = &self.om[(li + rr) * cols + j0..(li + rr) * cols + j0 + n];
                let mut lanes = [T::zero(); 16];
                let (gc, gt) = g_row[..n].split_at_mut(n - n % 16);
                let (oc, ot) = orow.split_at(n - n % 16);
                for (gch, och) in gc.chunks_exact_mut(16).zip(oc.chunks_exact(16)) {
                    for l in 0..16 {
                        let dv = gch[l];
                        let gv = T::load(och[l]) * dv;
                        lanes[l] = M::madd(gv, dv, lanes[l]);
                        gch[l] = gv;
                    }
                }
                let mut tail = T::zero();
                for (gv, &o) in gt.iter_mut().zip(ot) {
                    let dv = *gv;
                    *gv = T::load(o) * dv;
                    tail = M::madd(*gv, dv, tail);
                }
                self.p += (lanes.iter().fold(T::zero(), |s, &x| s + x) + tail).to_f64();
            }
            if !grads {
                continue;
            }
            self.row_gradients::<M, RB>(&g, j0, n);
            for q in 0..r {
                let mut coef = [T::zero(); RB];
                for (rr, c) in coef.iter_mut().enumerate() {
                    *c = self.b.row(self.row0 + li + rr)[q];
                }
                let ga_row = &mut self.ga[q * cols + j0..q * cols + j0 + n];
                let whole = n - n % 16;
                // Blocks of 16 through a local copy: no aliasing for the compiler to fear,
                // so the RB FMAs per element vectorize.
                for (c, chunk) in ga_row[..whole].chunks_exact_mut(16).enumerate() {
                    let mut v = [T::zero(); 16];
                    v.copy_from_slice(chunk);
                    for rr in 0..RB {
                        let gr = &g[rr][c * 16..c * 16 + 16];
                        for l in 0..16 {
                            v[l] = M::madd(coef[rr], gr[l], v[l]);
                        }
                    }
                    chunk.copy_from_slice(&v);
                }
                for (j, acc) in ga_row.iter_mut().enumerate().skip(whole) {
                    let mut v = *acc;
                    for rr in 0..RB {
                        v = M::madd(coef[rr], g[rr][j], v);
                    }
                    *acc = v;
                }
            }
        }
        if grads {
            // Fold the row-gradient lanes into G·Aᵀ and clear them for the next group.
            for rr in 0..RB {
                for q in 0..r {
                    let lanes = &mut self.gb_lanes[rr * self.r_pad + q];
                    let slot = &mut self.gb_rows[(li + rr) * r + q];
                    *slot = *slot + lanes.iter().fold(T::zero(), |acc, &x| acc + x);
                    *lanes = [T::zero(); 8];
                }
            }
        }
    }

    /// (G·Aᵀ)[row, q] partial sums over one tile, kept as 8 lanes per (row, q) until the group
    /// ends: for each 8 columns of G, eight rows of A feed eight independent FMA chains.
    #[inline(always)]
    fn row_gradients<M: Madd, const RB: usize>(
        &mut self,
        g: &[[T; TILE_COLS]; RB],
        j0: usize,
        n: usize,
    ) {
        let cols = self.d.cols;
        let whole = n - n % 8;
        for (rr, g_row) in g.iter().enumerate() {
            for qb in (0..self.r_pad).step_by(8) {
                let base = rr * self.r_pad + qb;
                let mut acc = [[T::zero(); 8]; 8];
                acc.copy_from_slice(&self.gb_lanes[base..base + 8]);
                for c in (0..whole).step_by(8) {
                    let gv = &g_row[c..c + 8];
                    for (qq, acc_q) in acc.iter_mut().enumerate() {
                        let start = (qb + qq) * cols + j0 + c;
                        let av = &self.a_pad[start..start + 8];
                        for l in 0..8 {
                            acc_q[l] = M::madd(gv[l], av[l], acc_q[l]);
                        }
                    }
                }
                for (c, &gv) in g_row.iter().enumerate().take(n).skip(whole) {
                    for (qq, acc_q) in acc.iter_mut().enumerate() {
                        acc_q[0] = M::madd(gv, self.a_pad[(qb + qq) * cols + j0 + c], acc_q[0]);
                    }
                }
                self.gb_lanes[base..base + 8].copy_from_slice(&acc);
            }
        }
    }
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
