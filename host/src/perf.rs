//! `wisp perf`: a load generator in the manner of Triton's perf_analyzer.
//!
//! For each concurrency level it keeps that many requests in flight (one
//! keep-alive HTTP/1.1 connection each), measures windows until throughput is
//! stable, and reports latency percentiles, throughput and the server's own
//! queue/compute split (from `/stats` before and after), as a table, CSV and
//! an SVG plot of latency against throughput.

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct PerfArgs {
    /// Model to load.
    #[arg(short = 'm', long = "model-name")]
    pub model: String,
    /// Model version (the latest ready one when not given).
    #[arg(short = 'x', long = "model-version")]
    pub version: Option<u64>,
    /// Server address, `host:port` (an `http://` prefix is accepted).
    #[arg(short = 'u', long, default_value = "127.0.0.1:8000")]
    pub url: String,
    /// Concurrency levels, `start:end:step` (perf_analyzer's syntax).
    #[arg(long, default_value = "1:1:1")]
    pub concurrency_range: String,
    /// Batch size of each request (models with max_batch_size > 0).
    #[arg(short = 'b', long, default_value_t = 1)]
    pub batch_size: u64,
    /// `zero` or `random` input values.
    #[arg(long, default_value = "random")]
    pub input_data: String,
    /// Dimensions of a variable-shaped input, `NAME:d1,d2` (without the batch). Repeatable.
    #[arg(long = "shape")]
    pub shapes: Vec<String>,
    /// Send tensors as JSON instead of the binary extension.
    #[arg(long)]
    pub json: bool,
    /// Length of one measurement window.
    #[arg(long = "measurement-interval", short = 'p', default_value_t = 2000)]
    pub measurement_ms: u64,
    /// Windows whose throughput is within this percentage of each other count as stable.
    #[arg(long = "stability-percentage", short = 's', default_value_t = 10.0)]
    pub stability_pct: f64,
    /// Most windows per concurrency level before reporting unstable numbers.
    #[arg(long = "max-trials", short = 'r', default_value_t = 10)]
    pub max_windows: usize,
    /// Write the results as CSV.
    #[arg(short = 'f', long = "latency-report-file")]
    pub csv: Option<PathBuf>,
    /// Write an SVG plot of p95 latency against throughput.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// One concurrency level's results.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub throughput: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p95_us: f64,
    pub p99_us: f64,
    pub avg_us: f64,
    pub stable: bool,
    pub server_queue_us: f64,
    pub server_compute_us: f64,
}

fn parse_range(s: &str) -> Result<Vec<usize>> {
    let parts: Vec<usize> = s
        .split(':')
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--concurrency-range '{s}' is not start:end:step"))?;
    let (start, end, step) = match parts.as_slice() {
        [a] => (*a, *a, 1),
        [a, b] => (*a, *b, 1),
        [a, b, c] => (*a, *b, *c),
        _ => bail!("--concurrency-range '{s}' is not start:end:step"),
    };
    if start == 0 || end < start || step == 0 {
        bail!("--concurrency-range '{s}': need 1 <= start <= end and step >= 1");
    }
    Ok((start..=end).step_by(step).collect())
}

/// A minimal HTTP/1.1 client for one connection.
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Connection {
    async fn open(addr: &str) -> Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Connection {
            sender,
            host: addr.to_string(),
        })
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<(u16, Bytes)> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        for (k, v) in headers {
            request = request.header(*k, v);
        }
        let response = self
            .sender
            .send_request(request.body(Full::new(body))?)
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.into_body().collect().await?.to_bytes()))
    }
}

async fn get_json(addr: &str, path: &str) -> Result<Value> {
    let mut conn = Connection::open(addr).await?;
    let (status, body) = conn.send("GET", path, &[], Bytes::new()).await?;
    let value: Value =
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: not JSON"))?;
    if status != 200 {
        bail!(
            "GET {path}: {status} {}",
            value["error"].as_str().unwrap_or("")
        );
    }
    Ok(value)
}

/// Builds the request body the model's metadata calls for.
fn build_request(meta: &Value, args: &PerfArgs, batched: bool) -> Result<(Bytes, Option<usize>)> {
    let mut inputs = Vec::new();
    let mut binary = Vec::new();
    let random = match args.input_data.as_str() {
        "random" => true,
        "zero" => false,
        other => bail!("--input-data '{other}': use zero or random"),
    };
    for input in meta["inputs"]
        .as_array()
        .ok_or_else(|| anyhow!("model metadata has no inputs"))?
    {
        let name = input["name"].as_str().unwrap_or_default();
        let datatype = input["datatype"].as_str().unwrap_or_default();
        let declared: Vec<i64> = input["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_i64()).collect())
            .unwrap_or_default();
        let dims: Vec<i64> = if batched {
            declared[1..].to_vec()
        } else {
            declared.clone()
        };
        let dims = match args.shapes.iter().find_map(|s| s.strip_prefix(&format!("{name}:"))) {
            Some(given) => given
                .split(',')
                .map(|d| d.trim().parse::<i64>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .with_context(|| format!("--shape {name}:{given} is not a list of integers"))?,
            None if dims.contains(&-1) => bail!("input '{name}' has variable dimensions {dims:?}; give them with --shape {name}:d1,d2"),
            None => dims,
        };
        let shape: Vec<i64> = if batched {
            std::iter::once(args.batch_size as i64)
                .chain(dims)
                .collect()
        } else {
            dims
        };
        let count: usize = shape.iter().map(|&d| d.max(0) as usize).product();
        let mut data = Vec::new();
        let mut values = Vec::new();
        for _ in 0..count {
            let n: i64 = if random { fastrand::i64(0..100) } else { 0 };
            match datatype {
                "BYTES" => {
                    let s = n.to_string();
                    data.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    data.extend_from_slice(s.as_bytes());
                    values.push(json!(s));
                }
                "BOOL" => {
                    data.push((n % 2) as u8);
                    values.push(json!(n % 2 == 1));
                }
                "FP32" => {
                    data.extend_from_slice(&(n as f32).to_le_bytes());
                    values.push(json!(n as f32));
                }
                "FP64" => {
                    data.extend_from_slice(&(n as f64).to_le_bytes());
                    values.push(json!(n as f64));
                }
                "FP16" => {
                    data.extend_from_slice(&half::f16::from_f64(n as f64).to_le_bytes());
                    values.push(json!(n as f64));
                }
                "BF16" => {
                    data.extend_from_slice(&half::bf16::from_f64(n as f64).to_le_bytes());
                    values.push(json!(n as f64));
                }
                other => {
                    let size = crate::tensor::DataType::parse(other)
                        .and_then(|d| d.element_size())
                        .ok_or_else(|| anyhow!("input '{name}' has unknown datatype {other}"))?;
                    data.extend_from_slice(&n.to_le_bytes()[..size]);
                    values.push(json!(n));
                }
            }
        }
        if args.json {
            inputs
                .push(json!({"name": name, "datatype": datatype, "shape": shape, "data": values}));
        } else {
            inputs.push(json!({"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": data.len()}}));
            binary.extend_from_slice(&data);
        }
    }
    let header = json!({"inputs": inputs, "parameters": {"binary_data_output": !args.json}});
    let mut body = serde_json::to_vec(&header)?;
    if args.json {
        return Ok((Bytes::from(body), None));
    }
    let header_len = body.len();
    body.extend_from_slice(&binary);
    Ok((Bytes::from(body), Some(header_len)))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)] as f64 / 1e3
}

/// Server-side (queue ns, compute ns, request count) from the model's statistics.
async fn server_totals(addr: &str, stats_path: &str) -> Result<(u64, u64, u64)> {
    let stats = get_json(addr, stats_path).await?;
    let s = &stats["model_stats"][0]["inference_stats"];
    let ns = |k: &str| s[k]["ns"].as_u64().unwrap_or(0);
    Ok((
        ns("queue"),
        ns("compute_input") + ns("compute_infer") + ns("compute_output"),
        s["success"]["count"].as_u64().unwrap_or(0),
    ))
}

async fn run_step(
    addr: &str,
    infer_path: &str,
    stats_path: &str,
    body: &Bytes,
    header_len: Option<usize>,
    concurrency: usize,
    args: &PerfArgs,
) -> Result<StepResult> {
    // Every finished request: (when it finished, latency ns, ok).
    let records: Arc<Mutex<Vec<(Instant, u64, bool)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let mut conn = Connection::open(addr).await?;
        let (records, stop, body, path) = (
            records.clone(),
            stop.clone(),
            body.clone(),
            infer_path.to_string(),
        );
        let mut headers = vec![("content-type", "application/octet-stream".to_string())];
        if let Some(len) = header_len {
            headers.push(("inference-header-content-length", len.to_string()));
        }
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let ok = matches!(
                    conn.send("POST", &path, &headers, body.clone()).await,
                    Ok((200, _))
                );
                records
                    .lock()
                    .push((Instant::now(), sent.elapsed().as_nanos() as u64, ok));
                if !ok && conn.sender.is_closed() {
                    match Connection::open(&conn.host).await {
                        Ok(fresh) => conn = fresh,
                        Err(_) => break,
                    }
                }
            }
        }));
    }
    let window = Duration::from_millis(args.measurement_ms.max(100));
    // Warm-up: one window not counted.
    tokio::time::sleep(window).await;
    records.lock().clear();
    let before = server_totals(addr, stats_path).await?;
    let mut windows: Vec<Vec<(Instant, u64, bool)>> = Vec::new();
    let mut stable = false;
    while windows.len() < args.max_windows.max(3) {
        tokio::time::sleep(window).await;
        windows.push(std::mem::take(&mut *records.lock()));
        if windows.len() >= 3 {
            let last: Vec<f64> = windows[windows.len() - 3..]
                .iter()
                .map(|w| w.len() as f64)
                .collect();
            let mean = last.iter().sum::<f64>() / 3.0;
            if mean > 0.0
                && last
                    .iter()
                    .all(|t| (t - mean).abs() / mean * 100.0 <= args.stability_pct)
            {
                stable = true;
                break;
            }
        }
    }
    let after = server_totals(addr, stats_path).await?;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let measured = &windows[windows.len().saturating_sub(3)..];
    let mut latencies: Vec<u64> = measured
        .iter()
        .flatten()
        .filter(|r| r.2)
        .map(|r| r.1)
        .collect();
    let errors = measured.iter().flatten().filter(|r| !r.2).count();
    latencies.sort_unstable();
    let seconds = window.as_secs_f64() * measured.len() as f64;
    let served = (after.2 - before.2).max(1) as f64;
    Ok(StepResult {
        concurrency,
        requests: latencies.len(),
        errors,
        throughput: latencies.len() as f64 * args.batch_size as f64 / seconds,
        p50_us: percentile(&latencies, 0.50),
        p90_us: percentile(&latencies, 0.90),
        p95_us: percentile(&latencies, 0.95),
        p99_us: percentile(&latencies, 0.99),
        avg_us: latencies.iter().sum::<u64>() as f64 / latencies.len().max(1) as f64 / 1e3,
        stable,
        server_queue_us: (after.0 - before.0) as f64 / served / 1e3,
        server_compute_us: (after.1 - before.1) as f64 / served / 1e3,
    })
}

pub fn csv(results: &[StepResult]) -> String {
    let mut out = String::from("Concurrency,Inferences/Second,Client Send+Recv avg (us),p50 latency,p90 latency,p95 latency,p99 latency,Server Queue (us),Server Compute (us),Requests,Errors,Stable\n");
    for r in results {
        let _ = writeln!(
            out,
            "{},{:.1},{:.0},{:.0},{:.0},{:.0},{:.0},{:.0},{:.0},{},{},{}",
            r.concurrency,
            r.throughput,
            r.avg_us,
            r.p50_us,
            r.p90_us,
            r.p95_us,
            r.p99_us,
            r.server_queue_us,
            r.server_compute_us,
            r.requests,
            r.errors,
            r.stable
        );
    }
    out
}

/// An SVG line plot of p95 latency (y) against throughput (x), one series per label.
pub fn svg_plot(series: &[(&str, &[StepResult])]) -> String {
    let (w, h, m) = (640.0, 420.0, 60.0);
    let all = series.iter().flat_map(|(_, r)| r.iter());
    let max_x = all.clone().map(|r| r.throughput).fold(1.0, f64::max) * 1.05;
    let max_y = all.map(|r| r.p95_us / 1e3).fold(0.001, f64::max) * 1.05;
    let x = |v: f64| m + v / max_x * (w - 2.0 * m);
    let y = |v: f64| h - m - v / max_y * (h - 2.0 * m);
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">throughput (inferences/s), max {max_x:.0}</text>\n\
         <text x=\"15\" y=\"{}\" transform=\"rotate(-90 15 {})\" text-anchor=\"middle\">p95 latency (ms), max {max_y:.2}</text>\n",
        h - m, w - m, h - m, h - m, w / 2.0, h - 15.0, h / 2.0, h / 2.0
    );
    for (i, (label, results)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        let points: Vec<String> = results
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.throughput), y(r.p95_us / 1e3)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        for r in results.iter() {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"><title>c={} {:.0}/s p95 {:.2} ms</title></circle>",
                x(r.throughput), y(r.p95_us / 1e3), r.concurrency, r.throughput, r.p95_us / 1e3
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{label}</text>",
            m + 10.0,
            m + 15.0 * (i as f64 + 1.0)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

pub fn print_table(results: &[StepResult]) {
    println!("| concurrency | inferences/s | p50 (µs) | p90 (µs) | p95 (µs) | p99 (µs) | server queue (µs) | server compute (µs) | errors | stable |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
            r.concurrency,
            r.throughput,
            r.p50_us,
            r.p90_us,
            r.p95_us,
            r.p99_us,
            r.server_queue_us,
            r.server_compute_us,
            r.errors,
            r.stable
        );
    }
}

/// Runs every concurrency level against the server and returns the results.
pub async fn measure(args: &PerfArgs) -> Result<Vec<StepResult>> {
    let addr = args
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let base = match args.version {
        Some(v) => format!("/v2/models/{}/versions/{v}", args.model),
        None => format!("/v2/models/{}", args.model),
    };
    let meta = get_json(&addr, &base).await?;
    let config = get_json(&addr, &format!("{base}/config")).await?;
    let batched = config["max_batch_size"].as_u64().unwrap_or(0) > 0;
    let (body, header_len) = build_request(&meta, args, batched)?;
    let mut results = Vec::new();
    for concurrency in parse_range(&args.concurrency_range)? {
        let step = run_step(
            &addr,
            &format!("{base}/infer"),
            &format!("{base}/stats"),
            &body,
            header_len,
            concurrency,
            args,
        )
        .await?;
        eprintln!(
            "concurrency {concurrency}: {:.0} infer/s, p50 {:.0} µs, p95 {:.0} µs{}",
            step.throughput,
            step.p50_us,
            step.p95_us,
            if step.stable { "" } else { " (not stable)" }
        );
        results.push(step);
    }
    Ok(results)
}

/// `wisp perf`.
pub async fn run(args: PerfArgs) -> Result<()> {
    let results = measure(&args).await?;
    print_table(&results);
    if let Some(path) = &args.csv {
        std::fs::write(path, csv(&results))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, svg_plot(&[(args.model.as_str(), &results)]))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
