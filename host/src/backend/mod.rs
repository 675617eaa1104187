//! The seam between the scheduler and whatever executes a model.

pub mod encoder;
pub mod ensemble;
pub mod wasm;

use crate::error::{Error, Result};
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

/// A batch waiting for a backend's instance thread, and where its results go.
pub struct Job {
    pub requests: Vec<BackendRequest>,
    pub reply: tokio::sync::oneshot::Sender<Execution>,
}

/// Hands a batch to instance threads through a bounded queue and waits for the result.
/// A full queue fails the batch at once with 503 (`capacity` names the bound).
pub async fn submit_job(
    queue: &crossbeam_channel::Sender<Job>,
    requests: Vec<BackendRequest>,
    label: &str,
    capacity: usize,
) -> Execution {
    let count = requests.len();
    let fail_all = |e: Error| Execution {
        results: (0..count).map(|_| Err(e.clone())).collect(),
        times: ExecutionTimes::default(),
    };
    let (reply, result) = tokio::sync::oneshot::channel();
    match queue.try_send(Job { requests, reply }) {
        Ok(()) => {}
        Err(crossbeam_channel::TrySendError::Full(_)) => {
            return fail_all(Error::unavailable(format!(
                "model '{label}' has {capacity} batches waiting; try again later"
            )))
        }
        Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
            return fail_all(Error::unavailable(format!("model '{label}' is unloading")))
        }
    }
    result.await.unwrap_or_else(|_| {
        fail_all(Error::internal(format!(
            "model '{label}' dropped the batch"
        )))
    })
}
