//! wisp's kernels loaded on one GPU, with typed launchers. Arguments are raw device
//! addresses (u64), so launches need no cudarc bookkeeping and can be graph-captured.

use super::nvrtc::{self, KernelFile};
use super::ops::Op;
use super::Gpu;
use cudarc::driver::sys::{self, CUstream};
use cudarc::driver::{CudaFunction, CudaModule};
use std::ffi::c_void;
use std::sync::Arc;
use wisp_core::error::{Error, Result};

/// Query rows per attention block (kernels/attention.cu: 4 warps × 16 rows).
pub const ATTENTION_QUERY_TILE: usize = 64;
const ATTENTION_THREADS: u32 = 128;
/// The longest sequence the attention kernel takes.
pub const MAX_SEQUENCE: usize = 512;
/// Head sizes with an attention kernel.
pub const HEAD_SIZES: [usize; 3] = [32, 64, 128];
/// Rows of slack after every activation matrix: the attention kernel's 16-row tiles
/// read up to 15 rows past a sequence's end (query and key rows alike).
pub const SLACK_ROWS: usize = 64;

pub const POOL_MEAN: i32 = 0;
pub const POOL_CLS: i32 = 1;
pub const POOL_MAX: i32 = 2;
pub const ACTIVATION_NONE: i32 = 0;
pub const ACTIVATION_TANH: i32 = 1;
pub const ACTIVATION_RELU: i32 = 2;

/// A kernel argument: a device address, an int or a float.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

pub struct Kernels {
    embed_layernorm: CudaFunction,
    residual_layernorm: CudaFunction,
    attention: [CudaFunction; 3],
    pool_embedding: CudaFunction,
    token_head: CudaFunction,
    sequence_head: CudaFunction,
    _modules: Vec<Arc<CudaModule>>,
    /// Compiled now rather than read from the disk cache (for the log).
    pub compiled: usize,
    pub resources: Vec<KernelResources>,
}

fn launch_error(kernel: &str, e: impl std::fmt::Debug) -> Error {
    Error::internal(format!("kernel {kernel} failed to launch: {e:?}"))
}

/// Threads for a row kernel over `width` halves read in pairs.
fn row_threads(width: usize) -> u32 {
    (width.div_ceil(2).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// What the compiler gave one kernel (logged at load: spills show as local memory).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelResources {
    pub name: &'static str,
    pub registers: i32,
    pub local_bytes: i32,
    pub static_shared_bytes: i32,
    pub max_threads_per_block: i32,
}

impl Kernels {
    /// The kernels of `gpu`'s device, loaded once per process and kept: loading (or
    /// unloading) a module may synchronize the context, so it never happens while
    /// models on that GPU serve, except once before the first one does.
    pub fn of_device(gpu: &Gpu) -> Result<Arc<Kernels>> {
        static LOADED: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashMap<usize, Arc<Kernels>>>,
        > = std::sync::OnceLock::new();
        let loaded = LOADED.get_or_init(Default::default);
        let mut loaded = loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(kernels) = loaded.get(&gpu.ordinal) {
            return Ok(kernels.clone());
        }
        let kernels = Arc::new(Kernels::load(gpu)?);
        if kernels.compiled > 0 {
            tracing::info!(
                gpu = %gpu.name,
                arch = %gpu.arch,
                files = kernels.compiled,
                "kernels compiled by NVRTC (cached for next time)"
            );
        }
        for r in &kernels.resources {
            tracing::info!(
                gpu = gpu.ordinal,
                kernel = r.name,
                registers = r.registers,
                local_bytes = r.local_bytes,
                static_shared_bytes = r.static_shared_bytes,
                max_threads_per_block = r.max_threads_per_block,
                "kernel loaded"
            );
            if r.local_bytes > 0 {
                tracing::warn!(
                    kernel = r.name,
                    local_bytes = r.local_bytes,
                    "kernel uses local memory (register spills or an indexed array): slower"
                );
            }
        }
        loaded.insert(gpu.ordinal, kernels.clone());
        Ok(kernels)
    }

    /// Compiles (or reads from the cache) every kernel file for this GPU and loads it.
    /// A cached image the driver rejects (a corrupt or truncated file) is recompiled.
    pub fn load(gpu: &Gpu) -> Result<Kernels> {
        let toolkit = nvrtc::find_toolkit()?;
        gpu.bind()?;
        let mut modules = Vec::new();
        let mut compiled = 0;
        let mut functions = std::collections::HashMap::new();
        let load_image = |image: Vec<u8>| {
            gpu.gate.exclusive(|| {
                gpu.context
                    .load_module(cudarc::nvrtc::Ptx::from_binary(image))
            })
        };
        for file in nvrtc::KERNEL_FILES {
            let image = nvrtc::compile(&file, &gpu.arch, &toolkit)?;
            compiled += usize::from(!image.from_cache);
            let module = match load_image(image.cubin) {
                Ok(module) => module,
                Err(e) if image.from_cache => {
                    tracing::warn!(
                        file = file.name,
                        key = %image.key,
                        error = ?e,
                        "the cached kernel image does not load; compiling it again"
                    );
                    let fresh = nvrtc::recompile(&file, &gpu.arch, &toolkit)?;
                    compiled += 1;
                    load_image(fresh.cubin).map_err(|e| {
                        Error::internal(format!(
                            "cannot load kernels/{} on {}: {e:?}",
                            file.name, gpu.name
                        ))
                    })?
                }
                Err(e) => {
                    return Err(Error::internal(format!(
                        "cannot load kernels/{} on {}: {e:?}",
                        file.name, gpu.name
                    )))
                }
            };
            load_functions(&module, &file, &mut functions)?;
            modules.push(module);
        }
        let mut resources = Vec::new();
        for file in nvrtc::KERNEL_FILES {
            for &name in file.functions {
                let f = &functions[name];
                use sys::CUfunction_attribute::*;
                let attribute = |a| f.get_attribute(a).unwrap_or(-1);
                resources.push(KernelResources {
                    name,
                    registers: attribute(CU_FUNC_ATTRIBUTE_NUM_REGS),
                    local_bytes: attribute(CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
                    static_shared_bytes: attribute(CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES),
                    max_threads_per_block: attribute(CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK),
                });
            }
        }
        let mut take = |name: &str| functions.remove(name).expect("listed in KERNEL_FILES");
        let attention = [
            take("attention_d32"),
            take("attention_d64"),
            take("attention_d128"),
        ];
        for (function, head_size) in attention.iter().zip(HEAD_SIZES) {
            let bytes = attention_shared_bytes(key_capacity(MAX_SEQUENCE, head_size), head_size);
            function
                .set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(|e| {
                    Error::unavailable(format!(
                        "{} cannot give the attention kernel (head size {head_size}) {} KiB of shared memory: {e:?}",
                        gpu.name,
                        bytes >> 10
                    ))
                })?;
        }
        Ok(Kernels {
            embed_layernorm: take("embed_layernorm"),
            residual_layernorm: take("residual_layernorm"),
            attention,
            pool_embedding: take("pool_embedding"),
            token_head: take("token_head"),
            sequence_head: take("sequence_head"),
            _modules: modules,
            compiled,
            resources,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_raw(
        &self,
        function: &CudaFunction,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared: usize,
        stream: CUstream,
        args: &[Arg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        // Every argument in a 64-bit slot; a 4-byte parameter reads the slot's low half.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => v as u32 as u64,
                Arg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| (s as *mut u64).cast::<c_void>())
            .collect();
        // SAFETY: the argument list matches the kernel's signature (each launcher below
        // mirrors its .cu declaration) and every address is a live device buffer.
        unsafe {
            cudarc::driver::result::launch_kernel(
                function.cu_function(),
                grid,
                (block, 1, 1),
                shared as u32,
                stream,
                &mut params,
            )
        }
        .map_err(|e| launch_error(name, e))
    }

    /// Launches `op` on `stream` (every operation but `Linear`, which is cuBLASLt's).
    pub fn launch(&self, stream: CUstream, op: &Op) -> Result<()> {
        use Arg::*;
        match *op {
            Op::EmbedLayerNorm {
                out,
                ids,
                positions,
                types,
                word,
                position,
                token_type,
                gamma,
                beta,
                tokens,
                width,
                eps,
            } => self.launch_raw(
                &self.embed_layernorm,
                "embed_layernorm",
                (tokens as u32, 1, 1),
                row_threads(width),
                width * 4,
                stream,
                &[
                    Ptr(out),
                    Ptr(ids),
                    Ptr(positions),
                    Ptr(types),
                    Ptr(word),
                    Ptr(position),
                    Ptr(token_type),
                    Ptr(gamma),
                    Ptr(beta),
                    I32(width as i32),
                    F32(eps),
                ],
            ),
            Op::ResidualLayerNorm {
                out,
                x,
                residual,
                gamma,
                beta,
                tokens,
                width,
                eps,
            } => self.launch_raw(
                &self.residual_layernorm,
                "residual_layernorm",
                (tokens as u32, 1, 1),
                row_threads(width),
                width * 4,
                stream,
                &[
                    Ptr(out),
                    Ptr(x),
                    Ptr(residual),
                    Ptr(gamma),
                    Ptr(beta),
                    I32(width as i32),
                    F32(eps),
                ],
            ),
            Op::Attention {
                out,
                qkv,
                seq_start,
                key_valid,
                sequences,
                max_len,
                hidden,
                heads,
            } => {
                let head_size = hidden / heads;
                let index = HEAD_SIZES
                    .iter()
                    .position(|&d| d == head_size)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "head size {head_size} has no GPU attention kernel (sizes: {HEAD_SIZES:?})"
                        ))
                    })?;
                if max_len > MAX_SEQUENCE {
                    return Err(Error::invalid(format!(
                        "sequences of {max_len} tokens exceed the GPU attention kernel's {MAX_SEQUENCE}"
                    )));
                }
                let capacity = key_capacity(max_len, head_size);
                let shared = attention_shared_bytes(capacity, head_size);
                self.launch_raw(
                    &self.attention[index],
                    "attention",
                    (
                        max_len.div_ceil(ATTENTION_QUERY_TILE) as u32,
                        heads as u32,
                        sequences as u32,
                    ),
                    ATTENTION_THREADS,
                    shared,
                    stream,
                    &[
                        Ptr(out),
                        Ptr(qkv),
                        Ptr(seq_start),
                        Ptr(key_valid),
                        I32(hidden as i32),
                        I32(capacity as i32),
                        F32(1.0 / (head_size as f32).sqrt()),
                    ],
                )
            }
            Op::PoolEmbedding {
                out,
                hidden,
                seq_start,
                key_valid,
                sequences,
                width,
                mode,
                normalize,
            } => self.launch_raw(
                &self.pool_embedding,
                "pool_embedding",
                (sequences as u32, 1, 1),
                256,
                width * 4,
                stream,
                &[
                    Ptr(out),
                    Ptr(hidden),
                    Ptr(seq_start),
                    Ptr(key_valid),
                    I32(width as i32),
                    I32(mode),
                    I32(normalize as i32),
                ],
            ),
            Op::TokenHead {
                out,
                hidden,
                weight,
                bias,
                tokens,
                width,
                labels,
            } => self.launch_raw(
                &self.token_head,
                "token_head",
                (tokens.div_ceil(8) as u32, 1, 1),
                256,
                0,
                stream,
                &[
                    Ptr(out),
                    Ptr(hidden),
                    Ptr(weight),
                    Ptr(bias),
                    I32(tokens as i32),
                    I32(width as i32),
                    I32(labels as i32),
                ],
            ),
            Op::SequenceHead {
                out,
                hidden,
                seq_start,
                pre,
                weight,
                bias,
                sequences,
                width,
                labels,
            } => {
                let (pre_weight, pre_bias, activation) = pre.unwrap_or((0, 0, ACTIVATION_NONE));
                self.launch_raw(
                    &self.sequence_head,
                    "sequence_head",
                    (sequences as u32, 1, 1),
                    256,
                    2 * width * 4,
                    stream,
                    &[
                        Ptr(out),
                        Ptr(hidden),
                        Ptr(seq_start),
                        Ptr(pre_weight),
                        Ptr(pre_bias),
                        I32(activation),
                        Ptr(weight),
                        Ptr(bias),
                        I32(width as i32),
                        I32(labels as i32),
                    ],
                )
            }
            Op::Linear { .. } => Err(Error::internal(
                "a Linear operation is cuBLASLt's, not a kernel launch",
            )),
        }
    }
}

fn load_functions(
    module: &Arc<CudaModule>,
    file: &KernelFile,
    functions: &mut std::collections::HashMap<&'static str, CudaFunction>,
) -> Result<()> {
    for &name in file.functions {
        let function = module.load_function(name).map_err(|e| {
            Error::internal(format!(
                "kernels/{} has no function {name}: {e:?}",
                file.name
            ))
        })?;
        functions.insert(name, function);
    }
    Ok(())
}

/// The attention kernel's per-warp score row length for sequences up to `max_len`.
pub fn key_capacity(max_len: usize, head_size: usize) -> usize {
    (max_len.div_ceil(16) * 16).max(head_size)
}

/// Padding of the attention kernel's shared rows, in 4-byte words (kernels/attention.cu
/// ROW_PAD): rows 16 bytes apart in the banks, as WMMA's ldm rules allow.
const ATTENTION_ROW_PAD: usize = 4;

/// Dynamic shared memory of one attention block, as kernels/attention.cu lays it out:
/// per warp 16 score rows of `capacity + pad` floats, then per warp a 16-row V tile of
/// `head_size + 2·pad` halves.
pub fn attention_shared_bytes(capacity: usize, head_size: usize) -> usize {
    let warps = ATTENTION_THREADS as usize / 32;
    let scores = warps * 16 * (capacity + ATTENTION_ROW_PAD) * 4;
    let v_tiles = warps * 16 * (head_size + 2 * ATTENTION_ROW_PAD) * 2;
    scores + v_tiles
}
