// Fused multi-head self-attention over a packed batch: softmax(Q·Kᵀ·scale)·V for every
// (sequence, head), with tensor cores (WMMA 16×16×16, fp16 in, fp32 accumulate).
//
// Layout. `qkv` is [tokens, 3·hidden]: each token's row holds Q | K | V, head h at
// columns h·D..h·D+D of each third (bias already added by the projection's epilogue).
// Sequence b owns tokens seq_start[b] .. seq_start[b+1]; there is no padding between
// sequences. `out` is [tokens, hidden].
//
// Work split. Grid (query tiles, heads, sequences); a block has WARPS warps and each
// warp owns 16 query rows of one (sequence, head). Keys are processed in tiles of 16, so
// a warp reads up to 15 rows past its sequence: those rows belong to the next sequence
// or to the buffer's slack (wisp allocates 64 spare rows, zeroed once), are finite, and
// are masked out of the softmax. Query rows past the sequence are computed and dropped.
//
// Shared memory: per warp a [16, key_capacity + ROW_PAD] fp32 score block; the
// normalised fp16 probabilities are written over the start of each score row, and the
// [16, D + ROW_PAD] fp32 output is staged in the same block. Then per warp a
// [16, D + 2·ROW_PAD] fp16 tile for the last, partial tile of V. key_capacity =
// max(keys rounded up to 16, D), at most 512. Rows are padded by 16 bytes so the rows of
// a WMMA tile fall in different banks (ldm stays a multiple of 16 bytes, and every tile
// pointer 32-byte aligned, as WMMA requires). The host computes the same size
// (gpu/kernels.rs, attention_shared_bytes).
//
// key_valid: null (packed batches), or one byte per token, 0 for padding that no query
// may attend to (padded batches, kept for comparison).
#include <mma.h>
using namespace nvcuda;

#define ATTENTION_WARPS 4
#define MAX_KEYS 512
// Row padding in 4-byte words (16 bytes).
#define ROW_PAD 4

template <int D>
__device__ __forceinline__ void attention(half* __restrict__ out, const half* __restrict__ qkv,
                                          const int* __restrict__ seq_start,
                                          const unsigned char* __restrict__ key_valid,
                                          int hidden, int key_capacity, float scale) {
    // WMMA needs 32-byte aligned tiles.
    extern __shared__ __align__(128) float shared[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sequence = blockIdx.z, head = blockIdx.y;
    const int start = seq_start[sequence];
    const int len = seq_start[sequence + 1] - start;
    const int q0 = (blockIdx.x * ATTENTION_WARPS + warp) * 16;
    // Warps are independent from here on (no block barrier), so an idle warp may leave.
    if (q0 >= len) return;
    const int keys = (len + 15) & ~15;
    const int ld = 3 * hidden;
    const half* q = qkv + (size_t)(start + q0) * ld + head * D;
    const half* k = qkv + (size_t)start * ld + hidden + head * D;
    const half* v = qkv + (size_t)start * ld + 2 * hidden + head * D;
    const int ls = key_capacity + ROW_PAD;  // score row stride, floats
    float* scores = shared + (size_t)warp * 16 * ls;
    half* v_tile = reinterpret_cast<half*>(shared + (size_t)ATTENTION_WARPS * 16 * ls) +
                   (size_t)warp * 16 * (D + 2 * ROW_PAD);

    // S = Q·Kᵀ, one 16×16 tile of keys at a time.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> q_frag[D / 16];
#pragma unroll
    for (int d = 0; d < D / 16; ++d) wmma::load_matrix_sync(q_frag[d], q + d * 16, ld);
    for (int j = 0; j < keys; j += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
        wmma::fill_fragment(s, 0.0f);
#pragma unroll
        for (int d = 0; d < D / 16; ++d) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> k_frag;
            wmma::load_matrix_sync(k_frag, k + (size_t)j * ld + d * 16, ld);
            wmma::mma_sync(s, q_frag[d], k_frag, s);
        }
        wmma::store_matrix_sync(scores + j, s, ls, wmma::mem_row_major);
    }
    __syncwarp();

    // Softmax per query row; each lane holds up to MAX_KEYS/32 scores in registers, so
    // the fp16 probabilities can overwrite the row they were computed from.
    for (int r = 0; r < 16; ++r) {
        float* row = scores + (size_t)r * ls;
        float values[MAX_KEYS / 32];
        float best = -INFINITY;
#pragma unroll
        for (int i = 0; i < MAX_KEYS / 32; ++i) {
            const int j = lane + 32 * i;
            float x = -INFINITY;
            if (j < len && (key_valid == nullptr || key_valid[start + j])) x = row[j] * scale;
            values[i] = x;
            best = fmaxf(best, x);
        }
        best = warp_max(best);
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < MAX_KEYS / 32; ++i) {
            const float e = values[i] == -INFINITY ? 0.0f : __expf(values[i] - best);
            values[i] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        __syncwarp();
        half* probabilities = reinterpret_cast<half*>(row);
#pragma unroll
        for (int i = 0; i < MAX_KEYS / 32; ++i) {
            const int j = lane + 32 * i;
            if (j < keys) probabilities[j] = __float2half(values[i] * inv);
        }
        __syncwarp();
    }

    // O = P·V.
    const half* p = reinterpret_cast<const half*>(scores);
    const int ldp = 2 * ls;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag[D / 16];
#pragma unroll
    for (int d = 0; d < D / 16; ++d) wmma::fill_fragment(o_frag[d], 0.0f);
    for (int j = 0; j < keys; j += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> p_frag;
        wmma::load_matrix_sync(p_frag, p + j, ldp);
        // The last tile reaches past the sequence into the next one or into reused
        // buffer rows, which may hold stale ±Inf or NaN: their probabilities are 0, but
        // 0·Inf is NaN. Copy the tile with those rows zeroed.
        const half* v_src = v + (size_t)j * ld;
        int ldv = ld;
        if (j + 16 > len) {
            const int ldt = D + 2 * ROW_PAD;
            for (int idx = lane; idx < 16 * D / 2; idx += 32) {
                const int r = idx / (D / 2), c = (idx % (D / 2)) * 2;
                const half2 value = j + r < len
                    ? *reinterpret_cast<const half2*>(v_src + (size_t)r * ld + c)
                    : __float2half2_rn(0.0f);
                *reinterpret_cast<half2*>(v_tile + r * ldt + c) = value;
            }
            __syncwarp();
            v_src = v_tile;
            ldv = ldt;
        }
#pragma unroll
        for (int d = 0; d < D / 16; ++d) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> v_frag;
            wmma::load_matrix_sync(v_frag, v_src + d * 16, ldv);
            wmma::mma_sync(o_frag[d], p_frag, v_frag, o_frag[d]);
        }
    }
    __syncwarp();
#pragma unroll
    for (int d = 0; d < D / 16; ++d)
        wmma::store_matrix_sync(scores + d * 16, o_frag[d], D + ROW_PAD, wmma::mem_row_major);
    __syncwarp();
    const int lo = D + ROW_PAD;  // output staging row stride, floats
    for (int idx = lane; idx < 16 * D / 2; idx += 32) {
        const int r = idx / (D / 2), c = (idx % (D / 2)) * 2;
        if (q0 + r < len) {
            *reinterpret_cast<half2*>(out + (size_t)(start + q0 + r) * hidden + head * D + c) =
                __floats2half2_rn(scores[r * lo + c], scores[r * lo + c + 1]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(32 * ATTENTION_WARPS)
    attention_d32(half* out, const half* qkv, const int* seq_start, const unsigned char* key_valid,
                  int hidden, int key_capacity, float scale) {
    attention<32>(out, qkv, seq_start, key_valid, hidden, key_capacity, scale);
}

extern "C" __global__ void __launch_bounds__(32 * ATTENTION_WARPS)
    attention_d64(half* out, const half* qkv, const int* seq_start, const unsigned char* key_valid,
                  int hidden, int key_capacity, float scale) {
    attention<64>(out, qkv, seq_start, key_valid, hidden, key_capacity, scale);
}

extern "C" __global__ void __launch_bounds__(32 * ATTENTION_WARPS)
    attention_d128(half* out, const half* qkv, const int* seq_start, const unsigned char* key_valid,
                   int hidden, int key_capacity, float scale) {
    attention<128>(out, qkv, seq_start, key_valid, hidden, key_capacity, scale);
}
