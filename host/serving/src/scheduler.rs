//! Between a validated request and the backend: direct (one request, one
//! execution) or the dynamic batcher (Triton's `dynamic_batching`).
//!
//! The dynamic batcher keeps one queue per priority level behind a mutex that
//! is never held across an await, and one task that forms batches: it waits
//! for a free instance, then for a batch worth sending (a preferred size, the
//! largest batch, or the oldest request's `max_queue_delay_us`), and hands the
//! batch to the backend in a task of its own, so up to `count` batches run at
//! once. Requests whose client went away are dropped before execution.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;
// tokio's clock, so tests can pause and advance time (it is the OS clock otherwise).
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::time::Instant;
use wisp_core::backend::{Backend, BackendRequest, BackendResponse, ExecutionTimes};
use wisp_core::config::{
    ControlKind, Dispatch, DynamicBatching, ParameterValue, SequenceBatching, SequenceStrategy,
    TimeoutAction,
};
use wisp_core::error::{Error, Result};
use wisp_core::tensor::{DataType, Tensor};

/// Requests one priority level may hold when its policy sets no `max_queue_size`.
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 4096;

/// Sequences one model may hold open at once; a new one past it is refused (503).
pub const MAX_LIVE_SEQUENCES: usize = 16_384;

/// What became of one request.
pub struct Outcome {
    pub result: Result<BackendResponse>,
    pub times: ExecutionTimes,
    pub queue_ns: u64,
    /// Inferences in the batch the request ran in.
    pub batch_size: u64,
    /// Set on one request per batch that ran: it records the batch's statistics.
    pub records_batch: bool,
    /// Whether the request ran in a batch (false when it timed out in the queue).
    pub executed: bool,
}

pub enum Scheduler {
    Direct(DirectScheduler),
    Dynamic(DynamicBatcher),
    Sequence(SequenceBatcher, bool),
}

/// One request, one execution; at most `limit` requests admitted at once
/// (running or waiting for an instance), so a burst is refused with 503 at once
/// instead of queueing without bound.
pub struct DirectScheduler {
    backend: Arc<dyn Backend>,
    waiting: AtomicUsize,
    limit: usize,
    label: String,
}

/// Releases a direct scheduler's admission when the request is done (or dropped).
struct Admission<'a>(&'a AtomicUsize);

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AtomicOrdering::AcqRel);
    }
}

impl DirectScheduler {
    fn admit(&self) -> Result<Admission<'_>> {
        let before = self.waiting.fetch_add(1, AtomicOrdering::AcqRel);
        let admission = Admission(&self.waiting);
        if before >= self.limit {
            return Err(Error::unavailable(format!(
                "model '{}' has {} requests in flight, its limit; try again later",
                self.label, self.limit
            )));
        }
        Ok(admission)
    }
}

/// Scheduling fields a request carries as parameters (Triton's `priority`, `timeout`).
fn take_u64(params: &mut Vec<(String, ParameterValue)>, key: &str) -> Result<Option<u64>> {
    let Some(at) = params.iter().position(|(k, _)| k == key) else {
        return Ok(None);
    };
    match params.remove(at).1 {
        ParameterValue::Int(v) if v >= 0 => Ok(Some(v as u64)),
        other => Err(Error::invalid(format!(
            "parameter '{key}' must be a non-negative integer, got {other:?}"
        ))),
    }
}

impl Scheduler {
    pub fn new(
        backend: Arc<dyn Backend>,
        config: &wisp_core::config::ModelConfig,
        label: &str,
    ) -> Self {
        let (max_batch_size, instances) = (config.max_batch_size, config.instance_count());
        match (&config.dynamic_batching, &config.sequence_batching) {
            (_, Some(sequence)) => Scheduler::Sequence(
                SequenceBatcher::start(backend, sequence.clone(), max_batch_size, label),
                max_batch_size > 0,
            ),
            (Some(batching), None) => Scheduler::Dynamic(DynamicBatcher::start(
                backend,
                batching.clone(),
                max_batch_size,
                instances,
                label,
            )),
            (None, None) => Scheduler::Direct(DirectScheduler {
                backend,
                waiting: AtomicUsize::new(0),
                limit: DEFAULT_MAX_QUEUE_SIZE + instances,
                label: label.to_string(),
            }),
        }
    }

    /// Whether a request at the default priority would be refused now (a full or
    /// an overloaded queue). An ensemble asks before its first step, so work bound for a full model
    /// is refused at the door, not after the steps before it ran (a hint: the
    /// queue may change before the request reaches it).
    pub fn is_full(&self) -> bool {
        match self {
            Scheduler::Direct(direct) => {
                direct.waiting.load(AtomicOrdering::Acquire) >= direct.limit
            }
            Scheduler::Dynamic(batcher) => batcher.default_level_is_full(),
            Scheduler::Sequence(..) => false,
        }
    }

    /// Runs one request (of `batch_size` inferences) and waits for its outcome.
    pub async fn schedule(&self, mut request: BackendRequest, batch_size: u64) -> Result<Outcome> {
        if let Scheduler::Sequence(batcher, batched) = self {
            return batcher.submit(request, batch_size, *batched).await;
        }
        let priority = take_u64(&mut request.parameters, "priority")?;
        let timeout_us = take_u64(&mut request.parameters, "timeout")?;
        match self {
            Scheduler::Direct(direct) => {
                let arrived = Instant::now();
                let _admitted = direct.admit()?;
                let execution = direct.backend.execute(vec![request]).await;
                let t = execution.times;
                let compute = t.compute_input_ns + t.compute_infer_ns + t.compute_output_ns;
                let result = execution
                    .results
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| Err(Error::internal("backend returned no result")));
                Ok(Outcome {
                    records_batch: result.is_ok(),
                    result,
                    times: t,
                    queue_ns: (arrived.elapsed().as_nanos() as u64).saturating_sub(compute),
                    batch_size,
                    executed: true,
                })
            }
            Scheduler::Dynamic(batcher) => {
                batcher
                    .submit(request, batch_size, priority, timeout_us)
                    .await
            }
            Scheduler::Sequence(..) => unreachable!("sequences return above"),
        }
    }
}

struct Pending {
    request: BackendRequest,
    batch_size: u64,
    /// Real tokens, counted when the model has a token budget ([`real_tokens`]).
    tokens: u64,
    arrived: Instant,
    /// When the queue policy's timeout expires.
    deadline: Option<Instant>,
    action: TimeoutAction,
    reply: oneshot::Sender<Outcome>,
}

struct Queues {
    /// Index 0 is priority level 1, the highest.
    levels: Vec<VecDeque<Pending>>,
    /// Requests past their timeout under `timeout_action = "delay"`: served last.
    delayed: VecDeque<Pending>,
    /// Per level, whether its queue is overloaded (its policy's `max_expected_wait_us`).
    overload: Vec<Overload>,
}

/// Tells a sustained overload from a burst, for one priority level: the queue is
/// overloaded once every arrival for a whole window expected to wait longer than
/// the policy allows, and stays so until every arrival for a window did not. While
/// it is, arrivals expected to wait too long are refused at once, so the wait of
/// those admitted stays bounded; a burst shorter than the window still queues.
/// The hysteresis matters with batching: each batch empties a short queue, which
/// says nothing about the rate of arrivals.
#[derive(Debug, Default)]
struct Overload {
    over_since: Option<Instant>,
    within_since: Option<Instant>,
    overloaded: bool,
}

impl Overload {
    /// Records one arrival (`over`: it expects to wait longer than allowed);
    /// returns whether the queue is overloaded.
    fn observe(&mut self, now: Instant, over: bool, window: Duration) -> bool {
        let (since, other) = if over {
            (&mut self.over_since, &mut self.within_since)
        } else {
            (&mut self.within_since, &mut self.over_since)
        };
        *other = None;
        let since = *since.get_or_insert(now);
        if now.duration_since(since) >= window {
            self.overloaded = over;
        }
        self.overloaded
    }
}

struct Shared {
    queues: Mutex<Queues>,
    /// With `preserve_ordering`: completion of the latest request so far; each
    /// request answers only after the one before it has.
    order_tail: Mutex<Option<oneshot::Receiver<()>>>,
    wake: Notify,
    config: DynamicBatching,
    /// Largest batch in inferences; models without a batch dimension run one request at a time.
    max_batch: u64,
    instances: u64,
    /// Recent execution time per inference and per batch (moving averages over
    /// batches), in ns; 0 until a batch has run. The first prices the queue for
    /// `max_expected_wait_us`; the second stretches the overload window.
    ns_per_inference: AtomicU64,
    ns_per_batch: AtomicU64,
    label: String,
}

pub struct DynamicBatcher {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DynamicBatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Requests one priority level may hold under `policy`.
fn queue_cap(policy: &wisp_core::config::QueuePolicy) -> usize {
    match policy.max_queue_size {
        0 => DEFAULT_MAX_QUEUE_SIZE,
        n => n as usize,
    }
}

impl DynamicBatcher {
    fn start(
        backend: Arc<dyn Backend>,
        config: DynamicBatching,
        max_batch_size: u32,
        instances: usize,
        label: &str,
    ) -> Self {
        let levels = config.priority_levels.max(1) as usize;
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues {
                levels: (0..levels).map(|_| VecDeque::new()).collect(),
                delayed: VecDeque::new(),
                overload: (0..levels).map(|_| Overload::default()).collect(),
            }),
            wake: Notify::new(),
            order_tail: Mutex::new(None),
            max_batch: max_batch_size.max(1) as u64,
            instances: instances.max(1) as u64,
            ns_per_inference: AtomicU64::new(0),
            ns_per_batch: AtomicU64::new(0),
            config,
            label: label.to_string(),
        });
        let task = tokio::spawn(form_batches(shared.clone(), backend, instances.max(1)));
        DynamicBatcher { shared, task }
    }

    /// Whether a request of one inference at the default level would be refused now:
    /// the level's queue is full, or it is overloaded and the request would wait too
    /// long. It counts as an arrival: an ensemble asks before its first step, and the
    /// requests it turns away at the door must keep the overload standing, or the
    /// step would see only the admitted ones and stop shedding.
    fn default_level_is_full(&self) -> bool {
        let config = &self.shared.config;
        let level = match config.priority_levels {
            0 => 1,
            _ => config.default_priority_level.max(1),
        };
        let policy = config.policy(level);
        let mut queues = self.shared.queues.lock();
        let index = ((level - 1) as usize).min(queues.levels.len() - 1);
        self.admit(&mut queues, index, 1, policy, Instant::now())
            .is_err()
    }

    /// How long a request of `batch_size` inferences arriving at level `index` would
    /// wait, in µs: the inferences served before it at the recent pace; 0 before any
    /// batch has run and when nothing is queued ahead of it.
    fn expected_wait_us(&self, queues: &Queues, index: usize, batch_size: u64) -> u64 {
        let ns_per_inference = self.shared.ns_per_inference.load(AtomicOrdering::Relaxed);
        if ns_per_inference == 0 {
            return 0;
        }
        // Served before it: its own level and the higher ones (delayed requests go last).
        let ahead: u64 = queues.levels[..=index]
            .iter()
            .flatten()
            .map(|p| p.batch_size)
            .sum();
        if ahead == 0 {
            // An empty queue: it waits for no one, at most for a batch already running
            // (a model slower than the bound is not overloaded by one request).
            return 0;
        }
        (ahead + batch_size).saturating_mul(ns_per_inference) / self.shared.instances / 1000
    }

    async fn submit(
        &self,
        request: BackendRequest,
        batch_size: u64,
        priority: Option<u64>,
        timeout_us: Option<u64>,
    ) -> Result<Outcome> {
        let config = &self.shared.config;
        let level = match (config.priority_levels, priority) {
            (0, _) => 1,
            (_, None) | (_, Some(0)) => config.default_priority_level.max(1),
            (levels, Some(p)) if p <= levels as u64 => p as u32,
            (levels, Some(p)) => {
                return Err(Error::invalid(format!(
                    "parameter 'priority' is {p}; model '{}' has priority levels 1 to {levels}",
                    self.shared.label
                )))
            }
        };
        let policy = config.policy(level);
        // A client's `timeout` is bounded like a config's (no Instant overflow).
        let timeout = match timeout_us {
            Some(t) if policy.allow_timeout_override => {
                t.min(wisp_core::config::limits::MAX_QUEUE_TIMEOUT_US)
            }
            _ => policy.timeout_us,
        };
        let arrived = Instant::now();
        let (reply, outcome) = oneshot::channel();
        // Dropped when this request is answered (or abandoned), releasing the next.
        let (answered, answered_rx) = oneshot::channel::<()>();
        let predecessor = if config.preserve_ordering {
            self.shared.order_tail.lock().replace(answered_rx)
        } else {
            None
        };
        let tokens = if config.max_batch_tokens > 0 {
            real_tokens(&request)
        } else {
            0
        };
        let pending = Pending {
            request,
            batch_size,
            tokens,
            arrived,
            deadline: (timeout > 0).then(|| arrived + Duration::from_micros(timeout)),
            action: policy.timeout_action,
            reply,
        };
        {
            let mut queues = self.shared.queues.lock();
            let index = ((level - 1) as usize).min(queues.levels.len() - 1);
            self.admit(&mut queues, index, batch_size, policy, arrived)?;
            queues.levels[index].push_back(pending);
        }
        self.shared.wake.notify_one();
        let outcome = outcome
            .await
            .map_err(|_| Error::unavailable(format!("model '{}' is unloading", self.shared.label)));
        if let Some(predecessor) = predecessor {
            let _ = predecessor.await;
        }
        drop(answered);
        outcome
    }

    /// Whether a request of `batch_size` inferences may join level `index`: not when
    /// the level's queue is full (`max_queue_size`), nor when the level is overloaded
    /// and the request expects to wait longer than `max_expected_wait_us`. Every
    /// arrival is recorded for the overload (a full queue counts as over the bound).
    fn admit(
        &self,
        queues: &mut Queues,
        index: usize,
        batch_size: u64,
        policy: &wisp_core::config::QueuePolicy,
        now: Instant,
    ) -> Result<()> {
        let full = queues.levels[index].len() >= queue_cap(policy);
        let mut overloaded = None;
        if policy.max_expected_wait_us > 0 {
            let expected_us = self.expected_wait_us(queues, index, batch_size);
            let over = full || expected_us > policy.max_expected_wait_us;
            // At least two batches: while one runs, every arrival is over a bound
            // shorter than it, which says nothing of the rate (a slow model, a debug build).
            let two_batches = 2 * self.shared.ns_per_batch.load(AtomicOrdering::Relaxed);
            let window =
                (self.shared.config.overload_window()).max(Duration::from_nanos(two_batches));
            if queues.overload[index].observe(now, over, window) && over {
                overloaded = Some(expected_us);
            }
        }
        if full {
            return Err(Error::unavailable(format!(
                "the queue of model '{}' (priority level {}) is full: {} requests wait (max_queue_size)",
                self.shared.label,
                index + 1,
                queue_cap(policy)
            )));
        }
        if let Some(expected_us) = overloaded {
            return Err(Error::unavailable(format!(
                "model '{}' is overloaded: a request would wait about {} ms (priority level {}), over max_expected_wait_us = {}",
                self.shared.label,
                expected_us / 1000,
                index + 1,
                policy.max_expected_wait_us
            )));
        }
        Ok(())
    }
}

/// Folds one batch's execution time into the moving averages per inference and per batch.
fn record_pace(shared: &Shared, elapsed: Duration, batch_size: u64) {
    let ns = elapsed.as_nanos().min(u64::MAX as u128);
    average_in(
        &shared.ns_per_inference,
        (ns / u128::from(batch_size.max(1))) as u64,
    );
    average_in(&shared.ns_per_batch, ns as u64);
}

/// A moving average (weight 1/8 for each new sample).
fn average_in(average: &AtomicU64, sample: u64) {
    let old = average.load(AtomicOrdering::Relaxed);
    let new = match old {
        0 => sample.max(1),
        old => (old - old / 8 + sample / 8).max(1),
    };
    // Concurrent batches may overwrite each other's update: an average loses nothing by it.
    average.store(new, AtomicOrdering::Relaxed);
}

enum Decision {
    Dispatch(Vec<Pending>),
    /// Nothing to send yet: wake at this instant (or on a new request).
    Wait(Option<Instant>),
}

impl Shared {
    /// Answers requests past their queue timeout (reject) or moves them behind
    /// the others (delay), and drops those whose client left.
    fn sweep(&self, queues: &mut Queues, now: Instant) {
        let Queues {
            levels, delayed, ..
        } = queues;
        // Expired and abandoned requests leave the queues first.
        for level in levels.iter_mut() {
            let mut kept = VecDeque::with_capacity(level.len());
            for p in level.drain(..) {
                if p.reply.is_closed() {
                    continue;
                }
                match p.deadline {
                    Some(d) if d <= now => match p.action {
                        TimeoutAction::Reject => {
                            let waited = now.duration_since(p.arrived).as_micros();
                            let _ = p.reply.send(Outcome {
                                result: Err(Error::unavailable(format!(
                                    "request timed out in the queue of model '{}' after {waited} µs",
                                    self.label
                                ))),
                                times: ExecutionTimes::default(),
                                queue_ns: (waited * 1000) as u64,
                                batch_size: p.batch_size,
                                records_batch: false,
                                executed: false,
                            });
                        }
                        TimeoutAction::Delay => delayed.push_back(Pending {
                            deadline: None,
                            ..p
                        }),
                    },
                    _ => kept.push_back(p),
                }
            }
            *level = kept;
        }
        delayed.retain(|p| !p.reply.is_closed());
    }

    /// Sweeps the queues; returns when the next request times out.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut queues = self.queues.lock();
        self.sweep(&mut queues, now);
        queues
            .levels
            .iter()
            .flatten()
            .filter_map(|p| p.deadline)
            .min()
    }

    fn decide(&self, now: Instant) -> Decision {
        let mut queues = self.queues.lock();
        self.sweep(&mut queues, now);
        let Queues {
            levels, delayed, ..
        } = &mut *queues;
        let order = || levels.iter().flatten().chain(delayed.iter());
        let total: u64 = order().map(|p| p.batch_size).sum();
        let next_expiry = levels.iter().flatten().filter_map(|p| p.deadline).min();
        let Some(oldest) = order().map(|p| p.arrived).min() else {
            return Decision::Wait(None);
        };
        let flush_at = oldest + Duration::from_micros(self.config.max_queue_delay_us);
        let preferred = &self.config.preferred_batch_size;
        let largest_preferred = preferred.iter().max().map(|&p| p as u64);
        let budget = self.config.max_batch_tokens;
        let tokens_full = budget > 0 && order().map(|p| p.tokens).sum::<u64>() >= budget;
        let eager = self.config.dispatch == Dispatch::Eager;
        let target = if eager
            || total >= self.max_batch
            || tokens_full
            || now >= flush_at
            || preferred.contains(&(total as u32))
        {
            self.max_batch
        } else if let Some(p) = largest_preferred.filter(|&p| total >= p) {
            p
        } else {
            let wake = next_expiry.map_or(flush_at, |e| e.min(flush_at));
            return Decision::Wait(Some(wake));
        };

        let mut batch = Vec::new();
        let (mut size, mut tokens) = (0, 0);
        'levels: for queue in levels.iter_mut().chain(std::iter::once(delayed)) {
            while let Some(front) = queue.front() {
                let over_budget = budget > 0 && tokens + front.tokens > budget;
                if !batch.is_empty() && (size + front.batch_size > target || over_budget) {
                    // In arrival order: a request that does not fit waits for the next
                    // batch rather than being overtaken.
                    break 'levels;
                }
                size += front.batch_size;
                tokens += front.tokens;
                batch.push(queue.pop_front().expect("front exists"));
            }
        }
        Decision::Dispatch(batch)
    }
}

/// A request's real tokens, for a token budget: the non-zero elements of its
/// `attention_mask` input, else the elements of its `input_ids`; 0 with neither.
pub fn real_tokens(request: &BackendRequest) -> u64 {
    let find = |name: &str| request.inputs.iter().find(|t| t.name == name);
    if let Some(mask) = find("attention_mask") {
        let nonzero = |size: usize| {
            mask.data
                .chunks_exact(size)
                .filter(|b| b.iter().any(|&x| x != 0))
                .count() as u64
        };
        match mask.datatype {
            DataType::Int64 | DataType::Uint64 | DataType::Fp64 => return nonzero(8),
            DataType::Int32 | DataType::Uint32 | DataType::Fp32 => return nonzero(4),
            DataType::Int16 | DataType::Uint16 | DataType::Fp16 | DataType::Bf16 => {
                return nonzero(2)
            }
            DataType::Int8 | DataType::Uint8 | DataType::Bool => return nonzero(1),
            _ => {}
        }
    }
    find("input_ids")
        .and_then(|ids| wisp_core::tensor::element_count(&ids.shape))
        .map_or(0, |n| n as u64)
}

/// Sends each request of an executed batch its outcome; the first records the batch.
fn answer(
    waiting: Vec<(Instant, oneshot::Sender<Outcome>)>,
    execution: wisp_core::backend::Execution,
    started: Instant,
    batch_size: u64,
) {
    let any_ok = execution.results.iter().any(|r| r.is_ok());
    for (i, ((arrived, reply), result)) in waiting.into_iter().zip(execution.results).enumerate() {
        let _ = reply.send(Outcome {
            result,
            times: execution.times,
            queue_ns: started.duration_since(arrived).as_nanos() as u64,
            batch_size,
            records_batch: i == 0 && any_ok,
            executed: true,
        });
    }
}

async fn form_batches(shared: Arc<Shared>, backend: Arc<dyn Backend>, instances: usize) {
    let free = Arc::new(Semaphore::new(instances));
    loop {
        // While every instance is busy, requests still time out on schedule.
        let permit = loop {
            let next_expiry = shared.expire(Instant::now());
            let expiry = async {
                match next_expiry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                permit = free.clone().acquire_owned() => break permit,
                _ = expiry => {}
                _ = shared.wake.notified() => {}
            }
        };
        let Ok(permit) = permit else {
            return;
        };
        let batch = loop {
            match shared.decide(Instant::now()) {
                Decision::Dispatch(batch) => break batch,
                Decision::Wait(None) => shared.wake.notified().await,
                Decision::Wait(Some(at)) => {
                    tokio::select! {
                        _ = shared.wake.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        };
        let backend = backend.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let batch_size: u64 = batch.iter().map(|p| p.batch_size).sum();
            let (requests, waiting): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|p| (p.request, (p.arrived, p.reply)))
                .unzip();
            let execution = backend.execute(requests).await;
            record_pace(&shared, started.elapsed(), batch_size);
            drop(permit);
            answer(waiting, execution, started, batch_size);
        });
    }
}

/// A sequence's correlation id: an integer or a string (Triton's `sequence_id`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CorrelationId {
    Number(u64),
    Text(String),
}

impl std::fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CorrelationId::Number(n) => write!(f, "{n}"),
            CorrelationId::Text(s) => write!(f, "'{s}'"),
        }
    }
}

struct SequencePending {
    request: BackendRequest,
    batch_size: u64,
    arrived: Instant,
    reply: oneshot::Sender<Outcome>,
}

struct Sequence {
    /// `None` until the batching task places it (a `direct` sequence waits for a free slot).
    instance: Option<usize>,
    started: Instant,
    last_active: Instant,
    queue: VecDeque<SequencePending>,
    /// The request with `sequence_end` is queued: no more may follow.
    ended: bool,
    /// Whether any of its requests ran. A sequence whose client left before any
    /// did is released at once instead of holding a slot until it idles out.
    executed: bool,
}

struct SequenceState {
    sequences: HashMap<CorrelationId, Sequence>,
    busy: Vec<bool>,
}

struct SequenceShared {
    state: Mutex<SequenceState>,
    wake: Notify,
    config: SequenceBatching,
    max_batch_requests: usize,
    label: String,
    backend: Arc<dyn Backend>,
}

/// Triton's sequence batcher, `direct` strategy: a sequence keeps the instance
/// it started on (its state lives in that instance's memory); each execution
/// on an instance takes the next request of up to `max_batch_size` of its
/// sequences, so a sequence's requests run one at a time, in order.
pub struct SequenceBatcher {
    shared: Arc<SequenceShared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SequenceBatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn control_tensor(name: &str, datatype: DataType, value: u64, text: Option<&str>) -> Tensor {
    let data: Vec<u8> = match datatype {
        DataType::Bool | DataType::Uint8 => vec![value as u8],
        DataType::Int32 => (value as i32).to_le_bytes().to_vec(),
        DataType::Fp32 => (value as f32).to_le_bytes().to_vec(),
        DataType::Int64 | DataType::Uint64 => value.to_le_bytes().to_vec(),
        DataType::Bytes => {
            let text = text
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            [&(text.len() as u32).to_le_bytes()[..], text.as_bytes()].concat()
        }
        _ => value.to_le_bytes().to_vec(),
    };
    Tensor {
        name: name.to_string(),
        datatype,
        shape: vec![1],
        data: data.into(),
    }
}

impl SequenceBatcher {
    pub fn start(
        backend: Arc<dyn Backend>,
        config: SequenceBatching,
        max_batch_size: u32,
        label: &str,
    ) -> Self {
        let instances = backend.instances().max(1);
        let shared = Arc::new(SequenceShared {
            state: Mutex::new(SequenceState {
                sequences: HashMap::new(),
                busy: vec![false; instances],
            }),
            wake: Notify::new(),
            config,
            max_batch_requests: max_batch_size.max(1) as usize,
            label: label.to_string(),
            backend,
        });
        let task = tokio::spawn(run_sequences(shared.clone()));
        SequenceBatcher { shared, task }
    }

    async fn submit(
        &self,
        mut request: BackendRequest,
        batch_size: u64,
        batched: bool,
    ) -> Result<Outcome> {
        let label = &self.shared.label;
        let mut take = |key: &str| -> Option<ParameterValue> {
            let at = request.parameters.iter().position(|(k, _)| k == key)?;
            Some(request.parameters.remove(at).1)
        };
        // With a numeric correlation id control, a string id holding a number is that
        // number (the same sequence either way); another string is refused below.
        let numeric_corrid = self
            .shared
            .config
            .control_input
            .iter()
            .any(|c| c.kind == ControlKind::Corrid && c.datatype != DataType::Bytes);
        let id = match take("sequence_id") {
            Some(ParameterValue::Int(n)) if n > 0 => CorrelationId::Number(n as u64),
            Some(ParameterValue::Text(s)) if numeric_corrid && s.trim().parse::<u64>().is_ok_and(|n| n > 0) => {
                CorrelationId::Number(s.trim().parse().expect("checked"))
            }
            Some(ParameterValue::Text(s)) if !s.is_empty() => CorrelationId::Text(s),
            Some(other) => {
                return Err(Error::invalid(format!(
                    "parameter 'sequence_id' must be a positive integer or a non-empty string, got {other:?}"
                )))
            }
            None => return Err(Error::invalid(format!("model '{label}' is stateful: requests need a 'sequence_id' parameter"))),
        };
        let flag = |v: Option<ParameterValue>, key: &str| match v {
            None => Ok(false),
            Some(ParameterValue::Bool(b)) => Ok(b),
            Some(other) => Err(Error::invalid(format!(
                "parameter '{key}' must be a bool, got {other:?}"
            ))),
        };
        let start = flag(take("sequence_start"), "sequence_start")?;
        let end = flag(take("sequence_end"), "sequence_end")?;

        for control in &self.shared.config.control_input {
            let (value, text) = match (control.kind, &id) {
                (ControlKind::Start, _) => (start as u64, None),
                (ControlKind::End, _) => (end as u64, None),
                (ControlKind::Ready, _) => (1, None),
                (ControlKind::Corrid, CorrelationId::Number(n)) => (*n, None),
                (ControlKind::Corrid, CorrelationId::Text(s)) if control.datatype == DataType::Bytes => {
                    (0, Some(s.as_str()))
                }
                // A numeric CORRID: strings holding a number became numbers above.
                (ControlKind::Corrid, CorrelationId::Text(s)) => {
                    return Err(Error::invalid(format!(
                        "model '{label}' takes numeric sequence ids (its correlation id control '{}' is {}); got the string '{s}'",
                        control.name, control.datatype
                    )))
                }
            };
            let mut tensor = control_tensor(&control.name, control.datatype, value, text);
            if batched {
                tensor.shape = vec![1, 1];
            }
            request.inputs.push(tensor);
        }

        let (reply, outcome) = oneshot::channel();
        {
            let mut state = self.shared.state.lock();
            let now = Instant::now();
            let sequences = &mut state.sequences;
            if start {
                if !sequences.contains_key(&id) && sequences.len() >= MAX_LIVE_SEQUENCES {
                    return Err(Error::unavailable(format!(
                        "model '{label}' has {MAX_LIVE_SEQUENCES} live sequences, its limit; \
                         end sequences (sequence_end) or try again later"
                    )));
                }
                if !sequences.contains_key(&id) {
                    sequences.insert(
                        id.clone(),
                        Sequence {
                            instance: None,
                            started: now,
                            last_active: now,
                            queue: VecDeque::new(),
                            ended: false,
                            executed: false,
                        },
                    );
                }
                // A start on a live sequence restarts it, on the same instance.
                sequences.get_mut(&id).expect("inserted").ended = false;
            }
            let sequence = match sequences.get_mut(&id) {
                Some(s) if !s.ended => s,
                _ => {
                    return Err(Error::invalid(format!(
                        "sequence {id} of model '{label}' is not active: it was never started (sequence_start), \
                         has ended, or was released after max_sequence_idle_us ({} µs) without requests",
                        self.shared.config.max_sequence_idle_us
                    )))
                }
            };
            sequence.last_active = now;
            sequence.ended = end;
            sequence.queue.push_back(SequencePending {
                request,
                batch_size,
                arrived: now,
                reply,
            });
        }
        self.shared.wake.notify_one();
        outcome
            .await
            .map_err(|_| Error::unavailable(format!("model '{label}' is unloading")))
    }
}

async fn run_sequences(shared: Arc<SequenceShared>) {
    let idle = Duration::from_micros(shared.config.max_sequence_idle_us.max(1));
    loop {
        let mut next_release: Option<Instant> = None;
        let mut batches = Vec::new();
        {
            let mut state = shared.state.lock();
            let now = Instant::now();
            let SequenceState { sequences, busy } = &mut *state;
            sequences.retain(|id, s| {
                // Requests whose client left are dropped; a sequence that never ran
                // and has nothing left was abandoned (a client that opened it and left).
                s.queue.retain(|p| !p.reply.is_closed());
                if !s.executed && s.queue.is_empty() {
                    tracing::debug!(model = %shared.label, sequence = %id, "released an abandoned sequence");
                    return false;
                }
                let done = s.queue.is_empty() && (s.ended || now >= s.last_active + idle);
                if done && !s.ended {
                    tracing::info!(model = %shared.label, sequence = %id, "released an idle sequence");
                }
                if !done && s.queue.is_empty() {
                    let at = s.last_active + idle;
                    next_release = Some(next_release.map_or(at, |n: Instant| n.min(at)));
                }
                !done
            });
            // Place new sequences, in order of arrival, on the instance with the
            // fewest live sequences; `direct` allows `max_batch_size` per instance.
            let mut load = vec![0usize; busy.len()];
            sequences
                .values()
                .filter_map(|s| s.instance)
                .for_each(|i| load[i] += 1);
            let mut unplaced: Vec<&mut Sequence> = sequences
                .values_mut()
                .filter(|s| s.instance.is_none())
                .collect();
            unplaced.sort_by_key(|s| s.started);
            for sequence in unplaced {
                let Some(instance) = (0..load.len()).min_by_key(|&i| load[i]) else {
                    break;
                };
                if shared.config.strategy == SequenceStrategy::Direct
                    && load[instance] >= shared.max_batch_requests
                {
                    break; // every slot is taken: wait for a sequence to end
                }
                load[instance] += 1;
                sequence.instance = Some(instance);
            }
            let delay = Duration::from_micros(shared.config.max_queue_delay_us);
            for (instance, is_busy) in busy.iter_mut().enumerate() {
                if *is_busy {
                    continue;
                }
                // The sequences waiting longest go first.
                let mut waiting: Vec<&mut Sequence> = sequences
                    .values_mut()
                    .filter(|s| s.instance == Some(instance) && !s.queue.is_empty())
                    .collect();
                waiting.sort_by_key(|s| s.queue.front().map(|p| p.arrived));
                let oldest = waiting
                    .first()
                    .and_then(|s| s.queue.front())
                    .map(|p| p.arrived);
                let fill = waiting.len().min(shared.max_batch_requests);
                if let (SequenceStrategy::Oldest, Some(oldest)) = (shared.config.strategy, oldest) {
                    let preferred = &shared.config.preferred_batch_size;
                    let full =
                        fill == shared.max_batch_requests || preferred.contains(&(fill as u32));
                    if !full && now < oldest + delay {
                        // Wait for a fuller batch, at most until the oldest request's delay ends.
                        let at = oldest + delay;
                        next_release = Some(next_release.map_or(at, |n: Instant| n.min(at)));
                        continue;
                    }
                }
                let mut batch = Vec::new();
                for sequence in waiting {
                    if batch.len() == shared.max_batch_requests {
                        break;
                    }
                    while let Some(p) = sequence.queue.pop_front() {
                        if !p.reply.is_closed() {
                            sequence.executed = true;
                            batch.push(p);
                            break;
                        }
                    }
                }
                if !batch.is_empty() {
                    *is_busy = true;
                    batches.push((instance, batch));
                }
            }
        }
        for (instance, batch) in batches {
            let shared = shared.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let batch_size: u64 = batch.iter().map(|p| p.batch_size).sum();
                let (requests, waiting): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .map(|p| (p.request, (p.arrived, p.reply)))
                    .unzip();
                let execution = shared.backend.execute_on(instance, requests).await;
                shared.state.lock().busy[instance] = false;
                shared.wake.notify_one();
                answer(waiting, execution, started, batch_size);
            });
        }
        match next_release {
            Some(at) => {
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

/// The schedulers against a fake backend under tokio's paused clock: time only
/// moves when every task waits, so delays and timeouts are exact, not raced.
#[cfg(test)]
mod tests {
    use super::*;
    use wisp_core::backend::{BoxFuture, Execution};
    use wisp_core::config::ModelConfig;

    /// Answers every request after `cost` (virtual) time, and records batch sizes.
    struct Fake {
        cost: Duration,
        instances: usize,
        batches: Mutex<Vec<(usize, usize)>>,
    }

    impl Fake {
        fn new(cost_ms: u64, instances: usize) -> Arc<Fake> {
            Arc::new(Fake {
                cost: Duration::from_millis(cost_ms),
                instances,
                batches: Mutex::new(Vec::new()),
            })
        }
        fn batch_sizes(&self) -> Vec<usize> {
            self.batches.lock().iter().map(|(_, n)| *n).collect()
        }
    }

    impl Backend for Fake {
        fn execute(&self, requests: Vec<BackendRequest>) -> BoxFuture<'_, Execution> {
            self.execute_on(0, requests)
        }
        fn instances(&self) -> usize {
            self.instances
        }
        fn execute_on(
            &self,
            instance: usize,
            requests: Vec<BackendRequest>,
        ) -> BoxFuture<'_, Execution> {
            self.batches.lock().push((instance, requests.len()));
            Box::pin(async move {
                tokio::time::sleep(self.cost).await;
                Execution {
                    results: requests
                        .into_iter()
                        .map(|r| {
                            Ok(BackendResponse {
                                outputs: r.inputs,
                                parameters: Vec::new(),
                            })
                        })
                        .collect(),
                    times: ExecutionTimes::default(),
                }
            })
        }
    }

    const TENSORS: &str =
        "backend = \"wasm\"\n[[input]]\nname = \"IN\"\ndatatype = \"INT32\"\ndims = [1]\n\
                           [[output]]\nname = \"OUT\"\ndatatype = \"INT32\"\ndims = [1]\n";

    fn scheduler(backend: &Arc<Fake>, head: &str, tail: &str) -> Arc<Scheduler> {
        let config = ModelConfig::parse(&format!("{head}\n{TENSORS}{tail}"), "fake").unwrap();
        Arc::new(Scheduler::new(backend.clone(), &config, "fake"))
    }

    fn request(parameters: &[(&str, ParameterValue)]) -> BackendRequest {
        BackendRequest {
            parameters: parameters
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ..Default::default()
        }
    }

    fn spawn(
        scheduler: &Arc<Scheduler>,
        parameters: &[(&str, ParameterValue)],
    ) -> tokio::task::JoinHandle<Result<Outcome>> {
        let (scheduler, request) = (scheduler.clone(), request(parameters));
        tokio::spawn(async move { scheduler.schedule(request, 1).await })
    }

    #[tokio::test(start_paused = true)]
    async fn requests_fill_a_batch_up_to_max_batch_size() {
        let fake = Fake::new(10, 1);
        let s = scheduler(
            &fake,
            "max_batch_size = 4",
            "[dynamic_batching]\nmax_queue_delay_us = 100000\n",
        );
        let tasks: Vec<_> = (0..8).map(|_| spawn(&s, &[])).collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().batch_size, 4);
        }
        assert_eq!(fake.batch_sizes(), vec![4, 4]);
    }

    /// A request of one sequence whose attention mask has `tokens` ones (padded to 8
    /// more, which do not count).
    fn tokens_request(tokens: usize) -> BackendRequest {
        let mask: Vec<u8> = (0..tokens + 8)
            .flat_map(|i| i64::from(i < tokens).to_le_bytes())
            .collect();
        BackendRequest {
            inputs: vec![Tensor {
                name: "attention_mask".into(),
                datatype: DataType::Int64,
                shape: vec![1, (tokens + 8) as i64],
                data: mask.into(),
            }],
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_budget_cuts_batches_and_a_large_request_runs_alone() {
        let fake = Fake::new(10, 1);
        let s = scheduler(
            &fake,
            "max_batch_size = 8",
            "[dynamic_batching]\nmax_queue_delay_us = 100000\nmax_batch_tokens = 250\n",
        );
        // Queued at once, in order: 100, 100, 100, 400, 20, 20 tokens (740 ≥ the budget,
        // so batches leave without the delay until what is left is under it).
        let mut tasks = Vec::new();
        for tokens in [100, 100, 100, 400, 20, 20] {
            let (s, request) = (s.clone(), tokens_request(tokens));
            tasks.push(tokio::spawn(async move { s.schedule(request, 1).await }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // 100+100 (a third would pass 250), 100 (400 would), 400 alone, then 20+20.
        assert_eq!(fake.batch_sizes(), vec![2, 1, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_with_the_budgets_tokens_dispatches_without_waiting() {
        let fake = Fake::new(0, 1);
        let s = scheduler(
            &fake,
            "max_batch_size = 8",
            "[dynamic_batching]\nmax_queue_delay_us = 1000000\nmax_batch_tokens = 200\n",
        );
        let started = Instant::now();
        let tasks: Vec<_> = [120, 90]
            .into_iter()
            .map(|tokens| {
                let (s, request) = (s.clone(), tokens_request(tokens));
                tokio::spawn(async move { s.schedule(request, 1).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // 210 tokens queued ≥ 200: the first leaves at once, alone; the second waits
        // out the delay.
        assert_eq!(fake.batch_sizes(), vec![1, 1]);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn eager_dispatch_never_waits_while_an_instance_is_free() {
        let fake = Fake::new(10, 1);
        let s = scheduler(
            &fake,
            "max_batch_size = 8",
            "[dynamic_batching]\nmax_queue_delay_us = 500000\ndispatch = \"eager\"\n",
        );
        let started = Instant::now();
        spawn(&s, &[]).await.unwrap().unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(10),
            "no batching delay"
        );
        // While the instance runs one, the others queue and leave together after it.
        let first = spawn(&s, &[]);
        tokio::task::yield_now().await;
        let rest: Vec<_> = (0..5).map(|_| spawn(&s, &[])).collect();
        first.await.unwrap().unwrap();
        for t in rest {
            assert_eq!(t.await.unwrap().unwrap().batch_size, 5);
        }
        assert_eq!(fake.batch_sizes(), vec![1, 1, 5]);
    }

    #[test]
    fn real_tokens_count_the_mask_else_the_ids() {
        assert_eq!(real_tokens(&tokens_request(37)), 37);
        let ids = BackendRequest {
            inputs: vec![Tensor {
                name: "input_ids".into(),
                datatype: DataType::Int64,
                shape: vec![2, 9],
                data: vec![0u8; 2 * 9 * 8].into(),
            }],
            ..Default::default()
        };
        assert_eq!(real_tokens(&ids), 18);
        assert_eq!(real_tokens(&BackendRequest::default()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_request_waits_exactly_the_queue_delay() {
        let fake = Fake::new(0, 1);
        let s = scheduler(
            &fake,
            "max_batch_size = 4",
            "[dynamic_batching]\nmax_queue_delay_us = 250000\n",
        );
        let started = Instant::now();
        spawn(&s, &[]).await.unwrap().unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn a_preferred_size_dispatches_without_waiting() {
        let fake = Fake::new(0, 1);
        let s = scheduler(
            &fake,
            "max_batch_size = 8",
            "[dynamic_batching]\nmax_queue_delay_us = 1000000\npreferred_batch_size = [2]\n",
        );
        let started = Instant::now();
        let (a, b) = (spawn(&s, &[]), spawn(&s, &[]));
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(fake.batch_sizes(), vec![2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once() {
        let fake = Fake::new(1000, 1);
        let s = scheduler(
            &fake,
            "max_batch_size = 1",
            "[dynamic_batching]\n[dynamic_batching.default_queue_policy]\nmax_queue_size = 2\n",
        );
        // One runs, two wait; the fourth finds the queue full.
        let mut running = Vec::new();
        for _ in 0..3 {
            running.push(spawn(&s, &[]));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let refused = spawn(&s, &[]).await.unwrap().err().unwrap();
        assert!(refused.message.contains("is full"), "{refused:?}");
        assert_eq!(refused.kind, wisp_core::error::ErrorKind::Unavailable);
        for t in running {
            t.await.unwrap().unwrap();
        }
    }

    #[test]
    fn an_overload_is_an_expected_wait_over_the_bound_for_a_whole_window() {
        let window = Duration::from_millis(100);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut o = Overload::default();
        // A burst: over for less than a window, then a request that is not.
        assert!(!o.observe(at(0), true, window));
        assert!(!o.observe(at(99), true, window));
        assert!(!o.observe(at(100), false, window));
        // Over again: the window starts anew.
        assert!(!o.observe(at(150), true, window));
        assert!(!o.observe(at(249), true, window));
        assert!(o.observe(at(250), true, window));
        // Overloaded until requests are within the bound for a whole window.
        assert!(o.observe(at(260), false, window));
        assert!(o.observe(at(300), true, window));
        assert!(o.observe(at(310), false, window));
        assert!(o.observe(at(409), false, window));
        assert!(!o.observe(at(410), false, window));
    }

    /// Offers `per_tick` requests every `tick_ms` for `ms`; returns each one's
    /// (arrival ms, latency ms or the refusal).
    async fn offer(
        s: &Arc<Scheduler>,
        per_tick: usize,
        tick_ms: u64,
        ms: u64,
    ) -> Vec<(u64, std::result::Result<u64, Error>)> {
        offer_through(s, per_tick, tick_ms, ms, false).await
    }

    /// [`offer`], where with `ask_first` each request first asks `is_full`, as an
    /// ensemble does before its first step, and goes away when told so.
    async fn offer_through(
        s: &Arc<Scheduler>,
        per_tick: usize,
        tick_ms: u64,
        ms: u64,
        ask_first: bool,
    ) -> Vec<(u64, std::result::Result<u64, Error>)> {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in (0..ms).step_by(tick_ms as usize) {
            for _ in 0..per_tick {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    if ask_first && s.is_full() {
                        return (i, Err(Error::unavailable("refused at the door")));
                    }
                    let started = Instant::now();
                    let outcome = s.schedule(request(&[]), 1).await;
                    let latency = started.elapsed().as_millis() as u64;
                    (i, outcome.and_then(|o| o.result).map(|_| latency))
                }));
            }
            tokio::time::sleep_until(t0 + Duration::from_millis(i + tick_ms)).await;
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        results
    }

    /// One instance taking `cost_ms` a batch of up to `max_batch` inferences, eager
    /// dispatch, a queue of 64, a 100 ms overload window and the given wait bound.
    fn shedding_scheduler(cost_ms: u64, max_batch: u32, wait_us: u64) -> Arc<Scheduler> {
        scheduler(
            &Fake::new(cost_ms, 1),
            &format!("max_batch_size = {max_batch}"),
            &format!(
                "[dynamic_batching]\ndispatch = \"eager\"\noverload_window_us = 100000\n\
                 [dynamic_batching.default_queue_policy]\nmax_queue_size = 64\nmax_expected_wait_us = {wait_us}\n"
            ),
        )
    }

    /// At twice the capacity, a queue bounded by count only makes every admitted
    /// request wait for the whole queue; with `max_expected_wait_us`, once the
    /// overload has lasted a window, the excess is refused and those admitted
    /// wait about the bound.
    #[tokio::test(start_paused = true)]
    async fn a_sustained_overload_is_shed_so_admitted_requests_keep_their_latency() {
        // 4 inferences per 10 ms batch: 400 a second; offered: 1000 a second.
        let count_only = shedding_scheduler(10, 4, 0);
        let results = offer(&count_only, 1, 1, 600).await;
        let worst = results.iter().filter_map(|(_, r)| r.as_ref().ok()).max();
        assert!(*worst.unwrap() >= 150, "{worst:?}");

        let shedding = shedding_scheduler(10, 4, 20_000);
        let load = tokio::spawn({
            let shedding = shedding.clone();
            async move { offer(&shedding, 1, 1, 600).await }
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        // An ensemble in front of it is told so before running its first step.
        assert!(shedding.is_full());
        let results = load.await.unwrap();
        let (mut admitted_late, mut refused) = (Vec::new(), 0);
        for (arrived, result) in &results {
            match result {
                Ok(latency) if *arrived >= 300 => admitted_late.push(*latency),
                Ok(_) => {}
                // Before the overload has lasted a window, the count bound refuses.
                Err(e) if *arrived < 200 && e.message.contains("is full") => refused += 1,
                Err(e) => {
                    assert!(e.message.contains("max_expected_wait_us = 20000"), "{e:?}");
                    assert_eq!(e.kind, wisp_core::error::ErrorKind::Unavailable);
                    refused += 1;
                }
            }
        }
        // The excess (about 60 %) is refused; the rest is served at capacity.
        assert!((250..=450).contains(&refused), "{refused} refused");
        // Waiting at most about the bound, plus the batch running ahead and its own.
        let worst = admitted_late.iter().max().unwrap();
        assert!(*worst <= 20 + 10 + 10 + 2, "{worst} ms");

        // After a window of calm (half the capacity), shedding stops: a burst queues.
        let calm = offer(&shedding, 1, 5, 300).await;
        assert!(calm.iter().all(|(_, r)| r.is_ok()));
        assert!(!shedding.is_full());
        let burst = offer(&shedding, 40, 1, 1).await;
        assert!(burst.iter().all(|(_, r)| r.is_ok()));
    }

    /// Requests an ensemble turns away at the door (`is_full`) count as arrivals over
    /// the bound: were they not counted, the model would see only the admitted ones,
    /// stop shedding after a window, fill its queue, and start again, over and over.
    #[tokio::test(start_paused = true)]
    async fn refusals_at_an_ensembles_door_keep_the_overload_standing() {
        let s = shedding_scheduler(10, 4, 20_000);
        let results = offer_through(&s, 1, 1, 1500, true).await;
        let late: Vec<_> = results.iter().filter(|(at, _)| *at >= 300).collect();
        let worst = late.iter().filter_map(|(_, r)| r.as_ref().ok()).max();
        assert!(*worst.unwrap() <= 20 + 10 + 10 + 2, "{worst:?} ms");
        let at_door = late
            .iter()
            .filter(|(_, r)| matches!(r, Err(e) if e.message == "refused at the door"));
        assert!(at_door.count() > 500);
    }

    /// A model whose batch takes longer than the window (a slow encoder, a debug build)
    /// keeps every arrival over a short bound while a batch runs, at any load: the
    /// overload must outlast two batches before anything is shed.
    #[tokio::test(start_paused = true)]
    async fn a_batch_longer_than_the_window_is_not_an_overload() {
        let s = shedding_scheduler(400, 64, 20_000);
        // 100 requests a second against a capacity of 160.
        let results = offer(&s, 1, 10, 2000).await;
        assert!(results.iter().all(|(_, r)| r.is_ok()));
    }

    /// A burst shorter than the window queues (up to max_queue_size) instead of being shed.
    #[tokio::test(start_paused = true)]
    async fn a_burst_shorter_than_the_overload_window_is_queued() {
        let s = shedding_scheduler(10, 4, 20_000);
        // The first batch teaches the scheduler the pace; then 40 requests at once
        // (100 ms of work, five times the bound), then calm.
        offer(&s, 1, 1, 1).await;
        let burst = offer(&s, 40, 1, 1).await;
        assert!(burst.iter().all(|(_, r)| r.is_ok()));
        // At half the capacity (one request each 5 ms).
        let calm = offer(&s, 1, 5, 200).await;
        assert!(calm.iter().all(|(_, r)| r.is_ok()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_higher_priority_level_is_served_first() {
        let fake = Fake::new(100, 1);
        let s = scheduler(
            &fake,
            "max_batch_size = 1",
            "[dynamic_batching]\npriority_levels = 2\ndefault_priority_level = 2\n",
        );
        let first = spawn(&s, &[]); // occupies the instance
        tokio::time::sleep(Duration::from_millis(1)).await;
        let low = spawn(&s, &[]);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let high = spawn(&s, &[("priority", ParameterValue::Int(1))]);
        first.await.unwrap().unwrap();
        let (low, high) = (low.await.unwrap().unwrap(), high.await.unwrap().unwrap());
        assert!(
            high.queue_ns < low.queue_ns,
            "high {} low {}",
            high.queue_ns,
            low.queue_ns
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_timeout_rejects_the_request() {
        let fake = Fake::new(1000, 1);
        let s = scheduler(
            &fake,
            "max_batch_size = 1",
            "[dynamic_batching]\n[dynamic_batching.default_queue_policy]\ntimeout_us = 50000\n",
        );
        let first = spawn(&s, &[]);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let started = Instant::now();
        let late = spawn(&s, &[]).await.unwrap().unwrap().result.unwrap_err();
        assert_eq!(
            late.kind,
            wisp_core::error::ErrorKind::Unavailable,
            "{late:?}"
        );
        assert!(late.message.contains("timed out"), "{late:?}");
        // At its timeout, not when the busy instance frees (1 s).
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        first.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_timeout_past_every_bound_is_clamped_not_a_panic() {
        let fake = Fake::new(0, 1);
        let s = scheduler(
            &fake,
            "max_batch_size = 1",
            "[dynamic_batching]\n[dynamic_batching.default_queue_policy]\nallow_timeout_override = true\n",
        );
        let huge = ParameterValue::Int(i64::MAX);
        spawn(&s, &[("timeout", huge)]).await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn direct_scheduling_admits_a_bounded_number_of_requests() {
        let fake = Fake::new(1000, 1);
        let s = scheduler(&fake, "max_batch_size = 1", "");
        let limit = DEFAULT_MAX_QUEUE_SIZE + 1;
        let admitted: Vec<_> = (0..limit).map(|_| spawn(&s, &[])).collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let refused = spawn(&s, &[]).await.unwrap().err().unwrap();
        assert!(refused.message.contains("in flight"), "{refused:?}");
        drop(admitted);
    }

    fn sequence(id: i64, start: bool, end: bool) -> Vec<(&'static str, ParameterValue)> {
        vec![
            ("sequence_id", ParameterValue::Int(id)),
            ("sequence_start", ParameterValue::Bool(start)),
            ("sequence_end", ParameterValue::Bool(end)),
        ]
    }

    const SEQUENCES: &str = "[sequence_batching]\nmax_sequence_idle_us = 5000000\n";

    /// The attack: many sequence starts from a client that then left held every
    /// slot until each idled out, so a legitimate sequence waited for all of them.
    #[tokio::test(start_paused = true)]
    async fn sequences_whose_client_left_are_released_at_once() {
        let fake = Fake::new(10, 1);
        let s = scheduler(&fake, "max_batch_size = 1", SEQUENCES);
        spawn(&s, &sequence(1, true, false)).await.unwrap().unwrap();
        // 50 sequences queue behind sequence 1's slot; their client goes away.
        let abandoned: Vec<_> = (2..52)
            .map(|id| spawn(&s, &sequence(id, true, false)))
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        abandoned.iter().for_each(|t| t.abort());
        spawn(&s, &sequence(1, false, true)).await.unwrap().unwrap();
        let started = Instant::now();
        spawn(&s, &sequence(100, true, true))
            .await
            .unwrap()
            .unwrap();
        // Without the release: 50 × max_sequence_idle_us (250 s).
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_sequence_is_released_after_max_sequence_idle() {
        let fake = Fake::new(0, 1);
        let s = scheduler(&fake, "max_batch_size = 1", SEQUENCES);
        spawn(&s, &sequence(7, true, false)).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        let e = spawn(&s, &sequence(7, false, false))
            .await
            .unwrap()
            .err()
            .unwrap();
        assert!(e.message.contains("not active"), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sequence_keeps_its_instance() {
        let fake = Fake::new(1, 3);
        let s = scheduler(&fake, "max_batch_size = 1", SEQUENCES);
        for (id, step) in [(1, 0), (2, 0), (1, 1), (2, 1), (1, 2)] {
            spawn(&s, &sequence(id, step == 0, step == 2))
                .await
                .unwrap()
                .unwrap();
        }
        let batches = fake.batches.lock().clone();
        let on = |i: usize| batches[i].0;
        assert_eq!((on(0), on(2), on(4)), (on(0), on(0), on(0)));
        assert_eq!(on(1), on(3));
        assert_ne!(on(0), on(1));
    }
}
