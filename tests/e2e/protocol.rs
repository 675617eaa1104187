//! The v2 protocol and Triton's extensions, against `simple`-shaped models.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::Write;

fn simple_server() -> (TestRepo, Server) {
    let repo = TestRepo::new();
    repo.simple();
    repo.simple_string();
    let server = Server::start(repo.path(), &[]);
    (repo, server)
}

#[test]
fn health_and_server_metadata() {
    let (_repo, server) = simple_server();
    assert_eq!(server.get("/v2/health/live").status, 200);
    assert_eq!(server.get("/v2/health/ready").status, 200);
    let meta = server.get("/v2").ok();
    assert_eq!(meta["name"], "wisp");
    let extensions: Vec<&str> = meta["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    for e in [
        "binary_tensor_data",
        "model_repository",
        "statistics",
        "model_configuration",
        "parameters",
    ] {
        assert!(extensions.contains(&e), "{e} missing from {extensions:?}");
    }
}

#[test]
fn model_metadata_config_and_readiness() {
    let (_repo, server) = simple_server();
    let meta = server.get("/v2/models/simple").ok();
    assert_eq!(meta["name"], "simple");
    assert_eq!(meta["versions"], json!(["1"]));
    assert_eq!(
        meta["inputs"][0],
        json!({"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]})
    );
    assert_eq!(meta["outputs"][1]["name"], "OUTPUT1");
    assert_eq!(
        server.get("/v2/models/simple/versions/1").ok()["name"],
        "simple"
    );

    let config = server.get("/v2/models/simple/config").ok();
    assert_eq!(config["max_batch_size"], 8);
    assert_eq!(config["backend"], "wasm");
    assert_eq!(config["input"][1]["data_type"], "TYPE_INT32");
    assert_eq!(config["input"][1]["dims"], json!([16]));
    assert_eq!(config["instance_group"][0]["kind"], "KIND_CPU");
    let string_config = server.get("/v2/models/simple_string/config").ok();
    assert_eq!(string_config["output"][0]["data_type"], "TYPE_STRING");

    assert_eq!(server.get("/v2/models/simple/ready").status, 200);
    assert_eq!(server.get("/v2/models/simple/versions/1/ready").status, 200);
    assert_eq!(server.get("/v2/models/simple/versions/2/ready").status, 404);
    assert_eq!(server.get("/v2/models/nothing/ready").status, 404);
}

#[test]
fn infer_json() {
    let (_repo, server) = simple_server();
    let a = ramp();
    let b = vec![3; 16];
    let mut body = simple_request(&a, &b);
    body["id"] = json!("req-7");
    let reply = server.infer("simple", &body).ok();
    assert_eq!(reply["id"], "req-7");
    assert_eq!(reply["model_name"], "simple");
    assert_eq!(reply["model_version"], "1");
    let sum: Vec<i32> = a.iter().map(|x| x + 3).collect();
    let diff: Vec<i32> = a.iter().map(|x| x - 3).collect();
    assert_eq!(
        reply["outputs"][0],
        json!({"name": "OUTPUT0", "datatype": "INT32", "shape": [1, 16], "data": sum})
    );
    assert_eq!(reply["outputs"][1]["data"], json!(diff));

    // Nested data, batch 2, only OUTPUT1 requested.
    let body = json!({
        "inputs": [
            {"name": "INPUT0", "shape": [2, 16], "datatype": "INT32", "data": [a, a]},
            {"name": "INPUT1", "shape": [2, 16], "datatype": "INT32", "data": [b, b]},
        ],
        "outputs": [{"name": "OUTPUT1"}]
    });
    let reply = server.infer("simple", &body).ok();
    assert_eq!(reply["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(reply["outputs"][0]["shape"], json!([2, 16]));
    assert_eq!(reply["outputs"][0]["data"].as_array().unwrap().len(), 32);

    let strings: Vec<String> = a.iter().map(|v| v.to_string()).collect();
    let ones: Vec<String> = vec!["1".into(); 16];
    let body = json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "BYTES", "data": strings},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "BYTES", "data": ones},
    ]});
    let reply = server.infer("simple_string", &body).ok();
    let expected: Vec<String> = a.iter().map(|v| (v + 1).to_string()).collect();
    assert_eq!(reply["outputs"][0]["data"], json!(expected));
}

#[test]
fn infer_binary_tensors() {
    let (_repo, server) = simple_server();
    let a = ramp();
    let b: Vec<i32> = (0..16).map(|v| v * 10).collect();
    let header = json!({
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}},
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": true}}, {"name": "OUTPUT1", "parameters": {"binary_data": false}}]
    });
    let (body, len) = binary_body(&header, &[&i32_bytes(&a), &i32_bytes(&b)]);
    let reply = server.post_bytes(
        "/v2/models/simple/infer",
        &[
            ("Inference-Header-Content-Length", &len),
            ("Content-Type", "application/octet-stream"),
        ],
        &body,
    );
    assert_eq!(reply.status, 200);
    let (json, binary) = split_binary(&reply);
    assert_eq!(json["outputs"][0]["parameters"]["binary_data_size"], 64);
    assert!(json["outputs"][0].get("data").is_none());
    let sum: Vec<i32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(binary, i32_bytes(&sum));
    let diff: Vec<i32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    assert_eq!(json["outputs"][1]["data"], json!(diff));

    // binary_data_output: every output binary unless overridden.
    let header = json!({
        "parameters": {"binary_data_output": true},
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": a},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": b},
        ],
    });
    let reply = server.post_json("/v2/models/simple/infer", &header);
    let (json, binary) = split_binary(&reply);
    assert_eq!(json["outputs"][1]["parameters"]["binary_data_size"], 64);
    assert_eq!(binary.len(), 128);
    assert_eq!(&binary[..64], &i32_bytes(&sum)[..]);

    // BYTES in binary: 4-byte length prefixes.
    let encode = |items: &[String]| -> Vec<u8> {
        items
            .iter()
            .flat_map(|s| (s.len() as u32).to_le_bytes().into_iter().chain(s.bytes()))
            .collect()
    };
    let sa: Vec<String> = a.iter().map(|v| v.to_string()).collect();
    let sb: Vec<String> = b.iter().map(|v| v.to_string()).collect();
    let (ea, eb) = (encode(&sa), encode(&sb));
    let header = json!({
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "BYTES", "parameters": {"binary_data_size": ea.len()}},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "BYTES", "parameters": {"binary_data_size": eb.len()}},
        ],
        "parameters": {"binary_data_output": true}
    });
    let (body, len) = binary_body(&header, &[&ea, &eb]);
    let reply = server.post_bytes(
        "/v2/models/simple_string/infer",
        &[("Inference-Header-Content-Length", &len)],
        &body,
    );
    let (json, binary) = split_binary(&reply);
    let n0 = json["outputs"][0]["parameters"]["binary_data_size"]
        .as_u64()
        .unwrap() as usize;
    let sums: Vec<String> = sum.iter().map(|v| v.to_string()).collect();
    assert_eq!(&binary[..n0], &encode(&sums)[..]);
}

fn identity_all_types_config() -> String {
    let mut config = String::from("backend = \"wasm\"\nmax_batch_size = 0\n");
    for (i, dt) in ALL_TYPES.iter().enumerate() {
        config.push_str(&format!(
            "[[input]]\nname = \"INPUT{i}\"\ndatatype = \"{dt}\"\ndims = [-1]\n"
        ));
    }
    for (i, dt) in ALL_TYPES.iter().enumerate() {
        config.push_str(&format!(
            "[[output]]\nname = \"OUTPUT{i}\"\ndatatype = \"{dt}\"\ndims = [-1]\n"
        ));
    }
    config
}

const ALL_TYPES: [&str; 14] = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
    "FP32", "FP64", "BF16", "BYTES",
];

/// Three values of a fixed-size type as JSON and as little-endian bytes.
macro_rules! sample_of {
    ($t:ty: $($v:expr),+) => {
        (json!([$($v),+]), [$($v as $t),+].iter().flat_map(|v| v.to_le_bytes()).collect())
    };
}

/// JSON values per datatype, with the little-endian bytes they must become.
fn sample(dt: &str) -> (Value, Vec<u8>) {
    let half_bits = |bits: [u16; 3]| bits.iter().flat_map(|v| v.to_le_bytes()).collect();
    match dt {
        "BOOL" => (json!([true, false, true]), vec![1, 0, 1]),
        "UINT8" => sample_of!(u8: 0, 7, 255),
        "UINT16" => sample_of!(u16: 0, 7, u16::MAX),
        "UINT32" => sample_of!(u32: 0, 7, u32::MAX),
        "UINT64" => sample_of!(u64: 0, 7, u64::MAX),
        "INT8" => sample_of!(i8: i8::MIN, 0, i8::MAX),
        "INT16" => sample_of!(i16: i16::MIN, 0, i16::MAX),
        "INT32" => sample_of!(i32: i32::MIN, 0, i32::MAX),
        "INT64" => sample_of!(i64: i64::MIN, 0, i64::MAX),
        // 1.5, -2.0, 0.25 in IEEE half and bfloat16.
        "FP16" => (
            json!([1.5, -2.0, 0.25]),
            half_bits([0x3e00, 0xc000, 0x3400]),
        ),
        "BF16" => (
            json!([1.5, -2.0, 0.25]),
            half_bits([0x3fc0, 0xc000, 0x3e80]),
        ),
        "FP32" => sample_of!(f32: 1.5, -2.0, 0.25),
        "FP64" => sample_of!(f64: 1.5, -2.0, 1e300),
        "BYTES" => (
            json!(["", "héllo", "x"]),
            [
                &[0u8, 0, 0, 0][..],
                &[6, 0, 0, 0],
                "héllo".as_bytes(),
                &[1, 0, 0, 0],
                b"x",
            ]
            .concat(),
        ),
        other => panic!("no sample for {other}"),
    }
}

#[test]
fn every_datatype_through_json_and_binary() {
    let repo = TestRepo::new();
    repo.add(
        "identity_all",
        &identity_all_types_config(),
        "wisp_plugin_identity",
        &[1],
    );
    let server = Server::start(repo.path(), &[]);

    // JSON in, binary out: the server's encoding of the JSON values is checked byte for byte.
    let inputs: Vec<Value> = ALL_TYPES
        .iter()
        .enumerate()
        .map(|(i, dt)| json!({"name": format!("INPUT{i}"), "shape": [3], "datatype": dt, "data": sample(dt).0}))
        .collect();
    let reply = server.post_json(
        "/v2/models/identity_all/infer",
        &json!({"inputs": inputs, "parameters": {"binary_data_output": true}}),
    );
    let (header, binary) = split_binary(&reply);
    let mut offset = 0;
    for (i, dt) in ALL_TYPES.iter().enumerate() {
        let out = &header["outputs"][i];
        assert_eq!(out["name"], format!("OUTPUT{i}"));
        assert_eq!(out["datatype"], *dt);
        let size = out["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
        assert_eq!(&binary[offset..offset + size], &sample(dt).1[..], "{dt}");
        offset += size;
    }

    // Binary in, JSON out: the server's decoding gives back the JSON values.
    let inputs: Vec<Value> = ALL_TYPES
        .iter()
        .enumerate()
        .map(|(i, dt)| {
            json!({"name": format!("INPUT{i}"), "shape": [3], "datatype": dt,
                   "parameters": {"binary_data_size": sample(dt).1.len()}})
        })
        .collect();
    let samples: Vec<Vec<u8>> = ALL_TYPES.iter().map(|dt| sample(dt).1).collect();
    let parts: Vec<&[u8]> = samples.iter().map(|s| s.as_slice()).collect();
    let (body, len) = binary_body(&json!({"inputs": inputs}), &parts);
    let reply = server.post_bytes(
        "/v2/models/identity_all/infer",
        &[("Inference-Header-Content-Length", &len)],
        &body,
    );
    let json = reply.ok();
    for (i, dt) in ALL_TYPES.iter().enumerate() {
        assert_eq!(json["outputs"][i]["data"], sample(dt).0, "{dt}");
        assert_eq!(json["outputs"][i]["shape"], json!([3]));
    }
}

#[test]
fn raw_binary_body_and_request_parameters() {
    let repo = TestRepo::new();
    repo.add(
        "echo",
        "backend = \"wasm\"\nmax_batch_size = 4\n[[input]]\nname = \"INPUT0\"\ndatatype = \"FP32\"\ndims = [-1]\n\
         [[output]]\nname = \"OUTPUT0\"\ndatatype = \"FP32\"\ndims = [-1]\n",
        "wisp_plugin_identity",
        &[1],
    );
    let server = Server::start(repo.path(), &[]);
    let data: Vec<u8> = [1.0f32, 2.0, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let reply = server.post_bytes(
        "/v2/models/echo/infer",
        &[("Inference-Header-Content-Length", "0")],
        &data,
    );
    let (header, binary) = split_binary(&reply);
    assert_eq!(header["outputs"][0]["shape"], json!([1, 3]));
    assert_eq!(binary, data);
    let reply = server.post_bytes(
        "/v2/models/echo/infer",
        &[("Inference-Header-Content-Length", "0")],
        &data[..5],
    );
    assert!(reply.error(400).contains("5 bytes"));

    let body = json!({
        "parameters": {"tenant": "acme", "top_k": 3, "strict": true, "temperature": 0.5},
        "inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [4.0]}]
    });
    let reply = server.infer("echo", &body).ok();
    assert_eq!(
        reply["parameters"],
        json!({"tenant": "acme", "top_k": 3, "strict": true, "temperature": 0.5})
    );
}

#[test]
fn compressed_bodies() {
    let (_repo, server) = simple_server();
    let body = serde_json::to_vec(&simple_request(&ramp(), &ramp())).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&body).unwrap();
    let reply = server.post_bytes(
        "/v2/models/simple/infer",
        &[("Content-Encoding", "gzip")],
        &gz.finish().unwrap(),
    );
    assert_eq!(reply.ok()["outputs"][0]["data"][15], 30);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&body).unwrap();
    let reply = server.post_bytes(
        "/v2/models/simple/infer",
        &[("Content-Encoding", "deflate")],
        &z.finish().unwrap(),
    );
    assert_eq!(reply.ok()["outputs"][1]["data"][15], 0);
    let reply = server.post_bytes(
        "/v2/models/simple/infer",
        &[("Content-Encoding", "gzip")],
        b"not gzip at all",
    );
    assert!(reply.error(400).contains("gzip"));
    let reply = server.post_bytes(
        "/v2/models/simple/infer",
        &[("Content-Encoding", "br")],
        &body,
    );
    assert!(reply.error(400).contains("Content-Encoding"));
}

#[test]
fn error_paths_name_what_is_wrong() {
    let (_repo, server) = simple_server();
    let ok = simple_request(&ramp(), &ramp());

    // Triton's answer for an unknown model or version, which its clients' examples check.
    assert_eq!(
        server.infer("nothing", &ok).error(400),
        "Request for unknown model: 'nothing' is not found"
    );
    assert_eq!(
        server
            .post_json("/v2/models/simple/versions/9/infer", &ok)
            .error(400),
        "Request for unknown model: 'simple' version 9 is not found"
    );
    assert!(server.get("/v2/bogus").error(404).contains("/v2/bogus"));
    assert_eq!(server.get("/v2/models/simple/infer").status, 405);

    let short = simple_request(&[1; 15], &[1; 15]);
    let e = server.infer("simple", &short).error(400);
    assert!(e.contains("INPUT0") && e.contains("[1, 15]"), "{e}");

    let mut wrong_type = ok.clone();
    wrong_type["inputs"][0]["datatype"] = json!("FP32");
    let e = server.infer("simple", &wrong_type).error(400);
    assert!(
        e.contains("INPUT0") && e.contains("FP32") && e.contains("INT32"),
        "{e}"
    );

    let mut missing = ok.clone();
    missing["inputs"].as_array_mut().unwrap().pop();
    assert!(server
        .infer("simple", &missing)
        .error(400)
        .contains("missing input 'INPUT1'"));

    let mut unexpected = ok.clone();
    unexpected["inputs"][1]["name"] = json!("INPUT9");
    assert!(server
        .infer("simple", &unexpected)
        .error(400)
        .contains("INPUT9"));

    let big: Vec<Vec<i32>> = vec![ramp(); 9];
    let too_big = json!({"inputs": [
        {"name": "INPUT0", "shape": [9, 16], "datatype": "INT32", "data": big},
        {"name": "INPUT1", "shape": [9, 16], "datatype": "INT32", "data": big},
    ]});
    let e = server.infer("simple", &too_big).error(400);
    assert!(e.contains("batch size 9") && e.contains("1 to 8"), "{e}");

    let mut count_mismatch = ok.clone();
    count_mismatch["inputs"][0]["shape"] = json!([1, 17]);
    assert!(server
        .infer("simple", &count_mismatch)
        .error(400)
        .contains("INPUT0"));

    let mut bad_value = ok.clone();
    bad_value["inputs"][0]["data"][3] = json!("three");
    assert!(server
        .infer("simple", &bad_value)
        .error(400)
        .contains("element 3"));

    let mut unknown_type = ok.clone();
    unknown_type["inputs"][0]["datatype"] = json!("INT33");
    assert!(server
        .infer("simple", &unknown_type)
        .error(400)
        .contains("INT33"));

    let malformed = server.post_bytes("/v2/models/simple/infer", &[], b"{\"inputs\": [");
    assert!(malformed.error(400).contains("JSON"));
    let no_shape = json!({"inputs": [{"name": "INPUT0", "datatype": "INT32", "data": [1]}]});
    assert!(server
        .infer("simple", &no_shape)
        .error(400)
        .contains("shape"));

    // Binary sizes must match the shape and the body.
    let header = json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 60}},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}},
    ]});
    let (body, len) = binary_body(&header, &[&[0u8; 60], &[0u8; 64]]);
    let e = server
        .post_bytes(
            "/v2/models/simple/infer",
            &[("Inference-Header-Content-Length", &len)],
            &body,
        )
        .error(400);
    assert!(e.contains("INPUT0") && e.contains("60"), "{e}");
    let (body, len) = binary_body(&header, &[&[0u8; 10]]);
    let e = server
        .post_bytes(
            "/v2/models/simple/infer",
            &[("Inference-Header-Content-Length", &len)],
            &body,
        )
        .error(400);
    assert!(e.contains("binary_data_size"), "{e}");
    let e = server
        .post_bytes(
            "/v2/models/simple/infer",
            &[("Inference-Header-Content-Length", "99999")],
            b"{}",
        )
        .error(400);
    assert!(e.contains("Inference-Header-Content-Length"), "{e}");

    // A plugin's own error reaches the client with its message.
    let strings: Vec<String> = (0..16)
        .map(|i| if i == 4 { "four".into() } else { i.to_string() })
        .collect();
    let body = json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "BYTES", "data": strings},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "BYTES", "data": strings},
    ]});
    assert!(server
        .infer("simple_string", &body)
        .error(400)
        .contains("INPUT0[4]"));

    // The server still answers.
    assert_eq!(server.infer("simple", &ok).status, 200);
}

#[test]
fn body_size_cap() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &["--http-max-body-bytes", "2048"]);
    let big = json!({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": ramp()}],
                     "padding": "x".repeat(4000)});
    let e = server.infer("simple", &big).error(413);
    assert!(e.contains("2048"), "{e}");
    // A small gzip body that inflates past the cap is refused too.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b' '; 1 << 20]).unwrap();
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 2048);
    assert_eq!(
        server
            .post_bytes(
                "/v2/models/simple/infer",
                &[("Content-Encoding", "gzip")],
                &bomb
            )
            .status,
        413
    );
    assert_eq!(
        server
            .infer("simple", &simple_request(&ramp(), &ramp()))
            .status,
        200
    );
}

#[test]
fn statistics_and_metrics() {
    let (_repo, server) = simple_server();
    for _ in 0..3 {
        server
            .infer("simple", &simple_request(&ramp(), &ramp()))
            .ok();
    }
    let two = json!({"inputs": [
        {"name": "INPUT0", "shape": [2, 16], "datatype": "INT32", "data": [ramp(), ramp()]},
        {"name": "INPUT1", "shape": [2, 16], "datatype": "INT32", "data": [ramp(), ramp()]},
    ]});
    server.infer("simple", &two).ok();
    server
        .infer("simple", &simple_request(&[1; 3], &[1; 3]))
        .error(400);

    let stats = server.get("/v2/models/simple/stats").ok();
    let s = &stats["model_stats"][0];
    assert_eq!(s["name"], "simple");
    assert_eq!(s["version"], "1");
    assert_eq!(s["inference_count"], 5);
    assert_eq!(s["execution_count"], 4);
    assert_eq!(s["inference_stats"]["success"]["count"], 4);
    assert_eq!(s["inference_stats"]["fail"]["count"], 1);
    assert!(
        s["inference_stats"]["compute_infer"]["ns"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(s["last_inference"].as_u64().unwrap() > 0);
    let batches = s["batch_stats"].as_array().unwrap();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0]["batch_size"], 1);
    assert_eq!(batches[0]["compute_infer"]["count"], 3);
    assert_eq!(batches[1]["batch_size"], 2);

    let all = server.get("/v2/models/stats").ok();
    let names: Vec<&str> = all["model_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["simple", "simple_string"]);
    assert_eq!(
        server.get("/v2/models/simple/versions/1/stats").ok()["model_stats"][0]["inference_count"],
        5
    );
    assert_eq!(server.get("/v2/models/nothing/stats").status, 400);
    assert_eq!(server.get("/v2/bogus").status, 404);

    let text = server.metrics_text();
    let has = |line: &str| text.lines().any(|l| l == line);
    assert!(
        has("nv_inference_request_success{model=\"simple\",version=\"1\"} 4"),
        "{text}"
    );
    assert!(has("nv_inference_request_failure{model=\"simple\",reason=\"invalid_argument\",version=\"1\"} 1"), "{text}");
    assert!(
        has("nv_inference_count{model=\"simple\",version=\"1\"} 5"),
        "{text}"
    );
    assert!(
        has("nv_inference_exec_count{model=\"simple\",version=\"1\"} 4"),
        "{text}"
    );
    assert!(
        // Successes only (the failure is counted by reason above).
        has("wisp_inference_request_duration_seconds_count{model=\"simple\",version=\"1\"} 4"),
        "{text}"
    );
    assert!(
        has("wisp_model_ready{model=\"simple\",version=\"1\"} 1"),
        "{text}"
    );
    for counter in [
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
    ] {
        assert!(
            text.contains(&format!("{counter}{{model=\"simple\",version=\"1\"}}")),
            "{counter}: {text}"
        );
    }
    assert!(text.contains(
        "wisp_inference_queue_duration_seconds_bucket{model=\"simple\",version=\"1\",le=\"0.001\"}"
    ));
    // Every answer of the HTTP port is timed by status code (the metrics port's own are not).
    let answered = |code: &str| -> u64 {
        let prefix = format!("wisp_http_request_duration_seconds_count{{code=\"{code}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(answered("200") >= 7, "{text}"); // 4 inferences, 3 statistics requests
    assert!(answered("400") >= 1 && answered("404") >= 1, "{text}");
}

#[test]
fn the_plugin_template_runs_as_documented() {
    let repo = TestRepo::new();
    let config =
        std::fs::read_to_string(workspace_root().join("plugins/template/config.toml")).unwrap();
    repo.add("scale", &config, "wisp_plugin_template", &[1]);
    let server = Server::start(repo.path(), &[]);
    let body = json!({"inputs": [{"name": "INPUT0", "shape": [2, 2], "datatype": "FP32", "data": [1.0, 2.0, -4.0, 0.5]}]});
    let reply = server.infer("scale", &body).ok();
    assert_eq!(reply["outputs"][0]["data"], json!([2.5, 5.0, -10.0, 1.25]));
    // Its init logged through the host, tagged with the model.
    assert!(
        server.log().contains("scale v1 ready: factor 2.5, 1 files"),
        "{}",
        server.log()
    );
}
