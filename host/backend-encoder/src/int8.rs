//! INT8 products: y[M,N] = dequant(q(x)[M,K] · W8[N,K]ᵀ) (+ bias, activation), with
//! W8 quantized symmetrically per output column and packed once at load, and x
//! quantized per row (dynamic) or per tensor (a calibrated static scale).
//!
//! Layout: W is packed into panels of 16 output columns; a panel holds ⌈K/4⌉ groups of
//! 64 bytes, each 16 columns × 4 consecutive k (one AVX-512 register). Activations are
//! stored as unsigned bytes q + z, because `vpdpbusd` multiplies unsigned by signed
//! bytes: z = 128 for symmetric quantization, or a zero point chosen from the range for
//! asymmetric (GELU's output lies mostly in [-0.17, ∞)); the z·Σₖw each column picks up
//! is subtracted in the epilogue. All arithmetic up to the epilogue is integer and exact, so every
//! instruction set gives bit-identical results: the epilogue is one shared scalar
//! function.
//!
//! Instruction sets, chosen at run time ([`Isa::selected`]; `WISP_INT8_ISA` forces one):
//! AVX-512 VNNI (`vpdpbusd` on 16 lanes), AVX-VNNI (the same on 8), AVX2 (bytes widened
//! to 16 bits and `vpmaddwd`: exact, where `vpmaddubsw` would saturate at 16 bits for
//! products of 255·127 pairs), and portable Rust.

pub use crate::epilogue::Epilogue;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Output columns per panel.
pub const WIDTH: usize = 16;
/// Consecutive k per 32-bit lane.
const GROUP: usize = 4;
/// Bytes of one group of a panel: WIDTH columns × GROUP k.
const GROUP_BYTES: usize = WIDTH * GROUP;
/// The largest quantized value; -127..=127 keeps the range symmetric.
pub const QMAX: f32 = 127.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512Vnni,
    AvxVnni,
    Avx2,
    Portable,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2, Isa::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512vnni",
            Isa::AvxVnni => "avxvnni",
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
                Isa::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Isa::AvxVnni => has!("avx2") && has!("avxvnni"),
                Isa::Avx2 => has!("avx2"),
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// The fastest this CPU runs.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.supported())
            .unwrap_or(Isa::Portable)
    }

    /// [`Isa::best`], or the one `WISP_INT8_ISA` names when this CPU runs it (a name the
    /// CPU cannot run is logged and ignored).
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let parse = |name: &str| Isa::parse(name).filter(|isa| isa.supported());
            chosen_by_env("WISP_INT8_ISA", parse, Isa::best, |isa| isa.name())
        })
    }
}

/// The kernel the environment variable `var` names when this CPU runs it (`parse`
/// answers None otherwise: logged, then `default`), else `default`. Shared by the INT8
/// and BF16 kernel families.
pub(crate) fn chosen_by_env<I: Copy>(
    var: &str,
    parse: impl Fn(&str) -> Option<I>,
    default: impl Fn() -> I,
    name: impl Fn(I) -> &'static str,
) -> I {
    match std::env::var(var) {
        Ok(requested) if !requested.is_empty() => parse(&requested).unwrap_or_else(|| {
            let using = default();
            tracing::warn!(
                %requested,
                using = name(using),
                "{var} names an instruction set this CPU does not run, or none wisp knows"
            );
            using
        }),
        _ => default(),
    }
}

/// W8[n, k] packed in panels, with each column's Σₖ W8[j, k] (for the zero point).
pub struct Int8Panels {
    n: usize,
    k: usize,
    groups: usize,
    data: Vec<i8>,
    column_sums: Vec<i32>,
}

impl Int8Panels {
    /// Packs `w` ([n, k], row-major).
    pub fn new(w: &[i8], n: usize, k: usize) -> Int8Panels {
        assert!(w.len() >= n * k);
        let groups = k.div_ceil(GROUP);
        let blocks = n.div_ceil(WIDTH);
        let mut data = vec![0i8; blocks * groups * GROUP_BYTES];
        let mut column_sums = vec![0i32; blocks * WIDTH];
        for j in 0..n {
            let (block, c) = (j / WIDTH, j % WIDTH);
            let row = &w[j * k..][..k];
            for (p, &v) in row.iter().enumerate() {
                data[(block * groups + p / GROUP) * GROUP_BYTES + c * GROUP + p % GROUP] = v;
            }
            column_sums[j] = row.iter().map(|&v| v as i32).sum::<i32>();
        }
        Int8Panels {
            n,
            k,
            groups,
            data,
            column_sums,
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn bytes(&self) -> usize {
        self.data.len() + self.column_sums.len() * 4
    }

    /// Row stride of the quantized activations this product reads.
    fn padded_k(&self) -> usize {
        self.groups * GROUP
    }
}

/// How a product's input is quantized.
#[derive(Debug, Clone, Default)]
pub struct InputQuantization {
    /// A calibrated per-tensor range; `None`: each row's own range at run time.
    pub range: Option<Range>,
    /// Zero point chosen from the range (u8 over [min, max]) instead of symmetric ±127.
    pub asymmetric: bool,
    /// SmoothQuant: input channel c is divided by `smooth[c]` before quantization (the
    /// weights were multiplied by it), which moves outlier channels' range into W.
    pub smooth: Option<Vec<f32>>,
}

/// A calibrated range of a product's input (after smoothing). Symmetric quantization
/// uses max(|min|, |max|).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub min: f32,
    pub max: f32,
}

/// Activations quantized for one product: q + z as bytes, rows padded to a multiple of
/// 4 with the zero point, and each row's scale and zero point.
///
/// Row-major, or for AVX-512 VNNI in tiles of its register block's rows: group g of
/// the tile's rows r at `g·(tile·4) + r·4`, so the kernel broadcasts every row of a
/// group from one pointer and constant offsets (row-major needed an address register
/// or an add per row, which took issue slots from `vpdpbusd`).
#[derive(Default)]
pub struct QuantizedRows {
    data: Vec<u8>,
    scales: Vec<f32>,
    zero_points: Vec<i32>,
    stride: usize,
    rows: usize,
    /// Rows per tile, or 0 for row-major.
    tile: usize,
}

/// One block of rows to quantize: their input, their bytes, and where their scales and
/// zero points go.
type BlockParts<'a> = (((&'a [f32], &'a mut [u8]), &'a mut [f32]), &'a mut [i32]);

/// Quantizes one block of rows (a tile, or 16 rows row-major) into its bytes.
struct BlockJob<'a> {
    k: usize,
    stride: usize,
    /// Rows per tile, or 0 for row-major.
    tile: usize,
    /// Rows per block: a tile, or 16 row-major.
    block: usize,
    input: &'a InputQuantization,
    /// 1/s per channel when the input is smoothed.
    inverse_smooth: Option<Vec<f32>>,
}

impl BlockJob<'_> {
    fn run(&self, rows: &[f32], out: &mut [u8], scales: &mut [f32], zeros: &mut [i32]) {
        let (k, stride, tile) = (self.k, self.stride, self.tile);
        if tile == 0 {
            for (r, row) in rows.chunks_exact(k).enumerate() {
                let bytes = &mut out[r * stride..][..stride];
                (scales[r], zeros[r]) =
                    quantize_row(row, bytes, self.input, self.inverse_smooth.as_deref());
            }
            return;
        }
        // Tiled: each row quantized into a row buffer, then its groups interleaved.
        ROW_BYTES.with(|cell| {
            let mut row_bytes = cell.borrow_mut();
            row_bytes.resize(stride, 0);
            let groups = stride / GROUP;
            for (r, row) in rows.chunks_exact(k).enumerate() {
                (scales[r], zeros[r]) = quantize_row(
                    row,
                    &mut row_bytes,
                    self.input,
                    self.inverse_smooth.as_deref(),
                );
                assert!(out.len() >= (groups - 1) * tile * GROUP + r * GROUP + GROUP);
                for g in 0..groups {
                    // SAFETY: both 4-byte ranges are in bounds (stride = groups·4; the
                    // assert covers the last group of this row).
                    unsafe {
                        let four = row_bytes
                            .as_ptr()
                            .add(g * GROUP)
                            .cast::<u32>()
                            .read_unaligned();
                        let at = out.as_mut_ptr().add(g * tile * GROUP + r * GROUP);
                        at.cast::<u32>().write_unaligned(four);
                    }
                }
            }
        })
    }
}

/// Rounds to the nearest integer, ties to even, for |v| < 2²²: adding 1.5·2²³ leaves no
/// fraction bits. Branch-free so quantization loops vectorise.
#[inline(always)]
fn round(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

impl QuantizedRows {
    /// Quantizes x[m, k] for `w` as `input` says, laid out for `isa`'s kernel.
    pub fn quantize(
        &mut self,
        isa: Isa,
        x: &[f32],
        m: usize,
        w: &Int8Panels,
        input: &InputQuantization,
    ) {
        self.quantize_rows(isa, x, m, w, input, true)
    }

    /// [`QuantizedRows::quantize`] on this thread only (inside a task that holds
    /// thread-local buffers, where waiting on other tasks could re-enter it).
    pub fn quantize_here(
        &mut self,
        isa: Isa,
        x: &[f32],
        m: usize,
        w: &Int8Panels,
        input: &InputQuantization,
    ) {
        self.quantize_rows(isa, x, m, w, input, false)
    }

    /// The tile height `isa`'s kernel reads (0: row-major).
    fn tile_for(isa: Isa) -> usize {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => avx512::ROWS,
            _ => 0,
        }
    }

    /// The quantized value + z of (row, col), whatever the layout.
    pub fn byte(&self, row: usize, col: usize) -> u8 {
        if self.tile == 0 {
            return self.data[row * self.stride + col];
        }
        let tile_base = (row / self.tile) * self.tile * self.stride;
        self.data[tile_base
            + (col / GROUP) * self.tile * GROUP
            + (row % self.tile) * GROUP
            + col % GROUP]
    }

    /// Sizes the buffers for x[m, k] quantized for `w` on `isa`; returns the job that
    /// quantizes one block of its rows.
    fn prepare<'a>(
        &mut self,
        isa: Isa,
        m: usize,
        w: &Int8Panels,
        input: &'a InputQuantization,
    ) -> BlockJob<'a> {
        self.stride = w.padded_k();
        self.rows = m;
        self.tile = Self::tile_for(isa);
        // Every byte the kernel reads is written by the blocks; growing is the only fill
        // needed.
        let len = m.next_multiple_of(self.block_rows()) * self.stride;
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        self.scales.clear();
        self.scales.resize(m, 1.0);
        self.zero_points.clear();
        self.zero_points.resize(m, 128);
        BlockJob {
            k: w.k,
            stride: self.stride,
            tile: self.tile,
            block: self.block_rows(),
            input,
            inverse_smooth: input
                .smooth
                .as_ref()
                .map(|s| s.iter().map(|v| 1.0 / v).collect()),
        }
    }

    /// Rows per block: a tile, or 16 rows row-major.
    fn block_rows(&self) -> usize {
        if self.tile > 0 {
            self.tile
        } else {
            16
        }
    }

    fn quantize_rows(
        &mut self,
        isa: Isa,
        x: &[f32],
        m: usize,
        w: &Int8Panels,
        input: &InputQuantization,
        parallel: bool,
    ) {
        let k = w.k;
        assert!(x.len() >= m * k);
        let job = self.prepare(isa, m, w, input);
        let (block, stride) = (job.block, job.stride);
        let data = &mut self.data[..m.next_multiple_of(block) * stride];
        let one = |(((rows, out), scales), zeros): BlockParts| job.run(rows, out, scales, zeros);
        if parallel {
            x[..m * k]
                .par_chunks(block * k)
                .zip(data.par_chunks_mut(block * stride))
                .zip(self.scales.par_chunks_mut(block))
                .zip(self.zero_points.par_chunks_mut(block))
                .for_each(one);
        } else {
            x[..m * k]
                .chunks(block * k)
                .zip(data.chunks_mut(block * stride))
                .zip(self.scales.chunks_mut(block))
                .zip(self.zero_points.chunks_mut(block))
                .for_each(one);
        }
    }

    /// Applies `norm` to each row of x[m, k] in place (the LayerNorm that produces a
    /// product's input) and quantizes the rows for `w` in the same pass, while they are
    /// in cache: one parallel step instead of two.
    pub fn normalize_and_quantize(
        &mut self,
        isa: Isa,
        x: &mut [f32],
        m: usize,
        w: &Int8Panels,
        input: &InputQuantization,
        norm: &(dyn Fn(&mut [f32]) + Sync),
    ) {
        let k = w.k;
        assert!(x.len() >= m * k);
        let job = self.prepare(isa, m, w, input);
        let (block, stride) = (job.block, job.stride);
        let data = &mut self.data[..m.next_multiple_of(block) * stride];
        x[..m * k]
            .par_chunks_mut(block * k)
            .zip(data.par_chunks_mut(block * stride))
            .zip(self.scales.par_chunks_mut(block))
            .zip(self.zero_points.par_chunks_mut(block))
            .for_each(|(((rows, out), scales), zeros)| {
                rows.chunks_exact_mut(k).for_each(norm);
                job.run(rows, out, scales, zeros)
            });
    }

    /// The quantized values row-major, [rows, stride] of q + z (tests).
    pub fn bytes(&self) -> Vec<u8> {
        (0..self.rows)
            .flat_map(|r| (0..self.stride).map(move |c| (r, c)))
            .map(|(r, c)| self.byte(r, c))
            .collect()
    }
}

/// Scale and zero point for values in [min, max]: symmetric (z = 128, ±127 steps of
/// max(|min|, |max|)/127) or asymmetric (0..=255 over [min(min, 0), max(max, 0)], so that
/// 0 is exact).
pub fn scale_and_zero_point(min: f32, max: f32, asymmetric: bool) -> (f32, i32) {
    let (min, max) = (min.min(0.0), max.max(0.0));
    if !(min.is_finite() && max.is_finite()) || max - min <= 0.0 {
        return (1.0, 128);
    }
    if asymmetric {
        let scale = (max - min) / 255.0;
        let zero = round(-min / scale).clamp(0.0, 255.0) as i32;
        (scale, zero)
    } else {
        (max.max(-min) / QMAX, 128)
    }
}

/// One row: `out = clamp(round(x / s / scale) + z)`, with scale and zero point from this
/// row's range unless `input` has a calibrated one; returns them. The padding past k is
/// the zero point (the value 0). Compiled for AVX-512 and AVX2 too, chosen at run time.
#[inline]
fn quantize_row(
    row: &[f32],
    out: &mut [u8],
    input: &InputQuantization,
    inverse_smooth: Option<&[f32]>,
) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(
            row: &[f32],
            out: &mut [u8],
            input: &InputQuantization,
            inverse_smooth: Option<&[f32]>,
        ) -> (f32, i32) {
            quantize_row_body(row, out, input, inverse_smooth)
        }
        if has!("avx512f") && has!("avx512bw") {
            // SAFETY: the CPU has the features the copy was compiled for.
            return unsafe { avx512::quantize_row(row, out, input, inverse_smooth) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: as above.
            return unsafe { avx2(row, out, input, inverse_smooth) };
        }
    }
    quantize_row_body(row, out, input, inverse_smooth)
}

/// (min, max) of `values` over 16 independent lanes, so the loop vectorises.
#[inline(always)]
fn min_max(values: &[f32]) -> (f32, f32) {
    let (mut low, mut high) = ([0f32; 16], [0f32; 16]);
    let chunks = values.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for i in 0..16 {
            low[i] = low[i].min(chunk[i]);
            high[i] = high[i].max(chunk[i]);
        }
    }
    let fold = |lanes: [f32; 16], f: fn(f32, f32) -> f32| {
        lanes.into_iter().chain(tail.iter().copied()).fold(0.0, f)
    };
    (fold(low, f32::min), fold(high, f32::max))
}

#[inline(always)]
fn quantize_row_body(
    row: &[f32],
    out: &mut [u8],
    input: &InputQuantization,
    inverse_smooth: Option<&[f32]>,
) -> (f32, i32) {
    let (values, padding) = out.split_at_mut(row.len());
    match inverse_smooth {
        // The smoothed row in a per-thread buffer: no allocation per row.
        Some(inverse) => SMOOTHED_ROW.with(|cell| {
            let mut smoothed = cell.borrow_mut();
            smoothed.clear();
            smoothed.extend(row.iter().zip(inverse).map(|(x, s)| x * s));
            quantize_values(&smoothed, values, padding, input)
        }),
        None => quantize_values(row, values, padding, input),
    }
}

thread_local! {
    /// One row divided by its smoothing (quantize_row_body), and one row's bytes before
    /// they are interleaved into a tile (BlockJob): reused, not allocated per row.
    static SMOOTHED_ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static ROW_BYTES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[inline(always)]
fn quantize_values(
    row: &[f32],
    values: &mut [u8],
    padding: &mut [u8],
    input: &InputQuantization,
) -> (f32, i32) {
    let range = input.range.unwrap_or_else(|| {
        let (min, max) = min_max(row);
        Range { min, max }
    });
    let (scale, zero) = scale_and_zero_point(range.min, range.max, input.asymmetric);
    let (low, high) = if input.asymmetric {
        (0.0, 255.0)
    } else {
        (128.0 - QMAX, 128.0 + QMAX)
    };
    let (inv, z) = (1.0 / scale, zero as f32);
    // Clamped before rounding (the same for integer bounds), so the loop has no
    // out-of-range conversions and vectorises.
    let (low, high) = (low - z, high - z);
    for (o, &x) in values.iter_mut().zip(row) {
        *o = (round((x * inv).clamp(low, high)) + z) as i32 as u8;
    }
    padding.fill(zero as u8);
    (scale, zero)
}

/// The context every kernel's tiles finish with.
struct Finish<'a> {
    y: *mut f32,
    n: usize,
    rows: &'a QuantizedRows,
    column_sums: &'a [i32],
    /// Each output column's weight scale.
    column_scales: &'a [f32],
    epilogue: &'a Epilogue<'a>,
}

impl Finish<'_> {
    /// Writes output row `r`, columns `column..column+16` (those below n), from the
    /// integer sums of that panel. Inlined into each kernel, so full panels vectorise
    /// for its instruction set (the same IEEE operations in the same order: no path
    /// rounds differently).
    #[inline(always)]
    unsafe fn store(&self, acc: &[i32; WIDTH], r: usize, column: usize) {
        let valid = self.n.saturating_sub(column).min(WIDTH);
        if valid == WIDTH {
            self.store_n::<WIDTH>(acc, r, column);
        } else {
            for (c, &sum) in acc.iter().enumerate().take(valid) {
                self.store_n::<1>(&[sum], r, column + c);
            }
        }
    }

    /// Dequantizes: `acc · row_scale · column_scale`, then the epilogue.
    #[inline(always)]
    unsafe fn store_n<const L: usize>(&self, acc: &[i32; L], r: usize, column: usize) {
        let (row_scale, zero) = (self.rows.scales[r], self.rows.zero_points[r]);
        let column_sums = &self.column_sums[column..column + L];
        let column_scales = &self.column_scales[column..column + L];
        let mut v = [0f32; L];
        for c in 0..L {
            let integer = acc[c] - zero * column_sums[c];
            v[c] = integer as f32 * (row_scale * column_scales[c]);
        }
        let out = std::slice::from_raw_parts_mut(self.y.add(r * self.n + column), L);
        self.epilogue.finish(v, column, out);
    }
}

/// y[m, n] (+)= the INT8 product of `x` (quantized rows) and `w`, dequantized with each
/// row's scale and `column_scales`, finished by `epilogue`, on `isa`, split over the
/// current rayon pool's threads.
pub fn matmul(
    isa: Isa,
    y: &mut [f32],
    x: &QuantizedRows,
    w: &Int8Panels,
    column_scales: &[f32],
    epilogue: &Epilogue,
    threads: usize,
) {
    let (m, n) = (x.rows, w.n);
    assert!(isa.supported(), "{} is not supported here", isa.name());
    assert_eq!(x.stride, w.padded_k(), "rows quantized for another product");
    assert_eq!(
        x.tile,
        QuantizedRows::tile_for(isa),
        "rows laid out for another kernel"
    );
    assert!(y.len() >= m * n && column_scales.len() >= n);
    assert!(epilogue.bias.is_none_or(|b| b.len() >= n));
    let y_ptr = crate::linear::SendPtr(y.as_mut_ptr());
    let y_ptr = &y_ptr;
    // SAFETY (all calls): the asserts bound x, y and the panels; each part writes a
    // disjoint set of rows or panel columns of y, and row parts start on whole tiles.
    let run = |rows: std::ops::Range<usize>, panels: std::ops::Range<usize>| unsafe {
        let finish = Finish {
            y: y_ptr.0,
            n,
            rows: x,
            column_sums: &w.column_sums,
            column_scales,
            epilogue,
        };
        kernel(isa, &finish, w, rows, panels)
    };
    crate::linear::split_product(m, w.k, n, WIDTH, threads, &run);
}

unsafe fn kernel(
    isa: Isa,
    finish: &Finish,
    w: &Int8Panels,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => avx512::matmul(finish, w, rows, panels),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => avx2::matmul::<true>(finish, w, rows, panels),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::matmul::<false>(finish, w, rows, panels),
        _ => portable(finish, w, rows, panels),
    }
}

/// Rows per cache block: a block's quantized rows stay in L2 while every panel passes
/// over them.
const ROW_BLOCK: usize = 192;

unsafe fn portable(
    finish: &Finish,
    w: &Int8Panels,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
) {
    let x = finish.rows;
    for b in panels {
        let panel = &w.data[b * w.groups * GROUP_BYTES..][..w.groups * GROUP_BYTES];
        for r in rows.clone() {
            let a = &x.data[r * x.stride..][..x.stride];
            let mut acc = [0i32; WIDTH];
            for (g, group) in panel.chunks_exact(GROUP_BYTES).enumerate() {
                let a = &a[g * GROUP..][..GROUP];
                for (c, lane) in acc.iter_mut().enumerate() {
                    for t in 0..GROUP {
                        *lane += a[t] as i32 * group[c * GROUP + t] as i32;
                    }
                }
            }
            finish.store(&acc, r, b * WIDTH);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{
        Finish, InputQuantization, Int8Panels, Range, GROUP, GROUP_BYTES, ROW_BLOCK, WIDTH,
    };
    use std::arch::x86_64::*;

    /// Register block: 12 rows × 2 panels of accumulators (24), two weight registers
    /// and a broadcast: 27 of the 32 vector registers.
    pub const ROWS: usize = 12;
    const PANELS: usize = 2;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn matmul(
        finish: &Finish,
        w: &Int8Panels,
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
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
                    macro_rules! go {
                        ($($r:literal)*) => {
                            match (count, width) {
                                $(($r, 4) => tile::<$r, 4>(finish, w, i, b),
                                  ($r, 3) => tile::<$r, 3>(finish, w, i, b),
                                  ($r, 2) => tile::<$r, 2>(finish, w, i, b),
                                  ($r, 1) => tile::<$r, 1>(finish, w, i, b),)*
                                _ => unreachable!(),
                            }
                        };
                    }
                    go!(1 2 3 4 5 6 7 8 9 10 11 12);
                    i += count;
                }
                b += width;
            }
            block_start = block_end;
        }
    }

    /// Values c..c+16 of `row` (zeros past its end), divided by the smoothing.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load_smoothed(row: &[f32], inverse_smooth: Option<&[f32]>, c: usize) -> __m512 {
        let mask: __mmask16 = ((1u32 << (row.len() - c).min(16)) - 1) as __mmask16;
        let x = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(c));
        match inverse_smooth {
            Some(inverse) => _mm512_mul_ps(x, _mm512_maskz_loadu_ps(mask, inverse.as_ptr().add(c))),
            None => x,
        }
    }

    /// [`super::quantize_row`] in AVX-512: the same operations in the same order (the
    /// conversion rounds to nearest even, as `round` does), 16 values at a time.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_row(
        row: &[f32],
        out: &mut [u8],
        input: &InputQuantization,
        inverse_smooth: Option<&[f32]>,
    ) -> (f32, i32) {
        let k = row.len();
        // No closures here: a closure does not inherit `target_feature`, and its
        // intrinsics were called out of line, once per 16 values.
        let range = match input.range {
            Some(range) => range,
            None => {
                let (mut low, mut high) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for c in (0..k).step_by(16) {
                    let x = load_smoothed(row, inverse_smooth, c);
                    low = _mm512_min_ps(low, x);
                    high = _mm512_max_ps(high, x);
                }
                Range {
                    min: _mm512_reduce_min_ps(low),
                    max: _mm512_reduce_max_ps(high),
                }
            }
        };
        let (scale, zero) = super::scale_and_zero_point(range.min, range.max, input.asymmetric);
        let (low, high) = if input.asymmetric {
            (0.0, 255.0)
        } else {
            (128.0 - super::QMAX, 128.0 + super::QMAX)
        };
        let z = zero as f32;
        let inv = _mm512_set1_ps(1.0 / scale);
        let (low, high) = (_mm512_set1_ps(low - z), _mm512_set1_ps(high - z));
        let zv = _mm512_set1_epi32(zero);
        for c in (0..k).step_by(16) {
            let x = load_smoothed(row, inverse_smooth, c);
            let v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, inv), low), high);
            let q = _mm512_add_epi32(_mm512_cvtps_epi32(v), zv);
            let mask: __mmask16 = ((1u32 << (k - c).min(16)) - 1) as __mmask16;
            _mm_mask_storeu_epi8(
                out.as_mut_ptr().add(c).cast(),
                mask,
                _mm512_cvtepi32_epi8(q),
            );
        }
        out[k..].fill(zero as u8);
        (scale, zero)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn tile<const R: usize, const P: usize>(
        finish: &Finish,
        w: &Int8Panels,
        i: usize,
        b: usize,
    ) {
        let x = finish.rows;
        let panel_bytes = w.groups * GROUP_BYTES;
        let panels = w.data.as_ptr().add(b * panel_bytes);
        // i is a multiple of ROWS: the start of a tile of interleaved groups.
        let a = x.data.as_ptr().add(i * x.stride);
        // The output lines this tile writes, fetched while it computes: its stores
        // otherwise wait for each line to come from L3 (the outputs outgrow L2).
        for r in 0..R {
            for q in 0..P {
                let line = finish.y.add((i + r) * finish.n + (b + q) * WIDTH);
                _mm_prefetch::<_MM_HINT_T0>(line.cast());
            }
        }
        let mut acc = [[_mm512_setzero_si512(); P]; R];
        for g in 0..w.groups {
            let mut wv = [_mm512_setzero_si512(); P];
            for (q, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(panels.add(q * panel_bytes + g * GROUP_BYTES).cast());
            }
            let group = a.add(g * ROWS * GROUP);
            for (r, row) in acc.iter_mut().enumerate() {
                let four = group.add(r * GROUP).cast::<i32>().read_unaligned();
                let av = _mm512_set1_epi32(four);
                for (s, v) in row.iter_mut().zip(&wv) {
                    *s = _mm512_dpbusd_epi32(*s, av, *v);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (q, s) in row.iter().enumerate() {
                let column = (b + q) * WIDTH;
                if column + WIDTH <= finish.n {
                    store(finish, *s, i + r, column);
                } else {
                    let mut lanes = [0i32; WIDTH];
                    _mm512_storeu_si512(lanes.as_mut_ptr().cast(), *s);
                    finish.store(&lanes, i + r, column);
                }
            }
        }
    }

    /// [`Finish::store`] of a full panel in registers: the same operations in the same
    /// order, without the trip through memory.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn store(finish: &Finish, acc: __m512i, r: usize, column: usize) {
        let rows = finish.rows;
        let zero = _mm512_set1_epi32(rows.zero_points[r]);
        let sums = _mm512_loadu_si512(finish.column_sums.as_ptr().add(column).cast());
        let integer = _mm512_sub_epi32(acc, _mm512_mullo_epi32(zero, sums));
        let column_scales = _mm512_loadu_ps(finish.column_scales.as_ptr().add(column));
        let scale = _mm512_mul_ps(_mm512_set1_ps(rows.scales[r]), column_scales);
        let v = _mm512_mul_ps(_mm512_cvtepi32_ps(integer), scale);
        let out = finish.y.add(r * finish.n + column);
        crate::epilogue::avx512::finish(finish.epilogue, v, column, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Finish, Int8Panels, GROUP, GROUP_BYTES, ROW_BLOCK, WIDTH};
    use std::arch::x86_64::*;

    /// Rows per register block with 16 vector registers: with VNNI, 6 rows × 2 halves
    /// of a panel (12 accumulators); without, 2 rows × 4 quarters (8).
    const VNNI_ROWS: usize = 6;
    const WIDENED_ROWS: usize = 2;

    /// `VNNI`: AVX-VNNI's `vpdpbusd` on 8 lanes; otherwise AVX2, bytes widened to 16 bits.
    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn vnni_tile<const R: usize>(finish: &Finish, w: &Int8Panels, i: usize, b: usize) {
        let x = finish.rows;
        let panel = w.data.as_ptr().add(b * w.groups * GROUP_BYTES);
        let a = x.data.as_ptr().add(i * x.stride);
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for g in 0..w.groups {
            let lo = _mm256_loadu_si256(panel.add(g * GROUP_BYTES).cast());
            let hi = _mm256_loadu_si256(panel.add(g * GROUP_BYTES + 32).cast());
            for (r, row) in acc.iter_mut().enumerate() {
                let four = a
                    .add(r * x.stride + g * GROUP)
                    .cast::<i32>()
                    .read_unaligned();
                let av = _mm256_set1_epi32(four);
                row[0] = _mm256_dpbusd_avx_epi32(row[0], av, lo);
                row[1] = _mm256_dpbusd_avx_epi32(row[1], av, hi);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let mut lanes = [0i32; WIDTH];
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), row[0]);
            _mm256_storeu_si256(lanes.as_mut_ptr().add(8).cast(), row[1]);
            finish.store(&lanes, i + r, b * WIDTH);
        }
    }

    /// 4 columns × 4 k of weights widened to 16 bits, times 4 activations repeated,
    /// summed in pairs by `vpmaddwd`: lanes hold (column, k0+k1) and (column, k2+k3).
    #[target_feature(enable = "avx2")]
    unsafe fn widened_tile<const R: usize>(finish: &Finish, w: &Int8Panels, i: usize, b: usize) {
        let x = finish.rows;
        let panel = w.data.as_ptr().add(b * w.groups * GROUP_BYTES);
        let a = x.data.as_ptr().add(i * x.stride);
        let mut acc = [[_mm256_setzero_si256(); 4]; R];
        for g in 0..w.groups {
            let mut wv = [_mm256_setzero_si256(); 4];
            for (quarter, v) in wv.iter_mut().enumerate() {
                let bytes = _mm_loadu_si128(panel.add(g * GROUP_BYTES + quarter * 16).cast());
                *v = _mm256_cvtepi8_epi16(bytes);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let four = a
                    .add(r * x.stride + g * GROUP)
                    .cast::<i32>()
                    .read_unaligned();
                let av = _mm256_cvtepu8_epi16(_mm_set1_epi32(four));
                for (s, v) in row.iter_mut().zip(&wv) {
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(av, *v));
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let mut pairs = [0i32; 2 * WIDTH];
            for (quarter, s) in row.iter().enumerate() {
                _mm256_storeu_si256(pairs.as_mut_ptr().add(quarter * 8).cast(), *s);
            }
            let mut lanes = [0i32; WIDTH];
            for (c, lane) in lanes.iter_mut().enumerate() {
                *lane = pairs[2 * c] + pairs[2 * c + 1];
            }
            finish.store(&lanes, i + r, b * WIDTH);
        }
    }

    pub unsafe fn matmul<const VNNI: bool>(
        finish: &Finish,
        w: &Int8Panels,
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
    ) {
        let tile_rows = if VNNI { VNNI_ROWS } else { WIDENED_ROWS };
        let mut block_start = rows.start;
        while block_start < rows.end {
            let block_end = (block_start + ROW_BLOCK).min(rows.end);
            for b in panels.clone() {
                let mut i = block_start;
                while i < block_end {
                    let count = (block_end - i).min(tile_rows);
                    match (VNNI, count) {
                        (true, 1) => vnni_tile::<1>(finish, w, i, b),
                        (true, 2) => vnni_tile::<2>(finish, w, i, b),
                        (true, 3) => vnni_tile::<3>(finish, w, i, b),
                        (true, 4) => vnni_tile::<4>(finish, w, i, b),
                        (true, 5) => vnni_tile::<5>(finish, w, i, b),
                        (true, 6) => vnni_tile::<6>(finish, w, i, b),
                        (false, 1) => widened_tile::<1>(finish, w, i, b),
                        (false, 2) => widened_tile::<2>(finish, w, i, b),
                        _ => unreachable!(),
                    }
                    i += count;
                }
            }
            block_start = block_end;
        }
    }
}

/// Symmetric per-output-channel quantization of w[n, k]: each row's max|w| maps to 127.
/// Returns the bytes and each row's scale.
pub fn quantize_weights(w: &[f32], n: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let mut bytes = vec![0i8; n * k];
    let mut scales = vec![1f32; n];
    for ((row, out), scale) in w
        .chunks_exact(k)
        .zip(bytes.chunks_exact_mut(k))
        .zip(scales.iter_mut())
    {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        *scale = if max > 0.0 { max / QMAX } else { 1.0 };
        let inv = 1.0 / *scale;
        for (o, v) in out.iter_mut().zip(row) {
            *o = round((v * inv).clamp(-QMAX, QMAX)) as i8;
        }
    }
    (bytes, scales)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Activation;

    /// Integer reference: Σₖ q(x)·w, straight from the unpacked matrices.
    fn reference(q: &QuantizedRows, w: &[i8], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let sum: i32 = (0..k)
                    .map(|p| {
                        let z = q.zero_points[i];
                        (q.byte(i, p) as i32 - z) * w[j * k + p] as i32
                    })
                    .sum();
                y[i * n + j] = sum as f32;
            }
        }
        y
    }

    #[test]
    fn every_instruction_set_matches_the_integer_reference_exactly() {
        let mut rng = fastrand::Rng::with_seed(7);
        let shapes = [
            (1, 384, 384),
            (3, 37, 17),
            (13, 5, 33),
            (25, 64, 48),
            (200, 100, 40),
            (7, 1, 1),
            (500, 33, 70),
        ];
        for isa in Isa::ALL {
            if !isa.supported() {
                eprintln!("skipped {}: this CPU lacks it", isa.name());
                continue;
            }
            for &(m, k, n) in &shapes {
                // Extremes included: -127/127 weights against 0 and 255 activations.
                let w: Vec<i8> = (0..n * k).map(|_| rng.i8(-127..=127)).collect();
                let x: Vec<f32> = (0..m * k).map(|_| rng.f32() * 8.0 - 4.0).collect();
                let panels = Int8Panels::new(&w, n, k);
                let mut q = QuantizedRows::default();
                // A static range of ±127/32: values past it clamp to the extremes (0 and
                // 254); asymmetric rows reach 255 and a zero point other than 128.
                let asymmetric = m % 2 == 1;
                let input = InputQuantization {
                    range: Some(Range {
                        min: -127.0 / 32.0,
                        max: 127.0 / 32.0,
                    }),
                    asymmetric,
                    smooth: None,
                };
                q.quantize(isa, &x, m, &panels, &input);
                let want = reference(&q, &w, m, k, n);
                // Cancels the row scale: outputs are the integers.
                let ones = vec![1.0 / q.scales[0]; n];
                for threads in [1, 3] {
                    let mut y = vec![f32::NAN; m * n + 3];
                    let epilogue = Epilogue::default();
                    matmul(isa, &mut y, &q, &panels, &ones, &epilogue, threads);
                    assert_eq!(&y[..m * n], &want[..], "{} m {m} k {k} n {n}", isa.name());
                    assert!(y[m * n..].iter().all(|v| v.is_nan()), "wrote past y");
                }
            }
        }
    }

    #[test]
    fn the_epilogue_dequantizes_adds_bias_and_activates_the_same_on_every_path() {
        let (m, k, n) = (9, 70, 35);
        let mut rng = fastrand::Rng::with_seed(3);
        let wf: Vec<f32> = (0..n * k).map(|_| rng.f32() - 0.5).collect();
        let x: Vec<f32> = (0..m * k).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
        let (w8, scales) = quantize_weights(&wf, n, k);
        let panels = Int8Panels::new(&w8, n, k);
        let mut q = QuantizedRows::default();
        let mut results = Vec::new();
        for isa in Isa::ALL.into_iter().filter(|isa| isa.supported()) {
            q.quantize(isa, &x, m, &panels, &InputQuantization::default());
            let mut y = vec![1f32; m * n];
            let epilogue = Epilogue {
                bias: Some(&bias),
                activation: Some(Activation::Gelu),
                scale_first: None,
                accumulate: true,
            };
            matmul(isa, &mut y, &q, &panels, &scales, &epilogue, 2);
            results.push((isa, y));
        }
        // Against f32: dynamic per-row INT8 keeps a product within a few percent.
        let (_, y) = &results[0];
        for i in 0..m {
            for j in 0..n {
                let exact: f32 = (0..k).map(|p| x[i * k + p] * wf[j * k + p]).sum();
                let want = 1.0 + Activation::Gelu.apply(exact + bias[j]);
                assert!(
                    (y[i * n + j] - want).abs() < 0.03,
                    "({i}, {j}): {} vs {want}",
                    y[i * n + j]
                );
            }
        }
        for (isa, other) in &results[1..] {
            assert_eq!(
                other,
                y,
                "{} differs from {}",
                isa.name(),
                results[0].0.name()
            );
        }
    }

    #[test]
    fn every_quantizer_gives_the_same_bytes() {
        let mut rng = fastrand::Rng::with_seed(11);
        for k in [1usize, 5, 16, 17, 384, 1000] {
            let row: Vec<f32> = (0..k).map(|_| (rng.f32() - 0.3) * 20.0).collect();
            let smooth: Vec<f32> = (0..k).map(|_| 0.5 + rng.f32()).collect();
            for input in [
                InputQuantization::default(),
                InputQuantization {
                    asymmetric: true,
                    ..Default::default()
                },
                InputQuantization {
                    range: Some(Range {
                        min: -3.0,
                        max: 2.0,
                    }),
                    ..Default::default()
                },
                InputQuantization {
                    range: Some(Range {
                        min: -0.2,
                        max: 1e9,
                    }),
                    asymmetric: true,
                    ..Default::default()
                },
            ] {
                for inverse in [None, Some(&smooth[..])] {
                    let mut want = vec![7u8; k.next_multiple_of(4)];
                    let expected = quantize_row_body(&row, &mut want, &input, inverse);
                    let mut got = vec![9u8; k.next_multiple_of(4)];
                    assert_eq!(quantize_row(&row, &mut got, &input, inverse), expected);
                    assert_eq!(got, want, "k {k} {input:?}");
                }
            }
        }
    }

    #[test]
    fn layer_norm_fused_with_quantization_gives_what_they_give_apart() {
        let mut rng = fastrand::Rng::with_seed(13);
        let (k, n) = (40, 20);
        let w = Int8Panels::new(&vec![1i8; n * k], n, k);
        let smooth: Vec<f32> = (0..k).map(|_| 0.5 + rng.f32()).collect();
        let (gamma, beta): (Vec<f32>, Vec<f32>) =
            (0..k).map(|_| (rng.f32() + 0.5, rng.f32() - 0.5)).unzip();
        let bias: Vec<f32> = (0..k).map(|_| rng.f32()).collect();
        let norm = |row: &mut [f32]| crate::ops::layer_norm_row(row, &bias, &gamma, &beta, 1e-12);
        let input = InputQuantization {
            smooth: Some(smooth),
            ..Default::default()
        };
        for isa in Isa::ALL.into_iter().filter(|isa| isa.supported()) {
            for m in [1, 11, 12, 13, 40, 100] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.f32() * 6.0 - 3.0).collect();
                let mut apart = x.clone();
                apart.chunks_exact_mut(k).for_each(norm);
                let mut want = QuantizedRows::default();
                want.quantize(isa, &apart, m, &w, &input);
                let mut fused = x.clone();
                let mut got = QuantizedRows::default();
                got.normalize_and_quantize(isa, &mut fused, m, &w, &input, &norm);
                assert_eq!(fused, apart, "{} m {m}: the normalized rows", isa.name());
                assert_eq!(got.bytes(), want.bytes(), "{} m {m}", isa.name());
                assert_eq!(
                    (&got.scales, &got.zero_points),
                    (&want.scales, &want.zero_points)
                );
            }
        }
    }

    #[test]
    fn quantization_clamps_rounds_and_smooths() {
        let w = Int8Panels::new(&[1i8; 6], 1, 6);
        let mut q = QuantizedRows::default();
        let x = [0.0, 1.0, -1.0, 0.5, 300.0, -300.0];
        let range = Some(Range {
            min: -QMAX,
            max: QMAX,
        });
        let fixed = InputQuantization {
            range,
            ..Default::default()
        };
        q.quantize(Isa::Portable, &x, 1, &w, &fixed);
        // Ties to even (0.5 → 0); beyond ±127 clamps; padded to 8 with the zero point.
        assert_eq!(q.bytes(), &[128, 129, 127, 128, 255, 1, 128, 128]);
        let smooth = Some(vec![1.0, 1.0, 1.0, 1.0, 4.0, 4.0]);
        q.quantize(
            Isa::Portable,
            &x,
            1,
            &w,
            &InputQuantization {
                smooth,
                ..Default::default()
            },
        );
        // Dynamic: max |x/s| = 75 → 127.
        assert_eq!(&q.bytes()[4..6], &[255, 1]);
        assert_eq!(q.scales[0], 75.0 / QMAX);
        // Asymmetric over [-0.17, 10]: 0 is exact, -0.17 keeps four steps.
        let gelu = [-0.17, 0.0, 10.0, 5.0];
        let asymmetric = InputQuantization {
            asymmetric: true,
            ..Default::default()
        };
        let w4 = Int8Panels::new(&[1i8; 4], 1, 4);
        q.quantize(Isa::Portable, &gelu, 1, &w4, &asymmetric);
        assert_eq!(q.zero_points[0], 4);
        assert_eq!(q.bytes(), &[0, 4, 255, 129]);
        // An all-zero row quantizes to the zero point with scale 1.
        q.quantize(
            Isa::Portable,
            &[0.0; 6],
            1,
            &w,
            &InputQuantization::default(),
        );
        assert!(q.bytes()[..6].iter().all(|&b| b == 128));
    }
}
