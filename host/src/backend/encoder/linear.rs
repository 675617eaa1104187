//! Dense layers on the `gemm` crate: y[M,N] (+)= x[M,K] · W[N,K]^T with W in the
//! checkpoint's own [out, in] layout, so memory-mapped weights are used in place.
//!
//! `gemm` packs both operands into cache blocks and picks AVX2/AVX-512/NEON kernels at
//! run time; `cargo bench --bench gemm` measures it on the encoder's shapes (see
//! docs/MEASUREMENTS.md for the comparison with OpenBLAS).

use gemm::Parallelism;

/// How many threads of the current rayon pool a GEMM may use.
#[derive(Debug, Clone, Copy)]
pub struct Threads(pub usize);

/// Below this many multiply-adds a GEMM runs on one thread: splitting it costs more
/// than it saves.
const PARALLEL_THRESHOLD: usize = 48 * 48 * 48;

/// `y = x · wᵀ` (or `y += x · wᵀ` when `accumulate`), all row-major:
/// x is [m, k], w is [n, k], y is [m, n].
#[allow(clippy::too_many_arguments)]
pub fn matmul_transposed(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    threads: Threads,
) {
    assert!(y.len() >= m * n && x.len() >= m * k && w.len() >= n * k);
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads.0 > 1 && m * k * n >= PARALLEL_THRESHOLD {
        Parallelism::Rayon(threads.0)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every access inside the slices: dst is m×n with
    // row stride n, lhs m×k with row stride k, rhs(kk, j) = w[j·k + kk].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A strided single-threaded product for attention's per-head blocks:
/// `c[m,n] = alpha · a[m,k] · b`, where `b(kk, j) = b[kk·b_rs + j·b_cs]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    c: &mut [f32],
    c_rs: usize,
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * c_rs + n);
    assert!(a.len() >= (m - 1) * a_rs + k);
    assert!(k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts bound the last element each operand's strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            false,
            a.as_ptr(),
            1,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            alpha,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
            }
        }
        y
    }

    #[test]
    fn matches_naive_product_and_accumulates() {
        let (m, k, n) = (37, 70, 53);
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let want = reference(&x, &w, m, k, n);
        let mut y = vec![0f32; m * n];
        matmul_transposed(&mut y, &x, &w, m, k, n, false, Threads(1));
        assert_eq!(y, want);
        matmul_transposed(&mut y, &x, &w, m, k, n, true, Threads(1));
        assert!(y.iter().zip(&want).all(|(a, b)| *a == 2.0 * b));
    }
}
