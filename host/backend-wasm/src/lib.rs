//! Models as sandboxed WebAssembly components (`wit/plugin.wit`).
//!
//! One [`WasmRuntime`] (engine + epoch ticker) serves every model. Each model
//! version compiles its component once and runs `count` instances on the core's
//! worker pool (a thread each, so plugin code never runs on the async workers and
//! a free instance takes the next batch). The sandbox: WASI with a read-only preopen of the model's version
//! folder and nothing else (no env, no args, no sockets), a memory budget over
//! all of an instance's memories, and a deadline per call that both interrupts
//! running code (epochs) and cancels host waits such as a plugin's sleep. An
//! instance that traps or times out is dropped and the pool builds a fresh one.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wisp_core::backend::{
    Backend, BackendFactory, BackendRequest, BackendResponse, BoxFuture, Execution, ExecutionTimes,
    LoadContext,
};
use wisp_core::config::{ModelConfig, ParameterValue};
use wisp_core::error::{Error, ErrorKind, Result};
use wisp_core::tensor::{DataType, Tensor};
use wisp_core::worker::{Recycle, Worker, WorkerPool};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "plugin",
        exports: { default: async },
        with: { "wisp:plugin/tokenize.tokenizer": crate::tokenize::TokenizerHandle },
    });
}

pub mod cache;
mod tokenize;

use bindings::wisp::plugin::log::Level;
use bindings::wisp::plugin::types as wit;
use bindings::{Plugin, PluginPre};
use cache::CompileCache;

/// How often the engine's epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// How much of a plugin's stderr is kept to explain a trap (a panic message).
const STDERR_TAIL_BYTES: usize = 4096;
/// What the output budget charges per emitted tensor besides its bytes (the host's
/// tensor record, its name and shape allocations).
const TENSOR_OVERHEAD_BYTES: usize = 128;
/// Longest panic message quoted back to a client.
const MAX_CLIENT_DETAIL: usize = 512;
/// Longest log line a plugin may write through `log`.
const MAX_LOG_LINE: usize = 4096;
/// Core instances, tables and memories one component instance may create
/// (a Rust component needs a handful; the limits stop a plugin multiplying them).
const MAX_CORE_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 4;
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Largest component file a model may have.
const MAX_COMPONENT_BYTES: u64 = 512 << 20;

/// The engine shared by all Wasm models, with the thread that advances its epoch, and
/// the compilation cache when there is one.
#[derive(Clone)]
pub struct WasmRuntime {
    engine: Engine,
    cache: Option<CompileCache>,
}

impl WasmRuntime {
    pub fn new(cache: Option<CompileCache>) -> Result<Self> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config)
            .map_err(|e| Error::internal(format!("cannot create the Wasm engine: {e:#}")))?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| Error::internal(format!("cannot start the epoch thread: {e}")))?;
        Ok(WasmRuntime { engine, cache })
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
    /// For `tokenize`: the folder its paths are relative to, the model's loaded
    /// tokenizers, and how many handles this instance holds.
    version_dir: Arc<Path>,
    tokenizers: Arc<tokenize::TokenizerCache>,
    tokenizer_handles: usize,
}

/// An output tensor as a plugin emits it. Its data is left in the plugin's memory until
/// the budget allows it, then copied out in one piece: wasmtime's generic lift of a
/// `list<u8>` would copy it element by element, and before any budget check.
#[derive(wasmtime::component::ComponentType, wasmtime::component::Lift)]
#[component(record)]
struct EmittedTensor {
    name: String,
    datatype: wit::Datatype,
    shape: Vec<i64>,
    data: wasmtime::component::WasmList<u8>,
}

/// `wisp:plugin/output.emit`.
fn emit(
    mut store: wasmtime::StoreContextMut<'_, HostState>,
    request_index: u32,
    tensor: EmittedTensor,
) -> std::result::Result<(), String> {
    let collector = &mut store.data_mut().outputs;
    // Every tensor costs its bookkeeping too, so a loop of empty tensors runs into the
    // budget like a large one.
    let size =
        TENSOR_OVERHEAD_BYTES + tensor.data.len() + tensor.name.len() + tensor.shape.len() * 8;
    if collector.bytes + size > collector.budget {
        // Drop everything: the call failed, and its memory goes back now.
        collector.per_request.iter_mut().for_each(Vec::clear);
        collector.bytes = collector.budget;
        return Err(format!(
            "output limit of {} MiB exceeded (sandbox.max_output_mib)",
            collector.budget >> 20
        ));
    }
    if request_index as usize >= collector.per_request.len() {
        return Err(format!("no request {request_index} in this batch"));
    }
    collector.bytes += size;
    let data = tensor.data.as_le_slice(&store).to_vec();
    store.data_mut().outputs.per_request[request_index as usize].push(wit::Tensor {
        name: tensor.name,
        datatype: tensor.datatype,
        shape: tensor.shape,
        data,
    });
    Ok(())
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
    fn log(&mut self, level: Level, message: String) {
        // A plugin must not forge log lines (newlines) or terminal escapes.
        let mut message = escape_controls(&message);
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

impl bindings::wisp::plugin::tokenize::Host for HostState {}

impl bindings::wisp::plugin::tokenize::HostTokenizer for HostState {
    fn open(
        &mut self,
        path: String,
        max_length: u32,
    ) -> std::result::Result<Resource<tokenize::TokenizerHandle>, String> {
        let tokenizer = self.tokenizers.open(&self.version_dir, &path, max_length)?;
        tokenize::new_handle(&mut self.table, &mut self.tokenizer_handles, tokenizer)
    }

    fn encode(
        &mut self,
        handle: Resource<tokenize::TokenizerHandle>,
        texts: Vec<String>,
        pairs: Vec<String>,
        add_special_tokens: bool,
        spans: bool,
    ) -> std::result::Result<Vec<bindings::wisp::plugin::tokenize::Encoding>, String> {
        let tokenizer = self.tokenizer(&handle)?;
        tokenize::encode(&tokenizer, &texts, &pairs, add_special_tokens, spans)
    }

    fn encode_padded(
        &mut self,
        handle: Resource<tokenize::TokenizerHandle>,
        texts: Vec<String>,
        pairs: Vec<String>,
        add_special_tokens: bool,
        pad_id: i64,
    ) -> std::result::Result<bindings::wisp::plugin::tokenize::Padded, String> {
        let tokenizer = self.tokenizer(&handle)?;
        tokenize::encode_padded(&tokenizer, &texts, &pairs, add_special_tokens, pad_id)
    }

    fn decode(
        &mut self,
        handle: Resource<tokenize::TokenizerHandle>,
        ids: Vec<u32>,
        skip_special_tokens: bool,
    ) -> std::result::Result<String, String> {
        let tokenizer = self.tokenizer(&handle)?;
        tokenize::decode(&tokenizer, &ids, skip_special_tokens)
    }

    fn token_to_id(
        &mut self,
        handle: Resource<tokenize::TokenizerHandle>,
        token: String,
    ) -> Option<u32> {
        self.tokenizer(&handle).ok()?.token_to_id(&token)
    }

    fn drop(&mut self, handle: Resource<tokenize::TokenizerHandle>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        self.tokenizer_handles -= 1;
        Ok(())
    }
}

impl HostState {
    fn tokenizer(
        &self,
        handle: &Resource<tokenize::TokenizerHandle>,
    ) -> std::result::Result<Arc<tokenizers::Tokenizer>, String> {
        self.table
            .get(handle)
            .map(|h| h.0.clone())
            .map_err(|e| format!("bad tokenizer handle: {e}"))
    }
}

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
    version_dir: Arc<Path>,
    /// Tokenizers the model's instances loaded through `tokenize`, shared by all of them.
    tokenizers: Arc<tokenize::TokenizerCache>,
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
            version_dir: self.version_dir.clone(),
            tokenizers: self.tokenizers.clone(),
            tokenizer_handles: 0,
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
            Ok(Err(trap)) => {
                let tail = output.take();
                tracing::warn!(
                    model = %self.label,
                    "plugin init trapped: {}",
                    describe_trap(&trap, &tail, self.init_timeout)
                );
                Err(Error::unavailable(format!(
                    "plugin init trapped: {}",
                    summarize_trap(&trap, &tail, self.init_timeout)
                )))
            }
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

/// `text` with control characters (newlines, escapes) written as Rust escapes.
fn escape_controls(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// What a client is told of a trap: the trap itself and a panic's message, without
/// the wasm backtrace or the plugin's other output (those go to the server log).
fn summarize_trap(trap: &wasmtime::Error, full_output: &str, timeout: Duration) -> String {
    if trap.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return format!(
            "execution deadline of {} ms exceeded; the instance was stopped",
            timeout.as_millis()
        );
    }
    let root = trap.root_cause().to_string();
    let mut text = root
        .lines()
        .next()
        .unwrap_or("the plugin trapped")
        .to_string();
    // Rust's panic hook writes "thread '…' panicked at FILE:LINE:COL:\nMESSAGE".
    if let Some(after) = full_output.split("panicked at ").nth(1) {
        if let Some(message) = after.lines().nth(1).filter(|m| !m.trim().is_empty()) {
            let mut message = escape_controls(message.trim());
            if message.len() > MAX_CLIENT_DETAIL {
                let mut cut = MAX_CLIENT_DETAIL;
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                message.truncate(cut);
                message.push('…');
            }
            text = format!("the plugin panicked: {message} ({text})");
        }
    }
    text
}

/// The whole story of a trap, for the server log.
fn describe_trap(trap: &wasmtime::Error, tail: &str, timeout: Duration) -> String {
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
    if !tail.is_empty() {
        text.push_str(&format!("; plugin output: {}", escape_controls(tail)));
    }
    text
}

/// A model version backed by a Wasm component: its instances on the worker pool.
pub struct WasmBackend {
    pool: WorkerPool,
}

/// Loads `backend = "wasm"` models with one shared runtime.
pub struct WasmFactory {
    runtime: WasmRuntime,
}

impl WasmFactory {
    pub fn new(runtime: WasmRuntime) -> Self {
        WasmFactory { runtime }
    }
}

impl BackendFactory for WasmFactory {
    fn load(&self, context: &LoadContext<'_>) -> Result<Box<dyn Backend>> {
        WasmBackend::load(
            &self.runtime,
            context.config,
            context.version,
            context.version_dir,
        )
        .map(|b| Box::new(b) as Box<dyn Backend>)
    }
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

/// The component in `file`, from the compilation cache or compiled.
fn compile(runtime: &WasmRuntime, file: &Path) -> Result<(Component, cache::Origin)> {
    let unavailable = |what: String| Error::unavailable(format!("{}: {what}", file.display()));
    let size = std::fs::metadata(file)
        .map_err(|e| unavailable(format!("cannot read it: {e}")))?
        .len();
    if size > MAX_COMPONENT_BYTES {
        return Err(unavailable(format!(
            "{} MiB, more than the {} MiB a component may have",
            size >> 20,
            MAX_COMPONENT_BYTES >> 20
        )));
    }
    let wasm = std::fs::read(file).map_err(|e| unavailable(format!("cannot read it: {e}")))?;
    match &runtime.cache {
        Some(cache) => cache
            .component(&runtime.engine, &wasm)
            .map_err(|e| unavailable(e.message)),
        None => Component::new(&runtime.engine, &wasm)
            .map(|c| (c, cache::Origin::Compiled))
            .map_err(|e| unavailable(format!("not a valid component: {e:#}"))),
    }
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
        let file = wisp_core::paths::confined(
            version_dir,
            &config.sandbox.component,
            "sandbox.component",
        )?;
        if !file.is_file() {
            return Err(Error::unavailable(format!(
                "component file {} not found (key 'sandbox.component' is '{}')",
                file.display(),
                config.sandbox.component
            )));
        }
        let started = Instant::now();
        let (component, origin) = compile(runtime, &file)?;
        let compiled_ms = started.elapsed().as_millis() as u64;
        let mut linker: Linker<HostState> = Linker::new(&runtime.engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|_| {
                bindings::wisp::plugin::log::add_to_linker::<_, HasSelf<HostState>>(
                    &mut linker,
                    |s| s,
                )
            })
            .and_then(|_| {
                bindings::wisp::plugin::tokenize::add_to_linker::<_, HasSelf<HostState>>(
                    &mut linker,
                    |s| s,
                )
            })
            .and_then(|_| {
                // `emit` by hand, to copy the tensor's bytes out of the plugin in one piece.
                linker.instance("wisp:plugin/output@0.1.1")?.func_wrap(
                    "emit",
                    |store, (request_index, tensor): (u32, EmittedTensor)| {
                        Ok((emit(store, request_index, tensor),))
                    },
                )
            })
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
            version_dir: version_dir.into(),
            tokenizers: Arc::default(),
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
        let make_blueprint = blueprint.clone();
        let pool = WorkerPool::start(
            label.clone(),
            count,
            |index| format!("wasm-{}-{index}", config.name),
            Recycle::default(),
            Arc::new(move |_| WasmWorker::new(make_blueprint.clone())),
        )?;
        tracing::info!(
            model = %label,
            instances = count,
            component = origin.as_str(),
            component_ms = compiled_ms,
            ms = started.elapsed().as_millis() as u64,
            "loaded and started wasm component"
        );
        Ok(WasmBackend { pool })
    }
}

/// One instance on its worker thread, with the current-thread runtime its
/// async calls (WASI, deadlines) run on.
struct WasmWorker {
    blueprint: Arc<Blueprint>,
    runtime: tokio::runtime::Runtime,
    /// None once the instance trapped: the pool then builds a fresh worker.
    slot: Option<Instance>,
}

impl WasmWorker {
    fn new(blueprint: Arc<Blueprint>) -> Result<WasmWorker> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("cannot start an instance runtime: {e}")))?;
        let instance = runtime.block_on(blueprint.instantiate())?;
        Ok(WasmWorker {
            blueprint,
            runtime,
            slot: Some(instance),
        })
    }
}

impl Worker for WasmWorker {
    fn run(&mut self, requests: Vec<BackendRequest>) -> Execution {
        self.runtime
            .block_on(run_batch(&self.blueprint, &mut self.slot, requests))
    }

    fn healthy(&self) -> bool {
        self.slot.is_some()
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
                    // No copy when the request alone holds a whole buffer (JSON,
                    // shared memory); slices of a body are copied.
                    data: Vec::from(t.data),
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
            let tail = instance.output.take();
            let why = summarize_trap(&trap, &tail, blueprint.execution_timeout);
            tracing::warn!(
                model = %blueprint.label,
                "plugin trapped, discarding the instance: {}",
                describe_trap(&trap, &tail, blueprint.execution_timeout)
            );
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
        Box::pin(self.pool.submit(requests))
    }

    fn instances(&self) -> usize {
        self.pool.instances()
    }

    fn execute_on(
        &self,
        instance: usize,
        requests: Vec<BackendRequest>,
    ) -> BoxFuture<'_, Execution> {
        Box::pin(self.pool.submit_to(instance, requests))
    }
}
