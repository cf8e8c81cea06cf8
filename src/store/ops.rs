//! Operator actions: cancel, retry, prune. Each is one statement.

use sqlx::PgExecutor;
use std::time::Duration;

use super::secs;
use crate::task::TaskId;

/// Requests cancellation of a queued or running task. Returns its status
/// afterwards (`cancelled` for a queued task — the trigger ends it at once —
/// `running` for a running one, whose handler is told), or `None` when no
/// queued or running task has that id.
pub async fn cancel(db: impl PgExecutor<'_>, id: TaskId) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar!(
        r#"
        UPDATE syncq.tasks SET cancel_requested = true
        WHERE id = $1 AND status IN ('queued', 'running')
        RETURNING status::text AS "status!"
        "#,
        id
    )
    .fetch_optional(db)
    .await
}

/// Requests cancellation of every queued or running task of a dataset;
/// returns how many.
pub async fn cancel_dataset(db: impl PgExecutor<'_>, dataset_id: &str) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        r#"
        UPDATE syncq.tasks SET cancel_requested = true
        WHERE dataset_id = $1 AND status IN ('queued', 'running') AND NOT cancel_requested
        "#,
        dataset_id
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Puts a failed or cancelled task back to `queued` (see `syncq.retry()`).
/// False: no failed or cancelled task has that id.
pub async fn retry(db: impl PgExecutor<'_>, id: TaskId) -> sqlx::Result<bool> {
    let n = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM syncq.retry(ARRAY[$1::int8])"#,
        id
    )
    .fetch_one(db)
    .await?;
    Ok(n == 1)
}

/// Retries every task of a dataset in `status` (`failed` or `cancelled`);
/// returns how many.
pub async fn retry_dataset(
    db: impl PgExecutor<'_>,
    dataset_id: &str,
    status: &str,
) -> sqlx::Result<u64> {
    let n = sqlx::query_scalar!(
        r#"
        SELECT count(*) AS "n!" FROM syncq.retry(ARRAY(
            SELECT id FROM syncq.tasks
            WHERE dataset_id = $1 AND status IN ('failed', 'cancelled') AND status::text = $2))
        "#,
        dataset_id,
        status
    )
    .fetch_one(db)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Deletes up to `batch` finished tasks (of `statuses`) that finished more
/// than `older_than` ago, with their error history. Short statements keep
/// locks short; call until it returns less than `batch`.
pub async fn prune_batch(
    db: impl PgExecutor<'_>,
    older_than: Duration,
    statuses: &[String],
    batch: i64,
) -> sqlx::Result<u64> {
    // A function running as its owner (`migrations/0005_operations.sql`): the worker role
    // prunes without holding DELETE on syncq.tasks.
    let n = sqlx::query_scalar!(
        r#"SELECT syncq.prune_finished($1, $2, $3) AS "n!""#,
        secs(older_than),
        statuses,
        i32::try_from(batch).unwrap_or(i32::MAX),
    )
    .fetch_one(db)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
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

/// Dead and live row estimates of syncq's churning tables, from the
/// statistics collector: `(table, dead, live)`.
pub async fn churn(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i64, i64)>> {
    let rows = sqlx::query!(
        r#"
        SELECT relname AS "table!", n_dead_tup AS "dead!", n_live_tup AS "live!"
        FROM pg_stat_user_tables
        WHERE schemaname = 'syncq' AND relname IN ('tasks', 'datasets', 'rate_log', 'ready_signals')
        "#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.table, r.dead, r.live))
        .collect())
}

/// Takes the advisory lock that makes one process at a time vacuum, on
/// this connection (session-level). False: another process holds it.
pub async fn try_vacuum_lock(conn: &mut sqlx::PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar!(r#"SELECT pg_try_advisory_lock(hashtext('syncq.vacuum')) AS "locked!""#)
        .fetch_one(conn)
        .await
}

/// Releases [`try_vacuum_lock`].
pub async fn vacuum_unlock(conn: &mut sqlx::PgConnection) -> sqlx::Result<()> {
    sqlx::query_scalar!(r#"SELECT pg_advisory_unlock(hashtext('syncq.vacuum')) AS "unlocked!""#)
        .fetch_one(conn)
        .await?;
    Ok(())
}

/// `VACUUM (ANALYZE)` of one of syncq's tables (a fixed list: the name is
/// never user input). A role that does not own the table gets a warning
/// from PostgreSQL and nothing is done.
pub async fn vacuum(conn: &mut sqlx::PgConnection, table: &str) -> sqlx::Result<()> {
    let statement = match table {
        "tasks" => "VACUUM (ANALYZE) syncq.tasks",
        "datasets" => "VACUUM (ANALYZE) syncq.datasets",
        "rate_log" => "VACUUM (ANALYZE) syncq.rate_log",
        // Every signal is deleted soon after it is written: the claim reads
        // the whole table, so its dead rows must not pile up.
        "ready_signals" => "VACUUM (ANALYZE) syncq.ready_signals",
        _ => return Ok(()),
    };
    sqlx::raw_sql(statement).execute(conn).await?;
    Ok(())
}
