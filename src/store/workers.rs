//! Statements on `syncq.workers`, the registry of live worker processes.

use sqlx::PgExecutor;

/// Registers (or re-registers) a worker process.
pub async fn register(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    host: &str,
    pid: i32,
    kinds: &[String],
    datasets: Option<&[String]>,
    concurrency: i32,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"
        INSERT INTO syncq.workers (worker_id, host, pid, kinds, datasets, concurrency)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (worker_id) DO UPDATE
        SET host = EXCLUDED.host, pid = EXCLUDED.pid, kinds = EXCLUDED.kinds,
            datasets = EXCLUDED.datasets, concurrency = EXCLUDED.concurrency,
            last_heartbeat_at = now()
        "#,
        worker_id,
        host,
        pid,
        kinds,
        datasets,
        concurrency,
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
