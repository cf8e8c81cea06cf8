//! The pruner: deletes finished tasks past their retention, in short
//! batches, starts that left the rate log's window, and registry rows of
//! workers long silent.

use std::time::Duration;

use crate::db::Db;

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
            let statuses: Vec<String> = FINISHED.iter().map(|s| s.to_string()).collect();
            report.more = true;
            for _ in 0..self.max_batches {
                let n = store::ops::prune_batch(db, retention, &statuses, self.batch).await?;
                report.tasks += n;
                if n < self.batch as u64 {
                    report.more = false;
                    break;
                }
            }
        }
        // The rate log only needs the starts inside each dataset's window.
        let batch = i32::try_from(self.batch).unwrap_or(i32::MAX);
        while store::tasks::prune_rate_log(db, batch).await? >= self.batch {}
        report.workers = store::ops::prune_dead_workers(db, self.dead_worker_after).await?;
        if report.tasks > 0 || report.workers > 0 {
            tracing::info!(tasks = report.tasks, workers = report.workers, "pruned");
        }
        Ok(report)
    }
}
