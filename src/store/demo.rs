//! What `syncq demo` reads and clears: its own datasets, by name prefix.

use sqlx::PgExecutor;

/// Deletes the tasks, rate log and datasets whose names start with
/// `prefix` (what an earlier demo left). Returns the tasks deleted.
pub async fn clear(db: &crate::db::Db, prefix: &str) -> sqlx::Result<u64> {
    let pattern = format!("{}%", like_escape(prefix));
    let mut tx = db.begin().await?;
    let tasks = sqlx::query!("DELETE FROM syncq.tasks WHERE dataset_id LIKE $1", pattern)
        .execute(tx.ex())
        .await?
        .rows_affected();
    sqlx::query!(
        "DELETE FROM syncq.rate_log WHERE dataset_id LIKE $1",
        pattern
    )
    .execute(tx.ex())
    .await?;
    sqlx::query!(
        "DELETE FROM syncq.datasets WHERE dataset_id LIKE $1",
        pattern
    )
    .execute(tx.ex())
    .await?;
    sqlx::query!(
        "DELETE FROM syncq.schedules WHERE dataset_id LIKE $1",
        pattern
    )
    .execute(tx.ex())
    .await?;
    tx.commit().await?;
    Ok(tasks)
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// One dataset's progress, for the live display.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The dataset.
    pub dataset_id: String,
    /// Tasks in it.
    pub total: i64,
    /// Finished (succeeded, failed or cancelled).
    pub done: i64,
    /// Running now.
    pub running: i64,
    /// Queued (including waiting for a retry).
    pub queued: i64,
    /// Starts in the last second.
    pub starts_last_second: i64,
    /// The rate limit, as starts per second, if any.
    pub limit_per_second: Option<f64>,
    /// The concurrency cap, if any.
    pub max_concurrency: Option<i32>,
    /// Throttled by an upstream "rate limit exceeded" right now.
    pub throttled: bool,
}

/// Progress of every dataset whose name starts with `prefix`, by name.
pub async fn progress(db: impl PgExecutor<'_>, prefix: &str) -> sqlx::Result<Vec<Progress>> {
    let pattern = format!("{}%", like_escape(prefix));
    sqlx::query_as!(
        Progress,
        r#"
        SELECT d.dataset_id AS "dataset_id!",
               count(t.id) AS "total!",
               count(t.id) FILTER (WHERE t.status IN ('succeeded', 'failed', 'cancelled')) AS "done!",
               count(t.id) FILTER (WHERE t.status = 'running') AS "running!",
               count(t.id) FILTER (WHERE t.status = 'queued') AS "queued!",
               count(t.id) FILTER (WHERE t.started_at > now() - interval '1 second') AS "starts_last_second!",
               d.rate_limit / extract(epoch FROM d.rate_window)::float8 AS limit_per_second,
               d.max_concurrency,
               coalesce(d.throttled_until > now(), false) AS "throttled!"
        FROM syncq.datasets d
        -- Both halves (held or not), each a range of its index.
        LEFT JOIN syncq.tasks t ON t.dataset_id = d.dataset_id
                               AND (t.locked_by IS NULL OR t.locked_by IS NOT NULL)
        WHERE d.dataset_id LIKE $1
        GROUP BY d.dataset_id
        ORDER BY d.dataset_id
        "#,
        pattern
    )
    .fetch_all(db)
    .await
}

/// One dataset's outcome, for the summary table. Read from the rows.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The dataset.
    pub dataset_id: String,
    /// Tasks in it.
    pub tasks: i64,
    /// Ended `succeeded`.
    pub succeeded: i64,
    /// Ended `failed`.
    pub failed: i64,
    /// Counted attempts, over all tasks.
    pub attempts: i64,
    /// Handler runs, counted or not (throttled and interrupted runs too).
    pub runs: i64,
    /// Counted attempts that were retried.
    pub retries: i64,
    /// Runs answered "rate limit exceeded" (the dataset was throttled).
    pub throttles: i64,
    /// Tasks that resumed from a checkpoint after an interruption.
    pub resumed: i64,
    /// Seconds from `since` to the dataset's last finish.
    pub elapsed_secs: f64,
    /// Seconds from `since` to the dataset's last start.
    pub last_start_secs: f64,
    /// The rate window in seconds (1 without a rate limit).
    pub window_secs: f64,
    /// The rate limit, as starts per second, if any.
    pub limit_per_second: Option<f64>,
}

/// The summary of every dataset whose name starts with `prefix`, timed
/// from `since` (the demo's start, on the database clock).
pub async fn summary(
    db: impl PgExecutor<'_>,
    prefix: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> sqlx::Result<Vec<Summary>> {
    let pattern = format!("{}%", like_escape(prefix));
    sqlx::query_as!(
        Summary,
        r#"
        SELECT d.dataset_id AS "dataset_id!",
               count(t.id) AS "tasks!",
               count(t.id) FILTER (WHERE t.status = 'succeeded') AS "succeeded!",
               count(t.id) FILTER (WHERE t.status = 'failed') AS "failed!",
               coalesce(sum(t.attempts), 0)::int8 AS "attempts!",
               coalesce(sum(t.runs), 0)::int8 AS "runs!",
               coalesce(sum(greatest(t.attempts - 1, 0)), 0)::int8 AS "retries!",
               (SELECT count(*) FROM syncq.task_errors e JOIN syncq.tasks t2 ON t2.id = e.task_id
                WHERE t2.dataset_id = d.dataset_id AND (t2.locked_by IS NULL OR t2.locked_by IS NOT NULL)
                  AND e.error LIKE 'rate limited%') AS "throttles!",
               count(t.id) FILTER (WHERE (t.result ->> 'resumed_from')::int8 > 0) AS "resumed!",
               coalesce(extract(epoch FROM max(t.finished_at) - $2)::float8, 0) AS "elapsed_secs!",
               coalesce(extract(epoch FROM max(t.started_at) - $2)::float8, 0) AS "last_start_secs!",
               CASE WHEN d.rate_limit IS NULL THEN 1.0
                    ELSE extract(epoch FROM d.rate_window)::float8 END AS "window_secs!",
               d.rate_limit / extract(epoch FROM d.rate_window)::float8 AS limit_per_second
        FROM syncq.datasets d
        -- Both halves (held or not), each a range of its index.
        LEFT JOIN syncq.tasks t ON t.dataset_id = d.dataset_id
                               AND (t.locked_by IS NULL OR t.locked_by IS NOT NULL)
        WHERE d.dataset_id LIKE $1
        GROUP BY d.dataset_id
        ORDER BY d.dataset_id
        "#,
        pattern,
        since
    )
    .fetch_all(db)
    .await
}

/// The worker holding a running task of `dataset`, if any.
pub async fn holder_of_running(
    db: impl PgExecutor<'_>,
    dataset: &str,
) -> sqlx::Result<Option<String>> {
    Ok(sqlx::query_scalar!(
        "SELECT locked_by FROM syncq.tasks WHERE dataset_id = $1 AND status = 'running' AND locked_by IS NOT NULL ORDER BY id LIMIT 1",
        dataset
    )
    .fetch_optional(db)
    .await?
    .flatten())
}
