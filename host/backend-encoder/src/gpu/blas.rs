//! Dense layers on cuBLASLt: fp16 operands, fp32 accumulation, bias (and GELU or ReLU)
//! fused into the GEMM's epilogue. Descriptors and the chosen algorithm are cached per
//! shape, so a forward pass only sets the bias pointer and calls `cublasLtMatmul`.

use super::{DeviceBuffer, Gpu};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::CudaStream;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;
use wisp_core::error::{Error, Result};

/// cuBLASLt's workspace; 32 MiB is what NVIDIA recommends for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

const OP_N: i32 = 0;
const OP_T: i32 = 1;

/// What the epilogue applies after the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epilogue {
    Bias,
    /// Bias, then GELU (cuBLASLt's tanh form; within fp16 rounding of the exact erf GELU).
    GeluBias,
    ReluBias,
}

impl Epilogue {
    fn raw(self) -> sys::cublasLtEpilogue_t {
        match self {
            Epilogue::Bias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::GeluBias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
            Epilogue::ReluBias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    epilogue: Epilogue,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    weight: sys::cublasLtMatrixLayout_t,
    input: sys::cublasLtMatrixLayout_t,
    output: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by this plan and destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.weight);
            let _ = lt::destroy_matrix_layout(self.input);
            let _ = lt::destroy_matrix_layout(self.output);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// One instance's cuBLASLt handle, workspace and plans (not shared between streams).
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    gate: Arc<super::CaptureGate>,
    workspace: DeviceBuffer,
    plans: HashMap<Shape, Plan>,
}

// SAFETY: used by one instance thread at a time.
unsafe impl Send for Blas {}

fn blas_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::internal(format!("cuBLASLt {what}: {e:?}"))
}

fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: `value` is a live T of the type the attribute expects.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            (value as *const T).cast::<c_void>(),
            std::mem::size_of::<T>(),
        )
    }
    .map_err(|e| blas_error(&format!("cannot set {attr:?}"), e))
}

impl Blas {
    /// A handle and workspace for the queue on `stream` (the workspace is used in that
    /// stream's order only).
    pub fn new(gpu: &Gpu, stream: &Arc<CudaStream>) -> Result<Blas> {
        gpu.bind()?;
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::unavailable(
                "libcublasLt cannot be loaded: install the CUDA toolkit's cuBLAS (or the nvidia-cublas wheel) and put it on LD_LIBRARY_PATH",
            ));
        }
        // Creating a handle may initialise cuBLAS's context state: not during a capture.
        let handle = gpu
            .gate
            .exclusive(lt::create_handle)
            .map_err(|e| blas_error("cannot create a handle", e))?;
        Ok(Blas {
            handle,
            gate: gpu.gate.clone(),
            workspace: DeviceBuffer::zeroed(gpu, stream, WORKSPACE_BYTES)?,
            plans: HashMap::new(),
        })
    }

    /// Whether cuBLASLt loads and gives a handle on `gpu`, and its version.
    pub fn probe(gpu: &Gpu) -> Result<usize> {
        gpu.bind()?;
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::unavailable("libcublasLt cannot be loaded"));
        }
        let handle = gpu
            .gate
            .exclusive(lt::create_handle)
            .map_err(|e| blas_error("cannot create a handle", e))?;
        // SAFETY: a plain query; the handle was created above and is destroyed once.
        let version = unsafe { sys::cublasLtGetVersion() };
        let _ = gpu.gate.exclusive(|| unsafe { lt::destroy_handle(handle) });
        Ok(version)
    }

    fn plan(&mut self, shape: Shape) -> Result<&Plan> {
        if !self.plans.contains_key(&shape) {
            let plan = self.make_plan(shape)?;
            self.plans.insert(shape, plan);
        }
        Ok(&self.plans[&shape])
    }

    fn make_plan(&self, shape: Shape) -> Result<Plan> {
        let Shape { m, n, k, epilogue } = shape;
        let half = sys::cudaDataType::CUDA_R_16F;
        // Row-major y[m,n] = x[m,k]·w[n,k]ᵀ is, column-major, yᵀ[n,m] = w·xᵀ with w
        // read as a k×n matrix transposed ("TN", cuBLAS's fastest layout).
        let layout = |rows: usize, cols: usize| {
            lt::create_matrix_layout(half, rows as u64, cols as u64, rows as i64)
                .map_err(|e| blas_error("cannot create a layout", e))
        };
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| blas_error("cannot create a matmul descriptor", e))?;
        let mut plan = Plan {
            desc,
            weight: layout(k, n)?,
            input: layout(k, m)?,
            output: layout(n, m)?,
            // SAFETY: plain data, filled by the heuristic below.
            algo: unsafe { std::mem::zeroed() },
        };
        use sys::cublasLtMatmulDescAttributes_t as Attr;
        set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &OP_T)?;
        set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSB, &OP_N)?;
        set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue.raw())?;
        let preference = lt::create_matmul_pref().map_err(|e| blas_error("preference", e))?;
        let workspace = WORKSPACE_BYTES as u64;
        // SAFETY: a live preference and a u64 value, as the attribute expects.
        let heuristic = unsafe {
            lt::set_matmul_pref_attribute(
                preference,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
            .and_then(|()| {
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    desc,
                    plan.weight,
                    plan.input,
                    plan.output,
                    plan.output,
                    preference,
                )
            })
        };
        // SAFETY: created above, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(preference);
        }
        plan.algo = heuristic
            .map_err(|e| {
                blas_error(
                    &format!("has no algorithm for [{m}×{k}]·[{n}×{k}]ᵀ with {epilogue:?}"),
                    e,
                )
            })?
            .algo;
        Ok(plan)
    }

    /// y[m, n] = act(x[m, k] · w[n, k]ᵀ + bias[n]), all fp16 device pointers, on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &mut self,
        stream: cudarc::driver::sys::CUstream,
        y: u64,
        x: u64,
        w: u64,
        bias: u64,
        (m, n, k): (usize, usize, usize),
        epilogue: Epilogue,
    ) -> Result<()> {
        let handle = self.handle;
        let (workspace, workspace_bytes) = (self.workspace.ptr, self.workspace.bytes);
        let plan = self.plan(Shape { m, n, k, epilogue })?;
        let bias_ptr = bias as *const c_void;
        set_desc(
            plan.desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            &bias_ptr,
        )?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the pointers are device buffers of the sizes the layouts describe, the
        // workspace is this handle's own, and the stream belongs to the current context.
        unsafe {
            lt::matmul(
                handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w as *const c_void,
                plan.weight,
                x as *const c_void,
                plan.input,
                y as *const c_void,
                plan.output,
                y as *mut c_void,
                plan.output,
                &plan.algo,
                workspace as *mut c_void,
                workspace_bytes,
                stream as sys::cudaStream_t,
            )
        }
        .map_err(|e| blas_error(&format!("matmul [{m}×{k}]·[{n}×{k}]ᵀ failed"), e))
    }

    /// How many shapes have a cached plan.
    pub fn plans(&self) -> usize {
        self.plans.len()
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `new`, destroyed once, after its plans.
        let handle = self.handle;
        let _ = self
            .gate
            .exclusive(|| unsafe { lt::destroy_handle(handle) });
    }
}
