// Convolution and Deconvolution kernels (caffeish.kernels.launch drives them).
//
// Layout: x (N, C, H, W), y (N, O, OH, OW), float32, C-contiguous.  Convolution
// reads zeros outside the input: y[n, o, p] = bias[o] + sum over the channels c
// of o's group and taps (kh, kw) of W[o, c, kh, kw] * x[n, c, p*stride - pad +
// (kh, kw)*dilation].  Deconvolution is its adjoint with Caffe's weight layout
// (C, O/group, KH, KW).  Sizes are kernel arguments; every kernel loops with a
// grid stride, so any grid size is correct.  Plain CUDA C++: no headers, so
// NVRTC (cupy.RawModule) and the CPU harness both compile it.
//
// The backward needs no kernel of its own: Convolution's input gradient is the
// Deconvolution of dy with the same blob (col2im or deconv_direct, with the
// convolution's input size as the output: the gathers drop the padding taps and
// leave 0 where no window reaches), Deconvolution's is the Convolution of dy, and
// both weight gradients are im2col (the images side by side) times a matmul.

// Caffe's im2col for `images` images and output rows [row0, row0 + rows): the column entry
// (n, (c*KH + kh)*KW + kw, r*OW + ow) = x[n, c, (row0 + r)*SH - PH + kh*DH, ow*SW - PW + kw*DW],
// 0 outside the input, lies at col[n*image_stride + ((c*KH + kh)*KW + kw)*tap_stride + r*OW + ow].
// Caffe's layout, image after image (the forward), is image_stride = channels*KH*KW*rows*OW and
// tap_stride = rows*OW; the images side by side in each row (the weight gradient's one GEMM over
// all of them) is image_stride = rows*OW and tap_stride = images*rows*OW.  One thread per
// (n, c, r, ow) writes its KH*KW column entries.
extern "C" __global__ void im2col(const float* __restrict__ x, float* __restrict__ col,
                                  int images, int channels, int height, int width,
                                  int kernel_h, int kernel_w, int stride_h, int stride_w,
                                  int pad_h, int pad_w, int dilation_h, int dilation_w,
                                  int out_w, int row0, int rows, int image_stride, int tap_stride) {
    const int positions = rows * out_w;
    const int taps = kernel_h * kernel_w;
    const int total = images * channels * positions;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int ow = i % out_w;
        const int r = (i / out_w) % rows;
        const int nc = i / positions;  // n * channels + c
        const int h0 = (row0 + r) * stride_h - pad_h;
        const int w0 = ow * stride_w - pad_w;
        const int n = nc / channels;
        const float* plane = x + nc * height * width;
        float* out = col + n * image_stride + (nc - n * channels) * taps * tap_stride + r * out_w + ow;
        for (int kh = 0; kh < kernel_h; ++kh) {
            const int h = h0 + kh * dilation_h;
            const bool row_in = h >= 0 && h < height;
            for (int kw = 0; kw < kernel_w; ++kw) {
                const int w = w0 + kw * dilation_w;
                *out = (row_in && w >= 0 && w < width) ? plane[h * width + w] : 0.0f;
                out += tap_stride;
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

// The taps of one axis of a Deconvolution that land on output index `out`.  Tap k
// sends input index i to out = i*stride - pad + k*dilation, so with s = out + pad the
// valid taps are the k in [0, kernel) with (s - k*dilation) % stride == 0 and
// 0 <= (s - k*dilation) / stride < in_size: with g = gcd(stride, dilation) (none
// unless g divides s), one residue class modulo step = stride / g.  Returns their
// count; in increasing order they are first + j*step, with inputs source - j*back
// (back = dilation / g), for j < count.  The one source of truth for the stride /
// pad test of both Deconvolution kernels; constant time (no loop over the taps).
struct DeconvTaps { int first, source, count, step, back; };

__device__ __forceinline__ DeconvTaps deconv_taps(int out, int kernel, int stride, int pad, int dilation,
                                                  int in_size) {
    DeconvTaps t = {0, 0, 0, 1, 1};
    if (dilation == 0) {  // Caffe accepts dilation 0: every tap of the axis at one place (back = 0)
        const int s0 = out + pad;
        if (s0 % stride == 0 && s0 / stride < in_size) {
            t.source = s0 / stride;
            t.count = kernel;
            t.back = 0;
        }
        return t;
    }
    int g = stride, r = dilation;  // gcd(stride, dilation)
    while (r) {
        const int q = g % r;
        g = r;
        r = q;
    }
    t.step = stride / g;
    t.back = dilation / g;
    const int s = out + pad;
    if (s % g != 0) return t;
    // k0 = (s/g) / (dilation/g) modulo step: the smallest tap with k*dilation == s (mod stride).
    // The inverse of back modulo step by the extended Euclid algorithm (back and step are coprime).
    int inv = 0, next = 1, rem = t.step, nrem = t.back % t.step;
    while (nrem) {
        const int q = rem / nrem;
        int tmp = inv - q * next;
        inv = next;
        next = tmp;
        tmp = rem - q * nrem;
        rem = nrem;
        nrem = tmp;
    }
    if (inv < 0) inv += t.step;
    int k0 = (s / g) % t.step;
    if (inv > 1) k0 = (int)((long long)k0 * inv % t.step);  // inv is 1 (or 0 for step 1) when back is 1
    if (k0 >= kernel || k0 * dilation > s) return t;  // no tap, or every tap's input is below 0
    const int i0 = (s - k0 * dilation) / stride;      // the input of tap k0 (exact division)
    const int lo = i0 >= in_size ? (i0 - in_size + t.back) / t.back : 0;  // steps until the input < in_size
    const int hi = min((kernel - 1 - k0) / t.step, i0 / t.back);          // last step with k < kernel, input >= 0
    if (hi < lo) return t;
    t.first = k0 + lo * t.step;
    t.source = i0 - lo * t.back;
    t.count = hi - lo + 1;
    return t;
}

// The grid of both Deconvolution kernels: x strides over the output positions
// (h, w), y over the channels, z over the images.  A thread finds the taps of its
// position once (deconv_taps per axis) and reuses them for every (image, channel)
// plane it visits, writing each output once (no atomics).

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
    const int plane = height * width;
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < plane; p += blockDim.x * gridDim.x) {
        const int h = p / width;
        const int w = p % width;
        const DeconvTaps th = deconv_taps(h, kernel_h, stride_h, pad_h, dilation_h, in_h);
        const DeconvTaps tw = deconv_taps(w, kernel_w, stride_w, pad_w, dilation_w, in_w);
        for (int c = blockIdx.y; c < channels; c += gridDim.y) {
            const float b = has_bias ? bias[c] : 0.0f;
            for (int n = blockIdx.z; n < images; n += gridDim.z) {
                const float* src = col + (n * channels + c) * taps * positions;
                float val = 0.0f;
                for (int jh = 0, kh = th.first, ih = th.source; jh < th.count; ++jh, kh += th.step, ih -= th.back) {
                    const float* row = src + kh * kernel_w * positions + ih * in_w;
                    for (int jw = 0, kw = tw.first, iw = tw.source; jw < tw.count; ++jw, kw += tw.step, iw -= tw.back)
                        val += row[kw * positions + iw];
                }
                y[(n * channels + c) * plane + p] = has_bias ? val + b : val;
            }
        }
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
    const int in_plane = in_h * in_w;
    const int plane = height * width;
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < plane; p += blockDim.x * gridDim.x) {
        const int h = p / width;
        const int w = p % width;
        const DeconvTaps th = deconv_taps(h, kernel_h, stride_h, pad_h, dilation_h, in_h);
        const DeconvTaps tw = deconv_taps(w, kernel_w, stride_w, pad_w, dilation_w, in_w);
        for (int o = blockIdx.y; o < outputs; o += gridDim.y) {
            const int c0 = (o / og) * cg;
            const float* wo = weight + (c0 * og + o % og) * taps;  // W[c0, o % og]; W[c0 + ci] is ci*og*taps on
            const float b = has_bias ? bias[o] : 0.0f;
            for (int n = blockIdx.z; n < images; n += gridDim.z) {
                const float* xn = x + (n * channels + c0) * in_plane;
                float val = 0.0f;
                for (int jh = 0, kh = th.first, ih = th.source; jh < th.count; ++jh, kh += th.step, ih -= th.back) {
                    for (int jw = 0, kw = tw.first, iw = tw.source; jw < tw.count; ++jw, kw += tw.step, iw -= tw.back) {
                        const int tap = kh * kernel_w + kw;
                        const int at = ih * in_w + iw;
                        float sum = 0.0f;
                        for (int ci = 0; ci < cg; ++ci)
                            sum += wo[ci * og * taps + tap] * xn[ci * in_plane + at];
                        val += sum;
                    }
                }
                y[(n * outputs + o) * plane + p] = has_bias ? val + b : val;
            }
        }
    }
}
