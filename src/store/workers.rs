//! Statements on `syncq.workers`, the registry of live worker processes.

use sqlx::PgExecutor;
use std::time::Duration;

use super::secs;

/// What a worker process registers.
#[derive(Debug, Clone, Copy)]
pub struct Registration<'a> {
    pub worker_id: &'a str,
    pub host: &'a str,
    pub pid: i32,
    pub kinds: &'a [String],
    pub datasets: Option<&'a [String]>,
    pub concurrency: i32,
    /// How often it beats: `syncq status` counts it live for two beats.
    pub heartbeat: Duration,
}

/// Registers (or re-registers) a worker process.
pub async fn register(db: impl PgExecutor<'_>, r: Registration<'_>) -> sqlx::Result<()> {
    sqlx::query!(
        r#"
        INSERT INTO syncq.workers (worker_id, host, pid, kinds, datasets, concurrency, heartbeat_every)
        VALUES ($1, $2, $3, $4, $5, $6, make_interval(secs => $7))
        ON CONFLICT (worker_id) DO UPDATE
        SET host = EXCLUDED.host, pid = EXCLUDED.pid, kinds = EXCLUDED.kinds,
            datasets = EXCLUDED.datasets, concurrency = EXCLUDED.concurrency,
            heartbeat_every = EXCLUDED.heartbeat_every, last_heartbeat_at = now()
        "#,
        r.worker_id,
        r.host,
        r.pid,
        r.kinds,
        r.datasets,
        r.concurrency,
        r.heartbeat.as_secs_f64(),
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Records that the worker is alive.
pub async fn heartbeat(db: impl PgExecutor<'_>, worker_id: &str) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE syncq.workers SET last_heartbeat_at = now() WHERE worker_id = $1",
        worker_id
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Removes the worker's row at a clean exit.
pub async fn deregister(db: impl PgExecutor<'_>, worker_id: &str) -> sqlx::Result<()> {
    sqlx::query!("DELETE FROM syncq.workers WHERE worker_id = $1", worker_id)
        .execute(db)
        .await?;
    Ok(())
}

/// Deletes registry rows of workers silent for longer than `silent_for`.
pub async fn prune_dead_workers(
    db: impl PgExecutor<'_>,
    silent_for: Duration,
) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "DELETE FROM syncq.workers WHERE last_heartbeat_at < now() - make_interval(secs => $1)",
        secs(silent_for)
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
