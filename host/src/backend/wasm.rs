//! Models as sandboxed WebAssembly components (`wit/plugin.wit`).
//!
//! One [`WasmRuntime`] (engine + epoch ticker) serves every model. Each model
//! compiles its component once and keeps `count` warm instances; a batch takes a
//! free instance and runs on tokio's blocking pool, never on the async workers.
//! The sandbox: WASI with a read-only preopen of the model's version folder and
//! nothing else (no env, no args, no sockets), a memory cap per instance, and an
//! epoch deadline per call. An instance that traps or times out is dropped and
//! the next batch on that slot gets a fresh one.

use super::{Backend, BackendRequest, BackendResponse, BoxFuture, Execution, ExecutionTimes};
use crate::error::{Error, ErrorKind, Result};
use crate::repository::config::{ModelConfig, ParameterValue};
use crate::tensor::{DataType, Tensor};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
    });
}

use bindings::wisp::plugin::log::Level;
use bindings::wisp::plugin::types as wit;
use bindings::{Plugin, PluginPre};

/// How often the engine's epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// How much of a plugin's stderr is kept to explain a trap (a panic message).
const STDERR_TAIL_BYTES: usize = 4096;
/// Longest log line a plugin may write through `log`.
const MAX_LOG_LINE: usize = 4096;

/// The engine shared by all Wasm models, with the thread that advances its epoch.
#[derive(Clone)]
pub struct WasmRuntime {
    engine: Engine,
}

impl WasmRuntime {
    pub fn new() -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(WasmRuntime { engine })
    }
}

/// What one instance's store holds: its WASI context and limits.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    model: Arc<str>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::wisp::plugin::log::Host for HostState {
    fn log(&mut self, level: Level, mut message: String) {
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let model = &*self.model;
        match level {
            Level::Trace => tracing::trace!(target: "wisp::plugin", model, "{message}"),
            Level::Debug => tracing::debug!(target: "wisp::plugin", model, "{message}"),
            Level::Info => tracing::info!(target: "wisp::plugin", model, "{message}"),
            Level::Warn => tracing::warn!(target: "wisp::plugin", model, "{message}"),
            Level::Error => tracing::error!(target: "wisp::plugin", model, "{message}"),
        }
    }
}

impl bindings::wisp::plugin::types::Host for HostState {}

/// Keeps the last bytes a plugin wrote to stdout/stderr, to explain traps.
#[derive(Clone, Default)]
struct OutputTail(Arc<Mutex<VecDeque<u8>>>);

impl OutputTail {
    fn take(&self) -> String {
        let mut buf = self.0.lock();
        let bytes: Vec<u8> = buf.drain(..).collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }
}

impl tokio::io::AsyncWrite for OutputTail {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut buf = self.0.lock();
        buf.extend(data.iter().rev().take(STDERR_TAIL_BYTES).rev());
        let excess = buf.len().saturating_sub(STDERR_TAIL_BYTES);
        buf.drain(..excess);
        std::task::Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for OutputTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for OutputTail {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// A live instance with the store it runs in.
struct Instance {
    store: Store<HostState>,
    plugin: Plugin,
    output: OutputTail,
}

/// Everything needed to make a fresh instance of one model version.
struct Blueprint {
    pre: PluginPre<HostState>,
    engine: Engine,
    version_dir: PathBuf,
    label: Arc<str>,
    info: wit::ModelInfo,
    memory_limit: usize,
    execution_ticks: u64,
    init_ticks: u64,
}

impl Blueprint {
    fn instantiate(&self) -> Result<Instance> {
        let output = OutputTail::default();
        let mut wasi = WasiCtxBuilder::new();
        wasi.allow_blocking_current_thread(true)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .stdout(output.clone())
            .stderr(output.clone());
        wasi.preopened_dir(&self.version_dir, ".", FsPerms::ReadOnly)
            .map_err(|e| {
                Error::unavailable(format!(
                    "cannot open version folder {}: {e}",
                    self.version_dir.display()
                ))
            })?;
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.memory_limit)
                .trap_on_grow_failure(true)
                .build(),
            model: self.label.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.init_ticks);
        let plugin = self.pre.instantiate(&mut store).map_err(|e| {
            Error::unavailable(format!("instantiating the component failed: {e:#}"))
        })?;
        let mut instance = Instance {
            store,
            plugin,
            output,
        };
        let init = instance
            .plugin
            .wisp_plugin_model()
            .call_init(&mut instance.store, &self.info);
        match init {
            Ok(Ok(())) => Ok(instance),
            Ok(Err(e)) => Err(Error::unavailable(format!(
                "plugin init failed: {}",
                plugin_error(&e).message
            ))),
            Err(trap) => Err(Error::unavailable(format!(
                "plugin init trapped: {}",
                describe_trap(&trap, &instance.output, self.init_ticks, self.memory_limit)
            ))),
        }
    }
}

fn plugin_error(e: &wit::Error) -> Error {
    match e {
        wit::Error::InvalidInput(m) => Error::invalid(m.clone()),
        wit::Error::Unavailable(m) => Error::unavailable(m.clone()),
        wit::Error::Internal(m) => Error::internal(m.clone()),
    }
}

fn describe_trap(
    trap: &wasmtime::Error,
    output: &OutputTail,
    ticks: u64,
    memory_limit: usize,
) -> String {
    let mut text = match trap.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!(
            "execution deadline of {} ms exceeded; the instance was stopped",
            ticks.saturating_sub(1) * EPOCH_TICK.as_millis() as u64
        ),
        _ => {
            let root = trap.root_cause().to_string();
            if root.contains("forcing trap when growing memory") {
                format!(
                    "memory limit of {} MiB exceeded ({root})",
                    memory_limit >> 20
                )
            } else {
                format!("{trap:#}")
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string()
                    + &if root != format!("{trap}") {
                        format!(": {root}")
                    } else {
                        String::new()
                    }
            }
        }
    };
    let tail = output.take();
    if !tail.is_empty() {
        text.push_str(&format!("; plugin output: {tail}"));
    }
    text
}

/// A model version backed by a Wasm component with a pool of warm instances.
pub struct WasmBackend {
    blueprint: Arc<Blueprint>,
    permits: Arc<Semaphore>,
    /// Free slots; a slot is `None` after its instance was discarded.
    free: Arc<Mutex<Vec<Option<Instance>>>>,
}

fn ticks_for(timeout_ms: u64) -> u64 {
    // +1 because the current tick may be about to end.
    timeout_ms.div_ceil(EPOCH_TICK.as_millis() as u64) + 1
}

fn parameter_to_wit(name: &str, value: &ParameterValue) -> wit::Parameter {
    let value = match value {
        ParameterValue::Bool(b) => wit::ParameterValue::Boolean(*b),
        ParameterValue::Int(i) => wit::ParameterValue::Integer(*i),
        ParameterValue::Float(f) => wit::ParameterValue::Double(*f),
        ParameterValue::Text(s) => wit::ParameterValue::Text(s.clone()),
    };
    wit::Parameter {
        name: name.to_string(),
        value,
    }
}

fn parameter_from_wit(p: wit::Parameter) -> (String, ParameterValue) {
    let value = match p.value {
        wit::ParameterValue::Boolean(b) => ParameterValue::Bool(b),
        wit::ParameterValue::Integer(i) => ParameterValue::Int(i),
        wit::ParameterValue::Double(f) => ParameterValue::Float(f),
        wit::ParameterValue::Text(s) => ParameterValue::Text(s),
    };
    (p.name, value)
}

fn datatype_to_wit(d: DataType) -> wit::Datatype {
    match d {
        DataType::Bool => wit::Datatype::Boolean,
        DataType::Uint8 => wit::Datatype::Uint8,
        DataType::Uint16 => wit::Datatype::Uint16,
        DataType::Uint32 => wit::Datatype::Uint32,
        DataType::Uint64 => wit::Datatype::Uint64,
        DataType::Int8 => wit::Datatype::Int8,
        DataType::Int16 => wit::Datatype::Int16,
        DataType::Int32 => wit::Datatype::Int32,
        DataType::Int64 => wit::Datatype::Int64,
        DataType::Fp16 => wit::Datatype::Fp16,
        DataType::Fp32 => wit::Datatype::Fp32,
        DataType::Fp64 => wit::Datatype::Fp64,
        DataType::Bf16 => wit::Datatype::Bf16,
        DataType::Bytes => wit::Datatype::Bytes,
    }
}

fn datatype_from_wit(d: wit::Datatype) -> DataType {
    DataType::ALL
        .into_iter()
        .find(|&h| datatype_to_wit(h) == d)
        .expect("every wit datatype maps")
}

impl WasmBackend {
    /// Compiles the component of `version_dir` and starts its instances.
    /// Blocking: call it off the async runtime.
    pub fn load(
        runtime: &WasmRuntime,
        config: &ModelConfig,
        version: u64,
        version_dir: &Path,
    ) -> Result<Self> {
        let file = version_dir.join(&config.sandbox.component);
        if !file.is_file() {
            return Err(Error::unavailable(format!(
                "component file {} not found (key 'sandbox.component' is '{}')",
                file.display(),
                config.sandbox.component
            )));
        }
        let started = Instant::now();
        let component = Component::from_file(&runtime.engine, &file).map_err(|e| {
            Error::unavailable(format!(
                "{} is not a valid component: {e:#}",
                file.display()
            ))
        })?;
        let mut linker: Linker<HostState> = Linker::new(&runtime.engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .and_then(|_| Plugin::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s))
            .map_err(|e| Error::internal(format!("linking host functions failed: {e:#}")))?;
        let pre = linker.instantiate_pre(&component).map_err(|e| {
            Error::unavailable(format!(
                "{} needs imports the sandbox does not grant, or is not a wisp:plugin component: {e:#}",
                file.display()
            ))
        })?;
        let pre = PluginPre::new(pre).map_err(|e| {
            Error::unavailable(format!(
                "{} does not export wisp:plugin/model: {e:#}",
                file.display()
            ))
        })?;
        let blueprint = Arc::new(Blueprint {
            pre,
            engine: runtime.engine.clone(),
            version_dir: version_dir.to_path_buf(),
            label: format!("{}:{version}", config.name).into(),
            info: wit::ModelInfo {
                name: config.name.clone(),
                version,
                max_batch_size: config.max_batch_size,
                parameters: config
                    .parameters
                    .iter()
                    .map(|(k, v)| parameter_to_wit(k, v))
                    .collect(),
            },
            memory_limit: usize::try_from(config.sandbox.memory_limit_mib << 20)
                .unwrap_or(usize::MAX),
            execution_ticks: ticks_for(config.sandbox.execution_timeout_ms),
            init_ticks: ticks_for(config.sandbox.init_timeout_ms),
        });
        let count = config.instance_count();
        let mut instances = Vec::with_capacity(count);
        for _ in 0..count {
            instances.push(Some(blueprint.instantiate()?));
        }
        tracing::info!(
            model = %blueprint.label,
            instances = count,
            ms = started.elapsed().as_millis() as u64,
            "compiled and started wasm component"
        );
        Ok(WasmBackend {
            blueprint,
            permits: Arc::new(Semaphore::new(count)),
            free: Arc::new(Mutex::new(instances)),
        })
    }
}

/// Runs one batch on a slot, replacing the slot's instance if it is gone or broke.
fn run_batch(
    blueprint: &Blueprint,
    slot: &mut Option<Instance>,
    requests: Vec<BackendRequest>,
) -> Execution {
    let count = requests.len();
    let fail_all = |e: Error| Execution {
        results: (0..count).map(|_| Err(e.clone())).collect(),
        times: ExecutionTimes::default(),
    };
    let instance = match slot {
        Some(instance) => instance,
        None => match blueprint.instantiate() {
            Ok(fresh) => slot.insert(fresh),
            Err(e) => return fail_all(e.context("starting a fresh instance")),
        },
    };

    let t0 = Instant::now();
    let wit_requests: Vec<wit::Request> = requests
        .into_iter()
        .map(|r| wit::Request {
            inputs: r
                .inputs
                .into_iter()
                .map(|t| wit::Tensor {
                    name: t.name,
                    datatype: datatype_to_wit(t.datatype),
                    shape: t.shape,
                    data: t.data.to_vec(),
                })
                .collect(),
            requested_outputs: r.requested_outputs,
            parameters: r
                .parameters
                .iter()
                .map(|(k, v)| parameter_to_wit(k, v))
                .collect(),
        })
        .collect();
    let t1 = Instant::now();
    instance.store.set_epoch_deadline(blueprint.execution_ticks);
    let outcome = instance
        .plugin
        .wisp_plugin_model()
        .call_execute(&mut instance.store, &wit_requests);
    let t2 = Instant::now();
    let mut execution = match outcome {
        Err(trap) => {
            let why = describe_trap(
                &trap,
                &instance.output,
                blueprint.execution_ticks,
                blueprint.memory_limit,
            );
            tracing::warn!(model = %blueprint.label, "plugin trapped, discarding the instance: {why}");
            *slot = None;
            let timed_out = trap.downcast_ref::<Trap>() == Some(&Trap::Interrupt);
            let kind = if timed_out {
                ErrorKind::Unavailable
            } else {
                ErrorKind::Internal
            };
            fail_all(Error::new(
                kind,
                format!("model '{}' failed: {why}", blueprint.label),
            ))
        }
        Ok(results) if results.len() != count => fail_all(Error::internal(format!(
            "model '{}' returned {} results for {count} requests",
            blueprint.label,
            results.len()
        ))),
        Ok(results) => Execution {
            results: results
                .into_iter()
                .map(|r| match r {
                    Ok(response) => Ok(BackendResponse {
                        parameters: response
                            .parameters
                            .into_iter()
                            .map(parameter_from_wit)
                            .collect(),
                        outputs: response
                            .outputs
                            .into_iter()
                            .map(|t| Tensor {
                                name: t.name,
                                datatype: datatype_from_wit(t.datatype),
                                shape: t.shape,
                                data: t.data.into(),
                            })
                            .collect(),
                    }),
                    Err(e) => Err(plugin_error(&e)),
                })
                .collect(),
            times: ExecutionTimes::default(),
        },
    };
    let t3 = Instant::now();
    execution.times = ExecutionTimes {
        compute_input_ns: (t1 - t0).as_nanos() as u64,
        compute_infer_ns: (t2 - t1).as_nanos() as u64,
        compute_output_ns: (t3 - t2).as_nanos() as u64,
    };
    execution
}

/// A slot taken from the pool; it goes back on drop (a panic included),
/// before the permit that guards it is released.
struct SlotLease {
    free: Arc<Mutex<Vec<Option<Instance>>>>,
    slot: Option<Instance>,
    permit: Option<OwnedSemaphorePermit>,
}

impl SlotLease {
    fn take(free: Arc<Mutex<Vec<Option<Instance>>>>, permit: OwnedSemaphorePermit) -> Self {
        let slot = free.lock().pop().flatten();
        SlotLease {
            free,
            slot,
            permit: Some(permit),
        }
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        // An instance whose call panicked on the host side may be mid-call: drop it.
        let slot = if std::thread::panicking() {
            None
        } else {
            self.slot.take()
        };
        self.free.lock().push(slot);
        drop(self.permit.take());
    }
}

impl Backend for WasmBackend {
    fn execute(&self, requests: Vec<BackendRequest>) -> BoxFuture<'_, Execution> {
        Box::pin(async move {
            let count = requests.len();
            let permit: OwnedSemaphorePermit = match self.permits.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => {
                    return Execution {
                        results: (0..count)
                            .map(|_| Err(Error::unavailable("model is unloading")))
                            .collect(),
                        times: ExecutionTimes::default(),
                    }
                }
            };
            let blueprint = self.blueprint.clone();
            let free = self.free.clone();
            // The slot goes back to the pool inside the blocking task, so a
            // cancelled request (client gone) cannot lose it.
            let task = tokio::task::spawn_blocking(move || {
                let mut lease = SlotLease::take(free, permit);
                run_batch(&blueprint, &mut lease.slot, requests)
            });
            match task.await {
                Ok(execution) => execution,
                Err(e) => Execution {
                    results: (0..count)
                        .map(|_| Err(Error::internal(format!("model execution panicked: {e}"))))
                        .collect(),
                    times: ExecutionTimes::default(),
                },
            }
        })
    }
}
