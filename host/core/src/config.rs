//! `config.toml`: Triton's model-config semantics in TOML, and its JSON rendering
//! in Triton's field names for `GET /v2/models/{m}/config`.

use crate::error::{Error, Result};
use crate::tensor::DataType;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Wasm,
    Encoder,
    Ensemble,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Wasm => "wasm",
            BackendKind::Encoder => "encoder",
            BackendKind::Ensemble => "ensemble",
        }
    }
}

/// Which versions of a model are served: `"all"`, `{ latest = N }` or `{ specific = [..] }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum VersionPolicy {
    All,
    Latest(u32),
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// The versions to serve out of those present on disk.
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        let mut sorted = available.to_vec();
        sorted.sort_unstable();
        match self {
            VersionPolicy::All => sorted,
            VersionPolicy::Latest(n) => {
                let keep = (*n as usize).min(sorted.len());
                sorted.split_off(sorted.len() - keep)
            }
            VersionPolicy::Specific(wanted) => {
                sorted.into_iter().filter(|v| wanted.contains(v)).collect()
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorConfig {
    pub name: String,
    #[serde(deserialize_with = "datatype_from_str")]
    pub datatype: DataType,
    /// Dimensions without the batch dimension; -1 is variable.
    pub dims: Vec<i64>,
    /// An input the client may leave out.
    #[serde(default)]
    pub optional: bool,
    /// Class names by index, for Triton's classification extension on this output
    /// (`"score:index:label"` strings).
    #[serde(default)]
    pub labels: Vec<String>,
}

fn datatype_from_str<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<DataType, D::Error> {
    let name = String::deserialize(d)?;
    DataType::parse(&name).ok_or_else(|| {
        let all: Vec<&str> = DataType::ALL.iter().map(|d| d.as_str()).collect();
        serde::de::Error::custom(format!(
            "unknown datatype '{name}', expected one of {}",
            all.join(", ")
        ))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InstanceKind {
    #[default]
    Cpu,
    Gpu,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceGroup {
    /// Instances; for a GPU group, instances on each of its GPUs (as in Triton).
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub kind: InstanceKind,
    /// GPU ordinals of a GPU group (default: GPU 0).
    #[serde(default)]
    pub gpus: Vec<u32>,
}

impl InstanceGroup {
    /// The GPUs of a GPU group (GPU 0 when none are named).
    pub fn gpu_ordinals(&self) -> Vec<u32> {
        if self.gpus.is_empty() {
            vec![0]
        } else {
            self.gpus.clone()
        }
    }

    pub fn instances(&self) -> usize {
        match self.kind {
            InstanceKind::Cpu => self.count as usize,
            InstanceKind::Gpu => self.count as usize * self.gpu_ordinals().len(),
        }
    }
}

fn one() -> u32 {
    1
}

/// Limits of the Wasm sandbox, per instance.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Linear memory cap of one instance.
    pub memory_limit_mib: u64,
    /// Deadline of one `execute` call; past it the instance is interrupted and replaced.
    pub execution_timeout_ms: u64,
    /// Deadline of `init`, which may read files from the version folder.
    pub init_timeout_ms: u64,
    /// Most output bytes one `execute` may hand back (all its requests together).
    pub max_output_mib: u64,
    /// File name of the component in the version folder.
    pub component: String,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            memory_limit_mib: 512,
            execution_timeout_ms: 10_000,
            init_timeout_ms: 60_000,
            max_output_mib: 256,
            component: "model.wasm".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    /// A request past its queue timeout fails with 503.
    #[default]
    Reject,
    /// A request past its queue timeout waits behind every request that is not.
    Delay,
}

/// Triton's queue policy, for the default queue or one priority level.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueuePolicy {
    /// Longest a request may wait in the queue; 0 is no limit.
    pub timeout_us: u64,
    pub timeout_action: TimeoutAction,
    /// Whether a request's `timeout` parameter (µs) replaces `timeout_us`.
    pub allow_timeout_override: bool,
    /// Requests that may wait; a full queue answers 503 at once. 0 means the server's cap.
    pub max_queue_size: u32,
    /// Load shedding under sustained overload (0: off). Once every request for
    /// `dynamic_batching.overload_window_us` has expected to wait longer than this (the
    /// inferences queued ahead of it at the recent pace of execution), a request expected
    /// to wait longer is refused at once with 503, so those admitted keep their latency.
    /// Shorter bursts still queue up to `max_queue_size`.
    pub max_expected_wait_us: u64,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        QueuePolicy {
            timeout_us: 0,
            timeout_action: TimeoutAction::Reject,
            allow_timeout_override: false,
            max_queue_size: 0,
            max_expected_wait_us: 0,
        }
    }
}

impl QueuePolicy {
    fn to_triton_json(&self) -> Value {
        json!({
            "timeout_action": match self.timeout_action { TimeoutAction::Reject => "REJECT", TimeoutAction::Delay => "DELAY" },
            "default_timeout_microseconds": self.timeout_us,
            "allow_timeout_override": self.allow_timeout_override,
            "max_queue_size": self.max_queue_size,
            // wisp's own key (Triton's clients ignore fields they do not know).
            "max_expected_wait_microseconds": self.max_expected_wait_us,
        })
    }
}

/// `[dynamic_batching]`: requests from many clients are batched together.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DynamicBatching {
    /// Batch sizes (in inferences) dispatched as soon as they can be formed.
    pub preferred_batch_size: Vec<u32>,
    /// Longest the oldest request waits for a batch to fill.
    pub max_queue_delay_us: u64,
    /// Responses leave in the order the requests arrived, even when batches
    /// on different instances finish out of order.
    pub preserve_ordering: bool,
    /// Number of priority levels (1 is the highest); 0 is one level.
    pub priority_levels: u32,
    /// Level of requests without a `priority` parameter.
    pub default_priority_level: u32,
    pub default_queue_policy: QueuePolicy,
    /// Policies of single levels, keyed by level ("1", "2", ...).
    pub priority_queue_policy: BTreeMap<String, QueuePolicy>,
    /// A batch's real tokens stay within this (0: no budget): the sum of each request's
    /// `attention_mask` ones (else its `input_ids` elements). A request larger than the
    /// budget runs alone. For encoders, where a batch's cost follows its tokens.
    pub max_batch_tokens: u64,
    /// When a batch leaves: "delay" (Triton's: wait up to `max_queue_delay_us` for a
    /// fuller batch) or "eager" (a free instance takes what is queued at once; batches
    /// form by themselves while the instances are busy).
    pub dispatch: Dispatch,
    /// How long the expected wait must stay above a policy's `max_expected_wait_us` before
    /// requests are shed, and below it before shedding stops; 0 means 1 s.
    pub overload_window_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    #[default]
    Delay,
    Eager,
}

/// `overload_window_us` when the config leaves it 0.
pub const DEFAULT_OVERLOAD_WINDOW_US: u64 = 1_000_000;

impl DynamicBatching {
    /// How long an overload must last before requests are shed (and after it, before they stop being shed).
    pub fn overload_window(&self) -> std::time::Duration {
        std::time::Duration::from_micros(match self.overload_window_us {
            0 => DEFAULT_OVERLOAD_WINDOW_US,
            us => us,
        })
    }

    /// The policy of a priority level (1-based; without levels, every request is at
    /// level 1, which validation keeps free of a policy of its own).
    pub fn policy(&self, level: u32) -> &QueuePolicy {
        self.priority_queue_policy
            .get(&level.to_string())
            .unwrap_or(&self.default_queue_policy)
    }

    fn validate(&self, max_batch_size: u32) -> Result<()> {
        for (i, &p) in self.preferred_batch_size.iter().enumerate() {
            if p == 0
                || (max_batch_size > 0 && p > max_batch_size)
                || (max_batch_size == 0 && p > 1)
            {
                return Err(Error::invalid(format!(
                    "key 'dynamic_batching.preferred_batch_size[{i}]' is {p}; it must be between 1 and max_batch_size ({max_batch_size})"
                )));
            }
        }
        if self.priority_levels == 0 && self.default_priority_level != 0 {
            return Err(Error::invalid(format!(
                "key 'dynamic_batching.default_priority_level' is {}, but priority_levels is 0 (no levels)",
                self.default_priority_level
            )));
        }
        if self.priority_levels > 0
            && !(1..=self.priority_levels).contains(&self.default_priority_level)
        {
            return Err(Error::invalid(format!(
                "key 'dynamic_batching.default_priority_level' is {}; with priority_levels = {} it must be between 1 and {}",
                self.default_priority_level, self.priority_levels, self.priority_levels
            )));
        }
        for key in self.priority_queue_policy.keys() {
            let level: u32 = key.parse().unwrap_or(0);
            if level == 0 || level > self.priority_levels {
                return Err(Error::invalid(format!(
                    "key 'dynamic_batching.priority_queue_policy.{key}' names no priority level (priority_levels = {})",
                    self.priority_levels
                )));
            }
        }
        Ok(())
    }

    fn to_triton_json(&self) -> Value {
        let per_level: Map<String, Value> = self
            .priority_queue_policy
            .iter()
            .map(|(k, v)| (k.clone(), v.to_triton_json()))
            .collect();
        json!({
            "preferred_batch_size": self.preferred_batch_size,
            "max_queue_delay_microseconds": self.max_queue_delay_us,
            "preserve_ordering": self.preserve_ordering,
            "priority_levels": self.priority_levels,
            "default_priority_level": self.default_priority_level,
            "default_queue_policy": self.default_queue_policy.to_triton_json(),
            "priority_queue_policy": per_level,
            // wisp's own keys (Triton's clients ignore fields they do not know).
            "max_batch_tokens": self.max_batch_tokens,
            "dispatch": match self.dispatch { Dispatch::Delay => "delay", Dispatch::Eager => "eager" },
            "overload_window_microseconds": self.overload_window().as_micros() as u64,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlKind {
    /// 1 on a sequence's first request, else 0.
    Start,
    /// 1 on a sequence's last request, else 0.
    End,
    /// 1 when the request carries input (always, here).
    Ready,
    /// The sequence's correlation id.
    Corrid,
}

/// A tensor the sequence batcher adds to each request for the model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlInput {
    pub name: String,
    pub kind: ControlKind,
    #[serde(deserialize_with = "datatype_from_str")]
    pub datatype: DataType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SequenceStrategy {
    /// Each sequence holds one of an instance's `max_batch_size` slots from start to
    /// end; a sequence that finds every slot taken waits for one to free.
    #[default]
    Direct,
    /// Sequences stay on one instance, which batches the requests of the sequences
    /// waiting longest, dynamic-batcher style (`max_queue_delay_us`, `preferred_batch_size`).
    Oldest,
}

/// `[sequence_batching]`: stateful streams, routed by correlation id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SequenceBatching {
    pub strategy: SequenceStrategy,
    /// A sequence without requests for this long is released.
    pub max_sequence_idle_us: u64,
    pub control_input: Vec<ControlInput>,
    /// `oldest`: longest the oldest request waits for a fuller batch.
    pub max_queue_delay_us: u64,
    /// `oldest`: batch sizes (in requests) dispatched as soon as they form.
    pub preferred_batch_size: Vec<u32>,
}

impl Default for SequenceBatching {
    fn default() -> Self {
        SequenceBatching {
            strategy: SequenceStrategy::Direct,
            max_sequence_idle_us: 1_000_000,
            control_input: Vec::new(),
            max_queue_delay_us: 0,
            preferred_batch_size: Vec::new(),
        }
    }
}

/// One `[[step]]` of an ensemble: a request to another model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub model: String,
    /// A specific version; the latest ready one when absent.
    #[serde(default)]
    pub version: Option<u64>,
    /// The step model's input name -> the ensemble tensor it reads.
    pub input_map: BTreeMap<String, String>,
    /// The step model's output name -> the ensemble tensor it writes.
    pub output_map: BTreeMap<String, String>,
    /// Run only when this BOOL tensor (an ensemble input or an earlier step's output) is
    /// true for the request: any element of it (a batch takes this side when one of its
    /// items needs it).
    #[serde(default)]
    pub run_if: Option<String>,
    /// Run only when this BOOL tensor is false for the request: every element of it.
    #[serde(default)]
    pub run_unless: Option<String>,
}

impl Step {
    /// The tensor this step's running depends on, and the value it must have.
    pub fn condition(&self) -> Option<(&str, bool)> {
        match (&self.run_if, &self.run_unless) {
            (Some(t), _) => Some((t, true)),
            (None, Some(t)) => Some((t, false)),
            (None, None) => None,
        }
    }
}

/// A `[parameters]` value: what TOML can hold that a plugin can use.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ParameterValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl ParameterValue {
    pub fn to_json(&self) -> Value {
        match self {
            ParameterValue::Bool(b) => json!(b),
            ParameterValue::Int(i) => json!(i),
            ParameterValue::Float(f) => json!(f),
            ParameterValue::Text(s) => json!(s),
        }
    }

    fn to_string_value(&self) -> String {
        match self {
            ParameterValue::Bool(b) => b.to_string(),
            ParameterValue::Int(i) => i.to_string(),
            ParameterValue::Float(f) => f.to_string(),
            ParameterValue::Text(s) => s.clone(),
        }
    }
}

/// Largest config.toml read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The bounds a config.toml is checked against (see `ModelConfig::check_bounds`).
pub mod limits {
    pub const MAX_BATCH_SIZE: u64 = 1 << 16;
    pub const MAX_TENSORS: u64 = 256;
    pub const MAX_DIMS: u64 = 16;
    /// One dimension of a declared shape.
    pub const MAX_DIM: u64 = 1 << 31;
    pub const MAX_LABELS: u64 = 1 << 16;
    /// Instances of one model, all groups together (each is a thread).
    pub const MAX_INSTANCES: u64 = 64;
    pub const MAX_GPUS: u64 = 64;
    pub const MAX_PREFERRED_SIZES: u64 = 64;
    pub const MAX_QUEUE_DELAY_US: u64 = 60_000_000;
    pub const MAX_PRIORITY_LEVELS: u64 = 64;
    pub const MAX_BATCH_TOKENS: u64 = 1 << 24;
    pub const MAX_QUEUE_TIMEOUT_US: u64 = 3_600_000_000;
    pub const MAX_QUEUE_SIZE: u64 = 1 << 20;
    pub const MAX_SEQUENCE_IDLE_US: u64 = 24 * 3_600_000_000;
    pub const MAX_STEPS: u64 = 256;
    pub const MAX_PARAMETERS: u64 = 1024;
    pub const MAX_VERSIONS: u64 = 1024;
    pub const MAX_MEMORY_MIB: u64 = 64 << 10;
    pub const MAX_EXECUTION_TIMEOUT_MS: u64 = 3_600_000;
    /// Loading waits for `init`; startup readiness waits for every model.
    pub const MAX_INIT_TIMEOUT_MS: u64 = 600_000;
    pub const MAX_OUTPUT_MIB: u64 = 4 << 10;
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Filled from the folder name; a `name` key, if given, must match it.
    #[serde(default)]
    pub name: String,
    pub backend: BackendKind,
    #[serde(default)]
    pub max_batch_size: u32,
    #[serde(default)]
    pub version_policy: VersionPolicy,
    #[serde(default, rename = "input")]
    pub inputs: Vec<TensorConfig>,
    #[serde(default, rename = "output")]
    pub outputs: Vec<TensorConfig>,
    #[serde(default)]
    pub instance_group: Vec<InstanceGroup>,
    #[serde(default)]
    pub sandbox: SandboxConfig,
    #[serde(default)]
    pub dynamic_batching: Option<DynamicBatching>,
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub sequence_batching: Option<SequenceBatching>,
    #[serde(default)]
    pub parameters: BTreeMap<String, ParameterValue>,
}

impl ModelConfig {
    /// Reads and validates `dir/config.toml`; errors name the file and the key.
    pub fn load(dir: &Path, name: &str) -> Result<ModelConfig> {
        Self::load_with_override(dir, name, None)
    }

    /// `load`, with Triton's configuration override of a load request (its JSON)
    /// applied over config.toml (see `config_override`).
    pub fn load_with_override(dir: &Path, name: &str, config: Option<&str>) -> Result<ModelConfig> {
        use std::io::Read;
        let path = dir.join("config.toml");
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| Error::invalid(format!("cannot read {}: {e}", path.display())))?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(Error::invalid(format!(
                "{} is larger than {} KiB",
                path.display(),
                MAX_CONFIG_BYTES >> 10
            )));
        }
        match config {
            None => Self::parse(&text, name).map_err(|e| e.context(path.display())),
            Some(config) => {
                let merged = crate::config_override::apply(&text, config)
                    .map_err(|e| e.context(path.display()))?;
                Self::parse(&merged, name)
                    .map_err(|e| e.context(format!("{} with the config override", path.display())))
            }
        }
    }

    pub fn parse(text: &str, name: &str) -> Result<ModelConfig> {
        let mut config: ModelConfig = toml::from_str(text)
            .map_err(|e| Error::invalid(e.to_string().trim_end().to_string()))?;
        if config.name.is_empty() {
            config.name = name.to_string();
        } else if config.name != name {
            return Err(Error::invalid(format!(
                "key 'name' is '{}' but the model folder is '{name}'",
                config.name
            )));
        }
        if config.instance_group.is_empty() {
            config.instance_group.push(InstanceGroup {
                count: 1,
                kind: InstanceKind::Cpu,
                gpus: Vec::new(),
            });
        }
        config.validate()?;
        Ok(config)
    }

    /// Upper bounds of every count, size and duration a config may set: each
    /// sizes memory, threads or waits, so none is taken unbounded from a file.
    fn check_bounds(&self) -> Result<()> {
        let check = |key: String, value: u64, max: u64| -> Result<()> {
            if value > max {
                return Err(Error::invalid(format!(
                    "key '{key}' is {value}; it must be at most {max}"
                )));
            }
            Ok(())
        };
        check(
            "max_batch_size".into(),
            self.max_batch_size.into(),
            limits::MAX_BATCH_SIZE,
        )?;
        check(
            "input".into(),
            self.inputs.len() as u64,
            limits::MAX_TENSORS,
        )?;
        check(
            "output".into(),
            self.outputs.len() as u64,
            limits::MAX_TENSORS,
        )?;
        for (section, tensors) in [("input", &self.inputs), ("output", &self.outputs)] {
            for (i, t) in tensors.iter().enumerate() {
                check(
                    format!("{section}[{i}].dims"),
                    t.dims.len() as u64,
                    limits::MAX_DIMS,
                )?;
                for (j, &d) in t.dims.iter().enumerate() {
                    check(
                        format!("{section}[{i}].dims[{j}]"),
                        d.max(0) as u64,
                        limits::MAX_DIM,
                    )?;
                }
                check(
                    format!("{section}[{i}].labels"),
                    t.labels.len() as u64,
                    limits::MAX_LABELS,
                )?;
            }
        }
        check(
            "instance_group".into(),
            self.instance_group.len() as u64,
            limits::MAX_INSTANCES,
        )?;
        for (i, group) in self.instance_group.iter().enumerate() {
            check(
                format!("instance_group[{i}].count"),
                group.count.into(),
                limits::MAX_INSTANCES,
            )?;
            check(
                format!("instance_group[{i}].gpus"),
                group.gpus.len() as u64,
                limits::MAX_GPUS,
            )?;
            for (j, &g) in group.gpus.iter().enumerate() {
                check(
                    format!("instance_group[{i}].gpus[{j}]"),
                    g.into(),
                    limits::MAX_GPUS - 1,
                )?;
            }
        }
        check(
            "instance_group (all instances)".into(),
            self.instance_count() as u64,
            limits::MAX_INSTANCES,
        )?;
        if let Some(b) = &self.dynamic_batching {
            check(
                "dynamic_batching.preferred_batch_size".into(),
                b.preferred_batch_size.len() as u64,
                limits::MAX_PREFERRED_SIZES,
            )?;
            check(
                "dynamic_batching.max_queue_delay_us".into(),
                b.max_queue_delay_us,
                limits::MAX_QUEUE_DELAY_US,
            )?;
            check(
                "dynamic_batching.priority_levels".into(),
                b.priority_levels.into(),
                limits::MAX_PRIORITY_LEVELS,
            )?;
            check(
                "dynamic_batching.max_batch_tokens".into(),
                b.max_batch_tokens,
                limits::MAX_BATCH_TOKENS,
            )?;
            check(
                "dynamic_batching.overload_window_us".into(),
                b.overload_window_us,
                limits::MAX_QUEUE_DELAY_US,
            )?;
            let policies =
                std::iter::once(("default_queue_policy".to_string(), &b.default_queue_policy))
                    .chain(
                        b.priority_queue_policy
                            .iter()
                            .map(|(k, p)| (format!("priority_queue_policy.{k}"), p)),
                    );
            for (name, policy) in policies {
                check(
                    format!("dynamic_batching.{name}.timeout_us"),
                    policy.timeout_us,
                    limits::MAX_QUEUE_TIMEOUT_US,
                )?;
                check(
                    format!("dynamic_batching.{name}.max_queue_size"),
                    policy.max_queue_size.into(),
                    limits::MAX_QUEUE_SIZE,
                )?;
                check(
                    format!("dynamic_batching.{name}.max_expected_wait_us"),
                    policy.max_expected_wait_us,
                    limits::MAX_QUEUE_TIMEOUT_US,
                )?;
            }
        }
        if let Some(s) = &self.sequence_batching {
            check(
                "sequence_batching.max_sequence_idle_us".into(),
                s.max_sequence_idle_us,
                limits::MAX_SEQUENCE_IDLE_US,
            )?;
            check(
                "sequence_batching.max_queue_delay_us".into(),
                s.max_queue_delay_us,
                limits::MAX_QUEUE_DELAY_US,
            )?;
            check(
                "sequence_batching.preferred_batch_size".into(),
                s.preferred_batch_size.len() as u64,
                limits::MAX_PREFERRED_SIZES,
            )?;
            check(
                "sequence_batching.control_input".into(),
                s.control_input.len() as u64,
                limits::MAX_TENSORS,
            )?;
        }
        check("step".into(), self.steps.len() as u64, limits::MAX_STEPS)?;
        check(
            "parameters".into(),
            self.parameters.len() as u64,
            limits::MAX_PARAMETERS,
        )?;
        if let VersionPolicy::Specific(versions) = &self.version_policy {
            check(
                "version_policy.specific".into(),
                versions.len() as u64,
                limits::MAX_VERSIONS,
            )?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        self.check_bounds()?;
        for (section, tensors) in [("input", &self.inputs), ("output", &self.outputs)] {
            let mut seen = std::collections::HashSet::new();
            for (i, t) in tensors.iter().enumerate() {
                if t.name.is_empty() {
                    return Err(Error::invalid(format!(
                        "key '{section}[{i}].name' is empty"
                    )));
                }
                if !seen.insert(&t.name) {
                    return Err(Error::invalid(format!(
                        "key '{section}[{i}].name': '{}' is declared twice",
                        t.name
                    )));
                }
                if let Some(d) = t.dims.iter().find(|&&d| d < -1) {
                    return Err(Error::invalid(format!(
                        "key '{section}[{i}].dims' of '{}' has {d}; dimensions are >= 0 or -1 (variable)",
                        t.name
                    )));
                }
            }
        }
        if self.backend == BackendKind::Wasm {
            if self.inputs.is_empty() {
                return Err(Error::invalid(
                    "key 'input': a wasm model declares at least one input",
                ));
            }
            if self.outputs.is_empty() {
                return Err(Error::invalid(
                    "key 'output': a wasm model declares at least one output",
                ));
            }
        }
        for (i, group) in self.instance_group.iter().enumerate() {
            if group.count == 0 {
                return Err(Error::invalid(format!(
                    "key 'instance_group[{i}].count' must be at least 1"
                )));
            }
            if group.kind == InstanceKind::Cpu && !group.gpus.is_empty() {
                return Err(Error::invalid(format!(
                    "key 'instance_group[{i}].gpus' is for kind = \"gpu\" groups"
                )));
            }
            if group.kind == InstanceKind::Gpu && self.backend == BackendKind::Wasm {
                return Err(Error::invalid(format!(
                    "key 'instance_group[{i}].kind': backend 'wasm' runs on cpu only"
                )));
            }
        }
        if let Some(batching) = &self.dynamic_batching {
            batching.validate(self.max_batch_size)?;
        }
        if let Some(sequence) = &self.sequence_batching {
            if self.dynamic_batching.is_some() {
                return Err(Error::invalid(
                    "keys 'sequence_batching' and 'dynamic_batching' exclude each other",
                ));
            }
            if sequence.strategy == SequenceStrategy::Direct
                && (sequence.max_queue_delay_us > 0 || !sequence.preferred_batch_size.is_empty())
            {
                return Err(Error::invalid(
                    "keys 'sequence_batching.max_queue_delay_us' and 'preferred_batch_size' apply to strategy = \"oldest\"",
                ));
            }
            for (i, control) in sequence.control_input.iter().enumerate() {
                if self.input(&control.name).is_some() {
                    return Err(Error::invalid(format!(
                        "key 'sequence_batching.control_input[{i}]': '{}' is also an [[input]]; the server supplies control inputs",
                        control.name
                    )));
                }
                let allowed = match control.kind {
                    ControlKind::Corrid => matches!(
                        control.datatype,
                        DataType::Uint64 | DataType::Int64 | DataType::Bytes
                    ),
                    _ => matches!(
                        control.datatype,
                        DataType::Int32 | DataType::Bool | DataType::Fp32 | DataType::Uint8
                    ),
                };
                if !allowed {
                    return Err(Error::invalid(format!(
                        "key 'sequence_batching.control_input[{i}].datatype': {} cannot carry a {:?} control",
                        control.datatype, control.kind
                    )));
                }
            }
        }
        match (self.backend, self.steps.is_empty()) {
            (BackendKind::Ensemble, true) => {
                return Err(Error::invalid("key 'step': an ensemble declares at least one [[step]]"))
            }
            (BackendKind::Ensemble, false) if self.dynamic_batching.is_some() => {
                return Err(Error::invalid(
                    "key 'dynamic_batching': an ensemble is scheduled through its steps' models; batch those instead",
                ))
            }
            (BackendKind::Ensemble, false) => {
                if let Some(i) = self
                    .steps
                    .iter()
                    .position(|s| s.run_if.is_some() && s.run_unless.is_some())
                {
                    return Err(Error::invalid(format!(
                        "key 'step[{i}]': a step has run_if or run_unless, not both"
                    )));
                }
            }
            (BackendKind::Wasm | BackendKind::Encoder, false) => {
                return Err(Error::invalid(format!(
                    "key 'step' belongs to ensembles, not to backend '{}'",
                    self.backend.as_str()
                )))
            }
            _ => {}
        }
        if let VersionPolicy::Latest(0) = self.version_policy {
            return Err(Error::invalid(
                "key 'version_policy.latest' must be at least 1",
            ));
        }
        let sandbox = &self.sandbox;
        for (key, value, max) in [
            (
                "memory_limit_mib",
                sandbox.memory_limit_mib,
                limits::MAX_MEMORY_MIB,
            ),
            (
                "execution_timeout_ms",
                sandbox.execution_timeout_ms,
                limits::MAX_EXECUTION_TIMEOUT_MS,
            ),
            (
                "init_timeout_ms",
                sandbox.init_timeout_ms,
                limits::MAX_INIT_TIMEOUT_MS,
            ),
            (
                "max_output_mib",
                sandbox.max_output_mib,
                limits::MAX_OUTPUT_MIB,
            ),
        ] {
            if value == 0 || value > max {
                return Err(Error::invalid(format!(
                    "key 'sandbox.{key}' is {value}; it must be between 1 and {max}"
                )));
            }
        }
        Ok(())
    }

    pub fn instance_count(&self) -> usize {
        self.instance_group
            .iter()
            .map(InstanceGroup::instances)
            .sum()
    }

    pub fn input(&self, name: &str) -> Option<&TensorConfig> {
        self.inputs.iter().find(|t| t.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&TensorConfig> {
        self.outputs.iter().find(|t| t.name == name)
    }

    /// The config as Triton's model-config JSON (the fields Triton clients and perf tools read).
    pub fn to_triton_json(&self) -> Value {
        let tensor = |t: &TensorConfig, is_input: bool| {
            let mut m = Map::new();
            m.insert("name".into(), json!(t.name));
            m.insert("data_type".into(), json!(t.datatype.triton_config_name()));
            m.insert("dims".into(), json!(t.dims));
            if is_input {
                m.insert("format".into(), json!("FORMAT_NONE"));
                m.insert("is_shape_tensor".into(), json!(false));
                m.insert("allow_ragged_batch".into(), json!(false));
                m.insert("optional".into(), json!(t.optional));
            } else {
                m.insert("label_filename".into(), json!(""));
                m.insert("is_shape_tensor".into(), json!(false));
            }
            Value::Object(m)
        };
        let version_policy = match &self.version_policy {
            VersionPolicy::All => json!({"all": {}}),
            VersionPolicy::Latest(n) => json!({"latest": {"num_versions": n}}),
            VersionPolicy::Specific(v) => json!({"specific": {"versions": v}}),
        };
        let instance_group: Vec<Value> = self
            .instance_group
            .iter()
            .enumerate()
            .map(|(i, g)| {
                json!({
                    "name": format!("{}_{i}", self.name),
                    "kind": match g.kind { InstanceKind::Cpu => "KIND_CPU", InstanceKind::Gpu => "KIND_GPU" },
                    "count": g.count,
                    "gpus": if g.kind == InstanceKind::Gpu { g.gpu_ordinals() } else { Vec::new() },
                    "secondary_devices": [],
                    "profile": [],
                    "passive": false,
                    "host_policy": "",
                })
            })
            .collect();
        let parameters: Map<String, Value> = self
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), json!({"string_value": v.to_string_value()})))
            .collect();
        let mut config = json!({
            "name": self.name,
            "platform": "",
            "backend": self.backend.as_str(),
            "runtime": "",
            "version_policy": version_policy,
            "max_batch_size": self.max_batch_size,
            "input": self.inputs.iter().map(|t| tensor(t, true)).collect::<Vec<_>>(),
            "output": self.outputs.iter().map(|t| tensor(t, false)).collect::<Vec<_>>(),
            "batch_input": [],
            "batch_output": [],
            "optimization": {"priority": "PRIORITY_DEFAULT", "input_pinned_memory": {"enable": true}, "output_pinned_memory": {"enable": true}},
            "instance_group": instance_group,
            "default_model_filename": self.sandbox.component,
            "cc_model_filenames": {},
            "metric_tags": {},
            "parameters": parameters,
            "model_warmup": [],
        });
        if let Some(batching) = &self.dynamic_batching {
            config["dynamic_batching"] = batching.to_triton_json();
        }
        if let Some(sequence) = &self.sequence_batching {
            let controls: Vec<Value> = sequence
                .control_input
                .iter()
                .map(|c| {
                    let kind = match c.kind {
                        ControlKind::Start => "CONTROL_SEQUENCE_START",
                        ControlKind::End => "CONTROL_SEQUENCE_END",
                        ControlKind::Ready => "CONTROL_SEQUENCE_READY",
                        ControlKind::Corrid => "CONTROL_SEQUENCE_CORRID",
                    };
                    json!({"name": c.name, "control": [{"kind": kind, "data_type": c.datatype.triton_config_name()}]})
                })
                .collect();
            config["sequence_batching"] = json!({
                "max_sequence_idle_microseconds": sequence.max_sequence_idle_us,
                "control_input": controls,
                "strategy": match sequence.strategy {
                    SequenceStrategy::Direct => json!({"direct": {}}),
                    SequenceStrategy::Oldest => json!({"oldest": {
                        "max_queue_delay_microseconds": sequence.max_queue_delay_us,
                        "preferred_batch_size": sequence.preferred_batch_size,
                    }}),
                },
            });
        }
        if self.backend == BackendKind::Ensemble {
            config["platform"] = json!("ensemble");
            let steps: Vec<Value> = self
                .steps
                .iter()
                .map(|s| {
                    let mut step = json!({
                        "model_name": s.model,
                        "model_version": s.version.map(|v| v as i64).unwrap_or(-1),
                        "input_map": s.input_map,
                        "output_map": s.output_map,
                    });
                    // wisp's own keys (Triton has no conditional steps).
                    if let Some(t) = &s.run_if {
                        step["run_if"] = json!(t);
                    }
                    if let Some(t) = &s.run_unless {
                        step["run_unless"] = json!(t);
                    }
                    step
                })
                .collect();
            config["ensemble_scheduling"] = json!({ "step": steps });
        }
        config
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SIMPLE: &str = r#"
        backend = "wasm"
        max_batch_size = 8
        [[input]]
        name = "INPUT0"
        datatype = "INT32"
        dims = [16]
        [[output]]
        name = "OUTPUT0"
        datatype = "INT32"
        dims = [16]
    "#;

    #[test]
    fn parses_and_fills_defaults() {
        let c = ModelConfig::parse(SIMPLE, "simple").unwrap();
        assert_eq!(c.name, "simple");
        assert_eq!(c.instance_count(), 1);
        assert_eq!(c.version_policy, VersionPolicy::Latest(1));
        assert_eq!(c.to_triton_json()["input"][0]["data_type"], "TYPE_INT32");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = ModelConfig::parse(&format!("{SIMPLE}\nmax_batch = 3\n"), "simple").unwrap_err();
        assert!(err.message.contains("max_batch"), "{err}");
        let text = SIMPLE.replace(
            "dims = [16]\n        [[output]]",
            "dims = [16]\n        shape = 1\n        [[output]]",
        );
        let err = ModelConfig::parse(&text, "simple").unwrap_err();
        assert!(err.message.contains("shape"), "{err}");
    }

    /// Each size a config sets is bounded, and the error names the key
    /// (the attack: priority_levels = 20000000 sized a queue per level).
    #[test]
    fn sizes_past_their_bounds_are_refused_by_key() {
        let cases = [
            (
                SIMPLE.replacen("max_batch_size = 8", "max_batch_size = 100000000", 1),
                "max_batch_size",
            ),
            (
                format!("{SIMPLE}\n[[instance_group]]\ncount = 100000\n"),
                "instance_group[0].count",
            ),
            (
                format!("{SIMPLE}\n[dynamic_batching]\nmax_batch_tokens = 100000000000\n"),
                "dynamic_batching.max_batch_tokens",
            ),
            (
                format!("{SIMPLE}\n[dynamic_batching]\npriority_levels = 20000000\n"),
                "dynamic_batching.priority_levels",
            ),
            (
                format!("{SIMPLE}\n[dynamic_batching]\nmax_queue_delay_us = 100000000000\n"),
                "dynamic_batching.max_queue_delay_us",
            ),
            (
                format!("{SIMPLE}\n[dynamic_batching]\noverload_window_us = 100000000000\n"),
                "dynamic_batching.overload_window_us",
            ),
            (
                format!("{SIMPLE}\n[dynamic_batching.default_queue_policy]\nmax_expected_wait_us = 99999999999999\n"),
                "dynamic_batching.default_queue_policy.max_expected_wait_us",
            ),
            (
                format!("{SIMPLE}\n[sandbox]\ninit_timeout_ms = 86400000\n"),
                "sandbox.init_timeout_ms",
            ),
            (
                SIMPLE.replacen(
                    "dims = [16]",
                    "dims = [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]",
                    1,
                ),
                "input[0].dims",
            ),
            (
                SIMPLE.replacen("dims = [16]", "dims = [99999999999]", 1),
                "input[0].dims[0]",
            ),
        ];
        for (text, key) in cases {
            let err = ModelConfig::parse(&text, "simple").unwrap_err();
            assert!(err.message.contains(&format!("'{key}'")), "{key}: {err}");
        }
    }

    /// The attack: default_priority_level = 5 with priority_levels = 0 made every request panic.
    #[test]
    fn a_default_priority_level_without_levels_is_refused() {
        let text = format!("{SIMPLE}\n[dynamic_batching]\ndefault_priority_level = 5\n");
        let err = ModelConfig::parse(&text, "simple").unwrap_err();
        assert!(
            err.message.contains("default_priority_level")
                && err.message.contains("priority_levels is 0"),
            "{err}"
        );
    }

    #[test]
    fn bad_datatype_is_named() {
        let err = ModelConfig::parse(&SIMPLE.replacen("INT32", "INT33", 1), "simple").unwrap_err();
        assert!(
            err.message.contains("INT33") && err.message.contains("datatype"),
            "{err}"
        );
    }

    #[test]
    fn version_policies_select() {
        let avail = [3, 1, 2];
        assert_eq!(VersionPolicy::Latest(2).select(&avail), vec![2, 3]);
        assert_eq!(VersionPolicy::All.select(&avail), vec![1, 2, 3]);
        assert_eq!(VersionPolicy::Specific(vec![1, 5]).select(&avail), vec![1]);
        let c =
            ModelConfig::parse(&format!("version_policy = \"all\"\n{SIMPLE}"), "simple").unwrap();
        assert_eq!(c.version_policy, VersionPolicy::All);
        let c = ModelConfig::parse(
            &format!("version_policy = {{ specific = [1, 3] }}\n{SIMPLE}"),
            "simple",
        )
        .unwrap();
        assert_eq!(c.version_policy, VersionPolicy::Specific(vec![1, 3]));
    }
}

#[cfg(test)]
mod batching_tests {
    use super::*;

    #[test]
    fn dynamic_batching_parses_and_validates() {
        let base = "backend = \"wasm\"\nmax_batch_size = 8\n[[input]]\nname = \"X\"\ndatatype = \"FP32\"\ndims = [1]\n[[output]]\nname = \"Y\"\ndatatype = \"FP32\"\ndims = [1]\n";
        let c = ModelConfig::parse(
            &format!("{base}[dynamic_batching]\npreferred_batch_size = [4, 8]\nmax_queue_delay_us = 100\npriority_levels = 2\ndefault_priority_level = 2\n[dynamic_batching.priority_queue_policy.1]\nmax_queue_size = 3\ntimeout_action = \"delay\"\nmax_expected_wait_us = 50000\n"),
            "m",
        )
        .unwrap();
        let b = c.dynamic_batching.as_ref().unwrap();
        assert_eq!(b.policy(1).max_queue_size, 3);
        assert_eq!(b.policy(1).timeout_action, TimeoutAction::Delay);
        assert_eq!(b.policy(1).max_expected_wait_us, 50_000);
        assert_eq!(b.policy(2).max_queue_size, 0);
        assert_eq!(b.policy(2).max_expected_wait_us, 0);
        assert_eq!(b.overload_window(), std::time::Duration::from_secs(1));
        let json = c.to_triton_json();
        assert_eq!(
            json["dynamic_batching"]["max_queue_delay_microseconds"],
            100
        );
        assert_eq!(
            json["dynamic_batching"]["priority_queue_policy"]["1"]
                ["max_expected_wait_microseconds"],
            50_000
        );
        let err = ModelConfig::parse(
            &format!("{base}[dynamic_batching]\npreferred_batch_size = [16]\n"),
            "m",
        )
        .unwrap_err();
        assert!(err.message.contains("preferred_batch_size[0]"), "{err}");
        let err = ModelConfig::parse(
            &format!("{base}[dynamic_batching]\npriority_levels = 2\ndefault_priority_level = 3\n"),
            "m",
        )
        .unwrap_err();
        assert!(err.message.contains("default_priority_level"), "{err}");
        let err = ModelConfig::parse(&format!("{base}[dynamic_batching]\nmax_delay = 3\n"), "m")
            .unwrap_err();
        assert!(err.message.contains("max_delay"), "{err}");
    }
}
