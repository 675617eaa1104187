//! CPU twins of the GPU kernels: the same function, element for element, on the same
//! fp16 inputs, with fp32 arithmetic and fp16 rounding where the kernel rounds. The
//! self-test (`selftest.rs`) holds every kernel against its twin on random inputs.

use half::f16;

fn f(v: f16) -> f32 {
    v.to_f32()
}

fn normalize(row: &[f32], gamma: &[f16], beta: &[f16], eps: f32) -> Vec<f16> {
    let width = row.len() as f32;
    let mean = row.iter().sum::<f32>() / width;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width;
    let inv = 1.0 / (var + eps).sqrt();
    row.iter()
        .enumerate()
        .map(|(i, v)| f16::from_f32((v - mean) * inv * f(gamma[i]) + f(beta[i])))
        .collect()
}

/// kernels/layernorm.cu `embed_layernorm`.
#[allow(clippy::too_many_arguments)]
pub fn embed_layernorm(
    ids: &[u32],
    positions: &[u32],
    types: &[u32],
    word: &[f16],
    position: &[f16],
    token_type: Option<&[f16]>,
    (gamma, beta): (&[f16], &[f16]),
    width: usize,
    eps: f32,
) -> Vec<f16> {
    let mut out = Vec::with_capacity(ids.len() * width);
    for t in 0..ids.len() {
        let row: Vec<f32> = (0..width)
            .map(|i| {
                let mut v = f(word[ids[t] as usize * width + i])
                    + f(position[positions[t] as usize * width + i]);
                if let Some(tt) = token_type {
                    v += f(tt[types[t] as usize * width + i]);
                }
                v
            })
            .collect();
        out.extend(normalize(&row, gamma, beta, eps));
    }
    out
}

/// kernels/layernorm.cu `residual_layernorm`.
pub fn residual_layernorm(
    x: &[f16],
    residual: &[f16],
    (gamma, beta): (&[f16], &[f16]),
    width: usize,
    eps: f32,
) -> Vec<f16> {
    let mut out = Vec::with_capacity(x.len());
    for (xr, rr) in x.chunks_exact(width).zip(residual.chunks_exact(width)) {
        let row: Vec<f32> = xr.iter().zip(rr).map(|(a, b)| f(*a) + f(*b)).collect();
        out.extend(normalize(&row, gamma, beta, eps));
    }
    out
}

/// kernels/attention.cu: context rows for every token inside a sequence; rows outside
/// every sequence are left as they are in `out`.
pub fn attention(
    out: &mut [f16],
    qkv: &[f16],
    seq_start: &[i32],
    key_valid: Option<&[u8]>,
    hidden: usize,
    heads: usize,
) {
    let d = hidden / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let ld = 3 * hidden;
    for pair in seq_start.windows(2) {
        let (start, len) = (pair[0] as usize, (pair[1] - pair[0]) as usize);
        for h in 0..heads {
            for i in 0..len {
                let q = &qkv[(start + i) * ld + h * d..][..d];
                let scores: Vec<f32> = (0..len)
                    .map(|j| {
                        if key_valid.is_some_and(|v| v[start + j] == 0) {
                            return f32::NEG_INFINITY;
                        }
                        let k = &qkv[(start + j) * ld + hidden + h * d..][..d];
                        q.iter().zip(k).map(|(a, b)| f(*a) * f(*b)).sum::<f32>() * scale
                    })
                    .collect();
                let best = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = scores
                    .iter()
                    .map(|&s| {
                        if s == f32::NEG_INFINITY {
                            0.0
                        } else {
                            (s - best).exp()
                        }
                    })
                    .collect();
                let sum: f32 = exps.iter().sum();
                let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                // The kernel multiplies fp16 probabilities with V.
                let p: Vec<f32> = exps.iter().map(|e| f(f16::from_f32(e * inv))).collect();
                for c in 0..d {
                    let acc: f32 = (0..len)
                        .map(|j| p[j] * f(qkv[(start + j) * ld + 2 * hidden + h * d + c]))
                        .sum();
                    out[(start + i) * hidden + h * d + c] = f16::from_f32(acc);
                }
            }
        }
    }
}

/// kernels/heads.cu `pool_embedding` (mode 0 mean, 1 first token, 2 max).
pub fn pool_embedding(
    hidden: &[f16],
    seq_start: &[i32],
    key_valid: Option<&[u8]>,
    width: usize,
    mode: i32,
    normalize: bool,
) -> Vec<f32> {
    let mut out = Vec::new();
    for pair in seq_start.windows(2) {
        let (start, len) = (pair[0] as usize, (pair[1] - pair[0]) as usize);
        let mut row = vec![0f32; width];
        if len > 0 {
            for (i, v) in row.iter_mut().enumerate() {
                if mode == 1 {
                    *v = f(hidden[start * width + i]);
                    continue;
                }
                let values: Vec<f32> = (start..start + len)
                    .filter(|&t| key_valid.is_none_or(|k| k[t] != 0))
                    .map(|t| f(hidden[t * width + i]))
                    .collect();
                *v = match (values.is_empty(), mode) {
                    (true, _) => 0.0,
                    (false, 2) => values.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    _ => values.iter().sum::<f32>() / values.len() as f32,
                };
            }
        }
        if normalize {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
        out.extend(row);
    }
    out
}

fn dense(x: &[f32], weight: &[f16], bias: &[f16], outputs: usize, activation: i32) -> Vec<f32> {
    let width = x.len();
    (0..outputs)
        .map(|o| {
            let dot: f32 = x
                .iter()
                .zip(&weight[o * width..(o + 1) * width])
                .map(|(a, w)| a * f(*w))
                .sum::<f32>()
                + f(bias[o]);
            match activation {
                1 => dot.tanh(),
                2 => dot.max(0.0),
                _ => dot,
            }
        })
        .collect()
}

/// kernels/heads.cu `token_head`.
pub fn token_head(hidden: &[f16], weight: &[f16], bias: &[f16], width: usize) -> Vec<f32> {
    let labels = bias.len();
    hidden
        .chunks_exact(width)
        .flat_map(|row| {
            let x: Vec<f32> = row.iter().map(|v| f(*v)).collect();
            dense(&x, weight, bias, labels, 0)
        })
        .collect()
}

/// kernels/heads.cu `sequence_head`.
pub fn sequence_head(
    hidden: &[f16],
    seq_start: &[i32],
    pre: Option<(&[f16], &[f16], i32)>,
    (weight, bias): (&[f16], &[f16]),
    width: usize,
) -> Vec<f32> {
    let labels = bias.len();
    let mut out = Vec::new();
    for pair in seq_start.windows(2) {
        if pair[1] == pair[0] {
            out.extend(std::iter::repeat_n(0.0, labels));
            continue;
        }
        let start = pair[0] as usize;
        let mut x: Vec<f32> = hidden[start * width..(start + 1) * width]
            .iter()
            .map(|v| f(*v))
            .collect();
        if let Some((pw, pb, activation)) = pre {
            x = dense(&x, pw, pb, width, activation);
        }
        out.extend(dense(&x, weight, bias, labels, 0));
    }
    out
}

/// cuBLASLt with a bias (and GELU, tanh form, or ReLU) epilogue: y = act(x·wᵀ + b), fp16.
/// The product is the CPU encoder's GEMM on the fp16 values.
pub fn linear(
    x: &[f16],
    weight: &[f16],
    bias: &[f16],
    k: usize,
    epilogue: super::blas::Epilogue,
) -> Vec<f16> {
    use super::blas::Epilogue;
    use crate::linear::{matmul_transposed, Threads};
    let (n, m) = (bias.len(), x.len() / k);
    let xs: Vec<f32> = x.iter().map(|v| f(*v)).collect();
    let ws: Vec<f32> = weight.iter().map(|v| f(*v)).collect();
    let mut y = vec![0f32; m * n];
    matmul_transposed(&mut y, &xs, &ws, m, k, n, false, Threads(1));
    y.chunks_exact(n)
        .flat_map(|row| {
            row.iter().zip(bias).map(|(v, b)| {
                let v = v + f(*b);
                f16::from_f32(match epilogue {
                    Epilogue::Bias => v,
                    Epilogue::ReluBias => v.max(0.0),
                    Epilogue::GeluBias => {
                        0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044715 * v * v * v)).tanh())
                    }
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;

    fn random(n: usize, seed: u64) -> Vec<f16> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n)
            .map(|_| f16::from_f32(rng.f32() * 2.0 - 1.0))
            .collect()
    }

    /// The twin's LayerNorm is the CPU encoder's, up to fp16 rounding of the result.
    #[test]
    fn residual_layernorm_twin_matches_the_cpu_encoder() {
        let width = 96;
        let (x, r) = (random(3 * width, 1), random(3 * width, 2));
        let (gamma, beta) = (random(width, 3), random(width, 4));
        let twin = residual_layernorm(&x, &r, (&gamma, &beta), width, 1e-12);
        let mut cpu: Vec<f32> = x.iter().zip(&r).map(|(a, b)| f(*a) + f(*b)).collect();
        let g: Vec<f32> = gamma.iter().map(|v| f(*v)).collect();
        let b: Vec<f32> = beta.iter().map(|v| f(*v)).collect();
        ops::add_bias_layer_norm(&mut cpu, width, None, &g, &b, 1e-12);
        for (t, c) in twin.iter().zip(&cpu) {
            assert!((f(*t) - c).abs() <= 2e-3 + 2e-3 * c.abs(), "{t} vs {c}");
        }
    }

    /// The twin's attention is the CPU encoder's on a packed batch of two sequences.
    #[test]
    fn attention_twin_matches_the_cpu_encoder() {
        let (hidden, heads) = (64, 2);
        let seq_start = [0i32, 5, 12];
        let qkv = random(12 * 3 * hidden, 5);
        let mut twin = vec![f16::ZERO; 12 * hidden];
        attention(&mut twin, &qkv, &seq_start, None, hidden, heads);
        // The CPU encoder expects Q already scaled.
        let scale = 1.0 / ((hidden / heads) as f32).sqrt();
        let mut cpu_qkv: Vec<f32> = qkv.iter().map(|v| f(*v)).collect();
        for row in cpu_qkv.chunks_exact_mut(3 * hidden) {
            row[..hidden].iter_mut().for_each(|v| *v *= scale);
        }
        let mut cpu = vec![0f32; 12 * hidden];
        let segments = [
            ops::Segment { start: 0, len: 5 },
            ops::Segment { start: 5, len: 7 },
        ];
        ops::attention(&mut cpu, &cpu_qkv, &segments, None, hidden, heads);
        for (t, c) in twin.iter().zip(&cpu) {
            assert!((f(*t) - c).abs() <= 3e-3, "{t} vs {c}");
        }
    }

    #[test]
    fn pooling_skips_padding_and_empty_sequences_are_zero() {
        let width = 4;
        let hidden: Vec<f16> = (0..12).map(|v| f16::from_f32(v as f32)).collect();
        let valid = [1u8, 1, 0];
        let mean = pool_embedding(&hidden, &[0, 3, 3], Some(&valid), width, 0, false);
        assert_eq!(mean, [2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0, 0.0]);
        let max = pool_embedding(&hidden, &[0, 3], Some(&valid), width, 2, false);
        assert_eq!(max, [4.0, 5.0, 6.0, 7.0]);
    }
}
