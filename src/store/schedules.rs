//! Statements on `syncq.schedules`, and the tasks its ticks enqueue.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;

use crate::schedule::{Schedule, Timing};
use crate::task::{TaskId, TaskStatus};

/// A due schedule, as the scheduler reads it.
#[derive(Debug, Clone)]
pub(crate) struct DueRow {
    pub schedule_id: String,
    pub cron: Option<String>,
    pub every: Option<std::time::Duration>,
    pub timezone: String,
    pub catch_up: bool,
    pub overlap: bool,
    pub next_run_at: Option<DateTime<Utc>>,
}

/// Seconds until the earliest tick of a schedule that can tick (0 or
/// less: one is due now, or new); None when there is none.
pub(crate) async fn next_due_in(db: impl PgExecutor<'_>) -> sqlx::Result<Option<f64>> {
    sqlx::query_scalar!(
        r#"
        SELECT extract(epoch FROM min(coalesce(next_run_at, now())) - now())::float8
        FROM syncq.schedules WHERE NOT paused AND error IS NULL
        "#
    )
    .fetch_one(db)
    .await
}

/// Locks the most overdue schedule no other scheduler holds, with the
/// database's clock, which decides what is due. One at a time: each is
/// ticked in a transaction of its own, so one that cannot be enqueued
/// fails alone. Its payload is not read here: the tick's INSERT copies it
/// in SQL (a payload this process could not decode — nested 300 deep, a
/// number past f64 — is still a valid jsonb, and the handler's to judge).
pub(crate) async fn take_due(
    db: impl PgExecutor<'_>,
    skip: &[String],
) -> sqlx::Result<Option<(DateTime<Utc>, DueRow)>> {
    let row = sqlx::query!(
        r#"
        SELECT now() AS "now!", schedule_id, cron,
               extract(epoch FROM every)::float8 AS every_secs, timezone,
               catch_up, overlap, next_run_at
        FROM syncq.schedules
        WHERE NOT paused AND error IS NULL AND (next_run_at IS NULL OR next_run_at <= now())
          AND NOT (schedule_id = ANY ($1))
        ORDER BY next_run_at NULLS FIRST
        LIMIT 1
        FOR UPDATE SKIP LOCKED
        "#,
        skip,
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| {
        (
            r.now,
            DueRow {
                schedule_id: r.schedule_id,
                cron: r.cron,
                every: r
                    .every_secs
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(std::time::Duration::from_secs_f64),
                timezone: r.timezone,
                catch_up: r.catch_up,
                overlap: r.overlap,
                next_run_at: r.next_run_at,
            },
        )
    }))
}

pub(crate) async fn has_active_task(
    db: impl PgExecutor<'_>,
    schedule_id: &str,
) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM syncq.tasks
                          WHERE schedule_id = $1 AND status IN ('queued', 'running')) AS "active!""#,
        schedule_id
    )
    .fetch_one(db)
    .await
}

/// Enqueues the task of one tick, its payload copied from the schedule's
/// row; None if that tick already has one.
pub(crate) async fn enqueue_tick(
    db: impl PgExecutor<'_>,
    row: &DueRow,
    tick: DateTime<Utc>,
) -> sqlx::Result<Option<TaskId>> {
    sqlx::query_scalar!(
        r#"
        INSERT INTO syncq.tasks (dataset_id, kind, payload, priority, max_attempts, schedule_id, scheduled_for)
        SELECT s.dataset_id, s.kind, s.payload, s.priority, s.max_attempts, s.schedule_id, $2
        FROM syncq.schedules s WHERE s.schedule_id = $1
        ON CONFLICT (schedule_id, scheduled_for) WHERE schedule_id IS NOT NULL DO NOTHING
        RETURNING id AS "id: TaskId"
        "#,
        row.schedule_id,
        tick,
    )
    .fetch_optional(db)
    .await
}

/// Moves a schedule on to its next tick.
pub(crate) async fn advance(
    db: impl PgExecutor<'_>,
    schedule_id: &str,
    next: Option<DateTime<Utc>>,
    ran: Option<DateTime<Utc>>,
    task: Option<TaskId>,
    skipped: i64,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"
        UPDATE syncq.schedules
        SET next_run_at = $2,
            -- No next tick (a cron expression that never matches again).
            error = CASE WHEN $2::timestamptz IS NULL THEN 'no next tick' END,
            last_run_at = coalesce($3, last_run_at),
            last_task_id = coalesce($4, last_task_id),
            skipped_ticks = skipped_ticks + $5
        WHERE schedule_id = $1
        "#,
        schedule_id,
        next,
        ran,
        task.map(|t| t.0),
        skipped,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Records why a schedule cannot tick (it is left out until changed).
pub(crate) async fn set_error(
    db: impl PgExecutor<'_>,
    schedule_id: &str,
    error: &str,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE syncq.schedules SET error = $2, next_run_at = NULL WHERE schedule_id = $1",
        schedule_id,
        error
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Creates or replaces a schedule (its next tick is computed afresh when
/// its timing changed).
pub async fn upsert(db: impl PgExecutor<'_>, s: &Schedule) -> sqlx::Result<()> {
    let (cron, every) = match &s.timing {
        Timing::Cron(c) => (Some(c.as_str()), None),
        Timing::Every(d) => (None, Some(d.as_secs_f64())),
    };
    sqlx::query!(
        r#"
        INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, payload, cron, every, timezone,
                                     priority, max_attempts, catch_up, overlap)
        VALUES ($1, $2, $3, $4, $5, make_interval(secs => $6), $7, $8, $9, $10, $11)
        ON CONFLICT (schedule_id) DO UPDATE
        SET dataset_id = EXCLUDED.dataset_id, kind = EXCLUDED.kind, payload = EXCLUDED.payload,
            cron = EXCLUDED.cron, every = EXCLUDED.every, timezone = EXCLUDED.timezone,
            priority = EXCLUDED.priority, max_attempts = EXCLUDED.max_attempts,
            catch_up = EXCLUDED.catch_up, overlap = EXCLUDED.overlap
        "#,
        s.schedule_id,
        s.dataset_id,
        s.kind,
        s.payload,
        cron,
        every,
        s.timezone,
        s.priority,
        s.max_attempts,
        s.catch_up,
        s.overlap,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Removes a schedule; false if there was none. Its tasks stay.
pub async fn remove(db: impl PgExecutor<'_>, schedule_id: &str) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "DELETE FROM syncq.schedules WHERE schedule_id = $1",
        schedule_id
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Pauses or resumes a schedule; false if there is none. A resumed
/// schedule's next tick is computed afresh (no catch-up for a pause) — by
/// the schedules_resumed trigger, so a plain SQL `UPDATE … SET paused =
/// false` does the same.
pub async fn set_paused(
    db: impl PgExecutor<'_>,
    schedule_id: &str,
    paused: bool,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        r#"UPDATE syncq.schedules
           SET paused = $2, next_run_at = CASE WHEN $2 THEN next_run_at END
           WHERE schedule_id = $1"#,
        schedule_id,
        paused
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// A schedule as `syncq schedule list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleInfo {
    /// Its name, unique: the id of `syncq.schedules`.
    pub schedule_id: String,
    /// The dataset its tasks go to.
    pub dataset_id: String,
    /// The kind of its tasks.
    pub kind: String,
    /// Its cron expression, if it ticks by one.
    pub cron: Option<String>,
    /// Its interval in seconds, if it ticks by one.
    pub every_secs: Option<f64>,
    /// The IANA time zone its cron expression is read in.
    pub timezone: String,
    /// Paused: it enqueues nothing (for a dataset: nothing of it starts).
    pub paused: bool,
    /// When it ticks next (`None`: not yet computed, paused, or in error).
    pub next_run_at: Option<DateTime<Utc>>,
    /// Its last tick.
    pub last_run_at: Option<DateTime<Utc>>,
    /// The task its last tick enqueued.
    pub last_task_id: Option<TaskId>,
    /// That task's status (`None`: pruned).
    pub last_task_status: Option<TaskStatus>,
    /// Ticks skipped because the previous task was still queued or running.
    pub skipped_ticks: i64,
    /// Why it cannot tick (an invalid cron or time zone), if so.
    pub error: Option<String>,
}

/// Every schedule, by id.
pub async fn list(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<ScheduleInfo>> {
    sqlx::query_as!(
        ScheduleInfo,
        r#"
        SELECT s.schedule_id, s.dataset_id, s.kind, s.cron,
               extract(epoch FROM s.every)::float8 AS every_secs, s.timezone, s.paused,
               s.next_run_at, s.last_run_at, s.last_task_id AS "last_task_id: TaskId",
               (SELECT t.status::text FROM syncq.tasks t WHERE t.id = s.last_task_id) AS "last_task_status: TaskStatus",
               s.skipped_ticks, s.error
        FROM syncq.schedules s
        ORDER BY s.schedule_id
        "#
    )
    .fetch_all(db)
    .await
}

/// The schedule and tick a task was enqueued for, if any.
pub(crate) async fn tick_of(
    db: impl PgExecutor<'_>,
    task: TaskId,
) -> sqlx::Result<Option<(String, DateTime<Utc>)>> {
    let row = sqlx::query!(
        "SELECT schedule_id, scheduled_for FROM syncq.tasks WHERE id = $1",
        task.0
    )
    .fetch_optional(db)
    .await?;
    Ok(row.and_then(|r| r.schedule_id.zip(r.scheduled_for)))
}

/// Makes the schedules exactly `wanted`: creates and changes those given,
/// removes every other. One transaction.
pub async fn reconcile(db: &crate::db::Db, wanted: &[Schedule]) -> sqlx::Result<(usize, usize)> {
    let mut tx = db.begin().await?;
    for s in wanted {
        upsert(tx.ex(), s).await?;
    }
    let keep: Vec<String> = wanted.iter().map(|s| s.schedule_id.clone()).collect();
    let removed = sqlx::query!(
        "DELETE FROM syncq.schedules WHERE NOT (schedule_id = ANY ($1))",
        &keep
    )
    .execute(tx.ex())
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok((wanted.len(), usize::try_from(removed).unwrap_or(usize::MAX)))
}
