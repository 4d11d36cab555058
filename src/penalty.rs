//! The importance penalty (Eq. 14, 16): P = Σ Ω ⊙ D², D = s·B·A − s_ref·B_ref·A_ref, with its
//! analytic gradients ∂P/∂B = 2s·(Ω⊙D)·Aᵀ and ∂P/∂A = 2s·Bᵀ·(Ω⊙D), in one pass over Ω.

use crate::dispatch::{path_for, Path};
use crate::error::Result;
use crate::forms::{assemble, Converted};
use crate::lowrank::{
    conflict_free_stride, rows_per_task, Dense, Finish, LowRank, ROW_BLOCK, TILE_COLS,
};
use crate::pool;
use crate::scalar::{Real, Storage};
use crate::simd::{multiversion, Madd};
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
        let factors = Converted::new(&self.a, &self.b, anchor, dense::<T>)?;
        let d = LowRank::from_terms(&factors.delta(self.scaling)?);
        let (a, b) = (&factors.a, &factors.b);
        let omega = self.omega.f_contiguous()?;
        // SAFETY: contiguous CPU tensor of dtype S, only read.
        let om = unsafe { slice::<S>(&omega) };
        // The kernel writes the gradients, scaled, straight into the tensors it returns (no
        // staging buffers, scaled copies and tensors copied from them).
        let grads = if grads {
            let out = |rows: usize, cols: usize| {
                Tensor::f_empty([rows as i64, cols as i64], (T::KIND, tch::Device::Cpu))
            };
            Some((out(a.rows, a.cols)?, out(b.rows, b.cols)?))
        } else {
            None
        };
        let p = match &grads {
            Some((ga, gb)) => {
                let scale = T::from_f64_lossy(2.0 * self.scaling * weight);
                // SAFETY: fresh contiguous CPU tensors of dtype T, referenced nowhere else.
                let (ga, gb) = unsafe { (slice_mut::<T>(ga), slice_mut::<T>(gb)) };
                penalty_rows(om, &d, a, b, Some(GradOut { ga, gb, scale }))?
            }
            None => penalty_rows(om, &d, a, b, None)?,
        };
        // One dispatcher op (0-d, rounded to T as `from_f64_lossy` would).
        let value = Tensor::f_scalar_tensor(p * weight, (T::KIND, tch::Device::Cpu))?;
        Ok(PenaltyOut { value, grads })
    }

    fn run_tch(&self, weight: f64, grads: bool) -> Result<PenaltyOut> {
        let kind = self.compute_kind();
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_to_kind(kind)?) };
        let anchor = self
            .reference
            .as_ref()
            .map(|(a0, b0)| (a0, b0, self.scaling_ref));
        let factors = Converted::new(&self.a, &self.b, anchor, c)?;
        let (l, r) = assemble(&factors.delta(self.scaling)?)?;
        let (a, b) = (&factors.a, &factors.b);
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

/// Where [`penalty_rows`] writes the gradients, each multiplied by `scale`: Bᵀ·G into `ga`
/// (r × in) and G·Aᵀ into `gb` (out × r), both row-major.
struct GradOut<'a, T> {
    ga: &'a mut [T],
    gb: &'a mut [T],
    scale: T,
}

/// One pass over Ω: per tile of `ROW_BLOCK` rows, D is formed in L1 buffers, G = Ω⊙D, and P,
/// G·Aᵀ (per row) and Bᵀ·G (per task, reduced in task order — deterministic) are accumulated.
/// Returns P; the gradients (without the 2s factor, times `out.scale`) go to `out`.
fn penalty_rows<S: Storage, T: Real>(
    omega: &[S],
    d: &LowRank<T>,
    a: &Dense<T>,
    b: &Dense<T>,
    out: Option<GradOut<'_, T>>,
) -> Result<f64> {
    let (rows, cols, r) = (d.rows, d.cols, a.rows);
    let grads = out.is_some();
    let (ga, gb, scale) = match out {
        Some(GradOut { ga, gb, scale }) => (ga, gb, scale),
        None => (&mut [][..], &mut [][..], T::one()),
    };
    debug_assert!(!grads || (ga.len() == r * cols && gb.len() == rows * r));
    if rows == 0 || cols == 0 {
        ga.fill(T::zero());
        gb.fill(T::zero());
        return Ok(0.0);
    }
    let layout = GradLayout::new::<T>(r, cols);
    let a_packed = layout.pack(a);
    // Each task owns an (r, in) partial of Bᵀ·G: at most ~32 tasks keeps those small.
    let rpt = rows_per_task(rows, cols, rows.div_ceil(32));
    let tasks: Vec<_> = if grads {
        let gb_chunks = gb.chunks_mut(rpt * r).map(Some);
        omega.chunks(rpt * cols).zip(gb_chunks).collect()
    } else {
        omega.chunks(rpt * cols).map(|om| (om, None)).collect()
    };
    let partials = pool::run_items(tasks, |task, (om, gb_rows)| {
        let gb_rows = gb_rows.map(|rows| (rows, scale));
        penalty_task(task * rpt, om, gb_rows, d, b, &layout, &a_packed)
    })?;
    let mut total = 0.0f64;
    if grads {
        ga.fill(T::zero());
    }
    for (p, part) in partials {
        total += p;
        if grads {
            for (acc_row, part_row) in ga
                .chunks_exact_mut(cols)
                .zip(part.chunks_exact(layout.ga_stride))
            {
                for (acc, &x) in acc_row.iter_mut().zip(part_row) {
                    *acc = *acc + x;
                }
            }
        }
    }
    for x in ga.iter_mut() {
        *x = *x * scale;
    }
    Ok(total)
}

/// The micro-kernel's last step in the penalty: each value d of D leaves the registers as
/// G = Ω⊙d, and Ω·d² is summed into per-lane partials of P (no separate pass over the tile).
struct Weighted<'a, S, T, const RB: usize> {
    /// The tile's rows of Ω.
    omega: [&'a [S]; RB],
    lanes: [T; 16],
}

impl<S: Storage, T: Real, const RB: usize> Finish<T> for Weighted<'_, S, T, RB> {
    #[inline(always)]
    fn finish<M: Madd, const W: usize>(
        &mut self,
        rr: usize,
        j: usize,
        vals: &[T; W],
        dst: &mut [T; W],
    ) {
        let w: &[S; W] = self.omega[rr][j..j + W].try_into().expect("W weights");
        for l in 0..W {
            let g = T::load(w[l]) * vals[l];
            self.lanes[l % 16] = M::madd(g, vals[l], self.lanes[l % 16]);
            dst[l] = g;
        }
    }
}

/// Memory layouts of the gradient pass, chosen so its inner loops are unit-stride, free of
/// bounds checks and of cache-set conflicts.
struct GradLayout {
    r: usize,
    /// r rounded up to even: the row-gradient loop takes the rank terms two at a time.
    r_pad: usize,
    /// Row stride of a task's Bᵀ·G partial (≥ cols rounded up to 16; odd number of lines).
    ga_stride: usize,
}

/// Columns of G are processed in blocks of this many (G's tile buffers are zeroed up to it).
const GRAD_BLOCK: usize = 16;

impl GradLayout {
    fn new<T>(r: usize, cols: usize) -> Self {
        GradLayout {
            r,
            r_pad: r.div_ceil(2) * 2,
            ga_stride: conflict_free_stride::<T>(cols.div_ceil(GRAD_BLOCK) * GRAD_BLOCK),
        }
    }

    /// A packed by blocks of 8 columns: block c holds A[q, 8c..8c+8] for q < r_pad, one after
    /// the other (zeros beyond r and beyond the last column, up to a whole `GRAD_BLOCK`).
    fn pack<T: Real>(&self, a: &Dense<T>) -> Vec<T> {
        let blocks = a.cols.div_ceil(GRAD_BLOCK) * GRAD_BLOCK / 8;
        let mut packed = vec![T::zero(); blocks * self.r_pad * 8];
        for q in 0..self.r {
            for (j, &x) in a.row(q).iter().enumerate() {
                packed[((j / 8) * self.r_pad + q) * 8 + j % 8] = x;
            }
        }
        packed
    }
}

multiversion!(fn penalty_task<S: Storage, T: Real>(row0: usize, om: &[S], gb_rows: Option<(&mut [T], T)>, d: &LowRank<T>, b: &Dense<T>, layout: &GradLayout, a_packed: &[T]) -> (f64, Vec<T>) = penalty_task_body);

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn penalty_task_body<M: Madd, S: Storage, T: Real>(
    row0: usize,
    om: &[S],
    gb_rows: Option<(&mut [T], T)>,
    d: &LowRank<T>,
    b: &Dense<T>,
    layout: &GradLayout,
    a_packed: &[T],
) -> (f64, Vec<T>) {
    let nrows = om.len() / d.cols;
    let grads = gb_rows.is_some();
    let (gb_rows, gb_scale) = gb_rows.unwrap_or((&mut [], T::one()));
    let mut task = PenaltyTask {
        row0,
        om,
        gb_rows,
        gb_scale,
        d,
        b,
        layout,
        a_packed,
        gb_lanes: vec![[T::zero(); 8]; ROW_BLOCK * layout.r_pad],
        coefs: vec![[T::zero(); ROW_BLOCK]; layout.r],
        ga: if grads {
            vec![T::zero(); layout.r * layout.ga_stride]
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
    /// This task's rows of G·Aᵀ, written once each (times `gb_scale`) as its group ends.
    gb_rows: &'a mut [T],
    gb_scale: T,
    d: &'a LowRank<T>,
    b: &'a Dense<T>,
    layout: &'a GradLayout,
    /// A in `GradLayout::pack`'s layout.
    a_packed: &'a [T],
    /// Row-gradient lanes of the current group: (ROW_BLOCK × r_pad) × 8.
    gb_lanes: Vec<[T; 8]>,
    /// B[row, q] of the current group's rows, by q.
    coefs: Vec<[T; ROW_BLOCK]>,
    /// This task's Bᵀ·G partial: r rows of `ga_stride`.
    ga: Vec<T>,
    p: f64,
}

impl<S: Storage, T: Real> PenaltyTask<'_, S, T> {
    /// Rows li..li+RB (task-local), tile by tile: G = Ω⊙D and P's terms as D leaves the
    /// micro-kernel's registers, then the RB×r row gradients and the r×tile column gradients.
    #[inline(always)]
    fn group<M: Madd, const RB: usize>(&mut self, li: usize, grads: bool) {
        let cols = self.d.cols;
        let mut g = [[T::zero(); TILE_COLS]; RB];
        if grads {
            for (q, c) in self.coefs.iter_mut().enumerate() {
                for (rr, x) in c.iter_mut().take(RB).enumerate() {
                    *x = self.b.row(self.row0 + li + rr)[q];
                }
            }
        }
        for j0 in (0..cols).step_by(TILE_COLS) {
            let n = TILE_COLS.min(cols - j0);
            let mut weigh = Weighted::<S, T, RB> {
                omega: std::array::from_fn(|rr| {
                    &self.om[(li + rr) * cols + j0..(li + rr) * cols + j0 + n]
                }),
                lanes: [T::zero(); 16],
            };
            self.d
                .rows_tile_finish::<M, RB, _>(self.row0 + li, j0, n, &mut g, &mut weigh);
            self.p += weigh.lanes.iter().fold(T::zero(), |s, &x| s + x).to_f64();
            if grads {
                // Whole blocks of columns: G's last tile is padded with zeros (A's packing too).
                let n16 = n.div_ceil(GRAD_BLOCK) * GRAD_BLOCK;
                for g_row in g.iter_mut() {
                    g_row[n..n16].fill(T::zero());
                }
                self.row_gradients::<M, RB>(&g, j0, n16);
                self.column_gradients::<M, RB>(&g, j0, n16);
            }
        }
        if grads {
            // Fold the row-gradient lanes into G·Aᵀ and clear them for the next group.
            let (r, r_pad) = (self.layout.r, self.layout.r_pad);
            for rr in 0..RB {
                for q in 0..r {
                    let lanes = &mut self.gb_lanes[rr * r_pad + q];
                    let sum = lanes.iter().fold(T::zero(), |acc, &x| acc + x);
                    self.gb_rows[(li + rr) * r + q] = sum * self.gb_scale;
                    *lanes = [T::zero(); 8];
                }
            }
        }
    }

    /// (G·Aᵀ)[row, q] partial sums over one tile, kept as 8 lanes per (row, q) until the group
    /// ends. Two rank terms at a time for all RB rows: each 8 columns of G and of two rows of A
    /// loaded feed 2·RB independent FMA chains.
    #[inline(always)]
    fn row_gradients<M: Madd, const RB: usize>(
        &mut self,
        g: &[[T; TILE_COLS]; RB],
        j0: usize,
        n16: usize,
    ) {
        let r_pad = self.layout.r_pad;
        let block = 8 * r_pad;
        let a_tile = &self.a_packed[j0 * r_pad..(j0 + n16) * r_pad];
        for qp in (0..r_pad).step_by(2) {
            let mut acc = [[[T::zero(); 8]; 2]; RB];
            for (rr, acc_r) in acc.iter_mut().enumerate() {
                acc_r[0] = self.gb_lanes[rr * r_pad + qp];
                acc_r[1] = self.gb_lanes[rr * r_pad + qp + 1];
            }
            for (c, a_block) in a_tile.chunks_exact(block).enumerate() {
                let av = &a_block[qp * 8..qp * 8 + 16];
                for (acc_r, g_row) in acc.iter_mut().zip(g) {
                    let gv = &g_row[(c * 8) % TILE_COLS..][..8];
                    for l in 0..8 {
                        acc_r[0][l] = M::madd(gv[l], av[l], acc_r[0][l]);
                        acc_r[1][l] = M::madd(gv[l], av[8 + l], acc_r[1][l]);
                    }
                }
            }
            for (rr, acc_r) in acc.iter().enumerate() {
                self.gb_lanes[rr * r_pad + qp] = acc_r[0];
                self.gb_lanes[rr * r_pad + qp + 1] = acc_r[1];
            }
        }
    }

    /// (Bᵀ·G)[q, tile] += Σ_rows B[row, q]·G[row, tile]: per 16 columns, the RB rows of G stay
    /// in registers while every rank term's partial is loaded, updated and stored once.
    #[inline(always)]
    fn column_gradients<M: Madd, const RB: usize>(
        &mut self,
        g: &[[T; TILE_COLS]; RB],
        j0: usize,
        n16: usize,
    ) {
        let stride = self.layout.ga_stride;
        for c in (0..n16).step_by(GRAD_BLOCK) {
            let mut gv = [[T::zero(); GRAD_BLOCK]; RB];
            for (dst, g_row) in gv.iter_mut().zip(g) {
                dst.copy_from_slice(&g_row[c % TILE_COLS..][..GRAD_BLOCK]);
            }
            for (ga_row, coef) in self.ga.chunks_exact_mut(stride).zip(&self.coefs) {
                let dst = &mut ga_row[j0 + c..j0 + c + GRAD_BLOCK];
                let mut v = [T::zero(); GRAD_BLOCK];
                v.copy_from_slice(dst);
                for (rr, g_row) in gv.iter().enumerate() {
                    for l in 0..GRAD_BLOCK {
                        v[l] = M::madd(coef[rr], g_row[l], v[l]);
                    }
                }
                dst.copy_from_slice(&v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1), never all equal.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }

    #[test]
    fn penalty_and_gradients_match_dense_maths() {
        // 7 rows: one block of ROW_BLOCK and three single rows; 300 columns: two whole tiles and
        // a tail that is not a whole GRAD_BLOCK; odd rank (padded to even in the row pass).
        let (rows, cols, r) = (7, 300, 3);
        let a = Dense::new(r, cols, values(r * cols, 1));
        let b = Dense::new(rows, r, values(rows * r, 2));
        let d = LowRank::new(b.clone(), a.clone());
        let omega: Vec<f64> = values(rows * cols, 3).iter().map(|x| x.abs()).collect();
        let (mut ga, mut gb) = (vec![f64::NAN; r * cols], vec![f64::NAN; rows * r]);
        let out = GradOut {
            ga: &mut ga,
            gb: &mut gb,
            scale: 2.0,
        };
        let p = penalty_rows(&omega, &d, &a, &b, Some(out)).unwrap();
        // The buffers start as NaN: every element must be written, none accumulated into.
        let ga = Dense::new(r, cols, ga.iter().map(|x| x / 2.0).collect());
        let gb = Dense::new(rows, r, gb.iter().map(|x| x / 2.0).collect());
        let dd = d.to_dense();
        let g: Vec<f64> = omega.iter().zip(&dd.data).map(|(o, x)| o * x).collect();
        let want_p: f64 = g.iter().zip(&dd.data).map(|(g, x)| g * x).sum();
        assert!((p - want_p).abs() < 1e-12 * want_p.abs().max(1.0));
        // (Bᵀ·G)[q, j] = Σ_i B[i, q]·G[i, j]; (G·Aᵀ)[i, q] = Σ_j G[i, j]·A[q, j]
        for q in 0..r {
            for j in 0..cols {
                let want: f64 = (0..rows).map(|i| b.data[i * r + q] * g[i * cols + j]).sum();
                assert!((ga.data[q * cols + j] - want).abs() < 1e-12);
            }
        }
        for i in 0..rows {
            for q in 0..r {
                let want: f64 = (0..cols)
                    .map(|j| g[i * cols + j] * a.data[q * cols + j])
                    .sum();
                assert!((gb.data[i * r + q] - want).abs() < 1e-11);
            }
        }
        let p_only = penalty_rows(&omega, &d, &a, &b, None).unwrap();
        assert_eq!(p_only, p);
    }
}
