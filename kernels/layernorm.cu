// LayerNorm kernels over rows of `width` fp16 values, statistics in fp32. One block per
// token row; the row is kept in dynamic shared memory (width floats) between the passes.
// Launch: grid = tokens, block = a multiple of 32 (wisp uses width/2 rounded up, ≤ 1024).
// `width` is even: rows are read and written as half2.

// Two-pass mean and variance over `row` (already filled by this thread at its own
// indices), then out = (row - mean) / sqrt(var + eps) * gamma + beta.
__device__ __forceinline__ void normalize_row(half* out, const float* row, const half* gamma,
                                              const half* beta, int width, float eps, float sum,
                                              float* scratch) {
    const float mean = block_sum(sum, scratch) / width;
    float squares = 0.0f;
    for (int i = 2 * threadIdx.x; i < width; i += 2 * blockDim.x) {
        const float d0 = row[i] - mean, d1 = row[i + 1] - mean;
        squares += d0 * d0 + d1 * d1;
    }
    const float inv = rsqrtf(block_sum(squares, scratch) / width + eps);
    for (int i = 2 * threadIdx.x; i < width; i += 2 * blockDim.x) {
        const float2 g = __half22float2(*reinterpret_cast<const half2*>(gamma + i));
        const float2 b = __half22float2(*reinterpret_cast<const half2*>(beta + i));
        *reinterpret_cast<half2*>(out + i) =
            __floats2half2_rn((row[i] - mean) * inv * g.x + b.x, (row[i + 1] - mean) * inv * g.y + b.y);
    }
}

// hidden[t] = LayerNorm(word[ids[t]] + position[positions[t]] + token_type[types[t]]).
// `token_type` may be null (DistilBERT has none).
extern "C" __global__ void embed_layernorm(half* __restrict__ out, const unsigned* __restrict__ ids,
                                           const unsigned* __restrict__ positions,
                                           const unsigned* __restrict__ types,
                                           const half* __restrict__ word,
                                           const half* __restrict__ position,
                                           const half* __restrict__ token_type,
                                           const half* __restrict__ gamma,
                                           const half* __restrict__ beta, int width, float eps) {
    extern __shared__ float row[];
    __shared__ float scratch[32];
    const size_t t = blockIdx.x;
    const half* w = word + (size_t)ids[t] * width;
    const half* p = position + (size_t)positions[t] * width;
    const half* tt = token_type ? token_type + (size_t)types[t] * width : nullptr;
    float sum = 0.0f;
    for (int i = 2 * threadIdx.x; i < width; i += 2 * blockDim.x) {
        float2 v = __half22float2(*reinterpret_cast<const half2*>(w + i));
        const float2 pv = __half22float2(*reinterpret_cast<const half2*>(p + i));
        v.x += pv.x;
        v.y += pv.y;
        if (tt) {
            const float2 tv = __half22float2(*reinterpret_cast<const half2*>(tt + i));
            v.x += tv.x;
            v.y += tv.y;
        }
        row[i] = v.x;
        row[i + 1] = v.y;
        sum += v.x + v.y;
    }
    normalize_row(out + t * width, row, gamma, beta, width, eps, sum, scratch);
}

// out[t] = LayerNorm(x[t] + residual[t]). `out` may be `residual` (in place): every
// thread reads its elements before the first barrier and writes them after the last.
extern "C" __global__ void residual_layernorm(half* out, const half* __restrict__ x,
                                              const half* residual, const half* __restrict__ gamma,
                                              const half* __restrict__ beta, int width, float eps) {
    extern __shared__ float row[];
    __shared__ float scratch[32];
    const size_t offset = (size_t)blockIdx.x * width;
    float sum = 0.0f;
    for (int i = 2 * threadIdx.x; i < width; i += 2 * blockDim.x) {
        const float2 a = __half22float2(*reinterpret_cast<const half2*>(x + offset + i));
        const float2 r = __half22float2(*reinterpret_cast<const half2*>(residual + offset + i));
        row[i] = a.x + r.x;
        row[i + 1] = a.y + r.y;
        sum += row[i] + row[i + 1];
    }
    normalize_row(out + offset, row, gamma, beta, width, eps, sum, scratch);
}
