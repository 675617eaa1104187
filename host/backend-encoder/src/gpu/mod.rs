//! CUDA execution: devices, memory, wisp's NVRTC-compiled kernels (`kernels/*.cu`) and
//! cuBLASLt. Everything is loaded at run time (cudarc's `dynamic-loading`), so wisp
//! builds and serves on machines without CUDA; `Gpu::open` says why when it cannot.

pub mod blas;
pub mod device;
pub mod kernels;
pub mod monitor;
pub mod nvrtc;
pub mod ops;
pub mod runner;
pub mod selftest;
pub mod twins;

use cudarc::driver::{result as driver, sys, CudaContext, CudaStream};
use std::sync::Arc;
use wisp_core::error::{Error, Result};

/// One GPU: its context and compute capability (cheap to clone: shared handles).
#[derive(Clone)]
pub struct Gpu {
    pub context: Arc<CudaContext>,
    pub ordinal: usize,
    pub name: String,
    /// "sm_90" on H100.
    pub arch: String,
    pub memory_bytes: usize,
    /// Orders graph captures against the few calls that may synchronize the whole
    /// context; shared by every user of this GPU in the process.
    pub gate: Arc<CaptureGate>,
}

/// Sticky CUDA errors: after one, the context (every stream and instance on the GPU)
/// is unusable until the process restarts.
pub fn is_sticky(e: &driver::DriverError) -> bool {
    use sys::CUresult::*;
    matches!(
        e.0,
        CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ASSERT
            | CUDA_ERROR_LAUNCH_TIMEOUT
            | CUDA_ERROR_ECC_UNCORRECTABLE
            | CUDA_ERROR_CONTEXT_IS_DESTROYED
    )
}

fn driver_error(what: &str, e: driver::DriverError) -> Error {
    Error::internal(format!("{what}: {e:?}"))
}

/// Graph captures against context-wide work, per GPU.
///
/// Instances share the device's primary context, and one instance may capture a graph
/// while another is being built. A call that synchronizes the context (freeing pinned
/// host memory, loading or unloading a module, creating a cuBLASLt handle) during a
/// capture invalidates it (CUDA error 900/901) and stalls every stream. Setup therefore
/// runs in stream order wherever CUDA allows (`DeviceBuffer`), and the rest waits here
/// until no capture is open; captures wait while such a call runs.
#[derive(Default)]
pub struct CaptureGate {
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Default, Debug, Clone, Copy)]
struct GateState {
    captures: usize,
    exclusive: bool,
}

impl CaptureGate {
    /// The gate of GPU `ordinal`, shared by everything in the process that uses it.
    pub fn of_device(ordinal: usize) -> Arc<CaptureGate> {
        static GATES: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashMap<usize, Arc<CaptureGate>>>,
        > = std::sync::OnceLock::new();
        let gates = GATES.get_or_init(Default::default);
        let mut gates = gates.lock().unwrap_or_else(|p| p.into_inner());
        gates.entry(ordinal).or_default().clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A capture starts (waits while a context-wide call runs).
    pub fn enter_capture(&self) {
        let mut state = self.state();
        while state.exclusive {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.captures += 1;
    }

    /// A capture ended (successfully or not).
    pub fn leave_capture(&self) {
        let mut state = self.state();
        state.captures = state.captures.saturating_sub(1);
        drop(state);
        self.changed.notify_all();
    }

    /// Runs `work`, which may synchronize the context, while no capture is open.
    pub fn exclusive<R>(&self, work: impl FnOnce() -> R) -> R {
        let mut state = self.state();
        while state.exclusive || state.captures > 0 {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.exclusive = true;
        drop(state);
        struct Release<'a>(&'a CaptureGate);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.state().exclusive = false;
                self.0.changed.notify_all();
            }
        }
        let _release = Release(self);
        work()
    }

    /// Captures open now (for tests and logs).
    pub fn open_captures(&self) -> usize {
        self.state().captures
    }
}

impl Gpu {
    /// Opens GPU `ordinal`, or says why there is none (no driver, no device).
    pub fn open(ordinal: usize) -> Result<Gpu> {
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::unavailable(
                "no NVIDIA driver: libcuda.so cannot be loaded on this machine",
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::unavailable(format!("the CUDA driver found no device: {e:?}")))?;
        if ordinal as i32 >= count {
            return Err(Error::unavailable(format!(
                "GPU {ordinal} does not exist: the CUDA driver reports {count} device(s)"
            )));
        }
        let context = CudaContext::new(ordinal)
            .map_err(|e| driver_error(&format!("cannot open GPU {ordinal}"), e))?;
        // Each instance runs on its own stream and synchronises explicitly; cudarc's
        // per-buffer events would only add work (and break graph capture).
        // SAFETY: wisp never shares a buffer between streams without a stream sync.
        unsafe { context.disable_event_tracking() };
        let (major, minor) = context
            .compute_capability()
            .map_err(|e| driver_error("cannot read the compute capability", e))?;
        Ok(Gpu {
            name: context.name().unwrap_or_else(|_| "unknown GPU".into()),
            memory_bytes: context.total_mem().unwrap_or(0),
            arch: format!("sm_{major}{minor}"),
            ordinal,
            context,
            gate: CaptureGate::of_device(ordinal),
        })
    }

    /// The driver's CUDA version, e.g. (13, 0).
    pub fn driver_version(&self) -> (i32, i32) {
        let mut version = 0;
        // SAFETY: an out-pointer to a live integer.
        unsafe { sys::cuDriverGetVersion(&mut version) };
        (version / 1000, (version % 1000) / 10)
    }

    /// Whether the device has memory pools (CUDA's stream-ordered allocator).
    pub fn memory_pools(&self) -> bool {
        self.context
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
            .is_ok_and(|v| v == 1)
    }

    pub fn bind(&self) -> Result<()> {
        self.context
            .bind_to_thread()
            .map_err(|e| driver_error("cannot make the CUDA context current", e))
    }

    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.context
            .new_stream()
            .map_err(|e| driver_error("cannot create a CUDA stream", e))
    }
}

fn wait(stream: &CudaStream, what: &str) -> Result<()> {
    stream
        .synchronize()
        .map_err(|e| driver_error(&format!("the GPU failed while {what}"), e))
}

/// Device memory owned by wisp, allocated, cleared and freed in the order of one stream
/// (CUDA's stream-ordered allocator): setup never waits for more than that stream, so
/// it cannot disturb another instance's graph capture. Where the device has no memory
/// pools (some virtualised GPUs), plain allocations pass the `CaptureGate` instead.
pub struct DeviceBuffer {
    stream: Arc<CudaStream>,
    /// Set for a plain (not stream-ordered) allocation, freed through the gate.
    plain: Option<Arc<CaptureGate>>,
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

// SAFETY: a device address; every use goes through a stream of the owning context.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// `bytes` of zeroed device memory (at least 256, so the address is never null),
    /// ready for any stream when this returns.
    pub fn zeroed(gpu: &Gpu, stream: &Arc<CudaStream>, bytes: usize) -> Result<DeviceBuffer> {
        let buffer = DeviceBuffer::uninit(gpu, stream, bytes)?;
        // SAFETY: `ptr` holds `bytes` bytes, allocated in this stream's order.
        unsafe { driver::memset_d8_async(buffer.ptr, 0, buffer.bytes, stream.cu_stream()) }
            .map_err(|e| driver_error("cannot clear device memory", e))?;
        wait(stream, "clearing new memory")?;
        Ok(buffer)
    }

    fn uninit(gpu: &Gpu, stream: &Arc<CudaStream>, bytes: usize) -> Result<DeviceBuffer> {
        gpu.bind()?;
        let bytes = bytes.max(256);
        let out_of_memory = |e: driver::DriverError| {
            Error::unavailable(format!(
                "cannot allocate {} MiB on {} ({e:?})",
                bytes.div_ceil(1 << 20),
                gpu.name
            ))
        };
        // SAFETY: the context is current; callers initialise the memory before use.
        match unsafe { driver::malloc_async(stream.cu_stream(), bytes) } {
            Ok(ptr) => Ok(DeviceBuffer {
                stream: stream.clone(),
                plain: None,
                ptr,
                bytes,
            }),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED => {
                // SAFETY: as above; cuMemAlloc may synchronize, so no capture is open.
                let ptr = gpu
                    .gate
                    .exclusive(|| unsafe { driver::malloc_sync(bytes) })
                    .map_err(out_of_memory)?;
                Ok(DeviceBuffer {
                    stream: stream.clone(),
                    plain: Some(gpu.gate.clone()),
                    ptr,
                    bytes,
                })
            }
            Err(e) => Err(out_of_memory(e)),
        }
    }

    /// A device copy of `values` (the rest of the 256-byte minimum zeroed).
    pub fn from_slice<T: Copy>(
        gpu: &Gpu,
        stream: &Arc<CudaStream>,
        values: &[T],
    ) -> Result<DeviceBuffer> {
        let size = std::mem::size_of_val(values);
        let buffer = DeviceBuffer::uninit(gpu, stream, size)?;
        let s = stream.cu_stream();
        // SAFETY: the buffer holds at least `size` bytes; `values` outlives the wait below.
        unsafe {
            if buffer.bytes > size {
                driver::memset_d8_async(buffer.ptr, 0, buffer.bytes, s)
                    .map_err(|e| driver_error("cannot clear device memory", e))?;
            }
            if size > 0 {
                driver::memcpy_htod_async(buffer.ptr, values, s)
                    .map_err(|e| driver_error("cannot copy to the GPU", e))?;
            }
        }
        wait(stream, "copying to the GPU")?;
        Ok(buffer)
    }

    /// Reads the first `count` `T`s back (waits for this buffer's stream; checks only).
    pub fn to_vec<T: Copy + Default>(&self, count: usize) -> Result<Vec<T>> {
        assert!(count * std::mem::size_of::<T>() <= self.bytes);
        let mut values = vec![T::default(); count];
        // SAFETY: `values` is `count` Ts, within the buffer; waited for below.
        unsafe { driver::memcpy_dtoh_async(&mut values, self.ptr, self.stream.cu_stream()) }
            .map_err(|e| driver_error("cannot copy from the GPU", e))?;
        wait(&self.stream, "copying from the GPU")?;
        Ok(values)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        let (ptr, stream) = (self.ptr, self.stream.cu_stream());
        match &self.plain {
            // SAFETY: allocated in this stream's order and freed once, after all work
            // queued on it; owners wait for their other streams before dropping buffers.
            None => {
                let _ = unsafe { driver::free_async(ptr, stream) };
            }
            // SAFETY: a plain allocation, freed once; cuMemFree may synchronize.
            Some(gate) => {
                let _ = gate.exclusive(|| unsafe { driver::free_sync(ptr) });
            }
        }
    }
}

/// Page-locked host memory, so copies to and from the GPU are asynchronous and fast.
/// Allocating and freeing it may synchronize the context, so both pass the gate.
pub struct PinnedBuffer<T: Copy + Default> {
    context: Arc<CudaContext>,
    gate: Arc<CaptureGate>,
    ptr: *mut T,
    len: usize,
}

// SAFETY: owned host memory, used by one instance thread at a time.
unsafe impl<T: Copy + Default> Send for PinnedBuffer<T> {}

impl<T: Copy + Default> PinnedBuffer<T> {
    pub fn new(gpu: &Gpu, len: usize) -> Result<PinnedBuffer<T>> {
        gpu.bind()?;
        let len = len.max(1);
        // SAFETY: the context is current; the memory is initialised below.
        let raw = gpu
            .gate
            .exclusive(|| unsafe { driver::malloc_host(len * std::mem::size_of::<T>(), 0) })
            .map_err(|e| driver_error("cannot allocate pinned host memory", e))?;
        let ptr = raw.cast::<T>();
        // SAFETY: `len` Ts were just allocated.
        unsafe { std::slice::from_raw_parts_mut(ptr, len).fill(T::default()) };
        Ok(PinnedBuffer {
            context: gpu.context.clone(),
            gate: gpu.gate.clone(),
            ptr,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialised Ts owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: `len` initialised Ts owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Copy + Default> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        let _ = self.context.bind_to_thread();
        // SAFETY: allocated by malloc_host and freed once.
        let _ = self
            .gate
            .exclusive(|| unsafe { driver::free_host(self.ptr.cast()) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Context-wide work waits for open captures, and captures wait for it: the
    /// ordering that keeps a second instance's setup out of a first one's capture.
    #[test]
    fn context_wide_work_waits_until_no_capture_is_open() {
        let gate = Arc::new(CaptureGate::default());
        gate.enter_capture();
        let (done_tx, done) = mpsc::channel();
        let worker = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.exclusive(|| done_tx.send(gate.open_captures()).unwrap());
            })
        };
        // Still blocked however long it waits: a capture is open.
        assert!(done.recv_timeout(Duration::from_millis(50)).is_err());
        gate.leave_capture();
        assert_eq!(done.recv().unwrap(), 0, "it ran with no capture open");
        worker.join().unwrap();
    }

    #[test]
    fn a_capture_waits_for_context_wide_work_and_a_panic_releases_the_gate() {
        let gate = Arc::new(CaptureGate::default());
        let (inside_tx, inside) = mpsc::channel::<()>();
        let (release_tx, release) = mpsc::channel::<()>();
        let holder = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.exclusive(|| {
                    inside_tx.send(()).unwrap();
                    release.recv().unwrap();
                })
            })
        };
        inside.recv().unwrap();
        let (captured_tx, captured) = mpsc::channel();
        let capturer = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.enter_capture();
                captured_tx.send(()).unwrap();
                gate.leave_capture();
            })
        };
        assert!(captured.recv_timeout(Duration::from_millis(50)).is_err());
        release_tx.send(()).unwrap();
        captured.recv().unwrap();
        holder.join().unwrap();
        capturer.join().unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            gate.exclusive(|| panic!("setup failed"))
        }));
        assert!(panicked.is_err());
        gate.enter_capture();
        gate.leave_capture();
    }

    /// No code path of the GPU encoder synchronizes the whole context or uses the
    /// legacy stream's synchronous copies after start-up: everything waits on its own
    /// stream, and the calls that may synchronize pass the `CaptureGate`. Reads the
    /// sources, so a new call fails here.
    #[test]
    fn nothing_synchronizes_the_whole_context() {
        let sources = [
            ("mod.rs", include_str!("mod.rs")),
            ("device.rs", include_str!("device.rs")),
            ("runner.rs", include_str!("runner.rs")),
            ("blas.rs", include_str!("blas.rs")),
            ("kernels.rs", include_str!("kernels.rs")),
            ("monitor.rs", include_str!("monitor.rs")),
        ];
        let forbidden = [
            concat!("context", ".synchronize("),
            concat!("ctx", ".synchronize("),
            concat!("cuCtx", "Synchronize"),
            concat!("memset_d8", "_sync("),
            concat!("memcpy_htod", "_sync("),
            concat!("memcpy_dtoh", "_sync("),
            concat!("cuMemsetD8", "_v2("),
        ];
        // Allowed only inside `gate.exclusive(...)` (opened on the line or the 3 before).
        let gated = [
            concat!("malloc", "_sync("),
            concat!("free", "_sync("),
            concat!("malloc", "_host("),
            concat!("free", "_host("),
            concat!("create", "_handle"),
            concat!("destroy", "_handle("),
            concat!("load", "_module("),
        ];
        for (file, source) in sources {
            for pattern in forbidden {
                assert!(
                    !source.contains(pattern),
                    "gpu/{file} calls {pattern}: a context-wide synchronization can invalidate another instance's graph capture"
                );
            }
            let lines: Vec<&str> = source.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for pattern in gated {
                    if code.contains(pattern) {
                        let before = lines[i.saturating_sub(3)..=i].join("\n");
                        assert!(
                            before.contains("exclusive("),
                            "gpu/{file}:{}: {pattern} outside the capture gate",
                            i + 1
                        );
                    }
                }
            }
        }
    }
}
