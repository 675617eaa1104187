//! Dense layers: y[M,N] (+)= x[M,K] · W[N,K]^T with W in the checkpoint's own [out, in]
//! layout, so memory-mapped weights are used in place.
//!
//! Two GEMM engines, measured on the encoder's shapes by `cargo bench --bench gemm`
//! (docs/MEASUREMENTS.md): OpenBLAS's sgemm, loaded at run time when the system has
//! `libopenblas.so.0` (Debian: libopenblas0-pthread), and the pure-Rust `gemm` crate
//! otherwise. OpenBLAS is faster on the large products; nothing is needed at build time
//! and a machine without it still runs. `WISP_GEMM=gemm|openblas` forces one.
//!
//! OpenBLAS picks its kernel from the CPU model, and releases older than the CPU fall back
//! to a generic one: Debian 12's 0.3.21 ran 3.5x slower on a family 6 model 207 Xeon
//! (docs/MEASUREMENTS.md). [`choose_openblas_kernel`] names the AVX-512 kernel from the
//! CPU's features instead, and the load logs the kernel OpenBLAS reports.

use gemm::Parallelism;
use std::sync::OnceLock;

type Sgemm = unsafe extern "C" fn(
    order: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);

struct OpenBlas {
    sgemm: Sgemm,
    set_threads: unsafe extern "C" fn(i32),
    /// The kernel OpenBLAS chose (`openblas_get_corename`), for logs and reports.
    core: String,
    /// Keeps the library mapped for the function pointers above.
    _library: libloading::Library,
}

static OPENBLAS: OnceLock<Option<OpenBlas>> = OnceLock::new();

fn openblas() -> Option<&'static OpenBlas> {
    OPENBLAS
        .get_or_init(|| {
            let choice = std::env::var("WISP_GEMM").unwrap_or_default();
            if choice == "gemm" {
                return None;
            }
            let loaded = load_openblas();
            if loaded.is_none() && choice == "openblas" {
                tracing::warn!("WISP_GEMM=openblas but libopenblas.so.0 could not be loaded");
            }
            loaded
        })
        .as_ref()
}

fn load_openblas() -> Option<OpenBlas> {
    for name in ["libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"] {
        // SAFETY: loading OpenBLAS runs its initialisers, which only set up its thread
        // pool; the symbols are looked up with the C signatures OpenBLAS documents.
        unsafe {
            let Ok(library) = libloading::Library::new(name) else {
                continue;
            };
            let sgemm = library.get::<Sgemm>(b"cblas_sgemm\0").ok().map(|f| *f);
            let set_threads = library
                .get::<unsafe extern "C" fn(i32)>(b"openblas_set_num_threads\0")
                .ok()
                .map(|f| *f);
            let core = library
                .get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(
                    b"openblas_get_corename\0",
                )
                .ok()
                .map(|corename| corename())
                .filter(|name| !name.is_null())
                .map(|name| {
                    std::ffi::CStr::from_ptr(name)
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_else(|| "unknown".to_string());
            if let (Some(sgemm), Some(set_threads)) = (sgemm, set_threads) {
                warn_if_kernel_lacks_avx512(&core);
                return Some(OpenBlas {
                    sgemm,
                    set_threads,
                    core,
                    _library: library,
                });
            }
        }
    }
    None
}

/// Which engine runs the large GEMMs, for logs and benchmark reports: `gemm`, or
/// `openblas` with the kernel it runs (`openblas/SkylakeX`).
pub fn engine() -> String {
    match openblas() {
        Some(blas) => format!("openblas/{}", blas.core),
        None => "gemm".to_string(),
    }
}

/// The OpenBLAS kernel to name for a CPU with these features when the user named none:
/// SkylakeX (the AVX-512 sgemm kernel, which OpenBLAS's Cooper Lake, Sapphire Rapids and
/// Zen 4 targets also use for sgemm) when the CPU has the AVX-512 subsets it needs.
/// `None` leaves OpenBLAS's own detection, which is right for the CPUs it knows.
pub fn openblas_kernel_for(
    has_avx512_skylake_subsets: bool,
    user_coretype: Option<&str>,
    user_engine: Option<&str>,
) -> Option<&'static str> {
    let user_chose = user_coretype.is_some_and(|v| !v.is_empty());
    if !has_avx512_skylake_subsets || user_chose || user_engine == Some("gemm") {
        return None;
    }
    Some("SkylakeX")
}

fn cpu_has_avx512_skylake_subsets() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Sets `OPENBLAS_CORETYPE` (read once, when OpenBLAS is loaded) to the kernel
/// [`openblas_kernel_for`] picks for this CPU, and returns it.
///
/// Call it first thing in `main`, before any other thread exists: changing the
/// environment while another thread reads it is undefined behaviour in libc.
pub fn choose_openblas_kernel() -> Option<&'static str> {
    let coretype = std::env::var("OPENBLAS_CORETYPE").ok();
    let engine = std::env::var("WISP_GEMM").ok();
    let kernel = openblas_kernel_for(
        cpu_has_avx512_skylake_subsets(),
        coretype.as_deref(),
        engine.as_deref(),
    )?;
    std::env::set_var("OPENBLAS_CORETYPE", kernel);
    Some(kernel)
}

/// A CPU with AVX-512 running a kernel without it loses up to 3.5x on the encoder's
/// products; say so once, with the way out.
fn warn_if_kernel_lacks_avx512(core: &str) {
    let avx512_kernel = ["skylakex", "cooperlake", "sapphirerapids"]
        .iter()
        .any(|k| core.eq_ignore_ascii_case(k));
    if cpu_has_avx512_skylake_subsets() && !avx512_kernel {
        tracing::warn!(
            openblas_kernel = core,
            "this CPU has AVX-512 but OpenBLAS runs its {core} kernel; the encoder's products \
             can run up to 3.5x slower. Set OPENBLAS_CORETYPE=SkylakeX (wisp does when it is unset) or \
             install an OpenBLAS built with DYNAMIC_ARCH"
        );
    }
}

/// Keeps OpenBLAS single-threaded: wisp splits products over its own rayon threads.
pub fn set_engine_threads(_threads: usize) {
    if let Some(blas) = openblas() {
        // SAFETY: a plain setter of OpenBLAS's global thread count.
        unsafe { (blas.set_threads)(1) }
    }
}

/// How many parts a GEMM is split into on the current rayon pool.
#[derive(Debug, Clone, Copy)]
pub struct Threads(pub usize);

/// Below this many multiply-adds a GEMM runs on one thread: splitting it costs more
/// than it saves.
const PARALLEL_THRESHOLD: usize = 48 * 48 * 48;

/// `y = x · wᵀ` (or `y += x · wᵀ` when `accumulate`), all row-major:
/// x is [m, k], w is [n, k], y is [m, n].
///
/// Parallel products are split here, over the rows of x when there are many (each task
/// packs only its rows) and over the rows of w otherwise, and every part runs
/// single-threaded on the current rayon pool: one set of threads for the whole encoder,
/// none left spinning in a BLAS thread pool between calls.
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
    let parts = if m * k * n >= PARALLEL_THRESHOLD {
        threads.0.max(1)
    } else {
        1
    };
    if parts == 1 {
        // SAFETY: the assert above bounds the whole product.
        unsafe {
            kernel(
                y.as_mut_ptr(),
                n,
                x.as_ptr(),
                w.as_ptr(),
                m,
                k,
                n,
                accumulate,
            )
        };
        return;
    }
    let y_ptr = SendPtr(y.as_mut_ptr());
    let y_ptr = &y_ptr;
    if m >= 512 {
        // Split rows of x (and y): 8-row aligned blocks.
        // More parts than threads when rows are plenty, so a preempted thread's share
        // is taken over by the other threads (rayon steals the spawned parts).
        let parts = if m >= 256 * parts { 2 * parts } else { parts };
        let block = m.div_ceil(parts).next_multiple_of(8);
        rayon::scope(|s| {
            for start in (0..m).step_by(block) {
                let rows = block.min(m - start);
                s.spawn(move |_| {
                    // SAFETY: each task writes rows start..start+rows of y only.
                    unsafe {
                        kernel(
                            y_ptr.0.add(start * n),
                            n,
                            x.as_ptr().add(start * k),
                            w.as_ptr(),
                            rows,
                            k,
                            n,
                            accumulate,
                        )
                    }
                });
            }
        });
    } else {
        // Split rows of w (columns of y): 16-column aligned blocks.
        let block = n.div_ceil(parts).next_multiple_of(16);
        rayon::scope(|s| {
            for start in (0..n).step_by(block) {
                let cols = block.min(n - start);
                s.spawn(move |_| {
                    // SAFETY: each task writes columns start..start+cols of y only.
                    unsafe {
                        kernel(
                            y_ptr.0.add(start),
                            n,
                            x.as_ptr(),
                            w.as_ptr().add(start * k),
                            m,
                            k,
                            cols,
                            accumulate,
                        )
                    }
                });
            }
        });
    }
}

/// [`matmul_transposed`], or the same product on `packed` (w packed at load) when it has
/// few enough rows for the packed kernel.
#[allow(clippy::too_many_arguments)]
pub fn dense(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    packed: Option<&crate::panels::Panels>,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    threads: Threads,
) {
    match packed.filter(|_| m <= crate::panels::MAX_ROWS) {
        Some(panels) => panels.matmul(y, x, m, accumulate, threads.0),
        None => matmul_transposed(y, x, w, m, k, n, accumulate, threads),
    }
}

/// A buffer pointer handed to rayon tasks that each write a disjoint part of it.
pub(super) struct SendPtr(pub *mut f32);
// SAFETY: every user splits the buffer so that no two tasks write the same element.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Keeps the other threads of the current rayon pool awake for the duration of one
/// forward pass: each runs a job that takes the pass's parallel work as it appears
/// (`rayon::yield_now`) and otherwise spins, instead of going to sleep after each
/// parallel step and being woken (a futex and a context switch) for the next one, about
/// ten times per layer. Ends when dropped. `WISP_ENCODER_SPIN=0` turns it off (CPU
/// quotas, many instances per core).
pub struct KeepAwake {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Spinner jobs running now (all pools).
static SPINNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl KeepAwake {
    pub fn start(threads: usize) -> Option<KeepAwake> {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let enabled =
            *ENABLED.get_or_init(|| std::env::var("WISP_ENCODER_SPIN").map_or(true, |v| v != "0"));
        let owner = rayon::current_thread_index()?;
        if !enabled || threads < 2 {
            return None;
        }
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for _ in 1..threads.min(rayon::current_num_threads()) {
            let done = done.clone();
            rayon::spawn(move || {
                // The pass's own thread may pop this job while it waits for its work:
                // it must not spin there, or it would wait on itself.
                if rayon::current_thread_index() == Some(owner) {
                    return;
                }
                SPINNING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut idle = 0u32;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    match rayon::yield_now() {
                        Some(rayon::Yield::Executed) => idle = 0,
                        _ => {
                            idle += 1;
                            if idle.is_multiple_of(256) {
                                // Lets other threads of the process have the core.
                                std::thread::yield_now();
                            } else {
                                std::hint::spin_loop();
                            }
                        }
                    }
                }
                SPINNING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            });
        }
        Some(KeepAwake { done })
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Below this many multiply-adds a reduced-precision product runs on one thread.
const SPLIT_THRESHOLD: usize = 64 * 64 * 64;
/// Rows per part when a reduced-precision product is split by rows.
const ROWS_PER_PART: usize = 96;

/// Runs a product y[m, n] = x[m, k] · wᵀ, whose weights are packed in panels of `width`
/// columns, as `run(rows, panels)` parts on the current rayon pool: ranges of rows
/// (whole 12-row tiles) when there are many rows, else ranges of panels.
pub(crate) fn split_product(
    m: usize,
    k: usize,
    n: usize,
    width: usize,
    threads: usize,
    run: &(dyn Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync),
) {
    if m == 0 || n == 0 {
        return;
    }
    let blocks = n.div_ceil(width);
    let parts = if m * k * n >= SPLIT_THRESHOLD {
        threads.max(1)
    } else {
        1
    };
    if parts == 1 {
        return run(0..m, 0..blocks);
    }
    rayon::scope(|s| {
        if m >= 2 * ROWS_PER_PART {
            let per_part = m
                .div_ceil(m.div_ceil(ROWS_PER_PART).max(parts))
                .next_multiple_of(12);
            for start in (0..m).step_by(per_part) {
                let end = (start + per_part).min(m);
                s.spawn(move |_| run(start..end, 0..blocks));
            }
        } else {
            let per_part = blocks.div_ceil(parts.min(blocks));
            for first in (0..blocks).step_by(per_part) {
                let last = (first + per_part).min(blocks);
                s.spawn(move |_| run(0..m, first..last));
            }
        }
    });
}

/// y[m, n] (row stride ldy) (+)= x[m, k] · w[n, k]ᵀ on this thread.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    y: *mut f32,
    ldy: usize,
    x: *const f32,
    w: *const f32,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    if let Some(blas) = openblas() {
        const ROW_MAJOR: i32 = 101;
        const NO_TRANS: i32 = 111;
        const TRANS: i32 = 112;
        let beta = if accumulate { 1.0 } else { 0.0 };
        (blas.sgemm)(
            ROW_MAJOR, NO_TRANS, TRANS, m as i32, n as i32, k as i32, 1.0, x, k as i32, w,
            k as i32, beta, y, ldy as i32,
        );
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        y,
        1,
        ldy as isize,
        accumulate,
        x,
        1,
        k as isize,
        w,
        k as isize,
        1,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    )
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

    #[test]
    fn passes_with_threads_kept_awake_finish_and_release_them() {
        assert!(
            KeepAwake::start(4).is_none(),
            "off a rayon pool: nothing to keep awake"
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let (sent, received) = std::sync::mpsc::channel();
        let sum = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let total = sum.clone();
        pool.spawn(move || {
            // Many short passes, each with parallel steps: the pass's thread pops its own
            // spinner jobs at times, and must not wait on them.
            for _ in 0..300 {
                let awake = KeepAwake::start(3);
                assert!(awake.is_some());
                for _ in 0..4 {
                    rayon::scope(|s| {
                        for _ in 0..6 {
                            let total = &total;
                            s.spawn(move |_| {
                                total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            });
                        }
                    });
                }
            }
            sent.send(()).unwrap();
        });
        received
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the passes finished");
        assert_eq!(sum.load(std::sync::atomic::Ordering::Relaxed), 300 * 4 * 6);
        // Every spinner ends once its pass drops the guard.
        let start = std::time::Instant::now();
        while SPINNING.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            assert!(
                start.elapsed().as_secs() < 10,
                "spinners outlived their pass"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

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
    fn the_avx512_kernel_is_named_only_where_the_cpu_has_it_and_the_user_chose_none() {
        assert_eq!(openblas_kernel_for(true, None, None), Some("SkylakeX"));
        assert_eq!(openblas_kernel_for(true, Some(""), None), Some("SkylakeX"));
        assert_eq!(openblas_kernel_for(false, None, None), None);
        // The user's choice wins, and no kernel is named when OpenBLAS is not used.
        assert_eq!(openblas_kernel_for(true, Some("Haswell"), None), None);
        assert_eq!(openblas_kernel_for(true, None, Some("gemm")), None);
        assert_eq!(
            openblas_kernel_for(true, None, Some("openblas")),
            Some("SkylakeX")
        );
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
