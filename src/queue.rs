//! `TaskQueue`: one dataset's queue — its rows in `syncq.tasks` and its
//! settings row in `syncq.datasets`.

use crate::db::Db;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::rate_limit::{RateLimit, RateLimiter};
use crate::store;
pub use crate::store::datasets::DatasetCounts as QueueCounts;
pub use crate::store::datasets::DatasetRow as QueueSettings;
use crate::store::datasets::LimitsChange;
pub use crate::store::datasets::Unthrottled;
use crate::task::{NewTask, TaskId, TaskStatus};

/// One dataset's queue.
#[derive(Debug, Clone)]
pub struct TaskQueue {
    db: Db,
    dataset_id: String,
}

impl TaskQueue {
    pub(crate) fn new(db: Db, dataset_id: String) -> Self {
        TaskQueue { db, dataset_id }
    }

    /// The dataset's id.
    pub fn dataset_id(&self) -> &str {
        &self.dataset_id
    }

    /// Enqueues a task of `kind` with `payload` in this dataset.
    pub async fn enqueue(&self, kind: impl Into<String>, payload: Value) -> Result<TaskId> {
        // No unique key: one plain insert.
        let task = NewTask::new(self.dataset_id.clone(), kind).payload(payload);
        task.validate()?;
        store::tasks::insert_one(&self.db, &task)
            .await?
            .ok_or_else(|| Error::InvalidTask("the insert returned no id".into()))
    }

    /// The dataset's settings, or `None` if it has never been used.
    pub async fn settings(&self) -> Result<Option<QueueSettings>> {
        Ok(store::datasets::get(&self.db, &self.dataset_id).await?)
    }

    /// Stops new starts of this dataset in every process; running tasks finish.
    pub async fn pause(&self) -> Result<()> {
        Ok(store::datasets::set_paused(&self.db, &self.dataset_id, true).await?)
    }

    /// Lets the dataset's tasks start again.
    pub async fn resume(&self) -> Result<()> {
        Ok(store::datasets::set_paused(&self.db, &self.dataset_id, false).await?)
    }

    /// Lifts an upstream throttle at once (as `syncq unthrottle D` and
    /// `UPDATE syncq.datasets SET throttled_until = NULL` do), and forgets
    /// what its adaptive rate limit learned: it starts again from the
    /// configured rate. Running processes see it within a second. The
    /// shared limits it uses keep their throttles (they hold other
    /// datasets too); the answer lists those still in force. `None`: the
    /// dataset has no settings row (nothing to lift).
    pub async fn unthrottle(&self) -> Result<Option<Unthrottled>> {
        Ok(store::datasets::unthrottle(&self.db, &self.dataset_id).await?)
    }

    /// The dataset's `RateLimiter`.
    pub fn rate_limiter(&self) -> RateLimiter {
        RateLimiter::new(self.db.clone(), self.dataset_id.clone())
    }

    /// Sets (or with `None` clears) the rate limit.
    pub async fn set_rate_limit(&self, limit: Option<RateLimit>) -> Result<()> {
        self.rate_limiter().set(limit).await
    }

    /// Sets the dataset's weight (1–1000, default 1): its share of starts
    /// when datasets compete, fleet-wide (SPEC §6).
    pub async fn set_weight(&self, weight: u32) -> Result<()> {
        self.update_limits(LimitsUpdate {
            weight: Some(weight),
            ..LimitsUpdate::default()
        })
        .await
        .map(|_| ())
    }

    /// Sets (or with `None` clears) the cap on running tasks of this dataset
    /// across all processes.
    pub async fn set_max_concurrency(&self, max: Option<u32>) -> Result<()> {
        self.update_limits(LimitsUpdate {
            max_concurrency: Some(max),
            ..LimitsUpdate::default()
        })
        .await
        .map(|_| ())
    }

    /// Changes any of the dataset's limits in one statement (so they take
    /// effect together, at the next claim of any process), creating its
    /// row if it has none yet; returns its settings afterwards.
    pub async fn update_limits(&self, update: LimitsUpdate) -> Result<QueueSettings> {
        let change = update.validated()?;
        store::datasets::set_limits(&self.db, &self.dataset_id, change)
            .await
            .map_err(
                |e| match e.as_database_error().and_then(|d| d.constraint()) {
                    // Adaptive without a rate limit: the caller's mistake.
                    Some("datasets_adaptive_needs_a_rate_limit") => Error::config(
                        "adaptive",
                        "an adaptive limit needs a rate limit: set one (--rate) with it",
                    ),
                    _ => Error::Database(e),
                },
            )
    }

    /// The shared limits it uses (SPEC §2 Shared limits), replacing those
    /// it used: each must exist ([`TaskQueueManager::set_limit`]); an empty
    /// list uses none. Returns them as stored (sorted). Creates its row if
    /// it has none yet.
    ///
    /// [`TaskQueueManager::set_limit`]: crate::TaskQueueManager::set_limit
    pub async fn use_limits(&self, limits: &[String]) -> Result<Vec<String>> {
        Ok(store::limits::set_uses(&self.db, &self.dataset_id, limits).await?)
    }

    /// Its queued and running tasks and its starts in the current window.
    pub async fn counts(&self) -> Result<QueueCounts> {
        Ok(store::datasets::counts(&self.db, &self.dataset_id).await?)
    }

    /// Requests cancellation of every queued and running task of this
    /// dataset; returns how many.
    pub async fn cancel_all(&self) -> Result<u64> {
        self.cancel_matching(&TaskMatch::default()).await
    }

    /// Requests cancellation of this dataset's queued and running tasks
    /// that `filter` matches; returns how many.
    pub async fn cancel_matching(&self, filter: &TaskMatch) -> Result<u64> {
        Ok(store::tasks::cancel_dataset(
            &self.db,
            &self.dataset_id,
            filter.kind.as_deref(),
            filter.error_contains.as_deref(),
        )
        .await?)
    }

    /// Puts every task of this dataset in `status` (failed or cancelled)
    /// back to `queued`, as [`TaskQueueManager::retry`](crate::TaskQueueManager::retry)
    /// does one; returns how many.
    pub async fn retry_all(&self, status: TaskStatus) -> Result<u64> {
        self.retry_matching(status, &TaskMatch::default()).await
    }

    /// [`retry_all`](Self::retry_all), of the tasks `filter` matches.
    pub async fn retry_matching(&self, status: TaskStatus, filter: &TaskMatch) -> Result<u64> {
        if !matches!(status, TaskStatus::Failed | TaskStatus::Cancelled) {
            return Err(Error::config(
                "status",
                "only failed or cancelled tasks can be retried",
            ));
        }
        Ok(store::tasks::retry_dataset(
            &self.db,
            &self.dataset_id,
            status.as_str(),
            filter.kind.as_deref(),
            filter.error_contains.as_deref(),
        )
        .await?)
    }
}

/// Which of a dataset's tasks a bulk action takes: each `None` matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskMatch {
    /// Only tasks of this kind.
    pub kind: Option<String>,
    /// Only tasks whose last error contains this text.
    pub error_contains: Option<String>,
}

/// A change to a dataset's limits: each `None` leaves that setting alone.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LimitsUpdate {
    /// `Some(None)` clears the rate limit; `Some(Some(limit))` sets it.
    pub rate_limit: Option<Option<RateLimit>>,
    /// `Some(None)` clears the cap on running tasks; `Some(Some(n))` sets
    /// it (1–100,000).
    pub max_concurrency: Option<Option<u32>>,
    /// `Some(n)` sets the weight (1–1000).
    pub weight: Option<u32>,
    /// `Some(true)` makes the rate limit adaptive (SPEC §6): it lowers its
    /// rate on a 429 without Retry-After and raises it back after clean
    /// windows, pacing starts evenly; `Some(false)` ends that. It needs a
    /// rate limit.
    pub adaptive: Option<bool>,
}

impl LimitsUpdate {
    fn validated(self) -> Result<LimitsChange> {
        let max_concurrency = match self.max_concurrency {
            Some(Some(0 | 100_001..)) => {
                return Err(Error::config(
                    "max_concurrency",
                    "must be between 1 and 100000",
                ));
            }
            other => other.map(|cap| cap.map(|n| n as i32)),
        };
        let weight = match self.weight {
            Some(w) if !(1..=1000).contains(&w) => {
                return Err(Error::config("weight", "must be between 1 and 1000"));
            }
            other => other.map(|w| w as i32),
        };
        if self.adaptive == Some(true) && self.rate_limit == Some(None) {
            return Err(Error::config(
                "adaptive",
                "an adaptive limit needs a rate limit",
            ));
        }
        Ok(LimitsChange {
            rate: self
                .rate_limit
                .map(|limit| limit.map(|r| (i32::try_from(r.limit).unwrap_or(i32::MAX), r.window))),
            max_concurrency,
            weight,
            adaptive: self.adaptive,
        })
    }
}
