//! The worker pool every backend runs its instances on.
//!
//! Each instance is an OS thread that owns its state (a Wasm store, an encoder's
//! buffers, a CUDA stream), so model code never runs on the async workers and one
//! instance cannot slow another. Batches come from one shared queue, or from the
//! instance's own queue when they must run there (a sequence's state lives in
//! that instance). Admission is bounded before this point, by the scheduler, so
//! these queues only hold batches already admitted; they are still bounded, and
//! a full one is an internal error, never a hang.
//!
//! What the pool guarantees for every backend alike:
//! - a batch whose client went away while it waited is skipped;
//! - a panic fails its batch (with the panic's message), not the thread;
//! - an instance that panicked or reports itself broken (a trap) is rebuilt,
//!   with a delay that doubles on each consecutive failure, so a client that
//!   makes a plugin trap on purpose cannot make the server rebuild instances
//!   in a tight loop.

use crate::backend::{BackendRequest, Execution, ExecutionTimes};
use crate::error::{Error, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// A batch for an instance, and where its result goes.
pub struct Job {
    pub requests: Vec<BackendRequest>,
    pub reply: oneshot::Sender<Execution>,
}

/// One model instance, owned by its worker thread.
pub trait Worker {
    /// Runs one batch: one result per request, in order.
    fn run(&mut self, requests: Vec<BackendRequest>) -> Execution;

    /// False once the instance must not run another batch (it trapped or timed
    /// out); the pool then builds a fresh one.
    fn healthy(&self) -> bool {
        true
    }

    /// Why the instance can never run again, where rebuilding it cannot help (a GPU
    /// whose context a sticky error poisoned). The pool then takes it out of service.
    fn out_of_service(&self) -> Option<String> {
        None
    }
}

impl<W: Worker + ?Sized> Worker for Box<W> {
    fn run(&mut self, requests: Vec<BackendRequest>) -> Execution {
        (**self).run(requests)
    }
    fn healthy(&self) -> bool {
        (**self).healthy()
    }
    fn out_of_service(&self) -> Option<String> {
        (**self).out_of_service()
    }
}

/// Instances a pool took out of service, and why the last one was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutOfService {
    pub instances: usize,
    pub reason: Option<String>,
}

/// Builds instance `index` on its own thread; called again to replace a broken one.
pub type MakeWorker<W> = dyn Fn(usize) -> Result<W> + Send + Sync;

/// Timing of instance rebuilds after failures.
#[derive(Debug, Clone, Copy)]
pub struct Recycle {
    /// Wait before the first rebuild after a failure.
    pub first_delay: Duration,
    /// The longest wait, reached after consecutive failures.
    pub max_delay: Duration,
}

impl Default for Recycle {
    fn default() -> Self {
        Recycle {
            first_delay: Duration::ZERO,
            max_delay: Duration::from_secs(5),
        }
    }
}

impl Recycle {
    /// The wait before rebuild number `failures` (1-based) in a row.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures <= 1 {
            return self.first_delay;
        }
        let base = Duration::from_millis(50);
        let doubled = base.saturating_mul(1u32 << (failures - 2).min(16));
        doubled.max(self.first_delay).min(self.max_delay)
    }
}

/// The instances of one model version.
pub struct WorkerPool {
    label: Arc<str>,
    shared: crossbeam_channel::Sender<Job>,
    pinned: Vec<crossbeam_channel::Sender<Job>>,
    retired: Arc<std::sync::Mutex<OutOfService>>,
}

/// Batches one queue may hold. The scheduler admits far fewer; this bound only
/// guards against a bug turning into unbounded memory.
pub const QUEUE_CAPACITY: usize = 65_536;

/// How long an instance that finished a batch keeps looking for the next one before
/// its thread sleeps, in µs (0: it sleeps at once). A batch that arrives meanwhile
/// starts without waking a sleeping thread, a wake-up that costs tens of µs (more on a
/// VM); the price is CPU while it looks. Process-wide; `wisp serve` sets it from
/// `--instance-idle-spin-us`.
static IDLE_SPIN_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The longest idle spin accepted (10 ms).
pub const MAX_IDLE_SPIN_US: u64 = 10_000;

/// Sets how long idle instances look for work before sleeping (clamped to 10 ms).
pub fn set_idle_spin(spin: Duration) {
    let us = (spin.as_micros() as u64).min(MAX_IDLE_SPIN_US);
    IDLE_SPIN_US.store(us, std::sync::atomic::Ordering::Relaxed);
}

fn idle_spin() -> Duration {
    Duration::from_micros(IDLE_SPIN_US.load(std::sync::atomic::Ordering::Relaxed))
}

/// Whether an instance's recent idle gaps were short enough for the idle spin to catch
/// the next batch: bit i is the (i+1)-th latest gap. An instance spins only while at
/// least half of its last 16 gaps were that short. A model called back to back (one
/// client in a loop) keeps spinning; one whose batches come far apart, as most do under
/// a mixed load, stops spending a core on looks that find nothing, which the models
/// doing the work need (on 2 cores, spinning everywhere cost the encoder a third of
/// its throughput in the soak benchmark).
#[derive(Debug, Clone, Copy)]
struct SpinHistory(u16);

impl SpinHistory {
    fn new() -> Self {
        SpinHistory(u16::MAX)
    }

    fn worth_it(&self) -> bool {
        self.0.count_ones() >= 8
    }

    fn record(&mut self, caught: bool) {
        self.0 = (self.0 << 1) | u16::from(caught);
    }
}

/// A job from either queue if one arrives within `spin` (pinned ones first).
fn spin_for_job<J>(
    own_queue: &crossbeam_channel::Receiver<J>,
    queue: &crossbeam_channel::Receiver<J>,
    spin: Duration,
) -> Option<J> {
    if spin.is_zero() {
        return None;
    }
    let until = std::time::Instant::now() + spin;
    loop {
        if let Ok(job) = own_queue.try_recv().or_else(|_| queue.try_recv()) {
            return Some(job);
        }
        if std::time::Instant::now() >= until {
            return None;
        }
        // Lets other threads of this core run while it looks.
        std::thread::yield_now();
    }
}

fn fail_all(count: usize, e: Error) -> Execution {
    Execution {
        results: (0..count).map(|_| Err(e.clone())).collect(),
        times: ExecutionTimes::default(),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl WorkerPool {
    /// Starts `count` instance threads (named `thread_name(index)`) and waits until
    /// each built its instance with `make`. The first failure is returned, and the
    /// threads that did start end.
    pub fn start<W: Worker + 'static>(
        label: impl Into<Arc<str>>,
        count: usize,
        thread_name: impl Fn(usize) -> String,
        recycle: Recycle,
        make: Arc<MakeWorker<W>>,
    ) -> Result<WorkerPool> {
        let label = label.into();
        let (shared, queue) = crossbeam_channel::bounded::<Job>(QUEUE_CAPACITY);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let mut pinned = Vec::with_capacity(count);
        let retired = Arc::new(std::sync::Mutex::new(OutOfService::default()));
        for index in 0..count {
            let (own, own_queue) = crossbeam_channel::bounded::<Job>(QUEUE_CAPACITY);
            pinned.push(own);
            let (queue, ready, make, label) =
                (queue.clone(), ready_tx.clone(), make.clone(), label.clone());
            let instance = Instance {
                index,
                count,
                label,
                recycle,
                queue,
                own_queue,
                retired: retired.clone(),
            };
            std::thread::Builder::new()
                .name(thread_name(index))
                .spawn(move || instance_loop(instance, &*make, ready))
                .map_err(|e| Error::internal(format!("cannot start an instance thread: {e}")))?;
        }
        drop(ready_tx);
        for _ in 0..count {
            // An error drops the senders, which ends the threads that did start.
            ready_rx
                .recv()
                .map_err(|_| Error::internal("an instance thread ended before it was ready"))??;
        }
        Ok(WorkerPool {
            label,
            shared,
            pinned,
            retired,
        })
    }

    pub fn instances(&self) -> usize {
        self.pinned.len()
    }

    /// Instances taken out of service (they never come back: the model must be
    /// reloaded, or the server restarted, once the cause is fixed).
    pub fn out_of_service(&self) -> OutOfService {
        lock(&self.retired).clone()
    }

    /// Runs a batch on the first free instance.
    pub async fn submit(&self, requests: Vec<BackendRequest>) -> Execution {
        self.send(&self.shared, requests).await
    }

    /// Runs a batch on instance `index` (modulo the instance count).
    pub async fn submit_to(&self, index: usize, requests: Vec<BackendRequest>) -> Execution {
        let queue = &self.pinned[index % self.pinned.len().max(1)];
        self.send(queue, requests).await
    }

    async fn send(
        &self,
        queue: &crossbeam_channel::Sender<Job>,
        requests: Vec<BackendRequest>,
    ) -> Execution {
        let count = requests.len();
        {
            let retired = lock(&self.retired);
            if retired.instances >= self.pinned.len() {
                return fail_all(
                    count,
                    Error::unavailable(format!(
                        "model '{}': every instance is out of service ({})",
                        self.label,
                        retired.reason.as_deref().unwrap_or("unknown reason")
                    )),
                );
            }
        }
        let (reply, result) = oneshot::channel();
        match queue.try_send(Job { requests, reply }) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                return fail_all(
                    count,
                    Error::internal(format!(
                        "model '{}' has {QUEUE_CAPACITY} batches waiting for its instances",
                        self.label
                    )),
                )
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                return fail_all(
                    count,
                    Error::unavailable(format!("model '{}' is unloading", self.label)),
                )
            }
        }
        result.await.unwrap_or_else(|_| {
            fail_all(
                count,
                Error::internal(format!("model '{}' dropped the batch", self.label)),
            )
        })
    }
}

/// One instance thread: builds the instance, then runs batches until the model
/// is unloaded (every sender dropped).
fn instance_loop<W: Worker>(
    instance: Instance,
    make: &MakeWorker<W>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let Instance {
        index,
        ref label,
        recycle,
        ref queue,
        ref own_queue,
        ..
    } = instance;
    let label: &str = label;
    let built = catch_unwind(AssertUnwindSafe(|| make(index))).unwrap_or_else(|panic| {
        Err(Error::internal(format!(
            "building instance {index} panicked: {}",
            panic_message(&*panic)
        )))
    });
    let mut worker = match built {
        Ok(worker) => Some(worker),
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);
    let mut failures: u32 = 0;
    let mut spins = SpinHistory::new();
    loop {
        if worker.is_none() {
            // Rebuild before taking the next batch, after a delay that grows with
            // consecutive failures. Batches wait in the queue (other instances take them).
            std::thread::sleep(recycle.delay(failures));
            let started = std::time::Instant::now();
            match catch_unwind(AssertUnwindSafe(|| make(index))) {
                Ok(Ok(fresh)) => {
                    tracing::info!(
                        model = label,
                        instance = index,
                        us = started.elapsed().as_micros() as u64,
                        "instance rebuilt after a failure"
                    );
                    worker = Some(fresh);
                }
                Ok(Err(e)) => {
                    failures = failures.saturating_add(1);
                    tracing::error!(
                        model = label,
                        instance = index,
                        "cannot rebuild the instance: {e}"
                    );
                }
                Err(panic) => {
                    failures = failures.saturating_add(1);
                    tracing::error!(
                        model = label,
                        instance = index,
                        "rebuilding the instance panicked: {}",
                        panic_message(&*panic)
                    );
                }
            }
            if worker.is_none() {
                // Serve the pinned queue's waiting batches an error rather than leave them hanging.
                while let Ok(job) = own_queue.try_recv() {
                    let count = job.requests.len();
                    let _ = job.reply.send(fail_all(
                        count,
                        Error::unavailable(format!(
                            "model '{label}': instance {index} is being rebuilt after a failure"
                        )),
                    ));
                }
                if queue.is_empty() && own_queue.is_empty() && is_disconnected(queue) {
                    return;
                }
                continue;
            }
        }
        // Batches pinned to this instance first, then the shared queue.
        let job = match own_queue.try_recv() {
            Ok(job) => job,
            Err(_) => {
                let spin = idle_spin();
                let idle_since = std::time::Instant::now();
                let spun = if spins.worth_it() {
                    spin_for_job(own_queue, queue, spin)
                } else {
                    None
                };
                match spun {
                    Some(job) => {
                        spins.record(true);
                        job
                    }
                    None => {
                        let job = crossbeam_channel::select! {
                            recv(own_queue) -> job => match job { Ok(job) => job, Err(_) => return },
                            recv(queue) -> job => match job { Ok(job) => job, Err(_) => return },
                        };
                        // Whether a spin would have caught it, so the history also
                        // learns while this instance does not spin.
                        spins.record(!spin.is_zero() && idle_since.elapsed() <= spin);
                        job
                    }
                }
            }
        };
        if job.reply.is_closed() {
            continue; // the client went away while the batch waited
        }
        let count = job.requests.len();
        let worker_ref = worker.as_mut().expect("built above");
        let execution = match catch_unwind(AssertUnwindSafe(|| worker_ref.run(job.requests))) {
            Ok(execution) => {
                if let Some(reason) = worker_ref.out_of_service() {
                    drop(worker.take());
                    // Counted before the batch is answered: whoever sees the answer sees
                    // the instance out of service.
                    let last = instance.mark_retired(&reason);
                    let _ = job.reply.send(execution);
                    return instance.serve_retired(reason, last);
                }
                if worker_ref.healthy() {
                    failures = 0;
                } else {
                    failures = failures.saturating_add(1);
                    worker = None;
                }
                execution
            }
            Err(panic) => {
                let message = panic_message(&*panic);
                tracing::error!(model = label, instance = index, %message, "batch panicked; rebuilding the instance");
                failures = failures.saturating_add(1);
                worker = None;
                fail_all(
                    count,
                    Error::internal(format!(
                        "model '{label}' failed on this batch (see the server log)"
                    )),
                )
            }
        };
        let _ = job.reply.send(execution);
    }
}

/// What an instance thread works with.
struct Instance {
    index: usize,
    /// Instances in the pool.
    count: usize,
    label: Arc<str>,
    recycle: Recycle,
    queue: crossbeam_channel::Receiver<Job>,
    own_queue: crossbeam_channel::Receiver<Job>,
    retired: Arc<std::sync::Mutex<OutOfService>>,
}

impl Instance {
    /// Counts this instance out of service (and logs it); true when it was the last.
    fn mark_retired(&self, reason: &str) -> bool {
        let last = {
            let mut retired = lock(&self.retired);
            retired.instances += 1;
            retired.reason = Some(reason.to_string());
            retired.instances >= self.count
        };
        tracing::error!(
            model = &*self.label,
            instance = self.index,
            %reason,
            "instance taken out of service{}",
            if last { "; the model has no instance left and is not ready" } else { "" }
        );
        last
    }

    /// Out of service for good: this thread answers its own queue's batches with the
    /// reason, and once no instance is left in service, the shared queue's too (the
    /// pool also refuses new batches then).
    fn serve_retired(self, reason: String, last: bool) {
        let error = Error::unavailable(format!(
            "model '{}': instance {} is out of service ({reason})",
            self.label, self.index
        ));
        let answer = |job: Job| {
            let count = job.requests.len();
            let _ = job.reply.send(fail_all(count, error.clone()));
        };
        loop {
            let job = if last {
                crossbeam_channel::select! {
                    recv(self.own_queue) -> job => job,
                    recv(self.queue) -> job => job,
                }
            } else {
                self.own_queue.recv()
            };
            match job {
                Ok(job) => answer(job),
                Err(_) => return, // unloaded
            }
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether every sender of `queue` is gone (the model was unloaded).
fn is_disconnected(queue: &crossbeam_channel::Receiver<Job>) -> bool {
    matches!(
        queue.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendResponse;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Panics on a request with a "panic" parameter, breaks itself on "trap", and
    /// is out of service for good after "poison".
    struct Fake {
        broken: bool,
        poisoned: bool,
    }

    impl Worker for Fake {
        fn run(&mut self, requests: Vec<BackendRequest>) -> Execution {
            let has = |key: &str| {
                requests
                    .iter()
                    .any(|r| r.parameters.iter().any(|(k, _)| k == key))
            };
            if has("panic") {
                panic!("boom");
            }
            self.broken = has("trap");
            self.poisoned |= has("poison");
            Execution {
                results: requests
                    .iter()
                    .map(|_| Ok(BackendResponse::default()))
                    .collect(),
                times: ExecutionTimes::default(),
            }
        }
        fn healthy(&self) -> bool {
            !self.broken
        }
        fn out_of_service(&self) -> Option<String> {
            self.poisoned
                .then(|| "CUDA_ERROR_ILLEGAL_ADDRESS".to_string())
        }
    }

    fn request(parameter: Option<&str>) -> BackendRequest {
        BackendRequest {
            parameters: parameter
                .map(|p| vec![(p.to_string(), crate::config::ParameterValue::Bool(true))])
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    fn pool(builds: Arc<AtomicUsize>) -> WorkerPool {
        WorkerPool::start(
            "fake:1",
            1,
            |i| format!("fake-{i}"),
            Recycle::default(),
            Arc::new(move |_| {
                builds.fetch_add(1, Ordering::SeqCst);
                Ok(Fake {
                    broken: false,
                    poisoned: false,
                })
            }),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_panic_fails_its_batch_and_the_instance_is_rebuilt() {
        let builds = Arc::new(AtomicUsize::new(0));
        let pool = pool(builds.clone());
        let failed = pool.submit(vec![request(Some("panic"))]).await;
        let error = failed.results[0].as_ref().unwrap_err();
        assert!(error.message.contains("failed on this batch"), "{error:?}");
        assert!(
            !error.message.contains("boom"),
            "panic text stays in the log"
        );
        let ok = pool.submit(vec![request(None)]).await;
        assert!(ok.results[0].is_ok());
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_broken_instance_is_rebuilt_before_the_next_batch() {
        let builds = Arc::new(AtomicUsize::new(0));
        let pool = pool(builds.clone());
        assert!(pool.submit(vec![request(Some("trap"))]).await.results[0].is_ok());
        assert!(pool.submit_to(0, vec![request(None)]).await.results[0].is_ok());
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn instances_out_of_service_stop_taking_batches_and_the_last_one_fails_them_fast() {
        let builds = Arc::new(AtomicUsize::new(0));
        let counted = builds.clone();
        let pool = WorkerPool::start(
            "fake:1",
            2,
            |i| format!("fake-{i}"),
            Recycle::default(),
            Arc::new(move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(Fake {
                    broken: false,
                    poisoned: false,
                })
            }),
        )
        .unwrap();
        assert_eq!(pool.out_of_service(), OutOfService::default());
        // The batch that showed the fault gets its own answer; the instance retires.
        assert!(pool
            .submit_to(0, vec![request(Some("poison"))])
            .await
            .results[0]
            .is_ok());
        assert_eq!(pool.out_of_service().instances, 1);
        let pinned = pool.submit_to(0, vec![request(None)]).await;
        let error = pinned.results[0].as_ref().unwrap_err();
        assert!(
            error
                .message
                .contains("instance 0 is out of service (CUDA_ERROR_ILLEGAL_ADDRESS)"),
            "{error:?}"
        );
        for _ in 0..4 {
            assert!(
                pool.submit(vec![request(None)]).await.results[0].is_ok(),
                "instance 1 serves"
            );
        }
        assert!(pool
            .submit_to(1, vec![request(Some("poison"))])
            .await
            .results[0]
            .is_ok());
        let out = pool.out_of_service();
        assert_eq!(out.instances, 2);
        assert_eq!(out.reason.as_deref(), Some("CUDA_ERROR_ILLEGAL_ADDRESS"));
        let refused = pool.submit(vec![request(None)]).await;
        let error = refused.results[0].as_ref().unwrap_err();
        assert_eq!(error.kind, crate::error::ErrorKind::Unavailable);
        assert!(
            error.message.contains("every instance is out of service"),
            "{error:?}"
        );
        assert_eq!(builds.load(Ordering::SeqCst), 2, "never rebuilt");
    }

    #[test]
    fn a_failing_build_fails_the_start_with_its_reason() {
        let started = WorkerPool::start(
            "fake:1",
            3,
            |i| format!("fake-{i}"),
            Recycle::default(),
            Arc::new(|i| {
                if i == 2 {
                    Err(Error::unavailable("no such file"))
                } else {
                    Ok(Fake {
                        broken: false,
                        poisoned: false,
                    })
                }
            }),
        );
        assert_eq!(started.err().unwrap().message, "no such file");
    }

    #[test]
    fn rebuild_delays_double_up_to_the_cap() {
        let r = Recycle::default();
        assert_eq!(r.delay(1), Duration::ZERO);
        assert_eq!(r.delay(2), Duration::from_millis(50));
        assert_eq!(r.delay(3), Duration::from_millis(100));
        assert_eq!(r.delay(40), Duration::from_secs(5));
    }

    #[test]
    fn an_instance_spins_only_while_most_of_its_recent_gaps_were_short() {
        let mut history = SpinHistory::new();
        assert!(history.worth_it());
        // Long gaps: it stops after 9 of the last 16 missed.
        for miss in 1..=9 {
            assert!(history.worth_it(), "after {miss} misses");
            history.record(false);
        }
        assert!(!history.worth_it());
        // One short gap in a while does not bring it back.
        for _ in 0..40 {
            history.record(false);
            history.record(false);
            history.record(true);
            assert!(!history.worth_it());
        }
        // Back-to-back batches again: 8 short gaps in a row and it spins.
        for _ in 0..8 {
            history.record(true);
        }
        assert!(history.worth_it());
    }

    #[test]
    fn an_idle_instance_takes_a_job_that_arrives_while_it_spins() {
        let (own_tx, own_rx) = crossbeam_channel::unbounded::<u32>();
        let (tx, rx) = crossbeam_channel::unbounded::<u32>();
        // Nothing comes: it gives up (then sleeps in select!).
        assert_eq!(spin_for_job(&own_rx, &rx, Duration::from_micros(200)), None);
        assert_eq!(spin_for_job(&own_rx, &rx, Duration::ZERO), None);
        // Pinned jobs first.
        tx.send(1).unwrap();
        own_tx.send(2).unwrap();
        assert_eq!(spin_for_job(&own_rx, &rx, Duration::from_secs(5)), Some(2));
        assert_eq!(spin_for_job(&own_rx, &rx, Duration::from_secs(5)), Some(1));
        // A job sent while it looks is taken (the spin is long; it returns at once).
        let sender = std::thread::spawn(move || tx.send(3).unwrap());
        assert_eq!(spin_for_job(&own_rx, &rx, Duration::from_secs(30)), Some(3));
        sender.join().unwrap();
    }
}
