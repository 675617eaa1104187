//! Dynamic batching on and off, side by side in one run, with `wisp perf`'s
//! measurement: the same identity model with a fixed cost per batch (2 ms, as
//! a GPU kernel launch would have), one instance, at the same concurrency levels.
//!
//!     scripts/build-plugins.sh && cargo bench --bench batching
//!
//! Environment: WISP_BENCH_CONCURRENCY (default "1:64:..." as 1,4,16,64),
//! WISP_BENCH_WINDOW_MS (default 2000), WISP_BENCH_OUT (folder for CSV and SVG,
//! default bench-results/).

use std::path::{Path, PathBuf};
// The perf subcommand lives in the binary, not the library; the bench compiles its source.
#[path = "../src/commands/perf.rs"]
#[allow(dead_code)]
mod perf;
use perf::{csv, measure, svg_plot, PerfArgs};

mod support;

const MODEL_BASE: &str = "backend = \"wasm\"\nmax_batch_size = 64\n\
    [[input]]\nname = \"INPUT0\"\ndatatype = \"FP32\"\ndims = [16]\n\
    [[output]]\nname = \"OUTPUT0\"\ndatatype = \"FP32\"\ndims = [16]\n\
    [[instance_group]]\ncount = 1\n\
    [parameters]\nexecute_delay_us = 2000\n";

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let component = root.join("tests/components/wisp_plugin_identity.wasm");
    assert!(component.is_file(), "run scripts/build-plugins.sh first");
    let repo = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("fixed_cost", ""),
        (
            "fixed_cost_batched",
            "[dynamic_batching]\nmax_queue_delay_us = 500\n",
        ),
    ] {
        let dir = repo.path().join(name);
        std::fs::create_dir_all(dir.join("1")).unwrap();
        std::fs::write(dir.join("config.toml"), format!("{MODEL_BASE}{extra}")).unwrap();
        std::fs::copy(&component, dir.join("1/model.wasm")).unwrap();
    }
    let (mut server, addr) = support::start_wisp(repo.path());

    let window: u64 = std::env::var("WISP_BENCH_WINDOW_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let levels = std::env::var("WISP_BENCH_CONCURRENCY").unwrap_or_else(|_| "1,4,16,64".into());
    let out = PathBuf::from(
        std::env::var("WISP_BENCH_OUT")
            .unwrap_or_else(|_| root.join("bench-results").display().to_string()),
    );
    std::fs::create_dir_all(&out).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut all = Vec::new();
    for model in ["fixed_cost", "fixed_cost_batched"] {
        let mut results = Vec::new();
        for c in levels.split(',') {
            let args = PerfArgs {
                model: model.into(),
                version: None,
                url: Some(addr.clone()),
                protocol: perf::Protocol::Http,
                shared_memory: perf::SharedMemory::None,
                output_shm_bytes: 102_400,
                concurrency_range: c.trim().to_string(),
                request_rate_range: None,
                batch_size: 1,
                input_data: "random".into(),
                shapes: vec![],
                json: false,
                measurement_ms: window,
                stability_pct: 10.0,
                max_windows: 6,
                csv: None,
                plot: None,
                compare: vec![],
            };
            results.extend(runtime.block_on(measure(&args)).unwrap());
        }
        std::fs::write(out.join(format!("{model}.csv")), csv(&results)).unwrap();
        all.push((model, results));
    }
    let series: Vec<(&str, &[perf::StepResult])> =
        all.iter().map(|(m, r)| (*m, r.as_slice())).collect();
    std::fs::write(out.join("batching.svg"), svg_plot(&series)).unwrap();

    println!("identity with a 2 ms fixed cost per batch, 1 instance; dynamic batching off vs on (max_queue_delay_us 500)");
    println!("| concurrency | off: infer/s | off: p95 (ms) | on: infer/s | on: p95 (ms) | throughput on/off | p95 on/off |");
    println!("|---|---|---|---|---|---|---|");
    for (off, on) in all[0].1.iter().zip(&all[1].1) {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} |",
            off.concurrency,
            off.throughput,
            off.p95_us / 1e3,
            on.throughput,
            on.p95_us / 1e3,
            on.throughput / off.throughput,
            on.p95_us / off.p95_us
        );
    }
    println!("CSV and plot in {}", out.display());
    let _ = server.kill();
    let _ = server.wait();
}
