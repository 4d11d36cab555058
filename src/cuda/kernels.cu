// hlora's fused CUDA kernels (DESIGN §1), compiled at first use by NVRTC (src/cuda/mod.rs).
//
// Every kernel covers many matrices in one launch: its one parameter is a table of per-matrix
// pointers (multi-tensor apply), passed by value as a __grid_constant__ so it stays in the
// parameter bank. A block finds its matrix by a scan over the table's first-block offsets.
// Tiles are TM rows x TN columns of the (out, in) matrix; 256 threads: thread (tx, ty) owns
// column tx and rows ty*RPT .. ty*RPT+RPT-1 of the tile, so each warp reads/writes 32
// consecutive elements of a row (coalesced) and reads the same left factors (broadcast).
// The low-rank products are formed in registers from the rank-r factors, k in chunks of KC.
//
// No headers: bfloat16/float16 are converted by hand, so the program needs no include path.
// The host mirrors these structs (#[repr(C)] in src/cuda/tables.rs); HL_*_BYTES, defined by
// the host at compile time, make a layout mismatch a compile error instead of a wrong result.
//
// One file on purpose: NVRTC compiles a single source string (and the CPU emulator includes
// it whole), and the three families share the tile helpers and conversions at its top.

#define HL_THREADS 256
#define HL_TN 128
#define HL_KC 8
#ifndef HL_MAX_MATS
#define HL_MAX_MATS 64
#endif
// Tuning knobs HL_{OMEGA,FINALIZE,PENALTY}_MIN_BLOCKS: blocks per multiprocessor the compiler
// must fit (__launch_bounds__' second argument) — fewer registers per thread, more blocks in
// flight, a few bytes spilled. 4 measured fastest on an H200 for all three (64 registers; ω
// update 2.04 against 2.21 ms per call at LLaMA-3.2-3B's shapes, Ω 3.22 against 3.55, penalty
// 1.97 against 2.09: scripts/gpu_variants.py, docs/gpu_check.md). 0 leaves the choice to ptxas.
// Set at run time through HLORA_CUDA_DEFINES (src/cuda/mod.rs) to time variants.
#ifndef HL_OMEGA_MIN_BLOCKS
#define HL_OMEGA_MIN_BLOCKS 4
#endif
#ifndef HL_FINALIZE_MIN_BLOCKS
#define HL_FINALIZE_MIN_BLOCKS 4
#endif
#ifndef HL_PENALTY_MIN_BLOCKS
#define HL_PENALTY_MIN_BLOCKS 4
#endif
#if HL_OMEGA_MIN_BLOCKS > 0
#define HL_OMEGA_BOUNDS __launch_bounds__(HL_THREADS, HL_OMEGA_MIN_BLOCKS)
#else
#define HL_OMEGA_BOUNDS __launch_bounds__(HL_THREADS)
#endif
#if HL_FINALIZE_MIN_BLOCKS > 0
#define HL_FINALIZE_BOUNDS __launch_bounds__(HL_THREADS, HL_FINALIZE_MIN_BLOCKS)
#else
#define HL_FINALIZE_BOUNDS __launch_bounds__(HL_THREADS)
#endif
#if HL_PENALTY_MIN_BLOCKS > 0
#define HL_PENALTY_BOUNDS __launch_bounds__(HL_THREADS, HL_PENALTY_MIN_BLOCKS)
#else
#define HL_PENALTY_BOUNDS __launch_bounds__(HL_THREADS)
#endif

struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

template <typename M> __device__ __forceinline__ M ld(const float* p, long long i) { return (M)p[i]; }
template <typename M> __device__ __forceinline__ M ld(const double* p, long long i) { return (M)p[i]; }
template <typename M> __device__ __forceinline__ M ld(const bf16_t* p, long long i) {
    return (M)__uint_as_float(((unsigned int)p[i].bits) << 16);
}
#ifndef HL_HOST_EMULATION  // the emulator (emulator.cpp) brings its own
__device__ __forceinline__ float hl_half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#endif
template <typename M> __device__ __forceinline__ M ld(const f16_t* p, long long i) {
    return (M)hl_half_to_float(p[i].bits);
}

__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(float* p, long long i, double v) { p[i] = (float)v; }
__device__ __forceinline__ void st(double* p, long long i, double v) { p[i] = v; }
__device__ __forceinline__ void st(double* p, long long i, float v) { p[i] = (double)v; }

// The block's matrix: the last entry whose first block is <= blockIdx.x (entries are sorted).
// A binary search: every block does this before its first load, and a model has ~60 matrices.
template <typename Table>
__device__ __forceinline__ int find_matrix(const Table& t) {
    int lo = 0, hi = t.count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if ((int)blockIdx.x >= t.m[mid].first_block) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Rows row_first .. row_first + RPT − 1 of column j of a (rows, cols) matrix, 0 outside it.
// Called first, so all the loads of ω — a kernel's only large traffic — are in flight while the
// low-rank products are formed (issued one row at a time after the products, each thread waited
// for each in turn and the ω update ran at a tenth of the memory's speed on an H200).
template <typename M, int RPT, typename T>
__device__ __forceinline__ void read_column(M (&v)[RPT], const T* p, int row_first, int rows, int cols, int j) {
#pragma unroll
    for (int q = 0; q < RPT; ++q) {
        const int row = row_first + q;
        v[q] = j < cols && row < rows ? ld<M>(p, (long long)row * cols + j) : (M)0;
    }
}

// Left-factor values of one (row, k), read together: one 16-byte shared load in float, which
// the whole warp shares (broadcast), instead of one load per value.
template <typename M> struct alignas(4 * sizeof(M)) Quad { M x, y, z, w; };
template <typename M> struct alignas(2 * sizeof(M)) Pair { M x, y; };

// Tile `tile` of a matrix (its index, tile row and column, first row and column) and this
// thread's place in it: column tx (global column j) and the row group ty.
struct Tile { int tile, trow, tcol, row0, col0, tx, ty, j; };
template <int TM, typename Entry>
__device__ __forceinline__ Tile tile_at(const Entry& e, int tile) {
    const int trow = tile / e.tiles_col, tcol = tile % e.tiles_col;
    const int tx = threadIdx.x % HL_TN, ty = threadIdx.x / HL_TN;
    return Tile{tile, trow, tcol, trow * TM, tcol * HL_TN, tx, ty, tcol * HL_TN + tx};
}

// This block's tile of its matrix.
template <int TM, typename Entry>
__device__ __forceinline__ Tile tile_of(const Entry& e) {
    return tile_at<TM>(e, blockIdx.x - e.first_block);
}

// Deterministic block sum (fixed tree order); the result is valid in thread 0.
__device__ double block_sum(double v) {
    __shared__ double warp_sums[HL_THREADS / 32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // warp_sums may still be read by a previous call
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    double s = 0.0;
    if (threadIdx.x == 0)
        for (int w = 0; w < HL_THREADS / 32; ++w) s += warp_sums[w];
    return s;
}

// ---------------------------------------------------------------------------------------
// ω accumulation (Eq. 11-12): ω -= g~ ⊙ dθ with
//   g~ = s·(gB·(A0 − η·gA) + B0·gA),   dθ = s·((B1 − B0)·A1 + B0·(A1 − A0)).
// One read and one write of ω; everything else comes from the rank-r factors.
struct OmegaEntry {
    void* omega;  // (out, in), W
    const void* a0; const void* b0; const void* ga; const void* gb; const void* a1; const void* b1;
    int out, in, r, tiles_col;
    int first_block, pad;
    double lr, scaling;
};
struct OmegaTable { OmegaEntry m[HL_MAX_MATS]; int count; int clamp_negative; };

template <typename F, typename W, typename M>
__device__ void omega_update(const OmegaTable& t) {
    constexpr int TM = 16, RPT = TM / (HL_THREADS / HL_TN);
    __shared__ Quad<M> left[TM][HL_KC];  // gB, B0, B1 − B0 (w unused)
    const OmegaEntry e = t.m[find_matrix(t)];
    const Tile tl = tile_of<TM>(e);
    const int row0 = tl.row0, ty = tl.ty, j = tl.j;
    const bool col_ok = j < e.in;
    W* omega = (W*)e.omega;
    M w[RPT];
    read_column(w, (const W*)omega, row0 + ty * RPT, e.out, e.in, j);
    const F *a0 = (const F*)e.a0, *b0 = (const F*)e.b0, *ga = (const F*)e.ga;
    const F *gb = (const F*)e.gb, *a1 = (const F*)e.a1, *b1 = (const F*)e.b1;
    const M eta = (M)e.lr;
    M g[RPT], d[RPT];
#pragma unroll
    for (int q = 0; q < RPT; ++q) { g[q] = 0; d[q] = 0; }
    for (int k0 = 0; k0 < e.r; k0 += HL_KC) {
        __syncthreads();  // the previous chunk's left factors are consumed
        for (int idx = threadIdx.x; idx < TM * HL_KC; idx += HL_THREADS) {
            const int i = idx / HL_KC, kk = idx % HL_KC, row = row0 + i, k = k0 + kk;
            M vg = 0, v0 = 0, v1 = 0;
            if (row < e.out && k < e.r) {
                const long long o = (long long)row * e.r + k;
                vg = ld<M>(gb, o); v0 = ld<M>(b0, o); v1 = ld<M>(b1, o);
            }
            left[i][kk] = Quad<M>{vg, v0, v1 - v0, (M)0};
        }
        __syncthreads();
        // k outer, rows inner: four right-factor values live at a time, not 4·KC.
#pragma unroll
        for (int kk = 0; kk < HL_KC; ++kk) {
            const int k = k0 + kk;
            M va0 = 0, vga = 0, va1 = 0;
            if (col_ok && k < e.r) {
                const long long o = (long long)k * e.in + j;
                va0 = ld<M>(a0, o); vga = ld<M>(ga, o); va1 = ld<M>(a1, o);
            }
            const M rg1 = va0 - eta * vga, rd2 = va1 - va0;
#pragma unroll
            for (int q = 0; q < RPT; ++q) {
                const Quad<M> l = left[ty * RPT + q][kk];  // gB, B0, B1 − B0
                g[q] += l.x * rg1 + l.y * vga;
                d[q] += l.z * va1 + l.y * rd2;
            }
        }
    }
    if (!col_ok) return;
    const M s2 = (M)e.scaling * (M)e.scaling;
#pragma unroll
    for (int q = 0; q < RPT; ++q) {
        const int row = row0 + ty * RPT + q;
        if (row >= e.out) break;
        M v = w[q] - s2 * g[q] * d[q];
        if (t.clamp_negative && v < (M)0) v = 0;  // NaN stays NaN, as in torch.clamp
        st(omega, (long long)row * e.in + j, v);
    }
}

// ---------------------------------------------------------------------------------------
// Finalization (Eq. 13): Ω = max(ω, 0) / (Δ² + ξ), Δ = s·((B − Bs)·A + Bs·(A − As)) or s·B·A
// for a fresh adapter (no start factors), and per block the partial Σ Ω² for the layer norms.
struct FinalizeEntry {
    const void* omega;  // (out, in), W
    void* result;       // (out, in), W
    const void* a; const void* b; const void* a_start; const void* b_start;  // start: null = fresh
    double* sq_partial;  // one per block of this matrix
    int out, in, r, tiles_col;
    int first_block, pad;
    double scaling, xi;
};
struct FinalizeTable { FinalizeEntry m[HL_MAX_MATS]; int count; int clamp_negative; };

template <typename F, typename W, typename M>
__device__ void finalize(const FinalizeTable& t) {
    constexpr int TM = 16, RPT = TM / (HL_THREADS / HL_TN);
    __shared__ Pair<M> left[TM][HL_KC];  // B − Bs, Bs
    const FinalizeEntry e = t.m[find_matrix(t)];
    const Tile tl = tile_of<TM>(e);
    const int row0 = tl.row0, ty = tl.ty, j = tl.j;
    const bool col_ok = j < e.in, fresh = e.a_start == nullptr;
    M w[RPT];
    read_column(w, (const W*)e.omega, row0 + ty * RPT, e.out, e.in, j);
    const F *a = (const F*)e.a, *b = (const F*)e.b;
    const F *as = (const F*)e.a_start, *bs = (const F*)e.b_start;
    M delta[RPT];
#pragma unroll
    for (int q = 0; q < RPT; ++q) delta[q] = 0;
    for (int k0 = 0; k0 < e.r; k0 += HL_KC) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < TM * HL_KC; idx += HL_THREADS) {
            const int i = idx / HL_KC, kk = idx % HL_KC, row = row0 + i, k = k0 + kk;
            M vb = 0, vs = 0;
            if (row < e.out && k < e.r) {
                const long long o = (long long)row * e.r + k;
                vb = ld<M>(b, o);
                if (!fresh) vs = ld<M>(bs, o);
            }
            left[i][kk] = Pair<M>{vb - vs, vs};
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < HL_KC; ++kk) {  // k outer, rows inner (see omega_update)
            const int k = k0 + kk;
            M va = 0, vs = 0;
            if (col_ok && k < e.r) {
                const long long o = (long long)k * e.in + j;
                va = ld<M>(a, o);
                if (!fresh) vs = ld<M>(as, o);
            }
            const M r2 = va - vs;
#pragma unroll
            for (int q = 0; q < RPT; ++q) {
                const Pair<M> l = left[ty * RPT + q][kk];
                delta[q] += l.x * va + l.y * r2;
            }
        }
    }
    double sq = 0.0;
    if (col_ok) {
        W* result = (W*)e.result;
        const M s = (M)e.scaling, xi = (M)e.xi;
#pragma unroll
        for (int q = 0; q < RPT; ++q) {
            const int row = row0 + ty * RPT + q;
            if (row >= e.out) break;
            const long long o = (long long)row * e.in + j;
            M wq = w[q];
            if (t.clamp_negative && wq < (M)0) wq = 0;
            const M dl = s * delta[q];
            const M v = wq / (dl * dl + xi);
            st(result, o, v);
            sq += (double)v * (double)v;
        }
    }
    sq = block_sum(sq);
    if (threadIdx.x == 0) e.sq_partial[tl.tile] = sq;
}

// ---------------------------------------------------------------------------------------
// Penalty (Eq. 14, 16) forward and backward in one pass over Ω:
//   D = L1·R1 + L2·R2 (rank ≤ 2r; the host picks the cancellation-free form via `mode`),
//   E = Ω ⊙ D, P = Σ Ω·D², and the block's partials of E·Aᵀ (per row) and Bᵀ·E (per column).
// The partials go to a workspace; penalty_grads sums them over tiles in a fixed order, so
// results are bit-for-bit reproducible (no atomics).
//   mode 0: no reference   D = s·B·A                       L1 = s·B, R1 = A, L2 = 0
//   mode 1: s == s_ref     D = s·((B − Br)·A + Br·(A − Ar)) L1 = s·(B − Br), R1 = A, L2 = s·Br, R2 = A − Ar
//   mode 2: s != s_ref     D = (s·B − s_ref·Br)·A + s_ref·Br·(A − Ar)
//                          L1 = s·B − s_ref·Br (scaled_difference), R1 = A, L2 = s_ref·Br, R2 = A − Ar
struct PenaltyEntry {
    const void* omega;  // (out, in), O
    const void* a; const void* b; const void* a_ref; const void* b_ref;
    void* gb_part;  // [tiles_col][out][r], M
    void* ga_part;  // [tiles_row][r][in], M
    double* value_part;  // one per block of this matrix
    int* block_exact;    // one per block: 1 where the value was summed from D in double
    int out, in, r, tiles_col;
    int first_block, mode;
    double scaling, scaling_ref;
};
// Per-matrix block ranges [first[m], first[m + 1]) and weights, for the sums kernels below.
struct SumTable { int first[HL_MAX_MATS + 1]; double weight[HL_MAX_MATS]; int count; int pad; };

// exact: every block sums its value from D in double (the host's weights have both signs).
struct PenaltyTable { PenaltyEntry m[HL_MAX_MATS]; int count; int grads; int exact; int pad; };

template <typename M> struct PenaltyTile { static constexpr int TM = 64; };
template <> struct PenaltyTile<double> { static constexpr int TM = 32; };  // fits 48 KB of shared

// Mode 2's s·B − s_ref·Br, in double as s·(B − Br) + (s − s_ref)·Br: when s ≈ s_ref and B ≈ Br
// both differences are exact (Sterbenz), so nothing cancels (as written, s·B − s_ref·Br would keep
// the two products' roundings, large against their small difference).
__device__ __forceinline__ double scaled_difference(double s, double s_ref, double vb, double vr) {
    return s * (vb - vr) + (s - s_ref) * vr;
}

// P's partial over rows row_first .. row_first+RPT-1 of column j, with D formed in double
// from the factors (the same forms as `mode` above): for blocks whose terms can cancel.
template <typename F, typename O, int RPT>
__device__ double exact_partial(const PenaltyEntry& e, int row_first, int j) {
    if (j >= e.in) return 0.0;
    const F *a = (const F*)e.a, *b = (const F*)e.b;
    const F *ar = (const F*)e.a_ref, *br = (const F*)e.b_ref;
    double p = 0.0;
    for (int q = 0; q < RPT && row_first + q < e.out; ++q) {
        const int row = row_first + q;
        double d = 0.0;
        for (int k = 0; k < e.r; ++k) {
            const long long ob = (long long)row * e.r + k, oa = (long long)k * e.in + j;
            const double va = ld<double>(a, oa), vb = ld<double>(b, ob);
            if (e.mode == 0) { d += e.scaling * vb * va; continue; }
            const double vr = ld<double>(br, ob), l2 = e.scaling_ref * vr;
            const double l1 = e.mode == 1 ? e.scaling * (vb - vr) : scaled_difference(e.scaling, e.scaling_ref, vb, vr);
            d += l1 * va + l2 * (va - ld<double>(ar, oa));
        }
        p += ld<double>((const O*)e.omega, (long long)row * e.in + j) * d * d;
    }
    return p;
}

template <typename F, typename O, typename M>
__device__ void penalty(const PenaltyTable& t) {
    constexpr int TM = PenaltyTile<M>::TM, RPT = TM / (HL_THREADS / HL_TN);
    // E·Aᵀ below: SEG threads share a row of E, thread c summing columns c, c + SEG, ...
    constexpr int SEG = HL_THREADS / TM;
    // E's row pitch: a multiple of 4 (16-byte rows) that is 4 mod 32, so the SEG threads of
    // the 32 / SEG rows a warp reads at once fall on 32 different banks.
    constexpr int EP = HL_TN + 4;
    static_assert(HL_THREADS == 2 * HL_TN, "two row groups: the second's Bᵀ·E is added to the first's");
    __shared__ Pair<M> lf[TM][HL_KC];            // L1, L2 of this chunk
    alignas(16) __shared__ M et[TM][EP];         // E = Ω ⊙ D
    alignas(16) __shared__ M bt[TM][HL_KC];      // B chunk, for Bᵀ·E
    alignas(16) __shared__ M at[HL_TN * HL_KC];  // A chunk as [column][k], for E·Aᵀ; then the
                                                 // second row group's Bᵀ·E as [k][column]
    const PenaltyEntry e = t.m[find_matrix(t)];
    const auto [tile, trow, tcol, row0, col0, tx, ty, j] = tile_of<TM>(e);
    const bool col_ok = j < e.in;
    const F *a = (const F*)e.a, *b = (const F*)e.b;
    const F *ar = (const F*)e.a_ref, *br = (const F*)e.b_ref;
    const M s = (M)e.scaling, sr = (M)e.scaling_ref;
    M dv[RPT];
#pragma unroll
    for (int q = 0; q < RPT; ++q) dv[q] = 0;
    for (int k0 = 0; k0 < e.r; k0 += HL_KC) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < TM * HL_KC; idx += HL_THREADS) {
            const int i = idx / HL_KC, kk = idx % HL_KC, row = row0 + i, k = k0 + kk;
            M l1 = 0, l2 = 0;
            if (row < e.out && k < e.r) {
                const long long o = (long long)row * e.r + k;
                const M vb = ld<M>(b, o);
                if (e.mode == 0) { l1 = s * vb; }
                else if (e.mode == 1) { const M vr = ld<M>(br, o); l1 = s * (vb - vr); l2 = s * vr; }
                else {  // in double: s·B − s_ref·Br loses everything in float when s ≈ s_ref, B ≈ Br
                    const double vr = ld<double>(br, o);
                    l1 = (M)scaled_difference(e.scaling, e.scaling_ref, (double)vb, vr); l2 = sr * (M)vr;
                }
            }
            lf[i][kk] = Pair<M>{l1, l2};
        }
        __syncthreads();
        M r1[HL_KC], r2[HL_KC];
#pragma unroll
        for (int kk = 0; kk < HL_KC; ++kk) {
            const int k = k0 + kk;
            M va = 0, v2 = 0;
            if (col_ok && k < e.r) {
                const long long o = (long long)k * e.in + j;
                va = ld<M>(a, o);
                if (e.mode != 0) v2 = va - ld<M>(ar, o);
            }
            r1[kk] = va; r2[kk] = v2;
        }
#pragma unroll
        for (int q = 0; q < RPT; ++q) {
            const int i = ty * RPT + q;
#pragma unroll
            for (int kk = 0; kk < HL_KC; ++kk) {
                const Pair<M> l = lf[i][kk];
                dv[q] += l.x * r1[kk] + l.y * r2[kk];
            }
        }
    }
    // E = Ω ⊙ D into shared memory (0 outside the matrix), P's partial in double.
    double p = 0.0;
    int negative = 0;
    const O* omega = (const O*)e.omega;
#pragma unroll
    for (int q = 0; q < RPT; ++q) {
        const int row = row0 + ty * RPT + q;
        const M w = col_ok && row < e.out ? ld<M>(omega, (long long)row * e.in + j) : (M)0;
        negative |= w < 0;
        const M ev = w * dv[q];
        p += (double)ev * (double)dv[q];
        et[ty * RPT + q][tx] = ev;
    }
    // With a negative Ω in the block (or weights of both signs) the terms can cancel, and P's
    // error would be float32 D's relative to Σ|Ω|·D², not to P: the value is summed again from
    // D in double. Block-uniform, so the vote's barrier is reached by every thread.
    const bool exact = sizeof(M) == sizeof(double) || __syncthreads_or(negative) || t.exact;
    if (exact && sizeof(M) < sizeof(double)) p = exact_partial<F, O, RPT>(e, row0 + ty * RPT, j);
    p = block_sum(p);
    if (threadIdx.x == 0) {
        e.value_part[tile] = p;
        e.block_exact[tile] = exact;
    }
    if (!t.grads) return;
    M* gb_part = (M*)e.gb_part;
    M* ga_part = (M*)e.ga_part;
    const int erow = threadIdx.x / SEG, seg = threadIdx.x % SEG;  // E·Aᵀ: row erow, columns seg + SEG·n
    for (int k0 = 0; k0 < e.r; k0 += HL_KC) {
        __syncthreads();  // et complete / previous chunk consumed
        for (int idx = threadIdx.x; idx < HL_KC * HL_TN; idx += HL_THREADS) {
            const int kk = idx / HL_TN, jj = idx % HL_TN, k = k0 + kk, col = col0 + jj;
            at[jj * HL_KC + kk] = (k < e.r && col < e.in) ? ld<M>(a, (long long)k * e.in + col) : (M)0;
        }
        for (int idx = threadIdx.x; idx < TM * HL_KC; idx += HL_THREADS) {
            const int i = idx / HL_KC, kk = idx % HL_KC, k = k0 + kk, row = row0 + i;
            bt[i][kk] = (k < e.r && row < e.out) ? ld<M>(b, (long long)row * e.r + k) : (M)0;
        }
        __syncthreads();
        // (Bᵀ·E)[k][j] over this row group's rows: this thread's own column of E (the warp reads
        // 32 consecutive words; B's row is one broadcast).
        M gak[HL_KC];
#pragma unroll
        for (int kk = 0; kk < HL_KC; ++kk) gak[kk] = 0;
#pragma unroll 8
        for (int q = 0; q < RPT; ++q) {
            const M eq = et[ty * RPT + q][tx];
#pragma unroll
            for (int kk = 0; kk < HL_KC; ++kk) gak[kk] += bt[ty * RPT + q][kk] * eq;
        }
        // (E·Aᵀ)[i][k] over the tile's columns: SEG partial sums per row, then summed across
        // the SEG neighbouring lanes (fixed order: deterministic).
        M gbk[HL_KC];
#pragma unroll
        for (int kk = 0; kk < HL_KC; ++kk) gbk[kk] = 0;
#pragma unroll 4
        for (int jj = seg; jj < HL_TN; jj += SEG) {
            const M ej = et[erow][jj];
#pragma unroll
            for (int kk = 0; kk < HL_KC; ++kk) gbk[kk] += ej * at[jj * HL_KC + kk];
        }
#pragma unroll
        for (int o = SEG / 2; o > 0; o >>= 1) {
#pragma unroll
            for (int kk = 0; kk < HL_KC; ++kk) gbk[kk] += __shfl_xor_sync(0xffffffffu, gbk[kk], o);
        }
        if (seg == 0 && row0 + erow < e.out) {
#pragma unroll
            for (int kk = 0; kk < HL_KC; ++kk)
                if (k0 + kk < e.r) gb_part[((long long)tcol * e.out + row0 + erow) * e.r + k0 + kk] = gbk[kk];
        }
        __syncthreads();  // `at` read by all: the second row group's Bᵀ·E goes there
        if (ty == 1) {
#pragma unroll
            for (int kk = 0; kk < HL_KC; ++kk) at[kk * HL_TN + tx] = gak[kk];
        }
        __syncthreads();
        if (ty == 0 && col_ok) {
#pragma unroll
            for (int kk = 0; kk < HL_KC; ++kk)
                if (k0 + kk < e.r) ga_part[((long long)trow * e.r + k0 + kk) * e.in + j] = gak[kk] + at[kk * HL_TN + tx];
        }
    }
}

__device__ __forceinline__ double magnitude(double x) { return x < 0 ? -x : x; }

// Matrix e's blocks [first, last) summed again in order, the float32-D ones (block_exact 0)
// from D in double first; the result is valid in thread 0. Not inlined: a rare path, and
// inlined NVRTC 13.0 emitted a different cubin on every compile (the disk cache compares bytes).
template <typename F, typename O, typename M>
__device__ __noinline__ double resum_blocks(const PenaltyEntry& e, int first, int last, double* partial) {
    constexpr int TM = PenaltyTile<M>::TM, RPT = TM / (HL_THREADS / HL_TN);
    for (int tile = 0; tile < last - first; ++tile) {
        if (e.block_exact[tile]) continue;
        const Tile tl = tile_at<TM>(e, tile);  // as the penalty kernel's block for this tile
        const double q = block_sum(exact_partial<F, O, RPT>(e, tl.row0 + tl.ty * RPT, tl.j));
        if (threadIdx.x == 0) partial[first + tile] = q;
    }
    __syncthreads();  // thread 0's writes seen by all
    double v = 0.0;
    for (int i = first + threadIdx.x; i < last; i += HL_THREADS) v += partial[i];
    return block_sum(v);
}

// The penalty's per-matrix sums (as segment_sums below, in double) and the last word on
// accuracy. Blocks with Ω ≥ 0 kept float32 D (error ~1e-7 of their sum): fine unless that sum
// cancels against negative terms — in the matrix (Ω signed in whole blocks) or across the
// launch's matrices (one matrix's P < 0) — to below a quarter of it; then this one block sums
// them again from D in double. Rare, so one block does it, block by block, in order.
template <typename F, typename O, typename M>
__device__ void penalty_sums(const PenaltyTable& t, const SumTable& st, double* partial, double* out) {
    __shared__ double value[HL_MAX_MATS], kept[HL_MAX_MATS];
    __shared__ int resum[HL_MAX_MATS];
    for (int m = 0; m < st.count; ++m) {
        const PenaltyEntry& e = t.m[m];
        const int first = st.first[m], last = st.first[m + 1];
        double v = 0.0, k = 0.0;
        for (int i = first + threadIdx.x; i < last; i += HL_THREADS) {
            v += partial[i];
            if (!e.block_exact[i - first]) k += partial[i];
        }
        v = block_sum(v);
        k = block_sum(k);
        if (threadIdx.x == 0) { value[m] = v; kept[m] = k; }
    }
    if (threadIdx.x == 0) {
        double total = 0.0, kept_total = 0.0;
        for (int m = 0; m < st.count; ++m) {
            resum[m] = kept[m] > 4.0 * magnitude(value[m]);
            total += st.weight[m] * value[m];
            if (!resum[m]) kept_total += magnitude(st.weight[m]) * kept[m];
        }
        if (kept_total > 4.0 * magnitude(total))
            for (int m = 0; m < st.count; ++m) resum[m] |= kept[m] > 0.0;
    }
    __syncthreads();
    double total = 0.0;
    for (int m = 0; m < st.count; ++m) {
        double v = value[m];
        if (resum[m]) v = resum_blocks<F, O, M>(t.m[m], st.first[m], st.first[m + 1], partial);
        v *= st.weight[m];
        if (threadIdx.x == 0) { out[m] = v; total += v; }
    }
    if (threadIdx.x == 0) out[st.count] = total;
}

// Second stage: ∂P/∂B = scale·Σ_tcol gb_part, ∂P/∂A = scale·Σ_trow ga_part (scale = 2·s·weight),
// one thread per gradient element, tiles summed in order.
struct GradEntry {
    const void* gb_part; const void* ga_part;
    void* grad_b; void* grad_a;  // (out, r), (r, in), M
    int out, in, r, tiles_row, tiles_col;
    int first_block;
    double scale;
};
struct GradTable { GradEntry m[HL_MAX_MATS]; int count; int pad; };

template <typename M>
__device__ void penalty_grads(const GradTable& t) {
    const GradEntry e = t.m[find_matrix(t)];
    const long long idx = (long long)(blockIdx.x - e.first_block) * HL_THREADS + threadIdx.x;
    const long long nb = (long long)e.out * e.r, na = (long long)e.r * e.in;
    const M scale = (M)e.scale;
    if (idx < nb) {
        const M* part = (const M*)e.gb_part;
        M acc = 0;
        for (int c = 0; c < e.tiles_col; ++c) acc += part[c * nb + idx];
        ((M*)e.grad_b)[idx] = scale * acc;
    } else if (idx < nb + na) {
        const long long i = idx - nb;
        const M* part = (const M*)e.ga_part;
        M acc = 0;
        for (int rt = 0; rt < e.tiles_row; ++rt) acc += part[rt * na + i];
        ((M*)e.grad_a)[i] = scale * acc;
    }
}

// Per-matrix sums of block partials (Σ Ω² for finalization), in block order, times a weight;
// out[count] holds the weighted total. One block does it all.
__device__ void segment_sums(const SumTable& t, const double* partial, double* out) {
    double total = 0.0;
    for (int m = 0; m < t.count; ++m) {
        double v = 0.0;
        for (int i = t.first[m] + threadIdx.x; i < t.first[m + 1]; i += HL_THREADS) v += partial[i];
        v = block_sum(v) * t.weight[m];
        if (threadIdx.x == 0) { out[m] = v; total += v; }
    }
    if (threadIdx.x == 0) out[t.count] = total;
}

#if defined(HL_OMEGA_TABLE_BYTES)
static_assert(sizeof(OmegaTable) == HL_OMEGA_TABLE_BYTES, "OmegaTable layout differs from the host's");
static_assert(sizeof(FinalizeTable) == HL_FINALIZE_TABLE_BYTES, "FinalizeTable layout differs from the host's");
static_assert(sizeof(PenaltyTable) == HL_PENALTY_TABLE_BYTES, "PenaltyTable layout differs from the host's");
static_assert(sizeof(GradTable) == HL_GRAD_TABLE_BYTES, "GradTable layout differs from the host's");
static_assert(sizeof(SumTable) == HL_SUM_TABLE_BYTES, "SumTable layout differs from the host's");
#endif

// Entry points: one per dtype combination (names are what the host looks up).
//   factors F: f32 f64 bf16 f16; ω/Ω W: f32 f64; stored Ω O: f32 f64 bf16 f16;
//   maths M: f64 when any input is float64, else f32.
#define HL_GC const __grid_constant__
#define HL_OMEGA(name, F, W, M) \
    extern "C" __global__ void HL_OMEGA_BOUNDS name(HL_GC OmegaTable t) { omega_update<F, W, M>(t); }
#define HL_FINALIZE(name, F, W, M) \
    extern "C" __global__ void HL_FINALIZE_BOUNDS name(HL_GC FinalizeTable t) { finalize<F, W, M>(t); }
#define HL_PENALTY(name, F, O, M) \
    extern "C" __global__ void HL_PENALTY_BOUNDS name(HL_GC PenaltyTable t) { penalty<F, O, M>(t); }
#define HL_PENALTY_SUMS(name, F, O, M) \
    extern "C" __global__ void __launch_bounds__(HL_THREADS) name(HL_GC PenaltyTable t, HL_GC SumTable st, \
                                                                  double* partial, double* out) { \
        penalty_sums<F, O, M>(t, st, partial, out); \
    }

HL_OMEGA(omega_f32_f32, float, float, float)
HL_OMEGA(omega_f64_f32, double, float, double)
HL_OMEGA(omega_bf16_f32, bf16_t, float, float)
HL_OMEGA(omega_f16_f32, f16_t, float, float)
HL_OMEGA(omega_f32_f64, float, double, double)
HL_OMEGA(omega_f64_f64, double, double, double)
HL_OMEGA(omega_bf16_f64, bf16_t, double, double)
HL_OMEGA(omega_f16_f64, f16_t, double, double)

HL_FINALIZE(finalize_f32_f32, float, float, float)
HL_FINALIZE(finalize_f64_f32, double, float, double)
HL_FINALIZE(finalize_bf16_f32, bf16_t, float, float)
HL_FINALIZE(finalize_f16_f32, f16_t, float, float)
HL_FINALIZE(finalize_f32_f64, float, double, double)
HL_FINALIZE(finalize_f64_f64, double, double, double)
HL_FINALIZE(finalize_bf16_f64, bf16_t, double, double)
HL_FINALIZE(finalize_f16_f64, f16_t, double, double)

HL_PENALTY(penalty_f32_f32, float, float, float)
HL_PENALTY(penalty_f64_f32, double, float, double)
HL_PENALTY(penalty_bf16_f32, bf16_t, float, float)
HL_PENALTY(penalty_f16_f32, f16_t, float, float)
HL_PENALTY(penalty_f32_f64, float, double, double)
HL_PENALTY(penalty_f64_f64, double, double, double)
HL_PENALTY(penalty_bf16_f64, bf16_t, double, double)
HL_PENALTY(penalty_f16_f64, f16_t, double, double)
HL_PENALTY(penalty_f32_bf16, float, bf16_t, float)
HL_PENALTY(penalty_f64_bf16, double, bf16_t, double)
HL_PENALTY(penalty_bf16_bf16, bf16_t, bf16_t, float)
HL_PENALTY(penalty_f16_bf16, f16_t, bf16_t, float)
HL_PENALTY(penalty_f32_f16, float, f16_t, float)
HL_PENALTY(penalty_f64_f16, double, f16_t, double)
HL_PENALTY(penalty_bf16_f16, bf16_t, f16_t, float)
HL_PENALTY(penalty_f16_f16, f16_t, f16_t, float)

HL_PENALTY_SUMS(penalty_sums_f32_f32, float, float, float)
HL_PENALTY_SUMS(penalty_sums_f64_f32, double, float, double)
HL_PENALTY_SUMS(penalty_sums_bf16_f32, bf16_t, float, float)
HL_PENALTY_SUMS(penalty_sums_f16_f32, f16_t, float, float)
HL_PENALTY_SUMS(penalty_sums_f32_f64, float, double, double)
HL_PENALTY_SUMS(penalty_sums_f64_f64, double, double, double)
HL_PENALTY_SUMS(penalty_sums_bf16_f64, bf16_t, double, double)
HL_PENALTY_SUMS(penalty_sums_f16_f64, f16_t, double, double)
HL_PENALTY_SUMS(penalty_sums_f32_bf16, float, bf16_t, float)
HL_PENALTY_SUMS(penalty_sums_f64_bf16, double, bf16_t, double)
HL_PENALTY_SUMS(penalty_sums_bf16_bf16, bf16_t, bf16_t, float)
HL_PENALTY_SUMS(penalty_sums_f16_bf16, f16_t, bf16_t, float)
HL_PENALTY_SUMS(penalty_sums_f32_f16, float, f16_t, float)
HL_PENALTY_SUMS(penalty_sums_f64_f16, double, f16_t, double)
HL_PENALTY_SUMS(penalty_sums_bf16_f16, bf16_t, f16_t, float)
HL_PENALTY_SUMS(penalty_sums_f16_f16, f16_t, f16_t, float)

extern "C" __global__ void __launch_bounds__(HL_THREADS) penalty_grads_f32(HL_GC GradTable t) { penalty_grads<float>(t); }
extern "C" __global__ void __launch_bounds__(HL_THREADS) penalty_grads_f64(HL_GC GradTable t) { penalty_grads<double>(t); }
extern "C" __global__ void __launch_bounds__(HL_THREADS) segment_sums_f64(HL_GC SumTable t, const double* partial, double* out) {
    segment_sums(t, partial, out);
}
