//! GPU utilisation and memory for the metrics endpoint, read through NVML
//! (libnvidia-ml, shipped with the driver) when it can be loaded.

use std::ffi::{c_char, c_uint, c_void, CStr};

type Device = *mut c_void;

#[repr(C)]
#[derive(Default)]
struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

#[repr(C)]
#[derive(Default)]
struct Memory {
    total: u64,
    free: u64,
    used: u64,
}

/// One GPU's reading.
#[derive(Debug, Clone)]
pub struct GpuSample {
    pub uuid: String,
    /// 0.0–1.0 of the last sample period in which a kernel ran.
    pub utilization: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

pub struct GpuMonitor {
    library: libloading::Library,
    devices: Vec<(Device, String)>,
}

// SAFETY: NVML handles are thread-safe per NVML's documentation.
unsafe impl Send for GpuMonitor {}
unsafe impl Sync for GpuMonitor {}

impl GpuMonitor {
    /// None when NVML is absent or sees no GPU (then wisp exports no GPU metrics).
    pub fn open() -> Option<GpuMonitor> {
        // SAFETY: NVIDIA's library; only its documented entry points are called.
        unsafe {
            let library = libloading::Library::new("libnvidia-ml.so.1").ok()?;
            let devices = Self::devices(&library)?;
            Some(GpuMonitor { library, devices })
        }
    }

    /// # Safety
    /// `library` is NVML.
    unsafe fn devices(library: &libloading::Library) -> Option<Vec<(Device, String)>> {
        unsafe {
            let init: libloading::Symbol<unsafe extern "C" fn() -> i32> =
                library.get(b"nvmlInit_v2\0").ok()?;
            if init() != 0 {
                return None;
            }
            let count: libloading::Symbol<unsafe extern "C" fn(*mut c_uint) -> i32> =
                library.get(b"nvmlDeviceGetCount_v2\0").ok()?;
            let by_index: libloading::Symbol<unsafe extern "C" fn(c_uint, *mut Device) -> i32> =
                library.get(b"nvmlDeviceGetHandleByIndex_v2\0").ok()?;
            let uuid: libloading::Symbol<unsafe extern "C" fn(Device, *mut c_char, c_uint) -> i32> =
                library.get(b"nvmlDeviceGetUUID\0").ok()?;
            let mut n: c_uint = 0;
            if count(&mut n) != 0 || n == 0 {
                return None;
            }
            let mut devices = Vec::new();
            for i in 0..n {
                let mut device: Device = std::ptr::null_mut();
                if by_index(i, &mut device) != 0 {
                    continue;
                }
                let mut name = [0 as c_char; 96];
                let id = if uuid(device, name.as_mut_ptr(), name.len() as c_uint) == 0 {
                    CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned()
                } else {
                    format!("GPU-{i}")
                };
                devices.push((device, id));
            }
            Some(devices)
        }
    }

    pub fn sample(&self) -> Vec<GpuSample> {
        // SAFETY: symbols of the loaded NVML; handles obtained from it.
        unsafe {
            let Ok(utilization) = self
                .library
                .get::<unsafe extern "C" fn(Device, *mut Utilization) -> i32>(
                    b"nvmlDeviceGetUtilizationRates\0",
                )
            else {
                return Vec::new();
            };
            let Ok(memory) = self
                .library
                .get::<unsafe extern "C" fn(Device, *mut Memory) -> i32>(
                    b"nvmlDeviceGetMemoryInfo\0",
                )
            else {
                return Vec::new();
            };
            self.devices
                .iter()
                .map(|(device, uuid)| {
                    let mut u = Utilization::default();
                    let mut m = Memory::default();
                    let _ = utilization(*device, &mut u);
                    let _ = memory(*device, &mut m);
                    GpuSample {
                        uuid: uuid.clone(),
                        utilization: u.gpu as f64 / 100.0,
                        memory_used_bytes: m.used,
                        memory_total_bytes: m.total,
                    }
                })
                .collect()
        }
    }
}

/// Triton's GPU gauges (`nv_gpu_utilization`, `nv_gpu_memory_used_bytes`,
/// `nv_gpu_memory_total_bytes`, by `gpu_uuid`), sampled from NVML at every scrape.
pub struct GpuMetrics {
    monitor: GpuMonitor,
    utilization: prometheus::GaugeVec,
    memory_used: prometheus::GaugeVec,
    memory_total: prometheus::GaugeVec,
}

impl GpuMetrics {
    /// None when this machine has no NVIDIA GPU (then no GPU metrics are exported).
    pub fn open() -> Option<GpuMetrics> {
        let gauge = |name: &str, help: &str| {
            prometheus::GaugeVec::new(prometheus::Opts::new(name, help), &["gpu_uuid"])
                .expect("valid metric")
        };
        Some(GpuMetrics {
            monitor: GpuMonitor::open()?,
            utilization: gauge("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)"),
            memory_used: gauge("nv_gpu_memory_used_bytes", "GPU used memory, in bytes"),
            memory_total: gauge("nv_gpu_memory_total_bytes", "GPU total memory, in bytes"),
        })
    }
}

impl prometheus::core::Collector for GpuMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        [&self.utilization, &self.memory_used, &self.memory_total]
            .into_iter()
            .flat_map(|g| g.desc())
            .collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        for sample in self.monitor.sample() {
            let labels = [sample.uuid.as_str()];
            self.utilization
                .with_label_values(&labels)
                .set(sample.utilization);
            self.memory_used
                .with_label_values(&labels)
                .set(sample.memory_used_bytes as f64);
            self.memory_total
                .with_label_values(&labels)
                .set(sample.memory_total_bytes as f64);
        }
        [&self.utilization, &self.memory_used, &self.memory_total]
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}
