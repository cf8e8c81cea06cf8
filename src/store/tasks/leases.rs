//! Leases: renewal by the heartbeat, rescue of the expired ones.

use sqlx::PgExecutor;
use std::time::Duration;

use crate::store::{ids_of, secs};
use crate::task::{TaskId, TaskStatus};

/// A held task's lease, as renewed by a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    /// The task.
    pub id: TaskId,
    /// Whether its cancel was requested.
    pub cancel_requested: bool,
}

/// Extends the leases of the tasks this worker holds (`ids` with their
/// `runs`). A task missing from the answer is no longer held, or its row
/// was locked by another transaction at that moment: [`still_held`] tells.
pub async fn renew_leases(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    ids: &[TaskId],
    runs: &[i32],
    lease: Duration,
) -> sqlx::Result<Vec<Renewed>> {
    sqlx::query_as!(
        Renewed,
        r#"
        WITH held AS (
            -- SKIP LOCKED, as complete_many: one row locked elsewhere must
            -- not hold up every other lease of this worker.
            SELECT l.id FROM syncq.tasks l
            WHERE l.id = ANY ($2) AND l.locked_by = $1 AND l.status IN ('running', 'queued')
            ORDER BY l.id
            FOR NO KEY UPDATE SKIP LOCKED
        )
        UPDATE syncq.tasks t
        SET lease_expires_at = now() + make_interval(secs => $4)
        WHERE t.id = ANY (ARRAY(SELECT held.id FROM held))
          AND t.runs = ($3::int4[])[array_position($2::int8[], t.id)]
          AND t.locked_by = $1 AND t.status IN ('running', 'queued')
        RETURNING t.id AS "id: TaskId", t.cancel_requested
        "#,
        worker_id,
        &ids_of(ids),
        runs,
        secs(lease),
    )
    .fetch_all(db)
    .await
}

/// Of `ids` (with their `runs`), those this worker still holds, with
/// their `cancel_requested`, read without locking: a row another
/// transaction has locked is still read. Tells a lost lease from a row
/// locked elsewhere, and answers a cancel notification (the row decides,
/// not the message).
pub async fn still_held(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    ids: &[TaskId],
    runs: &[i32],
) -> sqlx::Result<Vec<Renewed>> {
    sqlx::query_as!(
        Renewed,
        r#"
        SELECT t.id AS "id: TaskId", t.cancel_requested FROM syncq.tasks t
        WHERE t.id = ANY ($2) AND t.locked_by = $1 AND t.status IN ('running', 'queued')
          AND t.runs = ($3::int4[])[array_position($2::int8[], t.id)]
        "#,
        worker_id,
        &ids_of(ids),
        runs,
    )
    .fetch_all(db)
    .await
}

/// A task taken back from a silent holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rescued {
    /// The task.
    pub id: TaskId,
    /// The worker that stopped heartbeating.
    pub locked_by: Option<String>,
    /// Where it went: `queued`, `failed` (no attempt left) or `cancelled`.
    pub status: TaskStatus,
}

/// Takes back up to `batch` tasks whose lease expired. A running one's
/// attempt counts, so it goes back to `queued`, or to `failed` when none
/// is left (`cancelled` if a cancel was requested), recorded in
/// `syncq.task_errors`. One its worker leased ahead and never started is
/// only freed: claimable again, uncounted, nothing recorded (SPEC §2
/// `attempts`). Idempotent and safe in every process at once.
pub async fn rescue_expired(db: impl PgExecutor<'_>, batch: i64) -> sqlx::Result<Vec<Rescued>> {
    sqlx::query_as!(
        Rescued,
        r#"
        WITH expired AS (
            SELECT id, locked_by, status = 'running' AS started FROM syncq.tasks
            WHERE locked_by IS NOT NULL AND lease_expires_at < now()
              AND status IN ('running', 'queued')
            ORDER BY lease_expires_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        ),
        rescued AS (
            UPDATE syncq.tasks t
            SET status = CASE
                    WHEN NOT e.started THEN t.status
                    WHEN t.cancel_requested THEN 'cancelled'
                    WHEN t.attempts < t.max_attempts THEN 'queued'
                    ELSE 'failed' END::syncq.task_status,
                finished_at = CASE
                    WHEN NOT e.started THEN t.finished_at
                    WHEN t.cancel_requested OR t.attempts >= t.max_attempts THEN now() END,
                run_at = CASE WHEN e.started THEN now() ELSE t.run_at END,
                last_error = CASE
                    WHEN e.started THEN 'lease expired: worker ' || e.locked_by || ' stopped heartbeating'
                    ELSE t.last_error END,
                locked_by = NULL, lease_expires_at = NULL
            FROM expired e
            WHERE t.id = e.id
            RETURNING t.id, e.locked_by, e.started, t.attempts, t.status, t.last_error
        ),
        logged AS (
            INSERT INTO syncq.task_errors (task_id, attempt, worker_id, error)
            SELECT id, attempts, locked_by, last_error FROM rescued WHERE started
        )
        SELECT id AS "id!: TaskId", locked_by, status::text AS "status!: TaskStatus" FROM rescued
        "#,
        batch,
    )
    .fetch_all(db)
    .await
}
