//! The pruner: deletes finished tasks past their retention, in short
//! batches, starts that left the rate log's window, and registry rows of
//! workers long silent.

use std::time::Duration;

use crate::db::Db;
use crate::rate_limit::RateLimiter;

use crate::store;

/// Every finished status.
pub const FINISHED: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// Prunes in bounded batches; safe in every process at once (`SKIP LOCKED`).
#[derive(Debug, Clone)]
pub struct Pruner {
    /// Finished tasks older than this are deleted (None: keep them).
    pub retention: Option<Duration>,
    /// Tasks deleted per statement.
    pub batch: i64,
    /// Batches per sweep at most, so one sweep never runs long.
    pub max_batches: u32,
    /// Worker rows whose heartbeat is older than this are deleted.
    pub dead_worker_after: Duration,
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Tasks deleted.
    pub tasks: u64,
    /// Worker rows deleted.
    pub workers: u64,
    /// The sweep stopped at `max_batches` with more to delete: run the
    /// next one soon rather than after the usual interval.
    pub more: bool,
}

impl Pruner {
    /// Default `batch`.
    pub const DEFAULT_BATCH: i64 = 1000;
    /// Default `dead_worker_after`.
    pub const DEFAULT_DEAD_WORKER_AFTER: Duration = Duration::from_secs(15 * 60);

    /// A pruner keeping finished tasks for `retention`.
    pub fn new(retention: Option<Duration>) -> Self {
        Pruner {
            retention,
            batch: Self::DEFAULT_BATCH,
            max_batches: 10,
            dead_worker_after: Self::DEFAULT_DEAD_WORKER_AFTER,
        }
    }

    /// One sweep.
    pub async fn run_once(&self, db: &Db) -> sqlx::Result<PruneReport> {
        let mut report = PruneReport::default();
        if let Some(retention) = self.retention {
            (report.tasks, report.more) =
                prune_tasks(db, retention, &FINISHED, self.batch, self.max_batches).await?;
        }
        RateLimiter::prune_log(db, self.batch).await?;
        report.workers = store::workers::prune_dead_workers(db, self.dead_worker_after).await?;
        if report.tasks > 0 || report.workers > 0 {
            tracing::info!(tasks = report.tasks, workers = report.workers, "pruned");
        }
        Ok(report)
    }
}

/// Deletes tasks in `statuses` (finished ones) that finished more than
/// `older_than` ago, `batch` per
/// statement, at most `max_batches` statements. Returns how many, and
/// whether it stopped with more to delete.
pub(crate) async fn prune_tasks(
    db: &Db,
    older_than: Duration,
    statuses: &[&str],
    batch: i64,
    max_batches: u32,
) -> sqlx::Result<(u64, bool)> {
    let statuses: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
    let mut pruned = 0;
    for _ in 0..max_batches {
        let n = store::tasks::prune_batch(db, older_than, &statuses, batch).await?;
        pruned += n;
        if n < batch.unsigned_abs() {
            return Ok((pruned, false));
        }
    }
    Ok((pruned, true))
}
