//! `wisp perf`: a load generator in the manner of Triton's perf_analyzer.
//!
//! For each concurrency level it keeps that many requests in flight (one
//! keep-alive connection each: HTTP/1.1, or HTTP/2 with `-i grpc`), measures
//! windows until throughput is stable, and reports latency percentiles,
//! throughput and the server's own queue/compute split (from the model's
//! statistics before and after), as a table, CSV and an SVG plot of latency
//! against throughput. With `--shared-memory system` tensors travel in POSIX
//! shared-memory regions instead of the requests, as perf_analyzer's do.

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
    /// Server address, `host:port` (an `http://` prefix is accepted); default
    /// 127.0.0.1:8000, or 127.0.0.1:8001 with `-i grpc`.
    #[arg(short = 'u', long)]
    pub url: Option<String>,
    /// Protocol (perf_analyzer's `-i`): `http`, or `grpc` (Triton's GRPCInferenceService;
    /// metadata, statistics and shared-memory registration go over it too).
    #[arg(short = 'i', long = "protocol", value_enum, default_value_t = Protocol::Http)]
    pub protocol: Protocol,
    /// Where tensors travel: `none` (in the requests) or `system` (POSIX shared-memory
    /// regions, written once, that the server reads inputs from and writes outputs into;
    /// the server needs --allow-client-shm true). `cuda` is refused.
    #[arg(long = "shared-memory", value_enum, default_value_t = SharedMemory::None)]
    pub shared_memory: SharedMemory,
    /// Bytes of each output's shared-memory region (with `--shared-memory system`).
    #[arg(long = "output-shared-memory-size", default_value_t = 102_400)]
    pub output_shm_bytes: usize,
    /// Concurrency levels, `start:end:step` (perf_analyzer's syntax).
    #[arg(long, default_value = "1:1:1")]
    pub concurrency_range: String,
    /// Request rates per second, `start:end:step`: open-loop load instead of concurrency.
    #[arg(long, conflicts_with = "concurrency_range")]
    pub request_rate_range: Option<String>,
    /// Batch size of each request (models with max_batch_size > 0).
    #[arg(short = 'b', long, default_value_t = 1)]
    pub batch_size: u64,
    /// `zero` or `random` input values, or a perf_analyzer JSON data file
    /// (`{"data": [{"INPUT0": [..], "INPUT1": {"content": [..], "shape": [..]}}]}`).
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
    /// Also measure this model (repeatable), with the same inputs, at each load level in
    /// turn with the main one (side by side, so drift on a shared machine hits all alike);
    /// a table each, and one curve each in the plot.
    #[arg(long = "compare")]
    pub compare: Vec<String>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedMemory {
    None,
    System,
    Cuda,
}

/// One concurrency level's results.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// The concurrency of a closed-loop step (0 for a request-rate step).
    pub concurrency: usize,
    /// The offered rate of an open-loop step (0 for a concurrency step).
    pub request_rate: f64,
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

/// POSTs `body` to `path`; anything but 200 is an error with the server's answer.
async fn post_ok(addr: &str, path: &str, body: Bytes) -> Result<()> {
    let mut conn = Connection::open(addr).await?;
    let (status, reply) = conn.send("POST", path, &[], body).await?;
    if status != 200 {
        bail!("{status} {}", String::from_utf8_lossy(&reply));
    }
    Ok(())
}

/// An HTTP request body, and the JSON header's length when tensors follow it in binary.
type Body = (Bytes, Option<usize>);

/// One request as it is sent, again and again.
#[derive(Clone)]
enum Prepared {
    Http(Body),
    #[cfg(feature = "grpc")]
    Grpc(Box<wisp::grpc::pb::ModelInferRequest>),
}

/// One input of a request: its values (for JSON) and its bytes (binary, gRPC, shm).
struct InputTensor {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    values: Value,
    data: Vec<u8>,
}

/// The values of one input: given in a perf_analyzer data file, or generated.
fn input_values(datatype: &str, count: usize, random: bool) -> Vec<Value> {
    (0..count)
        .map(|_| {
            let n: i64 = if random { fastrand::i64(0..100) } else { 0 };
            match datatype {
                "BYTES" => json!(n.to_string()),
                "BOOL" => json!(n % 2 == 1),
                "FP16" | "BF16" | "FP32" | "FP64" => json!(n as f64),
                _ => json!(n),
            }
        })
        .collect()
}

/// The inputs of each request: one per entry of a perf_analyzer `--input-data`
/// file (`{"data": [{"INPUT0": [..] | {"content": [..], "shape": [..]}}]}`), or
/// one of zero or random values shaped from the model's metadata.
fn build_entries(meta: &Value, args: &PerfArgs, batched: bool) -> Result<Vec<Vec<InputTensor>>> {
    let entries: Vec<Option<Value>> = match args.input_data.as_str() {
        "random" | "zero" => vec![None],
        path => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("--input-data {path}: not zero, random or a readable file")
            })?;
            let file: Value =
                serde_json::from_str(&text).with_context(|| format!("{path} is not JSON"))?;
            let data = file["data"]
                .as_array()
                .filter(|d| !d.is_empty())
                .ok_or_else(|| {
                    anyhow!("{path}: expected {{\"data\": [ {{input: values}}, ... ]}}")
                })?;
            data.iter().cloned().map(Some).collect()
        }
    };
    let random = args.input_data == "random";
    let mut requests = Vec::new();
    for entry in entries {
        let mut inputs = Vec::new();
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
            let given = entry.as_ref().map(|e| &e[name]);
            let given_shape: Option<Vec<i64>> = given
                .and_then(|g| g.get("shape"))
                .and_then(|s| serde_json::from_value(s.clone()).ok());
            let dims: Vec<i64> = if batched {
                declared[1..].to_vec()
            } else {
                declared.clone()
            };
            let dims = match (
                given_shape,
                args.shapes
                    .iter()
                    .find_map(|s| s.strip_prefix(&format!("{name}:"))),
            ) {
                (Some(shape), _) => shape,
                (None, Some(text)) => text
                    .split(',')
                    .map(|d| d.trim().parse::<i64>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .with_context(|| format!("--shape {name}:{text} is not a list of integers"))?,
                (None, None) if dims.contains(&-1) => {
                    bail!("input '{name}' has variable dimensions {dims:?}; give them with --shape {name}:d1,d2")
                }
                (None, None) => dims,
            };
            let shape: Vec<i64> = if batched {
                std::iter::once(args.batch_size as i64)
                    .chain(dims)
                    .collect()
            } else {
                dims
            };
            let count: usize = shape.iter().map(|&d| d.max(0) as usize).product();
            let values = match given {
                Some(Value::Null) | None if entry.is_some() => {
                    bail!("--input-data: an entry has no values for input '{name}'")
                }
                Some(Value::Object(o)) => o.get("content").cloned().unwrap_or(Value::Null),
                Some(v) => v.clone(),
                None => Value::Array(input_values(datatype, count, random)),
            };
            let dt = wisp_core::tensor::DataType::parse(datatype)
                .ok_or_else(|| anyhow!("input '{name}' has unknown datatype {datatype}"))?;
            let tensor = wisp_core::tensor::Tensor::from_json(name, dt, shape.clone(), &values)
                .map_err(|e| anyhow!("input '{name}': {}", e.message))?;
            inputs.push(InputTensor {
                name: name.to_string(),
                datatype: datatype.to_string(),
                shape,
                values,
                data: tensor.data.to_vec(),
            });
        }
        requests.push(inputs);
    }
    Ok(requests)
}

/// Where one request's tensors are in shared memory: a region per input, and a region
/// (with its size) per output.
struct ShmPlacement<'a> {
    inputs: &'a [String],
    outputs: &'a [(String, String, usize)],
}

/// An HTTP body: JSON, the binary extension, or only region names with shared memory.
fn http_body(inputs: &[InputTensor], json: bool, shm: Option<ShmPlacement<'_>>) -> Body {
    let mut header_inputs = Vec::new();
    let mut binary = Vec::new();
    for (i, t) in inputs.iter().enumerate() {
        let (name, datatype, shape) = (&t.name, &t.datatype, &t.shape);
        header_inputs.push(match &shm {
            Some(shm) => json!({"name": name, "datatype": datatype, "shape": shape,
                "parameters": {"shared_memory_region": shm.inputs[i],
                               "shared_memory_byte_size": t.data.len()}}),
            None if json => json!({"name": name, "datatype": datatype, "shape": shape,
                                   "data": t.values}),
            None => {
                binary.extend_from_slice(&t.data);
                json!({"name": name, "datatype": datatype, "shape": shape,
                       "parameters": {"binary_data_size": t.data.len()}})
            }
        });
    }
    let mut header = json!({"inputs": header_inputs});
    match &shm {
        Some(shm) => {
            header["outputs"] = shm
                .outputs
                .iter()
                .map(|(name, region, size)| {
                    json!({"name": name, "parameters": {"shared_memory_region": region,
                                                        "shared_memory_byte_size": size}})
                })
                .collect();
        }
        None => header["parameters"] = json!({"binary_data_output": !json}),
    }
    let mut body = serde_json::to_vec(&header).expect("JSON");
    if binary.is_empty() {
        (Bytes::from(body), None)
    } else {
        let header_len = body.len();
        body.extend_from_slice(&binary);
        (Bytes::from(body), Some(header_len))
    }
}

/// A gRPC `ModelInferRequest`: raw input contents, or region names with shared memory.
#[cfg(feature = "grpc")]
fn grpc_request(
    model: &str,
    version: Option<u64>,
    inputs: &[InputTensor],
    shm: Option<ShmPlacement<'_>>,
) -> wisp::grpc::pb::ModelInferRequest {
    use std::collections::HashMap;
    use wisp::grpc::pb::infer_parameter::ParameterChoice;
    use wisp::grpc::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
    use wisp::grpc::pb::{InferParameter, ModelInferRequest};
    let region = |name: &str, size: usize| -> HashMap<String, InferParameter> {
        let p = |choice| InferParameter {
            parameter_choice: Some(choice),
        };
        HashMap::from([
            (
                "shared_memory_region".to_string(),
                p(ParameterChoice::StringParam(name.to_string())),
            ),
            (
                "shared_memory_byte_size".to_string(),
                p(ParameterChoice::Int64Param(size as i64)),
            ),
        ])
    };
    let tensors = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| InferInputTensor {
            name: t.name.clone(),
            datatype: t.datatype.clone(),
            shape: t.shape.clone(),
            parameters: match &shm {
                Some(shm) => region(&shm.inputs[i], t.data.len()),
                None => HashMap::new(),
            },
            contents: None,
        })
        .collect();
    ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.map(|v| v.to_string()).unwrap_or_default(),
        inputs: tensors,
        outputs: shm
            .as_ref()
            .map(|shm| {
                shm.outputs
                    .iter()
                    .map(|(name, r, size)| InferRequestedOutputTensor {
                        name: name.clone(),
                        parameters: region(r, *size),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        raw_input_contents: match shm {
            Some(_) => vec![],
            None => inputs.iter().map(|t| Bytes::from(t.data.clone())).collect(),
        },
        ..Default::default()
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)] as f64 / 1e3
}

#[cfg(feature = "grpc")]
type GrpcClient = wisp::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient<
    tonic::transport::Channel,
>;

#[cfg(feature = "grpc")]
async fn grpc_connect(addr: &str) -> Result<GrpcClient> {
    Ok(GrpcClient::connect(format!("http://{addr}"))
        .await
        .with_context(|| format!("connecting to the gRPC port {addr}"))?
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// The server's control calls (metadata, config, statistics, shared-memory regions) over
/// the protocol being measured.
enum Api {
    Http {
        addr: String,
        base: String,
    },
    #[cfg(feature = "grpc")]
    Grpc {
        addr: String,
        client: GrpcClient,
        model: String,
        version: String,
    },
}

#[cfg(feature = "grpc")]
fn grpc_error(what: &str) -> impl Fn(tonic::Status) -> anyhow::Error + '_ {
    move |status| anyhow!("{what}: {}", status.message())
}

impl Api {
    async fn connect(args: &PerfArgs) -> Result<Api> {
        let default = match args.protocol {
            Protocol::Http => "127.0.0.1:8000",
            Protocol::Grpc => "127.0.0.1:8001",
        };
        let addr = args
            .url
            .as_deref()
            .unwrap_or(default)
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        match args.protocol {
            Protocol::Http => Ok(Api::Http {
                addr,
                base: match args.version {
                    Some(v) => format!("/v2/models/{}/versions/{v}", args.model),
                    None => format!("/v2/models/{}", args.model),
                },
            }),
            #[cfg(feature = "grpc")]
            Protocol::Grpc => Ok(Api::Grpc {
                client: grpc_connect(&addr).await?,
                addr,
                model: args.model.clone(),
                version: args.version.map(|v| v.to_string()).unwrap_or_default(),
            }),
            #[cfg(not(feature = "grpc"))]
            Protocol::Grpc => bail!("this build of wisp has no gRPC client (cargo feature `grpc`)"),
        }
    }

    /// The model's metadata in the HTTP front's JSON shape (`inputs`/`outputs` with
    /// name, datatype, shape), and whether it batches.
    async fn model(&mut self) -> Result<(Value, bool)> {
        match self {
            Api::Http { addr, base } => {
                let meta = get_json(addr, base).await?;
                let config = get_json(addr, &format!("{base}/config")).await?;
                Ok((meta, config["max_batch_size"].as_u64().unwrap_or(0) > 0))
            }
            #[cfg(feature = "grpc")]
            Api::Grpc {
                client,
                model,
                version,
                ..
            } => {
                use wisp::grpc::pb::{ModelConfigRequest, ModelMetadataRequest};
                let meta = client
                    .model_metadata(ModelMetadataRequest {
                        name: model.clone(),
                        version: version.clone(),
                    })
                    .await
                    .map_err(grpc_error("ModelMetadata"))?
                    .into_inner();
                let config = client
                    .model_config(ModelConfigRequest {
                        name: model.clone(),
                        version: version.clone(),
                    })
                    .await
                    .map_err(grpc_error("ModelConfig"))?
                    .into_inner();
                let tensors = |ts: Vec<wisp::grpc::pb::model_metadata_response::TensorMetadata>| {
                    ts.into_iter()
                        .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
                        .collect::<Vec<_>>()
                };
                let batched = config.config.is_some_and(|c| c.max_batch_size > 0);
                Ok((
                    json!({"inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)}),
                    batched,
                ))
            }
        }
    }

    /// Server-side (queue ns, compute ns, request count) from the model's statistics.
    async fn totals(&mut self) -> Result<(u64, u64, u64)> {
        match self {
            Api::Http { addr, base } => {
                let stats = get_json(addr, &format!("{base}/stats")).await?;
                let s = &stats["model_stats"][0]["inference_stats"];
                let ns = |k: &str| s[k]["ns"].as_u64().unwrap_or(0);
                Ok((
                    ns("queue"),
                    ns("compute_input") + ns("compute_infer") + ns("compute_output"),
                    s["success"]["count"].as_u64().unwrap_or(0),
                ))
            }
            #[cfg(feature = "grpc")]
            Api::Grpc {
                client,
                model,
                version,
                ..
            } => {
                let stats = client
                    .model_statistics(wisp::grpc::pb::ModelStatisticsRequest {
                        name: model.clone(),
                        version: version.clone(),
                    })
                    .await
                    .map_err(grpc_error("ModelStatistics"))?
                    .into_inner();
                let s = stats
                    .model_stats
                    .first()
                    .and_then(|m| m.inference_stats)
                    .unwrap_or_default();
                let ns = |d: Option<wisp::grpc::pb::StatisticDuration>| d.map_or(0, |d| d.ns);
                Ok((
                    ns(s.queue),
                    ns(s.compute_input) + ns(s.compute_infer) + ns(s.compute_output),
                    s.success.map_or(0, |d| d.count),
                ))
            }
        }
    }

    async fn register(&mut self, name: &str, key: &str, size: usize) -> Result<()> {
        match self {
            Api::Http { addr, .. } => {
                let body = json!({"key": key, "offset": 0, "byte_size": size}).to_string();
                post_ok(
                    addr,
                    &format!("/v2/systemsharedmemory/region/{name}/register"),
                    Bytes::from(body),
                )
                .await
                .with_context(|| format!("registering shared-memory region '{name}'"))
            }
            #[cfg(feature = "grpc")]
            Api::Grpc { client, .. } => {
                client
                    .system_shared_memory_register(
                        wisp::grpc::pb::SystemSharedMemoryRegisterRequest {
                            name: name.into(),
                            key: key.into(),
                            offset: 0,
                            byte_size: size as u64,
                        },
                    )
                    .await
                    .map_err(grpc_error("registering a shared-memory region"))?;
                Ok(())
            }
        }
    }

    async fn unregister(&mut self, name: &str) -> Result<()> {
        match self {
            Api::Http { addr, .. } => post_ok(
                addr,
                &format!("/v2/systemsharedmemory/region/{name}/unregister"),
                Bytes::new(),
            )
            .await
            .with_context(|| format!("unregistering shared-memory region '{name}'")),
            #[cfg(feature = "grpc")]
            Api::Grpc { client, .. } => {
                client
                    .system_shared_memory_unregister(
                        wisp::grpc::pb::SystemSharedMemoryUnregisterRequest { name: name.into() },
                    )
                    .await
                    .map_err(grpc_error("unregistering a shared-memory region"))?;
                Ok(())
            }
        }
    }

    /// What opens the workers' connections.
    fn connector(&self) -> Connector {
        match self {
            Api::Http { addr, base } => Connector::Http {
                addr: addr.clone(),
                path: format!("{base}/infer"),
            },
            #[cfg(feature = "grpc")]
            Api::Grpc { addr, .. } => Connector::Grpc { addr: addr.clone() },
        }
    }

    /// A new connection for one worker.
    async fn sender(&self) -> Result<Sender> {
        self.connector().open().await
    }
}

#[derive(Clone)]
enum Connector {
    Http {
        addr: String,
        path: String,
    },
    #[cfg(feature = "grpc")]
    Grpc {
        addr: String,
    },
}

impl Connector {
    async fn open(&self) -> Result<Sender> {
        match self {
            Connector::Http { addr, path } => Ok(Sender::Http {
                conn: Some(Connection::open(addr).await?),
                addr: addr.clone(),
                path: path.clone(),
            }),
            #[cfg(feature = "grpc")]
            Connector::Grpc { addr } => Ok(Sender::Grpc(grpc_connect(addr).await?)),
        }
    }
}

/// One worker's connection.
enum Sender {
    Http {
        conn: Option<Connection>,
        addr: String,
        path: String,
    },
    #[cfg(feature = "grpc")]
    Grpc(GrpcClient),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http { conn, .. } => conn.as_ref().is_none_or(|c| c.sender.is_closed()),
            #[cfg(feature = "grpc")]
            Sender::Grpc(_) => false,
        }
    }

    /// Sends one request (reopening an HTTP connection after a failure); whether it
    /// succeeded.
    async fn send(&mut self, request: &Prepared) -> bool {
        match (self, request) {
            (Sender::Http { conn, addr, path }, Prepared::Http(body)) => {
                if conn.as_ref().is_none_or(|c| c.sender.is_closed()) {
                    *conn = Connection::open(addr).await.ok();
                }
                match conn.as_mut() {
                    Some(c) => matches!(
                        c.send("POST", path, &headers_for(body.1), body.0.clone())
                            .await,
                        Ok((200, _))
                    ),
                    None => false,
                }
            }
            #[cfg(feature = "grpc")]
            (Sender::Grpc(client), Prepared::Grpc(message)) => {
                client.model_infer(message.as_ref().clone()).await.is_ok()
            }
            #[cfg(feature = "grpc")]
            _ => false,
        }
    }
}

/// The shared-memory regions of a run (perf_analyzer's layout): one per input of each
/// request, written once, and one per output, which every request writes into. The
/// objects are removed from /dev/shm when this is dropped; `release` also unregisters.
struct ShmRegions {
    /// (region name, /dev/shm path)
    regions: Vec<(String, PathBuf)>,
    inputs: Vec<Vec<String>>,
    outputs: Vec<(String, String, usize)>,
}

impl ShmRegions {
    async fn create(
        api: &mut Api,
        entries: &[Vec<InputTensor>],
        meta: &Value,
        output_bytes: usize,
    ) -> Result<ShmRegions> {
        let outputs = meta["outputs"].as_array().map_or(0, Vec::len);
        let count = entries.iter().map(Vec::len).sum::<usize>() + outputs;
        if count > wisp::api::shm::MAX_REGIONS {
            bail!(
                "--shared-memory system needs {count} regions (one per input of each data \
                 entry, one per output); the server holds at most {}",
                wisp::api::shm::MAX_REGIONS
            );
        }
        if let Some(t) = entries.iter().flatten().find(|t| t.data.is_empty()) {
            bail!(
                "--shared-memory system: input '{}' has no data to place",
                t.name
            );
        }
        let mut regions = ShmRegions {
            regions: vec![],
            inputs: vec![],
            outputs: vec![],
        };
        let prefix = format!("wisp_perf_{}", std::process::id());
        let add = |regions: &mut ShmRegions, data: Option<&[u8]>, size: usize| -> Result<String> {
            let name = format!("{prefix}_{}", regions.regions.len());
            let path = PathBuf::from(format!("/dev/shm/{name}"));
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            regions.regions.push((name.clone(), path.clone()));
            match data {
                Some(data) => std::fs::write(&path, data),
                None => file.set_len(size as u64),
            }
            .with_context(|| format!("writing {}", path.display()))?;
            Ok(name)
        };
        for entry in entries {
            let names = entry
                .iter()
                .map(|t| add(&mut regions, Some(&t.data), t.data.len()))
                .collect::<Result<Vec<_>>>()?;
            regions.inputs.push(names);
        }
        for output in meta["outputs"].as_array().into_iter().flatten() {
            let name = output["name"].as_str().unwrap_or_default().to_string();
            let region = add(&mut regions, None, output_bytes)?;
            regions.outputs.push((name, region, output_bytes));
        }
        for (i, (name, path)) in regions.regions.iter().enumerate() {
            let size = std::fs::metadata(path)?.len() as usize;
            if let Err(e) = api.register(name, &format!("/{name}"), size).await {
                // The server keeps what was registered until it is unregistered.
                for (registered, _) in &regions.regions[..i] {
                    let _ = api.unregister(registered).await;
                }
                return Err(e);
            }
        }
        Ok(regions)
    }

    fn placement(&self, entry: usize) -> ShmPlacement<'_> {
        ShmPlacement {
            inputs: &self.inputs[entry],
            outputs: &self.outputs,
        }
    }

    async fn release(self, api: &mut Api) {
        for (name, _) in &self.regions {
            if let Err(e) = api.unregister(name).await {
                eprintln!("warning: {e}");
            }
        }
    }
}

impl Drop for ShmRegions {
    fn drop(&mut self) {
        for (_, path) in &self.regions {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How load is offered in one step.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// This many requests in flight at all times (closed loop).
    Concurrency(usize),
    /// Requests started at this rate per second, whatever is in flight (open loop).
    Rate(f64),
}

/// Requests an open-loop step may have in flight before it counts the rest as errors.
const MAX_IN_FLIGHT: usize = 1024;

/// Every finished request: (when it finished, latency ns, ok).
type Records = Arc<Mutex<Vec<(Instant, u64, bool)>>>;

fn headers_for(header_len: Option<usize>) -> Vec<(&'static str, String)> {
    let mut headers = vec![("content-type", "application/octet-stream".to_string())];
    if let Some(len) = header_len {
        headers.push(("inference-header-content-length", len.to_string()));
    }
    headers
}

/// Sends one request and records it.
async fn send_one(sender: &mut Sender, request: &Prepared, records: &Records, sent: Instant) {
    let ok = sender.send(request).await;
    records
        .lock()
        .push((Instant::now(), sent.elapsed().as_nanos() as u64, ok));
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn run_step(
    api: &mut Api,
    bodies: &[Prepared],
    load: Load,
    args: &PerfArgs,
) -> Result<StepResult> {
    let records: Records = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // However the step ends (an error included), its workers stop.
    let _stop_on_exit = StopOnDrop(stop.clone());
    let bodies: Arc<Vec<Prepared>> = Arc::new(bodies.to_vec());
    let mut workers = Vec::new();
    match load {
        Load::Concurrency(concurrency) => {
            for worker in 0..concurrency {
                let mut sender = api.sender().await?;
                let (records, stop, bodies) = (records.clone(), stop.clone(), bodies.clone());
                workers.push(tokio::spawn(async move {
                    let mut next = worker;
                    while !stop.load(Ordering::Relaxed) {
                        let body = &bodies[next % bodies.len()];
                        next += 1;
                        send_one(&mut sender, body, &records, Instant::now()).await;
                    }
                }));
            }
        }
        Load::Rate(rate) => {
            // Idle connections are reused; each request runs in a task of its own.
            let idle: Arc<Mutex<Vec<Sender>>> = Arc::default();
            let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
            let (records, stop, bodies) = (records.clone(), stop.clone(), bodies.clone());
            let connector = api.connector();
            workers.push(tokio::spawn(async move {
                let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
                let mut ticker = tokio::time::interval(period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut next = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    ticker.tick().await;
                    let scheduled = Instant::now();
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        records.lock().push((scheduled, 0, false));
                        continue;
                    };
                    let body = bodies[next % bodies.len()].clone();
                    next += 1;
                    let (idle, records, connector) =
                        (idle.clone(), records.clone(), connector.clone());
                    tokio::spawn(async move {
                        let idle_sender = idle.lock().pop();
                        let sender = match idle_sender {
                            Some(sender) => Ok(sender),
                            None => connector.open().await,
                        };
                        match sender {
                            Ok(mut sender) => {
                                send_one(&mut sender, &body, &records, scheduled).await;
                                if !sender.is_closed() {
                                    idle.lock().push(sender);
                                }
                            }
                            Err(_) => records.lock().push((Instant::now(), 0, false)),
                        }
                        drop(permit);
                    });
                }
            }));
        }
    }
    let window = Duration::from_millis(args.measurement_ms.max(100));
    // Warm-up: one window not counted.
    tokio::time::sleep(window).await;
    records.lock().clear();
    let before = api.totals().await?;
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
    let after = api.totals().await?;
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
        concurrency: match load {
            Load::Concurrency(c) => c,
            Load::Rate(_) => 0,
        },
        request_rate: match load {
            Load::Concurrency(_) => 0.0,
            Load::Rate(r) => r,
        },
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

/// The load of a step as perf_analyzer's first CSV column shows it.
fn load_column(results: &[StepResult]) -> (&'static str, fn(&StepResult) -> String) {
    if results.iter().any(|r| r.request_rate > 0.0) {
        ("Request Rate", |r| format!("{:.0}", r.request_rate))
    } else {
        ("Concurrency", |r| r.concurrency.to_string())
    }
}

pub fn csv(results: &[StepResult]) -> String {
    let (column, load) = load_column(results);
    let mut out = format!("{column},Inferences/Second,Client Send+Recv avg (us),p50 latency,p90 latency,p95 latency,p99 latency,Server Queue (us),Server Compute (us),Requests,Errors,Stable\n");
    for r in results {
        let _ = writeln!(
            out,
            "{},{:.1},{:.0},{:.0},{:.0},{:.0},{:.0},{:.0},{:.0},{},{},{}",
            load(r),
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
    let (column, load) = load_column(results);
    println!("| {column} | inferences/s | p50 (µs) | p90 (µs) | p95 (µs) | p99 (µs) | server queue (µs) | server compute (µs) | errors | stable |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
            load(r),
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
    if args.shared_memory == SharedMemory::Cuda {
        bail!("--shared-memory cuda: wisp serves no CUDA shared memory; use system");
    }
    let mut api = Api::connect(args).await?;
    let (meta, batched) = api.model().await?;
    let entries = build_entries(&meta, args, batched)?;
    let shm = match args.shared_memory {
        SharedMemory::System => {
            Some(ShmRegions::create(&mut api, &entries, &meta, args.output_shm_bytes).await?)
        }
        _ => None,
    };
    let requests: Vec<Prepared> = entries
        .iter()
        .enumerate()
        .map(|(i, inputs)| {
            let placement = shm.as_ref().map(|shm| shm.placement(i));
            match args.protocol {
                Protocol::Http => Prepared::Http(http_body(inputs, args.json, placement)),
                #[cfg(feature = "grpc")]
                Protocol::Grpc => Prepared::Grpc(Box::new(grpc_request(
                    &args.model,
                    args.version,
                    inputs,
                    placement,
                ))),
                #[cfg(not(feature = "grpc"))]
                Protocol::Grpc => unreachable!("refused by Api::connect"),
            }
        })
        .collect();
    let result = run_loads(&mut api, &requests, args).await;
    if let Some(shm) = shm {
        shm.release(&mut api).await;
    }
    result
}

async fn run_loads(
    api: &mut Api,
    requests: &[Prepared],
    args: &PerfArgs,
) -> Result<Vec<StepResult>> {
    let loads: Vec<Load> = match &args.request_rate_range {
        Some(range) => parse_range(range)?
            .into_iter()
            .map(|r| Load::Rate(r as f64))
            .collect(),
        None => parse_range(&args.concurrency_range)?
            .into_iter()
            .map(Load::Concurrency)
            .collect(),
    };
    let mut results = Vec::new();
    for load in loads {
        let step = run_step(api, requests, load, args).await?;
        let what = match load {
            Load::Concurrency(c) => format!("concurrency {c}"),
            Load::Rate(r) => format!("request rate {r:.0}/s"),
        };
        eprintln!(
            "{what}: {:.0} infer/s, p50 {:.0} µs, p95 {:.0} µs{}",
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
    let models: Vec<String> = std::iter::once(args.model.clone())
        .chain(args.compare.iter().cloned())
        .collect();
    let mut series: Vec<Vec<StepResult>> = vec![Vec::new(); models.len()];
    if models.len() == 1 {
        series[0] = measure(&args).await?;
    } else {
        // One load level at a time, every model at it in turn.
        let (levels, rate) = match &args.request_rate_range {
            Some(range) => (parse_range(range)?, true),
            None => (parse_range(&args.concurrency_range)?, false),
        };
        for level in levels {
            for (model, results) in models.iter().zip(&mut series) {
                let mut step = args.clone();
                step.model = model.clone();
                let single = format!("{level}:{level}:1");
                if rate {
                    step.request_rate_range = Some(single);
                } else {
                    step.concurrency_range = single;
                }
                eprint!("{model}: ");
                results.extend(measure(&step).await?);
            }
        }
    }
    for (model, results) in models.iter().zip(&series) {
        if models.len() > 1 {
            println!("{model}");
        }
        print_table(results);
    }
    if let Some(path) = &args.csv {
        std::fs::write(path, csv(&series[0]))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let curves: Vec<(&str, &[StepResult])> = models
            .iter()
            .zip(&series)
            .map(|(m, r)| (m.as_str(), r.as_slice()))
            .collect();
        std::fs::write(path, svg_plot(&curves))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
