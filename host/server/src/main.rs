mod commands;

use clap::{Parser, Subcommand};
use commands::perf;
#[cfg(feature = "encoder")]
use commands::{gpu, import};

#[derive(Parser, Debug)]
#[command(
    name = "wisp",
    version,
    about = "An inference server for NLP models with sandboxed WebAssembly plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the models of a model repository over HTTP.
    Serve(wisp::cli::ServeArgs),
    /// Measure a served model: latency and throughput at each concurrency (like perf_analyzer).
    Perf(perf::PerfArgs),
    /// Turn a Hugging Face checkpoint folder into model repository entries
    /// (tokenizer, encoder and pipeline), ready to serve.
    #[cfg(feature = "encoder")]
    Import(import::ImportArgs),
    /// GPU encoder checks and benchmarks: kernels against their CPU twins, models
    /// against the CPU encoder, throughput and latency.
    #[cfg(feature = "encoder")]
    Gpu(gpu::GpuArgs),
}

fn main() -> std::process::ExitCode {
    // Before any thread exists: it sets an environment variable OpenBLAS reads at load.
    #[cfg(feature = "encoder")]
    let openblas_kernel = wisp_backend_encoder::linear::choose_openblas_kernel();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WISP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    #[cfg(feature = "encoder")]
    if let Some(kernel) = openblas_kernel {
        tracing::debug!(kernel, "OPENBLAS_CORETYPE set for this CPU's AVX-512");
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(wisp::server::serve(args)),
        Command::Perf(args) => runtime.block_on(perf::run(args)),
        #[cfg(feature = "encoder")]
        Command::Import(args) => import::run(args),
        #[cfg(feature = "encoder")]
        Command::Gpu(args) => gpu::run(args).map_err(anyhow::Error::from),
    };
    // Do not wait on blocking tasks (a model still loading) past shutdown.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
