//! `SyncTask`, the handle a handler works with, and the types that describe
//! tasks: `TaskId`, `TaskStatus`, `NewTask`.
//!
//! A `SyncTask` is only ever held by the worker that claimed it. Everything it
//! writes (checkpoints) is fenced by the claim's token (`runs`) and holder, so
//! a holder that lost its lease cannot write.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::control::{Command, Stop};
use crate::store;
use crate::worker::TaskError;

/// A task's id (`syncq.tasks.id`).
pub type TaskId = i64;

/// `syncq.task_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Waiting to run: new, delayed, or waiting to retry.
    Queued,
    /// Held by a worker.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished without success; will not be retried unless asked.
    Failed,
    /// Cancelled before it could finish.
    Cancelled,
}

impl TaskStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [TaskStatus; 5] = [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    /// The status as spelled in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the task is finished.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                format!("unknown status {s:?} (expected queued, running, succeeded, failed or cancelled)")
            })
    }
}

/// When a new task may first run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RunAt {
    /// As soon as possible (the database's `now()`).
    Now,
    /// This long after the database's `now()` at insert.
    After(Duration),
    /// At this instant.
    At(DateTime<Utc>),
}

/// A task to enqueue. Only the dataset and kind are required.
///
/// ```
/// use syncq::NewTask;
/// use std::time::Duration;
///
/// let task = NewTask::new("github", "fetch_page")
///     .payload(serde_json::json!({ "page": 1 }))
///     .priority(-1)
///     .delay(Duration::from_secs(30))
///     .unique_key("github:page:1");
/// assert_eq!(task.kind, "fetch_page");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// The dataset (`TaskQueue`) it belongs to.
    pub dataset_id: String,
    /// The handler kind.
    pub kind: String,
    /// Handler input.
    pub payload: Value,
    /// Lower runs first within a dataset.
    pub priority: i16,
    /// When it may first run.
    pub run_at: RunAt,
    /// Attempts allowed, at least 1.
    pub max_attempts: i32,
    /// At most one queued or running task per `(dataset_id, unique_key)`.
    pub unique_key: Option<String>,
}

impl NewTask {
    /// The default `max_attempts`, as in the table's default.
    pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;

    /// A task of `kind` in `dataset_id`, with an empty object as payload.
    pub fn new(dataset_id: impl Into<String>, kind: impl Into<String>) -> Self {
        NewTask {
            dataset_id: dataset_id.into(),
            kind: kind.into(),
            payload: Value::Object(Default::default()),
            priority: 0,
            run_at: RunAt::Now,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            unique_key: None,
        }
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }

    /// Sets the priority (lower runs first).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Delays the first run by `delay` (from the database clock).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.run_at = RunAt::After(delay);
        self
    }

    /// Sets the first run to an instant.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = RunAt::At(at);
        self
    }

    /// Sets the number of attempts allowed.
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets the unique key.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// Largest `max_attempts` (the column's constraint).
    pub const MAX_ATTEMPTS_LIMIT: i32 = 10_000;

    /// The range of a `delay` (about 100 years at most).
    pub const DELAY_RANGE: crate::config::DurationRange = crate::config::DurationRange {
        min: Duration::ZERO,
        max: Duration::from_secs(36_500 * 86_400),
    };

    pub(crate) fn validate(&self) -> crate::Result<()> {
        if let RunAt::After(delay) = self.run_at
            && !Self::DELAY_RANGE.contains(delay)
        {
            return Err(crate::Error::InvalidTask(format!(
                "delay must be {}",
                Self::DELAY_RANGE.describe()
            )));
        }
        if self.max_attempts > Self::MAX_ATTEMPTS_LIMIT {
            return Err(crate::Error::InvalidTask(format!(
                "max_attempts must be at most {}, got {}",
                Self::MAX_ATTEMPTS_LIMIT,
                self.max_attempts
            )));
        }
        if self.dataset_id.is_empty() {
            return Err(crate::Error::InvalidTask(
                "dataset_id must not be empty".into(),
            ));
        }
        if self.kind.is_empty() {
            return Err(crate::Error::InvalidTask("kind must not be empty".into()));
        }
        if self.max_attempts < 1 {
            return Err(crate::Error::InvalidTask(format!(
                "max_attempts must be at least 1, got {}",
                self.max_attempts
            )));
        }
        Ok(())
    }
}

/// What a claim hands to a worker: the row's fields a handler may read.
#[derive(Debug, Clone)]
pub struct ClaimedTask {
    /// `id`.
    pub id: TaskId,
    /// `dataset_id`.
    pub dataset_id: String,
    /// `kind`.
    pub kind: String,
    /// `payload`.
    pub payload: Value,
    /// `priority`.
    pub priority: i16,
    /// `attempts`, this one included.
    pub attempts: i32,
    /// `max_attempts`.
    pub max_attempts: i32,
    /// `runs` after this claim: the fencing token.
    pub runs: i32,
    /// `checkpoint` saved by an earlier attempt.
    pub checkpoint: Option<Value>,
    /// `created_at`.
    pub created_at: DateTime<Utc>,
    /// `started_at` of this attempt.
    pub started_at: DateTime<Utc>,
}

/// What a `SyncTask` needs from its pool.
#[derive(Clone)]
pub(crate) struct TaskContext {
    pub db: crate::db::Db,
    pub worker_id: Arc<str>,
    pub commands: broadcast::Sender<Command>,
    pub checkpoint: CancellationToken,
    /// This run's lease, as the pool last renewed it.
    pub lease: crate::lease::Lease,
}

/// One claimed task, as its handler sees it.
///
/// It gives the payload, the last checkpoint, a fenced `save_checkpoint`, and
/// the commands of the pool's broadcast channel that concern this task.
pub struct SyncTask {
    task: ClaimedTask,
    ctx: TaskContext,
    commands: broadcast::Receiver<Command>,
    stop: Option<Stop>,
}

impl fmt::Debug for SyncTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncTask")
            .field("id", &self.task.id)
            .field("dataset_id", &self.task.dataset_id)
            .field("kind", &self.task.kind)
            .field("attempt", &self.task.attempts)
            .finish()
    }
}

impl SyncTask {
    pub(crate) fn new(task: ClaimedTask, ctx: TaskContext) -> Self {
        let commands = ctx.commands.subscribe();
        SyncTask {
            task,
            ctx,
            commands,
            stop: None,
        }
    }

    /// Which claim of the task this run is (`runs`): the fencing token its
    /// writes carry. A run that lost its lease and a later run of the same
    /// task differ here.
    pub fn run(&self) -> i32 {
        self.task.runs
    }

    /// The task's id.
    pub fn id(&self) -> TaskId {
        self.task.id
    }

    /// The dataset (`TaskQueue`) it belongs to.
    pub fn dataset_id(&self) -> &str {
        &self.task.dataset_id
    }

    /// Its kind.
    pub fn kind(&self) -> &str {
        &self.task.kind
    }

    /// Its priority.
    pub fn priority(&self) -> i16 {
        self.task.priority
    }

    /// Which attempt this is, counting from 1 (only counted attempts).
    pub fn attempt(&self) -> i32 {
        self.task.attempts
    }

    /// How many attempts are allowed.
    pub fn max_attempts(&self) -> i32 {
        self.task.max_attempts
    }

    /// When it was enqueued (database clock).
    pub fn created_at(&self) -> DateTime<Utc> {
        self.task.created_at
    }

    /// When this attempt started (database clock).
    pub fn started_at(&self) -> DateTime<Utc> {
        self.task.started_at
    }

    /// The raw payload.
    pub fn payload(&self) -> &Value {
        &self.task.payload
    }

    /// The payload decoded as `T`. A mismatch is `TaskError::Invalid` with a
    /// message naming the field, e.g. `invalid payload for kind "sleep": ms:
    /// invalid type: string "x", expected u64`.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, TaskError> {
        decode(&self.task.payload).map_err(|e| {
            TaskError::Invalid(format!(
                "invalid payload for kind {:?}: {e}",
                self.task.kind
            ))
        })
    }

    /// The progress saved by an earlier attempt (or by this one), if any.
    pub fn checkpoint(&self) -> Option<&Value> {
        self.task.checkpoint.as_ref()
    }

    /// The checkpoint decoded as `T`; a mismatch is `TaskError::Invalid`.
    pub fn checkpoint_as<T: DeserializeOwned>(&self) -> Result<Option<T>, TaskError> {
        match &self.task.checkpoint {
            None | Some(Value::Null) => Ok(None),
            Some(v) => decode(v).map(Some).map_err(|e| {
                TaskError::Invalid(format!(
                    "invalid checkpoint for kind {:?}: {e}",
                    self.task.kind
                ))
            }),
        }
    }

    /// The tick this task was enqueued for, if a schedule enqueued it
    /// (`scheduled_for`; the schedule is [`Self::schedule_id`]'s). Read
    /// from its row, so it costs a query; a database error is retryable.
    pub async fn scheduled_for(&self) -> Result<Option<chrono::DateTime<chrono::Utc>>, TaskError> {
        store::schedules::tick_of(&self.ctx.db, self.task.id)
            .await
            .map(|tick| tick.map(|(_, at)| at))
            .map_err(|e| TaskError::Retryable(format!("reading the task's tick failed: {e}")))
    }

    /// The schedule that enqueued this task, if one did (a query, as
    /// [`Self::scheduled_for`]).
    pub async fn schedule_id(&self) -> Result<Option<String>, TaskError> {
        store::schedules::tick_of(&self.ctx.db, self.task.id)
            .await
            .map(|tick| tick.map(|(id, _)| id))
            .map_err(|e| TaskError::Retryable(format!("reading the task's schedule failed: {e}")))
    }

    /// Saves progress durably, at once. The next attempt receives it.
    ///
    /// Fenced: if this worker no longer holds the task it returns
    /// `TaskError::LeaseLost` and writes nothing.
    pub async fn save_checkpoint<T: Serialize + ?Sized>(
        &mut self,
        progress: &T,
    ) -> Result<(), TaskError> {
        let value = serde_json::to_value(progress)
            .map_err(|e| TaskError::Invalid(format!("checkpoint is not JSON: {e}")))?;
        // Through a database outage shorter than the lease, the save
        // waits for the database rather than failing the attempt.
        let saved = crate::lease::while_held(&self.ctx.lease, || {
            store::tasks::save_checkpoint(
                &self.ctx.db,
                self.task.id,
                self.task.runs,
                &self.ctx.worker_id,
                &value,
            )
        })
        .await
        .map_err(|e| TaskError::Retryable(format!("saving the checkpoint failed: {e}")))?;
        if !saved {
            self.stop = Some(Stop::LeaseLost);
            return Err(TaskError::LeaseLost);
        }
        self.task.checkpoint = Some(value);
        Ok(())
    }

    /// Enqueues a follow-up task (the next page, a fan-out) and returns its
    /// id. A database error is retryable, as for any `?` in a handler.
    ///
    /// Not in the task's transaction: if this attempt later fails and is
    /// retried, the follow-up is enqueued again — give it a `unique_key`
    /// to make that a no-op.
    pub async fn enqueue(&self, task: NewTask) -> Result<TaskId, TaskError> {
        crate::TaskQueueManager::new(self.ctx.db.clone())
            .enqueue(task)
            .await
            .map_err(|e| match e {
                crate::Error::InvalidTask(m) => TaskError::Invalid(m),
                e => TaskError::Retryable(format!("enqueueing a follow-up failed: {e}")),
            })
    }

    /// Whether the handler has been asked to stop, without waiting.
    pub fn stop_requested(&mut self) -> Option<Stop> {
        if self.stop.is_none() && self.ctx.checkpoint.is_cancelled() {
            self.stop = Some(Stop::Checkpoint);
        }
        while self.stop.is_none() {
            match self.commands.try_recv() {
                Ok(command) => self.stop = self.concerns(command),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
        self.stop
    }

    /// Waits until the handler is asked to stop: a checkpoint of the whole
    /// pool, a cancel of this task, or the loss of its lease.
    ///
    /// Cancel-safe: use it in `tokio::select!` beside the work.
    pub async fn stopped(&mut self) -> Stop {
        if let Some(stop) = self.stop_requested() {
            return stop;
        }
        loop {
            tokio::select! {
                _ = self.ctx.checkpoint.cancelled() => {
                    self.stop = Some(Stop::Checkpoint);
                    return Stop::Checkpoint;
                }
                command = self.commands.recv() => match command {
                    Ok(command) => {
                        if let Some(stop) = self.concerns(command) {
                            self.stop = Some(stop);
                            return stop;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    // The pool is gone: only a checkpoint can follow.
                    Err(broadcast::error::RecvError::Closed) => {
                        self.ctx.checkpoint.cancelled().await;
                        self.stop = Some(Stop::Checkpoint);
                        return Stop::Checkpoint;
                    }
                },
            }
        }
    }

    /// Sleeps for `duration` unless asked to stop first; returns the reason
    /// to stop, if any. The building block of well-behaved long handlers.
    pub async fn sleep(&mut self, duration: Duration) -> Option<Stop> {
        tokio::select! {
            _ = tokio::time::sleep(duration) => self.stop_requested(),
            stop = self.stopped() => Some(stop),
        }
    }

    fn concerns(&self, command: Command) -> Option<Stop> {
        match command {
            Command::Checkpoint => Some(Stop::Checkpoint),
            Command::Cancel(id) if id == self.task.id => Some(Stop::Cancel),
            Command::LeaseLost { task_id, runs }
                if task_id == self.task.id && runs == self.task.runs =>
            {
                Some(Stop::LeaseLost)
            }
            _ => None,
        }
    }
}

fn decode<T: DeserializeOwned>(
    value: &Value,
) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
    serde_path_to_error::deserialize(value)
}
