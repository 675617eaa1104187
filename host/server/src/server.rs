//! `wisp serve`: the HTTP and metrics listeners, the poll loop, graceful shutdown.

use crate::api::{self, ServerState};
use crate::cli::ServeArgs;
use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
#[cfg(feature = "wasm")]
use wisp_backend_wasm::{WasmFactory, WasmRuntime};
use wisp_core::backend::BackendRegistry;
use wisp_serving::metrics::Metrics;
use wisp_serving::repository::{ControlMode, Repository};

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Every backend this server binary has, by the name a config's `backend` uses:
/// those of the crate features `wasm` and `encoder` (both on by default).
#[cfg_attr(not(feature = "wasm"), allow(unused_variables))]
pub fn backends(args: &ServeArgs) -> anyhow::Result<BackendRegistry> {
    #[cfg_attr(not(any(feature = "wasm", feature = "encoder")), allow(unused_mut))]
    let mut registry = BackendRegistry::new();
    #[cfg(feature = "wasm")]
    {
        let runtime =
            WasmRuntime::new(wasm_cache(args)?).map_err(|e| anyhow::anyhow!(e.message))?;
        registry.register("wasm", Arc::new(WasmFactory::new(runtime)));
    }
    #[cfg(feature = "encoder")]
    registry.register("encoder", Arc::new(wisp_backend_encoder::EncoderFactory));
    Ok(registry)
}

/// The Wasm compilation cache: the folder asked for (which must work), else the user's
/// cache folder (without a cache, and a warning, where it cannot be used).
#[cfg(feature = "wasm")]
fn wasm_cache(args: &ServeArgs) -> anyhow::Result<Option<wisp_backend_wasm::cache::CompileCache>> {
    use std::path::PathBuf;
    use wisp_backend_wasm::cache::CompileCache;
    let max_bytes = args.wasm_cache_max_mib.saturating_mul(1 << 20);
    match &args.wasm_cache_dir {
        Some(dir) if dir.as_os_str() == "off" => Ok(None),
        Some(dir) => CompileCache::open(dir, max_bytes)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--wasm-cache-dir: {}", e.message)),
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .filter(|v| !v.is_empty())
                        .map(|h| PathBuf::from(h).join(".cache"))
                });
            let Some(base) = base else {
                tracing::warn!("no HOME or XDG_CACHE_HOME: Wasm components compile at every load (--wasm-cache-dir sets a folder)");
                return Ok(None);
            };
            match CompileCache::open(base.join("wisp").join("wasm"), max_bytes) {
                Ok(cache) => Ok(Some(cache)),
                Err(e) => {
                    tracing::warn!("{}; Wasm components compile at every load", e.message);
                    Ok(None)
                }
            }
        }
    }
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.instance_idle_spin_us > wisp_core::worker::MAX_IDLE_SPIN_US {
        anyhow::bail!(
            "--instance-idle-spin-us {}: at most {}",
            args.instance_idle_spin_us,
            wisp_core::worker::MAX_IDLE_SPIN_US
        );
    }
    wisp_core::worker::set_idle_spin(Duration::from_micros(args.instance_idle_spin_us));
    let metrics = Arc::new(Metrics::new());
    #[cfg(feature = "encoder")]
    if let Some(gpus) = wisp_backend_encoder::gpu::monitor::GpuMetrics::open() {
        metrics
            .register(Box::new(gpus))
            .map_err(anyhow::Error::msg)?;
    }
    let repository = Repository::new(
        args.model_repository.clone(),
        args.model_control_mode,
        backends(&args)?,
        metrics.clone(),
    )
    .map_err(|e| anyhow::anyhow!(e.message))?;
    let state = Arc::new(ServerState {
        repository: repository.clone(),
        metrics: metrics.clone(),
        restrictions: args.http_restricted_api.clone(),
        max_body_bytes: args.http_max_body_bytes,
        body_timeout: Duration::from_secs(args.http_body_timeout_secs.max(1)),
        inflight_kib: Arc::new(tokio::sync::Semaphore::new(
            args.http_max_inflight_bytes.div_ceil(1024).max(1),
        )),
        inflight_limit_bytes: args.http_max_inflight_bytes,
        ready: false.into(),
        strict_readiness: args.strict_readiness,
        http_metrics: api::HttpMetrics::register(&metrics).map_err(anyhow::Error::msg)?,
        shm: Arc::new(api::shm::SystemSharedMemory::new(args.allow_client_shm)),
        tracing: crate::trace::Tracing::new(
            &crate::trace::TraceConfig::from_args(&args.trace_config)
                .map_err(|e| anyhow::anyhow!(e.message))?,
        )?,
    });

    let http = TcpListener::bind((args.http_address.as_str(), args.http_port))
        .await
        .with_context(|| {
            format!(
                "binding the HTTP port {}:{}",
                args.http_address, args.http_port
            )
        })?;
    let metrics_listener = TcpListener::bind((args.http_address.as_str(), args.metrics_port))
        .await
        .with_context(|| {
            format!(
                "binding the metrics port {}:{}",
                args.http_address, args.metrics_port
            )
        })?;
    #[cfg(not(feature = "grpc"))]
    if args.allow_grpc {
        anyhow::bail!("this wisp was built without the gRPC front (feature `grpc`); start it with --allow-grpc false");
    }
    let grpc = if args.allow_grpc {
        let address = args.grpc_address.as_deref().unwrap_or(&args.http_address);
        Some(
            TcpListener::bind((address, args.grpc_port))
                .await
                .with_context(|| format!("binding the gRPC port {address}:{}", args.grpc_port))?,
        )
    } else {
        None
    };
    tracing::info!(
        http = %http.local_addr()?,
        grpc = %grpc.as_ref().map(|l| l.local_addr().map(|a| a.to_string())).transpose()?.unwrap_or_else(|| "off".into()),
        metrics = %metrics_listener.local_addr()?,
        repository = %args.model_repository.display(),
        mode = ?args.model_control_mode,
        "wisp listening"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let http_limits = ConnectionLimits {
        header_read_timeout: Duration::from_secs(args.http_header_read_timeout_secs.max(1)),
        idle_timeout: Duration::from_secs(args.http_idle_timeout_secs.max(1)),
        max_concurrent_streams: args.http2_max_concurrent_streams.max(1),
        hold_during_body: false,
    };
    let metrics_task = tokio::spawn(serve_metrics(
        metrics_listener,
        metrics.clone(),
        stop_rx.clone(),
        ConnectionLimits {
            max_concurrent_streams: 16,
            ..http_limits
        },
    ));
    let connections = Arc::new(tokio::sync::Semaphore::new(
        args.http_max_connections.max(1),
    ));
    let grpc_connections = Arc::new(tokio::sync::Semaphore::new(
        args.grpc_max_connections.max(1),
    ));
    #[cfg(feature = "grpc")]
    let grpc_routes = crate::grpc::routes(
        state.clone(),
        args.grpc_restricted_protocol.clone(),
        args.grpc_max_message_bytes,
    );

    // Models load while the server already answers health and index requests.
    let loader = {
        let (repository, state, names) =
            (repository.clone(), state.clone(), args.load_model.clone());
        let poll_secs = args.repository_poll_secs.max(1);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            repository.load_startup(&names).await;
            state.ready.store(true, Ordering::Release);
            tracing::info!("startup loading finished; server ready");
            if repository.mode() == ControlMode::Poll {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(poll_secs)) => repository.poll().await,
                        _ = stop.changed() => break,
                    }
                }
            }
        })
    };

    let graceful = GracefulShutdown::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            accepted = http.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    tracing::debug!("connection limit reached (--http-max-connections); closing a new connection");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let service = move |req| api::handle(state.clone(), req);
                let watched = graceful.watcher();
                tokio::spawn(async move {
                    serve_connection(stream, service, http_limits, Some(watched)).await;
                    drop(permit);
                });
            }
            accepted = accept(grpc.as_ref()) => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!("gRPC accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(permit) = grpc_connections.clone().try_acquire_owned() else {
                    tracing::debug!("connection limit reached (--grpc-max-connections); closing a new connection");
                    continue;
                };
                #[cfg(feature = "grpc")]
                serve_grpc(stream, permit, &grpc_routes, http_limits, graceful.watcher());
                #[cfg(not(feature = "grpc"))]
                drop((stream, permit));
            }
            _ = &mut signal => break,
        }
    }

    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    state.ready.store(false, Ordering::Release);
    drop(http);
    drop(grpc);
    let _ = stop_tx.send(true);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(Duration::from_secs(args.exit_timeout_secs)) => {
            tracing::warn!("in-flight requests did not finish within {}s; exiting", args.exit_timeout_secs)
        }
    }
    loader.abort();
    metrics_task.abort();
    // Spans still buffered leave now (bounded by the exporter's timeout); off the async
    // workers, as the exporter's HTTP client blocks.
    let tracing = state.tracing.clone();
    let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
    Ok(())
}

/// Timeouts and limits of one connection (HTTP/1 or HTTP/2).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// HTTP/1: the request headers must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection without a request in progress for this long is closed.
    pub idle_timeout: Duration,
    pub max_concurrent_streams: u32,
    /// A response counts as a request in progress until its body is sent (gRPC streams),
    /// not only until its head is ready (HTTP, where a client that stops reading a
    /// response is idle).
    pub hold_during_body: bool,
}

/// Serves one gRPC connection: the same limits as HTTP, but a stream counts as
/// activity until its last message is sent.
#[cfg(feature = "grpc")]
fn serve_grpc(
    stream: tokio::net::TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
    routes: &tonic::service::Routes,
    limits: ConnectionLimits,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let _ = stream.set_nodelay(true);
    let routes = routes.clone();
    let service = move |req: hyper::Request<hyper::body::Incoming>| {
        use tonic::codegen::Service;
        let mut routes = routes.clone();
        async move {
            let response = routes.call(req.map(tonic::body::Body::new)).await;
            Ok::<_, std::convert::Infallible>(response.unwrap_or_else(|never| match never {}))
        }
    };
    let limits = ConnectionLimits {
        hold_during_body: true,
        ..limits
    };
    tokio::spawn(async move {
        serve_connection(stream, service, limits, Some(watcher)).await;
        drop(permit);
    });
}

/// The next connection of an optional listener (never, without one).
async fn accept(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// A response body that holds its request's in-progress mark until it is done.
struct TrackedBody<B> {
    inner: B,
    _in_progress: Option<InProgress>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Requests in progress on one connection and when the last one started or ended.
#[derive(Default)]
struct Activity {
    in_progress: std::sync::atomic::AtomicUsize,
    last: parking_lot::Mutex<Option<tokio::time::Instant>>,
}

impl Activity {
    fn touch(&self) {
        *self.last.lock() = Some(tokio::time::Instant::now());
    }
}

/// Counts a request as in progress until it is answered (or dropped).
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// Serves one connection with the limits: HTTP/1 header timeout, HTTP/2 keepalive
/// pings and stream limit, and an idle timeout that closes a connection with no
/// request in progress (an idle socket, an h2c connection that never sends, a
/// client that stopped reading its response).
async fn serve_connection<F, Fut, B>(
    stream: tokio::net::TcpStream,
    handler: F,
    limits: ConnectionLimits,
    graceful: Option<hyper_util::server::graceful::Watcher>,
) where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<hyper::Response<B>, std::convert::Infallible>>
        + Send
        + 'static,
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::default());
    activity.touch();
    let handler = Arc::new(handler);
    let service = {
        let activity = activity.clone();
        service_fn(move |req| {
            activity.in_progress.fetch_add(1, Ordering::AcqRel);
            activity.touch();
            let guard = InProgress(activity.clone());
            let response = handler(req);
            let hold = limits.hold_during_body;
            async move {
                let response = response.await;
                let guard = hold.then_some(guard);
                response.map(|r| {
                    r.map(|inner| TrackedBody {
                        inner,
                        _in_progress: guard,
                    })
                })
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(64 << 10);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let idle = async {
        loop {
            let last = activity
                .last
                .lock()
                .unwrap_or_else(tokio::time::Instant::now);
            let deadline = last + limits.idle_timeout;
            if tokio::time::Instant::now() >= deadline
                && activity.in_progress.load(Ordering::Acquire) == 0
            {
                return;
            }
            tokio::time::sleep_until(
                deadline.max(tokio::time::Instant::now() + Duration::from_millis(100)),
            )
            .await;
        }
    };
    let result = match graceful {
        Some(watcher) => {
            let conn = watcher.watch(conn);
            tokio::select! {
                r = conn => r,
                _ = idle => { tracing::debug!("closing an idle connection"); Ok(()) }
            }
        }
        None => {
            tokio::select! {
                r = conn => r,
                _ = idle => { tracing::debug!("closing an idle connection"); Ok(()) }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection ended with an error: {e}");
    }
}

/// Connections the metrics port holds at once (scrapers and dashboards).
const METRICS_MAX_CONNECTIONS: usize = 64;

async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    limits: ConnectionLimits,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(METRICS_MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue; // at the limit: close the new connection
        };
        let metrics = metrics.clone();
        let service = move |req: hyper::Request<hyper::body::Incoming>| {
            let metrics = metrics.clone();
            async move {
                let response = if req.uri().path() == "/metrics" {
                    hyper::Response::builder()
                        .header(hyper::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(metrics.render())))
                } else {
                    hyper::Response::builder()
                        .status(404)
                        .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n")))
                };
                Ok::<_, std::convert::Infallible>(response.expect("valid response"))
            }
        };
        tokio::spawn(async move {
            serve_connection(stream, service, limits, None).await;
            drop(permit);
        });
    }
}
