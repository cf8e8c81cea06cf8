//! `SyncTask`, the handle a handler works with.
//!
//! A `SyncTask` is only ever held by the worker that claimed it. Everything it
//! writes (checkpoints) is fenced by the claim's token (`runs`) and holder, so
//! a holder that lost its lease cannot write.

use crate::control::{Command, Stop};
use crate::outcome::TaskError;
use crate::store;
use crate::task::{ClaimedTask, NewTask, TaskId};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::fmt;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

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
    pub async fn scheduled_for(&self) -> Result<Option<DateTime<Utc>>, TaskError> {
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

    /// Asks for budget before an upstream request after the first (SPEC
    /// §3 Permits): the task's start paid for its first request; each
    /// later one takes a permit from its dataset's rate limit, counted
    /// with every process's starts and permits, exactly, in every window.
    /// A task that never asks costs one unit, as its start.
    ///
    /// Waits while there is no room (the dataset throttled, or its window
    /// full), sleeping until the rows say room may come — no polling
    /// loop — and hears cancel and checkpoint meanwhile. Returns
    /// `TaskError::Cancelled`, `Interrupted` or `LeaseLost` when the
    /// handler must stop, `Retryable` when the deadline passes
    /// ([`PermitRequest::within`]), `Invalid` for more permits at once than
    /// the limit allows.
    ///
    /// ```no_run
    /// # async fn example(task: &mut syncq::SyncTask) -> Result<(), syncq::TaskError> {
    /// use std::time::Duration;
    /// for page in 1..=50 {
    ///     if page > 1 {
    ///         task.permit().within(Duration::from_secs(60)).await?;
    ///     }
    ///     // fetch the page …
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn permit(&mut self) -> PermitRequest<'_> {
        PermitRequest {
            task: self,
            n: 1,
            within: None,
        }
    }

    /// [`permit`](Self::permit) for `n` requests at once (a batch call the
    /// upstream counts as `n`).
    pub fn permits(&mut self, n: u32) -> PermitRequest<'_> {
        PermitRequest {
            task: self,
            n,
            within: None,
        }
    }

    async fn take_permits(&mut self, n: u32, within: Option<Duration>) -> Result<(), TaskError> {
        let n = i32::try_from(n)
            .map_err(|_| TaskError::Invalid(format!("permits: {n} at once is too many")))?;
        let deadline = within.map(|d| tokio::time::Instant::now() + d);
        loop {
            if let Some(stop) = self.stop_requested() {
                return Err(stop.into());
            }
            let answer = store::tasks::take_permit(
                &self.ctx.db,
                &self.ctx.worker_id,
                self.task.id,
                self.task.runs,
                n,
            )
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(d) if d.code().as_deref() == Some("22023") => {
                    TaskError::Invalid(d.message().to_string())
                }
                _ => TaskError::Retryable(format!("taking a permit failed: {e}")),
            })?;
            let wait = match answer {
                None => {
                    self.stop = Some(Stop::LeaseLost);
                    return Err(TaskError::LeaseLost);
                }
                Some(w) if w <= 0.0 => return Ok(()),
                Some(w) => Duration::from_secs_f64(w.min(PERMIT_RECHECK.as_secs_f64())),
            };
            if let Some(deadline) = deadline
                && tokio::time::Instant::now() + wait > deadline
            {
                return Err(TaskError::Retryable(format!(
                    "no permit within {:?}: the dataset's limit has no room for {wait:?} more",
                    within.unwrap_or_default()
                )));
            }
            if let Some(stop) = self.sleep(wait).await {
                return Err(stop.into());
            }
        }
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

/// The longest a permit's wait sleeps before asking again: a limit an
/// operator raises meanwhile is seen within it.
const PERMIT_RECHECK: Duration = Duration::from_secs(5);

/// A request for permits ([`SyncTask::permit`]); `.await` it.
#[must_use = "a permit is only taken when awaited"]
pub struct PermitRequest<'a> {
    task: &'a mut SyncTask,
    n: u32,
    within: Option<Duration>,
}

impl PermitRequest<'_> {
    /// Gives up (`TaskError::Retryable`) when no permit can be had within
    /// `deadline`; by default the wait lasts as long as the task runs.
    pub fn within(mut self, deadline: Duration) -> Self {
        self.within = Some(deadline);
        self
    }
}

impl<'a> IntoFuture for PermitRequest<'a> {
    type Output = Result<(), TaskError>;
    type IntoFuture = std::pin::Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.task.take_permits(self.n, self.within))
    }
}

fn decode<T: DeserializeOwned>(
    value: &Value,
) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
    serde_path_to_error::deserialize(value)
}
