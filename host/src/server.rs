//! `wisp serve`: the HTTP and metrics listeners, the poll loop, graceful shutdown.

use crate::api::{self, ServerState};
use crate::backend::wasm::WasmRuntime;
use crate::cli::ServeArgs;
use crate::metrics::Metrics;
use crate::repository::{ControlMode, Repository};
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

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let runtime = WasmRuntime::new().context("starting the WebAssembly runtime")?;
    let repository = Repository::new(
        args.model_repository.clone(),
        args.model_control_mode,
        runtime,
        metrics.clone(),
    )
    .map_err(|e| anyhow::anyhow!(e.message))?;
    let state = Arc::new(ServerState {
        repository: repository.clone(),
        metrics: metrics.clone(),
        restrictions: args.http_restricted_api.clone(),
        max_body_bytes: args.http_max_body_bytes,
        ready: false.into(),
        strict_readiness: args.strict_readiness,
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
    tracing::info!(
        http = %http.local_addr()?,
        metrics = %metrics_listener.local_addr()?,
        repository = %args.model_repository.display(),
        mode = ?args.model_control_mode,
        "wisp listening"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics_task = tokio::spawn(serve_metrics(
        metrics_listener,
        metrics.clone(),
        stop_rx.clone(),
    ));

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
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let service = service_fn(move |req| api::handle(state.clone(), req));
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(args.http_header_read_timeout_secs.max(1)));
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("connection ended with an error: {e}");
                    }
                });
            }
            _ = &mut signal => break,
        }
    }

    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    state.ready.store(false, Ordering::Release);
    drop(http);
    let _ = stop_tx.send(true);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(Duration::from_secs(args.exit_timeout_secs)) => {
            tracing::warn!("in-flight requests did not finish within {}s; exiting", args.exit_timeout_secs)
        }
    }
    loader.abort();
    metrics_task.abort();
    Ok(())
}

async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
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
        let metrics = metrics.clone();
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
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
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
