// Pooling kernels: x (planes = N*C, H, W) -> y (planes, OH, OW), float32, as Caffe's GPU
// forward kernels compute them (semantics.md, Pooling).  One thread per output.
// The output size (ceil or floor, with Caffe's clip rule) comes from the launcher.

#define POOL_FLT_MAX 3.402823466e+38F
#define POOL_FLT_MIN 1.175494351e-38F

// MAX: the window clipped to the image, scanned row-major from -FLT_MAX with a
// strict `>`, so the first maximum wins, NaN never does and padding never takes
// part.  mask (when write_mask) gets h*W + w of the winner as a float, -1 if none.
extern "C" __global__ void max_pool(const float* __restrict__ x, float* __restrict__ y,
                                    float* __restrict__ mask, int planes, int height, int width,
                                    int out_h, int out_w, int kernel_h, int kernel_w,
                                    int stride_h, int stride_w, int pad_h, int pad_w, int write_mask) {
    const int total = planes * out_h * out_w;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int ow = i % out_w;
        const int oh = (i / out_w) % out_h;
        const float* plane = x + (i / (out_w * out_h)) * height * width;
        const int hs = max(oh * stride_h - pad_h, 0);
        const int ws = max(ow * stride_w - pad_w, 0);
        const int he = min(oh * stride_h - pad_h + kernel_h, height);
        const int we = min(ow * stride_w - pad_w + kernel_w, width);
        float best = -POOL_FLT_MAX;
        int where = -1;
        for (int h = hs; h < he; ++h)
            for (int w = ws; w < we; ++w)
                if (plane[h * width + w] > best) {
                    best = plane[h * width + w];
                    where = h * width + w;
                }
        y[i] = best;
        if (write_mask) mask[i] = (float)where;
    }
}

// AVE: the sum over the window clipped to the image, in row-major order, divided
// by the window's size clipped to [-pad, size + pad) (padding counts, the ceil-mode
// overhang does not).
extern "C" __global__ void ave_pool(const float* __restrict__ x, float* __restrict__ y,
                                    int planes, int height, int width, int out_h, int out_w,
                                    int kernel_h, int kernel_w, int stride_h, int stride_w,
                                    int pad_h, int pad_w) {
    const int total = planes * out_h * out_w;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int ow = i % out_w;
        const int oh = (i / out_w) % out_h;
        const float* plane = x + (i / (out_w * out_h)) * height * width;
        int hs = oh * stride_h - pad_h;
        int ws = ow * stride_w - pad_w;
        int he = min(hs + kernel_h, height + pad_h);
        int we = min(ws + kernel_w, width + pad_w);
        const int size = (he - hs) * (we - ws);
        hs = max(hs, 0);
        ws = max(ws, 0);
        he = min(he, height);
        we = min(we, width);
        float sum = 0.0f;
        for (int h = hs; h < he; ++h)
            for (int w = ws; w < we; ++w) sum += plane[h * width + w];
        y[i] = sum / size;
    }
}

// STOCHASTIC at TEST (Caffe's GPU StoPoolForwardTest): sum(x^2) / sum(x) over the
// window clipped to the image, 0 when the sum is not positive.  Caffe starts the
// sum at FLT_MIN; no padding (Caffe refuses it for STOCHASTIC).
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
