//! The trace extension: spans exported over OTLP/HTTP to a receiver the test runs on
//! loopback (decoded with the OpenTelemetry protos), the client's W3C trace context
//! followed, and the settings read and changed over HTTP and gRPC.

use crate::harness::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::{status::StatusCode, Span};
use prost::Message;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An OTLP/HTTP receiver: answers every POST with 200 and keeps the decoded spans, with
/// the service name of their resource.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let sink = sink.clone();
                std::thread::spawn(move || serve(stream, sink));
            }
        });
        Receiver { url, spans }
    }

    /// Waits until `count` spans arrived (the exporter sends batches on a timer).
    fn wait_for(&self, count: usize) -> Vec<(String, Span)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans.lock().unwrap().clone();
            if spans.len() >= count || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// HTTP/1.1 requests on one connection, keep-alive, bodies by Content-Length.
fn serve(stream: std::net::TcpStream, sink: Arc<Mutex<Vec<(String, Span)>>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    sink.lock().unwrap().push((service.clone(), span));
                }
            }
        }
        let _ = writer.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        );
    }
}

fn start_traced(repo: &TestRepo, receiver: &Receiver, settings: &[&str]) -> Server {
    let url = format!("opentelemetry,url={}", receiver.url);
    let mut args = vec![
        "--trace-config",
        url.as_str(),
        "--trace-config",
        "opentelemetry,bsp_schedule_delay=50",
    ];
    for setting in settings {
        args.extend(["--trace-config", setting]);
    }
    Server::start(repo.path(), &args)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

fn events(span: &Span) -> Vec<(&str, u64)> {
    span.events
        .iter()
        .map(|e| (e.name.as_str(), e.time_unix_nano))
        .collect()
}

fn named<'a>(spans: &'a [(String, Span)], name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == name)
        .collect()
}

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn an_http_request_with_a_trace_context_exports_its_spans_under_the_clients_span() {
    let repo = TestRepo::new();
    repo.simple();
    let receiver = Receiver::start();
    // rate=0: only requests that carry a trace context are traced.
    let server = start_traced(&repo, &receiver, &["level=TIMESTAMPS", "rate=0"]);
    let untraced = simple_request(&ramp(), &ramp());
    server.infer("simple", &untraced).ok();
    let mut body = simple_request(&ramp(), &ramp());
    body["id"] = json!("request-7");
    // The client's flags say "not sampled": wisp traces it all the same (its own rate
    // decides, and a client's context is always followed).
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-00");
    let reply = server.post_bytes(
        "/v2/models/simple/infer",
        &[
            ("traceparent", traceparent.as_str()),
            ("content-type", "application/json"),
        ],
        body.to_string().as_bytes(),
    );
    reply.ok();

    let spans = receiver.wait_for(3);
    assert_eq!(spans.len(), 3, "root, model and compute spans: {spans:#?}");
    assert!(spans.iter().all(|(service, _)| service == "wisp"));
    let root = named(&spans, "InferRequest")[0];
    let model = named(&spans, "simple")[0];
    let compute = named(&spans, "compute")[0];
    for span in [root, model, compute] {
        assert_eq!(hex(&span.trace_id), TRACE_ID, "{}", span.name);
        assert!(span.start_time_unix_nano <= span.end_time_unix_nano);
    }
    assert_eq!(hex(&root.parent_span_id), CLIENT_SPAN);
    assert_eq!(model.parent_span_id, root.span_id);
    assert_eq!(compute.parent_span_id, model.span_id);
    assert_eq!(
        attribute(root, "triton.request_id").as_deref(),
        Some("request-7")
    );
    assert_eq!(
        attribute(model, "triton.model_name").as_deref(),
        Some("simple")
    );
    assert_eq!(
        attribute(model, "triton.model_version").as_deref(),
        Some("1")
    );

    let names = |span: &Span| {
        events(span)
            .iter()
            .map(|e| e.0.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(root),
        ["HTTP_RECV_START", "HTTP_RECV_END", "HTTP_SEND_START"]
    );
    assert_eq!(
        names(model),
        ["REQUEST_START", "QUEUE_START", "REQUEST_END"]
    );
    assert_eq!(
        names(compute),
        [
            "COMPUTE_START",
            "COMPUTE_INPUT_END",
            "COMPUTE_OUTPUT_START",
            "COMPUTE_END"
        ]
    );
    // Each span's timestamps are in order, and within its parent.
    for span in [root, model, compute] {
        let times: Vec<u64> = events(span).iter().map(|e| e.1).collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "{}: {times:?}",
            span.name
        );
    }
    assert!(root.start_time_unix_nano <= model.start_time_unix_nano);
    assert!(model.end_time_unix_nano <= root.end_time_unix_nano);
    assert!(model.start_time_unix_nano <= compute.start_time_unix_nano);
    assert!(compute.end_time_unix_nano <= model.end_time_unix_nano);
}

#[test]
fn ensemble_steps_are_children_of_the_ensembles_span_and_failures_are_errors() {
    let repo = TestRepo::new();
    repo.simple();
    let config = std::fs::read_to_string(
        workspace_root().join("model_repository/ensemble_add_sub/config.toml"),
    )
    .unwrap();
    std::fs::create_dir_all(repo.path().join("ensemble_add_sub/1")).unwrap();
    repo.write_config("ensemble_add_sub", &config);
    let receiver = Receiver::start();
    let server = start_traced(&repo, &receiver, &["level=TIMESTAMPS", "rate=1"]);
    server
        .infer("ensemble_add_sub", &simple_request(&ramp(), &ramp()))
        .ok();
    // InferRequest, the ensemble's span, and a model and a compute span per step.
    let spans = receiver.wait_for(6);
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let ensemble = named(&spans, "ensemble_add_sub")[0];
    let steps = named(&spans, "simple");
    assert_eq!(steps.len(), 2);
    for step in &steps {
        assert_eq!(step.parent_span_id, ensemble.span_id);
        assert_eq!(step.trace_id, ensemble.trace_id);
    }
    assert_eq!(
        named(&spans, "compute").len(),
        2,
        "the ensemble has no compute span"
    );

    // A request the model refuses: its spans carry the error.
    let bad = json!({"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 3], "data": [1, 2, 3]}]});
    server.infer("simple", &bad).error(400);
    let spans = receiver.wait_for(8);
    let failed: Vec<&Span> = spans[6..].iter().map(|(_, s)| s).collect();
    assert_eq!(
        failed.len(),
        2,
        "root and model spans, no compute: {failed:#?}"
    );
    for span in failed {
        let status = span.status.as_ref().unwrap();
        assert_eq!(status.code, StatusCode::Error as i32);
        assert!(status.message.contains("INPUT0"), "{}", status.message);
    }
}

#[test]
fn settings_change_what_is_traced_per_model_and_over_grpc() {
    let repo = TestRepo::new();
    repo.simple();
    repo.simple_string();
    let receiver = Receiver::start();
    let server = start_traced(&repo, &receiver, &[]);
    let global = server.get("/v2/trace/setting").ok();
    assert_eq!(
        global,
        json!({"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1",
               "log_frequency": "0", "trace_file": "", "trace_mode": "opentelemetry"})
    );
    assert!(server.get("/v2").ok()["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("trace")));

    // simple is traced at every request, twice at most; the rest stays off.
    let model = server
        .post_json(
            "/v2/models/simple/trace/setting",
            &json!({"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": 2}),
        )
        .ok();
    assert_eq!(model["trace_level"], json!(["TIMESTAMPS"]));
    assert_eq!(model["trace_count"], "2");
    assert_eq!(
        server.get("/v2/trace/setting").ok()["trace_level"],
        json!(["OFF"])
    );
    for _ in 0..4 {
        server
            .infer("simple", &simple_request(&ramp(), &ramp()))
            .ok();
    }
    let strings: Vec<String> = (0..16).map(|v| v.to_string()).collect();
    let string_request = json!({"inputs": [
        {"name": "INPUT0", "datatype": "BYTES", "shape": [1, 16], "data": strings},
        {"name": "INPUT1", "datatype": "BYTES", "shape": [1, 16], "data": strings}]});
    server.infer("simple_string", &string_request).ok();
    let spans = receiver.wait_for(6);
    std::thread::sleep(Duration::from_millis(300)); // nothing more may come
    let spans_now = receiver.spans.lock().unwrap().len();
    assert_eq!(
        (spans.len(), spans_now),
        (6, 6),
        "two traces of 3 spans: {spans:#?}"
    );
    assert_eq!(named(&spans, "simple").len(), 2);
    let model = server.get("/v2/models/simple/trace/setting").ok();
    assert_eq!(model["trace_count"], "0", "the count is what remains");

    // Bad settings are refused whole, with the setting named; unknown models are 400.
    let e = server
        .post_json(
            "/v2/trace/setting",
            &json!({"trace_level": ["TIMESTAMPS"], "trace_rate": "often"}),
        )
        .error(400);
    assert!(e.contains("trace_rate"), "{e}");
    assert_eq!(
        server.get("/v2/trace/setting").ok()["trace_level"],
        json!(["OFF"])
    );
    let e = server
        .post_json("/v2/trace/setting", &json!({"trace_file": "/tmp/t.json"}))
        .error(400);
    assert!(e.contains("trace_file"), "{e}");
    let e = server.get("/v2/models/nope/trace/setting").error(400);
    assert!(e.contains("nope"), "{e}");

    // Over gRPC: clearing simple's settings (an empty value) returns it to the global ones.
    runtime().block_on(async {
        use wisp::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
        use wisp::grpc::pb::{trace_setting_request::SettingValue, TraceSettingRequest};
        let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
            .await
            .unwrap();
        let clear = |key: &str| (key.to_string(), SettingValue { value: vec![] });
        let response = client
            .trace_setting(TraceSettingRequest {
                settings: [
                    clear("trace_level"),
                    clear("trace_rate"),
                    clear("trace_count"),
                ]
                .into(),
                model_name: "simple".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.settings["trace_level"].value, ["OFF"]);
        assert_eq!(response.settings["trace_rate"].value, ["1000"]);
        let set = |key: &str, value: &str| {
            (
                key.to_string(),
                SettingValue {
                    value: vec![value.into()],
                },
            )
        };
        let response = client
            .trace_setting(TraceSettingRequest {
                settings: [set("trace_level", "TIMESTAMPS"), set("trace_rate", "1")].into(),
                model_name: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.settings["trace_level"].value, ["TIMESTAMPS"]);
        let refused = client
            .trace_setting(TraceSettingRequest {
                settings: [set("trace_level", "LOUD")].into(),
                model_name: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("LOUD"), "{}", refused.message());
    });
    // Globally on now: a gRPC request is traced too, with its own root span events.
    runtime().block_on(async {
        use wisp::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
        let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
            .await
            .unwrap();
        client
            .model_infer(crate::grpc::simple_infer(16))
            .await
            .unwrap();
    });
    let spans = receiver.wait_for(9);
    let root = spans[6..]
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "InferRequest")
        .expect("a root span for the gRPC request");
    let names: Vec<&str> = events(root).iter().map(|e| e.0).collect();
    assert_eq!(names, ["GRPC_RECV_END", "GRPC_SEND_START"]);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_bad_trace_config_stops_startup_with_the_entry_named() {
    let repo = TestRepo::new();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wisp"))
        .args(["serve", "--model-repository"])
        .arg(repo.path())
        .args([
            "--http-port",
            "0",
            "--metrics-port",
            "0",
            "--grpc-port",
            "0",
        ])
        .args(["--trace-config", "triton,file=/tmp/trace.json"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--trace-config triton,file=/tmp/trace.json"),
        "{stderr}"
    );
}
