//! The dynamic batcher: batches form at preferred and maximum sizes and are cut
//! at the max delay (seen in `/stats` batch statistics), priorities go first,
//! full queues and queue timeouts answer 503.

use crate::harness::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// `identity` over INT32 [1] with a `[dynamic_batching]` table.
fn identity_batched(max_batch_size: u32, batching: &str) -> String {
    format!(
        "backend = \"wasm\"\nmax_batch_size = {max_batch_size}\n\
         [[input]]\nname = \"INPUT0\"\ndatatype = \"INT32\"\ndims = [1]\n\
         [[output]]\nname = \"OUTPUT0\"\ndatatype = \"INT32\"\ndims = [1]\n\
         [dynamic_batching]\n{batching}"
    )
}

/// The hostile plugin's `slow` mode: one request at a time, `delay_ms` each.
fn slow_batched(delay_ms: u64, batching: &str) -> String {
    format!(
        "backend = \"wasm\"\nmax_batch_size = 0\n\
         [[input]]\nname = \"INPUT0\"\ndatatype = \"INT32\"\ndims = [1]\n\
         [[output]]\nname = \"OUTPUT0\"\ndatatype = \"BYTES\"\ndims = [1]\n\
         [parameters]\nattack = \"slow\"\ndelay_ms = {delay_ms}\n\
         [dynamic_batching]\n{batching}"
    )
}

fn one(value: i32) -> Value {
    json!({"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "INT32", "data": [value]}]})
}

/// Sends `n` requests at once from threads; returns the replies in send order.
fn concurrently(server: &Arc<Server>, model: &str, bodies: Vec<Value>) -> Vec<Value> {
    let handles: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let (server, model) = (server.clone(), model.to_string());
            std::thread::spawn(move || server.infer(&model, &body).ok())
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn a_preferred_batch_size_is_dispatched_when_it_forms() {
    let repo = TestRepo::new();
    // A long delay: only reaching the preferred size can dispatch early.
    repo.add(
        "m",
        &identity_batched(
            8,
            "preferred_batch_size = [4]\nmax_queue_delay_us = 30000000\n",
        ),
        "wisp_plugin_identity",
        &[1],
    );
    let server = Arc::new(Server::start(repo.path(), &[]));
    let replies = concurrently(&server, "m", (0..4).map(one).collect());
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(
            reply["outputs"][0]["data"],
            json!([i as i32]),
            "each request gets its own output"
        );
    }
    assert_eq!(server.batch_stats("m"), vec![(4, 1)]);
    let stats = server.get("/v2/models/m/stats").ok();
    assert_eq!(stats["model_stats"][0]["execution_count"], 1);
    assert_eq!(stats["model_stats"][0]["inference_count"], 4);
}

#[test]
fn batches_are_cut_at_max_batch_size() {
    let repo = TestRepo::new();
    repo.add(
        "m",
        &identity_batched(4, "max_queue_delay_us = 30000000\n"),
        "wisp_plugin_identity",
        &[1],
    );
    let server = Arc::new(Server::start(repo.path(), &[]));
    concurrently(&server, "m", (0..8).map(one).collect());
    assert_eq!(server.batch_stats("m"), vec![(4, 2)]);
}

#[test]
fn the_max_delay_sends_a_partial_batch() {
    let repo = TestRepo::new();
    repo.add(
        "m",
        &identity_batched(
            8,
            "preferred_batch_size = [4]\nmax_queue_delay_us = 200000\n",
        ),
        "wisp_plugin_identity",
        &[1],
    );
    let server = Server::start(repo.path(), &[]);
    assert_eq!(
        server.infer("m", &one(7)).ok()["outputs"][0]["data"],
        json!([7])
    );
    assert_eq!(server.batch_stats("m"), vec![(1, 1)]);
    let config = server.get("/v2/models/m/config").ok();
    assert_eq!(
        config["dynamic_batching"]["max_queue_delay_microseconds"],
        200000
    );
    assert_eq!(
        config["dynamic_batching"]["preferred_batch_size"],
        json!([4])
    );
}

/// Sends `body` to `model` in the background and returns the thread's handle.
fn send(
    server: &Arc<Server>,
    model: &str,
    body: Value,
) -> std::thread::JoinHandle<(u16, String, std::time::Instant)> {
    let (server, model) = (server.clone(), model.to_string());
    std::thread::spawn(move || {
        let reply = server.infer(&model, &body);
        (
            reply.status,
            String::from_utf8_lossy(&reply.body).into_owned(),
            std::time::Instant::now(),
        )
    })
}

fn with_priority(priority: u64) -> Value {
    json!({"parameters": {"priority": priority},
           "inputs": [{"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [1]}]})
}

#[test]
fn higher_priority_requests_go_first() {
    let repo = TestRepo::new();
    repo.add(
        "slow",
        &slow_batched(400, "priority_levels = 2\ndefault_priority_level = 2\n"),
        "wisp_test_hostile",
        &[1],
    );
    let server = Arc::new(Server::start(repo.path(), &[]));
    // The first request occupies the only instance; the others queue behind it.
    let busy = send(&server, "slow", with_priority(2));
    std::thread::sleep(Duration::from_millis(150));
    let low = send(&server, "slow", with_priority(2));
    std::thread::sleep(Duration::from_millis(50));
    let high = send(&server, "slow", with_priority(1));
    let (busy, low, high) = (
        busy.join().unwrap(),
        low.join().unwrap(),
        high.join().unwrap(),
    );
    for (status, body, _) in [&busy, &low, &high] {
        assert_eq!(*status, 200, "{body}");
    }
    assert!(
        high.2 < low.2,
        "the priority-1 request, sent last, finished after the priority-2 one"
    );
    let e = server.infer("slow", &with_priority(3)).error(400);
    assert!(e.contains("priority") && e.contains("1 to 2"), "{e}");
}

#[test]
fn a_full_queue_answers_503_at_once() {
    let repo = TestRepo::new();
    repo.add(
        "slow",
        &slow_batched(
            600,
            "[dynamic_batching.default_queue_policy]\nmax_queue_size = 1\n",
        ),
        "wisp_test_hostile",
        &[1],
    );
    let server = Arc::new(Server::start(repo.path(), &[]));
    let body =
        json!({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [1]}]});
    let running = send(&server, "slow", body.clone());
    std::thread::sleep(Duration::from_millis(200));
    let queued = send(&server, "slow", body.clone());
    std::thread::sleep(Duration::from_millis(100));
    let e = server.infer("slow", &body).error(503);
    assert!(
        e.contains("queue") && e.contains("full") && e.contains("max_queue_size"),
        "{e}"
    );
    assert_eq!(running.join().unwrap().0, 200);
    assert_eq!(queued.join().unwrap().0, 200);
}

#[test]
fn queue_timeouts_reject_and_can_be_overridden() {
    let repo = TestRepo::new();
    repo.add(
        "slow",
        &slow_batched(500, "[dynamic_batching.default_queue_policy]\ntimeout_us = 100000\nallow_timeout_override = true\n"),
        "wisp_test_hostile",
        &[1],
    );
    let server = Arc::new(Server::start(repo.path(), &[]));
    let body =
        json!({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [1]}]});
    let running = send(&server, "slow", body.clone());
    std::thread::sleep(Duration::from_millis(150));
    // Waits behind the running request longer than its 100 ms timeout.
    let e = server.infer("slow", &body).error(503);
    assert!(e.contains("timed out in the queue"), "{e}");
    assert_eq!(running.join().unwrap().0, 200);
    // A request's own timeout (µs) replaces the policy's when the policy allows it.
    let running = send(&server, "slow", body.clone());
    std::thread::sleep(Duration::from_millis(150));
    let mut patient = body.clone();
    patient["parameters"] = json!({"timeout": 5_000_000});
    server.infer("slow", &patient).ok();
    assert_eq!(running.join().unwrap().0, 200);
}

/// `wisp perf -i grpc --shared-memory system`: every request served from registered
/// regions over gRPC; the regions are unregistered and removed afterwards.
#[test]
fn wisp_perf_over_grpc_with_system_shared_memory() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &["--allow-client-shm", "true"]);
    let out = tempfile::tempdir().unwrap();
    let csv = out.path().join("perf.csv");
    let perf = |protocol: &str, url: &str, shm: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_wisp"))
            .args(["perf", "-m", "simple", "-i", protocol, "-u", url])
            .args(["--shared-memory", shm, "--concurrency-range", "2"])
            .args(["--measurement-interval", "200", "--max-trials", "3"])
            .arg("-f")
            .arg(&csv)
            .output()
            .unwrap()
    };
    let http = server.base.trim_start_matches("http://");
    for (protocol, url, shm) in [
        ("grpc", server.grpc.as_str(), "system"),
        ("grpc", server.grpc.as_str(), "none"),
        ("http", http, "system"),
    ] {
        let output = perf(protocol, url, shm);
        let what = format!("-i {protocol} --shared-memory {shm}");
        assert!(
            output.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = std::fs::read_to_string(&csv).unwrap();
        let row: Vec<&str> = text.lines().nth(1).unwrap().split(',').collect();
        assert!(row[9].parse::<u64>().unwrap() > 0, "{what}: {text}");
        assert_eq!(row[10], "0", "{what}: errors: {text}");
        assert!(
            row[8].parse::<f64>().unwrap() > 0.0,
            "{what}: server compute: {text}"
        );
    }
    assert_eq!(server.get("/v2/systemsharedmemory/status").ok(), json!([]));
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("wisp_perf_"))
        .collect();
    assert!(left.is_empty(), "regions left in /dev/shm: {left:?}");

    // A server that does not allow client shared memory: a clear error, nothing left.
    let strict = Server::start(repo.path(), &[]);
    let output = perf("grpc", &strict.grpc, "system");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--allow-client-shm"), "{stderr}");
    let output = perf("http", strict.base.trim_start_matches("http://"), "cuda");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--shared-memory cuda"));
}

#[test]
fn wisp_perf_writes_csv_and_plot() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &[]);
    let out = tempfile::tempdir().unwrap();
    let (csv, svg) = (out.path().join("perf.csv"), out.path().join("perf.svg"));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_wisp"))
        .args([
            "perf",
            "-m",
            "simple",
            "-u",
            server.base.trim_start_matches("http://"),
        ])
        .args([
            "--concurrency-range",
            "1:2:1",
            "--measurement-interval",
            "200",
            "--max-trials",
            "3",
        ])
        .arg("-f")
        .arg(&csv)
        .arg("--plot")
        .arg(&svg)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "Concurrency,Inferences/Second,Client Send+Recv avg (us),p50 latency,p90 latency,p95 latency,p99 latency,Server Queue (us),Server Compute (us),Requests,Errors,Stable"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0][0], rows[1][0]), ("1", "2"));
    for row in &rows {
        assert!(row[1].parse::<f64>().unwrap() > 0.0, "{row:?}");
        assert!(row[9].parse::<u64>().unwrap() > 0, "{row:?}");
        assert_eq!(row[10], "0", "errors: {row:?}");
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.starts_with("<svg") && plot.matches("<circle").count() == 2,
        "{plot}"
    );
    // Open-loop load from a perf_analyzer data file.
    let data = out.path().join("data.json");
    let values: Vec<i32> = (0..16).collect();
    std::fs::write(
        &data,
        json!({"data": [{"INPUT0": values, "INPUT1": {"content": values, "shape": [16]}}]})
            .to_string(),
    )
    .unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_wisp"))
        .args([
            "perf",
            "-m",
            "simple",
            "-u",
            server.base.trim_start_matches("http://"),
        ])
        .args([
            "--request-rate-range",
            "50",
            "--measurement-interval",
            "200",
            "--max-trials",
            "3",
        ])
        .arg("--input-data")
        .arg(&data)
        .arg("-f")
        .arg(&csv)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.starts_with("Request Rate,Inferences/Second"), "{text}");
    let row: Vec<&str> = text.lines().nth(1).unwrap().split(',').collect();
    assert_eq!((row[0], row[10]), ("50", "0"), "{text}");
    // An unknown model is a clear error.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wisp"))
        .args([
            "perf",
            "-m",
            "nothing",
            "-u",
            server.base.trim_start_matches("http://"),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Request for unknown model: 'nothing'")
    );
}

#[test]
fn preserve_ordering_answers_in_arrival_order() {
    let repo = TestRepo::new();
    let two_instances = "[[instance_group]]\ncount = 2\n";
    for (name, ordered) in [("unordered", false), ("ordered", true)] {
        let config = format!(
            "{}preserve_ordering = {ordered}\n{two_instances}",
            slow_batched(300, "")
        );
        repo.add(name, &config, "wisp_test_hostile", &[1]);
    }
    let server = Arc::new(Server::start(repo.path(), &[]));
    let scaled = |scale: i32| json!({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [scale]}]});
    for (model, ordered) in [("unordered", false), ("ordered", true)] {
        // A runs three times as long as B, on the other instance.
        let a = send(&server, model, scaled(3));
        std::thread::sleep(Duration::from_millis(100));
        let b = send(&server, model, scaled(1));
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        assert_eq!((a.0, b.0), (200, 200), "{} {}", a.1, b.1);
        if ordered {
            // B is held until A's response is ready, then both go out together; which
            // client thread wakes first is up to the OS, so allow a few ms. Without
            // ordering B would be ~500 ms ahead.
            assert!(
                a.2 <= b.2 + Duration::from_millis(50),
                "{model}: B was answered {:?} before A",
                a.2 - b.2
            );
        } else {
            assert!(b.2 < a.2, "{model}: B should finish first without ordering");
        }
    }
}
