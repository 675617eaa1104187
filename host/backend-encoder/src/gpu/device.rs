//! Where the GPU encoder's operations run. `CudaDevice` is the real thing: a GPU, wisp's
//! kernels and cuBLASLt, one stream per queue. `TwinDevice` runs the very same sequence
//! of operations with the kernels' CPU twins on host memory, so the GPU runner's own
//! logic (packing, launch-shape buckets, the input layout, buffer offsets, heads, unpacking)
//! is tested end to end on machines without a GPU, against the same references.

use super::blas::Blas;
use super::kernels::Kernels;
use super::ops::Op;
use super::{twins, DeviceBuffer, Gpu, PinnedBuffer};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaStream, DriverError};
use half::f16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wisp_core::error::{Error, Result};

/// Memory on a device; `ptr` is its address there, freed when the buffer drops.
pub struct Buffer {
    pub ptr: u64,
    pub bytes: usize,
    _owner: Box<dyn Send + Sync>,
}

pub trait Device: Send + Sync {
    /// For logs and errors, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
    fn describe(&self) -> String;
    /// `bytes` of zeroed memory, for data shared by every queue (weights).
    fn alloc(&self, bytes: usize) -> Result<Buffer>;
    fn upload(&self, bytes: &[u8]) -> Result<Buffer>;
    /// An ordered queue of operations (a CUDA stream), for one instance.
    fn new_queue(&self) -> Result<Box<dyn Queue>>;
}

/// A captured sequence of operations, replayed as one launch.
pub trait Replay: Send {
    fn replay(&self) -> Result<()>;
}

/// The operations of a forward pass, in order. All addresses are device addresses;
/// shapes are in elements. See kernels/*.cu for each kernel's contract.
pub trait Queue: Send {
    /// `bytes` of zeroed memory for this queue's own use, allocated and later freed in
    /// its order (waits for this queue only).
    fn alloc(&mut self, bytes: usize) -> Result<Buffer>;
    /// Copies `words` to `dst` (ordered before later operations).
    fn copy_in(&mut self, dst: u64, words: &[u32]) -> Result<()>;
    /// Copies `out.len()` floats from `src` and waits for everything queued.
    fn copy_out(&mut self, out: &mut [f32], src: u64) -> Result<()>;
    /// Waits for everything queued (errors ignored: used to drain after a failure).
    fn drain(&mut self);
    /// Starts recording instead of running; false when this queue cannot record.
    fn begin_capture(&mut self) -> Result<bool>;
    /// Ends the recording (always called after a `begin_capture` that returned true).
    fn end_capture(&mut self) -> Result<Box<dyn Replay>>;
    /// Why the device can no longer run anything (a sticky error poisoned its
    /// context), once it happened.
    fn poisoned(&self) -> Option<String>;

    /// Queues one operation of the forward pass.
    fn run(&mut self, op: &Op) -> Result<()>;
}

// ------------------------------------------------------------------------------ CUDA

/// A GPU with wisp's kernels loaded.
pub struct CudaDevice {
    pub gpu: Gpu,
    kernels: Arc<Kernels>,
    /// Where shared buffers (weights) are allocated and uploaded.
    setup: Arc<CudaStream>,
}

impl CudaDevice {
    pub fn open(ordinal: usize) -> Result<CudaDevice> {
        let gpu = Gpu::open(ordinal)?;
        let kernels = Kernels::of_device(&gpu)?;
        Ok(CudaDevice {
            setup: gpu.new_stream()?,
            gpu,
            kernels,
        })
    }

    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }
}

fn owned(buffer: DeviceBuffer) -> Buffer {
    Buffer {
        ptr: buffer.ptr,
        bytes: buffer.bytes,
        _owner: Box::new(buffer),
    }
}

impl Device for CudaDevice {
    fn describe(&self) -> String {
        format!("{} ({})", self.gpu.name, self.gpu.arch)
    }

    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        DeviceBuffer::zeroed(&self.gpu, &self.setup, bytes).map(owned)
    }

    fn upload(&self, bytes: &[u8]) -> Result<Buffer> {
        DeviceBuffer::from_slice(&self.gpu, &self.setup, bytes).map(owned)
    }

    fn new_queue(&self) -> Result<Box<dyn Queue>> {
        let stream = self.gpu.new_stream()?;
        Ok(Box::new(CudaQueue {
            blas: Blas::new(&self.gpu, &stream)?,
            kernels: self.kernels.clone(),
            pinned_in: PinnedBuffer::new(&self.gpu, 1 << 16)?,
            pinned_out: PinnedBuffer::new(&self.gpu, 1 << 16)?,
            gpu: self.gpu.clone(),
            stream,
            capturing: false,
            poisoned: None,
        }))
    }
}

/// One CUDA stream with its own cuBLASLt handle and pinned staging buffers.
struct CudaQueue {
    gpu: Gpu,
    stream: Arc<CudaStream>,
    blas: Blas,
    kernels: Arc<Kernels>,
    pinned_in: PinnedBuffer<u32>,
    pinned_out: PinnedBuffer<f32>,
    /// Inside begin_capture/end_capture (holding the gate's capture side).
    capturing: bool,
    poisoned: Option<String>,
}

fn cuda(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::internal(format!("{what}: {e:?}"))
}

struct CudaReplay(CudaGraph);

impl Replay for CudaReplay {
    fn replay(&self) -> Result<()> {
        self.0
            .launch()
            .map_err(|e| cuda("cannot launch the CUDA graph", e))
    }
}

// SAFETY: a queue is used by one instance thread at a time; CUDA handles are
// thread-agnostic once the context is bound, which every entry point does.
unsafe impl Send for CudaReplay {}

impl CudaQueue {
    fn bind(&self) -> Result<()> {
        self.gpu.bind()
    }

    /// Notes a sticky error (the context is gone for good) and converts it.
    fn check<T>(&mut self, what: &str, result: std::result::Result<T, DriverError>) -> Result<T> {
        result.map_err(|e| {
            if super::is_sticky(&e) && self.poisoned.is_none() {
                self.poisoned = Some(format!("{what}: {e:?}"));
            }
            cuda(what, e)
        })
    }

    /// Staging buffers only grow (nothing captured refers to them). Called only after
    /// the stream was waited for, so no copy still reads the old ones.
    fn grow_pinned(&mut self, words_in: usize, floats_out: usize) -> Result<()> {
        if self.pinned_in.len() < words_in {
            self.pinned_in = PinnedBuffer::new(&self.gpu, words_in.next_power_of_two())?;
        }
        if self.pinned_out.len() < floats_out {
            self.pinned_out = PinnedBuffer::new(&self.gpu, floats_out.next_power_of_two())?;
        }
        Ok(())
    }
}

impl Queue for CudaQueue {
    fn alloc(&mut self, bytes: usize) -> Result<Buffer> {
        DeviceBuffer::zeroed(&self.gpu, &self.stream, bytes).map(owned)
    }

    fn copy_in(&mut self, dst: u64, words: &[u32]) -> Result<()> {
        self.bind()?;
        self.grow_pinned(words.len(), 0)?;
        let staging = &mut self.pinned_in.as_mut_slice()[..words.len()];
        staging.copy_from_slice(words);
        // SAFETY: pinned source of `words.len()` u32s; the destination is a device
        // buffer at least that large; the stream orders it before later work, and the
        // staging buffer is not rewritten before the stream is waited for (copy_out/drain).
        let copied = unsafe {
            cudarc::driver::result::memcpy_htod_async(dst, &staging[..], self.stream.cu_stream())
        };
        self.check("cannot copy the batch to the GPU", copied)
    }

    fn copy_out(&mut self, out: &mut [f32], src: u64) -> Result<()> {
        self.bind()?;
        self.grow_pinned(0, out.len())?;
        let staging = &mut self.pinned_out.as_mut_slice()[..out.len()];
        // SAFETY: the device source holds at least `out.len()` floats.
        let copied = unsafe {
            cudarc::driver::result::memcpy_dtoh_async(staging, src, self.stream.cu_stream())
        };
        self.check("cannot copy results from the GPU", copied)?;
        let waited = self.stream.synchronize();
        self.check("the GPU forward pass failed", waited)?;
        out.copy_from_slice(&self.pinned_out.as_slice()[..out.len()]);
        Ok(())
    }

    fn drain(&mut self) {
        let waited = self.stream.synchronize();
        let _ = self.check("the GPU failed", waited);
    }

    fn begin_capture(&mut self) -> Result<bool> {
        self.bind()?;
        self.gpu.gate.enter_capture();
        let begun = self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
        if let Err(e) = begun {
            self.gpu.gate.leave_capture();
            return self.check("cannot start a CUDA graph capture", Err(e));
        }
        self.capturing = true;
        Ok(true)
    }

    fn end_capture(&mut self) -> Result<Box<dyn Replay>> {
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        if std::mem::take(&mut self.capturing) {
            self.gpu.gate.leave_capture();
        }
        let graph = self
            .check("cannot capture the forward pass as a CUDA graph", ended)?
            .ok_or_else(|| Error::internal("the captured CUDA graph is empty"))?;
        Ok(Box::new(CudaReplay(graph)))
    }

    fn poisoned(&self) -> Option<String> {
        self.poisoned.clone()
    }

    fn run(&mut self, op: &Op) -> Result<()> {
        let stream = self.stream.cu_stream();
        let result = match *op {
            Op::Linear {
                y,
                x,
                w,
                bias,
                m,
                n,
                k,
                epilogue,
            } => self.blas.linear(stream, y, x, w, bias, (m, n, k), epilogue),
            _ => self.kernels.launch(stream, op),
        };
        if result.is_err() && !self.capturing {
            // A failed launch may be an earlier kernel's fault surfacing: a sticky error
            // shows on the stream.
            let waited = self.stream.synchronize();
            let _ = self.check("the GPU failed", waited);
        }
        result
    }
}

impl Drop for CudaQueue {
    fn drop(&mut self) {
        if std::mem::take(&mut self.capturing) {
            let _ = self.stream.end_capture(CUgraphInstantiate_flags(0));
            self.gpu.gate.leave_capture();
        }
        // Buffers freed after this point are freed in this stream's order; nothing of
        // this queue may still run when the weights it read are freed.
        let _ = self.stream.synchronize();
    }
}

// ------------------------------------------------------------------------------ twins

/// Host memory standing in for device memory: address = allocation id << 40 | offset.
#[derive(Default)]
struct Arena {
    next: u64,
    blocks: HashMap<u64, Vec<u8>>,
}

const BLOCK_SHIFT: u32 = 40;

/// The GPU encoder's operations on the CPU twins of its kernels (slow; for tests).
/// Captures record the operations and replay them, as CUDA graphs do (addresses fixed
/// at capture), so the runner's graph cache is exercised too.
#[derive(Clone, Default)]
pub struct TwinDevice {
    arena: Arc<Mutex<Arena>>,
    faults: Arc<TwinFaults>,
    counters: Arc<TwinCounters>,
}

/// Failures a test can ask the twin device for.
#[derive(Default)]
pub struct TwinFaults {
    /// Every capture fails at its end, as an invalidated CUDA capture does.
    pub fail_captures: bool,
    /// After this many operations run, the device is poisoned (as by an illegal
    /// address): every later operation fails and every queue reports it.
    pub poison_after_ops: Option<usize>,
}

#[derive(Default)]
struct TwinCounters {
    ops_run: std::sync::atomic::AtomicUsize,
    captures: std::sync::atomic::AtomicUsize,
    captures_begun: std::sync::atomic::AtomicUsize,
}

impl TwinDevice {
    fn poisoned(&self) -> bool {
        self.faults.poison_after_ops.is_some_and(|n| {
            self.counters
                .ops_run
                .load(std::sync::atomic::Ordering::SeqCst)
                >= n
        })
    }
}

struct TwinAllocation {
    arena: Arc<Mutex<Arena>>,
    id: u64,
}

impl Drop for TwinAllocation {
    fn drop(&mut self) {
        self.arena.lock().expect("arena").blocks.remove(&self.id);
    }
}

impl TwinDevice {
    pub fn new() -> TwinDevice {
        TwinDevice::default()
    }

    /// A twin device that fails as `faults` says.
    pub fn with_faults(faults: TwinFaults) -> TwinDevice {
        TwinDevice {
            faults: Arc::new(faults),
            ..TwinDevice::default()
        }
    }

    /// Captures started so far.
    pub fn captures_begun(&self) -> usize {
        self.counters
            .captures_begun
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Captures ended successfully so far.
    pub fn captures(&self) -> usize {
        self.counters
            .captures
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `count` values of `T` at `ptr` (None: to the end of the allocation).
    fn read<T: Copy + Default>(&self, ptr: u64, count: Option<usize>) -> Result<Vec<T>> {
        let arena = self.arena.lock().expect("arena");
        let (id, offset) = (
            ptr >> BLOCK_SHIFT,
            (ptr & ((1 << BLOCK_SHIFT) - 1)) as usize,
        );
        let block = arena.blocks.get(&id).ok_or_else(|| {
            Error::internal(format!("twin device: address {ptr:#x} is not allocated"))
        })?;
        let size = std::mem::size_of::<T>();
        let available = block.len().saturating_sub(offset) / size;
        let count = count.unwrap_or(available);
        if count > available {
            return Err(Error::internal(format!(
                "twin device: reading {count} values at {ptr:#x} overruns its allocation"
            )));
        }
        let mut values = vec![T::default(); count];
        // SAFETY: plain-old-data copy of `count * size` bytes inside the block.
        unsafe {
            std::ptr::copy_nonoverlapping(
                block.as_ptr().add(offset),
                values.as_mut_ptr().cast::<u8>(),
                count * size,
            )
        };
        Ok(values)
    }

    fn write<T: Copy>(&self, ptr: u64, values: &[T]) -> Result<()> {
        let mut arena = self.arena.lock().expect("arena");
        let (id, offset) = (
            ptr >> BLOCK_SHIFT,
            (ptr & ((1 << BLOCK_SHIFT) - 1)) as usize,
        );
        let block = arena.blocks.get_mut(&id).ok_or_else(|| {
            Error::internal(format!("twin device: address {ptr:#x} is not allocated"))
        })?;
        let bytes = std::mem::size_of_val(values);
        if offset + bytes > block.len() {
            return Err(Error::internal(format!(
                "twin device: writing {bytes} bytes at {ptr:#x} overruns its allocation"
            )));
        }
        // SAFETY: plain-old-data copy inside the block (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr().cast::<u8>(),
                block.as_mut_ptr().add(offset),
                bytes,
            )
        };
        Ok(())
    }

    fn halves(&self, ptr: u64, count: Option<usize>) -> Result<Vec<f16>> {
        self.read::<f16>(ptr, count)
    }

    fn optional_halves(&self, ptr: u64) -> Result<Option<Vec<f16>>> {
        (ptr != 0).then(|| self.halves(ptr, None)).transpose()
    }

    fn starts(&self, ptr: u64, sequences: usize) -> Result<Vec<i32>> {
        self.read::<i32>(ptr, Some(sequences + 1))
    }

    fn valid(&self, ptr: u64, tokens: usize) -> Result<Option<Vec<u8>>> {
        (ptr != 0)
            .then(|| self.read::<u8>(ptr, Some(tokens)))
            .transpose()
    }
}

impl Device for TwinDevice {
    fn describe(&self) -> String {
        "the CPU twins of the GPU kernels".to_string()
    }

    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        let mut arena = self.arena.lock().expect("arena");
        arena.next += 1;
        let id = arena.next;
        arena.blocks.insert(id, vec![0u8; bytes.max(256)]);
        Ok(Buffer {
            ptr: id << BLOCK_SHIFT,
            bytes: bytes.max(256),
            _owner: Box::new(TwinAllocation {
                arena: self.arena.clone(),
                id,
            }),
        })
    }

    fn upload(&self, bytes: &[u8]) -> Result<Buffer> {
        let buffer = self.alloc(bytes.len())?;
        self.write(buffer.ptr, bytes)?;
        Ok(buffer)
    }

    fn new_queue(&self) -> Result<Box<dyn Queue>> {
        Ok(Box::new(TwinQueue {
            device: self.clone(),
            recording: None,
        }))
    }
}

/// One queue on the twin device: runs operations at once, or records them.
struct TwinQueue {
    device: TwinDevice,
    recording: Option<Vec<Op>>,
}

struct TwinReplay {
    device: TwinDevice,
    ops: Vec<Op>,
}

impl Replay for TwinReplay {
    fn replay(&self) -> Result<()> {
        self.ops.iter().try_for_each(|op| self.device.execute(op))
    }
}

const POISONED: &str = "twin device: an earlier operation faulted (CUDA_ERROR_ILLEGAL_ADDRESS)";

impl Queue for TwinQueue {
    fn alloc(&mut self, bytes: usize) -> Result<Buffer> {
        self.device.alloc(bytes)
    }

    fn copy_in(&mut self, dst: u64, words: &[u32]) -> Result<()> {
        self.device.write(dst, words)
    }

    fn copy_out(&mut self, out: &mut [f32], src: u64) -> Result<()> {
        if self.device.poisoned() {
            return Err(Error::internal(POISONED));
        }
        out.copy_from_slice(&self.device.read::<f32>(src, Some(out.len()))?);
        Ok(())
    }

    fn drain(&mut self) {}

    fn begin_capture(&mut self) -> Result<bool> {
        self.device
            .counters
            .captures_begun
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.recording = Some(Vec::new());
        Ok(true)
    }

    fn end_capture(&mut self) -> Result<Box<dyn Replay>> {
        let ops = self.recording.take().unwrap_or_default();
        if self.device.faults.fail_captures {
            return Err(Error::internal(
                "twin device: the capture was invalidated (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)",
            ));
        }
        self.device
            .counters
            .captures
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Box::new(TwinReplay {
            device: self.device.clone(),
            ops,
        }))
    }

    fn poisoned(&self) -> Option<String> {
        self.device.poisoned().then(|| POISONED.to_string())
    }

    fn run(&mut self, op: &Op) -> Result<()> {
        match &mut self.recording {
            Some(ops) => {
                ops.push(*op);
                Ok(())
            }
            None => self.device.execute(op),
        }
    }
}

impl TwinDevice {
    fn execute(&self, op: &Op) -> Result<()> {
        if self.poisoned() {
            return Err(Error::internal(POISONED));
        }
        self.counters
            .ops_run
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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
            } => {
                let result = twins::embed_layernorm(
                    &self.read::<u32>(ids, Some(tokens))?,
                    &self.read::<u32>(positions, Some(tokens))?,
                    &self.read::<u32>(types, Some(tokens))?,
                    &self.halves(word, None)?,
                    &self.halves(position, None)?,
                    self.optional_halves(token_type)?.as_deref(),
                    (
                        &self.halves(gamma, Some(width))?,
                        &self.halves(beta, Some(width))?,
                    ),
                    width,
                    eps,
                );
                self.write(out, &result)
            }
            Op::ResidualLayerNorm {
                out,
                x,
                residual,
                gamma,
                beta,
                tokens,
                width,
                eps,
            } => {
                let result = twins::residual_layernorm(
                    &self.halves(x, Some(tokens * width))?,
                    &self.halves(residual, Some(tokens * width))?,
                    (
                        &self.halves(gamma, Some(width))?,
                        &self.halves(beta, Some(width))?,
                    ),
                    width,
                    eps,
                );
                self.write(out, &result)
            }
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
                let starts = self.starts(seq_start, sequences)?;
                let tokens = *starts.last().unwrap_or(&0) as usize;
                let longest = starts.windows(2).map(|p| p[1] - p[0]).max().unwrap_or(0) as usize;
                if longest > max_len {
                    return Err(Error::internal(format!(
                        "attention launched for sequences up to {max_len} tokens, got {longest}"
                    )));
                }
                let mut context = self.halves(out, Some(tokens * hidden))?;
                twins::attention(
                    &mut context,
                    &self.halves(qkv, Some(tokens * 3 * hidden))?,
                    &starts,
                    self.valid(key_valid, tokens)?.as_deref(),
                    hidden,
                    heads,
                );
                self.write(out, &context)
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
            } => {
                let starts = self.starts(seq_start, sequences)?;
                let tokens = *starts.last().unwrap_or(&0) as usize;
                let result = twins::pool_embedding(
                    &self.halves(hidden, Some(tokens * width))?,
                    &starts,
                    self.valid(key_valid, tokens)?.as_deref(),
                    width,
                    mode,
                    normalize,
                );
                self.write(out, &result)
            }
            Op::TokenHead {
                out,
                hidden,
                weight,
                bias,
                tokens,
                width,
                labels,
            } => {
                let result = twins::token_head(
                    &self.halves(hidden, Some(tokens * width))?,
                    &self.halves(weight, Some(labels * width))?,
                    &self.halves(bias, Some(labels))?,
                    width,
                );
                self.write(out, &result)
            }
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
                let starts = self.starts(seq_start, sequences)?;
                let tokens = *starts.last().unwrap_or(&0) as usize;
                let pre = match pre {
                    Some((w, b, activation)) => Some((
                        self.halves(w, Some(width * width))?,
                        self.halves(b, Some(width))?,
                        activation,
                    )),
                    None => None,
                };
                let result = twins::sequence_head(
                    &self.halves(hidden, Some(tokens.max(1) * width))?,
                    &starts,
                    pre.as_ref().map(|(w, b, a)| (&w[..], &b[..], *a)),
                    (
                        &self.halves(weight, Some(labels * width))?,
                        &self.halves(bias, Some(labels))?,
                    ),
                    width,
                );
                self.write(out, &result)
            }
            Op::Linear {
                y,
                x,
                w,
                bias,
                m,
                n,
                k,
                epilogue,
            } => {
                let result = twins::linear(
                    &self.halves(x, Some(m * k))?,
                    &self.halves(w, Some(n * k))?,
                    &self.halves(bias, Some(n))?,
                    k,
                    epilogue,
                );
                self.write(y, &result)
            }
        }
    }
}
