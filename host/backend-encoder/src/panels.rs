//! Few-row products against weights packed once, at load: y[M,N] (+)= x[M,K] · W[N,K]^T
//! for a short sentence or a few (M up to [`MAX_ROWS`] tokens).
//!
//! A GEMM library packs W into its own layout on every call. With hundreds of rows that
//! cost is spread thin; with a dozen it is as large as the arithmetic, and one short
//! sentence through MiniLM-L6 paid 4.6 ms where ONNX Runtime, which packs its weights
//! once when a session starts, pays 2.0 ms (`bench/encoder_vs_ort.py --cases b1_short`).
//! Here W is packed at load into panels of 16 output columns, each panel k×16 floats
//! contiguous, and a register-blocked AVX-512 kernel broadcasts one element of x against
//! two panel rows at a time (12 rows × 32 columns of accumulators). AVX-512 only; other
//! CPUs, and larger products, keep the GEMM engine on the checkpoint's own layout.

/// The most rows the packed kernel runs; past it the GEMM engine is faster
/// (`cargo bench --bench gemm`, streaming section).
pub const MAX_ROWS: usize = 64;

/// Output columns per panel (one AVX-512 register of f32).
const WIDTH: usize = 16;

/// Whether products run on packed panels here: AVX-512, unless `WISP_PANELS=0`.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::env::var("WISP_PANELS").as_deref() != Ok("0")
                && std::arch::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// W[n, k] packed as ⌈n/16⌉ panels; panel b holds rows p = 0..k of columns 16b..16b+16
/// (zeros past n).
pub struct Panels {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

impl Panels {
    /// Packs `w` ([n, k], row-major).
    pub fn new(w: &[f32], n: usize, k: usize) -> Panels {
        assert!(w.len() >= n * k);
        let blocks = n.div_ceil(WIDTH);
        let mut data = vec![0f32; blocks * k * WIDTH];
        for (b, panel) in data.chunks_exact_mut(k * WIDTH).enumerate() {
            for c in 0..WIDTH.min(n - b * WIDTH) {
                let row = &w[(b * WIDTH + c) * k..][..k];
                for (p, &v) in row.iter().enumerate() {
                    panel[p * WIDTH + c] = v;
                }
            }
        }
        Panels { n, k, data }
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// y[m, n] (+)= x[m, k] · Wᵀ, columns split over the rayon pool's threads.
    pub fn matmul(&self, y: &mut [f32], x: &[f32], m: usize, accumulate: bool, threads: usize) {
        assert!(available(), "packed panels need AVX-512");
        assert!((1..=MAX_ROWS).contains(&m), "1..={MAX_ROWS} rows, got {m}");
        assert!(y.len() >= m * self.n && x.len() >= m * self.k);
        let blocks = self.n.div_ceil(WIDTH);
        let parts = threads.clamp(1, blocks);
        let per_part = blocks.div_ceil(parts).next_multiple_of(2);
        let y_ptr = crate::linear::SendPtr(y.as_mut_ptr());
        let y_ptr = &y_ptr;
        let run = |first: usize, last: usize| {
            // SAFETY: AVX-512 checked above; each call writes columns of blocks
            // first..last of y only, and the asserts bound x, y and the panels.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                avx512::matmul(y_ptr.0, x.as_ptr(), self, m, first, last, accumulate)
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (first, last, y_ptr, x);
        };
        if parts == 1 {
            return run(0, blocks);
        }
        rayon::scope(|s| {
            for first in (0..blocks).step_by(per_part) {
                let last = (first + per_part).min(blocks);
                s.spawn(move |_| run(first, last));
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Panels, WIDTH};
    use std::arch::x86_64::*;

    /// Rows of x per register block: 12 rows × 2 panels of accumulators, two panel
    /// rows and a broadcast take 27 of the 32 vector registers.
    const ROWS: usize = 12;

    /// Panel blocks first..last of y (+)= x · Wᵀ; pairs of panels, each pair read once
    /// from memory and then from cache for every block of rows.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn matmul(
        y: *mut f32,
        x: *const f32,
        w: &Panels,
        m: usize,
        first: usize,
        last: usize,
        accumulate: bool,
    ) {
        let mut b = first;
        while b < last {
            let pair = last - b >= 2;
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(ROWS);
                macro_rules! go {
                    ($($r:literal)*) => {
                        match (rows, pair) {
                            $(($r, true) => block::<$r, 2>(y, x, w, i, b, accumulate),
                              ($r, false) => block::<$r, 1>(y, x, w, i, b, accumulate),)*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1 2 3 4 5 6 7 8 9 10 11 12);
                i += rows;
            }
            b += if pair { 2 } else { 1 };
        }
    }

    /// Rows i..i+R of y, columns of panels b..b+P.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block<const R: usize, const P: usize>(
        y: *mut f32,
        x: *const f32,
        w: &Panels,
        i: usize,
        b: usize,
        accumulate: bool,
    ) {
        let (n, k) = (w.n, w.k);
        let panels = w.data.as_ptr().add(b * k * WIDTH);
        let x = x.add(i * k);
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for p in 0..k {
            let mut wv = [_mm512_setzero_ps(); P];
            for (q, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(panels.add(q * k * WIDTH + p * WIDTH));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(r * k + p));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (q, a) in row.iter().enumerate() {
                let column = (b + q) * WIDTH;
                let valid = n.saturating_sub(column).min(WIDTH);
                let mask: __mmask16 = ((1u32 << valid) - 1) as __mmask16;
                let out = y.add((i + r) * n + column);
                let value = if accumulate {
                    _mm512_add_ps(*a, _mm512_maskz_loadu_ps(mask, out))
                } else {
                    *a
                };
                _mm512_mask_storeu_ps(out, mask, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_products_equal_the_naive_product_for_every_row_count_and_ragged_n() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 (products run on the GEMM engine)");
            return;
        }
        for m in (1..=26).chain([37, MAX_ROWS]) {
            for (k, n) in [(384, 40), (37, 3), (16, 17), (1, 1), (96, 64), (20, 100)] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 23) as f32 - 11.0).collect();
                let w: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 17) as f32 - 8.0).collect();
                let panels = Panels::new(&w, n, k);
                for threads in [1, 3] {
                    let mut y = vec![1.0f32; m * n + 5];
                    panels.matmul(&mut y, &x, m, true, threads);
                    for i in 0..m {
                        for j in 0..n {
                            // Small integers: every order of summation is exact.
                            let want: f32 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
                            assert_eq!(y[i * n + j], 1.0 + want, "m {m} k {k} n {n} at ({i}, {j})");
                        }
                    }
                    // Nothing written past the product.
                    assert!(y[m * n..].iter().all(|&v| v == 1.0));
                    panels.matmul(&mut y, &x, m, false, threads);
                    assert_eq!(y[0], (0..k).map(|p| x[p] * w[p]).sum::<f32>());
                }
            }
        }
    }
}
