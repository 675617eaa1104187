//! The encoder's element-wise and attention kernels (f32, written so LLVM vectorises
//! them), fused where a separate pass over the activations would cost a memory trip.

use super::linear::{matmul_strided, SendPtr};
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows per rayon task in element-wise passes: enough work to pay for a task.
const ROWS_PER_TASK: usize = 16;

/// Compiles a row kernel twice: for AVX2+FMA (chosen at run time when the CPU has
/// them) and for the baseline target, so the auto-vectoriser gets 8-wide registers
/// without building the binary for one CPU.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            fn portable($($arg: $ty),*) $body
            portable($($arg),*)
        }
    };
}

/// `x = LayerNorm(x + bias) · gamma + beta`, row by row (the residual was already
/// accumulated into `x` by the GEMM; the dense layer's bias is added here).
pub fn add_bias_layer_norm(
    x: &mut [f32],
    width: usize,
    bias: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    x.par_chunks_mut(width * ROWS_PER_TASK).for_each(|block| {
        for row in block.chunks_exact_mut(width) {
            layer_norm_row(row, bias.unwrap_or(&[]), gamma, beta, eps);
        }
    });
}

multiversion! {
    pub fn layer_norm_row(row: &mut [f32], bias: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
        if !bias.is_empty() {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
        let n = row.len() as f32;
        let mean = lane_sum(row, |v| v) / n;
        let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// Σ f(v) with eight independent accumulators, so the sum vectorises (float addition
/// is not associative, so LLVM will not reorder a plain fold).
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}

/// The feed-forward activation, as Hugging Face names it in `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, x·Φ(x) (`gelu`).
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
    Tanh,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Activation> {
        match name {
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            "tanh" => Some(Activation::Tanh),
            _ => None,
        }
    }

    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::GeluTanh => {
                const C: f32 = 0.797_884_6; // sqrt(2/π)
                0.5 * x * (1.0 + tanh(C * (x + 0.044715 * x * x * x)))
            }
            Activation::Relu => x.max(0.0),
            Activation::Tanh => tanh(x),
        }
    }
}

/// `x = act(x + bias)` over rows of `width`.
pub fn add_bias_activation(x: &mut [f32], width: usize, bias: &[f32], act: Activation) {
    x.par_chunks_mut(width * ROWS_PER_TASK).for_each(|block| {
        for row in block.chunks_exact_mut(width) {
            match act {
                Activation::Gelu => gelu_row(row, bias),
                other => row
                    .iter_mut()
                    .zip(bias)
                    .for_each(|(v, b)| *v = other.apply(*v + b)),
            }
        }
    });
}

multiversion! {
    fn gelu_row(row: &mut [f32], bias: &[f32]) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v = Activation::Gelu.apply(*v + b);
        }
    }
}

/// erf as a rational function on [-4, 4] (the approximation Eigen and ONNX Runtime use
/// for GELU; error ~1e-7), branch-free so loops over it vectorise.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p - 2.101_024e-6;
    p = x2 * p - 5.692_506_4e-5;
    p = x2 * p - 7.349_906_3e-4;
    p = x2 * p - 2.954_600_1e-3;
    p = x2 * p - 1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 - 2.133_740_5e-4;
    q = x2 * q - 1.682_827e-3;
    q = x2 * q - 7.373_329_3e-3;
    q = x2 * q - 1.426_473_9e-2;
    p / q
}

/// e^x for x ≤ 88, branch-free: x = k·ln2 + r, e^r by its Taylor polynomial
/// (|r| ≤ ln2/2, relative error ~2e-7), 2^k by building the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let rounded = x * LOG2E + ROUND;
    let k = rounded - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // k sits in the low mantissa bits of `rounded`; reading it from there (integer
    // arithmetic on the bits) vectorises, where `k as i32` (a saturating conversion)
    // made LLVM convert lane by lane.
    let k_bits = (rounded.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((k_bits.wrapping_add(127) as u32) << 23);
    p * scale
}

#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// One sequence in a packed batch: its tokens are rows `start..start + len`.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
}

thread_local! {
    /// Attention scores of one (sequence, head) block; grows to the longest sequence
    /// seen and is reused, so layers do not allocate.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Multi-head self-attention over each segment separately, so no token attends across
/// sequences and no padding is computed. `qkv` holds Q, K and V for every token
/// ([tokens, 3·hidden], biases added, Q already scaled); `key_valid` (padded mode
/// only) marks the keys a query may attend to. Writes the context into `out`
/// ([tokens, hidden]).
pub fn attention(
    out: &mut [f32],
    qkv: &[f32],
    segments: &[Segment],
    key_valid: Option<&[bool]>,
    hidden: usize,
    heads: usize,
) {
    let head_dim = hidden / heads;
    let stride = 3 * hidden;
    // Split `out` into per-segment slices, then fan out over (segment, head).
    let mut parts: Vec<(Segment, &mut [f32])> = Vec::with_capacity(segments.len());
    let mut rest = &mut out[..];
    let mut offset = 0;
    for seg in segments {
        let (_, tail) = rest.split_at_mut((seg.start - offset) * hidden);
        let (mine, tail) = tail.split_at_mut(seg.len * hidden);
        parts.push((*seg, mine));
        rest = tail;
        offset = seg.start + seg.len;
    }
    parts.into_par_iter().for_each(|(seg, out_seg)| {
        let run_head = |h: usize, out_seg: &mut [f32]| {
            SCORES.with(|cell| {
                let mut scores = cell.borrow_mut();
                let n = seg.len;
                if scores.len() < n * n {
                    scores.resize(n * n, 0.0);
                }
                let scores = &mut scores[..n * n];
                let base = seg.start * stride;
                let q = &qkv[base + h * head_dim..];
                let k = &qkv[base + hidden + h * head_dim..];
                let v = &qkv[base + 2 * hidden + h * head_dim..];
                // scores[i, j] = q_i · k_j
                matmul_strided(scores, n, q, stride, k, 1, stride, n, head_dim, n, 1.0);
                let valid = key_valid.map_or(&[][..], |v| &v[seg.start..seg.start + n]);
                for row in scores.chunks_exact_mut(n) {
                    softmax_in_place(row, valid);
                }
                // out[i, head] = Σ_j p_ij v_j
                matmul_strided(
                    &mut out_seg[h * head_dim..],
                    hidden,
                    scores,
                    n,
                    v,
                    stride,
                    1,
                    n,
                    n,
                    head_dim,
                    1.0,
                );
            })
        };
        // Heads write disjoint columns of the segment's rows; split them by raw parts.
        let ptr = SendPtr(out_seg.as_mut_ptr());
        let len = out_seg.len();
        (0..heads).into_par_iter().for_each(|h| {
            let ptr = &ptr;
            // SAFETY: head h writes only columns h·head_dim..(h+1)·head_dim of each row,
            // so the writes of different heads never overlap; the slice outlives the loop.
            let out_seg = unsafe { std::slice::from_raw_parts_mut(ptr.0, len) };
            run_head(h, out_seg)
        });
    });
}

multiversion! {
    /// Numerically stable softmax over one row of scores; keys whose `valid` entry is
    /// false get probability 0 (`valid` empty: all keys count).
    pub fn softmax_in_place(row: &mut [f32], valid: &[bool]) {
        if !valid.is_empty() {
            row.iter_mut()
                .zip(valid)
                .for_each(|(s, ok)| if !*ok { *s = f32::NEG_INFINITY });
        }
        let mut max = [f32::NEG_INFINITY; 8];
        let chunks = row.chunks_exact(8);
        let tail_max = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for c in chunks {
            for i in 0..8 {
                max[i] = max[i].max(c[i]);
            }
        }
        let max = max.iter().copied().fold(tail_max, f32::max);
        if max == f32::NEG_INFINITY {
            row.iter_mut().for_each(|v| *v = 0.0);
            return;
        }
        for v in row.iter_mut() {
            *v = if *v == f32::NEG_INFINITY { 0.0 } else { exp(*v - max) };
        }
        let inv = 1.0 / lane_sum(row, |v| v);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_exp_are_accurate() {
        for i in -600..=600 {
            let x = i as f64 / 100.0;
            let want = libm_erf(x);
            assert!((erf(x as f32) as f64 - want).abs() < 1e-6, "erf({x})");
        }
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let want = (x as f64).exp();
            assert!(((exp(x) as f64 - want) / want).abs() < 1e-6, "exp({x})");
        }
    }

    // Abramowitz–Stegun series for the check, in f64 to full precision.
    fn libm_erf(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        loop {
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 || n > 200.0 {
                break;
            }
            n += 1.0;
            term *= -x * x / n;
        }
        if x.abs() > 3.5 {
            return x.signum() * (1.0 - (-x * x).exp() / (x.abs() * std::f64::consts::PI.sqrt()));
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }

    #[test]
    fn softmax_masks_and_normalises() {
        let mut row = [1.0, f32::NEG_INFINITY, 3.0];
        softmax_in_place(&mut row, &[]);
        assert_eq!(row[1], 0.0);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
