//! The three op families on the CUDA kernels: parameter tables filled from the jobs' tensors
//! (their own device pointers), one launch per dtype group of up to `MAX_MATS` matrices.
//! Inputs the kernels cannot read directly (a strided tensor, factors of mixed dtypes) are
//! made contiguous / converted by the provider first — rare, and never the (out, in) maths.
//! Everything here runs with the GIL held (the provider may call torch from Python); the
//! launches themselves are asynchronous, on torch's current stream.

use super::tables::{self, *};
use super::Kernels;
use crate::error::{Error, Result};
use crate::providers::{Arg, Made, Provider};
use crate::tensor::{math_dtype, DType, Device, TensorRef};
use pyo3::Python;
use std::ffi::c_void;

fn dtype_tag(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F64 => Ok("f64"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        DType::Other(name) => Err(Error::type_(format!("no CUDA kernel for dtype {name}"))),
    }
}

fn dim(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x)
        .map_err(|_| Error::value(format!("{what} = {x} is too large for the CUDA kernels")))
}

fn ptr(t: &TensorRef) -> Ptr {
    t.ptr as Ptr
}

fn ptr_mut(t: &TensorRef) -> PtrMut {
    t.ptr as PtrMut
}

/// A tensor a kernel reads: the caller's when it can (no copy), or the provider's converted copy.
enum Input {
    Caller(TensorRef),
    Copy(Made),
}

impl Input {
    fn view(&self) -> &TensorRef {
        match self {
            Input::Caller(v) => v,
            Input::Copy(m) => &m.view,
        }
    }
}

/// `arg` contiguous in `dtype`: itself when it is (no provider call), else a converted copy.
fn readable(py: Python<'_>, p: &dyn Provider, arg: &Arg, dtype: DType) -> Result<Input> {
    if arg.view.dtype == dtype && arg.view.is_contiguous() {
        Ok(Input::Caller(arg.view.clone()))
    } else {
        Ok(Input::Copy(p.converted(py, arg, dtype)?))
    }
}

/// Factors a kernel can read: contiguous, one shared dtype (else all converted to `math`).
/// float64 maths always reads float64 factors: the kernels' maths type follows the factors'.
fn factor_set(
    py: Python<'_>,
    p: &dyn Provider,
    factors: &[&Arg],
    math: DType,
) -> Result<(Vec<Input>, DType)> {
    let dtype = factors[0].view.dtype;
    let same = factors.iter().all(|f| f.view.dtype == dtype);
    let target = if same && math != DType::F64 {
        dtype
    } else {
        math
    };
    // Only a conversion needs a new tensor: a model's ~100 factors are usually ready, and each
    // provider call costs microseconds of CPU per call, while the GPU waits for the launch.
    let out = factors
        .iter()
        .map(|f| readable(py, p, f, target))
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
    /// Float64 elements enough for the reserved bytes (the providers make no byte tensors).
    fn allocate(&self, py: Python<'_>, p: &dyn Provider, device: Device) -> Result<Made> {
        p.empty(py, &[self.bytes.max(256).div_ceil(8)], DType::F64, device)
    }
}

fn at(base: &Made, offset: usize) -> PtrMut {
    // SAFETY (of later use): `offset` lies inside `base`, reserved by `Workspace`.
    (base.view.ptr as *mut u8).wrapping_add(offset) as PtrMut
}

/// One ω update: the arguments of `accumulate_omega_`.
pub struct OmegaMat<'a, 'py> {
    pub omega: &'a Arg<'py>,
    pub factors: [&'a Arg<'py>; 6], // a0, b0, ga, gb, a1, b1
    pub lr: f64,
    pub scaling: f64,
    pub f64_math: bool,
}

/// ω ← ω − g~ ⊙ dθ for every matrix, in place.
pub fn omega_many(
    py: Python<'_>,
    p: &dyn Provider,
    k: &Kernels,
    stream: u64,
    mats: &[OmegaMat],
    clamp: bool,
) -> Result<()> {
    k.enter()?;
    struct Prepared<'m> {
        name: String,
        omega: Input, // contiguous (a copy when the caller's is strided)
        factors: Vec<Input>,
        copy_back: Option<&'m Arg<'m>>,
        lr: f64,
        scaling: f64,
    }
    let mut prepared = Vec::new();
    for m in mats {
        let Some((out, inn)) = m.omega.view.dims2() else {
            continue;
        };
        if out == 0 || inn == 0 {
            continue;
        }
        let (factors, fdtype) = factor_set(py, p, &m.factors, math_dtype(m.f64_math))?;
        let w = m.omega.view.dtype;
        let omega = readable(py, p, m.omega, w)?;
        let copy_back = matches!(omega, Input::Copy(_)).then_some(m.omega);
        prepared.push(Prepared {
            name: format!("omega_{}_{}", dtype_tag(fdtype)?, dtype_tag(w)?),
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
            let pr = &prepared[i];
            let omega = pr.omega.view();
            let (out, inn) = (omega.sizes[0], omega.sizes[1]);
            let f: Vec<&TensorRef> = pr.factors.iter().map(Input::view).collect();
            let r = f[0].sizes[0];
            let tiles_col = ceil_div(inn, TILE_COLS);
            table.m[slot] = OmegaEntry {
                omega: ptr_mut(omega),
                a0: ptr(f[0]),
                b0: ptr(f[1]),
                ga: ptr(f[2]),
                gb: ptr(f[3]),
                a1: ptr(f[4]),
                b1: ptr(f[5]),
                out: dim(out, "out")?,
                inn: dim(inn, "in")?,
                r: dim(r, "r")?,
                tiles_col: dim(tiles_col, "tiles")?,
                first_block: dim(blocks, "blocks")?,
                pad: 0,
                lr: pr.lr,
                scaling: pr.scaling,
            };
            blocks += ceil_div(out, OMEGA_ROWS) * tiles_col;
        }
        table.count = chunk.len() as i32;
        table.clamp_negative = clamp as i32;
        let mut params = [&mut *table as *mut OmegaTable as *mut c_void];
        let name = &prepared[chunk[0]].name;
        k.launch(name, dim(blocks, "blocks")? as u32, stream, &mut params)?;
    }
    for pr in prepared {
        if let (Some(dst), Input::Copy(updated)) = (pr.copy_back, &pr.omega) {
            p.copy_into(py, dst, updated)?;
        }
    }
    Ok(())
}

/// One finalization: the arguments of `finalize_importance`.
pub struct FinalizeMat<'a, 'py> {
    pub omega: &'a Arg<'py>,
    pub a: &'a Arg<'py>,
    pub b: &'a Arg<'py>,
    pub start: Option<(&'a Arg<'py>, &'a Arg<'py>)>,
    pub scaling: f64,
    pub xi: f64,
    pub f64_math: bool,
}

pub struct FinalizeOut {
    pub omegas: Vec<Made>,
    /// ‖Ω‖² per matrix (float64, on the device).
    pub sq_norms: Made,
}

/// Ω = max(ω, 0)/(Δ² + ξ) for every matrix, and ‖Ω‖² per matrix from the same pass.
pub fn finalize_many(
    py: Python<'_>,
    p: &dyn Provider,
    k: &Kernels,
    stream: u64,
    mats: &[FinalizeMat],
    clamp: bool,
) -> Result<FinalizeOut> {
    k.enter()?;
    let device = mats
        .first()
        .map(|m| m.omega.view.device)
        .ok_or_else(|| Error::value("omega must hold at least one matrix"))?;
    let sq_norms = p.zeros(py, &[mats.len()], DType::F64, device)?;
    let mut results = Vec::with_capacity(mats.len());
    let mut prepared = Vec::new(); // (index, name, omega, factors)
    for (i, m) in mats.iter().enumerate() {
        let omega = readable(py, p, m.omega, m.omega.view.dtype)?;
        results.push(p.empty(py, &m.omega.view.sizes, m.omega.view.dtype, device)?);
        if omega.view().numel() == 0 {
            continue;
        }
        let mut fs = vec![m.a, m.b];
        if let Some((a0, b0)) = m.start {
            fs.extend([a0, b0]);
        }
        let (factors, fdtype) = factor_set(py, p, &fs, math_dtype(m.f64_math))?;
        let name = format!(
            "finalize_{}_{}",
            dtype_tag(fdtype)?,
            dtype_tag(omega.view().dtype)?
        );
        prepared.push((i, name, omega, factors));
    }
    let names: Vec<&str> = prepared.iter().map(|p| p.1.as_str()).collect();
    for chunk in &launches(&names) {
        // Block counts first: one Σ Ω² partial per block.
        let tiles: Vec<usize> = chunk
            .iter()
            .map(|&p| {
                let s = &prepared[p].2.view().sizes;
                ceil_div(s[0], FINALIZE_ROWS) * ceil_div(s[1], TILE_COLS)
            })
            .collect();
        let blocks: usize = tiles.iter().sum();
        let partial = p.empty(py, &[blocks], DType::F64, device)?;
        let mut table = tables::zeroed::<FinalizeTable>();
        let mut sums = tables::zeroed::<SumTable>();
        let mut first = 0usize;
        for (slot, &pi) in chunk.iter().enumerate() {
            let (i, _, omega, f) = &prepared[pi];
            let omega = omega.view();
            let (out, inn) = (omega.sizes[0], omega.sizes[1]);
            let m = &mats[*i];
            let (a_start, b_start) = if f.len() == 4 {
                (ptr(f[2].view()), ptr(f[3].view()))
            } else {
                (std::ptr::null(), std::ptr::null())
            };
            table.m[slot] = FinalizeEntry {
                omega: ptr(omega),
                result: ptr_mut(&results[*i].view),
                a: ptr(f[0].view()),
                b: ptr(f[1].view()),
                a_start,
                b_start,
                sq_partial: (partial.view.ptr as *mut f64).wrapping_add(first),
                out: dim(out, "out")?,
                inn: dim(inn, "in")?,
                r: dim(f[0].view().sizes[0], "r")?,
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
        let out = p.empty(py, &[chunk.len() + 1], DType::F64, device)?;
        let (mut pp, mut op) = (partial.view.ptr as PtrMut, out.view.ptr as PtrMut);
        let mut params = [
            &mut *sums as *mut SumTable as *mut c_void,
            &mut pp as *mut PtrMut as *mut c_void,
            &mut op as *mut PtrMut as *mut c_void,
        ];
        k.launch("segment_sums_f64", 1, stream, &mut params)?;
        // The chunk's sums (its first chunk.len() elements) into their matrices' places.
        let index: Vec<i64> = chunk.iter().map(|&pi| prepared[pi].0 as i64).collect();
        p.index_copy(py, &sq_norms, &index, &out)?;
    }
    Ok(FinalizeOut {
        omegas: results,
        sq_norms,
    })
}

/// One penalty term: the arguments of `importance_penalty`.
pub struct PenaltyMat<'a, 'py> {
    pub omega: &'a Arg<'py>,
    pub a: &'a Arg<'py>,
    pub b: &'a Arg<'py>,
    pub reference: Option<(&'a Arg<'py>, &'a Arg<'py>)>,
    pub scaling: f64,
    pub scaling_ref: f64,
    pub weight: f64,
    pub f64_math: bool,
    /// The dtype of this term's gradients (float32 also where a tiny matrix ran float64 maths).
    pub result: DType,
}

pub struct PenaltyManyOut {
    /// Σ weight·P over all matrices, a 0-d tensor: float64 if any term's results are.
    pub total: Made,
    /// weight·(∂P/∂A, ∂P/∂B) per matrix, in each term's result dtype.
    pub grads: Option<Vec<(Made, Made)>>,
}
/// Σ_l w_l·P_l and every w_l·∂P_l in one pass over each Ω (plus a small reduction launch).
pub fn penalty_many(
    py: Python<'_>,
    p: &dyn Provider,
    k: &Kernels,
    stream: u64,
    mats: &[PenaltyMat],
    grads: bool,
) -> Result<PenaltyManyOut> {
    k.enter()?;
    let first = mats
        .first()
        .ok_or_else(|| Error::value("Omega must hold at least one matrix"))?;
    let device = first.omega.view.device;
    let total_dtype = math_dtype(mats.iter().any(|m| m.result == DType::F64));
    // Weights of both signs: the matrices' values can cancel each other, so every block sums
    // its value from D in double.
    let weights: Vec<f64> = mats.iter().map(|m| m.weight).collect();
    let exact = crate::cancellation::mixed_signs(&weights);
    let mut totals = Vec::new();
    let mut grad_out = Vec::with_capacity(mats.len());
    struct Prepared {
        index: usize,
        name: String,
        omega: Input,
        factors: Vec<Input>,
        mode: i32,
        mdtype: DType,
    }
    let mut prepared = Vec::new();
    for (index, m) in mats.iter().enumerate() {
        let mdtype = math_dtype(m.f64_math);
        let (out, r, inn) = (m.b.view.sizes[0], m.a.view.sizes[0], m.a.view.sizes[1]);
        let empty = out == 0 || inn == 0;
        if grads {
            // The grads kernel writes every element; only an empty Ω leaves them at zero.
            let new = |shape: [usize; 2]| -> Result<Made> {
                if empty {
                    p.zeros(py, &shape, mdtype, device)
                } else {
                    p.empty(py, &shape, mdtype, device)
                }
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
        let (factors, fdtype) = factor_set(py, p, &fs, mdtype)?;
        let omega = readable(py, p, m.omega, m.omega.view.dtype)?;
        let name = format!(
            "penalty_{}_{}",
            dtype_tag(fdtype)?,
            dtype_tag(omega.view().dtype)?
        );
        prepared.push(Prepared {
            index,
            name,
            omega,
            factors,
            mode,
            mdtype,
        });
    }
    let names: Vec<&str> = prepared.iter().map(|p| p.name.as_str()).collect();
    for chunk in &launches(&names) {
        let mdtype = prepared[chunk[0]].mdtype;
        let f64_math = mdtype == DType::F64;
        let elem = if f64_math { 8 } else { 4 };
        let rows_per_tile = penalty_rows(f64_math);
        // Layout: per matrix its gB and gA partials, then one value partial and one flag per block.
        let mut ws = Workspace::new();
        let mut blocks = 0usize;
        let mut shapes = Vec::new();
        for &pi in chunk {
            let s = &prepared[pi].omega.view().sizes;
            let (out, inn) = (s[0], s[1]);
            let r = prepared[pi].factors[0].view().sizes[0];
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
        let base = ws.allocate(py, p, device)?;
        let mut table = tables::zeroed::<PenaltyTable>();
        let mut gtable = tables::zeroed::<GradTable>();
        let mut sums = tables::zeroed::<SumTable>();
        let mut grad_blocks = 0usize;
        for (slot, &pi) in chunk.iter().enumerate() {
            let pr = &prepared[pi];
            let m = &mats[pr.index];
            let (out, inn, r, tr, tc, gb_at, ga_at, first) = shapes[slot];
            let f: Vec<&TensorRef> = pr.factors.iter().map(Input::view).collect();
            let (a_ref, b_ref) = if f.len() == 4 {
                (ptr(f[2]), ptr(f[3]))
            } else {
                (std::ptr::null(), std::ptr::null())
            };
            table.m[slot] = PenaltyEntry {
                omega: ptr(pr.omega.view()),
                a: ptr(f[0]),
                b: ptr(f[1]),
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
                    grad_b: ptr_mut(&gb.view),
                    grad_a: ptr_mut(&ga.view),
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
        let values = p.empty(py, &[n + 1], DType::F64, device)?;
        let (mut pp, mut op) = (at(&base, values_at), values.view.ptr as PtrMut);
        let mut params = [
            &mut *table as *mut PenaltyTable as *mut c_void,
            &mut *sums as *mut SumTable as *mut c_void,
            &mut pp as *mut PtrMut as *mut c_void,
            &mut op as *mut PtrMut as *mut c_void,
        ];
        let sname = name.replacen("penalty_", "penalty_sums_", 1);
        k.launch(&sname, 1, stream, &mut params)?;
        totals.push(p.select(py, &values, n)?);
    }
    // The groups' totals (float64) added, then rounded once.
    let mut total = match totals.pop() {
        None => p.zeros(py, &[], DType::F64, device)?,
        Some(t) => t,
    };
    for t in totals {
        total = p.add(py, &total, &t)?;
    }
    let total = p.cast(py, total, total_dtype)?;
    // Each term's gradients in its result dtype (a tiny matrix ran float64 maths).
    let grads = if grads {
        let mut out = Vec::with_capacity(grad_out.len());
        for ((ga, gb), m) in grad_out.into_iter().zip(mats) {
            out.push((p.cast(py, ga, m.result)?, p.cast(py, gb, m.result)?));
        }
        Some(out)
    } else {
        None
    };
    Ok(PenaltyManyOut { total, grads })
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
