//! Triton's trace extension: trace settings (global and per model, read and changed at
//! run time over HTTP and gRPC), which requests are traced, and the export of their
//! spans over OTLP/HTTP, as Triton's `opentelemetry` trace mode does.
//!
//! A traced request gets a root span from its front (`InferRequest`: receive and send
//! timestamps), a span per model it passes (request, queue start, end) and a compute span
//! per model that ran a batch (input, infer, output). Ensemble steps hang from the
//! ensemble's model span. A W3C `traceparent` from the client makes the root span its
//! child, and such a request is traced whatever the rate and count (as Triton does).

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use wisp_core::error::{Error, Result};
use wisp_core::trace::{SpanId, SpanRecord, TraceHandle, TraceRecorder};

/// Models that may have trace settings of their own (each is a small map entry).
const MAX_MODEL_SETTINGS: usize = 4096;
/// Bounds of the batch span processor's settings.
const MAX_QUEUE_SIZE: usize = 1 << 20;
const MAX_SCHEDULE_DELAY_MS: u64 = 3_600_000;

/// Where spans go by default: an OpenTelemetry collector on this machine (Triton's default).
pub const DEFAULT_OTLP_URL: &str = "http://localhost:4318/v1/traces";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Off,
    Timestamps,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Off => "OFF",
            Level::Timestamps => "TIMESTAMPS",
        }
    }

    /// Triton's levels are a list; `OFF` alone turns tracing off.
    fn parse(values: &[String], what: &str) -> Result<Level> {
        let mut level = Level::Off;
        for value in values {
            match value.as_str() {
                "OFF" => {}
                "TIMESTAMPS" => level = Level::Timestamps,
                "TENSORS" => {
                    return Err(Error::invalid(format!(
                        "{what}: level TENSORS is not supported (wisp traces TIMESTAMPS, \
                         exported over OpenTelemetry, which Triton's opentelemetry mode \
                         does not trace tensors in either)"
                    )))
                }
                other => {
                    return Err(Error::invalid(format!(
                        "{what}: unknown trace level '{other}'; the levels are OFF and TIMESTAMPS"
                    )))
                }
            }
        }
        Ok(level)
    }
}

/// What `--trace-config` set at startup.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    pub level: Level,
    pub rate: u64,
    pub count: i64,
    pub url: String,
    pub resource: Vec<(String, String)>,
    pub max_queue_size: usize,
    pub schedule_delay: Duration,
    pub max_export_batch_size: usize,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            level: Level::Off,
            rate: 1000,
            count: -1,
            url: DEFAULT_OTLP_URL.into(),
            resource: vec![],
            max_queue_size: 2048,
            schedule_delay: Duration::from_millis(5000),
            max_export_batch_size: 512,
        }
    }
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| Error::invalid(format!("{key}: '{value}' is not a valid number")))
}

fn rate(key: &str, value: &str) -> Result<u64> {
    let rate: u64 = number(key, value)?;
    if rate > u32::MAX as u64 {
        return Err(Error::invalid(format!(
            "{key}: {rate} is above {}",
            u32::MAX
        )));
    }
    Ok(rate)
}

fn count(key: &str, value: &str) -> Result<i64> {
    let count: i64 = number(key, value)?;
    if count < -1 {
        return Err(Error::invalid(format!(
            "{key}: {count} is not a count (-1 for no limit, or 0 and up)"
        )));
    }
    Ok(count)
}

impl TraceConfig {
    /// Triton's `--trace-config` entries: `SETTING=VALUE` (level, rate, count, mode) or
    /// `opentelemetry,SETTING=VALUE` (url, resource, bsp_max_queue_size,
    /// bsp_schedule_delay, bsp_max_export_batch_size).
    pub fn from_args(entries: &[String]) -> Result<TraceConfig> {
        let mut config = TraceConfig::default();
        let mut levels = vec![];
        for entry in entries {
            let what = format!("--trace-config {entry}");
            let (mode, setting) = match entry.split_once(',') {
                Some((mode, setting)) => (Some(mode), setting),
                None => (None, entry.as_str()),
            };
            let (key, value) = setting
                .split_once('=')
                .ok_or_else(|| Error::invalid(format!("{what}: expected SETTING=VALUE")))?;
            match (mode, key) {
                (None, "level") => levels.push(value.to_string()),
                (None, "rate") => config.rate = rate(&what, value)?,
                (None, "count") => config.count = count(&what, value)?,
                (None, "mode") if value == "opentelemetry" => {}
                (None, "mode") | (Some("triton"), _) => {
                    return Err(Error::invalid(format!(
                        "{what}: wisp exports traces with OpenTelemetry (OTLP) only, not to \
                         Triton's trace files; use mode=opentelemetry and opentelemetry,url=URL"
                    )))
                }
                (Some("opentelemetry"), "url") => {
                    config.url = if value.contains("://") {
                        value.to_string()
                    } else {
                        format!("http://{value}")
                    }
                }
                (Some("opentelemetry"), "resource") => {
                    let (k, v) = value.split_once('=').ok_or_else(|| {
                        Error::invalid(format!("{what}: expected resource=KEY=VALUE"))
                    })?;
                    config.resource.push((k.to_string(), v.to_string()));
                }
                (Some("opentelemetry"), "bsp_max_queue_size") => {
                    config.max_queue_size = number(&what, value)?
                }
                (Some("opentelemetry"), "bsp_schedule_delay") => {
                    config.schedule_delay = Duration::from_millis(number(&what, value)?)
                }
                (Some("opentelemetry"), "bsp_max_export_batch_size") => {
                    config.max_export_batch_size = number(&what, value)?
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "{what}: unknown trace setting; the settings are level, rate, count, \
                         mode, and opentelemetry,url / resource / bsp_max_queue_size / \
                         bsp_schedule_delay / bsp_max_export_batch_size"
                    )))
                }
            }
        }
        if !levels.is_empty() {
            config.level = Level::parse(&levels, "--trace-config level")?;
        }
        if config.max_queue_size == 0 || config.max_queue_size > MAX_QUEUE_SIZE {
            return Err(Error::invalid(format!(
                "--trace-config opentelemetry,bsp_max_queue_size: 1 to {MAX_QUEUE_SIZE}"
            )));
        }
        if config.max_export_batch_size == 0 || config.max_export_batch_size > config.max_queue_size
        {
            return Err(Error::invalid(
                "--trace-config opentelemetry,bsp_max_export_batch_size: 1 up to \
                 bsp_max_queue_size",
            ));
        }
        // Zero would make the exporter's thread spin.
        if config.schedule_delay < Duration::from_millis(1)
            || config.schedule_delay > Duration::from_millis(MAX_SCHEDULE_DELAY_MS)
        {
            return Err(Error::invalid(format!(
                "--trace-config opentelemetry,bsp_schedule_delay: 1 to {MAX_SCHEDULE_DELAY_MS} ms"
            )));
        }
        Ok(config)
    }
}

/// The settings in force for a scope; `count` is what remains to be collected.
#[derive(Debug, Clone, Copy)]
struct Settings {
    level: Level,
    rate: u64,
    count: i64,
}

/// A model's own settings: each unset one follows the global settings.
#[derive(Debug, Clone, Copy)]
/// As in Triton, a model with settings of its own also has its own counters: requests
/// seen, and traces left (the global count, copied when not given; refreshed when the
/// global settings change).
struct ModelSettings {
    level: Option<Level>,
    rate: Option<u64>,
    count: Option<i64>,
    seen: u64,
    count_left: i64,
}

struct State {
    global: Settings,
    /// Requests seen at the global rate.
    seen: u64,
    models: HashMap<String, ModelSettings>,
}

/// The trace settings a client reads or writes (Triton's names and string values).
pub type SettingsMap = Vec<(String, SettingValue)>;

#[derive(Debug, Clone, PartialEq)]
pub enum SettingValue {
    One(String),
    List(Vec<String>),
}

/// One change a client asked for: a value, or `None` to clear it (a model's setting
/// then follows the global one; a global setting returns to its startup value).
pub type SettingChange = (String, Option<Vec<String>>);

pub struct Tracing {
    startup: Settings,
    state: Mutex<State>,
    /// Whether any scope traces: the common case (all off) takes no lock per request.
    any_on: AtomicBool,
    exporter: Option<Exporter>,
}

/// One request being traced: its root span, until the front finishes it.
pub struct ActiveTrace {
    recorder: Arc<TraceRecorder>,
    root: SpanId,
    parent: Option<SpanContext>,
    start: SystemTime,
    events: Vec<(&'static str, SystemTime)>,
    attributes: Vec<(&'static str, String)>,
    tracing: Arc<Tracing>,
}

/// A `traceparent`/`tracestate` pair as the W3C propagator reads it.
struct TraceHeaders<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl Extractor for TraceHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent),
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The client's span from W3C trace-context headers; `None` when absent or malformed
/// (a malformed one is ignored, as the W3C spec asks).
pub fn remote_parent(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<SpanContext> {
    let headers = TraceHeaders {
        traceparent: traceparent?,
        tracestate,
    };
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&headers);
    let span = context.span().span_context().clone();
    span.is_valid().then_some(span)
}

impl Tracing {
    pub fn new(config: &TraceConfig) -> anyhow::Result<Arc<Tracing>> {
        let startup = Settings {
            level: config.level,
            rate: config.rate,
            count: config.count,
        };
        let tracing = Tracing {
            startup,
            state: Mutex::new(State {
                global: startup,
                seen: 0,
                models: HashMap::new(),
            }),
            any_on: AtomicBool::new(false),
            exporter: Exporter::new(config)?,
        };
        tracing.refresh_any_on(&tracing.state.lock());
        Ok(Arc::new(tracing))
    }

    fn refresh_any_on(&self, state: &State) {
        let on = state.global.level == Level::Timestamps
            || state
                .models
                .values()
                .any(|m| m.level == Some(Level::Timestamps));
        self.any_on.store(on, Ordering::Relaxed);
    }

    /// Whether to trace this request of `model`; if so, its root span starts now.
    pub fn start(
        self: &Arc<Self>,
        model: &str,
        parent: Option<SpanContext>,
    ) -> Option<ActiveTrace> {
        if !self.any_on.load(Ordering::Relaxed) || self.exporter.is_none() {
            return None;
        }
        let sampled = {
            let mut state = self.state.lock();
            let state = &mut *state;
            let global = state.global;
            let (level, rate, seen, remaining) = match state.models.get_mut(model) {
                Some(own) => (
                    own.level.unwrap_or(global.level),
                    own.rate.unwrap_or(global.rate),
                    &mut own.seen,
                    &mut own.count_left,
                ),
                None => (
                    global.level,
                    global.rate,
                    &mut state.seen,
                    &mut state.global.count,
                ),
            };
            if level == Level::Off {
                false
            } else if parent.is_some() {
                true // a client's trace context is always followed
            } else {
                // Triton's count: requests N, 2N, 3N … of the scope are traced.
                *seen = seen.wrapping_add(1);
                let due = rate > 0 && *seen % rate == 0;
                if due && *remaining != 0 {
                    if *remaining > 0 {
                        *remaining -= 1;
                    }
                    true
                } else {
                    false
                }
            }
        };
        if !sampled {
            return None;
        }
        let recorder = TraceRecorder::new();
        Some(ActiveTrace {
            root: recorder
                .new_span_id()
                .expect("a new trace gives its first span id"),
            recorder,
            parent,
            start: SystemTime::now(),
            events: Vec::with_capacity(4),
            attributes: vec![("triton.model_name", model.to_string())],
            tracing: self.clone(),
        })
    }

    /// The settings of a model (its own where it has them) or the global ones.
    pub fn settings(&self, model: Option<&str>) -> SettingsMap {
        let state = self.state.lock();
        let global = state.global;
        let (level, rate, count) = match model.and_then(|m| state.models.get(m)) {
            Some(own) => (
                own.level.unwrap_or(global.level),
                own.rate.unwrap_or(global.rate),
                own.count_left,
            ),
            None => (global.level, global.rate, global.count),
        };
        vec![
            (
                "trace_level".into(),
                SettingValue::List(vec![level.name().into()]),
            ),
            ("trace_rate".into(), SettingValue::One(rate.to_string())),
            ("trace_count".into(), SettingValue::One(count.to_string())),
            ("log_frequency".into(), SettingValue::One("0".into())),
            ("trace_file".into(), SettingValue::One(String::new())),
            (
                "trace_mode".into(),
                SettingValue::One("opentelemetry".into()),
            ),
        ]
    }

    /// Applies a client's changes, all or none, and answers the settings now in force.
    pub fn update(&self, model: Option<&str>, changes: &[SettingChange]) -> Result<SettingsMap> {
        let mut level = None;
        let mut rate_change = None;
        let mut count_change = None;
        for (key, value) in changes {
            let what = format!("trace setting '{key}'");
            let one = |values: &Vec<String>| -> Result<String> {
                match values.as_slice() {
                    [one] => Ok(one.clone()),
                    _ => Err(Error::invalid(format!("{what}: expected one value"))),
                }
            };
            match key.as_str() {
                "trace_level" => {
                    level = Some(value.as_ref().map(|v| Level::parse(v, &what)).transpose()?)
                }
                "trace_rate" => {
                    rate_change = Some(value.as_ref().map(|v| rate(&what, &one(v)?)).transpose()?)
                }
                "trace_count" => {
                    count_change = Some(value.as_ref().map(|v| count(&what, &one(v)?)).transpose()?)
                }
                "trace_mode" => {
                    if let Some(v) = value {
                        if one(v)? != "opentelemetry" {
                            return Err(Error::invalid(format!(
                                "{what}: wisp exports traces with OpenTelemetry only \
                                 (trace_mode 'opentelemetry')"
                            )));
                        }
                    }
                }
                "trace_file" | "log_frequency" => {
                    let unset = |v: &String| v.is_empty() || (key == "log_frequency" && v == "0");
                    if let Some(v) = value {
                        if !unset(&one(v)?) {
                            return Err(Error::invalid(format!(
                                "{what}: wisp writes no trace files; traces are exported \
                                 over OTLP (--trace-config opentelemetry,url=URL)"
                            )));
                        }
                    }
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "unknown trace setting '{key}'; the settings are trace_level, \
                         trace_rate, trace_count, trace_mode, trace_file and log_frequency"
                    )))
                }
            }
        }
        {
            let mut state = self.state.lock();
            match model {
                None => {
                    let startup = self.startup;
                    if let Some(level) = level {
                        state.global.level = level.unwrap_or(startup.level);
                    }
                    if let Some(rate) = rate_change {
                        state.global.rate = rate.unwrap_or(startup.rate);
                    }
                    if let Some(count) = count_change {
                        state.global.count = count.unwrap_or(startup.count);
                    }
                    // Triton renews the settings that follow the global ones: their
                    // counters start again, with the global count where they have none.
                    state.seen = 0;
                    let global_count = state.global.count;
                    for own in state.models.values_mut() {
                        if own.level.is_none() || own.rate.is_none() || own.count.is_none() {
                            own.seen = 0;
                        }
                        if own.count.is_none() {
                            own.count_left = global_count;
                        }
                    }
                }
                Some(model) => {
                    if !state.models.contains_key(model) && state.models.len() >= MAX_MODEL_SETTINGS
                    {
                        return Err(Error::new(
                            wisp_core::ErrorKind::Unavailable,
                            format!(
                                "{MAX_MODEL_SETTINGS} models already have trace settings of \
                                 their own; clear some (set them to null) first"
                            ),
                        ));
                    }
                    let global_count = state.global.count;
                    let own = state
                        .models
                        .entry(model.to_string())
                        .or_insert(ModelSettings {
                            level: None,
                            rate: None,
                            count: None,
                            seen: 0,
                            count_left: global_count,
                        });
                    if let Some(level) = level {
                        own.level = level;
                    }
                    if let Some(rate) = rate_change {
                        own.rate = rate;
                    }
                    if let Some(count) = count_change {
                        own.count = count;
                        own.count_left = count.unwrap_or(global_count);
                    }
                    // New settings, new counters (as Triton replaces the setting).
                    own.seen = 0;
                    if own.level.is_none() && own.rate.is_none() && own.count.is_none() {
                        state.models.remove(model);
                    }
                }
            }
            self.refresh_any_on(&state);
        }
        Ok(self.settings(model))
    }

    /// Sends what is still buffered; called once at shutdown (blocks up to the export
    /// timeout).
    pub fn shutdown(&self) {
        if let Some(exporter) = &self.exporter {
            exporter.shutdown();
        }
    }
}

impl ActiveTrace {
    /// What the request's models record their spans into.
    pub fn handle(&self) -> TraceHandle {
        TraceHandle {
            recorder: self.recorder.clone(),
            parent: self.root,
        }
    }

    /// A named instant of the root span (`HTTP_RECV_END`, `GRPC_SEND_START`, …).
    pub fn event(&mut self, name: &'static str) {
        self.events.push((name, SystemTime::now()));
    }

    pub fn attribute(&mut self, key: &'static str, value: String) {
        self.attributes.push((key, value));
    }

    /// Ends the root span and hands the trace to the exporter.
    pub fn finish(self, error: Option<&Error>) {
        let ActiveTrace {
            recorder,
            root,
            parent,
            start,
            events,
            attributes,
            tracing,
        } = self;
        recorder.record(SpanRecord {
            id: root,
            parent: None,
            name: "InferRequest".into(),
            start,
            end: SystemTime::now(),
            events,
            attributes,
            error: error.map(|e| e.message.clone()),
        });
        let (spans, dropped) = recorder.take();
        if dropped > 0 {
            tracing::warn!(
                "a trace had more than {} spans; {dropped} were dropped",
                wisp_core::trace::MAX_SPANS_PER_TRACE
            );
        }
        if let Some(exporter) = &tracing.exporter {
            exporter.export(parent, spans);
        }
    }
}

/// The OpenTelemetry SDK's tracer with a batch span processor and the OTLP/HTTP exporter:
/// spans wait in a bounded queue (dropped past it) and leave in batches from the SDK's
/// own thread, so a slow or absent collector never holds a request.
#[cfg(feature = "otlp")]
struct Exporter {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
    tracer: opentelemetry_sdk::trace::SdkTracer,
}

#[cfg(feature = "otlp")]
impl Exporter {
    fn new(config: &TraceConfig) -> anyhow::Result<Option<Exporter>> {
        use opentelemetry::trace::TracerProvider;
        use opentelemetry_otlp::WithExportConfig;
        use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(&config.url)
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| anyhow::anyhow!("the OTLP exporter for {}: {e}", config.url))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queue_size)
            .with_max_export_batch_size(config.max_export_batch_size)
            .with_scheduled_delay(config.schedule_delay)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let mut resource = opentelemetry_sdk::Resource::builder().with_service_name("wisp");
        for (k, v) in &config.resource {
            resource = resource.with_attribute(opentelemetry::KeyValue::new(k.clone(), v.clone()));
        }
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            // wisp decides what to trace (rate, count, a client's context): every span it
            // starts is recorded, whatever the client's sampled flag or OTEL_TRACES_SAMPLER.
            .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
            .with_span_processor(processor)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("wisp");
        Ok(Some(Exporter { provider, tracer }))
    }

    /// Turns the records into SDK spans, parents first, each with its recorded times.
    fn export(&self, parent: Option<SpanContext>, spans: Vec<SpanRecord>) {
        use opentelemetry::trace::{Span, SpanKind, Status, Tracer};
        use opentelemetry::{Context, KeyValue};
        let root_context = match parent {
            Some(parent) => Context::new().with_remote_span_context(parent),
            None => Context::new(),
        };
        let mut contexts: HashMap<SpanId, SpanContext> = HashMap::with_capacity(spans.len());
        for record in spans {
            // A span whose parent was not recorded hangs from the root span.
            let parent = record
                .parent
                .and_then(|p| contexts.get(&p).or_else(|| contexts.get(&0)));
            let context = match parent {
                Some(parent) => Context::new().with_remote_span_context(parent.clone()),
                None => root_context.clone(),
            };
            let kind = if record.parent.is_none() {
                SpanKind::Server
            } else {
                SpanKind::Internal
            };
            let mut span = self
                .tracer
                .span_builder(record.name)
                .with_kind(kind)
                .with_start_time(record.start)
                .with_attributes(
                    record
                        .attributes
                        .into_iter()
                        .map(|(k, v)| KeyValue::new(k, v)),
                )
                .start_with_context(&self.tracer, &context);
            for (name, at) in record.events {
                span.add_event_with_timestamp(name, at, vec![]);
            }
            if let Some(error) = record.error {
                span.set_status(Status::error(error));
            }
            contexts.insert(record.id, span.span_context().clone());
            span.end_with_timestamp(record.end);
        }
    }

    fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("flushing traces at shutdown: {e}");
        }
    }
}

/// Built without the `otlp` feature (the fuzz targets): nothing is traced.
#[cfg(not(feature = "otlp"))]
struct Exporter;

#[cfg(not(feature = "otlp"))]
impl Exporter {
    fn new(config: &TraceConfig) -> anyhow::Result<Option<Exporter>> {
        if config.level != Level::Off {
            anyhow::bail!("this build of wisp has no trace exporter (cargo feature `otlp`)");
        }
        Ok(None)
    }
    fn export(&self, _: Option<SpanContext>, _: Vec<SpanRecord>) {}
    fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracing(entries: &[&str]) -> Arc<Tracing> {
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        Tracing::new(&TraceConfig::from_args(&entries).unwrap()).unwrap()
    }

    fn change(key: &str, value: Option<&str>) -> SettingChange {
        (key.into(), value.map(|v| vec![v.to_string()]))
    }

    fn get<'a>(settings: &'a SettingsMap, key: &str) -> &'a SettingValue {
        &settings.iter().find(|(k, _)| k == key).unwrap().1
    }

    #[test]
    fn off_by_default_and_nothing_is_sampled() {
        let t = tracing(&[]);
        assert!(t.start("simple", None).is_none());
        let s = t.settings(None);
        assert_eq!(
            get(&s, "trace_level"),
            &SettingValue::List(vec!["OFF".into()])
        );
        assert_eq!(get(&s, "trace_rate"), &SettingValue::One("1000".into()));
        assert_eq!(
            get(&s, "trace_mode"),
            &SettingValue::One("opentelemetry".into())
        );
    }

    #[test]
    fn rate_samples_every_nth_and_count_runs_out() {
        let t = tracing(&["level=TIMESTAMPS", "rate=3", "count=2"]);
        let sampled: Vec<bool> = (0..9).map(|_| t.start("m", None).is_some()).collect();
        // Due at requests 3, 6, 9 (as Triton counts); the count allows two.
        assert_eq!(
            sampled,
            [false, false, true, false, false, true, false, false, false]
        );
        assert_eq!(
            get(&t.settings(None), "trace_count"),
            &SettingValue::One("0".into())
        );
    }

    #[test]
    fn a_model_setting_overrides_and_null_restores_the_global_one() {
        let t = tracing(&[]);
        let s = t
            .update(
                Some("m"),
                &[
                    change("trace_level", Some("TIMESTAMPS")),
                    change("trace_rate", Some("1")),
                ],
            )
            .unwrap();
        assert_eq!(
            get(&s, "trace_level"),
            &SettingValue::List(vec!["TIMESTAMPS".into()])
        );
        assert!(t.start("m", None).is_some());
        assert!(
            t.start("other", None).is_none(),
            "the global level is still OFF"
        );
        let s = t
            .update(
                Some("m"),
                &[change("trace_level", None), change("trace_rate", None)],
            )
            .unwrap();
        assert_eq!(
            get(&s, "trace_level"),
            &SettingValue::List(vec!["OFF".into()])
        );
        assert_eq!(get(&s, "trace_rate"), &SettingValue::One("1000".into()));
        assert!(t.start("m", None).is_none());
        assert!(
            t.state.lock().models.is_empty(),
            "a model with no settings of its own is forgotten"
        );
    }

    #[test]
    fn a_model_with_settings_of_its_own_counts_its_own_traces() {
        let t = tracing(&["level=TIMESTAMPS", "rate=1", "count=3"]);
        // Its own rate; the count is the global one, copied.
        let s = t
            .update(Some("m"), &[change("trace_rate", Some("2"))])
            .unwrap();
        assert_eq!(get(&s, "trace_count"), &SettingValue::One("3".into()));
        let sampled: Vec<bool> = (0..4).map(|_| t.start("m", None).is_some()).collect();
        assert_eq!(sampled, [false, true, false, true]);
        assert_eq!(
            get(&t.settings(Some("m")), "trace_count"),
            &SettingValue::One("1".into())
        );
        assert_eq!(
            get(&t.settings(None), "trace_count"),
            &SettingValue::One("3".into())
        );
        // Other models draw on the global count.
        assert!(t.start("other", None).is_some());
        assert_eq!(
            get(&t.settings(None), "trace_count"),
            &SettingValue::One("2".into())
        );
        // A global change renews what the model follows: the global count, copied again.
        t.update(None, &[change("trace_count", Some("5"))]).unwrap();
        assert_eq!(
            get(&t.settings(Some("m")), "trace_count"),
            &SettingValue::One("5".into())
        );
    }

    #[test]
    fn a_client_trace_context_is_followed_whatever_the_rate() {
        let t = tracing(&["level=TIMESTAMPS", "rate=0"]);
        assert!(t.start("m", None).is_none());
        let parent = remote_parent(
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            None,
        );
        assert!(parent.is_some());
        assert!(t.start("m", parent).is_some());
        assert!(remote_parent(Some("00-zz-b7ad6b7169203331-01"), None).is_none());
        assert!(remote_parent(None, None).is_none());
    }

    #[test]
    fn bad_changes_are_refused_whole_and_named() {
        let t = tracing(&[]);
        for (changes, expected) in [
            (
                vec![change("trace_rate", Some("x"))],
                "trace setting 'trace_rate'",
            ),
            (vec![change("trace_count", Some("-2"))], "not a count"),
            (
                vec![change("trace_level", Some("TENSORS"))],
                "TENSORS is not supported",
            ),
            (
                vec![change("trace_mode", Some("triton"))],
                "OpenTelemetry only",
            ),
            (
                vec![change("trace_file", Some("/tmp/t.json"))],
                "no trace files",
            ),
            (
                vec![change("nope", Some("1"))],
                "unknown trace setting 'nope'",
            ),
            (
                vec![
                    change("trace_level", Some("TIMESTAMPS")),
                    change("trace_rate", Some("-1")),
                ],
                "trace_rate",
            ),
        ] {
            let e = t.update(None, &changes).unwrap_err();
            assert!(e.message.contains(expected), "{}", e.message);
        }
        // Nothing of the refused requests applied.
        assert_eq!(
            get(&t.settings(None), "trace_level"),
            &SettingValue::List(vec!["OFF".into()])
        );
        // The values Triton reports for the file settings are accepted back.
        t.update(
            None,
            &[
                change("trace_file", Some("")),
                change("log_frequency", Some("0")),
            ],
        )
        .unwrap();
    }

    #[test]
    fn startup_entries_are_checked() {
        for (entry, expected) in [
            ("mode=triton", "OpenTelemetry (OTLP) only"),
            ("triton,file=/tmp/x", "OpenTelemetry (OTLP) only"),
            ("rate", "expected SETTING=VALUE"),
            ("opentelemetry,bsp_max_queue_size=0", "bsp_max_queue_size"),
            ("opentelemetry,bsp_schedule_delay=0", "bsp_schedule_delay"),
            ("opentelemetry,colour=blue", "unknown trace setting"),
        ] {
            let e = TraceConfig::from_args(&[entry.to_string()]).unwrap_err();
            assert!(e.message.contains(expected), "{entry}: {}", e.message);
        }
        let c =
            TraceConfig::from_args(&["opentelemetry,url=127.0.0.1:4318/v1/traces".into()]).unwrap();
        assert_eq!(c.url, "http://127.0.0.1:4318/v1/traces");
    }
}
