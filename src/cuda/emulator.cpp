// A CPU emulator for kernels.cu, for tests on machines without a GPU: each kernel runs block
// after block on 256 host threads, with __syncthreads as a barrier, __shared__ as statics
// (one block at a time, so they are the block's shared memory), and warp shuffles through a
// slot array. Slow, but it executes the very source NVRTC compiles — index maths, tiling,
// tables, reductions — so the GPU run only has to confirm what this already checked.
//
// Built by the test suite:  g++ -std=c++20 -O1 -shared -fPIC -pthread emulator.cpp
// (with the host's -DHL_*_BYTES so the table layouts are checked here too).

#include <barrier>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct hl_dim3 { unsigned x, y, z; };
thread_local hl_dim3 threadIdx, blockIdx;
static std::barrier<>* hl_barrier = nullptr;

static inline void __syncthreads() { hl_barrier->arrive_and_wait(); }

static int __syncthreads_or(int v) {
    static int slots[256];
    slots[threadIdx.x] = v;
    __syncthreads();
    int any = 0;
    for (int i = 0; i < 256; ++i) any |= slots[i];
    __syncthreads();
    return any;
}

// Every caller in kernels.cu is block-uniform, so a block-wide exchange is a faithful shuffle.
template <typename T>
static T __shfl_down_sync(unsigned, T v, int offset) {
    static T slots[256];
    slots[threadIdx.x] = v;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const T r = lane + offset < 32 ? slots[threadIdx.x + offset] : v;
    __syncthreads();
    return r;
}

template <typename T>
static T __shfl_xor_sync(unsigned, T v, int mask) {
    static T slots[256];
    slots[threadIdx.x] = v;
    __syncthreads();
    const T r = slots[(threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ (unsigned)mask)];
    __syncthreads();
    return r;
}

static inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline float hl_half_to_float(unsigned short h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}

#define HL_HOST_EMULATION
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#include "kernels.cu"

using Call = std::function<void()>;

static bool bind_kernel(const std::string& name, void** p, Call& call) {
#define HL_TABLE_KERNEL(k, Table) if (name == #k) { call = [p] { k(*(Table*)p[0]); }; return true; }
    HL_TABLE_KERNEL(omega_f32_f32, OmegaTable) HL_TABLE_KERNEL(omega_f64_f32, OmegaTable)
    HL_TABLE_KERNEL(omega_bf16_f32, OmegaTable) HL_TABLE_KERNEL(omega_f16_f32, OmegaTable)
    HL_TABLE_KERNEL(omega_f32_f64, OmegaTable) HL_TABLE_KERNEL(omega_f64_f64, OmegaTable)
    HL_TABLE_KERNEL(omega_bf16_f64, OmegaTable) HL_TABLE_KERNEL(omega_f16_f64, OmegaTable)
    HL_TABLE_KERNEL(finalize_f32_f32, FinalizeTable) HL_TABLE_KERNEL(finalize_f64_f32, FinalizeTable)
    HL_TABLE_KERNEL(finalize_bf16_f32, FinalizeTable) HL_TABLE_KERNEL(finalize_f16_f32, FinalizeTable)
    HL_TABLE_KERNEL(finalize_f32_f64, FinalizeTable) HL_TABLE_KERNEL(finalize_f64_f64, FinalizeTable)
    HL_TABLE_KERNEL(finalize_bf16_f64, FinalizeTable) HL_TABLE_KERNEL(finalize_f16_f64, FinalizeTable)
    HL_TABLE_KERNEL(penalty_f32_f32, PenaltyTable) HL_TABLE_KERNEL(penalty_f64_f32, PenaltyTable)
    HL_TABLE_KERNEL(penalty_bf16_f32, PenaltyTable) HL_TABLE_KERNEL(penalty_f16_f32, PenaltyTable)
    HL_TABLE_KERNEL(penalty_f32_f64, PenaltyTable) HL_TABLE_KERNEL(penalty_f64_f64, PenaltyTable)
    HL_TABLE_KERNEL(penalty_bf16_f64, PenaltyTable) HL_TABLE_KERNEL(penalty_f16_f64, PenaltyTable)
    HL_TABLE_KERNEL(penalty_f32_bf16, PenaltyTable) HL_TABLE_KERNEL(penalty_f64_bf16, PenaltyTable)
    HL_TABLE_KERNEL(penalty_bf16_bf16, PenaltyTable) HL_TABLE_KERNEL(penalty_f16_bf16, PenaltyTable)
    HL_TABLE_KERNEL(penalty_f32_f16, PenaltyTable) HL_TABLE_KERNEL(penalty_f64_f16, PenaltyTable)
    HL_TABLE_KERNEL(penalty_bf16_f16, PenaltyTable) HL_TABLE_KERNEL(penalty_f16_f16, PenaltyTable)
    HL_TABLE_KERNEL(penalty_grads_f32, GradTable) HL_TABLE_KERNEL(penalty_grads_f64, GradTable)
#undef HL_TABLE_KERNEL
#define HL_SUMS_KERNEL(k) \
    if (name == #k) { \
        call = [p] { k(*(PenaltyTable*)p[0], *(SumTable*)p[1], *(double**)p[2], *(double**)p[3]); }; \
        return true; \
    }
    HL_SUMS_KERNEL(penalty_sums_f32_f32) HL_SUMS_KERNEL(penalty_sums_f64_f32)
    HL_SUMS_KERNEL(penalty_sums_bf16_f32) HL_SUMS_KERNEL(penalty_sums_f16_f32)
    HL_SUMS_KERNEL(penalty_sums_f32_f64) HL_SUMS_KERNEL(penalty_sums_f64_f64)
    HL_SUMS_KERNEL(penalty_sums_bf16_f64) HL_SUMS_KERNEL(penalty_sums_f16_f64)
    HL_SUMS_KERNEL(penalty_sums_f32_bf16) HL_SUMS_KERNEL(penalty_sums_f64_bf16)
    HL_SUMS_KERNEL(penalty_sums_bf16_bf16) HL_SUMS_KERNEL(penalty_sums_f16_bf16)
    HL_SUMS_KERNEL(penalty_sums_f32_f16) HL_SUMS_KERNEL(penalty_sums_f64_f16)
    HL_SUMS_KERNEL(penalty_sums_bf16_f16) HL_SUMS_KERNEL(penalty_sums_f16_f16)
#undef HL_SUMS_KERNEL
    if (name == "segment_sums_f64") {
        call = [p] { segment_sums_f64(*(SumTable*)p[0], *(const double**)p[1], *(double**)p[2]); };
        return true;
    }
    return false;
}

// Runs kernel `name` on `blocks` blocks of HL_THREADS threads; 0 on success, 1 for an unknown name.
extern "C" int hl_emulate(const char* name, unsigned blocks, void** params) {
    Call call;
    if (!bind_kernel(name, params, call)) return 1;
    static std::mutex one_launch_at_a_time;  // the statics below are the one "GPU"
    std::lock_guard<std::mutex> lock(one_launch_at_a_time);
    std::barrier<> barrier(HL_THREADS);
    hl_barrier = &barrier;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < HL_THREADS; ++t) {
        threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned b = 0; b < blocks; ++b) {
                blockIdx = {b, 0, 0};
                call();
                barrier.arrive_and_wait();  // the block is done before the next reuses shared memory
            }
        });
    }
    for (auto& th : threads) th.join();
    hl_barrier = nullptr;
    return 0;
}
