//! Prometheus metrics, in Triton's names where Triton has them so dashboards carry over.

use prometheus::{
    Counter, CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub request_success: IntCounterVec,
    pub request_failure: IntCounterVec,
    pub inference_count: IntCounterVec,
    pub execution_count: IntCounterVec,
    pub request_duration_us: CounterVec,
    pub queue_duration_us: CounterVec,
    pub compute_input_duration_us: CounterVec,
    pub compute_infer_duration_us: CounterVec,
    pub compute_output_duration_us: CounterVec,
    pub request_latency: HistogramVec,
    pub queue_latency: HistogramVec,
    pub compute_latency: HistogramVec,
    pub model_ready: IntGaugeVec,
    /// Ensemble steps by outcome: `ran`, or `skipped` by their run_if/run_unless.
    pub ensemble_steps: IntCounterVec,
}

const MODEL_VERSION: &[&str] = &["model", "version"];

/// Latency buckets from 50 µs to 20 s, in seconds.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 5.0, 10.0, 20.0,
    ]
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), MODEL_VERSION).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let duration = |name: &str, help: &str| {
            let c = CounterVec::new(Opts::new(name, help), MODEL_VERSION).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(latency_buckets()),
                MODEL_VERSION,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let request_failure = IntCounterVec::new(
            Opts::new(
                "nv_inference_request_failure",
                "Number of failed inference requests",
            ),
            &["model", "version", "reason"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(request_failure.clone()))
            .expect("unique metric");
        let model_ready = IntGaugeVec::new(
            Opts::new(
                "wisp_model_ready",
                "1 when the model version is ready to serve",
            ),
            MODEL_VERSION,
        )
        .expect("valid metric");
        registry
            .register(Box::new(model_ready.clone()))
            .expect("unique metric");
        let ensemble_steps = IntCounterVec::new(
            Opts::new(
                "wisp_ensemble_step_total",
                "Ensemble steps per request, by outcome: ran, or skipped by run_if/run_unless",
            ),
            &["model", "version", "step", "outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(ensemble_steps.clone()))
            .expect("unique metric");
        Metrics {
            ensemble_steps,
            request_success: counter(
                "nv_inference_request_success",
                "Number of successful inference requests",
            ),
            request_failure,
            inference_count: counter(
                "nv_inference_count",
                "Number of inferences performed (a batch of n counts n)",
            ),
            execution_count: counter(
                "nv_inference_exec_count",
                "Number of model executions (batches) performed",
            ),
            request_duration_us: duration(
                "nv_inference_request_duration_us",
                "Cumulative inference request duration in microseconds",
            ),
            queue_duration_us: duration(
                "nv_inference_queue_duration_us",
                "Cumulative time requests spent waiting in queue in microseconds",
            ),
            compute_input_duration_us: duration(
                "nv_inference_compute_input_duration_us",
                "Cumulative compute input duration in microseconds",
            ),
            compute_infer_duration_us: duration(
                "nv_inference_compute_infer_duration_us",
                "Cumulative compute inference duration in microseconds",
            ),
            compute_output_duration_us: duration(
                "nv_inference_compute_output_duration_us",
                "Cumulative compute output duration in microseconds",
            ),
            request_latency: histogram(
                "wisp_inference_request_duration_seconds",
                "End-to-end latency of successful inference requests inside the server",
            ),
            queue_latency: histogram(
                "wisp_inference_queue_duration_seconds",
                "Time a request waited for a model instance",
            ),
            compute_latency: histogram(
                "wisp_inference_compute_duration_seconds",
                "Time a request's batch spent executing (input + infer + output)",
            ),
            model_ready,
            registry,
        }
    }

    /// Adds metrics another crate owns (the GPU gauges), gathered at every scrape.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> Result<(), String> {
        self.registry
            .register(collector)
            .map_err(|e| format!("cannot register metrics: {e}"))
    }

    /// The series of one model version, resolved once: looking a series up by its
    /// labels hashes them under a lock, nine times per request otherwise.
    pub fn series(&self, model: &str, version: &str) -> ModelSeries {
        let labels = [model, version];
        ModelSeries {
            request_success: self.request_success.with_label_values(&labels),
            inference_count: self.inference_count.with_label_values(&labels),
            execution_count: self.execution_count.with_label_values(&labels),
            request_duration_us: self.request_duration_us.with_label_values(&labels),
            queue_duration_us: self.queue_duration_us.with_label_values(&labels),
            compute_input_duration_us: self.compute_input_duration_us.with_label_values(&labels),
            compute_infer_duration_us: self.compute_infer_duration_us.with_label_values(&labels),
            compute_output_duration_us: self.compute_output_duration_us.with_label_values(&labels),
            request_latency: self.request_latency.with_label_values(&labels),
            queue_latency: self.queue_latency.with_label_values(&labels),
            compute_latency: self.compute_latency.with_label_values(&labels),
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// One model version's series (failures, labelled by reason too, stay in [`Metrics`]).
pub struct ModelSeries {
    pub request_success: IntCounter,
    pub inference_count: IntCounter,
    pub execution_count: IntCounter,
    pub request_duration_us: Counter,
    pub queue_duration_us: Counter,
    pub compute_input_duration_us: Counter,
    pub compute_infer_duration_us: Counter,
    pub compute_output_duration_us: Counter,
    pub request_latency: Histogram,
    pub queue_latency: Histogram,
    pub compute_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
