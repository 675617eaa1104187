//! The gRPC front: Triton's `inference.GRPCInferenceService` (KServe v2 gRPC with Triton's
//! extensions) and `grpc.health.v1.Health`, on the same core as the HTTP front: the same
//! repository, schedulers, statistics and metrics, restrictions and in-flight budget.

pub mod convert;

use crate::api::{self, ApiGroup, Restriction, ServerState};
use crate::trace::ActiveTrace;
use opentelemetry::trace::SpanContext;
use prost::Message;
use std::sync::{Arc, OnceLock};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use wisp_core::error::{Error, ErrorKind, Result};
use wisp_serving::model::LoadedModel;

/// Triton's protocol, generated from host/server/proto at build time.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("inference");
}

#[allow(clippy::all, missing_docs)]
pub mod health_pb {
    tonic::include_proto!("grpc.health.v1");
}

use pb::grpc_inference_service_server::GrpcInferenceService;
use pb::*;

/// Responses of one `ModelStreamInfer` stream computed ahead of the client reading them.
const STREAM_WINDOW: usize = 64;

/// The service name `grpc.health.v1` clients ask about (empty: the whole server).
const SERVICE_NAME: &str = "inference.GRPCInferenceService";

/// The gRPC status of each error kind: the one place this front maps them.
pub fn status(e: &Error) -> Status {
    let code = match e.kind {
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::NotFound | ErrorKind::UnknownModel => tonic::Code::NotFound,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::Forbidden => tonic::Code::PermissionDenied,
        ErrorKind::PayloadTooLarge => tonic::Code::ResourceExhausted,
        ErrorKind::MethodNotAllowed => tonic::Code::Unimplemented,
        ErrorKind::RequestTimeout => tonic::Code::DeadlineExceeded,
        ErrorKind::Internal => tonic::Code::Internal,
    };
    Status::new(code, e.message.clone())
}

#[derive(Clone)]
pub struct InferenceService {
    state: Arc<ServerState>,
    restrictions: Arc<Vec<Restriction>>,
}

impl InferenceService {
    pub fn new(state: Arc<ServerState>, restrictions: Vec<Restriction>) -> Self {
        InferenceService {
            state,
            restrictions: Arc::new(restrictions),
        }
    }

    /// `--grpc-restricted-protocol`: the group's RPCs need the key in the request's metadata.
    fn check(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        group: ApiGroup,
    ) -> Result<(), Status> {
        for restriction in self
            .restrictions
            .iter()
            .filter(|r| r.groups.contains(&group))
        {
            let given = metadata
                .get(restriction.header.as_str())
                .and_then(|v| v.to_str().ok());
            if given != Some(restriction.value.as_str()) {
                return Err(Status::permission_denied(format!(
                    "This API is restricted, expecting header '{}'",
                    restriction.header
                )));
            }
        }
        Ok(())
    }
}

fn version(v: &str) -> Result<Option<u64>> {
    if v.is_empty() {
        return Ok(None);
    }
    api::parse_version(v).map(Some)
}

/// The client's W3C trace context, from the request's metadata.
fn trace_parent(metadata: &tonic::metadata::MetadataMap) -> Option<SpanContext> {
    let header = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
    crate::trace::remote_parent(header("traceparent"), header("tracestate"))
}

/// One inference, as `ModelInfer` and each request of `ModelStreamInfer` run it; traced
/// when the settings say so (as a child of `parent`, the client's span, if given).
async fn infer(
    state: &ServerState,
    message: ModelInferRequest,
    parent: Option<SpanContext>,
) -> Result<ModelInferResponse> {
    let model = state
        .repository
        .get(&message.model_name, version(&message.model_version)?)?;
    let mut trace = state.tracing.start(model.name(), parent);
    if let Some(trace) = &mut trace {
        trace.event("GRPC_RECV_END");
        if !message.id.is_empty() {
            trace.attribute("triton.request_id", message.id.clone());
        }
    }
    let result = infer_model(state, message, model, &mut trace).await;
    if let Some(trace) = trace {
        trace.finish(result.as_ref().err());
    }
    result
}

async fn infer_model(
    state: &ServerState,
    message: ModelInferRequest,
    model: Arc<LoadedModel>,
    trace: &mut Option<ActiveTrace>,
) -> Result<ModelInferResponse> {
    // The message is already decoded (within the message size limit); it still counts
    // against the server-wide budget of request bytes in flight while it is served.
    let size = message.encoded_len();
    let _reserved = api::reserve_bytes(state, size)?;
    let config = model.config.clone();
    let mut converted = api::cpu_work(size, move || convert::request(message, &config))
        .await
        .map_err(|e| e.context(format!("model '{}'", model.name())))?;
    // Inputs read from shared memory count against the in-flight budget too.
    let places = std::mem::take(&mut converted.shared_inputs);
    let _shared_reserved =
        api::fill_shared_inputs(state, &mut converted.backend.inputs, places, model.name()).await?;
    let mut request = std::mem::take(&mut converted.backend);
    request.trace = trace.as_ref().map(ActiveTrace::handle);
    let response = model.infer(request).await?;
    if let Some(trace) = trace {
        trace.event("GRPC_SEND_START");
    }
    // Shared-memory outputs are written here: large ones off the async workers.
    let shared: usize = response
        .outputs
        .iter()
        .filter(|t| converted.shared_outputs.iter().any(|(n, _)| *n == t.name))
        .map(|t| t.data.len())
        .sum();
    let (name, version, shm) = (model.name().to_string(), model.version, state.shm.clone());
    api::cpu_work(shared, move || {
        convert::response(&name, version, &converted, response, &shm)
            .map_err(|e| e.context(format!("model '{name}'")))
    })
    .await
}

/// A message of Triton's protocol from the JSON the HTTP front answers with: the two
/// fronts share one source of truth (Triton's JSON is the protobuf JSON of these messages).
fn from_json<M: Message + Default>(full_name: &str, value: serde_json::Value) -> Result<M> {
    static POOL: OnceLock<prost_reflect::DescriptorPool> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(
            include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin")).as_ref(),
        )
        .expect("the descriptors built from proto/")
    });
    let descriptor = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| Error::internal(format!("no message {full_name} in the protocol")))?;
    let options = prost_reflect::DeserializeOptions::new().deny_unknown_fields(false);
    let message =
        prost_reflect::DynamicMessage::deserialize_with_options(descriptor, value, &options)
            .map_err(|e| Error::internal(format!("{full_name} from its JSON: {e}")))?;
    message
        .transcode_to::<M>()
        .map_err(|e| Error::internal(format!("{full_name}: {e}")))
}

type GrpcResult<T> = std::result::Result<Response<T>, Status>;

fn ok<T>(r: Result<T>) -> GrpcResult<T> {
    r.map(Response::new).map_err(|e| status(&e))
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        request: Request<ServerLiveRequest>,
    ) -> GrpcResult<ServerLiveResponse> {
        self.check(request.metadata(), ApiGroup::Health)?;
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        request: Request<ServerReadyRequest>,
    ) -> GrpcResult<ServerReadyResponse> {
        self.check(request.metadata(), ApiGroup::Health)?;
        Ok(Response::new(ServerReadyResponse {
            ready: api::server_ready(&self.state),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> GrpcResult<ModelReadyResponse> {
        self.check(request.metadata(), ApiGroup::Health)?;
        let r = request.into_inner();
        ok((|| {
            let version = version(&r.version)?;
            Ok(ModelReadyResponse {
                ready: self.state.repository.get(&r.name, version).is_ok(),
            })
        })())
    }

    async fn server_metadata(
        &self,
        request: Request<ServerMetadataRequest>,
    ) -> GrpcResult<ServerMetadataResponse> {
        self.check(request.metadata(), ApiGroup::Metadata)?;
        Ok(Response::new(ServerMetadataResponse {
            name: "wisp".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: api::EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> GrpcResult<ModelMetadataResponse> {
        self.check(request.metadata(), ApiGroup::Metadata)?;
        let r = request.into_inner();
        ok((|| {
            let metadata =
                api::model_metadata(&self.state.repository, &r.name, version(&r.version)?)?;
            let tensor = |t: api::TensorMetadata| model_metadata_response::TensorMetadata {
                name: t.name,
                datatype: t.datatype.to_string(),
                shape: t.shape,
            };
            Ok(ModelMetadataResponse {
                name: metadata.name,
                versions: metadata.versions,
                platform: metadata.platform,
                inputs: metadata.inputs.into_iter().map(tensor).collect(),
                outputs: metadata.outputs.into_iter().map(tensor).collect(),
            })
        })())
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> GrpcResult<ModelInferResponse> {
        self.check(request.metadata(), ApiGroup::Inference)?;
        let parent = trace_parent(request.metadata());
        ok(infer(&self.state, request.into_inner(), parent).await)
    }

    /// Requests of a stream run concurrently (up to `STREAM_WINDOW` ahead of the client),
    /// answered in the order they came; requests with a `sequence_id` also start in that
    /// order, each after the previous one finished, so a sequence's steps never overtake
    /// one another. An error answers its own request in the stream; the stream goes on.
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> GrpcResult<tonic::codegen::BoxStream<ModelStreamInferResponse>> {
        self.check(request.metadata(), ApiGroup::Inference)?;
        // A trace context on the stream is the parent of each of its traced requests.
        let parent = trace_parent(request.metadata());
        let mut incoming = request.into_inner();
        let (responses, receiver) = mpsc::channel(STREAM_WINDOW);
        let (order, mut in_order) =
            mpsc::channel::<tokio::task::JoinHandle<ModelStreamInferResponse>>(STREAM_WINDOW);
        let state = self.state.clone();
        tokio::spawn(async move {
            let mut previous_step: Option<oneshot::Receiver<()>> = None;
            loop {
                let message = match incoming.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!("a ModelStreamInfer stream ended: {e}");
                        break;
                    }
                };
                let (done, done_rx) = oneshot::channel();
                let wait_for = if message.parameters.contains_key("sequence_id") {
                    previous_step.replace(done_rx)
                } else {
                    None
                };
                let state = state.clone();
                let parent = parent.clone();
                let task = tokio::spawn(async move {
                    if let Some(previous) = wait_for {
                        let _ = previous.await;
                    }
                    let id = message.id.clone();
                    let result = infer(&state, message, parent).await;
                    let _ = done.send(());
                    match result {
                        Ok(response) => ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        },
                        Err(e) => ModelStreamInferResponse {
                            error_message: e.message,
                            infer_response: Some(ModelInferResponse {
                                id,
                                ..Default::default()
                            }),
                        },
                    }
                });
                if order.send(task).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(task) = in_order.recv().await {
                let response = task.await.unwrap_or_else(|e| ModelStreamInferResponse {
                    error_message: format!("the request failed: {e}"),
                    infer_response: None,
                });
                if responses.send(Ok(response)).await.is_err() {
                    break; // the client left
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> GrpcResult<ModelConfigResponse> {
        self.check(request.metadata(), ApiGroup::ModelConfig)?;
        let r = request.into_inner();
        ok((|| {
            let model = self.state.repository.get(&r.name, version(&r.version)?)?;
            let config =
                from_json::<ModelConfig>("inference.ModelConfig", model.config.to_triton_json())?;
            Ok(ModelConfigResponse {
                config: Some(config),
            })
        })())
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> GrpcResult<ModelStatisticsResponse> {
        self.check(request.metadata(), ApiGroup::Statistics)?;
        let r = request.into_inner();
        ok((|| {
            let name = (!r.name.is_empty()).then_some(r.name.as_str());
            let stats = api::model_statistics(&self.state.repository, name, version(&r.version)?)?;
            from_json("inference.ModelStatisticsResponse", stats)
        })())
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> GrpcResult<RepositoryIndexResponse> {
        self.check(request.metadata(), ApiGroup::ModelRepository)?;
        let r = request.into_inner();
        ok(from_json(
            "inference.RepositoryIndexResponse",
            serde_json::json!({ "models": self.state.repository.index(r.ready) }),
        ))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> GrpcResult<RepositoryModelLoadResponse> {
        self.check(request.metadata(), ApiGroup::ModelRepository)?;
        let r = request.into_inner();
        let keys: Vec<&str> = r.parameters.keys().map(String::as_str).collect();
        let config = match r.parameters.get("config").and_then(|p| p.parameter_choice.as_ref()) {
            None => None,
            Some(model_repository_parameter::ParameterChoice::StringParam(text)) => Some(text.clone()),
            Some(other) => {
                return Err(status(&Error::invalid(format!(
                    "failed to load '{}': parameter 'config' must be a string_param holding the model configuration as JSON, got {other:?}",
                    r.model_name
                ))))
            }
        };
        ok(
            api::load_or_unload(&self.state.repository, &r.model_name, true, &keys, config)
                .await
                .map(|()| RepositoryModelLoadResponse {}),
        )
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> GrpcResult<RepositoryModelUnloadResponse> {
        self.check(request.metadata(), ApiGroup::ModelRepository)?;
        let r = request.into_inner();
        let keys: Vec<&str> = r.parameters.keys().map(String::as_str).collect();
        ok(
            api::load_or_unload(&self.state.repository, &r.model_name, false, &keys, None)
                .await
                .map(|()| RepositoryModelUnloadResponse {}),
        )
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<SystemSharedMemoryStatusRequest>,
    ) -> GrpcResult<SystemSharedMemoryStatusResponse> {
        self.check(request.metadata(), ApiGroup::SharedMemory)?;
        let r = request.into_inner();
        let name = (!r.name.is_empty()).then_some(r.name.as_str());
        ok((|| {
            let status = self.state.shm.status(name)?;
            let regions = status
                .as_array()
                .into_iter()
                .flatten()
                .map(|region| {
                    let text = |k: &str| region[k].as_str().unwrap_or_default().to_string();
                    let number = |k: &str| region[k].as_u64().unwrap_or(0);
                    (
                        text("name"),
                        system_shared_memory_status_response::RegionStatus {
                            name: text("name"),
                            key: text("key"),
                            offset: number("offset"),
                            byte_size: number("byte_size"),
                        },
                    )
                })
                .collect();
            Ok(SystemSharedMemoryStatusResponse { regions })
        })())
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<SystemSharedMemoryRegisterRequest>,
    ) -> GrpcResult<SystemSharedMemoryRegisterResponse> {
        self.check(request.metadata(), ApiGroup::SharedMemory)?;
        let r = request.into_inner();
        ok(self
            .state
            .shm
            .register(&r.name, &r.key, r.offset, r.byte_size)
            .map(|()| SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> GrpcResult<SystemSharedMemoryUnregisterResponse> {
        self.check(request.metadata(), ApiGroup::SharedMemory)?;
        let r = request.into_inner();
        let name = (!r.name.is_empty()).then_some(r.name.as_str());
        ok(self
            .state
            .shm
            .unregister(name)
            .map(|()| SystemSharedMemoryUnregisterResponse {}))
    }

    async fn cuda_shared_memory_status(
        &self,
        request: Request<CudaSharedMemoryStatusRequest>,
    ) -> GrpcResult<CudaSharedMemoryStatusResponse> {
        self.check(request.metadata(), ApiGroup::SharedMemory)?;
        Ok(Response::new(CudaSharedMemoryStatusResponse::default()))
    }

    async fn cuda_shared_memory_register(
        &self,
        request: Request<CudaSharedMemoryRegisterRequest>,
    ) -> GrpcResult<CudaSharedMemoryRegisterResponse> {
        self.check(request.metadata(), ApiGroup::SharedMemory)?;
        Err(status(&no_cuda_shared_memory()))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        request: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> GrpcResult<CudaSharedMemoryUnregisterResponse> {
        self.check(request.metadata(), ApiGroup::SharedMemory)?;
        Err(status(&no_cuda_shared_memory()))
    }

    async fn trace_setting(
        &self,
        request: Request<TraceSettingRequest>,
    ) -> GrpcResult<TraceSettingResponse> {
        self.check(request.metadata(), ApiGroup::Trace)?;
        let r = request.into_inner();
        ok((|| {
            let model = (!r.model_name.is_empty()).then_some(r.model_name.as_str());
            if let Some(m) = model {
                self.state.repository.check_known(m)?;
            }
            let settings = if r.settings.is_empty() {
                self.state.tracing.settings(model)
            } else {
                // An empty value list clears the setting (Triton's protocol).
                let changes: Vec<_> = r
                    .settings
                    .into_iter()
                    .map(|(k, v)| (k, Some(v.value).filter(|v| !v.is_empty())))
                    .collect();
                self.state.tracing.update(model, &changes)?
            };
            Ok(TraceSettingResponse {
                settings: settings
                    .into_iter()
                    .map(|(k, v)| {
                        let value = match v {
                            crate::trace::SettingValue::One(s) => vec![s],
                            crate::trace::SettingValue::List(l) => l,
                        };
                        (k, trace_setting_response::SettingValue { value })
                    })
                    .collect(),
            })
        })())
    }

    async fn log_settings(
        &self,
        request: Request<LogSettingsRequest>,
    ) -> GrpcResult<LogSettingsResponse> {
        self.check(request.metadata(), ApiGroup::Logging)?;
        use crate::log::{LogControl, SettingValue};
        use log_settings_request::setting_value::ParameterChoice as In;
        use log_settings_response::setting_value::ParameterChoice as Out;
        let control = LogControl::global();
        request
            .into_inner()
            .settings
            .into_iter()
            .map(|(name, value)| {
                let value = match value.parameter_choice {
                    Some(In::BoolParam(b)) => SettingValue::Bool(b),
                    Some(In::Uint32Param(n)) => SettingValue::Number(n.into()),
                    Some(In::StringParam(s)) => SettingValue::Text(s),
                    None => {
                        return Err(Error::invalid(format!("log setting '{name}' has no value")))
                    }
                };
                Ok((name, value))
            })
            .collect::<Result<Vec<_>>>()
            .and_then(|settings| control.update(settings))
            .map_err(|e| status(&e))?;
        let settings = control
            .settings()
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(name, value)| {
                let choice = match value {
                    serde_json::Value::Bool(b) => Out::BoolParam(*b),
                    serde_json::Value::Number(n) => Out::Uint32Param(n.as_u64()? as u32),
                    serde_json::Value::String(s) => Out::StringParam(s.clone()),
                    _ => return None,
                };
                let value = log_settings_response::SettingValue {
                    parameter_choice: Some(choice),
                };
                Some((name.clone(), value))
            })
            .collect();
        Ok(Response::new(LogSettingsResponse { settings }))
    }
}

fn no_cuda_shared_memory() -> Error {
    Error::invalid(
        "CUDA shared memory is not supported by this server; use system shared memory (with --allow-client-shm true)",
    )
}

/// `grpc.health.v1.Health`: SERVING once the server is ready (as `ServerReady`).
#[derive(Clone)]
pub struct HealthService {
    state: Arc<ServerState>,
}

impl HealthService {
    pub fn new(state: Arc<ServerState>) -> Self {
        HealthService { state }
    }
}

#[tonic::async_trait]
impl health_pb::health_server::Health for HealthService {
    async fn check(
        &self,
        request: Request<health_pb::HealthCheckRequest>,
    ) -> GrpcResult<health_pb::HealthCheckResponse> {
        use health_pb::health_check_response::ServingStatus;
        let service = request.into_inner().service;
        if !service.is_empty() && service != SERVICE_NAME {
            return Err(Status::not_found(format!(
                "unknown service '{service}'; this server has '{SERVICE_NAME}'"
            )));
        }
        let status = if api::server_ready(&self.state) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        Ok(Response::new(health_pb::HealthCheckResponse {
            status: status as i32,
        }))
    }
}

/// The gRPC services as one tower service for the connection loop, with message size
/// limits and gzip (Triton's clients can ask for it).
pub fn routes(
    state: Arc<ServerState>,
    restrictions: Vec<Restriction>,
    max_message_bytes: usize,
) -> tonic::service::Routes {
    use tonic::codec::CompressionEncoding;
    let inference = pb::grpc_inference_service_server::GrpcInferenceServiceServer::new(
        InferenceService::new(state.clone(), restrictions),
    )
    .max_decoding_message_size(max_message_bytes)
    .max_encoding_message_size(max_message_bytes)
    .accept_compressed(CompressionEncoding::Gzip)
    .send_compressed(CompressionEncoding::Gzip);
    let health = health_pb::health_server::HealthServer::new(HealthService::new(state));
    tonic::service::Routes::new(inference).add_service(health)
}
