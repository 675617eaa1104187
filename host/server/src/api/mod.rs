//! The HTTP front: Open Inference Protocol routes with Triton's extensions.

pub mod openai;
pub mod protocol;
pub mod shm;

use crate::trace::ActiveTrace;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use wisp_core::error::{Error, ErrorKind, Result};
use wisp_serving::metrics::Metrics;
use wisp_serving::model::LoadedModel;
use wisp_serving::repository::{ControlMode, Repository};

pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Extensions reported in server metadata.
pub const EXTENSIONS: &[&str] = &[
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "logging",
    "system_shared_memory",
    "trace",
];

/// Groups of endpoints that `--http-restricted-api` can guard (Triton's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiGroup {
    Health,
    Metadata,
    Inference,
    ModelConfig,
    ModelRepository,
    Statistics,
    /// Triton's groups for endpoints wisp does not serve; accepted so Triton command lines work.
    SharedMemory,
    Trace,
    Logging,
}

impl ApiGroup {
    pub fn parse(name: &str) -> Option<ApiGroup> {
        Some(match name {
            "health" => ApiGroup::Health,
            "metadata" => ApiGroup::Metadata,
            "inference" => ApiGroup::Inference,
            "model-config" => ApiGroup::ModelConfig,
            "model-repository" => ApiGroup::ModelRepository,
            "statistics" => ApiGroup::Statistics,
            "shared-memory" => ApiGroup::SharedMemory,
            "trace" => ApiGroup::Trace,
            "logging" => ApiGroup::Logging,
            _ => return None,
        })
    }
}

/// `--http-restricted-api GROUPS:HEADER=VALUE`: those groups need that header.
#[derive(Debug, Clone)]
pub struct Restriction {
    pub groups: Vec<ApiGroup>,
    pub header: String,
    pub value: String,
}

impl std::str::FromStr for Restriction {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (groups, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("'{s}' is not GROUPS:HEADER=VALUE"))?;
        let (header, value) = rest
            .split_once('=')
            .ok_or_else(|| format!("'{rest}' is not HEADER=VALUE"))?;
        if header.is_empty() {
            return Err("the header name is empty".into());
        }
        hyper::header::HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| format!("'{header}' is not a valid header name"))?;
        let groups = groups
            .split(',')
            .map(|g| {
                ApiGroup::parse(g.trim()).ok_or_else(|| {
                    format!(
                        "unknown API group '{g}'; expected health, metadata, inference, \
                         model-config, model-repository, statistics, shared-memory, trace or logging"
                    )
                })
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        Ok(Restriction {
            groups,
            header: header.to_ascii_lowercase(),
            value: value.to_string(),
        })
    }
}

pub struct ServerState {
    pub repository: Arc<Repository>,
    pub metrics: Arc<Metrics>,
    pub restrictions: Vec<Restriction>,
    pub max_body_bytes: usize,
    /// Longest a client may take to send a whole request body.
    pub body_timeout: std::time::Duration,
    /// Bytes of inference request bodies the server holds at once, in KiB permits
    /// (server-wide, so many large requests cannot exhaust memory together).
    pub inflight_kib: Arc<tokio::sync::Semaphore>,
    pub inflight_limit_bytes: usize,
    /// Startup loading finished and the server is not shutting down.
    pub ready: AtomicBool,
    /// Ready also requires every model that should be loaded to be ready (Triton's default).
    pub strict_readiness: bool,
    pub http_metrics: HttpMetrics,
    /// Triton's system shared-memory regions (off unless `--allow-client-shm true`).
    pub shm: Arc<shm::SystemSharedMemory>,
    /// Trace settings, sampling and export.
    pub tracing: Arc<crate::trace::Tracing>,
}

/// How long the server takes to answer, by status code: from the parsed request
/// head to the response (body read and parse included; writing it out not).
/// Shows, for example, that refusals under overload stay fast.
pub struct HttpMetrics {
    durations: prometheus::HistogramVec,
    /// The codes the API answers, resolved once (a label lookup hashes under a lock).
    common: Vec<(StatusCode, prometheus::Histogram)>,
}

impl HttpMetrics {
    /// Creates the histogram and registers it with `metrics`.
    pub fn register(metrics: &Metrics) -> std::result::Result<HttpMetrics, String> {
        let durations = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "wisp_http_request_duration_seconds",
                "Time from a request's head to its response, by HTTP status code",
            )
            // Fine around a few milliseconds, where fast refusals and small requests fall.
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025,
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["code"],
        )
        .map_err(|e| e.to_string())?;
        metrics.register(Box::new(durations.clone()))?;
        let common = [200u16, 400, 404, 408, 413, 429, 500, 503]
            .into_iter()
            .map(|code| {
                let status = StatusCode::from_u16(code).expect("valid status code");
                let histogram = durations.with_label_values(&[status.as_str()]);
                (status, histogram)
            })
            .collect();
        Ok(HttpMetrics { durations, common })
    }

    fn observe(&self, status: StatusCode, seconds: f64) {
        match self.common.iter().find(|(s, _)| *s == status) {
            Some((_, histogram)) => histogram.observe(seconds),
            None => self
                .durations
                .with_label_values(&[status.as_str()])
                .observe(seconds),
        }
    }
}

pub type Body = Full<Bytes>;

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

/// The HTTP status of each error kind: the one place this front maps them.
pub fn status(e: &Error) -> StatusCode {
    match e.kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        // Triton answers 400 here, and its clients' examples check for it.
        ErrorKind::UnknownModel => StatusCode::BAD_REQUEST,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_response(e: &Error) -> Response<Body> {
    json_response(status(e), &json!({ "error": e.message }))
}

fn empty(status: StatusCode) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .expect("valid response")
}

/// Bodies larger than this are inflated, parsed and compressed on the blocking
/// pool, so large requests do not stall the async workers (and health checks).
const INLINE_WORK_BYTES: usize = 64 << 10;

/// Runs `f` inline for small inputs, on the blocking pool for large ones.
pub(crate) async fn cpu_work<T: Send + 'static>(
    size: usize,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    if size <= INLINE_WORK_BYTES {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("request processing task failed: {e}")))?
}

/// Reserves room for a request body in the server-wide in-flight budget, or
/// refuses it at once (503). The reservation is the declared length, or the body
/// cap when the length is unknown or the body is compressed.
fn reserve_body(
    state: &ServerState,
    headers: &hyper::HeaderMap,
) -> Result<tokio::sync::OwnedSemaphorePermit> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    let compressed = headers.contains_key(CONTENT_ENCODING);
    let bytes = match declared {
        Some(len) if !compressed => len.min(state.max_body_bytes),
        _ => state.max_body_bytes,
    };
    reserve_bytes(state, bytes)
}

/// Bytes that inputs in shared memory will take once read (saturating: a sum past
/// the budget is refused by `reserve_bytes` anyway).
fn shared_bytes(places: &[(usize, shm::SharedRef)]) -> usize {
    places
        .iter()
        .map(|(_, at)| usize::try_from(at.byte_size).unwrap_or(usize::MAX))
        .fold(0, usize::saturating_add)
}

/// Fills the inputs that name shared-memory places (both fronts): their bytes are
/// reserved in the in-flight budget first (503 past it), then read, off the async
/// workers when large. The reservation lasts as long as the returned permit.
pub(crate) async fn fill_shared_inputs(
    state: &ServerState,
    inputs: &mut Vec<wisp_core::tensor::Tensor>,
    places: Vec<(usize, shm::SharedRef)>,
    model: &str,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>> {
    let bytes = shared_bytes(&places);
    if bytes == 0 {
        return Ok(None);
    }
    let reserved = reserve_bytes(state, bytes)?;
    let (shm, limit) = (state.shm.clone(), state.max_body_bytes);
    let mut taken = std::mem::take(inputs);
    *inputs = cpu_work(bytes, move || {
        shm.fill_inputs(&mut taken, places, limit)?;
        Ok(taken)
    })
    .await
    .map_err(|e| e.context(format!("model '{model}'")))?;
    Ok(Some(reserved))
}

/// Reserves `bytes` in the server-wide budget of request bytes in flight (both fronts),
/// or refuses at once.
pub(crate) fn reserve_bytes(
    state: &ServerState,
    bytes: usize,
) -> Result<tokio::sync::OwnedSemaphorePermit> {
    let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    state.inflight_kib.clone().try_acquire_many_owned(kib).map_err(|_| {
        Error::unavailable(format!(
            "the server holds {} MiB of request bodies in flight, its limit (--http-max-inflight-bytes); try again later",
            state.inflight_limit_bytes >> 20
        ))
    })
}

/// Bytes of a refused request body the server still reads (and drops) so the
/// client can read the refusal.
const DISCARD_LIMIT: usize = 4 << 20;

/// Reads up to `limit` bytes of a body without keeping them, within `deadline`.
async fn discard_body(mut body: Incoming, limit: usize, deadline: std::time::Duration) {
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(deadline, drain).await;
}

/// Reads the body within the cap and the deadline, and inflates gzip/deflate
/// bodies within the same cap.
async fn read_body(
    req: Request<Incoming>,
    max: usize,
    deadline: std::time::Duration,
) -> Result<(hyper::http::request::Parts, Bytes)> {
    let (parts, body) = req.into_parts();
    let too_large = move || {
        Error::new(
            ErrorKind::PayloadTooLarge,
            format!("request body exceeds the limit of {max} bytes (--http-max-body-bytes)"),
        )
    };
    if let Some(len) = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
    {
        if len.parse::<u64>().map(|l| l > max as u64).unwrap_or(false) {
            return Err(too_large());
        }
    }
    let collected = tokio::time::timeout(deadline, Limited::new(body, max).collect())
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::RequestTimeout,
                format!(
                    "the request body did not arrive within {} s (--http-body-timeout-secs)",
                    deadline.as_secs()
                ),
            )
        })?;
    let bytes = collected
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                Error::invalid(format!("reading the request body failed: {e}"))
            }
        })?
        .to_bytes();
    let encoding = parts
        .headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let bytes = match encoding.as_deref() {
        None | Some("identity") | Some("") => bytes,
        Some(enc @ ("gzip" | "deflate")) => {
            let gzip = enc == "gzip";
            let size = bytes.len();
            cpu_work(size, move || {
                let mut out = Vec::new();
                let reader: Box<dyn Read> = if gzip {
                    Box::new(flate2::read::GzDecoder::new(&bytes[..]))
                } else {
                    Box::new(flate2::read::ZlibDecoder::new(&bytes[..]))
                };
                let enc = if gzip { "gzip" } else { "deflate" };
                reader
                    .take(max as u64 + 1)
                    .read_to_end(&mut out)
                    .map_err(|e| {
                        Error::invalid(format!("the {enc} request body is corrupt: {e}"))
                    })?;
                if out.len() > max {
                    return Err(too_large());
                }
                Ok(Bytes::from(out))
            })
            .await?
        }
        Some(other) => {
            return Err(Error::invalid(format!(
                "unsupported Content-Encoding '{other}'; use gzip or deflate"
            )))
        }
    };
    Ok((parts, bytes))
}

fn parse_json_body(body: &Bytes) -> Result<Value> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| Error::invalid(format!("malformed JSON body: {e}")))
}

/// A model version from a path or a message (Triton's wording when it is not one).
pub(crate) fn parse_version(v: &str) -> Result<u64> {
    v.parse().map_err(|_| {
        Error::invalid(format!(
            "failed to get model version from specified version string '{v}' \
             (value must be a non-negative integer)"
        ))
    })
}

/// The route a path names, with the API group that guards it.
enum Route<'a> {
    Live,
    Ready,
    ServerMetadata,
    ModelMetadata(&'a str, Option<&'a str>),
    ModelReady(&'a str, Option<&'a str>),
    ModelConfig(&'a str, Option<&'a str>),
    Infer(&'a str, Option<&'a str>),
    Stats(Option<&'a str>, Option<&'a str>),
    RepositoryIndex,
    Load(&'a str),
    Unload(&'a str),
    Logging,
    /// Trace settings, global or of one model.
    Trace(Option<&'a str>),
    /// System shared memory: status of all regions or of one.
    ShmStatus(Option<&'a str>),
    ShmRegister(&'a str),
    /// Unregister one region, or all.
    ShmUnregister(Option<&'a str>),
    /// CUDA shared memory: status (always empty) or a change (refused).
    CudaShmStatus,
    CudaShmChange,
    /// OpenAI's embeddings and model list, and Cohere's/Jina's rerank.
    OpenAiEmbeddings,
    OpenAiModels,
    Rerank,
}

impl Route<'_> {
    fn group(&self) -> ApiGroup {
        match self {
            Route::Live | Route::Ready | Route::ModelReady(..) => ApiGroup::Health,
            Route::ServerMetadata | Route::ModelMetadata(..) => ApiGroup::Metadata,
            Route::ModelConfig(..) => ApiGroup::ModelConfig,
            Route::Infer(..) | Route::OpenAiEmbeddings | Route::Rerank => ApiGroup::Inference,
            Route::OpenAiModels => ApiGroup::Metadata,
            Route::Stats(..) => ApiGroup::Statistics,
            Route::RepositoryIndex | Route::Load(_) | Route::Unload(_) => ApiGroup::ModelRepository,
            Route::Logging => ApiGroup::Logging,
            Route::Trace(_) => ApiGroup::Trace,
            Route::ShmStatus(_)
            | Route::ShmRegister(_)
            | Route::ShmUnregister(_)
            | Route::CudaShmStatus
            | Route::CudaShmChange => ApiGroup::SharedMemory,
        }
    }

    fn method(&self) -> Method {
        match self {
            Route::Infer(..)
            | Route::OpenAiEmbeddings
            | Route::Rerank
            | Route::RepositoryIndex
            | Route::Load(_)
            | Route::Unload(_)
            | Route::ShmRegister(_)
            | Route::ShmUnregister(_)
            | Route::CudaShmChange => Method::POST,
            _ => Method::GET,
        }
    }
}

fn route(segments: &[String]) -> Option<Route<'_>> {
    let segments: Vec<&str> = segments.iter().map(|s| s.as_str()).collect();
    Some(match segments.as_slice() {
        ["v2"] => Route::ServerMetadata,
        ["v1", "embeddings"] => Route::OpenAiEmbeddings,
        ["v1", "models"] => Route::OpenAiModels,
        ["v1", "rerank"] => Route::Rerank,
        ["v2", "health", "live"] => Route::Live,
        ["v2", "health", "ready"] => Route::Ready,
        ["v2", "models", "stats"] => Route::Stats(None, None),
        ["v2", "repository", "index"] => Route::RepositoryIndex,
        ["v2", "logging"] => Route::Logging,
        ["v2", "trace", "setting"] => Route::Trace(None),
        ["v2", "systemsharedmemory", "status"] => Route::ShmStatus(None),
        ["v2", "systemsharedmemory", "unregister"] => Route::ShmUnregister(None),
        ["v2", "systemsharedmemory", "region", r, "status"] => Route::ShmStatus(Some(r)),
        ["v2", "systemsharedmemory", "region", r, "register"] => Route::ShmRegister(r),
        ["v2", "systemsharedmemory", "region", r, "unregister"] => Route::ShmUnregister(Some(r)),
        ["v2", "cudasharedmemory", "status"]
        | ["v2", "cudasharedmemory", "region", _, "status"] => Route::CudaShmStatus,
        ["v2", "cudasharedmemory", "unregister"]
        | ["v2", "cudasharedmemory", "region", _, "register" | "unregister"] => {
            Route::CudaShmChange
        }
        ["v2", "repository", "models", m, "load"] => Route::Load(m),
        ["v2", "repository", "models", m, "unload"] => Route::Unload(m),
        ["v2", "models", m, rest @ ..] => {
            let (version, rest) = match rest {
                ["versions", v, rest @ ..] => (Some(*v), rest),
                rest => (None, rest),
            };
            match rest {
                [] => Route::ModelMetadata(m, version),
                ["ready"] => Route::ModelReady(m, version),
                ["config"] => Route::ModelConfig(m, version),
                ["infer"] => Route::Infer(m, version),
                ["stats"] => Route::Stats(Some(m), version),
                ["trace", "setting"] if version.is_none() => Route::Trace(Some(m)),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// The path's segments, each percent-decoded (so an encoded `/` stays inside its segment).
fn path_segments(path: &str) -> Vec<String> {
    path.trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(percent_decode)
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn handle(
    state: Arc<ServerState>,
    req: Request<Incoming>,
) -> std::result::Result<Response<Body>, std::convert::Infallible> {
    let started = std::time::Instant::now();
    let openai = req.uri().path().starts_with("/v1/");
    let response = match dispatch(&state, req).await {
        Ok(r) => r,
        Err(e) if openai => openai::error_response(&e, None),
        Err(e) => error_response(&e),
    };
    state
        .http_metrics
        .observe(response.status(), started.elapsed().as_secs_f64());
    Ok(response)
}

async fn dispatch(state: &ServerState, req: Request<Incoming>) -> Result<Response<Body>> {
    let path = req.uri().path().to_string();
    let segments = path_segments(&path);
    let route = route(&segments).ok_or_else(|| Error::not_found(format!("no route for {path}")))?;
    let group = route.group();
    for restriction in state
        .restrictions
        .iter()
        .filter(|r| r.groups.contains(&group))
    {
        let given = req
            .headers()
            .get(restriction.header.as_str())
            .and_then(|v| v.to_str().ok());
        if given != Some(restriction.value.as_str()) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                format!(
                    "This API is restricted, expecting header '{}'",
                    restriction.header
                ),
            ));
        }
    }
    let method = req.method().clone();
    let expected = route.method();
    let allowed = method == expected
        || (expected == Method::GET && method == Method::HEAD)
        // GET reads the log and trace settings, POST changes them.
        || (matches!(route, Route::Logging | Route::Trace(_)) && method == Method::POST);
    if !allowed {
        return Err(Error::new(
            ErrorKind::MethodNotAllowed,
            format!("{} {path} is not allowed; use {expected}", method),
        ));
    }
    let accept_gzip = req
        .headers()
        .get(hyper::header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .map(|e| e.trim().split(';').next().unwrap_or("").to_string())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let repo = &state.repository;

    match route {
        Route::Live => Ok(empty(StatusCode::OK)),
        Route::Ready => Ok(empty(if server_ready(state) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        })),
        Route::ServerMetadata => Ok(json_response(
            StatusCode::OK,
            &json!({"name": "wisp", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS}),
        )),
        Route::ModelReady(m, v) => {
            let version = v.map(parse_version).transpose()?;
            Ok(empty(match repo.get(m, version) {
                Ok(_) => StatusCode::OK,
                Err(e) if e.kind == ErrorKind::UnknownModel => StatusCode::NOT_FOUND,
                Err(_) => StatusCode::BAD_REQUEST,
            }))
        }
        Route::ModelMetadata(m, v) => {
            let metadata = model_metadata(repo, m, v.map(parse_version).transpose()?)?;
            let tensor = |t: &TensorMetadata| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape});
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "name": metadata.name,
                    "versions": metadata.versions,
                    "platform": metadata.platform,
                    "inputs": metadata.inputs.iter().map(tensor).collect::<Vec<_>>(),
                    "outputs": metadata.outputs.iter().map(tensor).collect::<Vec<_>>(),
                }),
            ))
        }
        Route::ModelConfig(m, v) => {
            let model = repo.get(m, v.map(parse_version).transpose()?)?;
            Ok(json_response(
                StatusCode::OK,
                &model.config.to_triton_json(),
            ))
        }
        Route::Stats(m, v) => {
            let stats = model_statistics(repo, m, v.map(parse_version).transpose()?)?;
            Ok(json_response(StatusCode::OK, &stats))
        }
        Route::RepositoryIndex => {
            let (_, body) = read_body(req, state.max_body_bytes, state.body_timeout).await?;
            let body = parse_json_body(&body)?;
            let ready = match body.get("ready") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(Error::invalid(format!(
                        "field 'ready' must be a bool, got {other}"
                    )))
                }
            };
            Ok(json_response(StatusCode::OK, &repo.index(ready)))
        }
        Route::Logging => {
            let control = crate::log::LogControl::global();
            if method == Method::POST {
                let (_, body) = read_body(req, state.max_body_bytes, state.body_timeout).await?;
                control.update_json(&parse_json_body(&body)?)?;
            }
            Ok(json_response(StatusCode::OK, &control.settings()))
        }
        Route::Trace(model) => {
            if let Some(m) = model {
                repo.check_known(m)?;
            }
            let settings = if method == Method::POST {
                let (_, body) = read_body(req, state.max_body_bytes, state.body_timeout).await?;
                let changes = trace_changes(&parse_json_body(&body)?)?;
                state.tracing.update(model, &changes)?
            } else {
                state.tracing.settings(model)
            };
            let settings: serde_json::Map<String, Value> = settings
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        crate::trace::SettingValue::One(s) => json!(s),
                        crate::trace::SettingValue::List(l) => json!(l),
                    };
                    (k, v)
                })
                .collect();
            Ok(json_response(StatusCode::OK, &Value::Object(settings)))
        }
        Route::Load(m) | Route::Unload(m) => {
            let is_load = matches!(route, Route::Load(_));
            let (_, body) = read_body(req, state.max_body_bytes, state.body_timeout).await?;
            let body = parse_json_body(&body)?;
            let parameters = body.get("parameters").and_then(|p| p.as_object());
            let keys: Vec<&str> = parameters
                .map(|p| p.keys().map(String::as_str).collect())
                .unwrap_or_default();
            let config = match parameters.and_then(|p| p.get("config")) {
                None => None,
                Some(serde_json::Value::String(text)) => Some(text.clone()),
                Some(other) => {
                    return Err(Error::invalid(format!(
                        "failed to load '{m}': parameter 'config' must be a string holding the model configuration as JSON, got {other}"
                    )))
                }
            };
            load_or_unload(repo, m, is_load, &keys, config).await?;
            Ok(empty(StatusCode::OK))
        }
        Route::ShmStatus(region) => Ok(json_response(StatusCode::OK, &state.shm.status(region)?)),
        Route::ShmUnregister(region) => {
            state.shm.unregister(region)?;
            Ok(empty(StatusCode::OK))
        }
        Route::ShmRegister(region) => {
            let (_, body) = read_body(req, state.max_body_bytes, state.body_timeout).await?;
            let body = parse_json_body(&body)?;
            let field = |key: &str| body.get(key);
            let key = field("key").and_then(|k| k.as_str()).ok_or_else(|| {
                Error::invalid("a shared memory registration needs 'key', a string")
            })?;
            let number = |key: &str, required: bool| -> Result<u64> {
                match field(key) {
                    None if !required => Ok(0),
                    Some(v) if v.as_u64().is_some() => Ok(v.as_u64().expect("checked")),
                    other => Err(Error::invalid(format!(
                        "a shared memory registration needs '{key}', a non-negative integer; got {}",
                        other.map_or("nothing".to_string(), |v| v.to_string())
                    ))),
                }
            };
            state.shm.register(
                region,
                key,
                number("offset", false)?,
                number("byte_size", true)?,
            )?;
            Ok(empty(StatusCode::OK))
        }
        Route::CudaShmStatus => Ok(json_response(StatusCode::OK, &json!([]))),
        Route::CudaShmChange => Err(Error::invalid(
            "CUDA shared memory is not supported by this server; use system shared memory \
             (with --allow-client-shm true)",
        )),
        Route::OpenAiEmbeddings => Ok(openai::embeddings(state, req).await),
        Route::OpenAiModels => Ok(openai::models(state)),
        Route::Rerank => Ok(openai::rerank(state, req).await),
        Route::Infer(m, v) => {
            let model = repo.get(m, v.map(parse_version).transpose()?)?;
            let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
            let parent = crate::trace::remote_parent(header("traceparent"), header("tracestate"));
            let mut trace = state.tracing.start(model.name(), parent);
            if let Some(trace) = &mut trace {
                trace.event("HTTP_RECV_START");
            }
            let result = infer(state, req, model, &accept_gzip, &mut trace).await;
            if let Some(trace) = trace {
                trace.finish(result.as_ref().err());
            }
            result
        }
    }
}

/// One inference request over HTTP, traced when `trace` is set.
async fn infer(
    state: &ServerState,
    req: Request<Incoming>,
    model: Arc<LoadedModel>,
    accept_gzip: &[String],
    trace: &mut Option<ActiveTrace>,
) -> Result<Response<Body>> {
    let _reserved = match reserve_body(state, req.headers()) {
        Ok(reserved) => reserved,
        Err(e) => {
            // Read and discard a small body so the client sees the 503 rather
            // than a reset while it is still sending; larger ones close.
            discard_body(req.into_body(), DISCARD_LIMIT, state.body_timeout).await;
            return Err(e);
        }
    };
    let (parts, body) = read_body(req, state.max_body_bytes, state.body_timeout).await?;
    if let Some(trace) = trace {
        trace.event("HTTP_RECV_END");
    }
    let header_length = match parts.headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| Error::invalid("Inference-Header-Content-Length is not a number"))?,
        ),
    };
    let config = model.config.clone();
    let mut request = cpu_work(body.len(), move || {
        protocol::parse_request(body, header_length, &config)
    })
    .await
    .map_err(|e| e.context(format!("model '{}'", model.name())))?;
    // Inputs read from shared memory count against the in-flight budget too.
    let places = std::mem::take(&mut request.shared_inputs);
    let _shared_reserved =
        fill_shared_inputs(state, &mut request.backend.inputs, places, model.name()).await?;
    // Moved, not cloned: a tensor the request alone holds (JSON, shared memory) can then
    // reach the backend without a copy.
    let mut backend_request = std::mem::take(&mut request.backend);
    if let Some(trace) = trace {
        if let Some(id) = &request.id {
            let id = id.as_str().map_or_else(|| id.to_string(), str::to_string);
            trace.attribute("triton.request_id", id);
        }
        backend_request.trace = Some(trace.handle());
    }
    let response = model.infer(backend_request).await?;
    if let Some(trace) = trace {
        trace.event("HTTP_SEND_START");
    }
    let (name, version) = (model.name().to_string(), model.version);
    let output_bytes: usize = response.outputs.iter().map(|t| t.data.len()).sum();
    // Outputs placed in shared memory are written there (large ones off the async workers).
    let (request, response) = if request.outputs.iter().any(|o| o.shared.is_some()) {
        let (shm, label) = (state.shm.clone(), format!("model '{name}'"));
        cpu_work(output_bytes, move || {
            protocol::write_shared_outputs(&request, &response, &shm)
                .map_err(|e| e.context(label))?;
            Ok((request, response))
        })
        .await?
    } else {
        (request, response)
    };
    let compression = if accept_gzip.iter().any(|e| e == "gzip") {
        Some(true)
    } else if accept_gzip.iter().any(|e| e == "deflate") {
        Some(false)
    } else {
        None
    };
    let (encoded, body) = cpu_work(output_bytes, move || {
        let mut encoded = protocol::encode_response(&name, version, &request, response)?;
        let body = match compression {
            Some(gzip) => compress(&encoded.body, gzip),
            None => std::mem::take(&mut encoded.body),
        };
        Ok((encoded, body))
    })
    .await?;
    let mut builder = Response::builder().status(StatusCode::OK);
    builder = match encoded.header_length {
        Some(len) => builder
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(HEADER_LENGTH, len),
        None => builder.header(CONTENT_TYPE, "application/json"),
    };
    match compression {
        Some(true) => builder = builder.header(CONTENT_ENCODING, HeaderValue::from_static("gzip")),
        Some(false) => {
            builder = builder.header(CONTENT_ENCODING, HeaderValue::from_static("deflate"))
        }
        None => {}
    }
    Ok(builder
        .body(Full::new(Bytes::from(body)))
        .expect("valid response"))
}

/// A trace-setting request's body: each key to a string, a list of strings, a number
/// (as its text) or null (clear).
fn trace_changes(body: &Value) -> Result<Vec<crate::trace::SettingChange>> {
    let object = body
        .as_object()
        .ok_or_else(|| Error::invalid("the trace settings must be a JSON object"))?;
    object
        .iter()
        .map(|(key, value)| {
            let strings = match value {
                Value::Null => None,
                Value::String(s) => Some(vec![s.clone()]),
                Value::Number(n) => Some(vec![n.to_string()]),
                Value::Array(items) => Some(
                    items
                        .iter()
                        .map(|item| {
                            item.as_str().map(str::to_string).ok_or_else(|| {
                                Error::invalid(format!(
                                    "trace setting '{key}': expected strings in the list"
                                ))
                            })
                        })
                        .collect::<Result<_>>()?,
                ),
                _ => {
                    return Err(Error::invalid(format!(
                        "trace setting '{key}': expected a string, a list of strings or null"
                    )))
                }
            };
            Ok((key.clone(), strings))
        })
        .collect()
}

/// Ready: startup loading finished, not shutting down, and (with strict readiness)
/// every model that should be loaded is.
pub fn server_ready(state: &ServerState) -> bool {
    state.ready.load(Ordering::Acquire) && (!state.strict_readiness || state.repository.all_ready())
}

pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// A model's metadata as both fronts answer it.
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

pub fn model_metadata(
    repo: &Repository,
    name: &str,
    version: Option<u64>,
) -> Result<ModelMetadata> {
    let model = repo.get(name, version)?;
    let config = &model.config;
    let versions: Vec<String> = repo
        .ready_models()
        .iter()
        .filter(|r| r.name() == name)
        .map(|r| r.version.to_string())
        .collect();
    let tensor = |t: &wisp_core::config::TensorConfig| TensorMetadata {
        name: t.name.clone(),
        datatype: t.datatype.as_str(),
        // Batched models take a leading batch dimension of any size.
        shape: if config.max_batch_size > 0 {
            std::iter::once(-1).chain(t.dims.iter().copied()).collect()
        } else {
            t.dims.clone()
        },
    };
    Ok(ModelMetadata {
        name: config.name.clone(),
        versions,
        platform: config.backend.as_str().to_string(),
        inputs: config.inputs.iter().map(tensor).collect(),
        outputs: config.outputs.iter().map(tensor).collect(),
    })
}

/// Triton's statistics JSON (`{"model_stats": [...]}`) of every ready model, one
/// model's versions, or one version.
pub fn model_statistics(
    repo: &Repository,
    name: Option<&str>,
    version: Option<u64>,
) -> Result<Value> {
    let models = match name {
        None => repo.ready_models(),
        Some(m) => match version {
            Some(_) => vec![repo.get(m, version)?],
            None => {
                repo.get(m, None)?;
                repo.ready_models()
                    .into_iter()
                    .filter(|r| r.name() == m)
                    .collect()
            }
        },
    };
    let stats: Vec<Value> = models
        .iter()
        .map(|r| r.stats.to_json(r.name(), r.version))
        .collect();
    Ok(json!({ "model_stats": stats }))
}

/// Explicit load or unload (model control mode `explicit`); `parameters` are the
/// request's parameter names (only `unload_dependents` is understood).
/// Loads or unloads `name` (explicit model control). `parameters` are the request's
/// parameter names; `config` is the `config` parameter's text, Triton's configuration
/// override (loads only).
pub async fn load_or_unload(
    repo: &Arc<Repository>,
    name: &str,
    is_load: bool,
    parameters: &[&str],
    config: Option<String>,
) -> Result<()> {
    if repo.mode() != ControlMode::Explicit {
        return Err(Error::unavailable(format!(
            "explicit model load / unload is not allowed in --model-control-mode {}; \
             start wisp with --model-control-mode explicit",
            match repo.mode() {
                ControlMode::None => "none",
                ControlMode::Poll => "poll",
                ControlMode::Explicit => "explicit",
            }
        )));
    }
    if let Some(file) = parameters.iter().find(|k| k.starts_with("file:")) {
        return Err(Error::invalid(format!(
            "failed to load '{name}': file overrides ('{file}') are not supported; \
             put the model's files in the model repository"
        )));
    }
    let supported: &[&str] = if is_load {
        &["config", "unload_dependents"]
    } else {
        &["unload_dependents"]
    };
    let unsupported: Vec<&&str> = parameters
        .iter()
        .filter(|k| !supported.contains(k))
        .collect();
    if !unsupported.is_empty() {
        return Err(Error::invalid(format!(
            "{} parameters {unsupported:?} are not supported (supported: {supported:?}); \
             change the files in the model repository instead",
            if is_load { "load" } else { "unload" }
        )));
    }
    // In a task of its own: a client that gives up must not cancel a load halfway.
    let (repo, name) = (repo.clone(), name.to_string());
    tokio::spawn(async move {
        if is_load {
            repo.load_with(&name, config).await
        } else {
            repo.unload(&name).await
        }
    })
    .await
    .map_err(|e| Error::internal(format!("the load task failed: {e}")))?
}

fn compress(data: &[u8], gzip: bool) -> Vec<u8> {
    use std::io::Write;
    let level = flate2::Compression::fast();
    if gzip {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
        e.write_all(data).expect("writing to a Vec");
        e.finish().expect("writing to a Vec")
    } else {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), level);
        e.write_all(data).expect("writing to a Vec");
        e.finish().expect("writing to a Vec")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |p: &str| path_segments(p);
        assert!(matches!(
            route(&r("/v2/models/simple/versions/1/infer")),
            Some(Route::Infer("simple", Some("1")))
        ));
        assert!(matches!(
            route(&r("/v2/models/simple/infer")),
            Some(Route::Infer("simple", None))
        ));
        assert!(matches!(
            route(&r("/v2/models/stats")),
            Some(Route::Stats(None, None))
        ));
        assert!(matches!(
            route(&r("/v2/repository/models/x/load")),
            Some(Route::Load("x"))
        ));
        assert!(matches!(
            route(&r("/v2/repository/models/..%2Fetc/load")),
            Some(Route::Load("../etc"))
        ));
        assert!(route(&r("/v2/models/x/bogus")).is_none());
        assert!(route(&r("/v3")).is_none());
    }

    #[test]
    fn restriction_parses() {
        let r: Restriction = "model-repository,statistics:admin-key=secret"
            .parse()
            .unwrap();
        assert_eq!(
            r.groups,
            vec![ApiGroup::ModelRepository, ApiGroup::Statistics]
        );
        assert_eq!(
            (r.header.as_str(), r.value.as_str()),
            ("admin-key", "secret")
        );
        assert!("bogus:k=v".parse::<Restriction>().is_err());
        assert!("model-repository:novalue".parse::<Restriction>().is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("/v2/models/a%20b"), "/v2/models/a b");
        assert_eq!(percent_decode("/x%2"), "/x%2");
        assert_eq!(percent_decode("/v2/models/%aé"), "/v2/models/%aé");
        assert_eq!(percent_decode("%é%"), "%é%");
    }
}
