//! gRPC overhead of wisp against the ceiling of tonic on this machine.
//!
//! Sends the same `simple` ModelInfer (two INT32[1,16] inputs in raw_input_contents)
//! to `wisp serve`'s gRPC port and to a bare tonic server of the same service whose
//! ModelInfer echoes the inputs back as the outputs (a zero-cost model), both as
//! separate processes on loopback, with the same load generator (one HTTP/2
//! connection per concurrent client): p50/p90/p99 latency and throughput.
//!
//!     scripts/build-plugins.sh && cargo bench --bench grpc
//!
//! Environment: WISP_BENCH_SECS (measured seconds per step, default 5),
//! WISP_BENCH_CONCURRENCY (default "1,64"), WISP_BENCH_ROUNDS (default 1).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};
use wisp::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use wisp::grpc::pb::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use wisp::grpc::pb::model_infer_request::InferInputTensor;
use wisp::grpc::pb::model_infer_response::InferOutputTensor;
use wisp::grpc::pb::{ModelInferRequest, ModelInferResponse};

mod support;

use support::LoadResult;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("echo-server") {
        echo_server();
        return;
    }
    let sweep = support::Sweep::from_env();
    let repo = support::simple_repository();

    let (mut wisp, wisp_addr) = support::start_wisp_grpc(repo.path());
    let (mut echo, echo_addr) = spawn_echo();
    let servers = [
        ("wisp simple (gRPC)".to_string(), wisp_addr),
        ("bare tonic echo".to_string(), echo_addr),
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    sweep.run(
        "simple over gRPC (raw contents)",
        &servers,
        |addr, concurrency, duration, warm_up| {
            runtime.block_on(run_load(addr, concurrency, duration, warm_up))
        },
    );
    let _ = wisp.kill();
    let _ = echo.kill();
}

fn simple_request() -> ModelInferRequest {
    let input = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "INT32".into(),
        shape: vec![1, 16],
        parameters: HashMap::new(),
        contents: None,
    };
    let raw: Vec<u8> = (0..16i32).flat_map(|v| v.to_le_bytes()).collect();
    ModelInferRequest {
        model_name: "simple".into(),
        inputs: vec![input("INPUT0"), input("INPUT1")],
        raw_input_contents: vec![raw.clone().into(), raw.into()],
        ..Default::default()
    }
}

/// `concurrency` clients, each on its own connection, sending the next ModelInfer when
/// the last answer arrived; only those that finish after `warmup` and within
/// `duration` count.
async fn run_load(
    addr: &str,
    concurrency: usize,
    duration: Duration,
    warmup: Duration,
) -> LoadResult {
    let start = Instant::now() + warmup;
    let end = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let url = format!("http://{addr}");
        tasks.push(tokio::spawn(async move {
            let mut client = GrpcInferenceServiceClient::connect(url).await.unwrap();
            let request = simple_request();
            let (mut latencies, mut errors) = (Vec::new(), 0);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let ok = match client.model_infer(request.clone()).await {
                    Ok(response) => response.into_inner().raw_output_contents.len() == 2,
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

fn spawn_echo() -> (Child, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("echo-server")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("echo="))
        .expect("the echo server printed its address");
    (child, line["echo=".len()..].to_string())
}

/// The ceiling: tonic serving the same service, whose ModelInfer returns the inputs
/// as outputs without looking at them.
#[derive(Clone, Copy)]
struct Echo;

#[tonic::async_trait]
impl GrpcInferenceService for Echo {
    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let request = request.into_inner();
        let outputs = request
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| InferOutputTensor {
                name: format!("OUTPUT{i}"),
                datatype: input.datatype.clone(),
                shape: input.shape.clone(),
                parameters: HashMap::new(),
                contents: None,
            })
            .collect();
        Ok(Response::new(ModelInferResponse {
            model_name: request.model_name,
            model_version: "1".into(),
            id: request.id,
            parameters: HashMap::new(),
            outputs,
            raw_output_contents: request.raw_input_contents,
        }))
    }
}

fn echo_server() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("echo={}", listener.local_addr().unwrap());
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(GrpcInferenceServiceServer::new(Echo))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
}
