//! `wisp serve`'s command-line arguments.

use crate::api::Restriction;
use clap::Args;
use std::path::PathBuf;
use wisp_serving::repository::ControlMode;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Folder with one subfolder per model (config.toml and numbered versions).
    #[arg(long)]
    pub model_repository: PathBuf,
    /// Address to bind the HTTP and metrics ports on.
    #[arg(long, default_value = "0.0.0.0")]
    pub http_address: String,
    #[arg(long, default_value_t = 8000)]
    pub http_port: u16,
    /// Port of the Prometheus metrics endpoint (`/metrics`).
    #[arg(long, default_value_t = 8002)]
    pub metrics_port: u16,
    #[arg(long, default_value_t = ControlMode::None)]
    pub model_control_mode: ControlMode,
    /// Model to load at startup in explicit mode; repeatable; `*` loads all.
    #[arg(long = "load-model")]
    pub load_model: Vec<String>,
    /// How often poll mode rescans the repository.
    #[arg(long, default_value_t = 15)]
    pub repository_poll_secs: u64,
    /// Restrict API groups to requests carrying a header: `model-repository:HEADER=VALUE`
    /// (groups: health, metadata, inference, model-config, model-repository, statistics;
    /// comma-separated). Repeatable.
    #[arg(long = "http-restricted-api")]
    pub http_restricted_api: Vec<Restriction>,
    /// Largest request body accepted (after decompression), in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub http_max_body_bytes: usize,
    /// Report ready only when every model that should be loaded is ready (Triton's default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub strict_readiness: bool,
    /// Seconds a client may take to send request headers before the connection is closed.
    #[arg(long, default_value_t = 30)]
    pub http_header_read_timeout_secs: u64,
    /// Seconds a client may take to send a whole request body (a trickled upload is cut off).
    #[arg(long, default_value_t = 60)]
    pub http_body_timeout_secs: u64,
    /// Seconds a connection may stay open without a request in progress.
    #[arg(long, default_value_t = 60)]
    pub http_idle_timeout_secs: u64,
    /// Connections the HTTP port holds at once; more are closed as they arrive.
    #[arg(long, default_value_t = 2048)]
    pub http_max_connections: usize,
    /// Bytes of inference request bodies held at once, server-wide; past it requests get 503.
    #[arg(long, default_value_t = 1 << 30)]
    pub http_max_inflight_bytes: usize,
    /// HTTP/2 streams one connection may have open at once.
    #[arg(long, default_value_t = 256)]
    pub http2_max_concurrent_streams: u32,
    /// Serve the gRPC protocol (Triton's GRPCInferenceService and grpc.health.v1).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_grpc: bool,
    /// Let clients register system shared-memory regions (/dev/shm) for inputs and
    /// outputs (Triton's system shared-memory extension). Only for clients you trust
    /// on this machine: a region names a file of theirs that the server reads and writes.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_client_shm: bool,
    /// Address to bind the gRPC port on (default: --http-address).
    #[arg(long)]
    pub grpc_address: Option<String>,
    #[arg(long, default_value_t = 8001)]
    pub grpc_port: u16,
    /// Restrict gRPC API groups to requests carrying a metadata key: `inference:KEY=VALUE`
    /// (Triton's `--grpc-restricted-protocol`; the groups as --http-restricted-api). Repeatable.
    #[arg(long = "grpc-restricted-protocol")]
    pub grpc_restricted_protocol: Vec<Restriction>,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub grpc_max_message_bytes: usize,
    /// Connections the gRPC port holds at once; more are closed as they arrive.
    #[arg(long, default_value_t = 1024)]
    pub grpc_max_connections: usize,
    /// Tracing (Triton's spelling): `level=TIMESTAMPS`, `rate=N` (every N-th request),
    /// `count=N` (-1: no limit), `mode=opentelemetry`, `opentelemetry,url=URL` (OTLP/HTTP,
    /// default http://localhost:4318/v1/traces), `opentelemetry,resource=KEY=VALUE`,
    /// `opentelemetry,bsp_max_queue_size=N`, `bsp_schedule_delay=MS`,
    /// `bsp_max_export_batch_size=N`. Repeatable.
    #[arg(long = "trace-config")]
    pub trace_config: Vec<String>,
    /// Microseconds a model instance that finished a batch keeps looking for the next
    /// one before its thread sleeps: a request arriving meanwhile starts without a thread
    /// wake-up (lower latency under steady traffic), at the price of that much CPU after
    /// each batch. 0 sleeps at once (for CPU quotas); at most 10000.
    #[arg(long, default_value_t = 300)]
    pub instance_idle_spin_us: u64,
    /// How long shutdown waits for in-flight requests before it gives up.
    #[arg(long, default_value_t = 30)]
    pub exit_timeout_secs: u64,
    /// Folder of compiled Wasm components, so each component compiles once across loads
    /// and restarts (default: $XDG_CACHE_HOME/wisp/wasm, else ~/.cache/wisp/wasm; `off`:
    /// compile at every load). Only this user may write it: the server runs code from it.
    #[arg(long)]
    pub wasm_cache_dir: Option<PathBuf>,
    /// Most MiB the Wasm cache keeps (the least recently used entries go first).
    #[arg(long, default_value_t = 4096)]
    pub wasm_cache_max_mib: u64,
}
