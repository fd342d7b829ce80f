// Crop: top[idx] = data[idx + offset] for an N-D blob.  The launcher merges the
// axes that are copied whole into their outer neighbour, so the top is a set of
// rows: up to five outer axes (sizes t0..t4, data strides s0..s4, in elements)
// and one innermost run of `run` contiguous floats.  `x` already points at the
// data element of the top's first (the offsets folded in).

__device__ __forceinline__ int crop_row_start(int row, int t1, int t2, int t3, int t4,
                                              int s0, int s1, int s2, int s3, int s4) {
    int at = (row % t4) * s4;
    row /= t4;
    at += (row % t3) * s3;
    row /= t3;
    at += (row % t2) * s2;
    row /= t2;
    at += (row % t1) * s1;
    row /= t1;
    return at + row * s0;
}

// Long runs: a block per row, its threads copy the run (coalesced reads and writes).
extern "C" __global__ void crop_rows(const float* __restrict__ x, float* __restrict__ y, int rows, int run,
                                     int t1, int t2, int t3, int t4,
                                     int s0, int s1, int s2, int s3, int s4) {
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* src = x + crop_row_start(row, t1, t2, t3, t4, s0, s1, s2, s3, s4);
        float* dst = y + row * run;
        for (int i = threadIdx.x; i < run; i += blockDim.x) dst[i] = src[i];
    }
}

// Short runs: a thread per top element.
extern "C" __global__ void crop_flat(const float* __restrict__ x, float* __restrict__ y, int rows, int run,
                                     int t1, int t2, int t3, int t4,
                                     int s0, int s1, int s2, int s3, int s4) {
    const int total = rows * run;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int row = i / run;
        y[i] = x[crop_row_start(row, t1, t2, t3, t4, s0, s1, s2, s3, s4) + (i - row * run)];
    }
}
