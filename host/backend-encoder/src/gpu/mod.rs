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

/// One GPU: its context and compute capability.
pub struct Gpu {
    pub context: Arc<CudaContext>,
    pub ordinal: usize,
    pub name: String,
    /// "sm_90" on H100.
    pub arch: String,
    pub memory_bytes: usize,
}

fn driver_error(what: &str, e: driver::DriverError) -> Error {
    Error::internal(format!("{what}: {e:?}"))
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
        })
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

/// Waits for all work of the context (setup paths only, never per batch).
fn synchronize(gpu: &Gpu) -> Result<()> {
    gpu.context
        .synchronize()
        .map_err(|e| driver_error("the GPU failed", e))
}

/// Device memory owned by wisp: a raw allocation (no cudarc event tracking), freed on drop.
pub struct DeviceBuffer {
    context: Arc<CudaContext>,
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

// SAFETY: a device address; every use goes through a stream of the owning context.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// `bytes` of zeroed device memory (at least 256, so the address is never null).
    pub fn zeroed(gpu: &Gpu, bytes: usize) -> Result<DeviceBuffer> {
        gpu.bind()?;
        let bytes = bytes.max(256);
        // SAFETY: the context is current; the memory is zeroed before use.
        let ptr = unsafe { driver::malloc_sync(bytes) }.map_err(|e| {
            Error::unavailable(format!(
                "cannot allocate {} MiB on {} ({e:?})",
                bytes >> 20,
                gpu.name
            ))
        })?;
        let buffer = DeviceBuffer {
            context: gpu.context.clone(),
            ptr,
            bytes,
        };
        // SAFETY: `ptr` holds `bytes` bytes.
        unsafe { sys::cuMemsetD8_v2(ptr, 0, bytes) }
            .result()
            .map_err(|e| driver_error("cannot clear device memory", e))?;
        // The memset runs on the legacy stream, which wisp's non-blocking streams do not
        // wait for: finish it before anyone uses the buffer.
        synchronize(gpu)?;
        Ok(buffer)
    }

    /// A device copy of `values`.
    pub fn from_slice<T: Copy>(gpu: &Gpu, values: &[T]) -> Result<DeviceBuffer> {
        let buffer = DeviceBuffer::zeroed(gpu, std::mem::size_of_val(values))?;
        // SAFETY: the buffer is at least as large as `values`.
        unsafe { driver::memcpy_htod_sync(buffer.ptr, values) }
            .map_err(|e| driver_error("cannot copy to the GPU", e))?;
        // A pageable copy may return before its last transfer lands.
        synchronize(gpu)?;
        Ok(buffer)
    }

    /// Reads the whole buffer back as `T`s (synchronously; for tests and checks).
    pub fn to_vec<T: Copy + Default>(&self, count: usize) -> Result<Vec<T>> {
        assert!(count * std::mem::size_of::<T>() <= self.bytes);
        let mut values = vec![T::default(); count];
        // SAFETY: `values` is `count` Ts, within the buffer.
        unsafe { driver::memcpy_dtoh_sync(&mut values, self.ptr) }
            .map_err(|e| driver_error("cannot copy from the GPU", e))?;
        Ok(values)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = self.context.bind_to_thread();
        // SAFETY: allocated by malloc_sync and freed once; no stream still uses it
        // (owners synchronise their stream before dropping buffers).
        let _ = unsafe { driver::free_sync(self.ptr) };
    }
}

/// Page-locked host memory, so copies to and from the GPU are asynchronous and fast.
pub struct PinnedBuffer<T: Copy + Default> {
    context: Arc<CudaContext>,
    ptr: *mut T,
    len: usize,
}

// SAFETY: owned host memory, used by one instance thread at a time.
unsafe impl<T: Copy + Default> Send for PinnedBuffer<T> {}

impl<T: Copy + Default> PinnedBuffer<T> {
    pub fn new(context: &Arc<CudaContext>, len: usize) -> Result<PinnedBuffer<T>> {
        context
            .bind_to_thread()
            .map_err(|e| driver_error("cannot make the CUDA context current", e))?;
        let len = len.max(1);
        // SAFETY: the context is current; the memory is initialised below.
        let raw = unsafe { driver::malloc_host(len * std::mem::size_of::<T>(), 0) }
            .map_err(|e| driver_error("cannot allocate pinned host memory", e))?;
        let ptr = raw.cast::<T>();
        // SAFETY: `len` Ts were just allocated.
        unsafe { std::slice::from_raw_parts_mut(ptr, len).fill(T::default()) };
        Ok(PinnedBuffer {
            context: context.clone(),
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
        let _ = unsafe { driver::free_host(self.ptr.cast()) };
    }
}
