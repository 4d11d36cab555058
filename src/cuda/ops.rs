//! The three op families on the CUDA kernels: parameter tables filled from the jobs' tensors
//! (their own device pointers), one launch per dtype group of up to `MAX_MATS` matrices.
//! Inputs the kernels cannot read directly (a strided tensor, factors of mixed dtypes) are
//! made contiguous / converted through tch first — rare, and never the (out, in) maths.

use super::tables::{self, *};
use super::Kernels;
use crate::error::{Error, Result};
use crate::scalar::{in_kind, math_kind};
use std::ffi::c_void;
use tch::{Device, Kind, Tensor};

fn kind_tag(kind: Kind) -> Result<&'static str> {
    match kind {
        Kind::Float => Ok("f32"),
        Kind::Double => Ok("f64"),
        Kind::BFloat16 => Ok("bf16"),
        Kind::Half => Ok("f16"),
        other => Err(Error::type_(format!("no CUDA kernel for dtype {other:?}"))),
    }
}

fn dim(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x)
        .map_err(|_| Error::value(format!("{what} = {x} is too large for the CUDA kernels")))
}

fn ptr(t: &Tensor) -> Ptr {
    t.data_ptr() as Ptr
}

fn ptr_mut(t: &Tensor) -> PtrMut {
    t.data_ptr()
}

/// Factors a kernel can read: contiguous, one shared dtype (else all converted to `math`).
/// float64 maths always reads float64 factors: the kernels' maths type follows the factors'.
fn factor_set(factors: &[&Tensor], math: Kind) -> Result<(Vec<Tensor>, Kind)> {
    let kind = factors[0].f_kind()?;
    let same = factors.iter().all(|f| f.f_kind().ok() == Some(kind));
    let target = if same && math != Kind::Double {
        kind
    } else {
        math
    };
    // Only a conversion needs a new tensor (and detaching first, so it records no graph): a
    // model's ~100 factors are usually ready, and each dispatched op costs microseconds of CPU
    // per call, while the GPU waits for the launch.
    let out = factors
        .iter()
        .map(|f| {
            if f.f_kind()? == target {
                contiguous(f)
            } else {
                Ok(f.f_detach()?.f_to_kind(target)?.f_contiguous()?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((out, target))
}

/// Indices of `names` grouped by kernel (one dtype combination each), every group split into
/// launches of at most `MAX_MATS` matrices (the parameter table's size).
fn launches(names: &[&str]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&x, &y| names[x].cmp(names[y])); // stable: call order within a group
    order
        .chunk_by(|&x, &y| names[x] == names[y])
        .flat_map(|group| group.chunks(MAX_MATS).map(<[usize]>::to_vec))
        .collect()
}

/// `t` itself when contiguous (no dispatched op), else a contiguous copy.
fn contiguous(t: &Tensor) -> Result<Tensor> {
    Ok(if t.is_contiguous() {
        t.shallow_clone()
    } else {
        t.f_contiguous()?
    })
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

/// Regions of one workspace allocation (torch's caching allocator, on the launch stream),
/// each 256-byte aligned.
struct Workspace {
    bytes: usize,
}

impl Workspace {
    fn new() -> Self {
        Workspace { bytes: 0 }
    }
    /// Reserves `bytes` and returns their offset.
    fn reserve(&mut self, bytes: usize) -> usize {
        let at = self.bytes;
        self.bytes += bytes.div_ceil(256) * 256;
        at
    }
    fn allocate(&self, device: Device) -> Result<Tensor> {
        Ok(Tensor::f_empty(
            [self.bytes.max(256) as i64],
            (Kind::Uint8, device),
        )?)
    }
}

fn at(base: &Tensor, offset: usize) -> PtrMut {
    // SAFETY (of later use): `offset` lies inside `base`, reserved by `Workspace`.
    (base.data_ptr() as *mut u8).wrapping_add(offset) as PtrMut
}

/// One ω update: the tensors of `accumulate_omega_`.
pub struct OmegaMat<'a> {
    pub omega: &'a Tensor,
    pub factors: [&'a Tensor; 6], // a0, b0, ga, gb, a1, b1
    pub lr: f64,
    pub scaling: f64,
    pub f64_math: bool,
}

/// ω ← ω − g~ ⊙ dθ for every matrix, in place.
pub fn omega_many(k: &Kernels, stream: u64, mats: &[OmegaMat], clamp: bool) -> Result<()> {
    k.enter()?;
    struct Prepared {
        name: String,
        omega: Tensor, // contiguous (a copy when the caller's is strided)
        factors: Vec<Tensor>,
        copy_back: Option<Tensor>,
        lr: f64,
        scaling: f64,
    }
    let mut prepared = Vec::new();
    for m in mats {
        let (out, inn) = (m.omega.size()[0] as usize, m.omega.size()[1] as usize);
        if out == 0 || inn == 0 {
            continue;
        }
        let (factors, fkind) = factor_set(&m.factors, math_kind(m.f64_math))?;
        let w = m.omega.f_kind()?;
        let (omega, copy_back) = if m.omega.is_contiguous() {
            (m.omega.shallow_clone(), None)
        } else {
            (m.omega.f_contiguous()?, Some(m.omega.shallow_clone()))
        };
        prepared.push(Prepared {
            name: format!("omega_{}_{}", kind_tag(fkind)?, kind_tag(w)?),
            omega,
            factors,
            copy_back,
            lr: m.lr,
            scaling: m.scaling,
        });
    }
    let names: Vec<&str> = prepared.iter().map(|p| p.name.as_str()).collect();
    for chunk in &launches(&names) {
        let mut table = tables::zeroed::<OmegaTable>();
        let mut blocks = 0usize;
        for (slot, &i) in chunk.iter().enumerate() {
            let p = &prepared[i];
            let size = p.omega.size();
            let (out, inn) = (size[0] as usize, size[1] as usize);
            let r = p.factors[0].size()[0] as usize;
            let tiles_col = ceil_div(inn, TILE_COLS);
            let f = &p.factors;
            table.m[slot] = OmegaEntry {
                omega: ptr_mut(&p.omega),
                a0: ptr(&f[0]),
                b0: ptr(&f[1]),
                ga: ptr(&f[2]),
                gb: ptr(&f[3]),
                a1: ptr(&f[4]),
                b1: ptr(&f[5]),
                out: dim(out, "out")?,
                inn: dim(inn, "in")?,
                r: dim(r, "r")?,
                tiles_col: dim(tiles_col, "tiles")?,
                first_block: dim(blocks, "blocks")?,
                pad: 0,
                lr: p.lr,
                scaling: p.scaling,
            };
            blocks += ceil_div(out, OMEGA_ROWS) * tiles_col;
        }
        table.count = chunk.len() as i32;
        table.clamp_negative = clamp as i32;
        let mut params = [&mut *table as *mut OmegaTable as *mut c_void];
        let name = &prepared[chunk[0]].name;
        k.launch(name, dim(blocks, "blocks")? as u32, stream, &mut params)?;
    }
    for p in prepared {
        if let Some(mut dst) = p.copy_back {
            dst.f_copy_(&p.omega)?;
        }
    }
    Ok(())
}

/// One finalization: the tensors of `finalize_importance`.
pub struct FinalizeMat<'a> {
    pub omega: &'a Tensor,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub start: Option<(&'a Tensor, &'a Tensor)>,
    pub scaling: f64,
    pub xi: f64,
    pub f64_math: bool,
}

pub struct FinalizeOut {
    pub omegas: Vec<Tensor>,
    /// ‖Ω‖² per matrix (float64, on the device).
    pub sq_norms: Tensor,
}

/// Ω = max(ω, 0)/(Δ² + ξ) for every matrix, and ‖Ω‖² per matrix from the same pass.
pub fn finalize_many(
    k: &Kernels,
    stream: u64,
    mats: &[FinalizeMat],
    clamp: bool,
) -> Result<FinalizeOut> {
    k.enter()?;
    let device = mats
        .first()
        .map(|m| m.omega.device())
        .ok_or_else(|| Error::value("omega must hold at least one matrix"))?;
    let sq_norms = Tensor::f_zeros([mats.len() as i64], (Kind::Double, device))?;
    let mut results = Vec::with_capacity(mats.len());
    let mut prepared = Vec::new(); // (index, name, omega, factors)
    for (i, m) in mats.iter().enumerate() {
        let omega = contiguous(m.omega)?;
        results.push(Tensor::f_empty(omega.size(), (omega.f_kind()?, device))?);
        if omega.numel() == 0 {
            continue;
        }
        let mut fs = vec![m.a, m.b];
        if let Some((a0, b0)) = m.start {
            fs.extend([a0, b0]);
        }
        let (factors, fkind) = factor_set(&fs, math_kind(m.f64_math))?;
        let name = format!(
            "finalize_{}_{}",
            kind_tag(fkind)?,
            kind_tag(omega.f_kind()?)?
        );
        prepared.push((i, name, omega, factors));
    }
    let names: Vec<&str> = prepared.iter().map(|p| p.1.as_str()).collect();
    for chunk in &launches(&names) {
        // Block counts first: one Σ Ω² partial per block.
        let tiles: Vec<usize> = chunk
            .iter()
            .map(|&p| {
                let s = prepared[p].2.size();
                ceil_div(s[0] as usize, FINALIZE_ROWS) * ceil_div(s[1] as usize, TILE_COLS)
            })
            .collect();
        let blocks: usize = tiles.iter().sum();
        let partial = Tensor::f_empty([blocks as i64], (Kind::Double, device))?;
        let mut table = tables::zeroed::<FinalizeTable>();
        let mut sums = tables::zeroed::<SumTable>();
        let mut first = 0usize;
        for (slot, &p) in chunk.iter().enumerate() {
            let (i, _, omega, f) = &prepared[p];
            let size = omega.size();
            let (out, inn) = (size[0] as usize, size[1] as usize);
            let m = &mats[*i];
            let (a_start, b_start) = if f.len() == 4 {
                (ptr(&f[2]), ptr(&f[3]))
            } else {
                (std::ptr::null(), std::ptr::null())
            };
            table.m[slot] = FinalizeEntry {
                omega: ptr(omega),
                result: ptr_mut(&results[*i]),
                a: ptr(&f[0]),
                b: ptr(&f[1]),
                a_start,
                b_start,
                sq_partial: (partial.data_ptr() as *mut f64).wrapping_add(first),
                out: dim(out, "out")?,
                inn: dim(inn, "in")?,
                r: dim(f[0].size()[0] as usize, "r")?,
                tiles_col: dim(ceil_div(inn, TILE_COLS), "tiles")?,
                first_block: dim(first, "blocks")?,
                pad: 0,
                scaling: m.scaling,
                xi: m.xi,
            };
            sums.first[slot] = dim(first, "blocks")?;
            sums.weight[slot] = 1.0;
            first += tiles[slot];
        }
        table.count = chunk.len() as i32;
        table.clamp_negative = clamp as i32;
        sums.first[chunk.len()] = dim(first, "blocks")?;
        sums.count = chunk.len() as i32;
        let mut params = [&mut *table as *mut FinalizeTable as *mut c_void];
        k.launch(
            &prepared[chunk[0]].1,
            dim(blocks, "blocks")? as u32,
            stream,
            &mut params,
        )?;
        let out = Tensor::f_empty([chunk.len() as i64 + 1], (Kind::Double, device))?;
        let (mut pp, mut op) = (partial.data_ptr(), out.data_ptr());
        let mut params = [
            &mut *sums as *mut SumTable as *mut c_void,
            &mut pp as *mut PtrMut as *mut c_void,
            &mut op as *mut PtrMut as *mut c_void,
        ];
        k.launch("segment_sums_f64", 1, stream, &mut params)?;
        let index: Vec<i64> = chunk.iter().map(|&p| prepared[p].0 as i64).collect();
        let index = Tensor::f_from_slice(&index)?.f_to_device(device)?;
        let mut sq = sq_norms.shallow_clone();
        let _ = sq.f_index_copy_(0, &index, &out.f_narrow(0, 0, chunk.len() as i64)?)?;
    }
    Ok(FinalizeOut {
        omegas: results,
        sq_norms,
    })
}

/// One penalty term: the tensors of `importance_penalty`.
pub struct PenaltyMat<'a> {
    pub omega: &'a Tensor,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub reference: Option<(&'a Tensor, &'a Tensor)>,
    pub scaling: f64,
    pub scaling_ref: f64,
    pub weight: f64,
    pub f64_math: bool,
}

pub struct PenaltyManyOut {
    /// Σ weight·P over all matrices, a 0-d tensor in compute precision.
    pub total: Tensor,
    /// weight·(∂P/∂A, ∂P/∂B) per matrix, in compute precision.
    pub grads: Option<Vec<(Tensor, Tensor)>>,
}

/// Σ_l w_l·P_l and every w_l·∂P_l in one pass over each Ω (plus a small reduction launch).
pub fn penalty_many(
    k: &Kernels,
    stream: u64,
    mats: &[PenaltyMat],
    grads: bool,
) -> Result<PenaltyManyOut> {
    k.enter()?;
    let first = mats
        .first()
        .ok_or_else(|| Error::value("Omega must hold at least one matrix"))?;
    let device = first.omega.device();
    let any_f64 = mats.iter().any(|m| m.f64_math);
    let total_kind = math_kind(any_f64);
    // Weights of both signs: the matrices' values can cancel each other, so every block sums
    // its value from D in double.
    let weights: Vec<f64> = mats.iter().map(|m| m.weight).collect();
    let exact = crate::cancellation::mixed_signs(&weights);
    let mut totals = Vec::new();
    let mut grad_out = Vec::with_capacity(mats.len());
    struct Prepared {
        index: usize,
        name: String,
        omega: Tensor,
        factors: Vec<Tensor>,
        mode: i32,
        mkind: Kind,
    }
    let mut prepared = Vec::new();
    for (index, m) in mats.iter().enumerate() {
        let mkind = math_kind(m.f64_math);
        let (out, r, inn) = (m.b.size()[0], m.a.size()[0], m.a.size()[1]);
        let empty = out == 0 || inn == 0;
        if grads {
            // The grads kernel writes every element; only an empty Ω leaves them at zero.
            let new = |shape: [i64; 2]| -> Result<Tensor> {
                Ok(if empty {
                    Tensor::f_zeros(shape, (mkind, device))?
                } else {
                    Tensor::f_empty(shape, (mkind, device))?
                })
            };
            grad_out.push((new([r, inn])?, new([out, r])?));
        }
        if empty {
            continue;
        }
        let mut fs = vec![m.a, m.b];
        let mode = match m.reference {
            None => 0,
            Some((ar, br)) => {
                fs.extend([ar, br]);
                if m.scaling_ref == m.scaling {
                    1
                } else {
                    2
                }
            }
        };
        let (factors, fkind) = factor_set(&fs, mkind)?;
        let omega = contiguous(m.omega)?;
        let name = format!(
            "penalty_{}_{}",
            kind_tag(fkind)?,
            kind_tag(omega.f_kind()?)?
        );
        prepared.push(Prepared {
            index,
            name,
            omega,
            factors,
            mode,
            mkind,
        });
    }
    let names: Vec<&str> = prepared.iter().map(|p| p.name.as_str()).collect();
    for chunk in &launches(&names) {
        let mkind = prepared[chunk[0]].mkind;
        let f64_math = mkind == Kind::Double;
        let elem = if f64_math { 8 } else { 4 };
        let rows_per_tile = penalty_rows(f64_math);
        // Layout: per matrix its gB and gA partials, then one value partial and one flag per block.
        let mut ws = Workspace::new();
        let mut blocks = 0usize;
        let mut shapes = Vec::new();
        for &p in chunk {
            let s = prepared[p].omega.size();
            let (out, inn) = (s[0] as usize, s[1] as usize);
            let r = prepared[p].factors[0].size()[0] as usize;
            let (tr, tc) = (ceil_div(out, rows_per_tile), ceil_div(inn, TILE_COLS));
            let (gb_bytes, ga_bytes) = if grads {
                (tc * out * r * elem, tr * r * inn * elem)
            } else {
                (0, 0)
            };
            let gb_at = ws.reserve(gb_bytes);
            let ga_at = ws.reserve(ga_bytes);
            shapes.push((out, inn, r, tr, tc, gb_at, ga_at, blocks));
            blocks += tr * tc;
        }
        let values_at = ws.reserve(blocks * 8);
        let flags_at = ws.reserve(blocks * 4);
        let base = ws.allocate(device)?;
        let mut table = tables::zeroed::<PenaltyTable>();
        let mut gtable = tables::zeroed::<GradTable>();
        let mut sums = tables::zeroed::<SumTable>();
        let mut grad_blocks = 0usize;
        for (slot, &p) in chunk.iter().enumerate() {
            let pr = &prepared[p];
            let m = &mats[pr.index];
            let (out, inn, r, tr, tc, gb_at, ga_at, first) = shapes[slot];
            let f = &pr.factors;
            let (a_ref, b_ref) = if f.len() == 4 {
                (ptr(&f[2]), ptr(&f[3]))
            } else {
                (std::ptr::null(), std::ptr::null())
            };
            table.m[slot] = PenaltyEntry {
                omega: ptr(&pr.omega),
                a: ptr(&f[0]),
                b: ptr(&f[1]),
                a_ref,
                b_ref,
                gb_part: at(&base, gb_at),
                ga_part: at(&base, ga_at),
                value_part: (at(&base, values_at) as *mut f64).wrapping_add(first),
                block_exact: (at(&base, flags_at) as *mut i32).wrapping_add(first),
                out: dim(out, "out")?,
                inn: dim(inn, "in")?,
                r: dim(r, "r")?,
                tiles_col: dim(tc, "tiles")?,
                first_block: dim(first, "blocks")?,
                mode: pr.mode,
                scaling: m.scaling,
                scaling_ref: m.scaling_ref,
            };
            sums.first[slot] = dim(first, "blocks")?;
            sums.weight[slot] = m.weight;
            if grads {
                let (ga, gb) = &grad_out[pr.index];
                gtable.m[slot] = GradEntry {
                    gb_part: at(&base, gb_at),
                    ga_part: at(&base, ga_at),
                    grad_b: ptr_mut(gb),
                    grad_a: ptr_mut(ga),
                    out: dim(out, "out")?,
                    inn: dim(inn, "in")?,
                    r: dim(r, "r")?,
                    tiles_row: dim(tr, "tiles")?,
                    tiles_col: dim(tc, "tiles")?,
                    first_block: dim(grad_blocks, "blocks")?,
                    scale: 2.0 * m.scaling * m.weight,
                };
                grad_blocks += ceil_div(out * r + r * inn, THREADS as usize);
            }
        }
        let n = chunk.len();
        table.count = n as i32;
        table.grads = grads as i32;
        table.exact = exact as i32;
        gtable.count = n as i32;
        sums.first[n] = dim(blocks, "blocks")?;
        sums.count = n as i32;
        let name = &prepared[chunk[0]].name;
        let mut params = [&mut *table as *mut PenaltyTable as *mut c_void];
        k.launch(name, dim(blocks, "blocks")? as u32, stream, &mut params)?;
        if grads {
            let tag = if f64_math { "f64" } else { "f32" };
            let mut params = [&mut *gtable as *mut GradTable as *mut c_void];
            let gname = format!("penalty_grads_{tag}");
            k.launch(
                &gname,
                dim(grad_blocks, "blocks")? as u32,
                stream,
                &mut params,
            )?;
        }
        let values = Tensor::f_empty([n as i64 + 1], (Kind::Double, device))?;
        let (mut pp, mut op) = (at(&base, values_at), values.data_ptr());
        let mut params = [
            &mut *table as *mut PenaltyTable as *mut c_void,
            &mut *sums as *mut SumTable as *mut c_void,
            &mut pp as *mut PtrMut as *mut c_void,
            &mut op as *mut PtrMut as *mut c_void,
        ];
        let sname = name.replacen("penalty_", "penalty_sums_", 1);
        k.launch(&sname, 1, stream, &mut params)?;
        totals.push(values.f_select(0, n as i64)?);
    }
    // The groups' totals (float64) added, then rounded once.
    let mut total = match totals.pop() {
        None => Tensor::f_zeros([], (Kind::Double, device))?,
        Some(t) => t,
    };
    for t in totals {
        total = total.f_add(&t)?;
    }
    let total = in_kind(total, total_kind)?;
    Ok(PenaltyManyOut {
        total,
        grads: grads.then_some(grad_out),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_group_by_kernel_and_split_at_the_table_size() {
        let names: Vec<&str> = (0..140)
            .map(|i| if i % 70 == 3 { "b" } else { "a" })
            .collect();
        let got = launches(&names);
        let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![MAX_MATS, MAX_MATS, 138 - 2 * MAX_MATS, 2]);
        assert!(got[..3].iter().flatten().all(|&i| names[i] == "a"));
        assert_eq!(got[3], vec![3, 73]);
        let mut all: Vec<usize> = got.into_iter().flatten().collect();
        all.sort_unstable();
        assert_eq!(all, (0..140).collect::<Vec<_>>());
    }
}
