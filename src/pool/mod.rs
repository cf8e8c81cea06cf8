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

mod completer;
mod dispatch;
mod heartbeat;
mod held;
mod listener;
mod runner;
mod sampler;
mod sweeper;

use crate::config::PoolConfig;
use crate::control::Command;
use crate::db::{Db, Outage, Pooler};
use crate::error::{Error, Result};
use crate::manager::{Claimer, TaskQueueManager};
use crate::store;
use crate::task::TaskId;
use crate::worker::SyncWorker;
use sqlx::postgres::PgConnectOptions;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::outcome::OutcomeKind;
use completer::{COMPLETION_BATCH, Request, complete_loop};
use dispatch::dispatch;
use heartbeat::heartbeat_loop;
use held::HeldRuns;
use listener::{cancel_check_loop, listen_loop};
pub use runner::ATTEMPT_LOG;
use sampler::sample_loop;
use sweeper::rescue_loop;

/// What a pool reports to whoever listens (tests, the demo, the bench).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A task was claimed by this pool: started, or leased ahead into its
    /// local queue.
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
    /// A task leased ahead was given back unstarted (it waited too long,
    /// its dataset was paused or limited, the pool stopped), or was found
    /// cancelled or taken by another worker when its slot came.
    NotStarted {
        /// The task.
        task_id: TaskId,
    },
    /// The rescuer of this pool took back a task whose lease expired.
    Rescued {
        /// The task.
        task_id: TaskId,
    },
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
        let mut kinds: Vec<String> = self.handlers.keys().cloned().collect();
        kinds.sort();
        let worker_id: Arc<str> = worker_id.into();
        let (completions, completion_rx) = mpsc::channel(COMPLETION_BATCH * 2);
        let claimer = Claimer {
            worker_id: worker_id.clone(),
            kinds: kinds.clone(),
            datasets: self.config.datasets.clone(),
            lease: self.config.lease,
        };
        let shared = Arc::new(Shared {
            manager: TaskQueueManager::new(self.db.clone()),
            claimer,
            db: self.db,
            direct: self.direct,
            outage: Outage::default(),
            finished: std::sync::atomic::AtomicU64::new(0),
            config: self.config,
            handlers: self.handlers,
            worker_id,
            kinds,
            commands,
            events,
            shutdown: CancellationToken::new(),
            held: Mutex::new(HeldRuns::default()),
            wake: Notify::new(),
            slot_freed: Notify::new(),
            cancel_check: Notify::new(),
            schedules_changed: Arc::new(Notify::new()),
            fatal: Mutex::new(None),
            completions,
            given_back: Mutex::new(std::collections::HashSet::new()),
            held_back: Notify::new(),
            leased_waiting: std::sync::atomic::AtomicUsize::new(0),
        });
        Ok(WorkerPool {
            shared,
            completion_rx,
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
    /// Everything its loops share, made whole by the builder.
    shared: Arc<Shared>,
    /// The completer's end of the successes channel.
    completion_rx: mpsc::Receiver<Request>,
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
    handlers: Handlers,
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
    /// Hands out the tasks (the fleet-wide round robin).
    manager: TaskQueueManager,
    /// This pool's side of its claims: its name, kinds, datasets, lease.
    claimer: Claimer,
    /// Outcomes, and starts of tasks leased ahead, go to the completer,
    /// which writes them in batches.
    completions: mpsc::Sender<Request>,
    /// Datasets heard paused, throttled or limited (NOTIFY
    /// syncq_dataset_held; "" for any), or throttled by a handler here:
    /// the starter gives back their tasks in the local queue unstarted,
    /// until a claim serves them again.
    given_back: Mutex<std::collections::HashSet<String>>,
    /// Wakes the starter to give back what `given_back` names at once.
    held_back: Notify,
    /// Tasks leased ahead in the local queue, not yet started or given back.
    leased_waiting: std::sync::atomic::AtomicUsize,
}

impl Shared {
    fn held(&self) -> std::sync::MutexGuard<'_, HeldRuns> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn given_back(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.given_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
        &self.shared.worker_id
    }

    /// A handle to checkpoint the pool, send commands, and read its events.
    pub fn handle(&self) -> PoolHandle {
        PoolHandle {
            shutdown: self.shared.shutdown.clone(),
            commands: self.shared.commands.clone(),
            events: self.shared.events.clone(),
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
        let WorkerPool {
            shared,
            completion_rx,
        } = self;
        let span = info_span!("worker_pool", worker_id = %shared.worker_id);
        run_pool(shared, completion_rx).instrument(span).await
    }
}

async fn run_pool(shared: Arc<Shared>, completion_rx: mpsc::Receiver<Request>) -> Result<()> {
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
    // A rolling upgrade migrates before every worker is replaced: this one
    // goes on, but says so loudly (README, "Upgrading").
    match crate::schema::newer_versions(&shared.db).await {
        Ok(newer) if !newer.is_empty() => error!(
            versions = ?newer,
            "the database's schema is newer than this build of syncq knows: upgrade this worker"
        ),
        Ok(_) => {}
        Err(e) => debug!(error = %e, "could not read the schema's versions"),
    }
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
    background.spawn(crate::maintenance::scheduler::schedule_loop(
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

/// Longest a busy dispatcher waits for more free slots before claiming,
/// and a busy completer for more successes before writing: short tasks
/// finish in bursts, and one claim (or write) of 60 costs about what one
/// of 1 does.
const COALESCE: Duration = Duration::from_millis(1);

/// Exponential pause after repeated database failures, capped.
fn retry_pause(failures: u32, cap: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << failures.min(6));
    base.min(cap.max(Duration::from_secs(5)))
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
