// LRN and Softmax kernels (caffeish.kernels.launch drives them), float32, C-contiguous.
//
// Each layer is one launch that reads its bottom and writes its top, with no
// intermediate arrays in device memory (the array-operation versions they
// replace took 5 to 15 launches and as many full-size temporaries).  The sums
// run in the order of the numpy runtime (caffeish.ops.norm, caffeish.ops.routing;
// for LRN across channels, Caffe's own) and the products are rounded on their own (NORM_MUL: nvcc would otherwise fuse
// a product and the following add into one FMA), so the results match the numpy
// path to a few units in the last place.  Plain CUDA C++: no headers, so NVRTC
// (cupy.RawModule) and the CPU harness both compile it.

#ifdef __CUDACC__
#define NORM_MUL(a, b) __fmul_rn((a), (b))
#else
#define NORM_MUL(a, b) ((a) * (b))
#endif

// LRN's power, y = x / s^beta, as the numpy path computes it (ops/norm.py,
// _times_power): mode 1 is beta 0.75 (sqrt(s * sqrt(s))), 2 is beta 0.5, 3 is
// beta 1, 0 any other beta (powf, as Caffe's GPU code).
__device__ __forceinline__ float lrn_output(float x, float s, float beta, int mode) {
    float p;
    if (mode == 1) {
        p = sqrtf(NORM_MUL(s, sqrtf(s)));
    } else if (mode == 2) {
        p = sqrtf(s);
    } else if (mode == 3) {
        p = s;
    } else {
        p = powf(s, beta);
    }
    return x / p;
}

// ACROSS_CHANNELS, in Caffe's CPU order and rounding (CrossChannelForward_cpu), which the
// numpy path follows too (ops/norm.py): per pixel, S[0] = k plus alpha/n * x[c']^2 for c' in
// [-pre, post] added one by one, and S[c] = S[c - 1] plus alpha/n * x[c + post]^2 minus
// alpha/n * x[c - 1 - pre]^2, each step a fused multiply-add (OpenBLAS's axpy); out-of-range
// channels add nothing.  y = x * (float)pow((double)S, -beta), Caffe's powx.  Rounding of S
// decides the last bits of y, and a later ReLU can turn those into a different gradient,
// so the order is Caffe's, not an afresh window sum.  One thread walks `chunk` consecutive
// channels of one (n, h, w) column (neighbouring threads take neighbouring p: coalesced),
// replaying the running sum from channel 0 to its chunk's start so that every chunk rounds as
// one sequential pass would.  `mode` is unused here (the WITHIN kernel's power shortcut).
extern "C" __global__ void lrn_across(const float* __restrict__ x, float* __restrict__ y,
                                      int images, int channels, int spatial, int local_size, int chunk,
                                      float alpha_over_n, float k, float beta, int mode) {
    const int pre = (local_size - 1) / 2;
    const int post = local_size - 1 - pre;
    const int chunks = (channels + chunk - 1) / chunk;
    const int total = images * chunks * spatial;
    const double exponent = -(double)beta;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int p = i % spatial;
        const int part = (i / spatial) % chunks;
        const int offset = (i / (spatial * chunks)) * channels * spatial + p;
        const float* column = x + offset;
        float* out = y + offset;
        const int c0 = part * chunk;
        const int c1 = min(c0 + chunk, channels);
        float s = k;
        for (int j = 0; j <= post && j < channels; ++j) {
            const float v = column[j * spatial];
            s = fmaf(alpha_over_n, NORM_MUL(v, v), s);
        }
        for (int c = 0; c < c1; ++c) {
            if (c > 0) {
                const int head = c + post;
                const int tail = c - 1 - pre;
                if (head < channels) {
                    const float v = column[head * spatial];
                    s = fmaf(alpha_over_n, NORM_MUL(v, v), s);
                }
                if (tail >= 0) {
                    const float v = column[tail * spatial];
                    s = fmaf(-alpha_over_n, NORM_MUL(v, v), s);
                }
            }
            if (c >= c0) {
                out[c * spatial] = NORM_MUL((float)pow((double)s, exponent), column[c * spatial]);
            }
        }
    }
}

// WITHIN_CHANNEL (Caffe: Power(2), AVE pooling with kernel n, pad (n-1)/2,
// stride 1, Power(shift 1, scale alpha, power -beta), Eltwise PROD): y = x / (1 +
// alpha * (sum of x^2 over the n x n window centred at (h, w), zeros outside) /
// (n*n))^beta.  The padded window never overhangs H + pad, so the pooling divisor
// is n*n everywhere, and k is not used.  One thread per output; the window is
// summed column by column of rows, as the numpy path sums rows then columns.
extern "C" __global__ void lrn_within(const float* __restrict__ x, float* __restrict__ y,
                                      int planes, int height, int width, int local_size,
                                      float area, float alpha, float beta, int power_mode) {
    const int half = (local_size - 1) / 2;
    const int total = planes * height * width;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int w = i % width;
        const int h = (i / width) % height;
        const float* plane = x + (i / (width * height)) * height * width;
        const int hs = max(h - half, 0);
        const int he = min(h + half + 1, height);
        const int ws = max(w - half, 0);
        const int we = min(w + half + 1, width);
        float sum = 0.0f;
        for (int c = ws; c < we; ++c) {
            float column = 0.0f;
            for (int r = hs; r < he; ++r) {
                const float v = plane[r * width + c];
                column += NORM_MUL(v, v);
            }
            sum += column;
        }
        const float s = NORM_MUL(sum / area, alpha) + 1.0f;
        y[i] = lrn_output(x[i], s, beta, power_mode);
    }
}

// The larger of a and b, NaN when either is (as numpy's max).
__device__ __forceinline__ float softmax_max(float a, float b) {
    return (b > a || b != b) ? b : a;
}

// Softmax of x viewed as (outer, channels, inner) along the channels, as Caffe:
// subtract the row's max, exponentiate, divide by the sum.  The exponentials are
// computed twice (for the sum, then for the output) instead of stored and read
// back: the kernels are memory-bound and expf is cheap.

// A block per row (outer, inner): its threads stride over the channels, then
// reduce the max and the sum in shared memory.  blockDim.x: a power of two, at
// most SOFTMAX_BLOCK.  Rows stride over gridDim.x, so every thread of a block
// runs the same iterations and reaches every __syncthreads.
#define SOFTMAX_BLOCK 256
extern "C" __global__ void softmax_rows(const float* __restrict__ x, float* __restrict__ y,
                                        int rows, int channels, int inner) {
    __shared__ float partial[SOFTMAX_BLOCK];
    const int t = threadIdx.x;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const int offset = (row / inner) * channels * inner + row % inner;
        const float* in = x + offset;
        float* out = y + offset;
        float m = in[0];
        for (int c = t; c < channels; c += blockDim.x) m = softmax_max(m, in[c * inner]);
        partial[t] = m;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (t < s) partial[t] = softmax_max(partial[t], partial[t + s]);
            __syncthreads();
        }
        m = partial[0];
        __syncthreads();
        float sum = 0.0f;
        for (int c = t; c < channels; c += blockDim.x) sum += expf(in[c * inner] - m);
        partial[t] = sum;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (t < s) partial[t] += partial[t + s];
            __syncthreads();
        }
        sum = partial[0];
        __syncthreads();
        for (int c = t; c < channels; c += blockDim.x) out[c * inner] = expf(in[c * inner] - m) / sum;
    }
}

// A thread per (outer, inner) position, walking the channels three times (max,
// sum, output) in order; neighbouring threads take neighbouring inner positions
// (coalesced), and the column's values come back from L1 after the first pass.
// For score maps (inner = H*W) and for rows of few channels.
extern "C" __global__ void softmax_columns(const float* __restrict__ x, float* __restrict__ y,
                                           int outer, int channels, int inner) {
    const int total = outer * inner;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int offset = (i / inner) * channels * inner + i % inner;
        const float* in = x + offset;
        float* out = y + offset;
        float m = in[0];
        for (int c = 1; c < channels; ++c) m = softmax_max(m, in[c * inner]);
        float sum = 0.0f;
        for (int c = 0; c < channels; ++c) sum += expf(in[c * inner] - m);
        for (int c = 0; c < channels; ++c) out[c * inner] = expf(in[c * inner] - m) / sum;
    }
}
