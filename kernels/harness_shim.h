// The CUDA names our kernels use, for running them on the CPU (caffeish.kernels.harness).
//
// Force-included (g++ -include) before a kernels/*.cu file, which then compiles as
// plain C++.  The harness runs the blocks of a launch one after another and the
// threads of a block either one after another (kernels without __syncthreads) or
// as cooperative fibers that all stop at each __syncthreads (harness_runner.cpp).
// Since one block runs at a time, a function-local `static` array is exactly the
// block's shared memory.  Besides the vector types and __ldg at the end, nothing
// else of CUDA is emulated: no warp intrinsics, no atomics, no tensor cores.
#pragma once
#include <cmath>

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
void __syncthreads();

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }

// Vector types for 8- and 16-byte accesses: CUDA's float2/float4, make_float2/make_float4
// and __ldg.  On the GPU a vector access must be aligned to its size; x86 does not care,
// so here every vector __ldg and every assignment to a float2/float4 (a store through a
// float2*/float4*) checks its address and counts the misaligned ones in
// harness_misaligned, a symbol of each compiled module that the tests read.
#include <cstdint>

inline int harness_misaligned = 0;
template <typename T> inline const T* harness_check_aligned(const T* p) {
    if (reinterpret_cast<uintptr_t>(p) % sizeof(T)) ++harness_misaligned;
    return p;
}

struct alignas(8) float2 {
    float x, y;
    float2& operator=(const float2& o) {
        harness_check_aligned(this);
        x = o.x, y = o.y;
        return *this;
    }
};
struct alignas(16) float4 {
    float x, y, z, w;
    float4& operator=(const float4& o) {
        harness_check_aligned(this);
        x = o.x, y = o.y, z = o.z, w = o.w;
        return *this;
    }
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline float __ldg(const float* p) { return *harness_check_aligned(p); }
inline float2 __ldg(const float2* p) { return *harness_check_aligned(p); }
inline float4 __ldg(const float4* p) { return *harness_check_aligned(p); }
