//! Run-time compilation of `kernels/*.cu` with NVRTC, for the device's own architecture,
//! cached on disk by source, architecture, options and NVRTC version.
//!
//! NVRTC needs no GPU: CI compiles every kernel for sm_90 from the PyPI wheels
//! (`nvidia-cuda-nvrtc`, `nvidia-cuda-runtime`, `nvidia-cuda-crt`), so a kernel that does
//! not compile fails CI, not a device session.

use cudarc::nvrtc::{result as nvrtc, sys};
use sha2::{Digest, Sha256};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use wisp_core::error::{Error, Result};

/// Prepended to every kernel file.
const COMMON: &str = include_str!("../../../../kernels/common.cuh");

/// A kernel file: one NVRTC program, one CUDA module.
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
    /// The `extern "C"` entry points the host loads from it.
    pub functions: &'static [&'static str],
}

pub const LAYERNORM: KernelFile = KernelFile {
    name: "layernorm.cu",
    source: include_str!("../../../../kernels/layernorm.cu"),
    functions: &["embed_layernorm", "residual_layernorm"],
};

pub const ATTENTION: KernelFile = KernelFile {
    name: "attention.cu",
    source: include_str!("../../../../kernels/attention.cu"),
    functions: &["attention_d32", "attention_d64", "attention_d128"],
};

pub const HEADS: KernelFile = KernelFile {
    name: "heads.cu",
    source: include_str!("../../../../kernels/heads.cu"),
    functions: &["pool_embedding", "token_head", "sequence_head"],
};

pub const KERNEL_FILES: [KernelFile; 3] = [LAYERNORM, ATTENTION, HEADS];

/// Where the CUDA headers (`cuda_fp16.h`, `mma.h`, `crt/`) and NVRTC live.
#[derive(Debug, Clone)]
pub struct Toolkit {
    pub include: PathBuf,
}

/// The toolkit folders tried, in order: `WISP_CUDA_HOME`, `CUDA_HOME`, `CUDA_PATH`,
/// `/usr/local/cuda`. A folder counts when `include/cuda_fp16.h` is in it.
pub fn find_toolkit() -> Result<Toolkit> {
    let mut tried = Vec::new();
    for home in toolkit_homes() {
        let include = home.join("include");
        if include.join("cuda_fp16.h").is_file() {
            preload_libraries(&home);
            return Ok(Toolkit { include });
        }
        tried.push(include.display().to_string());
    }
    Err(Error::unavailable(format!(
        "no CUDA headers found (looked for cuda_fp16.h in {}); set WISP_CUDA_HOME or CUDA_HOME to a CUDA toolkit, or to site-packages/nvidia/cu13 of the nvidia-cuda-runtime, nvidia-cuda-crt and nvidia-cuda-nvrtc wheels",
        tried.join(", ")
    )))
}

fn toolkit_homes() -> Vec<PathBuf> {
    ["WISP_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|var| std::env::var_os(var).map(PathBuf::from))
        .chain(std::iter::once(PathBuf::from("/usr/local/cuda")))
        .collect()
}

/// Folders that may hold NVRTC and cuBLASLt: the toolkit's `lib64`/`lib` (and its
/// `targets/x86_64-linux/lib`), then the PyPI wheels' folders (`nvidia/cu13/lib` for
/// CUDA 13, `nvidia/cublas/lib` and `nvidia/cuda_nvrtc/lib` for CUDA 12) in the active
/// virtual environment and the usual Python prefixes.
pub fn library_dirs(home: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["lib64", "lib", "targets/x86_64-linux/lib"]
        .iter()
        .map(|d| home.join(d))
        .collect();
    let mut prefixes: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        prefixes.push(PathBuf::from(venv));
    }
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/torch/.venv"].map(PathBuf::from));
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .collect();
        pythons.sort();
        for python in pythons {
            for packages in ["site-packages", "dist-packages"] {
                let nvidia = python.join(packages).join("nvidia");
                for lib in ["cu13/lib", "cublas/lib", "cuda_nvrtc/lib"] {
                    let dir = nvidia.join(lib);
                    if dir.is_dir() {
                        dirs.push(dir);
                    }
                }
            }
        }
    }
    dirs
}

/// Loads NVRTC (and the builtins library it opens by name) and cuBLASLt from the
/// toolkit or the wheels when they are there, so cudarc's later lookup by name finds
/// them without LD_LIBRARY_PATH.
fn preload_libraries(home: &Path) {
    static LOADED: OnceLock<()> = OnceLock::new();
    LOADED.get_or_init(|| {
        let dirs = library_dirs(home);
        for prefixes in [
            &["libnvrtc-builtins.so"][..],
            &["libnvrtc.so"],
            &["libcublasLt.so"],
            &["libcublas.so"],
        ] {
            'library: for dir in &dirs {
                let Ok(entries) = std::fs::read_dir(dir) else {
                    continue;
                };
                let mut files: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                            prefixes.iter().any(|prefix| n.starts_with(prefix))
                                && !n.contains(".alt.")
                        })
                    })
                    .collect();
                files.sort();
                for path in files {
                    // SAFETY: loading NVIDIA's libraries runs only their own initialisers.
                    let loaded = unsafe {
                        libloading::os::unix::Library::open(
                            Some(&path),
                            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                        )
                    };
                    if loaded.map(std::mem::forget).is_ok() {
                        break 'library;
                    }
                }
            }
        }
    });
}

/// The shared libraries of CUDA this process has loaded, with their paths (from
/// /proc/self/maps): what `wisp gpu info` reports.
pub fn loaded_libraries() -> Vec<(String, String)> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut found: Vec<(String, String)> = Vec::new();
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let name = path.rsplit('/').next().unwrap_or(path);
        for library in [
            "libcuda.so",
            "libnvrtc.so",
            "libnvrtc-builtins",
            "libcublasLt.so",
        ] {
            if name.starts_with(library) && !found.iter().any(|(_, p)| p == path) {
                found.push((
                    library.trim_end_matches(".so").to_string(),
                    path.to_string(),
                ));
            }
        }
    }
    found
}

/// NVRTC's version, or why it cannot be loaded.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::unavailable(
            "libnvrtc cannot be loaded: install the CUDA toolkit or the nvidia-cuda-nvrtc wheel, and set WISP_CUDA_HOME (or LD_LIBRARY_PATH) to it",
        ));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::unavailable(format!(
            "nvrtcVersion failed: {status:?}"
        )));
    }
    Ok((major, minor))
}

fn options(toolkit: &Toolkit, arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        // Source lines in the cubin, for compute-sanitizer and profilers; no cost at run time.
        "-lineinfo".to_string(),
        format!("-I{}", toolkit.include.display()),
    ]
}

/// Where compiled kernels are kept: `WISP_KERNEL_CACHE`, else `$XDG_CACHE_HOME/wisp/kernels`,
/// else `~/.cache/wisp/kernels`; None disables the cache.
fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("WISP_KERNEL_CACHE") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("wisp").join("kernels"))
}

/// A compiled kernel file.
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub from_cache: bool,
    pub key: String,
}

/// Compiles `file` to a cubin for `arch` (e.g. "sm_90"), or reads it from the cache.
pub fn compile(file: &KernelFile, arch: &str, toolkit: &Toolkit) -> Result<Compiled> {
    compile_cached(file, arch, toolkit, cache_dir().as_deref())
}

/// Compiles `file` again, ignoring the cached image, and replaces it in the cache.
pub fn recompile(file: &KernelFile, arch: &str, toolkit: &Toolkit) -> Result<Compiled> {
    compile_with(file, arch, toolkit, cache_dir().as_deref(), false)
}

/// `compile` with an explicit cache folder (None: no cache).
pub fn compile_cached(
    file: &KernelFile,
    arch: &str,
    toolkit: &Toolkit,
    cache: Option<&Path>,
) -> Result<Compiled> {
    compile_with(file, arch, toolkit, cache, true)
}

fn compile_with(
    file: &KernelFile,
    arch: &str,
    toolkit: &Toolkit,
    cache: Option<&Path>,
    read_cache: bool,
) -> Result<Compiled> {
    let (major, minor) = nvrtc_version()?;
    let source = format!("{COMMON}\n#line 1 \"{}\"\n{}", file.name, file.source);
    let options = options(toolkit, arch);
    let mut hasher = Sha256::new();
    hasher.update(source.as_bytes());
    hasher.update(arch.as_bytes());
    for option in &options {
        hasher.update(option.as_bytes());
        hasher.update([0]);
    }
    hasher.update(format!("nvrtc {major}.{minor}").as_bytes());
    let digest = hasher.finalize();
    let key = format!(
        "{}-{arch}-{}",
        file.name.trim_end_matches(".cu"),
        digest
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let cached = cache.map(|dir| dir.join(format!("{key}.cubin")));
    if let Some(path) = cached.as_ref().filter(|_| read_cache) {
        if let Ok(cubin) = std::fs::read(path) {
            // A truncated or overwritten file is compiled again (the driver also
            // rejects images it cannot load: `Kernels::load` recompiles those).
            if cubin.starts_with(b"\x7fELF") {
                return Ok(Compiled {
                    cubin,
                    from_cache: true,
                    key,
                });
            }
        }
    }
    let cubin = compile_uncached(&source, file.name, &options)?;
    if let Some(path) = &cached {
        // A cache that cannot be written only costs a recompilation next time.
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().expect("cache file has a folder"))?;
            let partial = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&partial, &cubin)?;
            std::fs::rename(&partial, path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the kernel cache");
        }
    }
    Ok(Compiled {
        cubin,
        from_cache: false,
        key,
    })
}

fn compile_uncached(source: &str, name: &str, options: &[String]) -> Result<Vec<u8>> {
    let c_source = CString::new(source)
        .map_err(|_| Error::internal(format!("kernel {name} contains a NUL byte")))?;
    let c_name = CString::new(name).expect("kernel names have no NUL");
    let program = nvrtc::create_program(&c_source, Some(&c_name))
        .map_err(|e| Error::internal(format!("NVRTC cannot create a program for {name}: {e:?}")))?;
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: created above and destroyed once.
            let _ = unsafe { nvrtc::destroy_program(self.0) };
        }
    }
    let program = Program(program);
    // SAFETY: `program` is live; options are plain strings.
    let compiled = unsafe { nvrtc::compile_program(program.0, options) };
    if let Err(e) = compiled {
        // SAFETY: the log of a live program, NUL-terminated by NVRTC.
        let log = unsafe { nvrtc::get_program_log(program.0) }
            .map(|raw| {
                unsafe { CStr::from_ptr(raw.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        return Err(Error::internal(format!(
            "kernels/{name} does not compile ({e:?}) with options {options:?}:\n{log}"
        )));
    }
    let mut size = 0usize;
    // SAFETY: out-pointer to a live usize; the program compiled.
    let status = unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return Err(Error::internal(format!(
            "NVRTC produced no cubin for kernels/{name} ({status:?}); the architecture must be a real one such as sm_90"
        )));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: the buffer has the size NVRTC reported.
    let status = unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast()) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::internal(format!(
            "nvrtcGetCUBIN failed for kernels/{name}: {status:?}"
        )));
    }
    Ok(cubin)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC and the headers, or None (the test then skips). CI sets
    /// WISP_REQUIRE_NVRTC=1 (with NVRTC and the headers from PyPI wheels), so there a
    /// missing toolkit fails instead of skipping.
    fn toolkit_for_tests() -> Option<Toolkit> {
        let required = std::env::var("WISP_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        match find_toolkit().and_then(|t| nvrtc_version().map(|_| t)) {
            Ok(toolkit) => Some(toolkit),
            Err(e) if !required => {
                eprintln!("skipped: NVRTC is not available here ({e})");
                None
            }
            Err(e) => panic!("WISP_REQUIRE_NVRTC=1 but {e}"),
        }
    }

    /// Every kernel compiles for Hopper.
    #[test]
    fn every_kernel_compiles_for_sm_90() {
        let Some(toolkit) = toolkit_for_tests() else {
            return;
        };
        let cache = tempfile::tempdir().unwrap();
        let cache = Some(cache.path());
        for file in KERNEL_FILES {
            let first =
                compile_cached(&file, "sm_90", &toolkit, cache).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                !first.from_cache,
                "{}: a fresh cache cannot hold it",
                file.name
            );
            assert_eq!(
                &first.cubin[..4],
                b"\x7fELF",
                "{}: a cubin is an ELF image",
                file.name
            );
            for function in file.functions {
                let symbol = function.as_bytes();
                assert!(
                    first.cubin.windows(symbol.len()).any(|w| w == symbol),
                    "{}: the cubin has no entry point {function}",
                    file.name
                );
            }
            let second = compile_cached(&file, "sm_90", &toolkit, cache).unwrap();
            assert!(
                second.from_cache,
                "{}: the second compilation is cached",
                file.name
            );
            assert_eq!(first.cubin, second.cubin);
        }
    }

    /// A cache entry that is not a cubin is compiled again and replaced.
    #[test]
    fn a_corrupt_cached_kernel_is_compiled_again() {
        let Some(toolkit) = toolkit_for_tests() else {
            return;
        };
        let cache = tempfile::tempdir().unwrap();
        let first = compile_cached(&HEADS, "sm_90", &toolkit, Some(cache.path())).unwrap();
        let path = cache.path().join(format!("{}.cubin", first.key));
        std::fs::write(&path, b"not a cubin").unwrap();
        let again = compile_cached(&HEADS, "sm_90", &toolkit, Some(cache.path())).unwrap();
        assert!(!again.from_cache, "a corrupt entry is not used");
        assert_eq!(again.cubin, first.cubin);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            first.cubin,
            "and it is replaced"
        );
    }

    #[test]
    fn a_kernel_with_an_error_names_the_file_and_the_line() {
        let Some(toolkit) = toolkit_for_tests() else {
            return;
        };
        let broken = KernelFile {
            name: "broken.cu",
            source: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }\n",
            functions: &["k"],
        };
        let error = compile_cached(&broken, "sm_90", &toolkit, None)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("broken.cu"), "{error}");
        assert!(error.contains("undefined_name"), "{error}");
    }
}
