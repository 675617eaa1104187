//! `backend = "encoder"`: transformer encoders (BERT, DistilBERT, RoBERTa) from
//! Hugging Face checkpoint folders, run natively on the CPU.
//!
//! Each instance is a thread with its own rayon pool and activation buffers. A batch
//! of requests is packed into one token matrix without padding (see `model.rs`), so a
//! batch of short and long sequences costs its real tokens.

pub mod bf16;
pub mod checkpoint;
pub mod epilogue;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod int8;
pub mod linear;
pub mod model;
pub mod ops;
pub mod panels;
pub mod quantize;
pub mod quantized;

use bytes::Bytes;
use checkpoint::{Checkpoint, Dimensions, Pooling};
use linear::Threads;
use model::{Encoder, HeadKind, PackedBatch, Workspace};
use ops::Segment;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use wisp_core::backend::{
    Backend, BackendFactory, BackendRequest, BackendResponse, BoxFuture, Execution, ExecutionTimes,
    LoadContext,
};
use wisp_core::config::{InstanceKind, ModelConfig};
use wisp_core::error::{Error, Result};
use wisp_core::tensor::{DataType, Tensor};
use wisp_core::worker::{Recycle, Worker, WorkerPool};

pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
pub const TOKEN_TYPE_IDS: &str = "token_type_ids";
/// Embedding heads: the text each row is a window of (`[rows]` or `[rows, 1]`, from 0,
/// each row's the same as the row before or the next); the rows of one text are pooled.
pub const WINDOW_OWNER: &str = "window_owner";

/// The encoder's settings from the `[parameters]` table of config.toml.
#[derive(Debug, Clone)]
pub struct EncoderSettings {
    /// The checkpoint folder, relative to the version folder ("." by default).
    pub checkpoint: PathBuf,
    pub head: Option<HeadKind>,
    pub pooling: Option<Pooling>,
    pub normalize: Option<bool>,
    /// Threads per instance; 0 = the machine's cores shared among instances.
    pub threads: usize,
    /// Linux niceness of the compute threads (0–19): above 0, the HTTP front, refusals and
    /// lighter models keep the CPU when encoders saturate it.
    pub nice: u8,
    /// false runs every sequence padded to the batch's longest, as padded engines do
    /// (for comparison and tests; results are the same).
    pub remove_padding: bool,
    /// "f32", "bf16" or "int8" (CPU instances; int8 needs a checkpoint from `wisp
    /// quantize`), or "fp16" (GPU instances); None: each kind's own, and the precision a
    /// checkpoint from `wisp quantize` was written for.
    pub precision: Option<Precision>,
    /// GPU instances replay CUDA graphs per launch shape (false: launch kernels directly).
    pub cuda_graphs: bool,
    /// What GPU instances run on: CUDA, or the kernels' CPU twins (tests without a GPU).
    pub gpu_runtime: GpuRuntime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuRuntime {
    Cuda,
    /// The GPU runner's exact sequence of operations on the CPU twins of its kernels:
    /// slow, for testing the GPU path on machines without a GPU.
    Twin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
    Int8,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "f32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }
}

impl EncoderSettings {
    /// The defaults for the checkpoint in `checkpoint`.
    pub fn new(checkpoint: impl Into<PathBuf>) -> EncoderSettings {
        EncoderSettings {
            checkpoint: checkpoint.into(),
            head: None,
            pooling: None,
            normalize: None,
            threads: 0,
            nice: DEFAULT_NICE,
            remove_padding: true,
            precision: None,
            cuda_graphs: true,
            gpu_runtime: GpuRuntime::Cuda,
        }
    }

    /// The settings of an encoder model's `[parameters]` table: typed by serde,
    /// so a wrong type or an unknown key is an error naming the key.
    pub fn from_config(config: &ModelConfig) -> Result<EncoderSettings> {
        let table: serde_json::Map<String, serde_json::Value> = config
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        let p: EncoderParameters = serde_json::from_value(serde_json::Value::Object(table))
            .map_err(|e| Error::invalid(format!("model '{}': [parameters]: {e}", config.name)))?;
        let bad = |key: &str, want: &str| {
            Error::invalid(format!(
                "model '{}': parameter '{key}' must be {want}",
                config.name
            ))
        };
        let mut settings = EncoderSettings::new(p.checkpoint.unwrap_or_else(|| ".".into()));
        if let Some(name) = p.head {
            settings.head = Some(HeadKind::parse(&name).ok_or_else(|| {
                bad(
                    "head",
                    "one of embedding, qa, classification, token_classification",
                )
            })?);
        }
        if let Some(name) = p.pooling {
            settings.pooling =
                Some(Pooling::parse(&name).ok_or_else(|| bad("pooling", "mean, cls or max"))?);
        }
        settings.normalize = p.normalize;
        if let Some(threads) = p.threads {
            settings.threads = threads;
        }
        if let Some(nice) = p.nice {
            if nice > 19 {
                return Err(bad("nice", "between 0 and 19 (Linux niceness)"));
            }
            settings.nice = nice;
        }
        if let Some(remove_padding) = p.remove_padding {
            settings.remove_padding = remove_padding;
        }
        if let Some(cuda_graphs) = p.cuda_graphs {
            settings.cuda_graphs = cuda_graphs;
        }
        settings.gpu_runtime = match p.gpu_runtime.as_deref() {
            None | Some("cuda") => GpuRuntime::Cuda,
            Some("twin") => GpuRuntime::Twin,
            Some(_) => return Err(bad("gpu_runtime", "\"cuda\" or \"twin\"")),
        };
        settings.precision = match p.precision.as_deref() {
            None => None,
            Some("f32" | "fp32") => Some(Precision::Fp32),
            Some("fp16" | "f16") => Some(Precision::Fp16),
            Some("bf16") => Some(Precision::Bf16),
            Some("int8") => Some(Precision::Int8),
            Some(_) => {
                return Err(bad(
                    "precision",
                    "\"f32\", \"bf16\" or \"int8\" (CPU; int8 needs a checkpoint from `wisp quantize`) or \"fp16\" (GPU)",
                ))
            }
        };
        Ok(settings)
    }
}

/// An encoder model's `[parameters]` table as written in config.toml.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EncoderParameters {
    checkpoint: Option<String>,
    head: Option<String>,
    pooling: Option<String>,
    normalize: Option<bool>,
    /// Bounded: each is an OS thread.
    #[serde(default, deserialize_with = "threads")]
    threads: Option<usize>,
    nice: Option<u8>,
    remove_padding: Option<bool>,
    precision: Option<String>,
    cuda_graphs: Option<bool>,
    gpu_runtime: Option<String>,
}

/// Threads per instance (0: the cores divided among instances), at most 1024.
fn threads<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<usize>, D::Error> {
    let n: u64 = serde::Deserialize::deserialize(d)?;
    if n > 1024 {
        return Err(serde::de::Error::custom(format!(
            "parameter 'threads' is {n}; it must be at most 1024"
        )));
    }
    Ok(Some(n as usize))
}

/// The compute threads' default niceness: a batch of encoder work yields the CPU to
/// request handling and light models, which need it for microseconds at a time.
pub const DEFAULT_NICE: u8 = 10;

/// Lowers the calling thread's scheduling priority to `nice` (Linux: per thread).
fn lower_thread_priority(nice: u8) {
    #[cfg(target_os = "linux")]
    if nice > 0 {
        // SAFETY: plain syscalls on the calling thread, no pointers.
        let result = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            // Already at least this nice (the whole server runs under `nice`): keep it.
            if libc::getpriority(libc::PRIO_PROCESS, tid) >= libc::c_int::from(nice) {
                return;
            }
            libc::setpriority(libc::PRIO_PROCESS, tid, libc::c_int::from(nice))
        };
        if result != 0 {
            tracing::warn!(
                "cannot lower the encoder thread's priority to nice {nice}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Loads the encoder described by `settings` from `version_dir`.
pub fn load_encoder(settings: &EncoderSettings, version_dir: &Path) -> Result<Encoder> {
    let folder = wisp_core::paths::confined(
        version_dir,
        &settings.checkpoint.to_string_lossy(),
        "parameters.checkpoint",
    )?;
    let dims = Dimensions::read(&folder)?;
    let checkpoint = Checkpoint::open(&folder)?;
    let scheme = quantized::Scheme::read(&folder)?;
    let head = settings
        .head
        .unwrap_or_else(|| HeadKind::from_architecture(&dims.architecture));
    let (st_pooling, st_normalize) = checkpoint::sentence_transformers_pooling(&folder)?;
    let pooling = settings.pooling.or(st_pooling).unwrap_or(Pooling::Mean);
    let normalize = settings.normalize.unwrap_or(st_normalize);
    let mut encoder = Encoder::load(dims, &checkpoint, scheme.as_ref(), head, pooling, normalize)?;
    let stored_bf16 = scheme.as_ref().is_some_and(|s| s.precision == "bf16");
    let bf16 = match settings.precision {
        Some(Precision::Bf16) => true,
        None => stored_bf16,
        _ => false,
    };
    if bf16 && !encoder.is_quantized() {
        encoder.use_bf16();
    }
    Ok(encoder)
}

pub struct EncoderBackend {
    pool: WorkerPool,
}

/// Loads `backend = "encoder"` models.
pub struct EncoderFactory;

impl BackendFactory for EncoderFactory {
    fn load(&self, context: &LoadContext<'_>) -> Result<Box<dyn Backend>> {
        EncoderBackend::load(context.config, context.version, context.version_dir)
            .map(|b| Box::new(b) as Box<dyn Backend>)
    }
}

/// Where one instance runs.
enum Placement {
    Cpu,
    /// On a GPU, with that GPU's copy of the weights.
    #[cfg(feature = "gpu")]
    Gpu(u32, Arc<gpu::runner::GpuEncoder>),
}

/// The instances of the config's GPU groups, with one copy of the weights per GPU
/// shared by that GPU's instances.
#[cfg(feature = "gpu")]
fn gpu_placements(
    config: &ModelConfig,
    settings: &EncoderSettings,
    encoder: &Arc<Encoder>,
    devices: &mut Vec<String>,
) -> Result<Vec<Placement>> {
    let mut placements = Vec::new();
    let mut on_gpu: Vec<(u32, Arc<gpu::runner::GpuEncoder>)> = Vec::new();
    for group in config
        .instance_group
        .iter()
        .filter(|g| g.kind == InstanceKind::Gpu)
    {
        for ordinal in group.gpu_ordinals() {
            let weights = match on_gpu.iter().find(|(o, _)| *o == ordinal) {
                Some((_, weights)) => weights.clone(),
                None => {
                    let weights = Arc::new(
                        load_on_gpu(settings, ordinal, encoder.clone())
                            .map_err(|e| e.context(format!("model '{}'", config.name)))?,
                    );
                    devices.push(weights.device.describe());
                    on_gpu.push((ordinal, weights.clone()));
                    weights
                }
            };
            for _ in 0..group.count {
                placements.push(Placement::Gpu(ordinal, weights.clone()));
            }
        }
    }
    Ok(placements)
}

/// Without the `gpu` feature, GPU groups are refused by name.
#[cfg(not(feature = "gpu"))]
fn gpu_placements(
    config: &ModelConfig,
    _: &EncoderSettings,
    _: &Arc<Encoder>,
    _: &mut Vec<String>,
) -> Result<Vec<Placement>> {
    match config
        .instance_group
        .iter()
        .position(|g| g.kind == InstanceKind::Gpu)
    {
        Some(i) => Err(Error::unavailable(format!(
            "model '{}': instance_group[{i}] is kind \"gpu\", but this wisp was built without GPU support (feature \"gpu\" of wisp-backend-encoder)",
            config.name
        ))),
        None => Ok(Vec::new()),
    }
}

/// A quantized checkpoint runs in INT8 on CPU instances, and INT8 needs one.
fn check_precision(
    model: &str,
    settings: &EncoderSettings,
    encoder: &Encoder,
    gpu_instances: usize,
) -> Result<()> {
    let checkpoint = settings.checkpoint.display();
    match (settings.precision, encoder.is_quantized()) {
        (Some(Precision::Int8), false) => Err(Error::invalid(format!(
            "model '{model}': precision \"int8\" needs a quantized checkpoint, and the one at \
             parameters.checkpoint ({checkpoint}) is float: run `wisp quantize CHECKPOINT --out DIR` \
             and point parameters.checkpoint at DIR"
        ))),
        (Some(precision @ (Precision::Fp32 | Precision::Fp16 | Precision::Bf16)), true) => {
            Err(Error::invalid(format!(
                "model '{model}': the checkpoint at parameters.checkpoint ({checkpoint}) is quantized \
                 (INT8, quantization.json), so it cannot run in precision {:?}: set precision = \"int8\" \
                 or point parameters.checkpoint at the float checkpoint",
                precision.name()
            )))
        }
        (_, true) if gpu_instances > 0 => Err(Error::invalid(format!(
            "model '{model}': the checkpoint is quantized (INT8), which runs on CPU instances only; \
             GPU instances need the float checkpoint"
        ))),
        _ => Ok(()),
    }
}

/// A CPU instance: the runner and the rayon pool its GEMMs split over.
struct CpuWorker {
    threads: rayon::ThreadPool,
    runner: Runner,
}

impl Worker for CpuWorker {
    fn run(&mut self, requests: Vec<BackendRequest>) -> Execution {
        let runner = &mut self.runner;
        self.threads.install(|| runner.run(&requests))
    }
}

#[cfg(feature = "gpu")]
struct GpuWorker(gpu::runner::GpuRunner);

#[cfg(feature = "gpu")]
impl Worker for GpuWorker {
    fn run(&mut self, requests: Vec<BackendRequest>) -> Execution {
        self.0.run(&requests)
    }

    fn out_of_service(&self) -> Option<String> {
        self.0.out_of_service()
    }
}

impl EncoderBackend {
    pub fn load(config: &ModelConfig, version: u64, version_dir: &Path) -> Result<EncoderBackend> {
        let label = format!("{} (version {version})", config.name);
        let settings = EncoderSettings::from_config(config)?;
        let count = |kind: InstanceKind| -> usize {
            config
                .instance_group
                .iter()
                .filter(|g| g.kind == kind)
                .map(|g| g.instances())
                .sum()
        };
        let gpu_instances = count(InstanceKind::Gpu);
        let cpu_instances = count(InstanceKind::Cpu);
        match (settings.precision, cpu_instances > 0, gpu_instances > 0) {
            (Some(Precision::Fp16), true, _) => {
                return Err(Error::invalid(format!(
                    "model '{}': precision \"fp16\" runs on GPU instances only; CPU instances compute in fp32",
                    config.name
                )))
            }
            (Some(p @ (Precision::Int8 | Precision::Bf16)), _, true) => {
                return Err(Error::invalid(format!(
                    "model '{}': precision {:?} runs on CPU instances only",
                    config.name,
                    p.name()
                )))
            }
            (Some(Precision::Fp32), _, true) => {
                return Err(Error::invalid(format!(
                    "model '{}': GPU instances compute in precision \"fp16\", not \"fp32\"",
                    config.name
                )))
            }
            _ => {}
        }
        let mut load_settings = settings.clone();
        if gpu_instances > 0 && settings.precision.is_none() {
            // GPU instances copy the float weights: none are rounded to BF16 at load.
            load_settings.precision = Some(Precision::Fp32);
        }
        let mut encoder = load_encoder(&load_settings, version_dir)
            .map_err(|e| e.context(format!("model '{}'", config.name)))?;
        check_precision(&config.name, &settings, &encoder, gpu_instances)?;
        let packed_bytes = if cpu_instances > 0 {
            encoder.pack_for_cpu()
        } else {
            0
        };
        let encoder = Arc::new(encoder);
        check_signature(config, &encoder)?;
        let mut devices: Vec<String> = Vec::new();
        let mut placements = gpu_placements(config, &settings, &encoder, &mut devices)?;
        placements.extend((0..cpu_instances).map(|_| Placement::Cpu));
        let threads = if settings.threads > 0 {
            settings.threads
        } else {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / cpu_instances.max(1)).max(1)
        };
        if cpu_instances > 0 {
            linear::set_engine_threads(threads);
        }
        let placements = Arc::new(placements);
        let thread_names = placements.clone();
        #[cfg_attr(not(feature = "gpu"), allow(unused_variables))]
        let (model, remove_padding, cuda_graphs, nice) = (
            config.name.clone(),
            settings.remove_padding,
            settings.cuda_graphs,
            settings.nice,
        );
        let make_encoder = encoder.clone();
        let make = move |index: usize| -> Result<Box<dyn Worker>> {
            match &placements[index] {
                Placement::Cpu => {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |t| format!("encoder-{index}-{t}"))
                        .start_handler(move |_| lower_thread_priority(nice))
                        .build()
                        .map_err(|e| {
                            Error::internal(format!("cannot start encoder threads: {e}"))
                        })?;
                    Ok(Box::new(CpuWorker {
                        threads: pool,
                        runner: Runner::new(make_encoder.clone(), remove_padding, threads),
                    }))
                }
                #[cfg(feature = "gpu")]
                Placement::Gpu(_, weights) => {
                    let mut runner =
                        gpu::runner::GpuRunner::new(weights.clone(), remove_padding, cuda_graphs)?;
                    runner
                        .warm_up()
                        .map_err(|e| e.context(format!("model '{model}': GPU warm-up failed")))?;
                    Ok(Box::new(GpuWorker(runner)))
                }
            }
        };
        let pool = WorkerPool::start(
            label,
            thread_names.len(),
            |index| match &thread_names[index] {
                Placement::Cpu => format!("encoder-{index}"),
                #[cfg(feature = "gpu")]
                Placement::Gpu(ordinal, _) => format!("encoder-gpu{ordinal}-{index}"),
            },
            Recycle::default(),
            Arc::new(make),
        )?;
        tracing::info!(
            model = %config.name,
            family = encoder.dims.family.as_str(),
            head = encoder.head_kind.as_str(),
            layers = encoder.dims.layers,
            hidden = encoder.dims.hidden,
            cpu_instances,
            gpu_instances,
            gpus = %devices.join(", "),
            threads,
            precision = encoder.precision(),
            kernels = match encoder.precision() {
                "int8" => int8::Isa::selected().name(),
                "bf16" => bf16::Isa::selected().name(),
                _ => "-",
            },
            gemm = linear::engine(),
            few_row_panels_mib = packed_bytes >> 20,
            "encoder loaded"
        );
        Ok(EncoderBackend { pool })
    }
}

impl Backend for EncoderBackend {
    fn execute(&self, requests: Vec<BackendRequest>) -> BoxFuture<'_, Execution> {
        Box::pin(self.pool.submit(requests))
    }

    fn instances(&self) -> usize {
        self.pool.instances()
    }

    fn out_of_service(&self) -> wisp_core::worker::OutOfService {
        self.pool.out_of_service()
    }
}

/// The config's inputs and outputs must be ones the encoder reads and writes.
fn check_signature(config: &ModelConfig, encoder: &Encoder) -> Result<()> {
    let model = &config.name;
    if config.input(INPUT_IDS).is_none() {
        return Err(Error::invalid(format!(
            "model '{model}': an encoder needs an input named '{INPUT_IDS}'"
        )));
    }
    for input in &config.inputs {
        let known: &[&str] = if encoder.head_kind == HeadKind::Embedding {
            &[INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS, WINDOW_OWNER]
        } else {
            &[INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS]
        };
        if !known.contains(&input.name.as_str()) {
            return Err(Error::invalid(format!(
                "model '{model}': the encoder has no input '{}' (inputs: {})",
                input.name,
                known.join(", ")
            )));
        }
        if !matches!(input.datatype, DataType::Int64 | DataType::Int32) {
            return Err(Error::invalid(format!(
                "model '{model}': input '{}' must be INT64 or INT32, not {}",
                input.name, input.datatype
            )));
        }
    }
    let produced = encoder.head_kind.outputs();
    for output in &config.outputs {
        if !produced.contains(&output.name.as_str()) {
            return Err(Error::invalid(format!(
                "model '{model}': the {} head has no output '{}' (outputs: {})",
                encoder.head_kind.as_str(),
                output.name,
                produced.join(", ")
            )));
        }
        if output.datatype != DataType::Fp32 {
            return Err(Error::invalid(format!(
                "model '{model}': output '{}' must be FP32, not {}",
                output.name, output.datatype
            )));
        }
    }
    Ok(())
}

/// The model's fp16 weights on GPU `ordinal` (or on the CPU twins).
#[cfg(feature = "gpu")]
fn load_on_gpu(
    settings: &EncoderSettings,
    ordinal: u32,
    encoder: Arc<Encoder>,
) -> Result<gpu::runner::GpuEncoder> {
    let device: Arc<dyn crate::gpu::device::Device> = match settings.gpu_runtime {
        GpuRuntime::Cuda => Arc::new(
            crate::gpu::device::CudaDevice::open(ordinal as usize).map_err(|e| {
                Error::unavailable(format!("instance_group kind \"gpu\" needs a GPU: {e}"))
            })?,
        ),
        GpuRuntime::Twin => Arc::new(crate::gpu::device::TwinDevice::new()),
    };
    gpu::runner::GpuEncoder::load(device, encoder)
        .map_err(|e| e.context(format!("on GPU {ordinal}")))
}

/// One request's rows, as unpacked from its tensors.
pub(crate) struct RequestRows {
    rows: usize,
    /// Padded length of each row in the request.
    width: usize,
    /// Whether the request's tensors had a batch dimension.
    batched: bool,
    /// For every packed token: its column in the request's rows.
    columns: Vec<u32>,
    /// First segment of this request in the packed batch.
    first_segment: usize,
    /// With `window_owner`: each row's text, and its real tokens (the row's weight).
    windows: Option<Windows>,
}

/// Rows that are windows of longer texts.
struct Windows {
    owner: Vec<usize>,
    tokens: Vec<usize>,
}

impl Windows {
    /// The texts' embeddings: each the mean of its windows' `rows` (`width` wide)
    /// weighted by their tokens, re-normalised when the head normalises.
    fn pool(&self, rows: &[f32], width: usize, normalize: bool) -> Vec<f32> {
        let texts = self.owner.last().map_or(0, |&o| o + 1);
        let mut pooled = vec![0f32; texts * width];
        let mut weights = vec![0f32; texts];
        for (r, row) in rows.chunks_exact(width).enumerate() {
            let (text, weight) = (self.owner[r], self.tokens[r] as f32);
            weights[text] += weight;
            for (p, v) in pooled[text * width..(text + 1) * width].iter_mut().zip(row) {
                *p += weight * v;
            }
        }
        for (text, out) in pooled.chunks_exact_mut(width).enumerate() {
            let scale = if normalize {
                1.0 / out.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12)
            } else {
                1.0 / weights[text]
            };
            out.iter_mut().for_each(|v| *v *= scale);
        }
        pooled
    }
}

/// One instance: the encoder and its buffers. `run` uses the rayon pool it is called in.
pub struct Runner {
    encoder: Arc<Encoder>,
    remove_padding: bool,
    threads: Threads,
    batch: PackedBatch,
    workspace: Workspace,
    head_out: Vec<f32>,
}

impl Runner {
    pub fn new(encoder: Arc<Encoder>, remove_padding: bool, threads: usize) -> Runner {
        Runner {
            encoder,
            remove_padding,
            threads: Threads(threads),
            batch: PackedBatch::default(),
            workspace: Workspace::default(),
            head_out: Vec::new(),
        }
    }

    /// Packs, runs and unpacks one batch. A request that fails validation fails alone.
    pub fn run(&mut self, requests: &[BackendRequest]) -> Execution {
        let Runner {
            encoder,
            remove_padding,
            threads,
            batch,
            workspace,
            head_out,
        } = self;
        run_batch(
            encoder,
            requests,
            *remove_padding,
            batch,
            head_out,
            |batch, out| {
                encoder.infer(batch, workspace, out, *threads);
                Ok(())
            },
        )
    }
}

/// One batch on any runner: packs the requests (a request that fails validation fails
/// alone), pads them when asked, runs `infer` (which leaves the head's output in its
/// second argument) and unpacks each request's outputs.
fn run_batch(
    encoder: &Encoder,
    requests: &[BackendRequest],
    remove_padding: bool,
    batch: &mut PackedBatch,
    head_out: &mut Vec<f32>,
    infer: impl FnOnce(&PackedBatch, &mut Vec<f32>) -> Result<()>,
) -> Execution {
    let started = Instant::now();
    batch.clear();
    let mut results: Vec<Option<Result<BackendResponse>>> = requests.iter().map(|_| None).collect();
    let mut packed: Vec<(usize, RequestRows)> = Vec::with_capacity(requests.len());
    for (i, request) in requests.iter().enumerate() {
        let mark = (batch.tokens(), batch.segments.len());
        match pack_request(encoder, request, batch) {
            Ok(rows) => packed.push((i, rows)),
            Err(e) => {
                truncate(batch, mark);
                results[i] = Some(Err(e));
            }
        }
    }
    if !remove_padding {
        pad_batch(encoder, batch);
    }
    let packed_at = Instant::now();
    let outcome = if batch.tokens() > 0 {
        infer(batch, head_out)
    } else {
        Ok(())
    };
    let inferred_at = Instant::now();
    for (i, rows) in packed {
        results[i] = Some(match &outcome {
            Ok(()) => Ok(unpack(
                encoder,
                batch,
                head_out,
                &rows,
                &requests[i].requested_outputs,
            )),
            Err(e) => Err(e.clone()),
        });
    }
    let done = Instant::now();
    Execution {
        results: results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::internal("request was not run"))))
            .collect(),
        times: ExecutionTimes {
            compute_input_ns: (packed_at - started).as_nanos() as u64,
            compute_infer_ns: (inferred_at - packed_at).as_nanos() as u64,
            compute_output_ns: (done - inferred_at).as_nanos() as u64,
        },
    }
}

/// One request's outputs from the head's packed output (`head_out`).
fn unpack(
    encoder: &Encoder,
    batch: &PackedBatch,
    head_out: &[f32],
    rows: &RequestRows,
    requested: &[String],
) -> BackendResponse {
    let width = encoder.head_width();
    let segments = &batch.segments[rows.first_segment..rows.first_segment + rows.rows];
    let mut outputs = Vec::new();
    // `count` rows of `extra` shape (rows.rows, or the texts of pooled windows).
    let mut push = |name: &str, count: usize, extra: &[i64], values: Vec<f32>| {
        if requested.is_empty() || requested.iter().any(|r| r == name) {
            let mut shape = if rows.batched {
                vec![count as i64]
            } else {
                Vec::new()
            };
            shape.extend_from_slice(extra);
            outputs.push(f32_tensor(name, shape, &values));
        }
    };
    match encoder.head_kind {
        HeadKind::Embedding | HeadKind::Classification => {
            let first = rows.first_segment * width;
            let values = &head_out[first..first + rows.rows * width];
            let name = if encoder.head_kind == HeadKind::Embedding {
                "embedding"
            } else {
                "logits"
            };
            match &rows.windows {
                Some(windows) => {
                    let pooled = windows.pool(values, width, encoder.normalizes());
                    push(name, pooled.len() / width.max(1), &[width as i64], pooled);
                }
                None => push(name, rows.rows, &[width as i64], values.to_vec()),
            }
        }
        HeadKind::QuestionAnswering | HeadKind::TokenClassification => {
            // Scatter packed tokens back to their columns; padding stays 0.
            let mut values = vec![0f32; rows.rows * rows.width * width];
            let mut columns = rows.columns.iter();
            for (r, seg) in segments.iter().enumerate() {
                for t in seg.start..seg.start + seg.len {
                    if let Some(valid) = &batch.key_valid {
                        if !valid[t] {
                            continue;
                        }
                    }
                    let Some(&c) = columns.next() else { break };
                    let dst = (r * rows.width + c as usize) * width;
                    values[dst..dst + width].copy_from_slice(&head_out[t * width..(t + 1) * width]);
                }
            }
            if encoder.head_kind == HeadKind::QuestionAnswering {
                let (start, end): (Vec<f32>, Vec<f32>) =
                    values.chunks_exact(2).map(|p| (p[0], p[1])).unzip();
                push("start_logits", rows.rows, &[rows.width as i64], start);
                push("end_logits", rows.rows, &[rows.width as i64], end);
            } else {
                push(
                    "logits",
                    rows.rows,
                    &[rows.width as i64, width as i64],
                    values,
                );
            }
        }
    }
    BackendResponse {
        outputs,
        parameters: Vec::new(),
    }
}

fn truncate(batch: &mut PackedBatch, (tokens, segments): (usize, usize)) {
    batch.ids.truncate(tokens);
    batch.positions.truncate(tokens);
    batch.types.truncate(tokens);
    batch.segments.truncate(segments);
}

fn f32_tensor(name: &str, shape: Vec<i64>, values: &[f32]) -> Tensor {
    let mut data = Vec::with_capacity(values.len() * 4);
    for v in values {
        data.extend_from_slice(&v.to_le_bytes());
    }
    Tensor {
        name: name.to_string(),
        datatype: DataType::Fp32,
        shape,
        data: Bytes::from(data),
    }
}

/// An integer input as i64 values with its [rows, width] shape.
fn read_ids(tensor: &Tensor) -> Result<(Vec<i64>, usize, usize, bool)> {
    let values: Vec<i64> = match tensor.datatype {
        DataType::Int64 => tensor
            .data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        DataType::Int32 => tensor
            .data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
            .collect(),
        other => {
            return Err(Error::invalid(format!(
                "input '{}' must be INT64 or INT32, not {other}",
                tensor.name
            )))
        }
    };
    let (rows, width, batched) = match tensor.shape[..] {
        [w] => (1, w as usize, false),
        [r, w] => (r as usize, w as usize, true),
        _ => {
            return Err(Error::invalid(format!(
                "input '{}' must have shape [batch, tokens] or [tokens], got {:?}",
                tensor.name, tensor.shape
            )))
        }
    };
    Ok((values, rows, width, batched))
}

/// Appends a request's real tokens to `batch`: one segment per row.
fn pack_request(
    encoder: &Encoder,
    request: &BackendRequest,
    batch: &mut PackedBatch,
) -> Result<RequestRows> {
    let dims = &encoder.dims;
    let find = |name: &str| request.inputs.iter().find(|t| t.name == name);
    let ids_tensor =
        find(INPUT_IDS).ok_or_else(|| Error::invalid(format!("missing input '{INPUT_IDS}'")))?;
    let (ids, rows, width, batched) = read_ids(ids_tensor)?;
    let same_shape = |name: &str| -> Result<Option<Vec<i64>>> {
        let Some(t) = find(name) else { return Ok(None) };
        if t.shape != ids_tensor.shape {
            return Err(Error::invalid(format!(
                "input '{name}' has shape {:?}, input '{INPUT_IDS}' has {:?}",
                t.shape, ids_tensor.shape
            )));
        }
        Ok(Some(read_ids(t)?.0))
    };
    let mask = same_shape(ATTENTION_MASK)?;
    let types = same_shape(TOKEN_TYPE_IDS)?;
    let first_segment = batch.segments.len();
    let mut columns = Vec::new();
    for r in 0..rows {
        let row = &ids[r * width..(r + 1) * width];
        let start = batch.tokens();
        let mut roberta_position = dims.pad_token_id;
        for (c, &id) in row.iter().enumerate() {
            if id < 0 || id as usize >= dims.vocab {
                return Err(Error::invalid(format!(
                    "input '{INPUT_IDS}'[{r}, {c}] is {id}, outside the vocabulary of {} tokens",
                    dims.vocab
                )));
            }
            let position = dims.position(c, id as u32, &mut roberta_position);
            let real = mask.as_ref().is_none_or(|m| m[r * width + c] != 0);
            if !real {
                continue;
            }
            if position as usize >= dims.max_positions {
                return Err(Error::invalid(format!(
                    "input '{INPUT_IDS}' row {r} is too long: token {c} needs position {position}, the model has {} position embeddings",
                    dims.max_positions
                )));
            }
            let token_type = match &types {
                Some(t) => {
                    let v = t[r * width + c];
                    if v < 0 || v as usize >= dims.type_vocab.max(1) {
                        return Err(Error::invalid(format!(
                            "input '{TOKEN_TYPE_IDS}'[{r}, {c}] is {v}; the model has {} token types",
                            dims.type_vocab.max(1)
                        )));
                    }
                    v as u32
                }
                None => 0,
            };
            batch.ids.push(id as u32);
            batch.positions.push(position);
            batch.types.push(token_type);
            columns.push(c as u32);
        }
        if batch.tokens() == start {
            return Err(Error::invalid(format!(
                "row {r} has no tokens to encode ('{INPUT_IDS}' is empty or '{ATTENTION_MASK}' is all 0)"
            )));
        }
        batch.segments.push(Segment {
            start,
            len: batch.tokens() - start,
        });
    }
    let windows = match find(WINDOW_OWNER) {
        None => None,
        Some(t) => {
            let owner = read_window_owner(t, rows, batched)?;
            let tokens = batch.segments[first_segment..]
                .iter()
                .map(|s| s.len)
                .collect();
            Some(Windows { owner, tokens })
        }
    };
    Ok(RequestRows {
        rows,
        width,
        batched,
        columns,
        first_segment,
        windows,
    })
}

/// `window_owner` for `rows` rows: from 0, each the row before's or one more.
fn read_window_owner(tensor: &Tensor, rows: usize, batched: bool) -> Result<Vec<usize>> {
    let shape_ok = batched && matches!(tensor.shape[..], [r] | [r, 1] if r as usize == rows);
    if !shape_ok {
        return Err(Error::invalid(format!(
            "input '{WINDOW_OWNER}' has shape {:?}; '{INPUT_IDS}' has {rows} rows, so it must be [{rows}] or [{rows}, 1]",
            tensor.shape
        )));
    }
    let (values, ..) = read_ids(&Tensor {
        shape: vec![rows as i64, 1],
        ..tensor.clone()
    })?;
    let mut owner = Vec::with_capacity(rows);
    for (r, &v) in values.iter().enumerate() {
        let expected = match owner.last() {
            None => v == 0,
            Some(&last) => v == last as i64 || v == last as i64 + 1,
        };
        if !expected {
            return Err(Error::invalid(format!(
                "input '{WINDOW_OWNER}'[{r}] is {v}: owners must start at 0 and go up by at most 1 a row"
            )));
        }
        owner.push(v as usize);
    }
    Ok(owner)
}

/// Padded mode: every segment grows to the batch's longest with padding tokens that
/// no query attends to (what an engine with a [batch, max_len] layout computes).
pub fn pad_batch(encoder: &Encoder, batch: &mut PackedBatch) {
    let longest = batch.segments.iter().map(|s| s.len).max().unwrap_or(0);
    let old = std::mem::take(batch);
    let mut valid = Vec::with_capacity(old.segments.len() * longest);
    for seg in &old.segments {
        let start = batch.tokens();
        for t in seg.start..seg.start + seg.len {
            batch.ids.push(old.ids[t]);
            batch.positions.push(old.positions[t]);
            batch.types.push(old.types[t]);
            valid.push(true);
        }
        for _ in seg.len..longest {
            batch.ids.push(encoder.dims.pad_token_id);
            batch.positions.push(0);
            batch.types.push(0);
            valid.push(false);
        }
        batch.segments.push(Segment {
            start,
            len: longest,
        });
    }
    batch.key_valid = Some(valid);
}

#[cfg(test)]
mod settings_tests {
    use super::*;

    fn settings(parameters: &str) -> Result<EncoderSettings> {
        let text = format!(
            "backend = \"encoder\"\n[[input]]\nname = \"input_ids\"\ndatatype = \"INT64\"\ndims = [-1]\n\
             [[output]]\nname = \"embedding\"\ndatatype = \"FP32\"\ndims = [8]\n[parameters]\n{parameters}"
        );
        EncoderSettings::from_config(&ModelConfig::parse(&text, "m").unwrap())
    }

    #[test]
    fn parameters_are_typed_and_unknown_keys_named() {
        let s =
            settings("head = \"qa\"\nthreads = 3\nremove_padding = false\ngpu_runtime = \"twin\"")
                .unwrap();
        assert_eq!(
            (s.head, s.threads, s.remove_padding),
            (Some(HeadKind::QuestionAnswering), 3, false)
        );
        assert_eq!(s.gpu_runtime, GpuRuntime::Twin);
        let e = settings("pooling_mode = \"mean\"").unwrap_err();
        assert!(e.message.contains("unknown field `pooling_mode`"), "{e:?}");
        let e = settings("normalize = \"yes\"").unwrap_err();
        assert!(
            e.message.contains("invalid type") && e.message.contains("[parameters]"),
            "{e:?}"
        );
        let e = settings("threads = 100000").unwrap_err();
        assert!(e.message.contains("'threads' is 100000"), "{e:?}");
        let e = settings("precision = \"int3\"").unwrap_err();
        assert!(e.message.contains("parameter 'precision' must be"), "{e:?}");
        assert_eq!(settings("").unwrap().nice, DEFAULT_NICE);
        assert_eq!(settings("nice = 0").unwrap().nice, 0);
        let e = settings("nice = 25").unwrap_err();
        assert!(e.message.contains("parameter 'nice' must be"), "{e:?}");
    }

    /// Compute threads lower their own priority only (Linux niceness is per thread).
    #[cfg(target_os = "linux")]
    #[test]
    fn compute_threads_lower_their_own_priority() {
        let nice_of_this_thread = || unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        };
        let before = nice_of_this_thread();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .start_handler(|_| lower_thread_priority(7))
            .build()
            .unwrap();
        let inside: Vec<i32> = pool.broadcast(|_| nice_of_this_thread());
        assert_eq!(inside, vec![before.max(7); 2]);
        assert_eq!(
            nice_of_this_thread(),
            before,
            "the caller's priority is unchanged"
        );
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn windows_average_by_tokens_and_renormalise() {
        let windows = Windows {
            owner: vec![0, 0, 1],
            tokens: vec![3, 1, 5],
        };
        let rows = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0];
        // Weighted mean: (3·(1,0) + 1·(0,1)) / 4, and the single window as it is.
        assert_eq!(windows.pool(&rows, 2, false), [0.75, 0.25, 2.0, 2.0]);
        let unit = windows.pool(&rows, 2, true);
        let norm = 10f32.sqrt();
        let want = [3.0 / norm, 1.0 / norm, 0.5f32.sqrt(), 0.5f32.sqrt()];
        for (u, w) in unit.iter().zip(want) {
            assert!((u - w).abs() < 1e-6, "{unit:?}");
        }
    }

    #[test]
    fn window_owners_must_count_up_from_zero() {
        let owner = |values: &[i64], shape: Vec<i64>| {
            let tensor = Tensor {
                name: WINDOW_OWNER.into(),
                datatype: DataType::Int64,
                shape,
                data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            read_window_owner(&tensor, 3, true)
        };
        assert_eq!(owner(&[0, 0, 1], vec![3, 1]).unwrap(), [0, 0, 1]);
        assert_eq!(owner(&[0, 1, 2], vec![3]).unwrap(), [0, 1, 2]);
        for bad in [[1, 1, 2], [0, 2, 2], [0, 1, 0], [0, -1, 0]] {
            let err = owner(&bad, vec![3, 1]).unwrap_err();
            assert!(err.message.contains("window_owner"), "{}", err.message);
        }
        assert!(owner(&[0, 0], vec![2, 1]).is_err());
        assert!(owner(&[0, 0, 0], vec![1, 3]).is_err());
    }
}
