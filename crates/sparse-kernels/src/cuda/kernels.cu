// sparse-kernels CUDA kernels, compiled at run time with NVRTC (no headers, no nvcc).
//
// Every layout reaches the GPU in "ELL" form: `n_slots` stored rows of exactly `k` entries,
// `vals[s*k + j]` at column `cols[s*k + j]`, stored row `s` being output row `row_of[s]`.
// Condensed (SRigL) is ELL as it is; N:M is ELL with k = n * groups (its 2:4 fast path also has
// a packed form, below). `slot_of[r]` maps an output row to its stored row, or -1 (an ablated
// neuron, which outputs its bias or 0). Every kernel writes every element of its output, so a
// poisoned output buffer reveals an unwritten element.
//
// Reductions run in a fixed order (per thread, then a fixed shuffle tree): results do not
// depend on scheduling, and repeated runs are bit-identical.

#define WARP 32

__device__ __forceinline__ float warp_sum(float s) {
    for (int o = WARP / 2; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    return s;
}

// Batch-1 kernels: the block copies x into (dynamic) shared memory when it fits and returns
// where to read x from. Every thread of the block must call it (it synchronises).
__device__ __forceinline__ const float* stage_x(const float* __restrict__ x, int fan_in, int x_in_shared) {
    extern __shared__ float xs[];
    if (!x_in_shared) return x;
    for (int i = threadIdx.x; i < fan_in; i += blockDim.x) xs[i] = x[i];
    __syncthreads();
    return xs;
}

// ---------------------------------------------------------------------------------------------
// Forward, batch 1: y[r] = bias[r] + sum_j vals[s*k+j] * x[cols[s*k+j]], one warp per output
// row. x is staged in shared memory when it fits (`x_in_shared`); values and column indices are
// read four at a time (float4 / uint4) when k is a multiple of 4 and the rows are 16-byte
// aligned (k % 4 == 0 guarantees it for cudaMalloc'd buffers).
extern "C" __global__ void ell_fwd_b1(const float* __restrict__ vals,
                                      const unsigned int* __restrict__ cols,
                                      const int* __restrict__ slot_of,
                                      const float* __restrict__ bias,  // may be null
                                      const float* __restrict__ x,
                                      float* __restrict__ y,
                                      int rows, int k, int fan_in, int x_in_shared) {
    const float* xin = stage_x(x, fan_in, x_in_shared);
    const int r = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (r >= rows) return;
    const int s = slot_of[r];
    float acc = 0.0f;
    if (s >= 0) {
        const float* v = vals + (size_t)s * k;
        const unsigned int* c = cols + (size_t)s * k;
        if ((k & 3) == 0) {
            const float4* v4 = reinterpret_cast<const float4*>(v);
            const uint4* c4 = reinterpret_cast<const uint4*>(c);
            for (int j = lane; j < k / 4; j += WARP) {
                const float4 a = v4[j];
                const uint4 b = c4[j];
                acc += a.x * xin[b.x] + a.y * xin[b.y] + a.z * xin[b.z] + a.w * xin[b.w];
            }
        } else {
            for (int j = lane; j < k; j += WARP) acc += v[j] * xin[c[j]];
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[r] = acc + (bias ? bias[r] : 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Forward, any batch, feature-major input (the SRigL paper's fastest GPU variant):
// xt[c*batch + b] = x[b, c]. Output y[b*rows + r]. Block = 32 batch lanes (threadIdx.x) x
// ROWS_PER_BLOCK rows (threadIdx.y); the lanes of a warp share one row, so its values and
// indices are broadcast and the input reads xt[col*batch + b0 .. b0+31] are coalesced.
#define ROWS_PER_BLOCK 8
#define K_TILE 128
extern "C" __global__ void ell_fwd_fm(const float* __restrict__ vals,
                                      const unsigned int* __restrict__ cols,
                                      const int* __restrict__ slot_of,
                                      const float* __restrict__ bias,
                                      const float* __restrict__ xt,
                                      float* __restrict__ y,
                                      int rows, int k, int batch) {
    __shared__ float sv[ROWS_PER_BLOCK][K_TILE];
    __shared__ unsigned int sc[ROWS_PER_BLOCK][K_TILE];
    const int b = blockIdx.x * WARP + threadIdx.x;
    const int r = blockIdx.y * ROWS_PER_BLOCK + threadIdx.y;
    const int s = r < rows ? slot_of[r] : -1;
    float acc = 0.0f;
    for (int j0 = 0; j0 < k; j0 += K_TILE) {
        const int n = min(K_TILE, k - j0);
        if (s >= 0) {
            for (int j = threadIdx.x; j < n; j += WARP) {
                sv[threadIdx.y][j] = vals[(size_t)s * k + j0 + j];
                sc[threadIdx.y][j] = cols[(size_t)s * k + j0 + j];
            }
        }
        __syncthreads();
        if (s >= 0 && b < batch) {
            for (int j = 0; j < n; ++j) acc += sv[threadIdx.y][j] * xt[(size_t)sc[threadIdx.y][j] * batch + b];
        }
        __syncthreads();
    }
    if (r < rows && b < batch) y[(size_t)b * rows + r] = acc + (bias ? bias[r] : 0.0f);
}

// ---------------------------------------------------------------------------------------------
// N:M 2:4 forward, batch 1: per stored row, `groups` groups of 4 with two kept weights each;
// vals2[(s*groups + g)*2 + {0,1}], positions packed two 2-bit fields per byte:
// pos[s*groups + g] = p0 | (p1 << 2). One warp per output row, x in shared memory when it fits.
extern "C" __global__ void nm24_fwd_b1(const float* __restrict__ vals2,
                                       const unsigned char* __restrict__ pos,
                                       const int* __restrict__ slot_of,
                                       const float* __restrict__ bias,
                                       const float* __restrict__ x,
                                       float* __restrict__ y,
                                       int rows, int groups, int x_in_shared) {
    const float* xin = stage_x(x, groups * 4, x_in_shared);
    const int r = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (r >= rows) return;
    const int s = slot_of[r];
    float acc = 0.0f;
    if (s >= 0) {
        const float2* v2 = reinterpret_cast<const float2*>(vals2) + (size_t)s * groups;
        const unsigned char* p = pos + (size_t)s * groups;
        for (int g = lane; g < groups; g += WARP) {
            const float2 v = v2[g];
            const unsigned int q = p[g];
            acc += v.x * xin[4 * g + (q & 3u)] + v.y * xin[4 * g + ((q >> 2) & 3u)];
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[r] = acc + (bias ? bias[r] : 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Input gradient, any batch: gx[b, c] = sum over the entries e of column c of
// vals[perm[e]] * gy[b, row[e]], from the column-major (CSC) transpose built on the host:
// col_start[c] .. col_start[c+1] index perm (into vals) and row (the output row). The values
// are read through perm, so the transpose stays valid while training changes the values.
// One thread per (b, c); entries of a column in increasing row order (deterministic).
extern "C" __global__ void ell_igrad(const float* __restrict__ vals,
                                     const unsigned int* __restrict__ col_start,
                                     const unsigned int* __restrict__ perm,
                                     const unsigned int* __restrict__ row,
                                     const float* __restrict__ gy,
                                     float* __restrict__ gx,
                                     int rows, int fan_in, int batch) {
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)batch * fan_in) return;
    const int c = (int)(t % fan_in);
    const size_t b = t / fan_in;
    float acc = 0.0f;
    for (unsigned int e = col_start[c]; e < col_start[c + 1]; ++e) acc += vals[perm[e]] * gy[b * rows + row[e]];
    gx[t] = acc;
}

// ---------------------------------------------------------------------------------------------
// Value gradient, any batch: gv[s*k + j] = sum_b gy[b, row_of[s]] * x[b, cols[s*k + j]], one
// warp per stored entry, lanes over the batch, fixed shuffle reduction.
extern "C" __global__ void ell_vgrad(const unsigned int* __restrict__ cols,
                                     const int* __restrict__ row_of,
                                     const float* __restrict__ x,
                                     const float* __restrict__ gy,
                                     float* __restrict__ gv,
                                     int n_slots, int k, int rows, int fan_in, int batch) {
    const size_t e = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    const int lane = threadIdx.x % WARP;
    if (e >= (size_t)n_slots * k) return;
    const int r = row_of[e / k];
    const unsigned int c = cols[e];
    float acc = 0.0f;
    for (int b = lane; b < batch; b += WARP) acc += gy[(size_t)b * rows + r] * x[(size_t)b * fan_in + c];
    acc = warp_sum(acc);
    if (lane == 0) gv[e] = acc;
}

// Transposes x [batch, n] into xt [n, batch] (feature-major input for ell_fwd_fm).
extern "C" __global__ void transpose(const float* __restrict__ x, float* __restrict__ xt, int batch, int n) {
    __shared__ float tile[32][33];
    const int c0 = blockIdx.x * 32, b0 = blockIdx.y * 32;
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        const int b = b0 + i, c = c0 + threadIdx.x;
        if (b < batch && c < n) tile[i][threadIdx.x] = x[(size_t)b * n + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        const int c = c0 + i, b = b0 + threadIdx.x;
        if (b < batch && c < n) xt[(size_t)c * batch + b] = tile[threadIdx.x][i];
    }
}
