//! BF16 products: y[M,N] = x[M,K] · W[N,K]ᵀ with W and x rounded to bfloat16 and the
//! sums kept in f32, finished by the shared [`Epilogue`] (bias, activation, residual).
//!
//! Layout: W is packed once at load into panels of 16 output columns; a panel holds
//! ⌈K/2⌉ pairs of 32 bf16, each 16 columns × 2 consecutive k (one AVX-512 register), the
//! layout `vdpbf16ps` reads. Rows are rounded per product: to bf16 pairs for
//! `vdpbf16ps`, or to bf16 values widened back to f32 (low 16 bits zero) for the FMA
//! kernels, which broadcast a value straight from memory.
//!
//! Every path sums a pair as `vdpbf16ps` does: `s += x[2p+1]·w[2p+1]`, then
//! `s += x[2p]·w[2p]`. The product of two bf16 is exact in f32, so an FMA, a multiply
//! then an add, and `vdpbf16ps` all round each step once and the same way: the paths
//! are bit-identical (except where a partial sum falls below f32's smallest normal,
//! which `vdpbf16ps` flushes to zero and the others keep; rounding flushes subnormal
//! inputs on every path).
//!
//! Instruction sets ([`Isa::selected`]; `WISP_BF16_ISA` forces one): AVX-512 BF16
//! (`vdpbf16ps`), AVX-512F (bf16 widened to f32 by a shift, then FMAs), AVX2 + FMA (the
//! same on 8 lanes), and portable Rust. Where a CPU has both AVX-512 kernels, the faster
//! is measured once: on the Sapphire Rapids-class cores this was written on,
//! `vdpbf16ps` retires at half the rate of f32 FMAs (85 vs 172 GFLOP/s per core), so the
//! FMA kernel wins there and BF16's gain is halving the weight traffic.

use crate::epilogue::Epilogue;
use crate::linear::SendPtr;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Output columns per panel.
pub const WIDTH: usize = 16;
/// bf16 values in one pair of a panel: WIDTH columns × 2 consecutive k.
const PAIR_VALUES: usize = WIDTH * 2;

/// `v` rounded to the nearest bfloat16 (ties to even), as `vcvtneps2bf16` rounds:
/// subnormal inputs become zero (keeping the sign), NaN stays a (quiet) NaN, and values
/// past bf16's largest round to infinity.
pub fn round(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    if v.abs() < f32::MIN_POSITIVE {
        return ((bits >> 16) & 0x8000) as u16;
    }
    let tie_to_even = 0x7fff + ((bits >> 16) & 1);
    ((bits + tie_to_even) >> 16) as u16
}

/// The f32 a bf16 stands for (exact).
pub fn widen(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512Bf16,
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|isa| isa.name() == name)
    }

    /// Whether this CPU runs it.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512Bf16 => has!("avx512f") && has!("avx512bf16"),
                Isa::Avx512 => has!("avx512f"),
                Isa::Avx2 => has!("avx2") && has!("fma"),
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// How rows are stored for this kernel.
    fn layout(self) -> Layout {
        match self {
            Isa::Avx512Bf16 => Layout::Pairs,
            _ => Layout::Wide,
        }
    }

    /// The fastest kernel here: the two AVX-512 ones timed against each other on a
    /// product that stays in cache, when the CPU has both; else the widest it runs.
    pub fn fastest() -> Isa {
        let supported: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.supported()).collect();
        if supported.starts_with(&[Isa::Avx512Bf16, Isa::Avx512]) {
            let (bf16, fma) = (time(Isa::Avx512Bf16), time(Isa::Avx512));
            let pick = if bf16 <= fma {
                Isa::Avx512Bf16
            } else {
                Isa::Avx512
            };
            tracing::debug!(
                avx512bf16_us = bf16 * 1e6,
                avx512_us = fma * 1e6,
                chosen = pick.name(),
                "BF16 kernels timed"
            );
            return pick;
        }
        supported.first().copied().unwrap_or(Isa::Portable)
    }

    /// [`Isa::fastest`], or the one `WISP_BF16_ISA` names when this CPU runs it (a name
    /// the CPU cannot run is logged and ignored). Decided once per process.
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let parse = |name: &str| Isa::parse(name).filter(|isa| isa.supported());
            crate::int8::chosen_by_env("WISP_BF16_ISA", parse, Isa::fastest, |isa| isa.name())
        })
    }
}

/// The best of five runs of a 48 × 384 × 384 product on one thread, in seconds.
fn time(isa: Isa) -> f64 {
    let (m, k, n) = (48, 384, 384);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
        .collect();
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
        .collect();
    let panels = Bf16Panels::new(&w, n, k);
    let mut rows = Bf16Rows::default();
    rows.round(isa, &x, m, &panels);
    let mut y = vec![0f32; m * n];
    (0..5)
        .map(|_| {
            let start = std::time::Instant::now();
            matmul(isa, &mut y, &rows, &panels, &Epilogue::default(), 1);
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// W[n, k] rounded to bf16 and packed in panels.
pub struct Bf16Panels {
    data: Vec<u16>,
    n: usize,
    k: usize,
    pairs: usize,
}

impl Bf16Panels {
    /// Packs `w` ([n, k], row-major), rounding each weight to bf16 (exact for weights
    /// that were bf16 in the checkpoint).
    pub fn new(w: &[f32], n: usize, k: usize) -> Bf16Panels {
        assert_eq!(w.len(), n * k);
        let pairs = k.div_ceil(2);
        let blocks = n.div_ceil(WIDTH);
        let mut data = vec![0u16; blocks * pairs * PAIR_VALUES];
        data.par_chunks_mut(pairs * PAIR_VALUES)
            .enumerate()
            .for_each(|(b, panel)| {
                for c in 0..WIDTH.min(n - b * WIDTH) {
                    let row = &w[(b * WIDTH + c) * k..][..k];
                    for (j, &v) in row.iter().enumerate() {
                        panel[(j / 2) * PAIR_VALUES + c * 2 + j % 2] = round(v);
                    }
                }
            });
        Bf16Panels { data, n, k, pairs }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// The weight at (row j, column c) of W, as packed (widened back to f32).
    pub fn get(&self, j: usize, c: usize) -> f32 {
        let (b, lane) = (j / WIDTH, j % WIDTH);
        widen(self.data[b * self.pairs * PAIR_VALUES + (c / 2) * PAIR_VALUES + lane * 2 + c % 2])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Layout {
    /// bf16 values, two per 32-bit word, as `vdpbf16ps` broadcasts them.
    #[default]
    Pairs,
    /// bf16 values widened to f32, for kernels that broadcast one f32 at a time.
    Wide,
}

/// Rows of one product's input, rounded to bf16, k padded to even with zeros.
#[derive(Default)]
pub struct Bf16Rows {
    layout: Layout,
    rows: usize,
    /// Values per row: 2 · ⌈k/2⌉.
    stride: usize,
    pairs: Vec<u16>,
    wide: Vec<f32>,
}

/// Rows per rounding task.
const ROUND_ROWS: usize = 32;

impl Bf16Rows {
    /// Rounds `x` ([m, k], k = the panels') for `isa`'s kernel, splitting the rows over
    /// the current rayon pool when there are many.
    pub fn round(&mut self, isa: Isa, x: &[f32], m: usize, panels: &Bf16Panels) {
        let k = panels.k;
        assert!(x.len() >= m * k && isa.supported());
        let stride = 2 * panels.pairs;
        self.layout = isa.layout();
        self.rows = m;
        self.stride = stride;
        let parallel = m >= 2 * ROUND_ROWS;
        match self.layout {
            Layout::Pairs => {
                if self.pairs.len() < m * stride {
                    self.pairs.resize(m * stride, 0);
                }
                let out = &mut self.pairs[..m * stride];
                let task = |(t, out): (usize, &mut [u16])| {
                    for (r, out) in out.chunks_exact_mut(stride).enumerate() {
                        let row = &x[(t * ROUND_ROWS + r) * k..][..k];
                        round_pairs(isa, row, out);
                    }
                };
                let chunks = out.par_chunks_mut(ROUND_ROWS * stride).enumerate();
                if parallel {
                    chunks.for_each(task);
                } else {
                    out.chunks_mut(ROUND_ROWS * stride)
                        .enumerate()
                        .for_each(task);
                }
            }
            Layout::Wide => {
                if self.wide.len() < m * stride {
                    self.wide.resize(m * stride, 0.0);
                }
                let out = &mut self.wide[..m * stride];
                let task = |(t, out): (usize, &mut [f32])| {
                    for (r, out) in out.chunks_exact_mut(stride).enumerate() {
                        let row = &x[(t * ROUND_ROWS + r) * k..][..k];
                        round_wide(isa, row, out);
                    }
                };
                if parallel {
                    out.par_chunks_mut(ROUND_ROWS * stride)
                        .enumerate()
                        .for_each(task);
                } else {
                    out.chunks_mut(ROUND_ROWS * stride)
                        .enumerate()
                        .for_each(task);
                }
            }
        }
    }

    /// Row r's value at column c, as rounded.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        match self.layout {
            Layout::Pairs => widen(self.pairs[r * self.stride + c]),
            Layout::Wide => self.wide[r * self.stride + c],
        }
    }
}

/// One row rounded into bf16 pairs; the padding value zero.
fn round_pairs(isa: Isa, row: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Bf16 {
        // SAFETY: the caller checked that the CPU runs it.
        unsafe { avx512bf16::round_row(row, out) };
        out[row.len()..].fill(0);
        return;
    }
    let _ = isa;
    for (o, &v) in out.iter_mut().zip(row) {
        *o = round(v);
    }
    out[row.len()..].fill(0);
}

/// One row rounded to bf16 and widened back to f32; the padding value zero.
fn round_wide(isa: Isa, row: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512) {
        // SAFETY: the caller checked that the CPU runs it.
        unsafe { avx512::round_row(row, out) };
        out[row.len()..].fill(0.0);
        return;
    }
    let _ = isa;
    for (o, &v) in out.iter_mut().zip(row) {
        *o = widen(round(v));
    }
    out[row.len()..].fill(0.0);
}

/// The context every kernel's tiles finish with.
struct Finish<'a> {
    y: *mut f32,
    n: usize,
    epilogue: &'a Epilogue<'a>,
}

impl Finish<'_> {
    /// Writes output row `r`, columns `column..column+16` (those below n), from that
    /// panel's sums.
    #[inline(always)]
    unsafe fn store(&self, sums: &[f32; WIDTH], r: usize, column: usize) {
        let valid = self.n.saturating_sub(column).min(WIDTH);
        if valid == WIDTH {
            let out = std::slice::from_raw_parts_mut(self.y.add(r * self.n + column), WIDTH);
            self.epilogue.finish(*sums, column, out);
        } else {
            for (c, &sum) in sums.iter().enumerate().take(valid) {
                let out = std::slice::from_raw_parts_mut(self.y.add(r * self.n + column + c), 1);
                self.epilogue.finish([sum], column + c, out);
            }
        }
    }
}

/// y[m, n] (+)= x · Wᵀ in BF16 with f32 sums, finished by `epilogue`, on `isa` (the
/// rows rounded for it), split over the current rayon pool's threads.
pub fn matmul(
    isa: Isa,
    y: &mut [f32],
    x: &Bf16Rows,
    w: &Bf16Panels,
    epilogue: &Epilogue,
    threads: usize,
) {
    let (m, n) = (x.rows, w.n);
    assert!(isa.supported(), "{} is not supported here", isa.name());
    assert_eq!(x.stride, 2 * w.pairs, "rows rounded for another product");
    assert_eq!(x.layout, isa.layout(), "rows rounded for another kernel");
    assert!(y.len() >= m * n);
    assert!(epilogue.bias.is_none_or(|b| b.len() >= n));
    let y_ptr = SendPtr(y.as_mut_ptr());
    let y_ptr = &y_ptr;
    // SAFETY (all calls): the asserts bound x, y and the panels; each part writes a
    // disjoint set of rows or panel columns of y.
    let run = |rows: std::ops::Range<usize>, panels: std::ops::Range<usize>| unsafe {
        let finish = Finish {
            y: y_ptr.0,
            n,
            epilogue,
        };
        kernel(isa, &finish, x, w, rows, panels)
    };
    crate::linear::split_product(m, w.k, n, WIDTH, threads, &run);
}

unsafe fn kernel(
    isa: Isa,
    finish: &Finish,
    x: &Bf16Rows,
    w: &Bf16Panels,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => avx512bf16::matmul(finish, x, w, rows, panels),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::matmul(finish, x, w, rows, panels),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::matmul(finish, x, w, rows, panels),
        _ => portable(finish, x, w, rows, panels),
    }
}

/// Rows per cache block: a block's rounded rows stay in L2 while every panel passes
/// over them.
const ROW_BLOCK: usize = 192;

unsafe fn portable(
    finish: &Finish,
    x: &Bf16Rows,
    w: &Bf16Panels,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
) {
    for b in panels {
        let panel = &w.data[b * w.pairs * PAIR_VALUES..][..w.pairs * PAIR_VALUES];
        for r in rows.clone() {
            let a = &x.wide[r * x.stride..][..x.stride];
            let mut sums = [0f32; WIDTH];
            for (p, pair) in panel.chunks_exact(PAIR_VALUES).enumerate() {
                let (even, odd) = (a[2 * p], a[2 * p + 1]);
                for (c, sum) in sums.iter_mut().enumerate() {
                    // Exact products: each add rounds once, as vdpbf16ps does.
                    *sum += odd * widen(pair[c * 2 + 1]);
                    *sum += even * widen(pair[c * 2]);
                }
            }
            finish.store(&sums, r, b * WIDTH);
        }
    }
}

/// Walks `rows` × `panels` in cache blocks of rows and register tiles of at most
/// `ROWS` rows × `PANELS` panels, calling `tile(count, width, first row, first panel)`.
#[inline(always)]
fn tiles<const ROWS: usize, const PANELS: usize>(
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    mut tile: impl FnMut(usize, usize, usize, usize),
) {
    let mut block_start = rows.start;
    while block_start < rows.end {
        let block_end = (block_start + ROW_BLOCK).min(rows.end);
        let mut b = panels.start;
        while b < panels.end {
            let width = (panels.end - b).min(PANELS);
            let mut i = block_start;
            while i < block_end {
                let count = (block_end - i).min(ROWS);
                tile(count, width, i, b);
                i += count;
            }
            b += width;
        }
        block_start = block_end;
    }
}

/// Calls `$tile::<R, P>(args)` for a register tile of `count` rows (1 to 12) × `width`
/// panels (1 or 2): the monomorphised tiles of both AVX-512 kernels.
#[cfg(target_arch = "x86_64")]
macro_rules! tiles_12x2 {
    ($tile:ident, $count:expr, $width:expr, $($arg:expr),*) => {
        tiles_12x2!(@rows $tile, $count, $width, ($($arg),*), 1 2 3 4 5 6 7 8 9 10 11 12)
    };
    (@rows $tile:ident, $count:expr, $width:expr, $args:tt, $($r:literal)*) => {
        match ($count, $width) {
            $(($r, 2) => tiles_12x2!(@call $tile, $r, 2, $args),
              ($r, 1) => tiles_12x2!(@call $tile, $r, 1, $args),)*
            _ => unreachable!(),
        }
    };
    (@call $tile:ident, $r:literal, $p:literal, ($($arg:expr),*)) => {
        $tile::<$r, $p>($($arg),*)
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use super::{Bf16Panels, Bf16Rows, Finish, PAIR_VALUES};
    use std::arch::x86_64::*;

    /// Register block: 12 rows × 2 panels of sums (24), two weight registers and a
    /// broadcast.
    const ROWS: usize = 12;
    const PANELS: usize = 2;

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn matmul(
        finish: &Finish,
        x: &Bf16Rows,
        w: &Bf16Panels,
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
    ) {
        super::tiles::<ROWS, PANELS>(rows, panels, |count, width, i, b| {
            tiles_12x2!(tile, count, width, finish, x, w, i, b)
        });
    }

    /// 16 values at a time with `vcvtneps2bf16` (round to nearest even, subnormals to
    /// zero: [`super::round`]).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn round_row(row: &[f32], out: &mut [u16]) {
        for c in (0..row.len()).step_by(16) {
            let mask: __mmask16 = ((1u32 << (row.len() - c).min(16)) - 1) as __mmask16;
            let v = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(c));
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_mask_storeu_epi16(out.as_mut_ptr().add(c).cast(), mask, b);
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn tile<const R: usize, const P: usize>(
        finish: &Finish,
        x: &Bf16Rows,
        w: &Bf16Panels,
        i: usize,
        b: usize,
    ) {
        let panel_len = w.pairs * PAIR_VALUES;
        let panels = w.data.as_ptr().add(b * panel_len);
        let a = x.pairs.as_ptr().add(i * x.stride);
        let mut sums = [[_mm512_setzero_ps(); P]; R];
        for p in 0..w.pairs {
            let mut wv = [_mm512_setzero_si512(); P];
            for (q, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(panels.add(q * panel_len + p * PAIR_VALUES).cast());
            }
            for (r, row) in sums.iter_mut().enumerate() {
                let pair = a.add(r * x.stride + 2 * p).cast::<i32>().read_unaligned();
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                for (s, v) in row.iter_mut().zip(&wv) {
                    *s = _mm512_dpbf16_ps(*s, av, std::mem::transmute::<__m512i, __m512bh>(*v));
                }
            }
        }
        super::avx512::finish_tile(finish, &sums, i, b);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Bf16Panels, Bf16Rows, Finish, PAIR_VALUES, WIDTH};
    use std::arch::x86_64::*;

    /// Register block: 12 rows × 2 panels of sums (24), four weight registers (each
    /// panel's even and odd k) and two broadcasts.
    const ROWS: usize = 12;
    const PANELS: usize = 2;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn matmul(
        finish: &Finish,
        x: &Bf16Rows,
        w: &Bf16Panels,
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
    ) {
        super::tiles::<ROWS, PANELS>(rows, panels, |count, width, i, b| {
            tiles_12x2!(tile, count, width, finish, x, w, i, b)
        });
    }

    /// [`super::round`] and widen, 16 values at a time in integer arithmetic.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn round_row(row: &[f32], out: &mut [f32]) {
        for c in (0..row.len()).step_by(16) {
            let mask: __mmask16 = ((1u32 << (row.len() - c).min(16)) - 1) as __mmask16;
            let v = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(c));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(c), mask, round16(v));
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn round16(v: __m512) -> __m512 {
        let bits = _mm512_castps_si512(v);
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb);
        let rounded = _mm512_and_si512(_mm512_add_epi32(bits, bias), high);
        let magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
        let subnormal = _mm512_cmplt_epi32_mask(
            magnitude,
            _mm512_set1_epi32(f32::MIN_POSITIVE.to_bits() as i32),
        );
        let nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7f80_0000));
        let sign = _mm512_and_si512(bits, _mm512_set1_epi32(i32::MIN));
        let quiet = _mm512_and_si512(_mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000)), high);
        let r = _mm512_mask_blend_epi32(subnormal, rounded, sign);
        _mm512_castsi512_ps(_mm512_mask_blend_epi32(nan, r, quiet))
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const R: usize, const P: usize>(
        finish: &Finish,
        x: &Bf16Rows,
        w: &Bf16Panels,
        i: usize,
        b: usize,
    ) {
        let panel_len = w.pairs * PAIR_VALUES;
        let panels = w.data.as_ptr().add(b * panel_len);
        let a = x.wide.as_ptr().add(i * x.stride);
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let mut sums = [[_mm512_setzero_ps(); P]; R];
        for p in 0..w.pairs {
            let mut even = [_mm512_setzero_ps(); P];
            let mut odd = [_mm512_setzero_ps(); P];
            for q in 0..P {
                let v = _mm512_loadu_si512(panels.add(q * panel_len + p * PAIR_VALUES).cast());
                even[q] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                odd[q] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
            }
            for (r, row) in sums.iter_mut().enumerate() {
                let values = a.add(r * x.stride + 2 * p);
                let (xe, xo) = (_mm512_set1_ps(*values), _mm512_set1_ps(*values.add(1)));
                for q in 0..P {
                    row[q] = _mm512_fmadd_ps(xo, odd[q], row[q]);
                    row[q] = _mm512_fmadd_ps(xe, even[q], row[q]);
                }
            }
        }
        finish_tile(finish, &sums, i, b);
    }

    /// Finishes a tile's sums: full panels in registers, the last partial one through
    /// [`Finish::store`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn finish_tile<const R: usize, const P: usize>(
        finish: &Finish,
        sums: &[[__m512; P]; R],
        i: usize,
        b: usize,
    ) {
        for (r, row) in sums.iter().enumerate() {
            for (q, s) in row.iter().enumerate() {
                let column = (b + q) * WIDTH;
                if column + WIDTH <= finish.n {
                    let out = finish.y.add((i + r) * finish.n + column);
                    crate::epilogue::avx512::finish(finish.epilogue, *s, column, out);
                } else {
                    let mut lanes = [0f32; WIDTH];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), *s);
                    finish.store(&lanes, i + r, column);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Bf16Panels, Bf16Rows, Finish, PAIR_VALUES, WIDTH};
    use std::arch::x86_64::*;

    /// Register block: 4 rows × one panel as two halves of 8 columns (8 sums), four
    /// weight registers and two broadcasts, of the 16.
    const ROWS: usize = 4;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matmul(
        finish: &Finish,
        x: &Bf16Rows,
        w: &Bf16Panels,
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
    ) {
        super::tiles::<ROWS, 1>(rows, panels, |count, _, i, b| match count {
            4 => tile::<4>(finish, x, w, i, b),
            3 => tile::<3>(finish, x, w, i, b),
            2 => tile::<2>(finish, x, w, i, b),
            1 => tile::<1>(finish, x, w, i, b),
            _ => unreachable!(),
        });
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const R: usize>(
        finish: &Finish,
        x: &Bf16Rows,
        w: &Bf16Panels,
        i: usize,
        b: usize,
    ) {
        let panel = w.data.as_ptr().add(b * w.pairs * PAIR_VALUES);
        let a = x.wide.as_ptr().add(i * x.stride);
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let mut sums = [[_mm256_setzero_ps(); 2]; R];
        for p in 0..w.pairs {
            let mut even = [_mm256_setzero_ps(); 2];
            let mut odd = [_mm256_setzero_ps(); 2];
            for h in 0..2 {
                let v = _mm256_loadu_si256(panel.add(p * PAIR_VALUES + h * WIDTH).cast());
                even[h] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                odd[h] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            }
            for (r, row) in sums.iter_mut().enumerate() {
                let values = a.add(r * x.stride + 2 * p);
                let (xe, xo) = (_mm256_set1_ps(*values), _mm256_set1_ps(*values.add(1)));
                for h in 0..2 {
                    row[h] = _mm256_fmadd_ps(xo, odd[h], row[h]);
                    row[h] = _mm256_fmadd_ps(xe, even[h], row[h]);
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            let mut lanes = [0f32; WIDTH];
            _mm256_storeu_ps(lanes.as_mut_ptr(), row[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), row[1]);
            finish.store(&lanes, i + r, b * WIDTH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Activation;

    /// Each product in f64 from the rounded values: the kernels' f32 sums must come
    /// within f32 accumulation error of it.
    fn reference(x: &Bf16Rows, w: &Bf16Panels, m: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * w.n];
        for i in 0..m {
            for j in 0..w.n {
                y[i * w.n + j] = (0..w.k)
                    .map(|c| x.get(i, c) as f64 * w.get(j, c) as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn rounding_is_to_nearest_even_and_flushes_subnormals() {
        assert_eq!(round(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: to even (1).
        assert_eq!(round(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶: to even, up.
        assert_eq!(round(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(round(1.0 + 1.5 / 256.0), 0x3f81);
        assert_eq!(round(-2.5), 0xc020);
        assert_eq!(round(f32::MAX), 0x7f80, "past bf16's largest: infinity");
        assert_eq!(round(f32::INFINITY), 0x7f80);
        assert_eq!(round(-1e-40), 0x8000, "a subnormal becomes -0");
        assert!(widen(round(f32::NAN)).is_nan());
        assert_eq!(widen(0x4049), 3.140625);
    }

    #[test]
    fn every_rounding_path_gives_the_same_values() {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut row: Vec<f32> = (0..301)
            .map(|_| f32::from_bits(rng.u32(..)))
            .filter(|v| !v.is_nan())
            .collect();
        row.extend([
            1.0 + 1.0 / 256.0,
            -1e-40,
            1e-39,
            f32::MAX,
            -0.0,
            f32::MIN_POSITIVE,
        ]);
        let k = row.len();
        let panels = Bf16Panels::new(&vec![0.0; 16 * k], 16, k);
        let want: Vec<f32> = row.iter().map(|&v| widen(round(v))).collect();
        for isa in Isa::ALL.into_iter().filter(|isa| isa.supported()) {
            let mut rows = Bf16Rows::default();
            rows.round(isa, &row, 1, &panels);
            for (c, &v) in want.iter().enumerate() {
                assert_eq!(
                    rows.get(0, c).to_bits(),
                    v.to_bits(),
                    "{}: {:e}",
                    isa.name(),
                    row[c]
                );
            }
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_sums_on_odd_shapes() {
        let mut rng = fastrand::Rng::with_seed(11);
        let shapes = [
            (1, 1, 1),
            (1, 384, 1152),
            (3, 7, 17),
            (13, 33, 31),
            (12, 64, 48),
            (25, 130, 95),
            (200, 96, 40),
            (7, 1536, 33),
        ];
        for (m, k, n) in shapes {
            let w: Vec<f32> = (0..n * k).map(|_| rng.f32() * 2.0 - 1.0).collect();
            let x: Vec<f32> = (0..m * k).map(|_| rng.f32() * 4.0 - 2.0).collect();
            let panels = Bf16Panels::new(&w, n, k);
            let mut first: Option<Vec<f32>> = None;
            for isa in Isa::ALL.into_iter().filter(|isa| isa.supported()) {
                let mut rows = Bf16Rows::default();
                rows.round(isa, &x, m, &panels);
                let want = reference(&rows, &panels, m);
                for threads in [1, 3] {
                    let mut y = vec![f32::NAN; m * n + 3];
                    matmul(isa, &mut y, &rows, &panels, &Epilogue::default(), threads);
                    for (j, (&got, &want)) in y.iter().zip(&want).enumerate() {
                        let bound = 1e-6 * (k as f64) * 4.0 + 1e-6;
                        assert!(
                            (got as f64 - want).abs() <= bound,
                            "{} m {m} k {k} n {n} at {j}: {got} vs {want}",
                            isa.name()
                        );
                    }
                    assert!(y[m * n..].iter().all(|v| v.is_nan()), "wrote past y");
                    match &first {
                        None => first = Some(y[..m * n].to_vec()),
                        Some(first) => {
                            let same = first
                                .iter()
                                .zip(&y)
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{} differs from the first path", isa.name());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_epilogue_adds_bias_scales_activates_and_accumulates() {
        let (m, k, n) = (5, 40, 37);
        let mut rng = fastrand::Rng::with_seed(2);
        let w: Vec<f32> = (0..n * k).map(|_| rng.f32() - 0.5).collect();
        let x: Vec<f32> = (0..m * k).map(|_| rng.f32() - 0.5).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
        let panels = Bf16Panels::new(&w, n, k);
        for isa in Isa::ALL.into_iter().filter(|isa| isa.supported()) {
            let mut rows = Bf16Rows::default();
            rows.round(isa, &x, m, &panels);
            let plain = reference(&rows, &panels, m);
            let mut y = vec![1f32; m * n];
            let epilogue = Epilogue {
                bias: Some(&bias),
                activation: Some(Activation::Gelu),
                scale_first: Some((16, 0.5)),
                accumulate: true,
            };
            matmul(isa, &mut y, &rows, &panels, &epilogue, 2);
            for i in 0..m {
                for j in 0..n {
                    let factor = if j < 16 { 0.5 } else { 1.0 };
                    let v = (plain[i * n + j] as f32 + bias[j]) * factor;
                    let want = 1.0 + Activation::Gelu.apply(v);
                    let got = y[i * n + j];
                    assert!(
                        (got - want).abs() < 1e-5,
                        "{} {i},{j}: {got} vs {want}",
                        isa.name()
                    );
                }
            }
        }
    }
}
