//! Models as sandboxed WebAssembly components (`wit/plugin.wit`).
//!
//! One [`WasmRuntime`] (engine + epoch ticker) serves every model. Each model
//! version compiles its component once and runs `count` instances, each owned
//! by its own thread that pulls batches from the model's bounded queue, so
//! plugin code never runs on the async workers and a free instance takes the
//! next batch. The sandbox: WASI with a read-only preopen of the model's version
//! folder and nothing else (no env, no args, no sockets), a memory budget over
//! all of an instance's memories, and a deadline per call that both interrupts
//! running code (epochs) and cancels host waits such as a plugin's sleep. An
//! instance that traps or times out is dropped and its thread starts a fresh one.

use super::{
    submit_job, Backend, BackendRequest, BackendResponse, BoxFuture, Execution, ExecutionTimes, Job,
};
use crate::error::{Error, ErrorKind, Result};
use crate::repository::config::{ModelConfig, ParameterValue};
use crate::tensor::{DataType, Tensor};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
        exports: { default: async },
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
/// Batches that may wait for an instance before the model answers 503.
const MAX_WAITING_BATCHES: usize = 1024;
/// Core instances, tables and memories one component instance may create
/// (a Rust component needs a handful; the limits stop a plugin multiplying them).
const MAX_CORE_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 4;
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

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

/// The memory budget of one instance, over all its linear memories together.
struct SandboxLimiter {
    memory_limit: usize,
    memory_used: usize,
}

impl ResourceLimiter for SandboxLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory_used - current.min(self.memory_used) + desired;
        if total > self.memory_limit {
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} MiB exceeded (the plugin asked for {} MiB)",
                self.memory_limit >> 20,
                total.div_ceil(1 << 20)
            )));
        }
        self.memory_used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::msg(format!(
                "table limit of {MAX_TABLE_ELEMENTS} elements exceeded"
            )));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES
    }
    fn tables(&self) -> usize {
        MAX_TABLES
    }
    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Output tensors a plugin emits during one `execute`, within a byte budget,
/// so a plugin cannot make the host allocate more than it allows.
#[derive(Default)]
struct OutputCollector {
    per_request: Vec<Vec<wit::Tensor>>,
    bytes: usize,
    budget: usize,
}

impl OutputCollector {
    fn begin(&mut self, requests: usize, budget: usize) {
        self.per_request = (0..requests).map(|_| Vec::new()).collect();
        self.bytes = 0;
        self.budget = budget;
    }
}

/// What one instance's store holds: its WASI context and limits.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: SandboxLimiter,
    outputs: OutputCollector,
    model: Arc<str>,
}

impl bindings::wisp::plugin::output::Host for HostState {
    fn emit(&mut self, request_index: u32, tensor: wit::Tensor) -> std::result::Result<(), String> {
        let collector = &mut self.outputs;
        let size = tensor.data.len() + tensor.name.len() + tensor.shape.len() * 8;
        if collector.bytes + size > collector.budget {
            // Drop everything: the call failed, and its memory goes back now.
            collector.per_request.iter_mut().for_each(Vec::clear);
            collector.bytes = collector.budget;
            return Err(format!(
                "output limit of {} MiB exceeded (sandbox.max_output_mib)",
                collector.budget >> 20
            ));
        }
        let slot = collector
            .per_request
            .get_mut(request_index as usize)
            .ok_or_else(|| format!("no request {request_index} in this batch"))?;
        collector.bytes += size;
        slot.push(tensor);
        Ok(())
    }
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
    output_budget: usize,
    execution_timeout: Duration,
    init_timeout: Duration,
}

impl Blueprint {
    /// A fresh instance, initialised. Runs on the instance's own thread.
    async fn instantiate(&self) -> Result<Instance> {
        let output = OutputTail::default();
        let mut wasi = WasiCtxBuilder::new();
        wasi.allow_tcp(false)
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
            limits: SandboxLimiter {
                memory_limit: self.memory_limit,
                memory_used: 0,
            },
            outputs: OutputCollector::default(),
            model: self.label.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks_for(self.init_timeout));
        let deadline = self.init_timeout + EPOCH_TICK;
        let instantiated = tokio::time::timeout(deadline, async {
            let plugin = self.pre.instantiate_async(&mut store).await?;
            let init = plugin
                .wisp_plugin_model()
                .call_init(&mut store, &self.info)
                .await?;
            wasmtime::Result::Ok((plugin, init))
        })
        .await;
        match instantiated {
            Ok(Ok((plugin, Ok(())))) => Ok(Instance {
                store,
                plugin,
                output,
            }),
            Ok(Ok((_, Err(e)))) => Err(Error::unavailable(format!(
                "plugin init failed: {}",
                plugin_error(&e).message
            ))),
            Ok(Err(trap)) => Err(Error::unavailable(format!(
                "plugin init trapped: {}",
                describe_trap(&trap, &output, self.init_timeout)
            ))),
            Err(_) => Err(Error::unavailable(format!(
                "plugin init did not finish within {} ms (sandbox.init_timeout_ms)",
                self.init_timeout.as_millis()
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

fn describe_trap(trap: &wasmtime::Error, output: &OutputTail, timeout: Duration) -> String {
    let mut text = if trap.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        format!(
            "execution deadline of {} ms exceeded; the instance was stopped",
            timeout.as_millis()
        )
    } else {
        let root = trap.root_cause().to_string();
        let top = format!("{trap}");
        if root == top {
            top
        } else {
            format!("{top}: {root}")
        }
    };
    let tail = output.take();
    if !tail.is_empty() {
        text.push_str(&format!("; plugin output: {tail}"));
    }
    text
}

/// A model version backed by a Wasm component: a queue of batches and the
/// threads of its instances.
pub struct WasmBackend {
    jobs: crossbeam_channel::Sender<Job>,
    /// One queue per instance, for batches that must run on a given instance
    /// (a sequence's state lives in that instance's memory).
    pinned: Vec<crossbeam_channel::Sender<Job>>,
    label: Arc<str>,
}

/// Epoch ticks for a timeout; +1 because the current tick may be about to end.
fn ticks_for(timeout: Duration) -> u64 {
    (timeout.as_millis() as u64).div_ceil(EPOCH_TICK.as_millis() as u64) + 1
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
    /// Compiles the component of `version_dir` and starts its instances, each
    /// on its own thread. Blocking: call it off the async runtime.
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
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
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
        let label: Arc<str> = format!("{}:{version}", config.name).into();
        let blueprint = Arc::new(Blueprint {
            pre,
            engine: runtime.engine.clone(),
            version_dir: version_dir.to_path_buf(),
            label: label.clone(),
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
            memory_limit: usize::try_from(config.sandbox.memory_limit_mib.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
            output_budget: usize::try_from(config.sandbox.max_output_mib.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
            execution_timeout: Duration::from_millis(config.sandbox.execution_timeout_ms),
            init_timeout: Duration::from_millis(config.sandbox.init_timeout_ms),
        });

        let count = config.instance_count();
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(MAX_WAITING_BATCHES);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let mut pinned = Vec::with_capacity(count);
        for index in 0..count {
            let (own, own_queue) = crossbeam_channel::bounded::<Job>(MAX_WAITING_BATCHES);
            pinned.push(own);
            let (blueprint, queue, ready) = (blueprint.clone(), queue.clone(), ready_tx.clone());
            std::thread::Builder::new()
                .name(format!("wasm-{}-{index}", config.name))
                .spawn(move || instance_thread(blueprint, queue, own_queue, ready))
                .map_err(|e| Error::internal(format!("cannot start an instance thread: {e}")))?;
        }
        drop(ready_tx);
        for _ in 0..count {
            // An error drops `jobs`, which ends the threads that did start.
            ready_rx
                .recv()
                .map_err(|_| Error::internal("an instance thread ended before it was ready"))??;
        }
        tracing::info!(
            model = %label,
            instances = count,
            ms = started.elapsed().as_millis() as u64,
            "compiled and started wasm component"
        );
        Ok(WasmBackend {
            jobs,
            pinned,
            label,
        })
    }
}

/// Owns one instance: creates it, then runs the batches it pulls from the
/// queue, until the model is unloaded (the queue's sender is dropped).
fn instance_thread(
    blueprint: Arc<Blueprint>,
    queue: crossbeam_channel::Receiver<Job>,
    own_queue: crossbeam_channel::Receiver<Job>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(Error::internal(format!(
                "cannot start an instance runtime: {e}"
            ))));
            return;
        }
    };
    let mut slot = match runtime.block_on(blueprint.instantiate()) {
        Ok(instance) => {
            let _ = ready.send(Ok(()));
            Some(instance)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    drop(ready);
    loop {
        // Batches pinned to this instance first, then the shared queue.
        let job = match own_queue.try_recv() {
            Ok(job) => job,
            Err(_) => crossbeam_channel::select! {
                recv(own_queue) -> job => match job { Ok(job) => job, Err(_) => break },
                recv(queue) -> job => match job { Ok(job) => job, Err(_) => break },
            },
        };
        if job.reply.is_closed() {
            continue; // the client went away while the batch waited
        }
        let execution = runtime.block_on(run_batch(&blueprint, &mut slot, job.requests));
        let _ = job.reply.send(execution);
        if slot.is_none() {
            // Replace a discarded instance now rather than on the next client's time.
            match runtime.block_on(blueprint.instantiate()) {
                Ok(fresh) => slot = Some(fresh),
                Err(e) => {
                    tracing::error!(model = %blueprint.label, "cannot start a fresh instance: {e}")
                }
            }
        }
    }
}

/// Runs one batch on a slot, replacing the slot's instance if it is gone or broke.
async fn run_batch(
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
        None => match blueprint.instantiate().await {
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
    instance
        .store
        .set_epoch_deadline(ticks_for(blueprint.execution_timeout));
    instance
        .store
        .data_mut()
        .outputs
        .begin(count, blueprint.output_budget);
    // Epochs stop running code; the timer also cancels host waits (a sleep).
    let outcome = tokio::time::timeout(
        blueprint.execution_timeout + EPOCH_TICK,
        instance
            .plugin
            .wisp_plugin_model()
            .call_execute(&mut instance.store, &wit_requests),
    )
    .await
    .unwrap_or_else(|_| Err(wasmtime::Error::new(Trap::Interrupt)));
    let t2 = Instant::now();
    let mut emitted = std::mem::take(&mut instance.store.data_mut().outputs.per_request);
    let mut execution = match outcome {
        Err(trap) => {
            let why = describe_trap(&trap, &instance.output, blueprint.execution_timeout);
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
                .zip(emitted.iter_mut())
                .map(|(r, outputs)| match r {
                    Ok(response) => Ok(BackendResponse {
                        parameters: response
                            .parameters
                            .into_iter()
                            .map(parameter_from_wit)
                            .collect(),
                        outputs: std::mem::take(outputs)
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

impl Backend for WasmBackend {
    fn execute(&self, requests: Vec<BackendRequest>) -> BoxFuture<'_, Execution> {
        Box::pin(submit_job(
            &self.jobs,
            requests,
            &self.label,
            MAX_WAITING_BATCHES,
        ))
    }

    fn instances(&self) -> usize {
        self.pinned.len()
    }

    fn execute_on(
        &self,
        instance: usize,
        requests: Vec<BackendRequest>,
    ) -> BoxFuture<'_, Execution> {
        let queue = &self.pinned[instance % self.pinned.len()];
        Box::pin(submit_job(
            queue,
            requests,
            &self.label,
            MAX_WAITING_BATCHES,
        ))
    }
}
