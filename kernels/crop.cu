// Crop: top[idx] = data[idx + offset] for an N-D blob.  The launcher merges the
// axes that are copied whole into their outer neighbour, so the top is a set of
// rows: up to five outer axes (sizes t0..t4, data strides s0..s4, in elements)
// and one innermost run of `run` contiguous floats.
//
// Layout: 2^lanes_log2 consecutive threads copy one row (a warp one long row, or
// several short ones), blockDim.x >> lanes_log2 rows per block along the grid's x, and
// blockIdx.y picks the part of the row: items [blockIdx.y * seg, + seg) (long rows, such
// as a whole image when only the channels are cropped, are split so that the grid
// still fills the GPU).  No grid-stride loop.  Thread `lane` copies the part's items
// lane, lane + lanes, ..., CROP_UNROLL at a time: the loads of those items are issued
// together before any store, and a warp's loads and stores of one step are contiguous
// (coalesced).  The row's start in the data (divisions by t1..t4) is computed once per
// thread.

#define CROP_UNROLL 4

// The data element of a row's first (relative to the top's first).  Axes of size 1 (the
// launcher pads the outer axes with them) skip their division.
__device__ __forceinline__ int crop_row_start(int row, int t1, int t2, int t3, int t4,
                                              int s0, int s1, int s2, int s3, int s4) {
    int at = 0;
    if (t4 != 1) {
        at += (row % t4) * s4;
        row /= t4;
    }
    if (t3 != 1) {
        at += (row % t3) * s3;
        row /= t3;
    }
    if (t2 != 1) {
        at += (row % t2) * s2;
        row /= t2;
    }
    if (t1 != 1) {
        at += (row % t1) * s1;
        row /= t1;
    }
    return at + row * s0;
}

// This thread's row, its lane within the row and its part [first, end) of the row's
// `items`; false past the last row.
__device__ __forceinline__ bool crop_row(int rows, int items, int seg, int lanes_log2, int& row, int& lane,
                                         int& first, int& end) {
    row = (int)blockIdx.x * (int)(blockDim.x >> lanes_log2) + (int)(threadIdx.x >> lanes_log2);
    lane = (int)threadIdx.x & ((1 << lanes_log2) - 1);
    first = (int)blockIdx.y * seg;
    end = items - first < seg ? items : first + seg;
    return row < rows;
}

// Floats, any alignment, row by row (the launcher gives a long row a whole warp and packs
// short rows several to a warp).  `x` is the whole data blob and `base` the element of
// the top's first (the offsets folded in).
extern "C" __global__ void crop_rows(const float* __restrict__ x, float* __restrict__ y, int base, int rows, int run,
                                     int t1, int t2, int t3, int t4,
                                     int s0, int s1, int s2, int s3, int s4, int seg, int lanes_log2) {
    int row, lane, first, end;
    if (!crop_row(rows, run, seg, lanes_log2, row, lane, first, end)) return;
    const int lanes = 1 << lanes_log2;
    const float* src = x + base + crop_row_start(row, t1, t2, t3, t4, s0, s1, s2, s3, s4);
    float* dst = y + row * run;
    for (int c0 = first + lane; c0 < end; c0 += lanes * CROP_UNROLL) {
        float v[CROP_UNROLL];
#pragma unroll
        for (int j = 0; j < CROP_UNROLL; ++j)
            if (c0 + lanes * j < end) v[j] = __ldg(src + c0 + lanes * j);
#pragma unroll
        for (int j = 0; j < CROP_UNROLL; ++j)
            if (c0 + lanes * j < end) dst[c0 + lanes * j] = v[j];
    }
}

// float4 items, for runs of a multiple of 4 floats whose top rows are 16-byte aligned
// (y aligned, run % 4 == 0) and whose data rows all start `shift` floats past a
// 16-byte boundary (every stride s0..s4 a multiple of 4): with shift 0 each item is
// one aligned float4 load, else the item straddles two aligned float4s and is funnelled
// out of them (nvcc loads only the 16 bytes used: 8 + 8 or 16 + 4, each aligned; what
// a warp reads twice comes from the L1 cache).  Those loads stay within 16-byte
// granules that hold data of the row.  `x` is the whole data blob (16-byte aligned) and
// `base` the element of the top's first.
template <int SHIFT>
__device__ __forceinline__ float4 crop_funnel(float4 a, float4 b) {
    return SHIFT == 1 ? make_float4(a.y, a.z, a.w, b.x)
         : SHIFT == 2 ? make_float4(a.z, a.w, b.x, b.y)
                      : make_float4(a.w, b.x, b.y, b.z);
}

template <int SHIFT>
__device__ __forceinline__ void crop_float4s(const float* __restrict__ x, float* __restrict__ y, int base,
                                             int rows, int run4, int t1, int t2, int t3, int t4,
                                             int s0, int s1, int s2, int s3, int s4, int seg, int lanes_log2) {
    int row, lane, first, end;
    if (!crop_row(rows, run4, seg, lanes_log2, row, lane, first, end)) return;
    const int lanes = 1 << lanes_log2;
    const float4* src =
        reinterpret_cast<const float4*>(x + base + crop_row_start(row, t1, t2, t3, t4, s0, s1, s2, s3, s4) - SHIFT);
    float4* dst = reinterpret_cast<float4*>(y) + row * run4;
    for (int c0 = first + lane; c0 < end; c0 += lanes * CROP_UNROLL) {
        float4 a[CROP_UNROLL], b[CROP_UNROLL];
#pragma unroll
        for (int j = 0; j < CROP_UNROLL; ++j)
            if (c0 + lanes * j < end) {
                a[j] = __ldg(src + c0 + lanes * j);
                if (SHIFT) b[j] = __ldg(src + c0 + lanes * j + 1);
            }
#pragma unroll
        for (int j = 0; j < CROP_UNROLL; ++j)
            if (c0 + lanes * j < end) dst[c0 + lanes * j] = SHIFT ? crop_funnel<SHIFT>(a[j], b[j]) : a[j];
    }
}

extern "C" __global__ void crop_rows4(const float* __restrict__ x, float* __restrict__ y, int base, int shift,
                                      int rows, int run4, int t1, int t2, int t3, int t4,
                                      int s0, int s1, int s2, int s3, int s4, int seg, int lanes_log2) {
    switch (shift) {
        case 0: crop_float4s<0>(x, y, base, rows, run4, t1, t2, t3, t4, s0, s1, s2, s3, s4, seg, lanes_log2); break;
        case 1: crop_float4s<1>(x, y, base, rows, run4, t1, t2, t3, t4, s0, s1, s2, s3, s4, seg, lanes_log2); break;
        case 2: crop_float4s<2>(x, y, base, rows, run4, t1, t2, t3, t4, s0, s1, s2, s3, s4, seg, lanes_log2); break;
        default: crop_float4s<3>(x, y, base, rows, run4, t1, t2, t3, t4, s0, s1, s2, s3, s4, seg, lanes_log2); break;
    }
}

// Backward of Crop: dx[idx + offset] = dy[idx], into a bottom gradient the launcher has zeroed.
// The rows, arguments and thread layout of crop_rows with the copy reversed: `dy` is the top's
// gradient (rows of `run` floats, contiguous), `dx` the whole bottom's and `base` the element of
// the top's first in it.  Each element of dx is written at most once (no atomics).
extern "C" __global__ void crop_rows_backward(const float* __restrict__ dy, float* __restrict__ dx, int base,
                                              int rows, int run, int t1, int t2, int t3, int t4,
                                              int s0, int s1, int s2, int s3, int s4, int seg, int lanes_log2) {
    int row, lane, first, end;
    if (!crop_row(rows, run, seg, lanes_log2, row, lane, first, end)) return;
    const int lanes = 1 << lanes_log2;
    const float* src = dy + row * run;
    float* dst = dx + base + crop_row_start(row, t1, t2, t3, t4, s0, s1, s2, s3, s4);
    for (int c0 = first + lane; c0 < end; c0 += lanes * CROP_UNROLL) {
        float v[CROP_UNROLL];
#pragma unroll
        for (int j = 0; j < CROP_UNROLL; ++j)
            if (c0 + lanes * j < end) v[j] = __ldg(src + c0 + lanes * j);
#pragma unroll
        for (int j = 0; j < CROP_UNROLL; ++j)
            if (c0 + lanes * j < end) dst[c0 + lanes * j] = v[j];
    }
}
