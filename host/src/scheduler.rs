//! Between a validated request and the backend: direct (one request, one
//! execution) or the dynamic batcher (Triton's `dynamic_batching`).
//!
//! The dynamic batcher keeps one queue per priority level behind a mutex that
//! is never held across an await, and one task that forms batches: it waits
//! for a free instance, then for a batch worth sending (a preferred size, the
//! largest batch, or the oldest request's `max_queue_delay_us`), and hands the
//! batch to the backend in a task of its own, so up to `count` batches run at
//! once. Requests whose client went away are dropped before execution.

use crate::backend::{Backend, BackendRequest, BackendResponse, ExecutionTimes};
use crate::error::{Error, Result};
use crate::repository::config::{
    ControlKind, DynamicBatching, ParameterValue, SequenceBatching, SequenceStrategy, TimeoutAction,
};
use crate::tensor::{DataType, Tensor};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify, Semaphore};

/// Requests one priority level may hold when its policy sets no `max_queue_size`.
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 4096;

/// What became of one request.
pub struct Outcome {
    pub result: Result<BackendResponse>,
    pub times: ExecutionTimes,
    pub queue_ns: u64,
    /// Inferences in the batch the request ran in.
    pub batch_size: u64,
    /// Set on one request per batch that ran: it records the batch's statistics.
    pub records_batch: bool,
}

pub enum Scheduler {
    Direct(Arc<dyn Backend>),
    Dynamic(DynamicBatcher),
    Sequence(SequenceBatcher, bool),
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
        config: &crate::repository::config::ModelConfig,
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
            (None, None) => Scheduler::Direct(backend),
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
            Scheduler::Direct(backend) => {
                let arrived = Instant::now();
                let execution = backend.execute(vec![request]).await;
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
            }),
            wake: Notify::new(),
            order_tail: Mutex::new(None),
            max_batch: max_batch_size.max(1) as u64,
            config,
            label: label.to_string(),
        });
        let task = tokio::spawn(form_batches(shared.clone(), backend, instances.max(1)));
        DynamicBatcher { shared, task }
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
            (0, _) | (_, None) | (_, Some(0)) => config.default_priority_level.max(1),
            (levels, Some(p)) if p <= levels as u64 => p as u32,
            (levels, Some(p)) => {
                return Err(Error::invalid(format!(
                    "parameter 'priority' is {p}; model '{}' has priority levels 1 to {levels}",
                    self.shared.label
                )))
            }
        };
        let policy = config.policy(if config.priority_levels == 0 {
            0
        } else {
            level
        });
        let timeout = match timeout_us {
            Some(t) if policy.allow_timeout_override => t,
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
        let pending = Pending {
            request,
            batch_size,
            arrived,
            deadline: (timeout > 0).then(|| arrived + Duration::from_micros(timeout)),
            action: policy.timeout_action,
            reply,
        };
        {
            let mut queues = self.shared.queues.lock();
            let queue = &mut queues.levels[(level - 1) as usize];
            let cap = match policy.max_queue_size {
                0 => DEFAULT_MAX_QUEUE_SIZE,
                n => n as usize,
            };
            if queue.len() >= cap {
                return Err(Error::unavailable(format!(
                    "the queue of model '{}' (priority level {level}) is full: {cap} requests wait (max_queue_size)",
                    self.shared.label
                )));
            }
            queue.push_back(pending);
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
}

enum Decision {
    Dispatch(Vec<Pending>),
    /// Nothing to send yet: wake at this instant (or on a new request).
    Wait(Option<Instant>),
}

impl Shared {
    fn decide(&self, now: Instant) -> Decision {
        let mut queues = self.queues.lock();
        let Queues { levels, delayed } = &mut *queues;
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

        let order = || levels.iter().flatten().chain(delayed.iter());
        let total: u64 = order().map(|p| p.batch_size).sum();
        let next_expiry = levels.iter().flatten().filter_map(|p| p.deadline).min();
        let Some(oldest) = order().map(|p| p.arrived).min() else {
            return Decision::Wait(None);
        };
        let flush_at = oldest + Duration::from_micros(self.config.max_queue_delay_us);
        let preferred = &self.config.preferred_batch_size;
        let largest_preferred = preferred.iter().max().map(|&p| p as u64);
        let target =
            if total >= self.max_batch || now >= flush_at || preferred.contains(&(total as u32)) {
                self.max_batch
            } else if let Some(p) = largest_preferred.filter(|&p| total >= p) {
                p
            } else {
                let wake = next_expiry.map_or(flush_at, |e| e.min(flush_at));
                return Decision::Wait(Some(wake));
            };

        let mut batch = Vec::new();
        let mut size = 0;
        for queue in levels.iter_mut().chain(std::iter::once(delayed)) {
            while let Some(front) = queue.front() {
                if !batch.is_empty() && size + front.batch_size > target {
                    break;
                }
                size += front.batch_size;
                batch.push(queue.pop_front().expect("front exists"));
            }
            if size >= target {
                break;
            }
        }
        Decision::Dispatch(batch)
    }
}

/// Sends each request of an executed batch its outcome; the first records the batch.
fn answer(
    waiting: Vec<(Instant, oneshot::Sender<Outcome>)>,
    execution: crate::backend::Execution,
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
        });
    }
}

async fn form_batches(shared: Arc<Shared>, backend: Arc<dyn Backend>, instances: usize) {
    let free = Arc::new(Semaphore::new(instances));
    loop {
        let Ok(permit) = free.clone().acquire_owned().await else {
            return;
        };
        let batch = loop {
            match shared.decide(Instant::now()) {
                Decision::Dispatch(batch) => break batch,
                Decision::Wait(None) => shared.wake.notified().await,
                Decision::Wait(Some(at)) => {
                    tokio::select! {
                        _ = shared.wake.notified() => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
            }
        };
        let backend = backend.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let batch_size: u64 = batch.iter().map(|p| p.batch_size).sum();
            let (requests, waiting): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|p| (p.request, (p.arrived, p.reply)))
                .unzip();
            let execution = backend.execute(requests).await;
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
        let id = match take("sequence_id") {
            Some(ParameterValue::Int(n)) if n > 0 => CorrelationId::Number(n as u64),
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
                (ControlKind::Corrid, CorrelationId::Text(s)) => (0, Some(s.as_str())),
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
                if !sequences.contains_key(&id) {
                    sequences.insert(
                        id.clone(),
                        Sequence {
                            instance: None,
                            started: now,
                            last_active: now,
                            queue: VecDeque::new(),
                            ended: false,
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
                    _ = tokio::time::sleep_until(at.into()) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}
