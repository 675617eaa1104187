//! The seam between the scheduler and whatever executes a model.

pub mod encoder;
pub mod ensemble;
pub mod wasm;

use crate::error::Result;
use crate::repository::config::ParameterValue;
use crate::tensor::Tensor;
use std::future::Future;
use std::pin::Pin;

/// One request as a backend sees it: validated inputs, the outputs wanted.
#[derive(Debug, Clone, Default)]
pub struct BackendRequest {
    pub inputs: Vec<Tensor>,
    /// Empty means every output.
    pub requested_outputs: Vec<String>,
    pub parameters: Vec<(String, ParameterValue)>,
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
