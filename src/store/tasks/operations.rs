//! Operator actions on tasks: cancel, retry, prune. Each is one statement.

use sqlx::PgExecutor;
use std::time::Duration;

use crate::store::secs;
use crate::task::{TaskId, TaskStatus};

/// Requests cancellation of a queued or running task. Returns its status
/// afterwards (`cancelled` for a queued task — the trigger ends it at once —
/// `running` for a running one, whose handler is told), or `None` when no
/// queued or running task has that id.
pub async fn cancel(db: impl PgExecutor<'_>, id: TaskId) -> sqlx::Result<Option<TaskStatus>> {
    sqlx::query_scalar!(
        r#"
        UPDATE syncq.tasks SET cancel_requested = true
        WHERE id = $1 AND status IN ('queued', 'running')
        RETURNING status::text AS "status!: TaskStatus"
        "#,
        id.0
    )
    .fetch_optional(db)
    .await
}

/// Requests cancellation of every queued or running task of a dataset,
/// of `kind` and with `error_contains` in its last error when given;
/// returns how many.
pub async fn cancel_dataset(
    db: impl PgExecutor<'_>,
    dataset_id: &str,
    kind: Option<&str>,
    error_contains: Option<&str>,
) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        r#"
        UPDATE syncq.tasks SET cancel_requested = true
        WHERE dataset_id = $1 AND status IN ('queued', 'running') AND NOT cancel_requested
          -- Both halves (held or not), each a range of its index.
          AND (locked_by IS NULL OR locked_by IS NOT NULL)
          AND ($2::text IS NULL OR kind = $2)
          AND ($3::text IS NULL OR strpos(coalesce(last_error, ''), $3) > 0)
        "#,
        dataset_id,
        kind,
        error_contains,
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
        id.0
    )
    .fetch_one(db)
    .await?;
    Ok(n == 1)
}

/// Retries every task of a dataset in `status` (`failed` or `cancelled`),
/// of `kind` and with `error_contains` in its last error when given;
/// returns how many.
pub async fn retry_dataset(
    db: impl PgExecutor<'_>,
    dataset_id: &str,
    status: &str,
    kind: Option<&str>,
    error_contains: Option<&str>,
) -> sqlx::Result<u64> {
    let n = sqlx::query_scalar!(
        r#"
        SELECT count(*) AS "n!" FROM syncq.retry(ARRAY(
            SELECT id FROM syncq.tasks
            WHERE dataset_id = $1 AND status IN ('failed', 'cancelled') AND status::text = $2
              -- Both halves (held or not), each a range of its index.
              AND (locked_by IS NULL OR locked_by IS NOT NULL)
              AND ($3::text IS NULL OR kind = $3)
              AND ($4::text IS NULL OR strpos(coalesce(last_error, ''), $4) > 0)))
        "#,
        dataset_id,
        status,
        kind,
        error_contains,
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
    // A function running as its owner (`src/store/sql/functions/prune_finished.sql`): the worker role
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
