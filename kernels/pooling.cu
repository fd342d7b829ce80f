// Pooling kernels: x (planes = N*C, H, W) -> y (planes, OH, OW), float32, with the
// results of Caffe's GPU forward kernels (semantics.md, Pooling).  The output size
// (ceil or floor, with Caffe's clip rule) comes from the launcher.
//
// Layout (all kernels but stochastic_pool_test): the outputs form rows = planes * OH
// rows of OW.  2^lanes_log2 consecutive threads take one row (a warp takes one long
// row, or several short ones), blockDim.x >> lanes_log2 rows per block, no grid-stride
// loop.  Thread `lane` of a row takes the row's slots lane, lane + lanes, ...,
// POOL_UNROLL at a time: the loads of the POOL_UNROLL slots are issued together
// before any result is used (memory-level parallelism), a warp's loads and stores of
// one step are contiguous (coalesced), and the row's index arithmetic (one division)
// is paid once per thread.

#define POOL_FLT_MAX 3.402823466e+38F
#define POOL_FLT_MIN 1.175494351e-38F
#define POOL_UNROLL 4

// This thread's output row and its lane within the row; false past the last row.
__device__ __forceinline__ bool pool_row(int rows, int lanes_log2, int& row, int& lane) {
    row = (int)blockIdx.x * (int)(blockDim.x >> lanes_log2) + (int)(threadIdx.x >> lanes_log2);
    lane = (int)threadIdx.x & ((1 << lanes_log2) - 1);
    return row < rows;
}

// MAX, any window: the window clipped to the image, scanned row-major from -FLT_MAX
// with a strict `>`, so the first maximum wins, NaN never does and padding never takes
// part (a tap outside the image reads as -FLT_MAX, which never wins).  mask (when
// write_mask) gets h*W + w of the winner as a float, -1 if none.  A slot is one output.
extern "C" __global__ void max_pool(const float* __restrict__ x, float* __restrict__ y,
                                    float* __restrict__ mask, int rows, int height, int width,
                                    int out_h, int out_w, int kernel_h, int kernel_w,
                                    int stride_h, int stride_w, int pad_h, int pad_w, int write_mask,
                                    int lanes_log2) {
    int row, lane;
    if (!pool_row(rows, lanes_log2, row, lane)) return;
    const int lanes = 1 << lanes_log2;
    const int plane = row / out_h;
    const int oh = row - plane * out_h;
    const float* src = x + plane * height * width;
    const int hs = max(oh * stride_h - pad_h, 0);
    const int he = min(oh * stride_h - pad_h + kernel_h, height);
    y += row * out_w;
    mask += row * out_w;
    for (int c0 = lane; c0 < out_w; c0 += lanes * POOL_UNROLL) {
        int ws[POOL_UNROLL], where[POOL_UNROLL];
        float best[POOL_UNROLL];
        bool on[POOL_UNROLL];
#pragma unroll
        for (int j = 0; j < POOL_UNROLL; ++j) {
            on[j] = c0 + lanes * j < out_w;
            ws[j] = (c0 + lanes * j) * stride_w - pad_w;
            best[j] = -POOL_FLT_MAX;
            where[j] = -1;
        }
        for (int h = hs; h < he; ++h) {
            const float* line = src + h * width;
            for (int k = 0; k < kernel_w; ++k) {
                float v[POOL_UNROLL];
#pragma unroll
                for (int j = 0; j < POOL_UNROLL; ++j) {
                    const int w = ws[j] + k;
                    v[j] = on[j] && w >= 0 && w < width ? __ldg(line + w) : -POOL_FLT_MAX;
                }
#pragma unroll
                for (int j = 0; j < POOL_UNROLL; ++j)
                    if (v[j] > best[j]) {
                        best[j] = v[j];
                        where[j] = h * width + ws[j] + k;
                    }
            }
        }
#pragma unroll
        for (int j = 0; j < POOL_UNROLL; ++j)
            if (on[j]) {
                y[c0 + lanes * j] = best[j];
                if (write_mask) mask[c0 + lanes * j] = (float)where[j];
            }
    }
}

// AVE, any window: the sum over the window clipped to the image, in row-major order,
// divided by the window's size clipped to [-pad, size + pad) (padding counts, the
// ceil-mode overhang does not).  A slot is one output.
extern "C" __global__ void ave_pool(const float* __restrict__ x, float* __restrict__ y,
                                    int rows, int height, int width, int out_h, int out_w,
                                    int kernel_h, int kernel_w, int stride_h, int stride_w,
                                    int pad_h, int pad_w, int lanes_log2) {
    int row, lane;
    if (!pool_row(rows, lanes_log2, row, lane)) return;
    const int lanes = 1 << lanes_log2;
    const int plane = row / out_h;
    const int oh = row - plane * out_h;
    const float* src = x + plane * height * width;
    const int h0 = oh * stride_h - pad_h;
    const int pool_h = min(h0 + kernel_h, height + pad_h) - h0;
    const int hs = max(h0, 0);
    const int he = min(h0 + kernel_h, height);
    y += row * out_w;
    for (int c0 = lane; c0 < out_w; c0 += lanes * POOL_UNROLL) {
        int ws[POOL_UNROLL];
        float sum[POOL_UNROLL];
        bool on[POOL_UNROLL];
#pragma unroll
        for (int j = 0; j < POOL_UNROLL; ++j) {
            on[j] = c0 + lanes * j < out_w;
            ws[j] = (c0 + lanes * j) * stride_w - pad_w;
            sum[j] = 0.0f;
        }
        for (int h = hs; h < he; ++h) {
            const float* line = src + h * width;
            for (int k = 0; k < kernel_w; ++k) {
                float v[POOL_UNROLL];
                bool in[POOL_UNROLL];
#pragma unroll
                for (int j = 0; j < POOL_UNROLL; ++j) {
                    const int w = ws[j] + k;
                    in[j] = on[j] && w >= 0 && w < width;
                    v[j] = in[j] ? __ldg(line + w) : 0.0f;
                }
#pragma unroll
                for (int j = 0; j < POOL_UNROLL; ++j)
                    if (in[j]) sum[j] += v[j];
            }
        }
#pragma unroll
        for (int j = 0; j < POOL_UNROLL; ++j)
            if (on[j]) {
                const int pool_w = min(ws[j] + kernel_w, width + pad_w) - ws[j];
                y[c0 + lanes * j] = sum[j] / (float)(pool_h * pool_w);
            }
    }
}

// 2x2 windows, stride 2, no padding, W even (so OW = W/2 and no window overhangs on the
// right; an odd H leaves the last output row a 1x2 window).  A slot is one vector
// load on each of the two input rows: float2 (V = 2, one output; needs x 8-byte
// aligned) or float4 (V = 4, two outputs stored as a float2; needs W % 4 == 0, x
// 16-byte and y, mask 8-byte aligned).  The launcher checks the alignment.  Per output
// 16 bytes are read and 4 written (8 with the mask), each input read once.
template <int V> struct Pool2x2Vec;
template <> struct Pool2x2Vec<2> { typedef float2 type; };
template <> struct Pool2x2Vec<4> { typedef float4 type; };

// The 2x2 window (a, b over c, d) as Caffe scans it; `two`: the second row exists.
__device__ __forceinline__ void max_2x2(float a, float b, float c, float d, bool two, int at, int width,
                                        float& best, int& where) {
    best = -POOL_FLT_MAX;
    where = -1;
    if (a > best) { best = a; where = at; }
    if (b > best) { best = b; where = at + 1; }
    if (two) {
        if (c > best) { best = c; where = at + width; }
        if (d > best) { best = d; where = at + width + 1; }
    }
}

__device__ __forceinline__ float ave_2x2(float a, float b, float c, float d, bool two) {
    float sum = 0.0f;
    sum += a;
    sum += b;
    if (two) {
        sum += c;
        sum += d;
    }
    return sum / (two ? 4.0f : 2.0f);
}

// One slot: a float2 from each row is one output, a float4 two (stored as a float2).
template <bool AVE>
__device__ __forceinline__ void pool_2x2_slot(float2 p, float2 q, bool two, int at, int width, int s,
                                              float* y, float* mask, int write_mask) {
    if (AVE) {
        y[s] = ave_2x2(p.x, p.y, q.x, q.y, two);
    } else {
        float best;
        int where;
        max_2x2(p.x, p.y, q.x, q.y, two, at + 2 * s, width, best, where);
        y[s] = best;
        if (write_mask) mask[s] = (float)where;
    }
}

template <bool AVE>
__device__ __forceinline__ void pool_2x2_slot(float4 p, float4 q, bool two, int at, int width, int s,
                                              float* y, float* mask, int write_mask) {
    if (AVE) {
        reinterpret_cast<float2*>(y)[s] =
            make_float2(ave_2x2(p.x, p.y, q.x, q.y, two), ave_2x2(p.z, p.w, q.z, q.w, two));
    } else {
        float best0, best1;
        int where0, where1;
        max_2x2(p.x, p.y, q.x, q.y, two, at + 4 * s, width, best0, where0);
        max_2x2(p.z, p.w, q.z, q.w, two, at + 4 * s + 2, width, best1, where1);
        reinterpret_cast<float2*>(y)[s] = make_float2(best0, best1);
        if (write_mask) reinterpret_cast<float2*>(mask)[s] = make_float2((float)where0, (float)where1);
    }
}

template <int V, bool AVE>
__device__ __forceinline__ void pool_2x2(const float* __restrict__ x, float* __restrict__ y,
                                         float* __restrict__ mask, int rows, int height, int width,
                                         int out_h, int out_w, int write_mask, int lanes_log2) {
    typedef typename Pool2x2Vec<V>::type Vec;
    int row, lane;
    if (!pool_row(rows, lanes_log2, row, lane)) return;
    const int lanes = 1 << lanes_log2;
    const int plane = row / out_h;
    const int oh = row - plane * out_h;
    const bool two = 2 * oh + 1 < height;
    const int top = 2 * oh * width;  // the window row's first element in the plane
    const float* src = x + plane * height * width + top;
    const Vec* r0 = reinterpret_cast<const Vec*>(src);
    const Vec* r1 = reinterpret_cast<const Vec*>(two ? src + width : src);  // row 0 again: read, unused
    const int slots = out_w / (V / 2);
    y += row * out_w;
    mask += row * out_w;
    for (int s0 = lane; s0 < slots; s0 += lanes * POOL_UNROLL) {
        Vec a[POOL_UNROLL], b[POOL_UNROLL];
#pragma unroll
        for (int j = 0; j < POOL_UNROLL; ++j)
            if (s0 + lanes * j < slots) {
                a[j] = __ldg(r0 + s0 + lanes * j);
                b[j] = __ldg(r1 + s0 + lanes * j);
            }
#pragma unroll
        for (int j = 0; j < POOL_UNROLL; ++j)
            if (s0 + lanes * j < slots)
                pool_2x2_slot<AVE>(a[j], b[j], two, top, width, s0 + lanes * j, y, mask, write_mask);
    }
}

extern "C" __global__ void max_pool_2x2_f2(const float* __restrict__ x, float* __restrict__ y,
                                           float* __restrict__ mask, int rows, int height, int width,
                                           int out_h, int out_w, int write_mask, int lanes_log2) {
    pool_2x2<2, false>(x, y, mask, rows, height, width, out_h, out_w, write_mask, lanes_log2);
}

extern "C" __global__ void max_pool_2x2_f4(const float* __restrict__ x, float* __restrict__ y,
                                           float* __restrict__ mask, int rows, int height, int width,
                                           int out_h, int out_w, int write_mask, int lanes_log2) {
    pool_2x2<4, false>(x, y, mask, rows, height, width, out_h, out_w, write_mask, lanes_log2);
}

extern "C" __global__ void ave_pool_2x2_f2(const float* __restrict__ x, float* __restrict__ y,
                                           int rows, int height, int width, int out_h, int out_w,
                                           int lanes_log2) {
    pool_2x2<2, true>(x, y, y, rows, height, width, out_h, out_w, 0, lanes_log2);
}

extern "C" __global__ void ave_pool_2x2_f4(const float* __restrict__ x, float* __restrict__ y,
                                           int rows, int height, int width, int out_h, int out_w,
                                           int lanes_log2) {
    pool_2x2<4, true>(x, y, y, rows, height, width, out_h, out_w, 0, lanes_log2);
}

// STOCHASTIC at TEST (Caffe's GPU StoPoolForwardTest): sum(x^2) / sum(x) over the
// window clipped to the image, 0 when the sum is not positive.  Caffe starts the
// sum at FLT_MIN; no padding (Caffe refuses it for STOCHASTIC).  One thread per output,
// grid-stride.
extern "C" __global__ void stochastic_pool_test(const float* __restrict__ x, float* __restrict__ y,
                                                int planes, int height, int width, int out_h, int out_w,
                                                int kernel_h, int kernel_w, int stride_h, int stride_w) {
    const int total = planes * out_h * out_w;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int ow = i % out_w;
        const int oh = (i / out_w) % out_h;
        const float* plane = x + (i / (out_w * out_h)) * height * width;
        const int hs = oh * stride_h;
        const int ws = ow * stride_w;
        const int he = min(hs + kernel_h, height);
        const int we = min(ws + kernel_w, width);
        float sum = POOL_FLT_MIN;
        float squares = 0.0f;
        for (int h = hs; h < he; ++h)
            for (int w = ws; w < we; ++w) {
                const float v = plane[h * width + w];
                sum += v;
                squares += v * v;
            }
        y[i] = sum > 0.0f ? squares / sum : 0.0f;
    }
}

// Backward (Caffe's Backward_gpu, written as gathers: each input cell sums the outputs whose
// windows cover it, in Caffe's (ph, pw) order from 0, so the result is deterministic and equals
// Caffe's sequential float32 sums).  One thread per cell (max_pool_argmax: per output), grid-stride,
// planes = N*C.  The outputs whose windows hold in-image row h (padded row hp = h + pad_h) are
// [hp < K ? 0 : (hp - K)/S + 1, min(hp/S + 1, OH)) -- the ceil-mode overhang never holds an
// in-image cell it does not reach -- and likewise for the columns.
__device__ __forceinline__ void pool_cover(int at, int kernel, int stride, int pad, int out, int& first, int& end) {
    const int padded = at + pad;
    first = padded < kernel ? 0 : (padded - kernel) / stride + 1;
    end = min(padded / stride + 1, out);
}

// MAX, first half: the argmax of every output, recomputed from the bottom x and the top y: the
// first in-image cell of the window, in Caffe's row-major scan, that equals y (that is the first
// strict maximum the forward kept: every cell before it was smaller or NaN), as h*W + w; -1 where
// the forward kept none (y == -FLT_MAX: nothing beat Caffe's initial value, and Caffe's GPU
// backward then sends the output's gradient nowhere).  Padding is never scanned.
extern "C" __global__ void max_pool_argmax(const float* __restrict__ x, const float* __restrict__ y,
                                           int* __restrict__ argmax, int planes, int height, int width,
                                           int out_h, int out_w, int kernel_h, int kernel_w,
                                           int stride_h, int stride_w, int pad_h, int pad_w) {
    const int total = planes * out_h * out_w;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int ow = i % out_w;
        const int oh = (i / out_w) % out_h;
        const float* src = x + (i / (out_w * out_h)) * height * width;
        const int h0 = oh * stride_h - pad_h;
        const int w0 = ow * stride_w - pad_w;
        const int hs = max(h0, 0);
        const int he = min(h0 + kernel_h, height);
        const int ws = max(w0, 0);
        const int we = min(w0 + kernel_w, width);
        const float best = y[i];
        int where = -1;
        if (best > -POOL_FLT_MAX) {
            for (int h = hs; h < he && where < 0; ++h)
                for (int w = ws; w < we; ++w)
                    if (src[h * width + w] == best) {
                        where = h * width + w;
                        break;
                    }
        }
        argmax[i] = where;
    }
}

// MAX, second half: dx[h, w] = the sum of dy over the covering outputs whose argmax is (h, w)
// (overlapping windows add up; with ties only the first maximum gets anything); 0 elsewhere.
extern "C" __global__ void max_pool_backward(const float* __restrict__ dy, const int* __restrict__ argmax,
                                             float* __restrict__ dx, int planes, int height, int width,
                                             int out_h, int out_w, int kernel_h, int kernel_w,
                                             int stride_h, int stride_w, int pad_h, int pad_w) {
    const int total = planes * height * width;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int w = i % width;
        const int h = (i / width) % height;
        const int offset = (i / (width * height)) * out_h * out_w;
        const float* g = dy + offset;
        const int* m = argmax + offset;
        int ph0, ph1, pw0, pw1;
        pool_cover(h, kernel_h, stride_h, pad_h, out_h, ph0, ph1);
        pool_cover(w, kernel_w, stride_w, pad_w, out_w, pw0, pw1);
        const int at = h * width + w;
        float sum = 0.0f;
        for (int ph = ph0; ph < ph1; ++ph)
            for (int pw = pw0; pw < pw1; ++pw)
                if (m[ph * out_w + pw] == at) sum += g[ph * out_w + pw];
        dx[i] = sum;
    }
}

// AVE: dx[h, w] = the sum over the covering outputs of dy / pool_size, pool_size being the
// forward's divisor: the window clipped to [-pad, size + pad) (padding counts, the ceil-mode
// overhang does not), divided in float32 as Caffe does.  Padding cells get nothing.
extern "C" __global__ void ave_pool_backward(const float* __restrict__ dy, float* __restrict__ dx,
                                             int planes, int height, int width, int out_h, int out_w,
                                             int kernel_h, int kernel_w, int stride_h, int stride_w,
                                             int pad_h, int pad_w) {
    const int total = planes * height * width;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int w = i % width;
        const int h = (i / width) % height;
        const float* g = dy + (i / (width * height)) * out_h * out_w;
        int ph0, ph1, pw0, pw1;
        pool_cover(h, kernel_h, stride_h, pad_h, out_h, ph0, ph1);
        pool_cover(w, kernel_w, stride_w, pad_w, out_w, pw0, pw1);
        float sum = 0.0f;
        for (int ph = ph0; ph < ph1; ++ph) {
            const int h0 = ph * stride_h - pad_h;
            const int pool_h = min(h0 + kernel_h, height + pad_h) - h0;
            for (int pw = pw0; pw < pw1; ++pw) {
                const int w0 = pw * stride_w - pad_w;
                const int pool_w = min(w0 + kernel_w, width + pad_w) - w0;
                sum += g[ph * out_w + pw] / (float)(pool_h * pool_w);
            }
        }
        dx[i] = sum;
    }
}
