//! `WorkerPool`: the worker loops of one process.
//!
//! One dispatcher claims tasks in batches up to the free slots, each claimed
//! task runs its handler in its own tokio task (so a panic is caught and an
//! overdue handler can be aborted), and three background loops keep the pool
//! honest: the heartbeat renews leases (and hears cancels it missed), the
//! listener wakes the dispatcher on NOTIFY, the rescuer takes back tasks whose
//! holder went silent.
//!
//! Shutdown (Ctrl-C, SIGTERM, `PoolHandle::checkpoint`, or a `Fatal` error)
//! broadcasts `Command::Checkpoint`, stops claiming, gives running handlers
//! `shutdown_grace` to save progress and return, aborts the rest, and releases
//! every task it still holds back to `queued` with the attempt not counted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgListener};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::PoolConfig;
use crate::control::Command;
use crate::db::{Db, Outage, Pooler};
use crate::error::{Error, Result};
use crate::lease::{self, Lease};
use crate::maintenance::pruner::Pruner;
use crate::maintenance::rescuer::Rescuer;
use crate::maintenance::vacuumer::Vacuumer;
use crate::set_aside::{self, ClaimArgs, SetAside};
use crate::store;
use crate::store::tasks::Fence;
use crate::task::{ClaimedTask, SyncTask, TaskContext, TaskId};
use crate::worker::{SyncWorker, TaskError, TaskResult};

/// The channel an insert trigger notifies.
pub(crate) const CHANNEL_INSERTED: &str = "syncq_task_inserted";
/// The channel the cancel trigger notifies (payload: the task id).
pub(crate) const CHANNEL_CANCEL: &str = "syncq_cancel";
/// Schedules added or changed (migration 0008).
pub(crate) const CHANNEL_SCHEDULES: &str = "syncq_schedules";

/// What a pool reports to whoever listens (tests, the demo, the bench).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A task was claimed by this pool.
    Claimed {
        /// The task.
        task_id: TaskId,
        /// Its dataset.
        dataset_id: String,
        /// Its kind.
        kind: String,
    },
    /// A task's attempt ended here.
    Finished {
        /// The task.
        task_id: TaskId,
        /// What was decided.
        outcome: OutcomeKind,
        /// Whether it was written (false: fenced out, or the database failed).
        recorded: bool,
    },
    /// The rescuer of this pool took back a task whose lease expired.
    Rescued {
        /// The task.
        task_id: TaskId,
    },
}

/// What an attempt's outcome did to its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// `succeeded`.
    Succeeded,
    /// A counted failure: back to `queued` with backoff, or `failed` if none left.
    Retried,
    /// `failed` at once (invalid request).
    Failed,
    /// Back to `queued`, not counted; dataset throttled.
    Throttled,
    /// `cancelled`.
    Cancelled,
    /// Back to `queued`, not counted, checkpoint kept (checkpoint, abort, fatal).
    Released,
    /// Nothing written: another worker holds the task.
    LeaseLost,
}

/// The decision for one finished attempt: SPEC §3 in one `match`.
#[derive(Debug)]
pub(crate) enum Outcome {
    Succeed(Value),
    Retry(String),
    Fail(String),
    Throttle(String, Option<Duration>),
    Cancel,
    Release(Option<String>),
    Fatal(String),
    Abandon,
}

impl Outcome {
    /// Maps a handler's result. `checkpointing`: the pool is shutting down,
    /// so a retryable error is taken as the interruption it most likely is.
    pub(crate) fn of(
        joined: std::result::Result<TaskResult, JoinError>,
        checkpointing: bool,
    ) -> Outcome {
        match joined {
            Ok(Ok(value)) => Outcome::Succeed(value),
            Ok(Err(error)) => match error {
                TaskError::Retryable(_) if checkpointing => Outcome::Release(None),
                TaskError::Retryable(m) => Outcome::Retry(m),
                TaskError::Invalid(m) => Outcome::Fail(format!("invalid: {m}")),
                e @ TaskError::RateLimited { retry_after } => {
                    Outcome::Throttle(e.to_string(), retry_after)
                }
                TaskError::Cancelled => Outcome::Cancel,
                TaskError::Fatal(m) => Outcome::Fatal(m),
                TaskError::Interrupted => Outcome::Release(None),
                TaskError::LeaseLost => Outcome::Abandon,
            },
            Err(e) if e.is_panic() => Outcome::Retry(format!(
                "handler panicked: {}",
                panic_message(e.into_panic())
            )),
            // Aborted after the grace period.
            Err(_) => Outcome::Release(None),
        }
    }

    fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Succeed(_) => OutcomeKind::Succeeded,
            Outcome::Retry(_) => OutcomeKind::Retried,
            Outcome::Fail(_) => OutcomeKind::Failed,
            Outcome::Throttle(..) => OutcomeKind::Throttled,
            Outcome::Cancel => OutcomeKind::Cancelled,
            Outcome::Release(_) | Outcome::Fatal(_) => OutcomeKind::Released,
            Outcome::Abandon => OutcomeKind::LeaseLost,
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

type Handlers = HashMap<String, Arc<dyn SyncWorker>>;

/// Builds a `WorkerPool`: register handlers by kind, adjust the config.
pub struct WorkerPoolBuilder {
    db: Db,
    direct: Option<PgConnectOptions>,
    config: PoolConfig,
    handlers: Handlers,
    worker_id: Option<String>,
}

impl WorkerPoolBuilder {
    /// Handles tasks of `kind` with `handler`. A pool claims only the kinds it
    /// has handlers for.
    pub fn register(mut self, kind: impl Into<String>, handler: impl SyncWorker) -> Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    /// Registers the built-in kinds `noop`, `sleep`, `fail` and `count`.
    pub fn register_builtins(mut self) -> Self {
        for (kind, handler) in crate::builtin::all() {
            self.handlers.insert(kind.to_string(), handler);
        }
        self
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: PoolConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets `concurrency`.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// A direct connection to PostgreSQL, past the transaction-mode pooler
    /// the pool's `Db` goes through, for what needs a session: `LISTEN`
    /// (instant wake-ups and cancels) and the vacuum lock. Without it, a
    /// pool behind a transaction-mode pooler polls (`poll_interval`), hears
    /// cancels at its heartbeat, and leaves vacuuming to autovacuum. Not
    /// needed with direct connections.
    pub fn direct(mut self, options: PgConnectOptions) -> Self {
        self.direct = Some(options);
        self
    }

    /// Sets the worker id (default: `host:pid:random`).
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// Validates and builds the pool.
    pub fn build(self) -> Result<WorkerPool> {
        self.config.validate()?;
        if self.handlers.is_empty() {
            return Err(Error::config(
                "handlers",
                "register at least one handler before building the pool",
            ));
        }
        if let Some(kind) = self
            .handlers
            .keys()
            .find(|k| k.is_empty() || k.contains('\0'))
        {
            return Err(Error::config(
                "handlers",
                format!("kind {kind:?} must be non-empty, without NUL characters"),
            ));
        }
        let worker_id = match self.worker_id {
            Some(id) if id.is_empty() || id.len() > 200 || id.contains('\0') => {
                return Err(Error::config(
                    "worker_id",
                    "must be 1 to 200 bytes long, without NUL characters",
                ));
            }
            Some(id) => id,
            None => format!(
                "{}:{}:{:08x}",
                host_name(),
                std::process::id(),
                rand::random::<u32>()
            ),
        };
        let (commands, _) = broadcast::channel(1024);
        let (events, _) = broadcast::channel(4096);
        Ok(WorkerPool {
            db: self.db,
            direct: self.direct,
            config: self.config,
            handlers: Arc::new(self.handlers),
            worker_id: worker_id.into(),
            commands,
            events,
            shutdown: CancellationToken::new(),
        })
    }
}

pub(crate) fn host_name() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-host".to_string())
}

/// A handle to steer a running pool from elsewhere (tests, signal handlers).
#[derive(Clone)]
pub struct PoolHandle {
    shutdown: CancellationToken,
    commands: broadcast::Sender<Command>,
    events: broadcast::Sender<Event>,
}

impl PoolHandle {
    /// Broadcasts **checkpoint** and stops the pool, as Ctrl-C does.
    pub fn checkpoint(&self) {
        self.shutdown.cancel();
    }

    /// Sends a command to the running handlers.
    pub fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// Subscribes to the pool's events.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// One run of a task this pool holds: its id and `runs` at claim (the
/// fencing token). Keyed by both, so a task this process lost and claimed
/// again is two entries, each hearing about its own lease.
type RunKey = (TaskId, i32);

/// A run this pool holds.
#[derive(Debug, Clone)]
struct Held {
    /// Its lease as last renewed.
    lease: Lease,
    /// No longer renewed: this pool claimed the task again (a newer run),
    /// or the lease ran out while the database was unreachable.
    superseded: bool,
    /// Its outcome is being written: if the heartbeat no longer finds it
    /// running, that is the write landing, not a lost lease.
    finishing: bool,
    /// A cancel was heard for it: a task still in the local queue then
    /// ends cancelled without starting its handler.
    cancel_heard: bool,
}

/// The runs this pool holds, with each task's newest run at hand (a claim
/// must find an older run of the same task without scanning them all).
#[derive(Debug, Default)]
struct HeldRuns {
    runs: HashMap<RunKey, Held>,
    /// The newest run of each task held here.
    newest: HashMap<TaskId, i32>,
}

impl HeldRuns {
    /// Adds a newly claimed run. Returns the run of the same task it
    /// supersedes, if one was still held and not yet given up: the new
    /// claim proves that one lost its lease.
    fn claimed(&mut self, (id, runs): RunKey, held: Held) -> Option<i32> {
        self.runs.insert((id, runs), held);
        let older = self
            .newest
            .insert(id, runs)
            .filter(|older| *older != runs)?;
        let h = self.runs.get_mut(&(id, older))?;
        if h.superseded {
            return None;
        }
        h.superseded = true;
        Some(older)
    }

    /// The run's outcome is written (or given up): it is no longer held.
    fn finished(&mut self, (id, runs): RunKey) {
        self.runs.remove(&(id, runs));
        if self.newest.get(&id) == Some(&runs) {
            self.newest.remove(&id);
        }
    }

    fn holds(&self, id: TaskId) -> bool {
        self.newest.contains_key(&id)
    }

    /// A cancel of the task was heard: marks its newest run.
    fn cancel_heard(&mut self, id: TaskId) {
        if let Some(runs) = self.newest.get(&id).copied()
            && let Some(held) = self.runs.get_mut(&(id, runs))
        {
            held.cancel_heard = true;
        }
    }
}

impl std::ops::Deref for HeldRuns {
    type Target = HashMap<RunKey, Held>;

    fn deref(&self) -> &Self::Target {
        &self.runs
    }
}

impl std::ops::DerefMut for HeldRuns {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.runs
    }
}

/// The set of worker loops in one process. See the module docs.
///
/// ```no_run
/// # async fn example(db: sqlx::PgPool) -> syncq::Result<()> {
/// use syncq::WorkerPool;
///
/// let pool = WorkerPool::builder(db)
///     .register_builtins()
///     .concurrency(8)
///     .build()?;
/// pool.run_with_signals().await?; // until Ctrl-C / SIGTERM
/// # Ok(()) }
/// ```
pub struct WorkerPool {
    db: Db,
    direct: Option<PgConnectOptions>,
    config: PoolConfig,
    handlers: Arc<Handlers>,
    worker_id: Arc<str>,
    commands: broadcast::Sender<Command>,
    events: broadcast::Sender<Event>,
    shutdown: CancellationToken,
}

/// What the pool's tasks share.
struct Shared {
    db: Db,
    /// A direct connection for session work, when `db` goes through a
    /// transaction-mode pooler.
    direct: Option<PgConnectOptions>,
    /// Logs database outages once each.
    outage: Outage,
    /// Attempts this process finished: maintenance runs more often while
    /// it grows.
    finished: std::sync::atomic::AtomicU64,
    config: PoolConfig,
    handlers: Arc<Handlers>,
    worker_id: Arc<str>,
    kinds: Vec<String>,
    commands: broadcast::Sender<Command>,
    events: broadcast::Sender<Event>,
    shutdown: CancellationToken,
    /// Runs this pool holds.
    held: Mutex<HeldRuns>,
    wake: Notify,
    /// A handler returned: its slot is free for the local queue's next
    /// task, so a dispatcher whose local queue was full may claim again.
    /// (Not `wake`: an idle dispatcher woken for this finds nothing new,
    /// and wake-ups that find nothing are rationed.)
    slot_freed: Notify,
    /// A cancel notification arrived for a task this pool holds: look at
    /// the rows (the notification itself proves nothing).
    cancel_check: Notify,
    /// A schedule was added or changed (NOTIFY): the scheduler looks again.
    schedules_changed: Arc<Notify>,
    fatal: Mutex<Option<(TaskId, String)>>,
    /// Successes go to the completer, which writes them in batches.
    completions: mpsc::Sender<Completion>,
}

/// A success waiting to be written by the completer.
struct Completion {
    id: TaskId,
    runs: i32,
    result: Value,
    /// Whether it was written (false: fenced out), or why not.
    reply: oneshot::Sender<std::result::Result<bool, CompleteError>>,
}

/// Why a success was not written.
#[derive(Debug, Clone)]
enum CompleteError {
    /// The database refused this task's result (a data error): writing it
    /// again cannot help.
    Refused(String),
    /// The write failed; `transient`: for want of a database (worth trying
    /// again while the lease lasts).
    Failed { message: String, transient: bool },
}

impl CompleteError {
    fn of(e: &sqlx::Error) -> Self {
        match e {
            // SQLSTATE class 22: data exception (e.g. a NUL in jsonb).
            sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("22")) => {
                CompleteError::Refused(d.message().to_string())
            }
            e => CompleteError::Failed {
                message: e.to_string(),
                transient: crate::db::is_transient(e),
            },
        }
    }

    /// A reason to try again soon (the completer stopped, the row was locked).
    fn again(message: &str) -> Self {
        CompleteError::Failed {
            message: message.to_string(),
            transient: true,
        }
    }
}

impl std::fmt::Display for CompleteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompleteError::Refused(m) => write!(f, "result refused: {m}"),
            CompleteError::Failed { message, .. } => f.write_str(message),
        }
    }
}

impl lease::Failure for CompleteError {
    fn is_transient(&self) -> bool {
        matches!(
            self,
            CompleteError::Failed {
                transient: true,
                ..
            }
        )
    }

    fn timed_out() -> Self {
        CompleteError::again("writing the success timed out")
    }
}

/// Most successes written by one statement.
const COMPLETION_BATCH: usize = 500;

impl Shared {
    fn held(&self) -> std::sync::MutexGuard<'_, HeldRuns> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn datasets(&self) -> Option<&[String]> {
        self.config.datasets.as_deref()
    }

    /// Whether this pool holds some run of task `id`.
    fn holds(&self, id: TaskId) -> bool {
        self.held().holds(id)
    }

    /// Options for a session of its own (`LISTEN`, the vacuum lock): the
    /// direct connection if one was given, else the pool's own — unless
    /// that goes through a transaction-mode pooler.
    fn session_options(&self) -> Option<PgConnectOptions> {
        match (&self.direct, self.db.pooler()) {
            (Some(direct), _) => Some(direct.clone()),
            (None, Pooler::None) => Some((*self.db.pool().connect_options()).clone()),
            (None, Pooler::Transaction) => None,
        }
    }
}

impl WorkerPool {
    /// Starts building a pool on a database connection pool. The connection
    /// pool needs room for the claim loop, the heartbeat, the listener and one
    /// connection per concurrently saving handler.
    pub fn builder(db: impl Into<Db>) -> WorkerPoolBuilder {
        WorkerPoolBuilder {
            db: db.into(),
            direct: None,
            config: PoolConfig::default(),
            handlers: HashMap::new(),
            worker_id: None,
        }
    }

    /// This process's worker id, as in `syncq.tasks.locked_by`.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// A handle to checkpoint the pool, send commands, and read its events.
    pub fn handle(&self) -> PoolHandle {
        PoolHandle {
            shutdown: self.shutdown.clone(),
            commands: self.commands.clone(),
            events: self.events.clone(),
        }
    }

    /// Runs until Ctrl-C or SIGTERM (then checkpoints), a `Fatal` error, or
    /// `exit_when_idle`.
    pub async fn run_with_signals(self) -> Result<()> {
        let handle = self.handle();
        let signals = tokio::spawn(async move {
            wait_for_signal().await;
            info!("signal received: checkpointing running tasks");
            handle.checkpoint();
        });
        let result = self.run().await;
        signals.abort();
        result
    }

    /// Runs until `PoolHandle::checkpoint`, a `Fatal` error (returned as
    /// `Error::Fatal` after the checkpoint), or `exit_when_idle`.
    pub async fn run(self) -> Result<()> {
        let mut kinds: Vec<String> = self.handlers.keys().cloned().collect();
        kinds.sort();
        let (completions, completion_rx) = mpsc::channel(COMPLETION_BATCH * 2);
        let shared = Arc::new(Shared {
            db: self.db,
            direct: self.direct,
            outage: Outage::default(),
            finished: std::sync::atomic::AtomicU64::new(0),
            config: self.config,
            handlers: self.handlers,
            worker_id: self.worker_id,
            kinds,
            commands: self.commands,
            events: self.events,
            shutdown: self.shutdown,
            held: Mutex::new(HeldRuns::default()),
            wake: Notify::new(),
            slot_freed: Notify::new(),
            cancel_check: Notify::new(),
            schedules_changed: Arc::new(Notify::new()),
            fatal: Mutex::new(None),
            completions,
        });
        let span = info_span!("worker_pool", worker_id = %shared.worker_id);
        run_pool(shared, completion_rx).instrument(span).await
    }
}

async fn run_pool(shared: Arc<Shared>, completion_rx: mpsc::Receiver<Completion>) -> Result<()> {
    let concurrency = i32::try_from(shared.config.concurrency).unwrap_or(i32::MAX);
    store::workers::register(
        &shared.db,
        store::workers::Registration {
            worker_id: &shared.worker_id,
            host: &host_name(),
            pid: i32::try_from(std::process::id()).unwrap_or(0),
            kinds: &shared.kinds,
            datasets: shared.datasets(),
            concurrency,
            heartbeat: shared.config.heartbeat,
        },
    )
    .await?;
    info!(kinds = %shared.kinds.join(","), concurrency, "worker pool started");
    // A typo in --datasets would otherwise wait in silence.
    for dataset in shared.datasets().unwrap_or_default() {
        match store::datasets::known(&shared.db, dataset).await {
            Ok(true) => {}
            Ok(false) => warn!(
                dataset = %dataset,
                "no task and no settings for this dataset yet: this worker waits for its first task"
            ),
            Err(e) => debug!(error = %e, "could not look the dataset up"),
        }
    }

    let background_stop = CancellationToken::new();
    let mut background = JoinSet::new();
    background.spawn(heartbeat_loop(shared.clone(), background_stop.clone()));
    if let Some(every) = shared.config.metrics_sample_interval {
        background.spawn(sample_loop(shared.clone(), every, background_stop.clone()));
    }
    background.spawn(rescue_loop(shared.clone(), background_stop.clone()));
    background.spawn(crate::schedule::schedule_loop(
        shared.db.clone(),
        shared.schedules_changed.clone(),
        background_stop.clone(),
    ));
    background.spawn(complete_loop(
        shared.clone(),
        completion_rx,
        background_stop.clone(),
    ));
    if shared.config.listen {
        match shared.session_options() {
            Some(options) => {
                background.spawn(listen_loop(
                    shared.clone(),
                    options,
                    background_stop.clone(),
                ));
                background.spawn(cancel_check_loop(shared.clone(), background_stop.clone()));
            }
            None => info!(
                poll_interval = ?shared.config.poll_interval,
                "behind a transaction-mode pooler with no direct connection: polling for work, hearing cancels at the heartbeat"
            ),
        }
    }

    let hard_stop = CancellationToken::new();
    let running = TaskTracker::new();
    dispatch(&shared, &running, &hard_stop).await;
    running.close();

    // Checkpoint: tell every handler, give them the grace period, then abort.
    let _ = shared.commands.send(Command::Checkpoint);
    shared.shutdown.cancel();
    let held = running.len();
    if held > 0 {
        info!(
            held,
            grace = ?shared.config.shutdown_grace,
            "checkpoint: waiting for running handlers to save progress"
        );
    }
    let drained = tokio::time::timeout(shared.config.shutdown_grace, running.wait()).await;
    if drained.is_err() {
        warn!(
            left = running.len(),
            "grace period over: aborting handlers and releasing their tasks"
        );
        hard_stop.cancel();
        running.wait().await;
    }

    background_stop.cancel();
    while background.join_next().await.is_some() {}
    if let Err(e) = store::workers::deregister(&shared.db, &shared.worker_id).await {
        warn!(error = %e, "could not remove this worker's registry row");
    }
    let fatal = shared
        .fatal
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    match fatal {
        Some((task_id, message)) => Err(Error::Fatal { task_id, message }),
        None => {
            info!("worker pool stopped");
            Ok(())
        }
    }
}

/// The claim loop: wait for room, claim up to that many, hand each task to
/// a run that starts it as soon as a slot is free.
///
/// Room is the free slots plus a local queue (`prefetch`): tasks leased
/// ahead, waiting here for a slot in claim order (the slots semaphore is
/// first come, first served). They are leased like running ones — renewed
/// by the heartbeat, counted against caps and rate limits, handed back
/// uncounted if the pool stops before they start — so the local queue
/// only changes how many claims a drain takes, not what a claim means.
/// Its size follows the pool's pace ([`Pace`]): short tasks drain in a few
/// large claims; slow ones keep almost nothing waiting.
async fn dispatch(shared: &Arc<Shared>, running: &TaskTracker, hard_stop: &CancellationToken) {
    let concurrency = shared.config.concurrency;
    let prefetch = shared.config.prefetch;
    // Handlers running.
    let slots = Arc::new(Semaphore::new(concurrency));
    // Tasks held here, running or waiting for a slot.
    let room = Arc::new(Semaphore::new(concurrency + prefetch));
    // Claims sent and not yet answered.
    let mut in_flight: FuturesUnordered<JoinHandle<Claimed>> = FuturesUnordered::new();
    // The local queue: claimed tasks, in claim order, to the starter.
    let (queue, queued) = mpsc::unbounded_channel();
    let starter = tokio::spawn(start_loop(
        shared.clone(),
        slots.clone(),
        queued,
        running.clone(),
        hard_stop.clone(),
    ));
    let local = Local {
        shared,
        queue: &queue,
        room: &room,
        slots: &slots,
    };
    claim_loop(&local, &mut in_flight).await;
    // Stopping. Claims still in flight commit all the same: their tasks go
    // through the local queue, which hands them back unstarted and
    // uncounted, as the ones that were waiting there.
    let mut unsure = false;
    while let Some(answer) = in_flight.next().await {
        match answer {
            Ok(Claimed {
                asked_at,
                permits,
                result: Ok(tasks),
                ..
            }) => local.take(tasks, permits, asked_at),
            _ => unsure = true,
        }
    }
    if unsure && let Err(e) = release_orphans(shared).await {
        warn!(error = %e, "looking for tasks of a claim lost while stopping failed; the rescuer will take them back");
    }
    drop(queue);
    if let Err(e) = starter.await {
        error!(error = %e, "the local queue's starter ended abnormally");
    }
}

/// What the claim loop hands its claims to.
struct Local<'a> {
    shared: &'a Arc<Shared>,
    queue: &'a mpsc::UnboundedSender<Waiting>,
    room: &'a Arc<Semaphore>,
    slots: &'a Arc<Semaphore>,
}

/// A claimed task in the local queue, waiting for a slot.
struct Waiting {
    task: ClaimedTask,
    lease: Lease,
    room: OwnedSemaphorePermit,
}

impl Local<'_> {
    /// Registers claimed tasks as held and queues them, in claim order.
    fn take(
        &self,
        tasks: Vec<ClaimedTask>,
        permits: Vec<OwnedSemaphorePermit>,
        asked_at: tokio::time::Instant,
    ) {
        let shared = self.shared;
        for (task, room) in tasks.into_iter().zip(permits) {
            let lease = Lease::new(asked_at, shared.config.lease);
            let older = shared.held().claimed(
                (task.id, task.runs),
                Held {
                    lease: lease.clone(),
                    superseded: false,
                    finishing: false,
                    cancel_heard: false,
                },
            );
            if let Some(runs) = older {
                // The task went back to `queued` before this claim.
                warn!(
                    task_id = task.id,
                    runs, "claimed again here: the older run lost its lease"
                );
                let _ = shared.commands.send(Command::LeaseLost {
                    task_id: task.id,
                    runs,
                });
            }
            shared.emit(Event::Claimed {
                task_id: task.id,
                dataset_id: task.dataset_id.clone(),
                kind: task.kind.clone(),
            });
            // The starter outlives the claim loop: a send cannot fail.
            let _ = self.queue.send(Waiting { task, lease, room });
        }
    }

    /// Nothing held here: no task running, waiting or being recorded.
    fn is_empty(&self) -> bool {
        self.room.available_permits()
            == self.shared.config.concurrency + self.shared.config.prefetch
    }
}

/// Starts the local queue's tasks in claim order, each as a slot frees
/// (the slots semaphore is first come, first served, and this is its one
/// waiter). Once the pool stops, starts nothing more: the rest go to runs
/// that hand them back unstarted and uncounted.
async fn start_loop(
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    mut queued: mpsc::UnboundedReceiver<Waiting>,
    running: TaskTracker,
    hard_stop: CancellationToken,
) {
    while let Some(waiting) = queued.recv().await {
        let slot = tokio::select! {
            biased;
            slot = slots.clone().acquire_owned() => slot.ok(),
            _ = shared.shutdown.cancelled() => None,
        };
        running.spawn(run_task(shared.clone(), waiting, slot, hard_stop.clone()));
    }
}

/// The claim loop: wait for room, claim up to that much, queue the tasks.
async fn claim_loop(local: &Local<'_>, in_flight: &mut FuturesUnordered<JoinHandle<Claimed>>) {
    let shared = local.shared;
    let room = local.room;
    let slots = local.slots;
    let concurrency = shared.config.concurrency;
    let prefetch = shared.config.prefetch;
    let mut pace = Pace::new();
    let mut db_failures: u32 = 0;
    let mut lost_races: u32 = 0;
    // Wake-ups in a row that found nothing to claim (see WAKE_FLOOR).
    let mut empty_wakes: u32 = 0;
    let mut woken = false;
    let mut set_aside = SetAside::new(shared.config.set_aside);
    // A claim failed: its answer may have been lost after it committed.
    let mut claim_unsure = false;
    // The last empty claim was told nothing is due but new work: until
    // something claims or wakes us, a timed poll is one claim, not two
    // statements.
    let mut nothing_due = false;
    // Claims in flight: two at most, the second only while claims come
    // back full (a busy pool's next claim overlaps the previous one's
    // round trip and commit).
    let mut busy_claims = false;
    loop {
        // A second claim only while claims come back full and when it is
        // worth a claim (a claim's fixed cost is most of a small one's).
        let may_claim = (in_flight.is_empty()
            || (in_flight.len() < 2
                && busy_claims
                && room.available_permits() >= (concurrency + pace.last()).div_ceil(4)))
            // Orphans are looked for with no claim in flight (see release_orphans).
            && (!claim_unsure || in_flight.is_empty());
        let answer = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return,
            answer = in_flight.next(), if !in_flight.is_empty() => answer,
            permit = room.clone().acquire_owned(), if may_claim => {
                let Ok(first) = permit else { return };
                let mut permits = vec![first];
                // Ahead of its slots by no more than its pace warrants.
                let ahead = pace.allowance(&shared.finished, prefetch);
                gather_permits(room, &mut permits, concurrency + ahead).await;
                // Held here beyond the running handlers (waiting for a slot,
                // or asked for by a claim in flight).
                let held_here = concurrency + prefetch - room.available_permits() - permits.len();
                let busy = concurrency - slots.available_permits();
                let waiting = held_here.saturating_sub(busy);
                let wanted = (slots.available_permits() + ahead).saturating_sub(waiting);
                if wanted == 0 {
                    // Every slot busy and the local queue full enough: wait
                    // for a run to end (each one wakes the dispatcher), or
                    // for the claim in flight.
                    drop(permits);
                    if in_flight.is_empty() {
                        tokio::select! {
                            _ = shared.slot_freed.notified() => {}
                            _ = shared.wake.notified() => {}
                            _ = tokio::time::sleep(COALESCE * 5) => {}
                            _ = shared.shutdown.cancelled() => return,
                        }
                    }
                    continue;
                }
                permits.truncate(wanted);
                if claim_unsure {
                    match release_orphans(shared).await {
                        Ok(released) => {
                            claim_unsure = false;
                            if released > 0 {
                                warn!(
                                    released,
                                    "tasks claimed by a claim whose answer was lost went back to queued, uncounted"
                                );
                            }
                        }
                        Err(e) => {
                            db_failures += 1;
                            let pause = retry_pause(db_failures, shared.config.poll_interval);
                            shared
                                .outage
                                .failed("looking for tasks of a lost claim", &e);
                            drop(permits);
                            tokio::select! {
                                _ = tokio::time::sleep(pause) => continue,
                                _ = shared.shutdown.cancelled() => return,
                            }
                        }
                    }
                }
                // Its own task: the round trip goes on while the dispatcher
                // starts the next claim or handles the previous answer.
                let skip = set_aside.current();
                in_flight.push(tokio::spawn(send_claim(shared.clone(), skip, permits)));
                continue;
            }
        };
        let Some(answer) = answer else { continue };
        let Claimed {
            asked_at,
            skip,
            permits,
            result: claimed,
        } = match answer {
            Ok(answer) => answer,
            Err(e) => {
                // The claim's task panicked or was cancelled: whatever it
                // may have claimed is found as orphans.
                error!(error = %e, "a claim's task ended without an answer");
                claim_unsure = true;
                continue;
            }
        };
        let claim = ClaimArgs {
            worker_id: &shared.worker_id,
            kinds: &shared.kinds,
            datasets: shared.datasets(),
            skip: &skip,
            limit: permits.len() as i64,
            lease: shared.config.lease,
        };
        let tasks = match claimed {
            Ok(tasks) => {
                db_failures = 0;
                shared.outage.ok();
                tasks
            }
            // One dataset's rows must not stop the others being served:
            // find it, name it, leave it out for a while.
            Err(e) if set_aside::may_be_one_dataset(&e) => {
                match set_aside::find_failing(&shared.db, &claim).await {
                    Ok(failing) if !failing.is_empty() => {
                        for (dataset, reason) in failing {
                            error!(
                                dataset = %dataset,
                                error = %reason,
                                set_aside_for = ?shared.config.set_aside,
                                "claiming from this dataset fails: setting it aside, serving the others"
                            );
                            set_aside.add(dataset);
                        }
                        drop(permits);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "looking for the dataset that fails claims failed"),
                }
                db_failures += 1;
                let pause = retry_pause(db_failures, shared.config.poll_interval);
                error!(error = %e, retry_in = ?pause, "claiming tasks failed");
                drop(permits);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = shared.shutdown.cancelled() => return,
                }
            }
            Err(e) => {
                db_failures += 1;
                claim_unsure = true;
                let pause = retry_pause(db_failures, shared.config.poll_interval);
                shared.outage.failed("claiming tasks", &e);
                drop(permits);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = shared.shutdown.cancelled() => return,
                }
            }
        };
        busy_claims = tasks.len() == permits.len() && tasks.len() > 1;
        if !tasks.is_empty() {
            lost_races = 0;
            empty_wakes = 0;
            nothing_due = false;
            debug!(
                claimed = tasks.len(),
                asked = permits.len(),
                micros = u64::try_from(asked_at.elapsed().as_micros()).unwrap_or(u64::MAX),
                "claimed tasks"
            );
            local.take(tasks, permits, asked_at);
            continue;
        }
        drop(permits);
        if !in_flight.is_empty() {
            // Another claim is on its way: its answer decides what next.
            continue;
        }

        // Nothing claimed. Ask how long until something may be: now (every
        // claimable dataset was locked by another claimer at that instant:
        // retry soon rather than wait for a wake-up that may never come), a
        // throttle / rate budget / delayed task (sleep until then, not in a
        // busy loop), or only new work (wait for a NOTIFY or the poll).
        let mut wait = shared.config.poll_interval;
        let next = if woken || !nothing_due {
            store::tasks::next_claim_in(&shared.db, &shared.kinds, shared.datasets(), &skip).await
        } else {
            // Asked after an earlier empty claim and nothing since: work
            // that came meanwhile without a NOTIFY (polling) is found by
            // the next poll.
            Ok(None)
        };
        nothing_due = matches!(next, Ok(None));
        match next {
            Ok(Some(d)) if d.is_zero() => {
                wait = Duration::from_millis(5 + rand::random::<u64>() % 20);
                // "Ready now" yet nothing claimed, again and again: a
                // dataset's ready_at may be stale (see refresh_ready).
                lost_races += 1;
                if lost_races >= 3 {
                    lost_races = 0;
                    match store::tasks::refresh_ready(&shared.db, shared.datasets()).await {
                        Ok(0) => {}
                        Ok(n) => debug!(datasets = n, "repaired stale ready_at"),
                        Err(e) => warn!(error = %e, "repairing ready_at failed"),
                    }
                }
            }
            Ok(Some(d)) => wait = wait.min(d + Duration::from_millis(2)),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "asking when work is next ready failed"),
        }
        if shared.config.exit_when_idle && local.is_empty() {
            let horizon = PoolConfig::IDLE_HORIZON.as_secs_f64();
            match store::tasks::leftover(&shared.db, &shared.kinds, shared.datasets(), horizon)
                .await
            {
                Ok(left) if left.running == 0 && left.soon == 0 => {
                    info!(
                        waiting = %describe_leftover(&left),
                        "nothing left to run: stopping (exit_when_idle)"
                    );
                    return;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "counting the tasks left failed"),
            }
        }
        if woken {
            empty_wakes = empty_wakes.saturating_add(1);
        } else {
            empty_wakes = 0;
        }
        if empty_wakes >= 3 {
            // Any role that can connect may NOTIFY: a flood of wake-ups
            // with nothing behind them is answered at most every
            // WAKE_FLOOR, not with a claim per notification.
            tokio::select! {
                _ = tokio::time::sleep(WAKE_FLOOR.min(wait)) => {}
                _ = shared.shutdown.cancelled() => return,
            }
        }
        woken = tokio::select! {
            _ = shared.wake.notified() => true,
            _ = tokio::time::sleep(wait) => false,
            _ = shared.shutdown.cancelled() => return,
        };
    }
}

/// A claim's answer, with what it was asked with.
struct Claimed {
    asked_at: tokio::time::Instant,
    skip: Vec<String>,
    permits: Vec<OwnedSemaphorePermit>,
    result: sqlx::Result<Vec<ClaimedTask>>,
}

/// Sends one claim for as many tasks as `permits` hold room for.
async fn send_claim(
    shared: Arc<Shared>,
    skip: Vec<String>,
    permits: Vec<OwnedSemaphorePermit>,
) -> Claimed {
    let asked_at = tokio::time::Instant::now();
    let result = store::tasks::claim(
        &shared.db,
        &shared.worker_id,
        &shared.kinds,
        shared.datasets(),
        &skip,
        permits.len() as i64,
        shared.config.lease,
    )
    .await;
    crate::metrics::claim_round_trip(asked_at.elapsed());
    Claimed {
        asked_at,
        skip,
        permits,
        result,
    }
}

/// What an idle worker leaves behind, in words: "none", or e.g. "3 tasks
/// in paused datasets ("x"); 1 task due from 2026-…".
fn describe_leftover(left: &store::tasks::Leftover) -> String {
    let mut parts = Vec::new();
    if left.paused > 0 {
        parts.push(format!(
            "{} task(s) in paused dataset(s) {:?} (`syncq resume` them)",
            left.paused, left.paused_datasets
        ));
    }
    if let (n @ 1.., Some(from)) = (left.later, left.later_from) {
        parts.push(format!(
            "{n} task(s) delayed or throttled, the first due at {}",
            from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ));
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join("; ")
    }
}

/// Hands back, uncounted, the tasks running in this worker's name that no
/// run here holds: a claim that committed but whose answer was lost to a
/// dropped connection, or a run given up during an outage whose release
/// could not be written then. Only the dispatcher claims, and it calls
/// this between claims, so every claim it heard of is in `held`.
async fn release_orphans(shared: &Shared) -> sqlx::Result<usize> {
    let mut released = 0;
    for (id, runs) in store::tasks::running_as(&shared.db, &shared.worker_id).await? {
        if shared.held().contains_key(&(id, runs)) {
            continue;
        }
        let fence = Fence {
            id,
            runs,
            worker_id: &shared.worker_id,
        };
        if store::tasks::release(&shared.db, fence, None).await? {
            released += 1;
        }
    }
    Ok(released)
}

/// Shortest pause between claims woken for nothing, once three wake-ups
/// in a row found nothing to claim.
const WAKE_FLOOR: Duration = Duration::from_millis(20);

/// Longest a busy dispatcher waits for more free slots before claiming,
/// and a busy completer for more successes before writing: short tasks
/// finish in bursts, and one claim (or write) of 60 costs about what one
/// of 1 does.
const COALESCE: Duration = Duration::from_millis(1);

/// Adds free room, up to `most`, to `permits`. While other tasks are
/// held, waits up to [`COALESCE`] for half of `most` to be free, so a busy
/// pool claims in batches instead of one task per freed slot. An idle pool
/// (all room free) claims at once.
async fn gather_permits(
    room: &Arc<Semaphore>,
    permits: &mut Vec<OwnedSemaphorePermit>,
    most: usize,
) {
    let target = most.div_ceil(2);
    let deadline = tokio::time::Instant::now() + COALESCE;
    loop {
        while permits.len() < most {
            match room.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        if permits.len() >= target {
            return;
        }
        tokio::select! {
            permit = room.clone().acquire_owned() => match permit {
                Ok(p) => permits.push(p),
                Err(_) => return,
            },
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// A pool's recent pace: attempts finished per second, over windows of
/// [`Pace::WINDOW`]. It sizes the local queue: about
/// [`PoolConfig::PREFETCH_HORIZON`] of work, so a prefetched task waits
/// for a slot about that long at most, whatever the tasks' length.
struct Pace {
    since: std::time::Instant,
    at: u64,
    /// Finished per second in the last whole window.
    rate: f64,
    last: usize,
}

impl Pace {
    const WINDOW: Duration = Duration::from_millis(100);

    fn new() -> Self {
        Pace {
            since: std::time::Instant::now(),
            at: 0,
            rate: 0.0,
            last: 0,
        }
    }

    /// The last allowance given.
    fn last(&self) -> usize {
        self.last
    }

    /// How many tasks to lease ahead of the free slots now, at most `most`.
    fn allowance(&mut self, finished: &std::sync::atomic::AtomicU64, most: usize) -> usize {
        if most == 0 {
            return 0;
        }
        let now = finished.load(std::sync::atomic::Ordering::Relaxed);
        let elapsed = self.since.elapsed();
        let done = now.saturating_sub(self.at) as f64;
        let current = done / elapsed.max(Self::WINDOW).as_secs_f64();
        if elapsed >= Self::WINDOW {
            self.rate = done / elapsed.as_secs_f64();
            self.since = std::time::Instant::now();
            self.at = now;
        }
        let ahead = self.rate.max(current) * PoolConfig::PREFETCH_HORIZON.as_secs_f64();
        self.last = (ahead.ceil() as usize).min(most);
        self.last
    }
}

/// Exponential pause after repeated database failures, capped.
fn retry_pause(failures: u32, cap: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << failures.min(6));
    base.min(cap.max(Duration::from_secs(5)))
}

/// The log target of each attempt's start and end, at info (the worker's
/// default level), inside the `task` span: task_id, dataset, kind,
/// attempt, run; the end adds the outcome and its duration. A busy queue
/// that wants fewer lines turns them off alone:
/// `RUST_LOG=syncq=info,syncq::attempt=warn`.
pub const ATTEMPT_LOG: &str = "syncq::attempt";

/// Runs one claimed task in its slot to an outcome and records it,
/// fenced. Without a slot (the pool stopped while it waited) it hands the
/// task back, unstarted and uncounted.
async fn run_task(
    shared: Arc<Shared>,
    waiting: Waiting,
    slot: Option<OwnedSemaphorePermit>,
    hard_stop: CancellationToken,
) {
    let Waiting { task, lease, room } = waiting;
    let span = info_span!(
        "task",
        task_id = task.id,
        dataset = %task.dataset_id,
        kind = %task.kind,
        attempt = task.attempts,
        run = task.runs
    );
    async {
        let key = (task.id, task.runs);
        // Lost while it waited (the heartbeat could not renew it in an
        // outage, or this pool claimed it again): never started here.
        let (lost, cancelled) = shared.held().get(&key).map_or((true, false), |held| {
            (held.superseded || held.lease.expired(), held.cancel_heard)
        });
        crate::metrics::task_started(&task);
        info!(target: ATTEMPT_LOG, "attempt started");
        let began = std::time::Instant::now();
        let joined = match shared.handlers.get(&task.kind).cloned() {
            _ if lost => Ok(Err(TaskError::LeaseLost)),
            // Cancelled while it waited in the local queue: never started.
            _ if cancelled => Ok(Err(TaskError::Cancelled)),
            // Claimed as the pool began to stop (a claim can race the
            // shutdown), or still waiting for a slot then: hand it
            // straight back, unstarted and uncounted.
            _ if shared.shutdown.is_cancelled() || slot.is_none() => {
                Ok(Err(TaskError::Interrupted))
            }
            Some(handler) => {
                let ctx = TaskContext {
                    db: shared.db.clone(),
                    worker_id: shared.worker_id.clone(),
                    commands: shared.commands.clone(),
                    checkpoint: shared.shutdown.clone(),
                    lease: lease.clone(),
                };
                let mut sync_task = SyncTask::new(task.clone(), ctx);
                let mut handle = tokio::spawn(
                    async move { handler.handle(&mut sync_task).await }.in_current_span(),
                );
                tokio::select! {
                    biased;
                    joined = &mut handle => joined,
                    _ = hard_stop.cancelled() => {
                        handle.abort();
                        handle.await
                    }
                }
            }
            // Unreachable in practice: the claim only asks for registered kinds.
            None => Ok(Err(TaskError::Invalid(format!(
                "no handler for kind {:?}",
                task.kind
            )))),
        };
        let outcome = Outcome::of(joined, shared.shutdown.is_cancelled());
        let kind = outcome.kind();
        crate::metrics::task_finished(&task, kind, began.elapsed());
        if let Some(held) = shared.held().get_mut(&key) {
            held.finishing = true;
        }
        // The handler is done: its slot is free for the next task while
        // the outcome is written (in a batch, for successes). The task
        // keeps its room, and its row stays `running`, until then.
        drop(slot);
        shared.slot_freed.notify_one();
        let recorded = record(&shared, &task, &lease, outcome).await;
        shared.held().finished(key);
        shared
            .finished
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(
            target: ATTEMPT_LOG,
            outcome = ?kind,
            recorded,
            millis = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
            "attempt ended"
        );
        drop(room);
        // A slot of a capped dataset may have freed: let an idle dispatcher look.
        shared.wake.notify_one();
        shared.emit(Event::Finished {
            task_id: task.id,
            outcome: kind,
            recorded,
        });
    }
    .instrument(span)
    .await
}

/// Writes an outcome, fenced. While the database is unreachable it keeps
/// trying, with backoff, for as long as the lease lasts — the heartbeat
/// goes on renewing it meanwhile, so an outage shorter than the lease
/// costs nothing: the task ends as its handler decided. Only once the
/// lease may have run out (another worker may own the task) is the outcome
/// given up, and the rescuer takes the task back.
async fn record(shared: &Shared, task: &ClaimedTask, lease: &Lease, outcome: Outcome) -> bool {
    let fence = Fence {
        id: task.id,
        runs: task.runs,
        worker_id: &shared.worker_id,
    };
    if let Outcome::Fatal(message) = &outcome {
        error!(error = %message, "fatal error: checkpointing and stopping the pool");
        let mut fatal = shared.fatal.lock().unwrap_or_else(PoisonError::into_inner);
        fatal.get_or_insert((task.id, message.clone()));
        shared.shutdown.cancel();
    }
    let written = match &outcome {
        // Lost to another worker (the release is fenced out), or given
        // up when the lease ran out in an outage: if the task is still in
        // this worker's name, it goes back uncounted, checkpoint kept.
        Outcome::Abandon => {
            match store::tasks::release(&shared.db, fence, None).await {
                Ok(true) => {
                    info!("lease ran out unrenewed: the task went back to queued, uncounted")
                }
                Ok(false) => info!("lease lost: another worker owns this task now"),
                Err(e) => {
                    debug!(error = %e, "handing back a task whose lease ran out failed; the rescuer will")
                }
            }
            return false;
        }
        Outcome::Succeed(value) => {
            let completed =
                lease::while_held(lease, || complete(shared, task, value.clone())).await;
            match completed {
                Ok(written) => Ok(written),
                // Storing this result can never work: the attempt fails.
                Err(CompleteError::Refused(reason)) => {
                    let error = format!(
                        "the handler succeeded but its result could not be stored: {reason}"
                    );
                    warn!(%error, "result refused by the database");
                    lease::while_held(lease, || {
                        store::tasks::fail_attempt(&shared.db, fence, &error, false, Duration::ZERO)
                    })
                    .await
                }
                Err(e) => Err(sqlx::Error::Protocol(e.to_string())),
            }
        }
        other => {
            lease::while_held(lease, || {
                write_outcome(&shared.db, fence, other, task.attempts, &shared.config)
            })
            .await
        }
    };
    match written {
        Ok(true) => {
            shared.outage.ok();
            debug!(outcome = ?outcome.kind(), "attempt recorded");
            true
        }
        Ok(false) => {
            warn!(outcome = ?outcome.kind(), "outcome not recorded: this worker no longer holds the task");
            false
        }
        Err(e) => {
            error!(
                error = %e,
                outcome = ?outcome.kind(),
                "could not record the outcome before the lease ran out: giving it up; the rescuer takes the task back"
            );
            false
        }
    }
}

/// Writes one outcome with its fenced statement: SPEC §3's table, for the
/// pool (which batches successes itself) and `syncq::testing`. `attempts`
/// is the task's counted attempts at claim, for the backoff. False: fenced
/// out (or `Abandon`, which writes nothing).
pub(crate) async fn write_outcome(
    db: &Db,
    fence: Fence<'_>,
    outcome: &Outcome,
    attempts: i32,
    config: &PoolConfig,
) -> sqlx::Result<bool> {
    match outcome {
        Outcome::Succeed(value) => {
            let row = [(fence.id, fence.runs, value.clone())];
            let written = store::tasks::succeed_many(db, fence.worker_id, &row).await?;
            Ok(written.contains(&fence.id))
        }
        Outcome::Retry(m) => {
            let delay = config.backoff.delay(u32::try_from(attempts).unwrap_or(0));
            store::tasks::fail_attempt(db, fence, m, true, delay).await
        }
        Outcome::Fail(m) => store::tasks::fail_attempt(db, fence, m, false, Duration::ZERO).await,
        Outcome::Throttle(m, retry_after) => {
            let wait = retry_after.unwrap_or(config.default_retry_after);
            store::tasks::rate_limited(db, fence, m, wait).await
        }
        Outcome::Cancel => store::tasks::cancel_running(db, fence).await,
        Outcome::Release(error) => store::tasks::release(db, fence, error.as_deref()).await,
        Outcome::Fatal(m) => {
            let error = format!("fatal: {m}");
            store::tasks::release(db, fence, Some(&error)).await
        }
        Outcome::Abandon => Ok(false),
    }
}

/// Hands a success to the completer and waits until it is written.
async fn complete(
    shared: &Shared,
    task: &ClaimedTask,
    result: Value,
) -> std::result::Result<bool, CompleteError> {
    let (reply, written) = oneshot::channel();
    let request = Completion {
        id: task.id,
        runs: task.runs,
        result,
        reply,
    };
    let stopped = || CompleteError::again("the completer has stopped");
    if shared.completions.send(request).await.is_err() {
        return Err(stopped());
    }
    written.await.unwrap_or_else(|_| Err(stopped()))
}

/// Writes successes in batches: whatever has arrived while the previous
/// batch was being written goes in the next statement, so a busy pool
/// commits once per batch and an idle one writes each success at once.
async fn complete_loop(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<Completion>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            request = requests.recv() => match request {
                Some(r) => r,
                None => return,
            },
            _ = stop.cancelled() => return,
        };
        let mut batch = vec![first];
        // While more tasks are running than this batch holds, give their
        // successes a moment to arrive and share the write.
        let deadline = tokio::time::Instant::now() + COALESCE;
        while batch.len() < COMPLETION_BATCH {
            match requests.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) if shared.held().len() > batch.len() => {
                    match tokio::time::timeout_at(deadline, requests.recv()).await {
                        Ok(Some(r)) => batch.push(r),
                        _ => break,
                    }
                }
                Err(_) => break,
            }
        }
        let rows: Vec<(TaskId, i32, Value)> = batch
            .iter_mut()
            .map(|r| (r.id, r.runs, std::mem::take(&mut r.result)))
            .collect();
        // The same task twice (a run that lost its lease and this pool's
        // newer claim of it): one statement cannot fence both, so the batch
        // goes one by one, as a refused batch does.
        let distinct: HashSet<TaskId> = rows.iter().map(|r| r.0).collect();
        let written = if distinct.len() == rows.len() {
            store::tasks::succeed_many(&shared.db, &shared.worker_id, &rows).await
        } else {
            Err(sqlx::Error::Protocol("a task twice in one batch".into()))
        };
        debug!(batch = batch.len(), "wrote successes");
        match written {
            Ok(ids) => {
                // Not written: fenced out, or skipped because another
                // transaction had the row locked (then it is still ours,
                // and record() writes it again).
                let (left, left_runs): (Vec<TaskId>, Vec<i32>) = batch
                    .iter()
                    .filter(|r| !ids.contains(&r.id))
                    .map(|r| (r.id, r.runs))
                    .unzip();
                let locked = if left.is_empty() {
                    Vec::new()
                } else {
                    store::tasks::still_held(&shared.db, &shared.worker_id, &left, &left_runs)
                        .await
                        .map(|held| held.into_iter().map(|t| t.id).collect())
                        .unwrap_or_else(|_| left.clone())
                };
                for request in batch {
                    let reply = if ids.contains(&request.id) {
                        Ok(true)
                    } else if locked.contains(&request.id) {
                        Err(CompleteError::again(
                            "its row is locked by another transaction",
                        ))
                    } else {
                        Ok(false)
                    };
                    let _ = request.reply.send(reply);
                }
            }
            // One refused result fails the whole statement: write each
            // success on its own, so only that task's write fails.
            Err(e)
                if batch.len() > 1
                    && (distinct.len() < rows.len()
                        || matches!(CompleteError::of(&e), CompleteError::Refused(_))) =>
            {
                warn!(error = %e, batch = batch.len(), "a batch of successes was refused; writing them one by one");
                for (request, row) in batch.into_iter().zip(rows) {
                    let one =
                        store::tasks::succeed_many(&shared.db, &shared.worker_id, &[row]).await;
                    let _ = request.reply.send(match one {
                        Ok(ids) => Ok(ids.contains(&request.id)),
                        Err(e) => Err(CompleteError::of(&e)),
                    });
                }
            }
            Err(e) => {
                let error = CompleteError::of(&e);
                for request in batch {
                    let _ = request.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Renews the leases this pool holds and its registry row; tells handlers
/// whose lease is gone, and re-announces cancels (in case a NOTIFY was
/// missed). While the database is unreachable it beats more often, so the
/// leases are renewed as soon as it is back; a run whose lease may have
/// run out meanwhile is given up (its handler hears `LeaseLost`), since
/// another worker may own the task by then.
async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let lease = shared.config.lease;
    loop {
        let every = if shared.outage.is_down() {
            shared.config.heartbeat.min(OUTAGE_HEARTBEAT)
        } else {
            shared.config.heartbeat
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        // No beat may wait longer than a beat for the database (a pool
        // waiting for a connection would otherwise hold it past leases
        // that need giving up).
        let beat = shared.config.heartbeat;
        let sent_at = tokio::time::Instant::now();
        match within(
            beat,
            store::workers::heartbeat(&shared.db, &shared.worker_id),
        )
        .await
        {
            Ok(()) => shared.outage.ok(),
            Err(e) => shared.outage.failed("the worker heartbeat", &e),
        }
        // The current run of each task (an older one was superseded by a
        // newer claim here and is not renewed).
        let current: Vec<(RunKey, Lease)> = shared
            .held()
            .iter()
            .filter(|(_, h)| !h.superseded)
            .map(|(key, h)| (*key, h.lease.clone()))
            .collect();
        if current.is_empty() {
            continue;
        }
        let (ids, runs): (Vec<TaskId>, Vec<i32>) = current.iter().map(|(key, _)| *key).unzip();
        let renewed = match within(
            beat,
            store::tasks::renew_leases(&shared.db, &shared.worker_id, &ids, &runs, lease),
        )
        .await
        {
            Ok(renewed) => renewed,
            Err(e) => {
                shared.outage.failed("renewing leases", &e);
                give_up_expired(&shared, &current);
                continue;
            }
        };
        shared.outage.ok();
        let renewed: HashMap<TaskId, bool> =
            renewed.iter().map(|r| (r.id, r.cancel_requested)).collect();
        // Not renewed: lost, or its row was locked elsewhere just now (then
        // it is renewed at the next beat).
        let missing: Vec<RunKey> = current
            .iter()
            .map(|(key, _)| *key)
            .filter(|(id, _)| !renewed.contains_key(id))
            .collect();
        let locked: HashSet<TaskId> = if missing.is_empty() {
            HashSet::new()
        } else {
            let (m_ids, m_runs): (Vec<TaskId>, Vec<i32>) = missing.iter().copied().unzip();
            match within(
                beat,
                store::tasks::still_held(&shared.db, &shared.worker_id, &m_ids, &m_runs),
            )
            .await
            {
                Ok(held) => held.into_iter().map(|t| t.id).collect(),
                Err(e) => {
                    shared.outage.failed("checking leases not renewed", &e);
                    m_ids.into_iter().collect()
                }
            }
        };
        for ((id, runs), held_lease) in &current {
            match renewed.get(id) {
                Some(cancel) => {
                    held_lease.renewed(sent_at, lease);
                    if *cancel {
                        shared.held().cancel_heard(*id);
                        let _ = shared.commands.send(Command::Cancel(*id));
                    }
                }
                None if locked.contains(id) => {}
                // Finished meanwhile, or lost: only the latter is still
                // held and not being recorded (a success just written is
                // still held until its reply).
                None if shared
                    .held()
                    .get(&(*id, *runs))
                    .is_some_and(|h| !h.finishing) =>
                {
                    warn!(task_id = id, runs, "lease lost");
                    let _ = shared.commands.send(Command::LeaseLost {
                        task_id: *id,
                        runs: *runs,
                    });
                }
                None => {}
            }
        }
        give_up_expired(&shared, &current);
    }
}

/// `query`, or a timeout error once `limit` has passed.
async fn within<T>(
    limit: Duration,
    query: impl std::future::Future<Output = sqlx::Result<T>>,
) -> sqlx::Result<T> {
    tokio::time::timeout(limit, query)
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// How often the heartbeat beats while the database is unreachable.
const OUTAGE_HEARTBEAT: Duration = Duration::from_millis(500);

/// Tells the handlers of runs whose lease may have run out (the database
/// was unreachable to renew it) to stop: another worker may own the task
/// now. A run whose outcome is being written gives itself up (`record`).
fn give_up_expired(shared: &Shared, current: &[(RunKey, Lease)]) {
    for ((id, runs), lease) in current {
        if !lease.expired() {
            continue;
        }
        let mut held = shared.held();
        let Some(h) = held.get_mut(&(*id, *runs)) else {
            continue;
        };
        if h.finishing || h.superseded {
            continue;
        }
        // Once: it is no longer renewed, and its handler is stopping.
        h.superseded = true;
        drop(held);
        warn!(
            task_id = id,
            runs, "lease ran out while the database was unreachable: stopping the handler"
        );
        let _ = shared.commands.send(Command::LeaseLost {
            task_id: *id,
            runs: *runs,
        });
    }
}

/// Samples per-dataset queue gauges from SQL for the metrics.
async fn sample_loop(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    let mut seen: HashSet<String> = HashSet::new();
    loop {
        match store::inspect::queue_depths(&shared.db).await {
            Ok(rows) => {
                let now: HashSet<String> = rows.iter().map(|r| r.0.clone()).collect();
                for (dataset, queued, running, age) in &rows {
                    crate::metrics::queue_sample(dataset, *queued, *running, *age);
                }
                // A dataset that emptied reads 0, not its last value.
                for gone in seen.difference(&now) {
                    crate::metrics::queue_sample(gone, 0, 0, 0.0);
                }
                seen = now;
            }
            Err(e) => warn!(error = %e, "sampling queue depths failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The maintenance sweep of every process. Every `rescue_interval` it
/// takes back tasks whose holders went silent. The tidying — pruning old
/// finished tasks, the rate log and dead workers, and the vacuum check —
/// runs when this process has finished tasks since it last tidied (or is
/// behind), and otherwise only every [`IDLE_TIDY_EVERY`]: an idle fleet
/// costs the database next to nothing.
async fn rescue_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let rescuer = Rescuer::new(shared.config.rescue_interval);
    let pruner = Pruner::new(shared.config.retention);
    let vacuumer = Vacuumer::default();
    let mut last_vacuum_check: Option<(tokio::time::Instant, u64)> = None;
    let mut last_tidy: Option<(tokio::time::Instant, u64)> = None;
    let mut behind = false;
    loop {
        // A pruner that is behind (a fast drain finishes more tasks per
        // interval than one sweep deletes) sweeps again soon, so the table
        // stays bounded.
        let delay = if behind {
            Duration::from_millis(100)
        } else {
            rescuer.next_delay()
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
        match rescuer.run_once(&shared.db).await {
            Ok(rescued) if !rescued.is_empty() => {
                for task in rescued {
                    shared.emit(Event::Rescued { task_id: task.id });
                }
                shared.wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => shared.outage.failed("rescuing expired leases", &e),
        }
        let finished = shared.finished.load(std::sync::atomic::Ordering::Relaxed);
        let due = |last: Option<(tokio::time::Instant, u64)>, busy_every: Duration| match last {
            None => true,
            Some((at, seen)) => {
                at.elapsed() >= IDLE_TIDY_EVERY || (seen != finished && at.elapsed() >= busy_every)
            }
        };
        if behind || due(last_tidy, Duration::ZERO) {
            last_tidy = Some((tokio::time::Instant::now(), finished));
            behind = match pruner.run_once(&shared.db).await {
                Ok(report) => report.more,
                Err(e) => {
                    shared.outage.failed("pruning", &e);
                    false
                }
            };
        }
        if shared.config.vacuum && due(last_vacuum_check, Duration::from_secs(1)) {
            last_vacuum_check = Some((tokio::time::Instant::now(), finished));
            if let Err(e) = vacuumer.run_once(&shared.db, shared.direct.as_ref()).await {
                shared.outage.failed("vacuuming", &e);
            }
        }
    }
}

/// How often an idle process (one that finished no task since) prunes and
/// checks for vacuuming.
const IDLE_TIDY_EVERY: Duration = Duration::from_secs(60);

/// LISTEN for inserts (wake the dispatcher) and cancels (tell the handler).
/// Reconnects on failure; wakes the dispatcher after a reconnect in case a
/// notification was missed meanwhile.
async fn listen_loop(shared: Arc<Shared>, options: PgConnectOptions, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        // Raced against the stop: connecting during an outage can take
        // the whole acquire timeout.
        let connected = tokio::select! {
            connected = connect_listener(&options) => connected,
            _ = stop.cancelled() => return,
        };
        let mut listener = match connected {
            Ok(l) => {
                if failures > 0 {
                    info!("LISTEN re-established");
                }
                failures = 0;
                l
            }
            Err(e) => {
                failures += 1;
                let pause = retry_pause(failures, Duration::from_secs(5));
                if failures == 1 {
                    warn!(error = %e, "LISTEN failed: polling until it is back");
                } else {
                    debug!(error = %e, retry_in = ?pause, "LISTEN failed again");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        shared.wake.notify_one();
        loop {
            let notification = tokio::select! {
                n = listener.try_recv() => n,
                _ = stop.cancelled() => return,
            };
            match notification {
                // Anyone who can connect can NOTIFY: a hint to read the
                // rows, never a command (SPEC §2 Privileges).
                Ok(Some(n)) if n.channel() == CHANNEL_SCHEDULES => {
                    shared.schedules_changed.notify_one();
                }
                Ok(Some(n)) if n.channel() == CHANNEL_CANCEL => {
                    if let Ok(id) = n.payload().parse::<TaskId>()
                        && shared.holds(id)
                    {
                        shared.cancel_check.notify_one();
                    }
                }
                Ok(Some(_)) => shared.wake.notify_one(),
                // Connection lost: reconnect (and wake, in case we missed one).
                Ok(None) => {
                    shared.wake.notify_one();
                    continue;
                }
                Err(e) => {
                    debug!(error = %e, "LISTEN connection failed: reconnecting");
                    break;
                }
            }
        }
    }
}

/// Tells handlers whose task's row says `cancel_requested`, when a cancel
/// notification names a task this pool holds. One query answers for every
/// held task; a flood of notifications costs at most one query per
/// [`CANCEL_CHECK_EVERY`]. The heartbeat reads the same column, so a missed
/// notification delays a cancel by one heartbeat at most.
async fn cancel_check_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = shared.cancel_check.notified() => {}
            _ = stop.cancelled() => return,
        }
        let (ids, runs): (Vec<TaskId>, Vec<i32>) = shared
            .held()
            .iter()
            .filter(|(_, h)| !h.superseded)
            .map(|(key, _)| *key)
            .unzip();
        if !ids.is_empty() {
            match store::tasks::still_held(&shared.db, &shared.worker_id, &ids, &runs).await {
                Ok(held) => {
                    for task in held.into_iter().filter(|t| t.cancel_requested) {
                        shared.held().cancel_heard(task.id);
                        let _ = shared.commands.send(Command::Cancel(task.id));
                    }
                }
                Err(e) => warn!(error = %e, "reading cancel requests failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CANCEL_CHECK_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Shortest pause between two cancel checks.
const CANCEL_CHECK_EVERY: Duration = Duration::from_millis(50);

async fn connect_listener(options: &PgConnectOptions) -> sqlx::Result<PgListener> {
    // A pool of one of its own, as `PgListener::connect` makes: it only
    // serves reconnecting, and it keeps the session off the main pool
    // (which may go through a transaction-mode pooler).
    let session = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.clone())
        .await?;
    let mut listener = PgListener::connect_with(&session).await?;
    listener.ignore_pool_close_event(true);
    listener
        .listen_all([CHANNEL_INSERTED, CHANNEL_CANCEL, CHANNEL_SCHEDULES])
        .await?;
    Ok(listener)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
