//! Ensembles: a DAG of steps declared in `[[step]]` tables. Each step is a
//! request to the composing model's own scheduler (so a model inside a
//! pipeline still batches across pipelines); steps whose inputs are ready run
//! concurrently. The DAG is checked at load against the composing models.

use crate::repository::ModelLookup;
use std::collections::{HashMap, HashSet};
use std::sync::Weak;
use std::time::Instant;
use wisp_core::backend::{
    Backend, BackendFactory, BackendRequest, BackendResponse, BoxFuture, Execution, ExecutionTimes,
    LoadContext,
};
use wisp_core::config::{BackendKind, ModelConfig, Step, TensorConfig};
use wisp_core::error::{Error, Result};
use wisp_core::tensor::Tensor;

/// How deep ensembles may nest at run time. Loading refuses cycles; this bound
/// also stops a cycle that a future bug or race would let through.
pub const MAX_ENSEMBLE_DEPTH: u8 = 16;

pub struct EnsembleBackend {
    name: String,
    steps: Vec<Step>,
    /// Tensors the ensemble returns.
    outputs: Vec<String>,
    models: Weak<dyn ModelLookup>,
}

/// Loads ensembles against the models a lookup (the repository) has ready.
pub struct EnsembleFactory {
    models: Weak<dyn ModelLookup>,
}

impl EnsembleFactory {
    pub fn new(models: Weak<dyn ModelLookup>) -> Self {
        EnsembleFactory { models }
    }
}

impl BackendFactory for EnsembleFactory {
    fn load(&self, context: &LoadContext<'_>) -> Result<Box<dyn Backend>> {
        Ok(Box::new(EnsembleBackend::load(
            context.config,
            self.models.clone(),
        )?))
    }
}

/// Refuses an ensemble whose steps lead back to it, directly or through other
/// ensembles (A → B → A), with the path that closes the cycle.
fn check_cycles(config: &ModelConfig, models: &dyn ModelLookup) -> Result<()> {
    fn walk(
        target: &str,
        config: &ModelConfig,
        models: &dyn ModelLookup,
        path: &mut Vec<String>,
        seen: &mut HashSet<String>,
    ) -> Result<()> {
        for step in &config.steps {
            if step.model == target {
                path.push(step.model.clone());
                return Err(Error::invalid(format!(
                    "ensemble '{target}' would call itself: {}",
                    path.join(" → ")
                )));
            }
            if !seen.insert(step.model.clone()) {
                continue;
            }
            if let Ok(model) = models.get(&step.model, step.version) {
                if model.config.backend == BackendKind::Ensemble {
                    path.push(step.model.clone());
                    walk(target, &model.config, models, path, seen)?;
                    path.pop();
                }
            }
        }
        Ok(())
    }
    let mut path = vec![config.name.clone()];
    walk(&config.name, config, models, &mut path, &mut HashSet::new())
}

fn dims_compatible(a: &[i64], b: &[i64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| x == -1 || y == -1 || x == y)
}

impl EnsembleBackend {
    /// Checks the DAG against the composing models `models` has ready now.
    pub fn load(config: &ModelConfig, models: Weak<dyn ModelLookup>) -> Result<Self> {
        let repository = models
            .upgrade()
            .ok_or_else(|| Error::unavailable("the server is shutting down"))?;
        let repository = &*repository;
        if config.steps.is_empty() {
            return Err(Error::invalid("an ensemble needs at least one [[step]]"));
        }
        check_cycles(config, repository)?;
        let mut step_configs = Vec::new();
        for (i, step) in config.steps.iter().enumerate() {
            let model = repository.get(&step.model, step.version).map_err(|e| {
                Error::invalid(format!("step {i} (model '{}'): {}", step.model, e.message))
            })?;
            if config.max_batch_size > model.config.max_batch_size {
                return Err(Error::invalid(format!(
                    "step {i} (model '{}'): its max_batch_size {} is below the ensemble's {}",
                    step.model, model.config.max_batch_size, config.max_batch_size
                )));
            }
            step_configs.push(model.config.clone());
        }
        // Where each ensemble tensor comes from: an ensemble input or one step's output.
        // Shapes are compared whole: a batching model's tensors have a leading -1.
        let full = |dims: &[i64], batching: bool| -> Vec<i64> {
            let mut v = if batching { vec![-1] } else { Vec::new() };
            v.extend_from_slice(dims);
            v
        };
        let mut producers: HashMap<&str, (String, &TensorConfig, bool)> = HashMap::new();
        for input in &config.inputs {
            producers.insert(
                &input.name,
                (
                    "the ensemble's inputs".into(),
                    input,
                    config.max_batch_size > 0,
                ),
            );
        }
        for (i, (step, composing)) in config.steps.iter().zip(&step_configs).enumerate() {
            for (step_output, tensor) in &step.output_map {
                let declared = composing.output(step_output).ok_or_else(|| {
                    Error::invalid(format!(
                        "step {i}: model '{}' has no output '{step_output}' (output_map)",
                        step.model
                    ))
                })?;
                if let Some((other, _, _)) = producers.get(tensor.as_str()) {
                    return Err(Error::invalid(format!(
                        "step {i}: tensor '{tensor}' is already produced by {other}"
                    )));
                }
                producers.insert(
                    tensor,
                    (
                        format!("step {i} (model '{}')", step.model),
                        declared,
                        composing.max_batch_size > 0,
                    ),
                );
            }
        }
        for (i, (step, composing)) in config.steps.iter().zip(&step_configs).enumerate() {
            for (step_input, tensor) in &step.input_map {
                let wanted = composing.input(step_input).ok_or_else(|| {
                    Error::invalid(format!(
                        "step {i}: model '{}' has no input '{step_input}' (input_map)",
                        step.model
                    ))
                })?;
                let (from, produced, batching) = producers.get(tensor.as_str()).ok_or_else(|| {
                    Error::invalid(format!(
                        "step {i}: tensor '{tensor}' (for input '{step_input}') is neither an ensemble input nor any step's output"
                    ))
                })?;
                let produced_dims = full(&produced.dims, *batching);
                let wanted_dims = full(&wanted.dims, composing.max_batch_size > 0);
                if produced.datatype != wanted.datatype
                    || !dims_compatible(&produced_dims, &wanted_dims)
                {
                    return Err(Error::invalid(format!(
                        "step {i}: tensor '{tensor}' from {from} is {} {:?}, but input '{step_input}' of model '{}' is {} {:?}",
                        produced.datatype, produced_dims, step.model, wanted.datatype, wanted_dims
                    )));
                }
            }
            for declared in composing.inputs.iter().filter(|t| !t.optional) {
                if !step.input_map.contains_key(&declared.name) {
                    return Err(Error::invalid(format!(
                        "step {i}: input '{}' of model '{}' is not in input_map",
                        declared.name, step.model
                    )));
                }
            }
        }
        for output in &config.outputs {
            let (from, produced, batching) =
                producers.get(output.name.as_str()).ok_or_else(|| {
                    Error::invalid(format!(
                        "ensemble output '{}' is produced by no step",
                        output.name
                    ))
                })?;
            let produced_dims = full(&produced.dims, *batching);
            let declared_dims = full(&output.dims, config.max_batch_size > 0);
            if produced.datatype != output.datatype
                || !dims_compatible(&produced_dims, &declared_dims)
            {
                return Err(Error::invalid(format!(
                    "ensemble output '{}' is declared {} {:?} but {from} produces {} {:?}",
                    output.name, output.datatype, declared_dims, produced.datatype, produced_dims
                )));
            }
        }
        // Cycles: run the steps in dependency order on paper; steps left over wait on each other.
        let mut available: HashSet<&str> = config.inputs.iter().map(|t| t.name.as_str()).collect();
        let mut done = vec![false; config.steps.len()];
        while let Some(i) = (0..config.steps.len()).find(|&i| {
            !done[i]
                && config.steps[i]
                    .input_map
                    .values()
                    .all(|t| available.contains(t.as_str()))
        }) {
            done[i] = true;
            available.extend(config.steps[i].output_map.values().map(|t| t.as_str()));
        }
        if let Some(stuck) = done.iter().position(|d| !d) {
            return Err(Error::invalid(format!(
                "step {stuck} (model '{}') can never run: its inputs depend on a cycle of steps",
                config.steps[stuck].model
            )));
        }
        Ok(EnsembleBackend {
            name: config.name.clone(),
            steps: config.steps.clone(),
            outputs: config.outputs.iter().map(|t| t.name.clone()).collect(),
            models,
        })
    }

    /// Runs the DAG for one request.
    async fn run(&self, request: BackendRequest) -> Result<BackendResponse> {
        if request.depth >= MAX_ENSEMBLE_DEPTH {
            return Err(Error::invalid(format!(
                "ensemble '{}' is nested more than {MAX_ENSEMBLE_DEPTH} deep",
                self.name
            )));
        }
        let repository = self
            .models
            .upgrade()
            .ok_or_else(|| Error::unavailable("the server is shutting down"))?;
        // Refuse at once when a step's model is at its queue limit, rather than after
        // the steps before it ran (under overload, tokenizing requests the encoder refuses).
        for (i, step) in self.steps.iter().enumerate() {
            if let Ok(model) = repository.get(&step.model, step.version) {
                if model.is_full() {
                    return Err(Error::unavailable(format!(
                        "ensemble '{}' step {i}: the queue of model '{}' is full; try again later",
                        self.name, step.model
                    )));
                }
            }
        }
        let mut pool: HashMap<String, Tensor> = request
            .inputs
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let mut pending: Vec<usize> = (0..self.steps.len()).collect();
        while !pending.is_empty() {
            let (ready, waiting): (Vec<usize>, Vec<usize>) = pending.into_iter().partition(|&i| {
                self.steps[i]
                    .input_map
                    .values()
                    .all(|t| pool.contains_key(t))
            });
            if ready.is_empty() {
                return Err(Error::internal(format!(
                    "ensemble '{}' has steps that can never run",
                    self.name
                )));
            }
            let mut running = tokio::task::JoinSet::new();
            for i in ready {
                let step = &self.steps[i];
                let model = repository
                    .get(&step.model, step.version)
                    .map_err(|e| e.context(format!("ensemble '{}' step {i}", self.name)))?;
                let inputs = step
                    .input_map
                    .iter()
                    .map(|(step_input, tensor)| Tensor {
                        name: step_input.clone(),
                        ..pool[tensor].clone()
                    })
                    .collect();
                let step_request = BackendRequest {
                    inputs,
                    requested_outputs: step.output_map.keys().cloned().collect(),
                    parameters: request.parameters.clone(),
                    depth: request.depth + 1,
                    trace: request.trace.clone(),
                };
                running.spawn(async move { (i, model.infer(step_request).await) });
            }
            while let Some(joined) = running.join_next().await {
                let (i, result) = joined
                    .map_err(|e| Error::internal(format!("ensemble step task failed: {e}")))?;
                let step = &self.steps[i];
                let response = result.map_err(|e| {
                    e.context(format!(
                        "ensemble '{}' step {i} (model '{}')",
                        self.name, step.model
                    ))
                })?;
                for tensor in response.outputs {
                    if let Some(name) = step.output_map.get(&tensor.name) {
                        pool.insert(
                            name.clone(),
                            Tensor {
                                name: name.clone(),
                                ..tensor
                            },
                        );
                    }
                }
            }
            pending = waiting;
        }
        let outputs = self
            .outputs
            .iter()
            .filter(|name| {
                request.requested_outputs.is_empty() || request.requested_outputs.contains(name)
            })
            .map(|name| {
                pool.remove(name).ok_or_else(|| {
                    Error::internal(format!("ensemble output '{name}' was not produced"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BackendResponse {
            outputs,
            parameters: Vec::new(),
        })
    }
}

impl Backend for EnsembleBackend {
    fn execute(&self, requests: Vec<BackendRequest>) -> BoxFuture<'_, Execution> {
        Box::pin(async move {
            let started = Instant::now();
            // Ensembles are scheduled directly: one request per call. Their
            // steps batch with other pipelines' on the composing models.
            let mut results = Vec::with_capacity(requests.len());
            for request in requests {
                results.push(self.run(request).await);
            }
            Execution {
                results,
                times: ExecutionTimes {
                    compute_infer_ns: started.elapsed().as_nanos() as u64,
                    ..Default::default()
                },
            }
        })
    }
}
