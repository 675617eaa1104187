//! Shared by the benchmarks: start `wisp serve` on a loopback port, the `simple`
//! repository, and the load steps' results. Each bench uses some of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Starts the release `wisp` over `repo` and returns it with its HTTP address,
/// once startup loading has finished.
pub fn start_wisp(repo: &Path) -> (Child, String) {
    start_wisp_binary(Path::new(env!("CARGO_BIN_EXE_wisp")), repo)
}

/// Starts the release `wisp` over `repo` and returns it with its gRPC address.
pub fn start_wisp_grpc(repo: &Path) -> (Child, String) {
    start_wisp_listening(Path::new(env!("CARGO_BIN_EXE_wisp")), repo, "grpc=")
}

/// Starts the `wisp` binary at `binary` (another build, to compare side by side).
pub fn start_wisp_binary(binary: &Path, repo: &Path) -> (Child, String) {
    start_wisp_listening(binary, repo, "http=")
}

/// Starts `binary` and returns the address its listening line gives after `key`.
fn start_wisp_listening(binary: &Path, repo: &Path, key: &'static str) -> (Child, String) {
    let mut server = Command::new(binary)
        .args([
            "serve",
            "--http-address",
            "127.0.0.1",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
        ])
        // Builds before the gRPC front have no such flag (and no gRPC port to collide on).
        .args(if binary == Path::new(env!("CARGO_BIN_EXE_wisp")) {
            &["--grpc-port", "0"][..]
        } else {
            &[]
        })
        .arg("--model-repository")
        .arg(repo)
        .env("WISP_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting wisp");
    let lines = BufReader::new(server.stderr.take().expect("piped stderr")).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut addr = String::new();
        for line in lines.map_while(Result::ok) {
            if let Some(at) = line.find(key) {
                addr = line[at + key.len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
            }
            if line.contains("startup loading finished") {
                let _ = tx.send(addr.clone());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("wisp finished loading");
    (server, addr)
}

/// A model repository holding only `simple` (the Wasm plugin from
/// scripts/build-plugins.sh), in a temporary folder.
pub fn simple_repository() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .parent()
        .unwrap();
    let component = root.join("tests/components/wisp_plugin_simple.wasm");
    assert!(
        component.is_file(),
        "run scripts/build-plugins.sh first ({} missing)",
        component.display()
    );
    std::fs::create_dir_all(repo.path().join("simple/1")).unwrap();
    std::fs::copy(
        root.join("model_repository/simple/config.toml"),
        repo.path().join("simple/config.toml"),
    )
    .unwrap();
    std::fs::copy(&component, repo.path().join("simple/1/model.wasm")).unwrap();
    repo
}

/// What one load step measured.
pub struct LoadResult {
    pub latencies_ns: Vec<u64>,
    pub errors: usize,
    pub elapsed: Duration,
}

/// One row of a benchmark's table.
pub struct Row {
    pub concurrency: usize,
    pub requests: usize,
    pub throughput: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub errors: usize,
}

impl LoadResult {
    /// Joins the clients of one step, each giving its latencies and error count.
    pub async fn gather(
        clients: Vec<tokio::task::JoinHandle<(Vec<u64>, usize)>>,
        elapsed: Duration,
    ) -> LoadResult {
        let mut result = LoadResult {
            latencies_ns: Vec::new(),
            errors: 0,
            elapsed,
        };
        for client in clients {
            let (latencies, errors) = client.await.unwrap();
            result.latencies_ns.extend(latencies);
            result.errors += errors;
        }
        result
    }

    pub fn summary(mut self, concurrency: usize) -> Row {
        self.latencies_ns.sort_unstable();
        let pct = |p: f64| -> f64 {
            let v = &self.latencies_ns;
            if v.is_empty() {
                return f64::NAN;
            }
            v[((v.len() as f64 * p) as usize).min(v.len() - 1)] as f64 / 1e3
        };
        Row {
            concurrency,
            requests: self.latencies_ns.len(),
            throughput: self.latencies_ns.len() as f64 / self.elapsed.as_secs_f64(),
            p50_us: pct(0.50),
            p90_us: pct(0.90),
            p99_us: pct(0.99),
            errors: self.errors,
        }
    }
}

/// Benchmark settings from the environment: `WISP_BENCH_SECS` per step (5),
/// `WISP_BENCH_ROUNDS` (1), `WISP_BENCH_CONCURRENCY` levels ("1,64").
pub struct Sweep {
    pub secs: u64,
    pub rounds: usize,
    pub levels: Vec<usize>,
}

impl Sweep {
    pub fn from_env() -> Sweep {
        let var = |key: &str| std::env::var(key).ok();
        Sweep {
            secs: var("WISP_BENCH_SECS")
                .and_then(|s| s.parse().ok())
                .unwrap_or(5),
            rounds: var("WISP_BENCH_ROUNDS")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1usize)
                .max(1),
            levels: var("WISP_BENCH_CONCURRENCY")
                .unwrap_or_else(|| "1,64".into())
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect(),
        }
    }

    /// Checks that each server answers cleanly, then runs every level against every
    /// server in turn (`load(addr, concurrency, duration, warm_up)`), printing the table
    /// under `title` and then each level's ratios: the first server over the last (the
    /// bare echo), and over the middle one when there are three (a baseline build).
    pub fn run(
        &self,
        title: &str,
        servers: &[(String, String)],
        load: impl Fn(&str, usize, Duration, Duration) -> LoadResult,
    ) {
        for (name, addr) in servers {
            let r = load(addr, 1, Duration::from_millis(200), Duration::ZERO);
            assert!(
                r.errors == 0 && r.latencies_ns.len() > 10,
                "{name} at {addr} did not answer cleanly"
            );
        }
        println!(
            "{title}, {} s per step, loopback, same load generator",
            self.secs
        );
        println!("| server | concurrency | requests | throughput (req/s) | p50 (µs) | p90 (µs) | p99 (µs) | errors |");
        println!("|---|---|---|---|---|---|---|---|");
        let mut rows = Vec::new();
        for _ in 0..self.rounds {
            for &c in &self.levels {
                for (name, addr) in servers {
                    let r = load(
                        addr,
                        c,
                        Duration::from_secs(self.secs),
                        Duration::from_secs(1),
                    );
                    let row = r.summary(c);
                    println!(
                        "| {name} | {c} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                        row.requests,
                        row.throughput,
                        row.p50_us,
                        row.p90_us,
                        row.p99_us,
                        row.errors
                    );
                    rows.push(row);
                }
            }
        }
        println!();
        for group in rows.chunks(servers.len()) {
            let (w, e) = (&group[0], &group[group.len() - 1]);
            print!(
                "concurrency {}: wisp/echo throughput {:.2}, p50 latency wisp/echo {:.2}",
                w.concurrency,
                w.throughput / e.throughput,
                w.p50_us / e.p50_us
            );
            if group.len() == 3 {
                let b = &group[1];
                print!(
                    "; wisp/baseline throughput {:.3}, p50 latency wisp/baseline {:.3}",
                    w.throughput / b.throughput,
                    w.p50_us / b.p50_us
                );
            }
            println!();
        }
    }
}
