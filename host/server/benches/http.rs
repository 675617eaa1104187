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
    let sweep = support::Sweep::from_env();
    let repo = support::simple_repository();

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
    // Each must answer with a 200 and the same-sized body before measuring.
    sweep.run(
        "simple over binary HTTP",
        &servers,
        |addr, concurrency, duration, warm_up| {
            runtime.block_on(run_load(
                addr,
                &body,
                header_len,
                concurrency,
                duration,
                warm_up,
            ))
        },
    );
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
