//! Times wisp's CPU encoder on pre-tokenized cases, the way `bench/encoder_vs_ort.py`
//! times ONNX Runtime: median of ≥ `--iters` runs after `--warmup`, more runs until
//! `--min-time` seconds pass. Each run is the whole instance path (packing, forward,
//! pooling, output tensors) on one batch.
//!
//! ```text
//! cargo run --release --example encoder_bench -- --model MODEL_DIR --cases CASES.json \
//!     --out RESULT.json [--warmup 5] [--iters 20] [--min-time 3] [--threads N] [--padded]
//!     [--all-rows] [--precision f32|int8]
//! ```
//! A quantized checkpoint (from `wisp quantize`) runs in INT8, as the server runs it;
//! `--precision` makes sure the checkpoint is the one meant.
//! RESULT.json has each case's first output row under "embeddings" (every row with
//! `--all-rows`, for accuracy checks).
//! CASES.json: `{case: {"input_ids": [[..]], "attention_mask": [[..]]}}` (rows may be
//! padded; the mask says which tokens are real).

use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;
use wisp_backend_encoder::{load_encoder, EncoderSettings, Runner};
use wisp_core::backend::BackendRequest;
use wisp_core::tensor::{DataType, Tensor};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn int_tensor(name: &str, rows: &[Vec<i64>]) -> Tensor {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut data = Vec::with_capacity(rows.len() * width * 8);
    for row in rows {
        for c in 0..width {
            data.extend_from_slice(&row.get(c).copied().unwrap_or(0).to_le_bytes());
        }
    }
    Tensor {
        name: name.into(),
        datatype: DataType::Int64,
        shape: vec![rows.len() as i64, width as i64],
        data: data.into(),
    }
}

fn rows(case: &Value, key: &str) -> Option<Vec<Vec<i64>>> {
    serde_json::from_value(case.get(key)?.clone()).ok()
}

fn main() {
    // Before any thread exists (it sets an environment variable OpenBLAS reads).
    wisp_backend_encoder::linear::choose_openblas_kernel();
    let args: Vec<String> = std::env::args().collect();
    let model = arg(&args, "--model").expect("--model MODEL_DIR");
    let cases_path = arg(&args, "--cases").expect("--cases CASES.json");
    let out = arg(&args, "--out");
    let warmup: usize = arg(&args, "--warmup").map_or(5, |v| v.parse().unwrap());
    let iters: usize = arg(&args, "--iters").map_or(20, |v| v.parse().unwrap());
    let min_time: f64 = arg(&args, "--min-time").map_or(3.0, |v| v.parse().unwrap());
    let threads: usize = arg(&args, "--threads").map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |v| v.parse().unwrap(),
    );
    let padded = args.iter().any(|a| a == "--padded");
    let all_rows = args.iter().any(|a| a == "--all-rows");

    // BF16 rounds a float checkpoint's products at load, as the server does.
    let bf16 = arg(&args, "--precision").as_deref() == Some("bf16");
    let settings = EncoderSettings {
        threads,
        remove_padding: !padded,
        precision: bf16.then_some(wisp_backend_encoder::Precision::Bf16),
        ..EncoderSettings::new(".")
    };
    // The checkpoint is the model folder itself (paths are confined to the folder given).
    let mut encoder = load_encoder(&settings, std::path::Path::new(&model)).expect("load");
    // As the server does for CPU instances (WISP_PANELS=0 turns it off).
    encoder.pack_for_cpu();
    let encoder = Arc::new(encoder);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    wisp_backend_encoder::linear::set_engine_threads(threads);
    let precision = encoder.precision();
    if let Some(wanted) = arg(&args, "--precision") {
        let wanted = if wanted == "fp32" {
            "f32".to_string()
        } else {
            wanted
        };
        assert_eq!(
            wanted, precision,
            "--precision {wanted}, but {model} is a {precision} checkpoint (INT8 ones come from `wisp quantize`)"
        );
    }
    let kernels = match precision {
        "int8" => wisp_backend_encoder::int8::Isa::selected().name(),
        "bf16" => wisp_backend_encoder::bf16::Isa::selected().name(),
        _ => "-",
    };
    println!(
        "  wisp GEMM engine: {}, precision {precision} (kernels: {kernels})",
        wisp_backend_encoder::linear::engine()
    );
    let mut runner = Runner::new(encoder, !padded, threads);
    let cases: Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&cases_path).expect("read cases"))
            .expect("cases JSON");
    let mut results = Map::new();
    let mut embeddings = Map::new();
    for (name, case) in &cases {
        let ids = rows(case, "input_ids").expect("input_ids");
        let mut inputs = vec![int_tensor("input_ids", &ids)];
        if let Some(mask) = rows(case, "attention_mask") {
            inputs.push(int_tensor("attention_mask", &mask));
        }
        let request = vec![BackendRequest {
            inputs,
            ..Default::default()
        }];
        let mut run = || pool.install(|| runner.run(&request));
        let first = run();
        let output = first.results[0].as_ref().expect("encoder run");
        let tensor = &output.outputs[0];
        let width = *tensor.shape.last().unwrap() as usize;
        let values: Vec<f32> = tensor
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let kept = if all_rows {
            json!(values.chunks_exact(width).collect::<Vec<_>>())
        } else {
            json!(values[..width])
        };
        embeddings.insert(name.clone(), kept);
        for _ in 1..warmup {
            run();
        }
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < iters || start.elapsed().as_secs_f64() < min_time {
            let t = Instant::now();
            run();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            if times.len() >= 10_000 {
                break;
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let pick = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        let seq_per_s = ids.len() as f64 / (median / 1e3);
        println!(
            "  wisp {name} [{}x{}]: median {median:.2} ms (p10 {:.2}, p90 {:.2}, n={}) -> {seq_per_s:.1} seq/s",
            ids.len(),
            ids.iter().map(Vec::len).max().unwrap_or(0),
            pick(0.1),
            pick(0.9),
            times.len()
        );
        results.insert(
            name.clone(),
            json!({"median_ms": median, "p10_ms": pick(0.1), "p90_ms": pick(0.9),
                   "min_ms": times[0], "n": times.len(), "seq_per_s": seq_per_s}),
        );
    }
    results.insert("embeddings".into(), Value::Object(embeddings));
    results.insert(
        "settings".into(),
        json!({"threads": threads, "remove_padding": !padded,
               "gemm": wisp_backend_encoder::linear::engine(),
               "precision": precision, "kernels": kernels}),
    );
    if let Some(out) = out {
        std::fs::write(&out, serde_json::to_string_pretty(&results).unwrap()).expect("write --out");
    }
}
