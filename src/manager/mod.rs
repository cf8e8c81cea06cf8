//! `TaskQueueManager`: the entry point to the queues of a database.
//!
//! It takes tasks in (one, many in one round trip, or `COPY`), hands work
//! out, and gives the `TaskQueue` of each dataset. Handing out is
//! round-robin across the datasets that have ready work, fleet-wide: every
//! `WorkerPool` claims through `TaskQueueManager::claim`, one statement
//! (`syncq.claim`, docs/claim.md) in which each dataset's turn lives in its
//! row, so fairness, caps and rate limits hold across processes. A dataset
//! whose rows make claims fail is found and set aside by the claimer
//! (`set_aside`) so the others keep being served.

pub mod inspect;
pub(crate) mod set_aside;

use std::sync::Arc;
use std::time::Duration;

use crate::db::Db;

use crate::error::Result;
use crate::queue::TaskQueue;
use crate::store;
use crate::task::{NewTask, TaskId, TaskStatus};

/// How many times a batch is re-asked for ids of duplicates that committed
/// concurrently (each try sees a newer snapshot).
const DUPLICATE_LOOKUPS: usize = 5;

/// Who claims, and what it serves: a worker's side of a claim.
#[derive(Debug, Clone)]
pub(crate) struct Claimer {
    /// `locked_by` of what it claims.
    pub worker_id: Arc<str>,
    /// The kinds it has handlers for.
    pub kinds: Vec<String>,
    /// The datasets it serves (`None`: all).
    pub datasets: Option<Vec<String>>,
    /// How long a claimed task is leased before a renewal.
    pub lease: Duration,
}

impl Claimer {
    pub(crate) fn datasets(&self) -> Option<&[String]> {
        self.datasets.as_deref()
    }
}

/// Enqueues tasks, hands them out, and gives access to each dataset's `TaskQueue`.
///
/// ```no_run
/// # async fn example(db: sqlx::PgPool) -> syncq::Result<()> {
/// use syncq::{NewTask, TaskQueueManager};
///
/// let manager = TaskQueueManager::new(db);
/// let id = manager
///     .enqueue(NewTask::new("github", "fetch_page").payload(serde_json::json!({"page": 1})))
///     .await?;
/// let ids = manager
///     .enqueue_many((2..=10).map(|page| {
///         NewTask::new("github", "fetch_page").payload(serde_json::json!({ "page": page }))
///     }))
///     .await?;
/// assert_eq!(ids.len(), 9);
/// # let _ = id; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TaskQueueManager {
    db: Db,
}

impl TaskQueueManager {
    /// Creates or replaces a periodic schedule (SPEC §2 `syncq.schedules`):
    /// every worker process's scheduler enqueues one task per tick.
    ///
    /// ```no_run
    /// # async fn example(db: sqlx::PgPool) -> syncq::Result<()> {
    /// use syncq::{Schedule, TaskQueueManager, Timing};
    /// let manager = TaskQueueManager::new(db);
    /// manager
    ///     .schedule(Schedule::new("github-hourly", "github", "sync", Timing::Cron("0 * * * *".into())))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn schedule(&self, schedule: crate::schedule::Schedule) -> Result<()> {
        schedule.validate()?;
        store::schedules::upsert(&self.db, &schedule).await?;
        Ok(())
    }

    /// Declares the whole set of schedules, as River's and Oban's periodic
    /// jobs are declared at start-up: those given are created or changed,
    /// every other schedule is removed (their tasks stay). One
    /// transaction. Returns (saved, removed).
    pub async fn reconcile_schedules(
        &self,
        schedules: &[crate::schedule::Schedule],
    ) -> Result<(usize, usize)> {
        for s in schedules {
            s.validate()?;
        }
        Ok(store::schedules::reconcile(&self.db, schedules).await?)
    }

    /// Pauses (`true`) or resumes a schedule: a paused one enqueues
    /// nothing; resumed, it ticks from now on. False if there is none.
    pub async fn pause_schedule(&self, schedule_id: &str, paused: bool) -> Result<bool> {
        Ok(store::schedules::set_paused(&self.db, schedule_id, paused).await?)
    }

    /// Removes a schedule (its tasks stay); false if there was none.
    pub async fn remove_schedule(&self, schedule_id: &str) -> Result<bool> {
        Ok(store::schedules::remove(&self.db, schedule_id).await?)
    }

    /// A manager on a connection pool: a `PgPool`, or a [`Db`] that says
    /// it goes through a transaction-mode pooler.
    pub fn new(db: impl Into<Db>) -> Self {
        TaskQueueManager { db: db.into() }
    }

    /// Hands out up to `limit` tasks to `who`, taking turns across the
    /// datasets with ready work (fleet-wide round robin, weighted; caps and
    /// rate limits counted in rows), leaving out the datasets in `skip`.
    /// The tasks come back in `who`'s name, leased, in the order they were
    /// picked: up to `start` of limited datasets started (`running`), the
    /// rest leased ahead (`queued`, not yet started).
    pub(crate) async fn claim(
        &self,
        who: &Claimer,
        skip: &[String],
        limit: usize,
        start: usize,
    ) -> sqlx::Result<Vec<store::tasks::Claimed>> {
        store::tasks::claim_ahead(
            &self.db,
            &who.worker_id,
            &who.kinds,
            who.datasets(),
            skip,
            limit,
            start,
            who.lease,
        )
        .await
    }

    /// How long until `who` may claim something (zero: now; `None`: only
    /// once new work arrives).
    pub(crate) async fn next_claim_in(
        &self,
        who: &Claimer,
        skip: &[String],
    ) -> sqlx::Result<Option<Duration>> {
        store::tasks::next_claim_in(&self.db, &who.kinds, who.datasets(), skip).await
    }

    /// Repairs datasets whose `ready_at` went stale (a claim was told
    /// "ready now" and found nothing, again and again). Returns how many.
    pub(crate) async fn refresh_ready(&self, who: &Claimer) -> sqlx::Result<i32> {
        store::tasks::refresh_ready(&self.db, who.datasets()).await
    }

    /// What `who` could still run: running anywhere, due within
    /// `horizon`, or waiting for an operator (the idle rule).
    pub(crate) async fn leftover(
        &self,
        who: &Claimer,
        horizon: Duration,
    ) -> sqlx::Result<store::tasks::Leftover> {
        store::tasks::leftover(&self.db, &who.kinds, who.datasets(), horizon.as_secs_f64()).await
    }

    /// The datasets whose rows make `who`'s claims fail, each with its
    /// error (see [`set_aside`]).
    pub(crate) async fn find_failing(
        &self,
        who: &Claimer,
        skip: &[String],
        limit: usize,
    ) -> sqlx::Result<Vec<(String, String)>> {
        set_aside::find_failing(&self.db, who, skip, limit).await
    }

    /// The connection pool.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The queue of one dataset.
    pub fn queue(&self, dataset_id: impl Into<String>) -> TaskQueue {
        TaskQueue::new(self.db.clone(), dataset_id.into())
    }

    /// Enqueues one task and returns its id. With a `unique_key` already
    /// queued or running in the dataset, nothing is inserted and the existing
    /// task's id is returned.
    pub async fn enqueue(&self, task: NewTask) -> Result<TaskId> {
        task.validate()?;
        if task.unique_key.is_none() {
            return store::tasks::insert_one(&self.db, &task)
                .await?
                .ok_or_else(|| crate::Error::InvalidTask("the insert returned no id".into()));
        }
        // A unique key: the batch path also finds the existing task's id.
        let ids = self.enqueue_many([task]).await?;
        ids.into_iter()
            .next()
            .ok_or_else(|| crate::Error::InvalidTask("the insert returned no id".into()))
    }

    /// Enqueues many tasks in one statement; ids in input order (an existing
    /// task's id for a duplicate `unique_key`).
    pub async fn enqueue_many(
        &self,
        tasks: impl IntoIterator<Item = NewTask>,
    ) -> Result<Vec<TaskId>> {
        let tasks: Vec<NewTask> = tasks.into_iter().collect();
        for task in &tasks {
            task.validate()?;
        }
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = store::tasks::insert_many(&self.db, &tasks).await?;
        // A duplicate whose original committed after our snapshot has no id
        // yet: ask again for just those (either its id, or a fresh insert if
        // the original finished meanwhile).
        for _ in 0..DUPLICATE_LOOKUPS {
            let missing: Vec<usize> = (0..ids.len()).filter(|&i| ids[i].is_none()).collect();
            if missing.is_empty() {
                break;
            }
            let retry: Vec<NewTask> = missing.iter().map(|&i| tasks[i].clone()).collect();
            let found = store::tasks::insert_many(&self.db, &retry).await?;
            for (i, id) in missing.into_iter().zip(found) {
                ids[i] = id;
            }
        }
        ids.into_iter()
            .zip(&tasks)
            .map(|(id, task)| {
                id.ok_or_else(|| {
                    crate::Error::InvalidTask(format!(
                        "unique_key {:?} of dataset {:?} kept changing hands; try again",
                        task.unique_key, task.dataset_id
                    ))
                })
            })
            .collect()
    }

    /// Enqueues many tasks with `COPY`, the fastest path in (several times
    /// [`enqueue_many`](Self::enqueue_many) for large batches), and returns
    /// how many were inserted. All or nothing. It returns no ids and cannot
    /// deduplicate: a task with a `unique_key` is refused (use
    /// `enqueue_many` for those).
    ///
    /// ```no_run
    /// # async fn example(db: sqlx::PgPool) -> syncq::Result<()> {
    /// use syncq::{NewTask, TaskQueueManager};
    ///
    /// let manager = TaskQueueManager::new(db);
    /// let pages = (1..=100_000).map(|page| {
    ///     NewTask::new("archive", "fetch_page").payload(serde_json::json!({ "page": page }))
    /// });
    /// assert_eq!(manager.enqueue_bulk(pages).await?, 100_000);
    /// # Ok(()) }
    /// ```
    pub async fn enqueue_bulk(&self, tasks: impl IntoIterator<Item = NewTask>) -> Result<u64> {
        let tasks: Vec<NewTask> = tasks.into_iter().collect();
        for task in &tasks {
            task.validate()?;
            if let Some(key) = &task.unique_key {
                return Err(crate::Error::InvalidTask(format!(
                    "enqueue_bulk cannot deduplicate: task of dataset {:?} has unique_key {key:?} (use enqueue_many)",
                    task.dataset_id
                )));
            }
        }
        if tasks.is_empty() {
            return Ok(0);
        }
        let mut tx = self.db.begin().await?;
        let now = store::tasks::transaction_now(tx.ex()).await?;
        let copied = store::tasks::copy_in(tx.conn(), &tasks, now).await?;
        tx.commit().await?;
        Ok(copied)
    }

    /// Requests cancellation of a task: a queued one ends `cancelled` at once,
    /// a running one's handler is told within a second. Returns the task's
    /// status afterwards, or `None` if no queued or running task has this id.
    pub async fn cancel(&self, id: TaskId) -> Result<Option<TaskStatus>> {
        Ok(store::tasks::cancel(&self.db, id).await?)
    }

    /// Puts a failed or cancelled task back to `queued`, keeping its attempts
    /// and error history and allowing at least one more attempt. False: no
    /// failed or cancelled task has this id.
    pub async fn retry(&self, id: TaskId) -> Result<bool> {
        Ok(store::tasks::retry(&self.db, id).await?)
    }

    /// Deletes finished tasks that finished more than `older_than` ago, in
    /// short batches; returns how many.
    pub async fn prune(&self, older_than: Duration) -> Result<u64> {
        self.prune_only(
            older_than,
            &[
                TaskStatus::Succeeded,
                TaskStatus::Failed,
                TaskStatus::Cancelled,
            ],
        )
        .await
    }

    /// [`prune`](Self::prune), of the tasks in `statuses` only (finished
    /// ones; others are never deleted).
    pub async fn prune_only(&self, older_than: Duration, statuses: &[TaskStatus]) -> Result<u64> {
        let statuses: Vec<&str> = statuses
            .iter()
            .filter(|s| s.is_final())
            .map(|s| s.as_str())
            .collect();
        let (pruned, _) = crate::maintenance::pruner::prune_tasks(
            &self.db,
            older_than,
            &statuses,
            crate::maintenance::pruner::Pruner::DEFAULT_BATCH,
            u32::MAX,
        )
        .await?;
        Ok(pruned)
    }
}
