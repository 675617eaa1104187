//! The seam between the scheduler and whatever executes a model, and the
//! registry through which the repository finds a backend by its config name.

use crate::config::{ModelConfig, ParameterValue};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

/// One request as a backend sees it: validated inputs, the outputs wanted.
#[derive(Debug, Clone, Default)]
pub struct BackendRequest {
    pub inputs: Vec<Tensor>,
    /// Empty means every output.
    pub requested_outputs: Vec<String>,
    pub parameters: Vec<(String, ParameterValue)>,
    /// How many ensembles this request is nested in (0 for a client's request).
    pub depth: u8,
    /// Set when the request is traced: each model it passes records its spans here.
    pub trace: Option<crate::trace::TraceHandle>,
}

#[derive(Debug, Clone, Default)]
pub struct BackendResponse {
    pub outputs: Vec<Tensor>,
    /// Response parameters the model sets; they go back in the response's `parameters`.
    pub parameters: Vec<(String, ParameterValue)>,
}

/// Where the time of one execution went, for statistics.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecutionTimes {
    pub compute_input_ns: u64,
    pub compute_infer_ns: u64,
    pub compute_output_ns: u64,
}

pub struct Execution {
    /// One result per request, in order.
    pub results: Vec<Result<BackendResponse>>,
    pub times: ExecutionTimes,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Backend: Send + Sync {
    /// Runs a batch of requests. The future resolves when an instance has run it.
    fn execute(&self, requests: Vec<BackendRequest>) -> BoxFuture<'_, Execution>;

    /// How many instances can run batches at once.
    fn instances(&self) -> usize {
        1
    }

    /// Instances taken out of service for good (a poisoned GPU context). When all are,
    /// the model version is not ready.
    fn out_of_service(&self) -> crate::worker::OutOfService {
        crate::worker::OutOfService::default()
    }

    /// Runs a batch on one instance (0-based, below `instances()`), for state
    /// that lives in that instance. Backends without per-instance state run it anywhere.
    fn execute_on(
        &self,
        instance: usize,
        requests: Vec<BackendRequest>,
    ) -> BoxFuture<'_, Execution> {
        let _ = instance;
        self.execute(requests)
    }
}

/// What a backend factory gets to load one model version.
pub struct LoadContext<'a> {
    pub config: &'a Arc<ModelConfig>,
    pub version: u64,
    /// The version folder (`<repository>/<model>/<version>`).
    pub version_dir: &'a Path,
}

/// Loads model versions of one backend kind. `load` may block (compiling,
/// reading weights): the repository calls it off the async workers.
pub trait BackendFactory: Send + Sync {
    fn load(&self, context: &LoadContext<'_>) -> Result<Box<dyn Backend>>;
}

/// Backend factories by the name a config's `backend` key uses.
#[derive(Clone, Default)]
pub struct BackendRegistry {
    factories: BTreeMap<String, Arc<dyn BackendFactory>>,
}

impl BackendRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the factory for `name`.
    pub fn register(&mut self, name: &str, factory: Arc<dyn BackendFactory>) {
        self.factories.insert(name.to_string(), factory);
    }

    pub fn get(&self, name: &str) -> Result<Arc<dyn BackendFactory>> {
        self.factories.get(name).cloned().ok_or_else(|| {
            Error::invalid(format!(
                "backend '{name}' is not available in this server (available: {})",
                self.names().join(", ")
            ))
        })
    }

    pub fn names(&self) -> Vec<&str> {
        self.factories.keys().map(String::as_str).collect()
    }
}
