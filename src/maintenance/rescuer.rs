//! The rescuer: takes back running tasks whose holder stopped heartbeating.
//!
//! A task whose `lease_expires_at` passed goes back to `queued` with its
//! attempt counted (or to `failed` when none is left), so kill -9 of a worker,
//! a lost host or a lost network never leaves a task `running` forever.

use std::time::Duration;

use crate::db::Db;

use crate::store;
use crate::store::tasks::Rescued;

/// Rescues expired leases in bounded batches.
#[derive(Debug, Clone)]
pub struct Rescuer {
    /// Average pause between sweeps (jittered ±25 %).
    pub interval: Duration,
    /// Tasks taken back per statement.
    pub batch: i64,
}

impl Rescuer {
    /// Default `batch`.
    pub const DEFAULT_BATCH: i64 = 1000;

    /// A rescuer sweeping about every `interval`.
    pub fn new(interval: Duration) -> Self {
        Rescuer {
            interval,
            batch: Self::DEFAULT_BATCH,
        }
    }

    /// The pause before the next sweep, jittered so that processes started
    /// together do not sweep together.
    pub fn next_delay(&self) -> Duration {
        let factor = 0.75 + rand::random::<f64>() * 0.5;
        // Checked: an interval too long to scale is used as it is.
        Duration::try_from_secs_f64(self.interval.as_secs_f64() * factor).unwrap_or(self.interval)
    }

    /// One sweep: takes back every expired lease, batch by batch.
    pub async fn run_once(&self, db: &Db) -> sqlx::Result<Vec<Rescued>> {
        let mut all = Vec::new();
        loop {
            let rescued = store::tasks::rescue_expired(db, self.batch).await?;
            let done = (rescued.len() as i64) < self.batch;
            for task in &rescued {
                tracing::warn!(
                    task_id = task.id.0,
                    worker = task.locked_by.as_deref().unwrap_or("?"),
                    status = %task.status,
                    "lease expired: task taken back"
                );
            }
            all.extend(rescued);
            if done {
                break;
            }
        }
        Ok(all)
    }
}
