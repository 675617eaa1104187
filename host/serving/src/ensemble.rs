//! Ensembles: a DAG of steps declared in `[[step]]` tables. Each step is a
//! request to the composing model's own scheduler (so a model inside a
//! pipeline still batches across pipelines); steps whose inputs are ready run
//! concurrently. The DAG is checked at load against the composing models.
//!
//! A step may be conditional (`run_if` / `run_unless`: a BOOL tensor true, or false,
//! for the request; true when any of its elements is): it runs once that tensor is known
//! and says so, else it is skipped, at no cost. Two steps on opposite sides of one condition may write the same tensor
//! (the branches of an if/else); at load every tensor a step or the ensemble's outputs
//! read must be produced whenever the reader runs.

use crate::metrics::Metrics;
use crate::repository::ModelLookup;
use prometheus::IntCounter;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Instant;
use wisp_core::backend::{
    Backend, BackendFactory, BackendRequest, BackendResponse, BoxFuture, Execution, ExecutionTimes,
    LoadContext,
};
use wisp_core::config::{BackendKind, ModelConfig, Step, TensorConfig};
use wisp_core::error::{Error, Result};
use wisp_core::tensor::{DataType, Tensor};

/// How deep ensembles may nest at run time. Loading refuses cycles; this bound
/// also stops a cycle that a future bug or race would let through.
pub const MAX_ENSEMBLE_DEPTH: u8 = 16;

pub struct EnsembleBackend {
    name: String,
    steps: Vec<Step>,
    /// Tensors the ensemble returns.
    outputs: Vec<String>,
    models: Weak<dyn ModelLookup>,
    /// Per step: how many times it ran, and was skipped (`wisp_ensemble_step_total`).
    counts: Vec<(IntCounter, IntCounter)>,
}

/// Loads ensembles against the models a lookup (the repository) has ready.
pub struct EnsembleFactory {
    models: Weak<dyn ModelLookup>,
    metrics: Arc<Metrics>,
}

impl EnsembleFactory {
    pub fn new(models: Weak<dyn ModelLookup>, metrics: Arc<Metrics>) -> Self {
        EnsembleFactory { models, metrics }
    }
}

impl BackendFactory for EnsembleFactory {
    fn load(&self, context: &LoadContext<'_>) -> Result<Box<dyn Backend>> {
        let mut backend = EnsembleBackend::load(context.config, self.models.clone())?;
        let version = context.version.to_string();
        backend.counts = context
            .config
            .steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let label = format!("{i}:{}", step.model);
                let count = |outcome: &str| {
                    self.metrics.ensemble_steps.with_label_values(&[
                        context.config.name.as_str(),
                        &version,
                        &label,
                        outcome,
                    ])
                };
                (count("ran"), count("skipped"))
            })
            .collect();
        Ok(Box::new(backend))
    }
}

/// When a tensor is there for a request: always, or only when a condition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum When {
    Always,
    Only(String, bool),
}

impl When {
    fn of(step: &Step) -> When {
        match step.condition() {
            None => When::Always,
            Some((tensor, value)) => When::Only(tensor.to_string(), value),
        }
    }

    fn describe(&self) -> String {
        match self {
            When::Always => "always".into(),
            When::Only(tensor, value) => format!("only when '{tensor}' is {value}"),
        }
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
        // Each tensor's producer, and when it is there (`When`).
        let mut producers: HashMap<&str, (String, &TensorConfig, bool)> = HashMap::new();
        let mut when: HashMap<&str, When> = HashMap::new();
        for input in &config.inputs {
            producers.insert(
                &input.name,
                (
                    "the ensemble's inputs".into(),
                    input,
                    config.max_batch_size > 0,
                ),
            );
            when.insert(&input.name, When::Always);
        }
        for (i, (step, composing)) in config.steps.iter().zip(&step_configs).enumerate() {
            for (step_output, tensor) in &step.output_map {
                let declared = composing.output(step_output).ok_or_else(|| {
                    Error::invalid(format!(
                        "step {i}: model '{}' has no output '{step_output}' (output_map)",
                        step.model
                    ))
                })?;
                let this = When::of(step);
                let from = format!("step {i} (model '{}')", step.model);
                if let Some((other, other_declared, _)) = producers.get(tensor.as_str()) {
                    // Allowed once: the other branch of the same condition (if/else).
                    let complementary = match (&when[tensor.as_str()], &this) {
                        (When::Only(a, x), When::Only(b, y)) => a == b && x != y,
                        _ => false,
                    };
                    if !complementary {
                        return Err(Error::invalid(format!(
                            "step {i}: tensor '{tensor}' is already produced by {other} \
                             (two steps may write one tensor only as the two sides of one \
                             run_if/run_unless condition)"
                        )));
                    }
                    if other_declared.datatype != declared.datatype
                        || !dims_compatible(&other_declared.dims, &declared.dims)
                    {
                        return Err(Error::invalid(format!(
                            "step {i}: tensor '{tensor}' is {} {:?} here but {} {:?} from {other}",
                            declared.datatype,
                            declared.dims,
                            other_declared.datatype,
                            other_declared.dims
                        )));
                    }
                    when.insert(tensor, When::Always);
                    continue;
                }
                producers.insert(tensor, (from, declared, composing.max_batch_size > 0));
                when.insert(tensor, this);
            }
        }
        // A step's output is there only when all it needs is: a step can only narrow.
        for (i, step) in config.steps.iter().enumerate() {
            if let Some((tensor, _)) = step.condition() {
                let (from, declared, _) = producers.get(tensor).ok_or_else(|| {
                    Error::invalid(format!(
                        "step {i}: its condition '{tensor}' is neither an ensemble input nor any step's output"
                    ))
                })?;
                if declared.datatype != DataType::Bool {
                    return Err(Error::invalid(format!(
                        "step {i}: its condition '{tensor}' from {from} is {}, not BOOL",
                        declared.datatype
                    )));
                }
                if when[tensor] != When::Always {
                    return Err(Error::invalid(format!(
                        "step {i}: its condition '{tensor}' is there {}; a condition must be there always",
                        when[tensor].describe()
                    )));
                }
            }
            let runs = When::of(step);
            for tensor in step.input_map.values() {
                if let Some(there) = when.get(tensor.as_str()) {
                    if *there != When::Always && *there != runs {
                        return Err(Error::invalid(format!(
                            "step {i} (model '{}') runs {} but reads '{tensor}', which is there {}; \
                             give it the same condition, or write '{tensor}' on the other branch too",
                            step.model,
                            runs.describe(),
                            there.describe()
                        )));
                    }
                }
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
            if when[output.name.as_str()] != When::Always {
                return Err(Error::invalid(format!(
                    "ensemble output '{}' is produced {} (by {from}); add a step on the other branch that writes it too",
                    output.name,
                    when[output.name.as_str()].describe()
                )));
            }
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
                    .map(String::as_str)
                    .chain(config.steps[i].condition().map(|(t, _)| t))
                    .all(|t| available.contains(t))
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
            counts: Vec::new(),
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
        // Refuse at once when a step's model would refuse (its queue is full or
        // overloaded), rather than after
        // the steps before it ran (under overload, tokenizing requests the encoder refuses).
        for (i, step) in self.steps.iter().enumerate() {
            if let Ok(model) = repository.get(&step.model, step.version) {
                if model.is_full() {
                    return Err(Error::unavailable(format!(
                        "ensemble '{}' step {i}: model '{}' is refusing requests (its queue is full or overloaded); try again later",
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
            // Steps whose condition is known and says no are done: skipped.
            let mut skipped = false;
            let mut undecided = Vec::with_capacity(pending.len());
            for i in pending {
                match self.steps[i].condition() {
                    Some((tensor, wanted)) if pool.contains_key(tensor) => {
                        if condition(&pool[tensor], &self.name, i)? == wanted {
                            undecided.push(i);
                        } else {
                            if let Some((_, skips)) = self.counts.get(i) {
                                skips.inc();
                            }
                            skipped = true;
                        }
                    }
                    _ => undecided.push(i),
                }
            }
            let (ready, waiting): (Vec<usize>, Vec<usize>) =
                undecided.into_iter().partition(|&i| {
                    let step = &self.steps[i];
                    step.condition().is_none_or(|(t, _)| pool.contains_key(t))
                        && step.input_map.values().all(|t| pool.contains_key(t))
                });
            if ready.is_empty() && skipped {
                pending = waiting;
                continue;
            }
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
                if let Some((runs, _)) = self.counts.get(i) {
                    runs.inc();
                }
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

/// The value of a step's condition tensor for this request: true when any element
/// is (a batch goes down the `run_if` side when one of its items needs it).
fn condition(tensor: &Tensor, ensemble: &str, step: usize) -> Result<bool> {
    if tensor.datatype != DataType::Bool {
        return Err(Error::invalid(format!(
            "ensemble '{ensemble}' step {step}: condition '{}' must be BOOL, got {}",
            tensor.name, tensor.datatype
        )));
    }
    Ok(tensor.data.iter().any(|&b| b != 0))
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
