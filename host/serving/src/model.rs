//! A loaded model version: its config, its backend, its statistics, and the
//! checks every request passes before it reaches the backend.

use crate::metrics::{Metrics, ModelSeries};
use crate::scheduler::Scheduler;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use wisp_core::backend::{Backend, BackendRequest, BackendResponse, ExecutionTimes};
use wisp_core::config::{BackendKind, ModelConfig};
use wisp_core::error::{Error, Result};
use wisp_core::trace::{SpanId, SpanRecord, TraceRecorder};

#[derive(Default)]
struct Duration {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Duration {
    fn add(&self, ns: u64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.ns.fetch_add(ns, Ordering::Relaxed);
    }
    fn json(&self) -> Value {
        json!({"count": self.count.load(Ordering::Relaxed), "ns": self.ns.load(Ordering::Relaxed)})
    }
}

#[derive(Default, Clone, Copy)]
struct BatchTimes {
    count: u64,
    input_ns: u64,
    infer_ns: u64,
    output_ns: u64,
}

/// Triton's per-model-version statistics (`/v2/models/{m}/stats`).
#[derive(Default)]
pub struct ModelStats {
    success: Duration,
    fail: Duration,
    queue: Duration,
    compute_input: Duration,
    compute_infer: Duration,
    compute_output: Duration,
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    last_inference_ms: AtomicU64,
    batches: Mutex<BTreeMap<u64, BatchTimes>>,
}

impl ModelStats {
    pub fn to_json(&self, name: &str, version: u64) -> Value {
        let batch_stats: Vec<Value> = self
            .batches
            .lock()
            .iter()
            .map(|(size, t)| {
                json!({
                    "batch_size": size,
                    "compute_input": {"count": t.count, "ns": t.input_ns},
                    "compute_infer": {"count": t.count, "ns": t.infer_ns},
                    "compute_output": {"count": t.count, "ns": t.output_ns},
                })
            })
            .collect();
        json!({
            "name": name,
            "version": version.to_string(),
            "last_inference": self.last_inference_ms.load(Ordering::Relaxed),
            "inference_count": self.inference_count.load(Ordering::Relaxed),
            "execution_count": self.execution_count.load(Ordering::Relaxed),
            "inference_stats": {
                "success": self.success.json(),
                "fail": self.fail.json(),
                "queue": self.queue.json(),
                "compute_input": self.compute_input.json(),
                "compute_infer": self.compute_infer.json(),
                "compute_output": self.compute_output.json(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": batch_stats,
            "memory_usage": [],
        })
    }
}

/// When a request passed each stage, for its trace.
struct Stages {
    started: Instant,
    /// Since `started`, when validation ended (and the request went to its scheduler).
    validated_ns: Option<u64>,
    /// The queue time and the compute times of the batch it ran in.
    executed: Option<(u64, ExecutionTimes)>,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            started: Instant::now(),
            validated_ns: None,
            executed: None,
        }
    }
}

pub struct LoadedModel {
    pub config: Arc<ModelConfig>,
    pub version: u64,
    scheduler: Scheduler,
    backend: Arc<dyn Backend>,
    pub stats: ModelStats,
    metrics: Arc<Metrics>,
    series: ModelSeries,
    version_label: String,
}

fn shape_matches(shape: &[i64], dims: &[i64]) -> bool {
    shape.len() == dims.len() && shape.iter().zip(dims).all(|(&s, &d)| d == -1 || s == d)
}

impl LoadedModel {
    pub fn new(
        config: Arc<ModelConfig>,
        version: u64,
        backend: Box<dyn Backend>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let backend: Arc<dyn Backend> = Arc::from(backend);
        let scheduler = Scheduler::new(
            backend.clone(),
            &config,
            &format!("{}:{version}", config.name),
        );
        let version_label = version.to_string();
        LoadedModel {
            series: metrics.series(&config.name, &version_label),
            version_label,
            config,
            version,
            scheduler,
            backend,
            stats: ModelStats::default(),
            metrics,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Instances taken out of service for good (a poisoned GPU context).
    pub fn instances_out_of_service(&self) -> usize {
        self.backend.out_of_service().instances
    }

    /// Why this version cannot serve at all (every instance is out of service); it is
    /// then not ready.
    pub fn unavailable_reason(&self) -> Option<String> {
        let out = self.backend.out_of_service();
        (out.instances > 0 && out.instances >= self.backend.instances()).then(|| {
            format!(
                "every instance is out of service: {}",
                out.reason.unwrap_or_default()
            )
        })
    }

    /// Whether the model's queue is full now (see [`Scheduler::is_full`]).
    pub fn is_full(&self) -> bool {
        self.scheduler.is_full()
    }

    /// Checks a request against the model's config; returns its batch size.
    pub fn validate(&self, request: &BackendRequest) -> Result<u64> {
        let config = &self.config;
        let model = &config.name;
        let mut batch: Option<i64> = None;
        for (i, input) in request.inputs.iter().enumerate() {
            if request.inputs[..i].iter().any(|t| t.name == input.name) {
                return Err(Error::invalid(format!(
                    "input '{}' is given twice",
                    input.name
                )));
            }
            let declared = config.input(&input.name).ok_or_else(|| {
                let names: Vec<&str> = config.inputs.iter().map(|t| t.name.as_str()).collect();
                Error::invalid(format!(
                    "unexpected input '{}' for model '{model}'; its inputs are {}",
                    input.name,
                    names.join(", ")
                ))
            })?;
            if input.datatype != declared.datatype {
                return Err(Error::invalid(format!(
                    "input '{}' has datatype {}, model '{model}' expects {}",
                    input.name, input.datatype, declared.datatype
                )));
            }
            let dims = if config.max_batch_size > 0 {
                let Some((&b, rest)) = input.shape.split_first() else {
                    return Err(Error::invalid(format!(
                        "input '{}' has shape [] but model '{model}' batches: expected [-1{}]",
                        input.name,
                        declared
                            .dims
                            .iter()
                            .map(|d| format!(", {d}"))
                            .collect::<String>()
                    )));
                };
                if b < 1 || b > config.max_batch_size as i64 {
                    return Err(Error::invalid(format!(
                        "input '{}' has batch size {b}; model '{model}' allows 1 to {}",
                        input.name, config.max_batch_size
                    )));
                }
                if let Some(prev) = batch.filter(|&p| p != b) {
                    return Err(Error::invalid(format!(
                        "input '{}' has batch size {b}, other inputs have {prev}",
                        input.name
                    )));
                }
                batch = Some(b);
                rest
            } else {
                &input.shape[..]
            };
            if !shape_matches(dims, &declared.dims) {
                let expected = if config.max_batch_size > 0 {
                    format!(
                        "[-1, {}]",
                        declared
                            .dims
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    format!("{:?}", declared.dims)
                };
                return Err(Error::invalid(format!(
                    "input '{}' has shape {:?}, model '{model}' expects {expected}",
                    input.name, input.shape
                )));
            }
            input.validate_size()?;
        }
        for declared in config.inputs.iter().filter(|t| !t.optional) {
            if !request.inputs.iter().any(|t| t.name == declared.name) {
                return Err(Error::invalid(format!(
                    "missing input '{}' for model '{model}'",
                    declared.name
                )));
            }
        }
        for name in &request.requested_outputs {
            if config.output(name).is_none() {
                let names: Vec<&str> = config.outputs.iter().map(|t| t.name.as_str()).collect();
                return Err(Error::invalid(format!(
                    "unexpected output '{name}' requested from model '{model}'; its outputs are {}",
                    names.join(", ")
                )));
            }
        }
        Ok(batch.unwrap_or(1) as u64)
    }

    /// Checks what the backend returned: declared names and datatypes, sizes
    /// that match shapes; keeps the requested outputs, in config order.
    fn check_outputs(
        &self,
        requested: &[String],
        response: BackendResponse,
    ) -> Result<BackendResponse> {
        let model = &self.config.name;
        let mut outputs = Vec::with_capacity(response.outputs.len());
        for tensor in response.outputs {
            let declared = self.config.output(&tensor.name).ok_or_else(|| {
                Error::internal(format!(
                    "model '{model}' produced undeclared output '{}'",
                    tensor.name
                ))
            })?;
            if tensor.datatype != declared.datatype {
                return Err(Error::internal(format!(
                    "model '{model}' produced output '{}' as {}, its config declares {}",
                    tensor.name, tensor.datatype, declared.datatype
                )));
            }
            tensor
                .validate_size()
                .map_err(|e| Error::internal(e.message).context(format!("model '{model}'")))?;
            if requested.is_empty() || requested.contains(&tensor.name) {
                outputs.push(tensor);
            }
        }
        for name in requested {
            if !outputs.iter().any(|t| &t.name == name) {
                return Err(Error::internal(format!(
                    "model '{model}' did not produce requested output '{name}'"
                )));
            }
        }
        Ok(BackendResponse {
            outputs,
            parameters: response.parameters,
        })
    }

    /// Validates and runs one request, recording statistics and metrics, and its
    /// spans when it is traced.
    pub async fn infer(&self, mut request: BackendRequest) -> Result<BackendResponse> {
        // This model's span (none past the trace's span limit): the request's later
        // spans (ensemble steps) hang from it.
        let trace = request.trace.as_mut().and_then(|handle| {
            let id = handle.recorder.new_span_id()?;
            let parent = std::mem::replace(&mut handle.parent, id);
            Some((handle.recorder.clone(), id, parent, SystemTime::now()))
        });
        let mut stages = Stages::default();
        let result = self.run(request, &mut stages).await;
        let elapsed = stages.started.elapsed().as_nanos() as u64;
        match &result {
            Ok(_) => {
                self.stats.success.add(elapsed);
                self.series.request_success.inc();
                // Successes only: fast refusals under overload would pull the tail
                // down just when it matters (failures are counted by reason).
                self.series.request_latency.observe(elapsed as f64 / 1e9);
            }
            Err(e) => {
                self.stats.fail.add(elapsed);
                self.metrics
                    .request_failure
                    .with_label_values(&[self.name(), &self.version_label, e.reason()])
                    .inc();
            }
        }
        self.series.request_duration_us.inc_by(elapsed as f64 / 1e3);
        if let Some((recorder, id, parent, start)) = trace {
            self.record_spans(&recorder, id, parent, start, elapsed, &stages, &result);
        }
        result
    }

    async fn run(&self, request: BackendRequest, stages: &mut Stages) -> Result<BackendResponse> {
        let batch_size = self.validate(&request)?;
        stages.validated_ns = Some(stages.started.elapsed().as_nanos() as u64);
        let requested = request.requested_outputs.clone();
        let outcome = self.scheduler.schedule(request, batch_size).await?;
        if outcome.executed {
            stages.executed = Some((outcome.queue_ns, outcome.times));
        }
        if outcome.records_batch {
            self.record_batch(outcome.batch_size, outcome.times);
        }
        let response = self.check_outputs(&requested, outcome.result?)?;
        // Triton counts inferences and their times for successes only.
        self.record_request(batch_size, outcome.queue_ns, outcome.times);
        Ok(response)
    }

    /// This model's span (Triton's model span: request start, queue start, request end)
    /// and, when a batch ran, its compute span (input, infer and output stages). The
    /// compute stages are the batch's, as Triton reports them.
    #[allow(clippy::too_many_arguments)]
    fn record_spans(
        &self,
        recorder: &TraceRecorder,
        id: SpanId,
        parent: SpanId,
        start: SystemTime,
        elapsed_ns: u64,
        stages: &Stages,
        result: &Result<BackendResponse>,
    ) {
        let at = |ns: u64| start + std::time::Duration::from_nanos(ns.min(elapsed_ns));
        let end = at(elapsed_ns);
        let mut events = vec![("REQUEST_START", start)];
        if let Some(validated) = stages.validated_ns {
            events.push(("QUEUE_START", at(validated)));
        }
        events.push(("REQUEST_END", end));
        let attributes = vec![
            ("triton.model_name", self.name().to_string()),
            ("triton.model_version", self.version_label.clone()),
        ];
        let error = result.as_ref().err().map(|e| e.message.clone());
        if let (Some(validated), Some((queue_ns, t))) = (stages.validated_ns, stages.executed) {
            if let (true, Some(compute_id)) = (
                self.config.backend != BackendKind::Ensemble,
                recorder.new_span_id(),
            ) {
                let compute_start = validated + queue_ns;
                let input_end = compute_start + t.compute_input_ns;
                let output_start = input_end + t.compute_infer_ns;
                let compute_end = output_start + t.compute_output_ns;
                recorder.record(SpanRecord {
                    id: compute_id,
                    parent: Some(id),
                    name: "compute".into(),
                    start: at(compute_start),
                    end: at(compute_end),
                    events: vec![
                        ("COMPUTE_START", at(compute_start)),
                        ("COMPUTE_INPUT_END", at(input_end)),
                        ("COMPUTE_OUTPUT_START", at(output_start)),
                        ("COMPUTE_END", at(compute_end)),
                    ],
                    attributes: attributes.clone(),
                    error: None,
                });
            }
        }
        recorder.record(SpanRecord {
            id,
            parent: Some(parent),
            name: self.name().to_string(),
            start,
            end,
            events,
            attributes,
            error,
        });
    }

    /// One execution (a batch of `batch_size` inferences, one or more requests).
    fn record_batch(&self, batch_size: u64, t: ExecutionTimes) {
        let s = &self.stats;
        s.execution_count.fetch_add(1, Ordering::Relaxed);
        {
            let mut batches = s.batches.lock();
            let b = batches.entry(batch_size).or_default();
            b.count += 1;
            b.input_ns += t.compute_input_ns;
            b.infer_ns += t.compute_infer_ns;
            b.output_ns += t.compute_output_ns;
        }
        self.series.execution_count.inc();
    }

    /// One successful request of `batch_size` inferences, with its queue time
    /// and the compute times of the batch it ran in.
    fn record_request(&self, batch_size: u64, queue_ns: u64, t: ExecutionTimes) {
        let s = &self.stats;
        s.queue.add(queue_ns);
        s.compute_input.add(t.compute_input_ns);
        s.compute_infer.add(t.compute_infer_ns);
        s.compute_output.add(t.compute_output_ns);
        s.inference_count.fetch_add(batch_size, Ordering::Relaxed);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        s.last_inference_ms.store(now_ms, Ordering::Relaxed);
        let m = &self.series;
        m.inference_count.inc_by(batch_size);
        m.queue_duration_us.inc_by(queue_ns as f64 / 1e3);
        m.compute_input_duration_us
            .inc_by(t.compute_input_ns as f64 / 1e3);
        m.compute_infer_duration_us
            .inc_by(t.compute_infer_ns as f64 / 1e3);
        m.compute_output_duration_us
            .inc_by(t.compute_output_ns as f64 / 1e3);
        m.queue_latency.observe(queue_ns as f64 / 1e9);
        let compute = t.compute_input_ns + t.compute_infer_ns + t.compute_output_ns;
        m.compute_latency.observe(compute as f64 / 1e9);
    }
}
