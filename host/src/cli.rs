//! Command-line interface.

use crate::api::Restriction;
use crate::repository::ControlMode;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "wisp",
    version,
    about = "An inference server for NLP models with sandboxed WebAssembly plugins"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the models of a model repository over HTTP.
    Serve(ServeArgs),
    /// Measure a served model: latency and throughput at each concurrency (like perf_analyzer).
    Perf(crate::perf::PerfArgs),
    /// Turn a Hugging Face checkpoint folder into model repository entries
    /// (tokenizer, encoder and pipeline), ready to serve.
    Import(crate::import::ImportArgs),
    /// GPU encoder checks and benchmarks: kernels against their CPU twins, models
    /// against the CPU encoder, throughput and latency.
    Gpu(crate::gpu_cli::GpuArgs),
}

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
    #[arg(long, value_enum, default_value_t = ControlMode::None)]
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
    /// How long shutdown waits for in-flight requests before it gives up.
    #[arg(long, default_value_t = 30)]
    pub exit_timeout_secs: u64,
}
