//! What a client or a model folder cannot do to the server: each test
//! reproduces an attack from the production review and checks it is contained.

use crate::harness::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Reads until the server closes the connection (or `limit` passes); returns
/// what was read and whether it closed.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&all).into_owned(), true),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&all).into_owned(), true)
            }
            Err(_) => return (String::from_utf8_lossy(&all).into_owned(), false),
        }
    }
}

/// The attack: idle sockets (HTTP/1, h2c that never sends) and idle metrics
/// connections stayed open forever.
#[test]
fn idle_connections_are_closed_on_both_ports() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &["--http-idle-timeout-secs", "1"]);
    let mut http = TcpStream::connect(server.http_addr()).unwrap();
    let mut h2c = TcpStream::connect(server.http_addr()).unwrap();
    h2c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    let mut metrics = TcpStream::connect(server.metrics_addr()).unwrap();
    for stream in [&mut http, &mut h2c, &mut metrics] {
        let (_, closed) = read_until_closed(stream, Duration::from_secs(20));
        assert!(closed, "an idle connection stayed open");
    }
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
}

/// The attack: a body trickled byte by byte held its connection and memory.
#[test]
fn a_trickled_body_is_cut_off_with_408() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &["--http-body-timeout-secs", "1"]);
    let mut stream = TcpStream::connect(server.http_addr()).unwrap();
    write!(
        stream,
        "POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{\"inputs\""
    )
    .unwrap();
    let started = Instant::now();
    let (reply, _) = read_until_closed(&mut stream, Duration::from_secs(20));
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("--http-body-timeout-secs"), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// The attack: 1000 idle connections were all kept; now past the cap a new
/// connection is closed at once, and the server keeps serving.
#[test]
fn connections_past_the_cap_are_closed() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &["--http-max-connections", "4"]);
    let held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(server.http_addr()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(server.http_addr()).unwrap();
    let (_, closed) = read_until_closed(&mut extra, Duration::from_secs(10));
    assert!(closed, "a connection past the cap was kept");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
}

/// The attack: several large JSON bodies at once took gigabytes. The server-wide
/// budget of body bytes in flight refuses the excess with 503 before reading it.
#[test]
fn bodies_past_the_in_flight_budget_get_503() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &["--http-max-inflight-bytes", "65536"]);
    let mut body = serde_json::to_vec(&simple_request(&ramp(), &ramp())).unwrap();
    body.resize(100_000, b' ');
    let reply = server.post_bytes("/v2/models/simple/infer", &[], &body);
    let message = reply.error(503);
    assert!(message.contains("--http-max-inflight-bytes"), "{message}");
    // A request within the budget still runs, and health answers.
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
    assert_eq!(server.get("/v2/health/live").status, 200);
}

fn encoder_model(repo: &TestRepo, name: &str, config_json: &serde_json::Value, weights: &[u8]) {
    let dir = repo.path().join(name);
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        "backend = \"encoder\"\nmax_batch_size = 4\n\
         [[input]]\nname = \"input_ids\"\ndatatype = \"INT64\"\ndims = [-1]\n\
         [[output]]\nname = \"embedding\"\ndatatype = \"FP32\"\ndims = [8]\n\
         [parameters]\nhead = \"embedding\"\nthreads = 1\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("1/config.json"),
        serde_json::to_vec(config_json).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("1/model.safetensors"), weights).unwrap();
}

fn tiny_bert_config() -> serde_json::Value {
    json!({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
           "vocab_size": 32, "max_position_embeddings": 16, "type_vocab_size": 2})
}

/// A tiny BERT in safetensors format (the format is an 8-byte header length,
/// a JSON header and little-endian data), with deterministic weights.
fn tiny_bert_weights() -> Vec<u8> {
    let (h, i, v, p) = (8usize, 16usize, 32usize, 16usize);
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![v, h]),
        ("embeddings.position_embeddings.weight".into(), vec![p, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    let layer = "encoder.layer.0.";
    for (name, shape) in [
        ("attention.self.query", vec![h, h]),
        ("attention.self.key", vec![h, h]),
        ("attention.self.value", vec![h, h]),
        ("attention.output.dense", vec![h, h]),
        ("intermediate.dense", vec![i, h]),
        ("output.dense", vec![h, i]),
    ] {
        let out = shape[0];
        tensors.push((format!("{layer}{name}.weight"), shape));
        tensors.push((format!("{layer}{name}.bias"), vec![out]));
    }
    for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
        tensors.push((format!("{layer}{norm}.weight"), vec![h]));
        tensors.push((format!("{layer}{norm}.bias"), vec![h]));
    }
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (k, (name, shape)) in tensors.iter().enumerate() {
        let count: usize = shape.iter().product();
        let start = data.len();
        for j in 0..count {
            let value = if name.contains("LayerNorm.weight") {
                1.0f32
            } else {
                (((k * 31 + j * 7) % 13) as f32 - 6.0) / 20.0
            };
            data.extend_from_slice(&value.to_le_bytes());
        }
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut header = serde_json::to_vec(&header).unwrap();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(&data);
    file
}

fn ids_request() -> serde_json::Value {
    json!({"inputs": [{"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [2, 5, 7, 3]}]})
}

/// The attack: `"num_hidden_layers": 1000000000` in config.json aborted the
/// process on a 608 GB allocation. Now the model fails its load naming the key.
#[test]
fn absurd_checkpoint_sizes_fail_the_load_by_key() {
    let repo = TestRepo::new();
    repo.simple();
    let mut config = tiny_bert_config();
    config["num_hidden_layers"] = json!(1_000_000_000u64);
    encoder_model(&repo, "layers", &config, &tiny_bert_weights());
    let mut config = tiny_bert_config();
    config["vocab_size"] = json!(-1);
    encoder_model(&repo, "vocab", &config, &tiny_bert_weights());
    let server = Server::start(repo.path(), &["--strict-readiness", "false"]);
    let reason = server.index_reason("layers");
    assert!(reason.contains("'num_hidden_layers'"), "{reason}");
    let reason = server.index_reason("vocab");
    assert!(reason.contains("'vocab_size'"), "{reason}");
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
}

/// The attack: overwriting model.safetensors in place (cp, rsync --inplace,
/// truncation) while the model served killed the process with SIGBUS, because
/// weights were used straight from a memory map. Weights are a private copy now.
#[test]
fn weights_changed_in_place_do_not_crash_the_server() {
    let repo = TestRepo::new();
    encoder_model(&repo, "tiny", &tiny_bert_config(), &tiny_bert_weights());
    let server = Server::start(repo.path(), &[]);
    let before = server.infer("tiny", &ids_request()).ok();
    let weights = repo.path().join("tiny/1/model.safetensors");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(16)
        .unwrap();
    let after = server.infer("tiny", &ids_request()).ok();
    assert_eq!(before["outputs"], after["outputs"]);
    assert_eq!(server.get("/v2/health/live").status, 200);
}

/// The attack: `checkpoint = "../../other"` read a checkpoint outside the model's folder.
#[test]
fn checkpoint_paths_stay_inside_the_version_folder() {
    let repo = TestRepo::new();
    encoder_model(&repo, "tiny", &tiny_bert_config(), &tiny_bert_weights());
    let dir = repo.path().join("escape");
    std::fs::create_dir_all(dir.join("1")).unwrap();
    let config = std::fs::read_to_string(repo.path().join("tiny/config.toml"))
        .unwrap()
        .replace("threads = 1", "threads = 1\ncheckpoint = \"../../tiny/1\"");
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let server = Server::start(repo.path(), &["--strict-readiness", "false"]);
    let reason = server.index_reason("escape");
    assert!(reason.contains("'parameters.checkpoint'"), "{reason}");
    server.infer("tiny", &ids_request()).ok();
}

/// Inputs read from system shared memory take server memory as bodies do: they count
/// against the in-flight budget (503 past it), and a region the client shrinks after
/// registering fails the request, not the server.
#[test]
fn shared_memory_inputs_count_against_the_in_flight_budget() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(
        repo.path(),
        &[
            "--allow-client-shm",
            "true",
            "--http-max-inflight-bytes",
            "65536",
        ],
    );
    let shm_object = ShmObject::new("wisp-e2e", 1 << 20);
    let (object, path) = (shm_object.name.clone(), shm_object.path.clone());
    let register = json!({"key": format!("/{object}"), "byte_size": 1 << 20});
    let registered = server.post_json("/v2/systemsharedmemory/region/big/register", &register);
    assert_eq!(
        registered.status,
        200,
        "{}",
        String::from_utf8_lossy(&registered.body)
    );
    let in_region = |byte_size: u64| {
        json!({"inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32",
             "parameters": {"shared_memory_region": "big", "shared_memory_byte_size": byte_size}},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": vec![0; 16]}
        ]})
    };
    // 128 KiB from shared memory is over the 64 KiB budget: refused before it is read.
    let error = server.infer("simple", &in_region(128 << 10)).error(503);
    assert!(error.contains("--http-max-inflight-bytes"), "{error}");
    // 64 bytes fit, and are checked against the shape.
    let reply = server.infer("simple", &in_region(64)).ok();
    assert_eq!(reply["outputs"][0]["data"], json!(vec![0; 16]));
    // The client shrinks its object: the request fails with a reason, the server lives.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(8)
        .unwrap();
    let error = server.infer("simple", &in_region(64)).error(400);
    assert!(error.contains("was its object truncated"), "{error}");
    assert_eq!(server.get("/v2/health/live").status, 200);
}

/// The attack: shared-memory regions are mapped, and a mapping faults (SIGBUS) where
/// its object no longer reaches, so a client that shrinks its object while the server
/// copies from or into it would kill the server. Here a client shrinks and regrows
/// its object while 8 MiB inputs and outputs are copied: every request either works
/// or fails naming the truncation, and the server lives.
#[test]
fn a_client_truncating_its_region_during_copies_cannot_fault_the_server() {
    const HALF: u64 = 8 << 20;
    let repo = TestRepo::new();
    repo.add(
        "identity_fp32",
        r#"backend = "wasm"
max_batch_size = 0
[[input]]
name = "INPUT0"
datatype = "FP32"
dims = [-1]
[[output]]
name = "OUTPUT0"
datatype = "FP32"
dims = [-1]
[sandbox]
memory_limit_mib = 128
max_output_mib = 16
"#,
        "wisp_plugin_identity",
        &[1],
    );
    let server = Server::start(
        repo.path(),
        &[
            "--allow-client-shm",
            "true",
            "--http-max-body-bytes",
            "33554432",
        ],
    );
    let shm_object = ShmObject::new("wisp-e2e-race", 2 * HALF as usize);
    let (object, path) = (shm_object.name.clone(), shm_object.path.clone());
    // Registering checks the object's size, which the shrinker below changes: retried.
    let register = || {
        let body = json!({"key": format!("/{object}"), "byte_size": 2 * HALF});
        for _ in 0..200 {
            let reply = server.post_json("/v2/systemsharedmemory/region/r/register", &body);
            if reply.status == 200 {
                return;
            }
            assert!(reply.error(400).contains("has 4096 bytes"));
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the region could not be registered again");
    };
    register();
    let request = json!({
        "inputs": [{"name": "INPUT0", "shape": [HALF / 4], "datatype": "FP32",
                    "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": HALF}}],
        "outputs": [{"name": "OUTPUT0",
                     "parameters": {"shared_memory_region": "r", "shared_memory_offset": HALF,
                                    "shared_memory_byte_size": HALF}}]
    });
    assert_eq!(server.infer("identity_fp32", &request).status, 200);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shrinker = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && rounds < 2000 {
                file.set_len(4096).unwrap();
                std::thread::sleep(Duration::from_micros(200));
                file.set_len(2 * HALF).unwrap();
                std::thread::sleep(Duration::from_micros(200 + 100 * (rounds % 50)));
                rounds += 1;
            }
        })
    };
    let (mut worked, mut truncated) = (0, 0);
    for _ in 0..40 {
        let reply = server.infer("identity_fp32", &request);
        if reply.status == 200 {
            worked += 1;
            continue;
        }
        let error = reply.error(400);
        assert!(error.contains("was its object truncated"), "{error}");
        truncated += 1;
        // A region that faulted stays unusable until it is registered again.
        server.post_json("/v2/systemsharedmemory/region/r/unregister", &json!({}));
        register();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    shrinker.join().unwrap();
    let faults = server
        .log()
        .matches("shrank under the server's copy")
        .count();
    eprintln!(
        "{worked} requests worked, {truncated} failed naming the truncation, {faults} of them during a copy"
    );
    assert_eq!(server.get("/v2/health/live").status, 200);
    // With the object whole again, the region (registered afresh) serves requests.
    server.post_json("/v2/systemsharedmemory/region/r/unregister", &json!({}));
    register();
    assert_eq!(server.infer("identity_fp32", &request).status, 200);
}
