//! GEMM throughput on the encoder's shapes, through the same wrapper the encoder uses
//! (`wisp_backend_encoder::linear`): y[M,N] = x[M,K] · W[N,K]^T, W in the checkpoint's
//! own [out, in] layout. Run: `cargo bench --bench gemm`. Compare with OpenBLAS through
//! NumPy on the same shapes: `python3 bench/gemm_numpy.py`.

use std::time::{Duration, Instant};
use wisp_backend_encoder::bf16::{self, Bf16Panels, Bf16Rows};
use wisp_backend_encoder::int8::{self, Epilogue, InputQuantization, Int8Panels, QuantizedRows};
use wisp_backend_encoder::linear::{matmul_transposed, Threads};
use wisp_backend_encoder::panels::{self, Panels};

fn main() {
    // Before any thread exists (it sets an environment variable OpenBLAS reads).
    wisp_backend_encoder::linear::choose_openblas_kernel();
    let threads = std::env::var("WISP_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    wisp_backend_encoder::linear::set_engine_threads(threads);
    println!(
        "threads: {threads}, engine: {} (WISP_GEMM=gemm|openblas selects)",
        wisp_backend_encoder::linear::engine()
    );
    let isa = int8::Isa::selected();
    println!(
        "int8: {} (WISP_INT8_ISA=avx512vnni|avxvnni|avx2|portable selects); its time includes \
         quantizing x per row",
        isa.name()
    );
    // Every BF16 kernel this CPU runs on AVX-512 (where it has both, which is faster is
    // what this shows), else the one it would use.
    let bf16_isas: Vec<bf16::Isa> = [bf16::Isa::Avx512Bf16, bf16::Isa::Avx512]
        .into_iter()
        .filter(|isa| isa.supported())
        .collect();
    let bf16_isas = if bf16_isas.is_empty() {
        vec![bf16::Isa::fastest()]
    } else {
        bf16_isas
    };
    println!(
        "bf16: columns per kernel (WISP_BF16_ISA selects in the encoder); time includes rounding x"
    );
    print!(
        "{:>6} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "M", "K", "N", "f32 ms", "GFLOP/s", "int8 ms", "GOP/s", "ratio"
    );
    for isa in &bf16_isas {
        print!(" {:>16}", format!("bf16 {} GFLOP/s", isa.name()));
    }
    println!();
    for (k, n) in [
        (384, 384),
        (384, 1536),
        (1536, 384),
        (768, 768),
        (768, 3072),
        (3072, 768),
    ] {
        for m in [12, 32, 128, 1024, 4096] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
                .collect();
            let mut y = vec![0f32; m * n];
            let mut run = || {
                pool.install(|| matmul_transposed(&mut y, &x, &w, m, k, n, false, Threads(threads)))
            };
            let median = median_seconds(&mut run, Duration::from_millis(500));
            let gflops = 2.0 * (m * k * n) as f64 / median / 1e9;
            let (w8, scales) = int8::quantize_weights(&w, n, k);
            let packed = Int8Panels::new(&w8, n, k);
            let mut rows = QuantizedRows::default();
            let epilogue = Epilogue::default();
            let mut run8 = || {
                pool.install(|| {
                    rows.quantize(isa, &x, m, &packed, &InputQuantization::default());
                    int8::matmul(isa, &mut y, &rows, &packed, &scales, &epilogue, threads)
                })
            };
            let median8 = median_seconds(&mut run8, Duration::from_millis(500));
            let gops = 2.0 * (m * k * n) as f64 / median8 / 1e9;
            print!(
                "{m:>6} {k:>6} {n:>6} {:>10.3} {gflops:>10.1} {:>10.3} {gops:>10.1} {:>7.2}x",
                median * 1e3,
                median8 * 1e3,
                median / median8
            );
            let panels16 = Bf16Panels::new(&w, n, k);
            let mut rows16 = Bf16Rows::default();
            for &isa in &bf16_isas {
                let mut run16 = || {
                    pool.install(|| {
                        rows16.round(isa, &x, m, &panels16);
                        bf16::matmul(isa, &mut y, &rows16, &panels16, &epilogue, threads)
                    })
                };
                let median16 = median_seconds(&mut run16, Duration::from_millis(500));
                print!(" {:>16.1}", 2.0 * (m * k * n) as f64 / median16 / 1e9);
            }
            println!();
        }
    }
    streaming(&pool, threads);
}

/// Few rows against a whole model's weights, as in a forward pass of one short sentence:
/// MiniLM-L6's six layers (Q, K, V, O, FFN up, FFN down; 42 MB in f32), each product on
/// the next layer's matrix, so no matrix is reused from L1/L2 (whether 42 MB fit the
/// last-level cache depends on the CPU: the GB/s column tells).
fn streaming(pool: &rayon::ThreadPool, threads: usize) {
    let shapes: Vec<(usize, usize)> = (0..6)
        .flat_map(|_| {
            [
                (384, 384),
                (384, 384),
                (384, 384),
                (384, 384),
                (384, 1536),
                (1536, 384),
            ]
        })
        .collect();
    let weights: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(s, &(k, n))| {
            (0..n * k)
                .map(|i| ((i + s) % 89) as f32 / 89.0 - 0.5)
                .collect()
        })
        .collect();
    let megabytes = weights.iter().map(|w| w.len() * 4).sum::<usize>() as f64 / 1e6;
    println!(
        "\nstreaming: {} products over {megabytes:.0} MB of weights (MiniLM-L6's layers)",
        shapes.len()
    );
    let panels: Option<Vec<Panels>> = panels::available().then(|| {
        weights
            .iter()
            .zip(&shapes)
            .map(|(w, &(k, n))| Panels::new(w, n, k))
            .collect()
    });
    println!(
        "{:>6} {:>12} {:>16} {:>8}",
        "M", "engine ms", "packed panels ms", "ratio"
    );
    for m in [1, 4, 8, 12, 16, 24, 32, 48, 64] {
        let x: Vec<f32> = (0..m * 1536).map(|i| (i % 97) as f32 / 97.0).collect();
        let mut y = vec![0f32; m * 1536];
        let mut engine = || {
            pool.install(|| {
                for (w, &(k, n)) in weights.iter().zip(&shapes) {
                    matmul_transposed(&mut y, &x, w, m, k, n, false, Threads(threads));
                }
            })
        };
        let engine_s = median_seconds(&mut engine, Duration::from_millis(1000));
        let packed_s = panels
            .as_ref()
            .filter(|_| m <= panels::MAX_ROWS)
            .map(|panels| {
                let mut packed = || {
                    pool.install(|| {
                        for p in panels {
                            p.matmul(&mut y, &x, m, false, threads);
                        }
                    })
                };
                median_seconds(&mut packed, Duration::from_millis(1000))
            });
        match packed_s {
            Some(packed_s) => println!(
                "{m:>6} {:>12.3} {:>16.3} {:>7.2}x",
                engine_s * 1e3,
                packed_s * 1e3,
                engine_s / packed_s
            ),
            None => println!("{m:>6} {:>12.3} {:>16} {:>8}", engine_s * 1e3, "-", "-"),
        }
    }
}

/// The median time of `run` over at least 10 runs and `min_time`, after one warm-up run.
fn median_seconds(run: &mut impl FnMut(), min_time: Duration) -> f64 {
    run();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 10 || start.elapsed() < min_time {
        let t = Instant::now();
        run();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
