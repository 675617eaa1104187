// The encoder's heads, so only their small fp32 results travel back to the host.
// Sequences are given by seq_start (as in attention.cu); a sequence of length 0 (the
// padding of a launch-shape bucket) gets zeros.

#define POOL_MEAN 0
#define POOL_CLS 1
#define POOL_MAX 2

// Sentence embedding: mean, first-token or max pooling over a sequence's tokens (those
// with key_valid != 0 when key_valid is given), then optional L2 normalisation.
// Grid = sequences, dynamic shared memory = width floats.
extern "C" __global__ void pool_embedding(float* __restrict__ out, const half* __restrict__ hidden,
                                          const int* __restrict__ seq_start,
                                          const unsigned char* __restrict__ key_valid, int width,
                                          int mode, int normalize) {
    extern __shared__ float pooled[];
    __shared__ float scratch[32];
    const int sequence = blockIdx.x;
    const int start = seq_start[sequence], len = seq_start[sequence + 1] - start;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float acc = 0.0f;
        if (len > 0 && mode == POOL_CLS) {
            acc = __half2float(hidden[(size_t)start * width + i]);
        } else if (len > 0) {
            int count = 0;
            acc = mode == POOL_MAX ? -INFINITY : 0.0f;
            for (int t = start; t < start + len; ++t) {
                if (key_valid != nullptr && !key_valid[t]) continue;
                const float x = __half2float(hidden[(size_t)t * width + i]);
                acc = mode == POOL_MAX ? fmaxf(acc, x) : acc + x;
                ++count;
            }
            if (count == 0) acc = 0.0f;
            else if (mode == POOL_MEAN) acc /= count;
        }
        pooled[i] = acc;
        squares += acc * acc;
    }
    float scale = 1.0f;
    if (normalize) scale = 1.0f / fmaxf(sqrtf(block_sum(squares, scratch)), 1e-12f);
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        out[(size_t)sequence * width + i] = pooled[i] * scale;
}

// Per-token linear head (QA start/end logits, token classification):
// out[t, n] = hidden[t]·weight[n] + bias[n]. One warp per token; block = 256 threads.
extern "C" __global__ void token_head(float* __restrict__ out, const half* __restrict__ hidden,
                                      const half* __restrict__ weight, const half* __restrict__ bias,
                                      int tokens, int width, int labels) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * (blockDim.x >> 5) + warp;
    if (t >= tokens) return;
    const half* x = hidden + (size_t)t * width;
    for (int n = 0; n < labels; ++n) {
        const half* w = weight + (size_t)n * width;
        float dot = 0.0f;
        for (int i = 2 * lane; i < width; i += 64) {
            const float2 a = __half22float2(*reinterpret_cast<const half2*>(x + i));
            const float2 b = __half22float2(*reinterpret_cast<const half2*>(w + i));
            dot += a.x * b.x + a.y * b.y;
        }
        dot = warp_sum(dot);
        if (lane == 0) out[(size_t)t * labels + n] = dot + __half2float(bias[n]);
    }
}

#define ACTIVATION_NONE 0
#define ACTIVATION_TANH 1
#define ACTIVATION_RELU 2

// Warp-per-output dense layer over one vector in shared memory: y = act(W·x + b).
__device__ __forceinline__ void dense_rows(float* y, const float* x, const half* weight,
                                           const half* bias, int in, int outputs, int activation) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int o = warp; o < outputs; o += warps) {
        const half* w = weight + (size_t)o * in;
        float dot = 0.0f;
        for (int i = lane; i < in; i += 32) dot += x[i] * __half2float(w[i]);
        dot = warp_sum(dot) + __half2float(bias[o]);
        if (activation == ACTIVATION_TANH) dot = tanhf(dot);
        else if (activation == ACTIVATION_RELU) dot = fmaxf(dot, 0.0f);
        if (lane == 0) y[o] = dot;
    }
}

// Sequence classification on the first token: an optional dense + activation (BERT's
// pooler, DistilBERT's pre_classifier, RoBERTa's classifier.dense; pre_weight null when
// absent), then the output projection. Grid = sequences, block = 256 threads, dynamic
// shared memory = 2·width floats. out is [sequences, labels].
extern "C" __global__ void sequence_head(float* __restrict__ out, const half* __restrict__ hidden,
                                         const int* __restrict__ seq_start,
                                         const half* __restrict__ pre_weight,
                                         const half* __restrict__ pre_bias, int pre_activation,
                                         const half* __restrict__ weight,
                                         const half* __restrict__ bias, int width, int labels) {
    extern __shared__ float vectors[];
    float* x = vectors;
    float* y = vectors + width;
    const int sequence = blockIdx.x;
    const int start = seq_start[sequence], len = seq_start[sequence + 1] - start;
    if (len == 0) {
        for (int n = threadIdx.x; n < labels; n += blockDim.x) out[(size_t)sequence * labels + n] = 0.0f;
        return;
    }
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        x[i] = __half2float(hidden[(size_t)start * width + i]);
    __syncthreads();
    if (pre_weight != nullptr) {
        dense_rows(y, x, pre_weight, pre_bias, width, width, pre_activation);
        __syncthreads();
        x = y;
    }
    dense_rows(out + (size_t)sequence * labels, x, weight, bias, width, labels, ACTIVATION_NONE);
}
