// Convolution and Deconvolution kernels (caffeish.kernels.launch drives them).
//
// Layout: x (N, C, H, W), y (N, O, OH, OW), float32, C-contiguous.  Convolution
// reads zeros outside the input: y[n, o, p] = bias[o] + sum over the channels c
// of o's group and taps (kh, kw) of W[o, c, kh, kw] * x[n, c, p*stride - pad +
// (kh, kw)*dilation].  Deconvolution is its adjoint with Caffe's weight layout
// (C, O/group, KH, KW).  Sizes are kernel arguments; every kernel loops with a
// grid stride, so any grid size is correct.  Plain CUDA C++: no headers, so
// NVRTC (cupy.RawModule) and the CPU harness both compile it.

// Caffe's im2col for `images` images and output rows [row0, row0 + rows):
// col[n, (c*KH + kh)*KW + kw, r*OW + ow] = x[n, c, (row0 + r)*SH - PH + kh*DH, ow*SW - PW + kw*DW],
// 0 outside the input.  One thread per (n, c, r, ow) writes its KH*KW column entries.
extern "C" __global__ void im2col(const float* __restrict__ x, float* __restrict__ col,
                                  int images, int channels, int height, int width,
                                  int kernel_h, int kernel_w, int stride_h, int stride_w,
                                  int pad_h, int pad_w, int dilation_h, int dilation_w,
                                  int out_w, int row0, int rows) {
    const int positions = rows * out_w;
    const int taps = kernel_h * kernel_w;
    const int total = images * channels * positions;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int ow = i % out_w;
        const int r = (i / out_w) % rows;
        const int nc = i / positions;  // n * channels + c
        const int h0 = (row0 + r) * stride_h - pad_h;
        const int w0 = ow * stride_w - pad_w;
        const float* plane = x + nc * height * width;
        float* out = col + nc * taps * positions + r * out_w + ow;
        for (int kh = 0; kh < kernel_h; ++kh) {
            const int h = h0 + kh * dilation_h;
            const bool row_in = h >= 0 && h < height;
            for (int kw = 0; kw < kernel_w; ++kw) {
                const int w = w0 + kw * dilation_w;
                *out = (row_in && w >= 0 && w < width) ? plane[h * width + w] : 0.0f;
                out += positions;
            }
        }
    }
}

// y[i] += bias[(i / positions) % channels] over y (N, channels, positions).
extern "C" __global__ void add_bias(float* __restrict__ y, const float* __restrict__ bias,
                                    int total, int channels, int positions) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        y[i] += bias[(i / positions) % channels];
    }
}

// Direct convolution for grouped layers with few channels per group (depthwise,
// where a GEMM per group is tiny).  A block of TILE x TILE threads computes one
// TILE x TILE tile of one output plane (n, o): for each input channel of o's
// group it stages the input patch the tile reads in shared memory (zeros
// outside the input), synchronises, and accumulates over the taps.  Planes
// stride over gridDim.y, tiles over gridDim.x, so every thread of a block runs
// the same number of iterations and reaches every __syncthreads.
#define CONV_TILE 16
#define CONV_MAX_PATCH 4096
extern "C" __global__ void conv_direct(const float* __restrict__ x, const float* __restrict__ weight,
                                       const float* __restrict__ bias, float* __restrict__ y,
                                       int images, int channels, int height, int width,
                                       int outputs, int group, int out_h, int out_w,
                                       int kernel_h, int kernel_w, int stride_h, int stride_w,
                                       int pad_h, int pad_w, int dilation_h, int dilation_w,
                                       int patch_h, int patch_w, int has_bias) {
    __shared__ float patch[CONV_MAX_PATCH];
    const int cg = channels / group;
    const int og = outputs / group;
    const int tiles_w = (out_w + CONV_TILE - 1) / CONV_TILE;
    const int tiles = tiles_w * ((out_h + CONV_TILE - 1) / CONV_TILE);
    const int threads = blockDim.x * blockDim.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int patch_size = patch_h * patch_w;
    for (int plane = blockIdx.y; plane < images * outputs; plane += gridDim.y) {
        const int n = plane / outputs;
        const int o = plane % outputs;
        const int c0 = (o / og) * cg;
        for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
            const int oh0 = (tile / tiles_w) * CONV_TILE;
            const int ow0 = (tile % tiles_w) * CONV_TILE;
            const int h0 = oh0 * stride_h - pad_h;
            const int w0 = ow0 * stride_w - pad_w;
            const int oh = oh0 + threadIdx.y;
            const int ow = ow0 + threadIdx.x;
            const bool inside = oh < out_h && ow < out_w;
            float acc = 0.0f;
            for (int ci = 0; ci < cg; ++ci) {
                const float* src = x + (n * channels + c0 + ci) * height * width;
                for (int i = tid; i < patch_size; i += threads) {
                    const int h = h0 + i / patch_w;
                    const int w = w0 + i % patch_w;
                    patch[i] = (h >= 0 && h < height && w >= 0 && w < width) ? src[h * width + w] : 0.0f;
                }
                __syncthreads();
                if (inside) {
                    const float* wc = weight + (o * cg + ci) * kernel_h * kernel_w;
                    const float* p = patch + threadIdx.y * stride_h * patch_w + threadIdx.x * stride_w;
                    for (int kh = 0; kh < kernel_h; ++kh)
                        for (int kw = 0; kw < kernel_w; ++kw)
                            acc += wc[kh * kernel_w + kw] * p[kh * dilation_h * patch_w + kw * dilation_w];
                }
                __syncthreads();
            }
            if (inside) y[(plane * out_h + oh) * out_w + ow] = has_bias ? acc + bias[o] : acc;
        }
    }
}

// The input index whose tap `tap` of a Deconvolution lands on output index `out`
// (out = in*stride - pad + tap*dilation), or -1 when no input position does.
__device__ __forceinline__ int deconv_source(int out, int pad, int tap, int dilation, int stride, int in_size) {
    const int s = out + pad - tap * dilation;
    return (s < 0 || s % stride != 0 || s / stride >= in_size) ? -1 : s / stride;
}

// Deconvolution, second half: Caffe's col2im as a gather (no atomics).  col holds
// W^T x per image: col[n, (c*KH + kh)*KW + kw, ih*IW + iw] for the output channels c.
// Output (n, c, h, w) sums, in tap order, the entries whose tap lands on it:
// h = ih*SH - PH + kh*DH, w likewise; then adds bias[c] when has_bias.
extern "C" __global__ void col2im(const float* __restrict__ col, const float* __restrict__ bias,
                                  float* __restrict__ y, int images, int channels, int height, int width,
                                  int in_h, int in_w, int kernel_h, int kernel_w, int stride_h, int stride_w,
                                  int pad_h, int pad_w, int dilation_h, int dilation_w, int has_bias) {
    const int positions = in_h * in_w;
    const int taps = kernel_h * kernel_w;
    const int total = images * channels * height * width;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int w = i % width;
        const int h = (i / width) % height;
        const int nc = i / (height * width);
        const float* src = col + nc * taps * positions;
        float val = 0.0f;
        for (int kh = 0; kh < kernel_h; ++kh) {
            const int ih = deconv_source(h, pad_h, kh, dilation_h, stride_h, in_h);
            if (ih < 0) continue;
            for (int kw = 0; kw < kernel_w; ++kw) {
                const int iw = deconv_source(w, pad_w, kw, dilation_w, stride_w, in_w);
                if (iw < 0) continue;
                val += src[(kh * kernel_w + kw) * positions + ih * in_w + iw];
            }
        }
        y[i] = has_bias ? val + bias[nc % channels] : val;
    }
}

// Deconvolution for grouped layers with few channels per group (FCN's bilinear
// upsampling has one): each output (n, o, h, w) gathers, tap by tap, the sum over
// the input channels c of o's group of W[c, o % og, kh, kw] * x[n, c, ih, iw].
extern "C" __global__ void deconv_direct(const float* __restrict__ x, const float* __restrict__ weight,
                                         const float* __restrict__ bias, float* __restrict__ y,
                                         int images, int channels, int in_h, int in_w,
                                         int outputs, int group, int height, int width,
                                         int kernel_h, int kernel_w, int stride_h, int stride_w,
                                         int pad_h, int pad_w, int dilation_h, int dilation_w, int has_bias) {
    const int cg = channels / group;
    const int og = outputs / group;
    const int taps = kernel_h * kernel_w;
    const int total = images * outputs * height * width;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int w = i % width;
        const int h = (i / width) % height;
        const int o = (i / (height * width)) % outputs;
        const int n = i / (outputs * height * width);
        const int c0 = (o / og) * cg;
        float val = 0.0f;
        for (int kh = 0; kh < kernel_h; ++kh) {
            const int ih = deconv_source(h, pad_h, kh, dilation_h, stride_h, in_h);
            if (ih < 0) continue;
            for (int kw = 0; kw < kernel_w; ++kw) {
                const int iw = deconv_source(w, pad_w, kw, dilation_w, stride_w, in_w);
                if (iw < 0) continue;
                const int at = ih * in_w + iw;
                float sum = 0.0f;
                for (int ci = 0; ci < cg; ++ci) {
                    const int c = c0 + ci;
                    sum += weight[((c * og) + o % og) * taps + kh * kernel_w + kw] *
                           x[(n * channels + c) * in_h * in_w + at];
                }
                val += sum;
            }
        }
        y[i] = has_bias ? val + bias[o] : val;
    }
}
