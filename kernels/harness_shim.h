// The CUDA names our kernels use, for running them on the CPU (caffeish.kernels.harness).
//
// Force-included (g++ -include) before a kernels/*.cu file, which then compiles as
// plain C++.  The harness runs the blocks of a launch one after another and the
// threads of a block either one after another (kernels without __syncthreads) or
// as cooperative fibers that all stop at each __syncthreads (harness_runner.cpp).
// Since one block runs at a time, a function-local `static` array is exactly the
// block's shared memory.  Nothing else of CUDA is emulated: no warp intrinsics,
// no atomics, no tensor cores.
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
