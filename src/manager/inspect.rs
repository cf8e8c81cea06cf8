//! Reading the queues: what `syncq status`, `tasks` and `show` print, as
//! the library hands it out (the CLI reads through these, not the SQL).

use crate::error::Result;
use crate::store;
use crate::task::{TaskId, TaskStatus};

pub use crate::store::reports::{
    Activity, AttemptError, DatasetStats, ErrorGroup, Minute, OverviewRow, OverviewSort, TaskInfo,
    WorkerInfo,
};
pub use crate::store::schedules::ScheduleInfo;

/// Tasks queued and running across the fleet, and finished in the last hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    /// Tasks waiting.
    pub queued: i64,
    /// Tasks held by a worker now.
    pub running: i64,
    /// Tasks that succeeded in the last hour.
    pub succeeded_last_hour: i64,
    /// Tasks that failed for good in the last hour.
    pub failed_last_hour: i64,
}

use super::TaskQueueManager;

/// A registered worker whose heartbeat stopped (killed, or cut off from
/// the database): its row goes when it exits cleanly; its tasks come back
/// when their leases expire.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleWorker {
    /// Its host.
    pub host: String,
    /// Its process id there.
    pub pid: i32,
    /// Seconds since its last heartbeat.
    pub silent_secs: f64,
}

/// Which tasks [`TaskQueueManager::tasks`] lists.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only this dataset's.
    pub dataset_id: Option<String>,
    /// Only in this status.
    pub status: Option<TaskStatus>,
    /// Only of this kind.
    pub kind: Option<String>,
    /// Only those whose last error contains this text.
    pub error_contains: Option<String>,
    /// At most this many, newest first (default 50).
    pub limit: Option<u32>,
    /// Skip this many first (paging).
    pub offset: Option<u32>,
    /// Leave `payload` (null), `checkpoint` and `result` out: a list that
    /// does not show them reads none of them (a page of 20 tasks of 20 MB
    /// each once took 3.6 s and 2 GB with four viewers).
    pub without_values: bool,
}

/// One page of datasets, as the dashboard's overview asks for it.
#[derive(Debug, Clone, Default)]
pub struct OverviewQuery {
    /// Only datasets whose name contains this (case-insensitive).
    pub filter: Option<String>,
    /// The order.
    pub sort: OverviewSort,
    /// Datasets per page (default 50).
    pub limit: Option<u32>,
    /// Skip this many first.
    pub offset: Option<u32>,
}

impl TaskQueueManager {
    /// Every dataset with its counts, settings and state
    /// (`syncq.dataset_stats`).
    pub async fn dataset_stats(&self) -> Result<Vec<DatasetStats>> {
        Ok(store::reports::dataset_stats(&self.db).await?)
    }

    /// The worker processes whose heartbeat is current.
    pub async fn live_workers(&self) -> Result<Vec<WorkerInfo>> {
        Ok(store::reports::live_workers(&self.db).await?)
    }

    /// The registered workers whose heartbeat stopped.
    pub async fn stale_workers(&self) -> Result<Vec<StaleWorker>> {
        Ok(store::reports::stale_workers(&self.db)
            .await?
            .into_iter()
            .map(|(host, pid, silent_secs)| StaleWorker {
                host,
                pid,
                silent_secs,
            })
            .collect())
    }

    /// Kinds with queued tasks that no live worker handles.
    pub async fn unhandled_kinds(&self) -> Result<Vec<String>> {
        Ok(store::reports::unhandled_kinds(&self.db).await?)
    }

    /// Every schedule, with its next and last run.
    pub async fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        Ok(store::schedules::list(&self.db).await?)
    }

    /// Tasks, newest first, by `filter`.
    pub async fn tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskInfo>> {
        let query = store::reports::TaskQuery {
            dataset_id: filter.dataset_id.as_deref(),
            status: filter.status.map(TaskStatus::as_str),
            kind: filter.kind.as_deref(),
            error_contains: filter.error_contains.as_deref(),
            limit: i64::from(filter.limit.unwrap_or(50)),
            offset: i64::from(filter.offset.unwrap_or(0)),
            values: !filter.without_values,
        };
        Ok(store::reports::tasks(&self.db, query).await?)
    }

    /// One task, whatever its status; `None` if no task has this id.
    pub async fn task(&self, id: TaskId) -> Result<Option<TaskInfo>> {
        Ok(store::reports::task(&self.db, id).await?)
    }

    /// Every recorded error of a task's attempts, oldest first.
    pub async fn task_errors(&self, id: TaskId) -> Result<Vec<AttemptError>> {
        Ok(store::reports::errors(&self.db, id).await?)
    }

    /// One page of a task's recorded errors, newest first (`limit` of
    /// them after skipping `offset`), and how many it has in all: a task
    /// with a long history is read a page at a time.
    pub async fn task_errors_page(
        &self,
        id: TaskId,
        limit: u32,
        offset: u64,
    ) -> Result<(Vec<AttemptError>, i64)> {
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        Ok(store::reports::errors_page(&self.db, id, i64::from(limit), offset).await?)
    }

    /// One page of datasets with their counts, limits and state, and how
    /// many datasets match in all.
    pub async fn overview(&self, query: &OverviewQuery) -> Result<(Vec<OverviewRow>, i64)> {
        let filter = query.filter.as_deref().filter(|f| !f.is_empty());
        let rows = store::reports::overview(
            &self.db,
            filter,
            query.sort,
            i64::from(query.limit.unwrap_or(50)),
            i64::from(query.offset.unwrap_or(0)),
        )
        .await?;
        let total = store::reports::dataset_count(&self.db, filter).await?;
        Ok((rows, total))
    }

    /// The fleet's queued and running tasks, and those finished in the
    /// last hour (which costs a pass over the hour's finished tasks; see
    /// [`activity`](Self::activity) for all it yields).
    pub async fn totals(&self) -> Result<Totals> {
        let activity = self.activity().await?;
        self.totals_with(&activity).await
    }

    /// [`totals`](Self::totals), with the hour's finishes taken from
    /// `activity` (cheap: only queued and running are counted).
    pub async fn totals_with(&self, activity: &Activity) -> Result<Totals> {
        let (queued, running) = store::reports::queued_running(&self.db).await?;
        Ok(Totals {
            queued,
            running,
            succeeded_last_hour: activity.datasets.iter().map(|d| d.1).sum(),
            failed_last_hour: activity.datasets.iter().map(|d| d.2).sum(),
        })
    }

    /// What finished in the last hour across the fleet, per dataset and
    /// per minute (with the starts), from one pass over those tasks.
    pub async fn activity(&self) -> Result<Activity> {
        Ok(store::reports::activity(&self.db).await?)
    }

    /// Starts and finishes per minute over the last hour, of one dataset
    /// or all.
    pub async fn throughput(&self, dataset_id: Option<&str>) -> Result<Vec<Minute>> {
        Ok(store::reports::throughput(&self.db, dataset_id).await?)
    }

    /// A dataset's failed attempts of the last day, grouped by error.
    pub async fn failures_by_error(&self, dataset_id: &str) -> Result<Vec<ErrorGroup>> {
        Ok(store::reports::failures_by_error(&self.db, dataset_id).await?)
    }

    /// Every shared limit with its windows' use now and the datasets that
    /// use it (`syncq.limit_stats`).
    pub async fn limits(&self) -> Result<Vec<store::limits::LimitInfo>> {
        Ok(store::limits::list(&self.db).await?)
    }

    /// Creates the shared limit `name`, or replaces its rates (SPEC §2
    /// Shared limits): a start or permit of any dataset using it needs room
    /// in every one of `rates`. Exact from its commit for every process.
    pub async fn set_limit(&self, name: &str, rates: &[crate::RateLimit]) -> Result<()> {
        self.set_limit_capped(name, rates, None).await
    }

    /// [`set_limit`](Self::set_limit), with a cap on the running tasks of
    /// every dataset using it together (1–100,000; `None`: no cap).
    pub async fn set_limit_capped(
        &self,
        name: &str,
        rates: &[crate::RateLimit],
        max_concurrency: Option<u32>,
    ) -> Result<()> {
        let cap = match max_concurrency {
            None => None,
            Some(n @ 1..=100_000) => Some(n as i32),
            Some(n) => {
                return Err(crate::Error::config(
                    "max_concurrency",
                    format!("{n} is out of range: 1 to 100000"),
                ));
            }
        };
        if name.is_empty() || name.len() > 1000 {
            return Err(crate::Error::config(
                "limit_id",
                "a limit's name is 1 to 1000 bytes",
            ));
        }
        let mut windows = std::collections::BTreeSet::new();
        let mut pairs = Vec::with_capacity(rates.len());
        for r in rates {
            if !windows.insert(r.window) {
                return Err(crate::Error::config(
                    "rate_window",
                    format!(
                        "two rates for the window {}",
                        humantime::format_duration(r.window)
                    ),
                ));
            }
            let limit = i32::try_from(r.limit)
                .map_err(|_| crate::Error::config("rate_limit", "too large"))?;
            pairs.push((limit, r.window.as_secs_f64()));
        }
        Ok(store::limits::set(&self.db, name, &pairs, cap, None).await?)
    }

    /// Makes the shared limit `name` adaptive or not (SPEC §6): it lowers
    /// the rate of its shortest window on a 429 without Retry-After and
    /// raises it back after clean windows, pacing starts evenly. False if
    /// there is no such limit.
    pub async fn set_limit_adaptive(&self, name: &str, adaptive: bool) -> Result<bool> {
        Ok(store::limits::set_adaptive(&self.db, name, adaptive).await?)
    }

    /// Lifts the shared limit `name`'s upstream throttle at once and
    /// forgets what it learned if adaptive, with the throttles of the
    /// datasets using it (set by the same 429s): `syncq unthrottle NAME`.
    /// `None` if there is no such limit, else how many datasets use it.
    pub async fn unthrottle_limit(&self, name: &str) -> Result<Option<i64>> {
        Ok(store::limits::unthrottle(&self.db, name).await?)
    }

    /// Removes the shared limit `name`; false if there was none. Refused
    /// while a dataset uses it.
    pub async fn remove_limit(&self, name: &str) -> Result<bool> {
        Ok(store::limits::remove(&self.db, name).await?)
    }

    /// Whether a dataset exists: it has a row (a task was enqueued to it,
    /// or it was configured).
    pub async fn dataset_exists(&self, dataset_id: &str) -> Result<bool> {
        Ok(store::datasets::known(&self.db, dataset_id).await?)
    }
}
