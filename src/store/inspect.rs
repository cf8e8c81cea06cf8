//! Read-only queries for `syncq status`, `tasks` and `show`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgExecutor;

use crate::task::TaskId;

/// One row of `syncq.dataset_stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStats {
    pub dataset_id: String,
    pub queued: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Seconds since the oldest ready task became ready.
    pub oldest_ready_age_secs: Option<f64>,
    pub rate_limit: Option<i32>,
    pub rate_window_secs: f64,
    pub max_concurrency: Option<i32>,
    pub paused: bool,
    pub throttled_until: Option<DateTime<Utc>>,
    pub throttled: bool,
}

/// Every dataset's stats, by id.
pub async fn dataset_stats(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<DatasetStats>> {
    let rows = sqlx::query!(
        r#"
        SELECT dataset_id AS "dataset_id!", queued AS "queued!", running AS "running!",
               succeeded AS "succeeded!", failed AS "failed!", cancelled AS "cancelled!",
               extract(epoch FROM oldest_ready_age)::float8 AS oldest_ready_age_secs,
               rate_limit, extract(epoch FROM rate_window)::float8 AS "rate_window_secs!",
               max_concurrency, paused AS "paused!", throttled_until,
               coalesce(throttled_until > now(), false) AS "throttled!"
        FROM syncq.dataset_stats ORDER BY dataset_id
        "#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| DatasetStats {
            dataset_id: r.dataset_id,
            queued: r.queued,
            running: r.running,
            succeeded: r.succeeded,
            failed: r.failed,
            cancelled: r.cancelled,
            oldest_ready_age_secs: r.oldest_ready_age_secs,
            rate_limit: r.rate_limit,
            rate_window_secs: r.rate_window_secs,
            max_concurrency: r.max_concurrency,
            paused: r.paused,
            throttled_until: r.throttled_until,
            throttled: r.throttled,
        })
        .collect())
}

/// A live worker process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub host: String,
    pub pid: i32,
    pub kinds: Vec<String>,
    pub concurrency: i32,
    pub running: i64,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
    pub heartbeat_age_secs: f64,
    /// How often it beats: it is live while its last beat is younger than
    /// two of these (and a second).
    pub heartbeat_every_secs: f64,
}

/// Workers whose heartbeat is current (`syncq.workers_live`).
pub async fn live_workers(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<WorkerInfo>> {
    let rows = sqlx::query!(
        r#"
        SELECT w.worker_id AS "worker_id!", w.host AS "host!", w.pid AS "pid!",
               w.kinds AS "kinds!", w.concurrency AS "concurrency!",
               w.started_at AS "started_at!", w.last_heartbeat_at AS "last_heartbeat_at!",
               extract(epoch FROM w.heartbeat_age)::float8 AS "age!",
               extract(epoch FROM w.heartbeat_every)::float8 AS "every!",
               (SELECT count(*) FROM syncq.tasks t
                 WHERE t.locked_by = w.worker_id AND t.status = 'running') AS "running!"
        FROM syncq.workers_live w
        ORDER BY w.host, w.pid
        "#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| WorkerInfo {
            worker_id: r.worker_id,
            host: r.host,
            pid: r.pid,
            kinds: r.kinds,
            concurrency: r.concurrency,
            running: r.running,
            started_at: r.started_at,
            last_heartbeat_at: r.last_heartbeat_at,
            heartbeat_age_secs: r.age,
            heartbeat_every_secs: r.every,
        })
        .collect())
}

/// Kinds with queued tasks that no live worker handles.
pub async fn unhandled_kinds(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        r#"
        SELECT DISTINCT t.kind AS "kind!" FROM syncq.tasks t
        WHERE t.status = 'queued'
          AND NOT EXISTS (SELECT 1 FROM syncq.workers_live w WHERE t.kind = ANY (w.kinds))
        ORDER BY 1
        "#
    )
    .fetch_all(db)
    .await
}

/// A task as `syncq tasks` and `syncq show` print it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskInfo {
    pub id: TaskId,
    pub dataset_id: String,
    pub kind: String,
    pub status: String,
    pub priority: i16,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub locked_by: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub unique_key: Option<String>,
    pub cancel_requested: bool,
    pub payload: Value,
    pub checkpoint: Option<Value>,
    pub result: Option<Value>,
    pub last_error: Option<String>,
}

/// Tasks, newest first, optionally of one dataset and/or status.
pub async fn tasks(
    db: impl PgExecutor<'_>,
    dataset_id: Option<&str>,
    status: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<TaskInfo>> {
    sqlx::query_as!(
        TaskInfo,
        r#"
        SELECT id, dataset_id, kind, status::text AS "status!", priority, attempts, max_attempts,
               run_at, created_at, started_at, finished_at, locked_by, lease_expires_at,
               unique_key, cancel_requested, payload, checkpoint, result, last_error
        FROM syncq.tasks
        WHERE ($1::text IS NULL OR dataset_id = $1) AND ($2::text IS NULL OR status::text = $2)
        ORDER BY id DESC
        LIMIT $3
        "#,
        dataset_id,
        status,
        limit
    )
    .fetch_all(db)
    .await
}

/// One attempt's error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptError {
    pub attempt: i32,
    pub worker_id: Option<String>,
    pub error: String,
    pub at: DateTime<Utc>,
}

/// A task's error history, oldest first.
pub async fn errors(db: impl PgExecutor<'_>, id: TaskId) -> sqlx::Result<Vec<AttemptError>> {
    sqlx::query_as!(
        AttemptError,
        "SELECT attempt, worker_id, error, at FROM syncq.task_errors WHERE task_id = $1 ORDER BY id",
        id
    )
    .fetch_all(db)
    .await
}

/// One task by id.
pub async fn task(db: impl PgExecutor<'_>, id: TaskId) -> sqlx::Result<Option<TaskInfo>> {
    sqlx::query_as!(
        TaskInfo,
        r#"
        SELECT id, dataset_id, kind, status::text AS "status!", priority, attempts, max_attempts,
               run_at, created_at, started_at, finished_at, locked_by, lease_expires_at,
               unique_key, cancel_requested, payload, checkpoint, result, last_error
        FROM syncq.tasks WHERE id = $1
        "#,
        id
    )
    .fetch_optional(db)
    .await
}

/// `(id, payload, priority, unique_key)` of the queued tasks of `kind` in
/// `dataset`, oldest first (for `syncq::testing`).
pub async fn queued_of_kind(
    db: impl PgExecutor<'_>,
    dataset: &str,
    kind: &str,
) -> sqlx::Result<Vec<(TaskId, Value, i16, Option<String>)>> {
    let rows = sqlx::query!(
        r#"
        SELECT id, payload, priority, unique_key FROM syncq.tasks
        WHERE dataset_id = $1 AND kind = $2 AND status = 'queued'
        ORDER BY id
        "#,
        dataset,
        kind
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.id, r.payload, r.priority, r.unique_key))
        .collect())
}

/// Per dataset with queued or running tasks: `(dataset, queued, running,
/// age in seconds of its oldest ready task)`, for the metrics sampler.
pub async fn queue_depths(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i64, i64, f64)>> {
    let rows = sqlx::query!(
        r#"
        SELECT dataset_id AS "dataset_id!",
               count(*) FILTER (WHERE status = 'queued') AS "queued!",
               count(*) FILTER (WHERE status = 'running') AS "running!",
               coalesce(extract(epoch FROM now() - min(run_at) FILTER (
                   WHERE status = 'queued' AND run_at <= now())), 0)::float8 AS "oldest_ready_age!"
        FROM syncq.tasks
        WHERE status IN ('queued', 'running')
        GROUP BY dataset_id
        "#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.dataset_id, r.queued, r.running, r.oldest_ready_age))
        .collect())
}

/// Registered workers whose heartbeat stopped (killed, or cut off from the
/// database): `(host, pid, seconds since their last beat)`. Their rows go
/// when they exit cleanly; their tasks come back when their leases expire.
pub async fn stale_workers(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i32, f64)>> {
    let rows = sqlx::query!(
        r#"
        SELECT w.host, w.pid, extract(epoch FROM now() - w.last_heartbeat_at)::float8 AS "age!"
        FROM syncq.workers w
        WHERE NOT EXISTS (SELECT 1 FROM syncq.workers_live l WHERE l.worker_id = w.worker_id)
        ORDER BY 3
        "#
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.host, r.pid, r.age)).collect())
}
