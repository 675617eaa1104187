//! `wisp gpu`: the device checks and benchmarks of the GPU encoder, as one binary that
//! can be carried to a GPU machine (scripts/device-check.sh runs them there).
//!
//! - `wisp gpu check [--checkpoint DIR]...`: every kernel against its CPU twin, then each
//!   checkpoint's GPU encoder (fp16) against the CPU encoder (fp32) on random batches.
//! - `wisp gpu bench --checkpoint DIR --batch 1,64,256 --seq 128 [--mixed]`: sequences
//!   per second and latency of whole batches (copy in, graph launch, copy out).

use clap::{Args, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use wisp_backend_encoder::gpu::blas::Blas;
use wisp_backend_encoder::gpu::device::{CudaDevice, Device};
use wisp_backend_encoder::gpu::kernels::Kernels;
use wisp_backend_encoder::gpu::runner::{GpuEncoder, GpuRunner};
use wisp_backend_encoder::gpu::{nvrtc, selftest, Gpu};
use wisp_backend_encoder::linear::Threads;
use wisp_backend_encoder::model::{HeadKind, PackedBatch, Workspace};
use wisp_backend_encoder::ops::Segment;
use wisp_backend_encoder::{load_encoder, pad_batch, EncoderSettings};
use wisp_core::error::{Error, Result};

#[derive(Args, Debug, Clone)]
pub struct GpuArgs {
    #[command(subcommand)]
    pub action: GpuAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum GpuAction {
    /// Whether a GPU can be used here (JSON; the reason when not). Always exits 0.
    Info,
    /// Kernels against their CPU twins, and whole models against the CPU encoder.
    Check {
        /// Checkpoint folders to compare (GPU fp16 vs CPU fp32).
        #[arg(long)]
        checkpoint: Vec<PathBuf>,
        /// Minimum cosine similarity of GPU and CPU sentence embeddings.
        #[arg(long, default_value_t = 0.999)]
        min_cosine: f64,
    },
    /// Throughput and latency of the GPU encoder on random token ids.
    Bench {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
        batch: Vec<usize>,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Also run a batch of lengths uniform in 16..=seq, packed and padded.
        #[arg(long)]
        mixed: bool,
        /// Seconds per case (after warm-up).
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Disable CUDA graphs (launch every kernel).
        #[arg(long)]
        no_graphs: bool,
    },
}

/// A packed batch of random ids with the given lengths (RoBERTa positions included).
fn random_batch(
    dims: &wisp_backend_encoder::checkpoint::Dimensions,
    lengths: &[usize],
    seed: u64,
) -> PackedBatch {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut batch = PackedBatch::default();
    let offset = if dims.family == wisp_backend_encoder::checkpoint::Family::Roberta {
        dims.pad_token_id as usize + 1
    } else {
        0
    };
    for &len in lengths {
        let start = batch.tokens();
        for i in 0..len {
            // Skip the padding id so RoBERTa positions stay what they would be.
            let mut id = rng.u32(0..dims.vocab as u32);
            if id == dims.pad_token_id {
                id = (id + 1) % dims.vocab as u32;
            }
            batch.ids.push(id);
            batch.positions.push((offset + i) as u32);
            batch.types.push(0);
        }
        batch.segments.push(Segment { start, len });
    }
    batch
}

/// `wisp gpu info`: the GPU, and whether each library the encoder needs loads (and
/// from where): the driver, NVRTC with the CUDA headers, cuBLASLt, wisp's kernels.
fn info() -> serde_json::Value {
    let gpu = match Gpu::open(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            return json!({"available": false, "reason": e.to_string(),
                "libraries": libraries()})
        }
    };
    let (driver_major, driver_minor) = gpu.driver_version();
    let error = |e: Error| json!({"error": e.message});
    let nvrtc_info =
        match nvrtc::find_toolkit().and_then(|t| nvrtc::nvrtc_version().map(|v| (t, v))) {
            Ok((toolkit, (major, minor))) => {
                json!({"version": format!("{major}.{minor}"), "include": toolkit.include})
            }
            Err(e) => error(e),
        };
    let cublaslt = match Blas::probe(&gpu) {
        Ok(version) => json!({"version": version}),
        Err(e) => error(e),
    };
    let kernels = match Kernels::of_device(&gpu) {
        Ok(kernels) => json!(kernels.resources),
        Err(e) => error(e),
    };
    // A usable GPU needs all three; the reason names the first that is missing.
    let missing = [
        ("NVRTC", &nvrtc_info),
        ("cuBLASLt", &cublaslt),
        ("kernels", &kernels),
    ]
    .into_iter()
    .find_map(|(what, v)| {
        v.get("error")
            .map(|e| format!("{what}: {}", e.as_str().unwrap_or("")))
    });
    json!({
        "available": missing.is_none(),
        "reason": missing,
        "name": gpu.name, "arch": gpu.arch, "memory_mib": gpu.memory_bytes >> 20,
        "driver_cuda_version": format!("{driver_major}.{driver_minor}"),
        "memory_pools": gpu.memory_pools(),
        "nvrtc": nvrtc_info, "cublaslt": cublaslt, "kernels": kernels,
        "libraries": libraries(),
    })
}

fn libraries() -> serde_json::Value {
    nvrtc::loaded_libraries()
        .into_iter()
        .map(|(name, path)| json!({"library": name, "path": path}))
        .collect()
}

pub fn run(args: GpuArgs) -> Result<()> {
    if let GpuAction::Info = args.action {
        println!("{}", info());
        return Ok(());
    }
    let device = Arc::new(CudaDevice::open(0)?);
    let gpu = &device.gpu;
    eprintln!(
        "GPU 0: {} ({}), {} MiB",
        gpu.name,
        gpu.arch,
        gpu.memory_bytes >> 20
    );
    match args.action {
        GpuAction::Info => Ok(()),
        GpuAction::Check {
            checkpoint,
            min_cosine,
        } => check(device, &checkpoint, min_cosine),
        GpuAction::Bench {
            checkpoint,
            batch,
            seq,
            mixed,
            seconds,
            no_graphs,
        } => bench(device, &checkpoint, &batch, seq, mixed, seconds, !no_graphs),
    }
}

fn check(device: Arc<CudaDevice>, checkpoints: &[PathBuf], min_cosine: f64) -> Result<()> {
    let mut failed = 0;
    for check in selftest::run(&device.gpu)? {
        println!("{check}");
        failed += usize::from(!check.passed());
    }
    let device: Arc<dyn Device> = device;
    for folder in checkpoints {
        // The checkpoint is the folder itself (paths are confined to the folder given).
        let encoder = Arc::new(load_encoder(&EncoderSettings::new("."), folder)?);
        let weights = Arc::new(GpuEncoder::load(device.clone(), encoder.clone())?);
        let mut runner = GpuRunner::new(weights, true, true)?;
        for (case, lengths) in [
            ("one sequence", vec![128usize]),
            ("mixed lengths", vec![5, 128, 17, 64, 1, 100, 33, 128]),
            ("long", vec![encoder.dims.max_positions.min(512), 3]),
        ] {
            let batch = random_batch(&encoder.dims, &lengths, 7);
            let mut ws = Workspace::default();
            let mut cpu = Vec::new();
            encoder.forward(&batch, &mut ws, Threads(1));
            match encoder.head_kind {
                HeadKind::Embedding => encoder.pool(&batch, &ws, &mut cpu),
                HeadKind::Classification => encoder.classify(&batch, &ws, &mut cpu),
                _ => encoder.per_token(&batch, &ws, &mut cpu, Threads(1)),
            }
            let width = encoder.head_width();
            // A bucket's first batch runs directly, the second replays its CUDA graph:
            // both must agree with the CPU.
            for launch in ["direct", "graph"] {
                let gpu_out = runner.run_packed(clone_batch(&batch))?.to_vec();
                let max_error = cpu
                    .iter()
                    .zip(&gpu_out)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let cosine = cpu
                    .chunks_exact(width)
                    .zip(gpu_out.chunks_exact(width))
                    .map(|(a, b)| {
                        let dot: f64 = a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum();
                        let na: f64 = a.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
                        let nb: f64 = b.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
                        dot / (na * nb).max(1e-30)
                    })
                    .fold(1f64, f64::min);
                let ok = cosine >= min_cosine && gpu_out.len() == cpu.len();
                failed += usize::from(!ok);
                println!(
                    "{}",
                    json!({
                        "check": "model", "checkpoint": folder, "case": case, "launch": launch,
                        "lengths": lengths, "head": encoder.head_kind.as_str(),
                        "max_abs_error": max_error, "min_cosine": cosine, "passed": ok,
                    })
                );
            }
        }
    }
    if let Some(folder) = checkpoints.first() {
        let passed = concurrent_setup(&device, folder)?;
        failed += usize::from(!passed);
    }
    if failed > 0 {
        return Err(Error::internal(format!("{failed} GPU check(s) failed")));
    }
    println!("all GPU checks passed");
    Ok(())
}

/// One instance captures graphs while others are built, warmed up, grow their buffers
/// and are dropped on another thread: the setup of one must never break another's
/// capture (no context-wide synchronization), and replays must match the first runs.
fn concurrent_setup(device: &Arc<dyn Device>, folder: &std::path::Path) -> Result<bool> {
    let encoder = Arc::new(load_encoder(&EncoderSettings::new("."), folder)?);
    let weights = Arc::new(GpuEncoder::load(device.clone(), encoder.clone())?);
    let shapes: Vec<Vec<usize>> = vec![
        vec![8],
        vec![100, 3],
        vec![30; 9],
        vec![128; 4],
        vec![5, 77, 12],
        vec![64; 16],
    ];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let builder = {
        let (weights, stop, dims) = (weights.clone(), stop.clone(), encoder.dims.clone());
        std::thread::spawn(move || -> Result<usize> {
            let mut built = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && built < 200 {
                let mut runner = GpuRunner::new(weights.clone(), true, true)?;
                runner.warm_up()?;
                // Grow its buffers (allocations and frees in its own stream's order).
                runner.run_packed(random_batch(&dims, &[200, 200, 100], 3))?;
                runner.run_packed(random_batch(&dims, &vec![16; 40 + built % 7], 4))?;
                built += 1;
            }
            Ok(built)
        })
    };
    // Fresh instances, one after another, so that captures keep happening (a bucket is
    // captured on its second batch) while the other thread builds its own.
    let mut first: Vec<Vec<f32>> = Vec::new();
    let mut max_error = 0f32;
    let mut outcome = Ok(());
    let mut graphs = 0;
    'instances: for _ in 0..8 {
        let mut runner = match GpuRunner::new(weights.clone(), true, true) {
            Ok(runner) => runner,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        for _ in 0..3 {
            for (i, lengths) in shapes.iter().enumerate() {
                let batch = random_batch(&encoder.dims, lengths, i as u64);
                match runner.run_packed(batch) {
                    Ok(out) if first.len() == i => first.push(out.to_vec()),
                    Ok(out) => {
                        for (a, b) in out.iter().zip(&first[i]) {
                            max_error = max_error.max((a - b).abs());
                        }
                    }
                    Err(e) => {
                        outcome = Err(e);
                        break 'instances;
                    }
                }
            }
        }
        graphs = runner.graphs();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let built = builder
        .join()
        .map_err(|_| Error::internal("the builder thread panicked"))?;
    let passed = outcome.is_ok() && built.is_ok() && max_error <= 1e-3 && graphs == shapes.len();
    println!(
        "{}",
        json!({
            "check": "concurrent setup", "checkpoint": folder,
            "instances_built_meanwhile": built.as_ref().ok(), "graphs": graphs,
            "replay_max_abs_error": max_error,
            "error": outcome.err().or(built.err()).map(|e| e.message),
            "passed": passed,
        })
    );
    Ok(passed)
}

fn time_batch(runner: &mut GpuRunner, batch: &PackedBatch, seconds: f64) -> Result<Vec<f64>> {
    for _ in 0..5 {
        runner.run_packed(clone_batch(batch))?;
    }
    let mut times = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds || times.len() < 20 {
        let copy = clone_batch(batch);
        let t = Instant::now();
        runner.run_packed(copy)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

fn clone_batch(batch: &PackedBatch) -> PackedBatch {
    PackedBatch {
        ids: batch.ids.clone(),
        positions: batch.positions.clone(),
        types: batch.types.clone(),
        segments: batch.segments.clone(),
        key_valid: batch.key_valid.clone(),
    }
}

fn report(case: &str, sequences: usize, times: &[f64], extra: serde_json::Value) {
    let median = times[times.len() / 2];
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    let mut line = json!({
        "case": case, "sequences": sequences, "runs": times.len(),
        "median_ms": median * 1e3, "p99_ms": p99 * 1e3,
        "seq_per_s": sequences as f64 / median,
    });
    if let (Some(line), Some(extra)) = (line.as_object_mut(), extra.as_object()) {
        line.extend(extra.clone());
    }
    println!("{line}");
}

#[allow(clippy::too_many_arguments)]
fn bench(
    device: Arc<CudaDevice>,
    folder: &std::path::Path,
    batches: &[usize],
    seq: usize,
    mixed: bool,
    seconds: f64,
    graphs: bool,
) -> Result<()> {
    let encoder = Arc::new(load_encoder(&EncoderSettings::new("."), folder)?);
    let weights = Arc::new(GpuEncoder::load(device, encoder.clone())?);
    let mut runner = GpuRunner::new(weights, true, graphs)?;
    let layers = encoder.dims.layers;
    for &b in batches {
        let batch = random_batch(&encoder.dims, &vec![seq; b], b as u64);
        let times = time_batch(&mut runner, &batch, seconds)?;
        report(
            &format!("b{b}x{seq}"),
            b,
            &times,
            json!({"layers": layers, "graphs": graphs}),
        );
    }
    if mixed {
        let b = *batches.iter().max().unwrap_or(&64);
        let mut rng = fastrand::Rng::with_seed(42);
        let lengths: Vec<usize> = (0..b).map(|_| rng.usize(16..=seq)).collect();
        let packed = random_batch(&encoder.dims, &lengths, 9);
        let mut padded = clone_batch(&packed);
        pad_batch(&encoder, &mut padded);
        let tokens = packed.tokens();
        let packed_times = time_batch(&mut runner, &packed, seconds)?;
        let padded_times = time_batch(&mut runner, &padded, seconds)?;
        let extra =
            json!({"layers": layers, "real_tokens": tokens, "padded_tokens": padded.tokens()});
        report(
            &format!("mixed16-{seq} b{b} packed"),
            b,
            &packed_times,
            extra.clone(),
        );
        report(
            &format!("mixed16-{seq} b{b} padded"),
            b,
            &padded_times,
            extra,
        );
        println!(
            "{}",
            json!({"case": "mixed speedup", "packed_over_padded": padded_times[padded_times.len()/2] / packed_times[packed_times.len()/2]})
        );
    }
    Ok(())
}
