//! HTTP overhead of wisp against the ceiling of HTTP on this machine.
//!
//! Sends the same binary-tensor `simple` request (two INT32[1,16] inputs,
//! binary outputs) to `wisp serve` and to a bare hyper server that echoes the
//! bytes back, both as separate processes on loopback, with the same load
//! generator: p50/p90/p99 latency and throughput at each concurrency.
//!
//!     scripts/build-plugins.sh && cargo bench --bench http
//!
//! Environment: WISP_BENCH_SECS (measured seconds per step, default 5),
//! WISP_BENCH_CONCURRENCY (default "1,64"), WISP_BENCH_ROUNDS (default 1: rounds of
//! every step, alternating the servers), WISP_BENCH_BASELINE (the path of another
//! `wisp` binary, e.g. a build of an earlier commit, measured side by side in the
//! same rounds: a regression check on the same noisy machine).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::LoadResult;

const HEADER_LENGTH: &str = "inference-header-content-length";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("echo-server") {
        echo_server();
        return;
    }
    let secs: u64 = std::env::var("WISP_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let levels: Vec<usize> = std::env::var("WISP_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,64".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();

    let repo = support::simple_repository();

    let rounds: usize = std::env::var("WISP_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let (mut wisp, wisp_addr) = support::start_wisp(repo.path());
    let mut servers = vec![("wisp simple".to_string(), wisp_addr.clone())];
    let mut baseline = std::env::var_os("WISP_BENCH_BASELINE").map(|binary| {
        let (child, addr) = support::start_wisp_binary(Path::new(&binary), repo.path());
        servers.push(("wisp baseline".to_string(), addr));
        child
    });
    let (mut echo, echo_addr) = spawn(
        Command::new(std::env::current_exe().unwrap()).arg("echo-server"),
        "echo=",
    );

    let (body, header_len) = simple_body();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    servers.push(("bare hyper echo".to_string(), echo_addr.clone()));
    // Check each answers with a 200 and the same-sized body before measuring.
    for (_, addr) in &servers {
        let r = runtime.block_on(run_load(
            addr,
            &body,
            header_len,
            1,
            Duration::from_millis(200),
            Duration::ZERO,
        ));
        assert!(
            r.errors == 0 && r.latencies_ns.len() > 10,
            "{addr} did not answer cleanly"
        );
    }

    println!("simple over binary HTTP, {secs} s per step, loopback, same load generator");
    println!("| server | concurrency | requests | throughput (req/s) | p50 (µs) | p90 (µs) | p99 (µs) | errors |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for _ in 0..rounds {
        for &c in &levels {
            for (name, addr) in &servers {
                let r = runtime.block_on(run_load(
                    addr,
                    &body,
                    header_len,
                    c,
                    Duration::from_secs(secs),
                    Duration::from_secs(1),
                ));
                let row = r.summary(c);
                println!(
                    "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                    name,
                    c,
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
    if let Some(baseline) = baseline.as_mut() {
        let _ = baseline.kill();
    }
    let _ = wisp.kill();
    let _ = echo.kill();
}

/// Starts a child and reads its listening address from the line holding `key`.
fn spawn(command: &mut Command, key: &str) -> (Child, String) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let key = key.to_string();
    for stream in [
        Box::new(stderr) as Box<dyn std::io::Read + Send>,
        Box::new(stdout),
    ] {
        let (tx, key) = (tx.clone(), key.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Some(at) = line.find(&key) {
                    let addr = line[at + key.len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let _ = tx.send(addr);
                }
            }
        });
    }
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server printed its address");
    (child, addr)
}

fn simple_body() -> (Bytes, usize) {
    let header = json!({
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}},
        ],
        "parameters": {"binary_data_output": true},
    });
    let mut body = serde_json::to_vec(&header).unwrap();
    let header_len = body.len();
    for v in (0..16i32).chain(0..16i32) {
        body.extend_from_slice(&v.to_le_bytes());
    }
    (Bytes::from(body), header_len)
}

/// `concurrency` keep-alive connections, each sending the next request when
/// the last response is fully read; only requests that finish after `warmup`
/// and within `duration` count.
async fn run_load(
    addr: &str,
    body: &Bytes,
    header_len: usize,
    concurrency: usize,
    duration: Duration,
    warmup: Duration,
) -> LoadResult {
    let start = Instant::now() + warmup;
    let end = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (addr, body) = (addr.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            let mut errors = 0;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let request = Request::post("/v2/models/simple/infer")
                    .header("host", &addr)
                    .header("content-type", "application/octet-stream")
                    .header(HEADER_LENGTH, header_len)
                    .body(Full::new(body.clone()))
                    .unwrap();
                let ok = match sender.send_request(request).await {
                    Ok(response) => {
                        let status = response.status();
                        let bytes = response
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes().len());
                        status == 200 && bytes.is_ok()
                    }
                    Err(_) => false,
                };
                let done = Instant::now();
                if sent >= start && done <= end {
                    if ok {
                        latencies.push((done - sent).as_nanos() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    LoadResult::gather(tasks, duration).await
}

/// The ceiling: a bare hyper HTTP/1.1 server that answers every request with
/// its own body (and inference header length), like a zero-cost model.
fn echo_server() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("echo={}", listener.local_addr().unwrap());
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let header_len = req.headers().get(HEADER_LENGTH).cloned();
                    let body = req.into_body().collect().await?.to_bytes();
                    let mut response =
                        Response::builder().header("content-type", "application/octet-stream");
                    if let Some(len) = header_len {
                        response = response.header(HEADER_LENGTH, len);
                    }
                    Ok::<_, hyper::Error>(response.body(Full::new(body)).unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
