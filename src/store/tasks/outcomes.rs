//! Ending an attempt: the fenced writes of SPEC §3, and checkpoints.
//!
//! Every statement here is fenced by `(id, runs, locked_by, status =
//! 'running')`: a worker that lost its lease matches nothing.

use serde_json::Value;
use sqlx::PgExecutor;
use std::time::Duration;

use crate::store::{secs, storable_message};
use crate::task::TaskId;

/// Longest throttle a rate-limited attempt sets (`TaskError::MAX_RETRY_AFTER`).
pub(crate) const MAX_THROTTLE: Duration = Duration::from_secs(24 * 60 * 60);

/// Stores a checkpoint for a task this worker holds. False: fenced out.
pub async fn save_checkpoint(
    db: impl PgExecutor<'_>,
    id: TaskId,
    runs: i32,
    worker_id: &str,
    checkpoint: &Value,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        r#"
        UPDATE syncq.tasks SET checkpoint = $4
        WHERE id = $1 AND runs = $2 AND locked_by = $3 AND status = 'running'
        "#,
        id.0,
        runs,
        worker_id,
        checkpoint,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The holder's identity for a fenced write.
#[derive(Debug, Clone, Copy)]
pub struct Fence<'a> {
    /// The task.
    pub id: TaskId,
    /// Its `runs` when claimed.
    pub runs: i32,
    /// The holding worker.
    pub worker_id: &'a str,
}

/// Marks many tasks `succeeded` in one statement (one commit): the hot path
/// of a busy pool. Each is fenced on its own `(id, runs)` and the holder, so
/// a task whose lease was lost is left alone while the rest are written.
/// Returns the ids written. Atomic: on error nothing was written.
pub async fn succeed_many(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    done: &[(TaskId, i32, Value)],
) -> sqlx::Result<Vec<TaskId>> {
    let mut sorted: Vec<&(TaskId, i32, Value)> = done.iter().collect();
    // One lock order for every writer of a batch: fewer deadlocks.
    sorted.sort_by_key(|d| d.0);
    let ids: Vec<i64> = sorted.iter().map(|d| d.0.0).collect();
    let runs: Vec<i32> = sorted.iter().map(|d| d.1).collect();
    let results: Vec<Value> = sorted.iter().map(|d| d.2.clone()).collect();
    // A row locked elsewhere (an operator's cancel in an open transaction)
    // is waited for at most 100 ms, then left out: the caller tells such
    // rows from lost ones (still_held) and writes them again.
    sqlx::query_scalar!(
        r#"SELECT id AS "id!: TaskId" FROM syncq.succeed_many($1, $2, $3, $4) AS s(id)"#,
        worker_id,
        &ids,
        &runs,
        &results,
    )
    .fetch_all(db)
    .await
}

/// A counted failed attempt: back to `queued` after `backoff`, or `failed`
/// when no attempt is left or `retry` is false. The error is recorded in
/// `last_error` and `syncq.task_errors`. A task whose cancel was requested
/// meanwhile ends `cancelled`. False: fenced out.
pub async fn fail_attempt(
    db: impl PgExecutor<'_>,
    f: Fence<'_>,
    error: &str,
    retry: bool,
    backoff: Duration,
) -> sqlx::Result<bool> {
    let error = storable_message(error);
    let done = sqlx::query!(
        r#"
        WITH done AS (
            UPDATE syncq.tasks t
            SET status = CASE
                    WHEN t.cancel_requested THEN 'cancelled'
                    WHEN $5 AND t.attempts < t.max_attempts THEN 'queued'
                    ELSE 'failed' END::syncq.task_status,
                run_at = CASE WHEN $5 AND t.attempts < t.max_attempts
                              THEN now() + make_interval(secs => $6) ELSE t.run_at END,
                finished_at = CASE WHEN t.cancel_requested OR NOT $5 OR t.attempts >= t.max_attempts
                                   THEN now() END,
                last_error = $4, locked_by = NULL, lease_expires_at = NULL
            WHERE t.id = $1 AND t.runs = $2 AND t.locked_by = $3 AND t.status = 'running'
            RETURNING t.id, t.attempts
        )
        INSERT INTO syncq.task_errors (task_id, attempt, worker_id, error)
        SELECT id, attempts, $3, $4 FROM done
        "#,
        f.id.0,
        f.runs,
        f.worker_id,
        error.as_ref(),
        retry,
        secs(backoff),
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// An attempt that does not count: back to `queued` now, its checkpoint kept
/// (checkpoints are saved as they are made). Used for checkpoint/shutdown,
/// `Fatal` (whose message is recorded as `error`), and aborted handlers.
/// False: fenced out.
pub async fn release(
    db: impl PgExecutor<'_>,
    f: Fence<'_>,
    error: Option<&str>,
) -> sqlx::Result<bool> {
    release_throttling(db, f, error, None).await
}

/// The upstream said "rate limit exceeded": the task goes back to `queued`
/// with its attempt not counted, and its dataset is throttled until
/// `now() + retry_after` (keeping a later existing throttle), for every
/// process. The error is recorded. False: fenced out.
pub async fn rate_limited(
    db: impl PgExecutor<'_>,
    f: Fence<'_>,
    error: &str,
    retry_after: Duration,
) -> sqlx::Result<bool> {
    release_throttling(db, f, Some(error), Some(retry_after.min(MAX_THROTTLE))).await
}

/// Both uncounted ends in one statement: back to `queued` (or `cancelled`
/// if a cancel was requested meanwhile), `error` recorded if given, and
/// with `throttle` the dataset held back that long.
async fn release_throttling(
    db: impl PgExecutor<'_>,
    f: Fence<'_>,
    error: Option<&str>,
    throttle: Option<Duration>,
) -> sqlx::Result<bool> {
    let error = error.map(storable_message);
    let done = sqlx::query_scalar!(
        r#"
        WITH released AS (
            UPDATE syncq.tasks t
            SET status = CASE WHEN t.cancel_requested THEN 'cancelled' ELSE 'queued' END::syncq.task_status,
                finished_at = CASE WHEN t.cancel_requested THEN now() END,
                attempts = greatest(t.attempts - 1, 0),
                last_error = coalesce($4, t.last_error),
                run_at = now(), locked_by = NULL, lease_expires_at = NULL
            WHERE t.id = $1 AND t.runs = $2 AND t.locked_by = $3 AND t.status = 'running'
            RETURNING t.id, t.dataset_id, t.attempts
        ),
        throttled AS (
            UPDATE syncq.datasets d
            SET throttled_until = greatest(d.throttled_until, now() + make_interval(secs => $5))
            FROM released r WHERE $5::float8 IS NOT NULL AND d.dataset_id = r.dataset_id
        ),
        logged AS (
            INSERT INTO syncq.task_errors (task_id, attempt, worker_id, error)
            SELECT id, attempts + 1, $3, $4 FROM released WHERE $4 IS NOT NULL
        )
        SELECT count(*) AS "released!" FROM released
        "#,
        f.id.0,
        f.runs,
        f.worker_id,
        error.as_deref(),
        throttle.map(secs),
    )
    .fetch_one(db)
    .await?;
    Ok(done == 1)
}

/// `cancelled`, as the handler reported. False: fenced out.
pub async fn cancel_running(db: impl PgExecutor<'_>, f: Fence<'_>) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        r#"
        UPDATE syncq.tasks
        SET status = 'cancelled', finished_at = now(), locked_by = NULL, lease_expires_at = NULL
        WHERE id = $1 AND runs = $2 AND locked_by = $3 AND status = 'running'
        "#,
        f.id.0,
        f.runs,
        f.worker_id,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
