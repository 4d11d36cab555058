//! Ω finalization on the CPU (Eq. 13): Ω = ω / (Δ² + ξ), Δ formed tile by tile from its
//! low-rank form in float64.

use crate::cpu::lowrank::{for_each_tile, rows_per_task, LowRank};
use crate::cpu::pool;
use crate::cpu::simd::{multiversion, Madd};
use crate::error::Result;
use crate::scalar::Real;

pub fn finalize_rows<S: Real>(
    src: &[S],
    dst: &mut [S],
    delta: &LowRank<f64>,
    xi: S,
    clamp: bool,
) -> Result<()> {
    let (rows, cols) = (delta.rows, delta.cols);
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(rows, cols, 1);
    let tasks = dst
        .chunks_mut(rpt * cols)
        .zip(src.chunks(rpt * cols))
        .collect();
    pool::run_items(tasks, |task, (out, inp)| {
        finalize_task(task * rpt, inp, out, delta, xi, clamp)
    })?;
    Ok(())
}

multiversion!(fn finalize_task<S: Real>(row0: usize, inp: &[S], out: &mut [S], delta: &LowRank<f64>, xi: S, clamp: bool) = finalize_task_body);

#[inline(always)]
fn finalize_task_body<M: Madd, S: Real>(
    row0: usize,
    inp: &[S],
    out: &mut [S],
    delta: &LowRank<f64>,
    xi: S,
    clamp: bool,
) {
    let cols = delta.cols;
    for_each_tile!(
        M,
        delta,
        None::<&LowRank<f64>>,
        row0,
        out.len() / cols,
        |li, j0, dv, _unused| {
            let span = li * cols + j0..li * cols + j0 + dv.len();
            for ((o, &w), &dv) in out[span.clone()].iter_mut().zip(&inp[span]).zip(dv) {
                let d = S::load(dv);
                let v = w / M::madd(d, d, xi);
                *o = if clamp && v < S::zero() { S::zero() } else { v };
            }
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::dense::Dense;

    #[test]
    fn finalize_divides_by_squared_delta_plus_xi() {
        let delta = LowRank::new(
            Dense::new(2, 1, vec![1.0f64, 2.0]),
            Dense::new(1, 3, vec![1.0, -1.0, 0.0]),
        );
        let src = vec![2.0f32, 4.0, -1.0, 8.0, -5.0, 3.0];
        let mut dst = vec![0.0f32; 6];
        finalize_rows(&src, &mut dst, &delta, 1.0, false).unwrap();
        assert_eq!(dst, vec![1.0, 2.0, -1.0, 8.0 / 5.0, -1.0, 3.0]);
        finalize_rows(&src, &mut dst, &delta, 1.0, true).unwrap();
        assert_eq!(dst, vec![1.0, 2.0, 0.0, 8.0 / 5.0, 0.0, 3.0]);
    }
}
