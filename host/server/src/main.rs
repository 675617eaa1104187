mod commands;

use clap::{Parser, Subcommand};
#[cfg(feature = "encoder")]
use commands::{gpu, import, quantize};
use commands::{perf, plugin};

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
    /// Start a plugin from a template (Rust or Python), or build one into a component.
    Plugin(plugin::PluginArgs),
    /// Turn a Hugging Face checkpoint folder into model repository entries
    /// (tokenizer, encoder and pipeline), ready to serve.
    #[cfg(feature = "encoder")]
    Import(import::ImportArgs),
    /// Quantize a Hugging Face checkpoint folder to INT8 (calibrated, with an accuracy
    /// report) into a new checkpoint folder that import and serve load as any other.
    #[cfg(feature = "encoder")]
    Quantize(quantize::QuantizeArgs),
    /// GPU encoder checks and benchmarks: kernels against their CPU twins, models
    /// against the CPU encoder, throughput and latency.
    #[cfg(feature = "encoder")]
    Gpu(gpu::GpuArgs),
}

/// Without WISP_LOG: INFO and up from every crate, and wisp's own DEBUG and TRACE when
/// the logging extension raises the verbose level at run time.
const DEFAULT_LOG_FILTER: &str = "info,wisp=trace,wisp_core=trace,wisp_serving=trace,\
                                  wisp_backend_wasm=trace,wisp_backend_encoder=trace";

fn init_logging() {
    use tracing_subscriber::filter::{filter_fn, EnvFilter, LevelFilter};
    use tracing_subscriber::prelude::*;
    let (env_filter, verbose) = match EnvFilter::try_from_env("WISP_LOG") {
        // WISP_LOG's most verbose level sets the starting verbose level.
        Ok(filter) => {
            let verbose = match filter.max_level_hint() {
                Some(LevelFilter::TRACE) => 2,
                Some(LevelFilter::DEBUG) => 1,
                _ => 0,
            };
            (filter, verbose)
        }
        Err(_) => (EnvFilter::new(DEFAULT_LOG_FILTER), 0),
    };
    wisp::log::LogControl::global().set_verbose(verbose);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(env_filter)
        .with_filter(filter_fn(|metadata| {
            wisp::log::LogControl::global().enabled(metadata.level())
        }));
    // Not `.init()`: it would let every `log` record through to the filters (its level follows
    // wisp's own TRACE), and tokenizers writes `log::trace!` in its inner loops: that made the
    // host's `tokenize` 4.5x slower. Dependencies' `log` records stop at INFO unless WISP_LOG
    // asks for more (the verbose level concerns wisp's own crates only).
    let log_level = match verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    if let Err(e) =
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
    {
        eprintln!("wisp: cannot set up logging: {e}");
        return;
    }
    if let Err(e) = tracing_log::LogTracer::builder()
        .with_max_level(log_level)
        .init()
    {
        eprintln!("wisp: cannot forward other crates' log records: {e}");
    }
}

fn main() -> std::process::ExitCode {
    // Before any thread exists: it sets an environment variable OpenBLAS reads at load.
    #[cfg(feature = "encoder")]
    let openblas_kernel = wisp_backend_encoder::linear::choose_openblas_kernel();
    init_logging();
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
        Command::Plugin(args) => plugin::run(args),
        #[cfg(feature = "encoder")]
        Command::Import(args) => import::run(args),
        #[cfg(feature = "encoder")]
        Command::Quantize(args) => quantize::run(args),
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
