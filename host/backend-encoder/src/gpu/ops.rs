//! The device operations of the encoder's forward pass, as data: the runner lists them,
//! a queue executes them (CUDA kernels and cuBLASLt, or the CPU twins). Addresses are
//! device addresses (0 = none); sizes are in elements. Each kernel's contract is in
//! kernels/*.cu.

use super::blas::Epilogue;

#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// out[t] = LayerNorm(word[ids[t]] + position[positions[t]] + token_type[types[t]]).
    EmbedLayerNorm {
        out: u64,
        ids: u64,
        positions: u64,
        types: u64,
        word: u64,
        position: u64,
        /// 0 when the model has no token types.
        token_type: u64,
        gamma: u64,
        beta: u64,
        tokens: usize,
        width: usize,
        eps: f32,
    },
    /// out[t] = LayerNorm(x[t] + residual[t]); `out` may be `residual`.
    ResidualLayerNorm {
        out: u64,
        x: u64,
        residual: u64,
        gamma: u64,
        beta: u64,
        tokens: usize,
        width: usize,
        eps: f32,
    },
    /// Multi-head self-attention over packed sequences (`seq_start`: sequences + 1
    /// offsets; `key_valid`: 0, or a byte per token, 0 = padding).
    Attention {
        out: u64,
        qkv: u64,
        seq_start: u64,
        key_valid: u64,
        sequences: usize,
        /// Bounds every sequence's length (sizes the launch).
        max_len: usize,
        hidden: usize,
        heads: usize,
    },
    /// Sentence embeddings [sequences, width] in fp32 (mode: kernels::POOL_*).
    PoolEmbedding {
        out: u64,
        hidden: u64,
        seq_start: u64,
        key_valid: u64,
        sequences: usize,
        width: usize,
        mode: i32,
        normalize: bool,
    },
    /// Per-token logits [tokens, labels] in fp32.
    TokenHead {
        out: u64,
        hidden: u64,
        weight: u64,
        bias: u64,
        tokens: usize,
        width: usize,
        labels: usize,
    },
    /// Sequence logits [sequences, labels] in fp32 from each first token, through an
    /// optional dense layer with an activation (kernels::ACTIVATION_*).
    SequenceHead {
        out: u64,
        hidden: u64,
        seq_start: u64,
        pre: Option<(u64, u64, i32)>,
        weight: u64,
        bias: u64,
        sequences: usize,
        width: usize,
        labels: usize,
    },
    /// y[m, n] = act(x[m, k] · w[n, k]ᵀ + bias[n]) in fp16 (cuBLASLt with an epilogue).
    Linear {
        y: u64,
        x: u64,
        w: u64,
        bias: u64,
        m: usize,
        n: usize,
        k: usize,
        epilogue: Epilogue,
    },
}
